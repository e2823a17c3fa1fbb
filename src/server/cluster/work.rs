//! etcd work done off the connections' threads: confirming a waiter's grant, deleting a key
//! before telling its connection that its wait or lease is over, and the cleanup of keys that
//! could not be deleted when they should have been.
//!
//! Why a cleanup at all: a key left behind at the head of a queue would be counted a holder by
//! every member until this member's lease ended. Keys are left behind when a deletion fails
//! (etcd unreachable for a moment), and when a write's outcome is unknown: it may be applied
//! later, after any deletion we sent. So the cleanup thread retries failed deletions, and every
//! few seconds sweeps the mirror for keys of this member's lease that no connection owns.

use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use log::{debug, warn};

use super::keys::{Value, member_id, unix_ms};
use super::{CALL, EtcdLocks, Stage, one_line};
use crate::etcd::{Compare, CompareOp, DeleteRequest, Op, PutRequest, Txn};
use crate::metrics::Release;
use crate::server::link::Link;
use crate::table::{ConnId, Left};
use tcpnetlock::protocol::Reply;

/// How often the mirror is swept for this member's orphaned keys.
const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// How long a failed deletion waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_millis(200);

pub enum Job {
    /// A waiter the rule counts among the holders: confirm and tell it.
    Confirm(ConnId),
    /// Delete a key (a waiter whose wait ran out, a lease over), then tell its connection.
    End {
        key: Vec<u8>,
        lease: i64,
        then: Then,
    },
}

/// What a connection is told once its key is gone.
pub enum Then {
    Say(Arc<Link>, Reply),
    /// A holder this member no longer vouches for: the close is the message.
    HangUp(Arc<Link>),
}

impl Then {
    fn run(self) {
        match self {
            Then::Say(link, reply) => link.end_with(&reply),
            Then::HangUp(link) => link.hang_up(),
        }
    }
}

impl EtcdLocks {
    pub(super) fn run_worker(&self) {
        loop {
            let job = self
                .job_queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .recv();
            match job {
                Ok(Job::Confirm(conn)) => self.confirm(conn),
                Ok(Job::End { key, lease, then }) => {
                    self.delete_now(&key, lease);
                    then.run();
                }
                // Every sender is gone: nothing more will come.
                Err(_) => return,
            }
        }
    }

    /// Grants a waiter the rule counts among the holders: a transaction that rewrites its key
    /// only if it still is the one created for this request (so a key deleted meanwhile is
    /// never brought back), whose revision is the token.
    fn confirm(&self, conn: ConnId) {
        let now = Instant::now();
        let (key, revision, lease, mut value, offset) = {
            let mut inner = self.inner();
            let Some(local) = inner.conns.get(&conn) else {
                return;
            };
            if local.stage != Stage::Confirming {
                return;
            }
            if local.wait_until <= now {
                let local = inner.remove(conn).expect("present");
                inner.counters.wait_timeouts += 1;
                inner.counters.not_acquired += 1;
                drop(inner);
                debug!("lock {}: wait timed out", local.name);
                self.delete_now(&local.key, local.lease);
                local.link.end_with(&Reply::NotGranted);
                return;
            }
            let ttl = local.ttl;
            let (mut inner, vouches) = self.await_vouching(inner, ttl);
            let Some(local) = inner
                .conns
                .get_mut(&conn)
                .filter(|l| l.stage == Stage::Confirming)
            else {
                return;
            };
            if !vouches {
                // The lease is late: the member thread looks again once it is renewed, or ends
                // every connection if it is not. Meanwhile its wait may run out (the timer
                // passed over it while it was being confirmed).
                local.stage = Stage::Waiting;
                let until = local.wait_until;
                inner.set_due(conn, Some(until));
                self.timer_check(&inner, Some(until));
                return;
            }
            let local = &inner.conns[&conn];
            (
                local.key.clone(),
                local.create_revision,
                local.lease,
                local.value.clone(),
                inner.offset.unwrap_or(0),
            )
        };
        value.granted_unix_ms = Some(unix_ms());
        let txn = Txn::new()
            .when([Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([Op::Put(
                PutRequest::new(key.clone(), value.to_bytes()).lease(lease),
            )]);
        match self.etcd.txn(&txn, now + CALL) {
            Ok(r) if r.succeeded => {
                let token = offset.saturating_add(r.header.revision.max(0) as u64);
                self.granted(conn, token, value);
            }
            Ok(_) => {
                let local = self.inner().remove(conn);
                if let Some(local) = local {
                    warn!(
                        "lock {}: a waiter's etcd key is gone (lease expired?): ending it",
                        local.name
                    );
                    local.link.end_with(&Reply::Err(
                        "lost its place in the queue: its etcd key is gone (lease expired?)".into(),
                    ));
                }
            }
            Err(e) => {
                let local = self.inner().remove(conn);
                // Whatever happened, the key must go: a conditional write cannot bring it
                // back once it is deleted.
                self.delete_now(&key, lease);
                if let Some(local) = local {
                    warn!("lock {}: cannot confirm a grant: {e}", local.name);
                    local.link.end_with(&Reply::Err(
                        format!("cluster unavailable: {}", one_line(&e.to_string())).into(),
                    ));
                }
            }
        }
    }

    /// A confirmed grant: the waiter now holds, and is told so.
    fn granted(&self, conn: ConnId, token: u64, value: Value) {
        let (link, name) = {
            let inner = self.inner();
            let Some(ttl) = inner.conns.get(&conn).map(|l| l.ttl) else {
                // It left while we confirmed; its leave deletes (or deleted) the key.
                return;
            };
            let (mut inner, vouches) = self.await_vouching(inner, ttl);
            let now = Instant::now();
            let Some(local) = inner.conns.get(&conn) else {
                return;
            };
            if local.stage != Stage::Confirming {
                return;
            }
            if !vouches {
                let local = inner.remove(conn).expect("present");
                let why = format!("not serving locks: {}", one_line(&inner.reason));
                drop(inner);
                self.send(Job::End {
                    key: local.key,
                    lease: local.lease,
                    then: Then::Say(local.link, Reply::Err(why.into())),
                });
                return;
            }
            let local = inner.conns.get_mut(&conn).expect("present");
            local.stage = Stage::Holding;
            self.metrics
                .granted_after_wait(now.saturating_duration_since(local.since));
            local.since = now;
            local.value = value;
            let ttl = local.ttl;
            let shared = local.value.shared;
            let link = Arc::clone(&local.link);
            let name = local.name.clone();
            inner.set_due(conn, ttl.map(|t| now + t));
            self.timer_check(&inner, ttl.map(|t| now + t));
            inner.counters.acquired += 1;
            inner.counters.granted_after_wait += 1;
            inner.counters.shared_acquired += u64::from(shared);
            link.grant_decided();
            (link, name)
        };
        match link.write_grant(token) {
            Ok(()) => debug!("lock {name}: granted to a waiter (token {token})"),
            Err(e) => {
                debug!("lock {name}: grant to a departed client ({e})");
                use super::Locks;
                if let Left::Held(held) = self.leave(&name, conn) {
                    self.metrics.released(Release::Disconnect, held);
                }
            }
        }
    }

    /// The cleanup thread: retries deletions, sweeps for orphaned keys.
    pub(super) fn run_cleanup(&self) {
        let mut swept = Instant::now();
        loop {
            let batch = {
                let inner = self.inner();
                let wait = SWEEP_EVERY.saturating_sub(swept.elapsed());
                let (mut inner, _) = self
                    .cleanup
                    .wait_timeout_while(inner, wait, |i| i.to_delete.is_empty())
                    .unwrap_or_else(PoisonError::into_inner);
                std::mem::take(&mut inner.to_delete)
            };
            let mut failed = Vec::new();
            for (key, lease) in batch {
                match self
                    .etcd
                    .delete(&DeleteRequest::key(key.clone()), Instant::now() + CALL)
                {
                    Ok(_) => debug!("etcd: deleted {}", String::from_utf8_lossy(&key)),
                    Err(e) => {
                        debug!(
                            "etcd: deleting {} failed again: {e}",
                            String::from_utf8_lossy(&key)
                        );
                        failed.push((key, lease));
                    }
                }
            }
            if !failed.is_empty() {
                std::thread::sleep(RETRY_AFTER);
                let mut inner = self.inner();
                // A key of a lease this member no longer holds goes with that lease.
                let current = inner.lease.map(|l| l.id);
                inner
                    .to_delete
                    .extend(failed.into_iter().filter(|(_, l)| Some(*l) == current));
            }
            if swept.elapsed() >= SWEEP_EVERY {
                swept = Instant::now();
                self.sweep();
            }
        }
    }

    /// Deletes keys of this member's lease that no connection owns and no `lock` is deciding.
    fn sweep(&self) {
        let orphans: Vec<Vec<u8>> = {
            let inner = self.inner();
            let Some(lease) = inner.lease.filter(|_| inner.synced) else {
                return;
            };
            let me = member_id(lease.id);
            inner
                .mirror
                .all_keys()
                .filter(|k| {
                    self.layout.parse(&k.key).is_some_and(|p| p.member == me)
                        && !inner.own.contains_key(&k.key)
                        && !inner.pending.contains(&k.key)
                })
                .map(|k| k.key.clone())
                .collect()
        };
        for key in orphans {
            debug!(
                "etcd: deleting {}, which no connection owns",
                String::from_utf8_lossy(&key)
            );
            let _ = self
                .etcd
                .delete(&DeleteRequest::key(key), Instant::now() + CALL);
        }
    }
}
