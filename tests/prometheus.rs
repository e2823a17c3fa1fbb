//! The metrics as Prometheus' own tools take them: a real Prometheus scrapes `tcpnetlock server`
//! on its lock port and answers queries with what the test did; node_exporter's textfile
//! collector takes what `tcpnetlock stats --prometheus` prints. Prometheus is started once, for
//! the one test that needs it (about 6 s before its first scrape: see tests/common/prometheus.rs).

mod common;

use std::process::Command;
use std::time::Duration;

use common::prometheus::{Prometheus, ScrapeJob, scrape, value};
use common::{
    BIN, Client, Running, Server, TempDir, free_port, require_tool, try_lock, wait_until,
};

/// How long a test waits for a sample. Prometheus needs about 6 s for its first scrape; the rest
/// is slack for a loaded machine.
const SAMPLE_LIMIT: Duration = Duration::from_secs(60);

/// Takes and releases `name`, `n` times, each on a fresh connection.
fn lock_cycles(s: &Server, name: &str, n: usize) {
    for _ in 0..n {
        let (mut c, reply) = try_lock(s.addr, name);
        assert_eq!(reply, "ok");
        assert_eq!(c.ask("release"), "released");
    }
}

#[test]
fn prometheus_scrapes_the_server_and_answers_queries() {
    let s = Server::start(&[]);
    lock_cycles(&s, "job", 5);
    // One grant after waiting, so the wait histogram has an observation.
    let (mut holder, _) = try_lock(s.addr, "job");
    let mut waiter = Client::connect(s.addr);
    waiter.send("lock,name:job,wait:30");
    let mut queued = String::new();
    wait_until(Duration::from_secs(20), || {
        queued = scrape(s.addr);
        value(&queued, "tcpnetlock_waiters") == 1.0
    })
    .unwrap_or_else(|| panic!("never queued:\n{queued}"));
    assert_eq!(holder.ask("release"), "released");
    assert_eq!(waiter.line(), "ok");
    assert_eq!(waiter.ask("release"), "released");

    let prometheus = Prometheus::start(&[
        ScrapeJob {
            name: "tcpnetlock",
            target: s.addr,
            path: "/metrics",
        },
        // What a scrape job with a wrong path shows the operator.
        ScrapeJob {
            name: "wrong-path",
            target: s.addr,
            path: "/other",
        },
    ]);
    let up = prometheus.await_query(r#"up{job="tcpnetlock"} == 1"#, SAMPLE_LIMIT);
    assert_eq!(up.len(), 1, "{up:?}");
    eprintln!(
        "prometheus: ready {:.2} s after start, first sample after {:.2} s",
        prometheus.ready_after.as_secs_f64(),
        prometheus.since_start().as_secs_f64()
    );

    // Six grants at once (five cycles and the holder), one after waiting.
    let grants = prometheus.query(r#"tcpnetlock_grants_total{job="tcpnetlock"}"#);
    let by_how: Vec<(String, f64)> = grants
        .iter()
        .map(|s| (s.labels["how"].clone(), s.value))
        .collect();
    assert_eq!(
        by_how,
        [
            ("after_wait".to_owned(), 1.0),
            ("immediate".to_owned(), 6.0)
        ]
    );
    let releases = prometheus.query(r#"tcpnetlock_releases_total{how="release"}"#);
    assert_eq!(releases[0].value, 7.0, "{releases:?}");
    assert_eq!(
        prometheus.query("tcpnetlock_wait_seconds_count")[0].value,
        1.0
    );
    assert_eq!(
        prometheus.query("tcpnetlock_hold_seconds_count")[0].value,
        7.0
    );
    assert_eq!(prometheus.query("tcpnetlock_locks_held")[0].value, 0.0);
    let build = prometheus.query("tcpnetlock_build_info");
    assert_eq!(build[0].labels["version"], env!("CARGO_PKG_VERSION"));
    // Prometheus' own scrape requests are counted, as metrics requests.
    let scrapes = prometheus.query(r#"tcpnetlock_requests_total{kind="metrics"} > 0"#);
    assert_eq!(scrapes.len(), 1);

    // Counting goes on between scrapes, and a later scrape sees it.
    lock_cycles(&s, "job", 3);
    prometheus.await_query(
        r#"tcpnetlock_grants_total{job="tcpnetlock",how="immediate"} == 9"#,
        SAMPLE_LIMIT,
    );
    prometheus.await_query(
        r#"rate(tcpnetlock_grants_total{how="immediate"}[1m]) > 0"#,
        SAMPLE_LIMIT,
    );

    let targets = prometheus.targets();
    let ok = targets.iter().find(|t| t.job == "tcpnetlock").unwrap();
    assert_eq!(
        (ok.health.as_str(), ok.last_error.as_str()),
        ("up", ""),
        "{ok:?}"
    );
    assert_eq!(ok.scrape_url, format!("http://{}/metrics", s.addr));

    // The wrong path got `bad-action`, which Prometheus reports as a failed scrape.
    prometheus.await_query(r#"up{job="wrong-path"} == 0"#, SAMPLE_LIMIT);
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
    // Every scrape of /metrics got its metrics: the server refused none of Prometheus' heads.
    let log = s.log_text();
    assert!(!log.contains("GET /metrics refused"), "{log}");
}

/// node_exporter's textfile collector reads what `stats --prometheus` prints, the way its
/// documentation says to feed it (written beside, then renamed in), and exports it without an
/// error: no family clashes with node_exporter's own.
#[test]
fn node_exporter_exports_what_stats_prometheus_prints() {
    let node_exporter = require_tool("prometheus-node-exporter", "prometheus-node-exporter");
    let s = Server::start(&[]);
    lock_cycles(&s, "job", 4);
    let dir = TempDir::new("textfile");
    let out = Command::new(BIN)
        .args(["stats", "--prometheus", "--host", "127.0.0.1", "--port"])
        .arg(s.addr.port().to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let partial = dir.path.join("tcpnetlock.prom.tmp");
    std::fs::write(&partial, &out.stdout).unwrap();
    std::fs::rename(&partial, dir.path.join("tcpnetlock.prom")).unwrap();

    let addr = format!("127.0.0.1:{}", free_port());
    let mut exporter = Running::spawn(
        Command::new(node_exporter)
            .arg("--collector.disable-defaults")
            .arg("--collector.textfile")
            .arg(format!(
                "--collector.textfile.directory={}",
                dir.path.display()
            ))
            .arg(format!("--web.listen-address={addr}")),
    );
    let curl = require_tool("curl", "curl");
    let get = || {
        let got = Command::new(&curl)
            .args(["--silent", "--fail", "--max-time", "5"])
            .arg(format!("http://{addr}/metrics"))
            .output()
            .unwrap();
        got.status
            .success()
            .then(|| String::from_utf8_lossy(&got.stdout).into_owned())
    };
    let answered = wait_until(Duration::from_secs(20), || get().is_some());
    assert!(
        answered.is_some() && exporter.child.try_wait().unwrap().is_none(),
        "node_exporter did not answer; log:\n{}",
        exporter.stderr()
    );
    // The handler counts a scrape's gathering errors after answering it: the second scrape
    // shows the first one's.
    let text = get().expect("a second scrape");
    assert_eq!(value(&text, "node_textfile_scrape_error"), 0.0, "{text}");
    assert_eq!(
        value(
            &text,
            "promhttp_metric_handler_errors_total{cause=\"gathering\"}"
        ),
        0.0,
        "{}",
        exporter.stderr()
    );
    assert_eq!(
        value(&text, "tcpnetlock_grants_total{how=\"immediate\"}"),
        4.0
    );
    assert!(
        !exporter.stderr().contains("error gathering metrics"),
        "{}",
        exporter.stderr()
    );
}
