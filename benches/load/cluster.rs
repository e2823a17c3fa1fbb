//! Cluster mode (issue 13), side by side with `etcdctl lock` on the same etcd: a 3-member etcd on
//! loopback (tests/common/etcd.rs starts it, data on tmpfs) and two `tcpnetlock server --etcd`
//! members on it.
//!
//! 1. Lock+release cycles per second from 16 client threads, half through each member, a fresh
//!    connection and a new name per cycle; and, taking turns with it slice by slice, etcd's own
//!    ceiling for the same writes: the etcd client the members use (src/etcd/, mounted here),
//!    without a tcpnetlock server in between, doing what a member does per cycle (a transaction
//!    that puts the key under a lease and reads the name's first key, then a delete of the key),
//!    from 16 threads over two clients, each with a watch on the prefix as each member has.
//! 2. Hand-off: a holder on one member releases, a waiter queued on the other has the lock.
//! 3. `tcpnetlock do -- true` through a member against `etcdctl lock NAME true` on the same etcd,
//!    whole processes timed by hyperfine.
//! 4. Failover, one waiter each time: a holding `tcpnetlock lock` process killed (-9); a holder's
//!    member killed (-9); and `etcdctl lock`'s own holder killed (-9), which only its session's
//!    ttl frees (10 s by default).
//!
//! Built only with `--features etcd` (the members need it, and so does the etcd client mounted
//! here): `cargo bench --features etcd --bench load`.

#[path = "../../src/etcd/mod.rs"]
#[allow(dead_code, unused_imports)]
mod etcd_client;
#[path = "../../tests/common/etcd.rs"]
mod etcd_cluster;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::commands::{self, Candidate, Timing};
use crate::common::{Ready, Samples, Server, cpu_secs, md_table, pass, thousands};
use crate::cycles::Cycles;
use crate::etcd::Etcd;
use crate::handoff::{LockProcess, Tool};
use crate::line::{self, stats_waiting};
use crate::net::Client;
use etcd_client::{
    DeleteRequest, EtcdClient, EtcdConfig, Op, PutRequest, RangeRequest, SortOrder, SortTarget,
    Txn, WatchRequest,
};
use etcd_cluster::EtcdCluster;

/// Issue 13's targets.
pub const CYCLES_TARGET: f64 = 1000.0;
pub const HANDOFF_P99_MS: f64 = 10.0;
pub const DO_VS_ETCDCTL: f64 = 0.5;
pub const CLIENT_FAILOVER_MS: f64 = 100.0;
/// The members' `--etcd-ttl` (the default).
pub const ETCD_TTL_SECS: f64 = 5.0;

const THREADS: usize = 16;
/// Slices of the cycle and ceiling runs, taken in turns.
const SLICES: usize = 3;
const HANDOFF_ROUNDS: usize = 200;
const CLIENT_FAILOVER_ROUNDS: usize = 20;
const MEMBER_FAILOVER_ROUNDS: usize = 5;
const ETCDCTL_FAILOVER_ROUNDS: usize = 3;
/// Pause between seeing a waiter queued and the release or kill: as in the hand-off between
/// lock processes (benches/load/handoff.rs), for both tools.
const SETTLE: Duration = Duration::from_millis(150);
/// Rounds of the timed commands, taking turns.
const COMMAND_ROUNDS: usize = 5;
const PREFIX: &str = "/bench/";

/// Everything the cluster part measured.
pub struct Report {
    pub setup: Vec<String>,
    pub cycles: Option<Cycles>,
    /// CPU seconds over the cycle runs: members, etcd (all three), the bench.
    pub cycles_cpu: Option<(f64, f64, f64)>,
    pub ceiling: Option<Cycles>,
    pub ceiling_cpu: Option<(f64, f64)>,
    pub handoff: Samples,
    pub commands: Result<(Vec<Candidate>, Vec<Timing>), String>,
    pub failover_client: Samples,
    pub failover_member: Samples,
    pub failover_etcdctl: Samples,
    pub problems: Vec<String>,
}

/// The cluster part, or why it could not run.
pub fn run(bin: &Path, etcd: &Etcd, main_secs: f64, runs: usize) -> Result<Report, String> {
    let cluster = std::panic::catch_unwind(EtcdCluster::start3)
        .map_err(|_| "cannot start a 3-member etcd (see the message above)".to_owned())?;
    let endpoints = cluster.endpoints();
    let mut problems = Vec::new();
    let a = member(bin, &endpoints, "a")?;
    let b = member(bin, &endpoints, "b")?;
    let leader = cluster.wait_leader(Duration::from_secs(30));
    let etcd_pids: Vec<String> = (0..3)
        .filter_map(|i| cluster.pid(i).map(|p| p.to_string()))
        .collect();
    let mut setup = vec![
        format!(
            "etcd: 3 members (`{}`), {}; the leader was e{leader}",
            "etcd --name eN --data-dir /dev/shm/... --listen-client-urls http://127.0.0.1:PORT \
             --initial-cluster e0=...,e1=...,e2=... --initial-cluster-state new",
            etcd.version()
        ),
        format!(
            "members: 2 × `tcpnetlock server --listen 127.0.0.1:0 --log stderr --etcd \
             http://127.0.0.1:P0,http://127.0.0.1:P1,http://127.0.0.1:P2 --etcd-prefix {PREFIX} \
             --etcd-name a|b` (--etcd-ttl 5, the default; {})",
            crate::common::shown(&bin.display().to_string())
        ),
    ];

    // 1. Cycles and etcd's ceiling, slice by slice.
    eprintln!("bench: cluster: cycles through two members, and etcd's ceiling");
    let addrs = [a.addr, b.addr];
    let ceiling_clients = ceiling_clients(&endpoints).map_err(|e| format!("ceiling: {e}"));
    let mut cycles = Cycles::default();
    let mut ceiling = Cycles::default();
    let (mut m_cpu, mut e_cpu, mut c_cpu, mut leader_cpu) = (0.0, 0.0, 0.0, 0.0);
    let (mut ce_cpu, mut cc_cpu) = (0.0, 0.0);
    let slice = main_secs / 2.0;
    warm(&addrs);
    for s in 0..SLICES {
        let before = cpu(&a, &b, &etcd_pids);
        let leader_before = cpu_secs(&etcd_pids[leader]);
        let r = drive(THREADS, slice, |t, n| {
            line::cycle(addrs[t % 2], &format!("c{s}-{t}-{n}"))
        });
        let after = cpu(&a, &b, &etcd_pids);
        let leader_after = cpu_secs(&etcd_pids[leader]);
        eprintln!(
            "bench: cluster: 16 threads, slice {}/{SLICES}: {:.0} cycles/s ({} errors)",
            s + 1,
            r.rate(),
            r.errors
        );
        if let (Some(x), Some(y)) = (before, after) {
            m_cpu += y.0 - x.0;
            e_cpu += y.1 - x.1;
            c_cpu += y.2 - x.2;
        }
        if let (Some(x), Some(y)) = (leader_before, leader_after) {
            leader_cpu += y - x;
        }
        cycles = add(cycles, r);
        if let Ok(clients) = &ceiling_clients {
            let before = cpu(&a, &b, &etcd_pids);
            let r = drive(THREADS, slice, |t, n| {
                ceiling_pair(&clients[t % 2], &format!("{PREFIX}ceiling/x{s}-{t}-{n}"))
            });
            let after = cpu(&a, &b, &etcd_pids);
            eprintln!(
                "bench: cluster: etcd's ceiling, slice {}/{SLICES}: {:.0} pairs/s ({} errors)",
                s + 1,
                r.rate(),
                r.errors
            );
            if let (Some(x), Some(y)) = (before, after) {
                ce_cpu += y.1 - x.1;
                cc_cpu += y.2 - x.2;
            }
            ceiling = add(ceiling, r);
        }
    }
    if let Err(e) = &ceiling_clients {
        problems.push(e.clone());
    }
    for (what, r) in [("cycles", &cycles), ("etcd's ceiling", &ceiling)] {
        if let Some(e) = &r.first_error {
            problems.push(format!("cluster {what}: {} errors, first: {e}", r.errors));
        }
    }

    // 2. Hand-off across members.
    eprintln!("bench: cluster: hand-off to a waiter on the other member");
    let handoff = Samples::collect(
        20,
        HANDOFF_ROUNDS,
        Duration::ZERO,
        Duration::from_secs(60),
        20,
        |i| handoff_round(a.addr, b.addr, &format!("h{i}")),
    );

    // 3. A command under a lock.
    eprintln!("bench: cluster: `tcpnetlock do -- true` and `etcdctl lock NAME true`");
    let commands = time_commands(bin, etcd, a.addr, &cluster, runs);

    // 4. Failover.
    eprintln!("bench: cluster: failover, a holding client process killed");
    let failover_client = Samples::collect(
        2,
        CLIENT_FAILOVER_ROUNDS,
        Duration::ZERO,
        Duration::from_secs(90),
        5,
        |i| {
            let holder = Tool::Tcpnetlock(bin, a.addr);
            let waiter = Tool::Tcpnetlock(bin, b.addr);
            kill_holder_round(&holder, &waiter, &format!("fc{i}"), || {
                Ok(stats_waiting(b.addr)? == 1)
            })
        },
    );
    eprintln!("bench: cluster: failover, a holder's member killed");
    let failover_member = Samples::collect(
        0,
        MEMBER_FAILOVER_ROUNDS,
        Duration::ZERO,
        Duration::from_secs(120),
        3,
        |i| member_round(bin, &endpoints, b.addr, &format!("fm{i}")),
    );
    eprintln!("bench: cluster: failover, etcdctl lock's holder killed");
    let etcd_addr: SocketAddr = endpoints[0].trim_start_matches("http://").parse().unwrap();
    let failover_etcdctl = Samples::collect(
        0,
        ETCDCTL_FAILOVER_ROUNDS,
        Duration::ZERO,
        Duration::from_secs(120),
        3,
        |i| {
            let tool = Tool::Etcdctl(etcd, etcd_addr);
            let name = format!("fe{i}");
            kill_holder_round(&tool, &tool, &name, || {
                Ok(crate::etcd::count_prefix(etcd_addr, &format!("{name}/"))? == 2)
            })
        },
    );
    for (what, s) in [
        ("hand-off", &handoff),
        ("failover, client killed", &failover_client),
        ("failover, member killed", &failover_member),
        ("failover, etcdctl lock", &failover_etcdctl),
    ] {
        if let Some(e) = &s.first_error {
            problems.push(format!("cluster {what}: {} errors, first: {e}", s.errors));
        }
    }
    let secs = cycles.secs.max(1e-9);
    setup.push(format!(
        "leader's CPU during the cycle runs: {:.0}% of a core",
        100.0 * leader_cpu / secs
    ));
    Ok(Report {
        setup,
        cycles_cpu: (cycles.count() > 0).then_some((m_cpu, e_cpu, c_cpu)),
        cycles: (cycles.count() > 0).then_some(cycles),
        ceiling_cpu: (ceiling.count() > 0).then_some((ce_cpu, cc_cpu)),
        ceiling: (ceiling.count() > 0).then_some(ceiling),
        handoff,
        commands,
        failover_client,
        failover_member,
        failover_etcdctl,
        problems,
    })
}

/// Starts a member on `endpoints` and waits until it grants.
fn member(bin: &Path, endpoints: &[String], name: &str) -> Result<Server, String> {
    let mut cmd = Command::new(bin);
    cmd.args(["server", "--listen", "127.0.0.1:0", "--log", "stderr"])
        .args(["--etcd", &endpoints.join(","), "--etcd-prefix", PREFIX])
        .args(["--etcd-name", name]);
    let mut server = Server::spawn(cmd, Ready::Announced)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !serving(server.addr) {
        if Instant::now() > deadline || !server.alive() {
            return Err(server.failure(&format!("member {name} never served")));
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(server)
}

fn serving(addr: SocketAddr) -> bool {
    let Ok(mut c) = Client::connect(addr, None) else {
        return false;
    };
    c.send(b".ping,serving:1\n").is_ok() && c.expect("pong").is_ok()
}

/// CPU seconds so far: (both members, the etcd members, this process).
fn cpu(a: &Server, b: &Server, etcd: &[String]) -> Option<(f64, f64, f64)> {
    let members = a.cpu_secs()? + b.cpu_secs()?;
    let mut e = 0.0;
    for pid in etcd {
        e += cpu_secs(pid)?;
    }
    Some((members, e, cpu_secs("self")?))
}

fn add(mut total: Cycles, r: Cycles) -> Cycles {
    total.threads = r.threads;
    total.granted += r.granted;
    total.not_granted += r.not_granted;
    total.errors += r.errors;
    total.secs += r.secs;
    if total.first_error.is_none() {
        total.first_error = r.first_error;
    }
    total
}

fn warm(addrs: &[SocketAddr]) {
    let _ = drive(4, 0.5, |t, n| {
        line::cycle(addrs[t % 2], &format!("w-{t}-{n}"))
    });
}

/// `threads` threads calling `one(thread, n)` for `secs`: counted are the calls that ended
/// within the time (Ok(true) granted, Ok(false) not granted).
fn drive(
    threads: usize,
    secs: f64,
    one: impl Fn(usize, u64) -> Result<bool, String> + Sync,
) -> Cycles {
    let stop = AtomicBool::new(false);
    let start = Barrier::new(threads + 1);
    let (granted, not_granted, errors) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let first_error = std::sync::Mutex::new(None);
    let mut elapsed = 0.0;
    thread::scope(|scope| {
        for t in 0..threads {
            let (stop, start, one) = (&stop, &start, &one);
            let (granted, not_granted, errors, first_error) =
                (&granted, &not_granted, &errors, &first_error);
            scope.spawn(move || {
                start.wait();
                let mut n = 0;
                while !stop.load(Ordering::Acquire) {
                    let r = one(t, n);
                    n += 1;
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    match r {
                        Ok(true) => granted.fetch_add(1, Ordering::Relaxed),
                        Ok(false) => not_granted.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            first_error.lock().unwrap().get_or_insert(e);
                            thread::sleep(Duration::from_millis(10));
                            errors.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            });
        }
        start.wait();
        let t0 = Instant::now();
        thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Release);
        elapsed = t0.elapsed().as_secs_f64();
    });
    Cycles {
        threads,
        granted: granted.into_inner(),
        not_granted: not_granted.into_inner(),
        errors: errors.into_inner(),
        secs: elapsed,
        first_error: first_error.into_inner().unwrap(),
        ..Cycles::default()
    }
}

// ---------------------------------------------------------------------------------------------
// etcd's ceiling

/// Two clients as the two members have them: each with a lease and a watch on the prefix.
struct CeilingClient {
    etcd: EtcdClient,
    lease: i64,
    _watch: etcd_client::EtcdWatch,
}

fn ceiling_clients(endpoints: &[String]) -> Result<Vec<CeilingClient>, String> {
    let mut clients = Vec::new();
    for _ in 0..2 {
        let etcd = EtcdClient::new(EtcdConfig::new(endpoints.iter().cloned()))
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(5);
        // Long enough for the whole run: no renewal needed.
        let lease = etcd
            .lease_grant(600, deadline)
            .map_err(|e| e.to_string())?
            .id;
        let watch = etcd
            .watch(
                WatchRequest::prefix(format!("{PREFIX}ceiling/")),
                deadline,
                |_| {},
            )
            .map_err(|e| e.to_string())?;
        clients.push(CeilingClient {
            etcd,
            lease,
            _watch: watch,
        });
    }
    Ok(clients)
}

/// What a member asks of etcd for one lock+release cycle of a mutex: put the key under the
/// lease and read the name's first key, in one transaction; then delete the key.
fn ceiling_pair(c: &CeilingClient, key: &str) -> Result<bool, String> {
    let deadline = Instant::now() + Duration::from_secs(2);
    let name = format!("{key}/");
    let txn = Txn::new().and_then([
        Op::Put(PutRequest::new(format!("{name}1"), &b"{}"[..]).lease(c.lease)),
        Op::Range(
            RangeRequest::prefix(name.clone())
                .sort(SortTarget::CreateRevision, SortOrder::Ascend)
                .limit(1),
        ),
    ]);
    c.etcd.txn(&txn, deadline).map_err(|e| e.to_string())?;
    c.etcd
        .delete(&DeleteRequest::key(format!("{name}1")), deadline)
        .map_err(|e| e.to_string())?;
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// Hand-off and failover

/// A holder on `a` releases; the time until the waiter queued on `b` has read `ok`.
fn handoff_round(a: SocketAddr, b: SocketAddr, name: &str) -> Result<Duration, String> {
    let holder = line::lock(a, None, name, "")?.ok_or_else(|| format!("{name}: not granted"))?;
    let mut waiter = Client::connect(b, None).map_err(|e| format!("waiter connect: {e}"))?;
    waiter.send(format!("lock,name:{name},wait:10\n").as_bytes())?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats_waiting(b)? != 1 {
        if Instant::now() > deadline {
            return Err(format!("{name}: waiter not queued"));
        }
        thread::sleep(Duration::from_micros(200));
    }
    thread::sleep(Duration::from_millis(1));
    let waiting = thread::spawn(move || -> Result<Instant, String> {
        waiter.expect("ok").map_err(|e| format!("waiter: {e}"))?;
        let t1 = Instant::now();
        line::release(waiter)?;
        Ok(t1)
    });
    let t0 = Instant::now();
    line::release(holder)?;
    let t1 = waiting.join().map_err(|_| "waiter panicked".to_owned())??;
    Ok(t1.saturating_duration_since(t0))
}

/// A holder process (`holder`), a waiter process queued behind it (`waiter`; `queued` says when),
/// then kill -9 of the holder: the time until the waiter prints its grant.
fn kill_holder_round(
    holder: &Tool,
    waiter: &Tool,
    name: &str,
    queued: impl Fn() -> Result<bool, String>,
) -> Result<Duration, String> {
    let mut h = LockProcess::start(holder.command(name, false))?;
    let (_, line) = h.line("holder")?;
    if !holder.granted(name, &line) {
        return Err(format!("holder: {line:?}"));
    }
    let mut w = LockProcess::start(waiter.command(name, true))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !queued()? {
        if Instant::now() > deadline {
            return Err(format!("{name}: waiter not queued"));
        }
        thread::sleep(Duration::from_millis(1));
    }
    thread::sleep(SETTLE);
    let t0 = Instant::now();
    h.signal(libc::SIGKILL);
    // etcdctl lock's session lives 10 s after its holder dies.
    let (t1, line) = w.line_within("waiter", Duration::from_secs(30))?;
    if !waiter.granted(name, &line) {
        return Err(format!("waiter: {line:?}"));
    }
    Ok(t1.saturating_duration_since(t0))
}

/// A fresh member `c`; a holder process through it, a waiter process through `b`; kill -9 of
/// the member: the time until the waiter prints `ok`.
fn member_round(
    bin: &Path,
    endpoints: &[String],
    b: SocketAddr,
    name: &str,
) -> Result<Duration, String> {
    let c = member(bin, endpoints, "c")?;
    let holder = Tool::Tcpnetlock(bin, c.addr);
    let waiter = Tool::Tcpnetlock(bin, b);
    let mut h = LockProcess::start(holder.command(name, false))?;
    let (_, line) = h.line("holder")?;
    if line != "ok" {
        return Err(format!("holder: {line:?}"));
    }
    let mut w = LockProcess::start(waiter.command(name, true))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats_waiting(b)? != 1 {
        if Instant::now() > deadline {
            return Err(format!("{name}: waiter not queued"));
        }
        thread::sleep(Duration::from_millis(1));
    }
    thread::sleep(SETTLE);
    let t0 = Instant::now();
    // Dropping it kills it (SIGKILL) and reaps it.
    drop(c);
    let (t1, line) = w.line("waiter")?;
    if line != "ok" {
        return Err(format!("waiter: {line:?}"));
    }
    drop(h);
    Ok(t1.saturating_duration_since(t0))
}

fn time_commands(
    bin: &Path,
    etcd: &Etcd,
    member: SocketAddr,
    cluster: &EtcdCluster,
    runs: usize,
) -> Result<(Vec<Candidate>, Vec<Timing>), String> {
    let scratch = crate::common::target_dir().join("bench-cluster");
    std::fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let etcd_addr: SocketAddr = cluster
        .endpoint(0)
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let port = member.port().to_string();
    let mut candidates = vec![
        Candidate {
            name: "tcpnetlock do -- true, through a cluster member".into(),
            argv: [
                &bin.display().to_string(),
                "do",
                "--host",
                "127.0.0.1",
                "--port",
                &port,
            ]
            .into_iter()
            .chain(["--lock-name", "bench", "--", "true"])
            .map(String::from)
            .collect(),
            runs,
        },
        Candidate {
            name: "etcdctl lock NAME true, the same etcd".into(),
            argv: etcd.lock_argv(etcd_addr, "bench-etcdctl", &["true"]),
            runs: (runs / 4).max(10),
        },
    ];
    let mut failed = Vec::new();
    candidates.retain(|c| match commands::check_runs(c) {
        Ok(()) => true,
        Err(e) => {
            failed.push(e);
            false
        }
    });
    if !failed.is_empty() {
        return Err(failed.join("; "));
    }
    // In rounds, the two tools taking turns, so that a change in the machine's load during the
    // runs falls on both alike (hyperfine runs one command's runs, then the next's).
    let mut rounds: Vec<Vec<Timing>> = candidates.iter().map(|_| Vec::new()).collect();
    for _ in 0..COMMAND_ROUNDS {
        for (c, timings) in candidates.iter().zip(rounds.iter_mut()) {
            let slice = Candidate {
                name: c.name.clone(),
                argv: c.argv.clone(),
                runs: (c.runs / COMMAND_ROUNDS).max(3),
            };
            timings.extend(commands::time(&[slice], &scratch)?);
        }
    }
    let timings = rounds.iter().map(|r| pooled(r)).collect();
    for c in &mut candidates {
        c.runs = (c.runs / COMMAND_ROUNDS).max(3) * COMMAND_ROUNDS;
    }
    Ok((candidates, timings))
}

/// Rounds of one command as one timing: the mean over all runs, the standard deviation of all
/// runs (within and between rounds), the fastest run; the median is the median of the rounds'.
fn pooled(rounds: &[Timing]) -> Timing {
    let n: usize = rounds.iter().map(|t| t.runs).sum();
    let mean = rounds.iter().map(|t| t.mean * t.runs as f64).sum::<f64>() / n as f64;
    let var = rounds
        .iter()
        .map(|t| t.runs as f64 * (t.stddev.powi(2) + (t.mean - mean).powi(2)))
        .sum::<f64>()
        / n as f64;
    let mut medians: Vec<f64> = rounds.iter().map(|t| t.median).collect();
    medians.sort_by(f64::total_cmp);
    Timing {
        mean,
        stddev: var.sqrt(),
        median: medians[medians.len() / 2],
        min: rounds.iter().map(|t| t.min).fold(f64::INFINITY, f64::min),
        runs: n,
    }
}

// ---------------------------------------------------------------------------------------------
// The report

pub fn section(r: &Result<Report, String>, header: Option<&str>) -> String {
    let mut out = String::from("\n### Cluster mode: two servers on one etcd\n\n");
    if let Some(h) = header {
        let _ = writeln!(out, "{h}");
    }
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(out, "Not measured: {e}");
            return out;
        }
    };
    out.push_str(
        "Two `tcpnetlock server --etcd` members on a 3-member etcd, all on this machine's \
         loopback, etcd's data on tmpfs (its fsync nearly free). Lock+release cycles: 16 client \
         threads, 8 through each member, each cycle a fresh connection and a new name \
         (`lock,name:N`, `ok`, `release`, `released`). etcd's ceiling, taking turns with them \
         slice by slice: the same etcd writes a member makes per cycle (a transaction that puts \
         the key under a lease and reads the name's first key, then a delete), from 16 threads \
         through the members' own etcd client (src/etcd/) with a watch on the prefix per \
         client, as each member has: what etcd and its JSON gateway allow on this machine \
         without a tcpnetlock server in between.\n\n",
    );
    for s in &r.setup {
        let _ = writeln!(out, "- {s}");
    }
    out.push('\n');
    let rate = |c: &Option<Cycles>| c.as_ref().map_or("—".into(), |c| thousands(c.rate()));
    let per = |cpu: Option<f64>, c: &Option<Cycles>| match (cpu, c) {
        (Some(s), Some(c)) if c.count() > 0 => format!("{:.0} µs", s * 1e6 / c.count() as f64),
        _ => "—".into(),
    };
    let rows = vec![
        vec![
            "lock+release cycles/s through two members, 16 threads".into(),
            rate(&r.cycles),
            format!("≥ {}", thousands(CYCLES_TARGET)),
        ],
        vec![
            "etcd's ceiling: put+read transaction and delete pairs/s, 16 threads".into(),
            rate(&r.ceiling),
            "—".into(),
        ],
        vec![
            "CPU per cycle: the two members".into(),
            per(r.cycles_cpu.map(|c| c.0), &r.cycles),
            "—".into(),
        ],
        vec![
            "CPU per cycle: etcd (three members)".into(),
            per(r.cycles_cpu.map(|c| c.1), &r.cycles),
            "—".into(),
        ],
        vec![
            "CPU per cycle: the bench's client threads".into(),
            per(r.cycles_cpu.map(|c| c.2), &r.cycles),
            "—".into(),
        ],
        vec![
            "CPU per pair at etcd's ceiling: etcd (three members)".into(),
            per(r.ceiling_cpu.map(|c| c.0), &r.ceiling),
            "—".into(),
        ],
        vec![
            "CPU per pair at etcd's ceiling: the bench (the etcd client)".into(),
            per(r.ceiling_cpu.map(|c| c.1), &r.ceiling),
            "—".into(),
        ],
    ];
    out.push_str(&md_table(&["throughput", "measured", "target"], &rows));

    out.push_str(
        "\nLatency. Hand-off: a holder connection on member a, a waiter connection queued on \
         member b with `wait:10` (b's `.stats` shows it, and 1 ms more); the clock runs from the \
         holder writing `release` to the waiter having read `ok`. Failover: a holder process and \
         a waiter process of the same tool, the waiter queued (the server shows it) and 150 ms \
         more; the clock runs from kill -9 of the holder (or of its member) to the bench having \
         read the waiter's grant line: `tcpnetlock lock NAME` through member a (or a fresh member \
         c) and `tcpnetlock lock NAME --wait 10` through member b; `etcdctl lock NAME` twice \
         (its session ttl: 10 s, the default).\n\n",
    );
    let ms = |s: &Samples| s.ms_cell();
    let n = |s: &Samples| s.secs.len().to_string();
    let rows = vec![
        vec![
            "hand-off: release on a → waiter on b has `ok`".into(),
            ms(&r.handoff),
            n(&r.handoff),
            format!("p99 ≤ {HANDOFF_P99_MS:.0} ms"),
        ],
        vec![
            "failover: holding `tcpnetlock lock` process killed → waiter on b".into(),
            ms(&r.failover_client),
            n(&r.failover_client),
            format!("< {CLIENT_FAILOVER_MS:.0} ms"),
        ],
        vec![
            "failover: the holder's member killed → waiter on b".into(),
            ms(&r.failover_member),
            n(&r.failover_member),
            format!("≤ --etcd-ttl + 1 s = {:.0} s", ETCD_TTL_SECS + 1.0),
        ],
        vec![
            "failover: `etcdctl lock` holder killed → `etcdctl lock` waiter".into(),
            ms(&r.failover_etcdctl),
            n(&r.failover_etcdctl),
            "(reference)".into(),
        ],
    ];
    out.push_str(&md_table(
        &["latency", "p50 / p99 / max", "rounds", "target"],
        &rows,
    ));

    let _ = write!(
        out,
        "\nA command under a lock, whole processes timed by hyperfine (`-N`): `tcpnetlock do` \
         through member a (it asks the member's `.info` first, for its lease bound), and \
         `etcdctl lock` against etcd member e0, in {COMMAND_ROUNDS} rounds taking turns (the \
         median is the median of the rounds' medians).\n\n",
    );
    match &r.commands {
        Ok((candidates, timings)) => {
            let rows: Vec<Vec<String>> = candidates
                .iter()
                .zip(timings)
                .map(|(c, t)| {
                    vec![
                        c.name.clone(),
                        t.runs.to_string(),
                        format!("{:.2} ms", t.mean * 1e3),
                        format!("{:.2} ms", t.stddev * 1e3),
                        format!("{:.2} ms", t.median * 1e3),
                        format!("{:.2} ms", t.min * 1e3),
                    ]
                })
                .collect();
            out.push_str(&md_table(
                &["command", "runs", "mean", "σ", "median", "min"],
                &rows,
            ));
            let _ = writeln!(out, "\nCommand lines:\n");
            for c in candidates {
                let _ = writeln!(
                    out,
                    "- {}: `{}`",
                    c.name,
                    crate::common::shown(&commands::shell_words(&c.argv))
                );
            }
        }
        Err(e) => {
            let _ = writeln!(out, "Not measured: {e}");
        }
    }

    out.push_str("\nCluster targets (issue 13):\n\n");
    for line in targets(r) {
        let _ = writeln!(out, "- {line}");
    }
    if !r.problems.is_empty() {
        out.push_str("\nProblems seen in the cluster part:\n\n");
        for p in &r.problems {
            let _ = writeln!(out, "- {p}");
        }
    }
    out
}

fn targets(r: &Report) -> Vec<String> {
    let mut v = Vec::new();
    v.push(match &r.cycles {
        Some(c) => format!(
            "{}: ≥ {} cycles/s through two members at 16 threads: {}{}",
            pass(c.rate() >= CYCLES_TARGET),
            thousands(CYCLES_TARGET),
            thousands(c.rate()),
            r.ceiling.as_ref().map_or(String::new(), |e| format!(
                " (etcd's own ceiling for the same writes on this machine: {} pairs/s)",
                thousands(e.rate())
            ))
        ),
        None => "NOT MEASURED: cycles through two members".into(),
    });
    v.push(match r.handoff.pct(99.0) {
        Some(p99) => format!(
            "{}: hand-off to a waiter on the other member, p99 ≤ {HANDOFF_P99_MS:.0} ms: p99 \
             {:.2} ms (p50 {:.2} ms)",
            pass(p99 * 1e3 <= HANDOFF_P99_MS),
            p99 * 1e3,
            r.handoff.pct(50.0).unwrap_or(0.0) * 1e3
        ),
        None => "NOT MEASURED: hand-off across members".into(),
    });
    if let Ok((candidates, timings)) = &r.commands {
        let mean = |prefix: &str| {
            candidates
                .iter()
                .zip(timings)
                .find(|(c, _)| c.name.starts_with(prefix))
                .map(|(_, t)| t.mean)
        };
        v.push(match (mean("tcpnetlock do"), mean("etcdctl lock")) {
            (Some(a), Some(b)) => format!(
                "{}: `tcpnetlock do -- true` in cluster mode ≤ {DO_VS_ETCDCTL}x `etcdctl lock \
                 NAME true` (mean): {:.2}x ({:.2} ms vs {:.2} ms)",
                pass(a <= DO_VS_ETCDCTL * b),
                a / b,
                a * 1e3,
                b * 1e3
            ),
            _ => "NOT MEASURED: do against etcdctl lock".into(),
        });
    }
    v.push(match r.failover_client.pct(100.0) {
        Some(max) => format!(
            "{}: a holding client process killed → waiter on the other member granted in < \
             {CLIENT_FAILOVER_MS:.0} ms: max {:.1} ms (p50 {:.1} ms)",
            pass(max * 1e3 < CLIENT_FAILOVER_MS),
            max * 1e3,
            r.failover_client.pct(50.0).unwrap_or(0.0) * 1e3
        ),
        None => "NOT MEASURED: failover after a client is killed".into(),
    });
    v.push(match r.failover_member.pct(100.0) {
        Some(max) => format!(
            "{}: a holder's member killed → waiter granted within --etcd-ttl + 1 s = {:.0} s: \
             max {:.2} s (p50 {:.2} s){}",
            pass(max <= ETCD_TTL_SECS + 1.0),
            ETCD_TTL_SECS + 1.0,
            max,
            r.failover_member.pct(50.0).unwrap_or(0.0),
            r.failover_etcdctl
                .pct(50.0)
                .map_or(String::new(), |e| format!(
                    "; `etcdctl lock`'s holder killed: p50 {e:.2} s"
                ))
        ),
        None => "NOT MEASURED: failover after a member is killed".into(),
    });
    v
}
