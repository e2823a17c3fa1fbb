//! Shared by the integration tests: start the real `tcpnetlock` binary on a free loopback port and
//! talk to it line by line.
//!
//! With TCPNETLOCK_TEST_ETCD=1 (and a build with `--features etcd`), [`Server::start`] starts a
//! cluster member instead (`--etcd`, a lock space of its own), on a 3-member etcd started once
//! for the test process and stopped when it exits: the same tests then check the protocol
//! through a member (tests/run-all.sh runs protocol_v1, protocol_v2 and conformance so).
#![allow(dead_code)]

pub mod etcd;
pub mod prometheus;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_tcpnetlock");

/// A running `tcpnetlock server`, killed on drop. Its stderr log is collected in `log`.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `tcpnetlock server --listen 127.0.0.1:0 --log stderr -v <extra>` and waits until it
    /// says which port it bound. With TCPNETLOCK_TEST_ETCD=1, a cluster member (see the module
    /// docs), once it serves.
    pub fn start(extra: &[&str]) -> Server {
        let mut cmd = Command::new(BIN);
        cmd.args(["server", "--listen", "127.0.0.1:0", "--log", "stderr", "-v"])
            .args(extra);
        let member = cluster_mode().then(|| member_args(extra));
        if let Some(args) = &member {
            cmd.args(args);
        }
        let server = Server::spawn(cmd);
        if member.is_some() {
            // Its log, not a request: the tests count requests in `.stats`.
            let ok = wait_until(Duration::from_secs(30), || {
                server
                    .log_text()
                    .contains("cluster: member test serves locks")
            });
            assert!(
                ok.is_some(),
                "the member never served:\n{}",
                server.log_text()
            );
        }
        server
    }

    /// Spawns a prepared command whose stderr will contain `listening on ADDR` (or `serving ADDR`).
    /// systemd's variables reach it only when the test set them on `cmd`.
    pub fn spawn(mut cmd: Command) -> Server {
        for var in [
            "NOTIFY_SOCKET",
            "LISTEN_FDS",
            "LISTEN_PID",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
        ] {
            if !cmd.get_envs().any(|(k, _)| k == var) {
                cmd.env_remove(var);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start tcpnetlock");
        let stderr = child.stderr.take().unwrap();
        let (addr, log) = read_addr(stderr);
        let Some(addr) = addr else {
            // Not left running after the test.
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "server did not report its address; log:\n{}",
                log.lock().unwrap_or_else(|e| e.into_inner())
            );
        };
        Server { child, addr, log }
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.addr)
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The parsed `.stats` JSON text.
    pub fn stats(&self) -> String {
        let mut c = self.connect();
        c.send(".stats");
        let line = c.line();
        line.strip_prefix("stats,").expect("stats line").to_owned()
    }

    /// One numeric field of `.stats`.
    pub fn stat(&self, key: &str) -> f64 {
        json_number(&self.stats(), key).unwrap_or_else(|| panic!("no {key} in stats"))
    }
}

/// The environment variable that makes [`Server::start`] start cluster members.
pub const ETCD_ENV: &str = "TCPNETLOCK_TEST_ETCD";

/// Whether [`Server::start`] starts cluster members (TCPNETLOCK_TEST_ETCD=1).
pub fn cluster_mode() -> bool {
    std::env::var(ETCD_ENV).is_ok_and(|v| v == "1")
}

/// The etcd of the whole test process, started by the first member; stopped at exit.
static SHARED_ETCD: Mutex<Option<etcd::EtcdCluster>> = Mutex::new(None);

extern "C" fn stop_shared_etcd() {
    // At exit: another thread may still hold the lock (a test that panicked is not waited
    // for); then its etcd is left to the kernel's clean-up of a dead parent's children.
    if let Ok(mut shared) = SHARED_ETCD.try_lock() {
        shared.take();
    }
}

/// The `--etcd ...` arguments of a member: the shared etcd, a lock space of its own, or, with
/// `--state-dir DIR` in `extra`, the lock space of DIR (a restarted server with the same state
/// directory finds its locks and its tokens go on growing, as a single server's do).
fn member_args(extra: &[&str]) -> Vec<String> {
    let endpoints = {
        let mut shared = SHARED_ETCD.lock().unwrap_or_else(|e| e.into_inner());
        if shared.is_none() {
            *shared = Some(etcd::EtcdCluster::start3());
            // SAFETY: registers a plain function; it runs when the process exits.
            unsafe { libc::atexit(stop_shared_etcd) };
        }
        shared.as_ref().unwrap().endpoints().join(",")
    };
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let space = match extra.iter().position(|a| *a == "--state-dir") {
        Some(i) => {
            let dir = extra.get(i + 1).copied().unwrap_or_default();
            let hash = dir.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            });
            format!("dir-{hash:x}")
        }
        None => format!(
            "n{}",
            NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ),
    };
    vec![
        "--etcd".into(),
        endpoints,
        "--etcd-prefix".into(),
        format!("/tnl-test-{}-{space}/", std::process::id()),
        "--etcd-name".into(),
        "test".into(),
    ]
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address the server says it listens on (None if it does not say so in time), and its
/// log as it comes.
fn read_addr(stderr: ChildStderr) -> (Option<SocketAddr>, Arc<Mutex<String>>) {
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = Arc::clone(&log);
    thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push_str(&line);
            sink.lock().unwrap().push('\n');
            for marker in ["listening on ", "serving "] {
                if let Some(rest) = line.split(marker).nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("");
                    if let Ok(addr) = addr.parse::<SocketAddr>()
                        && let Some(tx) = tx.take()
                    {
                        let _ = tx.send(addr);
                    }
                }
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(20)).ok();
    (addr, log)
}

/// A child process killed when the test ends, even by a panic.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A line-oriented client over one connection.
pub struct Client {
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Client { stream, reader }
    }

    /// Sends `text` followed by `\n`.
    pub fn send(&mut self, text: &str) {
        self.stream
            .write_all(format!("{text}\n").as_bytes())
            .unwrap();
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// The next line without its `\n`; panics on timeout or end of file.
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read a line");
        assert!(n > 0, "connection closed while a line was expected");
        assert!(line.ends_with('\n'), "unterminated line {line:?}");
        line.pop();
        line
    }

    /// Sends a request and returns the reply line.
    pub fn ask(&mut self, text: &str) -> String {
        self.send(text);
        self.line()
    }

    /// True when the server closed the connection (end of file, or a reset) within `timeout`.
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        self.stream.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 64];
        let r = self.reader.read(&mut buf);
        self.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        match r {
            Ok(0) => true,
            Ok(n) => panic!("unexpected bytes {:?}", String::from_utf8_lossy(&buf[..n])),
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }

    /// True when nothing arrives within `d` and the connection stays open: no byte, no end of
    /// file, no reset.
    pub fn silent_for(&mut self, d: Duration) -> bool {
        self.stream.set_read_timeout(Some(d)).unwrap();
        let r = self.reader.fill_buf().map(|b| b.len());
        self.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        matches!(r, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
    }

    pub fn half_close(&self) {
        self.stream.shutdown(Shutdown::Write).unwrap();
    }

    /// Closes with a reset instead of a FIN (SO_LINGER 0).
    pub fn reset(self) {
        socket2::SockRef::from(&self.stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(self);
    }
}

/// Opens a connection and asks for `name`; returns the client and the reply.
pub fn try_lock(addr: SocketAddr, name: &str) -> (Client, String) {
    let mut c = Client::connect(addr);
    let reply = c.ask(&format!("lock,name:{name}"));
    (c, reply)
}

/// Polls `cond` every 5 ms until it holds or `limit` passes; returns the time it took.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// A number from a flat JSON object, without a JSON library.
pub fn json_number(json: &str, key: &str) -> Option<f64> {
    let at = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = json[at..].trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == 'e'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Fails the test with a useful message when a required external tool is missing: CI installs
/// them (.ci/run), so a missing tool is a broken setup, not a reason to skip.
pub fn require_tool(tool: &str, package: &str) -> String {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .expect("run sh");
    let path = String::from_utf8_lossy(&found.stdout).trim().to_owned();
    assert!(
        found.status.success() && !path.is_empty(),
        "{tool} is missing: install the Debian package {package} (bash .ci/run does)"
    );
    path
}

/// A scratch directory, removed on drop.
pub struct TempDir {
    pub path: std::path::PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("tcpnetlock-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------------------------
// Client commands: running `tcpnetlock do/lock/...` and watching the processes they start.

/// A port nothing listens on (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running command whose stdout and stderr are collected as they come. Killed on drop.
pub struct Running {
    pub child: Child,
    pub stdout: Arc<Mutex<String>>,
    pub stderr: Arc<Mutex<String>>,
}

impl Running {
    /// Spawns `cmd` with stdin null (unless set), stdout and stderr piped.
    pub fn spawn(cmd: &mut Command) -> Running {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn");
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        Running {
            child,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for the exit; panics (showing the output) if it takes longer than `limit`.
    pub fn wait_within(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut status = None;
        wait_until(limit, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        let status = status.unwrap_or_else(|| {
            panic!(
                "still running after {limit:?}\n--- stdout\n{}\n--- stderr\n{}",
                self.stdout(),
                self.stderr()
            )
        });
        // Let the readers take the last bytes.
        wait_until(Duration::from_secs(2), || {
            Arc::strong_count(&self.stderr) == 1
        });
        wait_until(Duration::from_secs(2), || {
            Arc::strong_count(&self.stdout) == 1
        });
        status
    }

    /// Waits for the exit and returns (status code or 128+signal, stdout, stderr).
    pub fn finish(&mut self, limit: Duration) -> (i32, String, String) {
        let status = self.wait_within(limit);
        (code(status), self.stdout(), self.stderr())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn collect(mut from: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&text);
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    text
}

/// Runs `cmd` to its end within `limit`: (status code or 128+signal, stdout, stderr).
pub fn run_within(cmd: &mut Command, limit: Duration) -> (i32, String, String) {
    cmd.stdin(Stdio::null());
    Running::spawn(cmd).finish(limit)
}

/// An exit status as a shell shows it.
pub fn code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// (comm, state, ppid, pgrp) of a process, from /proc; None once it is gone.
pub fn proc_stat(pid: i32) -> Option<(String, char, i32, i32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_owned();
    let mut rest = text[close + 1..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    let pgrp = rest.next()?.parse().ok()?;
    Some((comm, state, ppid, pgrp))
}

/// Running, not a zombie.
pub fn alive(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|(_, state, _, _)| !matches!(state, 'Z' | 'X'))
}

fn live_processes() -> Vec<(i32, String, i32, i32)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let (comm, state, ppid, pgrp) = proc_stat(pid)?;
            (!matches!(state, 'Z' | 'X')).then_some((pid, comm, ppid, pgrp))
        })
        .collect()
}

/// Live processes whose parent is `pid`.
pub fn children(pid: i32) -> Vec<i32> {
    live_processes()
        .into_iter()
        .filter(|p| p.2 == pid)
        .map(|p| p.0)
        .collect()
}

/// Live members of process group `pgid`: (pid, comm).
pub fn group_members(pgid: i32) -> Vec<(i32, String)> {
    live_processes()
        .into_iter()
        .filter(|p| p.3 == pgid)
        .map(|p| (p.0, p.1))
        .collect()
}

/// Sends `signal` to `pid`.
pub fn signal(pid: i32, signal: i32) {
    // SAFETY: plain system call.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill {pid} {signal}");
}

/// Waits for `path` to exist (a command under test touches it once it runs).
pub fn await_file(path: &std::path::Path) {
    assert!(
        wait_until(Duration::from_secs(10), || path.exists()).is_some(),
        "{} never appeared",
        path.display()
    );
}

/// Whether `name` is free now: takes it and releases it (waiting for `released`, so the next
/// request finds it free again).
pub fn is_free(addr: SocketAddr, name: &str) -> bool {
    let (mut c, reply) = try_lock(addr, name);
    if reply != "ok" {
        return false;
    }
    assert_eq!(c.ask("release"), "released");
    true
}

/// Starts `tcpnetlock server --log stderr <extra>` with `listener` as the socket systemd would
/// pass (fd 3, LISTEN_FDS=1, LISTEN_PID set by the shell that execs the server, so it is the
/// server's own pid).
pub fn spawn_with_passed_socket(listener: &std::net::TcpListener, extra: &str) -> Server {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "LISTEN_PID=$$ LISTEN_FDS=1 exec {BIN} server --log stderr {extra}"
        ))
        .env("LISTEN_FDS", "1");
    // SAFETY: dup2 and fcntl are async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would keep close-on-exec: clear the flag instead.
            let ok = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0) == 0
            } else {
                libc::dup2(fd, 3) == 3
            };
            if !ok {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Server::spawn(cmd)
}
