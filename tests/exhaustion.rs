//! Running out of descriptors, threads or connection slots (`--max-connections`): holders keep
//! their locks, newcomers get a clear `err,` line, the CPU stays idle, and service resumes when
//! the load drops.

mod common;

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use common::{BIN, Client, Server, try_lock, wait_until};

/// CPU seconds (user + system) the process has used so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[test]
fn out_of_descriptors() {
    let mut cmd = Command::new(BIN);
    cmd.args(["server", "--listen", "127.0.0.1:0", "--log", "stderr"]);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 32,
                rlim_max: 32,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let s = Server::spawn(cmd);
    let mut holders = Vec::new();
    let refusal = loop {
        let mut c = Client::connect(s.addr);
        let reply = c.ask(&format!("lock,name:fd{}", holders.len()));
        if reply != "ok" {
            break reply;
        }
        holders.push(c);
        assert!(holders.len() < 32, "the descriptor limit was never reached");
    };
    assert_eq!(refusal, "err,server out of file descriptors");
    assert!(holders.len() >= 10, "only {} holders fit", holders.len());

    // Newcomers keep being refused, without the acceptor spinning.
    let pid = s.child.id();
    let before = cpu_secs(pid);
    for _ in 0..20 {
        let mut c = Client::connect(s.addr);
        assert_eq!(c.line(), "err,server out of file descriptors");
        std::thread::sleep(Duration::from_millis(50));
    }
    let used = cpu_secs(pid) - before;
    assert!(
        used < 0.3,
        "{used} s of CPU while refusing 20 clients over 1 s"
    );

    for h in &mut holders {
        assert_eq!(h.ask(".keepalive"), "alive");
    }
    assert_eq!(holders.pop().unwrap().ask("release"), "released");
    assert!(
        wait_until(Duration::from_secs(2), || try_lock(s.addr, "after").1
            == "ok")
        .is_some(),
        "service did not resume"
    );
}

/// A pids cgroup (v1 here) limits the server's threads, as `TasksMax=` does under systemd.
struct PidsCgroup(std::path::PathBuf);

impl PidsCgroup {
    fn new(pid: u32, max: usize) -> PidsCgroup {
        let dir = std::path::PathBuf::from(format!("/sys/fs/cgroup/pids/tcpnetlock-test-{pid}"));
        std::fs::create_dir(&dir).unwrap_or_else(|e| {
            panic!(
                "cannot create {} (needs root and cgroup v1 pids): {e}",
                dir.display()
            )
        });
        std::fs::write(dir.join("pids.max"), max.to_string()).unwrap();
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
        PidsCgroup(dir)
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        // The cgroup can only be removed once empty: the test kills the server first.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn threads(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn out_of_threads() {
    let mut s = Server::start(&[]);
    let pid = s.child.id();
    let base = threads(pid);
    let cgroup = PidsCgroup::new(pid, base + 2);

    let (mut a, r1) = try_lock(s.addr, "t1");
    let (mut b, r2) = try_lock(s.addr, "t2");
    assert_eq!((r1.as_str(), r2.as_str()), ("ok", "ok"));
    for _ in 0..3 {
        let mut c = Client::connect(s.addr);
        assert_eq!(c.ask("lock,name:t3"), "err,server busy");
    }
    assert_eq!(a.ask(".keepalive"), "alive");
    assert_eq!(b.ask(".keepalive"), "alive");
    // Logging is asynchronous (a slow log must not stall the server): the line comes soon after.
    assert!(
        wait_until(Duration::from_secs(2), || s
            .log_text()
            .contains("cannot start a worker thread"))
        .is_some(),
        "{}",
        s.log_text()
    );

    // A released holder's worker is reused: no new thread needed.
    assert_eq!(a.ask("release"), "released");
    assert!(
        wait_until(Duration::from_secs(2), || try_lock(s.addr, "t3").1 == "ok").is_some(),
        "service did not resume"
    );
    assert_eq!(threads(pid), base + 2);

    s.child.kill().unwrap();
    s.child.wait().unwrap();
    drop(cgroup);
}

/// `--max-connections` reached: a stream of clients is refused with a clear line while the
/// holders and the waiter already in keep being served; refusing costs little CPU and nothing
/// spins while the server is full; service resumes when connections close.
#[test]
fn max_connections_reached() {
    const LIMIT: usize = 12;
    let s = Server::start(&["--max-connections", &LIMIT.to_string()]);
    let pid = s.child.id();
    // The limit is filled with 11 holders and one waiter (queued behind holder 0).
    let mut holders: Vec<Client> = (0..LIMIT - 2)
        .map(|i| {
            let (c, reply) = try_lock(s.addr, &format!("mc{i}"));
            assert_eq!(reply, "ok");
            c
        })
        .collect();
    let mut waiter = Client::connect(s.addr);
    waiter.send("lock,name:mc0,wait:120");
    assert!(
        wait_until(Duration::from_secs(5), || s.stat("waiting") == 1.0).is_some(),
        "the waiter never queued"
    );
    // The `.stats` connection counts until the server has closed it, a moment after its reply.
    let mut last = None;
    wait_until(Duration::from_secs(2), || {
        let (c, reply) = try_lock(s.addr, &format!("mc{}", LIMIT - 2));
        last = Some((c, reply));
        last.as_ref().unwrap().1 == "ok"
    });
    let (c, reply) = last.unwrap();
    assert_eq!(reply, "ok");
    holders.push(c);

    // 2000 clients in 2 s, refused; the CPU they cost the server is measured. This shared 2-CPU
    // VM sometimes runs everything at half speed for seconds (CI once saw 3.6 s for the burst
    // and 510 us per refusal, against 2.2 s and 140-235 us otherwise), so a burst over the CPU
    // bound is measured once more and the better of the two is held to it: a server that spins
    // or refuses expensively fails both. Every other check holds for every burst.
    let cheap = |(cpu, took): (f64, Duration)| cpu < took.as_secs_f64() / 4.0;
    let mut measured = burst(&s, &mut holders);
    if !cheap(measured) {
        let again = burst(&s, &mut holders);
        if again.0 < measured.0 {
            measured = again;
        }
    }
    let (cpu, took) = measured;
    assert!(
        cheap(measured),
        "{cpu:.3} s of CPU to refuse {} clients in {took:.2?}",
        BURST_THREADS * BURST_PER_THREAD
    );

    // Full, with nobody knocking: nothing runs.
    let before = cpu_secs(pid);
    std::thread::sleep(Duration::from_secs(1));
    let idle = cpu_secs(pid) - before;
    eprintln!("full and idle: {idle:.3} s of CPU in 1 s");
    assert!(idle < 0.05, "{idle:.3} s of CPU in 1 s while full and idle");

    // The load drops: the waiter gets holder 0's lock, and the freed place serves a newcomer.
    assert_eq!(holders.remove(0).ask("release"), "released");
    assert_eq!(waiter.line(), "ok");
    let mut newcomer = None;
    let resumed = wait_until(Duration::from_secs(2), || {
        let (c, reply) = try_lock(s.addr, "after");
        newcomer = Some(c);
        reply == "ok"
    });
    assert!(resumed.is_some(), "service did not resume");
    let mut newcomer = newcomer.unwrap();
    // Full again: refused again.
    assert_eq!(Client::connect(s.addr).line(), "err,too many connections");
    assert_eq!(newcomer.ask("release"), "released");
}

const BURST_THREADS: usize = 4;
const BURST_PER_THREAD: usize = 500;

/// 2000 clients in 2 s, from 4 threads, while the server is full: each connects, asks for a
/// lock as any client would, and reads to the end; every one must be refused with the limit's
/// line while the holders are served as usual. Returns the server's CPU seconds over the burst,
/// and how long it took.
fn burst(s: &Server, holders: &mut [Client]) -> (f64, Duration) {
    use std::io::{Read, Write};
    use std::time::Instant;

    let pace = Duration::from_millis(4);
    let pid = s.child.id();
    let cpu_before = cpu_secs(pid);
    let start = Instant::now();
    let burst: Vec<_> = (0..BURST_THREADS)
        .map(|_| {
            let addr = s.addr;
            std::thread::spawn(move || {
                let mut replies = std::collections::HashMap::<String, usize>::new();
                for _ in 0..BURST_PER_THREAD {
                    let mut c = std::net::TcpStream::connect(addr).expect("connect");
                    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    // The server may have refused and closed before the request arrives.
                    let _ = c.write_all(b"lock,name:burst\n");
                    let mut reply = Vec::new();
                    let got = c.read_to_end(&mut reply);
                    let mut seen = String::from_utf8_lossy(&reply).into_owned();
                    if let Err(e) = got {
                        seen = format!("{seen} then {e}");
                    }
                    *replies.entry(seen).or_default() += 1;
                    std::thread::sleep(pace);
                }
                replies
            })
        })
        .collect();
    // Meanwhile the holders are served as usual.
    let mut slowest = Duration::ZERO;
    let mut rounds = 0;
    while !burst.iter().all(|t| t.is_finished()) {
        for h in holders.iter_mut() {
            let asked = Instant::now();
            assert_eq!(h.ask(".keepalive"), "alive");
            slowest = slowest.max(asked.elapsed());
        }
        rounds += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut replies = std::collections::HashMap::<String, usize>::new();
    for t in burst {
        for (k, n) in t.join().unwrap() {
            *replies.entry(k).or_default() += n;
        }
    }
    let took = start.elapsed();
    let cpu = cpu_secs(pid) - cpu_before;
    let refused = BURST_THREADS * BURST_PER_THREAD;
    eprintln!(
        "{refused} clients refused in {took:.2?}: server CPU {cpu:.3} s ({:.0} us per refusal); \
         {rounds} rounds of keepalives from {} holders meanwhile, slowest {slowest:.2?}",
        cpu * 1e6 / refused as f64,
        holders.len()
    );
    assert_eq!(
        replies.get("err,too many connections\n"),
        Some(&refused),
        "{replies:?}"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "a holder waited {slowest:?}"
    );
    (cpu, took)
}

/// A connection from `source` (another loopback address) to the server.
fn connect_from(source: &str, server: std::net::SocketAddr) -> std::net::TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let from: std::net::SocketAddr = format!("{source}:0").parse().unwrap();
    socket.bind(&from.into()).unwrap();
    socket.connect(&server.into()).unwrap();
    let stream: std::net::TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// Sends one request on a fresh connection from `source` and reads the reply to the close.
fn ask_from(source: &str, server: std::net::SocketAddr, request: &str) -> String {
    let mut c = connect_from(source, server);
    let _ = c.write_all(format!("{request}\n").as_bytes());
    let mut reply = String::new();
    let _ = c.read_to_string(&mut reply);
    reply
}

/// Full of holders, the server still answers health checks and monitoring; a lock request is
/// refused, and the holders are untouched.
#[test]
fn a_full_server_still_answers_health_checks() {
    const LIMIT: usize = 20;
    let s = Server::start(&["--max-connections", &LIMIT.to_string()]);
    let mut holders: Vec<Client> = (0..LIMIT)
        .map(|i| {
            let (c, reply) = try_lock(s.addr, &format!("full{i}"));
            assert_eq!(reply, "ok");
            c
        })
        .collect();
    for _ in 0..3 {
        assert_eq!(ask_from("127.0.0.1", s.addr, ".ping"), "pong\n");
        let stats = ask_from("127.0.0.1", s.addr, ".stats");
        assert!(stats.starts_with("stats,{"), "{stats:?}");
        assert!(stats.contains("\"holders\": 20,"), "{stats}");
        let locks = ask_from("127.0.0.1", s.addr, ".locks");
        assert!(locks.starts_with("locks,{\"full0\": "), "{locks:?}");
        assert_eq!(
            ask_from("127.0.0.1", s.addr, "lock,name:one-more"),
            "err,too many connections\n"
        );
    }
    for h in &mut holders {
        assert_eq!(h.ask(".keepalive"), "alive");
    }
}

/// With --max-connections-per-peer, one address that opens connection after connection (never
/// sending a byte) takes its own share and no more: another address is served as usual, health
/// checks included. The first address still gets `.ping` answered past its limit.
#[test]
fn one_peer_cannot_take_every_connection() {
    let s = Server::start(&[
        "--max-connections",
        "60",
        "--max-connections-per-peer",
        "10",
    ]);
    // The flood: 100 silent connections from 127.0.0.2. Past its 10 and the few kept for status
    // requests, each is refused at once.
    let mut flood = Vec::new();
    let mut refused = 0;
    for _ in 0..100 {
        let mut c = connect_from("127.0.0.2", s.addr);
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 64];
        match c.read(&mut buf) {
            Ok(n) if n > 0 => {
                assert_eq!(
                    &buf[..n],
                    b"err,too many connections from your address\n",
                    "{:?}",
                    String::from_utf8_lossy(&buf[..n])
                );
                refused += 1;
            }
            _ => flood.push(c),
        }
    }
    assert_eq!((flood.len(), refused), (14, 86));
    // Everybody else: served.
    assert_eq!(ask_from("127.0.0.1", s.addr, ".ping"), "pong\n");
    let (mut other, reply) = try_lock(s.addr, "elsewhere");
    assert_eq!(reply, "ok");
    assert_eq!(other.ask("release"), "released");
    // The flooding address: a lock past its share is refused, its place opens when one of its
    // connections closes.
    drop(flood.pop());
    drop(flood.pop());
    let served = wait_until(Duration::from_secs(2), || {
        ask_from("127.0.0.2", s.addr, ".ping") == "pong\n"
    });
    assert!(
        served.is_some(),
        "a status request past the peer's limit was not answered"
    );
    assert_eq!(
        ask_from("127.0.0.2", s.addr, "lock,name:greedy"),
        "err,too many connections from your address\n"
    );
    flood.truncate(5);
    let granted = wait_until(Duration::from_secs(2), || {
        let mut c = connect_from("127.0.0.2", s.addr);
        c.write_all(b"lock,name:greedy\n").unwrap();
        let mut buf = [0u8; 64];
        let n = c.read(&mut buf).unwrap_or(0);
        &buf[..n] == b"ok\n"
    });
    assert!(
        granted.is_some(),
        "the peer's freed places were not given back"
    );
}

#[test]
fn the_per_peer_limit_is_bounded() {
    for bad in ["0", "1000001", "-1", "lots"] {
        let out = Command::new(BIN)
            .args(["server", &format!("--max-connections-per-peer={bad}")])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--max-connections-per-peer"), "{bad}: {err}");
    }
}
