//! `tcpnetlock ping`, `stats` and `locks` against the real server: what a person sees, what
//! `--json` passes on, and the exit statuses.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use common::{BIN, Client, Server, free_port, run_within};

const LIMIT: Duration = Duration::from_secs(20);

fn tnl(port: u16, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()]);
    run_within(&mut cmd, LIMIT)
}

#[test]
fn ping_says_pong_and_the_round_trip() {
    let s = Server::start(&[]);
    let port = s.addr.port();
    let (code, out, err) = tnl(port, &["ping"]);
    assert_eq!((code, err.as_str()), (0, ""));
    let prefix = format!("pong from 127.0.0.1:{port} in ");
    assert!(
        out.starts_with(&prefix) && out.ends_with(" ms\n"),
        "{out:?}"
    );
    let (code, out, _) = tnl(port, &["ping", "--json"]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with(&format!(
            "{{\"server\": \"127.0.0.1:{port}\", \"reply\": \"pong\", \"rtt_ms\": "
        )),
        "{out}"
    );
}

#[test]
fn stats_for_people_and_as_json() {
    let s = Server::start(&[]);
    let (_holder, _) = common::try_lock(s.addr, "one");
    let (code, out, _) = tnl(s.addr.port(), &["stats"]);
    assert_eq!(code, 0);
    let rows: Vec<(&str, &str)> = out
        .lines()
        .map(|l| {
            let (k, v) = l.split_at(l.find("  ").unwrap_or_else(|| panic!("{l}")));
            (k, v.trim())
        })
        .collect();
    assert_eq!(rows[0], ("version", env!("CARGO_PKG_VERSION")));
    assert!(rows.contains(&("locks held", "1")), "{out}");
    assert!(rows.contains(&("grants", "1")), "{out}");
    assert!(rows.contains(&("log lines dropped", "0")), "{out}");
    assert!(
        rows.iter()
            .any(|(k, v)| *k == "peak memory" && v.ends_with(" MiB")),
        "{out}"
    );

    let (code, out, _) = tnl(s.addr.port(), &["stats", "--json"]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("{\"requests_count\": ") && out.ends_with("}\n"),
        "{out}"
    );
    assert_eq!(common::json_number(&out, "locks_held"), Some(1.0));
}

#[test]
fn locks_as_a_table_and_as_json() {
    let s = Server::start(&[]);
    let (code, out, _) = tnl(s.addr.port(), &["locks"]);
    assert_eq!((code, out.as_str()), (0, "no locks held\n"));

    let mut a = Client::connect(s.addr);
    assert_eq!(a.ask("lock,name:deploy,client-id:ci-7"), "ok");
    let mut b = Client::connect(s.addr);
    b.send("lock,name:deploy,wait:30");
    assert!(common::wait_until(LIMIT, || s.stat("waiting") == 1.0).is_some());
    let (code, out, _) = tnl(s.addr.port(), &["locks"]);
    assert_eq!(code, 0);
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        ["NAME", "HOLDER", "PEER", "HELD", "TOKEN", "TTL", "WAITING"]
    );
    assert_eq!(lines.len(), 2, "{out}");
    let row = &lines[1];
    assert_eq!(
        (row[0], row[1], row[5], row[6]),
        ("deploy", "ci-7", "-", "1")
    );
    assert_eq!(
        row[2],
        a.stream.local_addr().unwrap().to_string(),
        "the holder's address"
    );

    let (code, out, _) = tnl(s.addr.port(), &["locks", "--json"]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with(
            "{\"deploy\": {\"max\": 1, \"waiting\": 1, \"holders\": [{\"client_id\": \"ci-7\""
        ),
        "{out}"
    );
}

#[test]
fn unreachable_is_125() {
    let port = free_port();
    for cmd in ["ping", "stats", "locks"] {
        let (code, out, err) = tnl(port, &[cmd]);
        assert_eq!((code, out.as_str()), (125, ""), "{cmd}");
        assert!(
            err.contains(&format!(
                "cannot connect to 127.0.0.1:{port}: connection refused"
            )),
            "{cmd}: {err}"
        );
    }
}

#[test]
fn an_error_reply_is_1() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = thread::spawn(move || {
        for reply in ["err,too many connections\n", "what?\n"] {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            reader.get_mut().write_all(reply.as_bytes()).unwrap();
        }
    });
    let (code, _, err) = tnl(port, &["ping"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("the server refused the request: too many connections"),
        "{err}"
    );
    let (code, _, err) = tnl(port, &["stats"]);
    assert_eq!(code, 1);
    assert!(err.contains("unexpected reply \"what?\""), "{err}");
    server.join().unwrap();
}

/// A pipe whose reader is gone: writing to it fails with EPIPE (`| head -0`).
fn closed_pipe() -> Stdio {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills both descriptors; the read end is closed, the write end is owned by
    // the OwnedFd.
    unsafe {
        assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0);
        libc::close(fds[0]);
        Stdio::from(OwnedFd::from_raw_fd(fds[1]))
    }
}

/// `tcpnetlock ARGS --host 127.0.0.1 --port PORT` with stdout `stdout` and stderr collected:
/// (status, stderr).
fn tnl_to(port: u16, args: &[&str], stdout: Stdio) -> (i32, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped());
    let mut child = common::KillOnDrop(cmd.spawn().unwrap());
    let mut status = None;
    common::wait_until(LIMIT, || {
        status = child.0.try_wait().unwrap();
        status.is_some()
    });
    let status = status.expect("still running");
    let mut err = String::new();
    let mut stderr = child.0.stderr.take().unwrap();
    stderr.read_to_string(&mut err).unwrap();
    (common::code(status), err)
}

/// `tcpnetlock stats | head -0`: the reader has gone, which is no error and no crash; a disk
/// that is full is an error, said once.
#[test]
fn output_to_a_closed_pipe_or_a_full_disk_does_not_crash() {
    let s = Server::start(&[]);
    let (_holder, _) = common::try_lock(s.addr, "held");
    let port = s.addr.port();
    for args in [
        &["ping"][..],
        &["ping", "--json"],
        &["stats"],
        &["stats", "--json"],
        &["locks"],
        &["locks", "--json"],
    ] {
        assert_eq!(
            tnl_to(port, args, closed_pipe()),
            (0, String::new()),
            "{args:?}"
        );
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let (code, err) = tnl_to(port, args, Stdio::from(full));
        assert_eq!(code, 1, "{args:?}: {err}");
        assert_eq!(
            err,
            "tcpnetlock: error: cannot write to stdout: No space left on device (os error 28)\n",
            "{args:?}"
        );
    }
}

/// A stand-in server: answers each connection's request with the reply `reply` gives it.
fn fake_server(reply: fn(&str) -> String) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { break };
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            if reader.read_line(&mut line).is_ok() {
                let _ = reader
                    .get_mut()
                    .write_all(format!("{}\n", reply(line.trim_end())).as_bytes());
            }
        }
    });
    port
}

/// Terminal escapes (ANSI colours, an OSC title, bidi overrides, line separators) in what a
/// server sends are shown escaped; integers are exact however large; a number that no
/// duration can hold is shown as a number. `--json` passes the server's bytes on unchanged.
const HOSTILE_LOCKS: &str = "{\"a\\u001b[2Jb\": {\"max\": 1, \"waiting\": 0, \"holders\": \
    [{\"client_id\": \"\\u001b]0;owned\\u0007x\u{202e}y\u{2028}z\\u0085\", \"peer\": \
    \"127.0.0.1:5\", \"held_secs\": 1e308, \"token\": 9007199254740995, \"ttl_secs\": 1e308}]}}";
const HOSTILE_STATS: &str = "{\"version\": \"9\\u001b[31m\", \"uptime_secs\": 1e308, \
    \"maxrss\": 1e308, \"x\u{200e}\\u009by\": 18446744073709551615}";

#[test]
fn what_a_hostile_server_sends_is_shown_safely_and_exactly() {
    let port = fake_server(|request| match request {
        ".locks" => format!("locks,{HOSTILE_LOCKS}"),
        ".stats" => format!("stats,{HOSTILE_STATS}"),
        other => panic!("unexpected request {other:?}"),
    });
    let raw = |text: &str| {
        text.chars()
            .filter(|c| c.is_control() && *c != '\n' || ('\u{2000}'..='\u{206f}').contains(c))
            .collect::<String>()
    };

    let (code, out, err) = tnl(port, &["locks"]);
    assert_eq!((code, err.as_str()), (0, ""), "{out}");
    assert_eq!(raw(&out), "", "{out:?}");
    let row: Vec<&str> = out
        .lines()
        .nth(1)
        .unwrap()
        .split("  ")
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        row,
        [
            "a\\u{1b}[2Jb",
            "\\u{1b}]0;owned\\u{7}x\\u{202e}y\\u{2028}z\\u{85}",
            "127.0.0.1:5",
            "1e+308",
            "9007199254740995",
            "1e+308",
            "0"
        ],
        "{out}"
    );
    assert_eq!(
        tnl(port, &["locks", "--json"]),
        (0, format!("{HOSTILE_LOCKS}\n"), String::new())
    );

    let (code, out, err) = tnl(port, &["stats"]);
    assert_eq!((code, err.as_str()), (0, ""), "{out}");
    assert_eq!(raw(&out), "", "{out:?}");
    assert_eq!(
        out,
        // Labels padded to the longest, the escaped key (16 characters), and two spaces.
        "version           9\\u{1b}[31m\n\
         uptime            1e+308\n\
         peak memory       1e+308\n\
         x\\u{200e}\\u{9b}y  18446744073709551615\n"
    );
    assert_eq!(
        tnl(port, &["stats", "--json"]),
        (0, format!("{HOSTILE_STATS}\n"), String::new())
    );
}

/// A reply that is not JSON is an error for `--json` too (passed on, it would be a lie to jq),
/// and the bytes it shows are escaped.
#[test]
fn a_reply_that_is_not_json_is_an_error_shown_escaped() {
    let port = fake_server(|_| "stats,{\"a\": \u{1b}[31m".to_owned());
    for args in [&["stats"][..], &["stats", "--json"]] {
        let (code, out, err) = tnl(port, args);
        assert_eq!((code, out.as_str()), (1, ""), "{args:?}");
        assert!(
            err.starts_with("tcpnetlock: error: the server's reply is not JSON (")
                && err.ends_with("): {\"a\": \\u{1b}[31m\n"),
            "{err:?}"
        );
    }
}

/// JSON that is not the object expected (a list, a lock that is not an object) is an error
/// for `--json` too, said as such; a value of an unexpected type is shown as sent, under its
/// label (0.1.8 sends `"maxrss": "n/a"` when getrusage fails).
#[test]
fn json_that_is_not_the_object_expected_is_an_error_and_odd_values_are_shown() {
    let port = fake_server(|request| match request {
        ".stats" => "stats,[1]".to_owned(),
        _ => "locks,{\"a\": 5}".to_owned(),
    });
    for (args, detail) in [
        (
            &["stats"][..],
            "(invalid type: sequence, expected a map at line 1 column 0): [1]\n",
        ),
        (
            &["stats", "--json"],
            "(invalid type: sequence, expected a map at line 1 column 0): [1]\n",
        ),
        (&["locks"], "(lock \"a\" is 5, not an object): {\"a\": 5}\n"),
        (
            &["locks", "--json"],
            "(lock \"a\" is 5, not an object): {\"a\": 5}\n",
        ),
    ] {
        let (code, out, err) = tnl(port, args);
        assert_eq!((code, out.as_str()), (1, ""), "{args:?}");
        assert_eq!(
            err,
            format!(
                "tcpnetlock: error: the server's reply is not the JSON object expected {detail}"
            ),
            "{args:?}"
        );
    }

    let port = fake_server(|_| {
        "stats,{\"lock_count\": 1, \"maxrss\": \"n/a\", \"requests_count\": 3, \
         \"lock_acquired_count\": 1, \"lock_not_acquired_count\": -1}"
            .to_owned()
    });
    assert_eq!(
        tnl(port, &["stats"]),
        (
            0,
            "locks held            1\n\
             connections accepted  3\n\
             grants                1\n\
             refusals              -1\n\
             peak memory           n/a\n"
                .to_owned(),
            String::new()
        )
    );
}

/// `--host` and TCPNETLOCK_HOST take HOST:PORT and [IPv6]:PORT; a second, different port from
/// `--port` or TCPNETLOCK_PORT is a usage error that says so.
#[test]
fn the_host_may_carry_the_port() {
    let s = Server::start(&[]);
    let port = s.addr.port();
    let run = |args: &[&str], env: &[(&str, String)]| {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env_remove("TCPNETLOCK_HOST")
            .env_remove("TCPNETLOCK_PORT");
        for (k, v) in env {
            cmd.env(k, v);
        }
        run_within(&mut cmd, LIMIT)
    };
    let pong = format!("pong from 127.0.0.1:{port} in ");
    let with_port = format!("127.0.0.1:{port}");
    for (args, env) in [
        (vec!["ping"], vec![("TCPNETLOCK_HOST", with_port.clone())]),
        (vec!["ping", "--host", &with_port], vec![]),
        // The same port twice is no conflict.
        (
            vec!["ping", "--host", &with_port],
            vec![("TCPNETLOCK_PORT", port.to_string())],
        ),
    ] {
        let (code, out, err) = run(&args, &env);
        assert_eq!((code, err.as_str()), (0, ""), "{args:?} {env:?}");
        assert!(out.starts_with(&pong), "{out}");
    }

    let mut cmd = Command::new(BIN);
    cmd.args(["server", "--listen", "[::1]:0", "--log", "stderr", "-v"]);
    let v6 = Server::spawn(cmd);
    let (code, out, err) = run(&["ping", "--host", &v6.addr.to_string()], &[]);
    assert_eq!((code, err.as_str()), (0, ""));
    assert!(
        out.starts_with(&format!("pong from {} in ", v6.addr)),
        "{out}"
    );

    let other = free_port().to_string();
    for (args, env) in [
        (vec!["ping", "--host", &with_port, "--port", &other], vec![]),
        (
            vec!["ping"],
            vec![
                ("TCPNETLOCK_HOST", with_port.clone()),
                ("TCPNETLOCK_PORT", other.clone()),
            ],
        ),
    ] {
        let (code, out, err) = run(&args, &env);
        assert_eq!((code, out.as_str()), (2, ""), "{args:?} {env:?}");
        assert!(
            err.starts_with(&format!(
                "error: the server's port is given twice: {port} in --host (or TCPNETLOCK_HOST) \
                 and {other} by --port (or TCPNETLOCK_PORT); give it once"
            )),
            "{err}"
        );
    }
    let (code, _, err) = run(&["ping", "--host", "127.0.0.1:x"], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("invalid value '127.0.0.1:x' for '--host <HOST[:PORT]>'"),
        "{err}"
    );
}

/// On a terminal (a pty, through script(1)), `locks` lists each lock's holders and then its
/// waiters in queue order, each with its mode and for how long; the name only on a lock's
/// first row. Not on a terminal the table above is unchanged, and `--json` too.
#[test]
fn locks_on_a_terminal_shows_holders_and_waiters_in_line() {
    let script = common::require_tool("script", "bsdutils");
    let s = Server::start(&[]);
    let mut held = Client::connect(s.addr);
    assert_eq!(held.ask("lock,name:deploy,client-id:ci-7"), "ok");
    let mut first = Client::connect(s.addr);
    first.send("lock,name:deploy,client-id:pod-8,wait:30");
    assert!(common::wait_until(LIMIT, || s.stat("waiting") == 1.0).is_some());
    let mut second = Client::connect(s.addr);
    second.send("lock,name:deploy,wait:20,shared:1");
    assert!(common::wait_until(LIMIT, || s.stat("waiting") == 2.0).is_some());
    let mut reader = Client::connect(s.addr);
    assert_eq!(reader.ask("lock,name:catalog,shared:1,ttl:30"), "ok");

    let line = format!("{BIN} locks --host 127.0.0.1 --port {}", s.addr.port());
    let mut cmd = Command::new(script);
    // script's stdin stays open: at its end, script may go before the last output is copied.
    cmd.args(["-qec", &line, "/dev/null"]).stdin(Stdio::piped());
    let (code, screen, _) = common::Running::spawn(&mut cmd).finish(LIMIT);
    assert_eq!(code, 0, "{screen}");
    let rows: Vec<Vec<&str>> = screen
        .lines()
        .map(|l| l.trim_end_matches('\r').split_whitespace().collect())
        .collect();
    let addr = |c: &Client| c.stream.local_addr().unwrap().to_string();
    let (reader_at, held_at, first_at, second_at) =
        (addr(&reader), addr(&held), addr(&first), addr(&second));
    // Cells: name (first row only), role, mode, client, peer, for, then left or token and ttl.
    assert_eq!(
        rows[0],
        [
            "NAME", "ROLE", "MODE", "CLIENT", "PEER", "FOR", "LEFT", "TOKEN", "TTL"
        ],
        "{screen}"
    );
    assert_eq!(rows.len(), 5, "{screen}");
    assert_eq!(
        rows[1][..5],
        ["catalog", "holder", "shared", "-", &reader_at]
    );
    assert_eq!(rows[1][7], "30.0s", "{screen}");
    assert_eq!(
        rows[2][..5],
        ["deploy", "holder", "exclusive", "ci-7", &held_at]
    );
    assert_eq!(rows[2][7], "-", "{screen}");
    assert_eq!(
        rows[3][..5],
        ["waiter", "1", "exclusive", "pod-8", &first_at]
    );
    assert_eq!(rows[4][..5], ["waiter", "2", "shared", "-", &second_at]);
    // Left of the waits of 30 and 20 s (shown to a tenth of a second).
    let secs = |cell: &str| -> f64 { cell.strip_suffix('s').unwrap().parse().unwrap() };
    let (left_1, left_2) = (secs(rows[3][6]), secs(rows[4][6]));
    assert!(left_1 <= 30.0 && left_1 > 25.0, "{screen}");
    assert!(left_2 <= 20.0 && left_2 > 15.0, "{screen}");

    // Not on a terminal: the table scripts already read.
    let (code, out, _) = tnl(s.addr.port(), &["locks"]);
    assert_eq!(code, 0);
    assert_eq!(
        out.lines()
            .next()
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["NAME", "HOLDER", "PEER", "HELD", "TOKEN", "TTL", "WAITING"]
    );
    assert_eq!(out.lines().count(), 3, "{out}");
}
