//! `tcpnetlock do -- true` against `flock FILE true`, and against tcpnetlock 0.1.8's
//! `tcpnetlock_do -- true`, in one run:
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-v4 cargo bench --bench do
//! ```
//!
//! Each command is a whole process run from start to exit: what a shell script or a cron job
//! pays to run a command under a lock. `do` takes and releases a real lock on a real server (this
//! crate's, started by the bench on 127.0.0.1); flock takes a lock on a file. The command under
//! the lock is `true`, so the figures are the locking tool's overhead and nothing else.
//!
//! Timing is by hyperfine (`-N`: no shell in between) when it is installed, else by an in-Rust
//! loop that runs the commands in turn, round after round, and takes the wall time of each. The
//! bench prints the machine, the commands and a markdown table for docs/BENCHMARKS-do.md, then
//! the verdict on the target (`do` at most 1.5x flock). A missed target is reported, never a
//! failure.
//!
//! Rows:
//! - `tcpnetlock do`, the binary `cargo bench` builds (glibc, dynamically linked);
//! - the same, built static for x86_64-unknown-linux-musl (the container's binary), when that
//!   target is installed (`TCPNETLOCK_BENCH_MUSL=0` skips it);
//! - 0.1.8's `tcpnetlock_do`, from the venv load.rs also uses (`<target dir>/bench-venv`,
//!   created on first use with `pip install tcpnetlock==0.1.8`; `TCPNETLOCK_BENCH_PYTHON=0`
//!   skips it). It gets fewer runs: it is thirty times slower.
//!
//! `TCPNETLOCK_BENCH_RUNS` (default 500) sets the runs of the fast commands.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const PY_VERSION: &str = "0.1.8";
const TARGET_RATIO: f64 = 1.5;

/// One command line to time.
struct Candidate {
    name: String,
    argv: Vec<String>,
    runs: usize,
}

/// Timing of one candidate, in seconds.
struct Timing {
    mean: f64,
    stddev: f64,
    median: f64,
    min: f64,
    runs: usize,
}

fn main() {
    if !env::args().any(|a| a == "--bench") {
        println!("do: a benchmark; run it with `cargo bench --bench do` (skipped)");
        return;
    }
    let runs: usize = env::var("TCPNETLOCK_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n >= 10)
        .unwrap_or(500);
    let busy = cpu_busy_pct(Duration::from_secs(1)).map_or("unknown".into(), |p| {
        format!("CPUs {p:.0}% busy over the second before")
    });
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_tcpnetlock"));
    let scratch = target_dir().join("bench-do");
    fs::create_dir_all(&scratch).expect("scratch dir");
    let lock_file = scratch.join("flock.lock");
    fs::write(&lock_file, "").expect("lock file");

    let server = Server::start(&bin);
    let port = server.addr.port().to_string();
    let do_args = |exe: &str| -> Vec<String> {
        [exe, "do", "--host", "127.0.0.1", "--port", &port]
            .into_iter()
            .chain(["--lock-name", "bench", "--", "true"])
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
            runs,
        },
        Candidate {
            name: "tcpnetlock do -- true".into(),
            argv: do_args(&bin.display().to_string()),
            runs,
        },
    ];
    let mut notes = Vec::new();
    match musl_binary() {
        Ok(musl) => candidates.push(Candidate {
            name: "tcpnetlock do -- true (static musl build)".into(),
            argv: do_args(&musl.display().to_string()),
            runs,
        }),
        Err(why) => notes.push(format!("static musl build not measured: {why}")),
    }
    match python_do() {
        Ok(exe) => {
            let mut argv = do_args(&exe.display().to_string());
            argv.remove(1); // tcpnetlock_do has no `do`
            candidates.push(Candidate {
                name: format!("tcpnetlock_do -- true (Python {PY_VERSION})"),
                argv,
                runs: (runs / 8).max(10),
            });
        }
        Err(why) => notes.push(format!("Python {PY_VERSION} not measured: {why}")),
    }
    for c in &candidates {
        check_runs(c);
    }

    let (method, timings) = match hyperfine_version() {
        Some(version) => (version, with_hyperfine(&candidates, &scratch)),
        None => (
            "in-Rust loop (hyperfine not installed)".into(),
            with_loop(&candidates),
        ),
    };
    drop(server);
    print_report(&candidates, &timings, &method, &notes, busy);
}

/// Every command must succeed before it is timed: a fast failure would look like a fast tool.
fn check_runs(c: &Candidate) {
    let out = Command::new(&c.argv[0])
        .args(&c.argv[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{}: cannot run {:?}: {e}", c.name, c.argv));
    assert!(
        out.status.success(),
        "{} failed ({}): {}",
        c.name,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// Timing

fn hyperfine_version() -> Option<String> {
    output(Command::new("hyperfine").arg("--version"))
}

/// One hyperfine invocation per group of equal run counts, so that flock and `do` are timed in
/// the same invocation, one after the other.
fn with_hyperfine(candidates: &[Candidate], scratch: &Path) -> Vec<Timing> {
    let mut timings = Vec::new();
    let mut start = 0;
    while start < candidates.len() {
        let runs = candidates[start].runs;
        let end = start
            + candidates[start..]
                .iter()
                .take_while(|c| c.runs == runs)
                .count();
        let json = scratch.join("hyperfine.json");
        let mut cmd = Command::new("hyperfine");
        cmd.args(["-N", "--style", "basic", "--warmup"])
            .arg((runs / 10).max(3).to_string())
            .args(["--runs", &runs.to_string(), "--export-json"])
            .arg(&json);
        for c in &candidates[start..end] {
            cmd.arg("-n").arg(&c.name).arg(shell_words(&c.argv));
        }
        let status = cmd.stdout(Stdio::null()).status().expect("run hyperfine");
        assert!(status.success(), "hyperfine failed: {status}");
        let text = fs::read_to_string(&json).expect("hyperfine's JSON");
        timings.extend(parse_hyperfine(&text));
        start = end;
    }
    timings
}

/// hyperfine -N splits its command on spaces, honouring quotes.
fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if a.contains(' ') {
                format!("'{a}'")
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The fields we need from hyperfine's --export-json, in command order, without a JSON library:
/// each result object holds one "mean", "stddev", "median", "min" and a "times" array.
fn parse_hyperfine(json: &str) -> Vec<Timing> {
    json.split("\"command\":")
        .skip(1)
        .map(|result| {
            let field = |key: &str| -> f64 {
                let at = result
                    .find(&format!("\"{key}\":"))
                    .unwrap_or_else(|| panic!("no {key} in hyperfine output"))
                    + key.len()
                    + 3;
                let rest = result[at..].trim_start();
                let end = rest
                    .find(|c: char| !(c.is_ascii_digit() || ".-+eE".contains(c)))
                    .unwrap_or(rest.len());
                rest[..end].parse().expect("a number")
            };
            let runs = result
                .split("\"times\":")
                .nth(1)
                .and_then(|t| t.split(']').next())
                .map_or(0, |t| t.split(',').count());
            Timing {
                mean: field("mean"),
                stddev: field("stddev"),
                median: field("median"),
                min: field("min"),
                runs,
            }
        })
        .collect()
}

/// Runs the candidates in turn, round after round (so drift in the machine's speed hits all of
/// them alike), timing each process from spawn to exit.
fn with_loop(candidates: &[Candidate]) -> Vec<Timing> {
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); candidates.len()];
    let rounds = candidates.iter().map(|c| c.runs).max().unwrap_or(0);
    for round in 0..rounds + rounds / 10 {
        for (i, c) in candidates.iter().enumerate() {
            if round >= c.runs + c.runs / 10 {
                continue;
            }
            let start = Instant::now();
            let status = Command::new(&c.argv[0])
                .args(&c.argv[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .status()
                .expect("run");
            let took = start.elapsed().as_secs_f64();
            assert!(status.success(), "{}: {status}", c.name);
            // The first tenth warms caches up and is not counted.
            if round >= c.runs / 10 {
                samples[i].push(took);
            }
        }
    }
    samples.into_iter().map(|s| summarize(&s)).collect()
}

fn summarize(samples: &[f64]) -> Timing {
    let n = samples.len() as f64;
    let mean = samples.iter().sum::<f64>() / n;
    let var = samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    Timing {
        mean,
        stddev: var.sqrt(),
        median: sorted[sorted.len() / 2],
        min: sorted[0],
        runs: samples.len(),
    }
}

// ---------------------------------------------------------------------------------------------
// Report

fn print_report(
    candidates: &[Candidate],
    timings: &[Timing],
    method: &str,
    notes: &[String],
    busy: String,
) {
    let mut out = String::new();
    let _ = writeln!(out, "\n## `tcpnetlock do` against flock\n");
    for (k, v) in machine(busy) {
        let _ = writeln!(out, "- {k}: {v}");
    }
    let envs: String = [
        "CARGO_TARGET_DIR",
        "TCPNETLOCK_BENCH_RUNS",
        "TCPNETLOCK_BENCH_MUSL",
        "TCPNETLOCK_BENCH_PYTHON",
    ]
    .iter()
    .filter_map(|k| env::var(k).ok().map(|v| format!("{k}={v} ")))
    .collect();
    let _ = writeln!(out, "- Command: `{envs}cargo bench --bench do`");
    let _ = writeln!(out, "- Timing: {method}, no shell in between");
    let _ = writeln!(
        out,
        "- Server: this crate's release build on 127.0.0.1 (same machine); every `do` takes and \
         releases the lock `bench`"
    );
    for note in notes {
        let _ = writeln!(out, "- {note}");
    }
    let _ = writeln!(out, "\nCommand lines:\n");
    for c in candidates {
        let _ = writeln!(out, "- {}: `{}`", c.name, shell_words(&c.argv));
    }
    let _ = writeln!(
        out,
        "\n| Command | runs | mean | σ | median | min | mean vs flock | median vs flock |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|"
    );
    let flock = timings[0].mean;
    for (c, t) in candidates.iter().zip(timings) {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {:.2}x | {:.2}x |",
            c.name,
            t.runs,
            ms(t.mean),
            ms(t.stddev),
            ms(t.median),
            ms(t.min),
            t.mean / flock,
            t.median / timings[0].median
        );
    }
    let ratio = timings[1].mean / flock;
    let verdict = if ratio <= TARGET_RATIO {
        "MET"
    } else {
        "MISSED"
    };
    let _ = writeln!(
        out,
        "\nTarget: `tcpnetlock do -- true` at most {TARGET_RATIO}x `flock FILE true`: \
         {ratio:.2}x, {verdict}."
    );
    print!("{out}");
}

fn ms(secs: f64) -> String {
    format!("{:.2} ms", secs * 1000.0)
}

fn machine(busy: String) -> Vec<(&'static str, String)> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown".into(), |(_, v)| v.trim().to_owned());
    vec![
        (
            "CPUs (nproc)",
            thread::available_parallelism().map_or("?".into(), |n| n.to_string()),
        ),
        ("CPU model", model),
        (
            "Kernel (uname -r)",
            fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or("?".into(), |s| s.trim().to_owned()),
        ),
        (
            "Date",
            output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])).unwrap_or_default(),
        ),
        (
            "Rust",
            output(Command::new("rustc").arg("-V")).unwrap_or_default(),
        ),
        (
            "flock",
            output(Command::new("flock").arg("--version")).unwrap_or_default(),
        ),
        ("Other load before the run", busy),
    ]
}

/// Percent of all CPUs' time not idle over `span`, from /proc/stat (the load average of a VM
/// can say little about its CPUs).
fn cpu_busy_pct(span: Duration) -> Option<f64> {
    let sample = || -> Option<(u64, u64)> {
        let text = fs::read_to_string("/proc/stat").ok()?;
        let v: Vec<u64> = text
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal
        Some((
            v.iter().take(8).sum(),
            v.get(3)? + v.get(4).copied().unwrap_or(0),
        ))
    };
    let (t0, i0) = sample()?;
    thread::sleep(span);
    let (t1, i1) = sample()?;
    let total = t1.checked_sub(t0).filter(|t| *t > 0)?;
    Some(100.0 * (1.0 - (i1 - i0) as f64 / total as f64))
}

// ---------------------------------------------------------------------------------------------
// The programs

/// `<target dir>`, from this bench's own path `<target dir>/release/deps/do-*`.
fn target_dir() -> PathBuf {
    if let Ok(exe) = env::current_exe()
        && let Some(deps) = exe.parent()
        && deps.file_name().is_some_and(|n| n == "deps")
        && let Some(target) = deps.parent().and_then(Path::parent)
    {
        return target.to_owned();
    }
    env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
        PathBuf::from,
    )
}

/// The static build, made with cargo into the same target dir when the musl target is there.
fn musl_binary() -> Result<PathBuf, String> {
    const TARGET: &str = "x86_64-unknown-linux-musl";
    if env::var("TCPNETLOCK_BENCH_MUSL").is_ok_and(|v| v == "0") {
        return Err("skipped (TCPNETLOCK_BENCH_MUSL=0)".into());
    }
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))
        .is_some_and(|list| list.lines().any(|l| l == TARGET));
    if !installed {
        return Err(format!(
            "the {TARGET} target is not installed (rustup target add {TARGET})"
        ));
    }
    let status = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args([
            "build",
            "--release",
            "--bin",
            "tcpnetlock",
            "--target",
            TARGET,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CARGO_TARGET_DIR", target_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    let bin = target_dir().join(TARGET).join("release").join("tcpnetlock");
    if status.success() && bin.is_file() {
        Ok(bin)
    } else {
        Err(format!("cargo build --target {TARGET} failed ({status})"))
    }
}

/// 0.1.8's tcpnetlock_do, from the venv shared with the load bench.
fn python_do() -> Result<PathBuf, String> {
    if env::var("TCPNETLOCK_BENCH_PYTHON").is_ok_and(|v| v == "0") {
        return Err("skipped (TCPNETLOCK_BENCH_PYTHON=0)".into());
    }
    let venv = target_dir().join("bench-venv");
    let exe = venv.join("bin").join("tcpnetlock_do");
    if exe.is_file() {
        return Ok(exe);
    }
    eprintln!(
        "bench: creating {} with tcpnetlock=={PY_VERSION}",
        venv.display()
    );
    let python = venv.join("bin").join("python");
    if !python.is_file() {
        run_quiet(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    run_quiet(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
        &format!("tcpnetlock=={PY_VERSION}"),
    ]))?;
    if exe.is_file() {
        Ok(exe)
    } else {
        Err(format!("no {} after pip install", exe.display()))
    }
}

fn run_quiet(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{:?} failed ({}): {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// This crate's server on a free loopback port, killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(bin: &Path) -> Server {
        let mut child = Command::new(bin)
            .args(["server", "--listen", "127.0.0.1:0", "--log", "stderr"])
            .env_remove("LISTEN_FDS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the server");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // Keeps reading, so the server never blocks on a full pipe.
        thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr.trim().to_owned());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the server did not say where it listens")
            .parse()
            .expect("an address");
        Server { child, addr }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
