// Built field by field, as a crate outside this one (the server's binary) has to: the structs
// are `#[non_exhaustive]`.
#![allow(clippy::field_reassign_with_default)]

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use super::*;

fn stats_json(stats: &Stats) -> String {
    let mut json = String::new();
    stats.write_json(&mut json);
    json
}

fn locks_json(locks: &Locks) -> String {
    let mut json = String::new();
    locks.write_json(&mut json);
    json
}

/// The numbers the server fills `.stats` with, in the types it keeps them.
struct ServerStats {
    requests: u64,
    acquired: u64,
    not_acquired: u64,
    held: usize,
    maxrss: i64,
    holders: usize,
    waiting: usize,
    released: u64,
    granted_after_wait: u64,
    wait_timeouts: u64,
    expired: u64,
    max_mismatches: u64,
    open: usize,
    threads: usize,
    idle: usize,
    uptime: Duration,
    dropped: u64,
    version: &'static str,
    shared: u64,
}

/// The server's writer of 0.2.0, before these types, copied from `Server::stats_json`: the bytes
/// scripts saw then. Keys added since come after them (see `stats_bytes_only_grow`).
fn stats_0_2_0(s: &ServerStats) -> String {
    let mut json = String::with_capacity(640);
    let _ = write!(
        json,
        "{{\"requests_count\": {}, \"lock_acquired_count\": {}, \
         \"lock_not_acquired_count\": {}, \"lock_count\": {held}, \"maxrss\": {}, \
         \"locks_held\": {held}, \"holders\": {holders}, \"waiting\": {waiting}, \
         \"lock_released_count\": {}, \"granted_after_wait_count\": {}, \
         \"wait_timeout_count\": {}, \"lease_expired_count\": {}, \
         \"max_mismatch_count\": {}, \"connections\": {}, \
         \"threads\": {threads}, \"threads_idle\": {idle}, \"uptime_secs\": {:.3}, \
         \"log_lines_dropped\": {}, \"version\": \"{}\"}}",
        s.requests,
        s.acquired,
        s.not_acquired,
        s.maxrss,
        s.released,
        s.granted_after_wait,
        s.wait_timeouts,
        s.expired,
        s.max_mismatches,
        s.open,
        s.uptime.as_secs_f64(),
        s.dropped,
        s.version,
        held = s.held,
        holders = s.holders,
        waiting = s.waiting,
        threads = s.threads,
        idle = s.idle,
    );
    json
}

/// What `Server::stats_json` is to build from the same numbers.
fn typed_stats(s: &ServerStats) -> Stats {
    let mut t = Stats::default();
    t.requests_count = Some(s.requests);
    t.lock_acquired_count = Some(s.acquired);
    t.lock_not_acquired_count = Some(s.not_acquired);
    t.maxrss = Some(u64::try_from(s.maxrss).unwrap_or(0));
    t.locks_held = Some(s.held as u64);
    t.holders = Some(s.holders as u64);
    t.waiting = Some(s.waiting as u64);
    t.lock_released_count = Some(s.released);
    t.granted_after_wait_count = Some(s.granted_after_wait);
    t.wait_timeout_count = Some(s.wait_timeouts);
    t.lease_expired_count = Some(s.expired);
    t.max_mismatch_count = Some(s.max_mismatches);
    t.connections = Some(s.open as u64);
    t.threads = Some(s.threads as u64);
    t.threads_idle = Some(s.idle as u64);
    t.uptime_secs = Some(s.uptime.as_secs_f64());
    t.log_lines_dropped = Some(s.dropped);
    t.version = Some(s.version.to_owned());
    t.shared_granted_count = Some(s.shared);
    t
}

fn server_stats_samples() -> Vec<ServerStats> {
    vec![
        ServerStats {
            requests: 0,
            acquired: 0,
            not_acquired: 0,
            held: 0,
            maxrss: 0,
            holders: 0,
            waiting: 0,
            released: 0,
            granted_after_wait: 0,
            wait_timeouts: 0,
            expired: 0,
            max_mismatches: 0,
            open: 0,
            threads: 0,
            idle: 0,
            uptime: Duration::ZERO,
            dropped: 0,
            version: "0.2.0",
            shared: 0,
        },
        ServerStats {
            requests: 12,
            acquired: 5,
            not_acquired: 2,
            held: 1,
            maxrss: 4180,
            holders: 1,
            waiting: 0,
            released: 4,
            granted_after_wait: 1,
            wait_timeouts: 0,
            expired: 0,
            max_mismatches: 0,
            open: 2,
            threads: 3,
            idle: 1,
            uptime: Duration::from_millis(81_250),
            dropped: 0,
            version: "0.2.0",
            shared: 3,
        },
        ServerStats {
            requests: u64::MAX,
            acquired: u64::MAX - 1,
            not_acquired: 1 << 53 | 1,
            held: usize::MAX,
            maxrss: i64::MAX,
            holders: 65_535,
            waiting: 9_999,
            released: 7,
            granted_after_wait: 8,
            wait_timeouts: 9,
            expired: 10,
            max_mismatches: 11,
            open: 10_000,
            threads: 10_001,
            idle: 3,
            // A year and 0.4 ms: `{:.3}` rounds it down, whoever writes it.
            uptime: Duration::new(365 * 86_400, 400_000),
            dropped: 123_456,
            version: "0.2.0-rc.1+build.7",
            shared: u64::MAX,
        },
    ]
}

/// 0.2.0's bytes stay where they were; `shared_granted_count` (0.3) follows them.
#[test]
fn stats_bytes_only_grow() {
    for sample in server_stats_samples() {
        let old = stats_0_2_0(&sample);
        let today = format!(
            "{}, \"shared_granted_count\": {}}}",
            old.strip_suffix('}').unwrap(),
            sample.shared
        );
        let typed = typed_stats(&sample);
        assert_eq!(stats_json(&typed), today);
        // And back: what was written reads as what was meant.
        let read: Stats = serde_json::from_str(&today).unwrap();
        assert!(read.other.is_empty(), "{:?}", read.other);
        assert_eq!(read.requests_count, typed.requests_count);
        assert_eq!(read.locks_held, typed.locks_held);
        assert_eq!(read.version, typed.version);
        assert_eq!(stats_json(&read), today, "written again, the same bytes");
    }
}

/// The holder of a lock as the server's table describes it (table::HolderInfo).
struct ServerHolder {
    client_id: Option<&'static str>,
    peer: Option<SocketAddr>,
    held_for: Duration,
    token: u64,
    ttl: Option<Duration>,
    shared: bool,
}

/// A waiter as the server's table describes it (table::WaiterInfo).
struct ServerWaiter {
    client_id: Option<&'static str>,
    peer: Option<SocketAddr>,
    waited: Duration,
    left: Duration,
    shared: bool,
}

/// A held name as the server's table describes it (table::LockInfo).
struct ServerLock {
    name: &'static str,
    max: u32,
    holders: Vec<ServerHolder>,
    waiters: Vec<ServerWaiter>,
}

/// The server's writer of 0.2.0, copied from `Server::locks_json`, with what 0.3 adds after
/// each object's old keys, marked: a holder's `mode`, a lock's `waiters`. Everything 0.2.0
/// wrote keeps its bytes and its place.
fn locks_0_2_0_and_after(locks: &[ServerLock]) -> String {
    let mode = |shared| if shared { "shared" } else { "exclusive" };
    let mut json = String::from("{");
    for (i, lock) in locks.iter().enumerate() {
        if i > 0 {
            json.push_str(", ");
        }
        let _ = write!(
            json,
            "\"{}\": {{\"max\": {}, \"waiting\": {}, \"holders\": [",
            lock.name,
            lock.max,
            lock.waiters.len()
        );
        for (j, h) in lock.holders.iter().enumerate() {
            if j > 0 {
                json.push_str(", ");
            }
            let quoted = |v: Option<String>| v.map_or("null".into(), |v| format!("\"{v}\""));
            let _ = write!(
                json,
                "{{\"client_id\": {}, \"peer\": {}, \"held_secs\": {:.3}, \"token\": {}, \
                 \"ttl_secs\": {}",
                quoted(h.client_id.map(str::to_owned)),
                quoted(h.peer.map(|p| p.to_string())),
                h.held_for.as_secs_f64(),
                h.token,
                h.ttl
                    .map_or("null".into(), |t| format!("{:.3}", t.as_secs_f64())),
            );
            // 0.3:
            let _ = write!(json, ", \"mode\": \"{}\"}}", mode(h.shared));
        }
        json.push(']');
        // 0.3:
        json.push_str(", \"waiters\": [");
        for (j, w) in lock.waiters.iter().enumerate() {
            if j > 0 {
                json.push_str(", ");
            }
            let quoted = |v: Option<String>| v.map_or("null".into(), |v| format!("\"{v}\""));
            let _ = write!(
                json,
                "{{\"client_id\": {}, \"peer\": {}, \"waited_secs\": {:.3}, \"left_secs\": {:.3}, \
                 \"mode\": \"{}\"}}",
                quoted(w.client_id.map(str::to_owned)),
                quoted(w.peer.map(|p| p.to_string())),
                w.waited.as_secs_f64(),
                w.left.as_secs_f64(),
                mode(w.shared),
            );
        }
        json.push_str("]}");
    }
    json.push('}');
    json
}

/// What `Server::locks_json` is to build from the table's snapshot.
fn typed_locks(locks: &[ServerLock]) -> Locks {
    let mode = |shared| {
        Some(if shared {
            Mode::Shared
        } else {
            Mode::Exclusive
        })
    };
    locks
        .iter()
        .map(|l| {
            let mut lock = LockInfo::new(l.name);
            lock.max = Some(l.max);
            lock.waiting = Some(l.waiters.len() as u64);
            lock.holders = l
                .holders
                .iter()
                .map(|h| {
                    let mut holder = HolderInfo::default();
                    holder.client_id = h.client_id.map(str::to_owned);
                    holder.peer = h.peer.map(|p| p.to_string());
                    holder.held_secs = Some(h.held_for.as_secs_f64());
                    holder.token = Some(h.token);
                    holder.ttl_secs = h.ttl.map(|t| t.as_secs_f64());
                    holder.mode = mode(h.shared);
                    holder
                })
                .collect();
            lock.waiters = l
                .waiters
                .iter()
                .map(|w| {
                    let mut waiter = WaiterInfo::default();
                    waiter.client_id = w.client_id.map(str::to_owned);
                    waiter.peer = w.peer.map(|p| p.to_string());
                    waiter.waited_secs = Some(w.waited.as_secs_f64());
                    waiter.left_secs = Some(w.left.as_secs_f64());
                    waiter.mode = mode(w.shared);
                    waiter
                })
                .collect();
            lock
        })
        .collect()
}

fn waiter(id: Option<&'static str>, peer: &str, shared: bool) -> ServerWaiter {
    ServerWaiter {
        client_id: id,
        peer: Some(peer.parse().unwrap()),
        waited: Duration::from_millis(3_100),
        left: Duration::from_millis(26_900),
        shared,
    }
}

fn holder(id: Option<&'static str>, peer: &str, token: u64, ttl: Option<u64>) -> ServerHolder {
    ServerHolder {
        client_id: id,
        peer: Some(peer.parse().unwrap()),
        held_for: Duration::from_millis(12_402),
        token,
        ttl: ttl.map(Duration::from_secs),
        shared: false,
    }
}

fn server_locks_samples() -> Vec<Vec<ServerLock>> {
    let many = (0..300)
        .map(|i| ServerHolder {
            client_id: if i % 2 == 0 {
                Some("worker-3@host")
            } else {
                None
            },
            peer: Some(SocketAddr::from((
                [10, 0, (i / 256) as u8, (i % 256) as u8],
                40_000,
            ))),
            held_for: Duration::from_micros(1_000_000 * i + 999_500),
            token: 1_764_154_800_123_457 + i,
            ttl: (i % 3 == 0).then(|| Duration::from_millis(30_000 + i)),
            shared: false,
        })
        .collect();
    vec![
        vec![],
        vec![ServerLock {
            name: "django-migrations",
            max: 1,
            waiters: vec![
                waiter(Some("pod-8"), "10.0.3.18:41000", false),
                waiter(None, "[::1]:7", true),
            ],
            holders: vec![holder(
                Some("pod-7"),
                "10.0.3.17:41822",
                1_764_154_800_123_457,
                None,
            )],
        }],
        vec![
            ServerLock {
                name: "A-z_0-9",
                max: 65_535,
                waiters: vec![],
                holders: vec![
                    holder(None, "[::1]:9", u64::MAX, Some(30)),
                    holder(None, "[fe80::1%2]:65535", 0, Some(1)),
                    ServerHolder {
                        client_id: Some("a.b@c_d-e"),
                        peer: None,
                        held_for: Duration::MAX,
                        token: 1 << 53 | 1,
                        ttl: Some(Duration::from_nanos(1)),
                        shared: true,
                    },
                ],
            },
            ServerLock {
                name: "semaphore",
                max: 300,
                waiters: (0..50).map(|_| waiter(None, "10.9.9.9:9", false)).collect(),
                holders: many,
            },
        ],
    ]
}

#[test]
fn locks_bytes_only_grow() {
    for sample in server_locks_samples() {
        let today = locks_0_2_0_and_after(&sample);
        let typed = typed_locks(&sample);
        assert_eq!(locks_json(&typed), today);
        let read: Locks = serde_json::from_str(&today).unwrap();
        assert_eq!(locks_json(&read), today, "written again, the same bytes");
        assert_eq!(read.len(), typed.len());
        for (r, t) in read.iter().zip(&typed) {
            assert_eq!((&r.name, r.max, r.waiting), (&t.name, t.max, t.waiting));
            assert!(r.other.is_empty());
            for (rh, th) in r.holders.iter().zip(&t.holders) {
                assert_eq!(
                    (&rh.client_id, &rh.peer, rh.token),
                    (&th.client_id, &th.peer, th.token)
                );
                assert!(rh.other.is_empty());
            }
        }
    }
}

#[test]
fn what_is_written_reads_back_the_same() {
    let mut weird = HolderInfo::default();
    weird.client_id =
        Some("quote\" back\\slash \n\r\t\u{8}\u{c}\u{0}\u{1b}[2J \u{7f}\u{85}\u{2028}é🔒".into());
    weird.peer = Some("[2001:db8::ff00:42:8329]:65535".into());
    weird.held_secs = Some(0.001);
    weird.token = Some(u64::MAX);
    weird.ttl_secs = Some(86_400.5);
    weird.mode = Some(Mode::Shared);
    weird.server = Some("tnl-2".into());
    weird.other.insert("zone".into(), serde_json::json!("eu-2"));
    weird.other.insert(
        "\u{1}odd key\"".into(),
        serde_json::json!({"nested": [1, -2, 0.5, null]}),
    );
    let mut lock = LockInfo::new("x");
    lock.max = Some(u32::MAX);
    lock.waiting = Some(u64::MAX);
    lock.holders = vec![weird, HolderInfo::default()];
    let mut w = WaiterInfo::default();
    w.client_id = Some("w".into());
    w.waited_secs = Some(1.5);
    w.other.insert("position".into(), 1.into());
    lock.waiters = vec![w, WaiterInfo::default()];
    lock.other.insert(
        "servers".into(),
        serde_json::json!([{"name": "tnl-1", "holders": 3}]),
    );
    let mut empty = LockInfo::new("");
    empty.max = Some(1);
    let locks: Locks = [lock, empty].into_iter().collect();
    let json = locks_json(&locks);
    let read: Locks = serde_json::from_str(&json).unwrap();
    // Sorted by name on reading: "" comes first.
    let mut expected: Vec<LockInfo> = locks.clone().into_iter().collect();
    expected.reverse();
    assert_eq!(read, expected.into_iter().collect());

    let mut stats = Stats::default();
    stats.requests_count = Some(u64::MAX);
    stats.uptime_secs = Some(0.125);
    stats.version = Some("\"9\u{1b}[31m\"".into());
    stats.other.insert("shared_grants_count".into(), 7.into());
    let read: Stats = serde_json::from_str(&stats_json(&stats)).unwrap();
    assert_eq!(read, stats);
    assert_eq!(
        serde_json::from_str::<Stats>(&stats_json(&Stats::default())).unwrap(),
        Stats::default()
    );
    assert_eq!(locks_json(&Locks::default()), "{}");
    assert_eq!(
        serde_json::from_str::<Locks>("{}").unwrap(),
        Locks::default()
    );
}

#[test]
fn strings_are_escaped_as_serde_json_escapes_them() {
    let mut all_ascii: String = (0u8..=0x7f).map(char::from).collect();
    all_ascii.push_str("\u{80}\u{85}\u{2028}\u{2029}\u{feff}é🔒");
    for s in ["", "plain", "\"", "\\", "a\"b\\c", &all_ascii] {
        let mut ours = String::new();
        push_string(&mut ours, s);
        assert_eq!(ours, serde_json::to_string(s).unwrap(), "{s:?}");
    }
}

#[test]
fn seconds_json_cannot_hold_are_null() {
    let mut holder = HolderInfo::default();
    holder.held_secs = Some(f64::NAN);
    holder.ttl_secs = Some(f64::INFINITY);
    let mut lock = LockInfo::new("a");
    lock.holders.push(holder);
    let json = locks_json(&[lock].into_iter().collect());
    assert_eq!(
        json,
        r#"{"a": {"max": null, "waiting": null, "holders": [{"client_id": null, "peer": null, "held_secs": null, "token": null, "ttl_secs": null, "mode": null}], "waiters": []}}"#
    );
    let mut stats = Stats::default();
    stats.uptime_secs = Some(f64::NEG_INFINITY);
    assert!(stats_json(&stats).contains(r#""uptime_secs": null"#));
}

/// What tcpnetlock 0.1.8 answers to `.stats`, captured from it: `pip install tcpnetlock==0.1.8`,
/// `tcpnetlock_server --port 17654`, one lock taken, one refused, then `.stats`.
const STATS_0_1_8: &str = r#"{"lock_count": 1, "maxrss": 13840, "requests_count": 3, "lock_acquired_count": 1, "lock_not_acquired_count": 1}"#;

#[test]
fn stats_from_0_1_8() {
    let stats: Stats = serde_json::from_str(STATS_0_1_8).unwrap();
    let mut expected = Stats::default();
    expected.locks_held = Some(1);
    expected.maxrss = Some(13_840);
    expected.requests_count = Some(3);
    expected.lock_acquired_count = Some(1);
    expected.lock_not_acquired_count = Some(1);
    assert_eq!(stats, expected);
    assert_eq!(stats.uptime(), None);

    // 0.1.8 sends "n/a" when getrusage fails (StatsActionHandler._get_maxrss).
    let na = STATS_0_1_8.replace("13840", "\"n/a\"");
    let stats: Stats = serde_json::from_str(&na).unwrap();
    assert_eq!(stats.maxrss, None);
    assert_eq!(
        stats.other,
        BTreeMap::from([("maxrss".into(), "n/a".into())])
    );
    assert_eq!(stats.requests_count, Some(3));
}

/// The examples in docs/PROTOCOL.md are lines this writer writes, byte for byte.
#[test]
fn the_protocol_docs_examples_are_written_byte_for_byte() {
    let doc = include_str!("../../docs/PROTOCOL.md");
    let example = |prefix: &str| {
        let line = doc
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix} example in docs/PROTOCOL.md"));
        line.to_owned()
    };
    let stats_line = example("stats,");
    let stats: Stats = serde_json::from_str(&stats_line).unwrap();
    assert!(stats.other.is_empty(), "{:?}", stats.other);
    assert_eq!(stats_json(&stats), stats_line);
    let locks_line = example("locks,");
    let locks: Locks = serde_json::from_str(&locks_line).unwrap();
    assert_eq!(locks_json(&locks), locks_line);
    assert_eq!(
        locks.get("django-migrations").unwrap().holders[0].token,
        Some(1_764_154_800_123_457)
    );
}

#[test]
fn a_value_that_does_not_fit_is_kept_not_fatal() {
    let stats: Stats = serde_json::from_str(
        r#"{"requests_count": 1e308, "lock_acquired_count": -1, "lock_not_acquired_count": 2.5,
            "maxrss": 1e308, "holders": "3", "waiting": [1], "version": 9,
            "uptime_secs": -5, "threads": 18446744073709551616, "connections": 4,
            "new_counter": 18446744073709551615}"#,
    )
    .unwrap();
    assert_eq!(stats.connections, Some(4));
    assert_eq!(stats.uptime_secs, Some(-5.0));
    assert_eq!(stats.uptime(), Some(Duration::ZERO));
    for key in [
        "requests_count",
        "lock_acquired_count",
        "lock_not_acquired_count",
        "maxrss",
        "holders",
        "waiting",
        "version",
        "threads",
    ] {
        assert!(stats.other.contains_key(key), "{key}: {:?}", stats.other);
    }
    assert_eq!(stats.other["new_counter"].as_u64(), Some(u64::MAX));
    assert_eq!(stats.requests_count, None);

    let locks: Locks = serde_json::from_str(
        r#"{"a": {"max": 0.5, "holders": {"not": "a list"}},
            "b": {"max": 70000, "waiting": 1, "holders": [{"token": -1, "held_secs": 1e308,
                  "peer": 5, "client_id": null, "ttl_secs": "soon"}]}}"#,
    )
    .unwrap();
    let a = locks.get("a").unwrap();
    assert!(a.holders.is_empty());
    assert_eq!(a.max, None);
    assert!(a.other.contains_key("holders") && a.other.contains_key("max"));
    let b = locks.get("b").unwrap();
    assert_eq!(b.max, Some(70_000));
    let h = &b.holders[0];
    assert_eq!(
        (h.token, h.client_id.as_ref(), h.held_secs),
        (None, None, Some(1e308))
    );
    assert_eq!(h.held(), Some(Duration::MAX));
    assert_eq!(
        h.other.keys().collect::<Vec<_>>(),
        ["peer", "token", "ttl_secs"]
    );
}

#[test]
fn only_the_shape_itself_is_an_error() {
    for text in ["[]", "5", "null", "\"stats\""] {
        let e = serde_json::from_str::<Stats>(text).unwrap_err();
        assert!(e.is_data(), "{text}: {e}");
        assert!(serde_json::from_str::<Locks>(text).is_err(), "{text}");
    }
    let e = serde_json::from_str::<Locks>(r#"{"ok": {}, "a\u001b": 5}"#).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(r#"lock "a\u{1b}" is 5, not an object"#),
        "{e}"
    );
    assert!(
        serde_json::from_str::<Stats>("{\"a\": ")
            .unwrap_err()
            .is_eof()
    );
}
