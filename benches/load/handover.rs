//! The pause of a hand-over (issue 14): how long a lock request waits while the server hands
//! its connections to the next process. Without systemd: SIGUSR2, the server re-executes its own
//! file (the path `systemctl reload` takes too; `systemctl restart` adds systemd stopping and
//! starting the sandboxed unit, measured by tests/systemd-e2e).
//!
//! One server holds [`HOLDERS`] locks, each on its own connection. [`PROBERS`] client threads
//! send lock requests on fresh connections on a fixed schedule, one request every millisecond in
//! all, whether or not earlier ones were answered; a request's wait runs from the moment it was
//! due (not when a thread stalled behind an earlier one got to send it), so a pause counts for
//! every request that fell into it. The server is signalled [`ROUNDS`] times, [`GAP`] apart.
//!
//! Reported, over all rounds: the waits of the requests that met a hand-over (waiting at some
//! point of the longest time without any answer around the signal), p50, p99 and max, against
//! the target p99 ≤ 100 ms; that time without answers; the waits of all requests as a
//! reference; and whether every holder still held its lock, on the same connection, at the end.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{Samples, Server};
use crate::net::Client;

pub const HOLDERS: usize = 1000;
pub const TARGET_P99_MS: f64 = 100.0;
const PROBERS: usize = 50;
/// Requests due per prober: one every PROBERS ms, so one a millisecond in all.
const EVERY: Duration = Duration::from_millis(PROBERS as u64);
const ROUNDS: usize = 5;
/// Between signals, and before the first.
const GAP: Duration = Duration::from_millis(1000);

/// One request: when it was due and when its grant was read, from the start of the run.
struct Probe {
    due: Duration,
    answered: Option<Duration>,
}

pub struct Handover {
    /// Waits of the requests that met a hand-over.
    pub during: Samples,
    /// Waits of every request.
    pub all: Samples,
    /// The longest time without an answer to any request, per round (s).
    pub gaps: Vec<f64>,
    pub holders_kept: usize,
    pub problems: Vec<String>,
}

pub fn run(server: &mut Server) -> Handover {
    let addr = server.addr;
    let mut problems = Vec::new();
    let mut holders = Vec::with_capacity(HOLDERS);
    for i in 0..HOLDERS {
        match Client::connect(addr, None).and_then(|mut c| {
            c.send(format!("lock,name:held-{i}\n").as_bytes())
                .map_err(std::io::Error::other)?;
            c.expect("ok").map_err(std::io::Error::other)?;
            Ok(c)
        }) {
            Ok(c) => holders.push(c),
            Err(e) => {
                problems.push(format!("holder {i}: {e}"));
                break;
            }
        }
    }
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let probes = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(Mutex::new(Samples::default()));
    let threads: Vec<_> = (0..PROBERS)
        .map(|j| {
            let (stop, probes, errors) = (stop.clone(), probes.clone(), errors.clone());
            thread::spawn(move || prober(addr, j, start, &stop, &probes, &errors))
        })
        .collect();
    let mut signals = Vec::new();
    for _ in 0..ROUNDS {
        thread::sleep(GAP);
        signals.push(start.elapsed());
        // SAFETY: kill(2) of the server this bench started.
        unsafe { libc::kill(server.pid().parse().unwrap_or(0), libc::SIGUSR2) };
    }
    thread::sleep(GAP);
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        let _ = t.join();
    }
    if !server.alive() {
        problems.push(server.failure("died during the hand-overs"));
    }
    let mut holders_kept = 0;
    for c in &mut holders {
        if c.send(b".keepalive\n").is_ok() && c.expect("alive").is_ok() {
            holders_kept += 1;
        }
    }
    let probes = std::mem::take(&mut *probes.lock().unwrap());
    let errors = std::mem::take(&mut *errors.lock().unwrap());
    let mut all = Samples {
        errors: errors.errors,
        first_error: errors.first_error,
        ..Samples::default()
    };
    let mut during = Samples::default();
    let mut gaps = Vec::new();
    let mut answers: Vec<Duration> = probes.iter().filter_map(|p| p.answered).collect();
    answers.sort();
    for (i, &signal) in signals.iter().enumerate() {
        // The longest silence around the signal: from the last answer before it ends to the
        // first answer after it.
        let around: Vec<Duration> = answers
            .iter()
            .copied()
            .filter(|&a| a + GAP / 4 >= signal && a <= signal + GAP / 2)
            .collect();
        let Some((from, to)) = around
            .windows(2)
            .map(|w| (w[0], w[1]))
            .max_by_key(|(a, b)| *b - *a)
        else {
            problems.push(format!("round {}: no answers around the signal", i + 1));
            continue;
        };
        gaps.push((to - from).as_secs_f64());
        // Every request waiting at some point of the silence met the hand-over.
        for p in &probes {
            if let Some(a) = p.answered
                && p.due < to
                && a > from
            {
                during.secs.push((a - p.due).as_secs_f64());
            }
        }
    }
    all.secs = probes
        .iter()
        .filter_map(|p| p.answered.map(|a| (a - p.due).as_secs_f64()))
        .collect();
    Handover {
        during,
        all,
        gaps,
        holders_kept,
        problems,
    }
}

/// Prober `j`: a request due every [`EVERY`], offset by j ms, until `stop`.
fn prober(
    addr: SocketAddr,
    j: usize,
    start: Instant,
    stop: &AtomicBool,
    probes: &Mutex<Vec<Probe>>,
    errors: &Mutex<Samples>,
) {
    let mut mine = Vec::new();
    let mut k = 0u32;
    while !stop.load(Ordering::SeqCst) {
        let due = Duration::from_millis(j as u64) + EVERY * k;
        k += 1;
        let now = start.elapsed();
        if due > now {
            thread::sleep(due - now);
        }
        let answered = (|| -> Result<Duration, String> {
            let mut c = Client::connect(addr, None).map_err(|e| format!("connect: {e}"))?;
            c.send(format!("lock,name:probe-{j}-{k}\n").as_bytes())?;
            c.expect("ok")?;
            let at = start.elapsed();
            c.send(b"release\n")?;
            c.expect("released")?;
            c.wait_eof()?;
            Ok(at)
        })();
        match answered {
            Ok(at) => mine.push(Probe {
                due,
                answered: Some(at),
            }),
            Err(e) => {
                mine.push(Probe {
                    due,
                    answered: None,
                });
                let mut errs = errors.lock().unwrap();
                errs.errors += 1;
                errs.first_error.get_or_insert(e);
            }
        }
    }
    probes.lock().unwrap().extend(mine);
}
