//! What the server reports about itself: `.stats` and `.locks` (0.1.8's keys first, then what
//! an operator needs) and the one line `systemctl status` shows.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use super::{Server, locks};

impl Server {
    /// `.stats`: 0.1.8's keys first, then what an operator needs.
    pub fn stats_json(&self) -> String {
        let locks::Counts {
            held,
            holders,
            waiting,
            counters: c,
            ..
        } = self.locks.counts();
        let (threads, idle) = self.pool.size();
        let mut json = String::with_capacity(640);
        let _ = write!(
            json,
            "{{\"requests_count\": {}, \"lock_acquired_count\": {}, \
             \"lock_not_acquired_count\": {}, \"lock_count\": {held}, \"maxrss\": {}, \
             \"locks_held\": {held}, \"holders\": {holders}, \"waiting\": {waiting}, \
             \"lock_released_count\": {}, \"granted_after_wait_count\": {}, \
             \"wait_timeout_count\": {}, \"lease_expired_count\": {}, \
             \"max_mismatch_count\": {}, \"connections\": {}, \
             \"threads\": {threads}, \"threads_idle\": {idle}, \"uptime_secs\": {:.3}, \
             \"log_lines_dropped\": {}, \"version\": \"{}\"}}",
            self.requests.load(Ordering::Relaxed),
            c.acquired,
            c.not_acquired,
            maxrss_kib(),
            c.released,
            c.granted_after_wait,
            c.wait_timeouts,
            c.expired,
            c.max_mismatches,
            self.open.load(Ordering::Relaxed),
            self.started.elapsed().as_secs_f64(),
            crate::log::dropped(),
            env!("CARGO_PKG_VERSION"),
        );
        json
    }

    /// `.locks`: every held name with its holders and queue length, sorted by name.
    pub fn locks_json(&self) -> String {
        let locks = self.locks.snapshot();
        let mut json = String::from("{");
        for (i, lock) in locks.iter().enumerate() {
            if i > 0 {
                json.push_str(", ");
            }
            // Names, client-ids and addresses are from restricted alphabets: no escaping needed.
            let _ = write!(
                json,
                "\"{}\": {{\"max\": {}, \"waiting\": {}, \"holders\": [",
                lock.name,
                lock.max,
                lock.waiters.len()
            );
            for (j, h) in lock.holders.iter().enumerate() {
                if j > 0 {
                    json.push_str(", ");
                }
                let quoted = |v: Option<String>| v.map_or("null".into(), |v| format!("\"{v}\""));
                let _ = write!(
                    json,
                    "{{\"client_id\": {}, \"peer\": {}, \"held_secs\": {:.3}, \"token\": {}, \
                     \"ttl_secs\": {}}}",
                    quoted(h.client_id.as_deref().map(str::to_owned)),
                    quoted(h.peer.map(|p| p.to_string())),
                    h.held_for.as_secs_f64(),
                    h.token,
                    h.ttl
                        .map_or("null".into(), |t| format!("{:.3}", t.as_secs_f64())),
                );
            }
            json.push_str("]}");
        }
        json.push('}');
        json
    }

    /// One line for `systemctl status`.
    pub fn status_line(&self) -> String {
        let locks::Counts { held, waiting, .. } = self.locks.counts();
        format!(
            "{held} locks held, {waiting} waiting, {} connections open, {} accepted since start",
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
fn maxrss_kib() -> i64 {
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
    unsafe { usage.assume_init() }.ru_maxrss
}
