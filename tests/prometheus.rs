//! A real Prometheus scrapes the metrics and returns them through its query API.
//!
//! Until the server answers `GET /metrics` itself, the target is a small HTTP server in this file
//! built from the same parts the server will use: `http::metrics_request` decides on the first
//! line, `http::Head` checks the head, `http::response` frames `ServerMetrics::render`; any other
//! first line gets `bad-action`, as from the server. Once the server is wired, the target becomes
//! the real binary and nothing else here changes.

mod common;

#[allow(dead_code)]
#[path = "../src/http.rs"]
mod http;
#[allow(dead_code)]
#[path = "../src/metrics.rs"]
mod metrics;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime};

use common::prometheus::{Prometheus, ScrapeJob};
use metrics::{Gauges, ServerMetrics};

/// How long a test waits for a sample. Prometheus needs about 6 s for its first scrape (see
/// tests/common/prometheus.rs); the rest is slack for a loaded machine.
const SAMPLE_LIMIT: Duration = Duration::from_secs(60);

/// The stand-in target: serves `metrics` on the lock port's terms. Keeps the request heads it
/// was sent, and every answer that was not a 200.
struct Target {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    failures: Arc<Mutex<Vec<String>>>,
}

impl Target {
    fn start(metrics: Arc<ServerMetrics>, gauges: Gauges) -> Target {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (h, f) = (Arc::clone(&heads), Arc::clone(&failures));
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Err(e) = serve(&stream, &metrics, &gauges, &h, &f) {
                    f.lock().unwrap().push(format!("i/o error: {e}"));
                }
            }
        });
        Target {
            addr,
            heads,
            failures,
        }
    }
}

fn serve(
    stream: &TcpStream,
    metrics: &ServerMetrics,
    gauges: &Gauges,
    heads: &Mutex<Vec<String>>,
    failures: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line)?;
    let first = line.strip_suffix(b"\n").unwrap_or(&line).to_vec();
    let mut seen = String::from_utf8_lossy(&line).into_owned();
    let reply = match http::metrics_request(&first) {
        None => b"bad-action\n".to_vec(),
        Some(version) => {
            let mut head = http::Head::new(version);
            loop {
                line.clear();
                reader.read_until(b'\n', &mut line)?;
                seen.push_str(&String::from_utf8_lossy(&line));
                let Some(content) = line.strip_suffix(b"\n") else {
                    break http::error_response(&http::HttpError::TimedOut, SystemTime::now());
                };
                match head.line(content) {
                    Ok(false) => continue,
                    Ok(true) => {
                        metrics.request(metrics::RequestKind::Metrics);
                        break http::response(
                            http::Status::OK,
                            metrics::CONTENT_TYPE,
                            metrics.render(gauges).as_bytes(),
                            SystemTime::now(),
                        );
                    }
                    Err(e) => break http::error_response(&e, SystemTime::now()),
                }
            }
        }
    };
    if !reply.starts_with(b"HTTP/1.1 200 ") {
        failures
            .lock()
            .unwrap()
            .push(format!("{seen:?} -> {:?}", String::from_utf8_lossy(&reply)));
    }
    heads.lock().unwrap().push(seen);
    let mut stream = stream;
    stream.write_all(&reply)?;
    stream.shutdown(Shutdown::Write)?;
    // Wait for the scraper to close, so that nothing unread turns our close into a reset.
    let _ = reader.read_to_end(&mut Vec::new());
    Ok(())
}

#[test]
fn prometheus_scrapes_the_metrics_and_answers_queries() {
    let m = Arc::new(ServerMetrics::new());
    for _ in 0..3 {
        m.granted_immediately();
    }
    m.granted_after_wait(Duration::from_millis(2));
    m.granted_after_wait(Duration::from_secs(200));
    m.released(metrics::Release::Release, Duration::from_secs(1));
    let gauges = Gauges {
        locks_held: 2,
        holders: 2,
        waiters: 1,
        connections: 3,
        threads: 4,
        threads_idle: 1,
    };
    let target = Target::start(Arc::clone(&m), gauges);
    let prometheus = Prometheus::start(&[
        ScrapeJob {
            name: "tcpnetlock",
            target: target.addr,
            path: "/metrics",
        },
        // What a scrape job with a wrong path shows the operator.
        ScrapeJob {
            name: "wrong-path",
            target: target.addr,
            path: "/other",
        },
    ]);
    let ready = prometheus.ready_after;

    let up = prometheus.await_query(r#"up{job="tcpnetlock"} == 1"#, SAMPLE_LIMIT);
    let first_sample = prometheus.since_start();
    assert_eq!(up.len(), 1, "{up:?}");
    eprintln!(
        "prometheus: ready {:.2} s after start, first sample after {:.2} s",
        ready.as_secs_f64(),
        first_sample.as_secs_f64()
    );

    let grants = prometheus.query(r#"tcpnetlock_grants_total{job="tcpnetlock"}"#);
    let by_how: Vec<(String, f64)> = grants
        .iter()
        .map(|s| (s.labels["how"].clone(), s.value))
        .collect();
    assert_eq!(
        by_how,
        [
            ("after_wait".to_owned(), 2.0),
            ("immediate".to_owned(), 3.0)
        ]
    );
    let count = prometheus.query("tcpnetlock_wait_seconds_count");
    assert_eq!(count.len(), 1);
    assert_eq!(count[0].value, 2.0);
    let le = prometheus.query(r#"tcpnetlock_wait_seconds_bucket{le="0.0025"}"#);
    assert_eq!(le[0].value, 1.0, "2 ms is at most 2.5 ms");
    let held = prometheus.query("tcpnetlock_locks_held");
    assert_eq!(held[0].value, 2.0);
    let build = prometheus.query("tcpnetlock_build_info");
    assert_eq!(build[0].labels["version"], env!("CARGO_PKG_VERSION"));

    // Counting goes on between scrapes, and a later scrape sees it.
    for _ in 0..5 {
        m.granted_immediately();
    }
    prometheus.await_query(
        r#"tcpnetlock_grants_total{how="immediate"} == 8"#,
        SAMPLE_LIMIT,
    );

    let targets = prometheus.targets();
    let ok = targets.iter().find(|t| t.job == "tcpnetlock").unwrap();
    assert_eq!(
        (ok.health.as_str(), ok.last_error.as_str()),
        ("up", ""),
        "{ok:?}"
    );
    assert_eq!(ok.scrape_url, format!("http://{}/metrics", target.addr));

    // The wrong path got `bad-action`, which Prometheus reports as a failed scrape.
    let wrong = prometheus.await_query(r#"up{job="wrong-path"} == 0"#, SAMPLE_LIMIT);
    assert_eq!(wrong.len(), 1);
    let wrong = prometheus
        .targets()
        .into_iter()
        .find(|t| t.job == "wrong-path")
        .unwrap();
    assert_eq!(wrong.health, "down", "{wrong:?}");
    eprintln!("prometheus, scraping /other: {:?}", wrong.last_error);
    assert!(
        wrong.last_error.contains("bad-action"),
        "the error names what came back: {wrong:?}"
    );

    // Every scrape of /metrics was answered 200: Prometheus' request heads pass http::Head.
    let heads = target.heads.lock().unwrap().clone();
    let metrics_heads: Vec<&String> = heads
        .iter()
        .filter(|h| h.starts_with("GET /metrics "))
        .collect();
    assert!(!metrics_heads.is_empty());
    for h in &metrics_heads {
        assert!(
            h.starts_with("GET /metrics HTTP/1.1\r\n"),
            "Prometheus' request line: {h:?}"
        );
    }
    eprintln!("a scrape's request head: {:?}", metrics_heads[0]);
    let failures = target.failures.lock().unwrap().clone();
    let unexpected: Vec<&String> = failures
        .iter()
        .filter(|f| !f.starts_with("\"GET /other "))
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:#?}");
}

/// curl, as an operator would use it: the body is the metrics text, the content type the one
/// Prometheus expects.
#[test]
fn curl_gets_the_metrics_text() {
    let curl = common::require_tool("curl", "curl");
    let m = Arc::new(ServerMetrics::new());
    m.granted_immediately();
    let target = Target::start(Arc::clone(&m), Gauges::default());
    let out = std::process::Command::new(curl)
        .args(["--silent", "--show-error", "--include", "--max-time", "10"])
        .arg(format!("http://{}/metrics", target.addr))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
        "{head}"
    );
    assert!(
        body.contains("\ntcpnetlock_grants_total{how=\"immediate\"} 1\n"),
        "{body}"
    );
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(length, body.len());

    // Another path is not HTTP to the lock port: curl refuses the v1 answer as HTTP/0.9.
    let other = std::process::Command::new(common::require_tool("curl", "curl"))
        .args(["--silent", "--show-error", "--max-time", "10"])
        .arg(format!("http://{}/", target.addr))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success());
    assert!(stderr.contains("HTTP/0.9"), "{stderr}");
    eprintln!("curl http://ADDR/: {}", stderr.trim());
}
