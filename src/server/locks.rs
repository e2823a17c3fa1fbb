//! The seam between connections and lock state.
//!
//! A connection says what happened — it asks for a lock, sends a request, goes away — and never
//! sees how the state is kept: in memory ([`super::memory::MemoryLocks`], the default), or in a
//! store shared by several servers, where a grant arrives from a watch rather than from another
//! connection's release. Whatever a change means for *other* connections (a waiter granted, a
//! lease expired) the implementation tells them itself, through their [`Link`]s, from whichever
//! thread it learns it on.
//!
//! Every implementation keeps the same promises: a grant line reaches its client before anything
//! decided after it; nothing is written to a socket while state is locked; deadlines (leases,
//! waits) are enforced on time, however they moved.
//!
//! And counts the same way: every decision in [`Locks::counts`] (`.stats` and the metrics' totals
//! read it), and in the server's [`ServerMetrics`](crate::metrics::ServerMetrics) what only it
//! sees happen: how long each waiter granted had waited, how long each expired holder had held,
//! and each holder it finds gone while handing it a grant (a release by disconnect). The
//! connection counts its own release, since only it knows how it let go.

use std::io;
use std::sync::Arc;

use super::link::Link;
use crate::table::{Claim, ConnId, Counters, Decision, Left, LockInfo, State};
use tcpnetlock::status::Cluster;

pub trait Locks: Send + Sync {
    /// Grants, queues or refuses `req` for `name`. When it returns, a grant's line has been
    /// written through `req.handle` (or the client was found gone and the lock passed on); a
    /// queued request is told later, through the same handle: its grant, or `not-granted` when
    /// its wait runs out. `Unavailable` (a store that cannot be reached) grants nothing: the
    /// client is told why.
    fn lock(&self, name: &str, req: Claim<Arc<Link>>) -> Result<Decision, Unavailable>;

    /// The connection sent a request: a holder's lease starts over. Returns where it stands.
    fn renew(&self, name: &str, conn: ConnId) -> State;

    /// Where the connection stands.
    fn state(&self, name: &str, conn: ConnId) -> State;

    /// The connection releases, cancels its wait, or is gone; its place passes on. Returns where
    /// it stood and for how long. Safe to call twice, or after the connection was expired.
    fn leave(&self, name: &str, conn: ConnId) -> Left;

    /// Every held name, sorted, with its holders (longest held first).
    fn snapshot(&self) -> Vec<LockInfo>;

    /// What `.stats` and the status line report.
    fn counts(&self) -> Counts;

    /// Starts what runs beside the connections (the timer that enforces deadlines).
    fn start(self: Arc<Self>) -> io::Result<()>;

    /// A cluster member's state and view of the cluster (`.info`, `.stats`, `.ping,serving:1`,
    /// the systemd status); `None` for lock state kept in this process alone.
    fn cluster(&self) -> Option<Cluster> {
        None
    }
}

/// Why lock state cannot be changed now; the client gets `err,<message>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String);

/// What `.stats` and the status line report of the lock state.
#[derive(Debug, Clone, Copy)]
pub struct Counts {
    /// Names with at least one holder.
    pub held: usize,
    pub holders: usize,
    pub waiting: usize,
    pub counters: Counters,
}
