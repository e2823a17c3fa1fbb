//! Lock state in etcd: the [`Locks`] of a cluster member (`tcpnetlock server --etcd`), so that
//! several servers serve one lock space.
//!
//! Every `lock` request becomes one etcd key under the member's lease ([`keys`]), written in one
//! transaction with a read of the name's keys: that read shows the name exactly as of the write,
//! and the queue rule ([`crate::table::queue`]) says from it whether the request holds, waits or
//! is refused. A waiter is granted when this member's copy of the keyspace ([`mirror`]), kept
//! current by one prefix watch, shows it among the holders: a transaction that checks its key
//! still exists marks it granted, and its revision is the fencing token. A holder or waiter that
//! leaves has its key deleted before it is told anything, so a client that reads `released`
//! finds the lock free on every member.
//!
//! What keeps two members from granting one lock twice:
//! - every decision is the queue rule over etcd's own order of keys, and a key that holds keeps
//!   holding while it exists (the rule is monotonic), so a member never needs to ask the others;
//! - nothing is granted on a guess: a write whose outcome is unknown is answered with `err,` and
//!   its key deleted by the cleanup thread ([`work`]);
//! - a member stops vouching for its holders before etcd can expire its lease ([`member`]): it
//!   tracks when its last acknowledged lease renewal was *sent*, and once the lease may have less
//!   than a margin left it ends every holder's and waiter's connection and refuses new requests,
//!   until it holds a new lease. A `ttl:` client is answered (`ok`, `alive`) only while the lease
//!   outlives the client's own deadline, so even a frozen member cannot leave such a client
//!   believing it holds a lock that etcd has handed on.
//!
//! Threads: connections call in on their own threads (`lock`, `leave` wait for etcd); the watch
//! thread applies changes to the mirror and hands grants to the etcd workers; the timer enforces
//! this member's wait deadlines and client ttls; the member thread keeps the lease; the cleanup
//! thread retries deletions. No socket is written and no etcd call made while `inner` is locked.

mod keys;
mod member;
mod mirror;
mod work;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use log::debug;

use super::config::EtcdSettings;
use super::link::Link;
use super::locks::{Counts, Locks, Unavailable};
use crate::etcd::{
    DeleteRequest, EtcdClient, EtcdConfig, EtcdWatch, Op, OpResponse, PutRequest, RangeRequest,
    SortOrder, SortTarget, Txn,
};
use crate::metrics::ServerMetrics;
use crate::table::queue::{self, Place};
use crate::table::{self, Claim, ConnId, Counters, Decision, Left, LockInfo, State};
use keys::{Layout, Value};
use mirror::Mirror;
use tcpnetlock::protocol::Reply;
use tcpnetlock::status::Cluster;
use work::{Job, Then};

/// The longest one etcd call made for a client may take (a `lock`, a `release`): past it the
/// client is answered `err,` (or, for a release, the key is left to the cleanup thread).
const CALL: Duration = Duration::from_secs(2);

/// Threads that carry out grants after a wait and deletions after a deadline.
const WORKERS: usize = 4;

/// An allowance for the round trip between a client's request and the member's answer, taken
/// off the longest client ttl a member vouches for.
const RTT_ALLOWANCE: Duration = Duration::from_millis(100);

/// The timing rules of one member, from `--etcd-ttl`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    /// The member's etcd lease ttl.
    pub ttl: Duration,
    /// How long before its lease could expire a member stops vouching for its holders:
    /// max(0.5 s, ttl / 10).
    pub margin: Duration,
    /// How often the lease is renewed: ttl / 3.
    pub renew_every: Duration,
    /// The longest client `ttl:` accepted: 2/3 ttl (the lease a healthy member always has left)
    /// less the margin and a round trip, in whole milliseconds.
    pub max_client_ttl: Duration,
}

impl Timing {
    pub fn new(ttl: Duration) -> Timing {
        let margin = (ttl / 10).max(Duration::from_millis(500));
        let renew_every = ttl / 3;
        let max_client_ttl = (ttl - renew_every).saturating_sub(margin + RTT_ALLOWANCE);
        // Whole milliseconds, as `.info` publishes it: a client that asks for the published
        // bound gets it.
        let max_client_ttl = Duration::from_millis(max_client_ttl.as_millis() as u64);
        Timing {
            ttl,
            margin,
            renew_every,
            max_client_ttl,
        }
    }
}

pub struct EtcdLocks {
    etcd: EtcdClient,
    /// Wait and hold times of what this member decides (counts are in `Inner::counters`).
    metrics: Arc<ServerMetrics>,
    layout: Layout,
    /// `--etcd-name`: how `.locks` on every member names this one.
    name: Arc<str>,
    timing: Timing,
    inner: Mutex<Inner>,
    /// Wakes the timer thread; paired with `inner`.
    timer: Condvar,
    /// Wakes the member thread (a resync is asked for) and whoever waits for its first
    /// attempt; paired with `inner`.
    member: Condvar,
    jobs: mpsc::Sender<Job>,
    job_queue: Mutex<mpsc::Receiver<Job>>,
    /// Wakes the cleanup thread; paired with `inner`.
    cleanup: Condvar,
    /// Signalled when the lease is renewed, given up or granted, or the mirror synced; paired
    /// with `inner`.
    lease_changed: Condvar,
}

/// The lease this member holds and how long etcd is sure to keep it.
#[derive(Debug, Clone, Copy)]
struct MemberLease {
    id: i64,
    /// The send time of the last acknowledged renewal (or of the grant) plus the ttl: etcd
    /// cannot expire the lease before then.
    vouched_until: Instant,
}

struct Inner {
    lease: Option<MemberLease>,
    /// Why this member cannot serve, when it cannot.
    reason: String,
    /// The mirror is filled and its watch runs.
    synced: bool,
    /// The cluster's token offset, once read.
    offset: Option<u64>,
    mirror: Mirror,
    watch: Option<EtcdWatch>,
    /// Counts watches started; a watch's messages are applied only while it is the current one.
    epoch: u64,
    /// A resync (range and watch again) is needed: the watch ended.
    resync: bool,
    /// The member thread has made its first attempt to serve.
    first_attempt_done: bool,
    /// This member's holders and waiters.
    conns: HashMap<ConnId, Local>,
    /// Their keys.
    own: HashMap<Vec<u8>, ConnId>,
    /// Keys being written or decided by a `lock` call: not orphans yet.
    pending: HashSet<Vec<u8>>,
    /// Keys to delete (a deletion failed, or a write's outcome is unknown), with their lease.
    to_delete: Vec<(Vec<u8>, i64)>,
    /// Wait deadlines and client ttls, soonest first.
    deadlines: BTreeSet<(Instant, ConnId)>,
    counters: Counters,
    /// Where the timer thread is: `None` while it runs, else the deadline it sleeps towards.
    timer_sleeps_until: Option<Option<Instant>>,
}

/// One of this member's connections that holds or waits.
struct Local {
    name: Box<str>,
    key: Vec<u8>,
    create_revision: i64,
    lease: i64,
    link: Arc<Link>,
    value: Value,
    ttl: Option<Duration>,
    /// When it asked; once it holds, when it was granted.
    since: Instant,
    wait_until: Instant,
    /// Its entry in `deadlines`.
    due: Option<Instant>,
    stage: Stage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Waiting,
    /// Among the holders by the rule; the etcd worker is confirming the grant.
    Confirming,
    Holding,
}

impl Inner {
    /// Whether the lease outlives `now + ttl` by the margin: the member may grant to (or answer
    /// a renewal of) a client whose own deadline is `ttl` away (no ttl: may keep its holders).
    fn vouches(&self, timing: &Timing, now: Instant, ttl: Option<Duration>) -> bool {
        self.lease
            .is_some_and(|l| now + ttl.unwrap_or(Duration::ZERO) + timing.margin <= l.vouched_until)
    }

    /// Whether the member takes new requests: it vouches, and its mirror is current (a waiter
    /// is granted from the mirror's watch).
    fn serving(&self, timing: &Timing, now: Instant) -> bool {
        self.synced && self.vouches(timing, now, None)
    }

    fn set_due(&mut self, conn: ConnId, at: Option<Instant>) {
        let Some(local) = self.conns.get_mut(&conn) else {
            return;
        };
        if let Some(old) = std::mem::replace(&mut local.due, at) {
            self.deadlines.remove(&(old, conn));
        }
        if let Some(at) = at {
            self.deadlines.insert((at, conn));
        }
    }

    fn remove(&mut self, conn: ConnId) -> Option<Local> {
        let local = self.conns.remove(&conn)?;
        self.own.remove(&local.key);
        if let Some(at) = local.due {
            self.deadlines.remove(&(at, conn));
        }
        Some(local)
    }

    /// This member's waiters of `name` that the rule now counts among the holders: marked as
    /// being confirmed, for the workers.
    fn newly_holding(&mut self, name: &str) -> Vec<ConnId> {
        let mut found = Vec::new();
        for key in self.mirror.holders(name) {
            if let Some(&conn) = self.own.get(&key.key)
                && self
                    .conns
                    .get(&conn)
                    .is_some_and(|l| l.stage == Stage::Waiting)
            {
                found.push(conn);
            }
        }
        for conn in &found {
            if let Some(local) = self.conns.get_mut(conn) {
                local.stage = Stage::Confirming;
            }
        }
        found
    }

    /// Names this member has waiters for.
    fn waited_names(&self) -> HashSet<Box<str>> {
        self.conns
            .values()
            .filter(|l| l.stage == Stage::Waiting)
            .map(|l| l.name.clone())
            .collect()
    }
}

/// Text from etcd or the OS for an `err,` line: one line.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

impl EtcdLocks {
    /// Checks the settings and loads certificates; does not connect (the member thread does,
    /// once started).
    pub fn new(settings: &EtcdSettings, metrics: Arc<ServerMetrics>) -> Result<EtcdLocks, String> {
        let mut config = EtcdConfig::new(settings.endpoints.iter().cloned());
        config.ca_file = settings.ca_file.clone();
        config.cert_file = settings.cert_file.clone();
        config.key_file = settings.key_file.clone();
        config.user = settings.user.clone();
        config.password = settings.password.clone();
        // A watch silent this long moves to another member: a frozen etcd member holds up
        // grants after a wait no longer than this.
        config.watch_idle = Duration::from_secs(3);
        let etcd = EtcdClient::new(config).map_err(|e| e.to_string())?;
        let (jobs, job_queue) = mpsc::channel();
        Ok(EtcdLocks {
            etcd,
            metrics,
            layout: Layout::new(&settings.prefix),
            name: settings.name.as_str().into(),
            timing: Timing::new(settings.ttl),
            inner: Mutex::new(Inner {
                lease: None,
                reason: "starting: no etcd lease yet".into(),
                synced: false,
                offset: None,
                mirror: Mirror::default(),
                watch: None,
                epoch: 0,
                resync: false,
                first_attempt_done: false,
                conns: HashMap::new(),
                own: HashMap::new(),
                pending: HashSet::new(),
                to_delete: Vec::new(),
                deadlines: BTreeSet::new(),
                counters: Counters::default(),
                timer_sleeps_until: None,
            }),
            timer: Condvar::new(),
            member: Condvar::new(),
            jobs,
            job_queue: Mutex::new(job_queue),
            cleanup: Condvar::new(),
            lease_changed: Condvar::new(),
        })
    }

    pub fn endpoints(&self) -> &[String] {
        self.etcd.endpoints()
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // Every method leaves Inner consistent at each return: a panic elsewhere while it was
        // held does not make it unusable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn send(&self, job: Job) {
        // The workers live as long as the process: a send cannot fail.
        let _ = self.jobs.send(job);
    }

    /// Wakes the timer if `at` is sooner than what it sleeps towards.
    fn timer_check(&self, inner: &Inner, at: Option<Instant>) {
        if let (Some(sleeps_until), Some(at)) = (inner.timer_sleeps_until, at)
            && sleeps_until.is_none_or(|s| at < s)
        {
            self.timer.notify_one();
        }
    }

    /// Queues a key for the cleanup thread.
    fn delete_later(&self, inner: &mut Inner, key: Vec<u8>, lease: i64) {
        inner.to_delete.push((key, lease));
        self.cleanup.notify_one();
    }

    /// Deletes a key now; a failure leaves it to the cleanup thread.
    fn delete_now(&self, key: &[u8], lease: i64) {
        if let Err(e) = self
            .etcd
            .delete(&DeleteRequest::key(key), Instant::now() + CALL)
        {
            debug!(
                "etcd: cannot delete {} now ({e}); retrying in the background",
                String::from_utf8_lossy(key)
            );
            let mut inner = self.inner();
            self.delete_later(&mut inner, key.to_vec(), lease);
        }
    }

    /// Whether the member vouches for a client with `ttl` ([`Inner::vouches`]), waiting if need
    /// be for a renewal under way: just before a renewal is acknowledged the lease left is at
    /// its shortest, and a renewal a little late must neither refuse nor end clients. Gives up
    /// when the member would stop serving anyway.
    fn await_vouching<'a>(
        &'a self,
        mut inner: MutexGuard<'a, Inner>,
        ttl: Option<Duration>,
    ) -> (MutexGuard<'a, Inner>, bool) {
        loop {
            let now = Instant::now();
            if inner.vouches(&self.timing, now, ttl) {
                return (inner, true);
            }
            let Some(lease) = inner.lease else {
                return (inner, false);
            };
            let stop_at = lease
                .vouched_until
                .checked_sub(self.timing.margin)
                .unwrap_or(now);
            if now >= stop_at {
                return (inner, false);
            }
            inner = self
                .lease_changed
                .wait_timeout(inner, stop_at - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn not_serving(&self, inner: &Inner) -> Unavailable {
        Unavailable(format!("not serving locks: {}", one_line(&inner.reason)))
    }

    /// The first part of a `lock`: the checks that need no etcd.
    fn admit(&self, req: &Claim<Arc<Link>>) -> Result<(i64, u64), Unavailable> {
        if let Some(ttl) = req.ttl
            && ttl > self.timing.max_client_ttl
        {
            return Err(Unavailable(format!(
                "ttl:{} is longer than this cluster vouches for (at most {:.3} s: --etcd-ttl {})",
                secs_text(ttl),
                self.timing.max_client_ttl.as_secs_f64(),
                secs_text(self.timing.ttl)
            )));
        }
        let (inner, vouches) = self.await_vouching(self.inner(), req.ttl);
        match (inner.lease, inner.offset) {
            (Some(lease), Some(offset)) if vouches && inner.synced => Ok((lease.id, offset)),
            _ => Err(self.not_serving(&inner)),
        }
    }
}

/// Seconds as the protocol writes them (`5`, `2.5`).
fn secs_text(d: Duration) -> String {
    let text = format!("{:.3}", d.as_secs_f64());
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

impl Locks for EtcdLocks {
    fn lock(&self, name: &str, req: Claim<Arc<Link>>) -> Result<Decision, Unavailable> {
        let asked = Instant::now();
        let (lease, offset) = self.admit(&req)?;
        let conn = req.conn;
        let key = self.layout.key(name, lease, conn);
        let wait = req.wait.filter(|w| !w.is_zero());
        let asked_ms = keys::unix_ms();
        let value = Value {
            max: req.max.max(1),
            shared: req.shared,
            client_id: req.client_id.as_deref().map(str::to_owned),
            peer: req.peer.map(|p| p.to_string()),
            server: Some(self.name.to_string()),
            ttl_secs: req.ttl.map(|t| t.as_secs_f64()),
            asked_unix_ms: asked_ms,
            wait_until_unix_ms: wait.map(|w| asked_ms.saturating_add(w.as_millis() as u64)),
            granted_unix_ms: None,
        };
        // A mutex's or semaphore's holders are among its first `max` keys: no need to read
        // more. Shared holders may be any number.
        let mut range = RangeRequest::prefix(self.layout.name(name))
            .sort(SortTarget::CreateRevision, SortOrder::Ascend);
        if !req.shared {
            range = range.limit(i64::from(value.max));
        }
        let txn = Txn::new().and_then([
            Op::Put(PutRequest::new(key.as_bytes(), value.to_bytes()).lease(lease)),
            Op::Range(range),
        ]);
        self.inner().pending.insert(key.clone().into_bytes());
        let key = key.into_bytes();
        let answer = self.etcd.txn(&txn, asked + CALL);
        let (revision, kvs) = match answer {
            Ok(r) => {
                let kvs = r.responses.into_iter().find_map(|op| match op {
                    OpResponse::Range(range) => Some(range.kvs),
                    _ => None,
                });
                (r.header.revision, kvs.unwrap_or_default())
            }
            Err(e) => {
                let mut inner = self.inner();
                inner.pending.remove(&key);
                if !e.not_applied() {
                    // It may exist, or come to exist: never leave it at the head of a queue.
                    self.delete_later(&mut inner, key, lease);
                }
                return Err(Unavailable(format!(
                    "cluster unavailable: {}",
                    one_line(&e.to_string())
                )));
            }
        };
        let entries: Vec<queue::Entry> = kvs
            .iter()
            .map(|kv| Value::read(&kv.value).entry())
            .collect();
        let mine = kvs.iter().position(|kv| kv.key == key);
        let place = match mine {
            Some(i) => queue::place(&entries, i),
            // Cut off by the limit: not among the first `max`, so not a holder.
            None => match entries.first() {
                Some(head) if head.max != value.max => Place::MaxMismatch { max: head.max },
                _ => Place::Waits,
            },
        };
        match place {
            Place::Holds => self.hold_at_once(name, req, key, revision, lease, offset, value),
            Place::Waits if wait.is_some() => {
                let wait = wait.expect("checked");
                self.queue(name, req, key, revision, lease, value, asked + wait)
            }
            refused => {
                self.delete_now(&key, lease);
                let mut inner = self.inner();
                inner.pending.remove(&key);
                Ok(match refused {
                    Place::MaxMismatch { max } => {
                        inner.counters.max_mismatches += 1;
                        Decision::MaxMismatch { max }
                    }
                    _ => {
                        inner.counters.not_acquired += 1;
                        Decision::NotGranted
                    }
                })
            }
        }
    }

    fn renew(&self, name: &str, conn: ConnId) -> State {
        let inner = self.inner();
        let Some(local) = inner.conns.get(&conn).filter(|l| *l.name == *name) else {
            return State::Absent;
        };
        if local.stage != Stage::Holding {
            return State::Waiting;
        }
        let ttl = local.ttl;
        let (mut inner, vouches) = self.await_vouching(inner, ttl);
        let now = Instant::now();
        // It may have been ended while we waited.
        match inner.conns.get(&conn).map(|l| l.stage) {
            None => State::Absent,
            Some(Stage::Waiting | Stage::Confirming) => State::Waiting,
            Some(Stage::Holding) if vouches => {
                if let Some(ttl) = ttl {
                    inner.set_due(conn, Some(now + ttl));
                }
                State::Holding
            }
            Some(Stage::Holding) => {
                // The lease may not outlive this client's deadline: not another `alive`. The
                // member is about to stop serving anyway.
                let local = inner.remove(conn).expect("present");
                inner.counters.expired += 1;
                drop(inner);
                debug!("lock {name}: cannot vouch for a renewal now (etcd lease too old); ending");
                self.send(Job::End {
                    key: local.key,
                    lease: local.lease,
                    then: Then::HangUp(local.link),
                });
                State::Absent
            }
        }
    }

    fn state(&self, name: &str, conn: ConnId) -> State {
        match self.inner().conns.get(&conn).filter(|l| *l.name == *name) {
            Some(l) if l.stage == Stage::Holding => State::Holding,
            Some(_) => State::Waiting,
            None => State::Absent,
        }
    }

    fn leave(&self, name: &str, conn: ConnId) -> Left {
        let now = Instant::now();
        let local = {
            let mut inner = self.inner();
            if inner.conns.get(&conn).is_none_or(|l| *l.name != *name) {
                return Left::Absent;
            }
            let local = inner.remove(conn).expect("present");
            if local.stage == Stage::Holding {
                inner.counters.released += 1;
            }
            local
        };
        // Deleted before the caller says `released`: the next holder may go ahead once the
        // client reads it.
        self.delete_now(&local.key, local.lease);
        let d = now.saturating_duration_since(local.since);
        match local.stage {
            Stage::Holding => Left::Held(d),
            _ => Left::Waited(d),
        }
    }

    fn snapshot(&self) -> Vec<LockInfo> {
        let mut locks = {
            let inner = self.inner();
            inner
                .mirror
                .snapshot(keys::unix_ms(), inner.offset.unwrap_or(0))
        };
        table::sort_snapshot(&mut locks);
        locks
    }

    fn counts(&self) -> Counts {
        let inner = self.inner();
        let mut held = HashSet::new();
        let (mut holders, mut waiting) = (0, 0);
        for l in inner.conns.values() {
            if l.stage == Stage::Holding {
                holders += 1;
                held.insert(&l.name);
            } else {
                waiting += 1;
            }
        }
        Counts {
            held: held.len(),
            holders,
            waiting,
            counters: inner.counters,
        }
    }

    fn start(self: Arc<Self>) -> io::Result<()> {
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            thread::Builder::new().name(name.into()).spawn(f).map(drop)
        };
        let me = Arc::clone(&self);
        spawn("tcpnetlock-timer", Box::new(move || me.run_timer()))?;
        for _ in 0..WORKERS {
            let me = Arc::clone(&self);
            spawn("etcd-worker", Box::new(move || me.run_worker()))?;
        }
        let me = Arc::clone(&self);
        spawn("etcd-cleanup", Box::new(move || me.run_cleanup()))?;
        let me = Arc::clone(&self);
        spawn("etcd-member", Box::new(move || me.run_member()))?;
        // Most starts find etcd at once: wait a little for the first lease, so that a server
        // that says it listens can also grant. One that cannot reach etcd starts anyway, not
        // serving, and keeps trying.
        let inner = self.inner();
        let _ = self
            .member
            .wait_timeout_while(inner, CALL + Duration::from_secs(1), |i| {
                !i.first_attempt_done
            });
        Ok(())
    }

    fn cluster(&self) -> Option<Cluster> {
        let inner = self.inner();
        let serving = inner.serving(&self.timing, Instant::now());
        let totals = inner.mirror.totals();
        let mut c = Cluster::default();
        c.server = Some(self.name.to_string());
        c.serving = Some(serving);
        c.reason = (!serving).then(|| inner.reason.clone());
        c.etcd_ttl_secs = Some(self.timing.ttl.as_secs_f64());
        c.max_ttl_secs = Some(self.timing.max_client_ttl.as_secs_f64());
        if inner.synced {
            c.locks_held = Some(totals.held);
            c.holders = Some(totals.holders);
            c.waiting = Some(totals.waiting);
        }
        Some(c)
    }
}

impl EtcdLocks {
    /// A `lock` the rule granted at once: registered, then its line written.
    #[allow(clippy::too_many_arguments)]
    fn hold_at_once(
        &self,
        name: &str,
        req: Claim<Arc<Link>>,
        key: Vec<u8>,
        revision: i64,
        lease: i64,
        offset: u64,
        value: Value,
    ) -> Result<Decision, Unavailable> {
        let token = offset.saturating_add(revision.max(0) as u64);
        let conn = req.conn;
        let link = Arc::clone(&req.handle);
        {
            let (mut inner, vouches) = self.await_vouching(self.inner(), req.ttl);
            let now = Instant::now();
            inner.pending.remove(&key);
            let gone = inner.mirror.revision >= revision && !inner.mirror.contains(&key);
            let same_lease = inner.lease.is_some_and(|l| l.id == lease);
            if gone || !same_lease || !vouches {
                // Held for a moment in etcd, but this member can no longer vouch for it.
                let why = if gone {
                    Unavailable(
                        "cluster unavailable: the lock's etcd key vanished (lease expired?)".into(),
                    )
                } else {
                    self.not_serving(&inner)
                };
                self.delete_later(&mut inner, key, lease);
                return Err(why);
            }
            inner.own.insert(key.clone(), conn);
            inner.conns.insert(
                conn,
                Local {
                    name: name.into(),
                    key,
                    create_revision: revision,
                    lease,
                    link: Arc::clone(&link),
                    value,
                    ttl: req.ttl,
                    since: now,
                    wait_until: now,
                    due: None,
                    stage: Stage::Holding,
                },
            );
            inner.set_due(conn, req.ttl.map(|t| now + t));
            self.timer_check(&inner, req.ttl.map(|t| now + t));
            inner.counters.acquired += 1;
            inner.counters.shared_acquired += u64::from(req.shared);
            link.grant_decided();
        }
        if let Err(e) = link.write_grant(token) {
            debug!("lock {name}: grant to a departed client ({e})");
            self.leave(name, conn);
        }
        Ok(Decision::Granted { token })
    }

    /// A `lock` that waits: registered; granted later, from the watch (or now, if the mirror
    /// has already seen it move up).
    #[allow(clippy::too_many_arguments)]
    fn queue(
        &self,
        name: &str,
        req: Claim<Arc<Link>>,
        key: Vec<u8>,
        revision: i64,
        lease: i64,
        value: Value,
        wait_until: Instant,
    ) -> Result<Decision, Unavailable> {
        let conn = req.conn;
        let (mut inner, vouches) = self.await_vouching(self.inner(), None);
        let now = Instant::now();
        inner.pending.remove(&key);
        let gone = inner.mirror.revision >= revision && !inner.mirror.contains(&key);
        let same_lease = inner.lease.is_some_and(|l| l.id == lease);
        if gone || !same_lease || !vouches {
            let why = self.not_serving(&inner);
            self.delete_later(&mut inner, key, lease);
            return Err(why);
        }
        inner.own.insert(key.clone(), conn);
        inner.conns.insert(
            conn,
            Local {
                name: name.into(),
                key,
                create_revision: revision,
                lease,
                link: req.handle,
                value,
                ttl: req.ttl,
                since: now,
                wait_until,
                due: None,
                stage: Stage::Waiting,
            },
        );
        inner.set_due(conn, Some(wait_until));
        self.timer_check(&inner, Some(wait_until));
        if inner.mirror.revision >= revision {
            for conn in inner.newly_holding(name) {
                self.send(Job::Confirm(conn));
            }
        }
        Ok(Decision::Queued)
    }

    /// The timer thread: ends waits and client leases when their time comes.
    fn run_timer(&self) -> ! {
        let mut inner = self.inner();
        loop {
            let now = Instant::now();
            let mut ended = Vec::new();
            while let Some(&(at, conn)) = inner.deadlines.first() {
                if at > now {
                    break;
                }
                inner.deadlines.pop_first();
                let Some(local) = inner.conns.get_mut(&conn) else {
                    continue;
                };
                local.due = None;
                match local.stage {
                    // The worker confirming it looks at the deadline itself.
                    Stage::Confirming => {}
                    Stage::Waiting => {
                        let local = inner.remove(conn).expect("present");
                        inner.counters.wait_timeouts += 1;
                        inner.counters.not_acquired += 1;
                        debug!("lock {}: wait timed out", local.name);
                        ended.push((local, Reply::NotGranted));
                    }
                    Stage::Holding => {
                        let local = inner.remove(conn).expect("present");
                        inner.counters.expired += 1;
                        self.metrics
                            .lease_expired(now.saturating_duration_since(local.since));
                        debug!("lock {}: lease expired", local.name);
                        ended.push((local, Reply::Expired));
                    }
                }
            }
            for (local, reply) in ended {
                self.send(Job::End {
                    key: local.key,
                    lease: local.lease,
                    then: Then::Say(local.link, reply),
                });
            }
            let next = inner.deadlines.first().map(|&(at, _)| at);
            inner.timer_sleeps_until = Some(next);
            inner = match next {
                Some(at) => {
                    self.timer
                        .wait_timeout(inner, at.saturating_duration_since(now))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => self
                    .timer
                    .wait(inner)
                    .unwrap_or_else(PoisonError::into_inner),
            };
            inner.timer_sleeps_until = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_follows_the_ttl() {
        let t = Timing::new(Duration::from_secs(5));
        assert_eq!(t.margin, Duration::from_millis(500));
        assert_eq!(t.renew_every, Duration::from_nanos(1_666_666_666));
        // 5 − 5/3 − 0.5 − 0.1 = 2.733 s
        assert_eq!(t.max_client_ttl.as_millis(), 2733);
        let t = Timing::new(Duration::from_secs(30));
        assert_eq!(t.margin, Duration::from_secs(3));
        assert_eq!(t.max_client_ttl.as_millis(), 16_900);
        let t = Timing::new(Duration::from_secs(2));
        assert_eq!(t.max_client_ttl.as_millis(), 733);
    }

    #[test]
    fn seconds_as_the_protocol_writes_them() {
        assert_eq!(secs_text(Duration::from_secs(5)), "5");
        assert_eq!(secs_text(Duration::from_millis(2500)), "2.5");
        assert_eq!(secs_text(Duration::from_millis(2733)), "2.733");
    }
}
