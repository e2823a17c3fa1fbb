//! The lock table: who holds which name, who waits for it, and what happens next.
//!
//! A pure state machine. It never touches a socket and never reads a clock: callers pass `now`,
//! and every method returns decisions ([`Event`]s) for the caller to carry out — "grant this
//! waiter", "this lease expired". That keeps every rule testable without a network, and keeps the
//! server's critical section (the Mutex around this table) to map and queue operations: no I/O
//! ever happens while it is held.
//!
//! Rules, all in this file:
//! - a name has at most `max` holders (1 unless the request says `max:K`); every holder and
//!   waiter of a name must agree on `max`;
//! - waiting is strict FIFO per name, and nobody barges: a try-lock is refused while others wait;
//! - a release, a departure, an expiry or a timeout hands free places to the longest waiters;
//! - every grant carries a token, strictly greater than every token before it (see [`Table::new`]);
//! - a holder with a ttl loses the lock when it has been silent for that long.
//!
//! A connection holds or waits for at most one name; it is identified by its [`ConnId`]. Each
//! entry carries an opaque handle `H` that the server uses to reach the connection (the table
//! only hands it back in events).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Identifies one client connection for the whole of its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// A validated `lock` request.
#[derive(Debug, Clone)]
pub struct LockRequest<H> {
    pub conn: ConnId,
    pub client_id: Option<Box<str>>,
    pub peer: Option<SocketAddr>,
    /// Holders allowed at once: 1 for a plain lock, K for `max:K`.
    pub max: u32,
    /// How long to queue; `None` (or zero) means try once.
    pub wait: Option<Duration>,
    /// Lease: the lock is revoked after this long without a request from the holder.
    pub ttl: Option<Duration>,
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
    /// A waiter now holds the lock.
    Granted { conn: ConnId, token: u64, handle: H },
    /// A holder's lease ran out; the lock is no longer its.
    Expired { conn: ConnId, handle: H },
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
}

/// A holder, as `.locks` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderInfo {
    pub client_id: Option<Box<str>>,
    pub peer: Option<SocketAddr>,
    pub held_for: Duration,
    pub token: u64,
    pub ttl: Option<Duration>,
}

/// One held name, as `.locks` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockInfo {
    pub name: Box<str>,
    pub max: u32,
    pub holders: Vec<HolderInfo>,
    pub waiting: usize,
}

#[derive(Debug)]
struct Holder<H> {
    conn: ConnId,
    client_id: Option<Box<str>>,
    peer: Option<SocketAddr>,
    since: Instant,
    token: u64,
    ttl: Option<Duration>,
    handle: H,
}

#[derive(Debug)]
struct Waiter<H> {
    conn: ConnId,
    client_id: Option<Box<str>>,
    peer: Option<SocketAddr>,
    deadline: Instant,
    ttl: Option<Duration>,
    handle: H,
}

#[derive(Debug)]
struct Entry<H> {
    max: u32,
    holders: Vec<Holder<H>>,
    queue: VecDeque<Waiter<H>>,
}

/// Why a deadline was set: which connection, on which name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Due {
    at: Instant,
    conn: ConnId,
}

#[derive(Debug)]
pub struct Table<H> {
    names: HashMap<Box<str>, Entry<H>>,
    /// Every lease expiry and wait deadline, soonest first, with the name it concerns.
    deadlines: BTreeMap<Due, Box<str>>,
    /// The deadline each connection has in `deadlines`, to move or remove it.
    due: HashMap<ConnId, Instant>,
    next_token: u64,
    counters: Counters,
    waiting: usize,
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
            counters: Counters::default(),
            waiting: 0,
        }
    }

    /// Grant, queue or refuse `req` for `name`.
    pub fn lock(&mut self, name: &str, req: LockRequest<H>, now: Instant) -> Decision {
        let max = req.max.max(1);
        if let Some(e) = self.names.get(name)
            && e.max != max
        {
            self.counters.max_mismatches += 1;
            return Decision::MaxMismatch { max: e.max };
        }
        let entry = self.names.entry(name.into()).or_insert_with(|| Entry {
            max,
            holders: Vec::new(),
            queue: VecDeque::new(),
        });
        if entry.holders.len() < max as usize && entry.queue.is_empty() {
            let token = self.next_token;
            self.next_token += 1;
            entry.holders.push(Holder {
                conn: req.conn,
                client_id: req.client_id,
                peer: req.peer,
                since: now,
                token,
                ttl: req.ttl,
                handle: req.handle,
            });
            self.counters.acquired += 1;
            if let Some(ttl) = req.ttl {
                self.set_due(name, req.conn, now + ttl);
            }
            return Decision::Granted { token };
        }
        match req.wait.filter(|w| !w.is_zero()) {
            Some(wait) => {
                entry.queue.push_back(Waiter {
                    conn: req.conn,
                    client_id: req.client_id,
                    peer: req.peer,
                    deadline: now + wait,
                    ttl: req.ttl,
                    handle: req.handle,
                });
                self.waiting += 1;
                self.set_due(name, req.conn, now + wait);
                Decision::Queued
            }
            None => {
                if entry.holders.is_empty() && entry.queue.is_empty() {
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
            Some(e) if e.holders.iter().any(|h| h.conn == conn) => State::Holding,
            Some(e) if e.queue.iter().any(|w| w.conn == conn) => State::Waiting,
            _ => State::Absent,
        }
    }

    /// The connection sent a request: a holder's lease starts over. Returns where it stands.
    pub fn activity(&mut self, name: &str, conn: ConnId, now: Instant) -> State {
        let state = self.state(name, conn);
        if state == State::Holding {
            let ttl = self.names[name]
                .holders
                .iter()
                .find(|h| h.conn == conn)
                .and_then(|h| h.ttl);
            if let Some(ttl) = ttl {
                self.set_due(name, conn, now + ttl);
            }
        }
        state
    }

    /// `conn` releases, cancels its wait, or is gone. Returns where it stood and the grants this
    /// made. Calling it for a connection that is no longer there changes nothing, so a late or
    /// duplicate call can never free somebody else's lock.
    pub fn leave(&mut self, name: &str, conn: ConnId, now: Instant) -> (State, Vec<Event<H>>) {
        let mut events = Vec::new();
        let Some(entry) = self.names.get_mut(name) else {
            return (State::Absent, events);
        };
        let state = if let Some(i) = entry.holders.iter().position(|h| h.conn == conn) {
            entry.holders.swap_remove(i);
            self.counters.released += 1;
            State::Holding
        } else if let Some(i) = entry.queue.iter().position(|w| w.conn == conn) {
            entry.queue.remove(i);
            self.waiting -= 1;
            State::Waiting
        } else {
            return (State::Absent, events);
        };
        self.clear_due(conn);
        self.promote(name, now, &mut events);
        (state, events)
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
            if let Some(i) = e.holders.iter().position(|h| h.conn == conn) {
                let h = e.holders.swap_remove(i);
                self.counters.expired += 1;
                events.push(Event::Expired {
                    conn,
                    handle: h.handle,
                });
            } else if let Some(i) = e.queue.iter().position(|w| w.conn == conn) {
                let w = e.queue.remove(i).expect("position is in range");
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

    /// Names held or awaited.
    pub fn names(&self) -> usize {
        self.names.len()
    }

    /// Holders over all names (for a plain lock, the number of locks held).
    pub fn holders(&self) -> usize {
        self.names.values().map(|e| e.holders.len()).sum()
    }

    /// Names with at least one holder.
    pub fn held(&self) -> usize {
        self.names
            .values()
            .filter(|e| !e.holders.is_empty())
            .count()
    }

    /// The token the next grant will carry.
    pub fn next_token(&self) -> u64 {
        self.next_token
    }

    pub fn waiting(&self) -> usize {
        self.waiting
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The longest any current holder has held its lock.
    pub fn oldest_hold(&self, now: Instant) -> Option<Duration> {
        self.names
            .values()
            .flat_map(|e| &e.holders)
            .map(|h| now.saturating_duration_since(h.since))
            .max()
    }

    /// Every held name, sorted, with its holders (longest held first) and queue length.
    pub fn snapshot(&self, now: Instant) -> Vec<LockInfo> {
        let mut locks: Vec<LockInfo> = self
            .names
            .iter()
            .filter(|(_, e)| !e.holders.is_empty())
            .map(|(name, e)| {
                let mut holders: Vec<&Holder<H>> = e.holders.iter().collect();
                holders.sort_by_key(|h| h.since);
                LockInfo {
                    name: name.clone(),
                    max: e.max,
                    holders: holders
                        .into_iter()
                        .map(|h| HolderInfo {
                            client_id: h.client_id.clone(),
                            peer: h.peer,
                            held_for: now.saturating_duration_since(h.since),
                            token: h.token,
                            ttl: h.ttl,
                        })
                        .collect(),
                    waiting: e.queue.len(),
                }
            })
            .collect();
        locks.sort_by(|a, b| a.name.cmp(&b.name));
        locks
    }

    /// Fills free places of `name` from the front of its queue; drops the entry once empty.
    /// A waiter whose deadline has passed is told so rather than granted, even if the timer has
    /// not got to it yet.
    fn promote(&mut self, name: &str, now: Instant, events: &mut Vec<Event<H>>) {
        let Some(entry) = self.names.get_mut(name) else {
            return;
        };
        let mut dues = Vec::new();
        while entry.holders.len() < entry.max as usize {
            let Some(w) = entry.queue.pop_front() else {
                break;
            };
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
            events.push(Event::Granted {
                conn: w.conn,
                token,
                handle: w.handle.clone(),
            });
            // The wait deadline gives way to the lease, if any.
            dues.push((w.conn, w.ttl.map(|ttl| now + ttl)));
            entry.holders.push(Holder {
                conn: w.conn,
                client_id: w.client_id,
                peer: w.peer,
                since: now,
                token,
                ttl: w.ttl,
                handle: w.handle,
            });
        }
        if entry.holders.is_empty() && entry.queue.is_empty() {
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
        self.deadlines.insert(Due { at, conn }, name.into());
        self.due.insert(conn, at);
    }

    fn clear_due(&mut self, conn: ConnId) {
        if let Some(at) = self.due.remove(&conn) {
            self.deadlines.remove(&Due { at, conn });
        }
    }
}

#[doc(hidden)]
pub mod model;

#[cfg(test)]
mod tests;
