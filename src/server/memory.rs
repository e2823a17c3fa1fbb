//! Lock state in memory: the default [`Locks`], a pure [`Table`] behind one mutex.
//!
//! Every change to the table goes through [`MemoryLocks`], which keeps three promises the callers
//! would otherwise each have to remember:
//! - the timer thread is woken whenever a change moves the next deadline earlier than the one it
//!   sleeps towards (a waiter granted by a release starts its lease *now*);
//! - no socket I/O happens under the table mutex: decisions are made under it, and carried out
//!   (grant lines, `expired`, `not-granted`) after it is let go;
//! - a grant line reaches its client before anything decided after it ([`Link`]);
//! - what it decides for other connections is counted where it is carried out: the table counts
//!   every decision (for `.stats` and the metrics' totals), and [`MemoryLocks::deliver`] observes
//!   the durations (a waiter's wait, an expired holder's hold) and the holders it finds gone.
//!
//! Connections only say what happened (`lock`, `renew`, `leave`); whatever that means for other
//! connections is told to them here, through their [`Link`]s.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use log::debug;

use super::link::Link;
use super::locks::{Counts, Locks, Unavailable};
use super::tokens::Tokens;
use crate::metrics::{Release, ServerMetrics};
use crate::table::export::Export;
use crate::table::{self, Claim, ConnId, Decision, Event, Left, LockInfo, State, Table};
use tcpnetlock::protocol::Reply;

pub struct MemoryLocks {
    inner: Mutex<Inner>,
    /// Keeps the stored token reservation above every token that goes out.
    tokens: Tokens,
    /// Wakes the timer thread; paired with `inner`.
    timer: Condvar,
    /// `.locks` copies of the table, one at a time: readers that arrive while one is being made
    /// wait for it to end and share the next one (a copy of 9,000 locks holds the table mutex
    /// for milliseconds; eight readers, each with a copy of its own, held it for tens).
    copies: Mutex<Copies>,
    copy_done: Condvar,
    metrics: Arc<ServerMetrics>,
}

struct Inner {
    table: Table<Arc<Link>>,
    /// Where the timer thread is: `None` while it runs, else the deadline it sleeps towards
    /// (`Some(None)`: no deadline, it sleeps until woken).
    timer_sleeps_until: Option<Option<Instant>>,
}

type Events = Vec<Event<Arc<Link>>>;

impl MemoryLocks {
    pub fn new(first_token: u64, tokens: Tokens, metrics: Arc<ServerMetrics>) -> MemoryLocks {
        MemoryLocks {
            tokens,
            metrics,
            inner: Mutex::new(Inner {
                table: Table::new(first_token),
                // Not running until started: nothing to wake, and nothing in its way for a
                // hand-over (see `freeze`).
                timer_sleeps_until: Some(None),
            }),
            timer: Condvar::new(),
            copies: Mutex::new(Copies::default()),
            copy_done: Condvar::new(),
        }
    }

    fn copies(&self) -> MutexGuard<'_, Copies> {
        self.copies.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // Table methods leave it consistent at every return, so a panic elsewhere while the
        // guard was held does not make it unusable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies one change under the mutex, then carries out what it decided.
    fn change<R>(&self, f: impl FnOnce(&mut Table<Arc<Link>>, Instant) -> (R, Events)) -> R {
        let mut inner = self.inner();
        let (result, events) = f(&mut inner.table, Instant::now());
        self.decided(inner, events);
        result
    }

    /// Marks the grants among `events` (so their lines go first), wakes the timer if the next
    /// deadline moved earlier, lets go of the mutex, and tells the connections concerned.
    fn decided(&self, inner: MutexGuard<'_, Inner>, events: Events) {
        let events = self.settle(inner, events);
        self.deliver(events);
    }

    /// [`decided`](MemoryLocks::decided) without the telling.
    fn settle(&self, inner: MutexGuard<'_, Inner>, events: Events) -> Events {
        for event in &events {
            if let Event::Granted { handle, .. } = event {
                handle.grant_decided();
            }
        }
        if let (Some(sleeps_until), Some(next)) =
            (inner.timer_sleeps_until, inner.table.next_deadline())
            && sleeps_until.is_none_or(|at| next < at)
        {
            self.timer.notify_one();
        }
        events
    }

    /// Tells each connection concerned what was decided. A waiter that cannot take its grant is
    /// gone: its place passes on at once (in a loop, not by recursion: a queue of departed
    /// waiters may be long).
    fn deliver(&self, events: Events) {
        self.deliver_with(events, false);
    }

    /// `own_first`: the first event is the requester's own immediate grant, which waited for
    /// nothing and which its connection's thread logs, with its peer.
    fn deliver_with(&self, events: Events, own_first: bool) {
        let mut pending = VecDeque::from(events);
        let mut own = own_first;
        while let Some(event) = pending.pop_front() {
            let own_grant = std::mem::take(&mut own);
            match event {
                Event::Granted {
                    conn,
                    token,
                    waited,
                    handle,
                } => {
                    if !own_grant {
                        self.metrics.granted_after_wait(waited);
                    }
                    // The reservation is stored before the token leaves the server.
                    self.tokens.cover(token);
                    match handle.write_grant(token) {
                        Ok(()) if !own_grant => {
                            debug!("lock {}: granted to a waiter (token {token})", handle.name)
                        }
                        Ok(()) => {}
                        Err(e) => {
                            debug!("lock {}: grant to a departed client ({e})", handle.name);
                            let mut inner = self.inner();
                            let (left, more) =
                                inner.table.leave(&handle.name, conn, Instant::now());
                            pending.extend(self.settle(inner, more));
                            if let Left::Held(held) = left {
                                self.metrics.released(Release::Disconnect, held);
                            }
                        }
                    }
                }
                Event::Expired { held, handle, .. } => {
                    debug!("lock {}: lease expired", handle.name);
                    self.metrics.lease_expired(held);
                    handle.end_with(&Reply::Expired);
                }
                Event::TimedOut { handle, .. } => {
                    debug!("lock {}: wait timed out", handle.name);
                    handle.end_with(&Reply::NotGranted);
                }
            }
        }
    }

    /// The timer thread: expires leases and ends waits when their time comes, sleeping until
    /// the next deadline or until a change makes one sooner.
    fn run_timer(&self) -> ! {
        let mut inner = self.inner();
        inner.timer_sleeps_until = None;
        loop {
            let now = Instant::now();
            let events = inner.table.tick(now);
            if !events.is_empty() {
                self.decided(inner, events);
                inner = self.inner();
                continue;
            }
            let next = inner.table.next_deadline();
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

/// The table held still for a hand-over to the next process: no change, no deadline enforced,
/// no grant written, while this lives (until the process ends, or the hand-over is called off).
pub struct Frozen<'a> {
    inner: MutexGuard<'a, Inner>,
}

impl Frozen<'_> {
    /// The table as plain data, its times counted from `now`.
    pub fn export(&self, now: Instant) -> Export {
        self.inner.table.export(now)
    }
}

impl MemoryLocks {
    /// Holds the table still (see [`Frozen`]) once every decision made is told: the connections'
    /// threads must be at rest already (they tell their own), and this waits for the timer
    /// thread to be asleep, not between a decision and telling it.
    pub fn freeze(&self) -> Frozen<'_> {
        loop {
            let inner = self.inner();
            if inner.timer_sleeps_until.is_some() {
                return Frozen { inner };
            }
            drop(inner);
            thread::sleep(Duration::from_micros(200));
        }
    }

    /// Takes over the table the previous process exported (times counted from `at`, on this
    /// process's clock), with a [`Link`] for each of its connections. Call it before
    /// [`Locks::start`]. Grants continue from this process's own first token or the handed one,
    /// whichever is higher. A state that breaks a rule of the table is refused with the reason,
    /// and the table is left as it was (empty).
    pub fn restore(
        &self,
        export: &Export,
        at: Instant,
        links: &HashMap<ConnId, Arc<Link>>,
    ) -> Result<(), String> {
        let mut inner = self.inner();
        let first = inner.table.next_token();
        let table = Table::restore(export, at, first, |conn| links.get(&conn).cloned())?;
        inner.table = table;
        Ok(())
    }
}

/// Whether a `.locks` copy is being made, and the readers waiting for the next one.
#[derive(Default)]
struct Copies {
    running: bool,
    next: Option<Arc<OnceLock<Vec<LockInfo>>>>,
}

/// Ends a `.locks` copy however it ends (a panic included): its readers get an answer (an empty
/// one, if the copy failed), and the readers waiting for the next copy are woken.
struct CopyDone<'a> {
    locks: &'a MemoryLocks,
    copy: &'a OnceLock<Vec<LockInfo>>,
}

impl Drop for CopyDone<'_> {
    fn drop(&mut self) {
        let _ = self.copy.set(Vec::new());
        self.locks.copies().running = false;
        self.locks.copy_done.notify_all();
    }
}

impl Locks for MemoryLocks {
    fn lock(&self, name: &str, req: Claim<Arc<Link>>) -> Result<Decision, Unavailable> {
        let handle = Arc::clone(&req.handle);
        let conn = req.conn;
        let mut inner = self.inner();
        let decision = inner.table.lock(name, req, Instant::now());
        let granted = match decision {
            Decision::Granted { token } => vec![Event::Granted {
                conn,
                token,
                waited: Duration::ZERO,
                handle,
            }],
            _ => Vec::new(),
        };
        let granted = self.settle(inner, granted);
        // The connection's own thread logs its grant, with its peer.
        self.deliver_with(granted, true);
        Ok(decision)
    }

    fn renew(&self, name: &str, conn: ConnId) -> State {
        // Renewing only moves a deadline later: the timer need not hear of it.
        self.inner().table.activity(name, conn, Instant::now())
    }

    fn state(&self, name: &str, conn: ConnId) -> State {
        self.inner().table.state(name, conn)
    }

    fn leave(&self, name: &str, conn: ConnId) -> Left {
        self.change(|table, now| table.leave(name, conn, now))
    }

    fn snapshot(&self) -> Vec<LockInfo> {
        let mut c = self.copies();
        // The group of readers waiting for the next copy: it is taken after they all arrived,
        // so each sees the table as it was after its own request.
        let mine = Arc::clone(c.next.get_or_insert_with(Default::default));
        loop {
            if let Some(locks) = mine.get() {
                return locks.clone();
            }
            if !c.running && c.next.as_ref().is_some_and(|n| Arc::ptr_eq(n, &mine)) {
                c.running = true;
                c.next = None;
                drop(c);
                let done = CopyDone {
                    locks: self,
                    copy: &mine,
                };
                // Copied under the table mutex; sorted after it.
                let mut locks = self.inner().table.snapshot_unsorted(Instant::now());
                table::sort_snapshot(&mut locks);
                let _ = mine.set(locks);
                drop(done);
                c = self.copies();
                continue;
            }
            c = self
                .copy_done
                .wait(c)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn counts(&self) -> Counts {
        let inner = self.inner();
        let t = &inner.table;
        Counts {
            held: t.held(),
            holders: t.holders(),
            waiting: t.waiting(),
            counters: t.counters(),
        }
    }

    fn start(self: Arc<Self>) -> io::Result<()> {
        thread::Builder::new()
            .name("tcpnetlock-timer".into())
            .spawn(move || self.run_timer())?;
        Ok(())
    }
}
