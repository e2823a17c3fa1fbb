//! The client's side of a lease: until when the server is certain to keep it.
//!
//! TCP keepalive cannot see a path that stalls while both ends stay up (a NAT or a tunnel that
//! stops forwarding but still acknowledges), so a lease also runs on a clock of the client's
//! own: the lock counts as lost once no renewal has been answered for the ttl less a margin,
//! counted from when the last answered renewal was *sent*. The server renews a lease when it
//! reads a request, never earlier than we sent it, so the client's deadline always falls before
//! the server's (docs/PROTOCOL.md, "The client's lease clock").

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The smallest lease margin (see [`lease_margin`]).
const MIN_LEASE_MARGIN: Duration = Duration::from_millis(50);

/// How much earlier than the server a client counts a lease of `ttl` as gone: a tenth of the
/// ttl, at least 50 ms and at most a fifth of the ttl (three renewals, a quarter of the ttl
/// apart, always fit before the client's deadline). It is the time the holder has to act
/// (wake up on a busy machine, signal its command) between giving the lock up and the earliest
/// moment the server can grant it elsewhere.
///
/// ```
/// use std::time::Duration;
/// use tcpnetlock::client::lease_margin;
///
/// assert_eq!(lease_margin(Duration::from_secs(30)), Duration::from_secs(3));
/// assert_eq!(lease_margin(Duration::from_millis(300)), Duration::from_millis(50));
/// ```
pub fn lease_margin(ttl: Duration) -> Duration {
    (ttl / 10).max(MIN_LEASE_MARGIN).min(ttl / 5)
}

/// How often a held lock's connection carries a renewal, if at all: every quarter of the ttl,
/// so that three fit in the lease clock's window (ttl less at most a fifth) and one answered
/// late or lost does not lose the lock; or every `every` when asked, whichever is sooner. Never
/// more often than every 10 ms.
pub(super) fn renewal_interval(ttl: Option<Duration>, every: Option<Duration>) -> Option<Duration> {
    let for_ttl = ttl.map(|t| t / 4);
    match (every, for_ttl) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
    .map(|d| d.max(Duration::from_millis(10)))
}

/// The send times of renewals and what they prove.
///
/// Answers come in the order of the requests, so the send times wait in a queue and each
/// `alive` takes the oldest.
///
/// Times are since boot (`CLOCK_BOOTTIME`): monotonic like `Instant`, but counting time the
/// machine spent suspended, as the server's clock does.
#[derive(Debug)]
pub(super) struct LeaseClock {
    ttl: Duration,
    /// Send times of renewals not answered yet, oldest first.
    unanswered: VecDeque<Duration>,
    /// Send time of the newest answered renewal; at first, of the `lock` request.
    pub(super) confirmed: Duration,
}

impl LeaseClock {
    pub(super) fn new(ttl: Duration, request_sent: Duration) -> LeaseClock {
        LeaseClock {
            ttl,
            unanswered: VecDeque::new(),
            confirmed: request_sent,
        }
    }

    pub(super) fn now() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec we own. CLOCK_BOOTTIME exists since Linux
        // 2.6.39 and cannot fail with a valid pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// How long after an answered renewal the client still counts the lease as its own.
    pub(super) fn window(&self) -> Duration {
        self.ttl - lease_margin(self.ttl)
    }

    fn deadline(&self) -> Duration {
        self.confirmed + self.window()
    }

    /// The deadline on the `Instant` clock, for `poll` and condition-variable timeouts.
    pub(super) fn deadline_instant(&self) -> Instant {
        Instant::now() + self.deadline().saturating_sub(LeaseClock::now())
    }

    pub(super) fn sent(&mut self, at: Duration) {
        self.unanswered.push_back(at);
    }

    /// An `alive` came. One the client did not ask for (a broken server) proves nothing.
    pub(super) fn answered(&mut self) {
        if let Some(sent) = self.unanswered.pop_front() {
            self.confirmed = self.confirmed.max(sent);
        }
    }

    pub(super) fn expired(&self) -> bool {
        LeaseClock::now() >= self.deadline()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_intervals() {
        let s = Duration::from_secs;
        assert_eq!(renewal_interval(None, None), None);
        assert_eq!(
            renewal_interval(Some(s(30)), None),
            Some(Duration::from_millis(7500))
        );
        assert_eq!(
            renewal_interval(Some(s(30)), Some(s(15))),
            Some(Duration::from_millis(7500))
        );
        assert_eq!(renewal_interval(None, Some(s(15))), Some(s(15)));
        assert_eq!(
            renewal_interval(None, Some(Duration::from_millis(1))),
            Some(Duration::from_millis(10))
        );
    }

    #[test]
    fn lease_margins() {
        let ms = Duration::from_millis;
        assert_eq!(lease_margin(Duration::from_secs(2)), ms(200));
        assert_eq!(
            lease_margin(Duration::from_secs(60)),
            Duration::from_secs(6)
        );
        // At least 50 ms, at most a fifth.
        assert_eq!(lease_margin(ms(300)), ms(50));
        assert_eq!(lease_margin(ms(100)), ms(20));
        // Three renewals fit the window, whatever the ttl.
        for ttl in [ms(1), ms(100), ms(300), ms(2000), Duration::from_secs(600)] {
            let every = renewal_interval(Some(ttl), None).unwrap();
            let window = ttl - lease_margin(ttl);
            assert!(ttl < ms(40) || every * 3 < window, "{ttl:?}");
        }
    }

    #[test]
    fn the_lease_counts_from_the_send_time_of_the_last_answered_renewal() {
        let s = Duration::from_secs;
        let mut lease = LeaseClock::new(s(10), s(100));
        assert_eq!(lease.deadline(), s(109));
        lease.sent(s(102));
        lease.sent(s(105));
        lease.answered();
        assert_eq!(lease.deadline(), s(111));
        lease.answered();
        assert_eq!(lease.deadline(), s(114));
        // An answer nobody asked for proves nothing.
        lease.answered();
        assert_eq!(lease.deadline(), s(114));
    }
}
