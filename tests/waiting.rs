//! Waiting for whom: while `do -w` and `lock -w` wait in a lock's queue, stderr says who holds
//! the lock, for how long, how many are ahead and how long the wait may last. On a terminal
//! (a pty, through script(1)) it is one status line rewritten in place and erased on the grant;
//! elsewhere one line, or one per change of holder with -v. The library's `take_with` gives
//! the waiting connection's address, which `.locks` shows as the waiter's `peer`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{BIN, Client, Running, Server, wait_until};
use tcpnetlock::client;

const LIMIT: Duration = Duration::from_secs(20);
/// What rewrites the status line: carriage return, erase the line.
const ERASE: &str = "\r\x1b[2K";

/// `tcpnetlock COMMAND --host 127.0.0.1 --port PORT ARGS` as a shell line, for script(1).
fn shell_line(port: u16, command: &str, args: &str) -> String {
    format!("{BIN} {command} --host 127.0.0.1 --port {port} {args}")
}

/// Runs the shell command `line` on a new pseudo-terminal (script -qec): stdin, stdout and
/// stderr are the terminal, and the command is in its foreground. What the terminal shows is
/// the returned Running's stdout. script's own stdin is kept open until the end.
fn on_a_terminal(line: &str) -> Running {
    let script = common::require_tool("script", "bsdutils");
    let mut cmd = Command::new(script);
    cmd.args(["-qec", line, "/dev/null"])
        .stdin(Stdio::piped())
        .env("TERM", "xterm")
        .env_remove("TCPNETLOCK_CLIENT_ID");
    Running::spawn(&mut cmd)
}

/// `tcpnetlock COMMAND --host 127.0.0.1 --port PORT ARGS...` with stderr and stdout piped.
fn piped(port: u16, command: &str, args: &[&str]) -> Running {
    let mut cmd = Command::new(BIN);
    cmd.arg(command)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .env_remove("TCPNETLOCK_CLIENT_ID");
    Running::spawn(&mut cmd)
}

/// The status lines drawn so far: what follows each erase, up to the next one.
fn draws(screen: &str) -> Vec<String> {
    screen
        .split(ERASE)
        .skip(1)
        .filter(|d| d.starts_with("waiting for lock "))
        .map(str::to_owned)
        .collect()
}

/// Seconds in the CLI's short form (`850ms`, `12.3s`), as a duration.
fn parse_short(text: &str) -> Duration {
    if let Some(ms) = text.strip_suffix("ms") {
        return Duration::from_millis(ms.parse().unwrap());
    }
    Duration::from_secs_f64(text.strip_suffix('s').unwrap().parse().unwrap())
}

/// How long the holder has held the lock, by a status line (`... held by X for 1.8s, ...`).
fn held_for(line: &str) -> Duration {
    let by = line.find(" held by ").unwrap_or_else(|| panic!("{line:?}"));
    let rest = &line[by + line[by..].find(" for ").unwrap() + 5..];
    parse_short(&rest[..rest.find(',').unwrap()])
}

/// A holder with client id `id` on a connection of its own.
fn holder(s: &Server, name: &str, id: &str) -> Client {
    let mut c = Client::connect(s.addr);
    assert_eq!(c.ask(&format!("lock,name:{name},client-id:{id}")), "ok");
    c
}

/// A waiter with client id `id`, once the server counts `waiting` waiters.
fn waiter(s: &Server, name: &str, id: &str, waiting: f64) -> Client {
    let mut c = Client::connect(s.addr);
    c.send(&format!("lock,name:{name},client-id:{id},wait:60"));
    assert!(wait_until(LIMIT, || s.stat("waiting") == waiting).is_some());
    c
}

#[test]
fn the_waiting_connection_s_address_is_its_peer_in_locks() {
    let s = Server::start(&[]);
    let mut first = holder(&s, "q", "first");
    let (tx, rx) = mpsc::channel();
    let port = s.addr.port();
    let taker = thread::spawn(move || {
        client::Client::new("127.0.0.1", port)
            .request("q")
            .wait(Duration::from_secs(30))
            .take_with(|asked| tx.send(*asked).unwrap())
            .map(|lock| lock.release())
    });
    let asked = rx.recv_timeout(LIMIT).unwrap();
    assert_eq!(asked.server_addr(), s.addr);
    let me = asked.local_addr().to_string();
    let lib = client::Client::new("127.0.0.1", port);
    let listed = wait_until(LIMIT, || {
        let locks = lib.locks().unwrap();
        let q = locks.get("q").unwrap();
        q.waiters.len() == 1 && q.waiters[0].peer.as_deref() == Some(me.as_str())
    });
    assert!(listed.is_some(), "{:?}", lib.locks());
    assert_eq!(first.ask("release"), "released");
    assert!(matches!(taker.join().unwrap(), Ok(Ok(()))));
}

/// The status line on a terminal: who holds the lock and for how long, the place in line and
/// the wait left, rewritten about once a second, then erased before the command's output.
#[test]
fn do_w_on_a_terminal_keeps_one_status_line_and_erases_it_on_the_grant() {
    let s = Server::start(&[]);
    let mut ci7 = holder(&s, "q", "ci-7");
    let mut early = waiter(&s, "q", "early", 1.0);
    let mut term = on_a_terminal(&shell_line(
        s.addr.port(),
        "do",
        "-w 30 --lock-name q -- echo got-it",
    ));
    // Three lines drawn while ci-7 holds the lock: its hold grows, we are behind `early`.
    assert!(wait_until(LIMIT, || draws(&term.stdout()).len() >= 3).is_some());
    let first_three = Instant::now();
    let shown = draws(&term.stdout());
    for line in &shown {
        assert!(
            line.starts_with("waiting for lock q: held by ci-7 for ")
                && line.contains(", 1 ahead, up to "),
            "{line:?}"
        );
        assert!(!line.contains('\n'), "{line:?}");
    }
    let held: Vec<Duration> = shown.iter().map(|l| held_for(l)).collect();
    assert!(held.windows(2).all(|w| w[0] < w[1]), "{held:?}");
    let left = |line: &str| {
        let at = line.find("up to ").unwrap() + 6;
        parse_short(line[at..].strip_suffix(" more").unwrap())
    };
    assert!(left(&shown[0]) <= Duration::from_secs(30), "{shown:?}");
    assert!(left(&shown[0]) > left(&shown[2]), "{shown:?}");

    // About once a second: two more lines take between 1.5 and 6 s.
    assert!(wait_until(LIMIT, || draws(&term.stdout()).len() >= 5).is_some());
    let two_more = first_three.elapsed();
    assert!(
        two_more >= Duration::from_millis(1500) && two_more <= Duration::from_secs(6),
        "{two_more:?}"
    );

    // ci-7 goes, `early` holds it: we are next.
    assert_eq!(ci7.ask("release"), "released");
    assert_eq!(early.line(), "ok");
    assert!(
        wait_until(LIMIT, || {
            draws(&term.stdout()).last().is_some_and(|l| {
                l.starts_with("waiting for lock q: held by early for ")
                    && l.contains(", next in line, up to ")
            })
        })
        .is_some(),
        "{:?}",
        term.stdout()
    );

    // Granted: the line is erased, then the command writes.
    assert_eq!(early.ask("release"), "released");
    let (code, screen, _) = term.finish(LIMIT);
    assert_eq!(code, 0, "{screen:?}");
    let last = screen.rfind(ERASE).unwrap();
    assert_eq!(&screen[last..], format!("{ERASE}got-it\r\n"), "{screen:?}");
}

#[test]
fn lock_w_on_a_terminal_erases_the_line_before_ok() {
    let s = Server::start(&[]);
    let mut held = holder(&s, "l", "ci-7");
    // stdin at its end: released at once once granted.
    let mut term = on_a_terminal(&shell_line(s.addr.port(), "lock", "-w 30 l </dev/null"));
    assert!(wait_until(LIMIT, || !draws(&term.stdout()).is_empty()).is_some());
    let line = &draws(&term.stdout())[0];
    assert!(
        line.starts_with("waiting for lock l: held by ci-7 for ")
            && line.contains(", next in line, up to "),
        "{line:?}"
    );
    assert_eq!(held.ask("release"), "released");
    let (code, screen, _) = term.finish(LIMIT);
    assert_eq!(code, 0, "{screen:?}");
    let last = screen.rfind(ERASE).unwrap();
    assert_eq!(&screen[last..], format!("{ERASE}ok\r\n"), "{screen:?}");
}

#[test]
fn the_status_line_fits_the_terminal_s_width() {
    let s = Server::start(&[]);
    let mut held = holder(&s, "narrow", "a-client-id-long-enough-to-need-cutting");
    let mut term = on_a_terminal(&format!(
        "stty cols 40; {}",
        shell_line(s.addr.port(), "do", "-w 30 --lock-name narrow -- true")
    ));
    assert!(wait_until(LIMIT, || draws(&term.stdout()).len() >= 2).is_some());
    for line in draws(&term.stdout()) {
        assert_eq!(line.chars().count(), 39, "{line:?}");
        assert!(line.ends_with('…'), "{line:?}");
    }
    assert_eq!(held.ask("release"), "released");
    assert_eq!(term.finish(LIMIT).0, 0);
}

/// A terminal that cannot erase a line (`TERM=dumb`: Emacs's shell buffers) gets the line a
/// log gets, once.
#[test]
fn a_dumb_terminal_gets_one_plain_line() {
    let s = Server::start(&[]);
    let mut held = holder(&s, "dumb", "ci-7");
    let mut term = on_a_terminal(&format!(
        "TERM=dumb {}",
        shell_line(s.addr.port(), "do", "-w 30 --lock-name dumb -- echo got-it")
    ));
    assert!(wait_until(LIMIT, || term.stdout().ends_with('\n')).is_some());
    assert_eq!(held.ask("release"), "released");
    let (code, screen, _) = term.finish(LIMIT);
    assert_eq!(code, 0, "{screen:?}");
    assert!(
        screen.starts_with("tcpnetlock: waiting for lock dumb: held by ci-7 for ")
            && screen.ends_with("s more\r\ngot-it\r\n")
            && screen.lines().count() == 2,
        "{screen:?}"
    );
    assert!(!screen.contains('\x1b'), "{screen:?}");
}

/// Granted within a moment: nothing said, and no `.locks` asked.
#[test]
fn a_wait_that_ends_at_once_says_nothing_and_asks_nothing() {
    let s = Server::start(&[]);
    let locks_asked = || {
        let text = common::prometheus::scrape(s.addr);
        common::prometheus::value(&text, r#"tcpnetlock_requests_total{kind="locks"}"#)
    };
    let before = locks_asked();
    let mut run = piped(
        s.addr.port(),
        "do",
        &["-w", "30", "--lock-name", "free", "--", "true"],
    );
    assert_eq!(run.finish(LIMIT), (0, String::new(), String::new()));
    let mut term = on_a_terminal(&shell_line(s.addr.port(), "lock", "-w 30 free </dev/null"));
    let (code, screen, _) = term.finish(LIMIT);
    assert_eq!((code, screen.as_str()), (0, "ok\r\n"));
    // Two locks taken (and `.info` asked before each), no `.locks`.
    assert_eq!(locks_asked(), before);
    let text = common::prometheus::scrape(s.addr);
    assert!(common::prometheus::value(&text, r#"tcpnetlock_requests_total{kind="lock"}"#) >= 2.0);
}

/// Not on a terminal: one line when the wait starts; with -v one more per change of holder.
#[test]
fn elsewhere_one_line_and_with_v_one_per_change_of_holder() {
    let s = Server::start(&[]);
    let mut ci7 = holder(&s, "q", "ci-7");
    let mut early = waiter(&s, "q", "early", 1.0);
    let mut verbose = piped(
        s.addr.port(),
        "do",
        &["-v", "-w", "30", "--lock-name", "q", "--", "true"],
    );
    assert!(wait_until(LIMIT, || s.stat("waiting") == 2.0).is_some());
    let mut quiet = piped(s.addr.port(), "lock", &["-w", "30", "q"]);
    assert!(wait_until(LIMIT, || s.stat("waiting") == 3.0).is_some());
    let one_line = |run: &Running| wait_until(LIMIT, || run.stderr().ends_with('\n')).is_some();
    assert!(one_line(&verbose) && one_line(&quiet));
    let line = quiet.stderr();
    assert!(
        line.starts_with("tcpnetlock: waiting for lock q: held by ci-7 for ")
            && line.contains(", 2 ahead, up to ")
            && line.ends_with("s more\n"),
        "{line:?}"
    );
    assert_eq!(line.lines().count(), 1);
    let first = verbose.stderr();
    assert!(
        first.starts_with("tcpnetlock: waiting for lock q: held by ci-7 for ")
            && first.contains(", 1 ahead, up to "),
        "{first:?}"
    );

    // ci-7 goes: `early` holds it. The verbose one says so; the quiet one has said its line.
    assert_eq!(ci7.ask("release"), "released");
    assert_eq!(early.line(), "ok");
    assert!(
        wait_until(LIMIT, || verbose.stderr().lines().count() == 2).is_some(),
        "{:?}",
        verbose.stderr()
    );
    let second = verbose.stderr().lines().nth(1).unwrap().to_owned();
    assert!(
        second.starts_with("tcpnetlock: waiting for lock q: held by early for ")
            && second.contains(", next in line, up to "),
        "{second:?}"
    );
    // The quiet one looks once a second too: give it two chances to say more.
    thread::sleep(Duration::from_secs(2));
    assert_eq!(verbose.stderr().lines().count(), 2, "{}", verbose.stderr());
    assert_eq!(quiet.stderr(), line);

    assert_eq!(early.ask("release"), "released");
    let (code, _, err) = verbose.finish(LIMIT);
    assert_eq!(code, 0);
    let tail: Vec<&str> = err.lines().skip(2).collect();
    assert_eq!(
        tail,
        ["tcpnetlock: lock q granted", "tcpnetlock: lock q released"]
    );
    assert_eq!(quiet.finish(LIMIT), (0, "ok\n".into(), line));
}

/// A TCP proxy on loopback: the server sees the proxy's address, not the client's.
fn proxy(to: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for inbound in listener.incoming() {
            let Ok(inbound) = inbound else { break };
            let outbound = TcpStream::connect(to).unwrap();
            let pipe = |mut from: TcpStream, mut to: TcpStream| {
                thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = from.read(&mut buf) {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            };
            pipe(inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
            pipe(outbound, inbound);
        }
    });
    addr
}

#[test]
fn behind_a_proxy_the_place_is_unknown_and_the_rest_is_shown() {
    let s = Server::start(&[]);
    let mut held = holder(&s, "p", "ci-7");
    let via = proxy(s.addr);
    let mut run = piped(
        via.port(),
        "do",
        &["-w", "30", "--lock-name", "p", "--", "true"],
    );
    assert!(wait_until(LIMIT, || run.stderr().ends_with('\n')).is_some());
    let line = run.stderr();
    assert!(
        line.starts_with("tcpnetlock: waiting for lock p: held by ci-7 for ")
            && line.contains(", place unknown, up to "),
        "{line:?}"
    );
    assert_eq!(held.ask("release"), "released");
    assert_eq!(run.finish(LIMIT).0, 0);
}
