//! Lock+release cycles on fresh connections, from N client threads, for any server: the
//! caller passes one cycle (connect, lock, release, close) as a function.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{ProcStatus, Server, cpu_secs};

/// One cycle on a fresh connection: Ok(true) granted and released, Ok(false) not granted.
pub type CycleFn = fn(SocketAddr, &str) -> Result<bool, String>;

/// The cycle runs, in the order [`run_all`] makes them: (label, client threads, one name).
pub const RUNS: [(&str, usize, bool); 4] = [
    ("1 thread", 1, false),
    ("4 threads", 4, false),
    ("16 threads", 16, false),
    ("4 threads, one name", 4, true),
];

#[derive(Default)]
pub struct Cycles {
    /// Client threads.
    pub threads: usize,
    pub granted: u64,
    pub not_granted: u64,
    pub errors: u64,
    pub secs: f64,
    /// CPU seconds the server used during the run.
    pub server_cpu: Option<f64>,
    /// CPU seconds the bench (its client threads) used during the run.
    pub client_cpu: Option<f64>,
    pub first_error: Option<String>,
}

impl Cycles {
    pub fn count(&self) -> u64 {
        self.granted + self.not_granted
    }

    pub fn rate(&self) -> f64 {
        self.count() as f64 / self.secs.max(1e-9)
    }

    /// Server CPU microseconds per cycle.
    pub fn server_us(&self) -> Option<f64> {
        (self.count() > 0).then_some(self.server_cpu? * 1e6 / self.count() as f64)
    }

    /// Client CPU microseconds per cycle.
    pub fn client_us(&self) -> Option<f64> {
        (self.count() > 0).then_some(self.client_cpu? * 1e6 / self.count() as f64)
    }
}

/// The runs of [`RUNS`] against one server process, after a short warm-up: the 4-thread run
/// lasts `main_secs`, the others 60% of it. Returns (label, result) in order.
pub fn run_all(
    server: &Server,
    cycle: CycleFn,
    main_secs: f64,
    label: &str,
) -> Vec<(&'static str, Cycles)> {
    run(server.addr, cycle, 4, 0.5, false, "warm");
    RUNS.iter()
        .enumerate()
        .map(|(i, &(row, threads, one_name))| {
            let secs = if i == 1 { main_secs } else { main_secs * 0.6 };
            let (s0, c0) = (server.cpu_secs(), cpu_secs("self"));
            let mut r = run(
                server.addr,
                cycle,
                threads,
                secs,
                one_name,
                &format!("r{i}"),
            );
            r.server_cpu = server.cpu_secs().zip(s0).map(|(b, a)| b - a);
            r.client_cpu = cpu_secs("self").zip(c0).map(|(b, a)| b - a);
            eprintln!(
                "bench: {label}: {row}: {:.0}/s ({} granted, {} not granted, {} errors)",
                r.rate(),
                r.granted,
                r.not_granted,
                r.errors
            );
            (row, r)
        })
        .collect()
}

/// `threads` clients cycling for `secs`, every cycle a new name, or all on one name.
fn run(
    addr: SocketAddr,
    cycle: CycleFn,
    threads: usize,
    secs: f64,
    one_name: bool,
    tag: &str,
) -> Cycles {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (stop, start) = (Arc::clone(&stop), Arc::clone(&start));
            let tag = tag.to_owned();
            thread::spawn(move || {
                let mut r = Cycles::default();
                let mut name = String::with_capacity(64);
                start.wait();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    name.clear();
                    if one_name {
                        let _ = write!(name, "{tag}-hot");
                    } else {
                        let _ = write!(name, "{tag}-{t}-{n}");
                    }
                    n += 1;
                    match cycle(addr, &name) {
                        Ok(true) => r.granted += 1,
                        Ok(false) => r.not_granted += 1,
                        Err(e) => {
                            r.errors += 1;
                            r.first_error.get_or_insert(e);
                            if r.errors > 100 {
                                break;
                            }
                            thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
                r
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let mut total = Cycles::default();
    for h in handles {
        let r = h.join().expect("client thread");
        total.granted += r.granted;
        total.not_granted += r.not_granted;
        total.errors += r.errors;
        if total.first_error.is_none() {
            total.first_error = r.first_error;
        }
    }
    total.secs = t0.elapsed().as_secs_f64();
    total.threads = threads;
    total
}

/// 200 cycles on `server`, half a second of rest, then its /proc status: the idle baseline for
/// memory, with the allocator and the worker threads warmed up.
pub fn warm_idle(
    server: &mut Server,
    cycle: CycleFn,
    problems: &mut Vec<String>,
) -> Option<ProcStatus> {
    for i in 0..200 {
        if let Err(e) = cycle(server.addr, &format!("w-{i}")) {
            problems.push(format!("warm-up: {e}"));
            break;
        }
    }
    thread::sleep(Duration::from_millis(500));
    let status = server.status();
    if status.is_none() {
        problems.push(server.failure("has no /proc status"));
    }
    status
}
