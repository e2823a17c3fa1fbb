//! The lock table: who holds which name, who waits for it, and what happens next.
//!
//! A pure state machine. It never touches a socket and never reads a clock: callers pass `now`,
//! and every method returns decisions ([`Event`]s) for the caller to carry out — "grant this
//! waiter", "this lease expired". That keeps every rule testable without a network, and keeps the
//! server's critical section (the Mutex around this table) to map and queue operations: no I/O
//! ever happens while it is held.
//!
//! Rules, all in this file:
//! - a name has at most `max` exclusive holders (1 unless the request says `max:K`), or any
//!   number of shared holders (`shared:1`), never both; every holder and waiter of a name must
//!   agree on `max`;
//! - waiting is strict FIFO per name, and nobody barges: a try-lock is refused while others wait,
//!   and a shared request queues behind a waiting exclusive one (no reader starves a writer);
//! - a release, a departure, an expiry or a timeout hands free places to the longest waiters: the
//!   first in line, and every shared waiter right behind a granted shared one;
//! - every grant carries a token, strictly greater than every token before it (see [`Table::new`]);
//! - a holder with a ttl loses the lock when it has been silent for that long.
//!
//! A connection holds or waits for at most one name; it is identified by its [`ConnId`]. Each
//! entry carries an opaque handle `H` that the server uses to reach the connection (the table
//! only hands it back in events).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Identifies one client connection for the whole of its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// A connection's claim on a name: a validated `lock` request, with who asks and how to reach
/// them.
#[derive(Debug, Clone)]
pub struct Claim<H> {
    pub conn: ConnId,
    pub client_id: Option<Arc<str>>,
    pub peer: Option<SocketAddr>,
    /// Holders allowed at once: 1 for a plain lock, K for `max:K`.
    pub max: u32,
    /// How long to queue; `None` (or zero) means try once.
    pub wait: Option<Duration>,
    /// Lease: the lock is revoked after this long without a request from the holder.
    pub ttl: Option<Duration>,
    /// Shared mode (`shared:1`): held alongside other shared holders, never with an exclusive one.
    pub shared: bool,
    pub handle: H,
}

/// The answer to a `lock` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Granted {
        token: u64,
    },
    Queued,
    NotGranted,
    /// The name is held or awaited with a different `max`; nothing changed.
    MaxMismatch {
        max: u32,
    },
}

/// Something the caller must tell a connection, decided while the table changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<H> {
    /// A waiter now holds the lock, after waiting `waited`.
    Granted {
        conn: ConnId,
        token: u64,
        waited: Duration,
        handle: H,
    },
    /// A holder's lease ran out after holding for `held`; the lock is no longer its.
    Expired {
        conn: ConnId,
        held: Duration,
        handle: H,
    },
    /// A waiter's wait ran out; it was not granted.
    TimedOut { conn: ConnId, handle: H },
}

/// Where a connection stands for a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Holding,
    Waiting,
    /// Not in the table (never was, or released, expired, timed out).
    Absent,
}

/// Where a leaving connection stood, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Left {
    Held(Duration),
    Waited(Duration),
    /// Not in the table: the call changed nothing.
    Absent,
}

#[cfg(test)]
impl Left {
    pub fn state(self) -> State {
        match self {
            Left::Held(_) => State::Holding,
            Left::Waited(_) => State::Waiting,
            Left::Absent => State::Absent,
        }
    }
}

/// Totals since the table was created; `.stats` reports them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Every grant, immediate or after waiting (0.1.8's `lock_acquired_count`).
    pub acquired: u64,
    /// Every refusal, immediate or after a wait ran out (0.1.8's `lock_not_acquired_count`).
    pub not_acquired: u64,
    /// Holders gone by release or departure.
    pub released: u64,
    pub granted_after_wait: u64,
    pub wait_timeouts: u64,
    pub expired: u64,
    pub max_mismatches: u64,
    /// Grants in shared mode, immediate or after waiting (also counted in `acquired`).
    pub shared_acquired: u64,
}

/// A holder, as `.locks` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderInfo {
    pub client_id: Option<Arc<str>>,
    pub peer: Option<SocketAddr>,
    pub held_for: Duration,
    pub token: u64,
    pub ttl: Option<Duration>,
    pub shared: bool,
    /// In a cluster, the member the holder is connected to (lock state kept elsewhere fills it).
    pub server: Option<Arc<str>>,
}

/// A waiter, as `.locks` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaiterInfo {
    pub client_id: Option<Arc<str>>,
    pub peer: Option<SocketAddr>,
    pub waited: Duration,
    /// Until its wait runs out.
    pub left: Duration,
    pub shared: bool,
    /// In a cluster, the member the waiter is connected to.
    pub server: Option<Arc<str>>,
}

/// One held name, as `.locks` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockInfo {
    pub name: Arc<str>,
    pub max: u32,
    pub holders: Vec<HolderInfo>,
    /// In queue order: the first is granted next.
    pub waiters: Vec<WaiterInfo>,
}

#[derive(Debug)]
struct Holder<H> {
    client_id: Option<Arc<str>>,
    peer: Option<SocketAddr>,
    since: Instant,
    token: u64,
    ttl: Option<Duration>,
    shared: bool,
    handle: H,
}

#[derive(Debug)]
struct Waiter<H> {
    conn: ConnId,
    client_id: Option<Arc<str>>,
    peer: Option<SocketAddr>,
    since: Instant,
    deadline: Instant,
    ttl: Option<Duration>,
    shared: bool,
    handle: H,
}

/// One name's holders and queue. Holders are keyed by connection and waiters by arrival, so that
/// finding, adding or removing one costs the same for a semaphore of 10,000 as for a mutex:
/// every operation happens under the server's one table mutex, and its neighbours wait for it.
#[derive(Debug)]
struct Entry<H> {
    max: u32,
    holders: HashMap<ConnId, Holder<H>>,
    /// How many of `holders` hold in exclusive mode.
    exclusive: usize,
    /// Waiters by arrival number: the first is the longest waiting.
    queue: BTreeMap<u64, Waiter<H>>,
    /// Each waiter's arrival number, to find it in `queue`.
    arrivals: HashMap<ConnId, u64>,
}

impl<H> Entry<H> {
    fn new(max: u32) -> Entry<H> {
        Entry {
            max,
            holders: HashMap::new(),
            exclusive: 0,
            queue: BTreeMap::new(),
            arrivals: HashMap::new(),
        }
    }

    /// Whether a request in this mode could hold now, queue aside: shared beside shared holders
    /// only, exclusive beside fewer than `max` exclusive holders only.
    fn has_room(&self, shared: bool) -> bool {
        if shared {
            self.exclusive == 0
        } else {
            self.exclusive == self.holders.len() && self.holders.len() < self.max as usize
        }
    }

    /// Whether the first in line could hold now.
    fn front_has_room(&self) -> bool {
        self.queue
            .first_key_value()
            .is_some_and(|(_, w)| self.has_room(w.shared))
    }

    fn insert_holder(&mut self, conn: ConnId, holder: Holder<H>) {
        self.exclusive += usize::from(!holder.shared);
        self.holders.insert(conn, holder);
    }

    fn remove_holder(&mut self, conn: ConnId) -> Option<Holder<H>> {
        let holder = self.holders.remove(&conn)?;
        self.exclusive -= usize::from(!holder.shared);
        Some(holder)
    }

    fn is_unused(&self) -> bool {
        self.holders.is_empty() && self.queue.is_empty()
    }

    fn remove_waiter(&mut self, conn: ConnId) -> Option<Waiter<H>> {
        let arrival = self.arrivals.remove(&conn)?;
        self.queue.remove(&arrival)
    }

    fn pop_waiter(&mut self) -> Option<Waiter<H>> {
        let (_, w) = self.queue.pop_first()?;
        self.arrivals.remove(&w.conn);
        Some(w)
    }
}

/// Why a deadline was set: which connection, on which name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Due {
    at: Instant,
    conn: ConnId,
}

#[derive(Debug)]
pub struct Table<H> {
    /// Names are shared with `deadlines` and snapshots: a `.locks` copy of 9,000 names costs
    /// 9,000 reference counts under the mutex, not 9,000 allocations.
    names: HashMap<Arc<str>, Entry<H>>,
    /// Every lease expiry and wait deadline, soonest first, with the name it concerns.
    deadlines: BTreeMap<Due, Arc<str>>,
    /// The deadline each connection has in `deadlines`, to move or remove it.
    due: HashMap<ConnId, Instant>,
    next_token: u64,
    /// Arrival number of the next waiter, for FIFO order across the table.
    next_arrival: u64,
    counters: Counters,
    waiting: usize,
    /// Holders over all names, and names with at least one holder, kept as they change so that
    /// `.stats` costs nothing per lock.
    holders: usize,
    held: usize,
}

impl<H: Clone> Table<H> {
    /// `first_token` is the token of the first grant; each grant after it gets the next number.
    /// The server chooses it so that tokens keep growing across restarts (`server::tokens`).
    pub fn new(first_token: u64) -> Table<H> {
        Table {
            names: HashMap::new(),
            deadlines: BTreeMap::new(),
            due: HashMap::new(),
            next_token: first_token.max(1),
            next_arrival: 0,
            counters: Counters::default(),
            waiting: 0,
            holders: 0,
            held: 0,
        }
    }

    /// Grant, queue or refuse `req` for `name`.
    pub fn lock(&mut self, name: &str, req: Claim<H>, now: Instant) -> Decision {
        let max = req.max.max(1);
        if let Some(e) = self.names.get(name)
            && e.max != max
        {
            self.counters.max_mismatches += 1;
            return Decision::MaxMismatch { max: e.max };
        }
        let entry = self
            .names
            .entry(name.into())
            .or_insert_with(|| Entry::new(max));
        if entry.has_room(req.shared) && entry.queue.is_empty() {
            let token = self.next_token;
            self.next_token += 1;
            self.held += usize::from(entry.holders.is_empty());
            self.holders += 1;
            entry.insert_holder(
                req.conn,
                Holder {
                    client_id: req.client_id,
                    peer: req.peer,
                    since: now,
                    token,
                    ttl: req.ttl,
                    shared: req.shared,
                    handle: req.handle,
                },
            );
            self.counters.acquired += 1;
            self.counters.shared_acquired += u64::from(req.shared);
            if let Some(ttl) = req.ttl {
                self.set_due(name, req.conn, now + ttl);
            }
            return Decision::Granted { token };
        }
        match req.wait.filter(|w| !w.is_zero()) {
            Some(wait) => {
                let arrival = self.next_arrival;
                self.next_arrival += 1;
                entry.arrivals.insert(req.conn, arrival);
                entry.queue.insert(
                    arrival,
                    Waiter {
                        conn: req.conn,
                        client_id: req.client_id,
                        peer: req.peer,
                        since: now,
                        deadline: now + wait,
                        ttl: req.ttl,
                        shared: req.shared,
                        handle: req.handle,
                    },
                );
                self.waiting += 1;
                self.set_due(name, req.conn, now + wait);
                Decision::Queued
            }
            None => {
                if entry.is_unused() {
                    self.names.remove(name);
                }
                self.counters.not_acquired += 1;
                Decision::NotGranted
            }
        }
    }

    /// Where `conn` stands for `name`.
    pub fn state(&self, name: &str, conn: ConnId) -> State {
        match self.names.get(name) {
            Some(e) if e.holders.contains_key(&conn) => State::Holding,
            Some(e) if e.arrivals.contains_key(&conn) => State::Waiting,
            _ => State::Absent,
        }
    }

    /// The connection sent a request: a holder's lease starts over. Returns where it stands.
    pub fn activity(&mut self, name: &str, conn: ConnId, now: Instant) -> State {
        let state = self.state(name, conn);
        if state == State::Holding
            && let Some(ttl) = self.names[name].holders[&conn].ttl
        {
            self.set_due(name, conn, now + ttl);
        }
        state
    }

    /// `conn` releases, cancels its wait, or is gone. Returns where it stood, for how long, and
    /// the grants this made. Calling it for a connection that is no longer there changes nothing,
    /// so a late or duplicate call can never free somebody else's lock.
    pub fn leave(&mut self, name: &str, conn: ConnId, now: Instant) -> (Left, Vec<Event<H>>) {
        let mut events = Vec::new();
        let Some(entry) = self.names.get_mut(name) else {
            return (Left::Absent, events);
        };
        let left = if let Some(h) = entry.remove_holder(conn) {
            self.holders -= 1;
            self.held -= usize::from(entry.holders.is_empty());
            self.counters.released += 1;
            Left::Held(now.saturating_duration_since(h.since))
        } else if let Some(w) = entry.remove_waiter(conn) {
            self.waiting -= 1;
            Left::Waited(now.saturating_duration_since(w.since))
        } else {
            return (Left::Absent, events);
        };
        self.clear_due(conn);
        self.promote(name, now, &mut events);
        (left, events)
    }

    /// Expires leases and ends waits whose time has come, then grants the places they freed.
    pub fn tick(&mut self, now: Instant) -> Vec<Event<H>> {
        let mut events = Vec::new();
        let mut touched = Vec::new();
        while let Some(entry) = self.deadlines.first_entry() {
            if entry.key().at > now {
                break;
            }
            let (Due { conn, .. }, name) = entry.remove_entry();
            self.due.remove(&conn);
            let Some(e) = self.names.get_mut(&name) else {
                continue;
            };
            if let Some(h) = e.remove_holder(conn) {
                self.holders -= 1;
                self.held -= usize::from(e.holders.is_empty());
                self.counters.expired += 1;
                events.push(Event::Expired {
                    conn,
                    held: now.saturating_duration_since(h.since),
                    handle: h.handle,
                });
            } else if let Some(w) = e.remove_waiter(conn) {
                self.waiting -= 1;
                self.counters.wait_timeouts += 1;
                self.counters.not_acquired += 1;
                events.push(Event::TimedOut {
                    conn,
                    handle: w.handle,
                });
            }
            touched.push(name);
        }
        for name in touched {
            self.promote(&name, now, &mut events);
        }
        events
    }

    /// The soonest lease expiry or wait deadline, for the caller's timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first_key_value().map(|(d, _)| d.at)
    }

    /// Names held or awaited (for the model check: no name outlives its holders and waiters).
    #[cfg(any(test, fuzzing))]
    pub fn names(&self) -> usize {
        self.names.len()
    }

    /// Holders over all names (for a plain lock, the number of locks held).
    pub fn holders(&self) -> usize {
        self.holders
    }

    /// Names with at least one holder.
    pub fn held(&self) -> usize {
        self.held
    }

    pub fn waiting(&self) -> usize {
        self.waiting
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The token of the next grant.
    pub fn next_token(&self) -> u64 {
        self.next_token
    }

    /// Every held name with its holders and waiters, copied as they are. Holders unsorted: the
    /// caller sorts with [`sort_snapshot`] after letting go of the table, so that a big `.locks`
    /// keeps the table's users waiting for a copy, not for a sort.
    pub fn snapshot_unsorted(&self, now: Instant) -> Vec<LockInfo> {
        let mut locks = Vec::with_capacity(self.held);
        for (name, e) in &self.names {
            if e.holders.is_empty() {
                continue;
            }
            locks.push(LockInfo {
                name: name.clone(),
                max: e.max,
                holders: e
                    .holders
                    .values()
                    .map(|h| HolderInfo {
                        client_id: h.client_id.clone(),
                        peer: h.peer,
                        held_for: now.saturating_duration_since(h.since),
                        token: h.token,
                        ttl: h.ttl,
                        shared: h.shared,
                        server: None,
                    })
                    .collect(),
                waiters: e
                    .queue
                    .values()
                    .map(|w| WaiterInfo {
                        client_id: w.client_id.clone(),
                        peer: w.peer,
                        waited: now.saturating_duration_since(w.since),
                        left: w.deadline.saturating_duration_since(now),
                        shared: w.shared,
                        server: None,
                    })
                    .collect(),
            });
        }
        locks
    }

    /// Every held name, sorted, with its holders (longest held first) and queue length.
    #[cfg(any(test, fuzzing))]
    pub fn snapshot(&self, now: Instant) -> Vec<LockInfo> {
        let mut locks = self.snapshot_unsorted(now);
        sort_snapshot(&mut locks);
        locks
    }

    /// Fills free places of `name` from the front of its queue, in order, for as long as the
    /// first in line fits (one exclusive waiter, or a run of shared ones); drops the entry once
    /// empty. A waiter whose deadline has passed is told so rather than granted, even if the
    /// timer has not got to it yet.
    fn promote(&mut self, name: &str, now: Instant, events: &mut Vec<Event<H>>) {
        let Some(entry) = self.names.get_mut(name) else {
            return;
        };
        let mut dues = Vec::new();
        while entry.front_has_room() {
            let w = entry.pop_waiter().expect("the front exists");
            self.waiting -= 1;
            if w.deadline <= now {
                self.counters.wait_timeouts += 1;
                self.counters.not_acquired += 1;
                events.push(Event::TimedOut {
                    conn: w.conn,
                    handle: w.handle,
                });
                dues.push((w.conn, None));
                continue;
            }
            let token = self.next_token;
            self.next_token += 1;
            self.counters.acquired += 1;
            self.counters.granted_after_wait += 1;
            self.counters.shared_acquired += u64::from(w.shared);
            events.push(Event::Granted {
                conn: w.conn,
                token,
                waited: now.saturating_duration_since(w.since),
                handle: w.handle.clone(),
            });
            // The wait deadline gives way to the lease, if any.
            dues.push((w.conn, w.ttl.map(|ttl| now + ttl)));
            self.held += usize::from(entry.holders.is_empty());
            self.holders += 1;
            entry.insert_holder(
                w.conn,
                Holder {
                    client_id: w.client_id,
                    peer: w.peer,
                    since: now,
                    token,
                    ttl: w.ttl,
                    shared: w.shared,
                    handle: w.handle,
                },
            );
        }
        if entry.is_unused() {
            self.names.remove(name);
        }
        for (conn, due) in dues {
            match due {
                Some(at) => self.set_due(name, conn, at),
                None => self.clear_due(conn),
            }
        }
    }

    fn set_due(&mut self, name: &str, conn: ConnId, at: Instant) {
        self.clear_due(conn);
        // The entry's own name, shared, when there is one (there always is: a deadline belongs
        // to a holder or waiter of the name).
        let name = match self.names.get_key_value(name) {
            Some((key, _)) => Arc::clone(key),
            None => name.into(),
        };
        self.deadlines.insert(Due { at, conn }, name);
        self.due.insert(conn, at);
    }

    fn clear_due(&mut self, conn: ConnId) {
        if let Some(at) = self.due.remove(&conn) {
            self.deadlines.remove(&Due { at, conn });
        }
    }
}

/// Orders a snapshot as `.locks` shows it: names sorted, each name's holders longest held first
/// (ties by token, which is grant order).
pub fn sort_snapshot(locks: &mut [LockInfo]) {
    locks.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    for lock in locks {
        lock.holders
            .sort_unstable_by(|a, b| b.held_for.cmp(&a.held_for).then(a.token.cmp(&b.token)));
    }
}

pub mod export;

#[cfg(any(test, fuzzing))]
pub mod model;
#[cfg(any(test, fuzzing, feature = "etcd"))]
pub mod queue;

#[cfg(test)]
mod tests;
