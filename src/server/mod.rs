//! Everything that touches sockets and threads.
//!
//! One acceptor thread per listening socket admits connections (or refuses them with an `err,`
//! line when a limit is reached) and hands them to the worker [`pool`]. A worker runs the whole
//! life of one connection ([`conn`]). The main thread reports to systemd ([`notify`]).
//! The only state shared between connections is the lock table, behind one Mutex that is never
//! held across socket I/O.

pub mod conn;
pub mod listen;
pub mod notify;
pub mod pool;

use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::table::{ConnId, Table};
use conn::Conn;
use listen::Keepalive;

/// Everything the operator can tune; each field is a `tcpnetlock server` flag.
#[derive(Debug, Clone)]
pub struct Config {
    pub max_connections: usize,
    pub max_line: usize,
    pub max_name_len: usize,
    pub request_timeout: Duration,
    pub keepalive: Option<Keepalive>,
    pub allow_shutdown: bool,
    pub idle_worker_timeout: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            max_connections: 10_000,
            max_line: 1024,
            max_name_len: crate::protocol::DEFAULT_MAX_NAME_LEN,
            request_timeout: Duration::from_secs(10),
            keepalive: Some(Keepalive {
                time: Duration::from_secs(20),
                interval: Duration::from_secs(5),
                probes: 4,
            }),
            allow_shutdown: false,
            idle_worker_timeout: Duration::from_secs(30),
        }
    }
}

/// Worker stack size. A connection's deepest path is a log line or a `.stats` reply; 128 KiB
/// leaves ample room and, being mostly untouched, costs little resident memory per holder.
const WORKER_STACK: usize = 128 * 1024;

pub struct Server {
    pub config: Config,
    table: Mutex<Table>,
    pool: pool::Pool<Conn>,
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
}

/// Keeps [`Server::open`] right however a connection ends.
pub struct OpenGuard(Arc<Server>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Server {
    pub fn new(config: Config) -> Arc<Server> {
        let idle = config.idle_worker_timeout;
        Arc::new(Server {
            config,
            table: Mutex::new(Table::new()),
            pool: pool::Pool::new(idle, WORKER_STACK, conn::serve),
            started: Instant::now(),
            requests: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            reserve_fd: Mutex::new(None),
        })
    }

    /// The lock table. Callers keep the guard for one table call, never across I/O.
    pub fn table(&self) -> MutexGuard<'_, Table> {
        // Table methods leave it consistent at every return, so a panic elsewhere while the
        // guard was held does not make it unusable.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Serves the listeners until the process exits. Returns once the acceptors run.
    pub fn start(self: &Arc<Server>, listeners: Vec<TcpListener>) -> io::Result<()> {
        if let Some(first) = listeners.first() {
            *self
                .reserve_fd
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = first.try_clone().ok();
        }
        for listener in listeners {
            // A socket inherited from systemd may have been left non-blocking by a previous
            // instance: the open file description is shared across restarts.
            listener.set_nonblocking(false)?;
            let server = Arc::clone(self);
            thread::Builder::new()
                .name("tcpnetlock-accept".into())
                .spawn(move || server.accept_loop(listener))?;
        }
        Ok(())
    }

    fn accept_loop(self: Arc<Server>, listener: TcpListener) {
        let mut last_warning: Option<Instant> = None;
        loop {
            match listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer),
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

    fn admit(self: &Arc<Server>, stream: TcpStream, peer: SocketAddr) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        let guard = OpenGuard(Arc::clone(self));
        if open > self.config.max_connections {
            debug!("{peer}: refused: {open} connections open");
            return refuse(stream, "err,too many connections\n");
        }
        if let Err(e) = listen::configure_accepted(&stream, self.config.keepalive) {
            debug!("{peer}: cannot set socket options: {e}");
        }
        let id = ConnId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let conn = Conn {
            stream,
            peer,
            id,
            server: Arc::clone(self),
            _open: guard,
        };
        if let Err((conn, e)) = self.pool.submit(conn) {
            warn!("{peer}: refused: cannot start a worker thread: {e}");
            refuse(conn.stream, "err,server busy\n");
        }
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
            refuse(stream, "err,server out of file descriptors\n");
        }
        *reserve = listener.try_clone().ok();
        drop(reserve);
        thread::sleep(Duration::from_millis(10));
    }

    /// `.stats`: 0.1.8's keys first, then what an operator needs.
    pub fn stats_json(&self) -> String {
        let (held, counters) = {
            let table = self.table();
            (table.held(), table.counters())
        };
        let (threads, idle) = self.pool.size();
        let mut json = String::with_capacity(384);
        let _ = write!(
            json,
            "{{\"requests_count\": {}, \"lock_acquired_count\": {}, \
             \"lock_not_acquired_count\": {}, \"lock_count\": {held}, \"maxrss\": {}, \
             \"locks_held\": {held}, \"lock_released_count\": {}, \"connections\": {}, \
             \"threads\": {threads}, \"threads_idle\": {idle}, \"uptime_secs\": {:.3}, \
             \"version\": \"{}\"}}",
            self.requests.load(Ordering::Relaxed),
            counters.acquired,
            counters.not_acquired,
            maxrss_kib(),
            counters.released,
            self.open.load(Ordering::Relaxed),
            self.started.elapsed().as_secs_f64(),
            env!("CARGO_PKG_VERSION"),
        );
        json
    }

    /// One line for `systemctl status`.
    pub fn status_line(&self) -> String {
        let held = self.table().held();
        format!(
            "{held} locks held, {} connections open, {} accepted since start",
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

/// Tells a client it cannot be served and closes, without ever blocking the acceptor: a fresh
/// socket's send buffer is empty, so the line fits.
fn refuse(mut stream: TcpStream, line: &str) {
    let _ = stream.set_nonblocking(true);
    let _ = stream.write_all(line.as_bytes());
    let _ = stream.shutdown(Shutdown::Write);
}

/// Peak resident set size in KiB, as 0.1.8 reported it (`ru_maxrss`).
fn maxrss_kib() -> i64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct we own; on failure we report 0.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } != 0 {
        return 0;
    }
    // SAFETY: getrusage succeeded, so the struct is initialised.
    unsafe { usage.assume_init() }.ru_maxrss
}

/// Raises the soft descriptor limit to the hard one: each held lock is a descriptor, and the
/// usual soft limit of 1024 would cap the server far below `--max-connections`.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain struct in and out.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let old = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                debug!("raised the descriptor limit from {old} to {}", lim.rlim_max);
            }
        }
    }
}
