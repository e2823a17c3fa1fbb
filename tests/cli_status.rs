//! `tcpnetlock ping`, `stats` and `locks` against the real server: what a person sees, what
//! `--json` passes on, and the exit statuses.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::Command;
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
