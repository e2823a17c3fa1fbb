//! The Prometheus metrics text and the HTTP framing around it: promtool's verdict on the text, and
//! the v1 answers that every line other than `GET /metrics HTTP/1.x` must keep, from the real
//! binary. The modules are mounted from their source files (their unit tests run here too) until
//! the server mounts them itself.

mod common;

#[allow(dead_code)]
#[path = "../src/http.rs"]
mod http;
#[allow(dead_code)]
#[path = "../src/metrics.rs"]
mod metrics;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Server, require_tool};
use metrics::{ConnRefusal, Gauges, Refusal, Release, RequestKind, ServerMetrics};

/// Metrics with every counter and both histograms past zero.
fn busy_sample() -> String {
    let m = ServerMetrics::new();
    for kind in [
        RequestKind::Lock,
        RequestKind::Ping,
        RequestKind::Stats,
        RequestKind::Locks,
        RequestKind::Metrics,
        RequestKind::Shutdown,
        RequestKind::Bad,
    ] {
        m.request(kind);
    }
    m.granted_immediately();
    m.granted_after_wait(Duration::from_micros(180));
    m.granted_after_wait(Duration::from_secs(95));
    m.refused(Refusal::NotGranted);
    m.refused(Refusal::MaxMismatch);
    m.wait_timed_out();
    m.lease_expired(Duration::from_secs(30));
    m.released(Release::Release, Duration::from_millis(40));
    m.released(Release::Disconnect, Duration::from_secs(5000));
    m.connection_refused(ConnRefusal::MaxConnections);
    m.connection_refused(ConnRefusal::ServerBusy);
    m.render(&Gauges {
        locks_held: 3,
        holders: 4,
        waiters: 2,
        connections: 8,
        threads: 9,
        threads_idle: 1,
    })
}

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

#[test]
fn promtool_finds_nothing_to_lint_in_the_metrics() {
    let text = busy_sample();
    let (status, printed) = promtool(&text);
    assert_eq!(
        (status, printed.as_str()),
        (0, ""),
        "promtool check metrics on:\n{text}"
    );
}

/// The check above is only worth something if promtool speaks up on a mistake it should catch.
#[test]
fn promtool_catches_a_misnamed_counter() {
    let text = busy_sample().replace("tcpnetlock_wait_timeouts_total", "tcpnetlock_wait_timeouts");
    let (status, printed) = promtool(&text);
    assert_ne!(status, 0, "{printed}");
    assert!(
        printed.contains(r#"tcpnetlock_wait_timeouts counter metrics should have "_total" suffix"#),
        "{printed}"
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
        assert_eq!(http::metrics_request(line.as_bytes()), None, "{line:?}");
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
