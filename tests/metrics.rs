//! The Prometheus metrics of the real binary, without Prometheus: `GET /metrics` on the lock port,
//! each group of counters moving as the events it counts happen, the HTTP answers to bad heads,
//! metrics past the connection limits, `tcpnetlock stats --prometheus` and its errors, promtool's
//! verdict on what the server sends, and the v1 answers every other HTTP-looking line keeps. A
//! real Prometheus scraping the server: tests/prometheus.rs.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::prometheus::{exchange, sample, scrape, try_scrape, value};
use common::{BIN, Client, Server, require_tool, run_within, try_lock, wait_until};

const LIMIT: Duration = Duration::from_secs(20);

/// Runs `promtool check metrics` on `text`: (exit status, what it printed).
fn promtool(text: &str) -> (i32, String) {
    let tool = require_tool("promtool", "prometheus");
    let mut child = Command::new(tool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (common::code(out.status), printed)
}

/// `tcpnetlock stats --prometheus` against `addr`: (status, stdout, stderr).
fn stats_prometheus(addr: SocketAddr) -> (i32, String, String) {
    run_within(
        Command::new(BIN).args([
            "stats",
            "--prometheus",
            "--host",
            &addr.ip().to_string(),
            "--port",
            &addr.port().to_string(),
        ]),
        LIMIT,
    )
}

/// Polls scrapes until `series` has `expected`; the last scrape.
fn await_value(addr: SocketAddr, series: &str, expected: f64) -> String {
    let mut text = String::new();
    let found = wait_until(LIMIT, || {
        text = scrape(addr);
        sample(&text, series) == Some(expected)
    });
    assert!(found.is_some(), "{series} never {expected}; last:\n{text}");
    text
}

/// A server that has seen every kind of event: both histograms and every counter the test can
/// cause past zero.
fn busy_server() -> Server {
    let s = Server::start(&["--request-timeout", "5"]);
    let (mut holder, reply) = try_lock(s.addr, "a");
    assert_eq!(reply, "ok");
    assert_eq!(try_lock(s.addr, "a").1, "not-granted");
    assert_eq!(
        try_lock(s.addr, "a,max:2").1,
        "err,max mismatch: a is held with max:1"
    );
    assert_eq!(
        Client::connect(s.addr).ask("lock,name:a,wait:0.05"),
        "not-granted"
    );
    let mut waiter = Client::connect(s.addr);
    waiter.send("lock,name:a,wait:10,shared:1");
    await_value(s.addr, "tcpnetlock_waiters", 1.0);
    assert_eq!(holder.ask("release"), "released");
    assert_eq!(waiter.line(), "ok");
    drop(waiter);
    let mut leased = Client::connect(s.addr);
    assert_eq!(leased.ask("lock,name:b,ttl:0.05"), "ok");
    assert_eq!(leased.line(), "expired");
    assert_eq!(Client::connect(s.addr).ask("hello"), "bad-action");
    assert_eq!(Client::connect(s.addr).ask(".ping"), "pong");
    await_value(s.addr, "tcpnetlock_releases_total{how=\"disconnect\"}", 1.0);
    s
}

#[test]
fn get_metrics_on_the_lock_port_answers_the_text_format_and_closes() {
    let s = Server::start(&[]);
    let curl = require_tool("curl", "curl");
    let out = Command::new(&curl)
        .args(["--silent", "--show-error", "--include", "--max-time", "10"])
        .arg(format!("http://{}/metrics", s.addr))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    assert_eq!(lines.next(), Some("HTTP/1.1 200 OK"));
    let fields: Vec<&str> = lines.map(|l| l.split(':').next().unwrap()).collect();
    assert_eq!(
        fields,
        ["Date", "Content-Type", "Content-Length", "Connection"],
        "{head}"
    );
    assert!(head.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
    assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())));
    assert!(head.contains("\r\nConnection: close"));
    let build = format!(
        "tcpnetlock_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(value(body, &build), 1.0);
    // The scrape counts itself: a request is counted before it is answered.
    assert_eq!(
        value(body, "tcpnetlock_requests_total{kind=\"metrics\"}"),
        1.0
    );
    assert_eq!(value(body, "tcpnetlock_connections_accepted_total"), 1.0);

    // HTTP/1.0, with a bare LF: the same answer, in HTTP/1.1.
    let (head, body) = exchange(s.addr, b"GET /metrics HTTP/1.0\n\n");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(
        value(&body, "tcpnetlock_requests_total{kind=\"metrics\"}"),
        2.0
    );

    // A head split over several writes is read to its end.
    let mut c = Client::connect(s.addr);
    c.send_raw(b"GET /metrics HTTP/1.1\r\n");
    thread::sleep(Duration::from_millis(100));
    c.send_raw(b"Host: x\r\nAccept: */*\r\n");
    thread::sleep(Duration::from_millis(100));
    c.send_raw(b"\r\n");
    let mut answer = String::new();
    c.stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");

    // Another path is not HTTP to the lock port: curl refuses the v1 answer as HTTP/0.9.
    let other = Command::new(&curl)
        .args(["--silent", "--show-error", "--max-time", "10"])
        .arg(format!("http://{}/", s.addr))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success());
    assert!(stderr.contains("HTTP/0.9"), "{stderr}");
}

#[test]
fn requests_are_counted_by_kind() {
    let s = Server::start(&["--request-timeout", "0.5"]);
    for _ in 0..2 {
        assert_eq!(Client::connect(s.addr).ask(".ping"), "pong");
    }
    assert!(Client::connect(s.addr).ask(".stats").starts_with("stats,"));
    assert!(Client::connect(s.addr).ask(".locks").starts_with("locks,"));
    let (mut holder, reply) = try_lock(s.addr, "a");
    assert_eq!(reply, "ok");
    assert_eq!(holder.ask("release"), "released");
    assert_eq!(
        Client::connect(s.addr).ask(".server-shutdown"),
        "err,server-shutdown not enabled"
    );
    // Bad: an unknown action, a bad parameter, a line too long, a line cut off by the close.
    assert_eq!(Client::connect(s.addr).ask("hello"), "bad-action");
    assert_eq!(
        Client::connect(s.addr).ask("lock,name:a,wait:x"),
        "err,invalid wait: expected seconds from 0 to 604800"
    );
    assert_eq!(
        Client::connect(s.addr).ask(&"x".repeat(2000)),
        "bad-request"
    );
    let mut cut = Client::connect(s.addr);
    cut.send_raw(b".pi");
    cut.half_close();
    assert_eq!(cut.line(), "bad-request");
    // And a metrics request with a bad head (HTTP/1.1 without Host).
    let (head, _) = exchange(s.addr, b"GET /metrics HTTP/1.1\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
    // Not requests: a connection closed without a word, and requests that never ended in time.
    drop(Client::connect(s.addr));
    assert_eq!(Client::connect(s.addr).line(), "err,request timeout");
    let (head, _) = exchange(s.addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
    assert!(
        head.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{head}"
    );

    let text = scrape(s.addr);
    for (kind, n) in [
        ("ping", 2.0),
        ("stats", 1.0),
        ("locks", 1.0),
        ("lock", 1.0),
        ("shutdown", 1.0),
        ("bad", 5.0),
        ("metrics", 1.0),
    ] {
        let series = format!("tcpnetlock_requests_total{{kind=\"{kind}\"}}");
        assert_eq!(value(&text, &series), n, "{series}");
    }
    // Every connection above, the scrape included.
    assert_eq!(value(&text, "tcpnetlock_connections_accepted_total"), 15.0);
    let stats = s.stats();
    assert_eq!(common::json_number(&stats, "requests_count"), Some(16.0));
}

#[test]
fn grants_are_counted_with_the_time_waited_and_the_state_is_shown() {
    let s = Server::start(&[]);
    let (mut holder, reply) = try_lock(s.addr, "x");
    assert_eq!(reply, "ok");
    let mut waiter = Client::connect(s.addr);
    let asked = Instant::now();
    waiter.send("lock,name:x,wait:10");
    let text = await_value(s.addr, "tcpnetlock_waiters", 1.0);
    assert_eq!(value(&text, "tcpnetlock_wait_seconds_count"), 0.0);
    // The waiter waits at least this long: the release comes after it.
    thread::sleep(Duration::from_millis(300));
    assert_eq!(holder.ask("release"), "released");
    assert_eq!(waiter.line(), "ok");
    let waited_at_most = asked.elapsed().as_secs_f64();
    let shared: Vec<Client> = (0..2)
        .map(|_| {
            let mut c = Client::connect(s.addr);
            assert_eq!(c.ask("lock,name:s,shared:1"), "ok");
            c
        })
        .collect();

    // The connections open now are those three and the scrape, once the released holder's and
    // earlier scrapes' have ended on the server's side too.
    let text = await_value(s.addr, "tcpnetlock_connections", 4.0);
    assert_eq!(
        value(&text, "tcpnetlock_grants_total{how=\"immediate\"}"),
        3.0
    );
    assert_eq!(
        value(&text, "tcpnetlock_grants_total{how=\"after_wait\"}"),
        1.0
    );
    assert_eq!(value(&text, "tcpnetlock_shared_grants_total"), 2.0);
    assert_eq!(value(&text, "tcpnetlock_wait_seconds_count"), 1.0);
    let waited = value(&text, "tcpnetlock_wait_seconds_sum");
    assert!(
        (0.3..=waited_at_most).contains(&waited),
        "waited {waited} s, expected 0.3 to {waited_at_most}"
    );
    assert_eq!(
        value(&text, "tcpnetlock_wait_seconds_bucket{le=\"0.25\"}"),
        0.0
    );
    assert_eq!(
        value(&text, "tcpnetlock_wait_seconds_bucket{le=\"+Inf\"}"),
        1.0
    );
    // Now: x held by the waiter, s by two shared holders, nobody waiting.
    assert_eq!(value(&text, "tcpnetlock_locks_held"), 2.0);
    assert_eq!(value(&text, "tcpnetlock_holders"), 3.0);
    assert_eq!(value(&text, "tcpnetlock_waiters"), 0.0);
    let threads = value(&text, "tcpnetlock_threads");
    assert!(threads >= 4.0, "{threads} threads for 4 connections");
    assert!(value(&text, "tcpnetlock_threads_idle") < threads);
    // The same counts as .stats.
    let stats = s.stats();
    assert_eq!(
        common::json_number(&stats, "lock_acquired_count"),
        Some(4.0)
    );
    assert_eq!(
        common::json_number(&stats, "granted_after_wait_count"),
        Some(1.0)
    );
    drop(shared);
}

#[test]
fn refusals_and_wait_timeouts_are_counted_apart() {
    let s = Server::start(&[]);
    let (_holder, reply) = try_lock(s.addr, "x");
    assert_eq!(reply, "ok");
    assert_eq!(try_lock(s.addr, "x").1, "not-granted");
    assert_eq!(try_lock(s.addr, "x").1, "not-granted");
    assert_eq!(
        try_lock(s.addr, "x,max:3").1,
        "err,max mismatch: x is held with max:1"
    );
    let mut late = Client::connect(s.addr);
    let start = Instant::now();
    assert_eq!(late.ask("lock,name:x,wait:0.2"), "not-granted");
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(190), "{took:?}");

    let text = scrape(s.addr);
    assert_eq!(
        value(&text, "tcpnetlock_refusals_total{reason=\"not_granted\"}"),
        2.0
    );
    assert_eq!(
        value(&text, "tcpnetlock_refusals_total{reason=\"max_mismatch\"}"),
        1.0
    );
    assert_eq!(value(&text, "tcpnetlock_wait_timeouts_total"), 1.0);
    assert_eq!(
        value(&text, "tcpnetlock_grants_total{how=\"after_wait\"}"),
        0.0
    );
    assert_eq!(value(&text, "tcpnetlock_wait_seconds_count"), 0.0);
    // .stats counts refusals at once and timeouts together.
    let stats = s.stats();
    assert_eq!(
        common::json_number(&stats, "lock_not_acquired_count"),
        Some(3.0)
    );
    assert_eq!(common::json_number(&stats, "max_mismatch_count"), Some(1.0));
}

#[test]
fn releases_disconnects_and_expiries_are_counted_with_the_time_held() {
    let s = Server::start(&[]);
    let asked = Instant::now();
    let (mut released, reply) = try_lock(s.addr, "r");
    assert_eq!(reply, "ok");
    thread::sleep(Duration::from_millis(300));
    assert_eq!(released.ask("release"), "released");
    let held_at_most = asked.elapsed().as_secs_f64();
    let text = scrape(s.addr);
    assert_eq!(
        value(&text, "tcpnetlock_releases_total{how=\"release\"}"),
        1.0
    );
    assert_eq!(value(&text, "tcpnetlock_hold_seconds_count"), 1.0);
    let held = value(&text, "tcpnetlock_hold_seconds_sum");
    assert!(
        (0.3..=held_at_most).contains(&held),
        "held {held} s, expected 0.3 to {held_at_most}"
    );
    assert_eq!(
        value(&text, "tcpnetlock_hold_seconds_bucket{le=\"0.25\"}"),
        0.0
    );
    assert_eq!(
        value(&text, "tcpnetlock_hold_seconds_bucket{le=\"0.5\"}"),
        1.0
    );

    // The connection ends: closed, reset, half-closed and gone, or closed by the server for a
    // line too long.
    let (closed, _) = try_lock(s.addr, "d1");
    drop(closed);
    let (reset, _) = try_lock(s.addr, "d2");
    reset.reset();
    let (mut long, _) = try_lock(s.addr, "d3");
    long.send(&"x".repeat(2000));
    assert_eq!(long.line(), "bad-request");
    await_value(s.addr, "tcpnetlock_releases_total{how=\"disconnect\"}", 3.0);

    let mut leased = Client::connect(s.addr);
    assert_eq!(leased.ask("lock,name:e,ttl:0.2"), "ok");
    assert_eq!(leased.line(), "expired");
    let text = scrape(s.addr);
    assert_eq!(value(&text, "tcpnetlock_lease_expiries_total"), 1.0);
    assert_eq!(
        value(&text, "tcpnetlock_releases_total{how=\"release\"}"),
        1.0
    );
    assert_eq!(
        value(&text, "tcpnetlock_releases_total{how=\"disconnect\"}"),
        3.0
    );
    assert_eq!(value(&text, "tcpnetlock_hold_seconds_count"), 5.0);
    // The released holder held 0.3 s and the expired one its ttl (0.2 s), at least.
    let over = value(&text, "tcpnetlock_hold_seconds_bucket{le=\"+Inf\"}")
        - value(&text, "tcpnetlock_hold_seconds_bucket{le=\"0.1\"}");
    assert!(over >= 2.0, "{text}");
    assert_eq!(value(&text, "tcpnetlock_holders"), 0.0);
    // A waiter that leaves is not a release; .stats agrees.
    let stats = s.stats();
    assert_eq!(
        common::json_number(&stats, "lock_released_count"),
        Some(4.0)
    );
    assert_eq!(
        common::json_number(&stats, "lease_expired_count"),
        Some(1.0)
    );
}

/// Connections opened against a full server until `opened` of them were refused at accept: each
/// ends with an `err,` line, at once or when its status-only time runs out. Returns how many
/// `err,` lines came, which is the number of refusals the server counted.
fn fill_and_overflow(addr: SocketAddr, reserve: usize, expected: &str) -> usize {
    let idle: Vec<Client> = (0..reserve).map(|_| Client::connect(addr)).collect();
    let mut refused = 0;
    let mut over = Client::connect(addr);
    assert_eq!(over.line(), format!("err,{expected}"));
    refused += 1;
    for mut c in idle {
        assert_eq!(c.line(), format!("err,{expected}"));
        refused += 1;
    }
    refused
}

/// A scrape of a full server, retried while refused: (the text, the refusals it met).
fn scrape_full(addr: SocketAddr, expected: &str) -> (String, usize) {
    let mut refused = 0;
    let start = Instant::now();
    loop {
        match try_scrape(addr) {
            Ok(text) => return (text, refused),
            Err(answer) => {
                assert_eq!(answer, format!("err,{expected}\n"));
                assert!(start.elapsed() < LIMIT, "never answered");
                refused += 1;
            }
        }
    }
}

#[test]
fn refused_connections_are_counted_and_metrics_are_answered_past_the_limits() {
    let servers = [
        (
            Server::start(&["--max-connections", "1", "--request-timeout", "0.5"]),
            "too many connections",
            "max_connections",
            64,
        ),
        (
            Server::start(&[
                "--max-connections-per-peer",
                "1",
                "--request-timeout",
                "0.5",
            ]),
            "too many connections from your address",
            "max_connections_per_peer",
            4,
        ),
    ];
    thread::scope(|scope| {
        for (s, message, reason, reserve) in &servers {
            scope.spawn(move || {
                let (_holder, reply) = try_lock(s.addr, "a");
                assert_eq!(reply, "ok");
                // Past the limit, metrics are answered like .stats; a lock request is refused.
                let (text, mut refused) = scrape_full(s.addr, message);
                assert_eq!(value(&text, "tcpnetlock_holders"), 1.0);
                assert_eq!(try_lock(s.addr, "b").1, format!("err,{message}"));
                refused += 1;
                refused += fill_and_overflow(s.addr, *reserve, message);
                let (text, more) = scrape_full(s.addr, message);
                refused += more;
                let series = format!("tcpnetlock_refused_connections_total{{reason=\"{reason}\"}}");
                assert_eq!(value(&text, &series), refused as f64, "{series}");
                assert!(refused > *reserve, "{refused}");
                let total: f64 = text
                    .lines()
                    .filter(|l| l.starts_with("tcpnetlock_refused_connections_total{"))
                    .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
                    .sum();
                assert_eq!(total, refused as f64, "only {reason}");
                assert_eq!(
                    value(&text, "tcpnetlock_requests_total{kind=\"lock\"}"),
                    2.0
                );
            });
        }
    });
}

#[test]
fn bad_request_heads_get_an_http_error_and_a_close() {
    let s = Server::start(&["--max-line-length", "64", "--request-timeout", "0.5"]);
    let cases = [
        (
            "GET /metrics HTTP/1.1\r\nAccept: */*\r\n\r\n".to_owned(),
            "400 Bad Request",
            "bad request: an HTTP/1.1 request needs a Host header\n",
        ),
        (
            "GET /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc".to_owned(),
            "400 Bad Request",
            "bad request: GET /metrics takes no request body\n",
        ),
        (
            "GET /metrics HTTP/1.0\r\nno colon here\r\n\r\n".to_owned(),
            "400 Bad Request",
            "bad request: header line without a colon\n",
        ),
        // A header line longer than --max-line-length.
        (
            format!(
                "GET /metrics HTTP/1.0\r\nX-Long: {}\r\n\r\n",
                "a".repeat(57)
            ),
            "431 Request Header Fields Too Large",
            "request header fields too large: at most 8192 bytes in 100 lines\n",
        ),
    ];
    for (request, status, body) in &cases {
        let request = request.as_bytes();
        let (head, got) = exchange(s.addr, request);
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status}\r\n")),
            "{:?}: {head}",
            String::from_utf8_lossy(request)
        );
        assert_eq!(got, *body);
    }
    // More than 8 KiB of header lines, each within the line length.
    let many = format!(
        "GET /metrics HTTP/1.0\r\n{}\r\n",
        "X-Many: 0123456789\r\n".repeat(500)
    );
    let (head, _) = exchange(s.addr, many.as_bytes());
    assert!(head.starts_with("HTTP/1.1 431 "), "{head}");
    // No blank line in time: 408 at the request timeout.
    let start = Instant::now();
    let (head, body) = exchange(s.addr, b"GET /metrics HTTP/1.1\r\nHost: a\r\n");
    let took = start.elapsed();
    assert!(
        head.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{head}"
    );
    assert_eq!(
        body,
        "the request head did not end with a blank line in time\n"
    );
    assert!(
        took >= Duration::from_millis(450) && took <= Duration::from_secs(5),
        "{took:?}"
    );
    // The client's end came first: told, too.
    let mut c = Client::connect(s.addr);
    c.send_raw(b"GET /metrics HTTP/1.0\n");
    c.half_close();
    let mut answer = String::new();
    c.stream.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n")
            && answer.ends_with(
                "\r\n\r\nbad request: the request ended before the blank line that ends its head\n"
            ),
        "{answer}"
    );
    let text = scrape(s.addr);
    assert_eq!(value(&text, "tcpnetlock_requests_total{kind=\"bad\"}"), 6.0);
    assert_eq!(
        value(&text, "tcpnetlock_requests_total{kind=\"metrics\"}"),
        1.0
    );
}

#[test]
fn promtool_finds_nothing_to_lint_in_the_servers_metrics() {
    let s = busy_server();
    let curl = require_tool("curl", "curl");
    let out = Command::new(curl)
        .args(["--silent", "--show-error", "--fail", "--max-time", "10"])
        .arg(format!("http://{}/metrics", s.addr))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    for series in [
        "tcpnetlock_grants_total{how=\"after_wait\"}",
        "tcpnetlock_shared_grants_total",
        "tcpnetlock_refusals_total{reason=\"not_granted\"}",
        "tcpnetlock_refusals_total{reason=\"max_mismatch\"}",
        "tcpnetlock_wait_timeouts_total",
        "tcpnetlock_lease_expiries_total",
        "tcpnetlock_releases_total{how=\"release\"}",
        "tcpnetlock_releases_total{how=\"disconnect\"}",
        "tcpnetlock_requests_total{kind=\"bad\"}",
        "tcpnetlock_wait_seconds_count",
        "tcpnetlock_hold_seconds_count",
        "process_resident_memory_bytes",
    ] {
        assert!(value(&text, series) > 0.0, "{series} in\n{text}");
    }
    let (status, printed) = promtool(&text);
    assert_eq!(
        (status, printed.as_str()),
        (0, ""),
        "promtool check metrics on:\n{text}"
    );

    let (code, printed, stderr) = stats_prometheus(s.addr);
    assert_eq!((code, stderr.as_str()), (0, ""));
    assert_eq!(promtool(&printed), (0, String::new()), "{printed}");
    // The same families as the server sends, but for the process's own.
    let families = |t: &str| -> Vec<String> {
        t.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(str::to_owned)
            .collect()
    };
    let expected: Vec<String> = families(&text)
        .into_iter()
        .filter(|f| !f.starts_with("process_"))
        .collect();
    assert_eq!(families(&printed), expected);
    assert!(!printed.contains("\nprocess_"), "{printed}");
    assert_eq!(
        value(&printed, "tcpnetlock_releases_total{how=\"release\"}"),
        value(&text, "tcpnetlock_releases_total{how=\"release\"}")
    );
}

/// The check above is only worth something if promtool speaks up on a mistake it should catch.
#[test]
fn promtool_catches_a_misnamed_counter() {
    let s = Server::start(&[]);
    let text = scrape(s.addr).replace("tcpnetlock_wait_timeouts_total", "tcpnetlock_wait_timeouts");
    let (status, printed) = promtool(&text);
    assert_ne!(status, 0, "{printed}");
    assert!(
        printed.contains(r#"tcpnetlock_wait_timeouts counter metrics should have "_total" suffix"#),
        "{printed}"
    );
}

/// A stand-in server that answers every connection with `answer` after reading the request
/// head.
fn canned(answer: Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(&stream);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line.trim_end() != "" {
                line.clear();
            }
            let _ = stream.write_all(&answer);
        }
    });
    addr
}

/// An HTTP/1.1 answer with a right Content-Length.
fn http_answer(status: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn stats_prometheus_says_clearly_what_went_wrong() {
    let nobody = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let (code, out, err) = stats_prometheus(nobody);
    assert_eq!((code, out.as_str()), (125, ""));
    assert_eq!(
        err,
        format!(
            "tcpnetlock: error: cannot connect to {nobody}: connection refused (is the server \
             running?)\n"
        )
    );
    for (answer, code, message) in [
        (
            b"bad-action\n".to_vec(),
            1,
            "tcpnetlock: error: protocol error: the server answered GET /metrics with \
             \"bad-action\", not HTTP: it does not serve metrics (tcpnetlock 0.2 and before \
             answer bad-action)\n",
        ),
        (
            b"err,too many connections\n".to_vec(),
            1,
            "tcpnetlock: error: the server refused the request: too many connections\n",
        ),
        (
            http_answer("431 Request Header Fields Too Large", "too large\n"),
            1,
            "tcpnetlock: error: the server refused the request: GET /metrics: 431 Request \
             Header Fields Too Large: too large\n",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\na 1\n".to_vec(),
            1,
            "tcpnetlock: error: protocol error: the metrics text was cut short: 4 of the 100 \
             bytes announced\n",
        ),
        (
            http_answer("200 OK", "a 1\nb{x=\"\x1b[2J\"} 1\n"),
            1,
            "tcpnetlock: error: the server's metrics text has a control character on line 2: \
             b{x=\"\\u{1b}[2J\"} 1\n",
        ),
    ] {
        let addr = canned(answer);
        let (got, out, err) = stats_prometheus(addr);
        assert_eq!((got, out.as_str(), err.as_str()), (code, "", message));
    }
}

/// A stand-in server that sends `head`, then `line` every `pause` until the client goes away.
fn endless(head: &'static str, line: String, pause: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let line = line.clone();
            thread::spawn(move || {
                let mut stream = stream;
                let _ = stream.write_all(head.as_bytes());
                while stream.write_all(line.as_bytes()).is_ok() {
                    thread::sleep(pause);
                }
            });
        }
    });
    addr
}

/// A server whose metrics never end is given up on: at the size cap when they come fast, by the
/// reply timeout when they trickle.
#[test]
fn a_metrics_answer_that_never_ends_is_given_up() {
    use tcpnetlock::client::{Client, Error};
    let timeout = Duration::from_secs(3);
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n";
    let fast = endless(head, format!("a{} 1\n", "b".repeat(4000)), Duration::ZERO);
    let client = Client::new("127.0.0.1", fast.port()).reply_timeout(timeout);
    let start = Instant::now();
    match client.metrics() {
        Err(Error::Protocol(m)) => assert_eq!(
            m,
            "the metrics text is over 16777216 bytes (is it a tcpnetlock server?)"
        ),
        // A slow machine may not carry 16 MiB within the timeout.
        Err(Error::Timeout { after }) => assert_eq!(after, timeout),
        other => panic!("{other:?}"),
    }
    assert!(start.elapsed() < timeout + Duration::from_secs(2));

    let slow = endless(head, "a 1\n".into(), Duration::from_millis(10));
    let client = Client::new("127.0.0.1", slow.port()).reply_timeout(timeout);
    let start = Instant::now();
    let got = client.metrics();
    let took = start.elapsed();
    assert!(
        matches!(got, Err(Error::Timeout { after }) if after == timeout)
            || matches!(&got, Err(Error::Protocol(m)) if m.contains("did not end in time")),
        "{got:?}"
    );
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(2),
        "{took:?}"
    );
}

/// HTTP-looking lines (and the answer 0.1.8 gives them), sent with a request head after them as
/// curl would. Only `GET /metrics HTTP/1.1` and `HTTP/1.0` may ever get anything else.
const V1_LINES: &[(&str, &str)] = &[
    ("GET / HTTP/1.1", "bad-action"),
    ("GET /metrics/ HTTP/1.1", "bad-action"),
    ("GET /metrics?x=1 HTTP/1.1", "bad-action"),
    ("HEAD /metrics HTTP/1.1", "bad-action"),
    ("POST /metrics HTTP/1.1", "bad-action"),
    ("get /metrics HTTP/1.1", "bad-action"),
    ("GET /metrics HTTP/1.2", "bad-action"),
    ("GET /metrics HTTP/2.0", "bad-action"),
    ("GET /metrics", "bad-action"),
    (" GET /metrics HTTP/1.1", "bad-action"),
    ("GET /metrics HTTP/1.1 ", "bad-action"),
    ("GET /metrics HTTP/1.1,name:x", "bad-action"),
    ("GET /a,:b HTTP/1.1", "bad-request"),
    ("PRI * HTTP/2.0", "bad-action"),
];

#[test]
fn http_lines_other_than_the_metrics_request_keep_their_v1_answer() {
    let s = Server::start(&[]);
    for (line, answer) in V1_LINES {
        let mut c = s.connect();
        c.send_raw(format!("{line}\r\nHost: localhost\r\nAccept: */*\r\n\r\n").as_bytes());
        let mut reply = Vec::new();
        c.stream
            .read_to_end(&mut reply)
            .unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert_eq!(
            String::from_utf8_lossy(&reply),
            format!("{answer}\n"),
            "{line:?}"
        );
    }
}
