//! Restart under socket activation: `systemd-socket-activate` holds the listening socket and a
//! supervisor shell restarts the server whenever it dies, as systemd's `Restart=` would. The
//! server is SIGKILLed; clients that connect while it is down wait in the socket's backlog and
//! are all served once it is back (none refused: the socket never closed), while the locks held
//! before the kill are gone (their holders see the connection end).
//!
//! The supervisor waits for the test before restarting (a gate file), so the clients are sure to
//! connect in the gap rather than merely soon after the kill.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    BIN, Client, Server, TempDir, alive, children, free_port, proc_stat, require_tool, wait_until,
};

/// Clients connecting while the server is down, per restart.
const GAP_CLIENTS: usize = 40;
const RESTARTS: usize = 3;

/// Kills the supervisor's process group (the shell and whichever server runs) on drop.
struct Group(i32);

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: plain system call, on the group this test created.
        unsafe { libc::kill(-self.0, libc::SIGKILL) };
    }
}

/// The running server: the supervisor's child named `tcpnetlock`.
fn server_pid(supervisor: i32) -> Option<i32> {
    children(supervisor)
        .into_iter()
        .find(|&pid| proc_stat(pid).is_some_and(|(comm, ..)| comm == "tcpnetlock"))
}

fn token(reply: &str) -> u64 {
    reply
        .strip_prefix("ok,token:")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("not a grant with a token: {reply:?}"))
}

/// A client of the gap: connected and asked while no server ran; its reply comes later.
struct GapClient {
    request: String,
    reader: BufReader<TcpStream>,
}

impl GapClient {
    fn ask(addr: SocketAddr, request: String) -> GapClient {
        // A refused connection would fail here: the socket must stay open across the restart.
        let mut stream = TcpStream::connect(addr)
            .unwrap_or_else(|e| panic!("connect while the server is down: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream.write_all(format!("{request}\n").as_bytes()).unwrap();
        GapClient {
            request,
            reader: BufReader::new(stream),
        }
    }

    fn reply(&mut self) -> String {
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("{}: no reply: {e}", self.request));
        assert!(line.ends_with('\n'), "{}: got {line:?}", self.request);
        line.trim_end().to_owned()
    }
}

#[test]
fn clients_connecting_while_the_server_is_down_are_served_after_its_restart() {
    let tool = require_tool("systemd-socket-activate", "systemd");
    let dir = TempDir::new("restart");
    let gate = dir.path.join("gate");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // The subshell's `exec` keeps its pid, so LISTEN_PID names the server.
    let script = format!(
        "while :; do (export LISTEN_PID=$BASHPID; exec {BIN} server --log stderr -v); \
         while [ -e '{}' ]; do sleep 0.02; done; sleep 0.1; done",
        gate.display()
    );
    let mut cmd = Command::new(tool);
    cmd.args(["-l", &addr.to_string(), "bash", "-c", &script])
        .process_group(0);
    // systemd-socket-activate starts its program at the first connection.
    let first = thread::spawn(move || {
        wait_until(Duration::from_secs(10), || TcpStream::connect(addr).is_ok())
            .expect("the activation socket never listened");
    });
    let s = Server::spawn(cmd);
    let _group = Group(s.child.id() as i32);
    first.join().unwrap();
    assert_eq!(s.addr, addr);
    let supervisor = s.child.id() as i32;

    let mut last_token = 0;
    for round in 0..RESTARTS {
        let mut pid = None;
        wait_until(Duration::from_secs(10), || {
            pid = server_pid(supervisor);
            pid.is_some()
        });
        let pid = pid.expect("no server running under the supervisor");

        // Held and awaited before the kill.
        let mut holder = Client::connect(addr);
        // (wait: the previous round's last holder of the name may still be closing.)
        let held = token(&holder.ask("lock,name:before,fencing:1,wait:10"));
        assert!(held > last_token, "token {held} after {last_token}");
        let mut waiter = Client::connect(addr);
        waiter.send("lock,name:before,wait:60");
        assert!(
            wait_until(Duration::from_secs(5), || s.stat("waiting") == 1.0).is_some(),
            "the waiter never queued"
        );

        std::fs::write(&gate, b"").unwrap();
        common::signal(pid, libc::SIGKILL);
        assert!(
            holder.closed_within(Duration::from_secs(5)),
            "the holder's connection outlived the server"
        );
        assert!(
            waiter.closed_within(Duration::from_secs(5)),
            "the waiter's connection outlived the server"
        );
        assert!(
            wait_until(Duration::from_secs(5), || !alive(pid)).is_some(),
            "the killed server is still there"
        );

        // The gap: every other client asks for a lock (one of them the lock held before the
        // kill), the rest ping.
        let clients: Vec<GapClient> = (0..GAP_CLIENTS)
            .map(|i| {
                let request = match i {
                    0 => "lock,name:before,fencing:1".to_owned(),
                    i if i % 2 == 0 => format!("lock,name:gap{i},fencing:1"),
                    _ => ".ping".to_owned(),
                };
                GapClient::ask(addr, request)
            })
            .collect();
        assert_eq!(
            server_pid(supervisor),
            None,
            "a server ran while the gap clients connected"
        );

        let reopened = Instant::now();
        std::fs::remove_file(&gate).unwrap();
        let mut tokens = Vec::new();
        for mut c in clients {
            let reply = c.reply();
            if c.request == ".ping" {
                assert_eq!(reply, "pong");
            } else {
                // Granted, the old holder's lock included, with a token above every earlier
                // one.
                let t = token(&reply);
                assert!(t > held, "{}: token {t} not above {held}", c.request);
                tokens.push(t);
            }
        }
        let served = reopened.elapsed();
        last_token = tokens.into_iter().max().unwrap();
        eprintln!(
            "restart {}: {GAP_CLIENTS} clients that connected while the server was down served \
             {served:.2?} after it was let restart",
            round + 1
        );
    }
    // Each start served the socket it was passed (the log line may trail the serving).
    let starts = || s.log_text().matches("socket passed by systemd").count();
    wait_until(Duration::from_secs(5), || starts() == RESTARTS + 1);
    assert_eq!(starts(), RESTARTS + 1, "{}", s.log_text());
}
