//! Bringing the threads that own connections to rest for a hand-over, at a point where no byte
//! can be lost, without costing the common path a system call.
//!
//! A connection's thread spends its life blocked: in `accept`, in `read` between requests, in
//! `poll` watching a half-closed holder, now and then in a `write` to a client slow to read. The
//! hand-over sets [`resting`] and sends each busy worker a signal ([`wake_signal`]) whose handler
//! does nothing and is installed without `SA_RESTART`, so the blocked call returns `EINTR`; the
//! loops around those calls, on `EINTR`, look at the flag and come to rest, describing what they
//! own as a [`Record`]. Nothing is checked before a call that does not fail, so serving a client
//! costs no more than before. A signal that arrives just before a thread blocks is missed; the
//! hand-over sends it again every few milliseconds to the threads not at rest yet
//! (`Pool::quiesce`).
//!
//! Every blocking call of a worker must therefore tell `EINTR` from a failure: std's `accept`
//! and `write_all` retry it (so a thread there would never come to rest), and code that takes any
//! error of a `send` or `poll` for a client gone would drop a lock. [`write_all`] is the write to
//! use; `accept`, `read` and `poll` are handled where they are called.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::metrics::ConnRefusal;
use crate::table::ConnId;

static RESTING: AtomicBool = AtomicBool::new(false);

/// Whether a hand-over asks every connection's thread to come to rest.
pub fn resting() -> bool {
    RESTING.load(Ordering::SeqCst)
}

pub(super) fn set_resting(on: bool) {
    RESTING.store(on, Ordering::SeqCst);
}

/// The signal that wakes a worker out of a blocking call: a real-time signal, which nothing else
/// sends (SIGUSR1 and SIGUSR2 are the operator's).
pub fn wake_signal() -> libc::c_int {
    libc::SIGRTMIN() + 2
}

extern "C" fn on_wake(_: libc::c_int) {}

/// Installs the wake signal's handler: it does nothing, and without `SA_RESTART` the call it
/// interrupts returns `EINTR`. Call it before any thread starts.
pub fn install_wake_handler() -> io::Result<()> {
    // SAFETY: a zeroed sigaction is valid once its fields are set; the handler is async-signal
    // safe (it does nothing).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_wake as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = 0;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(wake_signal(), &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sends the wake signal to one thread.
pub fn wake(thread: libc::pthread_t) {
    // SAFETY: the thread is a live pool worker (members leave the list before they end), and an
    // error (ESRCH) only means there was nothing to wake.
    unsafe { libc::pthread_kill(thread, wake_signal()) };
}

/// A connection at rest, as the next process needs it.
#[derive(Debug)]
pub struct Record {
    pub fd: std::os::fd::RawFd,
    pub id: ConnId,
    pub peer: SocketAddr,
    pub phase: Phase,
}

/// Where a connection was in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Its first request is not complete yet: `unparsed` holds what came of it (for `GET
    /// /metrics`, the head read so far), and the rest must come within `left`.
    FirstRequest {
        left: Duration,
        limited: Option<ConnRefusal>,
        unparsed: Vec<u8>,
    },
    /// It holds or waits for `name` (the table says which): `unparsed` are bytes of requests
    /// not handled yet, `unsent` the end of a reply its client had no room for yet.
    Session {
        name: Box<str>,
        fencing: bool,
        unparsed: Vec<u8>,
        unsent: Vec<u8>,
    },
    /// It holds or waits for `name` and shut down its sending side: watched until it is gone.
    HalfClosed { name: Box<str>, fencing: bool },
    /// Its last reply is being written: `unsent` remains, then the connection closes.
    Closing { unsent: Vec<u8> },
}

impl Record {
    pub fn new(stream: &TcpStream, id: ConnId, peer: SocketAddr, phase: Phase) -> Record {
        Record {
            fd: stream.as_raw_fd(),
            id,
            peer,
            phase,
        }
    }
}

/// Why [`write_all`] stopped.
#[derive(Debug)]
pub enum WriteStop {
    /// The client is gone or the write failed.
    Failed(io::Error),
    /// A hand-over asks this thread to rest; these bytes are not written yet.
    Resting(Vec<u8>),
}

/// Writes all of `bytes`, blocking while the client has no room for them, as `Write::write_all`
/// does, except that a hand-over interrupts it (see the module docs).
pub fn write_all(stream: &TcpStream, bytes: &[u8]) -> Result<(), WriteStop> {
    let mut written = 0;
    while written < bytes.len() {
        // SAFETY: a valid socket and a live buffer; MSG_NOSIGNAL: a client gone is an error,
        // not a SIGPIPE.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                bytes[written..].as_ptr().cast(),
                bytes.len() - written,
                libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            written += n as usize;
            continue;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(WriteStop::Failed(e));
        }
        if resting() {
            return Err(WriteStop::Resting(bytes[written..].to_vec()));
        }
    }
    Ok(())
}
