//! `tcpnetlock server` as an operator meets it: flags, bind errors, logging to syslog.

mod common;

use std::net::TcpListener;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use common::{BIN, Client, Server, TempDir};

fn run_to_exit(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("LISTEN_FDS")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn address_in_use_exits_2_naming_the_address() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (code, stderr) = run_to_exit(&["server", "--log", "stderr", "--port", &port]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&format!("cannot bind 127.0.0.1:{port}")) && stderr.contains("in use"),
        "{stderr}"
    );
}

#[test]
fn address_not_available_exits_2() {
    // TEST-NET-1: never a local address.
    let (code, stderr) = run_to_exit(&["server", "--log", "stderr", "--listen", "192.0.2.1:7"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("cannot bind 192.0.2.1:7"), "{stderr}");
}

#[test]
fn bad_flags_exit_2() {
    for args in [
        &["server", "--port", "x"][..],
        &["server", "--listen", "[::1"],
        &["server", "--request-timeout", "-1"],
        &["server", "--max-connections", "0"],
        &["server", "--log", "file"],
        &["server", "--no-such-flag"],
        &["no-such-command"],
    ] {
        let (code, stderr) = run_to_exit(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(!stderr.is_empty(), "{args:?} gave no message");
    }
}

#[test]
fn original_flags_work() {
    // tcpnetlock_server --listen 0.0.0.0 --port 7654 --info / --debug
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let mut cmd = Command::new(BIN);
    cmd.args(["server", "--listen", "0.0.0.0", "--port", &port, "--info"])
        .args(["--log", "stderr"]);
    let s = Server::spawn(cmd);
    assert_eq!(s.addr.to_string(), format!("0.0.0.0:{port}"));
    let mut c = Client::connect(format!("127.0.0.1:{port}").parse().unwrap());
    assert_eq!(c.ask(".ping"), "pong");

    let mut cmd = Command::new(BIN);
    cmd.args([
        "server",
        "--listen",
        "127.0.0.1:0",
        "--debug",
        "--log",
        "stderr",
    ]);
    let s = Server::spawn(cmd);
    let (_c, reply) = common::try_lock(s.addr, "dbg");
    assert_eq!(reply, "ok");
    assert!(
        common::wait_until(Duration::from_secs(2), || s.log_text().contains("granted")).is_some(),
        "--debug did not log grants: {}",
        s.log_text()
    );
}

#[test]
fn several_listen_addresses() {
    let mut cmd = Command::new(BIN);
    cmd.args(["server", "--log", "stderr"]).args([
        "--listen",
        "127.0.0.1:0",
        "--listen",
        "127.0.0.2:0",
    ]);
    let s = Server::spawn(cmd);
    let log = || s.log_text();
    assert!(
        common::wait_until(Duration::from_secs(2), || log()
            .matches("listening on")
            .count()
            == 2)
        .is_some(),
        "{}",
        log()
    );
    let second: std::net::SocketAddr = log()
        .lines()
        .filter_map(|l| l.split("listening on ").nth(1))
        .find(|a| a.starts_with("127.0.0.2"))
        .unwrap()
        .parse()
        .unwrap();
    // One lock table behind both sockets.
    let (_a, reply) = common::try_lock(s.addr, "shared");
    assert_eq!(reply, "ok");
    assert_eq!(common::try_lock(second, "shared").1, "not-granted");
}

#[test]
fn logs_to_syslog_in_rfc3164() {
    let dir = TempDir::new("syslog");
    let path = dir.path.join("log.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let child = common::KillOnDrop(
        Command::new(BIN)
            .args(["server", "--listen", "127.0.0.1:0", "-v"])
            .arg("--log")
            .arg(format!("syslog:{}", path.display()))
            .spawn()
            .unwrap(),
    );
    let mut buf = [0u8; 2048];
    let mut recv = || {
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    // The startup lines, up to the address.
    let line = std::iter::repeat_with(&mut recv)
        .take(10)
        .find(|l| l.contains("listening on"))
        .expect("a `listening on` line");
    // <PRI>Mmm dd hh:mm:ss tcpnetlock[PID]: message — facility daemon (3), severity info (6).
    let pid = child.0.id();
    let (pri, rest) = line.split_once('>').unwrap();
    assert_eq!(pri, "<30", "{line}");
    let (stamp, rest) = rest.split_at(15);
    let b = stamp.as_bytes();
    assert!(
        b[0].is_ascii_uppercase() && b[3] == b' ' && b[6] == b' ' && b[9] == b':' && b[12] == b':',
        "timestamp {stamp:?} in {line}"
    );
    let msg = rest
        .strip_prefix(&format!(" tcpnetlock[{pid}]: "))
        .unwrap_or_else(|| panic!("tag in {line}"));
    let addr: std::net::SocketAddr = msg
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{line}"))
        .parse()
        .unwrap();

    // A debug line for a grant, at severity debug (7).
    let (_c, reply) = common::try_lock(addr, "logged");
    assert_eq!(reply, "ok");
    let line = recv();
    assert!(line.starts_with("<31>"), "{line}");
    assert!(line.contains(": lock logged granted"), "{line}");
}

#[test]
fn syslog_target_that_cannot_be_reached_exits_2() {
    let (code, stderr) = run_to_exit(&["server", "--log", "syslog:/nonexistent/log.sock"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("/nonexistent/log.sock"), "{stderr}");
}
