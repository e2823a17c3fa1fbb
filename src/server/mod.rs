//! Everything that touches sockets and threads.
//!
//! Threads come from the worker [`pool`]. For each listening socket one worker accepts; when it
//! has a client, it hands accepting over to another worker and serves the whole life of that
//! connection itself ([`conn`]), refusing clients with an `err,` line when a limit is reached.
//! A timer thread expires leases and waits; the main thread reports to systemd ([`notify`]).
//! The only state shared between connections is the lock table, behind one Mutex that is never
//! held across socket I/O.

pub mod conn;
pub mod fdlimit;
pub mod link;
pub mod listen;
pub mod locks;
pub mod memory;
pub mod notify;
pub mod pool;
pub mod tokens;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::table::ConnId;
use conn::Conn;
use listen::Keepalive;
use locks::Locks;
use memory::MemoryLocks;
use tcpnetlock::protocol::Reply;

/// Everything the operator can tune; each field is a `tcpnetlock server` flag.
#[derive(Debug, Clone)]
pub struct Config {
    pub max_connections: usize,
    /// Open connections allowed at once from one address; `None`: no limit of its own.
    pub max_connections_per_peer: Option<usize>,
    pub max_line: usize,
    pub max_name_len: usize,
    pub request_timeout: Duration,
    pub keepalive: Option<Keepalive>,
    /// Whether `keepalive` came from flags. If not, sockets passed by systemd with their own
    /// keepalive settings (`KeepAlive=yes` in the socket unit) keep them.
    pub keepalive_from_flags: bool,
    pub allow_shutdown: bool,
    pub idle_worker_timeout: Duration,
    /// Where the fencing-token reservation is kept across restarts (see [`tokens`]).
    pub state_dir: Option<std::path::PathBuf>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            max_connections: 10_000,
            max_connections_per_peer: None,
            max_line: 1024,
            max_name_len: tcpnetlock::protocol::DEFAULT_MAX_NAME_LEN,
            request_timeout: Duration::from_secs(10),
            keepalive: Some(Keepalive {
                time: Duration::from_secs(20),
                interval: Duration::from_secs(5),
                probes: 4,
            }),
            keepalive_from_flags: false,
            allow_shutdown: false,
            idle_worker_timeout: Duration::from_secs(30),
            state_dir: None,
        }
    }
}

/// Connections past a limit (`--max-connections`, or a peer's) that are still read, so that
/// health checks and monitoring are answered when the server is full of holders: they may ask
/// `.ping`, `.stats` or `.locks` (a lock request gets the refusal), within a short time.
const STATUS_RESERVE: usize = 64;
const PEER_STATUS_RESERVE: usize = 4;
const STATUS_ONLY_TIMEOUT: Duration = Duration::from_secs(2);

/// Worker stack size. A connection's deepest path is a log line or a `.stats` reply; 128 KiB
/// leaves ample room and, being mostly untouched, costs little resident memory per holder.
const WORKER_STACK: usize = 128 * 1024;

pub struct Server {
    pub config: Config,
    /// The lock state, and the only way to change it.
    pub locks: Arc<dyn Locks>,
    pool: pool::Pool<Acceptor>,
    started: Instant,
    /// Connections accepted since start (0.1.8's `requests_count`).
    requests: AtomicU64,
    /// Connections open now, admitted or being refused.
    open: AtomicUsize,
    next_id: AtomicU64,
    /// A spare descriptor, closed to make room to accept-and-refuse when the process is out of
    /// descriptors: otherwise the pending connection stays in the backlog and accept() fails at
    /// once, forever, spinning a core.
    reserve_fd: Mutex<Option<TcpListener>>,
    /// Open connections per peer address, kept only with `--max-connections-per-peer`.
    per_peer: Mutex<HashMap<IpAddr, usize>>,
}

/// The one job of a pool worker: accept on `listener` (see [`Server::accept_loop`]).
pub struct Acceptor {
    server: Arc<Server>,
    listener: Arc<TcpListener>,
}

/// Makes sure every listener always has exactly one worker accepting on it: the role is handed
/// over before serving a client, and handed over again if the loop unwinds from a panic.
struct AcceptorRole {
    next: Option<Acceptor>,
}

impl AcceptorRole {
    fn hand_over(&mut self, pool: &pool::Pool<Acceptor>) -> io::Result<()> {
        let next = self.next.take().expect("the role is handed over once");
        pool.submit(next).map_err(|(next, e)| {
            self.next = Some(next);
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
            let _ = server.pool.submit(next);
        }
    }
}

/// Keeps [`Server::open`] and the per-peer counts right however a connection ends.
pub struct OpenGuard {
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
    /// Fails only when the token reservation in `--state-dir` cannot be read or written.
    pub fn new(config: Config) -> io::Result<Arc<Server>> {
        let idle = config.idle_worker_timeout;
        let (first_token, tokens) = tokens::Tokens::start(config.state_dir.as_deref())?;
        Ok(Arc::new(Server {
            config,
            locks: Arc::new(MemoryLocks::new(first_token, tokens)),
            pool: pool::Pool::new(idle, WORKER_STACK, |a: Acceptor| {
                a.server.accept_loop(a.listener)
            }),
            started: Instant::now(),
            requests: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            reserve_fd: Mutex::new(None),
            per_peer: Mutex::new(HashMap::new()),
        }))
    }

    /// Serves the listeners until the process exits. Returns once the acceptors run. `passed`:
    /// the listeners came from systemd.
    pub fn start(self: &Arc<Server>, listeners: Vec<TcpListener>, passed: bool) -> io::Result<()> {
        let inherit = passed && !self.config.keepalive_from_flags;
        for listener in &listeners {
            let k = listen::configure_listener(listener, self.config.keepalive, inherit)?;
            let addr = listener.local_addr()?;
            match k {
                Some(k) => info!(
                    "{addr}: dead peers dropped after {}s (TCP keepalive {}s + {} x {}s)",
                    k.bound().as_secs(),
                    k.time.as_secs(),
                    k.probes,
                    k.interval.as_secs()
                ),
                None => warn!("{addr}: TCP keepalive off: a vanished holder keeps its lock"),
            }
        }
        if let Some(first) = listeners.first() {
            *self
                .reserve_fd
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = first.try_clone().ok();
        }
        Arc::clone(&self.locks).start()?;
        for listener in listeners {
            // A socket inherited from systemd may have been left non-blocking by a previous
            // instance: the open file description is shared across restarts.
            listener.set_nonblocking(false)?;
            self.pool
                .submit(Acceptor {
                    server: Arc::clone(self),
                    listener: Arc::new(listener),
                })
                .map_err(|(_, e)| e)?;
        }
        Ok(())
    }

    /// Runs on a pool worker: accepts until it has a client to serve, hands accepting over to
    /// another worker, and serves that client itself. The client's request is answered by the
    /// thread that accepted it, so no thread hand-off sits on its path (one fewer wake-up per
    /// connection than an acceptor passing connections to workers).
    fn accept_loop(self: Arc<Server>, listener: Arc<TcpListener>) {
        let mut role = AcceptorRole {
            next: Some(Acceptor {
                server: Arc::clone(&self),
                listener: Arc::clone(&listener),
            }),
        };
        let mut last_warning: Option<Instant> = None;
        loop {
            match listener.accept() {
                Ok((stream, peer)) => {
                    let Some(conn) = self.admit(stream, peer) else {
                        continue;
                    };
                    match role.hand_over(&self.pool) {
                        Ok(()) => return conn::serve(conn),
                        Err(e) => {
                            warn!("{peer}: refused: cannot start a worker thread: {e}");
                            refuse(conn.stream, &Reply::err("server busy"));
                        }
                    }
                }
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
        let mut limited = (open > max).then_some(TOO_MANY);
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
                    refuse(stream, &Reply::err(TOO_MANY_FROM_PEER));
                    return None;
                }
                limited = Some(TOO_MANY_FROM_PEER);
            }
        }
        if open > max + STATUS_RESERVE {
            debug!("{peer}: refused: {open} connections open");
            refuse(stream, &Reply::err(TOO_MANY));
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
            refuse(stream, &Reply::err("server out of file descriptors"));
        }
        *reserve = listener.try_clone().ok();
        drop(reserve);
        thread::sleep(Duration::from_millis(10));
    }

    /// `.stats`: 0.1.8's keys first, then what an operator needs.
    pub fn stats_json(&self) -> String {
        let locks::Counts {
            held,
            holders,
            waiting,
            counters: c,
            ..
        } = self.locks.counts();
        let (threads, idle) = self.pool.size();
        let mut json = String::with_capacity(640);
        let _ = write!(
            json,
            "{{\"requests_count\": {}, \"lock_acquired_count\": {}, \
             \"lock_not_acquired_count\": {}, \"lock_count\": {held}, \"maxrss\": {}, \
             \"locks_held\": {held}, \"holders\": {holders}, \"waiting\": {waiting}, \
             \"lock_released_count\": {}, \"granted_after_wait_count\": {}, \
             \"wait_timeout_count\": {}, \"lease_expired_count\": {}, \
             \"max_mismatch_count\": {}, \"connections\": {}, \
             \"threads\": {threads}, \"threads_idle\": {idle}, \"uptime_secs\": {:.3}, \
             \"log_lines_dropped\": {}, \"version\": \"{}\"}}",
            self.requests.load(Ordering::Relaxed),
            c.acquired,
            c.not_acquired,
            maxrss_kib(),
            c.released,
            c.granted_after_wait,
            c.wait_timeouts,
            c.expired,
            c.max_mismatches,
            self.open.load(Ordering::Relaxed),
            self.started.elapsed().as_secs_f64(),
            crate::log::dropped(),
            env!("CARGO_PKG_VERSION"),
        );
        json
    }

    /// `.locks`: every held name with its holders and queue length, sorted by name.
    pub fn locks_json(&self) -> String {
        let locks = self.locks.snapshot();
        let mut json = String::from("{");
        for (i, lock) in locks.iter().enumerate() {
            if i > 0 {
                json.push_str(", ");
            }
            // Names, client-ids and addresses are from restricted alphabets: no escaping needed.
            let _ = write!(
                json,
                "\"{}\": {{\"max\": {}, \"waiting\": {}, \"holders\": [",
                lock.name, lock.max, lock.waiting
            );
            for (j, h) in lock.holders.iter().enumerate() {
                if j > 0 {
                    json.push_str(", ");
                }
                let quoted = |v: Option<String>| v.map_or("null".into(), |v| format!("\"{v}\""));
                let _ = write!(
                    json,
                    "{{\"client_id\": {}, \"peer\": {}, \"held_secs\": {:.3}, \"token\": {}, \
                     \"ttl_secs\": {}}}",
                    quoted(h.client_id.as_deref().map(str::to_owned)),
                    quoted(h.peer.map(|p| p.to_string())),
                    h.held_for.as_secs_f64(),
                    h.token,
                    h.ttl
                        .map_or("null".into(), |t| format!("{:.3}", t.as_secs_f64())),
                );
            }
            json.push_str("]}");
        }
        json.push('}');
        json
    }

    /// One line for `systemctl status`.
    pub fn status_line(&self) -> String {
        let locks::Counts { held, waiting, .. } = self.locks.counts();
        format!(
            "{held} locks held, {waiting} waiting, {} connections open, {} accepted since start",
            self.open.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed)
        )
    }

    /// `.server-shutdown`, when enabled: the process ends, and every lock with it.
    pub fn exit(&self) -> ! {
        notify::stopping();
        info!("exiting on request");
        log::logger().flush();
        std::process::exit(0)
    }
}

const TOO_MANY: &str = "too many connections";
const TOO_MANY_FROM_PEER: &str = "too many connections from your address";

/// Tells a client it cannot be served and closes, without ever blocking the acceptor: a fresh
/// socket's send buffer is empty, so the line fits.
fn refuse(mut stream: TcpStream, reply: &Reply) {
    let _ = stream.set_nonblocking(true);
    let _ = stream.write_all(&reply.to_line());
    let _ = stream.shutdown(Shutdown::Write);
}

/// The server's own peak resident set size in KiB: VmHWM, from /proc/self/status.
///
/// Not `ru_maxrss`, which 0.1.8 reported: Linux carries it across exec, so a server started by a
/// launcher that once used 200 MB reported that launcher's peak. Without /proc, `ru_maxrss` is
/// the fallback: never less than the truth.
fn maxrss_kib() -> i64 {
    let hwm = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
            line["VmHWM:".len()..]
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        });
    if let Some(kib) = hwm {
        return kib;
    }
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct we own; on failure we report 0.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } != 0 {
        return 0;
    }
    // SAFETY: getrusage succeeded, so the struct is initialised.
    unsafe { usage.assume_init() }.ru_maxrss
}
