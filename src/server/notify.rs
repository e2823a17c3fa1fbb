//! Talking to systemd through sd_notify: READY=1 once the listeners are served, a STATUS= line
//! with counts for `systemctl status`, and WATCHDOG=1 keep-alives when the unit sets WatchdogSec.
//!
//! Outside systemd (no NOTIFY_SOCKET) every call is a no-op.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use log::warn;
use sd_notify::NotifyState;

use super::Server;

/// How often STATUS= is refreshed when no watchdog asks for more.
const STATUS_EVERY: Duration = Duration::from_secs(5);

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!("sd_notify failed: {e}");
    }
}

/// Reports readiness, then keeps STATUS= current and the watchdog fed. Never returns.
///
/// The watchdog ping is sent only after taking the lock table's mutex, so a server whose
/// connections are wedged on that lock stops feeding the watchdog and systemd restarts it.
pub fn run(server: Arc<Server>) -> ! {
    send(&[
        NotifyState::Ready,
        NotifyState::Status(&server.status_line()),
    ]);
    let watchdog = sd_notify::watchdog_enabled();
    let every = watchdog.map_or(STATUS_EVERY, |w| (w / 2).min(STATUS_EVERY));
    loop {
        thread::sleep(every);
        let status = server.status_line();
        if watchdog.is_some() {
            send(&[NotifyState::Status(&status), NotifyState::Watchdog]);
        } else {
            send(&[NotifyState::Status(&status)]);
        }
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}
