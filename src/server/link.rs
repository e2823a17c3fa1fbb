//! How threads other than its own reach a connection that holds or waits for a lock.
//!
//! A connection's own thread sits in `read()` for as long as it holds or waits, so the grant a
//! release hands on, and the `expired` or `not-granted` the timer decides, are written by
//! whichever thread made the decision. Those writers race each other and the connection's own
//! replies; the rule that keeps the bytes in an order a client can make sense of: a grant
//! decided is written before anything after it. The lock owner marks the grant while it still
//! holds the table mutex ([`Link::grant_decided`]), and every other writer waits for the mark to
//! clear. The wait is short: a grant is one non-blocking write.
//!
//! Writes from other threads never block (a client that does not read is treated as gone); the
//! connection's own replies may, since only its own thread waits on them.

use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use super::handover::rest::{self, WriteStop};
use tcpnetlock::protocol::Reply;

#[derive(Debug)]
pub struct Link {
    stream: TcpStream,
    pub name: Box<str>,
    pub fencing: bool,
    out: Mutex<Out>,
    /// Signalled when a pending grant has been written.
    granted: Condvar,
}

#[derive(Debug, Default)]
struct Out {
    /// A grant was decided and its `ok` is not written yet: every other write waits behind it.
    grant_pending: bool,
    /// The connection was given its last word and hung up on; nothing more is written.
    closed: bool,
}

impl Link {
    pub fn new(stream: TcpStream, name: &str, fencing: bool) -> Link {
        Link {
            stream,
            name: name.into(),
            fencing,
            out: Mutex::new(Out::default()),
            granted: Condvar::new(),
        }
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    fn out(&self) -> MutexGuard<'_, Out> {
        self.out.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits out a pending grant; the guard then allows the next write.
    fn out_after_grant(&self) -> MutexGuard<'_, Out> {
        let out = self.out();
        self.granted
            .wait_while(out, |o| o.grant_pending)
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Called by the lock owner, under the table mutex, for each grant it decides: from now on
    /// the grant comes first. Never blocks on I/O (the guard of `out` is only ever held for
    /// non-blocking writes), so it is safe under the table mutex.
    pub(super) fn grant_decided(&self) {
        self.out().grant_pending = true;
    }

    /// Writes the grant line. An error means the client cannot take it (gone, or not reading):
    /// the caller gives the place to the next in line.
    pub(super) fn write_grant(&self, token: u64) -> io::Result<()> {
        let mut out = self.out();
        out.grant_pending = false;
        self.granted.notify_all();
        if out.closed {
            return Err(io::ErrorKind::NotConnected.into());
        }
        let line = Reply::granted(token, self.fencing).to_line();
        match send_now(&self.stream, &line) {
            Ok(n) if n == line.len() => Ok(()),
            failed => {
                out.closed = true;
                let _ = self.stream.shutdown(Shutdown::Both);
                Err(failed
                    .err()
                    .unwrap_or_else(|| io::ErrorKind::WouldBlock.into()))
            }
        }
    }

    /// The last word from another thread (`expired`, `not-granted`), then the connection is
    /// ended: its own thread wakes up to end of file, finds itself out of the table and exits.
    pub(super) fn end_with(&self, reply: &Reply) {
        let mut out = self.out_after_grant();
        if std::mem::replace(&mut out.closed, true) {
            return;
        }
        let _ = send_now(&self.stream, &reply.to_line());
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Ends the connection without a word, after any grant decided for it: a holder whose lock
    /// this server can no longer vouch for (cluster mode) learns it from the close, as it would
    /// from a server that died.
    #[cfg(feature = "etcd")]
    pub(super) fn hang_up(&self) {
        let mut out = self.out_after_grant();
        if std::mem::replace(&mut out.closed, true) {
            return;
        }
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// A reply from the connection's own thread, after any grant decided for it. Fails if the
    /// connection was ended by another thread (it was told why) or the client is gone; stops
    /// with the part not written yet when a hand-over asks the thread to rest while it waits for
    /// a client that does not read.
    pub fn reply(&self, reply: &Reply) -> Result<(), WriteStop> {
        let line = reply.to_line();
        let out = self.out_after_grant();
        if out.closed {
            return Err(WriteStop::Failed(io::ErrorKind::NotConnected.into()));
        }
        let sent = send_now(&self.stream, &line).map_err(WriteStop::Failed)?;
        drop(out);
        // The client is not reading its replies: only this thread waits for it to.
        rest::write_all(&self.stream, &line[sent..])
    }
}

/// Writes what fits without waiting.
fn send_now(stream: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    match socket2::SockRef::from(stream).send_with_flags(bytes, libc::MSG_DONTWAIT) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        other => other,
    }
}
