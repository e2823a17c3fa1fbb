//! The client against a server that misbehaves: a reply that never ends, sent as fast as
//! loopback carries it or a little at a time. Every command and the library must give up, by the
//! reply timeout at the latest, say why, and keep their memory bounded (the reply line cap).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::BIN;
use tcpnetlock::client::{Client, Error, Lost};

const LIMIT: Duration = Duration::from_secs(60);
/// The CLI's reply timeout.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A stand-in server: every connection is sent `chunk` bytes of `x` (never a line end) every
/// `pause`, after `prefix`, until the client goes away. Returns its port.
fn endless(prefix: &'static [u8], chunk: usize, pause: Duration) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            thread::spawn(move || {
                let bytes = vec![b'x'; chunk];
                if stream.write_all(prefix).is_err() {
                    return;
                }
                while stream.write_all(&bytes).is_ok() {
                    if !pause.is_zero() {
                        thread::sleep(pause);
                    }
                }
            });
        }
    });
    port
}

/// What a run of the real binary came to.
struct Outcome {
    code: i32,
    stderr: String,
    took: Duration,
    /// Peak resident memory, KiB (from wait4).
    maxrss: i64,
}

/// Runs `tcpnetlock ARGS` to its end; panics if it takes over a minute.
#[expect(
    clippy::zombie_processes,
    reason = "reaped by wait4, which also reports the peak memory"
)]
fn run(args: &[&str]) -> Outcome {
    let start = Instant::now();
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("TCPNETLOCK_CLIENT_ID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stderr.take().unwrap();
    let reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    });
    let pid = child.id() as libc::pid_t;
    loop {
        let mut status = 0;
        // SAFETY: rusage is plain data; wait4 fills it and the status for our own child.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            };
            return Outcome {
                code,
                stderr: reader.join().unwrap(),
                took: start.elapsed(),
                maxrss: usage.ru_maxrss,
            };
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "tcpnetlock {args:?} still running after {LIMIT:?}: {}",
                reader.join().unwrap()
            );
        }
        thread::sleep(Duration::from_millis(5));
    }
}

fn at(port: u16, command: &str) -> Outcome {
    let out = run(&[command, "--host", "127.0.0.1", "--port", &port.to_string()]);
    eprintln!(
        "{command}: status {} in {:.2} s, peak {} KiB: {}",
        out.code,
        out.took.as_secs_f64(),
        out.maxrss,
        out.stderr.trim_end()
    );
    out
}

#[test]
fn a_reply_without_a_line_end_is_refused_at_the_cap() {
    let port = endless(b"", 64 << 10, Duration::ZERO);
    for command in ["ping", "stats"] {
        let out = at(port, command);
        assert_eq!(out.code, 1, "{command}: {}", out.stderr);
        assert!(
            out.stderr.contains(
                "protocol error: the server sent over 65536 bytes without a line end (is it a \
                 tcpnetlock server?)"
            ),
            "{command}: {}",
            out.stderr
        );
        assert!(
            out.took < Duration::from_secs(5),
            "{command}: {:?}",
            out.took
        );
        assert!(out.maxrss < 32 << 10, "{command}: {} KiB", out.maxrss);
    }
    // `.locks` replies may be megabytes long: its cap is 64 MiB.
    let out = at(port, "locks");
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("the server sent over 67108864 bytes without a line end"),
        "{}",
        out.stderr
    );
    assert!(out.took < REPLY_TIMEOUT, "{:?}", out.took);
    assert!(out.maxrss < 160 << 10, "{} KiB", out.maxrss);
    // A grant line has the small cap.
    let out = run(&[
        "lock",
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "x",
    ]);
    assert_eq!(out.code, 125, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("the server sent over 65536 bytes without a line end"),
        "{}",
        out.stderr
    );
    assert!(out.took < Duration::from_secs(5), "{:?}", out.took);
}

#[test]
fn a_reply_still_coming_at_the_reply_timeout_is_given_up() {
    // 2 MB/s: 20 MB by the timeout, far under the `.locks` cap; and a trickle under ping's.
    let fast = endless(b"locks,{", 4 << 10, Duration::from_millis(2));
    let slow = endless(b"po", 16, Duration::from_millis(5));
    let ping = thread::spawn(move || at(slow, "ping"));
    for out in [at(fast, "locks"), ping.join().unwrap()] {
        assert_eq!(out.code, 1, "{}", out.stderr);
        assert!(
            out.stderr
                .contains("the server's reply did not end in time (")
                && out
                    .stderr
                    .contains(" bytes without a line end; is it a tcpnetlock server?)"),
            "{}",
            out.stderr
        );
        assert!(
            out.took >= REPLY_TIMEOUT - Duration::from_millis(100)
                && out.took < REPLY_TIMEOUT + Duration::from_secs(3),
            "{:?}",
            out.took
        );
        assert!(out.maxrss < 64 << 10, "{} KiB", out.maxrss);
    }
}

#[test]
fn the_library_gives_up_by_its_reply_timeout() {
    let port = endless(b"", 1, Duration::from_millis(1));
    let timeout = Duration::from_millis(500);
    let client = Client::new("127.0.0.1", port).reply_timeout(timeout);
    type Ask<'a> = (&'a str, &'a dyn Fn() -> Result<String, Error>);
    let asks: [Ask; 4] = [
        ("ping", &|| client.ping().map(|_| String::new())),
        ("stats", &|| client.stats_json()),
        ("locks", &|| client.locks_json()),
        ("lock", &|| client.try_lock("x").map(|_| String::new())),
    ];
    for (what, ask) in asks {
        let start = Instant::now();
        match ask() {
            Err(Error::Protocol(m)) => assert!(m.contains("did not end in time"), "{what}: {m}"),
            other => panic!("{what}: {other:?}"),
        }
        let took = start.elapsed();
        assert!(
            took >= timeout && took < Duration::from_secs(2),
            "{what}: {took:?}"
        );
    }
}

#[test]
fn a_holder_flooded_with_bytes_counts_the_lock_as_lost() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
        stream.write_all(b"ok\n").unwrap();
        let flood = vec![b'x'; 64 << 10];
        while stream.write_all(&flood).is_ok() {}
    });
    let lock = Client::new("127.0.0.1", port).try_lock("flooded").unwrap();
    let start = Instant::now();
    match lock.wait_lost(Some(LIMIT)) {
        Some(Lost::Broken(m)) => assert!(
            m.contains("the server sent over 65536 bytes without a line end"),
            "{m}"
        ),
        other => panic!("{other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(5));
    drop(lock);
    server.join().unwrap();
}

/// The cap and the deadline leave a well-behaved server's long reply alone.
#[test]
fn long_replies_under_the_cap_are_read_whole() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // A `.locks` line of 8 MB, sent in pieces.
    let body = format!("{{\"a\": \"{}\"}}", "y".repeat(8 << 20));
    let expected = body.clone();
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = String::new();
        BufReader::new(&stream).read_line(&mut request).unwrap();
        assert_eq!(request, ".locks\n");
        let line = format!("locks,{body}\n");
        for piece in line.as_bytes().chunks(100_000) {
            stream.write_all(piece).unwrap();
        }
    });
    let got = Client::new("127.0.0.1", port).locks_json().unwrap();
    assert!(
        got == expected,
        "{} bytes instead of {}",
        got.len(),
        expected.len()
    );
    server.join().unwrap();
}
