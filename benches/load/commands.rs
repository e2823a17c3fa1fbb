//! Running a command under a lock, as a shell script or a cron job does: whole processes timed
//! from start to exit, the command being `true`, so the figures are each locking tool's own
//! overhead. hyperfine times them (`-N`: no shell in between) when it is installed, else an
//! in-Rust loop.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::common::{command_output, target_dir};

pub const TARGET_RATIO: f64 = 1.5;

/// One command line to time.
pub struct Candidate {
    pub name: String,
    pub argv: Vec<String>,
    pub runs: usize,
}

/// Timing of one candidate, in seconds.
pub struct Timing {
    pub mean: f64,
    pub stddev: f64,
    pub median: f64,
    pub min: f64,
    pub runs: usize,
}

pub fn hyperfine_version() -> Option<String> {
    command_output(Command::new("hyperfine").arg("--version"))
}

/// Every command must succeed before it is timed: a fast failure would look like a fast tool.
pub fn check_runs(c: &Candidate) -> Result<(), String> {
    let out = Command::new(&c.argv[0])
        .args(&c.argv[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: cannot run {:?}: {e}", c.name, c.argv))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} failed ({}): {}",
            c.name,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Times the candidates; with hyperfine, one invocation per run of candidates with equal run
/// counts, so that flock and `do` are timed in the same invocation, one after the other.
pub fn time(candidates: &[Candidate], scratch: &Path) -> Result<Vec<Timing>, String> {
    if hyperfine_version().is_none() {
        return Ok(with_loop(candidates));
    }
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
        let status = cmd
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run hyperfine: {e}"))?;
        if !status.success() {
            return Err(format!("hyperfine failed: {status}"));
        }
        let text = fs::read_to_string(&json).map_err(|e| format!("hyperfine's JSON: {e}"))?;
        timings.extend(parse_hyperfine(&text)?);
        start = end;
    }
    Ok(timings)
}

/// hyperfine -N splits its command on spaces, honouring quotes.
pub fn shell_words(argv: &[String]) -> String {
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
fn parse_hyperfine(json: &str) -> Result<Vec<Timing>, String> {
    json.split("\"command\":")
        .skip(1)
        .map(|result| {
            let field = |key: &str| -> Result<f64, String> {
                let at = result
                    .find(&format!("\"{key}\":"))
                    .ok_or_else(|| format!("no {key} in hyperfine's JSON"))?
                    + key.len()
                    + 3;
                let rest = result[at..].trim_start();
                let end = rest
                    .find(|c: char| !(c.is_ascii_digit() || ".-+eE".contains(c)))
                    .unwrap_or(rest.len());
                rest[..end]
                    .parse()
                    .map_err(|e| format!("{key} in hyperfine's JSON: {e}"))
            };
            let runs = result
                .split("\"times\":")
                .nth(1)
                .and_then(|t| t.split(']').next())
                .map_or(0, |t| t.split(',').count());
            Ok(Timing {
                mean: field("mean")?,
                stddev: field("stddev")?,
                median: field("median")?,
                min: field("min")?,
                runs,
            })
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
            let ok = Command::new(&c.argv[0])
                .args(&c.argv[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            let took = start.elapsed().as_secs_f64();
            // The first tenth warms caches up and is not counted.
            if ok && round >= c.runs / 10 {
                samples[i].push(took);
            }
        }
    }
    samples.into_iter().map(|s| summarize(&s)).collect()
}

fn summarize(samples: &[f64]) -> Timing {
    let n = samples.len() as f64;
    let mean = samples.iter().sum::<f64>() / n.max(1.0);
    let var = samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    Timing {
        mean,
        stddev: var.sqrt(),
        median: sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN),
        min: sorted.first().copied().unwrap_or(f64::NAN),
        runs: samples.len(),
    }
}

/// The static build, made with cargo into the same target dir when the musl target is there.
pub fn musl_binary() -> Result<PathBuf, String> {
    const TARGET: &str = "x86_64-unknown-linux-musl";
    let installed = command_output(Command::new("rustup").args(["target", "list", "--installed"]))
        .is_some_and(|list| list.lines().any(|l| l == TARGET));
    if !installed {
        return Err(format!(
            "the {TARGET} target is not installed (rustup target add {TARGET})"
        ));
    }
    let status = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "--release", "--bin", "tcpnetlock"])
        .args(["--target", TARGET])
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
