//! Redis as a lock server: `SET key value NX PX ms` takes the lock, `DEL key` releases it. The
//! bench speaks RESP itself over a TcpStream, one fresh connection per cycle as for tcpnetlock.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{Held, Ready, Samples, Server, TempDir, command_output, free_port};
use crate::cycles;
use crate::line::{LATENCY_BUDGET, LATENCY_PAUSE, LATENCY_SAMPLES};
use crate::net::Client;

/// A lock's expiry: far longer than any cycle, so no lock expires while the bench holds it.
const PX: &str = "30000";

/// How Redis is started: persistence off, as tcpnetlock keeps nothing on disk either.
pub fn command_line() -> &'static str {
    "redis-server --port PORT --bind 127.0.0.1 --save '' --appendonly no --dir TMPDIR"
}

pub fn version(bin: &Path) -> String {
    // "Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64 build=..."
    let v = command_output(Command::new(bin).arg("--version")).unwrap_or_default();
    let field = |k: &str| {
        v.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or("?")
            .to_owned()
    };
    format!("Redis {}, malloc {}", field("v="), field("malloc="))
}

pub fn start(bin: &Path) -> Result<Server, String> {
    let dir = TempDir::new("redis").map_err(|e| format!("temp dir: {e}"))?;
    let port = free_port().map_err(|e| format!("no free port: {e}"))?;
    let mut cmd = Command::new(bin);
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(&dir.0);
    let mut server = Server::spawn(cmd, Ready::Probe(([127, 0, 0, 1], port).into(), ping))?;
    server.dir = Some(dir);
    Ok(server)
}

/// A RESP array of bulk strings: how a client sends a command.
fn resp(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        let _ = write!(out, "${}\r\n{a}\r\n", a.len());
    }
    out
}

fn ping(addr: SocketAddr) -> bool {
    let Ok(mut c) = Client::connect(addr, None) else {
        return false;
    };
    c.send(&resp(&["PING"])).is_ok() && c.expect("+PONG").is_ok()
}

/// `SET name holder NX PX 30000`: Ok(true) `+OK`, Ok(false) the null reply (someone holds it).
fn set_nx(c: &mut Client, name: &str) -> Result<bool, String> {
    c.send(&resp(&["SET", name, "holder", "NX", "PX", PX]))?;
    match c
        .line()
        .map_err(|e| format!("waiting for SET's reply: {e}"))?
        .as_str()
    {
        "+OK" => Ok(true),
        "$-1" => Ok(false),
        other => Err(format!("SET reply {other:?}")),
    }
}

/// `DEL name` (when held) and `QUIT` in one write, their replies, then the server's end of
/// file. QUIT makes Redis close first, as tcpnetlock does after `released`: the TIME_WAIT is on
/// the server's side in both, and the round trips are the same, two per cycle.
fn finish(mut c: Client, name: Option<&str>) -> Result<(), String> {
    let mut out = name.map_or_else(Vec::new, |n| resp(&["DEL", n]));
    out.extend(resp(&["QUIT"]));
    c.send(&out)?;
    if name.is_some() {
        c.expect(":1")?;
    }
    c.expect("+OK")?;
    c.wait_eof()
}

/// One cycle on a fresh connection: connect, SET NX PX, DEL + QUIT, the server's end of file.
pub fn cycle(addr: SocketAddr, name: &str) -> Result<bool, String> {
    let mut c = Client::connect(addr, None).map_err(|e| format!("connect: {e}"))?;
    let granted = set_nx(&mut c, name)?;
    finish(c, granted.then_some(name))?;
    Ok(granted)
}

/// The reference figure for memory: a fresh Redis, warmed up (200 cycles), then `n` keys set
/// with SET NX PX over one pipelined connection. Keys, not connections: a Redis lock needs no
/// connection while it is held. Also 200 new locks (connect → `+OK`) while the keys are there.
pub fn held(bin: &Path, n: usize, problems: &mut Vec<String>) -> Option<Held> {
    let mut server = start(bin)
        .map_err(|e| problems.push(format!("keys: {e}")))
        .ok()?;
    eprintln!("bench: Redis: {n} keys on {}", server.addr);
    let idle = cycles::warm_idle(&mut server, cycle, problems)?;
    let t0 = Instant::now();
    let (set, errors) = match set_many(server.addr, n) {
        Ok(set) => (set, (n - set) as u64),
        Err(e) => {
            problems.push(format!("keys: {e}"));
            (0, n as u64)
        }
    };
    let open_secs = t0.elapsed().as_secs_f64();
    thread::sleep(Duration::from_millis(500));
    let loaded = server.status()?;
    let cpu_pct = Held::idle_cpu_pct(&server);
    // From 127.0.0.1: Redis's protected mode refuses other loopback addresses, and no
    // connection is held here that would slow the choice of a source port.
    let latency = Samples::collect(
        0,
        LATENCY_SAMPLES,
        LATENCY_PAUSE,
        LATENCY_BUDGET,
        u64::MAX,
        |i| {
            let name = format!("lat-{i}");
            let start = Instant::now();
            let mut c = Client::connect(server.addr, None).map_err(|e| format!("connect: {e}"))?;
            let granted = set_nx(&mut c, &name)?;
            let took = start.elapsed();
            finish(c, granted.then_some(&name))?;
            if granted {
                Ok(took)
            } else {
                Err("not granted".into())
            }
        },
    );
    if let Some(e) = &latency.first_error {
        problems.push(format!("latency: {} errors, first: {e}", latency.errors));
    }
    if !server.alive() {
        problems.push(server.failure("died while holding keys"));
    }
    Some(Held {
        wanted: n,
        held: set,
        open_secs,
        timed_out: false,
        errors,
        idle,
        loaded,
        cpu_pct,
        latency,
    })
}

/// SET NX PX for keys `h-0` … `h-(n-1)`, 1,000 commands per write; the number set.
fn set_many(addr: SocketAddr, n: usize) -> Result<usize, String> {
    let mut c = Client::connect(addr, None).map_err(|e| format!("connect: {e}"))?;
    let mut set = 0;
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut out = Vec::new();
        for i in chunk {
            out.extend(resp(&[
                "SET",
                &format!("h-{i}"),
                "holder",
                "NX",
                "PX",
                "3600000",
            ]));
        }
        c.send(&out)?;
        for _ in chunk {
            if c.line().map_err(|e| format!("SET reply: {e}"))? == "+OK" {
                set += 1;
            }
        }
    }
    finish(c, None)?;
    Ok(set)
}
