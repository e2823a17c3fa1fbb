//! What the server reports about itself: `.stats` and `.locks` (0.1.8's keys first, then what
//! an operator needs), the Prometheus metrics, and the one line `systemctl status` shows. The
//! metrics and `.stats` read the same counts, so they always agree.

use std::sync::atomic::Ordering;

use tcpnetlock::status::{HolderInfo, Info, LockInfo, Locks, Mode, Stats, WaiterInfo};

use super::{Server, locks};
use crate::metrics::{Gauges, Totals};

impl Server {
    /// `.stats`: 0.1.8's keys first, then what an operator needs.
    pub fn stats_json(&self) -> String {
        let locks::Counts {
            held,
            holders,
            waiting,
            counters: c,
        } = self.locks.counts();
        let (threads, idle) = self.pool.size();
        let mut s = Stats::default();
        s.requests_count = Some(self.requests.load(Ordering::Relaxed));
        s.lock_acquired_count = Some(c.acquired);
        s.lock_not_acquired_count = Some(c.not_acquired);
        s.maxrss = Some(maxrss_kib());
        s.locks_held = Some(held as u64);
        s.holders = Some(holders as u64);
        s.waiting = Some(waiting as u64);
        s.lock_released_count = Some(c.released);
        s.granted_after_wait_count = Some(c.granted_after_wait);
        s.wait_timeout_count = Some(c.wait_timeouts);
        s.lease_expired_count = Some(c.expired);
        s.max_mismatch_count = Some(c.max_mismatches);
        s.connections = Some(self.open.load(Ordering::Relaxed) as u64);
        s.threads = Some(threads as u64);
        s.threads_idle = Some(idle as u64);
        s.uptime_secs = Some(self.started.elapsed().as_secs_f64());
        s.log_lines_dropped = Some(crate::log::dropped());
        s.version = Some(env!("CARGO_PKG_VERSION").to_owned());
        s.shared_granted_count = Some(c.shared_acquired);
        s.cluster = self.locks.cluster();
        let mut json = String::with_capacity(720);
        s.write_json(&mut json);
        json
    }

    /// `GET /metrics`: the Prometheus text.
    pub fn metrics_text(&self) -> String {
        let locks::Counts {
            held,
            holders,
            waiting,
            counters: c,
        } = self.locks.counts();
        let (threads, idle) = self.pool.size();
        let totals = Totals {
            accepted: self.requests.load(Ordering::Relaxed),
            granted_immediately: c.acquired - c.granted_after_wait,
            granted_after_wait: c.granted_after_wait,
            granted_shared: c.shared_acquired,
            // The table's refusals include the waits that ran out; the metric is of refusals
            // at once.
            not_granted: c.not_acquired - c.wait_timeouts,
            max_mismatches: c.max_mismatches,
            wait_timeouts: c.wait_timeouts,
            lease_expiries: c.expired,
            log_lines_dropped: crate::log::dropped(),
        };
        let gauges = Gauges {
            locks_held: held as u64,
            holders: holders as u64,
            waiters: waiting as u64,
            connections: self.open.load(Ordering::Relaxed) as u64,
            threads: threads as u64,
            threads_idle: idle as u64,
        };
        self.metrics.render(&totals, &gauges)
    }

    /// `.locks`: every held name, sorted, with its holders (longest held first) and its waiters
    /// in queue order.
    pub fn locks_json(&self) -> String {
        let mode = |shared| {
            if shared {
                Mode::Shared
            } else {
                Mode::Exclusive
            }
        };
        let locks: Locks = self
            .locks
            .snapshot()
            .into_iter()
            .map(|l| {
                let mut lock = LockInfo::new(&*l.name);
                lock.max = Some(l.max);
                lock.waiting = Some(l.waiters.len() as u64);
                lock.holders = l
                    .holders
                    .into_iter()
                    .map(|h| {
                        let mut holder = HolderInfo::default();
                        holder.client_id = h.client_id.as_deref().map(str::to_owned);
                        holder.peer = h.peer.map(|p| p.to_string());
                        holder.held_secs = Some(h.held_for.as_secs_f64());
                        holder.token = Some(h.token);
                        holder.ttl_secs = h.ttl.map(|t| t.as_secs_f64());
                        holder.mode = Some(mode(h.shared));
                        holder.server = h.server.as_deref().map(str::to_owned);
                        holder
                    })
                    .collect();
                lock.waiters = l
                    .waiters
                    .into_iter()
                    .map(|w| {
                        let mut waiter = WaiterInfo::default();
                        waiter.client_id = w.client_id.as_deref().map(str::to_owned);
                        waiter.peer = w.peer.map(|p| p.to_string());
                        waiter.waited_secs = Some(w.waited.as_secs_f64());
                        waiter.left_secs = Some(w.left.as_secs_f64());
                        waiter.mode = Some(mode(w.shared));
                        waiter.server = w.server.as_deref().map(str::to_owned);
                        waiter
                    })
                    .collect();
                lock
            })
            .collect();
        let mut json = String::with_capacity(64 + 160 * locks.len());
        locks.write_json(&mut json);
        json
    }

    /// `.info`: what a client may want to know before asking for a lock.
    pub fn info_json(&self) -> String {
        let mut info = Info::default();
        info.version = Some(env!("CARGO_PKG_VERSION").to_owned());
        info.cluster = self.locks.cluster();
        let mut json = String::with_capacity(256);
        info.write_json(&mut json);
        json
    }

    /// One line for `systemctl status`. A cluster member that cannot serve says so first.
    pub fn status_line(&self) -> String {
        let locks::Counts { held, waiting, .. } = self.locks.counts();
        let not_serving = match self.locks.cluster() {
            Some(c) if c.serving != Some(true) => format!(
                "NOT SERVING LOCKS ({}); ",
                c.reason.as_deref().unwrap_or("no etcd lease")
            ),
            _ => String::new(),
        };
        format!(
            "{not_serving}{held} locks held, {waiting} waiting, {} connections open, {} accepted \
             since start",
            self.open.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed)
        )
    }
}

/// The server's own peak resident set size in KiB: VmHWM, from /proc/self/status.
///
/// Not `ru_maxrss`, which 0.1.8 reported: Linux carries it across exec, so a server started by a
/// launcher that once used 200 MB reported that launcher's peak. Without /proc, `ru_maxrss` is
/// the fallback: never less than the truth.
fn maxrss_kib() -> u64 {
    let hwm = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
            line["VmHWM:".len()..]
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        });
    if let Some(kib) = hwm {
        return kib;
    }
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct we own; on failure we report 0.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } != 0 {
        return 0;
    }
    // SAFETY: getrusage succeeded, so the struct is initialised.
    u64::try_from(unsafe { usage.assume_init() }.ru_maxrss).unwrap_or(0)
}
