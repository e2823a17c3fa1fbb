//! Every error is said once. The server's final error went both to its log and to stderr,
//! so where the log is stderr (`--log stderr`, or no /dev/log, as in a container) it was
//! printed twice.

mod common;

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use common::{BIN, free_port, run_within};

const LIMIT: Duration = Duration::from_secs(20);

#[test]
fn a_server_that_cannot_bind_says_so_once() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    // `--log auto` is stderr where there is no /dev/log, syslog where there is: on stderr the
    // error is said once either way.
    for log in ["stderr", "auto"] {
        let mut cmd = Command::new(BIN);
        cmd.args(["server", "--listen", &addr, "--log", log])
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID");
        let (code, out, err) = run_within(&mut cmd, LIMIT);
        assert_eq!((code, out.as_str()), (2, ""), "--log {log}: {err}");
        assert_eq!(
            err,
            format!(
                "tcpnetlock: error: cannot bind {addr}: Address already in use (os error 98) \
                 (is another tcpnetlock running? see `systemctl status tcpnetlock.socket`)\n"
            ),
            "--log {log}"
        );
    }
}

#[test]
fn a_client_command_says_its_error_once() {
    let port = free_port().to_string();
    for (command, rest) in [
        ("ping", &[][..]),
        ("stats", &[]),
        ("locks", &[]),
        ("lock", &["x"]),
        ("do", &["--", "true"]),
    ] {
        let mut cmd = Command::new(BIN);
        cmd.args([command, "--host", "127.0.0.1", "--port", &port])
            .args(rest)
            .env_remove("TCPNETLOCK_HOST")
            .env_remove("TCPNETLOCK_PORT");
        let args = (command, rest);
        let (code, _, err) = run_within(&mut cmd, LIMIT);
        assert_eq!(code, 125, "{args:?}: {err}");
        assert_eq!(
            err,
            format!(
                "tcpnetlock: error: cannot connect to 127.0.0.1:{port}: connection refused (is \
                 the server running?)\n"
            ),
            "{args:?}"
        );
    }
}

/// Logging to syslog, the server's final error goes to the log as well as to stderr: they
/// are two places. Not when stderr is the journal (systemd's JOURNAL_STREAM names it), where
/// the syslog copy would land beside the stderr one.
#[test]
fn a_server_error_goes_to_syslog_unless_stderr_is_the_journal() {
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::net::UnixDatagram;

    let dir = common::TempDir::new("messages-syslog");
    let socket = dir.path.join("log");
    let syslog = UnixDatagram::bind(&socket).unwrap();
    syslog.set_nonblocking(true).unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for journal in [false, true] {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills both descriptors, which the OwnedFds then own; fstat fills the
        // stat we own.
        let (read, write, st) = unsafe {
            assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0);
            let (read, write) = (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]));
            let mut st = std::mem::zeroed::<libc::stat>();
            assert_eq!(libc::fstat(write.as_raw_fd(), &mut st), 0);
            (read, write, st)
        };
        let mut cmd = Command::new(BIN);
        cmd.args(["server", "--listen", &addr, "--log"])
            .arg(format!("syslog:{}", socket.display()))
            .env_remove("LISTEN_FDS")
            .env_remove("JOURNAL_STREAM")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(write);
        if journal {
            cmd.env("JOURNAL_STREAM", format!("{}:{}", st.st_dev, st.st_ino));
        }
        let status = cmd.status().unwrap();
        drop(cmd);
        assert_eq!(status.code(), Some(2));
        let mut err = String::new();
        std::fs::File::from(read).read_to_string(&mut err).unwrap();
        assert_eq!(err.matches("cannot bind").count(), 1, "{err}");
        let mut logged = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok(n) = syslog.recv(&mut buf) {
            logged.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        let copies = logged.iter().filter(|l| l.contains("cannot bind")).count();
        assert_eq!(
            copies,
            usize::from(!journal),
            "journal {journal}: {logged:?}"
        );
    }
}
