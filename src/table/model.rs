//! A reference model of the lock table, and a harness that checks the real [`Table`] against it.
//!
//! The model is written to be obviously right rather than fast: per name, `max`, a list of holders
//! and a list of waiters, searched linearly; time passes only in [`Model::tick`], which collects
//! everything due and handles it soonest first. The unit test `random_operations_match_the_model`
//! and the fuzz target `table` (fuzz/) drive [`Check`] with operation sequences, so there is one
//! model and one set of checks.
//!
//! Tokens: the model numbers grants 1, 2, 3, ... in the order they happen. The table only promises
//! that every token is greater than every token before it, so [`Check`] compares them by order:
//! each table token must exceed the previous one, and is then replaced by its ordinal.
//!
//! Not part of the crate's API: hidden from the docs, and free to change.

use super::{Claim, ConnId, Counters, Decision, Event, Left, State, Table};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
struct Holder {
    conn: ConnId,
    since: Instant,
    expiry: Option<Instant>,
    ttl: Option<Duration>,
    shared: bool,
    ordinal: u64,
}

#[derive(Debug, Clone)]
struct Waiter {
    conn: ConnId,
    since: Instant,
    deadline: Instant,
    ttl: Option<Duration>,
    shared: bool,
}

#[derive(Debug, Clone)]
struct Name {
    max: u32,
    holders: Vec<Holder>,
    queue: Vec<Waiter>,
}

impl Name {
    /// Shared beside shared holders only; exclusive beside fewer than `max` exclusive ones.
    fn fits(&self, shared: bool) -> bool {
        if shared {
            self.holders.iter().all(|h| h.shared)
        } else {
            self.holders.iter().all(|h| !h.shared) && self.holders.len() < self.max as usize
        }
    }
}

/// The table's rules, plainly. Events carry the connection number as their handle.
#[derive(Debug, Clone, Default)]
pub struct Model {
    names: BTreeMap<String, Name>,
    grants: u64,
    counters: Counters,
}

impl Model {
    pub fn new() -> Model {
        Model::default()
    }

    pub fn lock(&mut self, name: &str, claim: &Claim<u64>, now: Instant) -> Decision {
        let (conn, max, wait, ttl, shared) =
            (claim.conn, claim.max, claim.wait, claim.ttl, claim.shared);
        let max = max.max(1);
        let entry = self.names.entry(name.to_owned()).or_insert(Name {
            max,
            holders: Vec::new(),
            queue: Vec::new(),
        });
        let decision = if entry.max != max {
            self.counters.max_mismatches += 1;
            Decision::MaxMismatch { max: entry.max }
        } else if entry.fits(shared) && entry.queue.is_empty() {
            self.grants += 1;
            self.counters.acquired += 1;
            self.counters.shared_acquired += u64::from(shared);
            entry.holders.push(Holder {
                conn,
                since: now,
                expiry: ttl.map(|ttl| now + ttl),
                ttl,
                shared,
                ordinal: self.grants,
            });
            Decision::Granted { token: self.grants }
        } else if let Some(wait) = wait.filter(|w| !w.is_zero()) {
            entry.queue.push(Waiter {
                conn,
                since: now,
                deadline: now + wait,
                ttl,
                shared,
            });
            Decision::Queued
        } else {
            self.counters.not_acquired += 1;
            Decision::NotGranted
        };
        self.forget_empty();
        decision
    }

    pub fn state(&self, name: &str, conn: ConnId) -> State {
        match self.names.get(name) {
            Some(n) if n.holders.iter().any(|h| h.conn == conn) => State::Holding,
            Some(n) if n.queue.iter().any(|w| w.conn == conn) => State::Waiting,
            _ => State::Absent,
        }
    }

    pub fn activity(&mut self, name: &str, conn: ConnId, now: Instant) -> State {
        if let Some(h) = self
            .names
            .get_mut(name)
            .and_then(|n| n.holders.iter_mut().find(|h| h.conn == conn))
        {
            h.expiry = h.ttl.map(|ttl| now + ttl);
        }
        self.state(name, conn)
    }

    pub fn leave(&mut self, name: &str, conn: ConnId, now: Instant) -> (Left, Vec<Event<u64>>) {
        let mut events = Vec::new();
        let Some(n) = self.names.get_mut(name) else {
            return (Left::Absent, events);
        };
        let left = if let Some(i) = n.holders.iter().position(|h| h.conn == conn) {
            let h = n.holders.remove(i);
            self.counters.released += 1;
            Left::Held(now - h.since)
        } else if let Some(i) = n.queue.iter().position(|w| w.conn == conn) {
            let w = n.queue.remove(i);
            Left::Waited(now - w.since)
        } else {
            return (Left::Absent, events);
        };
        self.promote(name, now, &mut events);
        self.forget_empty();
        (left, events)
    }

    pub fn tick(&mut self, now: Instant) -> Vec<Event<u64>> {
        // Everything due by now: (when, connection, name, is it a holder).
        let mut due: Vec<(Instant, ConnId, String, bool)> = Vec::new();
        for (name, n) in &self.names {
            for h in &n.holders {
                if let Some(at) = h.expiry.filter(|at| *at <= now) {
                    due.push((at, h.conn, name.clone(), true));
                }
            }
            for w in n.queue.iter().filter(|w| w.deadline <= now) {
                due.push((w.deadline, w.conn, name.clone(), false));
            }
        }
        due.sort();
        let mut events = Vec::new();
        for (_, conn, name, holder) in &due {
            let n = self.names.get_mut(name).expect("present");
            if *holder {
                let i = n.holders.iter().position(|h| h.conn == *conn).expect("due");
                let h = n.holders.remove(i);
                self.counters.expired += 1;
                events.push(Event::Expired {
                    conn: *conn,
                    held: now - h.since,
                    handle: conn.0,
                });
            } else {
                n.queue.retain(|w| w.conn != *conn);
                self.counters.wait_timeouts += 1;
                self.counters.not_acquired += 1;
                events.push(Event::TimedOut {
                    conn: *conn,
                    handle: conn.0,
                });
            }
        }
        for (_, _, name, _) in &due {
            self.promote(name, now, &mut events);
        }
        self.forget_empty();
        events
    }

    /// Grants from the front of the queue while the first in line fits; a waiter whose time is
    /// up is told so.
    fn promote(&mut self, name: &str, now: Instant, events: &mut Vec<Event<u64>>) {
        let n = self.names.get_mut(name).expect("present");
        while n.queue.first().is_some_and(|w| n.fits(w.shared)) {
            let w = n.queue.remove(0);
            if w.deadline <= now {
                self.counters.wait_timeouts += 1;
                self.counters.not_acquired += 1;
                events.push(Event::TimedOut {
                    conn: w.conn,
                    handle: w.conn.0,
                });
                continue;
            }
            self.grants += 1;
            self.counters.acquired += 1;
            self.counters.granted_after_wait += 1;
            self.counters.shared_acquired += u64::from(w.shared);
            events.push(Event::Granted {
                conn: w.conn,
                token: self.grants,
                waited: now - w.since,
                handle: w.conn.0,
            });
            n.holders.push(Holder {
                conn: w.conn,
                since: now,
                expiry: w.ttl.map(|ttl| now + ttl),
                ttl: w.ttl,
                shared: w.shared,
                ordinal: self.grants,
            });
        }
    }

    fn forget_empty(&mut self) {
        self.names
            .retain(|_, n| !n.holders.is_empty() || !n.queue.is_empty());
    }

    pub fn names(&self) -> usize {
        self.names.len()
    }

    pub fn waiting(&self) -> usize {
        self.names.values().map(|n| n.queue.len()).sum()
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        let leases = self.names.values().flat_map(|n| &n.holders);
        let waits = self.names.values().flat_map(|n| &n.queue);
        leases
            .filter_map(|h| h.expiry)
            .chain(waits.map(|w| w.deadline))
            .min()
    }
}

/// One step of a test: every connection locks once, as the server's connections do.
#[derive(Debug, Clone)]
pub enum Op {
    /// A new connection asks for names\[name\].
    Lock {
        name: usize,
        max: u32,
        wait: Option<Duration>,
        ttl: Option<Duration>,
        shared: bool,
    },
    /// Connection number `conn` (counted from 0, modulo the connections so far) leaves: its own
    /// name, or names\[n\] with `Some(n)` (a stray call that must change nothing).
    Leave { conn: usize, name: Option<usize> },
    /// Connection `conn` sends a request (renewing a lease), as for [`Op::Leave`].
    Activity { conn: usize, name: Option<usize> },
    /// Time moves forward by `advance` (perhaps zero). The timer has not run yet: a busy server
    /// may handle requests past a deadline before its timer thread gets to it.
    Advance { advance: Duration },
    /// The timer runs.
    Tick,
    /// The table is handed to a new process: exported and restored at the same moment. With
    /// `ahead`, the new process's own first token is above the handed one (its clock moved on);
    /// either way tokens must keep growing and nothing else may change.
    HandOver { ahead: bool },
}

/// Drives a [`Table`] and a [`Model`] with the same operations and panics at the first
/// difference or broken invariant.
pub struct Check {
    table: Table<u64>,
    model: Model,
    names: Vec<String>,
    now: Instant,
    /// Every connection so far, with the name it asked for.
    conns: Vec<(ConnId, usize)>,
    /// The last table token seen, and each token's ordinal (for snapshots).
    last_token: Option<u64>,
    ordinals: HashMap<u64, u64>,
    /// Per name, the connections queued, oldest first (an independent FIFO check).
    queued: Vec<Vec<ConnId>>,
}

impl Check {
    pub fn new(names: &[&str], first_token: u64) -> Check {
        Check {
            table: Table::new(first_token),
            model: Model::new(),
            names: names.iter().map(|n| n.to_string()).collect(),
            now: Instant::now(),
            conns: Vec::new(),
            last_token: None,
            ordinals: HashMap::new(),
            queued: vec![Vec::new(); names.len()],
        }
    }

    /// Indices (for [`Op::Leave`] and [`Op::Activity`]) of the connections holding or waiting.
    pub fn present(&self) -> Vec<usize> {
        (0..self.conns.len())
            .filter(|&i| {
                let (conn, name) = self.conns[i];
                self.model.state(&self.names[name], conn) != State::Absent
            })
            .collect()
    }

    pub fn apply(&mut self, op: &Op) {
        let names = self.names.len();
        match *op {
            Op::Lock {
                name,
                max,
                wait,
                ttl,
                shared,
            } => {
                let name = name % names;
                let conn = ConnId(self.conns.len() as u64 + 1);
                self.conns.push((conn, name));
                let req = Claim {
                    conn,
                    client_id: None,
                    peer: None,
                    max,
                    wait,
                    ttl,
                    shared,
                    handle: conn.0,
                };
                let n = &self.names[name];
                let want = self.model.lock(n, &req, self.now);
                let got = self.table.lock(n, req, self.now);
                let got = match got {
                    Decision::Granted { token } => Decision::Granted {
                        token: self.ordinal(token),
                    },
                    d => d,
                };
                assert_eq!(got, want, "{op:?}");
                if got == Decision::Queued {
                    self.queued[name].push(conn);
                }
            }
            Op::Leave { conn, name } | Op::Activity { conn, name } => {
                if self.conns.is_empty() {
                    return;
                }
                let (id, own) = self.conns[conn % self.conns.len()];
                let n = self.names[name.map_or(own, |n| n % names)].clone();
                let n = n.as_str();
                if let Op::Leave { .. } = op {
                    let (state, events) = self.table.leave(n, id, self.now);
                    let events = self.by_order(events);
                    let (want_state, want) = self.model.leave(n, id, self.now);
                    assert_eq!((state, &events), (want_state, &want), "{op:?}");
                    self.check_fifo(&events);
                } else {
                    let state = self.table.activity(n, id, self.now);
                    assert_eq!(state, self.model.activity(n, id, self.now), "{op:?}");
                }
            }
            Op::Advance { advance } => self.now += advance,
            Op::HandOver { ahead } => {
                let export = self.table.export(self.now);
                let first = if ahead { export.next_token + 1_000 } else { 0 };
                let restored = Table::restore(&export, self.now, first, |conn| Some(conn.0))
                    .unwrap_or_else(|e| panic!("{op:?}: {e}"));
                let mut again = restored.export(self.now);
                assert_eq!(again.next_token, export.next_token.max(first), "{op:?}");
                again.next_token = export.next_token;
                assert_eq!(again, export, "{op:?}: export, restore, export");
                self.table = restored;
            }
            Op::Tick => {
                let events = self.table.tick(self.now);
                let events = self.by_order(events);
                assert_eq!(events, self.model.tick(self.now), "{op:?}");
                self.check_fifo(&events);
            }
        }
        self.check_invariants();
    }

    /// The next grant's ordinal, after checking its token exceeds every one before it.
    fn ordinal(&mut self, token: u64) -> u64 {
        if let Some(last) = self.last_token {
            assert!(token > last, "token {token} after {last}");
        }
        self.last_token = Some(token);
        let ordinal = self.ordinals.len() as u64 + 1;
        self.ordinals.insert(token, ordinal);
        ordinal
    }

    fn by_order(&mut self, events: Vec<Event<u64>>) -> Vec<Event<u64>> {
        events
            .into_iter()
            .map(|e| match e {
                Event::Granted {
                    conn,
                    token,
                    waited,
                    handle,
                } => Event::Granted {
                    conn,
                    token: self.ordinal(token),
                    waited,
                    handle,
                },
                e => e,
            })
            .collect()
    }

    /// A waiter is granted only once everyone queued before it for that name is gone or
    /// granted.
    fn check_fifo(&mut self, events: &[Event<u64>]) {
        for e in events {
            let Event::Granted { conn, .. } = e else {
                continue;
            };
            let (_, name) = self.conns[conn.0 as usize - 1];
            let queue = &mut self.queued[name];
            let at = queue.iter().position(|c| c == conn).expect("was queued");
            for earlier in &queue[..at] {
                let state = self.table.state(&self.names[name], *earlier);
                assert_ne!(state, State::Waiting, "{conn:?} granted before {earlier:?}");
            }
            queue.remove(at);
        }
    }

    fn check_invariants(&self) {
        let (t, m) = (&self.table, &self.model);
        // Everyone stands where the model says, in at most one place.
        let mut waiting = 0;
        for &(conn, _) in &self.conns {
            let mut places = 0;
            for name in &self.names {
                let state = t.state(name, conn);
                assert_eq!(state, m.state(name, conn), "{conn:?} on {name}");
                places += usize::from(state != State::Absent);
                waiting += usize::from(state == State::Waiting);
            }
            assert!(places <= 1, "{conn:?} is in {places} places");
        }
        assert_eq!(t.waiting(), waiting);
        assert_eq!(t.waiting(), m.waiting());
        assert_eq!(t.names(), m.names());
        assert_eq!(t.counters(), m.counters());
        assert_eq!(t.next_deadline(), m.next_deadline());

        let snap = t.snapshot(self.now);
        let held: Vec<&String> = m
            .names
            .iter()
            .filter(|(_, n)| !n.holders.is_empty())
            .map(|(name, _)| name)
            .collect();
        let snap_names: Vec<&str> = snap.iter().map(|l| &*l.name).collect();
        assert_eq!(snap_names, held, "snapshot names, sorted");
        assert_eq!(t.held(), snap.len());
        assert_eq!(
            t.holders(),
            snap.iter().map(|l| l.holders.len()).sum::<usize>()
        );
        assert_eq!(
            t.waiting(),
            snap.iter().map(|l| l.waiters.len()).sum::<usize>()
        );
        for lock in &snap {
            let n = &m.names[&*lock.name];
            assert_eq!(lock.max, n.max);
            let shared = lock.holders.iter().filter(|h| h.shared).count();
            // Never both modes; exclusive holders at most `max`.
            assert!(shared == 0 || shared == lock.holders.len(), "{}", lock.name);
            assert!(
                shared > 0 || lock.holders.len() <= lock.max as usize,
                "{}",
                lock.name
            );
            // Waiters only while the first of them does not fit.
            if let Some(first) = lock.waiters.first() {
                let fits = if first.shared {
                    shared == lock.holders.len()
                } else {
                    shared == 0 && lock.holders.len() < lock.max as usize
                };
                assert!(!fits, "{}: the first waiter fits", lock.name);
            }
            // The waiters, in the model's queue order.
            let got: Vec<(Duration, Duration, bool)> = lock
                .waiters
                .iter()
                .map(|w| (w.waited, w.left, w.shared))
                .collect();
            let want: Vec<(Duration, Duration, bool)> = n
                .queue
                .iter()
                .map(|w| {
                    (
                        self.now - w.since,
                        w.deadline.saturating_duration_since(self.now),
                        w.shared,
                    )
                })
                .collect();
            assert_eq!(got, want, "waiters of {}", lock.name);
            // Longest held first, and the holders and their tokens are the model's.
            assert!(lock.holders.is_sorted_by(|a, b| a.held_for >= b.held_for));
            let mut got: Vec<(Duration, u64, Option<Duration>, bool)> = lock
                .holders
                .iter()
                .map(|h| (h.held_for, self.ordinals[&h.token], h.ttl, h.shared))
                .collect();
            let mut want: Vec<(Duration, u64, Option<Duration>, bool)> = n
                .holders
                .iter()
                .map(|h| (self.now - h.since, h.ordinal, h.ttl, h.shared))
                .collect();
            got.sort();
            want.sort();
            assert_eq!(got, want, "holders of {}", lock.name);
        }
    }
}

/// The queue rule ([`super::queue`]) run the way a cluster member runs it: per name, one list of
/// requests in arrival order, each holding or not, and who holds decided by
/// [`super::queue::holders`] and [`super::queue::place`] alone. Time is handled as the model
/// handles it (leases, waits, the timer running late), so that any difference in who is granted,
/// queued or refused comes from the rule.
#[derive(Debug, Default)]
pub struct QueueSim {
    names: BTreeMap<String, Vec<Request>>,
    grants: u64,
    counters: Counters,
}

#[derive(Debug, Clone)]
struct Request {
    conn: ConnId,
    entry: super::queue::Entry,
    since: Instant,
    deadline: Option<Instant>,
    ttl: Option<Duration>,
    /// When it was granted, and when its lease runs out; `None` while it waits.
    granted: Option<(Instant, Option<Instant>)>,
}

impl QueueSim {
    fn entries(list: &[Request]) -> Vec<super::queue::Entry> {
        list.iter().map(|r| r.entry).collect()
    }

    pub fn lock(&mut self, name: &str, claim: &Claim<u64>, now: Instant) -> Decision {
        use super::queue::{Place, place};
        let list = self.names.entry(name.to_owned()).or_default();
        list.push(Request {
            conn: claim.conn,
            entry: super::queue::Entry {
                max: claim.max,
                shared: claim.shared,
            },
            since: now,
            deadline: None,
            ttl: claim.ttl,
            granted: None,
        });
        let at = list.len() - 1;
        let decision = match place(&Self::entries(list), at) {
            Place::MaxMismatch { max } => {
                list.pop();
                self.counters.max_mismatches += 1;
                Decision::MaxMismatch { max }
            }
            Place::Holds => {
                self.grants += 1;
                self.counters.acquired += 1;
                self.counters.shared_acquired += u64::from(claim.shared);
                list[at].granted = Some((now, claim.ttl.map(|t| now + t)));
                Decision::Granted { token: self.grants }
            }
            Place::Waits => match claim.wait.filter(|w| !w.is_zero()) {
                Some(wait) => {
                    list[at].deadline = Some(now + wait);
                    Decision::Queued
                }
                None => {
                    list.pop();
                    self.counters.not_acquired += 1;
                    Decision::NotGranted
                }
            },
        };
        self.forget_empty();
        decision
    }

    pub fn state(&self, name: &str, conn: ConnId) -> State {
        match self
            .names
            .get(name)
            .and_then(|l| l.iter().find(|r| r.conn == conn))
        {
            Some(r) if r.granted.is_some() => State::Holding,
            Some(_) => State::Waiting,
            None => State::Absent,
        }
    }

    pub fn activity(&mut self, name: &str, conn: ConnId, now: Instant) -> State {
        if let Some(r) = self
            .names
            .get_mut(name)
            .and_then(|l| l.iter_mut().find(|r| r.conn == conn))
            && let Some((_, expiry)) = &mut r.granted
        {
            *expiry = r.ttl.map(|t| now + t);
        }
        self.state(name, conn)
    }

    pub fn leave(&mut self, name: &str, conn: ConnId, now: Instant) -> (Left, Vec<Event<u64>>) {
        let mut events = Vec::new();
        let Some(list) = self.names.get_mut(name) else {
            return (Left::Absent, events);
        };
        let Some(i) = list.iter().position(|r| r.conn == conn) else {
            return (Left::Absent, events);
        };
        let r = list.remove(i);
        let left = match r.granted {
            Some((at, _)) => {
                self.counters.released += 1;
                Left::Held(now - at)
            }
            None => Left::Waited(now - r.since),
        };
        self.promote(name, now, &mut events);
        self.forget_empty();
        (left, events)
    }

    pub fn tick(&mut self, now: Instant) -> Vec<Event<u64>> {
        let mut due: Vec<(Instant, ConnId, String)> = Vec::new();
        for (name, list) in &self.names {
            for r in list {
                let at = match r.granted {
                    Some((_, expiry)) => expiry,
                    None => r.deadline,
                };
                if let Some(at) = at.filter(|at| *at <= now) {
                    due.push((at, r.conn, name.clone()));
                }
            }
        }
        due.sort();
        let mut events = Vec::new();
        for (_, conn, name) in &due {
            let list = self.names.get_mut(name).expect("present");
            let i = list.iter().position(|r| r.conn == *conn).expect("due");
            let r = list.remove(i);
            match r.granted {
                Some((at, _)) => {
                    self.counters.expired += 1;
                    events.push(Event::Expired {
                        conn: *conn,
                        held: now - at,
                        handle: conn.0,
                    });
                }
                None => {
                    self.counters.wait_timeouts += 1;
                    self.counters.not_acquired += 1;
                    events.push(Event::TimedOut {
                        conn: *conn,
                        handle: conn.0,
                    });
                }
            }
        }
        for (_, _, name) in &due {
            self.promote(name, now, &mut events);
        }
        self.forget_empty();
        events
    }

    /// Grants, in list order, every waiter the rule now counts among the holders; one whose
    /// wait is over is told so and leaves the list instead.
    fn promote(&mut self, name: &str, now: Instant, events: &mut Vec<Event<u64>>) {
        let list = self.names.get_mut(name).expect("present");
        loop {
            let n = super::queue::holders(Self::entries(list));
            let Some(i) = list[..n].iter().position(|r| r.granted.is_none()) else {
                break;
            };
            let r = &mut list[i];
            if r.deadline.is_some_and(|d| d <= now) {
                let conn = r.conn;
                list.remove(i);
                self.counters.wait_timeouts += 1;
                self.counters.not_acquired += 1;
                events.push(Event::TimedOut {
                    conn,
                    handle: conn.0,
                });
                continue;
            }
            self.grants += 1;
            self.counters.acquired += 1;
            self.counters.granted_after_wait += 1;
            self.counters.shared_acquired += u64::from(r.entry.shared);
            r.granted = Some((now, r.ttl.map(|t| now + t)));
            events.push(Event::Granted {
                conn: r.conn,
                token: self.grants,
                waited: now - r.since,
                handle: r.conn.0,
            });
        }
    }

    fn forget_empty(&mut self) {
        self.names.retain(|_, l| !l.is_empty());
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }
}

/// Drives the reference [`Model`] and a [`QueueSim`] with the same operations and panics at the
/// first difference: decisions, events (tokens as grant ordinals), where every connection
/// stands, and the counters.
pub struct CheckQueue {
    model: Model,
    sim: QueueSim,
    names: Vec<String>,
    now: Instant,
    conns: Vec<(ConnId, usize)>,
}

impl CheckQueue {
    pub fn new(names: &[&str]) -> CheckQueue {
        CheckQueue {
            model: Model::new(),
            sim: QueueSim::default(),
            names: names.iter().map(|n| n.to_string()).collect(),
            now: Instant::now(),
            conns: Vec::new(),
        }
    }

    /// As [`Check::present`].
    pub fn present(&self) -> Vec<usize> {
        (0..self.conns.len())
            .filter(|&i| {
                let (conn, name) = self.conns[i];
                self.model.state(&self.names[name], conn) != State::Absent
            })
            .collect()
    }

    pub fn apply(&mut self, op: &Op) {
        let names = self.names.len();
        match *op {
            Op::Lock {
                name,
                max,
                wait,
                ttl,
                shared,
            } => {
                let name = name % names;
                let conn = ConnId(self.conns.len() as u64 + 1);
                self.conns.push((conn, name));
                let req = Claim {
                    conn,
                    client_id: None,
                    peer: None,
                    max,
                    wait,
                    ttl,
                    shared,
                    handle: conn.0,
                };
                let n = &self.names[name];
                let want = self.model.lock(n, &req, self.now);
                let got = self.sim.lock(n, &req, self.now);
                assert_eq!(got, want, "{op:?}");
            }
            Op::Leave { conn, name } | Op::Activity { conn, name } => {
                if self.conns.is_empty() {
                    return;
                }
                let (id, own) = self.conns[conn % self.conns.len()];
                let n = self.names[name.map_or(own, |n| n % names)].clone();
                if let Op::Leave { .. } = op {
                    let got = self.sim.leave(&n, id, self.now);
                    let want = self.model.leave(&n, id, self.now);
                    assert_eq!(got, want, "{op:?}");
                } else {
                    let got = self.sim.activity(&n, id, self.now);
                    assert_eq!(got, self.model.activity(&n, id, self.now), "{op:?}");
                }
            }
            Op::Advance { advance } => self.now += advance,
            Op::Tick => {
                let got = self.sim.tick(self.now);
                assert_eq!(got, self.model.tick(self.now), "{op:?}");
            }
            // A cluster member keeps its state in etcd and hands nothing over.
            Op::HandOver { .. } => {}
        }
        for &(conn, _) in &self.conns {
            for name in &self.names {
                assert_eq!(
                    self.sim.state(name, conn),
                    self.model.state(name, conn),
                    "{conn:?} on {name} after {op:?}"
                );
            }
        }
        assert_eq!(self.sim.counters(), self.model.counters(), "after {op:?}");
    }
}
