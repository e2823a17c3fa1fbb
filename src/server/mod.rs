//! Everything that touches sockets and threads.
//!
//! Bytes flow one way: [`accept`] admits a client, [`framing`] cuts its bytes into lines, the
//! protocol parses them, [`conn`] (the session) asks the lock state ([`locks`], kept in memory by
//! [`memory`]) and answers. What a change means for other connections, the lock state tells them
//! through their [`link`]s. Threads come from the worker [`pool`]; the main thread is systemd's
//! and the signals' ([`lifecycle`]). Nothing is written to a socket while lock state is locked.
//! What the server says about itself ([`report`]: `.stats`, `.locks`, the Prometheus metrics)
//! is read from the lock state's counts and the server's own counters at the moment of asking.
//! A restart or an upgrade hands every connection and the lock state to the next process
//! ([`handover`]).

mod accept;
#[cfg(feature = "etcd")]
pub mod cluster;
pub mod config;
pub mod conn;
pub mod fdlimit;
mod framing;
pub mod handover;
pub mod lifecycle;
pub mod link;
pub mod listen;
pub mod locks;
pub mod memory;
pub mod pool;
mod report;
pub mod tokens;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::metrics::ServerMetrics;
use accept::Acceptor;
pub use config::Config;
use handover::rest::{self, Record};
use locks::Locks;
use memory::MemoryLocks;

/// Worker stack size. A connection's deepest path is a log line or a `.stats` reply; 128 KiB
/// leaves ample room and, being mostly untouched, costs little resident memory per holder.
const WORKER_STACK: usize = 128 * 1024;

/// Worker stack size in cluster mode, where a connection's own thread calls etcd: HTTP, JSON
/// and, over https, a TLS handshake whenever no idle connection to etcd is at hand (a debug
/// build overflowed 128 KiB there, and a stack overflow aborts the whole server). Pages never
/// touched cost nothing resident.
const CLUSTER_WORKER_STACK: usize = 1024 * 1024;

/// How long a worker idle since a burst waits for another job before its thread ends.
const IDLE_WORKER_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Server {
    pub config: Config,
    /// The lock state, and the only way to change it.
    pub locks: Arc<dyn Locks>,
    /// What the server counts for Prometheus, beyond the lock state's own totals; shared with
    /// the lock state, which observes the waits and expiries it decides.
    pub metrics: Arc<ServerMetrics>,
    /// The lock state when it is kept in this process, the one a hand-over can take to the next
    /// (`locks` is the same object).
    memory: Option<Arc<MemoryLocks>>,
    pool: pool::Pool<Job, Record>,
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
    /// The listening sockets (open for the life of the process: their acceptors own them) and
    /// whether systemd passed them, for a re-exec to keep.
    listening: OnceLock<(Vec<RawFd>, bool)>,
}

impl Server {
    /// Fails when the token reservation in `--state-dir` cannot be read or written, or the
    /// cluster settings cannot work (this build has no cluster mode; a bad URL; a certificate
    /// that cannot be read): the message says which.
    pub fn new(config: Config) -> Result<Arc<Server>, String> {
        let metrics = Arc::new(ServerMetrics::new());
        let (locks, memory): (Arc<dyn Locks>, _) = match &config.etcd {
            None => {
                let (first_token, tokens) = tokens::Tokens::start(config.state_dir.as_deref())
                    .map_err(|e| format!("cannot keep the fencing-token reservation: {e}"))?;
                let memory = Arc::new(MemoryLocks::new(first_token, tokens, Arc::clone(&metrics)));
                (Arc::clone(&memory) as Arc<dyn Locks>, Some(memory))
            }
            // A cluster member hands nothing over: its lock state is in etcd.
            Some(settings) => (cluster_locks(settings, &metrics)?, None),
        };
        let stack = match config.etcd {
            Some(_) => CLUSTER_WORKER_STACK,
            None => WORKER_STACK,
        };
        Ok(Arc::new(Server {
            config,
            locks,
            metrics,
            memory,
            pool: pool::Pool::new(IDLE_WORKER_TIMEOUT, stack, Job::run),
            started: Instant::now(),
            requests: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            reserve_fd: Mutex::new(None),
            per_peer: Mutex::new(HashMap::new()),
            listening: OnceLock::new(),
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
                    "{addr}: dead peers dropped within {}s (TCP keepalive idle at most {}s + {} x {}s)",
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
        let _ = self
            .listening
            .set((listeners.iter().map(|l| l.as_raw_fd()).collect(), passed));
        for listener in listeners {
            // A socket inherited from systemd may have been left non-blocking by a previous
            // instance: the open file description is shared across restarts.
            listener.set_nonblocking(false)?;
            self.pool
                .submit(Job::Accept(Acceptor {
                    server: Arc::clone(self),
                    listener: Arc::new(listener),
                }))
                .map_err(|(_, e)| e)?;
        }
        Ok(())
    }

    /// Called by a connection's thread when a hand-over asks it to rest: gives `record` to the
    /// hand-over and blocks until the process ends, or goes on if the hand-over is called off.
    pub(super) fn rest(&self, record: Record) {
        self.pool.rest(Some(record), rest::resting);
    }

    /// `.server-shutdown`, when enabled: the process ends, and every lock with it.
    pub fn exit(&self) -> ! {
        lifecycle::stopping();
        info!("exiting on request");
        log::logger().flush();
        std::process::exit(0)
    }
}

#[cfg(feature = "etcd")]
fn cluster_locks(
    settings: &config::EtcdSettings,
    metrics: &Arc<ServerMetrics>,
) -> Result<Arc<dyn Locks>, String> {
    let locks = cluster::EtcdLocks::new(settings, Arc::clone(metrics))
        .map_err(|e| format!("--etcd: {e}"))?;
    info!(
        "cluster mode: lock state in etcd at {} under {}, as member {:?}",
        locks.endpoints().join(","),
        settings.prefix,
        settings.name
    );
    Ok(Arc::new(locks))
}

#[cfg(not(feature = "etcd"))]
fn cluster_locks(
    _: &config::EtcdSettings,
    _: &Arc<ServerMetrics>,
) -> Result<Arc<dyn Locks>, String> {
    Err(
        "--etcd: this build has no cluster mode (it was built without the `etcd` feature; \
         the release binaries and packages have it, or build with `cargo build --features etcd`)"
            .into(),
    )
}

/// What a pool worker runs.
enum Job {
    /// Accept clients on a listener (and serve the first one).
    Accept(Acceptor),
    /// Serve a connection taken over from the previous process. Boxed: a job is moved through
    /// the pool by value, and every worker's stack would otherwise make room for the large
    /// variant (a holder's thread keeps every stack page it touched for as long as it holds).
    Resume(Box<handover::Resumed>),
}

impl Job {
    fn run(self) {
        match self {
            Job::Accept(a) => a.run(),
            Job::Resume(r) => (*r).run(),
        }
    }
}
