//! Neighbour latency: how long a lock takes for a client that only wants a name of its own,
//! while other clients make the server work on everyone's behalf (issue 10, item 7).
//!
//! Two scenarios, each on fresh servers with [`HOLDERS`] connections holding:
//!
//! - **`.locks` readers**: [`HOLDERS`] plain locks on distinct names, so that every `.locks`
//!   reply lists them all (about 1 MB); [`READERS`] client threads loop on `.locks`, each on a
//!   fresh connection, reading the whole reply.
//! - **a big semaphore**: [`HOLDERS`] holders of one `max:`[`SEM_MAX`] name; [`CHURNERS`] client
//!   threads each release a holder picked at random among those they own and take a new place
//!   on a fresh connection, in a loop. Random, not the oldest: a table that scans its holders in
//!   order finds the oldest at once, and real holders leave in no particular order.
//!
//! Meanwhile the neighbour, from an address no other client uses, takes and releases lock
//! `neighbour` on a fresh connection, [`PAUSE`] apart: its lock latency is connect → `ok`. It is
//! measured alone too (the holders idle), as the baseline.
//!
//! The same scenario runs against every binary given (this build and, with
//! `TCPNETLOCK_BENCH_BASELINE_BIN`, an older one), all started before any measurement and taking
//! turns slice by slice as in [`crate::cycles`], so that other work on the machine falls on
//! both alike. The servers run with `--keepalive-time 600`: connections opened in one burst
//! would otherwise all be probed at once 20 s later (issue 10, item 4), in the middle of the
//! measurement.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{Ready, Samples, Server, command_output, cpu_secs, md_table, thousands};
use crate::line::{self, LATENCY_SOURCE, PER_SOURCE};
use crate::net::Client;

/// Holders in each scenario: the 9,000-holder semaphore, and as many plain locks.
pub const HOLDERS: usize = 9_000;
pub const SEM_MAX: u32 = 10_000;
/// [`SEM_MAX`] as the request's parameter.
const SEM_PARAM: &str = ",max:10000";
pub const SEM_NAME: &str = "big-semaphore";
/// Client threads looping on `.locks` (the 8).
pub const READERS: usize = 8;
/// Client threads churning the semaphore.
pub const CHURNERS: usize = 4;
/// Rounds per scenario; in each, every server has the neighbour alone for [`ALONE`], then with
/// the load for [`LOADED`].
pub const SLICES: usize = 2;
pub const ALONE: Duration = Duration::from_secs(1);
pub const LOADED: Duration = Duration::from_secs(4);
/// Between two of the neighbour's locks.
pub const PAUSE: Duration = Duration::from_millis(2);
/// After a slice: the load's last connections finish closing.
const SETTLE: Duration = Duration::from_millis(200);
const NEIGHBOUR: &str = "neighbour";
const MAX_CONNECTIONS: &str = "19000";
const KEEPALIVE_SECS: &str = "600";
/// Bench sockets beside the holders: the load, the neighbour, stdio, the servers' pipes.
const SPARE_FDS: usize = 200;
const MAX_ERRORS: u64 = 50;

/// A server binary to measure.
pub struct Binary {
    /// "this build (66c6fea)": its role, and the last commit that changed its sources.
    pub label: String,
    pub path: PathBuf,
    /// Where it was built from, as far as the bench can tell.
    pub source: String,
}

impl Binary {
    /// `built_here`: the binary `cargo bench` built from this checkout (its source is this
    /// checkout's); otherwise the checkout it sits in, if any.
    pub fn new(role: &str, path: &Path, built_here: bool) -> Binary {
        let dir = if built_here {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        } else {
            path.parent().map_or_else(PathBuf::new, Path::to_owned)
        };
        let (source, src_commit) = checkout_source(&dir, built_here);
        Binary {
            label: match src_commit {
                Some(c) => format!("{role} ({c})"),
                None => role.to_owned(),
            },
            path: path.to_owned(),
            source,
        }
    }

    pub fn command_line() -> String {
        format!(
            "tcpnetlock server --listen 127.0.0.1:0 --log stderr --max-connections \
             {MAX_CONNECTIONS} --keepalive-time {KEEPALIVE_SECS}"
        )
    }

    fn start(&self) -> Result<Server, String> {
        let mut cmd = Command::new(&self.path);
        cmd.args(["server", "--listen", "127.0.0.1:0", "--log", "stderr"])
            .args(["--max-connections", MAX_CONNECTIONS])
            .args(["--keepalive-time", KEEPALIVE_SECS]);
        Server::spawn(cmd, Ready::Announced)
    }
}

/// The commit of the git checkout `dir` is in, the last commit that changed the server's
/// sources (also returned alone), and whether they have uncommitted changes.
fn checkout_source(dir: &Path, built_here: bool) -> (String, Option<String>) {
    let git_in = |dir: &Path, args: &[&str]| {
        command_output(Command::new("git").arg("-C").arg(dir).args(args)).filter(|s| !s.is_empty())
    };
    let Some(top) = git_in(dir, &["rev-parse", "--show-toplevel"]) else {
        return (
            format!("{}: not in a git checkout", shown(dir).display()),
            None,
        );
    };
    // From the top, where the paths below mean the checkout's own src/ and Cargo files.
    let git = |args: &[&str]| git_in(Path::new(&top), args);
    let head = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "?".into());
    let paths = ["--", "src", "Cargo.toml", "Cargo.lock"];
    let last = git(&[&["log", "-1", "--format=%h"][..], &paths].concat());
    let dirty =
        git(&[&["status", "--porcelain"][..], &paths].concat()).is_some_and(|s| !s.is_empty());
    let text = format!(
        "{} checkout {}, HEAD {head}, src/ last changed in {}{}",
        if built_here {
            "built by cargo bench from the"
        } else {
            "a binary inside the"
        },
        shown(Path::new(&top)).display(),
        last.as_deref().unwrap_or("?"),
        if dirty {
            ", with uncommitted changes in src/ or Cargo.*"
        } else {
            ", no uncommitted changes"
        }
    );
    (
        text,
        last.map(|c| if dirty { format!("{c}+changes") } else { c }),
    )
}

/// `path` relative to this checkout, so that the results name no machine's directories.
fn shown(path: &Path) -> PathBuf {
    let base = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (Ok(path), Ok(base)) = (path.canonicalize(), base.canonicalize()) else {
        return path.to_owned();
    };
    let common = path
        .components()
        .zip(base.components())
        .take_while(|(a, b)| a == b)
        .count();
    let mut rel: PathBuf = base.components().skip(common).map(|_| "..").collect();
    rel.extend(path.components().skip(common));
    if rel.as_os_str().is_empty() {
        ".".into()
    } else {
        rel
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Locks,
    Semaphore,
}

/// What the load did during the loaded slices.
#[derive(Default)]
pub struct Load {
    /// One `.locks` request, or one churn cycle (`release` → `released` → the server's end of
    /// file → a new connection → `ok`).
    pub ops: Samples,
    /// Bytes of `.locks` replies.
    pub bytes: u64,
    pub secs: f64,
    /// The server's CPU seconds over the loaded slices.
    pub server_cpu: Option<f64>,
    /// The bench's CPU seconds (all its threads) over the loaded slices.
    pub bench_cpu: Option<f64>,
    /// All processes' CPU seconds (user and system), and the interrupts' (where the kernel
    /// counts loopback TCP's receive work), over the loaded slices. What processes used beyond
    /// the server and the bench is other work on the machine, which the numbers suffer from.
    pub tasks_cpu: Option<f64>,
    pub irq_cpu: Option<f64>,
}

/// One scenario against one binary.
#[derive(Default)]
pub struct Scenario {
    /// Holders the server reported (`.stats` `holders`) before the measurement.
    pub holders: u64,
    pub open_secs: f64,
    pub alone: Samples,
    pub loaded: Samples,
    pub load: Load,
    pub problems: Vec<String>,
}

pub struct Measured {
    pub binary: Binary,
    pub locks: Result<Scenario, String>,
    pub semaphore: Result<Scenario, String>,
}

impl Measured {
    fn scenario(&self, kind: Kind) -> &Result<Scenario, String> {
        match kind {
            Kind::Locks => &self.locks,
            Kind::Semaphore => &self.semaphore,
        }
    }
}

/// Both scenarios against every binary; the holders per server are fewer than [`HOLDERS`] only
/// when the bench's descriptor limit cannot hold them all at once.
pub fn run(binaries: Vec<Binary>) -> (Vec<Measured>, usize) {
    let holders = holders_for(binaries.len());
    let locks = scenario(&binaries, Kind::Locks, holders);
    let semaphore = scenario(&binaries, Kind::Semaphore, holders);
    let measured = binaries
        .into_iter()
        .zip(locks.into_iter().zip(semaphore))
        .map(|(binary, (locks, semaphore))| Measured {
            binary,
            locks,
            semaphore,
        })
        .collect();
    (measured, holders)
}

fn holders_for(servers: usize) -> usize {
    let mut nofile = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain struct out.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) };
    let room = (nofile.rlim_cur as usize).saturating_sub(SPARE_FDS) / servers.max(1);
    HOLDERS.min(room)
}

/// A server with its holders, ready for slices.
struct Rig<'a> {
    binary: &'a Binary,
    server: Server,
    /// Plain-lock holders (kept open), or each churner's holders.
    held: Vec<VecDeque<Client>>,
    out: Scenario,
}

fn scenario(binaries: &[Binary], kind: Kind, holders: usize) -> Vec<Result<Scenario, String>> {
    let mut rigs: Vec<Result<Rig, String>> =
        binaries.iter().map(|b| rig(b, kind, holders)).collect();
    for _ in 0..SLICES {
        for rig in rigs.iter_mut().flatten() {
            slice(rig, kind);
        }
    }
    rigs.into_iter()
        .map(|r| {
            let mut rig = r?;
            if !rig.server.alive() {
                rig.out
                    .problems
                    .push(rig.server.failure("died during the measurement"));
            }
            // Stop the server before letting go of the holders: thousands of closes would only
            // make work for it.
            drop(rig.server);
            drop(rig.held);
            Ok(rig.out)
        })
        .collect()
}

fn rig<'a>(binary: &'a Binary, kind: Kind, holders: usize) -> Result<Rig<'a>, String> {
    let server = binary.start()?;
    let what = match kind {
        Kind::Locks => format!("{holders} plain locks"),
        Kind::Semaphore => format!("{holders} holders of {SEM_NAME},max:{SEM_MAX}"),
    };
    eprintln!(
        "bench: {} ({}): neighbours: {what} on {}",
        binary.label,
        binary.path.display(),
        server.addr
    );
    let mut out = Scenario::default();
    let holding = match kind {
        Kind::Locks => line::open_holders(
            server.addr,
            holders,
            &binary.label,
            |i| format!("h-{i}"),
            "",
        ),
        Kind::Semaphore => line::open_holders(
            server.addr,
            holders,
            &binary.label,
            |_| SEM_NAME.to_owned(),
            SEM_PARAM,
        ),
    };
    out.open_secs = holding.secs;
    if let Some(e) = &holding.first_error {
        out.problems
            .push(format!("holders: {} errors, first: {e}", holding.errors));
    }
    out.holders = line::stats_count(server.addr, "holders")?;
    let held = match kind {
        Kind::Locks => vec![holding.clients.into()],
        Kind::Semaphore => {
            let mut shares: Vec<VecDeque<Client>> =
                (0..CHURNERS).map(|_| VecDeque::new()).collect();
            for (i, c) in holding.clients.into_iter().enumerate() {
                shares[i % CHURNERS].push_back(c);
            }
            shares
        }
    };
    Ok(Rig {
        binary,
        server,
        held,
        out,
    })
}

/// The neighbour alone, then with the load.
fn slice(rig: &mut Rig, kind: Kind) {
    let addr = rig.server.addr;
    add(&mut rig.out.alone, neighbour(addr, ALONE));
    thread::sleep(SETTLE);
    let stop = Arc::new(AtomicBool::new(false));
    let cpu0 = cpu_now(&rig.server);
    let t0 = Instant::now();
    let loaders: Vec<thread::JoinHandle<(Samples, u64, VecDeque<Client>)>> = match kind {
        Kind::Locks => (0..READERS)
            .map(|_| {
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    let (ops, bytes) = read_locks(addr, &stop);
                    (ops, bytes, VecDeque::new())
                })
            })
            .collect(),
        Kind::Semaphore => rig
            .held
            .drain(..)
            .enumerate()
            .map(|(t, mut mine)| {
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    let ops = churn(addr, &stop, &mut mine, t as u64);
                    (ops, 0, mine)
                })
            })
            .collect(),
    };
    add(&mut rig.out.loaded, neighbour(addr, LOADED));
    stop.store(true, Ordering::Relaxed);
    for h in loaders {
        let (ops, bytes, mine) = h.join().expect("load thread");
        add(&mut rig.out.load.ops, ops);
        rig.out.load.bytes += bytes;
        if kind == Kind::Semaphore {
            rig.held.push(mine);
        }
    }
    let load = &mut rig.out.load;
    let cpu1 = cpu_now(&rig.server);
    let first = load.secs == 0.0;
    for (total, (a, b)) in [
        &mut load.server_cpu,
        &mut load.bench_cpu,
        &mut load.tasks_cpu,
        &mut load.irq_cpu,
    ]
    .into_iter()
    .zip(cpu0.into_iter().zip(cpu1))
    {
        let slice = a.zip(b).map(|(a, b)| b - a);
        // Unknown once any slice's is.
        *total = if first {
            slice
        } else {
            total.zip(slice).map(|(t, s)| t + s)
        };
    }
    load.secs += t0.elapsed().as_secs_f64();
    thread::sleep(SETTLE);
    eprintln!(
        "bench: {}: neighbours slice done ({} neighbour locks so far)",
        rig.binary.label,
        rig.out.loaded.secs.len()
    );
}

/// CPU seconds so far: the server's, the bench's, all processes' and the interrupts'.
fn cpu_now(server: &Server) -> [Option<f64>; 4] {
    let (tasks, irq) = machine_cpu_secs().unzip();
    [server.cpu_secs(), cpu_secs("self"), tasks, irq]
}

/// CPU seconds all CPUs have spent since boot in processes (user, nice, system) and in
/// interrupts (irq, softirq), from /proc/stat.
fn machine_cpu_secs() -> Option<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = text
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(7)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq
    let [user, nice, system, _, _, irq, softirq] = v[..] else {
        return None;
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Some((
        (user + nice + system) as f64 / hz,
        (irq + softirq) as f64 / hz,
    ))
}

fn add(total: &mut Samples, part: Samples) {
    total.secs.extend(part.secs);
    total.errors += part.errors;
    if total.first_error.is_none() {
        total.first_error = part.first_error;
    }
}

/// Lock `neighbour` on a fresh connection, connect → `ok` timed, then release it, [`PAUSE`]
/// apart, for `span`.
fn neighbour(addr: SocketAddr, span: Duration) -> Samples {
    Samples::collect(0, usize::MAX, PAUSE, span, MAX_ERRORS, |_| {
        let start = Instant::now();
        let c = line::lock(addr, Some(LATENCY_SOURCE), NEIGHBOUR, "")?.ok_or("not granted")?;
        let took = start.elapsed();
        line::release(c).map(|()| took)
    })
}

/// `.locks` on fresh connections until `stop`: each request's time (connect → the server's
/// end of file after the whole reply) and the bytes read.
fn read_locks(addr: SocketAddr, stop: &AtomicBool) -> (Samples, u64) {
    let mut s = Samples::default();
    let mut bytes = 0;
    let mut reply = Vec::new();
    while !stop.load(Ordering::Relaxed) && s.errors <= MAX_ERRORS {
        let start = Instant::now();
        reply.clear();
        let result = Client::connect(addr, None)
            .map_err(|e| format!(".locks connect: {e}"))
            .and_then(|mut c| {
                c.send(b".locks\n")?;
                c.stream
                    .read_to_end(&mut reply)
                    .map_err(|e| format!("reading .locks: {e}"))
            });
        match result {
            Ok(n) if reply.starts_with(b"locks,{") && reply.ends_with(b"}\n") => {
                s.secs.push(start.elapsed().as_secs_f64());
                bytes += n as u64;
            }
            Ok(n) => {
                s.errors += 1;
                s.first_error.get_or_insert_with(|| {
                    format!(
                        ".locks reply of {n} bytes: {:?}...",
                        String::from_utf8_lossy(&reply[..n.min(60)])
                    )
                });
            }
            Err(e) => {
                s.errors += 1;
                s.first_error.get_or_insert(e);
            }
        }
    }
    (s, bytes)
}

/// Where churn connection `n` comes from: [`PER_SOURCE`] per address from 127.2.0.1 on, apart
/// from the holders' and the neighbour's addresses (see [`line::PER_SOURCE`] for why).
fn churn_source(n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 2, 0, 1)) + (n / PER_SOURCE) as u32)
}

static CHURNED: AtomicUsize = AtomicUsize::new(0);

/// Until `stop`: release one of `mine` picked at random, then take a new place on the
/// semaphore; each cycle's time.
fn churn(addr: SocketAddr, stop: &AtomicBool, mine: &mut VecDeque<Client>, seed: u64) -> Samples {
    let mut s = Samples::default();
    // xorshift64: any spread will do; no need for a crate.
    let mut x = 0x9E37_79B9_7F4A_7C15 ^ (seed + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    while !stop.load(Ordering::Relaxed) && s.errors <= MAX_ERRORS && !mine.is_empty() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let i = (x % mine.len() as u64) as usize;
        let c = mine.swap_remove_back(i).expect("index in range");
        let start = Instant::now();
        let source = churn_source(CHURNED.fetch_add(1, Ordering::Relaxed));
        let result = line::release(c).and_then(|()| {
            line::lock(addr, Some(source), SEM_NAME, SEM_PARAM)?
                .ok_or_else(|| format!("{SEM_NAME},max:{SEM_MAX} not granted"))
        });
        match result {
            Ok(c) => {
                s.secs.push(start.elapsed().as_secs_f64());
                mine.push_back(c);
            }
            Err(e) => {
                s.errors += 1;
                s.first_error.get_or_insert(e);
            }
        }
    }
    s
}

// ---------------------------------------------------------------------------------------------
// The report

/// The section for docs/BENCHMARKS.md. `header`: this part ran alone, so the section says
/// itself how and where (a full run says it once for all parts).
pub fn section(measured: &[Measured], holders: usize, header: Option<&str>) -> String {
    let mut out = format!(
        "\n### Neighbour latency: a lock of one's own while others load the server\n\n\
         Issue 10, item 7. Two scenarios, each on fresh servers holding {h} connections: \
         **`.locks`**, {h} plain locks on distinct names (every `.locks` reply lists them all) \
         and {READERS} client threads looping on `.locks`, each on a fresh connection, reading \
         the whole reply; **semaphore**, {h} holders of `{SEM_NAME},max:{SEM_MAX}` and \
         {CHURNERS} client threads each releasing a holder picked at random among theirs and \
         taking a new place on a fresh connection, in a loop. Meanwhile a neighbour, from \
         127.0.0.2, takes and releases lock `{NEIGHBOUR}` on a fresh connection, {pause} ms \
         apart; its latency is connect → `ok`. \"alone\": the holders idle, nobody else. Every \
         binary's server is started and filled first; then they take turns, {SLICES} rounds \
         of {alone} s alone and {loaded} s loaded each. Servers: `{cmd}` (keepalive at 600 s, \
         so that the holders, opened in one burst, are not all probed at once during the \
         measurement).\n\n",
        h = thousands(holders as f64),
        pause = PAUSE.as_millis(),
        alone = ALONE.as_secs(),
        loaded = LOADED.as_secs(),
        cmd = Binary::command_line(),
    );
    if let Some(h) = header {
        out.push_str(h);
        out.push('\n');
    }
    for m in measured {
        let _ = writeln!(
            out,
            "- {}: `{}`, {}",
            m.binary.label,
            shown(&m.binary.path).display(),
            m.binary.source
        );
    }
    out.push('\n');
    let header: Vec<String> = std::iter::once("measure".to_owned())
        .chain(measured.iter().map(|m| m.binary.label.clone()))
        .collect();
    let mut rows: Vec<Vec<String>> = Vec::new();
    for kind in [Kind::Locks, Kind::Semaphore] {
        let row = |what: String, f: &dyn Fn(&Scenario) -> String| -> Vec<String> {
            std::iter::once(what)
                .chain(measured.iter().map(|m| match m.scenario(kind) {
                    Ok(s) => f(s),
                    Err(e) => format!("not measured: {e}"),
                }))
                .collect()
        };
        let (name, load, ops) = match kind {
            Kind::Locks => (
                "`.locks`",
                format!("{READERS} clients reading `.locks`"),
                "`.locks` replies",
            ),
            Kind::Semaphore => (
                "semaphore",
                format!("{CHURNERS} clients churning the semaphore"),
                "churn cycles (release → new place)",
            ),
        };
        rows.push(row(format!("{name}: holders (`.stats`)"), &|s| {
            format!(
                "{} (opened in {:.1} s)",
                thousands(s.holders as f64),
                s.open_secs
            )
        }));
        rows.push(row(
            format!("{name}: neighbour alone, p50 / p99 / max"),
            &|s| samples_cell(&s.alone),
        ));
        rows.push(row(
            format!("{name}: **neighbour with {load}**, p50 / p99 / max"),
            &|s| samples_cell(&s.loaded),
        ));
        rows.push(row(
            format!("{name}: {ops}: per second; each p50 / p99 / max"),
            &|s| {
                format!(
                    "{}/s; {}",
                    thousands(s.load.ops.secs.len() as f64 / s.load.secs.max(1e-9)),
                    samples_cell(&s.load.ops)
                )
            },
        ));
        if kind == Kind::Locks {
            rows.push(row("`.locks`: reply size".into(), &|s| {
                let n = s.load.ops.secs.len().max(1) as f64;
                format!("{:.0} KiB", s.load.bytes as f64 / n / 1024.0)
            }));
        }
        let per = if kind == Kind::Locks {
            "reply"
        } else {
            "cycle"
        };
        rows.push(row(
            format!(
                "{name}: CPU under load: the server / the bench / interrupts / other processes"
            ),
            &|s| {
                let l = &s.load;
                let pct = |c: f64| format!("{:.0}%", 100.0 * c / l.secs.max(1e-9));
                match (l.server_cpu, l.bench_cpu, l.tasks_cpu, l.irq_cpu) {
                    (Some(a), Some(b), Some(t), Some(i)) => format!(
                        "{} / {} / {} / {} of a core",
                        pct(a),
                        pct(b),
                        pct(i),
                        pct((t - a - b).max(0.0))
                    ),
                    _ => "?".into(),
                }
            },
        ));
        rows.push(row(
            format!("{name}: server CPU per {per} (neighbour's share included)"),
            &|s| {
                s.load.server_cpu.map_or("?".into(), |c| {
                    format!("{:.0} µs", 1e6 * c / s.load.ops.secs.len().max(1) as f64)
                })
            },
        ));
    }
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    out.push_str(&md_table(&header, &rows));
    let problems: Vec<String> = measured
        .iter()
        .flat_map(|m| {
            [("`.locks`", &m.locks), ("semaphore", &m.semaphore)]
                .into_iter()
                .flat_map(move |(name, r)| {
                    r.iter().flat_map(move |s| {
                        let sample_errors = [
                            ("neighbour alone", &s.alone),
                            ("neighbour loaded", &s.loaded),
                            ("load", &s.load.ops),
                        ]
                        .into_iter()
                        .filter_map(|(what, x)| {
                            x.first_error
                                .as_ref()
                                .map(|e| format!("{what}: {} errors, first: {e}", x.errors))
                        });
                        s.problems
                            .iter()
                            .cloned()
                            .chain(sample_errors)
                            .map(move |p| format!("{}, {name}: {p}", m.binary.label))
                            .collect::<Vec<_>>()
                    })
                })
        })
        .collect();
    if !problems.is_empty() {
        let _ = writeln!(out, "\nProblems seen in this part:\n");
        for p in problems {
            let _ = writeln!(out, "- {p}");
        }
    }
    out
}

/// `p50 / p99 / max` in ms, and how many samples.
fn samples_cell(s: &Samples) -> String {
    format!(
        "{} ({} samples)",
        s.ms_cell(),
        thousands(s.secs.len() as f64)
    )
}
