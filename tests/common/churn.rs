//! Mutual exclusion under churn, with every client in a process of its own: the client
//! processes, the test's driver that kills them, and the check of what they recorded. Used by
//! tests/faults_churn.rs (one server) and tests/cluster.rs (members of one cluster, each request
//! through any of them).
//!
//! Client processes contend for two mutexes and a semaphore of 3 with `wait:`, leave by release,
//! close, reset (SO_LINGER 0) or half-close, sometimes give up while queued, and are SIGKILLed
//! at random (and replaced) by the driver.
//!
//! Each client process appends a line to a shared file right after it reads `ok` and right before
//! it lets go, stamped with CLOCK_MONOTONIC (one clock for every process on the machine). The file
//! is opened with O_APPEND and each line is one write, so lines from different processes never
//! mix. The driver stamps each kill just before it sends SIGKILL: that is the end of whatever the
//! killed process held. A hold is the interval [`ok` read, end]; a server can only give the
//! place to someone else after the end, so at no instant may more than K intervals of a name
//! overlap. Fencing tokens must follow the grant order, and no waiter may run out of its wait.
//!
//! The client processes are the test binary run again as `<exe> --exact churn_worker`: each test
//! file that drives churn has a test of that name that calls [`worker_main`] (with
//! TCPNETLOCK_CHURN_WORKER set it is the client loop; without it, it returns at once).
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::TempDir;

/// Names the clients contend for: (name, K).
pub const NAMES: [(&str, usize); 3] = [("m0", 1), ("m1", 1), ("s3", 3)];
/// Client processes alive at any time.
pub const WORKERS: usize = 12;
pub const WORKER_ENV: &str = "TCPNETLOCK_CHURN_WORKER";
pub const SERVERS_ENV: &str = "TCPNETLOCK_CHURN_SERVERS";
pub const RECORDS_ENV: &str = "TCPNETLOCK_CHURN_RECORDS";
pub const PARENT_ENV: &str = "TCPNETLOCK_CHURN_PARENT";

/// CLOCK_MONOTONIC in nanoseconds: comparable between processes, unlike `Instant`'s origin.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the struct we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: u64) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

// ---------------------------------------------------------------------------------------------
// The client process.

/// The client process: call it from a test named `churn_worker` (the one [`drive`] runs
/// again). Runs the client loop when TCPNETLOCK_CHURN_WORKER is set; otherwise does nothing.
pub fn worker_main() {
    let Ok(id) = std::env::var(WORKER_ENV) else {
        return;
    };
    let id: u64 = id.parse().unwrap();
    let servers: Vec<SocketAddr> = std::env::var(SERVERS_ENV)
        .unwrap()
        .split(',')
        .map(|a| a.parse().unwrap())
        .collect();
    let records = PathBuf::from(std::env::var_os(RECORDS_ENV).unwrap());
    let parent: i32 = std::env::var(PARENT_ENV).unwrap().parse().unwrap();
    // SAFETY: plain system calls. If the test dies, its clients die with it.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != parent {
            return;
        }
    }
    client_loop(id, &servers, &records);
}

/// Every record is this long, padded with spaces before its `\n`.
pub const RECORD: usize = 128;

/// Appends one record with one write(2). A SIGKILL can cut a write short only where it crosses
/// a page boundary of the file (the kernel checks for a fatal signal between pages), so every
/// record has the same size, a divisor of the page size: none ever crosses one.
pub fn record(out: &mut File, line: String) {
    let mut bytes = line.into_bytes();
    bytes.truncate(RECORD - 1);
    bytes.resize(RECORD - 1, b' ');
    bytes.push(b'\n');
    let n = out.write(&bytes).unwrap();
    assert_eq!(n, RECORD, "short write of a record");
}

/// Takes locks until killed. Lines written (all times CLOCK_MONOTONIC ns):
///   `G worker name max token asked ok`  granted (asked: before the request was written)
///   `H worker token t`                  half-closed while holding (still holds)
///   `E worker token t how`              about to let go: R release, C close, S reset, H close
///                                       after a half-close
///   `A worker name t`                   gave up while queued (reset)
///   `X worker what`                     something unexpected; the process then panics
pub fn client_loop(id: u64, servers: &[SocketAddr], records: &Path) -> ! {
    let mut out = OpenOptions::new().append(true).open(records).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (id + 1).wrapping_mul(0x1000_0001) ^ now_ns());
    loop {
        let (name, max) = NAMES[rng.below(NAMES.len() as u64) as usize];
        // Each request through any of the servers.
        let addr = servers[rng.below(servers.len() as u64) as usize];
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| {
            record(&mut out, format!("X {id} connect: {e}"));
            panic!("connect: {e}")
        });
        stream.set_nodelay(true).unwrap();
        let asked = now_ns();
        (&stream)
            .write_all(format!("lock,name:{name},max:{max},wait:60,fencing:1\n").as_bytes())
            .unwrap();
        // Now and then give up while (probably) queued, by a reset.
        let give_up = rng.below(100) < 3;
        let patience = if give_up {
            Duration::from_micros(500 + rng.below(4000))
        } else {
            Duration::from_secs(90)
        };
        stream.set_read_timeout(Some(patience)).unwrap();
        let mut reader = BufReader::new(&stream);
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(_) if line.starts_with("ok,token:") => {}
            Err(e)
                if give_up
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    )
                    && line.is_empty() =>
            {
                record(&mut out, format!("A {id} {name} {}", now_ns()));
                reset(&stream);
                continue;
            }
            other => {
                record(&mut out, format!("X {id} {name}: {other:?} {line:?}"));
                panic!("{name}: {other:?} {line:?}");
            }
        }
        let ok = now_ns();
        let token: u64 = line["ok,token:".len()..].trim_end().parse().unwrap();
        record(
            &mut out,
            format!("G {id} {name} {max} {token} {asked} {ok}"),
        );
        thread::sleep(Duration::from_micros(rng.below(1500)));
        let end = |out: &mut File, how: char| {
            record(out, format!("E {id} {token} {} {how}", now_ns()));
        };
        match rng.below(100) {
            0..45 => {
                end(&mut out, 'R');
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                (&stream).write_all(b"release\n").unwrap();
                line.clear();
                reader.read_line(&mut line).unwrap();
                if line != "released\n" {
                    record(&mut out, format!("X {id} release: {line:?}"));
                    panic!("release: {line:?}");
                }
            }
            45..65 => {
                end(&mut out, 'C');
                drop(stream);
            }
            65..80 => {
                end(&mut out, 'S');
                reset(&stream);
            }
            // Half-closing is not letting go: the server must keep the lock until the socket
            // is gone (here, a few milliseconds later, or at a SIGKILL meanwhile).
            n => {
                stream.shutdown(Shutdown::Write).unwrap();
                record(&mut out, format!("H {id} {token} {}", now_ns()));
                let stay = if n == 99 {
                    Duration::from_millis(20 + rng.below(80))
                } else {
                    Duration::from_micros(rng.below(3000))
                };
                thread::sleep(stay);
                end(&mut out, 'H');
                drop(stream);
            }
        }
    }
}

/// Closes with a reset instead of a FIN.
pub fn reset(stream: &TcpStream) {
    socket2::SockRef::from(stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    // Dropping the caller's stream closes it; shutting down here would send a FIN first.
}

// ---------------------------------------------------------------------------------------------
// The test: client processes, the killer, and the check.

/// The client processes, one per slot; each spawn gets a new worker id. Killed on drop.
pub struct Workers {
    dir: PathBuf,
    servers: String,
    records: PathBuf,
    slots: Vec<Option<(u64, Child)>>,
    next_id: u64,
    /// (worker id, CLOCK_MONOTONIC ns just before SIGKILL)
    kills: Vec<(u64, u64)>,
}

impl Workers {
    fn spawn(&mut self, slot: usize) {
        let id = self.next_id;
        self.next_id += 1;
        let err = File::create(self.dir.join(format!("worker-{id}.err"))).unwrap();
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["churn_worker", "--exact", "--nocapture", "--test-threads=1"])
            .env(WORKER_ENV, id.to_string())
            .env(SERVERS_ENV, &self.servers)
            .env(RECORDS_ENV, &self.records)
            .env(PARENT_ENV, std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start a client process");
        self.slots[slot] = Some((id, child));
    }

    fn kill(&mut self, slot: usize) {
        if let Some((id, mut child)) = self.slots[slot].take() {
            let t = now_ns();
            child.kill().unwrap();
            child.wait().unwrap();
            self.kills.push((id, t));
        }
    }

    /// A client process only ends when killed: one that exited by itself failed.
    fn check_alive(&mut self) {
        for (id, child) in self.slots.iter_mut().flatten() {
            if let Some(status) = child.try_wait().unwrap() {
                let err = std::fs::read_to_string(self.dir.join(format!("worker-{id}.err")));
                panic!(
                    "client process {id} exited by itself ({status}):\n{}",
                    err.unwrap_or_default()
                );
            }
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for slot in 0..self.slots.len() {
            self.kill(slot);
        }
    }
}

/// Follows the records as the file grows: how many grants, and which client processes hold a
/// lock right now (granted, not yet let go).
pub struct Tracker {
    file: File,
    partial: Vec<u8>,
    grants: usize,
    holding: HashMap<u64, bool>,
}

impl Tracker {
    fn update(&mut self) -> usize {
        self.file.read_to_end(&mut self.partial).unwrap();
        let complete = self
            .partial
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let text = String::from_utf8_lossy(&self.partial[..complete]).into_owned();
        self.partial.drain(..complete);
        for line in text.lines() {
            let mut f = line.split_whitespace();
            let (kind, worker) = (f.next(), f.next().and_then(|w| w.parse().ok()));
            match (kind, worker) {
                (Some("G"), Some(w)) => {
                    self.grants += 1;
                    self.holding.insert(w, true);
                }
                (Some("E"), Some(w)) => {
                    self.holding.insert(w, false);
                }
                _ => {}
            }
        }
        self.grants
    }

    fn holds(&self, worker: u64) -> bool {
        self.holding.get(&worker).copied().unwrap_or(false)
    }
}

#[derive(Debug, Clone)]
pub struct Hold {
    worker: u64,
    name: String,
    max: usize,
    token: u64,
    asked: u64,
    ok: u64,
    end: Option<u64>,
    how: char,
    half_closed: bool,
}

/// What a run of the driver came to.
pub struct Outcome {
    /// The clients' records.
    pub text: String,
    /// (worker id, CLOCK_MONOTONIC ns just before SIGKILL)
    pub kills: Vec<(u64, u64)>,
    pub took: Duration,
}

/// Runs [`WORKERS`] client processes against `servers` until `target` grants are recorded,
/// killing one every 10-60 ms (half of the time one that holds a lock, as far as the records
/// tell yet) and starting another in its place; then kills them all. Panics if a client fails,
/// if no grant comes for 30 s (`stats` says what the servers think), or past `time_limit`.
pub fn drive(
    servers: &[SocketAddr],
    target: usize,
    time_limit: Duration,
    stats: impl Fn() -> String,
) -> Outcome {
    let dir = TempDir::new("churn");
    let records = dir.path.join("records");
    File::create(&records).unwrap();
    let mut workers = Workers {
        dir: dir.path.clone(),
        servers: servers
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(","),
        records: records.clone(),
        slots: (0..WORKERS).map(|_| None).collect(),
        next_id: 0,
        kills: Vec::new(),
    };
    for slot in 0..WORKERS {
        workers.spawn(slot);
    }
    let mut counter = Tracker {
        file: File::open(&records).unwrap(),
        partial: Vec::new(),
        grants: 0,
        holding: HashMap::new(),
    };
    let start = Instant::now();
    let mut rng = Rng(now_ns() | 1);
    let mut progress = (0, Instant::now());
    while counter.update() < target {
        thread::sleep(Duration::from_millis(10 + rng.below(50)));
        workers.check_alive();
        counter.update();
        let holders: Vec<usize> = (0..WORKERS)
            .filter(|&s| {
                workers.slots[s]
                    .as_ref()
                    .is_some_and(|w| counter.holds(w.0))
            })
            .collect();
        let slot = if !holders.is_empty() && rng.below(2) == 0 {
            holders[rng.below(holders.len() as u64) as usize]
        } else {
            rng.below(WORKERS as u64) as usize
        };
        workers.kill(slot);
        workers.spawn(slot);
        if counter.grants > progress.0 {
            progress = (counter.grants, Instant::now());
        }
        assert!(
            progress.1.elapsed() < Duration::from_secs(30),
            "no grant for 30 s after {} grants; stats: {}",
            progress.0,
            stats()
        );
        assert!(
            start.elapsed() < time_limit,
            "only {} grants in {time_limit:?}",
            counter.grants
        );
    }
    for slot in 0..WORKERS {
        workers.kill(slot);
    }
    let took = start.elapsed();
    Outcome {
        text: std::fs::read_to_string(&records).unwrap(),
        kills: std::mem::take(&mut workers.kills),
        took,
    }
}

/// Checks the records; returns a summary of what was seen.
pub fn check(text: &str, kills: &[(u64, u64)]) -> String {
    let mut holds: Vec<Hold> = Vec::new();
    let mut by_token: HashMap<u64, usize> = HashMap::new();
    let mut gave_up = 0;
    for line in text.lines() {
        assert_eq!(line.len(), RECORD - 1, "torn record {line:?}");
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> u64 {
            f.get(i)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("bad record {line:?}"))
        };
        match f[0] {
            "G" => {
                let token = num(4);
                let hold = Hold {
                    worker: num(1),
                    name: f[2].to_owned(),
                    max: num(3) as usize,
                    token,
                    asked: num(5),
                    ok: num(6),
                    end: None,
                    how: 'K',
                    half_closed: false,
                };
                assert!(
                    by_token.insert(token, holds.len()).is_none(),
                    "token {token} granted twice"
                );
                holds.push(hold);
            }
            "H" | "E" => {
                let i = *by_token
                    .get(&num(2))
                    .unwrap_or_else(|| panic!("{line:?} before its grant"));
                let h = &mut holds[i];
                assert_eq!(h.worker, num(1), "{line:?}");
                if f[0] == "H" {
                    h.half_closed = true;
                } else {
                    h.end = Some(num(3));
                    h.how = f[4].chars().next().unwrap();
                }
            }
            "A" => gave_up += 1,
            _ => panic!("unexpected record {line:?}"),
        }
    }
    // A hold its client never ended was ended by the kill.
    let killed_at: HashMap<u64, u64> = kills.iter().copied().collect();
    let mut killed_holding = 0;
    let mut killed_half_closed = 0;
    for h in holds.iter_mut().filter(|h| h.end.is_none()) {
        let t = *killed_at
            .get(&h.worker)
            .unwrap_or_else(|| panic!("hold {h:?} never ended, and its client was not killed"));
        // SIGKILL was sent after the stamp; if `ok` was read in between, the hold ended later
        // than its start, which is all the check needs.
        h.end = Some(t.max(h.ok));
        killed_holding += 1;
        killed_half_closed += usize::from(h.half_closed);
    }

    let mut per_name = Vec::new();
    for (name, max) in NAMES {
        let mut mine: Vec<&Hold> = holds.iter().filter(|h| h.name == name).collect();
        assert!(mine.iter().all(|h| h.max == max));
        // Overlap depth: at no instant more than K holds of the name. At equal stamps an end
        // counts before a start.
        let mut events: Vec<(u64, i32, usize)> = Vec::new();
        for (i, h) in mine.iter().enumerate() {
            events.push((h.ok, 1, i));
            events.push((h.end.unwrap(), -1, i));
        }
        events.sort();
        let mut open: Vec<usize> = Vec::new();
        // A hold killed the instant it read `ok` ends at its own start stamp, and its end sorts
        // first: then its start is not counted either.
        let mut ended_before_start: Vec<usize> = Vec::new();
        let mut deepest = 0;
        for (t, delta, i) in events {
            if delta < 0 {
                if open.contains(&i) {
                    open.retain(|&o| o != i);
                } else {
                    ended_before_start.push(i);
                }
                continue;
            }
            if ended_before_start.contains(&i) {
                continue;
            }
            open.push(i);
            deepest = deepest.max(open.len());
            if open.len() > max {
                let who: Vec<String> = open
                    .iter()
                    .map(|&o| {
                        let h = mine[o];
                        format!(
                            "token {} worker {} [{}, {}] ended by {} (ended {} ns after this grant)",
                            h.token,
                            h.worker,
                            h.ok,
                            h.end.unwrap(),
                            match h.how {
                                'K' if h.half_closed => "kill while half-closed".into(),
                                'K' => "kill".into(),
                                c => format!("{c}"),
                            },
                            h.end.unwrap() as i64 - t as i64
                        )
                    })
                    .collect();
                panic!(
                    "{name} (max {max}) had {} holders at once:\n  {}",
                    open.len(),
                    who.join("\n  ")
                );
            }
        }
        // Tokens follow the grant order: a mutex's holds do not overlap, so the order in which
        // they read `ok` is the order the server granted them.
        mine.sort_by_key(|h| h.ok);
        if max == 1 {
            for w in mine.windows(2) {
                assert!(
                    w[0].token < w[1].token,
                    "{name}: token {} granted after token {}",
                    w[1].token,
                    w[0].token
                );
            }
        }
        // First come, first served: a request made a full second before another (ample for
        // it to reach the server) is granted first.
        let mut by_asked = mine.clone();
        by_asked.sort_by_key(|h| h.asked);
        let mut earlier = 0;
        let mut highest: Option<&Hold> = None;
        for b in &by_asked {
            while earlier < by_asked.len() && by_asked[earlier].asked + 1_000_000_000 < b.asked {
                let a = by_asked[earlier];
                if highest.is_none_or(|h| a.token > h.token) {
                    highest = Some(a);
                }
                earlier += 1;
            }
            if let Some(a) = highest {
                assert!(
                    a.token < b.token,
                    "{name}: token {} (asked at {}) granted before token {} (asked at {}, more \
                     than 1 s earlier)",
                    b.token,
                    b.asked,
                    a.token,
                    a.asked
                );
            }
        }
        per_name.push(format!("{name}: {} grants, depth {deepest}", mine.len()));
    }

    // Across names: a grant whose `ok` was read before another request was even written has
    // the smaller token.
    let mut by_ok: Vec<&Hold> = holds.iter().collect();
    by_ok.sort_by_key(|h| h.ok);
    let mut by_asked: Vec<&Hold> = holds.iter().collect();
    by_asked.sort_by_key(|h| h.asked);
    let mut i = 0;
    let mut highest: Option<&Hold> = None;
    for b in by_asked {
        while i < by_ok.len() && by_ok[i].ok < b.asked {
            if highest.is_none_or(|h| by_ok[i].token > h.token) {
                highest = Some(by_ok[i]);
            }
            i += 1;
        }
        if let Some(a) = highest {
            assert!(
                a.token < b.token,
                "token {} ({}) is not above token {} ({}), although it was asked for after \
                 that grant was read",
                b.token,
                b.name,
                a.token,
                a.name
            );
        }
    }

    let longest_wait = holds.iter().map(|h| h.ok - h.asked).max().unwrap_or(0);
    let mut how: HashMap<char, usize> = HashMap::new();
    for h in &holds {
        *how.entry(h.how).or_default() += 1;
    }
    assert!(killed_holding > 0, "no kill ever hit a holder");
    format!(
        "{} grants checked ({}); ended by release {}, close {}, reset {}, half-close then close \
         {} ({} half-closed in all), SIGKILL {} ({} of them half-closed); {gave_up} waits given \
         up by a reset; longest wait {:.3} s",
        holds.len(),
        per_name.join(", "),
        how.get(&'R').unwrap_or(&0),
        how.get(&'C').unwrap_or(&0),
        how.get(&'S').unwrap_or(&0),
        how.get(&'H').unwrap_or(&0),
        holds.iter().filter(|h| h.half_closed).count(),
        killed_holding,
        killed_half_closed,
        longest_wait as f64 / 1e9
    )
}
