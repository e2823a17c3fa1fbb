//! Handing every live connection and the lock state to the next server process, so that a
//! restart or an upgrade drops no lock: holders keep their locks and their connections, waiters
//! their place in line, leases and waits their remaining time, tokens keep growing. The clients
//! see nothing: their TCP connections never close, the listening sockets neither (new clients wait
//! in the backlog meanwhile).
//!
//! The old process brings every connection's thread to rest where no byte can be lost
//! ([`rest`]), holds the lock table still (`MemoryLocks::freeze`), and packs what the next
//! process needs into two descriptors:
//!
//! - the **state** ([`wire`]: the table, each connection's phase and the bytes it had read and
//!   not handled or had to write and could not), in a sealed memfd ([`memfd`]);
//! - the **bag** ([`bag`]): one datagram socket whose queue holds every connection's descriptor
//!   in flight. One descriptor instead of thousands: systemd compares each stored descriptor with
//!   every one stored before (n² for n connections, inside PID 1).
//!
//! Two ways to the next process:
//!
//! - under systemd, on SIGTERM, the unit's **file descriptor store** ([`notify`]: `FDSTORE=1`,
//!   the unit needs `FileDescriptorStoreMax=`): `systemctl restart` gives the next process the
//!   store in LISTEN_FDS, named; `systemctl stop` closes what was stored (the clients see the
//!   close, as they always did). The old process cannot tell the two apart, so it stores on both.
//! - on SIGUSR2 (and `systemctl reload`, whose ExecReload= sends it), a **re-exec** of the
//!   server's own file ([`reexec`]) keeping the listeners, the state and the bag open, their
//!   numbers in `TCPNETLOCK_HANDOVER`. The process stays (PID, systemd's MainPID), the program is
//!   new. Before anything rests the new program is asked which state versions it reads
//!   (`tcpnetlock __handover-versions`), and a program that cannot read ours is not run.
//!
//! The next process finds each connection by its socket's inode, written in the state:
//! descriptor numbers and the order systemd passes stored descriptors in both change on the way.
//! A state it cannot read (another version, damaged, a connection missing) it refuses, saying
//! why: every connection that came with it is closed, as a restart without hand-over would, and
//! it starts empty. Nothing is guessed.
//!
//! Only lock state kept in this process is handed over: a cluster member (lock state in etcd)
//! restarts as before, its clients reconnecting, while the other members serve.

pub mod bag;
pub mod memfd;
pub mod notify;
pub mod reexec;
pub mod rest;
pub mod wire;

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use super::conn::{self, Conn, Session};
use super::framing::Requests;
use super::link::Link;
use super::memory::Frozen;
use super::{Job, Server};
use crate::table::ConnId;
use rest::{Phase, Record};

/// The names of the two entries in systemd's fd store.
pub const FDNAME_STATE: &str = "tcpnetlock-state";
pub const FDNAME_CONNS: &str = "tcpnetlock-conns";

/// The environment variable that gives a re-executed program what it inherits.
const ENV: &str = "TCPNETLOCK_HANDOVER";

/// For tests only: the state version this process writes instead of its own
/// ([`wire::VERSION`]), and skipping the successor's version check, to see a new program refuse
/// a state it cannot read.
const ENV_TEST_VERSION: &str = "TCPNETLOCK_TEST_HANDOVER_VERSION";
const ENV_TEST_SKIP_PROBE: &str = "TCPNETLOCK_TEST_HANDOVER_SKIP_PROBE";

/// The hidden subcommand that prints the state versions a program reads.
pub const VERSIONS_COMMAND: &str = "__handover-versions";

/// How long the connections' threads have to come to rest. A thread writing to a client that
/// does not read comes to rest too (its unwritten bytes travel); this bounds what cannot be
/// interrupted, a disk slow to write the token reservation for one.
const REST_WITHIN: Duration = Duration::from_secs(2);
/// How often the threads not at rest yet are woken again.
const WAKE_EVERY: Duration = Duration::from_millis(2);
/// How long systemd may take to read what was stored.
const BARRIER_WITHIN: Duration = Duration::from_secs(5);
/// How long the successor may take to say which versions it reads.
const PROBE_WITHIN: Duration = Duration::from_secs(5);

/// What a re-exec runs: the executable's path when the server started, and its arguments.
struct Start {
    exe: PathBuf,
    args: Vec<OsString>,
}

static START: OnceLock<Start> = OnceLock::new();

/// When this program started (CLOCK_MONOTONIC, ns), to log how a hand-over's time was spent.
static STARTED_NS: OnceLock<u64> = OnceLock::new();

/// Records the program's path and arguments for a later re-exec. Call it at start: an upgrade
/// renames a new file over the path, and `/proc/self/exe` then names the old, deleted one.
pub fn remember_start() {
    match reexec::own_path() {
        Ok(exe) => {
            let _ = START.set(Start {
                exe,
                args: std::env::args_os().collect(),
            });
        }
        Err(e) => warn!("cannot read /proc/self/exe ({e}): SIGUSR2 will not re-execute"),
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock both processes share (std's `Instant` reads it
/// too, but cannot say its value).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into ts.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn ms_since(ns: u64) -> f64 {
    monotonic_ns().saturating_sub(ns) as f64 / 1e6
}

/// The socket's inode number: the same in every process that has the socket and unique among
/// the sockets that exist, so the state names connections by it.
fn inode(fd: RawFd) -> io::Result<u64> {
    // SAFETY: stat is plain data, filled by fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into st.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_ino)
}

/// The state version this process writes.
fn write_version() -> u32 {
    std::env::var(ENV_TEST_VERSION)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(wire::VERSION)
}

/// What the previous process left this one.
#[derive(Default)]
pub struct Inherited {
    /// Listeners kept across a re-exec, and whether systemd had passed them.
    pub listeners: Option<(Vec<TcpListener>, bool)>,
    state: Option<OwnedFd>,
    bags: Vec<OwnedFd>,
    /// They came from systemd's fd store, where they stay until removed.
    from_store: bool,
}

impl Inherited {
    /// What a re-exec left in `TCPNETLOCK_HANDOVER` (removed from the environment, so that
    /// nothing started later sees it).
    ///
    /// # Safety
    /// Changes the environment: call it before any thread starts.
    pub unsafe fn from_exec() -> Result<Inherited, String> {
        STARTED_NS.get_or_init(monotonic_ns);
        let Some(value) = std::env::var_os(ENV) else {
            return Ok(Inherited::default());
        };
        // SAFETY: the caller promises no other thread runs.
        unsafe { std::env::remove_var(ENV) };
        let value = value.to_string_lossy().into_owned();
        let bad = || format!("{ENV}={value:?} is not what a tcpnetlock re-exec leaves");
        let mut inherited = Inherited::default();
        let mut listeners = Vec::new();
        let mut passed = false;
        // Take every descriptor named, whatever else is wrong, so that none stays open unowned.
        let mut wrong = false;
        for field in value.split_whitespace() {
            let Some((key, v)) = field.split_once('=') else {
                wrong = true;
                continue;
            };
            let fds = || {
                v.split(',')
                    .filter(|f| !f.is_empty())
                    .map(|f| f.parse::<RawFd>())
            };
            match key {
                "state" | "bag" | "listeners" => {
                    for fd in fds() {
                        let Ok(fd) = fd else {
                            wrong = true;
                            continue;
                        };
                        // SAFETY: F_SETFD on the number the previous image left open for us;
                        // a number that is not open fails here and is not taken.
                        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
                            wrong = true;
                            continue;
                        }
                        // SAFETY: the previous image of this process left it open for us alone.
                        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                        match key {
                            "state" => inherited.state = Some(fd),
                            "bag" => inherited.bags.push(fd),
                            _ => listeners.push(TcpListener::from(fd)),
                        }
                    }
                }
                "passed" => passed = v == "1",
                _ => wrong = true,
            }
        }
        if wrong {
            return Err(bad());
        }
        inherited.listeners = Some((listeners, passed));
        Ok(inherited)
    }

    /// Adds what systemd's fd store passed (see `listen::from_systemd`).
    pub fn add_stored(&mut self, stored: Vec<(String, OwnedFd)>) {
        for (name, fd) in stored {
            self.from_store = true;
            if name == FDNAME_STATE && self.state.is_none() {
                self.state = Some(fd);
            } else if name == FDNAME_CONNS {
                self.bags.push(fd);
            } else {
                warn!("closing a second {name} passed from systemd's fd store");
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.state.is_none() && self.bags.is_empty()
    }
}

/// A connection taken over, to be served by a pool worker from where it was.
pub(super) struct Resumed {
    server: Arc<Server>,
    socket: Socket,
    id: ConnId,
    peer: SocketAddr,
    phase: Phase,
    open: super::accept::OpenGuard,
}

/// How a connection taken over is reached: a holder's or waiter's through the link the table
/// holds, the others' directly.
enum Socket {
    Stream(TcpStream),
    Link(Arc<Link>),
}

impl Resumed {
    #[inline(never)]
    pub(super) fn run(self) {
        let Resumed {
            server,
            socket,
            id,
            peer,
            phase,
            open,
        } = self;
        let max_line = server.config.max_line;
        match (phase, socket) {
            (
                Phase::FirstRequest {
                    left,
                    limited,
                    unparsed,
                },
                Socket::Stream(stream),
            ) => {
                let conn = Conn {
                    stream,
                    peer,
                    id,
                    server: Arc::clone(&server),
                    limited,
                    _open: open,
                };
                let reader = Requests::resume(max_line, &unparsed);
                conn::serve_from(conn, reader, Instant::now() + left);
            }
            (
                Phase::Session {
                    unparsed, unsent, ..
                },
                Socket::Link(link),
            ) => {
                let session = Session::resumed(&server, link, id, peer);
                session.run(&mut Requests::resume(max_line, &unparsed), unsent);
                drop(open);
            }
            (Phase::HalfClosed { .. }, Socket::Link(link)) => {
                // Watched until gone; then the session's end gives its place back.
                Session::resumed(&server, link, id, peer).watch_half_closed();
                drop(open);
            }
            (Phase::Closing { unsent }, Socket::Stream(stream)) => {
                conn::finish_resumed(&server, &stream, id, peer, &unsent);
                drop(open);
            }
            // take() pairs each phase with the socket it needs.
            _ => {}
        }
    }
}

/// Whether SIGTERM should hand over through systemd's fd store: under systemd, with lock state
/// in this process, and unless systemd (254 and later) says the unit has no store.
pub fn to_store_on_sigterm(server: &Server) -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
        && server.memory.is_some()
        && std::env::var("FDSTORE")
            .map_or(true, |n| n.trim().parse::<u32>().map_or(true, |n| n >= 2))
}

/// Everything packed for the next process; holding it keeps the table still.
struct Packed<'a> {
    _frozen: Frozen<'a>,
    memfd: OwnedFd,
    bag: OwnedFd,
    summary: String,
}

/// Brings every connection to rest and packs the state and the connections. On failure the
/// server goes on as before (nothing was lost) and the reason is returned.
fn pack(server: &Server, signalled_ns: u64) -> Result<Packed<'_>, String> {
    let Some(memory) = &server.memory else {
        return Err("a cluster member keeps no lock state of its own to hand over".into());
    };
    let started = monotonic_ns();
    rest::set_resting(true);
    let undo = || {
        rest::set_resting(false);
        server.pool.resume();
    };
    if !server
        .pool
        .quiesce(WAKE_EVERY, Instant::now() + REST_WITHIN, rest::wake)
    {
        undo();
        return Err(format!(
            "not every connection's thread came to rest within {} s",
            REST_WITHIN.as_secs()
        ));
    }
    let at_rest_ms = ms_since(started);
    let records = server.pool.take_records();
    let frozen = memory.freeze();
    let exported_ns = monotonic_ns();
    let table = frozen.export(Instant::now());
    let mut conns = Vec::with_capacity(records.len());
    for Record {
        fd,
        id,
        peer,
        phase,
    } in &records
    {
        let inode = match inode(*fd) {
            Ok(i) => i,
            Err(e) => {
                drop(frozen);
                undo();
                return Err(format!("cannot stat connection {} ({peer}): {e}", id.0));
            }
        };
        conns.push(wire::Conn {
            id: *id,
            inode,
            peer: *peer,
            phase: phase.clone(),
        });
    }
    let holders: usize = table.names.iter().map(|n| n.holders.len()).sum();
    let waiters: usize = table.names.iter().map(|n| n.waiters.len()).sum();
    let state = wire::State {
        server_version: env!("CARGO_PKG_VERSION").into(),
        signalled_ns,
        exported_ns,
        next_conn: server.next_id.load(std::sync::atomic::Ordering::Relaxed),
        accepted: server.requests.load(std::sync::atomic::Ordering::Relaxed),
        table,
        conns,
    };
    let bytes = wire::encode(&state, write_version());
    let fds: Vec<RawFd> = records.iter().map(|r| r.fd).collect();
    let packed = memfd::write(c"tcpnetlock-state", &bytes).and_then(|m| Ok((m, bag::pack(&fds)?)));
    let (memfd, bag) = match packed {
        Ok(p) => p,
        Err(e) => {
            drop(frozen);
            undo();
            return Err(format!("cannot pack the state and the connections: {e}"));
        }
    };
    let summary = format!(
        "{} connections ({holders} holders, {waiters} waiters, {}), {} bytes of state; at rest \
         in {at_rest_ms:.1} ms, packed {:.1} ms after the signal",
        records.len(),
        others(state.conns.iter().map(|c| &c.phase)),
        bytes.len(),
        ms_since(signalled_ns)
    );
    Ok(Packed {
        _frozen: frozen,
        memfd,
        bag,
        summary,
    })
}

/// How many connections are not holders or waiters: "1 reading its first request, 2 closing".
fn others<'a>(phases: impl Iterator<Item = &'a Phase>) -> String {
    let (mut first, mut closing) = (0, 0);
    for p in phases {
        match p {
            Phase::FirstRequest { .. } => first += 1,
            Phase::Closing { .. } => closing += 1,
            Phase::Session { .. } | Phase::HalfClosed { .. } => {}
        }
    }
    format!("{first} reading their first request, {closing} closing")
}

/// SIGTERM under systemd: everything into the unit's fd store, then exit. Returns only if
/// nothing was stored; the caller then stops as without a hand-over.
pub fn to_systemd(server: &Server, signalled_ns: u64) {
    info!(
        "stopping on SIGTERM: handing every connection to the next process through systemd's \
         fd store (on a restart it passes them on; on a stop it closes them) ({})",
        server.status_line()
    );
    super::lifecycle::stopping_with("stopping on SIGTERM: handing every connection over");
    let packed = match pack(server, signalled_ns) {
        Ok(p) => p,
        Err(why) => {
            warn!("cannot hand over: {why}; closing every connection instead");
            return;
        }
    };
    let stored = notify::store(FDNAME_CONNS, &[packed.bag.as_raw_fd()], false)
        // The state goes last: a state in the store says the connections are all there.
        .and_then(|_| notify::store(FDNAME_STATE, &[packed.memfd.as_raw_fd()], false))
        .and_then(|_| notify::barrier(BARRIER_WITHIN));
    match stored {
        Ok(true) => info!(
            "handed over {}; exiting {:.1} ms after the signal",
            packed.summary,
            ms_since(signalled_ns)
        ),
        Ok(false) => warn!(
            "stored {} in systemd's fd store, which did not confirm within {} s; exiting",
            packed.summary,
            BARRIER_WITHIN.as_secs()
        ),
        Err(e) => warn!("cannot store the hand-over in systemd's fd store ({e}); exiting"),
    }
    log::logger().flush();
    std::process::exit(0);
}

/// Asks the program at `exe` which state versions it reads.
fn successor_reads(exe: &std::path::Path) -> Result<Vec<u32>, String> {
    let mut child = std::process::Command::new(exe)
        .arg(VERSIONS_COMMAND)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    let deadline = Instant::now() + PROBE_WITHIN;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} {VERSIONS_COMMAND} did not answer within {} s",
                    exe.display(),
                    PROBE_WITHIN.as_secs()
                ));
            }
            Err(e) => return Err(format!("waiting for {}: {e}", exe.display())),
        }
    };
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = io::Read::read_to_string(&mut stdout, &mut out);
    }
    if !status.success() {
        return Err(format!(
            "{} {VERSIONS_COMMAND} failed ({status}): it is a version without hand-over, or \
             not tcpnetlock",
            exe.display()
        ));
    }
    Ok(out
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect())
}

/// SIGUSR2: re-executes the server's file (perhaps a new version) keeping every connection.
/// Returns if that did not happen, saying why; the server then serves on as before.
pub fn by_exec(server: &Server, signalled_ns: u64) {
    let Some(start) = START.get() else {
        warn!("SIGUSR2 ignored: the server's own path is not known");
        return;
    };
    if server.memory.is_none() {
        warn!(
            "SIGUSR2 ignored: a cluster member does not hand over; restart it (its clients \
             reconnect, the other members serve meanwhile)"
        );
        return;
    }
    let version = write_version();
    if std::env::var_os(ENV_TEST_SKIP_PROBE).is_none() {
        match successor_reads(&start.exe) {
            Ok(reads) if reads.contains(&version) => {}
            Ok(reads) => {
                return warn!(
                    "SIGUSR2: not re-executing {}: it reads hand-over state version(s) {:?}, \
                     this server writes version {version}; restart the service to switch \
                     (its connections close)",
                    start.exe.display(),
                    reads
                );
            }
            Err(e) => return warn!("SIGUSR2: not re-executing: {e}"),
        }
    }
    info!(
        "SIGUSR2: re-executing {} with every connection",
        start.exe.display()
    );
    super::lifecycle::reloading();
    let packed = match pack(server, signalled_ns) {
        Ok(p) => p,
        Err(why) => {
            warn!("SIGUSR2: not re-executing: {why}");
            super::lifecycle::ready_again();
            return;
        }
    };
    let (listeners, passed) = server.listening.get().cloned().unwrap_or_default();
    let mut keep = listeners.clone();
    keep.extend([packed.memfd.as_raw_fd(), packed.bag.as_raw_fd()]);
    let list = |fds: &[RawFd]| {
        fds.iter()
            .map(|fd| fd.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut env: Vec<(OsString, OsString)> =
        std::env::vars_os().filter(|(k, _)| k != ENV).collect();
    env.push((
        ENV.into(),
        format!(
            "state={} bag={} listeners={} passed={}",
            packed.memfd.as_raw_fd(),
            packed.bag.as_raw_fd(),
            list(&listeners),
            u8::from(passed)
        )
        .into(),
    ));
    info!("re-executing with {}", packed.summary);
    log::logger().flush();
    let cleared = keep
        .iter()
        .try_for_each(|&fd| reexec::set_cloexec(fd, false));
    let err = match cleared {
        Ok(()) => reexec::exec(&start.exe, &start.args, &env),
        Err(e) => e,
    };
    for &fd in &keep {
        let _ = reexec::set_cloexec(fd, true);
    }
    warn!(
        "SIGUSR2: re-executing {} failed, serving on: {err}",
        start.exe.display()
    );
    drop(packed);
    rest::set_resting(false);
    server.pool.resume();
    super::lifecycle::ready_again();
}

/// The connections taken over, to serve once the server runs.
pub struct TakenOver(Vec<Job>);

/// Takes over what the previous process handed over: restores the table and returns the
/// connections, to start once the server runs ([`start`]). Call it before `Server::start`. A
/// state it cannot read is refused, logged with the reason, and its connections closed.
pub fn take_over(server: &Arc<Server>, inherited: Inherited) -> TakenOver {
    if inherited.is_empty() {
        return TakenOver(Vec::new());
    }
    let from_store = inherited.from_store;
    let jobs = match take(server, inherited) {
        Ok(jobs) => jobs,
        Err(why) => {
            warn!(
                "refusing what the previous process handed over: {why}; its connections are \
                 closed (their clients see the close, as on a restart without hand-over)"
            );
            Vec::new()
        }
    };
    if from_store {
        // Our copies are all this process needs. systemd's would keep every connection open
        // after this process closes it (a released lock's client would never see the close).
        for name in [FDNAME_CONNS, FDNAME_STATE] {
            if let Err(e) = notify::remove(name) {
                warn!("cannot remove {name} from systemd's fd store: {e}");
            }
        }
    }
    TakenOver(jobs)
}

fn take(server: &Arc<Server>, inherited: Inherited) -> Result<Vec<Job>, String> {
    let taking = monotonic_ns();
    let Inherited { state, bags, .. } = inherited;
    let mut fds = Vec::new();
    for b in &bags {
        fds.extend(bag::unpack(b).map_err(|e| format!("cannot take the connections out: {e}"))?);
    }
    let Some(state) = state else {
        return Err(format!(
            "{} connections came without a state (the previous process did not finish storing)",
            fds.len()
        ));
    };
    let bytes = memfd::read(state).map_err(|e| format!("cannot read the state: {e}"))?;
    let state = wire::decode(&bytes)?;
    let mut by_inode: HashMap<u64, OwnedFd> = HashMap::with_capacity(fds.len());
    for fd in fds {
        if let Ok(ino) = inode(fd.as_raw_fd()) {
            by_inode.insert(ino, fd);
        }
    }
    // The moment the table's times count from, on this process's clock.
    let since_export = Duration::from_nanos(monotonic_ns().saturating_sub(state.exported_ns));
    let at = Instant::now()
        .checked_sub(since_export)
        .unwrap_or_else(Instant::now);
    let mut taken = Vec::with_capacity(state.conns.len());
    let mut links = HashMap::new();
    for c in state.conns {
        let fd = by_inode.remove(&c.inode).ok_or_else(|| {
            format!(
                "connection {} ({}) is missing from the descriptors handed over",
                c.id.0, c.peer
            )
        })?;
        let stream = TcpStream::from(fd);
        let socket = match &c.phase {
            Phase::Session { name, fencing, .. } | Phase::HalfClosed { name, fencing } => {
                let link = Arc::new(Link::new(stream, name, *fencing));
                links.insert(c.id, Arc::clone(&link));
                Socket::Link(link)
            }
            Phase::FirstRequest { .. } | Phase::Closing { .. } => Socket::Stream(stream),
        };
        taken.push((c.id, c.peer, c.phase, socket));
    }
    if !by_inode.is_empty() {
        warn!(
            "closing {} descriptors handed over that the state does not name",
            by_inode.len()
        );
    }
    let memory = server
        .memory
        .as_ref()
        .ok_or("this server keeps its lock state in a cluster, not in this process")?;
    memory.restore(&state.table, at, &links)?;
    server
        .next_id
        .fetch_max(state.next_conn, std::sync::atomic::Ordering::Relaxed);
    server
        .requests
        .fetch_add(state.accepted, std::sync::atomic::Ordering::Relaxed);
    let holders: usize = state.table.names.iter().map(|n| n.holders.len()).sum();
    let waiters: usize = state.table.names.iter().map(|n| n.waiters.len()).sum();
    let others = others(taken.iter().map(|(_, _, p, _)| p));
    let jobs: Vec<Job> = taken
        .into_iter()
        .map(|(id, peer, phase, socket)| {
            Job::Resume(Box::new(Resumed {
                server: Arc::clone(server),
                socket,
                id,
                peer,
                phase,
                open: server.count_taken_over(peer),
            }))
        })
        .collect();
    let started = STARTED_NS.get().map_or(String::new(), |&ns| {
        format!(
            "this program started at {:.1} ms, ",
            ns.saturating_sub(state.signalled_ns) as f64 / 1e6
        )
    });
    info!(
        "took over {} connections ({holders} holders, {waiters} waiters, {}) from tcpnetlock \
         {}; since the previous process was signalled: {started}took over at {:.1} ms (taking \
         them: {:.1} ms)",
        jobs.len(),
        others,
        state.server_version,
        ms_since(state.signalled_ns),
        ms_since(taking)
    );
    debug!("hand-over state: {} bytes", bytes.len());
    Ok(jobs)
}

/// Starts serving the connections taken over (the acceptors run already).
pub fn start(server: &Server, taken: TakenOver) {
    let mut failed = 0;
    for job in taken.0 {
        if server.pool.submit(job).is_err() {
            // The job is dropped: its connection closes (a holder loses its lock, as on a
            // restart without hand-over).
            failed += 1;
        }
    }
    if failed > 0 {
        warn!("cannot start a thread for {failed} connections taken over: they are closed");
    }
}
