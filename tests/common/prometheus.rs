//! A real Prometheus server for tests (Debian package prometheus): started on a free loopback
//! port with a generated configuration that scrapes the given targets every second, its storage
//! in a scratch directory, killed on drop. Tests ask it what it scraped through its HTTP API, as
//! an operator's dashboard would.
//!
//! Prometheus 2.42 answers `/-/ready` within 0.1 s of its start, but scrapes nothing until 5-6 s
//! after it (measured: 5.15-5.97 s to the first sample): its target discovery hands targets to
//! the scrape loops every 5 s, which that version cannot change. So a test pays about 6 s per
//! Prometheus it starts, and asks for a sample with [`Prometheus::await_query`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{Running, TempDir, free_port, require_tool, wait_until};

/// Longest wait for Prometheus to answer `/-/ready`.
const READY_LIMIT: Duration = Duration::from_secs(60);

/// One scrape job: Prometheus fetches `http://{target}{path}` every second.
pub struct ScrapeJob<'a> {
    pub name: &'a str,
    pub target: SocketAddr,
    pub path: &'a str,
}

/// One series of an instant query's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A scrape target as `/api/v1/targets` reports it.
#[derive(Debug, Clone)]
pub struct Target {
    pub job: String,
    pub scrape_url: String,
    /// `up`, `down` or `unknown` (not scraped yet).
    pub health: String,
    /// Why the last scrape failed; empty when it did not.
    pub last_error: String,
}

pub struct Prometheus {
    /// Declared before the directory: killed before its storage is removed.
    process: Running,
    pub addr: SocketAddr,
    started: Instant,
    /// From spawning the process to `/-/ready` answering 200.
    pub ready_after: Duration,
    _dir: TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `jobs` and waits until it is ready. Panics, with its log, if it
    /// is not ready within a minute.
    pub fn start(jobs: &[ScrapeJob]) -> Prometheus {
        let bin = require_tool("prometheus", "prometheus");
        let dir = TempDir::new("prometheus");
        let config = dir.path.join("prometheus.yml");
        std::fs::write(&config, config_text(jobs)).unwrap();
        // The free port can be taken between the probe and Prometheus binding it: try another.
        for _ in 0..5 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let started = Instant::now();
            let mut process = Running::spawn(
                Command::new(&bin)
                    .arg(format!("--config.file={}", config.display()))
                    .arg(format!(
                        "--storage.tsdb.path={}",
                        dir.path.join("data").display()
                    ))
                    .arg(format!("--web.listen-address={addr}"))
                    .current_dir(&dir.path)
                    .stdin(std::process::Stdio::null()),
            );
            let mut exited = None;
            let ready = wait_until(READY_LIMIT, || {
                exited = process.child.try_wait().unwrap();
                exited.is_some() || matches!(get(addr, "/-/ready"), Ok((200, _)))
            });
            if exited.is_some() && process.stderr().contains("address already in use") {
                continue;
            }
            assert!(
                ready.is_some() && exited.is_none(),
                "prometheus not ready within {READY_LIMIT:?} (exit: {exited:?}); log:\n{}",
                process.stderr()
            );
            return Prometheus {
                process,
                addr,
                started,
                ready_after: started.elapsed(),
                _dir: dir,
            };
        }
        panic!("prometheus found no free port in 5 tries");
    }

    /// Time since the process was spawned.
    pub fn since_start(&self) -> Duration {
        self.started.elapsed()
    }

    /// Prometheus' own log (stderr).
    pub fn log_text(&self) -> String {
        self.process.stderr()
    }

    /// An instant query (`/api/v1/query`) at the current time; its vector result.
    pub fn query(&self, promql: &str) -> Vec<Sample> {
        let data = self.api(&format!("/api/v1/query?query={}", url_encode(promql)));
        assert_eq!(
            data["resultType"], "vector",
            "{promql}: not an instant vector: {data}"
        );
        data["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| Sample {
                labels: s["metric"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                    .collect(),
                value: s["value"][1].as_str().unwrap().parse().unwrap(),
            })
            .collect()
    }

    /// Repeats `promql` until its result is not empty (a comparison such as `x == 3` is empty
    /// while false). Panics after `limit` with the targets' state and Prometheus' log.
    pub fn await_query(&self, promql: &str, limit: Duration) -> Vec<Sample> {
        let mut result = Vec::new();
        let found = wait_until(limit, || {
            result = self.query(promql);
            !result.is_empty()
        });
        if found.is_none() {
            panic!(
                "{promql}: no result within {limit:?}; targets: {:#?}\nlog:\n{}",
                self.targets(),
                self.log_text()
            );
        }
        result
    }

    /// The active scrape targets (`/api/v1/targets`).
    pub fn targets(&self) -> Vec<Target> {
        let data = self.api("/api/v1/targets?state=active");
        data["activeTargets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| Target {
                job: t["labels"]["job"].as_str().unwrap_or("").to_owned(),
                scrape_url: t["scrapeUrl"].as_str().unwrap_or("").to_owned(),
                health: t["health"].as_str().unwrap_or("").to_owned(),
                last_error: t["lastError"].as_str().unwrap_or("").to_owned(),
            })
            .collect()
    }

    /// The `data` of a successful API answer.
    fn api(&self, path: &str) -> serde_json::Value {
        let (status, body) = get(self.addr, path)
            .unwrap_or_else(|e| panic!("prometheus {path}: {e}; log:\n{}", self.log_text()));
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "prometheus {path}: {status}, not JSON ({e}): {}",
                String::from_utf8_lossy(&body)
            )
        });
        assert!(
            status == 200 && json["status"] == "success",
            "prometheus {path}: {status} {json}"
        );
        json["data"].clone()
    }
}

fn config_text(jobs: &[ScrapeJob]) -> String {
    let mut text = String::from(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         scrape_configs:\n",
    );
    for job in jobs {
        let _ = write!(
            text,
            "  - job_name: {}\n    metrics_path: {}\n    static_configs:\n      \
             - targets: ['{}']\n",
            job.name, job.path, job.target
        );
    }
    text
}

/// A GET over HTTP/1.0 (so that Prometheus' Go server answers without chunked encoding and closes
/// the connection at the end): (status code, body).
fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let bad = || std::io::Error::other(format!("{path}: not an HTTP response"));
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let status = std::str::from_utf8(&response[..end])
        .ok()
        .and_then(|head| head.split(' ').nth(1)?.parse().ok())
        .ok_or_else(bad)?;
    Ok((status, response[end + 4..].to_vec()))
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Sends `request` to `addr` as it is and reads until the server closes: (head, body), split at
/// the first blank line (all of it is the head when there is none, as with a v1 answer).
pub fn exchange(addr: SocketAddr, request: &[u8]) -> (String, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(request)));
    let text = String::from_utf8(response).expect("UTF-8");
    match text.split_once("\r\n\r\n") {
        Some((head, body)) => (head.to_owned(), body.to_owned()),
        None => (text, String::new()),
    }
}

/// `GET /metrics` as Prometheus sends it. The body, once the head is checked: 200, the text
/// format's content type, a Content-Length that is the body's.
pub fn scrape(addr: SocketAddr) -> String {
    try_scrape(addr).unwrap_or_else(|answer| panic!("GET /metrics: {answer:?}"))
}

/// [`scrape`], or the whole answer when it is not a 200 (a refused connection's `err,` line).
pub fn try_scrape(addr: SocketAddr) -> Result<String, String> {
    let (head, body) = exchange(
        addr,
        format!(
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: Prometheus/2.42.0\r\n\
             Accept: text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\nAccept-Encoding: gzip\r\n\
             X-Prometheus-Scrape-Timeout-Seconds: 10\r\n\r\n"
        )
        .as_bytes(),
    );
    if !head.starts_with("HTTP/1.1 200 OK\r\n") {
        return Err(format!("{head}{body}"));
    }
    assert!(
        head.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
        "{head}"
    );
    assert!(
        head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())),
        "{head}"
    );
    Ok(body)
}

/// The value of one series in a metrics text; `series` is written as in the text, labels and
/// all: `tcpnetlock_grants_total{how="immediate"}`.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap_or_else(|e| panic!("{series} {v}: {e}")))
}

/// [`sample`], which must be there.
pub fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}
