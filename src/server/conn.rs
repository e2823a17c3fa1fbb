//! One connection's life: read the first request, answer it, and if it was a granted `lock`,
//! hold until the client releases or is gone.
//!
//! "Gone" is decided here, and it is where 0.1.8 was wrong: end-of-file on the socket only means
//! the client shut down its sending side (`nc -N`, ncat, busybox nc and socat all do so when their
//! stdin ends) and it may still be waiting for the lock's lifetime to end. So a half-closed holder
//! keeps its lock, and we find out whether it is really gone by sending it data: once the process
//! is dead, its kernel answers data with a reset. The probe is one byte of TCP urgent data, which
//! the kernel keeps out of the normal stream, so the client program never reads it (a pipeline
//! such as `nc ... | head -n 1` would otherwise get a byte on its stdout, or a SIGPIPE).

use std::io::{self, Read, Write};
use std::mem::MaybeUninit;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use super::Server;
use super::link::Link;
use crate::protocol::{HeldRequest, LockRequest, Reply, Request};
use crate::table::{self, ConnId, Decision, State};

/// How often a half-closed holder is probed. The lock is freed within about twice this after the
/// client process dies (the write that provokes the reset, then the wait for it).
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// An accepted client, on its way to a worker.
pub struct Conn {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub id: ConnId,
    pub server: Arc<Server>,
    /// Decrements the server's open-connection count when the connection ends, however it ends.
    pub _open: super::OpenGuard,
}

pub fn serve(conn: Conn) {
    let Conn {
        stream,
        peer,
        id,
        server,
        _open,
    } = conn;
    let server = &*server;
    let mut reader = LineReader::new(server.config.max_line);
    let deadline = Instant::now() + server.config.request_timeout;
    let line = match reader.next_line(&stream, Some(deadline)) {
        Ok(line) => line,
        Err(ReadError::Eof { partial: false }) => return,
        Err(ReadError::Eof { partial: true }) | Err(ReadError::TooLong) => {
            return finish(&stream, &Reply::BadRequest);
        }
        Err(ReadError::TimedOut) => {
            debug!("{peer}: no complete request within the request timeout, closing");
            return finish(&stream, &Reply::err("request timeout"));
        }
        Err(ReadError::Io(e)) => {
            debug!("{peer}: {e}");
            return;
        }
    };
    let request = match Request::parse(line, server.config.max_name_len) {
        Ok(r) => r,
        Err(reply) => {
            debug!("{peer}: {reply} for {:?}", String::from_utf8_lossy(line));
            return finish(&stream, &reply);
        }
    };
    match request {
        Request::Ping => finish(&stream, &Reply::Pong),
        Request::Stats => finish(&stream, &Reply::Stats(server.stats_json())),
        Request::Locks => finish(&stream, &Reply::Locks(server.locks_json())),
        Request::Shutdown => shutdown(server, &stream, peer),
        Request::Lock(req) => {
            if let Some(session) = Session::start(server, stream, peer, id, &req) {
                session.run(&mut reader);
            }
        }
    }
}

/// A connection that holds or waits for a lock. Dropping it takes the connection out of the
/// table and hands its place on, so every way out — release, disconnect, error, even a panic —
/// gives the lock back.
struct Session<'a> {
    server: &'a Server,
    link: Arc<Link>,
    id: ConnId,
    peer: SocketAddr,
}

impl<'a> Session<'a> {
    /// Asks for the lock. A grant's line is written by the lock owner; a refusal is answered
    /// here and the connection finished (None).
    fn start(
        server: &'a Server,
        stream: TcpStream,
        peer: SocketAddr,
        id: ConnId,
        req: &LockRequest,
    ) -> Option<Session<'a>> {
        let link = Arc::new(Link::new(stream, req.name, req.fencing));
        let decision = server.locks.lock(
            req.name,
            table::LockRequest {
                conn: id,
                client_id: req.client_id.map(Into::into),
                peer: Some(peer),
                max: req.max,
                wait: req.wait,
                ttl: req.ttl,
                handle: Arc::clone(&link),
            },
        );
        let name = req.name;
        match decision {
            Decision::Granted { token } => debug!("{peer}: lock {name} granted (token {token})"),
            Decision::Queued => debug!("{peer}: lock {name} queued"),
            Decision::NotGranted => {
                debug!("{peer}: lock {name} not granted");
                finish(link.stream(), &Reply::NotGranted);
                return None;
            }
            Decision::MaxMismatch { max } => {
                debug!(
                    "{peer}: lock {name} max:{} refused, held with max:{max}",
                    req.max
                );
                let msg = format!("max mismatch: {name} is held with max:{max}");
                finish(link.stream(), &Reply::Err(msg.into()));
                return None;
            }
        }
        super::listen::spread_keepalive(link.stream(), id.0);
        Some(Session {
            server,
            link,
            id,
            peer,
        })
    }

    fn run(self, reader: &mut LineReader) {
        let stream = self.link.stream();
        loop {
            let line = match reader.next_line(stream, None) {
                Ok(line) => line,
                Err(ReadError::TooLong) => {
                    self.leave();
                    let _ = self.link.reply(&Reply::BadRequest);
                    return finish_quietly(stream);
                }
                Err(ReadError::Eof { .. }) => {
                    // Either the client half-closed, or another thread hung up on it after an
                    // expiry or a timeout (the table no longer has it).
                    if self.server.locks.state(&self.link.name, self.id) != State::Absent {
                        self.watch_half_closed();
                    }
                    return;
                }
                Err(ReadError::TimedOut) => continue,
                Err(ReadError::Io(e)) => {
                    debug!(
                        "{}: lock {}: connection lost: {e}",
                        self.peer, self.link.name
                    );
                    return;
                }
            };
            let request = HeldRequest::parse(line);
            // Any request renews a lease. A connection the table no longer has was told why by
            // the thread that took it out; it says nothing more.
            if self.server.locks.renew(&self.link.name, self.id) == State::Absent {
                return;
            }
            let reply = match request {
                Ok(HeldRequest::Release) => {
                    // Free the lock before saying so: a client that reads `released` and
                    // tells another to go ahead must find the lock free.
                    self.leave();
                    if self.link.reply(&Reply::Released).is_ok() {
                        finish_quietly(stream);
                    }
                    return;
                }
                Ok(HeldRequest::Keepalive) => Reply::Alive,
                Err(reply) => reply,
            };
            if self.link.reply(&reply).is_err() {
                return;
            }
        }
    }

    /// Leaves the table and hands the place on. Idempotent: the table ignores a second call.
    fn leave(&self) {
        let was = self.server.locks.leave(&self.link.name, self.id);
        if was != State::Absent {
            debug!("{}: lock {}: left ({was:?})", self.peer, self.link.name);
        }
    }

    /// The client shut down its sending side. It can no longer release, so it holds (or waits)
    /// until it is gone, or until the table lets it go (lease, wait timeout).
    fn watch_half_closed(&self) {
        debug!(
            "{}: lock {}: half-closed; probing",
            self.peer, self.link.name
        );
        let stream = self.link.stream();
        let socket = socket2::SockRef::from(stream);
        loop {
            // A `\n`, so that a middlebox which clears the urgent flag turns it into a blank
            // line.
            if socket.send_out_of_band(b"\n").is_err() || peer_reset_within(stream, PROBE_INTERVAL)
            {
                debug!(
                    "{}: lock {}: half-closed client is gone",
                    self.peer, self.link.name
                );
                return;
            }
        }
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}

/// Blocks until the socket reports an error or a hang-up, or `timeout` passes. On a half-closed
/// socket reads are always ready (end of file), so this polls for nothing but errors.
fn peer_reset_within(stream: &TcpStream, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd, owned by this frame, for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0 && pfd.revents & (libc::POLLERR | libc::POLLHUP) != 0
}

fn shutdown(server: &Server, stream: &TcpStream, peer: SocketAddr) {
    if !server.config.allow_shutdown {
        warn!("{peer}: .server-shutdown refused (not enabled on this server)");
        return finish(stream, &Reply::err("server-shutdown not enabled"));
    }
    if !peer.ip().to_canonical().is_loopback() {
        warn!("{peer}: .server-shutdown refused (only accepted from loopback)");
        return finish(
            stream,
            &Reply::err("server-shutdown only accepted from loopback"),
        );
    }
    info!("{peer}: .server-shutdown received; exiting");
    let _ = send(stream, &Reply::ShuttingDown);
    let _ = stream.shutdown(Shutdown::Write);
    server.exit();
}

fn send(mut stream: &TcpStream, reply: &Reply) -> io::Result<()> {
    stream.write_all(&reply.to_line())
}

/// Writes the last reply and closes. Bytes the client sent that we never read are drained first:
/// closing over unread data makes the kernel send a reset, which can destroy the reply before the
/// client reads it.
fn finish(stream: &TcpStream, reply: &Reply) {
    if send(stream, reply).is_ok() {
        finish_quietly(stream);
    }
}

/// [`finish`] once the last reply is written.
fn finish_quietly(stream: &TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let mut scratch = [MaybeUninit::<u8>::uninit(); 1024];
    let socket = socket2::SockRef::from(stream);
    for _ in 0..64 {
        match socket.recv_with_flags(&mut scratch, libc::MSG_DONTWAIT) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
}

#[derive(Debug)]
enum ReadError {
    /// End of file; `partial` when an unterminated line came before it.
    Eof {
        partial: bool,
    },
    TooLong,
    TimedOut,
    Io(io::Error),
}

/// Splits a byte stream into lines using a buffer of fixed size, so a connection costs the same
/// memory whatever the client sends. Bytes after a line stay buffered for the next call
/// (a client may send `lock,...\nrelease\n` in one packet).
struct LineReader {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    max_line: usize,
    timeout_set: bool,
    /// The first read of a request was tried without waiting.
    tried_without_timeout: bool,
}

impl LineReader {
    fn new(max_line: usize) -> LineReader {
        LineReader {
            // Room for the longest line plus its `\r\n`.
            buf: vec![0; max_line + 2].into_boxed_slice(),
            start: 0,
            end: 0,
            max_line,
            timeout_set: false,
            tried_without_timeout: false,
        }
    }

    /// The next line without its `\n` (a `\r` before it is left for the parser to trim).
    fn next_line(
        &mut self,
        mut stream: &TcpStream,
        deadline: Option<Instant>,
    ) -> Result<&[u8], ReadError> {
        let mut scanned = self.start;
        loop {
            if let Some(i) = self.buf[scanned..self.end].iter().position(|&b| b == b'\n') {
                let nl = scanned + i;
                let line = self.start..nl;
                self.start = nl + 1;
                let content = &self.buf[line.clone()];
                let len = content.len() - usize::from(content.ends_with(b"\r"));
                if len > self.max_line {
                    return Err(ReadError::TooLong);
                }
                return Ok(&self.buf[line]);
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                return Err(ReadError::TooLong);
            }
            scanned = self.end;
            match deadline {
                // Most requests are already waiting when their connection is accepted: read
                // them without arming the timeout (which costs two system calls).
                Some(_) if !self.timeout_set && self.end == 0 && !self.tried_without_timeout => {
                    self.tried_without_timeout = true;
                    let socket = socket2::SockRef::from(stream);
                    // SAFETY: u8 and MaybeUninit<u8> have the same layout, and recv only writes
                    // initialised bytes into the slice.
                    let spare =
                        unsafe { &mut *(&mut self.buf[..] as *mut [u8] as *mut [MaybeUninit<u8>]) };
                    match socket.recv_with_flags(spare, libc::MSG_DONTWAIT) {
                        Ok(0) => return Err(ReadError::Eof { partial: false }),
                        Ok(n) => self.end += n,
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                            ) => {}
                        Err(e) => return Err(ReadError::Io(e)),
                    }
                    continue;
                }
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ReadError::TimedOut);
                    }
                    stream.set_read_timeout(Some(left)).map_err(ReadError::Io)?;
                    self.timeout_set = true;
                }
                None if self.timeout_set => {
                    stream.set_read_timeout(None).map_err(ReadError::Io)?;
                    self.timeout_set = false;
                }
                None => {}
            }
            match stream.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    return Err(ReadError::Eof {
                        partial: self.end > self.start,
                    });
                }
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) && deadline.is_some() => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }
}
