//! Every line of protocol v1 (tcpnetlock 0.1.8), byte for byte, against the real binary.

mod common;

use std::time::Duration;

use common::{Client, Server, json_number, try_lock};

const CLOSED: Duration = Duration::from_secs(2);

#[test]
fn lock_is_exclusive_until_released() {
    let s = Server::start(&[]);
    let (mut a, reply) = try_lock(s.addr, "django-migrations");
    assert_eq!(reply, "ok");

    let (mut b, reply) = try_lock(s.addr, "django-migrations");
    assert_eq!(reply, "not-granted");
    assert!(b.closed_within(CLOSED), "not-granted must close");

    // Other names are independent.
    let (_c, reply) = try_lock(s.addr, "other");
    assert_eq!(reply, "ok");

    assert_eq!(a.ask("release"), "released");
    assert!(a.closed_within(CLOSED), "released must close");
    // `released` is written after the table frees the name: no retry needed.
    let (_d, reply) = try_lock(s.addr, "django-migrations");
    assert_eq!(reply, "ok");
}

#[test]
fn holder_requests() {
    let s = Server::start(&[]);
    let (mut a, reply) = try_lock(s.addr, "h");
    assert_eq!(reply, "ok");
    assert_eq!(a.ask(".keepalive"), "alive");
    assert_eq!(a.ask(" .keepalive \r"), "alive");
    assert_eq!(a.ask("invalid:action"), "bad-action");
    assert_eq!(a.ask(""), "bad-action");
    assert_eq!(a.ask("lock,name:h"), "bad-action");
    assert_eq!(a.ask(".ping"), "bad-action");
    a.send_raw(b"\xff\xfe\n");
    assert_eq!(a.line(), "bad-request");
    // None of that gave the lock away.
    assert_eq!(try_lock(s.addr, "h").1, "not-granted");
    assert_eq!(a.ask(".keepalive"), "alive");
    assert_eq!(a.ask("release,extra:ignored"), "released");
}

#[test]
fn client_id_and_whitespace() {
    let s = Server::start(&[]);
    let mut c = Client::connect(s.addr);
    assert_eq!(c.ask("lock,name:a,client-id:pod-7.ns@host_1"), "ok");

    let mut c = Client::connect(s.addr);
    assert_eq!(c.ask(" lock , name : space_is_ignored "), "ok");
    assert_eq!(try_lock(s.addr, "space_is_ignored").1, "not-granted");

    // Telnet sends \r\n.
    let mut c = Client::connect(s.addr);
    c.send_raw(b"lock,name:telnet\r\n");
    assert_eq!(c.line(), "ok");
}

#[test]
fn invalid_lock_names_and_client_ids() {
    let s = Server::start(&[]);
    let long = "n".repeat(129);
    for line in [
        "lock",
        "lock,name:",
        "lock,name:contains space",
        "lock,name:contains%invalid%chars",
        "lock,name:.starts-with-dot",
        "lock,name:a.b",
        &format!("lock,name:{long}"),
    ] {
        let mut c = Client::connect(s.addr);
        assert_eq!(c.ask(line), "err,invalid lock name", "{line}");
        assert!(c.closed_within(CLOSED), "{line}");
    }
    let mut c = Client::connect(s.addr);
    assert_eq!(c.ask(&format!("lock,name:{}", &long[1..])), "ok");

    for id in ["has space", "a/b", "x:y", ""] {
        let mut c = Client::connect(s.addr);
        let line = format!("lock,name:ok-name,client-id:{id}");
        assert_eq!(c.ask(&line), "err,invalid client-id", "{line}");
        assert!(c.closed_within(CLOSED));
    }
    // Rejected requests never took the lock.
    assert_eq!(try_lock(s.addr, "ok-name").1, "ok");
}

#[test]
fn name_length_limit_is_a_flag() {
    let s = Server::start(&["--max-name-length", "4"]);
    assert_eq!(try_lock(s.addr, "abcd").1, "ok");
    assert_eq!(try_lock(s.addr, "abcde").1, "err,invalid lock name");
}

#[test]
fn one_shot_requests() {
    let s = Server::start(&[]);
    for (line, reply) in [
        (".ping", "pong"),
        ("  .ping\r", "pong"),
        ("hello", "bad-action"),
        ("release", "bad-action"),
        (".keepalive", "bad-action"),
        ("invalid:action", "bad-action"),
        ("", "bad-request"),
        (",param:value", "bad-request"),
        ("lock,:value", "bad-request"),
        ("lock,name:x,", "bad-request"),
    ] {
        let mut c = Client::connect(s.addr);
        assert_eq!(c.ask(line), reply, "{line:?}");
        assert!(c.closed_within(CLOSED), "{line:?} must close");
    }
    let mut c = Client::connect(s.addr);
    c.send_raw(b"lock,name:\xc3\x28\n");
    assert_eq!(c.line(), "bad-request");
    assert!(c.closed_within(CLOSED));
}

#[test]
fn stats_report_counts() {
    let s = Server::start(&[]);
    let (_a, _) = try_lock(s.addr, "s1");
    let (_b, _) = try_lock(s.addr, "s2");
    let (_c, reply) = try_lock(s.addr, "s1");
    assert_eq!(reply, "not-granted");
    let json = s.stats();
    assert!(json.starts_with('{') && json.ends_with('}'), "{json}");
    for key in [
        "requests_count",
        "lock_acquired_count",
        "lock_not_acquired_count",
        "lock_count",
        "maxrss",
        "locks_held",
        "connections",
        "uptime_secs",
    ] {
        assert!(json_number(&json, key).is_some(), "{key} missing in {json}");
    }
    assert_eq!(json_number(&json, "lock_acquired_count"), Some(2.0));
    assert_eq!(json_number(&json, "lock_not_acquired_count"), Some(1.0));
    assert_eq!(json_number(&json, "locks_held"), Some(2.0));
    assert_eq!(json_number(&json, "lock_count"), Some(2.0));
    // Three lock connections plus this .stats one.
    assert_eq!(json_number(&json, "requests_count"), Some(4.0));
    assert!(json_number(&json, "maxrss").unwrap() > 0.0);
    assert!(json.contains(&format!("\"version\": \"{}\"", env!("CARGO_PKG_VERSION"))));
}

#[test]
fn pipelined_requests_in_one_packet() {
    let s = Server::start(&[]);
    let mut c = Client::connect(s.addr);
    c.send_raw(b"lock,name:p\n.keepalive\nrelease\n");
    assert_eq!(c.line(), "ok");
    assert_eq!(c.line(), "alive");
    assert_eq!(c.line(), "released");
    assert!(c.closed_within(CLOSED));
}

#[test]
fn server_shutdown_is_refused_by_default() {
    let s = Server::start(&[]);
    let mut c = Client::connect(s.addr);
    assert_eq!(c.ask(".server-shutdown"), "err,server-shutdown not enabled");
    assert!(c.closed_within(CLOSED));
    assert_eq!(Client::connect(s.addr).ask(".ping"), "pong");
}

#[test]
fn server_shutdown_with_the_flag_from_loopback() {
    let mut s = Server::start(&["--allow-shutdown-from-loopback"]);
    let mut c = Client::connect(s.addr);
    assert_eq!(c.ask(".server-shutdown"), "shutting-down");
    let status = common::wait_until(Duration::from_secs(5), || {
        matches!(s.child.try_wait(), Ok(Some(_)))
    });
    assert!(status.is_some(), "server still running after shutting-down");
    assert_eq!(s.child.wait().unwrap().code(), Some(0));
}
