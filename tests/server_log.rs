//! The server's log as an operator and a hostile client meet it: a destination that stops
//! reading never stops service, a flood of warnings is summarised rather than written out, and
//! client text reaches replies and log lines escaped.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{ChildStderr, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{BIN, Client, KillOnDrop, Server, json_number, wait_until};

/// Starts a server logging to a stderr pipe that the test reads only up to the `listening on`
/// line: after that, nobody reads it.
fn server_with_unread_stderr(extra: &[&str]) -> (KillOnDrop, SocketAddr, BufReader<ChildStderr>) {
    let mut child = Command::new(BIN)
        .args(["server", "--listen", "127.0.0.1:0", "--log", "stderr"])
        .args(extra)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let child = KillOnDrop(child);
    let mut line = String::new();
    loop {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "no address line");
        if let Some(addr) = line.trim_end().split("listening on ").nth(1) {
            return (child, addr.parse().unwrap(), stderr);
        }
    }
}

/// Sends one request on a new connection and returns the reply and how long it took.
fn timed_ask(addr: SocketAddr, request: &str) -> (String, Duration) {
    let start = Instant::now();
    let mut c = Client::connect(addr);
    c.stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    c.send(request);
    let mut reply = String::new();
    let _ = BufReader::new(&c.stream).read_line(&mut reply);
    (reply.trim_end().to_owned(), start.elapsed())
}

fn stats(addr: SocketAddr) -> String {
    let (reply, _) = timed_ask(addr, ".stats");
    reply
        .strip_prefix("stats,")
        .unwrap_or_else(|| panic!("no stats: {reply:?}"))
        .to_owned()
}

#[test]
fn a_stalled_log_never_holds_up_a_client() {
    // Debug level: every bad request is logged with its text, so ~70 of these 1000-byte
    // requests fill a 64 KiB pipe (1 MiB with 64 KiB pages), and a few hundred more the
    // server's own queue: 2000 are sure to overflow both.
    let (_child, addr, mut stderr) = server_with_unread_stderr(&["-v"]);
    let bad = format!("no-such-action{}", "x".repeat(1000));
    let start = Instant::now();
    for i in 0..2000 {
        let (reply, took) = timed_ask(addr, &bad);
        assert_eq!(reply, "bad-action", "request {i}, after {took:?}");
        assert!(took < Duration::from_secs(2), "request {i} took {took:?}");
    }
    // Warnings too, from clients at once.
    let clients: Vec<_> = (0..8)
        .map(|_| {
            thread::spawn(move || {
                for _ in 0..100 {
                    let (reply, took) = timed_ask(addr, ".server-shutdown");
                    assert_eq!(reply, "err,server-shutdown not enabled");
                    assert!(took < Duration::from_secs(2), "took {took:?}");
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let answered = start.elapsed();
    let json = stats(addr);
    let threads = json_number(&json, "threads").unwrap();
    assert!(threads <= 20.0, "{threads} worker threads: {json}");
    let dropped = json_number(&json, "log_lines_dropped").expect("log_lines_dropped in .stats");
    assert!(dropped > 0.0, "{json}");
    eprintln!("2800 requests answered in {answered:?}; {threads} threads, {dropped} lines dropped");

    // Once the log is read again, it says how many lines were lost.
    let text = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&text);
    thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    assert!(
        wait_until(Duration::from_secs(10), || text
            .lock()
            .unwrap()
            .contains("log lines dropped"))
        .is_some(),
        "no `log lines dropped` line in:\n{}",
        text.lock().unwrap().lines().last().unwrap_or("")
    );
}

/// The number at the start of each `N similar messages suppressed` line containing `kind`.
fn suppressed(log: &str, kind: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("similar messages suppressed") && l.contains(kind))
        .map(|l| {
            l.split("WARN: ")
                .nth(1)
                .and_then(|rest| rest.split(' ').next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no count in {l}"))
        })
        .sum()
}

#[test]
fn a_flood_of_warnings_is_summarised() {
    const N: u64 = 2000;
    // The default level, where warnings are written.
    let mut cmd = Command::new(BIN);
    cmd.args(["server", "--listen", "127.0.0.1:0", "--log", "stderr"]);
    let s = Server::spawn(cmd);
    let addr = s.addr;
    let start = Instant::now();
    let clients: Vec<_> = (0..8)
        .map(|_| {
            thread::spawn(move || {
                for _ in 0..N / 8 {
                    let (reply, _) = timed_ask(addr, ".server-shutdown");
                    assert_eq!(reply, "err,server-shutdown not enabled");
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let flood = start.elapsed();
    let kind = ".server-shutdown refused";
    // Every refusal is accounted for, once the last window's summary is written (10 s after
    // the window began).
    let accounted = || {
        let log = s.log_text();
        let single = log
            .lines()
            .filter(|l| l.contains(kind) && !l.contains("similar messages suppressed"))
            .count() as u64;
        (single, suppressed(&log, kind))
    };
    let took = wait_until(Duration::from_secs(25), || {
        let (single, summed) = accounted();
        single + summed == N
    });
    let (single, summed) = accounted();
    assert!(
        took.is_some(),
        "{single} lines + {summed} suppressed != {N}:\n{}",
        s.log_text()
    );
    // At most 10 lines per 10 s window.
    let windows = start.elapsed().as_secs() / 10 + 1;
    assert!(
        single <= 10 * windows,
        "{single} warning lines in {:?} ({flood:?} of flood)",
        start.elapsed()
    );
    let bytes = s.log_text().len();
    assert!(bytes < 10_000, "{bytes} bytes of log for {N} refusals");
    eprintln!("{N} refusals in {flood:?}: {single} lines, {summed} suppressed, {bytes} bytes");
}

#[test]
fn format_characters_are_escaped_in_replies_and_in_the_log() {
    let s = Server::start(&[]);
    // U+2028 line separator, U+202E right-to-left override, U+2066 isolate, U+200B zero-width
    // space, U+009B (C1 CSI), ESC.
    let key = "k\u{2028}\u{202e}\u{2066}\u{200b}\u{9b}\u{1b}x";
    let mut c = s.connect();
    c.send(&format!("lock,name:a,{key}:1"));
    let mut reply = Vec::new();
    c.stream.read_to_end(&mut reply).unwrap();
    assert_eq!(
        String::from_utf8(reply).unwrap(),
        "err,unknown parameter k\\u{2028}\\u{202e}\\u{2066}\\u{200b}\\u{9b}\\u{1b}x\n"
    );
    let raw = [
        '\u{2028}', '\u{202e}', '\u{2066}', '\u{200b}', '\u{9b}', '\u{1b}',
    ];
    let logged = wait_until(Duration::from_secs(5), || {
        s.log_text().contains("unknown parameter k\\u{2028}")
    });
    let log = s.log_text();
    assert!(logged.is_some(), "{log}");
    assert!(!log.contains(raw), "raw characters in the log:\n{log:?}");
}
