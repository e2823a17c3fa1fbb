//! The lock table: who holds which name.
//!
//! A pure state machine. It never touches a socket and never reads a clock: callers pass `now`,
//! and every method returns a decision for the caller to act on. That keeps every rule testable
//! without a network, and keeps the server's critical section (the Mutex around this table) down
//! to a hash-map operation — no I/O ever happens while it is held.
//!
//! A connection holds at most one lock, so a holder is identified by its [`ConnId`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Identifies one client connection for the whole of its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// Who holds a lock, as reported by `.stats` and the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub conn: ConnId,
    pub client_id: Option<Box<str>>,
    pub peer: Option<SocketAddr>,
    pub since: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquire {
    Granted,
    NotGranted,
}

/// Totals since the table was created; `.stats` reports them under 0.1.8's key names.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub acquired: u64,
    pub not_acquired: u64,
    pub released: u64,
}

#[derive(Debug, Default)]
pub struct Table {
    locks: HashMap<Box<str>, Holder>,
    counters: Counters,
}

impl Table {
    pub fn new() -> Table {
        Table::default()
    }

    /// Try-lock: grant `name` to `holder` unless somebody holds it.
    pub fn acquire(&mut self, name: &str, holder: Holder) -> Acquire {
        if self.locks.contains_key(name) {
            self.counters.not_acquired += 1;
            return Acquire::NotGranted;
        }
        self.locks.insert(name.into(), holder);
        self.counters.acquired += 1;
        Acquire::Granted
    }

    /// Frees `name` if `conn` holds it; whether the client said `release` or went away makes no
    /// difference to the table. Returns false, changing nothing, when `conn` is not the holder, so
    /// a late or duplicate call can never free somebody else's lock.
    pub fn release(&mut self, name: &str, conn: ConnId) -> bool {
        match self.locks.get(name) {
            Some(h) if h.conn == conn => {
                self.locks.remove(name);
                self.counters.released += 1;
                true
            }
            _ => false,
        }
    }

    pub fn holder(&self, name: &str) -> Option<&Holder> {
        self.locks.get(name)
    }

    /// How many names are held.
    pub fn held(&self) -> usize {
        self.locks.len()
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The longest any current holder has held its lock, for the operator's status line.
    pub fn oldest_hold(&self, now: Instant) -> Option<Duration> {
        self.locks
            .values()
            .map(|h| now.saturating_duration_since(h.since))
            .max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(conn: u64, now: Instant) -> Holder {
        Holder {
            conn: ConnId(conn),
            client_id: None,
            peer: None,
            since: now,
        }
    }

    #[test]
    fn first_comer_wins_until_release() {
        let t0 = Instant::now();
        let mut t = Table::new();
        assert_eq!(t.acquire("a", holder(1, t0)), Acquire::Granted);
        assert_eq!(t.acquire("a", holder(2, t0)), Acquire::NotGranted);
        assert_eq!(t.acquire("a", holder(1, t0)), Acquire::NotGranted);
        assert_eq!(t.holder("a").map(|h| h.conn), Some(ConnId(1)));
        assert!(t.release("a", ConnId(1)));
        assert_eq!(t.holder("a"), None);
        assert_eq!(t.acquire("a", holder(2, t0)), Acquire::Granted);
        assert_eq!(t.holder("a").map(|h| h.conn), Some(ConnId(2)));
    }

    #[test]
    fn names_are_independent_and_case_sensitive() {
        let t0 = Instant::now();
        let mut t = Table::new();
        for (i, name) in ["a", "A", "b", "a-b", "a_b"].into_iter().enumerate() {
            assert_eq!(t.acquire(name, holder(i as u64, t0)), Acquire::Granted);
        }
        assert_eq!(t.held(), 5);
        assert!(t.release("A", ConnId(1)));
        assert_eq!(t.held(), 4);
        assert!(t.holder("a").is_some());
    }

    #[test]
    fn release_by_someone_else_changes_nothing() {
        let t0 = Instant::now();
        let mut t = Table::new();
        t.acquire("a", holder(1, t0));
        assert!(!t.release("a", ConnId(2)));
        assert!(!t.release("b", ConnId(1)));
        assert_eq!(t.holder("a").map(|h| h.conn), Some(ConnId(1)));
        assert!(t.release("a", ConnId(1)));
        // A second release (say, the client sent `release` and then the connection dropped)
        // must not free a lock granted meanwhile to somebody else.
        t.acquire("a", holder(3, t0));
        assert!(!t.release("a", ConnId(1)));
        assert_eq!(t.holder("a").map(|h| h.conn), Some(ConnId(3)));
    }

    #[test]
    fn counters_follow_decisions() {
        let t0 = Instant::now();
        let mut t = Table::new();
        t.acquire("a", holder(1, t0));
        t.acquire("a", holder(2, t0));
        t.acquire("a", holder(3, t0));
        t.release("a", ConnId(2));
        t.release("a", ConnId(1));
        assert_eq!(
            t.counters(),
            Counters {
                acquired: 1,
                not_acquired: 2,
                released: 1
            }
        );
    }

    #[test]
    fn oldest_hold_uses_the_callers_clock() {
        let t0 = Instant::now();
        let mut t = Table::new();
        assert_eq!(t.oldest_hold(t0), None);
        t.acquire("a", holder(1, t0));
        t.acquire("b", holder(2, t0 + Duration::from_secs(5)));
        assert_eq!(
            t.oldest_hold(t0 + Duration::from_secs(7)),
            Some(Duration::from_secs(7))
        );
    }

    /// Every sequence of acquire/release over 3 connections and 2 names, to depth 6, checked
    /// against a model: a name has at most one holder, and only the holder frees it.
    #[test]
    fn exhaustive_against_model() {
        #[derive(Clone, Copy, Debug)]
        enum Op {
            Acquire(u64, usize),
            Release(u64, usize),
        }
        let names = ["x", "y"];
        let mut ops = Vec::new();
        for c in 1..=3 {
            for n in 0..names.len() {
                ops.push(Op::Acquire(c, n));
                ops.push(Op::Release(c, n));
            }
        }
        fn run(seq: &[Op], names: &[&str]) {
            let t0 = Instant::now();
            let mut t = Table::new();
            let mut model: [Option<u64>; 2] = [None, None];
            for &op in seq {
                match op {
                    Op::Acquire(c, n) => {
                        let got = t.acquire(names[n], holder(c, t0));
                        let want = if model[n].is_none() {
                            model[n] = Some(c);
                            Acquire::Granted
                        } else {
                            Acquire::NotGranted
                        };
                        assert_eq!(got, want, "{seq:?}");
                    }
                    Op::Release(c, n) => {
                        let freed = t.release(names[n], ConnId(c));
                        assert_eq!(freed, model[n] == Some(c), "{seq:?}");
                        if freed {
                            model[n] = None;
                        }
                    }
                }
                for (n, name) in names.iter().enumerate() {
                    assert_eq!(t.holder(name).map(|h| h.conn.0), model[n], "{seq:?}");
                }
                assert_eq!(t.held(), model.iter().flatten().count());
            }
        }
        let mut seq = Vec::new();
        fn walk(depth: usize, seq: &mut Vec<Op>, ops: &[Op], names: &[&str]) {
            run(seq, names);
            if depth == 0 {
                return;
            }
            for &op in ops {
                seq.push(op);
                walk(depth - 1, seq, ops, names);
                seq.pop();
            }
        }
        walk(5, &mut seq, &ops, &names);
    }
}
