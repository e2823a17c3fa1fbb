//! The etcd client (src/etcd/) against real etcd clusters started by tests/common/etcd.rs:
//! every call, watch latency, failover, lease expiry timing, quorum loss, TLS and auth.
//!
//! The module is mounted here by path until the server mounts it (issue 13). The tests run one
//! at a time (a shared lock): several 3-member clusters at once on 2 cores would blur the
//! timings they measure, and one test sets SSL_CERT_FILE. Measured numbers are printed (`cargo test --features etcd --test
//! etcd_client -- --nocapture`).

#[path = "../src/etcd/mod.rs"]
#[allow(dead_code, unused_imports)]
mod etcd;

#[path = "common/etcd.rs"]
mod etcd_cluster;

use std::sync::mpsc::{self, Receiver};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use etcd::{
    Compare, CompareOp, DeleteRequest, EtcdClient, EtcdConfig, EtcdError, EventKind, Op,
    OpResponse, PutRequest, RangeRequest, SortOrder, SortTarget, Txn, WatchMessage, WatchRequest,
};
use etcd_cluster::{ClusterOptions, EtcdCluster};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn after(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms)
}

fn client(endpoints: Vec<String>) -> EtcdClient {
    EtcdClient::new(EtcdConfig::new(endpoints)).expect("client config")
}

/// A guarded put: create `key` under `lease` only if it does not exist.
fn create(key: &str, lease: i64) -> Txn {
    Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then([Op::Put(PutRequest::new(key, "v").lease(lease))])
        .or_else([Op::Range(RangeRequest::key(key))])
}

fn count(client: &EtcdClient, key: &str) -> i64 {
    client
        .range(&RangeRequest::key(key).count_only(), after(5000))
        .expect("range")
        .count
}

/// Starts a watch whose messages arrive, stamped with their arrival time, on a channel.
fn watch(
    client: &EtcdClient,
    request: WatchRequest,
) -> (etcd::EtcdWatch, Receiver<(Instant, WatchMessage)>) {
    let (tx, rx) = mpsc::channel();
    let watch = client
        .watch(request, after(5000), move |m| {
            let _ = tx.send((Instant::now(), m));
        })
        .expect("watch");
    (watch, rx)
}

/// The next batch of events, skipping interruption notices.
fn next_events(
    rx: &Receiver<(Instant, WatchMessage)>,
    limit: Duration,
) -> (Instant, Vec<etcd::Event>) {
    let end = Instant::now() + limit;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, WatchMessage::Events { events, .. })) => return (at, events),
            Ok((_, WatchMessage::Interrupted { .. } | WatchMessage::Resumed { .. })) => {}
            Ok((_, other)) => panic!("unexpected watch message {other:?}"),
            Err(_) => panic!("no watch event within {limit:?}"),
        }
    }
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

#[test]
fn every_call_works_on_a_three_member_cluster() {
    let _serial = serial();
    let cluster = EtcdCluster::start3();
    let c = client(cluster.endpoints());

    let members = c.member_list(after(5000)).unwrap();
    let mut names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["e0", "e1", "e2"]);
    for m in &members {
        assert_eq!(m.client_urls.len(), 1);
        assert!(cluster.endpoints().contains(&m.client_urls[0]), "{m:?}");
    }
    let statuses: Vec<_> = (0..3).map(|i| c.status(i, after(5000)).unwrap()).collect();
    assert!(statuses[0].leader != 0);
    assert!(statuses.iter().all(|s| s.leader == statuses[0].leader));
    assert!(statuses[0].version.starts_with("3."), "{:?}", statuses[0]);
    let ids: Vec<u64> = statuses.iter().map(|s| s.header.member_id).collect();
    assert!(ids.contains(&statuses[0].leader));

    let lease = c.lease_grant(5, after(5000)).unwrap();
    assert_eq!(lease.ttl_secs, 5);
    assert!(lease.id != 0);

    // The guarded put wins once; the second time the failure branch reads the winner.
    let first = c.txn(&create("/t/a", lease.id), after(5000)).unwrap();
    assert!(first.succeeded);
    assert!(matches!(first.responses[..], [OpResponse::Put(_)]));
    let created = first.header.revision;
    let second = c.txn(&create("/t/a", lease.id), after(5000)).unwrap();
    assert!(!second.succeeded);
    let [OpResponse::Range(read)] = &second.responses[..] else {
        panic!("{:?}", second.responses);
    };
    assert_eq!(read.kvs[0].key, b"/t/a");
    assert_eq!(read.kvs[0].value, b"v");
    assert_eq!(read.kvs[0].create_revision, created);
    assert_eq!(read.kvs[0].lease, lease.id);
    assert_eq!(
        second.header.revision, created,
        "a failed compare writes nothing"
    );

    // A prefix read sorted by creation, paged.
    c.txn(&create("/t/b", lease.id), after(5000)).unwrap();
    c.put(&PutRequest::new("/u", "outside the prefix"), after(5000))
        .unwrap();
    let by_creation =
        RangeRequest::prefix("/t/").sort(SortTarget::CreateRevision, SortOrder::Ascend);
    let all = c.range(&by_creation, after(5000)).unwrap();
    assert_eq!(all.count, 2);
    let keys: Vec<&[u8]> = all.kvs.iter().map(|kv| kv.key.as_slice()).collect();
    assert_eq!(keys, [b"/t/a".as_slice(), b"/t/b".as_slice()]);
    let page = c.range(&by_creation.clone().limit(1), after(5000)).unwrap();
    assert_eq!((page.kvs.len(), page.count, page.more), (1, 2, true));
    assert_eq!(page.kvs[0].key, b"/t/a");

    // Compare on mod revision: only the holder of the current revision may delete.
    let stale = Txn::new()
        .when([Compare::mod_revision("/t/a", CompareOp::Equal, created - 1)])
        .and_then([Op::Delete(DeleteRequest::key("/t/a"))]);
    assert!(!c.txn(&stale, after(5000)).unwrap().succeeded);
    let current = Txn::new()
        .when([Compare::mod_revision("/t/a", CompareOp::Equal, created)])
        .and_then([Op::Delete(DeleteRequest::key("/t/a").prev_kv())]);
    let deleted = c.txn(&current, after(5000)).unwrap();
    assert!(deleted.succeeded);
    let [OpResponse::Delete(d)] = &deleted.responses[..] else {
        panic!("{:?}", deleted.responses);
    };
    assert_eq!(d.deleted, 1);
    assert_eq!(d.prev_kvs[0].create_revision, created);

    // Put with prev_kv, delete by prefix.
    let put = c
        .put(&PutRequest::new("/u", "again").prev_kv(), after(5000))
        .unwrap();
    assert_eq!(put.prev_kv.unwrap().value, b"outside the prefix");
    let gone = c.delete(&DeleteRequest::prefix("/u"), after(5000)).unwrap();
    assert_eq!(gone.deleted, 1);

    // Renew, then revoke: the lease's keys go with it.
    assert_eq!(c.lease_keep_alive(lease.id, after(5000)).unwrap(), 5);
    assert_eq!(count(&c, "/t/b"), 1);
    c.lease_revoke(lease.id, after(5000)).unwrap();
    assert_eq!(count(&c, "/t/b"), 0);
    assert_eq!(
        c.lease_keep_alive(lease.id, after(5000)),
        Err(EtcdError::LeaseNotFound { id: lease.id })
    );
    assert_eq!(
        c.lease_revoke(lease.id, after(5000)),
        Err(EtcdError::LeaseNotFound { id: lease.id })
    );
    // A put under a lease that is gone is etcd's error, not a success.
    match c.txn(&create("/t/c", lease.id), after(5000)) {
        Err(EtcdError::Etcd { message, .. }) => assert!(message.contains("lease not found")),
        other => panic!("{other:?}"),
    }

    // A watch from a compacted revision is created, then ended with the compaction point
    // (etcd 3.4 sends the two as separate frames).
    let now = c.range(&RangeRequest::key("/x"), after(5000)).unwrap();
    let out = cluster.etcdctl(0, &["compaction", &now.header.revision.to_string()]);
    assert!(out.status.success(), "{out:?}");
    let (_watch, rx) = watch(&c, WatchRequest::key("/t/a").start_revision(1));
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok((_, WatchMessage::Compacted { compact_revision })) => {
            assert_eq!(compact_revision, now.header.revision)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_watch_sees_a_delete_within_milliseconds() {
    let _serial = serial();
    let cluster = EtcdCluster::start3();
    let c = client(cluster.endpoints());
    let (_watch, rx) = watch(&c, WatchRequest::prefix("/w/").prev_kv());
    let mut latencies = Vec::new();
    let mut renewals = Vec::new();
    let lease = c.lease_grant(5, after(5000)).unwrap();
    for i in 0..60 {
        let key = format!("/w/{i}");
        let put = c.txn(&create(&key, lease.id), after(5000)).unwrap();
        let (_, events) = next_events(&rx, Duration::from_secs(5));
        assert_eq!(events[0].kind, EventKind::Put);
        let sent = Instant::now();
        c.delete(&DeleteRequest::key(key.as_str()), after(5000))
            .unwrap();
        let (seen, events) = next_events(&rx, Duration::from_secs(5));
        latencies.push(seen - sent);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, EventKind::Delete);
        assert_eq!(events[0].kv.key, key.as_bytes());
        let prev = events[0].prev_kv.as_ref().expect("prev_kv asked for");
        assert_eq!(prev.create_revision, put.header.revision);

        let sent = Instant::now();
        c.lease_keep_alive(lease.id, after(5000)).unwrap();
        renewals.push(sent.elapsed());
    }
    latencies.sort();
    renewals.sort();
    let (p50, p90, max) = (
        percentile(&latencies, 50),
        percentile(&latencies, 90),
        latencies[latencies.len() - 1],
    );
    println!("delete sent -> watch event: p50 {p50:?} p90 {p90:?} max {max:?} (60 deletes)");
    println!(
        "lease keepalive round trip: p50 {:?} p90 {:?} max {:?}",
        percentile(&renewals, 50),
        percentile(&renewals, 90),
        renewals[renewals.len() - 1]
    );
    // The delete's own round trip (commit on a quorum) is part of this; slack for a loaded CI.
    assert!(p50 < Duration::from_millis(50), "p50 {p50:?}");
    assert!(max < Duration::from_millis(1000), "max {max:?}");
}

/// Time until `op` first succeeds, polling.
fn until_ok<T>(limit: Duration, mut op: impl FnMut() -> Result<T, EtcdError>) -> Duration {
    let start = Instant::now();
    loop {
        match op() {
            Ok(_) => return start.elapsed(),
            Err(e) => assert!(
                start.elapsed() < limit,
                "still failing after {limit:?}: {e}"
            ),
        }
    }
}

#[test]
fn calls_and_watches_fail_over_when_the_member_in_use_is_killed() {
    let _serial = serial();
    let mut cluster = EtcdCluster::start3();
    let observer = client(cluster.endpoints());

    // A follower first, then the leader: each time the client's first endpoint is the victim.
    for round in ["follower", "leader"] {
        let leader = cluster.wait_leader(Duration::from_secs(10));
        let victim = if round == "leader" {
            leader
        } else {
            (leader + 1) % 3
        };
        let mut order = vec![cluster.endpoint(victim)];
        order.extend((0..3).filter(|&i| i != victim).map(|i| cluster.endpoint(i)));
        let c = client(order);
        let lease = c.lease_grant(5, after(5000)).unwrap();
        assert!(count(&c, "/f") == 0);
        let (_watch, rx) = watch(&c, WatchRequest::prefix(format!("/f/{round}/")));

        let killed = Instant::now();
        cluster.kill(victim);
        let read = until_ok(Duration::from_secs(10), || {
            c.range(&RangeRequest::key("/f"), after(3000))
        });
        let key = format!("/f/{round}/after-kill");
        let write = until_ok(Duration::from_secs(10), || {
            c.txn(&create(&key, lease.id), after(3000))
        });
        let (seen, events) = next_events(&rx, Duration::from_secs(15));
        assert_eq!(events[0].kv.key, key.as_bytes());
        println!(
            "{round} killed: first read after {read:?}, first write {write:?} later, watch event \
             {:?} after the kill",
            seen - killed
        );
        assert!(
            c.lease_keep_alive(lease.id, after(3000)).is_ok(),
            "the lease survives a member"
        );
        // The write happened exactly once.
        assert_eq!(count(&observer, &key), 1);
        cluster.restart(victim);
        cluster.wait_healthy(Duration::from_secs(20)).unwrap();
    }
}

#[test]
fn a_watch_resumes_on_another_member_without_losing_or_repeating_events() {
    let _serial = serial();
    let mut cluster = EtcdCluster::start3();
    let leader = cluster.wait_leader(Duration::from_secs(10));
    let victim = (leader + 1) % 3;
    let mut order = vec![cluster.endpoint(victim)];
    order.extend((0..3).filter(|&i| i != victim).map(|i| cluster.endpoint(i)));
    let watcher = client(order);
    let writer = client(vec![cluster.endpoint(leader)]);
    let (_watch, rx) = watch(&watcher, WatchRequest::prefix("/r/"));

    let writes = 40;
    let mut revisions = Vec::new();
    for i in 0..writes {
        if i == writes / 2 {
            cluster.kill(victim);
        }
        let put = writer
            .put(&PutRequest::new(format!("/r/{i}"), "v"), after(5000))
            .unwrap();
        revisions.push(put.header.revision);
    }
    let mut seen = Vec::new();
    let mut interrupted = false;
    let mut resumed = false;
    let end = Instant::now() + Duration::from_secs(20);
    while seen.len() < writes {
        match rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok((_, WatchMessage::Events { events, .. })) => {
                seen.extend(events.iter().map(|e| e.kv.mod_revision))
            }
            Ok((_, WatchMessage::Interrupted { endpoint, .. })) => {
                assert_eq!(endpoint, cluster.endpoint(victim));
                interrupted = true;
            }
            Ok((_, WatchMessage::Resumed { endpoint, .. })) => {
                assert_ne!(endpoint, cluster.endpoint(victim));
                resumed = true;
            }
            Ok((_, other)) => panic!("{other:?}"),
            Err(_) => panic!("saw {} of {writes} events", seen.len()),
        }
    }
    assert!(interrupted && resumed);
    assert_eq!(seen, revisions, "every write once, in order");
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "nothing repeated"
    );
}

#[test]
fn a_watch_on_a_frozen_member_moves_after_the_idle_limit_and_ends_when_dropped() {
    let _serial = serial();
    let cluster = EtcdCluster::start3();
    let leader = cluster.wait_leader(Duration::from_secs(10));
    // The watch knows only the two followers, so whichever one it is on can be frozen while
    // the writer keeps using the leader.
    let followers: Vec<String> = (0..3)
        .filter(|&i| i != leader)
        .map(|i| cluster.endpoint(i))
        .collect();
    let mut config = EtcdConfig::new(followers.clone());
    config.watch_idle = Duration::from_millis(800);
    let watcher = EtcdClient::new(config).unwrap();
    let writer = client(vec![cluster.endpoint(leader)]);
    let (watch, rx) = watch(&watcher, WatchRequest::prefix("/i/"));
    // A first stream opens on the first endpoint; later ones are announced by `Resumed`.
    let mut on = followers[0].clone();

    // A healthy but silent stream is re-created after the idle limit, losing nothing.
    thread::sleep(Duration::from_millis(2000));
    let put = writer
        .put(&PutRequest::new("/i/quiet", "v"), after(5000))
        .unwrap();
    loop {
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok((_, WatchMessage::Interrupted { .. })) => {}
            Ok((_, WatchMessage::Resumed { endpoint, .. })) => on = endpoint,
            Ok((_, WatchMessage::Events { events, .. })) => {
                assert_eq!(events[0].kv.mod_revision, put.header.revision);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    let frozen = (0..3)
        .find(|&i| cluster.endpoint(i) == on)
        .expect("the watch is on a member of the cluster");
    assert_ne!(frozen, leader);

    cluster.freeze(frozen);
    let frozen_at = Instant::now();
    let put = writer
        .put(&PutRequest::new("/i/frozen", "v"), after(5000))
        .unwrap();
    let mut left_frozen = false;
    let seen = loop {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok((_, WatchMessage::Interrupted { .. })) => {}
            Ok((_, WatchMessage::Resumed { endpoint, .. })) => {
                left_frozen |= endpoint != cluster.endpoint(frozen)
            }
            Ok((at, WatchMessage::Events { events, .. })) => {
                assert_eq!(events[0].kv.mod_revision, put.header.revision);
                break at;
            }
            other => panic!("{other:?}"),
        }
    };
    cluster.thaw(frozen);
    println!(
        "watch on a frozen member: event delivered {:?} after the freeze (idle limit 0.8 s)",
        seen - frozen_at
    );
    assert!(left_frozen, "resumed on a live member");
    assert!(
        seen - frozen_at < Duration::from_secs(4),
        "{:?}",
        seen - frozen_at
    );

    // Dropped: no more callbacks, and the thread (holding the channel's sender) ends within
    // the idle limit.
    drop(watch);
    writer
        .put(&PutRequest::new("/i/after-drop", "v"), after(5000))
        .unwrap();
    match rx.recv_timeout(Duration::from_secs(3)) {
        Ok((_, message)) => panic!("message after drop: {message:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => {}
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("the watch thread still runs"),
    }
}

/// One lease's life: renewed for a while (the key must stay), then left to expire. Returns the
/// time from the send of the last acknowledged renewal to the watch seeing the key deleted.
fn expiry_after_last_renewal(c: &EtcdClient, ttl: i64, key: &str) -> Duration {
    let lease = c.lease_grant(ttl, after(5000)).unwrap();
    assert_eq!(lease.ttl_secs, ttl);
    c.txn(&create(key, lease.id), after(5000)).unwrap();
    let (_watch, rx) = watch(c, WatchRequest::key(key));
    let interval = Duration::from_millis(ttl as u64 * 1000 / 4);
    let renewing = Instant::now();
    let mut last_sent = Instant::now();
    while renewing.elapsed() < Duration::from_millis(ttl as u64 * 1500) {
        thread::sleep(interval);
        last_sent = Instant::now();
        assert_eq!(c.lease_keep_alive(lease.id, after(1000)).unwrap(), ttl);
    }
    assert!(
        rx.try_recv().is_err(),
        "the key was deleted while its lease was renewed"
    );
    assert_eq!(count(c, key), 1);
    let (deleted, events) = next_events(&rx, Duration::from_secs(ttl as u64 + 5));
    assert_eq!(events[0].kind, EventKind::Delete);
    deleted - last_sent
}

#[test]
fn a_renewed_lease_lives_and_an_abandoned_one_expires_not_before_its_ttl() {
    let _serial = serial();
    let cluster = EtcdCluster::start3();
    // Streams are not re-created for idleness during a measurement.
    let mut config = EtcdConfig::new(cluster.endpoints());
    config.watch_idle = Duration::from_secs(60);
    let c = EtcdClient::new(config).unwrap();
    let runs: Vec<(i64, usize)> = vec![(2, 5), (5, 2)];
    let handles: Vec<_> = runs
        .into_iter()
        .map(|(ttl, rounds)| {
            let c = c.clone();
            thread::spawn(move || {
                (0..rounds)
                    .map(|i| expiry_after_last_renewal(&c, ttl, &format!("/l/{ttl}/{i}")))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for (handle, ttl) in handles.into_iter().zip([2u64, 5]) {
        let expiries = handle.join().unwrap();
        let ttl = Duration::from_secs(ttl);
        let late: Vec<Duration> = expiries.iter().map(|&e| e.saturating_sub(ttl)).collect();
        println!(
            "TTL {ttl:?}: deletion seen {:?} after the last renewal was sent (beyond the TTL: {late:?})",
            expiries
        );
        for expiry in expiries {
            // Never before the TTL (the safety side), and within etcd's 500 ms revoke check
            // plus a commit, with slack for a loaded machine.
            assert!(expiry >= ttl, "expired after {expiry:?} < TTL {ttl:?}");
            assert!(expiry <= ttl + Duration::from_millis(2000), "{expiry:?}");
        }
    }
}

#[test]
fn with_quorum_lost_writes_fail_clearly_by_the_deadline_and_never_apply() {
    let _serial = serial();
    let mut cluster = EtcdCluster::start3();
    let c = client(cluster.endpoints());
    let lease = c.lease_grant(60, after(5000)).unwrap();
    let leader = cluster.wait_leader(Duration::from_secs(10));
    let survivor = (leader + 1) % 3;
    let killed = Instant::now();
    for i in 0..3 {
        if i != survivor {
            cluster.kill(i);
        }
    }

    // Right after the loss the survivor may not know yet: whatever the answer, not a success,
    // and by the deadline.
    let start = Instant::now();
    let early = c.txn(&create("/q/early", lease.id), after(2000));
    let took = start.elapsed();
    println!("write right after losing quorum: {took:?}: {early:?}");
    assert!(early.is_err(), "{early:?}");
    assert!(took < Duration::from_millis(2500), "{took:?}");

    // Once it knows, it says "no leader" at once (the require-leader header), for every call.
    let knows = Instant::now();
    while c.status(survivor, after(1000)).map(|s| s.leader) != Ok(0) {
        assert!(
            knows.elapsed() < Duration::from_secs(10),
            "survivor still follows a leader"
        );
        thread::sleep(Duration::from_millis(50));
    }
    println!(
        "survivor reported no leader by {:?} after the kill",
        killed.elapsed()
    );
    let start = Instant::now();
    let refused = c.txn(&create("/q/refused", lease.id), after(2000));
    let took = start.elapsed();
    println!("write with no leader: {took:?}: {refused:?}");
    let Err(EtcdError::NoLeader { failures }) = &refused else {
        panic!("{refused:?}");
    };
    assert!(
        failures
            .iter()
            .any(|f| f.endpoint == cluster.endpoint(survivor))
    );
    assert!(
        refused
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("no leader")
    );
    assert!(took <= Duration::from_millis(2500), "{took:?}");
    assert!(matches!(
        c.range(&RangeRequest::key("/q"), after(1000)),
        Err(EtcdError::NoLeader { .. })
    ));
    assert!(matches!(
        c.lease_grant(5, after(1000)),
        Err(EtcdError::NoLeader { .. })
    ));

    // Quorum back: service resumes, and the refused write was never applied.
    let back = Instant::now();
    for i in 0..3 {
        if i != survivor {
            cluster.restart(i);
        }
    }
    let resumed = until_ok(Duration::from_secs(20), || {
        c.txn(&create("/q/after", lease.id), after(2000))
    });
    println!(
        "writes resumed {:?} after restarting two members",
        back.elapsed()
    );
    let _ = resumed;
    assert_eq!(count(&c, "/q/refused"), 0);
    assert_eq!(count(&c, "/q/after"), 1);
}

#[test]
fn a_write_to_a_frozen_member_is_outcome_unknown_and_never_resent() {
    let _serial = serial();
    let cluster = EtcdCluster::start3();
    let leader = cluster.wait_leader(Duration::from_secs(10));
    let frozen = (leader + 1) % 3;
    let mut order = vec![cluster.endpoint(frozen)];
    order.extend((0..3).filter(|&i| i != frozen).map(|i| cluster.endpoint(i)));
    let c = client(order);
    let elsewhere = client(vec![cluster.endpoint(leader)]);
    let lease = c.lease_grant(60, after(5000)).unwrap();
    cluster.freeze(frozen);

    // A read moves on after its share of the deadline (a third, with 3 endpoints).
    let start = Instant::now();
    c.range(&RangeRequest::key("/z"), after(3000)).unwrap();
    let read = start.elapsed();
    println!("read failed over from a frozen member in {read:?}");
    assert!(
        read >= Duration::from_millis(900) && read < Duration::from_millis(2500),
        "{read:?}"
    );

    // The client now prefers a live member; put the frozen one first again for the write.
    let c = client(
        std::iter::once(cluster.endpoint(frozen))
            .chain((0..3).filter(|&i| i != frozen).map(|i| cluster.endpoint(i)))
            .collect(),
    );
    let start = Instant::now();
    let write = c.txn(&create("/z/key", lease.id), after(1500));
    let took = start.elapsed();
    println!("write to a frozen member: outcome unknown after {took:?} (deadline 1.5 s)");
    match &write {
        Err(e @ EtcdError::OutcomeUnknown { endpoint, .. }) => {
            assert_eq!(endpoint, &cluster.endpoint(frozen));
            assert!(!e.not_applied());
            assert!(e.to_string().contains("outcome unknown"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    assert_eq!(count(&elsewhere, "/z/key"), 0, "not sent to another member");
    cluster.thaw(frozen);
    cluster.wait_healthy(Duration::from_secs(10)).unwrap();
    // Whether the frozen member applies the buffered request once thawed depends on whether it
    // sees the closed connection first: that is exactly why the outcome is "unknown".
    println!(
        "after thawing, the write {} applied",
        if count(&elsewhere, "/z/key") == 1 {
            "was"
        } else {
            "was not"
        }
    );
}

#[test]
fn tls_with_client_certificates() {
    let _serial = serial();
    let cluster = EtcdCluster::start(ClusterOptions {
        members: 1,
        tls: true,
        ..ClusterOptions::default()
    });
    let tls = cluster.tls.as_ref().unwrap();
    let endpoint = cluster.endpoint(0);
    assert!(endpoint.starts_with("https://"));
    let mut config = EtcdConfig::new([endpoint.clone()]);
    config.ca_file = Some(tls.ca.clone());
    config.cert_file = Some(tls.client_cert.clone());
    config.key_file = Some(tls.client_key.clone());
    let c = EtcdClient::new(config.clone()).unwrap();
    let lease = c.lease_grant(5, after(5000)).unwrap();
    let (_watch, rx) = watch(&c, WatchRequest::key("/tls"));
    assert!(
        c.txn(&create("/tls", lease.id), after(5000))
            .unwrap()
            .succeeded
    );
    assert_eq!(
        next_events(&rx, Duration::from_secs(5)).1[0].kv.key,
        b"/tls"
    );
    assert_eq!(c.member_list(after(5000)).unwrap().len(), 1);

    // Without a client certificate the member refuses the handshake.
    let mut no_cert = config.clone();
    no_cert.cert_file = None;
    no_cert.key_file = None;
    let err = EtcdClient::new(no_cert)
        .unwrap()
        .range(&RangeRequest::key("/tls"), after(1000))
        .unwrap_err();
    println!("no client certificate: {err}");
    assert!(matches!(err, EtcdError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains(&endpoint), "{err}");
    // The member's alert or its closing of the socket, whichever the client meets first.
    let text = err.to_string();
    assert!(
        text.contains("BadCertificate") || text.contains("Broken pipe"),
        "{err}"
    );
    // A refused handshake proves the member never read a write: not "outcome unknown".
    let mut no_cert_writer = config.clone();
    no_cert_writer.cert_file = None;
    no_cert_writer.key_file = None;
    let err = EtcdClient::new(no_cert_writer)
        .unwrap()
        .txn(&create("/tls/no-cert", lease.id), after(1000))
        .unwrap_err();
    assert!(matches!(err, EtcdError::Unreachable { .. }), "{err}");
    assert_eq!(count(&c, "/tls/no-cert"), 0);

    // With another CA, the member's certificate is not trusted.
    let other = etcd_cluster::TlsFiles::generate(&cluster.dir.join("other-ca"));
    let mut wrong_ca = config.clone();
    wrong_ca.ca_file = Some(other.ca.clone());
    let err = EtcdClient::new(wrong_ca)
        .unwrap()
        .range(&RangeRequest::key("/tls"), after(1000))
        .unwrap_err();
    println!("another CA: {err}");
    assert!(matches!(err, EtcdError::Unreachable { .. }), "{err}");
    // (Both CAs share a name, so rustls finds the issuer and rejects the signature.)
    assert!(
        err.to_string().contains("invalid peer certificate"),
        "{err}"
    );

    // Without a CA file, the system's bundle is used, as etcdctl does: SSL_CERT_FILE names it
    // here. A bundle that cannot be read is a configuration error, said at once.
    let mut system = config.clone();
    system.ca_file = None;
    let saved: Vec<_> = ["SSL_CERT_FILE", "SSL_CERT_DIR"]
        .map(|var| (var, std::env::var_os(var)))
        .into();
    // SAFETY (each env call): every test of this file holds SERIAL, and no thread of an
    // earlier test reads the environment.
    unsafe { std::env::remove_var("SSL_CERT_DIR") };
    unsafe { std::env::set_var("SSL_CERT_FILE", &tls.ca) };
    let through_system = EtcdClient::new(system.clone()).map(|c| c.member_list(after(5000)));
    unsafe { std::env::set_var("SSL_CERT_FILE", cluster.dir.join("missing.pem")) };
    let missing = EtcdClient::new(system).err().map(|e| e.to_string());
    for (var, value) in saved {
        match value {
            Some(value) => unsafe { std::env::set_var(var, value) },
            None => unsafe { std::env::remove_var(var) },
        }
    }
    assert_eq!(through_system.unwrap().unwrap().len(), 1);
    let missing = missing.expect("a missing bundle is refused");
    println!("no CA file and no system bundle: {missing}");
    assert!(
        missing.contains("no system CA certificates found"),
        "{missing}"
    );
    assert!(missing.contains("missing.pem"), "{missing}");

    // Plain http to the https port is not etcd's JSON, and says so without hanging.
    let plain = client(vec![endpoint.replace("https://", "http://")]);
    let start = Instant::now();
    let err = plain
        .range(&RangeRequest::key("/tls"), after(1000))
        .unwrap_err();
    println!("http to an https member: {err}");
    assert!(start.elapsed() < Duration::from_millis(1500));
}

#[test]
fn user_and_password_auth_and_token_refresh() {
    let _serial = serial();
    let mut cluster = EtcdCluster::start(ClusterOptions {
        members: 1,
        auth_token_ttl: Some(1),
        ..ClusterOptions::default()
    });
    cluster.enable_auth("secret");
    let endpoint = cluster.endpoint(0);

    let anonymous = client(vec![endpoint.clone()]);
    let err = anonymous
        .range(&RangeRequest::key("/a"), after(3000))
        .unwrap_err();
    println!("no credentials: {err}");
    assert!(
        err.to_string().contains("give a user and password"),
        "{err}"
    );

    let mut config = EtcdConfig::new([endpoint.clone()]);
    config.user = Some("root".into());
    config.password = Some("wrong".into());
    let err = EtcdClient::new(config.clone())
        .unwrap()
        .range(&RangeRequest::key("/a"), after(3000))
        .unwrap_err();
    println!("wrong password: {err}");
    assert!(matches!(err, EtcdError::Auth { .. }), "{err}");

    config.password = Some("secret".into());
    let c = EtcdClient::new(config).unwrap();
    let lease = c.lease_grant(30, after(3000)).unwrap();
    assert!(
        c.txn(&create("/a", lease.id), after(3000))
            .unwrap()
            .succeeded
    );
    let (_watch, rx) = watch(&c, WatchRequest::key("/a"));
    // The token lives 1 s unused (--auth-token-ttl 1); past that etcd calls it invalid and the
    // client must log in again on its own.
    thread::sleep(Duration::from_millis(2500));
    c.delete(&DeleteRequest::key("/a"), after(3000)).unwrap();
    assert_eq!(
        next_events(&rx, Duration::from_secs(5)).1[0].kind,
        EventKind::Delete
    );
    c.lease_keep_alive(lease.id, after(3000)).unwrap();
    assert_eq!(count(&c, "/a"), 0);
}

#[test]
fn configuration_errors_name_what_is_wrong() {
    let _serial = serial();
    let err = |config: EtcdConfig| match EtcdClient::new(config) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("accepted"),
    };
    assert!(err(EtcdConfig::new(Vec::<String>::new())).contains("no endpoint"));
    let bad = err(EtcdConfig::new(["ftp://127.0.0.1:2379"]));
    assert!(
        bad.contains("ftp://127.0.0.1:2379") && bad.contains("http or https"),
        "{bad}"
    );
    let bad = err(EtcdConfig::new(["http://127.0.0.1:2379/v3"]));
    assert!(bad.contains("path"), "{bad}");
    let mut config = EtcdConfig::new(["127.0.0.1:2379"]);
    config.user = Some("root".into());
    assert!(err(config).contains("password"));
    let mut config = EtcdConfig::new(["https://127.0.0.1:2379"]);
    config.ca_file = Some("/nonexistent/ca.crt".into());
    let bad = err(config);
    assert!(
        bad.contains("/nonexistent/ca.crt") && bad.contains("CA file"),
        "{bad}"
    );
    let mut config = EtcdConfig::new(["https://127.0.0.1:2379"]);
    config.cert_file = Some("/etc/hostname".into());
    assert!(err(config).contains("needs its key"));

    let ok = EtcdClient::new(EtcdConfig::new(["127.0.0.1:2379/", " https://[::1]:2379 "])).unwrap();
    assert_eq!(
        ok.endpoints(),
        ["http://127.0.0.1:2379", "https://[::1]:2379"]
    );
}

#[test]
fn unreachable_endpoints_fail_by_the_deadline_and_writes_are_known_unsent() {
    let _serial = serial();
    // Ports just released: nothing listens there.
    let ports: Vec<u16> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
        .collect();
    let endpoints: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let c = client(endpoints.clone());
    for write in [false, true] {
        let start = Instant::now();
        let result = if write {
            c.txn(&create("/k", 0), after(500)).map(|_| ())
        } else {
            c.range(&RangeRequest::key("/k"), after(500)).map(|_| ())
        };
        let took = start.elapsed();
        let Err(e @ EtcdError::Unreachable { failures }) = &result else {
            panic!("{result:?}");
        };
        assert!(e.not_applied());
        assert_eq!(failures.len(), 2);
        for endpoint in &endpoints {
            assert!(e.to_string().contains(endpoint.as_str()), "{e}");
        }
        assert!(e.to_string().contains("refused"), "{e}");
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_millis(900),
            "{took:?}"
        );
    }
}
