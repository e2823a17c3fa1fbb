//! Faults in cluster mode, through the real binary: a member killed with -9, a member frozen
//! (SIGSTOP) for three times its etcd lease ttl, a member cut off from etcd (it runs in a network
//! namespace the test creates, joined to etcd by a veth pair), the etcd leader killed and then
//! quorum lost; and the two paths a healthy cluster never takes: a write to etcd whose outcome
//! is unknown, and a client renewal that the member's lease is too old to cover.
//!
//! In each fault, clients keep taking two locks through both members the whole time: `tcpnetlock
//! do` processes (without `--ttl`: against a member they take its bound as their lease, as a user
//! gets it) and threads holding through the library's lease. Besides, a few "probe" clients hold
//! locks through the faulty member while others wait for the same locks through the healthy one.
//! Every holder stamps, on CLOCK_MONOTONIC (one clock for every process of the machine), when it
//! began to hold and when it stopped by its own account:
//!
//! - a `do` command is this test binary run again (`fault_holder`): it stamps its start, and its
//!   end when it exits, either by itself or because `do` sent SIGTERM for a lost lock;
//! - a library holder stamps right after its grant, and right after it saw the lock lost (the
//!   connection closed, or its lease clock ran out) or right before it released.
//!
//! Stamps taken late only lengthen a hold, so the check that no two holds of a lock overlap
//! cannot be fooled by a slow machine; fencing tokens must grow in the order of the holds.
//! Timings are measured from the fault (a stamp taken just before the signal, the kill, the cut)
//! and bounded on both sides with slack for a loaded 2-core machine (see the constants).
//!
//! The tests run one at a time (each starts its own 3-member etcd): they measure timings, and
//! faults of one would disturb another. The netns test needs root and `ip` (iproute2), as
//! tests/faults_netns.rs does. Measured timings are printed: `cargo test --features etcd --test
//! cluster_faults -- --nocapture`.

#[path = "common/churn.rs"]
mod churn;
mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use churn::{Rng, now_ns, record};
use common::etcd::{ClusterOptions, EtcdCluster};
use common::{BIN, Server, TempDir, code, require_tool, wait_until};
use serde_json::Value;
use tcpnetlock::client::{self, Client, lease_margin};

/// The members' etcd lease ttl: `--etcd-ttl`'s default.
const ETCD_TTL: Duration = Duration::from_secs(5);
/// How often a member renews its lease: a third of the ttl.
const RENEW_EVERY: Duration = Duration::from_nanos(1_666_666_667);
/// How long before its lease could expire a member stops vouching: max(0.5 s, ttl / 10).
const MARGIN: Duration = Duration::from_millis(500);
/// The longest client ttl a member with a 5 s lease vouches for (`.info`'s `max_ttl_secs`):
/// what `do` takes as its lease, and what the library clients here ask for.
const MAX_TTL: Duration = Duration::from_millis(2733);
/// Slack on timing bounds: scheduling on a loaded 2-core machine, the kernel's timers, and
/// etcd's lease expiry, which runs every 500 ms.
const SLACK: Duration = Duration::from_millis(500);
const LIMIT: Duration = Duration::from_secs(30);

const RECORDS_ENV: &str = "TCPNETLOCK_FAULT_RECORDS";
const CLIENT_ENV: &str = "TCPNETLOCK_FAULT_CLIENT";
const HOLD_ENV: &str = "TCPNETLOCK_FAULT_HOLD_MS";

/// One fault at a time: each measures timings.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

/// From CLOCK_MONOTONIC stamp `from` to `to` (zero if `to` is earlier).
fn between(from: u64, to: u64) -> Duration {
    Duration::from_nanos(to.saturating_sub(from))
}

fn assert_within(what: &str, d: Duration, low: Duration, high: Duration) {
    assert!(
        d >= low && d <= high,
        "{what}: {} is not within [{}, {}]",
        secs(d),
        secs(low),
        secs(high)
    );
}

// ---------------------------------------------------------------------------------------------
// The command run under `do`.

static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_sigterm(_: libc::c_int) {
    let fd = WAKE_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; the byte is a static.
        unsafe { libc::write(fd, b"t".as_ptr().cast(), 1) };
    }
}

/// The command `do` runs (this binary run again with TCPNETLOCK_FAULT_RECORDS set; without it,
/// this test does nothing): stamps `S` when it starts, then holds for TCPNETLOCK_FAULT_HOLD_MS
/// (0: until terminated) and stamps `E` as it ends, `D` (done) or `T` (SIGTERM: `do` lost the
/// lock).
#[test]
fn fault_holder() {
    let Ok(records) = std::env::var(RECORDS_ENV) else {
        return;
    };
    let client = std::env::var(CLIENT_ENV).unwrap();
    let hold_ms: i32 = std::env::var(HOLD_ENV).unwrap().parse().unwrap();
    let name = std::env::var("TCPNETLOCK_LOCK_NAME").unwrap();
    let token = std::env::var("TCPNETLOCK_TOKEN").unwrap_or_else(|_| "-".into());
    let mut fds = [0; 2];
    // SAFETY: plain system calls; the handler only writes to the pipe.
    unsafe {
        assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0);
        WAKE_FD.store(fds[1], Ordering::Relaxed);
        libc::signal(
            libc::SIGTERM,
            on_sigterm as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    // Stamped once the handler is in place: a hold with an `S` always gets its `E`.
    let mut out = OpenOptions::new().append(true).open(&records).unwrap();
    let id = std::process::id();
    record(
        &mut out,
        format!("S {id} {client} {name} {token} {}", now_ns()),
    );
    let mut pfd = libc::pollfd {
        fd: fds[0],
        events: libc::POLLIN,
        revents: 0,
    };
    let timeout = if hold_ms == 0 { -1 } else { hold_ms };
    let n = loop {
        // SAFETY: one pollfd we own.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout) };
        if n >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            break n;
        }
    };
    let how = if n > 0 { 'T' } else { 'D' };
    record(&mut out, format!("E {id} {} {how}", now_ns()));
    std::process::exit(0);
}

// ---------------------------------------------------------------------------------------------
// Holds, as the clients recorded them.

/// The clients' records: `S id client name token t` when a hold began, `E id t how` when it
/// ended (D done, T terminated by `do`, L lost, R released).
struct Records {
    path: PathBuf,
}

#[derive(Debug, Clone)]
struct Hold {
    client: String,
    name: String,
    token: Option<u64>,
    start: u64,
    end: Option<u64>,
    how: char,
}

static LIB_IDS: AtomicU64 = AtomicU64::new(0);

impl Records {
    fn new(dir: &TempDir) -> Records {
        let path = dir.path.join("records");
        File::create(&path).unwrap();
        Records { path }
    }

    fn write(&self, line: String) {
        let mut out = OpenOptions::new().append(true).open(&self.path).unwrap();
        record(&mut out, line);
    }

    /// A library client's grant, stamped now: the hold's id and the stamp.
    fn lib_start(&self, client: &str, lock: &client::Lock) -> (String, u64) {
        let t = now_ns();
        let id = format!("L{}", LIB_IDS.fetch_add(1, Ordering::Relaxed));
        let token = lock.token().map_or("-".into(), |t| t.to_string());
        self.write(format!("S {id} {client} {} {token} {t}", lock.name()));
        (id, t)
    }

    fn lib_end(&self, id: &str, how: char) -> u64 {
        let t = now_ns();
        self.write(format!("E {id} {t} {how}"));
        t
    }

    fn holds(&self) -> Vec<Hold> {
        let text = std::fs::read_to_string(&self.path).unwrap();
        let mut holds: Vec<Hold> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f.as_slice() {
                ["S", id, client, name, token, t] => {
                    index.insert((*id).into(), holds.len());
                    holds.push(Hold {
                        client: (*client).into(),
                        name: (*name).into(),
                        token: token.parse().ok(),
                        start: t.parse().unwrap(),
                        end: None,
                        how: '?',
                    });
                }
                ["E", id, t, how] => {
                    let i = *index
                        .get(*id)
                        .unwrap_or_else(|| panic!("{line:?} before its start"));
                    holds[i].end = Some(t.parse().unwrap());
                    holds[i].how = how.chars().next().unwrap();
                }
                _ => panic!("bad record {line:?}"),
            }
        }
        holds
    }

    /// The hold of the client labelled `client` (a probe's: there is one), once recorded.
    fn await_hold(&self, client: &str, ended: bool) -> Hold {
        let mut found = None;
        let ok = wait_until(LIMIT, || {
            found = self
                .holds()
                .into_iter()
                .find(|h| h.client == client && (!ended || h.end.is_some()));
            found.is_some()
        });
        assert!(
            ok.is_some(),
            "{client} never {}",
            ["held", "ended"][ended as usize]
        );
        found.unwrap()
    }

    fn grants_since(&self, t: u64) -> usize {
        self.holds().iter().filter(|h| h.start >= t).count()
    }
}

/// Panics if two holds of a lock overlap, if a hold never ended, or if fencing tokens do not
/// follow the order of the holds; returns a summary.
fn check_exclusive(holds: &[Hold]) -> String {
    let mut by_name: BTreeMap<&str, Vec<&Hold>> = BTreeMap::new();
    for h in holds {
        assert!(h.end.is_some(), "a hold never ended: {h:?}");
        by_name.entry(&h.name).or_default().push(h);
    }
    let mut summary = Vec::new();
    for (name, mut mine) in by_name {
        mine.sort_by_key(|h| h.start);
        let mut latest: Option<&Hold> = None;
        for h in &mine {
            if let Some(l) = latest {
                assert!(
                    h.start >= l.end.unwrap(),
                    "{name}: two holders at once: {l:?} (through {}) and {h:?} (through {}): \
                     the second began {} before the first ended",
                    l.client,
                    h.client,
                    secs(between(h.start, l.end.unwrap()))
                );
            }
            if latest.is_none_or(|l| h.end > l.end) {
                latest = Some(h);
            }
        }
        let tokens: Vec<u64> = mine.iter().filter_map(|h| h.token).collect();
        for w in tokens.windows(2) {
            assert!(w[0] < w[1], "{name}: token {} came after {}", w[1], w[0]);
        }
        let lost = mine.iter().filter(|h| matches!(h.how, 'T' | 'L')).count();
        summary.push(format!("{name}: {} holds ({lost} lost)", mine.len()));
    }
    summary.join(", ")
}

// ---------------------------------------------------------------------------------------------
// Members and where clients reach them.

/// A member as its clients reach it: a loopback port, inside a network namespace or not.
#[derive(Clone)]
struct Place {
    addr: SocketAddr,
    ns: Option<String>,
}

impl Place {
    fn of(server: &Server) -> Place {
        Place {
            addr: server.addr,
            ns: None,
        }
    }

    /// A connection from the member's namespace.
    fn connect(&self) -> TcpStream {
        let addr = self.addr;
        let stream = match &self.ns {
            None => TcpStream::connect(addr),
            Some(ns) => {
                let ns = ns.clone();
                thread::spawn(move || {
                    enter_ns(&ns);
                    TcpStream::connect(addr)
                })
                .join()
                .unwrap()
            }
        };
        let stream = stream.unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        stream.set_read_timeout(Some(LIMIT)).unwrap();
        stream
    }

    /// One request on a connection of its own; the reply line (or what happened instead).
    fn ask(&self, request: &str) -> String {
        let mut stream = self.connect();
        stream.write_all(format!("{request}\n").as_bytes()).unwrap();
        let mut line = String::new();
        match BufReader::new(&stream).read_line(&mut line) {
            Ok(0) => "(closed)".into(),
            Ok(_) => line.trim_end().into(),
            Err(e) => format!("({e})"),
        }
    }

    fn serving(&self) -> bool {
        self.ask(".ping,serving:1") == "pong"
    }

    fn locks(&self) -> Value {
        let line = self.ask(".locks");
        let json = line
            .strip_prefix("locks,")
            .unwrap_or_else(|| panic!("{line}"));
        serde_json::from_str(json).unwrap()
    }

    /// `tcpnetlock do` through this member (in its namespace).
    fn tnl_do(&self, args: &[&str]) -> Command {
        let mut cmd = match &self.ns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns, BIN]);
                cmd
            }
            None => Command::new(BIN),
        };
        cmd.arg("do")
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &self.addr.port().to_string(),
            ])
            .args(args);
        for var in [
            "TCPNETLOCK_HOST",
            "TCPNETLOCK_PORT",
            "TCPNETLOCK_CLIENT_ID",
            "TCPNETLOCK_TOKEN",
            "TCPNETLOCK_LOCK_NAME",
        ] {
            cmd.env_remove(var);
        }
        cmd
    }

    /// `do --fencing --lock-name NAME [extra] -- fault_holder`, labelled `client`.
    fn do_holder(
        &self,
        records: &Records,
        client: &str,
        name: &str,
        extra: &[&str],
        hold_ms: u64,
    ) -> Command {
        let exe = std::env::current_exe().unwrap();
        let mut args = vec!["--fencing", "--lock-name", name];
        args.extend_from_slice(extra);
        let mut cmd = self.tnl_do(&args);
        cmd.arg("--")
            .arg(exe)
            .args(["fault_holder", "--exact", "--test-threads=1", "-q"])
            .env(RECORDS_ENV, &records.path)
            .env(CLIENT_ENV, client)
            .env(HOLD_ENV, hold_ms.to_string())
            .stdin(Stdio::null());
        cmd
    }

    fn client(&self) -> Client {
        Client::new("127.0.0.1", self.addr.port())
            .connect_timeout(Duration::from_secs(2))
            .reply_timeout(Duration::from_secs(10))
    }
}

/// Moves this thread into network namespace `ns` (sockets it opens then live there).
fn enter_ns(ns: &str) {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: a valid namespace descriptor; only this thread changes namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

/// Starts a member with the default lease ttl (`cmd` prefix: e.g. `ip netns exec NS`).
fn member(prefix: &[&str], endpoints: &str, name: &str) -> Server {
    let mut cmd = Command::new(prefix.first().copied().unwrap_or(BIN));
    if !prefix.is_empty() {
        cmd.args(&prefix[1..]).arg(BIN);
    }
    cmd.args(["server", "--listen", "127.0.0.1:0", "--log", "stderr", "-v"])
        .args(["--etcd", endpoints, "--etcd-prefix", "/faults/"])
        .args(["--etcd-name", name]);
    Server::spawn(cmd)
}

fn await_serving(place: &Place) -> Duration {
    let mut last = String::new();
    let took = wait_until(LIMIT, || {
        last = place.ask(".ping,serving:1");
        last == "pong"
    });
    took.unwrap_or_else(|| panic!("member at {} never served: {last}", place.addr))
}

/// Waits until `place` shows one waiter for each of `names`.
fn await_waiters(place: &Place, names: &[&str]) {
    let mut seen = Value::Null;
    let ok = wait_until(LIMIT, || {
        seen = place.locks();
        names.iter().all(|n| seen[n]["waiting"] == 1)
    });
    assert!(ok.is_some(), "never a waiter for each of {names:?}: {seen}");
}

// ---------------------------------------------------------------------------------------------
// Clients.

/// A process, killed on drop if still running.
struct Proc(Child);

impl Proc {
    fn spawn(cmd: &mut Command) -> Proc {
        Proc(
            cmd.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    /// Its exit code, waiting at most `limit` (then it is killed: None).
    fn finish(&mut self, limit: Duration) -> Option<i32> {
        let mut status = None;
        wait_until(limit, || {
            status = self.0.try_wait().unwrap();
            status.is_some()
        });
        if status.is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
        status.map(code)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What one client loop saw: outcomes counted by kind.
#[derive(Debug, Default)]
struct Tally {
    label: String,
    outcomes: BTreeMap<String, u32>,
}

/// Clients taking `c0` and `c1` through every member, two `do` loops and one library loop per
/// member, until finished.
struct Churn {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Tally>>,
}

const CHURN_NAMES: [&str; 2] = ["c0", "c1"];

impl Churn {
    fn start(records: &Arc<Records>, places: &[(&str, Place)]) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut seed = now_ns() | 1;
        for (member, place) in places {
            for n in 0..3 {
                let (records, stop, place) =
                    (Arc::clone(records), Arc::clone(&stop), place.clone());
                let label = format!("{member}-{}{n}", if n < 2 { "do" } else { "lib" });
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                let rng = Rng(seed);
                threads.push(if n < 2 {
                    thread::spawn(move || do_loop(&records, &place, label, &stop, rng))
                } else {
                    thread::spawn(move || lib_loop(&records, &place, label, &stop, rng))
                });
            }
        }
        Churn { stop, threads }
    }

    fn finish(self) -> String {
        self.stop.store(true, Ordering::SeqCst);
        let tallies: Vec<Tally> = self
            .threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        tallies
            .iter()
            .map(|t| format!("{} {:?}", t.label, t.outcomes))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn do_loop(
    records: &Records,
    place: &Place,
    label: String,
    stop: &AtomicBool,
    mut rng: Rng,
) -> Tally {
    let mut tally = Tally {
        label: label.clone(),
        ..Tally::default()
    };
    while !stop.load(Ordering::SeqCst) {
        let name = CHURN_NAMES[rng.below(2) as usize];
        let hold = 20 + rng.below(130);
        let mut p = Proc::spawn(&mut place.do_holder(records, &label, name, &["-w", "10"], hold));
        // A frozen member holds a client up to its reply timeout and wait.
        let outcome = match p.finish(Duration::from_secs(40)) {
            Some(c) => format!("exit {c}"),
            None => "killed after 40 s".into(),
        };
        if outcome != "exit 0" {
            thread::sleep(Duration::from_millis(100));
        }
        *tally.outcomes.entry(outcome).or_default() += 1;
    }
    tally
}

fn lib_loop(
    records: &Records,
    place: &Place,
    label: String,
    stop: &AtomicBool,
    mut rng: Rng,
) -> Tally {
    if let Some(ns) = &place.ns {
        enter_ns(ns);
    }
    let mut tally = Tally {
        label: label.clone(),
        ..Tally::default()
    };
    let client = place.client();
    while !stop.load(Ordering::SeqCst) {
        let name = CHURN_NAMES[rng.below(2) as usize];
        let hold = Duration::from_millis(20 + rng.below(130));
        let taken = client
            .request(name)
            .wait(Duration::from_secs(10))
            .ttl(MAX_TTL)
            .fencing(true)
            .take();
        let outcome = match taken {
            Ok(lock) => {
                let (id, _) = records.lib_start(&label, &lock);
                match lock.wait_lost(Some(hold)) {
                    Some(_) => {
                        records.lib_end(&id, 'L');
                        lock.abandon();
                        "lost".to_owned()
                    }
                    None => {
                        records.lib_end(&id, 'R');
                        match lock.release() {
                            Ok(()) => "released".to_owned(),
                            Err(_) => "release failed".to_owned(),
                        }
                    }
                }
            }
            Err(e) => {
                thread::sleep(Duration::from_millis(100));
                let text = e.to_string();
                text.chars().take(40).collect()
            }
        };
        *tally.outcomes.entry(outcome).or_default() += 1;
    }
    tally
}

/// A library client that holds `name` through `place` until it sees the lock lost: returns
/// when it saw it (CLOCK_MONOTONIC) and why. Returns once the hold is recorded.
fn lib_holder(
    records: &Arc<Records>,
    place: &Place,
    client: &str,
    name: &str,
) -> JoinHandle<(u64, String)> {
    let (records, place, client, name) = (
        Arc::clone(records),
        place.clone(),
        client.to_owned(),
        name.to_owned(),
    );
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        if let Some(ns) = &place.ns {
            enter_ns(ns);
        }
        let lock = place
            .client()
            .request(&name)
            .ttl(MAX_TTL)
            .fencing(true)
            .take()
            .unwrap_or_else(|e| panic!("{client}: {e}"));
        let (id, _) = records.lib_start(&client, &lock);
        tx.send(()).unwrap();
        let lost = lock.wait_lost(None).unwrap();
        let t = records.lib_end(&id, 'L');
        lock.abandon();
        (t, lost.to_string())
    });
    rx.recv_timeout(LIMIT)
        .expect("the library holder got its lock");
    handle
}

/// A library client that waits for `name` through `place`, holds it a moment and releases it:
/// returns when it was granted (CLOCK_MONOTONIC).
fn lib_waiter(records: &Arc<Records>, place: &Place, client: &str, name: &str) -> JoinHandle<u64> {
    let (records, place, client, name) = (
        Arc::clone(records),
        place.clone(),
        client.to_owned(),
        name.to_owned(),
    );
    thread::spawn(move || {
        let lock = place
            .client()
            .request(&name)
            .wait(Duration::from_secs(60))
            .ttl(MAX_TTL)
            .fencing(true)
            .take()
            .unwrap_or_else(|e| panic!("{client}: {e}"));
        let (id, granted) = records.lib_start(&client, &lock);
        thread::sleep(Duration::from_millis(20));
        records.lib_end(&id, 'R');
        lock.release().unwrap();
        granted
    })
}

/// A client without a lease (as `nc` would be) holding `name` through `place`: returns when
/// the member closed its connection (CLOCK_MONOTONIC). Returns once it holds.
fn raw_holder(place: &Place, name: &str) -> JoinHandle<u64> {
    let mut stream = place.connect();
    stream
        .write_all(format!("lock,name:{name}\n").as_bytes())
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "ok\n", "raw holder of {name}");
    thread::spawn(move || {
        let mut rest = Vec::new();
        let read = reader.read_to_end(&mut rest);
        let t = now_ns();
        assert!(
            read.is_ok(),
            "the member never closed the lease-less holder's connection: {read:?}"
        );
        assert!(
            rest.is_empty(),
            "the member said {:?}",
            String::from_utf8_lossy(&rest)
        );
        t
    })
}

/// The probes of a member fault: `p0` held by a `do` (until its lock is lost) and `p1` by a
/// library lease through the faulty member, `p2` by a lease-less client when `raw`; a waiter
/// for each through the healthy member (`do` for p0, the library for the others).
struct Probes {
    holder_do: Proc,
    holder_lib: JoinHandle<(u64, String)>,
    holder_raw: Option<JoinHandle<u64>>,
    waiter_do: Proc,
    waiters_lib: Vec<(String, JoinHandle<u64>)>,
}

/// When each probe's hold ended and each waiter was granted.
struct ProbeTimes {
    /// (what, CLOCK_MONOTONIC) for each holder through the faulty member.
    ended: Vec<(String, u64)>,
    /// The lease-less holder's close, when there was one.
    raw_closed: Option<u64>,
    /// (what, CLOCK_MONOTONIC) for each waiter through the healthy member.
    granted: Vec<(String, u64)>,
    /// The `do` holder's exit code.
    holder_do_exit: Option<i32>,
}

impl Probes {
    fn start(records: &Arc<Records>, faulty: &Place, healthy: &Place, raw: bool) -> Probes {
        let holder_do =
            Proc::spawn(&mut faulty.do_holder(records, "probe-holder-p0", "p0", &[], 0));
        records.await_hold("probe-holder-p0", false);
        let holder_lib = lib_holder(records, faulty, "probe-holder-p1", "p1");
        let holder_raw = raw.then(|| raw_holder(faulty, "p2"));
        let waiter_do = Proc::spawn(&mut healthy.do_holder(
            records,
            "probe-waiter-p0",
            "p0",
            &["-w", "60"],
            20,
        ));
        let mut waiters_lib = vec![(
            "p1".to_owned(),
            lib_waiter(records, healthy, "probe-waiter-p1", "p1"),
        )];
        let mut names = vec!["p0", "p1"];
        if raw {
            waiters_lib.push((
                "p2".to_owned(),
                lib_waiter(records, healthy, "probe-waiter-p2", "p2"),
            ));
            names.push("p2");
        }
        await_waiters(healthy, &names);
        Probes {
            holder_do,
            holder_lib,
            holder_raw,
            waiter_do,
            waiters_lib,
        }
    }

    fn finish(mut self, records: &Records) -> ProbeTimes {
        let holder_do_exit = self.holder_do.finish(LIMIT);
        let mut ended = vec![(
            "do holder of p0 (command terminated)".to_owned(),
            records.await_hold("probe-holder-p0", true).end.unwrap(),
        )];
        let (t, why) = self.holder_lib.join().unwrap();
        ended.push((format!("library holder of p1 ({why})"), t));
        let raw_closed = self.holder_raw.map(|h| h.join().unwrap());
        let waiter_exit = self.waiter_do.finish(LIMIT);
        assert_eq!(waiter_exit, Some(0), "the do waiter of p0");
        let mut granted = vec![(
            "do waiter of p0 (command started)".to_owned(),
            records.await_hold("probe-waiter-p0", false).start,
        )];
        for (name, w) in self.waiters_lib {
            granted.push((format!("library waiter of {name}"), w.join().unwrap()));
        }
        ProbeTimes {
            ended,
            raw_closed,
            granted,
            holder_do_exit,
        }
    }
}

impl ProbeTimes {
    fn describe(&self, fault: u64) -> String {
        let mut parts: Vec<String> = self
            .ended
            .iter()
            .map(|(what, t)| format!("{what} ended +{}", secs(between(fault, *t))))
            .collect();
        if let Some(t) = self.raw_closed {
            parts.push(format!(
                "lease-less holder of p2 closed +{}",
                secs(between(fault, t))
            ));
        }
        parts.extend(
            self.granted
                .iter()
                .map(|(what, t)| format!("{what} granted +{}", secs(between(fault, *t)))),
        );
        parts.join(", ")
    }

    /// Every holder through the faulty member ended before any waiter was granted.
    fn assert_ended_before_granted(&self) {
        let last_end = self
            .ended
            .iter()
            .map(|e| e.1)
            .chain(self.raw_closed)
            .max()
            .unwrap();
        for (what, t) in &self.granted {
            assert!(
                *t > last_end,
                "{what} was granted {} before the last holder through the faulty member ended",
                secs(between(*t, last_end))
            );
        }
    }

    /// Every holder's end through the faulty member, the lease-less one's close included.
    fn ends(&self) -> Vec<(String, u64)> {
        let mut ends = self.ended.clone();
        if let Some(t) = self.raw_closed {
            ends.push(("lease-less holder of p2 (closed)".into(), t));
        }
        ends
    }

    fn first_grant(&self) -> u64 {
        self.granted.iter().map(|g| g.1).min().unwrap()
    }
}

/// Waits until the clients have recorded `n` grants after `since` (the churn runs).
fn await_grants(records: &Records, since: u64, n: usize) {
    let ok = wait_until(LIMIT, || records.grants_since(since) >= n);
    assert!(ok.is_some(), "fewer than {n} grants in {LIMIT:?}");
}

// ---------------------------------------------------------------------------------------------
// The faults.

/// kill -9 of a member while its clients hold locks: they see their connections end at once;
/// etcd frees the locks when the member's lease expires, and waiters through the other member
/// are granted, within --etcd-ttl + 1 s of the kill.
#[test]
fn a_killed_member_frees_its_locks_within_the_etcd_ttl() {
    let _serial = serial();
    let etcd = EtcdCluster::start3();
    let endpoints = etcd.endpoints().join(",");
    let dir = TempDir::new("faults-kill");
    let records = Arc::new(Records::new(&dir));
    let mut a = member(&[], &endpoints, "a");
    let b = member(&[], &endpoints, "b");
    let (pa, pb) = (Place::of(&a), Place::of(&b));
    await_serving(&pa);
    await_serving(&pb);
    let churn = Churn::start(&records, &[("a", pa.clone()), ("b", pb.clone())]);
    let probes = Probes::start(&records, &pa, &pb, true);
    await_grants(&records, 0, 20);

    let killed = now_ns();
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let times = probes.finish(&records);
    // The other member goes on serving.
    await_grants(&records, times.first_grant(), 20);
    let during = records.grants_since(killed);
    let churn = churn.finish();
    eprintln!("member killed: {}", times.describe(killed));

    // Its clients know at once: their connections closed.
    assert_eq!(times.holder_do_exit, Some(122), "do reports the lock lost");
    for (what, t) in &times.ends() {
        assert_within(what, between(killed, *t), Duration::ZERO, SLACK * 2);
    }
    // etcd frees the locks when the lease expires: not before its last renewal plus the ttl
    // (at least ttl - ttl/3 after the kill), and within ttl + 1 s.
    for (what, t) in &times.granted {
        assert_within(
            what,
            between(killed, *t),
            ETCD_TTL - RENEW_EVERY - SLACK,
            ETCD_TTL + Duration::from_secs(1),
        );
    }
    times.assert_ended_before_granted();
    let summary = check_exclusive(&records.holds());
    eprintln!("member killed: {during} grants after the kill; {summary}; clients: {churn}");
    assert!(during > 0, "nobody was granted after the kill");
}

/// A member frozen (SIGSTOP) for three times its lease ttl can close nothing; its lease clients
/// (`do`, the library) count their locks lost by their own clocks, and stop, before etcd can
/// hand the locks to a waiter through the other member. After SIGCONT it serves again.
#[test]
fn a_frozen_members_lease_clients_stop_before_anyone_else_is_granted() {
    let _serial = serial();
    let etcd = EtcdCluster::start3();
    let endpoints = etcd.endpoints().join(",");
    let dir = TempDir::new("faults-stop");
    let records = Arc::new(Records::new(&dir));
    let a = member(&[], &endpoints, "a");
    let b = member(&[], &endpoints, "b");
    let (pa, pb) = (Place::of(&a), Place::of(&b));
    await_serving(&pa);
    await_serving(&pb);
    let churn = Churn::start(&records, &[("a", pa.clone()), ("b", pb.clone())]);
    let probes = Probes::start(&records, &pa, &pb, false);
    await_grants(&records, 0, 20);

    let frozen = now_ns();
    let frozen_at = Instant::now();
    common::signal(a.child.id() as i32, libc::SIGSTOP);
    let times = probes.finish(&records);
    thread::sleep((ETCD_TTL * 3).saturating_sub(frozen_at.elapsed()));
    let during = records.grants_since(frozen);
    let thawed = now_ns();
    common::signal(a.child.id() as i32, libc::SIGCONT);
    let back = await_serving(&pa);
    await_grants(&records, thawed, 20);
    eprintln!(
        "member frozen for {}: {}; serving again {} after SIGCONT",
        secs(ETCD_TTL * 3),
        times.describe(frozen),
        secs(back)
    );

    assert_eq!(times.holder_do_exit, Some(122), "do reports the lock lost");
    // A lease client gives up once no renewal has been answered for its window (the ttl less
    // its margin); its last answered renewal was sent at most a renewal interval (ttl/4) before
    // the freeze.
    let window = MAX_TTL - lease_margin(MAX_TTL);
    for (what, t) in &times.ends() {
        assert_within(
            what,
            between(frozen, *t),
            window - MAX_TTL / 4 - SLACK,
            window + SLACK,
        );
    }
    for (what, t) in &times.granted {
        assert_within(
            what,
            between(frozen, *t),
            ETCD_TTL - RENEW_EVERY - SLACK,
            ETCD_TTL + Duration::from_secs(1),
        );
    }
    times.assert_ended_before_granted();
    let last_end = times.ends().iter().map(|e| e.1).max().unwrap();
    eprintln!(
        "member frozen: the last lease client stopped {} before the first grant elsewhere",
        secs(between(last_end, times.first_grant()))
    );
    // Thawed, it noticed its lease was past vouching for, dropped it, and took a new one.
    assert_within(
        "serving again after SIGCONT",
        back,
        Duration::ZERO,
        Duration::from_secs(10),
    );
    assert!(
        a.log_text()
            .contains("NOT SERVING LOCKS: etcd lease not renewed for"),
        "{}",
        a.log_text()
    );
    let mut held = common::Client::connect(b.addr);
    assert_eq!(held.ask("lock,name:after"), "ok");
    assert_eq!(pa.ask("lock,name:after"), "not-granted");
    assert_eq!(pa.ask("lock,name:after-a"), "ok");
    let churn = churn.finish();
    let summary = check_exclusive(&records.holds());
    eprintln!("member frozen: {during} grants during the freeze; {summary}; clients: {churn}");
    assert!(during > 0, "nobody was granted while the member was frozen");
}

// ---------------------------------------------------------------------------------------------
// A member cut off from etcd: it runs in a network namespace of its own, and reaches etcd over
// a veth pair: HOST_IP on the host's end, NS_IP on the namespace's. Its clients run in its
// namespace too (on its loopback), so the cut only separates it from etcd.

const HOST_IP: &str = "10.231.9.1";
const NS_IP: &str = "10.231.9.2";

/// The namespace and the veth pair, deleted on drop.
struct Netns {
    ns: String,
    host_end: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    fn new() -> Netns {
        require_tool("ip", "iproute2");
        // SAFETY: plain system call.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "creating network namespaces needs root (CI runs the tests as root)"
        );
        remove_stale_namespaces();
        let pid = std::process::id();
        let net = Netns {
            ns: format!("tnlc-{pid}"),
            // Interface names are at most 15 bytes.
            host_end: format!("tnlc{}", pid % 100_000_000),
        };
        ip(&["netns", "add", &net.ns]);
        ip(&[
            "link",
            "add",
            &net.host_end,
            "type",
            "veth",
            "peer",
            "name",
            "veth-etcd",
            "netns",
            &net.ns,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{HOST_IP}/30"),
            "dev",
            &net.host_end,
        ]);
        ip(&["link", "set", &net.host_end, "up"]);
        ip(&[
            "-n",
            &net.ns,
            "addr",
            "add",
            &format!("{NS_IP}/30"),
            "dev",
            "veth-etcd",
        ]);
        ip(&["-n", &net.ns, "link", "set", "veth-etcd", "up"]);
        ip(&["-n", &net.ns, "link", "set", "lo", "up"]);
        net
    }

    /// Cuts or restores the link: the namespace's end down or up.
    fn link(&self, up: bool) {
        ip(&[
            "-n",
            &self.ns,
            "link",
            "set",
            "veth-etcd",
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and with it the host's.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_end])
            .stderr(Stdio::null())
            .status();
    }
}

/// Namespaces left by a test process that was killed before it could delete them.
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name.strip_prefix("tnlc-") else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// A member cut off from etcd ends its holders' connections (and its lease clients give up)
/// before its lease can expire; only then is anyone else granted. Once the link is back it
/// serves again.
#[test]
fn a_member_cut_off_from_etcd_ends_its_holders_before_its_lease_can_expire() {
    let _serial = serial();
    let net = Netns::new();
    let etcd = EtcdCluster::start(ClusterOptions {
        also_listen: Some(HOST_IP.into()),
        ..ClusterOptions::default()
    });
    let inside: Vec<String> = (0..3).map(|i| etcd.endpoint_at(HOST_IP, i)).collect();
    let dir = TempDir::new("faults-cut");
    let records = Arc::new(Records::new(&dir));
    let a = member(&["ip", "netns", "exec", &net.ns], &inside.join(","), "a");
    let b = member(&[], &etcd.endpoints().join(","), "b");
    let pa = Place {
        addr: a.addr,
        ns: Some(net.ns.clone()),
    };
    let pb = Place::of(&b);
    await_serving(&pa);
    await_serving(&pb);
    let churn = Churn::start(&records, &[("a", pa.clone()), ("b", pb.clone())]);
    let probes = Probes::start(&records, &pa, &pb, true);
    await_grants(&records, 0, 20);

    let cut = now_ns();
    net.link(false);
    let times = probes.finish(&records);
    let mut said = String::new();
    let refusing = wait_until(LIMIT, || {
        said = pa.ask(".ping,serving:1");
        said.starts_with("err,not serving locks: ")
    });
    assert!(
        refusing.is_some(),
        "cut off, the member still says {said:?}"
    );
    let during = records.grants_since(cut);
    let restored = now_ns();
    net.link(true);
    let back = await_serving(&pa);
    await_grants(&records, restored, 20);
    eprintln!(
        "member cut off from etcd: {}; it said {said:?}; serving again {} after the link came \
         back",
        times.describe(cut),
        secs(back)
    );

    assert_eq!(times.holder_do_exit, Some(122), "do reports the lock lost");
    // The member stops vouching a margin before its lease could expire: its last acknowledged
    // renewal was sent at most a renewal interval before the cut.
    let stop_low = ETCD_TTL - RENEW_EVERY - MARGIN - SLACK;
    let stop_high = ETCD_TTL - MARGIN + SLACK;
    assert_within(
        "lease-less holder closed by the member",
        between(cut, times.raw_closed.unwrap()),
        stop_low,
        stop_high,
    );
    // Lease clients may give up first, by their own clocks: the member stops answering their
    // renewals once its lease cannot cover their ttl.
    let window = MAX_TTL - lease_margin(MAX_TTL);
    for (what, t) in &times.ended {
        assert_within(
            what,
            between(cut, *t),
            window - MAX_TTL / 4 - SLACK,
            stop_high,
        );
    }
    for (what, t) in &times.granted {
        assert_within(
            what,
            between(cut, *t),
            ETCD_TTL - RENEW_EVERY - SLACK,
            ETCD_TTL + Duration::from_secs(1),
        );
    }
    times.assert_ended_before_granted();
    eprintln!(
        "member cut off: it closed its lease-less holder {} before the first grant elsewhere",
        secs(between(times.raw_closed.unwrap(), times.first_grant()))
    );
    assert!(
        a.log_text()
            .contains("NOT SERVING LOCKS: etcd lease not renewed for"),
        "{}",
        a.log_text()
    );
    assert_within(
        "serving again after the link came back",
        back,
        Duration::ZERO,
        Duration::from_secs(10),
    );
    let mut held = common::Client::connect(b.addr);
    assert_eq!(held.ask("lock,name:after"), "ok");
    assert_eq!(pa.ask("lock,name:after"), "not-granted");
    assert_eq!(pa.ask("lock,name:after-a"), "ok");
    let churn = churn.finish();
    let summary = check_exclusive(&records.holds());
    eprintln!("member cut off: {during} grants meanwhile; {summary}; clients: {churn}");
    assert!(
        during > 0,
        "nobody was granted while the member was cut off"
    );
}

// ---------------------------------------------------------------------------------------------
// etcd's own faults.

/// The etcd leader killed, then one more etcd member: locks stay exclusive throughout; the loss
/// of the leader alone interrupts nothing (a member's holder keeps its lock); without quorum
/// every new lock is answered `err,` (never `ok`) and the members stop vouching for their
/// holders; once quorum is back both members serve again.
#[test]
fn locks_stay_exclusive_through_the_loss_of_the_etcd_leader_and_of_quorum() {
    let _serial = serial();
    let mut etcd = EtcdCluster::start3();
    let endpoints = etcd.endpoints().join(",");
    let dir = TempDir::new("faults-quorum");
    let records = Arc::new(Records::new(&dir));
    let a = member(&[], &endpoints, "a");
    let b = member(&[], &endpoints, "b");
    let (pa, pb) = (Place::of(&a), Place::of(&b));
    await_serving(&pa);
    await_serving(&pb);
    let churn = Churn::start(&records, &[("a", pa.clone()), ("b", pb.clone())]);
    let mut holder = Proc::spawn(&mut pa.do_holder(&records, "probe-holder-q", "q", &[], 0));
    records.await_hold("probe-holder-q", false);
    await_grants(&records, 0, 20);

    // The leader.
    let leader = etcd.wait_leader(LIMIT);
    let leader_killed = now_ns();
    etcd.kill(leader);
    let new_leader = etcd.wait_leader(LIMIT);
    let elected = between(leader_killed, now_ns());
    let resumed = Instant::now();
    await_grants(&records, now_ns(), 20);
    let resumed = resumed.elapsed();
    assert!(
        holder.0.try_wait().unwrap().is_none(),
        "the holder through a lost its lock when the etcd leader died"
    );
    assert!(
        records
            .holds()
            .iter()
            .any(|h| h.client == "probe-holder-q" && h.end.is_none())
    );

    // Quorum.
    let quorum_lost = now_ns();
    let quorum_lost_at = Instant::now();
    etcd.kill(new_leader);
    let probe_for = Duration::from_secs(6);
    let askers: Vec<JoinHandle<BTreeMap<String, u32>>> = [pa.clone(), pb.clone()]
        .into_iter()
        .map(|p| {
            thread::spawn(move || {
                let mut seen = BTreeMap::new();
                let mut n = 0;
                while quorum_lost_at.elapsed() < probe_for {
                    let reply = p.ask(&format!("lock,name:new{n}"));
                    n += 1;
                    assert!(
                        reply.starts_with("err,"),
                        "with quorum lost, a new lock through {} was answered {reply:?}",
                        p.addr
                    );
                    let kind: String = reply.chars().take(50).collect();
                    *seen.entry(kind).or_default() += 1;
                }
                seen
            })
        })
        .collect();
    let stoppers: Vec<JoinHandle<Option<Duration>>> = [pa.clone(), pb.clone()]
        .into_iter()
        .map(|p| {
            thread::spawn(move || {
                wait_until(LIMIT, || p.ask(".ping,serving:1").starts_with("err,"))?;
                Some(between(quorum_lost, now_ns()))
            })
        })
        .collect();
    let answers: Vec<BTreeMap<String, u32>> =
        askers.into_iter().map(|t| t.join().unwrap()).collect();
    let stopped: Vec<Duration> = stoppers
        .into_iter()
        .map(|t| {
            t.join()
                .unwrap()
                .expect("a member still serving without quorum")
        })
        .collect();
    let holder_exit = holder.finish(LIMIT);
    let holder_end = records.await_hold("probe-holder-q", true).end.unwrap();

    // Quorum back.
    let restored_at = now_ns();
    let restored = Instant::now();
    etcd.restart(leader);
    etcd.restart(new_leader);
    etcd.wait_healthy(LIMIT).unwrap();
    let etcd_back = restored.elapsed();
    await_serving(&pa);
    await_serving(&pb);
    let back = restored.elapsed();
    await_grants(&records, now_ns(), 20);
    // Without quorum nothing can be granted: a grant read more than a client call's deadline
    // (2 s) after quorum was lost, before it came back, had no etcd write behind it.
    let unbacked: Vec<Hold> = records
        .holds()
        .into_iter()
        .filter(|h| h.start > quorum_lost + 2_500_000_000 && h.start < restored_at)
        .collect();
    assert!(unbacked.is_empty(), "granted without quorum: {unbacked:?}");
    eprintln!(
        "etcd leader killed: new leader after {}, 20 grants {} later; quorum lost: answers {answers:?}, \
         the holder through a ended +{} (exit {holder_exit:?}), members not serving by +{} / +{}; \
         quorum back: etcd healthy after {}, both members serving after {}",
        secs(elected),
        secs(resumed),
        secs(between(quorum_lost, holder_end)),
        secs(stopped[0]),
        secs(stopped[1]),
        secs(etcd_back),
        secs(back)
    );
    assert_eq!(holder_exit, Some(122), "do reports the lock lost");
    // Without quorum its member cannot renew its lease: it stops vouching (or the holder's own
    // lease clock runs out first).
    let window = MAX_TTL - lease_margin(MAX_TTL);
    assert_within(
        "the holder through a ended after quorum was lost",
        between(quorum_lost, holder_end),
        window - MAX_TTL / 4 - SLACK,
        ETCD_TTL - MARGIN + SLACK,
    );
    for (i, d) in stopped.iter().enumerate() {
        assert_within(
            &format!("member {i} not serving after quorum was lost"),
            *d,
            ETCD_TTL - RENEW_EVERY - MARGIN - SLACK,
            ETCD_TTL - MARGIN + SLACK,
        );
    }
    assert_within(
        "both members serving again after quorum came back",
        back,
        Duration::ZERO,
        Duration::from_secs(20),
    );
    let mut held = common::Client::connect(a.addr);
    assert_eq!(held.ask("lock,name:after"), "ok");
    assert_eq!(pb.ask("lock,name:after"), "not-granted");
    let churn = churn.finish();
    let summary = check_exclusive(&records.holds());
    eprintln!("etcd faults: {summary}; clients: {churn}");
}

// ---------------------------------------------------------------------------------------------
// Between a member and etcd: a proxy that can swallow etcd's answers to chosen requests, so
// that a request is applied by etcd while the member never learns it was.

/// A TCP proxy to one etcd member. It forwards everything, except the answers on a connection
/// once a request that is to go unanswered passed on it (the member's HTTP client then times
/// out, and drops that connection).
struct Proxy {
    addr: SocketAddr,
    /// Swallow the answers to lease renewals (`/v3/lease/keepalive`).
    mute_keepalive: Arc<AtomicBool>,
    /// Swallow the answer to the next transaction (`/v3/kv/txn`).
    mute_next_txn: Arc<AtomicBool>,
    /// Answers swallowed (in chunks read).
    swallowed: Arc<AtomicUsize>,
}

impl Proxy {
    fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = Proxy {
            addr: listener.local_addr().unwrap(),
            mute_keepalive: Arc::new(AtomicBool::new(false)),
            mute_next_txn: Arc::new(AtomicBool::new(false)),
            swallowed: Arc::new(AtomicUsize::new(0)),
        };
        let (keepalive, txn, swallowed) = (
            Arc::clone(&proxy.mute_keepalive),
            Arc::clone(&proxy.mute_next_txn),
            Arc::clone(&proxy.swallowed),
        );
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let muted = Arc::new(AtomicBool::new(false));
                let (c, s) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (keepalive, txn, m) =
                    (Arc::clone(&keepalive), Arc::clone(&txn), Arc::clone(&muted));
                thread::spawn(move || requests(c, s, &keepalive, &txn, &m));
                let swallowed = Arc::clone(&swallowed);
                thread::spawn(move || answers(server, client, &muted, &swallowed));
            }
        });
        proxy
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Client to etcd: forwards, and marks the connection muted when a request to go unanswered
/// passes (before forwarding it, so that none of its answer gets through).
fn requests(
    mut from: TcpStream,
    mut to: TcpStream,
    keepalive: &AtomicBool,
    txn: &AtomicBool,
    muted: &AtomicBool,
) {
    const KEEPALIVE: &[u8] = b"POST /v3/lease/keepalive ";
    const TXN: &[u8] = b"POST /v3/kv/txn ";
    let mut buf = [0u8; 16384];
    // The end of the previous read, so that a request line split between reads is found once.
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut window = std::mem::take(&mut tail);
        let fresh = window.len();
        window.extend_from_slice(&buf[..n]);
        let found = |marker: &[u8]| {
            window
                .windows(marker.len())
                .enumerate()
                .any(|(i, w)| w == marker && i + marker.len() > fresh)
        };
        if (found(KEEPALIVE) && keepalive.load(Ordering::SeqCst))
            || (found(TXN) && txn.swap(false, Ordering::SeqCst))
        {
            muted.store(true, Ordering::SeqCst);
        }
        let keep = window.len().min(KEEPALIVE.len() - 1);
        tail = window[window.len() - keep..].to_vec();
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// etcd to client: forwards, unless the connection is muted.
fn answers(mut from: TcpStream, mut to: TcpStream, muted: &AtomicBool, swallowed: &AtomicUsize) {
    let mut buf = [0u8; 16384];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if muted.load(Ordering::SeqCst) {
            swallowed.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

fn client_addr(url: &str) -> SocketAddr {
    url.trim_start_matches("http://").parse().unwrap()
}

/// The keys under `prefix`, as etcdctl lists them.
fn keys(etcd: &EtcdCluster, prefix: &str) -> Vec<String> {
    let out = etcd.etcdctl(1, &["get", "--prefix", prefix, "--keys-only"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A `lock` whose write etcd applied but whose answer never came: the client gets `err,` (not
/// `ok`, though the key exists and holds), and the key is deleted at once by the member's
/// cleanup, so that it does not block the name until the member's lease ends. The member
/// serves all along.
#[test]
fn a_lock_whose_etcd_write_has_an_unknown_outcome_gets_err_and_its_key_is_deleted() {
    let _serial = serial();
    let etcd = EtcdCluster::start3();
    let proxy = Proxy::start(client_addr(&etcd.endpoint(0)));
    let a = member(&[], &proxy.url(), "a");
    let b = member(&[], &etcd.endpoints().join(","), "b");
    let (pa, pb) = (Place::of(&a), Place::of(&b));
    await_serving(&pa);
    await_serving(&pb);

    proxy.mute_next_txn.store(true, Ordering::SeqCst);
    let asked = Instant::now();
    let asking = {
        let pa = pa.clone();
        thread::spawn(move || pa.ask("lock,name:u"))
    };
    // etcd applies the write meanwhile: the key exists, and holds the name.
    let applied = wait_until(LIMIT, || !keys(&etcd, "/faults/locks/u/").is_empty());
    let reply = asking.join().unwrap();
    let answered = asked.elapsed();
    let gone = wait_until(LIMIT, || keys(&etcd, "/faults/locks/u/").is_empty());
    eprintln!(
        "unknown outcome: key seen {} after asking, {reply:?} after {}, key deleted {} after the \
         err",
        secs(applied.unwrap_or_default()),
        secs(answered),
        secs(gone.unwrap_or_default())
    );
    assert!(applied.is_some(), "the write never showed in etcd");
    assert!(
        reply.starts_with("err,cluster unavailable: ") && reply.contains("outcome unknown"),
        "{reply}"
    );
    assert!(proxy.swallowed.load(Ordering::SeqCst) > 0);
    // The member's own deadline for a client's etcd call: 2 s.
    assert_within(
        "err after",
        answered,
        Duration::from_millis(1950),
        Duration::from_secs(2) + SLACK * 2,
    );
    let gone = gone.expect("the key was never deleted");
    assert_within(
        "key deleted after the err",
        gone,
        Duration::ZERO,
        Duration::from_secs(1),
    );
    assert!(pa.serving());
    assert!(!a.log_text().contains("NOT SERVING"), "{}", a.log_text());
    let mut c = common::Client::connect(b.addr);
    assert_eq!(c.ask("lock,name:u"), "ok");
}

/// A member answers a client's renewal (`.keepalive` → `alive`) only while its own etcd lease
/// outlives the client's deadline by the margin. With the member's lease renewals unanswered,
/// a renewal from a client with a long ttl gets no `alive` (its lease expires, or the member
/// hangs up when it stops vouching), while one with a short ttl is still answered.
#[test]
fn a_renewal_the_members_lease_cannot_cover_is_not_answered() {
    let _serial = serial();
    let etcd = EtcdCluster::start3();
    let proxy = Proxy::start(client_addr(&etcd.endpoint(0)));
    let a = member(&[], &proxy.url(), "a");
    let pa = Place::of(&a);
    await_serving(&pa);

    let mut long = common::Client::connect(a.addr);
    assert_eq!(long.ask("lock,name:r1,ttl:2.7"), "ok");
    let mut short = common::Client::connect(a.addr);
    assert_eq!(short.ask("lock,name:r2,ttl:0.5"), "ok");
    let stop = Arc::new(AtomicBool::new(false));
    let renewals = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            // (sent, reply)
            let mut seen: Vec<(u64, String)> = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let sent = now_ns();
                short.send(".keepalive");
                let mut line = String::new();
                let mut r = BufReader::new(&short.stream);
                match r.read_line(&mut line) {
                    Ok(n) if n > 0 => seen.push((sent, line.trim_end().to_owned())),
                    _ => break,
                }
                if line != "alive\n" {
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
            seen
        })
    };

    assert_eq!(long.ask(".keepalive"), "alive");
    proxy.mute_keepalive.store(true, Ordering::SeqCst);
    let muted = now_ns();
    // From here the member's lease is known good until at most 5 s after `muted`, so a renewal
    // sent 1.85 s later is one it cannot cover for a ttl of 2.7 s (+ 0.5 s margin).
    thread::sleep(Duration::from_millis(1850));
    let asked = now_ns();
    long.send(".keepalive");
    long.stream.set_read_timeout(Some(LIMIT)).unwrap();
    let mut rest = Vec::new();
    let _ = (&long.stream).read_to_end(&mut rest);
    let ended = now_ns();
    stop.store(true, Ordering::SeqCst);
    let seen = renewals.join().unwrap();
    let answered_after = seen
        .iter()
        .filter(|(sent, reply)| *sent > asked && reply == "alive")
        .count();
    proxy.mute_keepalive.store(false, Ordering::SeqCst);
    let back = await_serving(&pa);
    let rest = String::from_utf8_lossy(&rest).into_owned();
    eprintln!(
        "renewal not covered: the long-ttl client's renewal, sent +{}, ended with {rest:?} at \
         +{}; the short-ttl client got {answered_after} alive for renewals sent after it; \
         serving again {} after etcd's answers came back",
        secs(between(muted, asked)),
        secs(between(muted, ended)),
        secs(back)
    );
    assert!(rest.is_empty() || rest == "expired\n", "{rest:?}");
    // Its own ttl from its last `alive` (+2.7 s), or the member's stop (2.83 s to 4.5 s).
    assert_within(
        "the long-ttl client's end",
        between(muted, ended),
        Duration::from_millis(2700) - SLACK,
        ETCD_TTL - MARGIN + SLACK,
    );
    assert!(
        answered_after > 0,
        "the short-ttl client was not answered either: {seen:?}"
    );
    assert_within(
        "serving again",
        back,
        Duration::ZERO,
        Duration::from_secs(10),
    );
}
