//! `tcpnetlock lock NAME`: take a lock, say so on stdout, and hold it until stdin ends, a
//! signal comes, or the lock is lost. Made for shells:
//!
//! ```sh
//! coproc LOCK { tcpnetlock lock build-cache; }
//! lock_pid=$LOCK_PID lock_in=${LOCK[1]}  # bash unsets both once the coprocess has ended
//! { read -r reply <&"${LOCK[0]}"; } 2>/dev/null   # ok
//! ...
//! exec {lock_in}>&-                      # stdin ends: released
//! wait "$lock_pid"
//! ```
//!
//! stdout carries one line, the server's answer (`ok`, `ok,token:N`, `not-granted`, or its
//! `err,` line), so a script reading it never waits for nothing (unless the server cannot be
//! reached: then nothing is printed and the status is 125). stdin is only watched for its end: what is written
//! to it is read and dropped. A stdin already at its end (`</dev/null`, or closed: the Rust
//! runtime opens /dev/null in its place) releases at once.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use clap::Args;

use super::signals::{self, SignalFd};
use super::waiting;
use super::{EXIT_FAILURE, EXIT_LOST, EXIT_NOT_GRANTED, Fail, ServerAddr, parse_protocol_secs};
use tcpnetlock::client::{self, Lock, Lost};

const EXIT_CODES: &str = "\
Exit status: 0 after releasing (stdin ended, or SIGTERM/SIGINT/SIGHUP); 122 if the lock was \
lost while held (with --ttl: also when the server answers no renewal in time); 123 if it was not granted; 125 if the server cannot be reached; 2 for bad \
options.";

#[derive(Debug, Args)]
#[command(after_help = EXIT_CODES)]
pub struct LockArgs {
    /// Name of the lock: letters, digits, '_' and '-'.
    name: String,

    #[command(flatten)]
    server: ServerAddr,

    /// Wait up to SECONDS in the server's queue instead of giving up at once. While waiting,
    /// stderr says who holds the lock and how many are ahead: a status line kept up to date on
    /// a terminal, else one line (with -v, one per change of holder).
    #[arg(short, long, value_name = "SECONDS", value_parser = parse_protocol_secs)]
    wait: Option<Duration>,

    /// While waiting with stderr not on a terminal, a line on each change of holder.
    #[arg(short, long)]
    verbose: bool,

    /// Client id the server shows for this holder.
    #[arg(long, value_name = "ID", env = "TCPNETLOCK_CLIENT_ID")]
    client_id: Option<String>,

    /// Let up to N holders share the name (a counting semaphore); everyone using the name must
    /// give the same N.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65535))]
    max: Option<u32>,

    /// Ask for a fencing token: the first line is then `ok,token:N`.
    #[arg(long)]
    fencing: bool,

    /// Hold the lock in shared mode (as flock -s): any number of shared holders at once, never
    /// together with an exclusive one. Not with --max.
    #[arg(short, long)]
    shared: bool,

    /// Hold the lock as a lease of SECONDS, renewed in the background while this runs; lost
    /// (122) once the server has answered no renewal for SECONDS less a margin. Against a
    /// cluster member the default is the longest ttl it vouches for, and more is refused.
    #[arg(long, value_name = "SECONDS", value_parser = parse_protocol_secs)]
    ttl: Option<Duration>,
}

/// How a held lock ends.
pub(super) enum End {
    /// stdin ended or a signal asked us to stop: release.
    Release,
    Lost(Lost),
}

pub fn run(args: LockArgs) -> Result<u8, Fail> {
    let mut client = args.server.client();
    if let Some(id) = &args.client_id {
        client = client.client_id(id);
    }
    let mut request = client
        .request(&args.name)
        .fencing(args.fencing)
        .shared(args.shared);
    if let Some(wait) = args.wait {
        request = request.wait(wait);
    }
    if let Some(ttl) = args.ttl {
        request = request.ttl(ttl);
    }
    if let Some(max) = args.max {
        request = request.max(max);
    }
    let request = super::cluster::with_lease_ttl(request, &client, args.ttl)?;
    let lock = match waiting::take(&request, &args.name, args.wait, args.verbose) {
        Ok(lock) => lock,
        Err(client::Error::NotGranted) => {
            say("not-granted");
            return Err(Fail::silent(EXIT_NOT_GRANTED));
        }
        Err(client::Error::MaxMismatch { held_max }) => {
            // The server's line, as for any other `err,` line.
            let name = &args.name;
            say(&format!(
                "err,max mismatch: {name} is held with max:{held_max}"
            ));
            let asked = args.max.unwrap_or(1);
            return Err(Fail::new(
                EXIT_NOT_GRANTED,
                &super::r#do::max_mismatch(name, held_max, asked),
            ));
        }
        Err(e) => {
            if let client::Error::Server(msg) = &e {
                say(&format!("err,{msg}"));
            }
            return Err(Fail::from_client(&e));
        }
    };
    let signals = watch_signals(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP])?;
    say(&match lock.token() {
        Some(token) => format!("ok,token:{token}"),
        None => "ok".to_owned(),
    });
    let stdin = std::io::stdin();
    let watch_stdin = stdin_is_ours();
    match hold(&lock, &signals, watch_stdin.then(|| stdin.as_fd())) {
        End::Release => match lock.release() {
            Ok(()) => Ok(0),
            Err(client::Error::Lost(why)) => Err(lost(&args.name, &why)),
            Err(e) => Err(Fail::from_client(&e)),
        },
        End::Lost(why) => Err(lost(&args.name, &why)),
    }
}

fn lost(name: &str, why: &Lost) -> Fail {
    Fail::new(EXIT_LOST, &format!("lock {name} lost: {why}"))
}

/// One line on stdout, flushed: the reader may be waiting for it. A reader that went away is
/// not a reason to drop the lock; the exit status still tells.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

pub(super) fn watch_signals(which: &[libc::c_int]) -> Result<SignalFd, Fail> {
    SignalFd::new(which).map_err(|e| Fail::new(EXIT_FAILURE, &format!("cannot watch signals: {e}")))
}

/// Waits for the end of stdin (if watched), a signal, or the loss of the lock.
pub(super) fn hold(lock: &Lock, signals: &SignalFd, stdin: Option<BorrowedFd<'_>>) -> End {
    loop {
        let mut fds = [
            signals::pollfd(Some(signals.as_fd())),
            signals::pollfd(Some(lock.as_fd())),
            signals::pollfd(stdin),
        ];
        // A stalled connection brings no byte: the lease clock must wake us.
        let lease = lock.lease_deadline();
        let timeout = lease.map(|at| at.saturating_duration_since(Instant::now()));
        if let Err(e) = signals::poll(&mut fds, timeout) {
            return End::Lost(Lost::Broken(format!("poll: {e}")));
        }
        if signals.next().is_some() {
            return End::Release;
        }
        let lease_due = lease.is_some_and(|at| Instant::now() >= at);
        if (fds[1].revents != 0 || lease_due)
            && let Some(why) = lock.lost()
        {
            return End::Lost(why);
        }
        if fds[2].revents != 0 && drained_to_end(fds[2].fd) {
            return End::Release;
        }
    }
}

/// Reads what is on stdin and drops it; true at end of file (or a read error: nobody can tell
/// us anything through it any more).
fn drained_to_end(fd: libc::c_int) -> bool {
    let mut buf = [0u8; 4096];
    // SAFETY: read fills at most buf.len() bytes of our buffer.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted;
    }
    n == 0
}

/// stdin can be watched: it is not a terminal that belongs to another process group (a
/// background `tcpnetlock lock x &` reading the terminal would be stopped by SIGTTIN).
fn stdin_is_ours() -> bool {
    // SAFETY: plain system calls on fd 0.
    unsafe { libc::isatty(0) != 1 || libc::tcgetpgrp(0) == libc::getpgrp() }
}
