//! Load benchmark: this server against the Python tcpnetlock 0.1.8 it replaces, in one run.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-bench cargo bench --bench load
//! ```
//!
//! (any target dir works; `cargo bench --bench load` alone uses ./target). It prints the machine,
//! the command and a markdown table for docs/BENCHMARKS.md, then one verdict per target of the
//! issue. A missed target is reported, never a failure: the bench exits 0 unless it cannot start
//! the Rust server at all.
//!
//! What it measures, on loopback only, for each server:
//!
//! 1. lock+release cycles per second on fresh connections (connect, `lock,name:N`, read `ok`,
//!    `release`, read `released`, read the server's end of file, close) from 1, 4 and 16 client
//!    threads, every cycle a new name so nobody waits; plus 4 threads fighting over one name.
//! 2. hand-off latency (Rust server only; 0.1.8 has no waiting): 500 sequential rounds on a fresh
//!    process. A holder takes `handoff-R`, a waiter asks `lock,name:handoff-R,wait:10` and is
//!    queued (`.stats` says `"waiting": 1` and the waiter's thread sleeps in its read); the time
//!    from the holder writing `release` to the waiter having read `ok` is the hand-off.
//! 3. resident memory per held lock: VmRSS of the idle server (fresh process, after a warm-up)
//!    and again with 15,000 connections each holding a distinct lock, divided by 15,000; the
//!    server's thread count and its CPU use while the holders sit idle.
//! 4. while those are held: the time from connect to `ok` for a new name, 200 samples.
//!
//! Where the programs come from:
//!
//! - Rust server: `TCPNETLOCK_BIN` if set, else the binary cargo built for this bench
//!   (`CARGO_BIN_EXE_tcpnetlock`, i.e. `<target dir>/release/tcpnetlock`, rebuilt by `cargo bench`
//!   whenever the sources change). If that file is missing (the bench binary was run by hand
//!   after a `cargo clean`), the bench runs `cargo build --release` itself.
//! - Python server: `TCPNETLOCK_PY_SERVER` (a `tcpnetlock_server` executable) if set, else a
//!   venv at `<target dir>/bench-venv`, created on first use with `python3 -m venv` and
//!   `pip install tcpnetlock==0.1.8`. `<target dir>` is found from this bench's own path
//!   (`<target dir>/release/deps/load-*`), so `CARGO_TARGET_DIR` is honoured. If the venv cannot
//!   be made, the Python column says why and the run goes on. `TCPNETLOCK_BENCH_PYTHON=0` skips
//!   it.
//!
//! Knobs: `TCPNETLOCK_BENCH_SECS` (length of the 4-thread run, default 5; the other cycle runs
//! take 60% of it) and `TCPNETLOCK_BENCH_HOLDERS` (default 15000). The bench raises its own
//! RLIMIT_NOFILE soft limit to the hard one; the Python server inherits it (0.1.8 does not raise
//! its own), the Rust server raises its own. A full run takes about 50 s on 2 CPUs, about 140 s
//! when 0.1.8 stops answering before it has all the holders (it waits out the 60 s limit).
//!
//! Under `cargo test --all-targets` (no `--bench` argument) it only says how to run it.

use std::collections::VecDeque;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

const PY_VERSION: &str = "0.1.8";
/// Longest wait for a connect or any one reply before the bench counts an error.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed to open all the holders; past it the bench measures with those it has.
const HOLD_DEADLINE: Duration = Duration::from_secs(60);
/// Threads opening holder connections, each one connection at a time. Four keeps at most four
/// connections in the accept queue, under the backlog of 5 that 0.1.8's socketserver listens with.
const OPENERS: usize = 4;
const LATENCY_SAMPLES: usize = 200;
/// Holders per client source address. Linux picks a connect()'s ephemeral port by probing ports
/// one after another for a free (source, destination) pair, so 15,000 connections from one
/// address to one server make every further connect() from that address scan thousands of used
/// ports: ~1 ms of kernel time on the *client* side, measured, not the server's doing. Real
/// holders come from many hosts; spreading them over loopback addresses (all of 127/8 is local)
/// keeps that client-side cost out of the server's numbers.
const PER_SOURCE: usize = 500;
/// Where the latency samples come from: an address no holder uses.
const LATENCY_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const LATENCY_BUDGET: Duration = Duration::from_secs(30);
/// The default of 10,000 would refuse part of the 15,000 holders.
const RUST_MAX_CONNECTIONS: &str = "19000";
/// Table rows of the cycle runs, in the order [`bench`] runs them.
const CYCLE_ROWS: [&str; 4] = ["1 thread", "4 threads", "16 threads", "4 threads, one name"];
/// Hand-off rounds measured, after [`HANDOFF_WARMUP`] that are not.
const HANDOFF_ROUNDS: usize = 500;
const HANDOFF_WARMUP: usize = 20;
const HANDOFF_BUDGET: Duration = Duration::from_secs(60);
/// Longest a round may take to see its waiter queued.
const QUEUE_DEADLINE: Duration = Duration::from_secs(2);
/// Pause between seeing the waiter queued and starting the clock, so the server thread that
/// answered `.stats` has finished too and only the hand-off is measured.
const HANDOFF_SETTLE: Duration = Duration::from_millis(1);
/// Hand-off targets of the issue.
const HANDOFF_P50_US: f64 = 200.0;
const HANDOFF_P99_US: f64 = 1000.0;
const PY_NO_WAIT: &str = "n/a (0.1.8 has no wait: its tcpnetlock_do polls every --retry-wait \
                          seconds, 10 s by default)";

// ---------------------------------------------------------------------------------------------
// Settings and machine

struct Settings {
    main_secs: f64,
    holders: usize,
    python: bool,
}

impl Settings {
    fn from_env() -> Settings {
        let num = |key: &str| {
            env::var(key)
                .ok()
                .and_then(|v| v.trim().parse::<f64>().ok())
        };
        Settings {
            main_secs: num("TCPNETLOCK_BENCH_SECS")
                .filter(|s| *s > 0.0)
                .unwrap_or(5.0),
            holders: num("TCPNETLOCK_BENCH_HOLDERS")
                .filter(|n| *n >= 1.0)
                .map_or(15_000, |n| n as usize),
            python: env::var("TCPNETLOCK_BENCH_PYTHON").map_or(true, |v| v != "0"),
        }
    }

    fn short_secs(&self) -> f64 {
        self.main_secs * 0.6
    }
}

fn machine_info(load_start: &str) -> Vec<(String, String)> {
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| proc_field(&t, "MemTotal:"))
        .map_or("unknown".into(), |kib| {
            format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0)
        });
    let date = command_output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .unwrap_or_else(|| "unknown".into());
    let rustc = command_output(Command::new("rustc").arg("-V")).unwrap_or_default();
    let mut nofile = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain struct out.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) };
    vec![
        ("CPUs (nproc)".into(), cpus.to_string()),
        ("CPU model".into(), model),
        ("Memory".into(), mem),
        ("Kernel (uname -r)".into(), kernel),
        ("Date".into(), date),
        ("Rust".into(), rustc),
        (
            "RLIMIT_NOFILE (bench, after raising)".into(),
            nofile.rlim_cur.to_string(),
        ),
        ("Other load before the run".into(), load_start.to_owned()),
    ]
}

/// The 1, 5 and 15 minute load averages.
fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Percent of all CPUs' time not idle over `span`, from /proc/stat.
fn cpu_busy_pct(span: Duration) -> Option<f64> {
    let sample = || -> Option<(u64, u64)> {
        let text = fs::read_to_string("/proc/stat").ok()?;
        let v: Vec<u64> = text
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal ...
        let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
        Some((v.iter().take(8).sum(), idle))
    };
    let (t0, i0) = sample()?;
    thread::sleep(span);
    let (t1, i1) = sample()?;
    let total = t1.checked_sub(t0).filter(|t| *t > 0)?;
    Some(100.0 * (1.0 - (i1 - i0) as f64 / total as f64))
}

fn command_output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Raises the soft descriptor limit to the hard one: the bench holds one socket per holder.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain structs in and out.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Finding the servers

/// `<target dir>`, from this bench's own path `<target dir>/release/deps/load-*`.
fn target_dir() -> PathBuf {
    if let Ok(exe) = env::current_exe()
        && let Some(deps) = exe.parent()
        && deps.file_name().is_some_and(|n| n == "deps")
        && let Some(target) = deps.parent().and_then(Path::parent)
    {
        return target.to_owned();
    }
    env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
        PathBuf::from,
    )
}

fn rust_server_bin() -> Result<PathBuf, String> {
    if let Some(bin) = env::var_os("TCPNETLOCK_BIN") {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!("TCPNETLOCK_BIN={} is not a file", bin.display()))
        };
    }
    let built = PathBuf::from(env!("CARGO_BIN_EXE_tcpnetlock"));
    if built.is_file() {
        return Ok(built);
    }
    let target = target_dir();
    eprintln!(
        "bench: {} missing; running cargo build --release",
        built.display()
    );
    let status = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "--release", "--bin", "tcpnetlock"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    let bin = target.join("release").join("tcpnetlock");
    if status.success() && bin.is_file() {
        Ok(bin)
    } else {
        Err(format!("cargo build --release failed ({status})"))
    }
}

/// The 0.1.8 `tcpnetlock_server`, or why there is none.
fn python_server() -> Result<(PathBuf, String), String> {
    if let Some(exe) = env::var_os("TCPNETLOCK_PY_SERVER") {
        return Ok((PathBuf::from(exe), "from TCPNETLOCK_PY_SERVER".into()));
    }
    let venv = target_dir().join("bench-venv");
    let python = venv.join("bin").join("python");
    let exe = venv.join("bin").join("tcpnetlock_server");
    let installed = || {
        command_output(Command::new(&python).args([
            "-c",
            "import importlib.metadata as m, sys; print(m.version('tcpnetlock'), sys.version.split()[0])",
        ]))
    };
    let describe = |v: String| {
        let py = v.split_whitespace().nth(1).unwrap_or("?").to_owned();
        format!(
            "tcpnetlock {PY_VERSION} on Python {py}, venv {}",
            venv.display()
        )
    };
    if let Some(v) = installed()
        && v.starts_with(&format!("{PY_VERSION} "))
        && exe.is_file()
    {
        return Ok((exe, describe(v)));
    }
    eprintln!(
        "bench: creating {} with tcpnetlock=={PY_VERSION}",
        venv.display()
    );
    if !python.is_file() {
        run_quiet(Command::new("python3").arg("-m").arg("venv").arg(&venv))
            .map_err(|e| format!("python3 -m venv failed: {e}"))?;
    }
    run_quiet(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
        &format!("tcpnetlock=={PY_VERSION}"),
    ]))
    .map_err(|e| format!("pip install tcpnetlock=={PY_VERSION} failed: {e}"))?;
    match installed() {
        Some(v) if v.starts_with(&format!("{PY_VERSION} ")) && exe.is_file() => {
            Ok((exe, describe(v)))
        }
        other => Err(format!(
            "tcpnetlock {PY_VERSION} not found in the venv after pip install ({other:?})"
        )),
    }
}

fn run_quiet(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = err.lines().rev().take(3).collect();
    Err(format!(
        "{}: {}",
        out.status,
        tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
    ))
}

// ---------------------------------------------------------------------------------------------
// A running server

#[derive(Clone)]
enum Impl {
    Rust(PathBuf),
    Python(PathBuf),
}

impl Impl {
    fn label(&self) -> &'static str {
        match self {
            Impl::Rust(_) => "tcpnetlock (Rust)",
            Impl::Python(_) => "tcpnetlock 0.1.8 (Python)",
        }
    }

    fn command_line(&self) -> String {
        match self {
            Impl::Rust(_) => format!(
                "tcpnetlock server --listen 127.0.0.1:0 --log stderr \
                 --max-connections {RUST_MAX_CONNECTIONS}"
            ),
            Impl::Python(_) => "tcpnetlock_server --listen 127.0.0.1 --port PORT".into(),
        }
    }

    fn start(&self) -> Result<Server, String> {
        match self {
            Impl::Rust(bin) => {
                let mut cmd = Command::new(bin);
                cmd.args([
                    "server",
                    "--listen",
                    "127.0.0.1:0",
                    "--log",
                    "stderr",
                    "--max-connections",
                    RUST_MAX_CONNECTIONS,
                ]);
                Server::spawn(cmd, None)
            }
            Impl::Python(exe) => {
                let port = free_port().map_err(|e| format!("no free port: {e}"))?;
                let mut cmd = Command::new(exe);
                cmd.args(["--listen", "127.0.0.1", "--port", &port.to_string()]);
                Server::spawn(cmd, Some(SocketAddr::from(([127, 0, 0, 1], port))))
            }
        }
    }
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Server {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<VecDeque<String>>>,
}

impl Server {
    /// Starts `cmd`. Without `addr`, waits for the Rust server's `listening on ADDR` line; with
    /// it, polls `.ping` until `pong` (0.1.8 says nothing when it is ready).
    fn spawn(mut cmd: Command, addr: Option<SocketAddr>) -> Result<Server, String> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID");
        let mut child = cmd.spawn().map_err(|e| format!("cannot start: {e}"))?;
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = mpsc::channel();
        let sink = Arc::clone(&log);
        // Drains stderr for the server's whole life, keeping the last lines for error reports.
        thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("listening on ").nth(1)
                    && let Ok(a) = rest.trim().parse::<SocketAddr>()
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(a);
                }
                let mut log = sink.lock().unwrap();
                log.push_back(line);
                if log.len() > 20 {
                    log.pop_front();
                }
            }
        });
        let mut server = Server {
            child,
            addr: addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        match addr {
            None => match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(a) => server.addr = a,
                Err(_) => return Err(server.failure("did not report its address")),
            },
            Some(a) => loop {
                if ping(a) {
                    break;
                }
                if Instant::now() > deadline || !server.alive() {
                    return Err(server.failure("did not answer .ping"));
                }
                thread::sleep(Duration::from_millis(50));
            },
        }
        Ok(server)
    }

    fn failure(&mut self, what: &str) -> String {
        let alive = self.alive();
        let log: Vec<String> = self.log.lock().unwrap().iter().cloned().collect();
        format!(
            "server {what}{}; stderr: {}",
            if alive { "" } else { " (it exited)" },
            if log.is_empty() {
                "(empty)".into()
            } else {
                log.join(" | ")
            }
        )
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn status(&self) -> Option<ProcStatus> {
        let text = fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        Some(ProcStatus {
            rss_kib: proc_field(&text, "VmRSS:")?,
            threads: proc_field(&text, "Threads:")?,
        })
    }

    /// User plus system CPU seconds used so far.
    fn cpu_secs(&self) -> Option<f64> {
        let text = fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        let after = text.rsplit_once(')')?.1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        Some(ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy)]
struct ProcStatus {
    rss_kib: u64,
    threads: u64,
}

/// The number after `key` in a /proc text file (`VmRSS:   1234 kB`).
fn proc_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------------
// The client side

struct Client {
    stream: TcpStream,
    buf: [u8; 128],
    len: usize,
}

impl Client {
    /// Connects from `src` (port chosen by the kernel), or from the default source address.
    fn connect(addr: SocketAddr, src: Option<Ipv4Addr>) -> io::Result<Client> {
        let stream = match src {
            None => TcpStream::connect_timeout(&addr, IO_TIMEOUT)?,
            Some(ip) => {
                let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
                let on: libc::c_int = 1;
                // SAFETY: a valid socket and a c_int option value that outlives the call.
                // IP_BIND_ADDRESS_NO_PORT leaves the port to connect(), which picks it for the
                // full 4-tuple instead of reserving one per source address at bind().
                unsafe {
                    libc::setsockopt(
                        socket.as_raw_fd(),
                        libc::IPPROTO_IP,
                        libc::IP_BIND_ADDRESS_NO_PORT,
                        (&on as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                socket.bind(&SocketAddr::from((ip, 0)).into())?;
                socket.connect_timeout(&addr.into(), IO_TIMEOUT)?;
                socket.into()
            }
        };
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        Ok(Client {
            stream,
            buf: [0; 128],
            len: 0,
        })
    }

    fn send(&mut self, line: &[u8]) -> io::Result<()> {
        self.stream.write_all(line)
    }

    /// Reads one reply line and checks it is `want`. Err carries what came instead.
    fn expect(&mut self, want: &str) -> Result<(), String> {
        let line = self
            .line()
            .map_err(|e| format!("waiting for {want}: {e}"))?;
        if line == want {
            Ok(())
        } else {
            Err(format!("expected {want:?}, got {line:?}"))
        }
    }

    fn line(&mut self) -> io::Result<String> {
        loop {
            if let Some(nl) = self.buf[..self.len].iter().position(|&b| b == b'\n') {
                let line = String::from_utf8_lossy(&self.buf[..nl]).into_owned();
                self.buf.copy_within(nl + 1..self.len, 0);
                self.len -= nl + 1;
                return Ok(line);
            }
            if self.len == self.buf.len() {
                return Err(io::Error::other("reply line too long"));
            }
            match self.stream.read(&mut self.buf[self.len..])? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => self.len += n,
            }
        }
    }

    /// Waits for the server to close. Closing only after its FIN leaves TIME_WAIT on the
    /// server's side, so the bench does not run out of ephemeral ports.
    fn wait_eof(&mut self) -> Result<(), String> {
        let mut scratch = [0u8; 64];
        loop {
            match self.stream.read(&mut scratch) {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
                Err(e) => return Err(format!("waiting for the server to close: {e}")),
            }
        }
    }

    /// `release`, `released`, end of file.
    fn release(mut self) -> Result<(), String> {
        self.send(b"release\n")
            .map_err(|e| format!("sending release: {e}"))?;
        self.expect("released")?;
        self.wait_eof()
    }
}

fn ping(addr: SocketAddr) -> bool {
    let Ok(mut c) = Client::connect(addr, None) else {
        return false;
    };
    c.send(b".ping\n").is_ok() && c.expect("pong").is_ok()
}

/// Connects and asks for `name`. Ok(Some(client)) when granted (still holding), Ok(None) when
/// not granted.
fn lock(addr: SocketAddr, src: Option<Ipv4Addr>, name: &str) -> Result<Option<Client>, String> {
    let mut c = Client::connect(addr, src).map_err(|e| format!("connect: {e}"))?;
    c.send(format!("lock,name:{name}\n").as_bytes())
        .map_err(|e| format!("sending lock: {e}"))?;
    match c
        .line()
        .map_err(|e| format!("waiting for ok: {e}"))?
        .as_str()
    {
        "ok" => Ok(Some(c)),
        "not-granted" => {
            c.wait_eof()?;
            Ok(None)
        }
        other => Err(format!("lock reply {other:?}")),
    }
}

/// One full cycle on a fresh connection. Ok(true) granted and released, Ok(false) not granted.
fn cycle(addr: SocketAddr, name: &str) -> Result<bool, String> {
    match lock(addr, None, name)? {
        Some(c) => c.release().map(|()| true),
        None => Ok(false),
    }
}

// ---------------------------------------------------------------------------------------------
// Measurements

#[derive(Default)]
struct Cycles {
    granted: u64,
    not_granted: u64,
    errors: u64,
    secs: f64,
    /// CPU seconds the server used during the run.
    server_cpu: Option<f64>,
    first_error: Option<String>,
}

impl Cycles {
    fn rate(&self) -> f64 {
        (self.granted + self.not_granted) as f64 / self.secs.max(1e-9)
    }

    /// Server CPU microseconds per cycle.
    fn server_us(&self) -> Option<f64> {
        let n = self.granted + self.not_granted;
        (n > 0).then_some(self.server_cpu? * 1e6 / n as f64)
    }
}

/// `threads` clients cycling for `secs`. Uncontended: every cycle a new name. Contended: all on one.
fn run_cycles(addr: SocketAddr, threads: usize, secs: f64, contended: bool, tag: &str) -> Cycles {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (stop, start) = (Arc::clone(&stop), Arc::clone(&start));
            let tag = tag.to_owned();
            thread::spawn(move || {
                let mut r = Cycles::default();
                let mut name = String::with_capacity(64);
                start.wait();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    name.clear();
                    if contended {
                        let _ = write!(name, "{tag}-hot");
                    } else {
                        let _ = write!(name, "{tag}-{t}-{n}");
                    }
                    n += 1;
                    match cycle(addr, &name) {
                        Ok(true) => r.granted += 1,
                        Ok(false) => r.not_granted += 1,
                        Err(e) => {
                            r.errors += 1;
                            r.first_error.get_or_insert(e);
                            if r.errors > 100 {
                                break;
                            }
                            thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
                r
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let mut total = Cycles::default();
    for h in handles {
        let r = h.join().expect("client thread");
        total.granted += r.granted;
        total.not_granted += r.not_granted;
        total.errors += r.errors;
        if total.first_error.is_none() {
            total.first_error = r.first_error;
        }
    }
    total.secs = t0.elapsed().as_secs_f64();
    total
}

struct Holding {
    clients: Vec<Client>,
    secs: f64,
    errors: u64,
    first_error: Option<String>,
    timed_out: bool,
}

/// Opens `n` connections, each holding lock `h-<i>`, from [`OPENERS`] threads.
fn open_holders(addr: SocketAddr, n: usize, label: &str) -> Holding {
    let done = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + HOLD_DEADLINE;
    let t0 = Instant::now();
    let handles: Vec<_> = (0..OPENERS)
        .map(|o| {
            let done = Arc::clone(&done);
            thread::spawn(move || {
                let mut clients = Vec::with_capacity(n / OPENERS + 1);
                let (mut errors, mut first_error, mut timed_out) = (0u64, None, false);
                for i in (o..n).step_by(OPENERS) {
                    if Instant::now() > deadline {
                        timed_out = true;
                        break;
                    }
                    match lock(addr, Some(holder_source(i)), &format!("h-{i}")) {
                        Ok(Some(c)) => {
                            clients.push(c);
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(None) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| format!("h-{i} not granted"));
                        }
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert(e);
                        }
                    }
                    if errors > 50 {
                        break;
                    }
                }
                (clients, errors, first_error, timed_out)
            })
        })
        .collect();
    let mut last_report = Instant::now();
    while !handles.iter().all(|h| h.is_finished()) {
        thread::sleep(Duration::from_millis(20));
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "bench: {label}: {} of {n} holders after {:.0} s",
                done.load(Ordering::Relaxed),
                t0.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let mut h = Holding {
        clients: Vec::with_capacity(n),
        secs,
        errors: 0,
        first_error: None,
        timed_out: false,
    };
    for handle in handles {
        let (clients, errors, first_error, timed_out) = handle.join().expect("opener thread");
        h.clients.extend(clients);
        h.errors += errors;
        h.timed_out |= timed_out;
        if h.first_error.is_none() {
            h.first_error = first_error;
        }
    }
    h
}

#[derive(Default)]
struct Latency {
    ms: Vec<f64>,
    errors: u64,
    first_error: Option<String>,
}

impl Latency {
    /// Nearest-rank percentile.
    fn pct(&self, p: f64) -> Option<f64> {
        let mut v = self.ms.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
        Some(v[rank.min(v.len()) - 1])
    }
}

/// The source address of holder `i`: [`PER_SOURCE`] holders per address, from 127.1.0.1 on.
fn holder_source(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 1, 0, 1)) + (i / PER_SOURCE) as u32)
}

/// Connect to `ok` for new names, one at a time, 5 ms apart, from an address no holder uses.
fn measure_latency(addr: SocketAddr) -> Latency {
    let mut l = Latency::default();
    let t0 = Instant::now();
    for i in 0..LATENCY_SAMPLES {
        if t0.elapsed() > LATENCY_BUDGET {
            break;
        }
        let start = Instant::now();
        let result = lock(addr, Some(LATENCY_SOURCE), &format!("lat-{i}"));
        let took = start.elapsed();
        let result = match result {
            Ok(Some(c)) => {
                l.ms.push(took.as_secs_f64() * 1e3);
                c.release()
            }
            Ok(None) => Err("not granted".into()),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            l.errors += 1;
            l.first_error.get_or_insert(e);
        }
        thread::sleep(Duration::from_millis(5));
    }
    l
}

/// `"waiting"` in the server's `.stats`: waiters queued on all names.
fn stats_waiting(addr: SocketAddr) -> Result<u64, String> {
    let mut c = Client::connect(addr, None).map_err(|e| format!(".stats connect: {e}"))?;
    c.send(b".stats\n")
        .map_err(|e| format!("sending .stats: {e}"))?;
    // The reply is longer than `Client`'s line buffer; the server closes after it.
    let mut text = Vec::new();
    c.stream
        .read_to_end(&mut text)
        .map_err(|e| format!("reading .stats: {e}"))?;
    let text = String::from_utf8_lossy(&text);
    text.split("\"waiting\": ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!(".stats has no \"waiting\": {}", text.trim()))
}

/// Whether thread `tid` of this process is asleep (state `S`): blocked in a system call.
fn thread_asleep(tid: libc::pid_t) -> bool {
    fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
        .ok()
        .and_then(|t| {
            t.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('S'))
        })
        .unwrap_or(false)
}

/// One hand-off on `name`: the time from the holder writing `release` to the queued waiter
/// having read `ok`.
fn handoff_round(addr: SocketAddr, name: &str) -> Result<Duration, String> {
    let holder = lock(addr, None, name)?.ok_or_else(|| format!("{name}: holder not granted"))?;
    let mut waiter = Client::connect(addr, None).map_err(|e| format!("waiter connect: {e}"))?;
    waiter
        .send(format!("lock,name:{name},wait:10\n").as_bytes())
        .map_err(|e| format!("sending the waiter's lock: {e}"))?;
    let (tx, rx) = mpsc::channel();
    let waiting = thread::spawn(move || -> Result<Instant, String> {
        // SAFETY: gettid has no preconditions.
        let _ = tx.send(unsafe { libc::gettid() });
        // Blocks in read() until the hand-off.
        waiter.expect("ok").map_err(|e| format!("waiter: {e}"))?;
        let t1 = Instant::now();
        waiter.release().map_err(|e| format!("waiter: {e}"))?;
        Ok(t1)
    });
    // On an error return the holder's connection closes, which hands the lock to the waiter:
    // its thread then ends by itself.
    let tid = rx
        .recv()
        .map_err(|_| "waiter thread ended early".to_owned())?;
    let deadline = Instant::now() + QUEUE_DEADLINE;
    loop {
        let n = stats_waiting(addr)?;
        if n == 1 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{name}: waiter not queued after {QUEUE_DEADLINE:?} (.stats waiting: {n})"
            ));
        }
        thread::sleep(Duration::from_micros(100));
    }
    while !thread_asleep(tid) {
        if Instant::now() > deadline {
            return Err(format!("{name}: waiter thread not asleep in its read"));
        }
        thread::sleep(Duration::from_micros(50));
    }
    thread::sleep(HANDOFF_SETTLE);
    let t0 = Instant::now();
    holder.release().map_err(|e| format!("holder: {e}"))?;
    let t1 = waiting
        .join()
        .map_err(|_| "waiter thread panicked".to_owned())??;
    Ok(t1.saturating_duration_since(t0))
}

/// [`HANDOFF_WARMUP`] uncounted rounds, then [`HANDOFF_ROUNDS`], one at a time.
fn measure_handoff(addr: SocketAddr) -> Latency {
    for i in 0..HANDOFF_WARMUP {
        let _ = handoff_round(addr, &format!("handoff-w{i}"));
    }
    let mut l = Latency::default();
    let t0 = Instant::now();
    for r in 0..HANDOFF_ROUNDS {
        if t0.elapsed() > HANDOFF_BUDGET {
            break;
        }
        match handoff_round(addr, &format!("handoff-{r}")) {
            Ok(d) => l.ms.push(d.as_secs_f64() * 1e3),
            Err(e) => {
                l.errors += 1;
                l.first_error.get_or_insert(e);
                if l.errors > 20 {
                    break;
                }
            }
        }
    }
    l
}

struct HoldReport {
    wanted: usize,
    held: usize,
    open_secs: f64,
    timed_out: bool,
    errors: u64,
    idle: ProcStatus,
    loaded: ProcStatus,
    /// Percent of one core the server used while the holders sat idle.
    cpu_pct: Option<f64>,
    latency: Latency,
}

impl HoldReport {
    fn kib_per_lock(&self) -> Option<f64> {
        (self.held > 0)
            .then(|| (self.loaded.rss_kib as f64 - self.idle.rss_kib as f64) / self.held as f64)
    }
}

struct Report {
    imp: Impl,
    note: String,
    /// (row label, result)
    cycles: Vec<(String, Cycles)>,
    hold: Option<HoldReport>,
    /// Release → `ok` of the next waiter; None for a server without waiting (0.1.8).
    handoff: Option<Latency>,
    problems: Vec<String>,
}

fn bench(imp: &Impl, note: String, s: &Settings) -> Report {
    let label = imp.label();
    let mut rep = Report {
        imp: imp.clone(),
        note,
        cycles: Vec::new(),
        hold: None,
        handoff: None,
        problems: Vec::new(),
    };

    // 1. Throughput, on one server process.
    match imp.start() {
        Err(e) => rep.problems.push(format!("cycles: {e}")),
        Ok(mut server) => {
            eprintln!("bench: {label}: cycles on {}", server.addr);
            run_cycles(server.addr, 4, 0.5, false, "warm");
            let runs = [
                (1, s.short_secs(), false, "a"),
                (4, s.main_secs, false, "b"),
                (16, s.short_secs(), false, "c"),
                (4, s.short_secs(), true, "d"),
            ];
            for (row, (threads, secs, contended, tag)) in CYCLE_ROWS.into_iter().zip(runs) {
                let cpu0 = server.cpu_secs();
                let mut r = run_cycles(server.addr, threads, secs, contended, tag);
                r.server_cpu = server.cpu_secs().zip(cpu0).map(|(b, a)| b - a);
                eprintln!(
                    "bench: {label}: {row}: {:.0}/s ({} granted, {} not granted, {} errors)",
                    r.rate(),
                    r.granted,
                    r.not_granted,
                    r.errors
                );
                if let Some(e) = &r.first_error {
                    rep.problems
                        .push(format!("cycles, {row}: {} errors, first: {e}", r.errors));
                }
                rep.cycles.push((row.to_owned(), r));
            }
            if !server.alive() {
                rep.problems
                    .push(server.failure("died during the cycle runs"));
            }
        }
    }

    // 2. Hand-off to a waiter, on a fresh process. 0.1.8 has no waiting.
    if matches!(imp, Impl::Rust(_)) {
        match imp.start() {
            Err(e) => rep.problems.push(format!("hand-off: {e}")),
            Ok(mut server) => {
                eprintln!("bench: {label}: hand-off on {}", server.addr);
                let l = measure_handoff(server.addr);
                eprintln!(
                    "bench: {label}: hand-off: {} rounds, p50 {:.0} µs, p99 {:.0} µs",
                    l.ms.len(),
                    l.pct(50.0).unwrap_or(f64::NAN) * 1e3,
                    l.pct(99.0).unwrap_or(f64::NAN) * 1e3
                );
                if let Some(e) = &l.first_error {
                    rep.problems
                        .push(format!("hand-off: {} errors, first: {e}", l.errors));
                }
                if !server.alive() {
                    rep.problems
                        .push(server.failure("died during the hand-off"));
                }
                rep.handoff = Some(l);
            }
        }
    }

    // 3 and 4. Memory and latency with many holders, on a fresh process.
    let mut server = match imp.start() {
        Ok(server) => server,
        Err(e) => {
            rep.problems.push(format!("holders: {e}"));
            return rep;
        }
    };
    eprintln!("bench: {label}: {} holders on {}", s.holders, server.addr);
    for i in 0..200 {
        if let Err(e) = cycle(server.addr, &format!("w-{i}")) {
            rep.problems.push(format!("warm-up: {e}"));
            break;
        }
    }
    thread::sleep(Duration::from_millis(500));
    let Some(idle) = server.status() else {
        rep.problems.push(server.failure("has no /proc status"));
        return rep;
    };
    let holding = open_holders(server.addr, s.holders, label);
    thread::sleep(Duration::from_millis(500));
    let loaded = server.status();
    let cpu0 = server.cpu_secs();
    let t0 = Instant::now();
    thread::sleep(Duration::from_secs(2));
    let cpu_pct = match (cpu0, server.cpu_secs()) {
        (Some(a), Some(b)) => Some((b - a) / t0.elapsed().as_secs_f64() * 100.0),
        _ => None,
    };
    eprintln!(
        "bench: {label}: {} held in {:.1} s; latency of a fresh lock",
        holding.clients.len(),
        holding.secs
    );
    let latency = measure_latency(server.addr);
    if !server.alive() {
        rep.problems
            .push(server.failure("died while holding locks"));
    }
    let Some(loaded) = loaded else {
        rep.problems
            .push(server.failure("has no /proc status with the holders"));
        return rep;
    };
    // Stop the server before letting go of the holders: 15,000 closes would only make work.
    drop(server);
    let held = holding.clients.len();
    drop(holding.clients);
    if let Some(e) = &holding.first_error {
        rep.problems
            .push(format!("holders: {} errors, first: {e}", holding.errors));
    }
    if let Some(e) = &latency.first_error {
        rep.problems
            .push(format!("latency: {} errors, first: {e}", latency.errors));
    }
    rep.hold = Some(HoldReport {
        wanted: s.holders,
        held,
        open_secs: holding.secs,
        timed_out: holding.timed_out,
        errors: holding.errors,
        idle,
        loaded,
        cpu_pct,
        latency,
    });
    rep
}

// ---------------------------------------------------------------------------------------------
// Output

fn fmt_rate(r: Option<&Cycles>) -> String {
    match r {
        None => "—".into(),
        Some(c) if c.granted + c.not_granted == 0 => "failed".into(),
        Some(c) if c.not_granted > 0 => format!(
            "{} ({:.0}% granted)",
            thousands(c.rate()),
            100.0 * c.granted as f64 / (c.granted + c.not_granted) as f64
        ),
        Some(c) => thousands(c.rate()),
    }
}

fn thousands(x: f64) -> String {
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.1}x", a / b),
        _ => "—".into(),
    }
}

fn table(rust: &Report, py: Option<&Report>) -> String {
    let mut t = String::new();
    let py_label = py.map_or("tcpnetlock 0.1.8 (Python)", |p| p.imp.label());
    let _ = writeln!(
        t,
        "| Measure | {} | {} | Rust vs Python |",
        rust.imp.label(),
        py_label
    );
    let _ = writeln!(t, "|---|---:|---:|---:|");
    for row in CYCLE_ROWS {
        let (a, b) = (cyc(Some(rust), row), cyc(py, row));
        let _ = writeln!(
            t,
            "| lock+release cycles/s, fresh connections, {row} | {} | {} | {} |",
            fmt_rate(a),
            fmt_rate(b),
            ratio(a.map(Cycles::rate), b.map(Cycles::rate))
        );
    }
    let (a, b) = (
        cyc(Some(rust), CYCLE_ROWS[1]).and_then(Cycles::server_us),
        cyc(py, CYCLE_ROWS[1]).and_then(Cycles::server_us),
    );
    let us = |x: Option<f64>| x.map_or("—".into(), |x| format!("{x:.0} µs"));
    let _ = writeln!(
        t,
        "| server CPU per cycle (4 threads run) | {} | {} | {} |",
        us(a),
        us(b),
        ratio(b, a).replace('x', "x less")
    );
    let (hr, hp) = (hold(Some(rust)), hold(py));
    let cell = |h: Option<&HoldReport>, f: &dyn Fn(&HoldReport) -> String| h.map_or("—".into(), f);
    let rows: Vec<(String, String, String, String)> = vec![
        (
            "holders opened".into(),
            cell(hr, &holders_cell),
            cell(hp, &holders_cell),
            ratio(
                hr.map(|h| h.held as f64 / h.open_secs),
                hp.map(|h| h.held as f64 / h.open_secs),
            ),
        ),
        (
            "RSS idle, after warm-up".into(),
            cell(hr, &|h| mib(h.idle.rss_kib)),
            cell(hp, &|h| mib(h.idle.rss_kib)),
            String::new(),
        ),
        (
            "RSS with the locks held".into(),
            cell(hr, &|h| mib(h.loaded.rss_kib)),
            cell(hp, &|h| mib(h.loaded.rss_kib)),
            String::new(),
        ),
        (
            "**RSS per held lock**".into(),
            cell(hr, &|h| kib(h.kib_per_lock())),
            cell(hp, &|h| kib(h.kib_per_lock())),
            ratio(
                hp.and_then(HoldReport::kib_per_lock),
                hr.and_then(HoldReport::kib_per_lock),
            )
            .replace('x', "x less"),
        ),
        (
            "threads, idle → held".into(),
            cell(hr, &|h| {
                format!("{} → {}", h.idle.threads, h.loaded.threads)
            }),
            cell(hp, &|h| {
                format!("{} → {}", h.idle.threads, h.loaded.threads)
            }),
            String::new(),
        ),
        (
            "server CPU while the holders sit idle".into(),
            cell(hr, &|h| {
                h.cpu_pct
                    .map_or("?".into(), |p| format!("{p:.0}% of a core"))
            }),
            cell(hp, &|h| {
                h.cpu_pct
                    .map_or("?".into(), |p| format!("{p:.0}% of a core"))
            }),
            String::new(),
        ),
        (
            "**fresh lock (connect → ok) while held, p50 / p99 / max**".into(),
            cell(hr, &latency_cell),
            cell(hp, &latency_cell),
            String::new(),
        ),
        (
            "**hand-off: holder writes `release` → next waiter has read `ok`, p50 / p99 / max**"
                .into(),
            rust.handoff.as_ref().map_or("—".into(), handoff_cell),
            PY_NO_WAIT.into(),
            String::new(),
        ),
    ];
    for (a, b, c, d) in rows {
        let _ = writeln!(t, "| {a} | {b} | {c} | {d} |");
    }
    t
}

fn cyc<'a>(r: Option<&'a Report>, row: &str) -> Option<&'a Cycles> {
    r?.cycles.iter().find(|(l, _)| l == row).map(|(_, c)| c)
}

fn hold(r: Option<&Report>) -> Option<&HoldReport> {
    r?.hold.as_ref()
}

fn holders_cell(h: &HoldReport) -> String {
    let mut s = format!(
        "{} in {:.1} s ({}/s)",
        thousands(h.held as f64),
        h.open_secs,
        thousands(h.held as f64 / h.open_secs.max(1e-9))
    );
    if h.held < h.wanted {
        let why = if h.timed_out {
            format!("stopped at the {} s limit", HOLD_DEADLINE.as_secs())
        } else {
            format!("{} errors", h.errors)
        };
        let _ = write!(s, " — of {} wanted, {why}", thousands(h.wanted as f64));
    }
    s
}

fn latency_cell(h: &HoldReport) -> String {
    let l = &h.latency;
    match (l.pct(50.0), l.pct(99.0), l.pct(100.0)) {
        (Some(a), Some(b), Some(c)) => {
            let mut s = format!("{a:.2} / {b:.2} / {c:.2} ms");
            if l.ms.len() < LATENCY_SAMPLES {
                let _ = write!(s, " ({} samples)", l.ms.len());
            }
            s
        }
        _ => "failed".into(),
    }
}

fn handoff_cell(l: &Latency) -> String {
    match (l.pct(50.0), l.pct(99.0), l.pct(100.0)) {
        (Some(a), Some(b), Some(c)) => {
            let mut s = format!("{:.0} / {:.0} / {:.0} µs", a * 1e3, b * 1e3, c * 1e3);
            if l.ms.len() < HANDOFF_ROUNDS {
                let _ = write!(s, " ({} rounds)", l.ms.len());
            }
            s
        }
        _ => "failed".into(),
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn kib(k: Option<f64>) -> String {
    k.map_or("—".into(), |k| format!("{k:.1} KiB"))
}

fn verdicts(rust: &Report, py: Option<&Report>) -> Vec<String> {
    let mut v = Vec::new();
    let four = |r: &Report| {
        r.cycles
            .iter()
            .find(|(l, c)| l == "4 threads" && c.granted > 0)
            .map(|(_, c)| c.rate())
    };
    v.push(match (four(rust), py.and_then(four)) {
        (Some(a), Some(b)) => format!(
            "{}: throughput ≥ 5x 0.1.8 (4 threads, fresh connections): {:.1}x ({} vs {} cycles/s)",
            pass(a >= 5.0 * b),
            a / b,
            thousands(a),
            thousands(b)
        ),
        (_, None) => "NOT MEASURED: throughput ≥ 5x 0.1.8: no Python numbers".into(),
        (None, _) => "MISSED: throughput ≥ 5x 0.1.8: the Rust run failed".into(),
    });
    let hold = rust.hold.as_ref();
    v.push(match hold.and_then(|h| h.kib_per_lock().map(|k| (h, k))) {
        Some((h, k)) => format!(
            "{}: ≤ 16 KiB RSS per held lock: {k:.1} KiB ({} locks){}",
            pass(k <= 16.0),
            thousands(h.held as f64),
            if h.held < h.wanted {
                " — fewer holders than asked"
            } else {
                ""
            }
        ),
        None => "MISSED: ≤ 16 KiB RSS per held lock: not measured (see problems)".into(),
    });
    v.push(
        match hold.and_then(|h| Some((h, h.latency.pct(99.0)?, h.latency.pct(100.0)?))) {
            Some((h, p99, max)) => format!(
                "{}: fresh lock answered in < 50 ms while {} are held: p99 {p99:.2} ms, \
                 max {max:.2} ms over {} samples (verdict on p99)",
                pass(p99 < 50.0),
                thousands(h.held as f64),
                h.latency.ms.len()
            ),
            None => "MISSED: fresh lock < 50 ms while held: not measured (see problems)".into(),
        },
    );
    v.push(
        match rust
            .handoff
            .as_ref()
            .and_then(|l| Some((l, l.pct(50.0)? * 1e3, l.pct(99.0)? * 1e3, l.pct(100.0)? * 1e3)))
        {
            Some((l, p50, p99, max)) => format!(
                "{}: hand-off to a queued waiter (`release` → its `ok`) p50 ≤ {HANDOFF_P50_US:.0} µs \
                 and p99 ≤ {:.0} ms: p50 {p50:.0} µs, p99 {p99:.0} µs, max {max:.0} µs over {} \
                 rounds",
                pass(p50 <= HANDOFF_P50_US && p99 <= HANDOFF_P99_US),
                HANDOFF_P99_US / 1e3,
                l.ms.len()
            ),
            None => "MISSED: hand-off p50 ≤ 200 µs, p99 ≤ 1 ms: not measured (see problems)".into(),
        },
    );
    v
}

fn pass(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISSED" }
}

fn shown_command() -> String {
    let mut envs = String::new();
    for key in [
        "CARGO_TARGET_DIR",
        "TCPNETLOCK_BIN",
        "TCPNETLOCK_PY_SERVER",
        "TCPNETLOCK_BENCH_PYTHON",
        "TCPNETLOCK_BENCH_SECS",
        "TCPNETLOCK_BENCH_HOLDERS",
    ] {
        if let Ok(v) = env::var(key) {
            let _ = write!(envs, "{key}={v} ");
        }
    }
    format!("{envs}cargo bench --bench load")
}

fn main() {
    if !env::args().any(|a| a == "--bench") {
        println!("load: a benchmark; run it with `cargo bench --bench load` (skipped)");
        return;
    }
    let started = Instant::now();
    let busy_pct = cpu_busy_pct(Duration::from_secs(1));
    let load_start = format!(
        "{} (load average), CPUs {} busy over the second before",
        loadavg(),
        busy_pct.map_or("?".into(), |p| format!("{p:.0}%"))
    );
    let busy = busy_pct.is_some_and(|p| p > 20.0);
    if busy {
        eprintln!(
            "bench: warning: {load_start}: something else is using this machine and the \
             numbers will suffer"
        );
    }
    raise_fd_limit();
    let settings = Settings::from_env();

    let rust_bin = match rust_server_bin() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("bench: cannot find the Rust server: {e}");
            std::process::exit(1);
        }
    };
    let python = if settings.python {
        python_server()
    } else {
        Err("skipped (TCPNETLOCK_BENCH_PYTHON=0)".into())
    };

    let rust_imp = Impl::Rust(rust_bin.clone());
    let rust = bench(&rust_imp, format!("{}", rust_bin.display()), &settings);
    let py = match &python {
        Ok((exe, note)) => Some(bench(&Impl::Python(exe.clone()), note.clone(), &settings)),
        Err(e) => {
            eprintln!("bench: Python server not measured: {e}");
            None
        }
    };

    let mut out = String::new();
    let _ = writeln!(out, "\n## Load benchmark\n");
    for (k, v) in machine_info(&load_start) {
        let _ = writeln!(out, "- {k}: {v}");
    }
    let _ = writeln!(out, "- Command: `{}`", shown_command());
    let _ = writeln!(
        out,
        "- Rust server: `{}` ({})",
        rust_imp.command_line(),
        rust.note
    );
    match (&python, &py) {
        (Ok(_), Some(p)) => {
            let _ = writeln!(
                out,
                "- Python server: `{}` ({})",
                p.imp.command_line(),
                p.note
            );
        }
        (Err(e), _) => {
            let _ = writeln!(out, "- Python server: not measured: {e}");
        }
        (Ok(_), None) => {}
    }
    let _ = writeln!(
        out,
        "- Clients: the bench process on the same machine, over loopback. Cycles: a new \
         connection and a new name each time, from 127.0.0.1 (\"one name\": 4 threads race \
         for the same name; a not-granted answer counts as a cycle). Holders: opened by \
         {OPENERS} threads one connection at a time, {PER_SOURCE} per source address from \
         127.1.0.1 on. Latency: {LATENCY_SAMPLES} sequential connect → `ok` times for new \
         names, 5 ms apart, from {LATENCY_SOURCE}, while the holders are held. Hand-off: \
         {HANDOFF_ROUNDS} sequential rounds (after {HANDOFF_WARMUP} uncounted) from 127.0.0.1: \
         a holder takes `handoff-R`, a waiter sends `lock,name:handoff-R,wait:10`; once \
         `.stats` shows it queued and its thread sleeps in read(), and {} ms later, the clock \
         runs from the holder writing `release` to the waiter having read `ok` (one clock, one \
         process). Each server is a fresh process for the cycles, the hand-off and the \
         holders.\n",
        HANDOFF_SETTLE.as_millis()
    );
    out.push_str(&table(&rust, py.as_ref()));
    let _ = writeln!(out, "\nTargets (this machine, Rust server):\n");
    for v in verdicts(&rust, py.as_ref()) {
        let _ = writeln!(out, "- {v}");
    }
    let problems: Vec<String> = rust
        .problems
        .iter()
        .map(|p| format!("{}: {p}", rust.imp.label()))
        .chain(py.iter().flat_map(|r| {
            r.problems
                .iter()
                .map(move |p| format!("{}: {p}", r.imp.label()))
        }))
        .collect();
    if !problems.is_empty() {
        let _ = writeln!(out, "\nProblems seen:\n");
        for p in problems {
            let _ = writeln!(out, "- {p}");
        }
    }
    if busy {
        let _ = writeln!(
            out,
            "\nWarning: the machine was busy before the run ({load_start}): another \
             workload shared it, so these numbers are not representative."
        );
    }
    let _ = writeln!(
        out,
        "\nBench run time: {:.0} s; load average after it: {}",
        started.elapsed().as_secs_f64(),
        loadavg()
    );
    print!("{out}");
}
