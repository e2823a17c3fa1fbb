//! systemd integration without systemd as PID 1: socket activation through
//! `systemd-socket-activate`, readiness and watchdog through a NOTIFY_SOCKET we bind ourselves.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{BIN, Client, Server, TempDir, require_tool};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn socket_activation_serves_the_passed_socket_and_binds_nothing() {
    let tool = require_tool("systemd-socket-activate", "systemd");
    let port = free_port();
    let own = free_port();
    let mut cmd = Command::new(tool);
    cmd.args(["-l", &format!("127.0.0.1:{port}"), BIN])
        .args(["server", "--log", "stderr", "-v"])
        // Would be bound without socket activation; must not be.
        .args(["--listen", &format!("127.0.0.1:{own}")]);
    // systemd-socket-activate starts the server on the first connection, so the address line
    // comes only after this client connects: connect from a thread.
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let first = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(s) = TcpStream::connect(addr) {
                drop(s);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "activation socket never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let s = Server::spawn(cmd);
    first.join().unwrap();
    assert_eq!(s.addr, addr);
    assert!(
        s.log_text().contains("socket passed by systemd"),
        "{}",
        s.log_text()
    );

    let mut a = Client::connect(addr);
    assert_eq!(a.ask("lock,name:activated"), "ok");
    let mut b = Client::connect(addr);
    assert_eq!(b.ask("lock,name:activated"), "not-granted");
    assert!(
        TcpStream::connect(("127.0.0.1", own)).is_err(),
        "the server bound --listen although systemd passed a socket"
    );
}

/// Starts the server with NOTIFY_SOCKET pointing at a datagram socket of ours.
fn with_notify_socket(extra_env: &[(&str, &str)]) -> (Server, UnixDatagram, TempDir) {
    let dir = TempDir::new("notify");
    let path = dir.path.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["server", "--listen", "127.0.0.1:0", "--log", "stderr"])
        .env("NOTIFY_SOCKET", &path)
        .envs(extra_env.iter().copied());
    (Server::spawn(cmd), sock, dir)
}

fn recv(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a notification");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn ready_is_sent_once_serving_with_a_status_line() {
    let (s, sock, _dir) = with_notify_socket(&[]);
    let first = recv(&sock);
    assert!(first.lines().any(|l| l == "READY=1"), "{first:?}");
    // READY=1 came after the listeners were up: a request succeeds right away.
    assert_eq!(Client::connect(s.addr).ask(".ping"), "pong");
    let status = first
        .lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .expect("STATUS= with READY=1");
    assert!(status.contains("locks held"), "{status}");
    assert!(
        !first.contains("WATCHDOG=1"),
        "no watchdog was asked for: {first:?}"
    );
}

#[test]
fn watchdog_is_fed_at_half_the_interval() {
    // 1 s watchdog: pings about every 500 ms.
    let (_s, sock, _dir) = with_notify_socket(&[("WATCHDOG_USEC", "1000000")]);
    let first = recv(&sock);
    assert!(first.contains("READY=1"), "{first:?}");
    let start = Instant::now();
    let mut pings = 0;
    while pings < 3 {
        if recv(&sock).lines().any(|l| l == "WATCHDOG=1") {
            pings += 1;
        }
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1200) && took < Duration::from_millis(2500),
        "3 watchdog pings took {took:?}"
    );
}

#[test]
fn status_follows_the_lock_count() {
    let (s, sock, _dir) = with_notify_socket(&[("WATCHDOG_USEC", "400000")]);
    recv(&sock);
    let (_a, reply) = common::try_lock(s.addr, "counted");
    assert_eq!(reply, "ok");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let msg = recv(&sock);
        if msg.contains("STATUS=1 locks held") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed the lock: {msg:?}"
        );
    }
}

fn keepalive_listener() -> TcpListener {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    socket2::SockRef::from(&l)
        .set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(Duration::from_secs(9))
                .with_interval(Duration::from_secs(3))
                .with_retries(2),
        )
        .unwrap();
    l
}

#[test]
fn keepalive_of_a_systemd_socket_is_kept_unless_flags_say_otherwise() {
    let l = keepalive_listener();
    let s = common::spawn_with_passed_socket(&l, "");
    assert!(
        s.log_text()
            .contains("dead peers dropped within 15s (TCP keepalive idle at most 9s + 2 x 3s)"),
        "{}",
        s.log_text()
    );
    let (_a, reply) = common::try_lock(s.addr, "inherited");
    assert_eq!(reply, "ok");
    drop(s);

    let l = keepalive_listener();
    let s = common::spawn_with_passed_socket(&l, "--keepalive-time 30");
    assert!(
        s.log_text()
            .contains("dead peers dropped within 50s (TCP keepalive idle at most 30s + 4 x 5s)"),
        "{}",
        s.log_text()
    );
}

#[test]
fn sigterm_hands_every_connection_to_the_fd_store_then_exits_0() {
    let (mut s, sock, _dir) = with_notify_socket(&[]);
    assert!(recv(&sock).contains("READY=1"));
    let (mut holder, reply) = common::try_lock(s.addr, "held");
    assert_eq!(reply, "ok");
    common::signal(s.child.id() as i32, libc::SIGTERM);
    // Read as systemd does when the unit stops: the descriptors that come with the messages are
    // not kept (recv has no room for them, so the kernel closes them).
    let mut messages = Vec::new();
    while !messages.iter().any(|m: &String| m.contains("BARRIER=1")) {
        messages.push(recv(&sock));
        assert!(messages.len() < 10, "{messages:?}");
    }
    let messages: Vec<&str> = messages.iter().map(|m| m.trim_end()).collect();
    assert_eq!(
        messages,
        [
            "STOPPING=1\nSTATUS=stopping on SIGTERM: handing every connection over",
            "FDSTORE=1\nFDNAME=tcpnetlock-conns\nFDPOLL=0",
            "FDSTORE=1\nFDNAME=tcpnetlock-state\nFDPOLL=0",
            "BARRIER=1",
        ]
    );
    assert!(
        holder.closed_within(Duration::from_secs(3)),
        "the holder's connection stayed open"
    );
    let exited = common::wait_until(Duration::from_secs(3), || {
        s.child.try_wait().unwrap().is_some()
    });
    assert!(exited.is_some(), "still running");
    assert_eq!(s.child.wait().unwrap().code(), Some(0), "{}", s.log_text());
    assert!(
        common::wait_until(Duration::from_secs(2), || s
            .log_text()
            .contains("handed over 1 connections (1 holders"))
        .is_some(),
        "{}",
        s.log_text()
    );
}

/// systemd 254 and later say how many descriptors the unit may store (`$FDSTORE`); with none,
/// SIGTERM stops as without a hand-over.
#[test]
fn sigterm_without_an_fd_store_sends_stopping_then_ends_connections_and_exits_0() {
    let (mut s, sock, _dir) = with_notify_socket(&[("FDSTORE", "0")]);
    assert!(recv(&sock).contains("READY=1"));
    let (mut holder, reply) = common::try_lock(s.addr, "held");
    assert_eq!(reply, "ok");
    common::signal(s.child.id() as i32, libc::SIGTERM);
    let stopping = (0..10)
        .map(|_| recv(&sock))
        .find(|m| m.lines().any(|l| l == "STOPPING=1"))
        .expect("STOPPING=1");
    assert!(
        stopping.contains("STATUS=stopping on SIGTERM"),
        "{stopping:?}"
    );
    assert!(
        holder.closed_within(Duration::from_secs(3)),
        "the holder's connection stayed open"
    );
    let exited = common::wait_until(Duration::from_secs(3), || {
        s.child.try_wait().unwrap().is_some()
    });
    assert!(exited.is_some(), "still running");
    assert_eq!(s.child.wait().unwrap().code(), Some(0), "{}", s.log_text());
    assert!(
        common::wait_until(Duration::from_secs(2), || s
            .log_text()
            .contains("stopping on SIGTERM: closing every connection"))
        .is_some(),
        "{}",
        s.log_text()
    );
}
