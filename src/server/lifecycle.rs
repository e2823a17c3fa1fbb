//! The main thread once the server runs: it tells systemd how the server is doing through
//! sd_notify (READY=1 once the listeners are served, a STATUS= line with counts for
//! `systemctl status`, WATCHDOG=1 keep-alives when the unit sets WatchdogSec, STOPPING=1), and it
//! takes the signals that stop the server.
//!
//! SIGTERM, SIGINT, SIGHUP and SIGUSR2 are blocked in every thread ([`block_signals`] runs
//! before any thread starts; threads inherit the mask) and taken here by `sigtimedwait`, which is
//! also the pause between status reports. So no handler runs at an arbitrary point of a worker,
//! and the stop is logged, flushed and announced to systemd from one ordinary thread:
//!
//! - SIGTERM under systemd (systemd's stop, and the first half of a restart): every connection
//!   and the lock state go to the unit's file descriptor store for the next process
//!   ([`handover`]), then the process exits 0. On a restart the next process
//!   takes them over and the clients see nothing; on a stop systemd closes them.
//! - SIGTERM outside systemd, and SIGINT (Ctrl-C): log why, STOPPING=1, then exit, which closes
//!   every connection (each client sees end of file; every lock is released with it). Exit status
//!   0 for SIGTERM, an orderly stop as systemd expects; SIGINT is raised again once the log is
//!   written, so a shell sees an interrupted process and stops its script too.
//! - SIGUSR2 (and `systemctl reload`): the server re-executes its own file, perhaps a new
//!   version, keeping every connection ([`handover`]).
//! - SIGHUP is logged and ignored: there is no configuration file to reload and no log file to
//!   reopen, and a server started from a terminal must survive that terminal closing.
//!
//! One more signal is the workers' own: the hand-over wakes them with it (see
//! [`handover::rest`]); it stays unblocked, with a handler that does
//! nothing.
//!
//! Outside systemd (no NOTIFY_SOCKET) the sd_notify calls are no-ops.

use std::io;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use log::{info, warn};
use sd_notify::NotifyState;

use super::{Server, handover};

/// How often STATUS= is refreshed when no watchdog asks for more.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// The signals the main thread takes; see the module docs.
const SIGNALS: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR2];

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!("sd_notify failed: {e}");
    }
}

/// The signals [`run`] takes: [`SIGNALS`] less those the server was started with ignored.
static TAKEN: OnceLock<libc::sigset_t> = OnceLock::new();

fn set_of(signals: impl IntoIterator<Item = libc::c_int>) -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset only writes into it.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        for s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

fn ignored(signal: libc::c_int) -> bool {
    // SAFETY: sigaction with a null new action only reads the current one into ours.
    unsafe {
        let mut old = std::mem::zeroed::<libc::sigaction>();
        libc::sigaction(signal, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}

/// Blocks the signals [`run`] takes, in the calling thread and every thread it starts later.
/// Call it before starting any thread: a thread that left them unblocked would take them and
/// die of them, with nothing logged.
///
/// A signal the server was started with ignored stays ignored (a blocked signal is queued even
/// when ignored, so it would otherwise be taken): a shell runs a script's background commands,
/// and nohup its command, with SIGINT or SIGHUP ignored so that Ctrl-C or a closing terminal
/// does not reach them.
///
/// Also installs the hand-over's wake-up handler, which every thread inherits too.
pub fn block_signals() -> io::Result<()> {
    let set = *TAKEN.get_or_init(|| set_of(SIGNALS.into_iter().filter(|&s| !ignored(s))));
    // SAFETY: `set` is a valid, initialised sigset_t owned by this frame.
    match unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) } {
        0 => handover::rest::install_wake_handler(),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// The next of [`SIGNALS`] to arrive before `until`; None once `until` has passed.
fn next_signal(until: Instant) -> Option<libc::c_int> {
    let Some(set) = TAKEN.get() else {
        std::thread::sleep(until.saturating_duration_since(Instant::now()));
        return None;
    };
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let timeout = libc::timespec {
            // Inferred `time_t` (deprecated by name on musl); i32::MAX s fits either width.
            tv_sec: left
                .as_secs()
                .min(i32::MAX as u64)
                .try_into()
                .unwrap_or(i32::MAX.into()),
            tv_nsec: left.subsec_nanos().into(),
        };
        // SAFETY: valid set and timespec owned by this frame; the siginfo is not asked for.
        let n = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &timeout) };
        if n > 0 {
            return Some(n);
        }
        // EAGAIN (the time is up: checked above) or EINTR (a signal we do not take).
    }
}

/// Reports readiness, then keeps STATUS= current and the watchdog fed until SIGTERM or SIGINT
/// stops the process. Never returns.
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
    let mut next = Instant::now() + every;
    loop {
        match next_signal(next) {
            Some(libc::SIGHUP) => {
                info!("SIGHUP ignored: there is no configuration or log file to reopen");
                continue;
            }
            Some(libc::SIGUSR2) => {
                // Returns only if the server was not re-executed.
                handover::by_exec(&server, handover::monotonic_ns());
                continue;
            }
            Some(libc::SIGTERM) if handover::to_store_on_sigterm(&server) => {
                // Returns only if nothing was handed over.
                handover::to_systemd(&server, handover::monotonic_ns());
                stop(&server, libc::SIGTERM)
            }
            Some(signal) => stop(&server, signal),
            None => {}
        }
        next = Instant::now() + every;
        let status = server.status_line();
        if watchdog.is_some() {
            send(&[NotifyState::Status(&status), NotifyState::Watchdog]);
        } else {
            send(&[NotifyState::Status(&status)]);
        }
    }
}

/// Ends the process on SIGTERM or SIGINT; see the module docs.
fn stop(server: &Server, signal: libc::c_int) -> ! {
    let name = if signal == libc::SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    };
    info!(
        "stopping on {name}: closing every connection ({})",
        server.status_line()
    );
    send(&[
        NotifyState::Stopping,
        NotifyState::Status(&format!("stopping on {name}")),
    ]);
    log::logger().flush();
    if signal == libc::SIGINT {
        let set = set_of([libc::SIGINT]);
        // SAFETY: plain system calls on a set owned by this frame. The signal's action is still
        // the default one (only its mask was changed), so once unblocked it ends the process;
        // except as PID 1 (a container), where the kernel ignores it and the exit below runs.
        unsafe {
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::raise(libc::SIGINT);
        }
    }
    std::process::exit(0)
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// STOPPING=1 with a STATUS= line saying why.
pub fn stopping_with(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// A re-exec starts: systemd shows the unit reloading until READY=1 (from the new program, or
/// [`ready_again`] if it did not happen).
pub fn reloading() {
    send(&[
        NotifyState::Reloading,
        NotifyState::Custom(&format!(
            "MONOTONIC_USEC={}",
            handover::monotonic_ns() / 1000
        )),
        NotifyState::Status("re-executing"),
    ]);
}

/// The re-exec did not happen: serving on.
pub fn ready_again() {
    send(&[NotifyState::Ready]);
}
