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

/// The cycle runs, in the order [`run_interleaved`] makes them: (label, client threads, one name).
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

    /// Adds one slice of the same run. A CPU time is unknown once any slice's is.
    fn add(&mut self, slice: Cycles) {
        let first = self.secs == 0.0;
        let sum = |total: Option<f64>, part: Option<f64>| {
            if first {
                part
            } else {
                total.zip(part).map(|(t, p)| t + p)
            }
        };
        self.server_cpu = sum(self.server_cpu, slice.server_cpu);
        self.client_cpu = sum(self.client_cpu, slice.client_cpu);
        self.threads = slice.threads;
        self.granted += slice.granted;
        self.not_granted += slice.not_granted;
        self.errors += slice.errors;
        self.secs += slice.secs;
        if self.first_error.is_none() {
            self.first_error = slice.first_error;
        }
    }
}

/// Slices each run is cut into, per server: the servers take turns slice by slice, so that a
/// change in the machine's speed during the bench (other tenants of a VM, CPU frequency) falls
/// on all of them alike instead of on whichever happened to run then.
pub const SLICES: usize = 3;

/// Pause between two slices: the previous server's connections finish closing.
const BETWEEN_SLICES: Duration = Duration::from_millis(200);

/// One server taking part in the cycle runs.
pub struct Contender<'a> {
    pub label: &'a str,
    pub server: &'a Server,
    pub cycle: CycleFn,
}

/// The runs of [`RUNS`] against every contender, after a short warm-up of each: for each run,
/// [`SLICES`] rounds in which every contender runs one slice in turn. The 4-thread run lasts
/// `main_secs` per contender, the others 60% of it. Returns, per contender, (label, result) in
/// the order of [`RUNS`], each result the sum of its slices.
pub fn run_interleaved(
    contenders: &[Contender],
    main_secs: f64,
) -> Vec<Vec<(&'static str, Cycles)>> {
    for c in contenders {
        run(c.server, c.cycle, 4, 0.5, false, "warm");
    }
    let mut results: Vec<Vec<(&'static str, Cycles)>> = contenders
        .iter()
        .map(|_| {
            RUNS.iter()
                .map(|&(row, ..)| (row, Cycles::default()))
                .collect()
        })
        .collect();
    for (i, &(row, threads, one_name)) in RUNS.iter().enumerate() {
        let secs = if i == 1 { main_secs } else { main_secs * 0.6 } / SLICES as f64;
        for slice in 0..SLICES {
            for (c, result) in contenders.iter().zip(results.iter_mut()) {
                thread::sleep(BETWEEN_SLICES);
                let tag = format!("r{i}s{slice}");
                let r = run(c.server, c.cycle, threads, secs, one_name, &tag);
                eprintln!(
                    "bench: {}: {row}, slice {}/{SLICES}: {:.0}/s ({} granted, {} not granted, \
                     {} errors)",
                    c.label,
                    slice + 1,
                    r.rate(),
                    r.granted,
                    r.not_granted,
                    r.errors
                );
                result[i].1.add(r);
            }
        }
    }
    results
}

/// `threads` clients cycling on `server` for `secs`, every cycle a new name, or all on one
/// name. Counted: the cycles that ended within the `secs`, and the CPU times over them; a cycle
/// still under way then (a client stuck in a connect retry, say) is finished but not counted,
/// so that how long the stragglers take does not stretch the measured time.
fn run(
    server: &Server,
    cycle: CycleFn,
    threads: usize,
    secs: f64,
    one_name: bool,
    tag: &str,
) -> Cycles {
    let addr = server.addr;
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
                while !stop.load(Ordering::Acquire) {
                    name.clear();
                    if one_name {
                        let _ = write!(name, "{tag}-hot");
                    } else {
                        let _ = write!(name, "{tag}-{t}-{n}");
                    }
                    n += 1;
                    let outcome = cycle(addr, &name);
                    if stop.load(Ordering::Acquire) {
                        break; // ended after the measured time
                    }
                    match outcome {
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
    let (s0, c0) = (server.cpu_secs(), cpu_secs("self"));
    let t0 = Instant::now();
    thread::sleep(Duration::from_secs_f64(secs));
    let (s1, c1) = (server.cpu_secs(), cpu_secs("self"));
    stop.store(true, Ordering::Release);
    let mut total = Cycles {
        secs: t0.elapsed().as_secs_f64(),
        threads,
        server_cpu: s1.zip(s0).map(|(b, a)| b - a),
        client_cpu: c1.zip(c0).map(|(b, a)| b - a),
        ..Cycles::default()
    };
    for h in handles {
        let r = h.join().expect("client thread");
        total.granted += r.granted;
        total.not_granted += r.not_granted;
        total.errors += r.errors;
        if total.first_error.is_none() {
            total.first_error = r.first_error;
        }
    }
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
