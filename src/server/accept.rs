//! Accepting: one worker per listening socket waits in accept(); when it has a client, it hands
//! the role to another worker and serves the client itself, so no thread hand-off sits on a
//! client's path. Limits are checked here, and a client past them is told so with an `err,` line
//! (a few are still read, for status requests: see [`STATUS_RESERVE`]); running out of threads or
//! descriptors is answered the same way, never with a silent close or a spinning loop.

use std::io::{self, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, warn};

use super::conn::{self, Conn};
use super::handover::rest;
use super::{Job, Server};
use crate::metrics::ConnRefusal;
use crate::table::ConnId;
use tcpnetlock::protocol::Reply;

/// Connections past a limit (`--max-connections`, or a peer's) that are still read, so that
/// health checks and monitoring are answered when the server is full of holders: they may ask
/// `.ping`, `.stats`, `.locks` or `GET /metrics` (a lock request gets the refusal), within a
/// short time.
const STATUS_RESERVE: usize = 64;
const PEER_STATUS_RESERVE: usize = 4;
pub(super) const STATUS_ONLY_TIMEOUT: Duration = Duration::from_secs(2);

/// The one job of a pool worker: accept on `listener` (see [`Server::accept_loop`]).
pub(super) struct Acceptor {
    pub(super) server: Arc<Server>,
    pub(super) listener: Arc<TcpListener>,
}

impl Acceptor {
    /// The pool's job.
    pub(super) fn run(self) {
        // Served after the accept loop's frame is gone: a holder's thread parks for as long as
        // the lock is held, and every page of stack it ever touched stays resident meanwhile.
        conn::serve(self.server.accept_loop(self.listener))
    }
}

/// Makes sure every listener always has exactly one worker accepting on it: the role is handed
/// over before serving a client, and handed over again if the loop unwinds from a panic.
struct AcceptorRole {
    next: Option<Acceptor>,
}

impl AcceptorRole {
    fn hand_over(&mut self, server: &Server) -> io::Result<()> {
        let next = self.next.take().expect("the role is handed over once");
        server.pool.submit(Job::Accept(next)).map_err(|(job, e)| {
            if let Job::Accept(next) = job {
                self.next = Some(next);
            }
            e
        })
    }
}

impl Drop for AcceptorRole {
    fn drop(&mut self) {
        if let Some(next) = self.next.take()
            && thread::panicking()
        {
            // Best effort: if no thread can start, the listener has no acceptor until one can.
            let server = Arc::clone(&next.server);
            let _ = server.pool.submit(Job::Accept(next));
        }
    }
}

/// Keeps [`Server::open`] and the per-peer counts right however a connection ends.
pub(super) struct OpenGuard {
    server: Arc<Server>,
    /// The peer's address, when connections are counted per peer.
    peer: Option<IpAddr>,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.server.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(ip) = self.peer {
            let mut per_peer = self
                .server
                .per_peer
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(n) = per_peer.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per_peer.remove(&ip);
                }
            }
        }
    }
}

impl Server {
    /// Runs on a pool worker: accepts until it has a client to serve, hands accepting over to
    /// another worker, and serves that client itself. The client's request is answered by the
    /// thread that accepted it, so no thread hand-off sits on its path (one fewer wake-up per
    /// connection than an acceptor passing connections to workers). Returns that client, to
    /// be served by the caller once this frame is gone.
    #[inline(never)]
    pub(super) fn accept_loop(self: Arc<Server>, listener: Arc<TcpListener>) -> Conn {
        let mut role = AcceptorRole {
            next: Some(Acceptor {
                server: Arc::clone(&self),
                listener: Arc::clone(&listener),
            }),
        };
        let mut last_warning: Option<Instant> = None;
        loop {
            if rest::resting() {
                // A hand-over: new clients wait in the listening socket's backlog, which the
                // next process serves (or this one again, if the hand-over is called off).
                self.pool.rest(None, rest::resting);
                continue;
            }
            match accept(&listener) {
                Ok((stream, peer)) => {
                    let Some(conn) = self.admit(stream, peer) else {
                        continue;
                    };
                    match role.hand_over(&self) {
                        Ok(()) => return conn,
                        Err(e) => {
                            warn!("{peer}: refused: cannot start a worker thread: {e}");
                            self.refuse(conn.stream, ConnRefusal::ServerBusy);
                        }
                    }
                }
                // A signal: perhaps a hand-over's (checked above).
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let out_of_fds = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                    if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        warn!("accept failed: {e}");
                        last_warning = Some(Instant::now());
                    }
                    if out_of_fds {
                        self.refuse_without_fds(&listener);
                    } else if matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::ENOMEM)) {
                        thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        }
    }

    /// Counts the connection and checks the limits; None when it was refused. Past a limit, a
    /// few connections are still admitted to ask for status only.
    fn admit(self: &Arc<Server>, stream: TcpStream, peer: SocketAddr) -> Option<Conn> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        let mut guard = OpenGuard {
            server: Arc::clone(self),
            peer: None,
        };
        let max = self.config.max_connections;
        let mut limited = (open > max).then_some(ConnRefusal::MaxConnections);
        if let Some(per_peer_max) = self.config.max_connections_per_peer {
            let ip = peer.ip().to_canonical();
            let from_peer = {
                let mut per_peer = self.per_peer.lock().unwrap_or_else(PoisonError::into_inner);
                let n = per_peer.entry(ip).or_insert(0);
                *n += 1;
                *n
            };
            guard.peer = Some(ip);
            if from_peer > per_peer_max {
                if from_peer > per_peer_max + PEER_STATUS_RESERVE {
                    debug!("{peer}: refused: {from_peer} connections open from {ip}");
                    self.refuse(stream, ConnRefusal::MaxConnectionsPerPeer);
                    return None;
                }
                limited = Some(ConnRefusal::MaxConnectionsPerPeer);
            }
        }
        if open > max + STATUS_RESERVE {
            debug!("{peer}: refused: {open} connections open");
            self.refuse(stream, ConnRefusal::MaxConnections);
            return None;
        }
        Some(Conn {
            stream,
            peer,
            id: ConnId(self.next_id.fetch_add(1, Ordering::Relaxed)),
            server: Arc::clone(self),
            limited,
            _open: guard,
        })
    }

    /// Counts a connection taken over from the previous process as open, as [`Server::admit`]
    /// does; it was admitted there, so no limit applies.
    pub(super) fn count_taken_over(self: &Arc<Server>, peer: SocketAddr) -> OpenGuard {
        self.open.fetch_add(1, Ordering::Relaxed);
        let mut guard = OpenGuard {
            server: Arc::clone(self),
            peer: None,
        };
        if self.config.max_connections_per_peer.is_some() {
            let ip = peer.ip().to_canonical();
            *self
                .per_peer
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(ip)
                .or_insert(0) += 1;
            guard.peer = Some(ip);
        }
        guard
    }

    /// Out of descriptors: free the spare one, accept the waiting client, tell it, close it, and
    /// take the spare back. The pause keeps a flood from turning this into a busy loop.
    fn refuse_without_fds(&self, listener: &TcpListener) {
        let mut reserve = self
            .reserve_fd
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if reserve.take().is_some()
            && let Ok((stream, _)) = listener.accept()
        {
            self.refuse(stream, ConnRefusal::OutOfFds);
        }
        *reserve = listener.try_clone().ok();
        drop(reserve);
        thread::sleep(Duration::from_millis(10));
    }

    /// Tells a client it cannot be served, and why, and closes, without ever blocking the
    /// acceptor: a fresh socket's send buffer is empty, so the line fits.
    fn refuse(&self, mut stream: TcpStream, why: ConnRefusal) {
        self.metrics.connection_refused(why);
        let _ = stream.set_nonblocking(true);
        let _ = stream.write_all(&Reply::err(refusal_text(why)).to_line());
        let _ = stream.shutdown(Shutdown::Write);
    }
}

/// `TcpListener::accept`, except that a signal interrupts it (std's retries): what lets a
/// hand-over bring the acceptor to rest. The same one system call.
fn accept(listener: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
    let (socket, addr) = socket2::SockRef::from(listener).accept4(libc::SOCK_CLOEXEC)?;
    let peer = addr
        .as_socket()
        .ok_or_else(|| io::Error::other("accepted a connection that is not TCP/IP"))?;
    Ok((socket.into(), peer))
}

/// The `err,` message of a refused connection.
pub(super) fn refusal_text(why: ConnRefusal) -> &'static str {
    match why {
        ConnRefusal::MaxConnections => "too many connections",
        ConnRefusal::MaxConnectionsPerPeer => "too many connections from your address",
        ConnRefusal::ServerBusy => "server busy",
        ConnRefusal::OutOfFds => "server out of file descriptors",
    }
}
