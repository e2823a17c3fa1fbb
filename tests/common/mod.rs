//! Shared by the integration tests: start the real `tcpnetlock` binary on a free loopback port and
//! talk to it line by line.
#![allow(dead_code)]

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
    /// says which port it bound.
    pub fn start(extra: &[&str]) -> Server {
        let mut cmd = Command::new(BIN);
        cmd.args(["server", "--listen", "127.0.0.1:0", "--log", "stderr", "-v"])
            .args(extra);
        Server::spawn(cmd)
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

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_addr(stderr: ChildStderr) -> (SocketAddr, Arc<Mutex<String>>) {
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
                    if let (Ok(addr), Some(tx)) = (addr.parse::<SocketAddr>(), tx.take()) {
                        let _ = tx.send(addr);
                    }
                }
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| {
            panic!(
                "server did not report its address; log:\n{}",
                log.lock().unwrap()
            )
        });
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
