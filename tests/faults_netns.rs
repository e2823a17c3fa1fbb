//! A holder whose host vanishes (power loss, cable, partition: no FIN, no RST ever arrives) loses
//! its lock within the keepalive bound, and the waiter gets it.
//!
//! The server and the holder live in two network namespaces that the test creates, joined by a
//! veth pair: 10.231.7.1/30 on the server's end, 10.231.7.2/30 on the client's. Those are the
//! only addresses configured (the server's namespace also gets its `lo` up, for the waiter that
//! queues there); nothing outside the two namespaces is touched, and both are deleted when the
//! test ends, however it ends. The link is cut by setting the client's end down: the holder's
//! socket stays open and idle in a live process, no packet of any kind reaches the server, and
//! only TCP keepalive can tell.
//!
//! Needs root (CI runs as root) and `ip` (iproute2). The 40 s default bound is checked only with
//! TCPNETLOCK_LONG_FAULTS=1.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{BIN, Server, require_tool, wait_until};

const SERVER_IP: &str = "10.231.7.1";
const CLIENT_IP: &str = "10.231.7.2";
const PORT: u16 = 7654;

/// Runs `ip ARGS`; panics with its stderr if it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces joined by a veth pair, deleted on drop (with the pair, which lives in them).
struct Link {
    srv: String,
    cli: String,
}

impl Link {
    fn new() -> Link {
        require_tool("ip", "iproute2");
        // SAFETY: plain system call.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "creating network namespaces needs root (CI runs the tests as root)"
        );
        remove_stale_namespaces();
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let base = format!("tnlf-{}-{n}", std::process::id());
        let link = Link {
            srv: format!("{base}-srv"),
            cli: format!("{base}-cli"),
        };
        ip(&["netns", "add", &link.srv]);
        ip(&["netns", "add", &link.cli]);
        // Created inside the server's namespace, its peer inside the client's: the pair never
        // exists in the namespace the test runs in.
        ip(&[
            "-n", &link.srv, "link", "add", "veth-srv", "type", "veth", "peer", "name", "veth-cli",
            "netns", &link.cli,
        ]);
        ip(&[
            "-n",
            &link.srv,
            "addr",
            "add",
            "10.231.7.1/30",
            "dev",
            "veth-srv",
        ]);
        ip(&[
            "-n",
            &link.cli,
            "addr",
            "add",
            "10.231.7.2/30",
            "dev",
            "veth-cli",
        ]);
        ip(&["-n", &link.srv, "link", "set", "veth-srv", "up"]);
        ip(&["-n", &link.cli, "link", "set", "veth-cli", "up"]);
        ip(&["-n", &link.srv, "link", "set", "lo", "up"]);
        link
    }

    fn set_client_end(&self, state: &str) {
        ip(&["-n", &self.cli, "link", "set", "veth-cli", state]);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for ns in [&self.srv, &self.cli] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Namespaces left by a test process that was killed before it could delete them.
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix("tnlf-")
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Connects from inside namespace `ns`: a thread enters it (the network namespace is per
/// thread), opens the socket, and exits; the socket stays in `ns`.
fn connect_in(ns: &str, addr: SocketAddr) -> LineConn {
    let path = format!("/run/netns/{ns}");
    let stream = thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: a valid namespace descriptor; only this thread changes namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        // The link may take a moment to come up after it was set up.
        let mut last = None;
        wait_until(
            Duration::from_secs(10),
            || match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(s) => {
                    last = Some(Ok(s));
                    true
                }
                Err(e) => {
                    last = Some(Err(e));
                    false
                }
            },
        );
        last.unwrap()
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
    })
    .join()
    .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    LineConn {
        reader: BufReader::new(stream.try_clone().unwrap()),
        stream,
    }
}

struct LineConn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl LineConn {
    fn send(&mut self, text: &str) {
        self.stream
            .write_all(format!("{text}\n").as_bytes())
            .unwrap();
    }

    /// The next line, or what happened instead (end of file, an error, a timeout).
    fn line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("end of file".into()),
            Ok(_) => Ok(line.trim_end().to_owned()),
            Err(e) => Err(format!("{e} ({:?})", e.kind())),
        }
    }

    /// Whether anything at all (data, end of file, an error) is waiting on the socket.
    fn anything_arrived(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events: libc::POLLIN | libc::POLLPRI,
            revents: 0,
        };
        // SAFETY: one valid pollfd, owned by this frame, for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n != 0
    }
}

/// Starts the server in the server's namespace, on the veth address.
fn start_server(link: &Link, keepalive: &[&str]) -> Server {
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns", "exec", &link.srv, BIN, "server", "--log", "stderr", "-v",
    ])
    .args(["--listen", &format!("{SERVER_IP}:{PORT}")])
    .args(keepalive);
    Server::spawn(cmd)
}

/// Holder in the client's namespace, waiter in the server's; cuts the link and returns how long
/// after the cut the waiter was granted. Checks the holder saw nothing, and that the server had
/// really dropped its connection (a reset once the link is back).
fn cut_holder_off(link: &Link, server: &Server, wait: u32, limit: Duration) -> Duration {
    let addr: SocketAddr = format!("{SERVER_IP}:{PORT}").parse().unwrap();
    let mut holder = connect_in(&link.cli, addr);
    assert_eq!(
        holder.stream.local_addr().unwrap().ip().to_string(),
        CLIENT_IP
    );
    holder.send("lock,name:vanishing,client-id:holder");
    assert_eq!(holder.line().as_deref(), Ok("ok"));
    let mut waiter = connect_in(&link.srv, addr);
    waiter.send(&format!("lock,name:vanishing,wait:{wait}"));
    let queued = wait_until(Duration::from_secs(5), || {
        let mut c = connect_in(&link.srv, addr);
        c.send(".locks");
        c.line().is_ok_and(|l| l.contains("\"waiting\": 1"))
    });
    assert!(queued.is_some(), "the waiter never queued");

    link.set_client_end("down");
    let cut = Instant::now();
    waiter.stream.set_read_timeout(Some(limit)).unwrap();
    let granted = waiter.line();
    let took = cut.elapsed();
    assert_eq!(
        granted.as_deref(),
        Ok("ok"),
        "the waiter was not granted within {limit:?} of the cut; log:\n{}",
        server.log_text()
    );
    // The holder, alive all along, was told nothing: no reset, no end of file reached it.
    assert!(
        !holder.anything_arrived(),
        "the holder heard from the server: the link let something through"
    );

    // Once the link is back, the holder's next request meets a connection the server no longer
    // has.
    link.set_client_end("up");
    let mut reply = Ok(String::new());
    wait_until(Duration::from_secs(10), || {
        if let Err(e) = holder.stream.write_all(b".keepalive\n") {
            reply = Err(format!("write: {e}"));
            return true;
        }
        holder
            .stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        reply = holder.line();
        // A timeout: the route is not back yet (the request is retransmitted meanwhile).
        !matches!(&reply, Err(e) if e.contains("WouldBlock") || e.contains("TimedOut"))
    });
    assert!(
        reply.as_deref().is_err_and(|e| e.contains("reset")),
        "after the link came back the holder got {reply:?}, not a reset"
    );
    took
}

#[test]
fn vanished_holder_is_dropped_within_the_keepalive_bound() {
    let link = Link::new();
    let server = start_server(
        &link,
        &[
            "--keepalive-time",
            "1",
            "--keepalive-interval",
            "1",
            "--keepalive-probes",
            "3",
        ],
    );
    assert!(
        server
            .log_text()
            .contains("dead peers dropped within 4s (TCP keepalive idle at most 1s + 3 x 1s)"),
        "{}",
        server.log_text()
    );
    let bound = Duration::from_secs(4);
    let took = cut_holder_off(&link, &server, 30, bound + Duration::from_secs(10));
    eprintln!("vanished holder (bound 1 s + 3 x 1 s): waiter granted {took:?} after the cut");
    check_timing(
        took,
        Duration::from_secs(1),
        Duration::from_secs(3),
        Duration::from_millis(2500),
    );
}

/// The kernel drops the connection once `time + interval x probes` has passed since it last
/// heard from the peer. That was at most `time` before the cut (an idle connection's probes are
/// answered until then), and in these tests only moments before it (the grant); so the waiter
/// is granted between `interval x probes` and the bound after the cut. Sooner would not be
/// keepalive at work.
fn check_timing(took: Duration, time: Duration, probing: Duration, slack: Duration) {
    let bound = time + probing;
    assert!(
        took > time && took >= probing - Duration::from_millis(250),
        "granted {took:?} after the cut: too soon for keepalive ({time:?} + {probing:?})"
    );
    assert!(
        took <= bound + slack,
        "granted {took:?} after the cut; bound {bound:?}"
    );
}

/// The README's claim: with default settings, a vanished holder's lock is freed within 40 s (as
/// far as the server's settings go: the kernel's timers add a second or two, below).
#[test]
fn vanished_holder_default_bound_40s() {
    if std::env::var("TCPNETLOCK_LONG_FAULTS").is_ok_and(|v| v == "1") {
        let link = Link::new();
        let server = start_server(&link, &[]);
        let bound = Duration::from_secs(40);
        let took = cut_holder_off(&link, &server, 90, bound + Duration::from_secs(20));
        eprintln!("vanished holder (default bound 40 s): waiter granted {took:?} after the cut");
        // The slack is wider here: the kernel's timer wheel rounds a 20 s timer up by as much as
        // 2 s (HZ=250), each 5 s one by up to 256 ms. Measured: 41.2 s and 41.6 s; 36.7 s since
        // each connection has an idle time of its own (its last probe is then at 35-40 s).
        check_timing(
            took,
            Duration::from_secs(20),
            Duration::from_secs(20),
            Duration::from_secs(5),
        );
    } else {
        eprintln!("skipped: set TCPNETLOCK_LONG_FAULTS=1 to check the 40 s default bound");
    }
}
