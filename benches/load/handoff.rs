//! Hand-off latency: how long a queued waiter takes to get a lock its holder releases.
//!
//! Two shapes of it:
//!
//! - **In one process, on the sockets** (tcpnetlock only): a holder connection and a waiter
//!   connection queued with `wait:10`; the clock runs from the holder writing `release` to the
//!   waiter having read `ok`. The server's work plus one loopback delivery and a wake-up.
//! - **Between two lock processes**, the same for tcpnetlock and etcd: a holder process
//!   (`tcpnetlock lock NAME`, `etcdctl lock NAME`) has printed its grant line, a waiter process
//!   of the same tool is queued behind it (the server says so), and the clock runs from the
//!   bench sending SIGTERM to the holder (both tools release the lock on SIGTERM, then exit) to
//!   the bench having read the waiter's grant line from its stdout pipe. Both tools pay the same
//!   extra steps: a signal to wake the holder, a pipe to carry the waiter's line.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::Samples;
use crate::etcd::{self, Etcd};
use crate::line::{self, stats_waiting};
use crate::net::Client;

/// In-process rounds measured, after [`WARMUP`] that are not.
pub const ROUNDS: usize = 500;
/// Rounds between lock processes: each starts two processes and waits [`CLI_SETTLE`].
pub const CLI_ROUNDS: usize = 80;
const WARMUP: usize = 20;
const CLI_WARMUP: usize = 5;
const BUDGET: Duration = Duration::from_secs(60);
/// Longest a round may take to see its waiter queued.
const QUEUE_DEADLINE: Duration = Duration::from_secs(5);
/// Pause between seeing the waiter queued and starting the clock, so the server thread that
/// answered `.stats` has finished too and only the hand-off is measured.
pub const SETTLE: Duration = Duration::from_millis(1);
/// The same for lock processes. After the server has the waiter's request, `etcdctl lock` still
/// reads the current holder and watches its key from a past revision; etcd serves such a watch
/// from its "unsynced" group, which it catches up every 100 ms, and only then delivers events at
/// once. Releasing sooner made etcd's hand-off 42 ms at the median (measured with 20 ms here).
/// The pause is the same for both tools.
pub const CLI_SETTLE: Duration = Duration::from_millis(150);
const LINE_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// In one process

/// [`WARMUP`] uncounted rounds, then [`ROUNDS`], one at a time.
pub fn in_process(addr: SocketAddr) -> Samples {
    Samples::collect(WARMUP, ROUNDS, Duration::ZERO, BUDGET, 20, |i| {
        round(addr, &format!("handoff-{i}"))
    })
}

/// Whether thread `tid` of this process is asleep (state `S`): blocked in a system call.
fn thread_asleep(tid: libc::pid_t) -> bool {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
        .ok()
        .and_then(|t| {
            t.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('S'))
        })
        .unwrap_or(false)
}

/// One hand-off on `name`: the time from the holder writing `release` to the queued waiter
/// having read `ok`.
fn round(addr: SocketAddr, name: &str) -> Result<Duration, String> {
    let holder =
        line::lock(addr, None, name, "")?.ok_or_else(|| format!("{name}: holder not granted"))?;
    let mut waiter = Client::connect(addr, None).map_err(|e| format!("waiter connect: {e}"))?;
    waiter.send(format!("lock,name:{name},wait:10\n").as_bytes())?;
    let (tx, rx) = mpsc::channel();
    let waiting = thread::spawn(move || -> Result<Instant, String> {
        // SAFETY: gettid has no preconditions.
        let _ = tx.send(unsafe { libc::gettid() });
        // Blocks in read() until the hand-off.
        waiter.expect("ok").map_err(|e| format!("waiter: {e}"))?;
        let t1 = Instant::now();
        line::release(waiter).map_err(|e| format!("waiter: {e}"))?;
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
    thread::sleep(SETTLE);
    let t0 = Instant::now();
    line::release(holder).map_err(|e| format!("holder: {e}"))?;
    let t1 = waiting
        .join()
        .map_err(|_| "waiter thread panicked".to_owned())??;
    Ok(t1.saturating_duration_since(t0))
}

// ---------------------------------------------------------------------------------------------
// Between lock processes

/// A command-line locking tool and the server it talks to.
pub enum Tool<'a> {
    /// `tcpnetlock lock NAME [--wait 10]`; the path of this crate's binary.
    Tcpnetlock(&'a std::path::Path, SocketAddr),
    /// `etcdctl lock NAME` (it always waits).
    Etcdctl(&'a Etcd, SocketAddr),
}

impl Tool<'_> {
    pub fn command(&self, name: &str, wait: bool) -> Command {
        let argv = match self {
            Tool::Tcpnetlock(bin, addr) => {
                let mut argv = vec![bin.display().to_string(), "lock".into(), name.into()];
                argv.extend(["--host".into(), addr.ip().to_string()]);
                argv.extend(["--port".into(), addr.port().to_string()]);
                if wait {
                    argv.extend(["--wait".into(), "10".into()]);
                }
                argv
            }
            Tool::Etcdctl(etcd, addr) => etcd.lock_argv(*addr, name, &[]),
        };
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        cmd
    }

    pub fn granted(&self, name: &str, line: &str) -> bool {
        match self {
            Tool::Tcpnetlock(..) => line == "ok",
            // etcdctl prints the key it holds the lock with: NAME/<lease id in hex>.
            Tool::Etcdctl(..) => line.starts_with(&format!("{name}/")),
        }
    }

    /// Whether the waiter is in the server's queue.
    fn queued(&self, name: &str) -> Result<bool, String> {
        match self {
            Tool::Tcpnetlock(_, addr) => Ok(stats_waiting(*addr)? == 1),
            Tool::Etcdctl(_, addr) => Ok(etcd::count_prefix(*addr, &format!("{name}/"))? == 2),
        }
    }
}

/// A lock process whose stdout lines arrive with the time they were read.
pub struct LockProcess {
    child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
}

impl LockProcess {
    pub fn start(mut cmd: Command) -> Result<LockProcess, String> {
        // stdin stays open: `tcpnetlock lock` releases when its stdin ends.
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Ok(LockProcess { child, lines })
    }

    pub fn line(&mut self, what: &str) -> Result<(Instant, String), String> {
        self.line_within(what, LINE_TIMEOUT)
    }

    pub fn line_within(
        &mut self,
        what: &str,
        timeout: Duration,
    ) -> Result<(Instant, String), String> {
        self.lines.recv_timeout(timeout).map_err(|_| {
            let status = self.child.try_wait().ok().flatten();
            format!("{what}: no line within {timeout:?} (exit status: {status:?})")
        })
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill has no memory preconditions; the pid is our own unreaped child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }
}

impl Drop for LockProcess {
    /// SIGTERM (both tools release on it), then SIGKILL if it has not exited within 5 s.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal(libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            thread::sleep(Duration::from_millis(1));
        }
    }
}

/// [`CLI_WARMUP`] uncounted rounds, then [`CLI_ROUNDS`], one at a time.
pub fn between_processes(tool: &Tool) -> Samples {
    Samples::collect(CLI_WARMUP, CLI_ROUNDS, Duration::ZERO, BUDGET, 10, |i| {
        cli_round(tool, &format!("cli-{i}"))
    })
}

fn cli_round(tool: &Tool, name: &str) -> Result<Duration, String> {
    let mut holder = LockProcess::start(tool.command(name, false))?;
    let (_, line) = holder.line("holder")?;
    if !tool.granted(name, &line) {
        return Err(format!("holder: {line:?}"));
    }
    let mut waiter = LockProcess::start(tool.command(name, true))?;
    let deadline = Instant::now() + QUEUE_DEADLINE;
    while !tool.queued(name)? {
        if Instant::now() > deadline {
            return Err(format!(
                "{name}: waiter not queued after {QUEUE_DEADLINE:?}"
            ));
        }
        thread::sleep(Duration::from_millis(1));
    }
    thread::sleep(CLI_SETTLE);
    let t0 = Instant::now();
    holder.signal(libc::SIGTERM);
    let (t1, line) = waiter.line("waiter")?;
    if !tool.granted(name, &line) {
        return Err(format!("waiter: {line:?}"));
    }
    // Dropping them: SIGTERM to the waiter, and both reaped.
    Ok(t1.saturating_duration_since(t0))
}
