//! What every measurement needs: where the programs come from, the machine, a server process
//! and its /proc figures, percentiles and number formatting.

use std::collections::VecDeque;
use std::env;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

pub const PY_VERSION: &str = "0.1.8";

// ---------------------------------------------------------------------------------------------
// Programs

/// `<target dir>`, from this bench's own path `<target dir>/release/deps/load-*`.
pub fn target_dir() -> PathBuf {
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

/// `text` as the results show it: the target dir written `target`, so that the document names
/// no directory of the machine it was made on (CARGO_TARGET_DIR may put it anywhere).
pub fn shown(text: &str) -> String {
    text.replace(&*target_dir().to_string_lossy(), "target")
}

/// `name` on PATH, or why not, with the apt package that has it.
pub fn on_path(name: &str, package: &str) -> Result<PathBuf, String> {
    env::var_os("PATH")
        .iter()
        .flat_map(env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("`{name}` not found on PATH (apt-get install {package})"))
}

/// The venv with tcpnetlock 0.1.8 (`<target dir>/bench-venv`), made on first use with
/// `python3 -m venv` and `pip install tcpnetlock==0.1.8`. Ok: the venv and a description.
pub fn python_venv() -> Result<(PathBuf, String), String> {
    let venv = target_dir().join("bench-venv");
    let python = venv.join("bin").join("python");
    let installed = || {
        command_output(Command::new(&python).args([
            "-c",
            "import importlib.metadata as m, sys; print(m.version('tcpnetlock'), sys.version.split()[0])",
        ]))
        .filter(|v| v.starts_with(&format!("{PY_VERSION} ")))
        .filter(|_| venv.join("bin").join("tcpnetlock_server").is_file())
    };
    let describe = |v: String| {
        let py = v.split_whitespace().nth(1).unwrap_or("?").to_owned();
        format!(
            "tcpnetlock {PY_VERSION} on Python {py}, venv {}",
            venv.display()
        )
    };
    if let Some(v) = installed() {
        return Ok((venv.clone(), describe(v)));
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
    installed()
        .map(|v| (venv.clone(), describe(v)))
        .ok_or_else(|| format!("tcpnetlock {PY_VERSION} not found in the venv after pip install"))
}

pub fn command_output(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Runs `cmd` to its end; Err has its status and the last lines of its stderr.
pub fn run_quiet(cmd: &mut Command) -> Result<(), String> {
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

pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A fresh directory for a server's data, removed on drop. On tmpfs (/dev/shm) when there is
/// one, so that no server's numbers depend on the disk.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> io::Result<TempDir> {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_owned()
        } else {
            env::temp_dir()
        };
        let dir = base.join(format!("tcpnetlock-bench-{what}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// The machine

pub fn machine_info(load_start: &str) -> Vec<(&'static str, String)> {
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
    let rustc = command_output(Command::new("rustc").arg("-V")).unwrap_or_default();
    let mut nofile = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain struct out.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) };
    vec![
        ("CPUs (nproc)", cpus.to_string()),
        ("CPU model", model),
        ("Memory", mem),
        ("Kernel (uname -r)", kernel),
        ("Rust", rustc),
        (
            "RLIMIT_NOFILE (bench, after raising)",
            nofile.rlim_cur.to_string(),
        ),
        ("Other load before the run", load_start.to_owned()),
    ]
}

pub fn utc_now() -> String {
    command_output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .unwrap_or_else(|| "unknown".into())
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Percent of all CPUs' time not idle over `span`, from /proc/stat (the load average of a VM
/// can say little about its CPUs).
pub fn cpu_busy_pct(span: Duration) -> Option<f64> {
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

/// Raises the soft descriptor limit to the hard one (the bench holds one socket per holder), the
/// way the server does for itself: the server's own code, mounted here.
#[path = "../../src/server/fdlimit.rs"]
mod fdlimit;
pub use fdlimit::raise_fd_limit;

/// User plus system CPU seconds of process `pid` (`"self"` for the bench) so far.
pub fn cpu_secs(pid: &str) -> Option<f64> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = text.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 })
}

/// The number after `key` in a /proc text file (`VmRSS:   1234 kB`).
pub fn proc_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------------
// A server process

/// How the bench knows a freshly started server is ready.
pub enum Ready {
    /// tcpnetlock prints `listening on ADDR` on stderr.
    Announced,
    /// The others: poll `probe(addr)` until it says yes.
    Probe(SocketAddr, fn(SocketAddr) -> bool),
}

/// A server the bench started; killed on drop.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<VecDeque<String>>>,
    /// The server's data directory, removed after the server is killed.
    pub dir: Option<TempDir>,
}

#[derive(Clone, Copy)]
pub struct ProcStatus {
    pub rss_kib: u64,
    pub threads: u64,
}

impl Server {
    pub fn spawn(mut cmd: Command, ready: Ready) -> Result<Server, String> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID");
        let mut child = cmd.spawn().map_err(|e| format!("cannot start: {e}"))?;
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = mpsc::channel();
        drain(child.stdout.take().expect("piped stdout"), &log, None);
        drain(child.stderr.take().expect("piped stderr"), &log, Some(tx));
        let mut server = Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
            dir: None,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        match ready {
            Ready::Announced => match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(a) => server.addr = a,
                Err(_) => return Err(server.failure("did not report its address")),
            },
            Ready::Probe(addr, probe) => {
                server.addr = addr;
                while !probe(addr) {
                    if Instant::now() > deadline || !server.alive() {
                        return Err(server.failure("did not become ready"));
                    }
                    thread::sleep(Duration::from_millis(50));
                }
            }
        }
        Ok(server)
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    pub fn failure(&mut self, what: &str) -> String {
        let alive = self.alive();
        let log: Vec<String> = self.log.lock().unwrap().iter().cloned().collect();
        format!(
            "server {what}{}; its output: {}",
            if alive { "" } else { " (it exited)" },
            if log.is_empty() {
                "(empty)".into()
            } else {
                log.join(" | ")
            }
        )
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn status(&self) -> Option<ProcStatus> {
        let text = fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        Some(ProcStatus {
            rss_kib: proc_field(&text, "VmRSS:")?,
            threads: proc_field(&text, "Threads:")?,
        })
    }

    pub fn cpu_secs(&self) -> Option<f64> {
        cpu_secs(&self.pid())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `from` for the server's whole life (so it never blocks on a full pipe), keeping the
/// last lines for error reports; sends the first `listening on ADDR` to `announce`.
fn drain(
    from: impl Read + Send + 'static,
    log: &Arc<Mutex<VecDeque<String>>>,
    announce: Option<mpsc::Sender<SocketAddr>>,
) {
    let sink = Arc::clone(log);
    thread::spawn(move || {
        let mut announce = announce;
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.split("listening on ").nth(1)
                && let Ok(a) = rest.trim().parse::<SocketAddr>()
                && let Some(tx) = announce.take()
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
}

// ---------------------------------------------------------------------------------------------
// Samples and formatting

/// Durations measured one at a time, and what went wrong on the way.
#[derive(Default)]
pub struct Samples {
    pub secs: Vec<f64>,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl Samples {
    /// Nearest-rank percentile, in seconds.
    pub fn pct(&self, p: f64) -> Option<f64> {
        let mut v = self.secs.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
        Some(v[rank.min(v.len()) - 1])
    }

    /// Times `one(i)` for i in 0..warmup+n, one at a time, `pause` apart, keeping all but the
    /// first `warmup`; stops early after `budget` or more than `max_errors` failures.
    pub fn collect(
        warmup: usize,
        n: usize,
        pause: Duration,
        budget: Duration,
        max_errors: u64,
        mut one: impl FnMut(usize) -> Result<Duration, String>,
    ) -> Samples {
        let mut l = Samples::default();
        let t0 = Instant::now();
        for i in 0..warmup + n {
            if t0.elapsed() > budget || l.errors > max_errors {
                break;
            }
            match one(i) {
                Ok(d) if i >= warmup => l.secs.push(d.as_secs_f64()),
                Ok(_) => {}
                Err(e) => {
                    l.errors += 1;
                    l.first_error.get_or_insert(e);
                }
            }
            thread::sleep(pause);
        }
        l
    }

    /// `p50 / p99 / max` in µs, or "failed".
    pub fn us_cell(&self) -> String {
        match (self.pct(50.0), self.pct(99.0), self.pct(100.0)) {
            (Some(a), Some(b), Some(c)) => {
                format!("{:.0} / {:.0} / {:.0} µs", a * 1e6, b * 1e6, c * 1e6)
            }
            _ => "failed".into(),
        }
    }

    /// `p50 / p99 / max` in ms, or "failed".
    pub fn ms_cell(&self) -> String {
        match (self.pct(50.0), self.pct(99.0), self.pct(100.0)) {
            (Some(a), Some(b), Some(c)) => {
                format!("{:.2} / {:.2} / {:.2} ms", a * 1e3, b * 1e3, c * 1e3)
            }
            _ => "failed".into(),
        }
    }
}

pub fn thousands(x: f64) -> String {
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

pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

pub fn pass(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISSED" }
}

/// A markdown table: a header row, an alignment row (first column left, the others right).
pub fn md_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut t = format!("| {} |\n|---|", header.join(" | "));
    t.push_str(&"---:|".repeat(header.len().saturating_sub(1)));
    t.push('\n');
    for r in rows {
        t.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    t
}

/// A server with many locks held: its memory before and after, and how fast a new lock is
/// answered meanwhile.
pub struct Held {
    pub wanted: usize,
    pub held: usize,
    pub open_secs: f64,
    /// Stopped at the time limit before `wanted` were held.
    pub timed_out: bool,
    pub errors: u64,
    pub idle: ProcStatus,
    pub loaded: ProcStatus,
    /// Percent of one core the server used while the locks sat idle.
    pub cpu_pct: Option<f64>,
    /// A new lock (connect → granted) while these are held.
    pub latency: Samples,
}

impl Held {
    pub fn kib_per_lock(&self) -> Option<f64> {
        (self.held > 0)
            .then(|| (self.loaded.rss_kib as f64 - self.idle.rss_kib as f64) / self.held as f64)
    }

    /// Percent of one core `server` uses over 2 s.
    pub fn idle_cpu_pct(server: &Server) -> Option<f64> {
        let cpu0 = server.cpu_secs();
        let t0 = Instant::now();
        thread::sleep(Duration::from_secs(2));
        Some((server.cpu_secs()? - cpu0?) / t0.elapsed().as_secs_f64() * 100.0)
    }
}
