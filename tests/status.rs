//! The status types (`tcpnetlock::status`) against the real server and against tcpnetlock 0.1.8's
//! reply: `Client::stats` and `Client::locks` read what the server meant, and the types write
//! the server's own bytes again.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::Command;
use std::thread;
use std::time::Duration;

use common::{BIN, Server};
use tcpnetlock::client::{Client, Error};
use tcpnetlock::status::{Locks, Stats};

const LIMIT: Duration = Duration::from_secs(20);

/// Holders with and without a client id, a fencing token, a lease, a semaphore and a waiter,
/// all from IPv6 peers: read by the library, every value is what the server was asked for,
/// and written again, the bytes are the server's.
#[test]
fn what_the_server_sends_reads_exactly_and_writes_back_byte_for_byte() {
    let mut cmd = Command::new(BIN);
    cmd.args(["server", "--listen", "[::1]:0", "--log", "stderr", "-v"]);
    let s = Server::spawn(cmd);

    let mut deploy = s.connect();
    let granted = deploy.ask("lock,name:deploy,client-id:ci-7@host,fencing:1");
    let token: u64 = granted
        .strip_prefix("ok,token:")
        .unwrap_or_else(|| panic!("{granted}"))
        .parse()
        .unwrap();
    let mut builds_a = s.connect();
    assert_eq!(
        builds_a.ask("lock,name:builds,max:3,ttl:30,client-id:a"),
        "ok"
    );
    let mut builds_b = s.connect();
    assert_eq!(builds_b.ask("lock,name:builds,max:3"), "ok");
    let mut waiter = s.connect();
    waiter.send("lock,name:deploy,wait:30");
    assert!(common::wait_until(LIMIT, || s.stat("waiting") == 1.0).is_some());

    let client = Client::new("::1", s.addr.port());
    let raw = client.locks_json().unwrap();
    let read: Locks = serde_json::from_str(&raw).unwrap();
    let mut written = String::new();
    read.write_json(&mut written);
    assert_eq!(written, raw);

    let locks = client.locks().unwrap();
    assert_eq!(
        locks.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
        ["builds", "deploy"]
    );
    let d = locks.get("deploy").unwrap();
    assert_eq!((d.max, d.waiting, d.holders.len()), (Some(1), Some(1), 1));
    let h = &d.holders[0];
    assert_eq!(h.client_id.as_deref(), Some("ci-7@host"));
    assert_eq!(h.token, Some(token));
    assert_eq!(
        h.peer,
        Some(deploy.stream.local_addr().unwrap().to_string())
    );
    assert!(h.peer.as_deref().unwrap().starts_with("[::1]:"));
    assert_eq!(h.ttl_secs, None);
    let held = h.held().unwrap();
    assert!(held < LIMIT, "{held:?}");
    assert!(d.other.is_empty() && h.other.is_empty());

    let b = locks.get("builds").unwrap();
    assert_eq!((b.max, b.waiting), (Some(3), Some(0)));
    let mut holders: Vec<_> = b
        .holders
        .iter()
        .map(|h| (h.client_id.as_deref(), h.ttl()))
        .collect();
    holders.sort();
    assert_eq!(
        holders,
        [(None, None), (Some("a"), Some(Duration::from_secs(30)))]
    );

    let raw = client.stats_json().unwrap();
    let read: Stats = serde_json::from_str(&raw).unwrap();
    let mut written = String::new();
    read.write_json(&mut written);
    assert_eq!(written, raw);

    let stats = client.stats().unwrap();
    assert!(stats.other.is_empty(), "{:?}", stats.other);
    assert_eq!(stats.version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!(
        (stats.locks_held, stats.holders, stats.waiting),
        (Some(2), Some(3), Some(1))
    );
    assert_eq!(stats.lock_acquired_count, Some(3));
    assert!(stats.maxrss.unwrap() > 0);
    assert!(stats.uptime().unwrap() < Duration::from_secs(60));
}

/// A stand-in server that answers every request with `reply`.
fn fake_server(reply: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { break };
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            if reader.read_line(&mut line).is_ok() {
                let _ = reader.get_mut().write_all(reply.as_bytes());
            }
        }
    });
    port
}

/// 0.1.8's reply, as captured from it (src/status/tests.rs says how).
#[test]
fn stats_from_0_1_8_over_the_wire() {
    let port = fake_server(
        "stats,{\"lock_count\": 1, \"maxrss\": 13840, \"requests_count\": 3, \
         \"lock_acquired_count\": 1, \"lock_not_acquired_count\": 1}\n",
    );
    let stats = Client::new("127.0.0.1", port).stats().unwrap();
    assert_eq!(
        (
            stats.locks_held,
            stats.maxrss,
            stats.requests_count,
            stats.lock_acquired_count,
            stats.lock_not_acquired_count
        ),
        (Some(1), Some(13_840), Some(3), Some(1), Some(1))
    );
    assert_eq!((stats.version, stats.waiting), (None, None));
    assert!(stats.other.is_empty());
}

/// A reply that is JSON but not an object is a protocol error that shows it; so is a lock that
/// is not an object.
#[test]
fn a_reply_that_is_not_the_object_is_a_protocol_error() {
    let port = fake_server("stats,[1, 2]\n");
    match Client::new("127.0.0.1", port).stats() {
        Err(Error::Protocol(msg)) => assert!(
            msg.starts_with("the reply to .stats is not the JSON object expected (invalid type:")
                && msg.ends_with("): \"[1, 2]\""),
            "{msg}"
        ),
        other => panic!("{other:?}"),
    }
    let port = fake_server("locks,{\"a\": [], \"b\": {}}\n");
    match Client::new("127.0.0.1", port).locks() {
        Err(Error::Protocol(msg)) => {
            assert!(msg.contains("(lock \"a\" is [], not an object): "), "{msg}")
        }
        other => panic!("{other:?}"),
    }
}

/// `.info` from a server on its own: its version, no cluster; `.ping,serving:1` is `pong`. An
/// older server answers `.info` with `bad-action`: the library says `None`.
#[test]
fn info_from_a_server_on_its_own_and_from_an_older_one() {
    let s = Server::start(&[]);
    let client = Client::new("127.0.0.1", s.addr.port());
    let info = client.info().unwrap().expect("this server knows .info");
    assert_eq!(info.version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!(info.cluster, None);
    assert!(info.other.is_empty(), "{:?}", info.other);
    assert_eq!(
        s.connect().ask(".info"),
        format!(
            r#"info,{{"version": "{}", "cluster": null}}"#,
            env!("CARGO_PKG_VERSION")
        )
    );
    assert_eq!(s.connect().ask(".ping,serving:1"), "pong");
    let older = fake_server("bad-action\n");
    assert_eq!(Client::new("127.0.0.1", older).info().unwrap(), None);
}
