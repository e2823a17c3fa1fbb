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

#[test]
fn out_of_range_flags_exit_2_naming_the_flag() {
    let cases: [(&str, &[&str]); 8] = [
        (
            "--max-line-length",
            &[
                "15",
                "1048577",
                "100000000000",
                "18446744073709551615",
                "18446744073709551616",
            ],
        ),
        (
            "--max-connections",
            &["0", "1000001", "18446744073709551615"],
        ),
        (
            "--max-name-length",
            &["0", "1048577", "18446744073709551615"],
        ),
        (
            "--request-timeout",
            &["0", "0.0009", "86400.5", "1e19", "-1", "inf", "NaN"],
        ),
        ("--keepalive-time", &["32768", "1e19", "0.5", "-1"]),
        ("--keepalive-interval", &["0", "32768", "100000"]),
        ("--keepalive-probes", &["0", "128", "200", "4294967296"]),
        ("--port", &["65536"]),
    ];
    for (flag, values) in cases {
        for value in values {
            // A server that accepted the value would run until killed: bounded wait.
            let (code, _, stderr) = common::run_within(
                Command::new(BIN)
                    .args(["server", "--log", "stderr", "--listen", "127.0.0.1:0"])
                    .arg(format!("{flag}={value}"))
                    .env_remove("LISTEN_FDS"),
                Duration::from_secs(10),
            );
            assert_eq!(code, 2, "{flag} {value}: {stderr}");
            assert!(
                stderr.contains(&format!("'{flag} <")) && stderr.contains(value),
                "{flag} {value}: {stderr}"
            );
        }
    }
}

#[test]
fn flags_at_their_bounds_are_accepted() {
    for args in [
        &[
            "--max-line-length",
            "1048576",
            "--max-connections",
            "1000000",
            "--max-name-length",
            "1048576",
            "--request-timeout",
            "86400",
            "--keepalive-time",
            "32767",
            "--keepalive-interval",
            "32767",
            "--keepalive-probes",
            "127",
        ][..],
        &[
            "--max-line-length",
            "16",
            "--max-connections",
            "1",
            "--max-name-length",
            "1",
            "--request-timeout",
            "0.001",
            "--keepalive-time",
            "1",
            "--keepalive-interval",
            "1",
            "--keepalive-probes",
            "1",
        ],
    ] {
        let s = Server::start(args);
        assert!(
            s.log_text().contains("dead peers dropped within"),
            "{args:?}: {}",
            s.log_text()
        );
        let mut c = s.connect();
        c.send_raw(b".ping\n");
        assert_eq!(c.line(), "pong", "{args:?}");
    }
}

/// Starts a server (default signal dispositions, whatever the test runner's are), with a holder
/// of lock `held`.
fn server_with_holder() -> (Server, Client) {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(BIN);
    cmd.args(["server", "--listen", "127.0.0.1:0", "--log", "stderr"]);
    // SAFETY: signal() is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::signal(s, libc::SIG_DFL);
            }
            Ok(())
        });
    }
    let s = Server::spawn(cmd);
    let (holder, reply) = common::try_lock(s.addr, "held");
    assert_eq!(reply, "ok");
    (s, holder)
}

fn exits_within(s: &mut Server, limit: Duration) -> i32 {
    let mut status = None;
    common::wait_until(limit, || {
        status = s.child.try_wait().unwrap();
        status.is_some()
    });
    common::code(status.unwrap_or_else(|| panic!("still running after {limit:?}")))
}

#[test]
fn sigterm_and_sigint_stop_the_server_saying_so() {
    // SIGTERM: an orderly stop, status 0. SIGINT: raised again after the log, as a shell expects
    // of an interrupted program (128 + 2).
    for (signal, name, status) in [(libc::SIGTERM, "SIGTERM", 0), (libc::SIGINT, "SIGINT", 130)] {
        let (mut s, mut holder) = server_with_holder();
        let sent = std::time::Instant::now();
        common::signal(s.child.id() as i32, signal);
        assert!(
            holder.closed_within(Duration::from_secs(3)),
            "{name}: the holder's connection stayed open"
        );
        let closed = sent.elapsed();
        assert_eq!(
            exits_within(&mut s, Duration::from_secs(3)),
            status,
            "{name}"
        );
        assert!(
            closed < Duration::from_secs(2),
            "{name}: closed after {closed:?}"
        );
        assert!(
            common::wait_until(Duration::from_secs(2), || s.log_text().contains(&format!(
                "INFO: stopping on {name}: closing every connection (1 locks held"
            )))
            .is_some(),
            "{name}: {}",
            s.log_text()
        );
    }
}

#[test]
fn sighup_does_not_stop_the_server() {
    let (mut s, mut holder) = server_with_holder();
    common::signal(s.child.id() as i32, libc::SIGHUP);
    assert!(
        common::wait_until(Duration::from_secs(5), || s
            .log_text()
            .contains("SIGHUP ignored"))
        .is_some(),
        "{}",
        s.log_text()
    );
    assert_eq!(s.child.try_wait().unwrap(), None, "{}", s.log_text());
    assert_eq!(s.connect().ask(".ping"), "pong");
    assert_eq!(common::try_lock(s.addr, "held").1, "not-granted");
    assert_eq!(holder.ask("release"), "released");
}

#[test]
fn maxrss_is_the_servers_own_peak_not_its_launchers() {
    // A launcher that touches 200 MB, then becomes the server (same process, new program):
    // Linux carries ru_maxrss across exec, VmHWM starts again.
    let mut cmd = Command::new("python3");
    cmd.args([
        "-c",
        "import os, sys\n\
         b = b'x' * (200 << 20)\n\
         os.execv(sys.argv[1], sys.argv[1:])",
        BIN,
        "server",
        "--listen",
        "127.0.0.1:0",
        "--log",
        "stderr",
    ]);
    let s = Server::spawn(cmd);
    let kib = s.stat("maxrss");
    let status = std::fs::read_to_string(format!("/proc/{}/status", s.child.id())).unwrap();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .unwrap()
        .to_owned();
    assert!(
        kib > 0.0 && kib < 50.0 * 1024.0,
        "maxrss {kib} KiB (the process's {hwm})"
    );
}

#[test]
fn a_fatal_error_is_printed_once_and_reaches_syslog() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (code, stderr) = run_to_exit(&["server", "--log", "stderr", "--port", &port]);
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stderr.matches("cannot bind").count(), 1, "{stderr}");

    // To syslog, the error is logged (written out before the process exits) as well as printed.
    let dir = TempDir::new("syslog-fatal");
    let path = dir.path.join("log.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let target = format!("syslog:{}", path.display());
    let (code, stderr) = run_to_exit(&["server", "--log", &target, "--port", &port]);
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stderr.matches("cannot bind").count(), 1, "{stderr}");
    let mut buf = [0u8; 2048];
    let n = sock.recv(&mut buf).expect("the error in syslog");
    let line = String::from_utf8_lossy(&buf[..n]);
    // Facility daemon (3), severity error (3).
    assert!(
        line.starts_with("<27>") && line.contains("cannot bind 127.0.0.1:"),
        "{line}"
    );
}
