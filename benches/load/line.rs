//! The two servers that speak the tcpnetlock line protocol, this one and 0.1.8: starting them,
//! one lock+release cycle, and many holders at once.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{Held, Ready, Samples, Server, free_port};
use crate::cycles;
use crate::net::Client;

/// Time allowed to open all the holders; past it the bench measures with those it has.
pub const HOLD_DEADLINE: Duration = Duration::from_secs(60);
/// Threads opening holder connections, each one connection at a time. Four keeps at most four
/// connections in the accept queue, under the backlog of 5 that 0.1.8's socketserver listens with.
pub const OPENERS: usize = 4;
/// Holders per client source address. Linux picks a connect()'s ephemeral port by probing ports
/// one after another for a free (source, destination) pair, so 15,000 connections from one
/// address to one server make every further connect() from that address scan thousands of used
/// ports: ~1 ms of kernel time on the *client* side, measured, not the server's doing. Real
/// holders come from many hosts; spreading them over loopback addresses (all of 127/8 is local)
/// keeps that client-side cost out of the server's numbers.
pub const PER_SOURCE: usize = 500;
/// Where the latency samples come from: an address no holder uses.
pub const LATENCY_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
pub const LATENCY_SAMPLES: usize = 200;
pub const LATENCY_PAUSE: Duration = Duration::from_millis(5);
pub const LATENCY_BUDGET: Duration = Duration::from_secs(30);
/// The default of 10,000 would refuse part of the 15,000 holders.
const RUST_MAX_CONNECTIONS: &str = "19000";

#[derive(Clone)]
pub enum LineServer {
    /// This crate's binary.
    Rust(PathBuf),
    /// The venv holding 0.1.8.
    Python(PathBuf),
}

impl LineServer {
    pub fn command_line(&self) -> String {
        match self {
            LineServer::Rust(_) => format!(
                "tcpnetlock server --listen 127.0.0.1:0 --log stderr \
                 --max-connections {RUST_MAX_CONNECTIONS}"
            ),
            LineServer::Python(_) => "tcpnetlock_server --listen 127.0.0.1 --port PORT".into(),
        }
    }

    pub fn start(&self) -> Result<Server, String> {
        match self {
            LineServer::Rust(bin) => {
                let mut cmd = Command::new(bin);
                cmd.args(["server", "--listen", "127.0.0.1:0", "--log", "stderr"])
                    .args(["--max-connections", RUST_MAX_CONNECTIONS]);
                Server::spawn(cmd, Ready::Announced)
            }
            LineServer::Python(venv) => {
                let port = free_port().map_err(|e| format!("no free port: {e}"))?;
                let mut cmd = Command::new(venv.join("bin").join("tcpnetlock_server"));
                cmd.args(["--listen", "127.0.0.1", "--port", &port.to_string()]);
                Server::spawn(cmd, Ready::Probe(([127, 0, 0, 1], port).into(), ping))
            }
        }
    }
}

fn ping(addr: SocketAddr) -> bool {
    let Ok(mut c) = Client::connect(addr, None) else {
        return false;
    };
    c.send(b".ping\n").is_ok() && c.expect("pong").is_ok()
}

/// Connects and asks for `name` (with `extra` parameters such as `,wait:10`). Ok(Some(client))
/// when granted (still holding), Ok(None) when not granted.
pub fn lock(
    addr: SocketAddr,
    src: Option<Ipv4Addr>,
    name: &str,
    extra: &str,
) -> Result<Option<Client>, String> {
    let mut c = Client::connect(addr, src).map_err(|e| format!("connect: {e}"))?;
    c.send(format!("lock,name:{name}{extra}\n").as_bytes())?;
    match c
        .line()
        .map_err(|e| format!("waiting for ok: {e}"))?
        .as_str()
    {
        "ok" => Ok(Some(c)),
        "not-granted" => {
            c.wait_eof()?;
            Ok(None)
        }
        other => Err(format!("lock reply {other:?}")),
    }
}

/// `release`, `released`, end of file.
pub fn release(mut c: Client) -> Result<(), String> {
    c.send(b"release\n")?;
    c.expect("released")?;
    c.wait_eof()
}

/// One cycle on a fresh connection: connect, `lock,name:N`, `ok`, `release`, `released`, the
/// server's end of file, close.
pub fn cycle(addr: SocketAddr, name: &str) -> Result<bool, String> {
    match lock(addr, None, name, "")? {
        Some(c) => release(c).map(|()| true),
        None => Ok(false),
    }
}

/// `"waiting"` in the server's `.stats`: waiters queued on all names.
pub fn stats_waiting(addr: SocketAddr) -> Result<u64, String> {
    stats_count(addr, "waiting")
}

/// The number under `key` in the server's `.stats`.
pub fn stats_count(addr: SocketAddr, key: &str) -> Result<u64, String> {
    let mut c = Client::connect(addr, None).map_err(|e| format!(".stats connect: {e}"))?;
    c.send(b".stats\n")?;
    // The reply is longer than `Client`'s line buffer; the server closes after it.
    let mut text = Vec::new();
    c.stream
        .read_to_end(&mut text)
        .map_err(|e| format!("reading .stats: {e}"))?;
    let text = String::from_utf8_lossy(&text);
    text.split(&format!("\"{key}\": "))
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!(".stats has no \"{key}\": {}", text.trim()))
}

/// A fresh server, warmed up (200 cycles), then `n` connections each holding a distinct lock;
/// its memory, threads and CPU before and after, and 200 new locks while they are held.
pub fn held(imp: &LineServer, n: usize, label: &str, problems: &mut Vec<String>) -> Option<Held> {
    let mut server = imp
        .start()
        .map_err(|e| problems.push(format!("holders: {e}")))
        .ok()?;
    eprintln!("bench: {label}: {n} holders on {}", server.addr);
    let idle = cycles::warm_idle(&mut server, cycle, problems)?;
    let holding = open_holders(server.addr, n, label, |i| format!("h-{i}"), "");
    thread::sleep(Duration::from_millis(500));
    let loaded = server.status();
    let cpu_pct = Held::idle_cpu_pct(&server);
    eprintln!(
        "bench: {label}: {} held in {:.1} s; latency of a fresh lock",
        holding.clients.len(),
        holding.secs
    );
    let latency = measure_latency(server.addr);
    if !server.alive() {
        problems.push(server.failure("died while holding locks"));
    }
    let Some(loaded) = loaded else {
        problems.push(server.failure("has no /proc status with the holders"));
        return None;
    };
    // Stop the server before letting go of the holders: 15,000 closes would only make work.
    drop(server);
    let held = holding.clients.len();
    drop(holding.clients);
    if let Some(e) = &holding.first_error {
        problems.push(format!("holders: {} errors, first: {e}", holding.errors));
    }
    if let Some(e) = &latency.first_error {
        problems.push(format!("latency: {} errors, first: {e}", latency.errors));
    }
    Some(Held {
        wanted: n,
        held,
        open_secs: holding.secs,
        timed_out: holding.timed_out,
        errors: holding.errors,
        idle,
        loaded,
        cpu_pct,
        latency,
    })
}

pub struct Holding {
    pub clients: Vec<Client>,
    pub secs: f64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub timed_out: bool,
}

/// Opens `n` connections from [`OPENERS`] threads, connection `i` asking for `name(i)` with
/// `extra` parameters (`h-<i>` and none for distinct plain locks).
pub fn open_holders(
    addr: SocketAddr,
    n: usize,
    label: &str,
    name: fn(usize) -> String,
    extra: &'static str,
) -> Holding {
    let done = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + HOLD_DEADLINE;
    let t0 = Instant::now();
    let handles: Vec<_> = (0..OPENERS)
        .map(|o| {
            let done = Arc::clone(&done);
            thread::spawn(move || {
                let mut clients = Vec::with_capacity(n / OPENERS + 1);
                let (mut errors, mut first_error, mut timed_out) = (0u64, None, false);
                for i in (o..n).step_by(OPENERS) {
                    if Instant::now() > deadline {
                        timed_out = true;
                        break;
                    }
                    let name = name(i);
                    match lock(addr, Some(holder_source(i)), &name, extra) {
                        Ok(Some(c)) => {
                            clients.push(c);
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(None) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| format!("{name} not granted"));
                        }
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert(e);
                        }
                    }
                    if errors > 50 {
                        break;
                    }
                }
                (clients, errors, first_error, timed_out)
            })
        })
        .collect();
    let mut last_report = Instant::now();
    while !handles.iter().all(|h| h.is_finished()) {
        thread::sleep(Duration::from_millis(20));
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "bench: {label}: {} of {n} holders after {:.0} s",
                done.load(Ordering::Relaxed),
                t0.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let mut h = Holding {
        clients: Vec::with_capacity(n),
        secs,
        errors: 0,
        first_error: None,
        timed_out: false,
    };
    for handle in handles {
        let (clients, errors, first_error, timed_out) = handle.join().expect("opener thread");
        h.clients.extend(clients);
        h.errors += errors;
        h.timed_out |= timed_out;
        if h.first_error.is_none() {
            h.first_error = first_error;
        }
    }
    h
}

/// The source address of holder `i`: [`PER_SOURCE`] holders per address, from 127.1.0.1 on.
fn holder_source(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 1, 0, 1)) + (i / PER_SOURCE) as u32)
}

/// Connect to `ok` for new names, one at a time, 5 ms apart, from an address no holder uses.
fn measure_latency(addr: SocketAddr) -> Samples {
    Samples::collect(
        0,
        LATENCY_SAMPLES,
        LATENCY_PAUSE,
        LATENCY_BUDGET,
        u64::MAX,
        |i| {
            let start = Instant::now();
            let c =
                lock(addr, Some(LATENCY_SOURCE), &format!("lat-{i}"), "")?.ok_or("not granted")?;
            let took = start.elapsed();
            release(c).map(|()| took)
        },
    )
}
