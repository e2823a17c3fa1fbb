//! Every rule of the lock table, without a socket or a clock.

use super::*;

fn t0() -> Instant {
    Instant::now()
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// A request from connection `conn`; the handle is the connection number.
fn req(conn: u64) -> Claim<u64> {
    Claim {
        conn: ConnId(conn),
        client_id: None,
        peer: None,
        max: 1,
        wait: None,
        ttl: None,
        shared: false,
        handle: conn,
    }
}

/// `Table::leave`, with where the connection stood as a [`State`] (the tests of durations look
/// at [`Left`] themselves).
fn leave(t: &mut Table<u64>, name: &str, conn: ConnId, now: Instant) -> (State, Vec<Event<u64>>) {
    let (left, events) = t.leave(name, conn, now);
    (left.state(), events)
}

trait With {
    fn shared(self) -> Self;
    fn wait(self, s: f64) -> Self;
    fn max(self, k: u32) -> Self;
    fn ttl(self, s: f64) -> Self;
}

impl With for Claim<u64> {
    fn shared(mut self) -> Self {
        self.shared = true;
        self
    }
    fn wait(mut self, s: f64) -> Self {
        self.wait = Some(secs(s));
        self
    }
    fn max(mut self, k: u32) -> Self {
        self.max = k;
        self
    }
    fn ttl(mut self, s: f64) -> Self {
        self.ttl = Some(secs(s));
        self
    }
}

fn granted_conns(events: &[Event<u64>]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Granted { conn, .. } => Some(conn.0),
            _ => None,
        })
        .collect()
}

fn is_granted(d: Decision) -> bool {
    matches!(d, Decision::Granted { .. })
}

#[test]
fn try_lock_is_first_come_first_served() {
    let now = t0();
    let mut t = Table::new(1);
    assert!(is_granted(t.lock("a", req(1), now)));
    assert_eq!(t.lock("a", req(2), now), Decision::NotGranted);
    assert!(is_granted(t.lock("b", req(3), now)));
    assert_eq!(t.state("a", ConnId(1)), State::Holding);
    assert_eq!(t.state("a", ConnId(2)), State::Absent);
    let (was, events) = leave(&mut t, "a", ConnId(1), now);
    assert_eq!(was, State::Holding);
    assert!(events.is_empty());
    assert!(is_granted(t.lock("a", req(2), now)));
    assert_eq!(t.held(), 2);
    let c = t.counters();
    assert_eq!((c.acquired, c.not_acquired, c.released), (3, 1, 1));
}

#[test]
fn leave_by_a_stranger_or_twice_changes_nothing() {
    let now = t0();
    let mut t = Table::new(1);
    t.lock("a", req(1), now);
    assert_eq!(leave(&mut t, "a", ConnId(2), now), (State::Absent, vec![]));
    assert_eq!(leave(&mut t, "b", ConnId(1), now), (State::Absent, vec![]));
    assert_eq!(leave(&mut t, "a", ConnId(1), now).0, State::Holding);
    t.lock("a", req(3), now);
    // Connection 1 says goodbye again (release, then the socket closed): 3 keeps the lock.
    assert_eq!(leave(&mut t, "a", ConnId(1), now), (State::Absent, vec![]));
    assert_eq!(t.state("a", ConnId(3)), State::Holding);
}

#[test]
fn waiters_are_granted_in_fifo_order() {
    let now = t0();
    let mut t = Table::new(1);
    t.lock("a", req(1), now);
    for c in 2..=5 {
        assert_eq!(t.lock("a", req(c).wait(10.0), now), Decision::Queued);
    }
    assert_eq!(t.waiting(), 4);
    for (holder, next) in [(1, 2), (2, 3), (3, 4), (4, 5)] {
        let (_, events) = leave(&mut t, "a", ConnId(holder), now);
        assert_eq!(granted_conns(&events), [next]);
        assert_eq!(t.state("a", ConnId(next)), State::Holding);
    }
    assert_eq!(t.waiting(), 0);
    assert_eq!(t.counters().granted_after_wait, 4);
    leave(&mut t, "a", ConnId(5), now);
    assert_eq!(t.names(), 0, "an empty name leaves no entry behind");
}

#[test]
fn nobody_barges_past_the_queue() {
    let now = t0();
    let mut t = Table::new(1);
    t.lock("a", req(1), now);
    t.lock("a", req(2).wait(10.0), now);
    // A try-lock and a later waiter both stay behind 2.
    assert_eq!(t.lock("a", req(3), now), Decision::NotGranted);
    assert_eq!(t.lock("a", req(4).wait(10.0), now), Decision::Queued);
    let (_, events) = leave(&mut t, "a", ConnId(1), now);
    assert_eq!(granted_conns(&events), [2]);
}

#[test]
fn a_waiter_can_leave_at_every_point_of_its_life() {
    let now = t0();
    let mut t = Table::new(1);
    t.lock("a", req(1), now);
    for c in 2..=4 {
        t.lock("a", req(c).wait(10.0), now);
    }
    // From the middle of the queue: the others keep their order.
    assert_eq!(leave(&mut t, "a", ConnId(3), now), (State::Waiting, vec![]));
    assert_eq!(t.state("a", ConnId(3)), State::Absent);
    // From the front.
    assert_eq!(leave(&mut t, "a", ConnId(2), now), (State::Waiting, vec![]));
    // Granted, then gone: the next one moves up.
    let (_, events) = leave(&mut t, "a", ConnId(1), now);
    assert_eq!(granted_conns(&events), [4]);
    t.lock("a", req(5).wait(10.0), now);
    let (was, events) = leave(&mut t, "a", ConnId(4), now);
    assert_eq!(was, State::Holding);
    assert_eq!(granted_conns(&events), [5]);
    assert_eq!(t.waiting(), 0);
}

#[test]
fn a_wait_runs_out_and_is_never_granted_afterwards() {
    let now = t0();
    let mut t = Table::new(1);
    t.lock("a", req(1), now);
    t.lock("a", req(2).wait(1.5), now);
    t.lock("a", req(3).wait(5.0), now);
    assert_eq!(t.next_deadline(), Some(now + secs(1.5)));
    assert!(t.tick(now + secs(1.4)).is_empty());
    let events = t.tick(now + secs(1.5));
    assert_eq!(
        events,
        vec![Event::TimedOut {
            conn: ConnId(2),
            handle: 2
        }]
    );
    assert_eq!(t.state("a", ConnId(2)), State::Absent);
    assert_eq!(t.next_deadline(), Some(now + secs(5.0)));
    // The lock frees: 3 gets it, 2 is out of the picture.
    let (_, events) = leave(&mut t, "a", ConnId(1), now + secs(2.0));
    assert_eq!(granted_conns(&events), [3]);
    assert_eq!(
        leave(&mut t, "a", ConnId(2), now + secs(2.0)),
        (State::Absent, vec![])
    );
    let c = t.counters();
    assert_eq!((c.wait_timeouts, c.not_acquired), (1, 1));
    // A granted waiter's wait deadline no longer applies.
    assert_eq!(t.next_deadline(), None);
    assert!(t.tick(now + secs(60.0)).is_empty());
    assert_eq!(t.state("a", ConnId(3)), State::Holding);
}

#[test]
fn a_release_after_the_deadline_but_before_the_timer_does_not_grant() {
    let now = t0();
    let mut t = Table::new(1);
    t.lock("a", req(1), now);
    t.lock("a", req(2).wait(1.0), now);
    t.lock("a", req(3).wait(9.0), now);
    let (_, events) = leave(&mut t, "a", ConnId(1), now + secs(1.0));
    assert_eq!(
        events,
        vec![
            Event::TimedOut {
                conn: ConnId(2),
                handle: 2
            },
            Event::Granted {
                conn: ConnId(3),
                token: 2,
                waited: secs(1.0),
                handle: 3
            }
        ]
    );
    assert!(t.tick(now + secs(1.0)).is_empty());
}

#[test]
fn zero_wait_is_a_try_lock() {
    let now = t0();
    let mut t = Table::new(1);
    t.lock("a", req(1), now);
    assert_eq!(t.lock("a", req(2).wait(0.0), now), Decision::NotGranted);
    assert_eq!(t.waiting(), 0);
}

#[test]
fn semaphore_admits_k_holders() {
    let now = t0();
    let mut t = Table::new(1);
    for c in 1..=3 {
        assert!(is_granted(t.lock("s", req(c).max(3), now)), "{c}");
    }
    assert_eq!(t.lock("s", req(4).max(3), now), Decision::NotGranted);
    assert_eq!(t.lock("s", req(5).max(3).wait(5.0), now), Decision::Queued);
    assert_eq!(t.lock("s", req(6).max(3).wait(5.0), now), Decision::Queued);
    assert_eq!(t.holders(), 3);
    assert_eq!(t.held(), 1);
    let (_, events) = leave(&mut t, "s", ConnId(2), now);
    assert_eq!(granted_conns(&events), [5]);
    let (_, events) = leave(&mut t, "s", ConnId(5), now);
    assert_eq!(granted_conns(&events), [6]);
    let snap = t.snapshot(now);
    assert_eq!(snap.len(), 1);
    assert_eq!(
        (snap[0].max, snap[0].holders.len(), snap[0].waiters.len()),
        (3, 3, 0)
    );
}

#[test]
fn max_must_agree_and_a_mismatch_disturbs_nobody() {
    let now = t0();
    let mut t = Table::new(1);
    t.lock("s", req(1).max(2), now);
    t.lock("s", req(2).max(2), now);
    t.lock("s", req(3).max(2).wait(5.0), now);
    // Plain lock (max 1) on a semaphore, and a different K, waiting or not.
    assert_eq!(t.lock("s", req(4), now), Decision::MaxMismatch { max: 2 });
    assert_eq!(
        t.lock("s", req(5).max(3).wait(5.0), now),
        Decision::MaxMismatch { max: 2 }
    );
    assert_eq!(t.holders(), 2);
    assert_eq!(t.waiting(), 1);
    assert_eq!(t.state("s", ConnId(5)), State::Absent);
    assert_eq!(t.counters().max_mismatches, 2);
    // Waiters alone also fix K.
    let (_, events) = leave(&mut t, "s", ConnId(1), now);
    assert_eq!(granted_conns(&events), [3]);
    // Once nobody holds or waits, the name starts over with any K.
    for c in [2, 3] {
        leave(&mut t, "s", ConnId(c), now);
    }
    assert!(is_granted(t.lock("s", req(6), now)));
    assert_eq!(
        t.lock("s", req(7).max(5), now),
        Decision::MaxMismatch { max: 1 }
    );
}

#[test]
fn tokens_grow_across_names_and_waits() {
    let now = t0();
    let mut t = Table::new(1_000);
    let mut last = 0;
    let mut check = |token: u64| {
        assert!(token > last, "{token} after {last}");
        last = token;
    };
    for (i, name) in ["a", "b", "a", "c"].into_iter().enumerate() {
        match t.lock(name, req(i as u64 + 1).wait(9.0), now) {
            Decision::Granted { token } => check(token),
            Decision::Queued => {}
            d => panic!("{d:?}"),
        }
    }
    let (_, events) = leave(&mut t, "a", ConnId(1), now);
    match &events[..] {
        [Event::Granted { token, .. }] => check(*token),
        e => panic!("{e:?}"),
    }
    let Decision::Granted { token } = t.lock("d", req(9), now) else {
        panic!("d is free");
    };
    assert_eq!(token, 1_004);
}

#[test]
fn a_lease_expires_without_activity_and_is_renewed_by_it() {
    let now = t0();
    let mut t = Table::new(1);
    assert!(is_granted(t.lock("l", req(1).ttl(2.0), now)));
    t.lock("l", req(2).wait(60.0), now);
    assert_eq!(t.next_deadline(), Some(now + secs(2.0)));
    // Activity at 1.5 s moves the expiry to 3.5 s.
    assert_eq!(t.activity("l", ConnId(1), now + secs(1.5)), State::Holding);
    assert!(t.tick(now + secs(3.4)).is_empty());
    let events = t.tick(now + secs(3.5));
    assert_eq!(
        events,
        vec![
            Event::Expired {
                conn: ConnId(1),
                held: secs(3.5),
                handle: 1
            },
            Event::Granted {
                conn: ConnId(2),
                token: 2,
                waited: secs(3.5),
                handle: 2
            }
        ]
    );
    assert_eq!(t.counters().expired, 1);
    assert_eq!(t.activity("l", ConnId(1), now + secs(3.6)), State::Absent);
    assert_eq!(
        leave(&mut t, "l", ConnId(1), now + secs(3.6)),
        (State::Absent, vec![])
    );
    // Activity from a waiter or a holder without ttl sets no deadline.
    assert_eq!(t.activity("l", ConnId(2), now + secs(4.0)), State::Holding);
    assert_eq!(t.next_deadline(), None);
}

#[test]
fn a_waiters_lease_starts_when_it_is_granted() {
    let now = t0();
    let mut t = Table::new(1);
    t.lock("l", req(1), now);
    t.lock("l", req(2).wait(30.0).ttl(5.0), now);
    let (_, events) = leave(&mut t, "l", ConnId(1), now + secs(10.0));
    assert_eq!(granted_conns(&events), [2]);
    assert_eq!(t.next_deadline(), Some(now + secs(15.0)));
    assert!(t.tick(now + secs(14.9)).is_empty());
    assert_eq!(t.tick(now + secs(15.0)).len(), 1);
}

#[test]
fn wait_fencing_max_and_ttl_together() {
    let now = t0();
    let mut t = Table::new(100);
    let r = |c| req(c).max(2).wait(10.0).ttl(3.0);
    assert_eq!(t.lock("x", r(1), now), Decision::Granted { token: 100 });
    assert_eq!(t.lock("x", r(2), now), Decision::Granted { token: 101 });
    assert_eq!(t.lock("x", r(3), now), Decision::Queued);
    assert_eq!(t.lock("x", r(4), now), Decision::Queued);
    // 1 keeps its lease alive, 2 goes silent and expires: 3 takes its place.
    t.activity("x", ConnId(1), now + secs(2.0));
    let events = t.tick(now + secs(3.0));
    assert_eq!(
        events,
        vec![
            Event::Expired {
                conn: ConnId(2),
                held: secs(3.0),
                handle: 2
            },
            Event::Granted {
                conn: ConnId(3),
                token: 102,
                waited: secs(3.0),
                handle: 3
            }
        ]
    );
    // 4's wait runs out at 10 s before anyone frees a place.
    t.activity("x", ConnId(1), now + secs(4.0));
    t.activity("x", ConnId(3), now + secs(5.0));
    t.activity("x", ConnId(1), now + secs(6.0));
    t.activity("x", ConnId(3), now + secs(7.0));
    t.activity("x", ConnId(1), now + secs(8.0));
    t.activity("x", ConnId(3), now + secs(9.0));
    let events = t.tick(now + secs(10.0));
    assert_eq!(
        events,
        vec![Event::TimedOut {
            conn: ConnId(4),
            handle: 4
        }]
    );
    let snap = t.snapshot(now + secs(10.0));
    let tokens: Vec<u64> = snap[0].holders.iter().map(|h| h.token).collect();
    assert_eq!(tokens, [100, 102]);
    assert_eq!(snap[0].holders[0].held_for, secs(10.0));
}

#[test]
fn snapshot_reports_holders_and_queues() {
    let now = t0();
    let mut t = Table::new(7);
    let mut r = req(1);
    r.client_id = Some("pod-1".into());
    r.peer = Some("10.0.0.1:5000".parse().unwrap());
    t.lock("b", r, now);
    t.lock("b", req(2).wait(5.0), now);
    t.lock("a", req(3).ttl(9.0), now + secs(1.0));
    let snap = t.snapshot(now + secs(4.0));
    assert_eq!(snap.len(), 2);
    assert_eq!(&*snap[0].name, "a");
    assert_eq!(snap[0].holders[0].ttl, Some(secs(9.0)));
    assert_eq!(&*snap[1].name, "b");
    let h = &snap[1].holders[0];
    assert_eq!(h.client_id.as_deref(), Some("pod-1"));
    assert_eq!(h.peer.unwrap().to_string(), "10.0.0.1:5000");
    assert_eq!((h.token, h.held_for), (7, secs(4.0)));
    assert_eq!(snap[1].waiters.len(), 1);
    let w = &snap[1].waiters[0];
    assert_eq!((w.waited, w.left, w.shared), (secs(4.0), secs(1.0), false));
}

#[test]
fn shared_holders_share_and_exclude_an_exclusive_one() {
    let now = t0();
    let mut t = Table::new(1);
    for c in 1..=3 {
        assert!(is_granted(t.lock("r", req(c).shared(), now)), "reader {c}");
    }
    assert_eq!(t.holders(), 3);
    assert_eq!(t.held(), 1);
    assert_eq!(t.counters().shared_acquired, 3);
    // A writer cannot join them, and a try-lock of either mode is refused once it waits.
    assert_eq!(t.lock("r", req(4), now), Decision::NotGranted);
    assert_eq!(t.lock("r", req(5).wait(9.0), now), Decision::Queued);
    assert_eq!(t.lock("r", req(6).shared(), now), Decision::NotGranted);
    // A reader that comes after the waiting writer queues behind it: no barging.
    assert_eq!(
        t.lock("r", req(7).shared().wait(9.0), now),
        Decision::Queued
    );
    assert_eq!(
        t.lock("r", req(8).shared().wait(9.0), now),
        Decision::Queued
    );
    assert_eq!(t.lock("r", req(9).wait(9.0), now), Decision::Queued);
    assert_eq!(
        t.lock("r", req(10).shared().wait(9.0), now),
        Decision::Queued
    );
    // The writer is granted once the last reader goes, and nobody else.
    assert!(leave(&mut t, "r", ConnId(1), now).1.is_empty());
    assert!(leave(&mut t, "r", ConnId(2), now).1.is_empty());
    let (_, events) = leave(&mut t, "r", ConnId(3), now + secs(1.0));
    assert_eq!(granted_conns(&events), [5]);
    // When it goes, the readers at the head of the line are granted together, up to the next
    // writer; the reader behind that writer waits.
    let (_, events) = leave(&mut t, "r", ConnId(5), now + secs(2.0));
    assert_eq!(granted_conns(&events), [7, 8]);
    assert_eq!(t.state("r", ConnId(10)), State::Waiting);
    let snap = t.snapshot(now + secs(2.0));
    let modes: Vec<bool> = snap[0].waiters.iter().map(|w| w.shared).collect();
    assert_eq!(modes, [false, true], "writer 9, then reader 10");
    assert!(snap[0].holders.iter().all(|h| h.shared));
    // Each grant has its own token; every shared grant is counted.
    let (_, events) = leave(&mut t, "r", ConnId(7), now + secs(3.0));
    assert!(events.is_empty());
    let (_, events) = leave(&mut t, "r", ConnId(8), now + secs(3.0));
    assert_eq!(granted_conns(&events), [9]);
    let (_, events) = leave(&mut t, "r", ConnId(9), now + secs(4.0));
    assert_eq!(granted_conns(&events), [10]);
    assert_eq!(t.counters().shared_acquired, 6);
    assert_eq!(t.counters().acquired, 8);
}

#[test]
fn readers_wait_for_a_writer_and_are_granted_together() {
    let now = t0();
    let mut t = Table::new(1);
    assert!(is_granted(t.lock("w", req(1), now)));
    for c in 2..=4 {
        assert_eq!(
            t.lock("w", req(c).shared().wait(5.0).ttl(1.0), now),
            Decision::Queued
        );
    }
    let (left, events) = t.leave("w", ConnId(1), now + secs(2.0));
    assert_eq!(left, Left::Held(secs(2.0)));
    let tokens: Vec<u64> = events
        .iter()
        .map(|e| match e {
            Event::Granted { token, waited, .. } => {
                assert_eq!(*waited, secs(2.0));
                *token
            }
            e => panic!("{e:?}"),
        })
        .collect();
    assert_eq!(tokens, [2, 3, 4]);
    // Their leases start at the grant.
    assert_eq!(t.next_deadline(), Some(now + secs(3.0)));
    assert_eq!(t.tick(now + secs(3.0)).len(), 3);
    assert_eq!(t.holders(), 0);
}

/// Random operations on a few names, checked against the plain model in `model.rs` (the fuzz
/// target `table` drives the same harness with fuzzer-chosen operations). Every decision and
/// every event must match the model's, and the invariants (never more than K holders, each
/// connection in one place, FIFO grants) hold after each step.
#[test]
fn random_operations_match_the_model() {
    use super::model::{Check, Op};
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    for _round in 0..300 {
        let mut check = Check::new(&["p", "q"], 1);
        for _step in 0..60 {
            match next(4) {
                0 | 1 => check.apply(&Op::Lock {
                    name: next(2) as usize,
                    max: 1 + next(2) as u32,
                    wait: [None, Some(0.0), Some(1.0), Some(3.0)][next(4) as usize].map(secs),
                    ttl: [None, None, Some(1.0), Some(2.5)][next(4) as usize].map(secs),
                    shared: next(3) == 0,
                }),
                2 => {
                    // A connection leaves (release, close, reset, dead half-close); now and then
                    // one that already left, or a stray call for another name.
                    let present = check.present();
                    let conn = match next(8) {
                        0 => next(64) as usize,
                        _ if present.is_empty() => continue,
                        _ => present[next(present.len() as u64) as usize],
                    };
                    let name = (next(8) == 0).then(|| next(2) as usize);
                    check.apply(&Op::Leave { conn, name });
                }
                _ => {
                    // Some connections send a request (renewing a lease), then time passes.
                    for conn in check.present() {
                        if next(2) == 0 {
                            check.apply(&Op::Activity { conn, name: None });
                        }
                    }
                    let advance = [0.0, 0.25, 0.5, 1.0][next(4) as usize];
                    check.apply(&Op::Advance {
                        advance: secs(advance),
                    });
                    // Now and then the timer is late: requests come in past a deadline first.
                    if next(4) != 0 {
                        check.apply(&Op::Tick);
                    }
                    // Now and then the table goes to a new process (before or after the timer
                    // caught up): everything after must go on as if nothing happened.
                    if next(6) == 0 {
                        check.apply(&Op::HandOver {
                            ahead: next(2) == 0,
                        });
                    }
                }
            }
        }
    }
}

/// The cluster's rule (one list per name in arrival order, `queue::holders` decides) grants,
/// queues and refuses exactly as the table's model does, on the same random histories.
#[test]
fn queue_rule_matches_the_model() {
    use super::model::{CheckQueue, Op};
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    for _round in 0..400 {
        let mut check = CheckQueue::new(&["p", "q"]);
        for _step in 0..80 {
            match next(4) {
                0 | 1 => check.apply(&Op::Lock {
                    name: next(2) as usize,
                    max: [1, 1, 2, 3][next(4) as usize],
                    wait: [None, Some(0.0), Some(1.0), Some(3.0)][next(4) as usize].map(secs),
                    ttl: [None, None, Some(1.0), Some(2.5)][next(4) as usize].map(secs),
                    shared: next(3) == 0,
                }),
                2 => {
                    let present = check.present();
                    let conn = match next(8) {
                        0 => next(64) as usize,
                        _ if present.is_empty() => continue,
                        _ => present[next(present.len() as u64) as usize],
                    };
                    let name = (next(8) == 0).then(|| next(2) as usize);
                    check.apply(&Op::Leave { conn, name });
                }
                _ => {
                    for conn in check.present() {
                        if next(2) == 0 {
                            check.apply(&Op::Activity { conn, name: None });
                        }
                    }
                    let advance = [0.0, 0.25, 0.5, 1.0][next(4) as usize];
                    check.apply(&Op::Advance {
                        advance: secs(advance),
                    });
                    if next(4) != 0 {
                        check.apply(&Op::Tick);
                    }
                }
            }
        }
    }
}

/// A table handed over keeps everything a client can observe: holders with their tokens and
/// leases, waiters in order with their deadlines, the totals; the durations count from the
/// moment of the hand-over on the new process's clock, so time that passed in between counts.
#[test]
fn a_restored_table_keeps_holders_waiters_and_their_time() {
    let now = t0();
    let mut t = Table::new(100);
    assert!(is_granted(t.lock("a", req(1).ttl(10.0), now)));
    assert!(is_granted(t.lock("s", req(2).shared().ttl(5.0), now)));
    assert!(is_granted(t.lock("s", req(3).shared(), now)));
    assert_eq!(
        t.lock("a", req(4).wait(20.0), now + secs(1.0)),
        Decision::Queued
    );
    assert_eq!(
        t.lock("a", req(5).wait(2.0).ttl(1.0), now + secs(2.0)),
        Decision::Queued
    );
    assert!(is_granted(t.lock("k", req(6).max(2), now)));
    let export = t.export(now + secs(3.0));
    assert_eq!(export.next_token, 104);
    let names: Vec<&str> = export.names.iter().map(|n| &*n.name).collect();
    assert_eq!(names, ["a", "k", "s"]);
    assert_eq!(export.names[0].holders[0].lease_due_ns, Some(7_000_000_000));
    assert_eq!(export.names[0].holders[0].held_for, secs(3.0));
    let waiters: Vec<(u64, i64)> = export.names[0]
        .waiters
        .iter()
        .map(|w| (w.conn.0, w.wait_due_ns))
        .collect();
    assert_eq!(waiters, [(4, 18_000_000_000), (5, 1_000_000_000)]);

    // The new process's clock says `later` at the moment the old one exported.
    let later = now + secs(1000.0);
    let mut r = Table::restore(&export, later, 0, |c| Some(c.0)).unwrap();
    assert_eq!(r.export(later), export);
    assert_eq!((r.holders(), r.held(), r.waiting()), (4, 3, 2));
    assert_eq!(r.counters(), t.counters());
    // Conn 5's wait runs out 1 s after the hand-over, conn 2's lease at 2 s, conn 1's at 7 s.
    assert_eq!(r.next_deadline(), Some(later + secs(1.0)));
    let events = r.tick(later + secs(1.0));
    assert!(matches!(
        events[..],
        [Event::TimedOut {
            conn: ConnId(5),
            ..
        }]
    ));
    let events = r.tick(later + secs(2.0));
    assert!(matches!(
        events[..],
        [Event::Expired {
            conn: ConnId(2),
            ..
        }]
    ));
    assert_eq!(r.next_deadline(), Some(later + secs(7.0)));
    let events = r.tick(later + secs(7.0));
    assert!(matches!(
        events[0],
        Event::Expired {
            conn: ConnId(1),
            ..
        }
    ));
    // The waiter is granted with the next token, its lease from now.
    assert!(matches!(
        events[1],
        Event::Granted {
            conn: ConnId(4),
            token: 104,
            ..
        }
    ));
    // A new process whose own first token is higher continues from there.
    let r = Table::restore(&export, later, 5_000, |c| Some(c.0)).unwrap();
    assert_eq!(r.export(later).next_token, 5_000);
}

#[test]
fn a_state_that_breaks_a_rule_is_refused() {
    let now = t0();
    let mut t = Table::new(1);
    assert!(is_granted(t.lock("a", req(1), now)));
    assert_eq!(t.lock("a", req(2).wait(5.0), now), Decision::Queued);
    let good = t.export(now);
    let refused = |e: &export::Export| Table::restore(e, now, 0, |c| Some(c.0)).unwrap_err();

    let err = Table::restore(&good, now, 0, |c| (c.0 != 2).then_some(c.0)).unwrap_err();
    assert!(
        err.contains("connection 2") && err.contains("did not come"),
        "{err}"
    );
    let mut two_holders = good.clone();
    let mut second = two_holders.names[0].holders[0].clone();
    second.conn = ConnId(9);
    second.token = 0;
    two_holders.names[0].holders.push(second);
    assert!(refused(&two_holders).contains("2 exclusive holders, max 1"));
    let mut twice = good.clone();
    twice.names[0].waiters[0].conn = ConnId(1);
    assert!(refused(&twice).contains("appears twice"));
    let mut waits_for_nothing = good.clone();
    waits_for_nothing.names[0].holders.clear();
    assert!(refused(&waits_for_nothing).contains("the first waiter could hold"));
    let mut token_ahead = good.clone();
    token_ahead.names[0].holders[0].token = good.next_token;
    assert!(refused(&token_ahead).contains("token"));
    let mut zero = good;
    zero.names[0].max = 0;
    assert!(refused(&zero).contains("max 0"));
}
