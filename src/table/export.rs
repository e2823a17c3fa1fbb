//! The table as plain data, for handing it to the next server process (server::handover): every
//! name with its holders and its queue in order, the next token and the totals, with every point
//! in time turned into a duration from one moment (`now` of [`Table::export`]). The next process
//! turns them back into its own instants from the same moment ([`Table::restore`]'s `at`), so a
//! lease or a wait keeps exactly the time it had left, and a holder its time held.
//!
//! Pure, as the rest of the table: no socket, no clock. Restoring checks what it is given rather
//! than trusting it, so a state that would break a rule of the table (two holders of a mutex, a
//! connection in two places) is refused with the reason, never turned into a broken table.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{ConnId, Counters, Entry, Holder, Table, Waiter};

/// The whole table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// The token of the next grant.
    pub next_token: u64,
    pub counters: Counters,
    /// Sorted by name.
    pub names: Vec<NameExport>,
}

/// One name that has holders or waiters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameExport {
    pub name: Arc<str>,
    pub max: u32,
    /// In grant order (by token).
    pub holders: Vec<HolderExport>,
    /// In queue order: the first is granted next.
    pub waiters: Vec<WaiterExport>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderExport {
    pub conn: ConnId,
    pub client_id: Option<Arc<str>>,
    pub peer: Option<SocketAddr>,
    pub token: u64,
    pub ttl: Option<Duration>,
    pub shared: bool,
    pub held_for: Duration,
    /// When the lease runs out (holders with a ttl), in nanoseconds from the export's moment:
    /// negative when it is past and the timer has not got to it yet, so that deadlines passed
    /// together are still handled in their order.
    pub lease_due_ns: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaiterExport {
    pub conn: ConnId,
    pub client_id: Option<Arc<str>>,
    pub peer: Option<SocketAddr>,
    pub ttl: Option<Duration>,
    pub shared: bool,
    pub waited: Duration,
    /// When the wait runs out, as [`HolderExport::lease_due_ns`].
    pub wait_due_ns: i64,
}

impl<H: Clone> Table<H> {
    /// The table as it stands at `now`.
    pub fn export(&self, now: Instant) -> Export {
        let mut names: Vec<NameExport> = self
            .names
            .iter()
            .map(|(name, e)| {
                let mut holders: Vec<HolderExport> = e
                    .holders
                    .iter()
                    .map(|(&conn, h)| HolderExport {
                        conn,
                        client_id: h.client_id.clone(),
                        peer: h.peer,
                        token: h.token,
                        ttl: h.ttl,
                        shared: h.shared,
                        held_for: now.saturating_duration_since(h.since),
                        lease_due_ns: self.due.get(&conn).map(|&at| offset(at, now)),
                    })
                    .collect();
                holders.sort_unstable_by_key(|h| h.token);
                NameExport {
                    name: Arc::clone(name),
                    max: e.max,
                    holders,
                    waiters: e
                        .queue
                        .values()
                        .map(|w| WaiterExport {
                            conn: w.conn,
                            client_id: w.client_id.clone(),
                            peer: w.peer,
                            ttl: w.ttl,
                            shared: w.shared,
                            waited: now.saturating_duration_since(w.since),
                            wait_due_ns: offset(w.deadline, now),
                        })
                        .collect(),
                }
            })
            .collect();
        names.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        Export {
            next_token: self.next_token,
            counters: self.counters,
            names,
        }
    }

    /// The table `export` describes, as of `at` (the moment its durations count from, on this
    /// process's clock). Grants continue from `first_token` or the exported next token,
    /// whichever is higher, so tokens keep growing whatever either process chose. `handle` gives
    /// each connection's handle; a connection without one, or a state that breaks a rule of the
    /// table, is refused with the reason.
    pub fn restore(
        export: &Export,
        at: Instant,
        first_token: u64,
        mut handle: impl FnMut(ConnId) -> Option<H>,
    ) -> Result<Table<H>, String> {
        let mut table = Table::new(first_token.max(export.next_token));
        table.counters = export.counters;
        let mut seen = HashSet::new();
        let mut tokens = HashSet::new();
        let mut handle_of = |conn: ConnId, name: &str| {
            if !seen.insert(conn) {
                return Err(format!(
                    "connection {} appears twice (last on {name:?})",
                    conn.0
                ));
            }
            handle(conn).ok_or_else(|| {
                format!(
                    "connection {} (on {name:?}) did not come with the state",
                    conn.0
                )
            })
        };
        let before = |d: Duration| at.checked_sub(d).unwrap_or(at);
        for n in &export.names {
            let name: &str = &n.name;
            if n.max == 0 {
                return Err(format!("{name:?} has max 0"));
            }
            if n.holders.is_empty() && n.waiters.is_empty() {
                return Err(format!("{name:?} has neither holders nor waiters"));
            }
            if table.names.contains_key(name) {
                return Err(format!("{name:?} appears twice"));
            }
            let mut entry: Entry<H> = Entry::new(n.max);
            let mut dues = Vec::new();
            for h in &n.holders {
                let handle = handle_of(h.conn, name)?;
                if h.token >= table.next_token || !tokens.insert(h.token) {
                    return Err(format!(
                        "{name:?}: token {} is not below the next token {} or not unique",
                        h.token, table.next_token
                    ));
                }
                if let Some(due) = h.lease_due_ns {
                    dues.push((h.conn, instant(at, due)));
                }
                entry.insert_holder(
                    h.conn,
                    Holder {
                        client_id: h.client_id.clone(),
                        peer: h.peer,
                        since: before(h.held_for),
                        token: h.token,
                        ttl: h.ttl,
                        shared: h.shared,
                        handle,
                    },
                );
            }
            let shared = entry.holders.len() - entry.exclusive;
            if shared > 0 && entry.exclusive > 0 {
                return Err(format!("{name:?} is held shared and exclusive at once"));
            }
            if entry.exclusive > n.max as usize {
                return Err(format!(
                    "{name:?} has {} exclusive holders, max {}",
                    entry.exclusive, n.max
                ));
            }
            for w in &n.waiters {
                let handle = handle_of(w.conn, name)?;
                let arrival = table.next_arrival;
                table.next_arrival += 1;
                entry.arrivals.insert(w.conn, arrival);
                entry.queue.insert(
                    arrival,
                    Waiter {
                        conn: w.conn,
                        client_id: w.client_id.clone(),
                        peer: w.peer,
                        since: before(w.waited),
                        deadline: instant(at, w.wait_due_ns),
                        ttl: w.ttl,
                        shared: w.shared,
                        handle,
                    },
                );
                dues.push((w.conn, instant(at, w.wait_due_ns)));
            }
            if entry.front_has_room() {
                return Err(format!(
                    "{name:?}: the first waiter could hold, yet it waits"
                ));
            }
            table.held += usize::from(!entry.holders.is_empty());
            table.holders += entry.holders.len();
            table.waiting += entry.queue.len();
            table.names.insert(Arc::clone(&n.name), entry);
            for (conn, due) in dues {
                table.set_due(name, conn, due);
            }
        }
        Ok(table)
    }
}

/// `t` in nanoseconds from `now`, negative when before it (saturating at ±292 years).
fn offset(t: Instant, now: Instant) -> i64 {
    match t.checked_duration_since(now) {
        Some(after) => i64::try_from(after.as_nanos()).unwrap_or(i64::MAX),
        None => i64::try_from(now.duration_since(t).as_nanos()).map_or(i64::MIN, |n| -n),
    }
}

/// The instant `ns` nanoseconds from `at` (see [`offset`]); `at` itself if that is not a time
/// this clock can tell (before it started, or centuries away).
fn instant(at: Instant, ns: i64) -> Instant {
    let d = Duration::from_nanos(ns.unsigned_abs());
    let t = if ns >= 0 {
        at.checked_add(d)
    } else {
        at.checked_sub(d)
    };
    t.unwrap_or(at)
}
