//! The member thread: this server's etcd lease, its copy of the keyspace, and whether it may
//! serve.
//!
//! The lease is renewed every ttl/3. Each acknowledged renewal proves the lease lives until its
//! *send* time plus the ttl (etcd renews on receipt, after we sent; a leader change only extends
//! a lease), so that is what the member counts on, on the monotonic clock. Once less than the
//! margin is left, the member stops: it ends every holder's and waiter's connection (a holder
//! sees the close; a waiter gets `err,not serving locks: ...`) and refuses new requests, while
//! etcd may still keep the lease for a moment. Then it tries for a new lease (revoking the old
//! one, whose keys would otherwise block their names until it expired), reads the keyspace
//! again and serves again.
//!
//! The keyspace is read once (paginated, at one revision) into the mirror, then watched from
//! the next revision. A watch that breaks resumes by itself (the client re-creates it on
//! another member from the next revision); one that cannot resume (history compacted, or
//! cancelled) has the member read and watch again.

use std::collections::HashSet;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use log::{debug, info, trace, warn};

use super::keys::{Value, member_id, unix_us};
use super::mirror::{Key, Mirror};
use super::work::Job;
use super::{CALL, EtcdLocks, MemberLease, Stage, one_line};
use crate::etcd::{
    Compare, CompareOp, EtcdError, EventKind, Op, OpResponse, PutRequest, RangeRequest, Txn,
    WatchMessage, WatchRequest, prefix_end,
};
use tcpnetlock::protocol::Reply;

/// Keys read per page when the keyspace is read.
const PAGE: i64 = 5000;
/// How long a failed renewal or read waits before the next try.
const RETRY: Duration = Duration::from_millis(200);
/// The longest wait between two tries for a lease.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The member thread's own memory between two steps.
struct Keeper {
    /// Send time of the last acknowledged renewal (or of the grant).
    last_send: Instant,
    /// When to try a failed renewal again.
    retry_at: Option<Instant>,
    /// Why the last renewal failed, while renewals fail.
    last_error: Option<String>,
    /// The mirror must be read and watched again, from this moment on.
    sync_at: Option<Instant>,
    /// A lease given up and not revoked yet, and until when trying is worth it.
    old_lease: Option<(i64, Instant)>,
    backoff: Duration,
}

impl EtcdLocks {
    pub(super) fn run_member(self: Arc<Self>) {
        let mut k = Keeper {
            last_send: Instant::now(),
            retry_at: None,
            last_error: None,
            sync_at: None,
            old_lease: None,
            backoff: RETRY,
        };
        loop {
            let lease = self.inner().lease;
            match lease {
                None => self.get_lease(&mut k),
                Some(lease) => self.keep_lease(&mut k, lease),
            }
        }
    }

    /// One try for a lease (revoking a given-up one first); serves once it has one and the
    /// keyspace is read and watched.
    fn get_lease(self: &Arc<Self>, k: &mut Keeper) {
        if let Some((id, until)) = k.old_lease {
            match self.etcd.lease_revoke(id, Instant::now() + CALL) {
                Ok(()) | Err(EtcdError::LeaseNotFound { .. }) => k.old_lease = None,
                Err(_) if Instant::now() >= until => k.old_lease = None,
                Err(e) => debug!("etcd: cannot revoke the old lease {id:x} yet: {e}"),
            }
        }
        let result = self.begin();
        let mut inner = self.inner();
        let first = !inner.first_attempt_done;
        inner.first_attempt_done = true;
        self.member.notify_all();
        match result {
            Ok(send) => {
                k.last_send = send;
                k.retry_at = None;
                k.last_error = None;
                k.backoff = RETRY;
                k.sync_at = (!inner.synced).then(Instant::now);
            }
            Err(e) => {
                let reason = format!("no etcd lease: {}", one_line(&e));
                if first || inner.reason != reason {
                    warn!("NOT SERVING LOCKS: {reason} (trying again)");
                }
                inner.reason = reason;
                drop(inner);
                std::thread::sleep(k.backoff);
                k.backoff = (k.backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    /// Grants a lease, reads the token offset (the first time), reads and watches the
    /// keyspace. Returns the grant's send time. A lease granted stays even if the rest fails
    /// (the rest is tried again while it is kept).
    fn begin(self: &Arc<Self>) -> Result<Instant, String> {
        let send = Instant::now();
        let ttl_secs = self.timing.ttl.as_secs() as i64;
        let lease = self
            .etcd
            .lease_grant(ttl_secs, send + CALL)
            .map_err(|e| e.to_string())?;
        let granted = Duration::from_secs(lease.ttl_secs.max(0) as u64);
        let vouched_until = send + granted.min(self.timing.ttl);
        let offset = match self.inner().offset {
            Some(offset) => offset,
            None => match self.read_offset() {
                Ok(offset) => offset,
                Err(e) => {
                    let _ = self.etcd.lease_revoke(lease.id, Instant::now() + CALL);
                    return Err(e);
                }
            },
        };
        {
            let mut inner = self.inner();
            inner.offset = Some(offset);
            inner.lease = Some(MemberLease {
                id: lease.id,
                vouched_until,
            });
            inner.synced = false;
        }
        match self.sync() {
            Ok(()) => info!(
                "cluster: member {} serves locks: etcd lease {} (ttl {} s, renewed every {:.3} s; client \
                 ttls up to {:.3} s), token offset {offset}, etcd at {}",
                self.name,
                member_id(lease.id),
                granted.as_secs(),
                self.timing.renew_every.as_secs_f64(),
                self.timing.max_client_ttl.as_secs_f64(),
                self.etcd.endpoints().join(",")
            ),
            Err(e) => {
                let reason = format!("cannot read or watch etcd: {}", one_line(&e));
                warn!("NOT SERVING LOCKS: {reason} (trying again)");
                self.inner().reason = reason;
            }
        }
        Ok(send)
    }

    /// The token offset: created by the first member ever to start (the wall clock in µs),
    /// read by every other.
    fn read_offset(&self) -> Result<u64, String> {
        let key = self.layout.offset().as_bytes().to_vec();
        let ours = unix_us();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([Op::Put(PutRequest::new(key.clone(), ours.to_string()))])
            .or_else([Op::Range(RangeRequest::key(key.clone()))]);
        let r = self
            .etcd
            .txn(&txn, Instant::now() + CALL)
            .map_err(|e| format!("reading the token offset: {e}"))?;
        if r.succeeded {
            info!(
                "cluster: token offset {ours} written to {} (fencing tokens are it plus an etcd \
                 revision)",
                self.layout.offset()
            );
            return Ok(ours);
        }
        let value = r.responses.into_iter().find_map(|op| match op {
            OpResponse::Range(range) => range.kvs.into_iter().next().map(|kv| kv.value),
            _ => None,
        });
        let value = value.unwrap_or_default();
        String::from_utf8_lossy(&value).trim().parse().map_err(|_| {
            format!(
                "{} holds {:?}, not a token offset (a whole number); delete it only if no \
                     member ever served (tokens would go back)",
                self.layout.offset(),
                String::from_utf8_lossy(&value)
            )
        })
    }

    /// Reads the keyspace into a new mirror and watches it from the next revision.
    fn sync(self: &Arc<Self>) -> Result<(), String> {
        let locks = self.layout.locks().as_bytes().to_vec();
        let end = prefix_end(&locks);
        let mut mirror: Option<Mirror> = None;
        let mut from = locks.clone();
        loop {
            let mut req = RangeRequest::range(from.clone(), end.clone()).limit(PAGE);
            if let Some(m) = &mirror {
                req = req.at_revision(m.revision);
            }
            let r = self
                .etcd
                .range(&req, Instant::now() + CALL)
                .map_err(|e| e.to_string())?;
            let m = mirror.get_or_insert_with(|| Mirror::new(r.header.revision));
            let revision = m.revision;
            if let Some(last) = r.kvs.last() {
                from = last.key.clone();
                from.push(0);
            }
            for kv in r.kvs {
                m.put(
                    &self.layout,
                    Key {
                        value: Value::read(&kv.value),
                        key: kv.key,
                        create_revision: kv.create_revision,
                        mod_revision: kv.mod_revision,
                    },
                );
            }
            m.revision = revision;
            if !r.more {
                break;
            }
        }
        let mirror = mirror.expect("one page read");
        let revision = mirror.revision;
        // Installed before the watch starts, so that no event of the new watch finds the old
        // mirror. A member that was serving goes on serving meanwhile: the watch delivers
        // everything after the read.
        let epoch = {
            let mut inner = self.inner();
            inner.epoch += 1;
            inner.watch = None;
            inner.mirror = mirror;
            inner.epoch
        };
        let me = Arc::clone(self);
        let watch = self
            .etcd
            .watch(
                WatchRequest::prefix(locks).start_revision(revision + 1),
                Instant::now() + CALL,
                move |message| me.on_watch(epoch, message),
            )
            .map_err(|e| {
                // Nothing keeps the mirror current: no request is taken until a watch runs.
                self.inner().synced = false;
                e.to_string()
            })?;
        let (lost, confirm) = {
            let mut inner = self.inner();
            if inner.epoch != epoch {
                return Err("another read of the keyspace began meanwhile".into());
            }
            inner.watch = Some(watch);
            inner.synced = true;
            self.lease_changed.notify_all();
            // Keys of ours that vanished while nobody watched.
            let lost: Vec<_> = inner
                .conns
                .iter()
                .filter(|(_, l)| l.create_revision <= revision)
                .filter(|(_, l)| !inner.mirror.contains(&l.key))
                .map(|(c, _)| *c)
                .collect();
            let lost: Vec<_> = lost.into_iter().filter_map(|c| inner.remove(c)).collect();
            let mut confirm = Vec::new();
            for name in inner.waited_names() {
                confirm.extend(inner.newly_holding(&name));
            }
            (lost, confirm)
        };
        for conn in confirm {
            self.send(Job::Confirm(conn));
        }
        self.end_lost(lost);
        Ok(())
    }

    /// Tells connections whose keys vanished (not deleted by this member) that they lost their
    /// place: someone else may hold the lock now.
    fn end_lost(&self, lost: Vec<super::Local>) {
        for local in lost {
            warn!(
                "lock {}: its etcd key vanished (lease expired or revoked?): ending the connection",
                local.name
            );
            match local.stage {
                Stage::Holding => local.link.hang_up(),
                _ => local.link.end_with(&Reply::Err(
                    "lost its place in the queue: its etcd key is gone (lease expired?)".into(),
                )),
            }
        }
    }

    /// The watch's messages, on the watch's thread.
    fn on_watch(&self, epoch: u64, message: WatchMessage) {
        match message {
            WatchMessage::Events { events, .. } => {
                let (lost, confirm) = {
                    let mut inner = self.inner();
                    if inner.epoch != epoch {
                        return;
                    }
                    let mut touched = HashSet::new();
                    let mut lost = Vec::new();
                    for event in events {
                        let kv = event.kv;
                        let name = match event.kind {
                            EventKind::Put => inner.mirror.put(
                                &self.layout,
                                Key {
                                    value: Value::read(&kv.value),
                                    key: kv.key,
                                    create_revision: kv.create_revision,
                                    mod_revision: kv.mod_revision,
                                },
                            ),
                            EventKind::Delete => {
                                if let Some(&conn) = inner.own.get(&kv.key) {
                                    lost.push(conn);
                                }
                                inner.mirror.delete(&kv.key, kv.mod_revision)
                            }
                        };
                        touched.extend(name);
                    }
                    let lost: Vec<_> = lost.into_iter().filter_map(|c| inner.remove(c)).collect();
                    let mut confirm = Vec::new();
                    for name in touched {
                        confirm.extend(inner.newly_holding(&name));
                    }
                    (lost, confirm)
                };
                for conn in confirm {
                    self.send(Job::Confirm(conn));
                }
                self.end_lost(lost);
            }
            // A quiet watch is re-created every few seconds (the client's idle limit, which is
            // also how it leaves a frozen member): trace level, or -v would log little else.
            WatchMessage::Interrupted { endpoint, reason } => {
                trace!("etcd watch on {endpoint} interrupted ({reason}); resuming")
            }
            WatchMessage::Resumed {
                endpoint,
                start_revision,
            } => trace!("etcd watch resumed on {endpoint} from revision {start_revision}"),
            WatchMessage::Compacted { compact_revision } => self.resync(
                epoch,
                &format!("etcd compacted its history to {compact_revision}"),
            ),
            WatchMessage::Canceled { reason } => {
                self.resync(epoch, &format!("etcd cancelled the watch: {reason}"))
            }
        }
    }

    /// The watch ended for good: the keyspace is read again at once. Requests are still taken
    /// (their keys' places are read in their own transactions, and the new read re-examines
    /// every waiter); waiters are granted once the read is done. A quiet prefix in a busy etcd
    /// that compacts its history meets this at every compaction, so it must not interrupt
    /// service; a read that fails does (see `keep_lease`).
    fn resync(&self, epoch: u64, why: &str) {
        let mut inner = self.inner();
        if inner.epoch != epoch {
            return;
        }
        info!("cluster: {why}: reading the keyspace again");
        inner.resync = true;
        self.member.notify_all();
    }

    /// Renews the lease on time, stops serving when it cannot be sure of it, reads the
    /// keyspace again when asked.
    fn keep_lease(self: &Arc<Self>, k: &mut Keeper, lease: MemberLease) {
        let stop_at = lease
            .vouched_until
            .checked_sub(self.timing.margin)
            .unwrap_or(k.last_send);
        let renew_at = k.retry_at.unwrap_or(k.last_send + self.timing.renew_every);
        let mut wake = stop_at.min(renew_at);
        if let Some(at) = k.sync_at {
            wake = wake.min(at);
        }
        {
            let inner = self.inner();
            let (mut inner, _) = self
                .member
                .wait_timeout_while(inner, wake.saturating_duration_since(Instant::now()), |i| {
                    !i.resync
                })
                .unwrap_or_else(PoisonError::into_inner);
            if std::mem::take(&mut inner.resync) {
                k.sync_at = Some(Instant::now());
            }
        }
        let now = Instant::now();
        if now >= stop_at {
            let why = match &k.last_error {
                Some(e) => format!(
                    "etcd lease not renewed for {:.1} s: {e}",
                    now.duration_since(k.last_send).as_secs_f64()
                ),
                None => format!(
                    "etcd lease not renewed for {:.1} s (this process was stopped or starved?)",
                    now.duration_since(k.last_send).as_secs_f64()
                ),
            };
            self.stop_serving(&why);
            k.old_lease = Some((lease.id, lease.vouched_until + self.timing.ttl));
            k.backoff = RETRY;
            return;
        }
        if k.sync_at.is_some_and(|at| now >= at) {
            match self.sync() {
                Ok(()) => {
                    k.sync_at = None;
                    info!("cluster: keyspace read again");
                }
                Err(e) => {
                    let reason = format!("cannot read or watch etcd: {}", one_line(&e));
                    debug!("cluster: {reason}");
                    let mut inner = self.inner();
                    inner.synced = false;
                    inner.reason = reason;
                    k.sync_at = Some(now + RETRY);
                }
            }
        }
        if Instant::now() >= renew_at {
            self.renew_lease(k, lease, stop_at);
        }
    }

    fn renew_lease(&self, k: &mut Keeper, lease: MemberLease, stop_at: Instant) {
        let send = Instant::now();
        let deadline = (send + self.timing.renew_every).min(stop_at);
        match self.etcd.lease_keep_alive(lease.id, deadline) {
            Ok(ttl) => {
                let ttl = Duration::from_secs(ttl.max(0) as u64).min(self.timing.ttl);
                let was_late = k.last_error.take().is_some();
                k.last_send = send;
                k.retry_at = None;
                let confirm = {
                    let mut inner = self.inner();
                    if inner.lease.is_some_and(|l| l.id == lease.id) {
                        inner.lease = Some(MemberLease {
                            id: lease.id,
                            vouched_until: send + ttl,
                        });
                        self.lease_changed.notify_all();
                    }
                    // Waiters put back while the lease was late: look again.
                    let mut confirm = Vec::new();
                    if was_late {
                        for name in inner.waited_names() {
                            confirm.extend(inner.newly_holding(&name));
                        }
                    }
                    confirm
                };
                if was_late {
                    info!("cluster: etcd lease renewed again");
                }
                for conn in confirm {
                    self.send(Job::Confirm(conn));
                }
            }
            Err(EtcdError::LeaseNotFound { id }) => {
                self.stop_serving(&format!(
                    "etcd lease {} expired or was revoked",
                    member_id(id)
                ));
                k.old_lease = None;
                k.backoff = RETRY;
            }
            Err(e) => {
                if k.last_error.is_none() {
                    warn!("cluster: cannot renew the etcd lease: {e} (retrying)");
                }
                k.last_error = Some(one_line(&e.to_string()));
                k.retry_at = Some(Instant::now() + RETRY);
            }
        }
    }

    /// Gives up the lease: every holder's and waiter's connection is ended, and no request is
    /// taken until a new lease is held.
    fn stop_serving(&self, why: &str) {
        let locals: Vec<super::Local> = {
            let mut inner = self.inner();
            inner.reason = why.to_owned();
            inner.lease = None;
            inner.synced = false;
            inner.watch = None;
            inner.epoch += 1;
            inner.mirror = Mirror::default();
            inner.own.clear();
            inner.deadlines.clear();
            // Their keys go with the lease.
            inner.to_delete.clear();
            self.lease_changed.notify_all();
            inner.conns.drain().map(|(_, l)| l).collect()
        };
        let holders = locals.iter().filter(|l| l.stage == Stage::Holding).count();
        warn!(
            "NOT SERVING LOCKS: {why}: ending {holders} holders' and {} waiters' connections",
            locals.len() - holders
        );
        let refusal = format!("not serving locks: {}", one_line(why));
        for local in locals {
            match local.stage {
                Stage::Holding => local.link.hang_up(),
                _ => local.link.end_with(&Reply::Err(refusal.clone().into())),
            }
        }
    }
}
