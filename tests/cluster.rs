//! Cluster mode through the real binary: two or three `tcpnetlock server --etcd` members on a
//! real 3-member etcd (tests/common/etcd.rs), every byte on loopback.
//!
//! One etcd cluster serves the tests that run at the same time (each test is its own lock
//! space: a prefix of its own), and is stopped when the last of them ends. The members are
//! started per test.
//!
//! What is checked: the protocol through a member (0.1.8's bytes, v2's requests, `.ping`,
//! `.stats`, `.locks`, bad requests, the client ttl bound), and across members: a lock held
//! through one is refused through another; a waiter on one is granted within milliseconds when
//! a holder on another releases or disconnects (measured: `cargo test --features etcd --test
//! cluster -- --nocapture`); FIFO order, semaphores and shared locks across members; tokens
//! that grow across members and across a restart of every member; `.locks` as the global view;
//! the CLI (`do`, `lock`, `ping`) against members; and mutual exclusion under churn across three
//! members (tests/common/churn.rs: client processes SIGKILLed at random, waits, half-closes; the
//! clients' own CLOCK_MONOTONIC records show no overlap).

#[path = "common/churn.rs"]
mod churn;
mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread;
use std::time::{Duration, Instant};

use common::etcd::EtcdCluster;
use common::{BIN, Client, Server, free_port, run_within, try_lock, wait_until};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(30);

/// The etcd cluster of the tests running now; started by the first, stopped after the last.
fn etcd() -> Arc<EtcdCluster> {
    static SHARED: Mutex<Weak<EtcdCluster>> = Mutex::new(Weak::new());
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(cluster) = shared.upgrade() {
        return cluster;
    }
    let cluster = Arc::new(EtcdCluster::start3());
    *shared = Arc::downgrade(&cluster);
    cluster
}

/// A lock space of its own for each test.
fn unique_prefix() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "/tnl-test-{}-{}/",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

/// Members of one lock space, named a, b, c...
struct Members {
    etcd: Arc<EtcdCluster>,
    prefix: String,
    servers: Vec<Server>,
}

impl Members {
    fn start(n: usize) -> Members {
        let etcd = etcd();
        let prefix = unique_prefix();
        let mut members = Members {
            etcd,
            prefix,
            servers: Vec::new(),
        };
        for i in 0..n {
            let server = members.spawn(i, &[]);
            members.servers.push(server);
        }
        members
    }

    fn name(i: usize) -> String {
        ((b'a' + i as u8) as char).to_string()
    }

    /// Starts member `i` (with `-v`) and waits until it serves.
    fn spawn(&self, i: usize, extra: &[&str]) -> Server {
        let endpoints = self.etcd.endpoints().join(",");
        let name = Members::name(i);
        let mut args = vec![
            "--etcd",
            &endpoints,
            "--etcd-prefix",
            &self.prefix,
            "--etcd-name",
            &name,
        ];
        args.extend_from_slice(extra);
        let server = Server::start(&args);
        await_serving(server.addr);
        server
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.servers[i].addr
    }

    /// Restarts every member (SIGKILL, then a new process each).
    fn restart_all(&mut self) {
        for s in &mut self.servers {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
        let n = self.servers.len();
        self.servers.clear();
        for i in 0..n {
            let server = self.spawn(i, &[]);
            self.servers.push(server);
        }
    }
}

fn await_serving(addr: SocketAddr) {
    let mut last = String::new();
    let ok = wait_until(LIMIT, || {
        last = Client::connect(addr).ask(".ping,serving:1");
        last == "pong"
    });
    assert!(ok.is_some(), "member at {addr} never served: {last}");
}

fn json(line: &str, prefix: &str) -> Value {
    let text = line
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("{line:?} does not start with {prefix:?}"));
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn locks(addr: SocketAddr) -> Value {
    json(&Client::connect(addr).ask(".locks"), "locks,")
}

fn stats(addr: SocketAddr) -> Value {
    json(&Client::connect(addr).ask(".stats"), "stats,")
}

/// Waits until member `addr`'s `.locks` satisfies `ready`; returns it.
fn await_view(addr: SocketAddr, ready: impl Fn(&Value) -> bool) -> Value {
    let mut seen = Value::Null;
    let ok = wait_until(LIMIT, || {
        seen = locks(addr);
        ready(&seen)
    });
    assert!(ok.is_some(), "never as expected: {seen}");
    seen
}

/// Waits until member `addr` sees `n` waiters of `name` (its view is the whole cluster's).
fn await_waiting(addr: SocketAddr, name: &str, n: u64) {
    let mut seen = Value::Null;
    let ok = wait_until(LIMIT, || {
        seen = locks(addr);
        seen[name]["waiting"].as_u64() == Some(n)
    });
    assert!(ok.is_some(), "never {n} waiting for {name}: {seen}");
}

fn token(reply: &str) -> u64 {
    reply
        .strip_prefix("ok,token:")
        .unwrap_or_else(|| panic!("not a token grant: {reply:?}"))
        .parse()
        .unwrap()
}

/// True if nothing arrives on `c` within `d`.
fn silent_for(c: &Client, d: Duration) -> bool {
    c.stream.set_read_timeout(Some(d)).unwrap();
    let r = c.stream.peek(&mut [0u8; 1]);
    c.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    matches!(r, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

// ---------------------------------------------------------------------------------------------
// The protocol through one member.

#[test]
fn the_v1_protocol_through_a_member() {
    let m = Members::start(1);
    let a = m.addr(0);
    let (mut holder, reply) = try_lock(a, "v1");
    assert_eq!(reply, "ok");
    assert_eq!(try_lock(a, "v1").1, "not-granted");
    assert_eq!(holder.ask(".keepalive"), "alive");
    assert_eq!(holder.ask("invalid:action"), "bad-action");
    assert_eq!(holder.ask("lock,name:v1"), "bad-action");
    assert_eq!(holder.ask("release"), "released");
    // Released means free, at once.
    let (mut again, reply) = try_lock(a, "v1");
    assert_eq!(reply, "ok");
    assert_eq!(again.ask("release,extra:ignored"), "released");
    let mut c = Client::connect(a);
    assert_eq!(
        c.ask(" lock , name : spaced ,client-id:pod-7.ns@host_1"),
        "ok"
    );
    for (line, reply) in [
        (".ping", "pong"),
        (".ping,serving:1", "pong"),
        ("lock,name:a/b", "err,invalid lock name"),
        ("lock,name:", "err,invalid lock name"),
        ("lock,name:x,client-id:a b", "err,invalid client-id"),
        ("hello", "bad-action"),
        (
            "lock,name:x,wait:soon",
            "err,invalid wait: expected seconds from 0 to 604800",
        ),
    ] {
        assert_eq!(Client::connect(a).ask(line), reply, "{line:?}");
    }
    // Several requests in one packet: the holder's answers in order.
    let mut p = Client::connect(a);
    p.send_raw(b"lock,name:piped\n.keepalive\nrelease\n");
    assert_eq!(p.line(), "ok");
    assert_eq!(p.line(), "alive");
    assert_eq!(p.line(), "released");
}

#[test]
fn stats_and_info_describe_the_member_and_the_cluster() {
    let m = Members::start(2);
    let (_h, reply) = try_lock(m.addr(0), "st");
    assert_eq!(reply, "ok");
    assert_eq!(try_lock(m.addr(1), "st").1, "not-granted");
    let mut w = Client::connect(m.addr(1));
    w.send("lock,name:st,wait:30");
    await_waiting(m.addr(0), "st", 1);
    await_waiting(m.addr(1), "st", 1);
    // 0.1.8's keys first, this member's own counts...
    let line = Client::connect(m.addr(0)).ask(".stats");
    assert!(line.starts_with("stats,{\"requests_count\": "), "{line}");
    let a = json(&line, "stats,");
    assert_eq!(a["lock_acquired_count"], 1);
    assert_eq!(a["holders"], 1);
    assert_eq!(a["waiting"], 0);
    let b = stats(m.addr(1));
    assert_eq!(b["lock_not_acquired_count"], 1);
    assert_eq!(b["waiting"], 1);
    // ...then the cluster's.
    for (s, name) in [(&a, "a"), (&b, "b")] {
        let c = &s["cluster"];
        assert_eq!(c["server"], name, "{s}");
        assert_eq!(c["serving"], true);
        assert_eq!(c["reason"], Value::Null);
        assert_eq!(c["etcd_ttl_secs"], 5.0);
        assert_eq!(c["max_ttl_secs"], 2.733);
        assert_eq!(c["locks_held"], 1);
        assert_eq!(c["holders"], 1);
        assert_eq!(c["waiting"], 1);
    }
    let info = json(&Client::connect(m.addr(1)).ask(".info"), "info,");
    assert_eq!(info["cluster"]["server"], "b");
    assert_eq!(info["cluster"]["max_ttl_secs"], 2.733);
}

#[test]
fn a_client_ttl_beyond_the_members_bound_is_refused_and_one_within_is_enforced() {
    let m = Members::start(2);
    let a = m.addr(0);
    assert_eq!(
        Client::connect(a).ask("lock,name:t,ttl:10"),
        "err,ttl:10 is longer than this cluster vouches for (at most 2.733 s: --etcd-ttl 5)"
    );
    assert_eq!(
        Client::connect(a).ask("lock,name:t,ttl:2.734"),
        "err,ttl:2.734 is longer than this cluster vouches for (at most 2.733 s: --etcd-ttl 5)"
    );
    // At the bound: granted, renewed by requests, and expired when silent.
    let mut c = Client::connect(a);
    assert_eq!(c.ask("lock,name:t,ttl:2.733"), "ok");
    assert_eq!(c.ask(".keepalive"), "alive");
    let mut short = Client::connect(a);
    assert_eq!(short.ask("lock,name:t2,ttl:0.5"), "ok");
    let start = Instant::now();
    // The other member waits for it, and is granted when it expires.
    let mut w = Client::connect(m.addr(1));
    w.send("lock,name:t2,wait:10");
    assert_eq!(short.line(), "expired");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(w.line(), "ok");
    assert!(short.closed_within(Duration::from_secs(2)));
    assert_eq!(stats(a)["lease_expired_count"], 1);
}

#[test]
fn a_wait_through_a_member_runs_out() {
    let m = Members::start(2);
    let (_h, reply) = try_lock(m.addr(0), "w");
    assert_eq!(reply, "ok");
    let start = Instant::now();
    let mut b = Client::connect(m.addr(1));
    assert_eq!(b.ask("lock,name:w,wait:0.4"), "not-granted");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(390) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(b.closed_within(Duration::from_secs(2)));
    let s = stats(m.addr(1));
    assert_eq!(s["wait_timeout_count"], 1);
    // Its key is gone: nobody waits any more.
    await_waiting(m.addr(0), "w", 0);
}

// ---------------------------------------------------------------------------------------------
// Across members.

#[test]
fn a_lock_held_through_one_member_is_refused_through_another() {
    let m = Members::start(2);
    let (mut h, reply) = try_lock(m.addr(0), "x");
    assert_eq!(reply, "ok");
    assert_eq!(try_lock(m.addr(1), "x").1, "not-granted");
    assert_eq!(h.ask("release"), "released");
    // A client that read `released` finds it free everywhere.
    let (mut h, reply) = try_lock(m.addr(1), "x");
    assert_eq!(reply, "ok");
    assert_eq!(try_lock(m.addr(0), "x").1, "not-granted");
    assert_eq!(h.ask("release"), "released");
}

#[test]
fn a_waiter_on_another_member_is_granted_within_milliseconds() {
    let m = Members::start(2);
    let rounds = 20;
    let mut by_release = Vec::new();
    let mut by_close = Vec::new();
    let mut by_reset = Vec::new();
    for round in 0..rounds {
        // Alternate which member holds and which waits.
        let (hold_at, wait_at) = if round % 2 == 0 { (0, 1) } else { (1, 0) };
        for how in ["release", "close", "reset"] {
            let name = format!("h{round}{how}");
            let (mut h, reply) = try_lock(m.addr(hold_at), &name);
            assert_eq!(reply, "ok");
            let mut w = Client::connect(m.addr(wait_at));
            w.send(&format!("lock,name:{name},wait:30"));
            await_waiting(m.addr(hold_at), &name, 1);
            let start = Instant::now();
            match how {
                "release" => {
                    h.send("release");
                }
                "close" => drop(h),
                _ => h.reset(),
            }
            assert_eq!(w.line(), "ok", "{how}");
            let took = start.elapsed();
            match how {
                "release" => by_release.push(took),
                "close" => by_close.push(took),
                _ => by_reset.push(took),
            }
        }
    }
    let max = |v: &[Duration]| *v.iter().max().unwrap();
    let (rel_max, close_max, reset_max) = (max(&by_release), max(&by_close), max(&by_reset));
    let (rel, close, reset) = (
        median(&mut by_release),
        median(&mut by_close),
        median(&mut by_reset),
    );
    eprintln!(
        "hand-off to a waiter on the other member ({rounds} each): release median {:.2} ms \
         (max {:.2}), close median {:.2} ms (max {:.2}), reset median {:.2} ms (max {:.2})",
        rel.as_secs_f64() * 1e3,
        rel_max.as_secs_f64() * 1e3,
        close.as_secs_f64() * 1e3,
        close_max.as_secs_f64() * 1e3,
        reset.as_secs_f64() * 1e3,
        reset_max.as_secs_f64() * 1e3,
    );
    // Milliseconds, with slack for a loaded 2-core machine: no polling anywhere.
    for (what, med, max) in [
        ("release", rel, rel_max),
        ("close", close, close_max),
        ("reset", reset, reset_max),
    ] {
        assert!(med < Duration::from_millis(100), "{what}: median {med:?}");
        assert!(max < Duration::from_secs(2), "{what}: max {max:?}");
    }
}

#[test]
fn waiters_are_served_in_arrival_order_across_members() {
    let m = Members::start(3);
    let (mut holder, reply) = try_lock(m.addr(0), "fifo");
    assert_eq!(reply, "ok");
    // Six waiters, arriving one after the other through members b, c, a, b, c, a.
    let mut waiters = Vec::new();
    for i in 0..6 {
        let mut w = Client::connect(m.addr((i + 1) % 3));
        w.send("lock,name:fifo,wait:60,fencing:1");
        await_waiting(m.addr(i % 3), "fifo", i as u64 + 1);
        waiters.push(w);
    }
    // The queue as every member shows it: in arrival order, with each waiter's member.
    for i in 0..3 {
        let view = await_view(m.addr(i), |v| v["fifo"]["waiting"] == 6);
        let servers: Vec<&str> = view["fifo"]["waiters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["server"].as_str().unwrap())
            .collect();
        assert_eq!(servers, ["b", "c", "a", "b", "c", "a"], "{view}");
    }
    assert_eq!(holder.ask("release"), "released");
    let mut last = 0;
    for i in 0..waiters.len() {
        let t = token(&waiters[i].line());
        assert!(t > last, "token {t} after {last}");
        last = t;
        // Nobody behind it was granted.
        for w in &waiters[i + 1..] {
            assert!(silent_for(w, Duration::from_millis(20)));
        }
        assert_eq!(waiters[i].ask("release"), "released");
    }
}

#[test]
fn semaphores_and_shared_locks_across_members() {
    let m = Members::start(2);
    let (a, b) = (m.addr(0), m.addr(1));
    // max:2 — one holder through each member; the third waits, through either.
    let mut s1 = Client::connect(a);
    assert_eq!(s1.ask("lock,name:sem,max:2"), "ok");
    let mut s2 = Client::connect(b);
    assert_eq!(s2.ask("lock,name:sem,max:2"), "ok");
    assert_eq!(Client::connect(a).ask("lock,name:sem,max:2"), "not-granted");
    assert_eq!(
        Client::connect(b).ask("lock,name:sem,max:3"),
        "err,max mismatch: sem is held with max:2"
    );
    let mut s3 = Client::connect(a);
    s3.send("lock,name:sem,max:2,wait:30");
    await_waiting(b, "sem", 1);
    assert_eq!(s2.ask("release"), "released");
    assert_eq!(s3.line(), "ok");
    // Member b sees it as soon as the change reaches it through its watch.
    let view = await_view(b, |v| {
        v["sem"]["holders"].as_array().map(Vec::len) == Some(2)
    });
    assert_eq!(view["sem"]["max"], 2);
    assert_eq!(s1.ask("release"), "released");
    assert_eq!(s3.ask("release"), "released");

    // Shared: readers through both members at once; a writer waits; a reader after the writer
    // waits behind it (no barging), then readers are granted together.
    let mut r1 = Client::connect(a);
    assert_eq!(r1.ask("lock,name:rw,shared:1"), "ok");
    let mut r2 = Client::connect(b);
    assert_eq!(r2.ask("lock,name:rw,shared:1"), "ok");
    assert_eq!(Client::connect(a).ask("lock,name:rw"), "not-granted");
    let mut writer = Client::connect(b);
    writer.send("lock,name:rw,wait:30");
    await_waiting(a, "rw", 1);
    assert_eq!(
        Client::connect(a).ask("lock,name:rw,shared:1"),
        "not-granted"
    );
    let mut r3 = Client::connect(a);
    r3.send("lock,name:rw,shared:1,wait:30");
    let mut r4 = Client::connect(b);
    r4.send("lock,name:rw,shared:1,wait:30");
    await_waiting(a, "rw", 3);
    assert_eq!(r1.ask("release"), "released");
    assert!(silent_for(&writer, Duration::from_millis(100)));
    assert_eq!(r2.ask("release"), "released");
    assert_eq!(writer.line(), "ok");
    assert!(silent_for(&r3, Duration::from_millis(50)));
    assert_eq!(writer.ask("release"), "released");
    assert_eq!(r3.line(), "ok");
    assert_eq!(r4.line(), "ok");
    let view = await_view(a, |v| {
        v["rw"]["holders"].as_array().map(Vec::len) == Some(2)
    });
    let modes: Vec<&str> = view["rw"]["holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["shared", "shared"]);
    assert_eq!(stats(b)["shared_granted_count"], 2);
}

#[test]
fn tokens_grow_across_members_and_a_restart_of_every_member() {
    let mut m = Members::start(2);
    let mut last = 0;
    let mut take = |m: &Members, i: usize, name: &str| {
        let (mut c, reply) = {
            let mut c = Client::connect(m.addr(i));
            let reply = c.ask(&format!("lock,name:{name},fencing:1"));
            (c, reply)
        };
        let t = token(&reply);
        assert!(t > last, "token {t} through member {i} after {last}");
        last = t;
        assert_eq!(c.ask("release"), "released");
    };
    for round in 0..10 {
        take(&m, round % 2, "tok");
        take(&m, (round + 1) % 2, &format!("tok{round}"));
    }
    // A waiter's token, granted after the holder's, is above it too.
    let mut h = Client::connect(m.addr(0));
    let held = token(&h.ask("lock,name:tw,fencing:1"));
    let mut w = Client::connect(m.addr(1));
    w.send("lock,name:tw,wait:30,fencing:1");
    await_waiting(m.addr(0), "tw", 1);
    // A grant on another name in between: the waiter's token is above it as well.
    take(&m, 0, "between");
    assert_eq!(h.ask("release"), "released");
    let waited = token(&w.line());
    assert!(waited > held, "{waited} after {held}");
    drop(w);
    m.restart_all();
    for round in 0..4 {
        take(&m, round % 2, "tok");
    }
    assert!(last > waited);
}

#[test]
fn locks_is_the_global_view_and_names_the_member() {
    let m = Members::start(2);
    let mut h = Client::connect(m.addr(0));
    let t = token(&h.ask("lock,name:g,client-id:holder-1,fencing:1,ttl:2"));
    let mut view = Value::Null;
    wait_until(LIMIT, || {
        view = locks(m.addr(1));
        view["g"]["holders"][0]["token"].as_u64().is_some()
    });
    assert_eq!(view["g"]["holders"][0]["token"], t, "{view}");
    let mut w = Client::connect(m.addr(1));
    w.send("lock,name:g,client-id:waiter-1,wait:20");
    await_waiting(m.addr(0), "g", 1);
    for i in 0..2 {
        let view = await_view(m.addr(i), |v| v["g"]["waiting"] == 1);
        let g = &view["g"];
        assert_eq!(g["max"], 1);
        let holder = &g["holders"][0];
        assert_eq!(holder["server"], "a", "{view}");
        assert_eq!(holder["client_id"], "holder-1");
        assert_eq!(holder["mode"], "exclusive");
        assert_eq!(holder["ttl_secs"], 2.0);
        assert!(holder["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert!(holder["held_secs"].as_f64().unwrap() < 10.0);
        let waiter = &g["waiters"][0];
        assert_eq!(waiter["server"], "b", "{view}");
        assert_eq!(waiter["client_id"], "waiter-1");
        let left = waiter["left_secs"].as_f64().unwrap();
        assert!(left > 10.0 && left <= 20.0, "{left}");
    }
    assert_eq!(h.ask("release"), "released");
    assert_eq!(w.line(), "ok");
    await_view(m.addr(0), |v| {
        v["g"]["holders"][0]["server"] == "b" && v["g"]["waiting"] == 0
    });
}

/// etcd compacts its history (every few minutes in a Kubernetes etcd). A member's watch of a
/// quiet prefix then cannot resume from where it was: the member reads the keyspace again,
/// serving all along, and its waiters are still granted.
#[test]
fn members_read_the_keyspace_again_after_a_compaction_and_serve_all_along() {
    let m = Members::start(2);
    let (mut h, reply) = try_lock(m.addr(0), "c");
    assert_eq!(reply, "ok");
    let mut w = Client::connect(m.addr(1));
    w.send("lock,name:c,wait:60");
    await_waiting(m.addr(0), "c", 1);
    await_waiting(m.addr(1), "c", 1);
    // Writes elsewhere move the revision past the members' watches; then compact up to it.
    let mut revision = 0;
    for _ in 0..2 {
        let out = m.etcd.etcdctl(0, &["put", "-w", "json", "/elsewhere", "x"]);
        assert!(out.status.success(), "{out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        revision = v["header"]["revision"].as_u64().unwrap();
    }
    let out = m.etcd.etcdctl(0, &["compact", &revision.to_string()]);
    assert!(out.status.success(), "{out:?}");
    // Their quiet watches are re-created within seconds, find the history gone, and read again.
    let compacted = |s: &Server| s.log_text().contains("etcd compacted its history");
    let read_again = wait_until(LIMIT, || {
        for i in 0..2 {
            let reply = Client::connect(m.addr(i)).ask(".ping,serving:1");
            assert_eq!(reply, "pong", "member {i} stopped serving");
        }
        m.servers.iter().all(compacted)
    });
    assert!(read_again.is_some(), "{}", m.servers[1].log_text());
    assert!(
        wait_until(LIMIT, || m.servers[1]
            .log_text()
            .contains("keyspace read again"))
        .is_some()
    );
    assert_eq!(h.ask("release"), "released");
    assert_eq!(w.line(), "ok");
    assert_eq!(try_lock(m.addr(0), "c").1, "not-granted");
}

// ---------------------------------------------------------------------------------------------
// Reaching etcd: flags, TLS, authentication.

#[test]
fn bad_cluster_flags_are_usage_errors_that_say_what_is_wrong() {
    let server = |args: &[&str]| {
        let mut cmd = Command::new(BIN);
        cmd.args(["server", "--listen", "127.0.0.1:0", "--log", "stderr"])
            .args(args)
            .env_remove("TCPNETLOCK_ETCD")
            .env_remove("TCPNETLOCK_ETCD_PASSWORD");
        run_within(&mut cmd, LIMIT)
    };
    let url = "http://127.0.0.1:2379";
    for (args, says) in [
        (vec!["--etcd", url, "--etcd-ttl", "1"], "1 is not in 2..=60"),
        (
            vec!["--etcd", url, "--etcd-ttl", "61"],
            "61 is not in 2..=60",
        ),
        (
            vec!["--etcd", url, "--etcd-name", "a b"],
            "expected 1 to 64 letters, digits, '.', '_' or '-'",
        ),
        (
            vec!["--etcd", url, "--etcd-prefix", "a b"],
            "without spaces",
        ),
        (vec!["--etcd", ""], "an empty etcd endpoint"),
        (
            vec!["--etcd", "ftp://127.0.0.1:2379"],
            "--etcd: etcd configuration: endpoint \"ftp://127.0.0.1:2379\": the scheme must be \
             http or https",
        ),
        (
            vec!["--etcd", url, "--etcd-cert", "/nonexistent"],
            "--etcd-key <FILE>",
        ),
        (vec!["--etcd-prefix", "/x/"], "--etcd <URL[,URL...]>"),
        (
            vec!["--etcd", url, "--etcd-cacert", "/nonexistent/ca.pem"],
            "cannot read the CA file /nonexistent/ca.pem",
        ),
    ] {
        let (code, _, err) = server(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[test]
fn a_member_reaches_etcd_over_tls_with_a_client_certificate() {
    let etcd = EtcdCluster::start(common::etcd::ClusterOptions {
        members: 1,
        tls: true,
        ..Default::default()
    });
    let tls = etcd.tls.as_ref().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["server", "--listen", "127.0.0.1:0", "--log", "stderr"])
        .args(["--etcd", &etcd.endpoint(0), "--etcd-name", "tls"])
        .arg("--etcd-cacert")
        .arg(&tls.ca)
        .arg("--etcd-cert")
        .arg(&tls.client_cert)
        .arg("--etcd-key")
        .arg(&tls.client_key);
    let member = Server::spawn(cmd);
    await_serving(member.addr);
    // The first lock makes the connection's own thread open a TLS connection to etcd (this
    // once overflowed its stack and aborted the server).
    let (mut c, reply) = try_lock(member.addr, "secure");
    assert_eq!(reply, "ok");
    assert_eq!(c.ask("release"), "released");
    // The log is written by its own thread: the line may come a moment after.
    assert!(
        wait_until(Duration::from_secs(2), || member
            .log_text()
            .contains("etcd at https://127.0.0.1:"))
        .is_some(),
        "{}",
        member.log_text()
    );
}

/// etcd's authentication: user and password. (Not together with a client certificate: etcd's
/// JSON gateway refuses a request that carries both, "CommonName of client sending a request
/// against gateway will be ignored".)
#[test]
fn a_member_logs_in_to_etcd_with_a_user_and_password() {
    let mut etcd = EtcdCluster::start(common::etcd::ClusterOptions {
        members: 1,
        ..Default::default()
    });
    etcd.enable_auth("secret");
    let start = |password: &str| {
        let mut cmd = Command::new(BIN);
        cmd.args(["server", "--listen", "127.0.0.1:0", "--log", "stderr"])
            .args(["--etcd-user", "root", "--etcd-name", "auth"])
            // The endpoints and the password from the environment, as a unit file would.
            .env("TCPNETLOCK_ETCD", etcd.endpoint(0))
            .env("TCPNETLOCK_ETCD_PASSWORD", password);
        Server::spawn(cmd)
    };
    let member = start("secret");
    await_serving(member.addr);
    let (mut c, reply) = try_lock(member.addr, "secure");
    assert_eq!(reply, "ok");
    assert_eq!(c.ask("release"), "released");
    // A wrong password: the member runs, grants nothing, and says why (not the password).
    let refused = start("wrong-pw");
    let reply = Client::connect(refused.addr).ask(".ping,serving:1");
    assert!(
        reply.starts_with("err,not serving locks: no etcd lease: etcd at http://127.0.0.1:"),
        "{reply}"
    );
    assert!(reply.contains("authentication"), "{reply}");
    assert!(
        !refused.log_text().contains("wrong-pw"),
        "{}",
        refused.log_text()
    );
}

// ---------------------------------------------------------------------------------------------
// The client commands against members.

fn tnl(addr: SocketAddr, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    let (command, rest) = args.split_first().unwrap();
    cmd.arg(command)
        .args(["--host", "127.0.0.1", "--port", &addr.port().to_string()])
        .args(rest);
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

#[test]
fn do_and_lock_hold_with_the_members_ttl_bound_unless_told_less() {
    let m = Members::start(1);
    let a = m.addr(0);
    let port = a.port().to_string();
    // While `do` runs its command, the command asks `.locks` (until the member's view, which
    // follows etcd's watch, shows the grant): the lease is the member's bound.
    let show = format!(
        "for i in $(seq 200); do out=$({BIN} locks --host 127.0.0.1 --port {port} --json); \
         case $out in *ttl_secs*) break;; esac; sleep 0.05; done; echo \"$out\""
    );
    let (code, out, err) = run_within(
        &mut tnl(a, &["do", "--lock-name", "d", "--", "sh", "-c", &show]),
        LIMIT,
    );
    assert_eq!(code, 0, "{err}");
    let view: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(view["d"]["holders"][0]["ttl_secs"], 2.733, "{out}");
    // A shorter --ttl is taken as given.
    let (code, out, err) = run_within(
        &mut tnl(
            a,
            &[
                "do",
                "--ttl",
                "1.5",
                "--lock-name",
                "d",
                "--",
                "sh",
                "-c",
                &show,
            ],
        ),
        LIMIT,
    );
    assert_eq!(code, 0, "{err}");
    let view: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(view["d"]["holders"][0]["ttl_secs"], 1.5, "{out}");
    // A longer one is a usage error that names the bound; nothing is asked for.
    for command in ["do", "lock"] {
        let mut args = vec![command, "--ttl", "10"];
        if command == "do" {
            args.extend(["--lock-name", "d", "--", "true"]);
        } else {
            args.push("d");
        }
        let (code, out, err) = run_within(&mut tnl(a, &args), LIMIT);
        assert_eq!((code, out.as_str()), (2, ""), "{command}: {err}");
        assert!(
            err.contains(&format!(
                "--ttl 10 is longer than the cluster member at 127.0.0.1:{port} vouches for: at \
                 most 2.733 s"
            )),
            "{command}: {err}"
        );
    }
    assert_eq!(stats(a)["lock_acquired_count"], 2);
    // `lock` without --ttl holds with the bound too, and renews it while it holds.
    let mut cmd = tnl(a, &["lock", "l"]);
    cmd.stdin(std::process::Stdio::piped());
    let mut held = common::Running::spawn(&mut cmd);
    assert!(wait_until(LIMIT, || held.stdout() == "ok\n").is_some());
    thread::sleep(Duration::from_secs(4));
    let view = locks(a);
    assert_eq!(view["l"]["holders"][0]["ttl_secs"], 2.733, "{view}");
    drop(held.child.stdin.take());
    let (code, _, err) = held.finish(LIMIT);
    assert_eq!(code, 0, "{err}");
    assert_eq!(stats(a)["lease_expired_count"], 0);
}

#[test]
fn ping_tells_a_member_that_cannot_grant_from_one_that_can() {
    let m = Members::start(1);
    let (code, out, err) = run_within(&mut tnl(m.addr(0), &["ping"]), LIMIT);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("pong from 127.0.0.1:"), "{out}");
    // A member whose etcd cannot be reached starts, says so, and grants nothing.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let lonely = Server::start(&["--etcd", &dead, "--etcd-name", "lonely"]);
    let c = lonely.addr;
    assert_eq!(Client::connect(c).ask(".ping"), "pong");
    let reply = Client::connect(c).ask(".ping,serving:1");
    assert!(
        reply.starts_with("err,not serving locks: no etcd lease: cannot reach any etcd endpoint"),
        "{reply}"
    );
    let reply = Client::connect(c).ask("lock,name:x");
    assert!(reply.starts_with("err,not serving locks: "), "{reply}");
    let (code, out, err) = run_within(&mut tnl(c, &["ping"]), LIMIT);
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert!(
        err.contains(&format!(
            "127.0.0.1:{} answers but cannot grant locks now: not serving locks: no etcd lease",
            c.port()
        )),
        "{err}"
    );
    let s = stats(c);
    assert_eq!(s["cluster"]["serving"], false);
    assert!(
        s["cluster"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("no etcd lease"),
        "{s}"
    );
    assert!(
        lonely
            .log_text()
            .contains("NOT SERVING LOCKS: no etcd lease")
    );
}

/// A member started while etcd answers nothing (every etcd member frozen) runs, grants
/// nothing, and serves once etcd answers again.
#[test]
fn a_member_started_before_etcd_answers_serves_once_it_does() {
    // An etcd of its own: freezing the shared one would stall the other tests.
    let etcd = EtcdCluster::start3();
    for i in 0..3 {
        etcd.freeze(i);
    }
    let member = Server::start(&[
        "--etcd",
        &etcd.endpoints().join(","),
        "--etcd-name",
        "early",
    ]);
    let reply = Client::connect(member.addr).ask("lock,name:e");
    assert!(reply.starts_with("err,not serving locks: "), "{reply}");
    let (code, _, err) = run_within(&mut tnl(member.addr, &["ping"]), LIMIT);
    assert_eq!(code, 1, "{err}");
    let thawed = Instant::now();
    for i in 0..3 {
        etcd.thaw(i);
    }
    await_serving(member.addr);
    let took = thawed.elapsed();
    eprintln!(
        "serving {:.2} s after etcd answered again",
        took.as_secs_f64()
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(try_lock(member.addr, "e").1, "ok");
    // The log is written by its own thread: the line may come a moment after.
    assert!(
        wait_until(Duration::from_secs(2), || member
            .log_text()
            .contains("member early serves locks"))
        .is_some(),
        "{}",
        member.log_text()
    );
}

/// systemd hears it too: READY=1 (the member runs, and systemd should not restart it in a
/// loop), with a STATUS= that says it cannot serve locks and why.
#[test]
fn a_member_that_cannot_serve_says_so_in_its_systemd_status() {
    use std::os::unix::net::UnixDatagram;
    let dir = common::TempDir::new("cluster-notify");
    let path = dir.path.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(LIMIT)).unwrap();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut cmd = Command::new(BIN);
    cmd.args(["server", "--listen", "127.0.0.1:0", "--log", "stderr"])
        .args(["--etcd", &dead])
        .env("NOTIFY_SOCKET", &path);
    let _member = Server::spawn(cmd);
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a notification");
    let first = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(first.lines().any(|l| l == "READY=1"), "{first:?}");
    let status = first
        .lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .expect("STATUS= with READY=1");
    assert!(
        status.starts_with("NOT SERVING LOCKS (no etcd lease: cannot reach any etcd endpoint"),
        "{status}"
    );
}

// ---------------------------------------------------------------------------------------------
// Churn across members.

/// Runs as a churn client process when TCPNETLOCK_CHURN_WORKER is set; otherwise does nothing.
#[test]
fn churn_worker() {
    churn::worker_main();
}

#[test]
fn exclusion_holds_across_members_under_churn() {
    let long = std::env::var("TCPNETLOCK_LONG_FAULTS").is_ok_and(|v| v == "1");
    let target = if long { 50_000 } else { 5_000 };
    let time_limit = Duration::from_secs(if long { 1800 } else { 120 });
    let etcd = etcd();
    let prefix = unique_prefix();
    let endpoints = etcd.endpoints().join(",");
    // Without -v: a log line per grant would only slow the members down.
    let members: Vec<Server> = (0..3)
        .map(|i| {
            let mut cmd = Command::new(BIN);
            cmd.args(["server", "--listen", "127.0.0.1:0", "--log", "stderr"])
                .args(["--etcd", &endpoints, "--etcd-prefix", &prefix])
                .args(["--etcd-name", &Members::name(i)]);
            let s = Server::spawn(cmd);
            await_serving(s.addr);
            s
        })
        .collect();
    let addrs: Vec<SocketAddr> = members.iter().map(|m| m.addr).collect();
    let all_stats = || {
        addrs
            .iter()
            .map(|a| Client::connect(*a).ask(".stats"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let run = churn::drive(&addrs, target, time_limit, all_stats);

    // Every killed client's key is deleted: nothing stays held or queued, on any member.
    let mut seen = Value::Null;
    let drained = wait_until(Duration::from_secs(10), || {
        addrs.iter().all(|a| {
            seen = stats(*a);
            seen["cluster"]["holders"] == 0
                && seen["cluster"]["waiting"] == 0
                && seen["holders"] == 0
                && seen["waiting"] == 0
        })
    });
    assert!(drained.is_some(), "locks left behind: {seen}");
    let mut per_member = Vec::new();
    for a in &addrs {
        let s = stats(*a);
        assert_eq!(s["wait_timeout_count"], 0, "{s}");
        per_member.push(format!(
            "{}: {} grants",
            s["cluster"]["server"], s["lock_acquired_count"]
        ));
    }
    let summary = churn::check(&run.text, &run.kills);
    eprintln!(
        "cluster churn: {summary}; {} client processes SIGKILLed; {:.1} s ({:.0} grants/s); {}",
        run.kills.len(),
        run.took.as_secs_f64(),
        target as f64 / run.took.as_secs_f64(),
        per_member.join(", ")
    );
}
