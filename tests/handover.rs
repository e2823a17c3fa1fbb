//! The hand-over without systemd (issue 14): on SIGUSR2 the server re-executes its own file and
//! the new program takes every connection over. Checked from the clients' side, on the same
//! sockets, byte for byte: nothing arrives during the hand-over, holders of every kind keep their
//! locks, waiters their place and their deadlines, leases their remaining time, tokens keep
//! growing, half-read lines complete; a program that cannot read the state is not run, or
//! refuses the state and falls back to a restart; an exec that fails is undone.
//!
//! Each server runs from a copy of the binary in a scratch directory, so that a test can put a
//! new file in its place (as a package upgrade does) or take it away.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{BIN, Client, Server, TempDir, try_lock, wait_until};

const LONG: Duration = Duration::from_secs(20);

/// Copies the binary to `to` with cp(1): a copy written by this process would leave, for an
/// instant, a descriptor open for writing that a child forked meanwhile by another test inherits,
/// and running the copy then fails with ETXTBSY ("text file busy").
fn copy_binary(to: &Path) {
    let status = Command::new("cp").arg(BIN).arg(to).status().unwrap();
    assert!(status.success(), "cp {BIN} {}: {status}", to.display());
}

/// A server started from a copy of the binary at `dir/tcpnetlock`.
fn start_copy(dir: &TempDir, env: &[(&str, &str)], extra: &[&str]) -> (PathBuf, Server) {
    let exe = dir.path.join("tcpnetlock");
    copy_binary(&exe);
    let mut cmd = Command::new(&exe);
    cmd.args(["server", "--listen", "127.0.0.1:0", "--log", "stderr", "-v"])
        .args(extra)
        .envs(env.iter().copied());
    (exe, Server::spawn(cmd))
}

fn pid(server: &Server) -> i32 {
    server.child.id() as i32
}

fn signal(server: &Server, sig: libc::c_int) {
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid(server), sig) }, 0);
}

/// Waits until the log says `needle` `n` times.
fn logged(server: &Server, needle: &str, n: usize) {
    wait_until(LONG, || server.log_text().matches(needle).count() >= n).unwrap_or_else(|| {
        panic!(
            "{needle:?} not logged {n} times; log:\n{}",
            server.log_text()
        )
    });
}

/// Waits until the server counts `n` waiters (so that the next one queues behind them).
fn waiting(server: &Server, n: u64) {
    wait_until(LONG, || server.stat("waiting") as u64 == n)
        .unwrap_or_else(|| panic!("never {n} waiting; stats {}", server.stats()));
}

fn token(reply: &str) -> u64 {
    reply
        .strip_prefix("ok,token:")
        .unwrap_or_else(|| panic!("no token in {reply:?}"))
        .parse()
        .unwrap()
}

/// A new client is refused `request`: the lock is still held.
fn refused(addr: SocketAddr, request: &str) {
    let mut c = Client::connect(addr);
    assert_eq!(c.ask(request), "not-granted", "{request}");
}

fn lock(addr: SocketAddr, request: &str) -> Client {
    let mut c = Client::connect(addr);
    c.send(request);
    c
}

/// Bytes waiting in a socket's receive queue.
fn queued(stream: &TcpStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    assert_eq!(
        unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut n) },
        0
    );
    n as usize
}

fn exe_of(server: &Server) -> String {
    std::fs::read_link(format!("/proc/{}/exe", pid(server)))
        .unwrap()
        .display()
        .to_string()
}

/// A new file renamed over the old one, as dpkg and rpm install an upgrade: the running program
/// keeps the old inode, whose /proc/PID/exe then ends in " (deleted)".
fn replace_file(exe: &Path) {
    let new = exe.with_extension("new");
    copy_binary(&new);
    std::fs::rename(&new, exe).unwrap();
}

#[test]
fn sigusr2_hands_every_connection_to_the_new_program_byte_for_byte() {
    let dir = TempDir::new("handover");
    // Long names for a `.locks` reply of 6 MB, more than any socket buffer of this machine
    // holds (net.ipv4.tcp_wmem allows 4 MB), so that a client that does not read blocks the
    // server's thread writing it.
    let (exe, server) = start_copy(
        &dir,
        &[],
        &[
            "--max-line-length",
            "1048576",
            "--max-name-length",
            "1048576",
        ],
    );
    let addr = server.addr;
    let pid_before = pid(&server);

    // Holders of every kind.
    let (mut h1, r) = try_lock(addr, "plain");
    assert_eq!(r, "ok");
    let mut h2 = Client::connect(addr);
    let t_h2 = token(&h2.ask("lock,name:fenced,fencing:1"));
    let mut s1 = Client::connect(addr);
    assert_eq!(s1.ask("lock,name:sem,max:2"), "ok");
    let mut s2 = Client::connect(addr);
    assert_eq!(s2.ask("lock,name:sem,max:2"), "ok");
    let mut r1 = Client::connect(addr);
    assert_eq!(r1.ask("lock,name:rw,shared:1"), "ok");
    let mut r2 = Client::connect(addr);
    assert_eq!(r2.ask("lock,name:rw,shared:1"), "ok");
    let (hc, r) = try_lock(addr, "half");
    assert_eq!(r, "ok");
    hc.half_close();
    let bigs: Vec<(String, Client)> = (0..6)
        .map(|i| {
            let name = format!("big-{i:02}-{}", "x".repeat(1_000_000));
            let mut c = Client::connect(addr);
            assert_eq!(c.ask(&format!("lock,name:{name}")), "ok");
            (name, c)
        })
        .collect();

    // Waiters, each queued after the one before is.
    let mut w1 = lock(addr, "lock,name:plain,wait:60");
    waiting(&server, 1);
    let mut w2 = lock(addr, "lock,name:plain,wait:60");
    waiting(&server, 2);
    let mut wf = lock(addr, "lock,name:fenced,fencing:1,wait:60");
    waiting(&server, 3);
    let mut s3 = lock(addr, "lock,name:sem,max:2,wait:60");
    waiting(&server, 4);
    let mut wx = lock(addr, "lock,name:rw,wait:60");
    waiting(&server, 5);
    let mut r3 = lock(addr, "lock,name:rw,shared:1,wait:60");
    waiting(&server, 6);

    // Partial lines: a holder's request half sent, a first request half sent, an HTTP head
    // without its blank line.
    h1.send_raw(b"rel");
    let mut p = Client::connect(addr);
    p.send_raw(b"lock,name:pa");
    let mut m = Client::connect(addr);
    m.send_raw(b"GET /metrics HTTP/1.1\r\nHost: test\r\n");

    // A client that asks for `.locks` and does not read: the server's thread blocks writing.
    let slow = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    slow.set_recv_buffer_size(4096).unwrap();
    slow.connect(&addr.into()).unwrap();
    let mut slow = TcpStream::from(slow);
    slow.write_all(b".locks\n").unwrap();
    wait_until(LONG, || queued(&slow) > 0).expect("the .locks reply started");

    // A lease and a wait deadline, whose time must run on across the hand-over.
    let mut h3 = Client::connect(addr);
    assert_eq!(h3.ask("lock,name:leased,ttl:3"), "ok");
    let leased_at = Instant::now();
    let (_hd, r) = try_lock(addr, "deadline");
    assert_eq!(r, "ok");
    let mut wd = lock(addr, "lock,name:deadline,wait:3");
    let wd_at = Instant::now();
    waiting(&server, 7);
    let before = server.stat("lock_acquired_count");
    let lease = thread::spawn(move || (h3.line(), leased_at.elapsed()));
    let deadline = thread::spawn(move || (wd.line(), wd_at.elapsed()));

    // An upgrade puts a new file in place; SIGUSR2 runs it.
    replace_file(&exe);
    assert!(exe_of(&server).ends_with(" (deleted)"));
    let signalled = Instant::now();
    signal(&server, libc::SIGUSR2);
    logged(&server, "took over ", 1);
    let took = signalled.elapsed();
    let log = server.log_text();
    assert!(
        log.contains(
            "took over 25 connections (15 holders, 7 waiters, 2 reading their first request, \
             1 closing)"
        ),
        "{log}"
    );
    assert_eq!(pid(&server), pid_before);
    assert_eq!(
        exe_of(&server),
        exe.display().to_string(),
        "the new file runs"
    );

    // Nothing arrived meanwhile, and nobody was closed.
    for (what, c) in [
        ("h1", &mut h1),
        ("h2", &mut h2),
        ("s1", &mut s1),
        ("w1", &mut w1),
        ("wf", &mut wf),
        ("wx", &mut wx),
        ("r3", &mut r3),
        ("p", &mut p),
        ("m", &mut m),
    ] {
        assert!(
            c.silent_for(Duration::from_millis(50)),
            "{what} got something"
        );
    }

    // Every lock is still held: new clients are refused.
    for request in [
        "lock,name:plain",
        "lock,name:fenced",
        "lock,name:sem,max:2",
        "lock,name:rw,shared:1",
        "lock,name:half",
        "lock,name:leased",
    ] {
        refused(addr, request);
    }
    refused(addr, &format!("lock,name:{}", bigs[3].0));
    // The half-sent lines complete and are answered.
    p.send_raw(b"\n");
    assert_eq!(p.line(), "ok");
    m.send_raw(b"\r\n");
    assert_eq!(m.line(), "HTTP/1.1 200 OK\r");
    h1.send_raw(b"ease\n");
    assert_eq!(h1.line(), "released");
    // Waiters are granted in order, with tokens above every token so far.
    assert_eq!(w1.line(), "ok");
    assert!(w2.silent_for(Duration::from_millis(100)));
    w1.send("release");
    assert_eq!(w1.line(), "released");
    assert_eq!(w2.line(), "ok");
    h2.send("release");
    assert_eq!(h2.line(), "released");
    let t_wf = token(&wf.line());
    assert!(t_wf > t_h2, "token {t_wf} after {t_h2}");
    s1.send("release");
    assert_eq!(s1.line(), "released");
    assert_eq!(s3.line(), "ok");
    r1.send("release");
    assert_eq!(r1.line(), "released");
    assert!(
        wx.silent_for(Duration::from_millis(100)),
        "granted beside a reader"
    );
    r2.send("release");
    assert_eq!(r2.line(), "released");
    assert_eq!(wx.line(), "ok");
    assert!(
        r3.silent_for(Duration::from_millis(100)),
        "a reader beside the writer"
    );
    wx.send("release");
    assert_eq!(wx.line(), "released");
    assert_eq!(r3.line(), "ok");

    // The lease and the wait ran out when they would have without a hand-over.
    let (line, after) = lease.join().unwrap();
    assert_eq!(line, "expired");
    assert!(
        after >= Duration::from_millis(2900) && after <= Duration::from_millis(4500),
        "lease of 3 s expired after {after:?}"
    );
    let (line, after) = deadline.join().unwrap();
    assert_eq!(line, "not-granted");
    assert!(
        after >= Duration::from_millis(2900) && after <= Duration::from_millis(4500),
        "wait of 3 s ended after {after:?}"
    );

    // The client that did not read gets the whole `.locks` reply, then the close.
    let mut all = Vec::new();
    std::io::Read::read_to_end(&mut slow, &mut all).unwrap();
    let text = String::from_utf8(all).unwrap();
    let json = text
        .strip_prefix("locks,")
        .and_then(|t| t.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("not a .locks line: {:?}...", &text[..text.len().min(80)]));
    let locks: serde_json::Value = serde_json::from_str(json).unwrap();
    for (name, _) in &bigs {
        assert!(locks.get(name).is_some(), "{} missing", &name[..6]);
    }

    // The half-closed holder still holds until its client is gone.
    refused(addr, "lock,name:half");
    drop(hc);
    wait_until(LONG, || try_lock(addr, "half").1 == "ok").expect("freed once its client left");

    // Totals go on; a second hand-over (from the new program) keeps what is held now.
    assert!(server.stat("lock_acquired_count") > before);
    signal(&server, libc::SIGUSR2);
    logged(&server, "took over ", 2);
    refused(addr, "lock,name:plain");
    w2.send("release");
    assert_eq!(w2.line(), "released");
    assert_eq!(try_lock(addr, "plain").1, "ok");
    eprintln!("hand-over: took over {took:?} after the signal");
}

#[test]
fn a_program_that_cannot_read_the_state_is_not_run() {
    let dir = TempDir::new("handover-probe");
    let (_exe, server) = start_copy(&dir, &[("TCPNETLOCK_TEST_HANDOVER_VERSION", "999")], &[]);
    let (mut holder, r) = try_lock(server.addr, "kept");
    assert_eq!(r, "ok");
    signal(&server, libc::SIGUSR2);
    logged(&server, "not re-executing", 1);
    let log = server.log_text();
    assert!(
        log.contains("it reads hand-over state version(s) [1], this server writes version 999"),
        "{log}"
    );
    assert!(!log.contains("took over"), "{log}");
    // Nothing was touched: the holder is served by the same program.
    assert!(holder.silent_for(Duration::from_millis(100)));
    assert_eq!(holder.ask(".keepalive"), "alive");
    refused(server.addr, "lock,name:kept");
}

#[test]
fn a_state_the_new_program_refuses_falls_back_to_a_restart() {
    let dir = TempDir::new("handover-refuse");
    let (_exe, server) = start_copy(
        &dir,
        &[
            ("TCPNETLOCK_TEST_HANDOVER_VERSION", "999"),
            ("TCPNETLOCK_TEST_HANDOVER_SKIP_PROBE", "1"),
        ],
        &[],
    );
    let (mut holder, r) = try_lock(server.addr, "dropped");
    assert_eq!(r, "ok");
    let mut waiter = lock(server.addr, "lock,name:dropped,wait:60");
    waiting(&server, 1);
    signal(&server, libc::SIGUSR2);
    logged(&server, "refusing what the previous process handed over", 1);
    let log = server.log_text();
    assert!(
        log.contains(&format!(
            "refusing what the previous process handed over: the state's format is version \
             999; this build ({}) reads version 1; its connections are closed",
            env!("CARGO_PKG_VERSION")
        )),
        "{log}"
    );
    // The clients are told by the close, as on a restart; the server serves again.
    assert!(holder.closed_within(LONG));
    assert!(waiter.closed_within(LONG));
    assert_eq!(try_lock(server.addr, "dropped").1, "ok");
}

#[test]
fn an_exec_that_fails_is_undone() {
    let dir = TempDir::new("handover-noexec");
    let (exe, server) = start_copy(&dir, &[("TCPNETLOCK_TEST_HANDOVER_SKIP_PROBE", "1")], &[]);
    let (mut holder, r) = try_lock(server.addr, "kept");
    assert_eq!(r, "ok");
    holder.send_raw(b".keep");
    let mut waiter = lock(server.addr, "lock,name:kept,wait:60");
    waiting(&server, 1);
    std::fs::remove_file(&exe).unwrap();
    signal(&server, libc::SIGUSR2);
    logged(&server, "failed, serving on", 1);
    // Every thread went on where it was.
    assert!(holder.silent_for(Duration::from_millis(100)));
    holder.send_raw(b"alive\n");
    assert_eq!(holder.line(), "alive");
    refused(server.addr, "lock,name:kept");
    holder.send("release");
    assert_eq!(holder.line(), "released");
    assert_eq!(waiter.line(), "ok");
    assert_eq!(try_lock(server.addr, "other").1, "ok");
}
