//! The benchmark: this server side by side with its peers, in one run, on loopback.
//!
//! ```text
//! cargo bench --features etcd --bench load
//! ```
//!
//! (any target dir works, e.g. `CARGO_TARGET_DIR=../target-bench`; the results write it as
//! `target`). It starts every
//! server itself, each on free 127.0.0.1 ports, a fresh process per measurement, with its data
//! in a fresh temporary directory, and stops it afterwards:
//!
//! - **tcpnetlock**: the binary `cargo bench` builds (`TCPNETLOCK_BIN` overrides it);
//! - **tcpnetlock 0.1.8**, the Python original: a venv at `<target dir>/bench-venv`, made on
//!   first use with `pip install tcpnetlock==0.1.8`;
//! - **Redis** (`redis-server` on PATH, apt package redis-server): `SET key value NX PX ms`
//!   takes a lock, `DEL key` releases it; the bench speaks RESP itself;
//! - **etcd** (`etcd` and `etcdctl` on PATH, apt packages etcd-server and etcd-client), for
//!   `etcdctl lock`.
//!
//! A peer that is missing or cannot be installed is skipped, and the report says why.
//!
//! What it measures ([`cycles`], [`handoff`], [`line::held`], [`redis::held`], [`commands`]):
//!
//! 1. lock+release cycles per second on fresh connections from 1, 4 and 16 client threads,
//!    every cycle a new name, plus 4 threads fighting over one name; with the server's and the
//!    clients' CPU time per cycle: tcpnetlock, 0.1.8, Redis;
//! 2. hand-off latency from a release to the queued waiter's grant: in one process on the
//!    sockets (tcpnetlock), and between two lock processes (`tcpnetlock lock`, `etcdctl lock`);
//! 3. `tcpnetlock do -- true` against `flock FILE true`, the static musl build, 0.1.8's
//!    `tcpnetlock_do -- true` and `etcdctl lock NAME true`, whole processes, with hyperfine;
//! 4. resident memory per held lock with 15,000 held (0.1.8 included; for Redis, per key of
//!    15,000 SET NX keys, as a reference), idle memory, and the latency of a new lock meanwhile;
//! 5. a neighbour's lock latency while 8 clients read a 9,000-lock `.locks` and while 4 churn a
//!    9,000-holder semaphore ([`neighbours`]), against this build and, with
//!    `TCPNETLOCK_BENCH_BASELINE_BIN`, an older binary side by side;
//! 6. the wait of lock requests while a server holding 1,000 locks hands them over to its next
//!    process (SIGUSR2, re-exec), five times ([`handover`]).
//! 7. cluster mode ([`cluster`], only when built with `--features etcd`: the servers need it):
//!    cycles/s through two members on a 3-member etcd with etcd's own ceiling for the same writes,
//!    the hand-off to a waiter on the other member, `tcpnetlock do -- true` against `etcdctl lock
//!    NAME true`, and failover times against `etcdctl lock`'s. Without the feature, `cargo bench
//!    --bench load` runs the rest and says the cluster part was not built.
//!
//! It prints the machine, the command, the tables and one verdict per target, and writes them
//! into docs/BENCHMARKS.md between the `results:begin` and `results:end` markers. A missed
//! target is reported, never a failure: the bench exits 0 unless it cannot start tcpnetlock.
//!
//! Knobs (environment): `TCPNETLOCK_BENCH_SECS` (length of the 4-thread cycle run, default 5;
//! the other cycle runs take 60% of it), `TCPNETLOCK_BENCH_HOLDERS` (default 15000),
//! `TCPNETLOCK_BENCH_RUNS` (runs of each fast command, default 500), `TCPNETLOCK_BENCH_PYTHON=0`,
//! `_REDIS=0`, `_ETCD=0`, `_MUSL=0` skip a peer,
//! `TCPNETLOCK_BENCH_ONLY=cycles,handoff,commands,held,neighbours,handover,cluster` runs only
//! those parts (and leaves docs/BENCHMARKS.md alone, except that `neighbours` or `cluster` run
//! alone replaces its own section there), `TCPNETLOCK_BENCH_DOC=0` leaves docs/BENCHMARKS.md alone (the report is printed
//! anyway), `TCPNETLOCK_BENCH_BASELINE_BIN=PATH` measures the `neighbours` part against that
//! server binary too. A full run takes about 2.5 minutes on 2 CPUs, about 4 when 0.1.8 stops
//! answering before it has all the holders (it waits out a 60 s limit, then its latency probe
//! times out); the baseline adds about 25 s.
//!
//! Under `cargo test --all-targets` (no `--bench` argument) it only says how to run it.

#[cfg(feature = "etcd")]
mod cluster;
mod commands;
mod common;
mod cycles;
mod etcd;
mod handoff;
mod handover;
mod line;
mod neighbours;
mod net;
mod redis;

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use commands::{Candidate, Timing};
use common::{
    Held, PY_VERSION, Samples, Server, cpu_busy_pct, loadavg, machine_info, md_table, mib, on_path,
    pass, raise_fd_limit, target_dir, thousands, utc_now,
};
use cycles::{CycleFn, Cycles};
use etcd::Etcd;
use line::LineServer;

/// Issue 6's targets for cycles/s, at 1, 4 and 16 client threads.
const VS_REDIS: f64 = 1.2;
const VS_ORIGINAL: f64 = 5.0;
const RSS_PER_LOCK_KIB: f64 = 16.0;
const LATENCY_HELD_MS: f64 = 50.0;
const HANDOFF_P50_US: f64 = 200.0;
const HANDOFF_P99_US: f64 = 1000.0;
const DOC_BEGIN: &str = "<!-- results:begin -->";
const DOC_END: &str = "<!-- results:end -->";
/// The neighbours section's own markers inside the results, so that it can be run alone.
const NEIGHBOURS_BEGIN: &str = "<!-- neighbours:begin -->";
const NEIGHBOURS_END: &str = "<!-- neighbours:end -->";
/// The cluster section's markers, so that it can be run alone too.
const CLUSTER_BEGIN: &str = "<!-- cluster:begin -->";
const CLUSTER_END: &str = "<!-- cluster:end -->";

struct Settings {
    main_secs: f64,
    holders: usize,
    runs: usize,
    python: bool,
    redis: bool,
    etcd: bool,
    musl: bool,
    doc: bool,
    /// `TCPNETLOCK_BENCH_ONLY`: the parts to run (all when unset).
    only: Option<Vec<String>>,
    /// `TCPNETLOCK_BENCH_BASELINE_BIN`: an older server binary for the neighbours part.
    baseline_bin: Option<PathBuf>,
}

impl Settings {
    fn from_env() -> Settings {
        let num = |key: &str| {
            env::var(key)
                .ok()
                .and_then(|v| v.trim().parse::<f64>().ok())
        };
        let on = |key: &str| env::var(key).map_or(true, |v| v != "0");
        Settings {
            main_secs: num("TCPNETLOCK_BENCH_SECS")
                .filter(|s| *s > 0.0)
                .unwrap_or(5.0),
            holders: num("TCPNETLOCK_BENCH_HOLDERS")
                .filter(|n| *n >= 1.0)
                .map_or(15_000, |n| n as usize),
            runs: num("TCPNETLOCK_BENCH_RUNS")
                .filter(|n| *n >= 10.0)
                .map_or(500, |n| n as usize),
            python: on("TCPNETLOCK_BENCH_PYTHON"),
            redis: on("TCPNETLOCK_BENCH_REDIS"),
            etcd: on("TCPNETLOCK_BENCH_ETCD"),
            musl: on("TCPNETLOCK_BENCH_MUSL"),
            doc: on("TCPNETLOCK_BENCH_DOC"),
            only: env::var("TCPNETLOCK_BENCH_ONLY")
                .ok()
                .map(|v| v.split(',').map(|p| p.trim().to_owned()).collect()),
            baseline_bin: env::var_os("TCPNETLOCK_BENCH_BASELINE_BIN")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
        }
    }

    /// Whether part `name` (cycles, handoff, commands, held, neighbours, handover) runs.
    fn part(&self, name: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|parts| parts.iter().any(|p| p == name))
    }
}

/// A peer the bench could not run: why.
type Skip = String;

fn skip_unless<T>(
    enabled: bool,
    knob: &str,
    find: impl FnOnce() -> Result<T, Skip>,
) -> Result<T, Skip> {
    if enabled {
        find()
    } else {
        Err(format!("skipped ({knob}=0)"))
    }
}

/// What the bench found and ran, each peer Err(why) when skipped.
struct Peers {
    rust_bin: PathBuf,
    python: Result<(PathBuf, String), Skip>,
    redis: Result<PathBuf, Skip>,
    etcd: Result<Etcd, Skip>,
    musl: Result<PathBuf, Skip>,
}

/// One server's cycle runs and held locks.
#[derive(Default)]
struct ServerRuns {
    cycles: Vec<(&'static str, Cycles)>,
    held: Option<Held>,
    problems: Vec<String>,
}

struct Results {
    rust: ServerRuns,
    python: Option<ServerRuns>,
    redis: Option<ServerRuns>,
    handoff: Option<Samples>,
    handoff_cli: Option<Samples>,
    handoff_etcd: Result<Samples, Skip>,
    commands: Result<(Vec<Candidate>, Vec<Timing>), String>,
    /// Commands not timed: why.
    command_notes: Vec<String>,
    /// Each binary measured, and the holders per server.
    neighbours: Option<(Vec<neighbours::Measured>, usize)>,
    handover: Option<handover::Handover>,
    /// The cluster part's section (it renders its own), when it was asked for.
    cluster: Option<ClusterPart>,
    problems: Vec<String>,
}

/// What the cluster part measured, or why it did not run.
#[cfg(feature = "etcd")]
type ClusterPart = Result<cluster::Report, String>;
#[cfg(not(feature = "etcd"))]
type ClusterPart = Result<std::convert::Infallible, String>;

fn cluster_section(part: &ClusterPart, header: Option<&str>) -> String {
    #[cfg(feature = "etcd")]
    {
        cluster::section(part, header)
    }
    #[cfg(not(feature = "etcd"))]
    {
        let _ = header;
        match part {
            Err(why) => {
                format!("\n### Cluster mode: two servers on one etcd\n\nNot measured: {why}\n")
            }
            Ok(never) => match *never {},
        }
    }
}

fn main() {
    if !env::args().any(|a| a == "--bench") {
        println!("load: a benchmark; run it with `cargo bench --bench load` (skipped)");
        return;
    }
    let started = Instant::now();
    let busy_pct = cpu_busy_pct(Duration::from_secs(1));
    let load_start = format!(
        "{} (load average), CPUs {} busy over the second before",
        loadavg(),
        busy_pct.map_or("?".into(), |p| format!("{p:.0}%"))
    );
    let busy = busy_pct.is_some_and(|p| p > 20.0);
    if busy {
        eprintln!(
            "bench: warning: {load_start}: something else is using this machine and the \
             numbers will suffer"
        );
    }
    let date = utc_now();
    raise_fd_limit();
    let s = Settings::from_env();

    let rust_bin = match rust_server_bin() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("bench: cannot find the Rust server: {e}");
            std::process::exit(1);
        }
    };
    if let Some(bin) = &s.baseline_bin
        && !bin.is_file()
    {
        eprintln!(
            "bench: TCPNETLOCK_BENCH_BASELINE_BIN={} is not a file (give the path of a built \
             tcpnetlock binary, e.g. another checkout's target/release/tcpnetlock)",
            bin.display()
        );
        std::process::exit(1);
    }
    // Everything that installs or compiles happens here, before anything is timed.
    let peers = Peers {
        python: skip_unless(s.python, "TCPNETLOCK_BENCH_PYTHON", common::python_venv),
        redis: skip_unless(s.redis, "TCPNETLOCK_BENCH_REDIS", || {
            on_path("redis-server", "redis-server")
        }),
        etcd: skip_unless(s.etcd, "TCPNETLOCK_BENCH_ETCD", Etcd::find),
        musl: skip_unless(s.musl, "TCPNETLOCK_BENCH_MUSL", commands::musl_binary),
        rust_bin,
    };
    for (peer, skip) in [
        ("tcpnetlock 0.1.8", peers.python.as_ref().err()),
        ("Redis", peers.redis.as_ref().err()),
        ("etcd", peers.etcd.as_ref().err()),
        ("static musl build", peers.musl.as_ref().err()),
    ] {
        if let Some(why) = skip {
            eprintln!("bench: {peer} not measured: {why}");
        }
    }
    let results = run(&peers, &s);
    let report = report(&peers, &s, &results, &date, &load_start, busy, started);
    print!("{report}");
    // A partial run must not replace the full results; the neighbours part alone replaces
    // its own section, which says how it was run.
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/BENCHMARKS.md");
    let written = if !s.doc {
        None
    } else if s.only.is_none() {
        Some(write_doc(&doc, &report))
    } else if s.only.as_deref() == Some(&["neighbours".to_owned()][..]) {
        results.neighbours.as_ref().map(|(measured, holders)| {
            let header = run_header(&date, &load_start, busy, started);
            let section = neighbours::section(measured, *holders, Some(&header));
            write_section_doc(&doc, &section, NEIGHBOURS_BEGIN, NEIGHBOURS_END)
        })
    } else if s.only.as_deref() == Some(&["cluster".to_owned()][..]) {
        results.cluster.as_ref().map(|part| {
            let header = run_header(&date, &load_start, busy, started);
            let section = cluster_section(part, Some(&header));
            write_section_doc(&doc, &section, CLUSTER_BEGIN, CLUSTER_END)
        })
    } else {
        None
    };
    match written {
        Some(Ok(())) => eprintln!("bench: results written to {}", doc.display()),
        Some(Err(e)) => eprintln!("bench: cannot write {}: {e}", doc.display()),
        None => {}
    }
}

fn rust_server_bin() -> Result<PathBuf, String> {
    if let Some(bin) = env::var_os("TCPNETLOCK_BIN") {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!("TCPNETLOCK_BIN={} is not a file", bin.display()))
        };
    }
    let built = PathBuf::from(env!("CARGO_BIN_EXE_tcpnetlock"));
    if built.is_file() {
        return Ok(built);
    }
    // The bench binary run by hand after a `cargo clean`.
    let target = target_dir();
    eprintln!(
        "bench: {} missing; running cargo build --release",
        built.display()
    );
    let status = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "--release", "--bin", "tcpnetlock"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    let bin = target.join("release").join("tcpnetlock");
    if status.success() && bin.is_file() {
        Ok(bin)
    } else {
        Err(format!("cargo build --release failed ({status})"))
    }
}

// ---------------------------------------------------------------------------------------------
// Running

fn run(peers: &Peers, s: &Settings) -> Results {
    let rust = LineServer::Rust(peers.rust_bin.clone());
    let python = peers
        .python
        .as_ref()
        .ok()
        .map(|(venv, _)| LineServer::Python(venv.clone()));
    let mut problems = Vec::new();

    // 1. Cycles: one fresh process of each server, all started first, taking turns.
    let mut rust_runs = ServerRuns::default();
    let mut py_runs = python.as_ref().map(|_| ServerRuns::default());
    let mut redis_runs = peers.redis.as_ref().ok().map(|_| ServerRuns::default());
    if s.part("cycles") {
        let mut entrants: Vec<(&str, CycleFn, Result<Server, String>, &mut ServerRuns)> =
            vec![("tcpnetlock", line::cycle, rust.start(), &mut rust_runs)];
        if let (Some(p), Some(runs)) = (python.as_ref(), py_runs.as_mut()) {
            entrants.push(("tcpnetlock 0.1.8", line::cycle, p.start(), runs));
        }
        if let (Ok(bin), Some(runs)) = (peers.redis.as_ref(), redis_runs.as_mut()) {
            entrants.push(("Redis", redis::cycle, redis::start(bin), runs));
        }
        cycle_runs(entrants, s);
    }

    // 2. Hand-off, fresh servers.
    let (mut handoff, mut handoff_cli) = (None, None);
    let mut handoff_etcd = Err("not run (TCPNETLOCK_BENCH_ONLY)".to_owned());
    if s.part("handoff") {
        handoff = with_server(&rust, &mut problems, "hand-off", |server| {
            eprintln!("bench: tcpnetlock: hand-off on {}", server.addr);
            handoff::in_process(server.addr)
        });
        handoff_cli = with_server(&rust, &mut problems, "hand-off (processes)", |server| {
            eprintln!("bench: tcpnetlock: hand-off between lock processes");
            handoff::between_processes(&handoff::Tool::Tcpnetlock(&peers.rust_bin, server.addr))
        });
        handoff_etcd = peers.etcd.as_ref().map_err(Clone::clone).and_then(|etcd| {
            let server = etcd.start().map_err(|e| format!("etcd: {e}"))?;
            eprintln!("bench: etcd: hand-off between lock processes");
            Ok(handoff::between_processes(&handoff::Tool::Etcdctl(
                etcd,
                server.addr,
            )))
        });
    }

    // 3. Commands under a lock.
    let mut command_notes = Vec::new();
    let commands = if s.part("commands") {
        time_commands(peers, s, &mut command_notes)
    } else {
        Err("not run (TCPNETLOCK_BENCH_ONLY)".into())
    };

    // 4. Held locks, fresh servers; 0.1.8 last, as it may stall with thousands of threads.
    if s.part("held") {
        rust_runs.held = line::held(&rust, s.holders, "tcpnetlock", &mut rust_runs.problems);
        if let (Some(runs), Ok(bin)) = (redis_runs.as_mut(), peers.redis.as_ref()) {
            runs.held = redis::held(bin, s.holders, &mut runs.problems);
        }
        if let (Some(runs), Some(p)) = (py_runs.as_mut(), python.as_ref()) {
            runs.held = line::held(p, s.holders, "tcpnetlock 0.1.8", &mut runs.problems);
        }
    }

    // 5. Neighbours, fresh servers of every binary.
    let neighbours = s.part("neighbours").then(|| {
        let mut binaries = Vec::new();
        if let Some(bin) = &s.baseline_bin {
            binaries.push(neighbours::Binary::new("baseline", bin, false));
        }
        binaries.push(neighbours::Binary::new(
            "this build",
            &peers.rust_bin,
            env::var_os("TCPNETLOCK_BIN").is_none(),
        ));
        neighbours::run(binaries)
    });

    // 6. Hand-overs to the next process, a fresh server.
    let handover = if s.part("handover") {
        match rust.start() {
            Ok(mut server) => {
                eprintln!(
                    "bench: tcpnetlock: hand-overs with {} holders on {}",
                    handover::HOLDERS,
                    server.addr
                );
                Some(handover::run(&mut server))
            }
            Err(e) => {
                problems.push(format!("tcpnetlock, hand-over: {e}"));
                None
            }
        }
    } else {
        None
    };

    // 7. Cluster mode: its own etcd and members.
    let cluster = s.part("cluster").then(|| run_cluster(peers, s));

    Results {
        rust: rust_runs,
        python: py_runs,
        redis: redis_runs,
        handoff,
        handoff_cli,
        handoff_etcd,
        commands,
        command_notes,
        neighbours,
        handover,
        cluster,
        problems,
    }
}

#[cfg(feature = "etcd")]
fn run_cluster(peers: &Peers, s: &Settings) -> ClusterPart {
    let etcd = peers.etcd.as_ref().map_err(Clone::clone)?;
    cluster::run(&peers.rust_bin, etcd, s.main_secs, s.runs)
}

#[cfg(not(feature = "etcd"))]
fn run_cluster(_: &Peers, _: &Settings) -> ClusterPart {
    Err(
        "this bench was built without the etcd feature, which the servers need for cluster mode: \
         cargo bench --features etcd --bench load"
            .into(),
    )
}

/// The cycle runs of every server that started, interleaved (see [`cycles::run_interleaved`]);
/// a server that did not start or died has it noted in its problems.
fn cycle_runs(
    entrants: Vec<(&str, CycleFn, Result<Server, String>, &mut ServerRuns)>,
    s: &Settings,
) {
    let mut running = Vec::new();
    for (label, cycle, server, runs) in entrants {
        match server {
            Err(e) => runs.problems.push(format!("cycles: {e}")),
            Ok(server) => {
                eprintln!("bench: {label}: cycles on {}", server.addr);
                running.push((label, cycle, server, runs));
            }
        }
    }
    let contenders: Vec<_> = running
        .iter()
        .map(|(label, cycle, server, _)| cycles::Contender {
            label,
            server,
            cycle: *cycle,
        })
        .collect();
    let results = cycles::run_interleaved(&contenders, s.main_secs);
    drop(contenders);
    for ((_, _, mut server, runs), cycles) in running.into_iter().zip(results) {
        for (row, r) in &cycles {
            if let Some(e) = &r.first_error {
                runs.problems
                    .push(format!("cycles, {row}: {} errors, first: {e}", r.errors));
            }
        }
        runs.cycles = cycles;
        if !server.alive() {
            runs.problems
                .push(server.failure("died during the cycle runs"));
        }
    }
}

/// `measure` on a fresh tcpnetlock server; None (and a problem) if it cannot start.
fn with_server(
    imp: &LineServer,
    problems: &mut Vec<String>,
    what: &str,
    measure: impl FnOnce(&Server) -> Samples,
) -> Option<Samples> {
    let mut server = imp
        .start()
        .map_err(|e| problems.push(format!("tcpnetlock, {what}: {e}")))
        .ok()?;
    let l = measure(&server);
    if let Some(e) = &l.first_error {
        problems.push(format!(
            "tcpnetlock, {what}: {} errors, first: {e}",
            l.errors
        ));
    }
    if !server.alive() {
        problems.push(server.failure(&format!("died during the {what}")));
    }
    Some(l)
}

fn time_commands(
    peers: &Peers,
    s: &Settings,
    notes: &mut Vec<String>,
) -> Result<(Vec<Candidate>, Vec<Timing>), String> {
    let scratch = target_dir().join("bench-do");
    fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let lock_file = scratch.join("flock.lock");
    fs::write(&lock_file, "").map_err(|e| format!("{}: {e}", lock_file.display()))?;
    let server = LineServer::Rust(peers.rust_bin.clone()).start()?;
    let port = server.addr.port().to_string();
    let do_args = |exe: &Path| -> Vec<String> {
        [&exe.display().to_string(), "do", "--host", "127.0.0.1"]
            .into_iter()
            .chain(["--port", &port, "--lock-name", "bench", "--", "true"])
            .map(String::from)
            .collect()
    };
    let mut candidates = vec![
        Candidate {
            name: "flock FILE true".into(),
            argv: vec![
                "flock".into(),
                lock_file.display().to_string(),
                "true".into(),
            ],
            runs: s.runs,
        },
        Candidate {
            name: "tcpnetlock do -- true".into(),
            argv: do_args(&peers.rust_bin),
            runs: s.runs,
        },
    ];
    match &peers.musl {
        Ok(musl) => candidates.push(Candidate {
            name: "tcpnetlock do -- true (static musl build)".into(),
            argv: do_args(musl),
            runs: s.runs,
        }),
        Err(why) => notes.push(format!("static musl build not measured: {why}")),
    }
    // The slow ones get fewer runs, in one hyperfine invocation of their own.
    let slow_runs = (s.runs / 4).max(10);
    match &peers.python {
        Ok((venv, _)) => {
            let mut argv = do_args(&venv.join("bin").join("tcpnetlock_do"));
            argv.remove(1); // tcpnetlock_do has no `do`
            candidates.push(Candidate {
                name: format!("tcpnetlock_do -- true (Python {PY_VERSION})"),
                argv,
                runs: slow_runs,
            });
        }
        Err(why) => notes.push(format!("tcpnetlock {PY_VERSION} not measured: {why}")),
    }
    let etcd_server = match &peers.etcd {
        Ok(etcd) => match etcd.start() {
            Ok(server) => {
                candidates.push(Candidate {
                    name: "etcdctl lock NAME true".into(),
                    argv: etcd.lock_argv(server.addr, "bench", &["true"]),
                    runs: slow_runs,
                });
                Some(server)
            }
            Err(e) => {
                notes.push(format!("etcdctl lock not measured: etcd: {e}"));
                None
            }
        },
        Err(why) => {
            notes.push(format!("etcdctl lock not measured: {why}"));
            None
        }
    };
    candidates.retain(|c| match commands::check_runs(c) {
        Ok(()) => true,
        Err(e) => {
            notes.push(format!("{} not measured: {e}", c.name));
            false
        }
    });
    eprintln!(
        "bench: commands: {}",
        candidates
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let timings = commands::time(&candidates, &scratch)?;
    drop((server, etcd_server));
    Ok((candidates, timings))
}

// ---------------------------------------------------------------------------------------------
// The report

fn report(
    peers: &Peers,
    s: &Settings,
    r: &Results,
    date: &str,
    load_start: &str,
    busy: bool,
    started: Instant,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "## Results\n");
    let _ = writeln!(
        out,
        "One run of `{}`, {date}, {:.0} s (load average after it: {}).\n",
        shown_command(),
        started.elapsed().as_secs_f64(),
        loadavg()
    );
    let _ = writeln!(out, "Source: {}.\n", source_version());
    let _ = writeln!(
        out,
        "Paths in the cargo target directory are written `target/…`, wherever it was.\n"
    );
    let _ = writeln!(out, "Machine:\n");
    for (k, v) in machine_info(load_start) {
        let _ = writeln!(out, "- {k}: {v}");
    }
    if busy {
        let _ = writeln!(
            out,
            "- **Warning**: the CPUs were busy before the run: another workload shared the \
             machine, so these numbers are not representative."
        );
    }
    out.push_str(&peers_section(peers));
    out.push_str(&cycles_section(r));
    out.push_str(&handoff_section(r));
    out.push_str(&commands_section(r));
    out.push_str(&held_section(r, s.holders));
    if let Some((measured, holders)) = &r.neighbours {
        let _ = write!(
            out,
            "\n{NEIGHBOURS_BEGIN}\n{}{NEIGHBOURS_END}\n",
            neighbours::section(measured, *holders, None)
        );
    }
    out.push_str(&handover_section(r));
    if let Some(part) = &r.cluster {
        let _ = write!(
            out,
            "\n{CLUSTER_BEGIN}\n{}{CLUSTER_END}\n",
            cluster_section(part, None)
        );
    }
    out.push_str(&targets_section(r));
    let problems: Vec<String> = r
        .problems
        .iter()
        .cloned()
        .chain(r.handover.iter().flat_map(|h| {
            let errors = h.all.first_error.as_ref().map(|e| {
                format!(
                    "tcpnetlock, hand-over: {} requests failed, first: {e}",
                    h.all.errors
                )
            });
            h.problems
                .iter()
                .map(|p| format!("tcpnetlock, hand-over: {p}"))
                .chain(errors)
                .collect::<Vec<_>>()
        }))
        .chain(labelled("tcpnetlock", Some(&r.rust)))
        .chain(labelled("tcpnetlock 0.1.8", r.python.as_ref()))
        .chain(labelled("Redis", r.redis.as_ref()))
        .chain(r.handoff_etcd.as_ref().ok().and_then(|l| {
            l.first_error
                .as_ref()
                .map(|e| format!("etcd, hand-off: {} errors, first: {e}", l.errors))
        }))
        .collect();
    if !problems.is_empty() {
        let _ = writeln!(out, "\nProblems seen:\n");
        for p in problems {
            let _ = writeln!(out, "- {p}");
        }
    }
    common::shown(&out)
}

fn labelled<'a>(label: &'a str, runs: Option<&'a ServerRuns>) -> impl Iterator<Item = String> + 'a {
    runs.into_iter()
        .flat_map(move |r| r.problems.iter().map(move |p| format!("{label}: {p}")))
}

/// The commit the measured server was built from, and whether its sources differed from it.
fn source_version() -> String {
    let git = |args: &[&str]| {
        common::command_output(
            Command::new("git")
                .args(args)
                .current_dir(env!("CARGO_MANIFEST_DIR")),
        )
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        None => "not a git checkout".into(),
        Some(head) => match git(&["status", "--porcelain", "--", "src", "Cargo.toml"]) {
            Some(changes) if !changes.is_empty() => {
                format!("commit {head}, with uncommitted changes in src/ or Cargo.toml")
            }
            _ => format!("commit {head}, no uncommitted changes in src/ or Cargo.toml"),
        },
    }
}

fn shown_command() -> String {
    let mut envs = String::new();
    // Not CARGO_TARGET_DIR: it moves the files, not the numbers, and names a directory of the
    // machine the run was made on.
    for key in [
        "TCPNETLOCK_BIN",
        "TCPNETLOCK_BENCH_SECS",
        "TCPNETLOCK_BENCH_HOLDERS",
        "TCPNETLOCK_BENCH_RUNS",
        "TCPNETLOCK_BENCH_PYTHON",
        "TCPNETLOCK_BENCH_REDIS",
        "TCPNETLOCK_BENCH_ETCD",
        "TCPNETLOCK_BENCH_MUSL",
        "TCPNETLOCK_BENCH_ONLY",
        "TCPNETLOCK_BENCH_BASELINE_BIN",
    ] {
        if let Ok(v) = env::var(key) {
            let _ = write!(envs, "{key}={v} ");
        }
    }
    let features = if cfg!(feature = "etcd") {
        "--features etcd "
    } else {
        ""
    };
    format!("{envs}cargo bench {features}--bench load")
}

fn peers_section(peers: &Peers) -> String {
    let mut out = String::from(
        "\nPeers, each started by the bench on 127.0.0.1 (free ports, a fresh process for each \
         measurement; Redis and etcd with their data in a fresh directory on tmpfs) and stopped \
         after it:\n\n",
    );
    let _ = writeln!(
        out,
        "- tcpnetlock: `{}` ({})",
        LineServer::Rust(PathBuf::new()).command_line(),
        peers.rust_bin.display()
    );
    let _ = match &peers.python {
        Ok((venv, note)) => writeln!(
            out,
            "- tcpnetlock {PY_VERSION}: `{}` ({note})",
            LineServer::Python(venv.clone()).command_line()
        ),
        Err(why) => writeln!(out, "- tcpnetlock {PY_VERSION}: not measured: {why}"),
    };
    let _ = match &peers.redis {
        Ok(bin) => writeln!(
            out,
            "- Redis: `{}` ({}); one lock is `SET NAME holder NX PX 30000`, its release `DEL \
             NAME`",
            redis::command_line(),
            redis::version(bin)
        ),
        Err(why) => writeln!(out, "- Redis: not measured: {why}"),
    };
    let _ = match &peers.etcd {
        Ok(etcd) => writeln!(
            out,
            "- etcd: `{}` ({}); the data directory on tmpfs makes its fsync nearly free, \
             etcd's best case",
            Etcd::command_line(),
            etcd.version()
        ),
        Err(why) => writeln!(out, "- etcd: not measured: {why}"),
    };
    let _ = writeln!(
        out,
        "- Clients: the bench process itself, on the same machine, over loopback; the commands \
         are timed by {}",
        commands::hyperfine_version()
            .map_or("an in-Rust loop (hyperfine not installed)".into(), |v| {
                format!("{v} (`-N`, no shell in between)")
            })
    );
    out
}

fn cyc<'a>(r: Option<&'a ServerRuns>, row: &str) -> Option<&'a Cycles> {
    r?.cycles
        .iter()
        .find(|(l, c)| *l == row && c.count() > 0)
        .map(|(_, c)| c)
}

fn rate_cell(c: Option<&Cycles>) -> String {
    match c {
        None => "—".into(),
        Some(c) if c.not_granted > 0 => format!(
            "{} ({:.0}% granted)",
            thousands(c.rate()),
            100.0 * c.granted as f64 / c.count() as f64
        ),
        Some(c) => thousands(c.rate()),
    }
}

/// `a / b` with a verdict against `target` when there is one.
fn ratio_cell(a: Option<&Cycles>, b: Option<&Cycles>, target: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => {
            let x = a.rate() / b.rate();
            match target {
                Some(t) => format!("{x:.2}x {}", pass(x >= t)),
                None => format!("{x:.2}x"),
            }
        }
        _ => "—".into(),
    }
}

fn cycles_section(r: &Results) -> String {
    let (rust, py, redis) = (Some(&r.rust), r.python.as_ref(), r.redis.as_ref());
    let mut out = format!(
        "\n### Lock+release cycles per second, a fresh connection per cycle\n\n\
         tcpnetlock and 0.1.8: connect, `lock,name:N`, `ok`, `release`, `released`, the \
         server's end of file, close. Redis: connect, `SET N holder NX PX 30000`, `+OK`, `DEL N` \
         and `QUIT` in one write, `:1`, `+OK`, the server's end of file, close: two round trips \
         each, and the server closes first in both. Every cycle a new name; \"one name\": all \
         threads race for one name, and a refusal counts as a cycle. The three servers run \
         side by side and take turns: each run is cut into {} slices per server, taken in the \
         order tcpnetlock, 0.1.8, Redis, tcpnetlock, ..., so that the machine's changes of \
         speed fall on all three alike; the numbers are over all slices.\n\n",
        cycles::SLICES
    );
    let rows: Vec<Vec<String>> = cycles::RUNS
        .iter()
        .map(|&(row, _, one_name)| {
            let target = |t| (!one_name).then_some(t);
            vec![
                row.to_owned(),
                rate_cell(cyc(rust, row)),
                rate_cell(cyc(py, row)),
                rate_cell(cyc(redis, row)),
                ratio_cell(cyc(rust, row), cyc(redis, row), target(VS_REDIS)),
                ratio_cell(cyc(rust, row), cyc(py, row), target(VS_ORIGINAL)),
            ]
        })
        .collect();
    out.push_str(&md_table(
        &[
            "clients",
            "tcpnetlock",
            "tcpnetlock 0.1.8",
            "Redis SET NX PX + DEL",
            "tcpnetlock ÷ Redis (target ≥ 1.2x)",
            "tcpnetlock ÷ 0.1.8 (target ≥ 5x)",
        ],
        &rows,
    ));
    out.push_str(
        "\nWhere a cycle's time goes: CPU time per cycle of the server process (all its \
         threads) and of the bench's client threads, from /proc over each run, and the wall \
         time of one cycle as one client thread sees it (threads ÷ cycles/s).\n\n",
    );
    let us = |x: Option<f64>| x.map_or("—".into(), |x| format!("{x:.0} µs"));
    let times = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if a > 0.0 => format!("{:.1}x", b / a),
        _ => "—".into(),
    };
    let mut rows = Vec::new();
    let wall = |c: &Cycles| Some(c.threads as f64 * 1e6 / c.rate());
    for (what, f) in [
        (
            "server CPU",
            Cycles::server_us as fn(&Cycles) -> Option<f64>,
        ),
        ("client CPU", Cycles::client_us),
        ("wall time of a cycle", wall),
    ] {
        for &(row, _, _) in &cycles::RUNS {
            let [a, b, c] = [rust, py, redis].map(|p| cyc(p, row).and_then(f));
            rows.push(vec![
                format!("{what}, {row}"),
                us(a),
                us(b),
                us(c),
                times(a, b),
                times(a, c),
            ]);
        }
    }
    out.push_str(&md_table(
        &[
            "per cycle",
            "tcpnetlock",
            "tcpnetlock 0.1.8",
            "Redis",
            "0.1.8 ÷ tcpnetlock",
            "Redis ÷ tcpnetlock",
        ],
        &rows,
    ));
    out
}

fn handoff_section(r: &Results) -> String {
    let mut out = format!(
        "\n### Hand-off: a release, and the queued waiter has the lock\n\n\
         In one process: a holder connection and a waiter connection queued with `wait:10`; \
         once `.stats` shows the waiter queued and its thread asleep in read() (and 1 ms more), \
         the clock runs from the holder writing `release` to the waiter having read `ok`. \
         Between processes, the same for both tools: a holder process has printed its grant, a \
         waiter process of the same tool is queued behind it (the server shows its request) and \
         {} ms have passed (etcd delivers events late to a watch younger than 100 ms, see \
         benches/load/handoff.rs); the clock runs from the bench sending SIGTERM to the holder \
         (both tools release on SIGTERM) to the bench having read the waiter's grant line from \
         its stdout pipe. Each round uses a new name.\n\n",
        handoff::CLI_SETTLE.as_millis()
    );
    let cell = |l: Option<&Samples>| l.map_or("—".into(), Samples::us_cell);
    let n = |l: Option<&Samples>| l.map_or("—".into(), |l| l.secs.len().to_string());
    let etcd = r.handoff_etcd.as_ref();
    let mut rows = vec![
        vec![
            "tcpnetlock, in one process: write `release` → read `ok`".into(),
            cell(r.handoff.as_ref()),
            n(r.handoff.as_ref()),
        ],
        vec![
            format!(
                "tcpnetlock, between processes: {}",
                "`tcpnetlock lock NAME` → `tcpnetlock lock NAME --wait 10`"
            ),
            cell(r.handoff_cli.as_ref()),
            n(r.handoff_cli.as_ref()),
        ],
    ];
    rows.push(match etcd {
        Ok(l) => vec![
            "etcd, between processes: `etcdctl lock NAME` → `etcdctl lock NAME`".into(),
            cell(Some(l)),
            n(Some(l)),
        ],
        Err(why) => vec![
            "etcd, between processes".into(),
            format!("not measured: {why}"),
            "—".into(),
        ],
    });
    rows.push(vec![
        "tcpnetlock 0.1.8".into(),
        "n/a: no waiting; its `tcpnetlock_do --retry` asks again every `--retry-wait` seconds \
         (10 s by default)"
            .into(),
        "—".into(),
    ]);
    rows.push(vec![
        "Redis SET NX".into(),
        "n/a: no queue; a waiting client polls with SET NX at an interval of its choosing".into(),
        "—".into(),
    ]);
    out.push_str(&md_table(&["hand-off", "p50 / p99 / max", "rounds"], &rows));
    out
}

fn ms(secs: f64) -> String {
    format!("{:.2} ms", secs * 1000.0)
}

fn commands_section(r: &Results) -> String {
    let mut out = String::from(
        "\n### A command under a lock: whole processes, start to exit\n\n\
         Each tool takes a lock, runs `true`, releases it and exits: `flock` on a file, \
         `tcpnetlock do` and 0.1.8's `tcpnetlock_do` against a fresh tcpnetlock server (lock \
         `bench`), `etcdctl lock` against the fresh etcd. The slow ones get a quarter of the \
         runs.\n\n",
    );
    let (candidates, timings) = match &r.commands {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(out, "Not measured: {e}");
            return out;
        }
    };
    let Some(flock) = candidates
        .iter()
        .zip(timings)
        .find(|(c, _)| c.name.starts_with("flock"))
        .map(|(_, t)| t)
    else {
        let _ = writeln!(out, "Not measured: flock could not be run");
        return out;
    };
    let rows: Vec<Vec<String>> = candidates
        .iter()
        .zip(timings)
        .map(|(c, t)| {
            vec![
                c.name.clone(),
                t.runs.to_string(),
                ms(t.mean),
                ms(t.stddev),
                ms(t.median),
                ms(t.min),
                format!("{:.2}x", t.mean / flock.mean),
            ]
        })
        .collect();
    out.push_str(&md_table(
        &[
            "command",
            "runs",
            "mean",
            "σ",
            "median",
            "min",
            "mean ÷ flock",
        ],
        &rows,
    ));
    let _ = writeln!(out, "\nCommand lines:\n");
    for c in candidates {
        let _ = writeln!(out, "- {}: `{}`", c.name, commands::shell_words(&c.argv));
    }
    for n in &r.command_notes {
        let _ = writeln!(out, "- {n}");
    }
    out
}

fn held_section(r: &Results, wanted: usize) -> String {
    let mut out = format!(
        "\n### {} locks held\n\n\
         A fresh server, warmed up with 200 cycles, its VmRSS read (idle); then {} connections \
         each take a distinct lock (from {} threads, one connection at a time, {} per source \
         address from 127.1.0.1 on), and VmRSS is read again: (held − idle) ÷ locks. Redis, as a \
         reference: {} SET NX PX keys over one pipelined connection, per **key**, since a Redis \
         lock holds no connection. Then {} new locks, connect → grant, 5 ms apart, from {}.\n\n",
        thousands(wanted as f64),
        thousands(wanted as f64),
        line::OPENERS,
        line::PER_SOURCE,
        thousands(wanted as f64),
        line::LATENCY_SAMPLES,
        line::LATENCY_SOURCE
    );
    fn held(p: Option<&ServerRuns>) -> Option<&Held> {
        p?.held.as_ref()
    }
    let (a, b, c) = (
        held(Some(&r.rust)),
        held(r.python.as_ref()),
        held(r.redis.as_ref()),
    );
    let row = |what: &str, f: &dyn Fn(&Held) -> String| -> Vec<String> {
        std::iter::once(what.to_owned())
            .chain([a, b, c].map(|h| h.map_or("—".into(), f)))
            .collect()
    };
    let mut opened = row("locks held", &|h| opened_cell(h, "connections"));
    opened[3] = c.map_or("—".into(), |h| opened_cell(h, "keys"));
    let rows = vec![
        opened,
        row("RSS idle, after warm-up", &|h| mib(h.idle.rss_kib)),
        row("RSS with the locks held", &|h| mib(h.loaded.rss_kib)),
        row("**RSS per held lock** (Redis: per key)", &|h| {
            h.kib_per_lock()
                .map_or("—".into(), |k| format!("{k:.1} KiB"))
        }),
        row("threads, idle → held", &|h| {
            format!("{} → {}", h.idle.threads, h.loaded.threads)
        }),
        row("server CPU while the locks sit idle", &|h| {
            h.cpu_pct
                .map_or("?".into(), |p| format!("{p:.0}% of a core"))
        }),
        row(
            "new lock (connect → grant) meanwhile, p50 / p99 / max",
            &|h| h.latency.ms_cell(),
        ),
    ];
    out.push_str(&md_table(
        &[
            "measure",
            "tcpnetlock",
            "tcpnetlock 0.1.8",
            "Redis (keys, not connections)",
        ],
        &rows,
    ));
    out
}

fn opened_cell(h: &Held, what: &str) -> String {
    let mut s = format!(
        "{} {what} in {:.2} s",
        thousands(h.held as f64),
        h.open_secs
    );
    if h.held < h.wanted {
        let why = if h.timed_out {
            format!("stopped at the {} s limit", line::HOLD_DEADLINE.as_secs())
        } else {
            format!("{} errors", h.errors)
        };
        let _ = write!(s, " — of {} wanted, {why}", thousands(h.wanted as f64));
    }
    s
}

fn handover_section(r: &Results) -> String {
    let Some(h) = &r.handover else {
        return String::new();
    };
    let mut out = format!(
        "\n### Hand-over to the next process\n\n{} locks held on their own connections; lock \
         requests on fresh connections due one a millisecond (50 client threads, each request \
         timed from when it was due); SIGUSR2 ({} times, 1 s apart): the server re-executes its \
         file and the new program takes every connection over. \"Met the hand-over\": waiting \
         at some point of the longest time without any answer around a signal.\n\n",
        thousands(handover::HOLDERS as f64),
        h.gaps.len()
    );
    let gaps: Vec<String> = h.gaps.iter().map(|g| format!("{:.0}", g * 1e3)).collect();
    out.push_str(&md_table(
        &["requests", "count", "p50 / p99 / max wait"],
        &[
            vec![
                "met the hand-over".into(),
                h.during.secs.len().to_string(),
                h.during.ms_cell(),
            ],
            vec![
                "all, the hand-overs included".into(),
                h.all.secs.len().to_string(),
                h.all.ms_cell(),
            ],
        ],
    ));
    let _ = writeln!(
        out,
        "\nLongest time without an answer, per hand-over: {} ms. Holders still holding on \
         their connections afterwards: {} of {}; requests failed: {}.",
        gaps.join(", "),
        thousands(h.holders_kept as f64),
        thousands(handover::HOLDERS as f64),
        h.all.errors
    );
    out
}

fn targets_section(r: &Results) -> String {
    let mut v = Vec::new();
    for &(row, _, one_name) in &cycles::RUNS {
        if one_name {
            continue;
        }
        let ours = cyc(Some(&r.rust), row);
        for (peer, runs, target) in [
            ("Redis", r.redis.as_ref(), VS_REDIS),
            ("0.1.8", r.python.as_ref(), VS_ORIGINAL),
        ] {
            v.push(match (ours, cyc(runs, row)) {
                (Some(a), Some(b)) => format!(
                    "{}: cycles/s ≥ {target}x {peer} at {row}: {:.2}x ({} vs {})",
                    pass(a.rate() >= target * b.rate()),
                    a.rate() / b.rate(),
                    thousands(a.rate()),
                    thousands(b.rate())
                ),
                _ => format!("NOT MEASURED: cycles/s ≥ {target}x {peer} at {row}"),
            });
        }
    }
    let held = r.rust.held.as_ref();
    v.push(match held.and_then(|h| Some((h, h.kib_per_lock()?))) {
        Some((h, k)) => format!(
            "{}: ≤ {RSS_PER_LOCK_KIB:.0} KiB RSS per held lock: {k:.1} KiB ({} locks)",
            pass(k <= RSS_PER_LOCK_KIB && h.held == h.wanted),
            thousands(h.held as f64)
        ),
        None => "MISSED: RSS per held lock not measured (see the problems)".into(),
    });
    v.push(
        match held.and_then(|h| Some((h, h.latency.pct(99.0)?, h.latency.pct(100.0)?))) {
            Some((h, p99, max)) => format!(
                "{}: a new lock answered in < {LATENCY_HELD_MS:.0} ms while {} are held: p99 \
                 {:.2} ms, max {:.2} ms over {} samples",
                pass(p99 * 1e3 < LATENCY_HELD_MS),
                thousands(h.held as f64),
                p99 * 1e3,
                max * 1e3,
                h.latency.secs.len()
            ),
            None => "MISSED: latency while held not measured (see the problems)".into(),
        },
    );
    v.push(
        match r
            .handoff
            .as_ref()
            .and_then(|l| Some((l.pct(50.0)? * 1e6, l.pct(99.0)? * 1e6)))
        {
            Some((p50, p99)) => format!(
                "{}: hand-off in one process p50 ≤ {HANDOFF_P50_US:.0} µs and p99 ≤ {:.0} ms: \
                 p50 {p50:.0} µs, p99 {p99:.0} µs",
                pass(p50 <= HANDOFF_P50_US && p99 <= HANDOFF_P99_US),
                HANDOFF_P99_US / 1e3
            ),
            None => "MISSED: hand-off not measured (see the problems)".into(),
        },
    );
    if let Ok((candidates, timings)) = &r.commands {
        let mean = |name: &str| {
            candidates
                .iter()
                .zip(timings)
                .find(|(c, _)| c.name == name)
                .map(|(_, t)| t.mean)
        };
        v.push(
            match (mean("tcpnetlock do -- true"), mean("flock FILE true")) {
                (Some(a), Some(b)) => format!(
                    "{}: `tcpnetlock do -- true` ≤ {}x `flock FILE true` (mean): {:.2}x",
                    pass(a <= commands::TARGET_RATIO * b),
                    commands::TARGET_RATIO,
                    a / b
                ),
                _ => "NOT MEASURED: `tcpnetlock do` against flock".into(),
            },
        );
    }
    if let Some(h) = &r.handover {
        v.push(match (h.during.pct(99.0), h.during.pct(100.0)) {
            (Some(p99), Some(max)) => format!(
                "{}: a lock request waits ≤ {:.0} ms (p99) during a hand-over with {} holders \
                 (SIGUSR2): p99 {:.0} ms, max {:.0} ms over {} requests in {} hand-overs; {} of \
                 {} holders kept",
                pass(
                    p99 * 1e3 <= handover::TARGET_P99_MS
                        && h.holders_kept == handover::HOLDERS
                        && h.all.errors == 0
                ),
                handover::TARGET_P99_MS,
                thousands(handover::HOLDERS as f64),
                p99 * 1e3,
                max * 1e3,
                h.during.secs.len(),
                h.gaps.len(),
                thousands(h.holders_kept as f64),
                thousands(handover::HOLDERS as f64)
            ),
            _ => "MISSED: the hand-over's pause not measured (see the problems)".into(),
        });
    }
    let mut out = String::from("\n### Targets\n\n");
    for line in v {
        let _ = writeln!(out, "- {line}");
    }
    out
}

/// How and where the neighbours part ran, for its section when it ran alone.
fn run_header(date: &str, load_start: &str, busy: bool, started: Instant) -> String {
    let mut out = format!(
        "Run alone: `{}`, {date}, {:.0} s (load average after it: {}). Machine:",
        shown_command(),
        started.elapsed().as_secs_f64(),
        loadavg()
    );
    let facts: Vec<String> = machine_info(load_start)
        .into_iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let _ = writeln!(out, " {}.", facts.join("; "));
    if busy {
        out.push_str(
            "**Warning**: the CPUs were busy before the run: another workload shared the \
             machine, so these numbers are not representative.\n",
        );
    }
    out
}

/// Replaces the section of `doc` between `begin` and `end` with `section`; without one, puts it
/// at the end of the results.
fn write_section_doc(doc: &Path, section: &str, begin: &str, end: &str) -> std::io::Result<()> {
    let text = fs::read_to_string(doc)?;
    let block = format!("{begin}\n{}{end}", section.trim_start());
    let new = match (text.find(begin), text.find(end)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{block}{}", &text[..b], &text[e + end.len()..])
        }
        _ => match text.find(DOC_END) {
            Some(e) => format!("{}{block}\n\n{}", &text[..e], &text[e..]),
            None => format!("{}\n\n{block}\n", text.trim_end()),
        },
    };
    fs::write(doc, new)
}

/// Replaces what is between the markers in `doc` with `report`; appends both if there are none.
fn write_doc(doc: &Path, report: &str) -> std::io::Result<()> {
    let text = fs::read_to_string(doc)?;
    let block = format!(
        "{DOC_BEGIN}\n<!-- Written by `cargo bench --bench load` (benches/load/main.rs); the next run \
         replaces everything down to the end marker. -->\n\n{report}\n{DOC_END}"
    );
    let new = match (text.find(DOC_BEGIN), text.find(DOC_END)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{block}{}", &text[..b], &text[e + DOC_END.len()..])
        }
        _ => format!("{}\n{block}\n", text.trim_end()),
    };
    fs::write(doc, new)
}
