//! The binary under tcpnetlock 0.1.8's names (symlinks `tcpnetlock_server`, `tcpnetlock_client`,
//! `tcpnetlock_do`), driven with the original programs' flags, as scripts and manifests written
//! for 0.1.8 call them.

mod common;

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{
    BIN, Client, Running, Server, TempDir, free_port, run_within, signal, try_lock, wait_until,
};

const LIMIT: Duration = Duration::from_secs(20);

/// A directory with the three names linked to the binary under test.
struct Names {
    dir: TempDir,
}

impl Names {
    fn new() -> Names {
        let dir = TempDir::new("dropin");
        for name in ["tcpnetlock_server", "tcpnetlock_client", "tcpnetlock_do"] {
            std::os::unix::fs::symlink(BIN, dir.path.join(name)).unwrap();
        }
        Names { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path.join(name)
    }

    /// The program, without the test's own TCPNETLOCK_* variables.
    fn cmd(&self, name: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.path(name));
        cmd.args(args);
        for var in ["TCPNETLOCK_HOST", "TCPNETLOCK_PORT", "TCPNETLOCK_CLIENT_ID"] {
            cmd.env_remove(var);
        }
        cmd
    }

    fn run(&self, name: &str, args: &[&str]) -> (i32, String, String) {
        run_within(&mut self.cmd(name, args), LIMIT)
    }
}

// tcpnetlock_do ------------------------------------------------------------------------------

#[test]
fn do_takes_0_1_8_arguments_and_returns_its_statuses() {
    let names = Names::new();
    let s = Server::start(&[]);
    let port = format!("--port={}", s.addr.port());
    let base = ["--host=localhost", "--lock-name=job", &port];
    let run = |extra: &[&str]| {
        let args: Vec<&str> = base.iter().copied().chain(extra.iter().copied()).collect();
        names.run("tcpnetlock_do", &args)
    };
    assert_eq!(
        run(&["--", "sh", "-c", "echo ran"]),
        (0, "ran\n".into(), String::new())
    );
    // As 0.1.8's own tests call it: --shell and the command without `--`.
    assert_eq!(run(&["--shell", "exit 5"]).0, 5);
    assert_eq!(run(&["--shell", "--", "echo a | tr a b"]).1, "b\n");
    assert_eq!(run(&["--", "/non/existing/binary", "1", "1"]).0, 127);
    assert_eq!(run(&["--shell", "--", "vmstat", "other-arg"]).0, 2);
    assert_eq!(
        run(&["--keep-alive", "--keep-alive-secs", "1", "--", "true"]).0,
        0
    );
    assert_eq!(run(&["--info", "--", "true"]).0, 0);
    assert_eq!(run(&["--debug", "--", "true"]).0, 0);
    {
        let (_holder, _) = try_lock(s.addr, "job");
        assert_eq!(run(&["--", "true"]).0, 123);
        assert_eq!(run(&["--retry=1", "--retry-wait=0", "--", "true"]).0, 123);
    }
    let refused = format!("--port={}", free_port());
    let (code, _, _) = names.run("tcpnetlock_do", &["--lock-name=x", &refused, "--", "true"]);
    assert_eq!(code, 125);
    // argparse lets a later option override an earlier one (0.1.8's own tests rely on it).
    let (code, _, err) = names.run(
        "tcpnetlock_do",
        &[
            "--port=1",
            &port,
            "--lock-name=a",
            "--lock-name=o",
            "--",
            "true",
        ],
    );
    assert_eq!(code, 0, "{err}");
    // argparse accepts any unique prefix of a long option.
    let (code, out, _) = names.run(
        "tcpnetlock_do",
        &[
            "--lock=pre",
            &port,
            "--",
            "sh",
            "-c",
            "echo $TCPNETLOCK_LOCK_NAME",
        ],
    );
    assert_eq!((code, out.as_str()), (0, "pre\n"));
}

#[test]
fn do_reads_host_port_and_client_id_from_the_environment() {
    let names = Names::new();
    let s = Server::start(&[]);
    let mut cmd = names.cmd("tcpnetlock_do", &["--", "true"]);
    cmd.env("TCPNETLOCK_PORT", free_port().to_string());
    assert_eq!(run_within(&mut cmd, LIMIT).0, 125);
    let mut cmd = names.cmd("tcpnetlock_do", &["--", "sh", "-c", "exit 4"]);
    cmd.env("TCPNETLOCK_HOST", "127.0.0.1")
        .env("TCPNETLOCK_PORT", s.addr.port().to_string())
        .env("TCPNETLOCK_CLIENT_ID", "pod-1");
    assert_eq!(run_within(&mut cmd, LIMIT).0, 4);
}

// tcpnetlock_client --------------------------------------------------------------------------

#[test]
fn client_connection_refused_is_2_with_python_s_message() {
    let names = Names::new();
    let port = format!("--port={}", free_port());
    let (code, _, err) = names.run("tcpnetlock_client", &["--debug", &port, "some-lock"]);
    assert_eq!(code, 2);
    assert!(err.contains("[Errno 111] Connection refused"), "{err}");
    let mut cmd = names.cmd("tcpnetlock_client", &["--debug", "some-lock"]);
    cmd.env("TCPNETLOCK_PORT", free_port().to_string());
    assert_eq!(run_within(&mut cmd, LIMIT).0, 2);
}

#[test]
fn client_other_connection_failures_are_3() {
    let names = Names::new();
    let (code, _, err) = names.run(
        "tcpnetlock_client",
        &["--host", "no-such-host.invalid", "x"],
    );
    assert_eq!(code, 3, "{err}");
}

#[test]
fn client_not_granted_is_123() {
    let names = Names::new();
    let s = Server::start(&[]);
    let (_holder, _) = try_lock(s.addr, "held");
    let port = format!("--port={}", s.addr.port());
    let (code, _, err) = names.run("tcpnetlock_client", &["--host=127.0.0.1", &port, "held"]);
    assert_eq!(code, 123);
    assert!(
        err.contains("ERROR: lock 'held' not granted by server"),
        "{err}"
    );
}

/// Starts tcpnetlock_client holding `name` and waits until the server shows it held.
fn client_holding(names: &Names, s: &Server, name: &str, extra: &[&str]) -> Running {
    let port = format!("--port={}", s.addr.port());
    let mut args = vec!["--host", "127.0.0.1", &port, "--client-id", "cli-1"];
    args.extend(extra);
    args.push(name);
    let running = Running::spawn(&mut names.cmd("tcpnetlock_client", &args));
    let shown = wait_until(LIMIT, || {
        let mut c = Client::connect(s.addr);
        let locks = c.ask(".locks");
        locks.contains(&format!("\"{name}\"")) && locks.contains("\"cli-1\"")
    });
    assert!(shown.is_some(), "{}", running.stderr());
    running
}

#[test]
fn client_holds_until_killed() {
    let names = Names::new();
    let s = Server::start(&[]);
    let mut running = client_holding(&names, &s, "h", &[]);
    assert_eq!(try_lock(s.addr, "h").1, "not-granted");
    signal(running.pid(), libc::SIGTERM);
    // SIGTERM ends it the default way, as it ended 0.1.8's Python.
    assert_eq!(running.finish(LIMIT).0, 128 + libc::SIGTERM);
    assert!(wait_until(LIMIT, || common::is_free(s.addr, "h")).is_some());

    // Ctrl-C: 0.1.8 caught KeyboardInterrupt and exited 4.
    let mut running = client_holding(&names, &s, "h", &["--keep-alive", "--keep-alive-secs", "1"]);
    signal(running.pid(), libc::SIGINT);
    assert_eq!(running.finish(LIMIT).0, 4);
}

#[test]
fn client_losing_the_connection_is_122() {
    let names = Names::new();
    let s = Server::start(&[]);
    let mut running = client_holding(&names, &s, "lost", &[]);
    drop(s);
    let (code, _, err) = running.finish(LIMIT);
    assert_eq!(code, 122);
    assert!(
        err.contains(
            "ERROR: Unexpected disconnection while holding the lock 'lost'. Server was killed?"
        ),
        "{err}"
    );
}

// tcpnetlock_server --------------------------------------------------------------------------

#[test]
fn server_takes_listen_port_and_info() {
    let names = Names::new();
    let port = free_port();
    let mut cmd = names.cmd(
        "tcpnetlock_server",
        &[
            "--listen",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--info",
        ],
    );
    cmd.env_remove("LISTEN_FDS");
    let s = Server::spawn(cmd);
    assert_eq!(s.addr.to_string(), format!("127.0.0.1:{port}"));
    assert_eq!(Client::connect(s.addr).ask(".ping"), "pong");
}

#[test]
fn server_binds_localhost_over_ipv4_by_default_and_is_quiet() {
    let names = Names::new();
    let port = free_port();
    let mut cmd = names.cmd("tcpnetlock_server", &[&format!("--port={port}")]);
    cmd.env_remove("LISTEN_FDS");
    let running = Running::spawn(&mut cmd);
    let up = wait_until(LIMIT, || TcpStream::connect(("127.0.0.1", port)).is_ok());
    assert!(up.is_some(), "{}", running.stderr());
    // 0.1.8 bound localhost as IPv4 only.
    assert!(TcpStream::connect(("::1", port)).is_err());
    let mut c = Client::connect(format!("127.0.0.1:{port}").parse().unwrap());
    assert_eq!(c.ask("lock,name:q"), "ok");
    // Warnings only, as 0.1.8's default log level.
    assert_eq!(running.stderr(), "");
}

#[test]
fn server_cannot_bind_is_2() {
    let names = Names::new();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (code, _, err) = names.run("tcpnetlock_server", &["--port", &port]);
    assert_eq!(code, 2);
    assert!(err.contains("Address already in use"), "{err}");
    let (code, _, _) = names.run("tcpnetlock_server", &["--bogus"]);
    assert_eq!(code, 2);
}

/// `--info` says the lock is held on stderr; a stderr nobody reads any more does not end the
/// client (it used to panic, exit 101, right after the grant).
#[test]
fn client_info_with_a_closed_stderr_holds_the_lock() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let names = Names::new();
    let s = Server::start(&[]);
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills both descriptors; the read end is closed, the write end is owned by
    // the OwnedFd: a pipe whose reader has gone.
    let closed = unsafe {
        assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0);
        libc::close(fds[0]);
        std::process::Stdio::from(OwnedFd::from_raw_fd(fds[1]))
    };
    let port = format!("--port={}", s.addr.port());
    let mut cmd = names.cmd(
        "tcpnetlock_client",
        &["--host", "127.0.0.1", &port, "--info", "i"],
    );
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(closed);
    let mut child = common::KillOnDrop(cmd.spawn().unwrap());
    let held = wait_until(LIMIT, || {
        Client::connect(s.addr).ask(".locks").contains("\"i\"")
    });
    assert!(held.is_some(), "{:?}", child.0.try_wait());
    // Still holding a moment later: the message did not end it.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(child.0.try_wait().unwrap(), None);
    assert_eq!(try_lock(s.addr, "i").1, "not-granted");
    signal(child.0.id() as i32, libc::SIGINT);
    let mut status = None;
    wait_until(LIMIT, || {
        status = child.0.try_wait().unwrap();
        status.is_some()
    });
    assert_eq!(status.map(common::code), Some(4), "Ctrl-C, as 0.1.8");
}

#[test]
fn client_keep_alive_secs_is_bounded() {
    let names = Names::new();
    let (code, _, err) = names.run("tcpnetlock_client", &["--keep-alive-secs", "1e19", "x"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("invalid value '1e19' for '--keep-alive-secs <KEEP_ALIVE_SECS>'"),
        "{err}"
    );
}
