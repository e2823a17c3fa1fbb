//! One connection's life: read the first request, answer it, and if it was a granted `lock`,
//! hold until the client releases or is gone. A first line that is exactly Prometheus' request
//! line (`GET /metrics HTTP/1.1`, or 1.0) is HTTP instead: the head is read and the metrics sent
//! (see [`crate::http`] for why the exact line and nothing else).
//!
//! "Gone" is decided here, and it is where 0.1.8 was wrong: end-of-file on the socket only means
//! the client shut down its sending side (`nc -N`, ncat, busybox nc and socat all do so when their
//! stdin ends) and it may still be waiting for the lock's lifetime to end. So a half-closed holder
//! keeps its lock, and we find out whether it is really gone by sending it data: once the process
//! is dead, its kernel answers data with a reset. The probe is one byte of TCP urgent data, which
//! the kernel keeps out of the normal stream, so the client program never reads it (a pipeline
//! such as `nc ... | head -n 1` would otherwise get a byte on its stdout, or a SIGPIPE).
//!
//! Every place where a connection's thread blocks is also where a hand-over to the next process
//! may ask it to rest ([`handover::rest`](super::handover::rest)): waiting for the first request,
//! for a holder's next request, for a half-closed holder to be gone, for a client to take a reply.
//! Each says where its connection stands (a [`Phase`]: what it read and not handled, what it must
//! still write), and the next process goes on from exactly there ([`serve_from`],
//! [`Session::resumed`]).

use std::io::{self, Write};
use std::mem::MaybeUninit;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use log::{debug, info, warn};

use super::Server;
use super::framing::{ReadError, Requests};
use super::handover::rest::{self, Phase, Record, WriteStop};
use super::link::Link;
use super::locks::Unavailable;
use crate::http::{self, HttpError};
use crate::metrics::{self, ConnRefusal, Release, RequestKind};
use crate::table::{self, ConnId, Decision, Left, State};
use tcpnetlock::protocol::{HeldRequest, LockRequest, Reply, Request};

/// How often a half-closed holder is probed. The lock is freed within about twice this after the
/// client process dies (the write that provokes the reset, then the wait for it).
///
/// The first probe goes at once: end of file is all a full close and a half-close show, and only
/// a probe tells them apart (a closed socket answers it with a reset).
///
/// Who sees a probe: the kernel keeps one urgent byte out of the stream, the latest, and skips an
/// earlier one when the reader has reached it. So a client that has read everything before the
/// next probe arrives never sees a probe, even if it never reads again; a client that still has
/// earlier bytes unread (its `ok`) when a probe comes finds the one before as an empty line
/// after them; with SO_OOBINLINE every probe is an empty line.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// An accepted client, on its way to a worker.
pub(super) struct Conn {
    pub(super) stream: TcpStream,
    pub(super) peer: SocketAddr,
    pub(super) id: ConnId,
    pub(super) server: Arc<Server>,
    /// Admitted past a connection limit: it may ask for status, and a lock request is refused
    /// for this limit.
    pub(super) limited: Option<ConnRefusal>,
    /// Decrements the server's open-connection count when the connection ends, however it ends.
    pub(super) _open: super::accept::OpenGuard,
}

pub(super) fn serve(conn: Conn) {
    let timeout = match conn.limited {
        Some(_) => conn
            .server
            .config
            .request_timeout
            .min(super::accept::STATUS_ONLY_TIMEOUT),
        None => conn.server.config.request_timeout,
    };
    let reader = Requests::new(conn.server.config.max_line);
    serve_from(conn, reader, Instant::now() + timeout);
}

/// Serves a connection from its first request, which must be complete by `deadline`; `reader`
/// may hold part of it already (a connection taken over from the previous process).
pub(super) fn serve_from(conn: Conn, mut reader: Requests, deadline: Instant) {
    let Conn {
        stream,
        peer,
        id,
        server,
        limited,
        _open,
    } = conn;
    let server = &*server;
    let first_request = |unparsed: &[u8]| Phase::FirstRequest {
        left: deadline.saturating_duration_since(Instant::now()),
        limited,
        unparsed: unparsed.to_vec(),
    };
    let line = reader.next_line(&stream, Some(deadline), |unparsed| {
        server.rest(Record::new(&stream, id, peer, first_request(unparsed)))
    });
    let here = Here {
        server,
        stream: &stream,
        id,
        peer,
    };
    let line = match line {
        Ok(line) => line,
        Err(ReadError::Eof { partial: false }) => return,
        Err(ReadError::Eof { partial: true }) | Err(ReadError::TooLong) => {
            server.metrics.request(RequestKind::Bad);
            return here.finish(&Reply::BadRequest);
        }
        Err(ReadError::Io(e)) if e.kind() == io::ErrorKind::TimedOut => {
            debug!("{peer}: no complete request within the request timeout, closing");
            // Past a limit, the reason it was not served is the limit.
            return match limited {
                Some(why) => refuse_limited(here, why),
                None => here.finish(&Reply::err("request timeout")),
            };
        }
        Err(ReadError::Io(e)) => {
            debug!("{peer}: {e}");
            return;
        }
    };
    if let Some(version) = http::metrics_request(line) {
        let first = line.to_vec();
        return serve_metrics(here, &mut reader, deadline, limited, version, first);
    }
    let request = match Request::parse(line, server.config.max_name_len) {
        Ok(r) => r,
        Err(reply) => {
            debug!("{peer}: {reply} for {:?}", String::from_utf8_lossy(line));
            server.metrics.request(RequestKind::Bad);
            return here.finish(&reply);
        }
    };
    // Counted before the answer goes out: a client that has its answer finds it counted.
    server.metrics.request(match request {
        Request::Ping | Request::PingServing => RequestKind::Ping,
        Request::Info => RequestKind::Info,
        Request::Stats => RequestKind::Stats,
        Request::Locks => RequestKind::Locks,
        Request::Shutdown => RequestKind::Shutdown,
        Request::Lock(_) => RequestKind::Lock,
    });
    match request {
        Request::Lock(req) if limited.is_none() => {
            if let Some(session) = Session::start(server, stream, peer, id, &req) {
                session.run(&mut reader, Vec::new());
            }
        }
        other => answer(here, other, limited),
    }
}

/// Every first request but a lock: answered, and the connection closed. Out of line, so that a
/// holder's thread, parked for as long as its lock is held, never touched the stack these need.
#[inline(never)]
fn answer(here: Here<'_>, request: Request, limited: Option<ConnRefusal>) {
    let server = here.server;
    match request {
        Request::Ping => here.finish(&Reply::Pong),
        Request::PingServing => {
            let refusal = server.locks.cluster().and_then(|c| match c.serving {
                Some(true) => None,
                _ => Some(c.reason.unwrap_or_else(|| "cannot serve locks".into())),
            });
            match refusal {
                None => here.finish(&Reply::Pong),
                Some(why) => here.finish(&Reply::Err(format!("not serving locks: {why}").into())),
            }
        }
        Request::Info => here.finish(&Reply::Info(server.info_json())),
        Request::Stats => here.finish(&Reply::Stats(server.stats_json())),
        Request::Locks => here.finish(&Reply::Locks(server.locks_json())),
        Request::Shutdown => shutdown(here),
        Request::Lock(_) => {
            let why = limited.expect("serve_from keeps unlimited lock requests");
            debug!(
                "{}: lock refused: {}",
                here.peer,
                super::accept::refusal_text(why)
            );
            refuse_limited(here, why);
        }
    }
}

/// A connection as its own thread sees it, for the replies that end it.
#[derive(Clone, Copy)]
struct Here<'a> {
    server: &'a Server,
    stream: &'a TcpStream,
    id: ConnId,
    peer: SocketAddr,
}

impl Here<'_> {
    /// Writes `bytes`, blocking while the client has no room for them. A hand-over asks this
    /// thread to rest meanwhile: it rests as `phase(what is left)`, and goes on if the
    /// hand-over is called off.
    fn write(&self, bytes: &[u8], phase: impl Fn(Vec<u8>) -> Phase) -> io::Result<()> {
        let mut written = rest::write_all(self.stream, bytes);
        loop {
            match written {
                Ok(()) => return Ok(()),
                Err(WriteStop::Failed(e)) => return Err(e),
                Err(WriteStop::Resting(unsent)) => {
                    self.rest(phase(unsent.clone()));
                    written = rest::write_all(self.stream, &unsent);
                }
            }
        }
    }

    fn rest(&self, phase: Phase) {
        self.server
            .rest(Record::new(self.stream, self.id, self.peer, phase));
    }

    /// Writes the last reply and closes. Bytes the client sent that we never read are drained
    /// first: closing over unread data makes the kernel send a reset, which can destroy the
    /// reply before the client reads it.
    fn finish(&self, reply: &Reply) {
        self.finish_with(&reply.to_line());
    }

    /// [`Here::finish`] with the reply's bytes.
    fn finish_with(&self, bytes: &[u8]) {
        if self
            .write(bytes, |unsent| Phase::Closing { unsent })
            .is_ok()
        {
            finish_quietly(self.stream);
        }
    }
}

/// A connection admitted past a limit asked for a lock, or for nothing in time: it is refused
/// for that limit.
fn refuse_limited(here: Here<'_>, why: ConnRefusal) {
    here.server.metrics.connection_refused(why);
    here.finish(&Reply::err(super::accept::refusal_text(why)));
}

/// `GET /metrics`: the rest of the request head is read under the first line's deadline and
/// checked, then the metrics are sent and the connection closed (`Connection: close`). The head
/// read so far is kept (it is small), so that a hand-over can give the next process the request
/// as it came.
fn serve_metrics(
    here: Here<'_>,
    reader: &mut Requests,
    deadline: Instant,
    limited: Option<ConnRefusal>,
    version: http::Version,
    first: Vec<u8>,
) {
    let Here { server, peer, .. } = here;
    let mut head = http::Head::new(version);
    let mut read = first;
    read.push(b'\n');
    let checked = loop {
        let line = reader.next_line(here.stream, Some(deadline), |unparsed| {
            here.rest(Phase::FirstRequest {
                left: deadline.saturating_duration_since(Instant::now()),
                limited,
                unparsed: [&read[..], unparsed].concat(),
            })
        });
        let line = match line {
            Ok(line) => line,
            // A header line longer than --max-line-length.
            Err(ReadError::TooLong) => break Err(HttpError::TooLarge),
            Err(ReadError::Io(e)) if e.kind() == io::ErrorKind::TimedOut => {
                break Err(HttpError::TimedOut);
            }
            // The client can still read (`echo 'GET /metrics HTTP/1.0' | nc -N`): tell it.
            Err(ReadError::Eof { .. }) => {
                break Err(HttpError::Malformed(
                    "the request ended before the blank line that ends its head",
                ));
            }
            Err(ReadError::Io(e)) => {
                debug!("{peer}: GET /metrics: {e}");
                return;
            }
        };
        read.extend_from_slice(line);
        read.push(b'\n');
        match head.line(line) {
            Ok(false) => {}
            Ok(true) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    let now = SystemTime::now();
    let response = match checked {
        Ok(()) => {
            server.metrics.request(RequestKind::Metrics);
            let text = server.metrics_text();
            http::response(
                http::Status::OK,
                metrics::CONTENT_TYPE,
                text.as_bytes(),
                now,
            )
        }
        Err(e) => {
            debug!("{peer}: GET /metrics refused: {}", e.message());
            // A timeout is not a request, as on the line protocol.
            if e != HttpError::TimedOut {
                server.metrics.request(RequestKind::Bad);
            }
            http::error_response(&e, now)
        }
    };
    here.finish_with(&response);
}

/// A connection that holds or waits for a lock. Dropping it takes the connection out of the
/// table and hands its place on, so every way out — release, disconnect, error, even a panic —
/// gives the lock back (except the end of the process after a hand-over, when it never drops).
pub(super) struct Session<'a> {
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
        let here = Here {
            server,
            stream: link.stream(),
            id,
            peer,
        };
        let decision = server.locks.lock(
            req.name,
            table::Claim {
                conn: id,
                client_id: req.client_id.map(Into::into),
                peer: Some(peer),
                max: req.max,
                wait: req.wait,
                ttl: req.ttl,
                shared: req.shared,
                handle: Arc::clone(&link),
            },
        );
        let name = req.name;
        let decision = match decision {
            Ok(decision) => decision,
            Err(Unavailable(why)) => {
                debug!("{peer}: lock {name} not served: {why}");
                here.finish(&Reply::Err(why.into()));
                return None;
            }
        };
        match decision {
            Decision::Granted { token } => debug!("{peer}: lock {name} granted (token {token})"),
            Decision::Queued => debug!("{peer}: lock {name} queued"),
            Decision::NotGranted => {
                debug!("{peer}: lock {name} not granted");
                here.finish(&Reply::NotGranted);
                return None;
            }
            Decision::MaxMismatch { max } => {
                debug!(
                    "{peer}: lock {name} max:{} refused, held with max:{max}",
                    req.max
                );
                let msg = format!("max mismatch: {name} is held with max:{max}");
                here.finish(&Reply::Err(msg.into()));
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

    /// A holder or waiter taken over from the previous process: the table has it already.
    pub(super) fn resumed(
        server: &'a Server,
        link: Arc<Link>,
        id: ConnId,
        peer: SocketAddr,
    ) -> Session<'a> {
        Session {
            server,
            link,
            id,
            peer,
        }
    }

    fn here(&self) -> Here<'_> {
        Here {
            server: self.server,
            stream: self.link.stream(),
            id: self.id,
            peer: self.peer,
        }
    }

    /// Where this connection is, for a hand-over.
    fn phase(&self, unparsed: &[u8], unsent: Vec<u8>) -> Phase {
        Phase::Session {
            name: self.link.name.clone(),
            fencing: self.link.fencing,
            unparsed: unparsed.to_vec(),
            unsent,
        }
    }

    /// Serves the holder's (or waiter's) requests until it releases or is gone. `unsent`: the
    /// end of a reply the previous process could not write yet (a connection taken over).
    pub(super) fn run(self, reader: &mut Requests, unsent: Vec<u8>) {
        let stream = self.link.stream();
        if !unsent.is_empty() {
            let phase = |unsent| self.phase(reader.unparsed(), unsent);
            if self.here().write(&unsent, phase).is_err() {
                return;
            }
        }
        loop {
            let line = reader.next_line(stream, None, |unparsed| {
                self.here().rest(self.phase(unparsed, Vec::new()))
            });
            let line = match line {
                Ok(line) => line,
                Err(ReadError::TooLong) => {
                    // Closed by the server: to the holder, as if its connection had ended.
                    self.leave(Release::Disconnect);
                    return self.last_reply(&Reply::BadRequest);
                }
                Err(ReadError::Eof { .. }) => {
                    // Either the client half-closed, or another thread hung up on it after an
                    // expiry or a timeout (the table no longer has it).
                    if self.server.locks.state(&self.link.name, self.id) != State::Absent {
                        self.watch_half_closed();
                    }
                    return;
                }
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
                    self.leave(Release::Release);
                    return self.last_reply(&Reply::Released);
                }
                Ok(HeldRequest::Renew) => Reply::Alive,
                Err(reply) => reply,
            };
            match self.link.reply(&reply) {
                Ok(()) => {}
                Err(WriteStop::Failed(_)) => return,
                Err(WriteStop::Resting(unsent)) => {
                    let phase = |unsent| self.phase(reader.unparsed(), unsent);
                    self.here().rest(phase(unsent.clone()));
                    if self.here().write(&unsent, phase).is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// The last reply, once out of the table, then the connection is finished.
    fn last_reply(&self, reply: &Reply) {
        match self.link.reply(reply) {
            Ok(()) => finish_quietly(self.link.stream()),
            Err(WriteStop::Failed(_)) => {}
            Err(WriteStop::Resting(unsent)) => {
                let here = self.here();
                here.rest(Phase::Closing {
                    unsent: unsent.clone(),
                });
                here.finish_with(&unsent);
            }
        }
    }

    /// Leaves the table and hands the place on; a holder's leaving is counted as `how`.
    /// Idempotent: the table ignores a second call.
    fn leave(&self, how: Release) {
        match self.server.locks.leave(&self.link.name, self.id) {
            Left::Held(d) => {
                self.server.metrics.released(how, d);
                debug!(
                    "{}: lock {}: released after holding {:.3}s",
                    self.peer,
                    self.link.name,
                    d.as_secs_f64()
                )
            }
            Left::Waited(d) => debug!(
                "{}: lock {}: left the queue after {:.3}s",
                self.peer,
                self.link.name,
                d.as_secs_f64()
            ),
            Left::Absent => {}
        }
    }

    /// The client shut down its sending side. It can no longer release, so it holds (or waits)
    /// until it is gone, or until the table lets it go (lease, wait timeout).
    pub(super) fn watch_half_closed(&self) {
        debug!(
            "{}: lock {}: half-closed; probing",
            self.peer, self.link.name
        );
        let stream = self.link.stream();
        let socket = socket2::SockRef::from(stream);
        let rest = || {
            self.here().rest(Phase::HalfClosed {
                name: self.link.name.clone(),
                fencing: self.link.fencing,
            })
        };
        loop {
            // A `\n`, so that a middlebox which clears the urgent flag turns it into a blank
            // line.
            let gone = match socket.send_out_of_band(b"\n") {
                Ok(_) => match peer_reset_within(stream, PROBE_INTERVAL) {
                    Watch::Reset => true,
                    Watch::Quiet => false,
                    Watch::Interrupted => {
                        if rest::resting() {
                            rest();
                        }
                        false
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    if rest::resting() {
                        rest();
                    }
                    false
                }
                Err(_) => true,
            };
            if gone {
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
        self.leave(Release::Disconnect);
    }
}

/// What [`peer_reset_within`] saw.
enum Watch {
    Reset,
    Quiet,
    /// A signal came first (perhaps a hand-over's).
    Interrupted,
}

/// Blocks until the socket reports an error or a hang-up, or `timeout` passes. On a half-closed
/// socket reads are always ready (end of file), so this polls for nothing but errors.
fn peer_reset_within(stream: &TcpStream, timeout: Duration) -> Watch {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd, owned by this frame, for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        return Watch::Interrupted;
    }
    if n > 0 && pfd.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
        Watch::Reset
    } else {
        Watch::Quiet
    }
}

fn shutdown(here: Here<'_>) {
    let Here {
        server,
        stream,
        peer,
        ..
    } = here;
    if !server.config.allow_shutdown {
        warn!("{peer}: .server-shutdown refused (not enabled on this server)");
        return here.finish(&Reply::err("server-shutdown not enabled"));
    }
    if !peer.ip().to_canonical().is_loopback() {
        warn!("{peer}: .server-shutdown refused (only accepted from loopback)");
        return here.finish(&Reply::err("server-shutdown only accepted from loopback"));
    }
    info!("{peer}: .server-shutdown received; exiting");
    let _ = send(stream, &Reply::ShuttingDown);
    let _ = stream.shutdown(Shutdown::Write);
    server.exit();
}

fn send(mut stream: &TcpStream, reply: &Reply) -> io::Result<()> {
    stream.write_all(&reply.to_line())
}

/// A connection taken over while its last reply was being written: the rest of it, then the
/// close.
pub(super) fn finish_resumed(
    server: &Server,
    stream: &TcpStream,
    id: ConnId,
    peer: SocketAddr,
    unsent: &[u8],
) {
    Here {
        server,
        stream,
        id,
        peer,
    }
    .finish_with(unsent);
}

/// Ends a connection once its last reply is written: see [`Here::finish`].
pub(super) fn finish_quietly(stream: &TcpStream) {
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
