//! The guard a granted lock lives in, and the thread that renews it.
//!
//! The guard owns the connection: while it lives, the lock is held. Two threads may read the
//! connection: the owner (asking whether the lock is lost, or releasing it) and, when renewals
//! are on, a background thread that sends `.keepalive` and drains the `alive` replies. Reads
//! happen only under one mutex and never block inside it; waiting for data is a `poll` outside
//! it. Only one thread writes at a time: the renewal thread, until the owner stops it.
//!
//! Ending is bounded: [`Lock::release`] and `Drop` stop the renewal thread, send `release` and
//! wait for `released`, all within one deadline, the reply timeout; [`Lock::abandon`] waits for
//! nothing. The renewal thread blocks every signal before [`LockBuilder::take`] returns, so a
//! program that waits for signals in its own way (as `tcpnetlock do` does, with a signalfd)
//! never has one delivered to a thread of ours, and the caller's own signal mask is never
//! touched.
//!
//! [`LockBuilder::take`]: super::LockBuilder::take

use std::io::{self, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::lease::LeaseClock;
use super::replies::{Deadline, Read, Replies, wait_readable};
use super::{Error, Lost, send};

/// A granted lock. It is held until this is dropped, [released](Lock::release) or
/// [abandoned](Lock::abandon), or until it is [lost](Lock::lost).
///
/// Dropping it releases the lock as [`release`](Lock::release) does, waiting for the server's
/// `released` for at most the reply timeout ([`Client::reply_timeout`], 10 s unless set); past
/// that, the connection is closed, which frees the lock as soon as the server sees the close.
/// A failure is not reported: call `release` to see it, or `abandon` not to wait at all.
///
/// # Example
///
/// Against a stand-in for the server, so that the example runs anywhere (the protocol is one
/// line per request; docs/PROTOCOL.md):
///
/// ```
/// use std::io::{BufRead, BufReader, Write};
/// use std::net::TcpListener;
/// use tcpnetlock::client::Client;
///
/// let listener = TcpListener::bind("127.0.0.1:0")?;
/// let port = listener.local_addr()?.port();
/// let server = std::thread::spawn(move || -> std::io::Result<Vec<String>> {
///     let (mut stream, _) = listener.accept()?;
///     let mut lines = BufReader::new(stream.try_clone()?).lines();
///     let request = lines.next().unwrap()?;
///     stream.write_all(b"ok,token:42\n")?;
///     let release = lines.next().unwrap()?;
///     stream.write_all(b"released\n")?;
///     Ok(vec![request, release])
/// });
///
/// let lock = Client::new("127.0.0.1", port).request("report").fencing(true).take()?;
/// assert_eq!(lock.token(), Some(42)); // pass it on to what the lock protects
/// assert_eq!(lock.lost(), None);
/// lock.release()?;
/// assert_eq!(server.join().unwrap()?, ["lock,name:report,fencing:1", "release"]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// [`Client::reply_timeout`]: super::Client::reply_timeout
#[derive(Debug)]
#[must_use = "the lock is released as soon as the guard is dropped: keep it in a variable for as \
              long as the lock is needed"]
pub struct Lock {
    name: String,
    token: Option<u64>,
    shared: bool,
    conn: Arc<Conn>,
    /// The thread sending renewals, when there is one.
    renewer: Option<JoinHandle<()>>,
    /// The bound on releasing (see `finish`).
    reply_timeout: Duration,
    /// Released, abandoned, or the release failed: nothing more to do on drop.
    finished: bool,
}

/// What the owner and the renewal thread share.
#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    state: Mutex<Held>,
    /// Wakes the renewal thread early (the lock is being released), and the owner waiting for
    /// it to end.
    wake: Condvar,
}

#[derive(Debug)]
struct Held {
    replies: Replies,
    lost: Option<Lost>,
    /// The owner asked the renewal thread to end.
    stopping: bool,
    /// The renewal thread has ended (or never ran).
    renewer_done: bool,
    lease: Option<LeaseClock>,
}

impl Conn {
    fn state(&self) -> MutexGuard<'_, Held> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Lines taken in by one [`Held::pump`], at most: a server flooding a holder with lines must
/// not keep the caller in there (under the mutex) for ever. Far more than a holder is ever sent.
const PUMP_LINES: usize = 1024;

impl Held {
    /// Reads whatever the server sent, without blocking, notes a loss, and looks at the lease
    /// clock.
    fn pump(&mut self, stream: &TcpStream) {
        for _ in 0..PUMP_LINES {
            if self.lost.is_some() {
                break;
            }
            match self.replies.line_now(stream) {
                Ok(Read::Line(line)) if line == "expired" => self.lost = Some(Lost::Expired),
                Ok(Read::Line(line)) if line == "alive" => {
                    if let Some(lease) = &mut self.lease {
                        lease.answered();
                    }
                }
                // Nothing else is sent to a holder.
                Ok(Read::Line(_)) => {}
                Ok(Read::Eof) => self.lost = Some(Lost::Closed),
                Ok(Read::Pending) => break,
                Err(e) => self.lost = Some(Lost::Broken(e.to_string())),
            }
        }
        if self.lost.is_none() && self.lease.as_ref().is_some_and(LeaseClock::expired) {
            self.lost = Some(Lost::LeaseUnconfirmed);
            // No byte will come to say so: make the socket readable (end of file) for whoever
            // polls it.
            let _ = stream.shutdown(Shutdown::Read);
        }
    }
}

/// A grant, as [`LockBuilder::take`](super::LockBuilder::take) hands it over.
pub(super) struct Grant {
    pub(super) name: String,
    pub(super) token: Option<u64>,
    pub(super) shared: bool,
    pub(super) stream: TcpStream,
    pub(super) replies: Replies,
    pub(super) lease: Option<LeaseClock>,
    pub(super) renew_every: Option<Duration>,
    pub(super) reply_timeout: Duration,
}

impl Lock {
    pub(super) fn start(grant: Grant) -> Result<Lock, Error> {
        let conn = Arc::new(Conn {
            stream: grant.stream,
            state: Mutex::new(Held {
                replies: grant.replies,
                lost: None,
                stopping: false,
                renewer_done: grant.renew_every.is_none(),
                lease: grant.lease,
            }),
            wake: Condvar::new(),
        });
        let renewer = match grant.renew_every {
            Some(every) => Some(spawn_renewer(Arc::clone(&conn), every).map_err(Error::Io)?),
            None => None,
        };
        Ok(Lock {
            name: grant.name,
            token: grant.token,
            shared: grant.shared,
            conn,
            renewer,
            reply_timeout: grant.reply_timeout,
            finished: false,
        })
    }

    /// The name this lock was taken under.
    ///
    /// ```no_run
    /// use tcpnetlock::client::Client;
    ///
    /// let lock = Client::new("localhost", 7654).try_lock("nightly-backup")?;
    /// assert_eq!(lock.name(), "nightly-backup");
    /// # Ok::<(), tcpnetlock::client::Error>(())
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fencing token of this grant, when it was asked for
    /// ([`LockBuilder::fencing`](super::LockBuilder::fencing)): larger than the token of every
    /// earlier grant, so the resource the lock protects can refuse a holder that lost the lock
    /// and does not know it yet.
    ///
    /// ```no_run
    /// use tcpnetlock::client::Client;
    ///
    /// let lock = Client::new("localhost", 7654).request("ledger").fencing(true).take()?;
    /// let token = lock.token().expect("asked for");
    /// println!("writing the batch with token {token}");
    /// # Ok::<(), tcpnetlock::client::Error>(())
    /// ```
    pub fn token(&self) -> Option<u64> {
        self.token
    }

    /// Whether this lock is held in shared mode ([`LockBuilder::shared`](super::LockBuilder::shared)).
    ///
    /// ```no_run
    /// use tcpnetlock::client::Client;
    ///
    /// let lock = Client::new("localhost", 7654).request("schema").shared(true).take()?;
    /// assert!(lock.is_shared());
    /// # Ok::<(), tcpnetlock::client::Error>(())
    /// ```
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Why the lock is no longer held, or `None` while it is. Never blocks.
    ///
    /// ```no_run
    /// use tcpnetlock::client::Client;
    ///
    /// let lock = Client::new("localhost", 7654).try_lock("import")?;
    /// for batch in 0..100 {
    ///     if let Some(why) = lock.lost() {
    ///         eprintln!("stopping before batch {batch}: lock lost: {why}");
    ///         break;
    ///     }
    ///     // ... import the batch ...
    /// }
    /// # Ok::<(), tcpnetlock::client::Error>(())
    /// ```
    pub fn lost(&self) -> Option<Lost> {
        let mut state = self.conn.state();
        state.pump(&self.conn.stream);
        state.lost.clone()
    }

    /// When a lease ([`LockBuilder::ttl`](super::LockBuilder::ttl)) counts as lost unless the
    /// server answers a renewal before: a program that polls the lock's descriptor should wake
    /// up by then and ask [`Lock::lost`] (the renewals are answered in the background; the
    /// descriptor also turns readable soon after, but only if the renewal thread gets to run).
    /// `None` without a ttl, or once lost.
    ///
    /// ```no_run
    /// use std::time::{Duration, Instant};
    /// use tcpnetlock::client::Client;
    ///
    /// let client = Client::new("localhost", 7654);
    /// let lock = client.request("leader").ttl(Duration::from_secs(10)).take()?;
    /// let deadline = lock.lease_deadline().expect("a lease");
    /// assert!(deadline <= Instant::now() + Duration::from_secs(10));
    /// # Ok::<(), tcpnetlock::client::Error>(())
    /// ```
    pub fn lease_deadline(&self) -> Option<Instant> {
        let state = self.conn.state();
        match (&state.lost, &state.lease) {
            (None, Some(lease)) => Some(lease.deadline_instant()),
            _ => None,
        }
    }

    /// Blocks until the lock is lost (and says why) or `timeout` passes (`None`); no timeout
    /// waits for as long as the lock is held.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tcpnetlock::client::Client;
    ///
    /// let lock = Client::new("localhost", 7654).try_lock("leader")?;
    /// while lock.wait_lost(Some(Duration::from_secs(1))).is_none() {
    ///     // ... a second of leader's work ...
    /// }
    /// # Ok::<(), tcpnetlock::client::Error>(())
    /// ```
    pub fn wait_lost(&self, timeout: Option<Duration>) -> Option<Lost> {
        // A timeout too long for the clock is no timeout.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            if let Some(lost) = self.lost() {
                return Some(lost);
            }
            let wake = match (deadline, self.lease_deadline()) {
                (Some(d), _) if Instant::now() >= d => return None,
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            // Another thread may read what woke us; `lost` then finds nothing and we wait again.
            let _ = wait_readable(
                &self.conn.stream,
                wake.map(|w| w.saturating_duration_since(Instant::now())),
            );
        }
    }

    /// Releases the lock and waits for the server to confirm, so that when this returns `Ok`
    /// the next client can have it. Takes at most the reply timeout
    /// ([`Client::reply_timeout`](super::Client::reply_timeout)), then fails with
    /// [`Error::Timeout`] and closes the connection (the server frees the lock when it sees
    /// the close). Fails with [`Error::Lost`] if the lock had already been lost, or if the
    /// connection fails on the way (the server then freed it at some moment we cannot know).
    ///
    /// ```no_run
    /// use tcpnetlock::client::{Client, Error};
    ///
    /// let lock = Client::new("localhost", 7654).try_lock("migrations")?;
    /// // ... migrate ...
    /// match lock.release() {
    ///     Ok(()) => {}
    ///     Err(Error::Lost(why)) => eprintln!("the migration ran without the lock at the end: {why}"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok::<(), tcpnetlock::client::Error>(())
    /// ```
    pub fn release(mut self) -> Result<(), Error> {
        self.finish()
    }

    /// Gives the lock up without waiting: closes the connection at once, sending nothing. The
    /// server frees the lock when it sees the close, a moment later; until then another client
    /// may still be refused. For a program on its way out, or one that must not block.
    ///
    /// ```no_run
    /// use tcpnetlock::client::Client;
    ///
    /// let lock = Client::new("localhost", 7654).try_lock("cache-warmer")?;
    /// // ... told to shut down now ...
    /// lock.abandon();
    /// # Ok::<(), tcpnetlock::client::Error>(())
    /// ```
    pub fn abandon(mut self) {
        self.finished = true;
        // First, so that a renewal thread blocked in a write fails at once.
        let _ = self.conn.stream.shutdown(Shutdown::Both);
        self.stop_renewer(Deadline::after(Duration::ZERO));
    }

    /// Release within one deadline: stopping the renewal thread, writing `release`, reading
    /// `released`.
    fn finish(&mut self) -> Result<(), Error> {
        if std::mem::replace(&mut self.finished, true) {
            return Ok(());
        }
        let deadline = Deadline::after(self.reply_timeout);
        if !self.stop_renewer(deadline) {
            return Err(deadline.timed_out());
        }
        let stream = &self.conn.stream;
        let mut state = self.conn.state();
        state.pump(stream);
        if let Some(lost) = state.lost.clone() {
            return Err(Error::Lost(lost));
        }
        let broken = |e: io::Error| Error::Lost(Lost::Broken(e.to_string()));
        // A write blocks only while the server reads nothing; it gets what is left of the bound.
        let _ = stream.set_write_timeout(Some(deadline.left().max(Duration::from_millis(1))));
        send(stream, "release", self.reply_timeout).map_err(|e| match e {
            Error::Io(e) => broken(e),
            e => e,
        })?;
        loop {
            match state.replies.line(stream, deadline) {
                Ok(Some(line)) if line == "released" => return Ok(()),
                Ok(Some(line)) if line == "expired" => return Err(Error::Lost(Lost::Expired)),
                Ok(Some(_)) => continue, // a late `alive`
                Ok(None) => return Err(Error::Lost(Lost::Closed)),
                // No answer in time (a `Timeout`) says nothing about the lock; a reset does.
                Err(Error::Io(e)) => return Err(broken(e)),
                Err(e) => return Err(e),
            }
        }
    }

    /// Stops the renewal thread, waiting for it until `deadline`; false if it had not ended
    /// by then (it was blocked writing to a server that reads nothing): the connection is then
    /// shut down, which ends it at once.
    fn stop_renewer(&mut self, deadline: Deadline) -> bool {
        let Some(renewer) = self.renewer.take() else {
            return true;
        };
        let mut state = self.conn.state();
        state.stopping = true;
        self.conn.wake.notify_all();
        state = self
            .conn
            .wake
            .wait_timeout_while(state, deadline.left(), |s| !s.renewer_done)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        let ended = state.renewer_done;
        drop(state);
        if !ended {
            let _ = self.conn.stream.shutdown(Shutdown::Both);
        }
        let _ = renewer.join();
        ended
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Readable means something happened on the connection: call [`Lock::lost`]. With a lease, also
/// wake up by [`Lock::lease_deadline`].
///
/// ```no_run
/// use std::os::fd::{AsFd, AsRawFd};
/// use tcpnetlock::client::Client;
///
/// let lock = Client::new("localhost", 7654).try_lock("leader")?;
/// let mut fds = [libc::pollfd { fd: lock.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 }];
/// // ... with the program's other descriptors ...
/// unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
/// if fds[0].revents != 0 && lock.lost().is_some() {
///     eprintln!("no longer the leader");
/// }
/// # Ok::<(), tcpnetlock::client::Error>(())
/// ```
impl AsFd for Lock {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.conn.stream.as_fd()
    }
}

/// Starts the renewal thread and returns once it has blocked every signal.
///
/// A new thread starts with the mask of the thread that creates it, so until the thread's first
/// act, a signal the caller's thread accepts could be delivered to it instead (a process-wide
/// signal goes to any thread that does not block it; its handler, or default action, is the
/// process's either way). Waiting for the thread's word confines that moment to this call: by
/// the time the lock is handed over, no signal can land on our thread. The caller's mask is
/// never changed, not even for a moment (as blocking everything around the spawn would).
fn spawn_renewer(conn: Arc<Conn>, every: Duration) -> io::Result<JoinHandle<()>> {
    let (masked, wait_masked) = mpsc::sync_channel(1);
    let renewer = thread::Builder::new()
        // At most 15 bytes: what Linux keeps of a thread's name (ps, top, /proc).
        .name("tnl-renewal".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            block_all_signals();
            let _ = masked.send(());
            let _ended = Ended(&conn);
            renew(&conn, every);
        })?;
    // An error means the thread is gone, which the owner finds out soon enough.
    let _ = wait_masked.recv();
    Ok(renewer)
}

fn block_all_signals() {
    // SAFETY: a sigset_t owned by this frame; pthread_sigmask reads it and changes the mask of
    // the calling thread (this one) only.
    unsafe {
        let mut all = std::mem::zeroed::<libc::sigset_t>();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
    }
}

/// Why a renewal could not be written: the write timeout (the reply timeout) said in words, as
/// "Resource temporarily unavailable" would not.
fn write_failure(stream: &TcpStream, e: &io::Error) -> String {
    match (e.kind(), stream.write_timeout()) {
        (io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut, Ok(Some(timeout))) => {
            format!("the server took in no request for {timeout:?} (stalled?)")
        }
        _ => e.to_string(),
    }
}

/// Tells the owner the renewal thread has ended, however it ends.
struct Ended<'a>(&'a Conn);

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        self.0.state().renewer_done = true;
        self.0.wake.notify_all();
    }
}

/// The renewal thread: a `.keepalive` every `every`, the replies drained so they never pile up,
/// the lease clock watched, until the lock is released or lost.
fn renew(conn: &Conn, every: Duration) {
    let mut next = Instant::now() + every;
    let mut state = conn.state();
    loop {
        let wake = match state.lease.as_ref() {
            Some(lease) => next.min(lease.deadline_instant()),
            None => next,
        };
        state = conn
            .wake
            .wait_timeout_while(state, wake.saturating_duration_since(Instant::now()), |s| {
                !s.stopping
            })
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        if state.stopping || state.lost.is_some() {
            return;
        }
        state.pump(&conn.stream);
        if state.lost.is_none() && Instant::now() >= next {
            // Noted before it is written: the server cannot read it earlier.
            let sent = LeaseClock::now();
            if let Some(lease) = &mut state.lease {
                lease.sent(sent);
            }
            // Written outside the lock, so that a write held up by a full send buffer cannot
            // keep the owner from seeing the lease run out. Nobody else writes while the
            // renewal thread runs: releasing stops it first.
            drop(state);
            let written = (&conn.stream).write_all(b".keepalive\n");
            state = conn.state();
            if let Err(e) = written
                && state.lost.is_none()
            {
                state.lost = Some(Lost::Broken(write_failure(&conn.stream, &e)));
            }
            next = Instant::now() + every;
        }
        if state.lost.is_some() {
            // Make the socket readable (end of file) for an owner that polls it.
            let _ = conn.stream.shutdown(Shutdown::Read);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A lock held on a loopback connection whose far end reads nothing and whose buffers are
    /// full, renewed every 10 ms: the renewal thread's first write blocks.
    fn held_by_a_deaf_server(reply_timeout: Duration) -> (Lock, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let server = listener.accept().unwrap().0;
        fill(&stream);
        let lock = Lock::start(Grant {
            name: "deaf".into(),
            token: None,
            shared: false,
            stream,
            replies: Replies::new(1024),
            lease: None,
            renew_every: Some(Duration::from_millis(10)),
            reply_timeout,
        })
        .unwrap();
        (lock, server)
    }

    /// Fills the send and receive buffers, so that the next write blocks, for up to 60 s (the
    /// socket's write timeout, which `configure` sets to the reply timeout in real use).
    fn fill(stream: &TcpStream) {
        stream
            .set_write_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let chunk = [b'x'; 64 << 10];
        let mut writer = stream;
        while writer.write(&chunk).is_ok() {}
        stream
            .set_write_timeout(Some(Duration::from_secs(60)))
            .unwrap();
    }

    #[test]
    fn dropping_is_bounded_even_with_the_renewal_thread_stuck_in_a_write() {
        let timeout = Duration::from_millis(300);
        let (lock, _server) = held_by_a_deaf_server(timeout);
        // Time for the renewal thread to block in its write (the bound holds either way: had
        // it not, `release` would block instead, for what is left of the same deadline).
        thread::sleep(Duration::from_millis(100));
        let start = Instant::now();
        drop(lock);
        let took = start.elapsed();
        assert!(
            took >= timeout && took < timeout + Duration::from_secs(2),
            "{took:?}"
        );
    }

    #[test]
    fn release_reports_the_stuck_write_as_a_timeout() {
        let timeout = Duration::from_millis(300);
        let (lock, _server) = held_by_a_deaf_server(timeout);
        thread::sleep(Duration::from_millis(100));
        match lock.release() {
            Err(Error::Timeout { after }) => assert_eq!(after, timeout),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn abandoning_does_not_wait_for_a_stuck_write() {
        let (lock, _server) = held_by_a_deaf_server(Duration::from_secs(30));
        thread::sleep(Duration::from_millis(100));
        let start = Instant::now();
        lock.abandon();
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "{:?}",
            start.elapsed()
        );
    }
}
