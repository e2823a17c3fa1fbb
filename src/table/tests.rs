//! Every rule of the lock table, without a socket or a clock.

use super::*;

fn t0() -> Instant {
    Instant::now()
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// A request from connection `conn`; the handle is the connection number.
fn req(conn: u64) -> LockRequest<u64> {
    LockRequest {
        conn: ConnId(conn),
        client_id: None,
        peer: None,
        max: 1,
        wait: None,
        ttl: None,
        handle: conn,
    }
}

trait With {
    fn wait(self, s: f64) -> Self;
    fn max(self, k: u32) -> Self;
    fn ttl(self, s: f64) -> Self;
}

impl With for LockRequest<u64> {
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
    let (was, events) = t.leave("a", ConnId(1), now);
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
    assert_eq!(t.leave("a", ConnId(2), now), (State::Absent, vec![]));
    assert_eq!(t.leave("b", ConnId(1), now), (State::Absent, vec![]));
    assert_eq!(t.leave("a", ConnId(1), now).0, State::Holding);
    t.lock("a", req(3), now);
    // Connection 1 says goodbye again (release, then the socket closed): 3 keeps the lock.
    assert_eq!(t.leave("a", ConnId(1), now), (State::Absent, vec![]));
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
        let (_, events) = t.leave("a", ConnId(holder), now);
        assert_eq!(granted_conns(&events), [next]);
        assert_eq!(t.state("a", ConnId(next)), State::Holding);
    }
    assert_eq!(t.waiting(), 0);
    assert_eq!(t.counters().granted_after_wait, 4);
    t.leave("a", ConnId(5), now);
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
    let (_, events) = t.leave("a", ConnId(1), now);
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
    assert_eq!(t.leave("a", ConnId(3), now), (State::Waiting, vec![]));
    assert_eq!(t.state("a", ConnId(3)), State::Absent);
    // From the front.
    assert_eq!(t.leave("a", ConnId(2), now), (State::Waiting, vec![]));
    // Granted, then gone: the next one moves up.
    let (_, events) = t.leave("a", ConnId(1), now);
    assert_eq!(granted_conns(&events), [4]);
    t.lock("a", req(5).wait(10.0), now);
    let (was, events) = t.leave("a", ConnId(4), now);
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
    let (_, events) = t.leave("a", ConnId(1), now + secs(2.0));
    assert_eq!(granted_conns(&events), [3]);
    assert_eq!(
        t.leave("a", ConnId(2), now + secs(2.0)),
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
    let (_, events) = t.leave("a", ConnId(1), now + secs(1.0));
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
    let (_, events) = t.leave("s", ConnId(2), now);
    assert_eq!(granted_conns(&events), [5]);
    let (_, events) = t.leave("s", ConnId(5), now);
    assert_eq!(granted_conns(&events), [6]);
    let snap = t.snapshot(now);
    assert_eq!(snap.len(), 1);
    assert_eq!(
        (snap[0].max, snap[0].holders.len(), snap[0].waiting),
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
    let (_, events) = t.leave("s", ConnId(1), now);
    assert_eq!(granted_conns(&events), [3]);
    // Once nobody holds or waits, the name starts over with any K.
    for c in [2, 3] {
        t.leave("s", ConnId(c), now);
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
    let (_, events) = t.leave("a", ConnId(1), now);
    match &events[..] {
        [Event::Granted { token, .. }] => check(*token),
        e => panic!("{e:?}"),
    }
    assert_eq!(t.next_token(), 1_004);
}

#[test]
fn tokens_grow_across_restarts() {
    // First run: the clock read 5_000_000 µs at start; it stored a reservation.
    let first = first_token(5_000_000, None);
    let mut run1 = Table::<u64>::new(first);
    let now = t0();
    let mut last = 0;
    for c in 0..100 {
        let name = format!("n{c}");
        if let Decision::Granted { token } = run1.lock(&name, req(c), now) {
            last = token;
        }
    }
    let stored = first + TOKEN_RESERVATION;
    assert!(run1.next_token() <= stored);

    // Restart with the clock stepped back: the reservation keeps tokens growing.
    let mut run2 = Table::<u64>::new(first_token(4_000_000, Some(stored)));
    match run2.lock("n0", req(1), now) {
        Decision::Granted { token } => assert!(token > last, "{token} <= {last}"),
        d => panic!("{d:?}"),
    }
    // Restart with the clock ahead of the reservation: the clock wins.
    assert_eq!(first_token(stored + 10, Some(stored)), stored + 11);
    // No stored reservation: only the clock (the documented assumption).
    assert_eq!(first_token(4_000_000, None), 4_000_001);
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
                handle: 1
            },
            Event::Granted {
                conn: ConnId(2),
                token: 2,
                handle: 2
            }
        ]
    );
    assert_eq!(t.counters().expired, 1);
    assert_eq!(t.activity("l", ConnId(1), now + secs(3.6)), State::Absent);
    assert_eq!(
        t.leave("l", ConnId(1), now + secs(3.6)),
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
    let (_, events) = t.leave("l", ConnId(1), now + secs(10.0));
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
                handle: 2
            },
            Event::Granted {
                conn: ConnId(3),
                token: 102,
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
    assert_eq!(snap[1].waiting, 1);
}

/// Random operations on a few names, checked against a model written as plainly as possible:
/// per name, K, the holders and the queue with deadlines. Every decision and every event must
/// match the model's, and the invariants (never more than K holders, FIFO grants) hold after
/// each step.
#[test]
fn random_operations_match_the_model() {
    #[derive(Default, Clone)]
    struct Name {
        max: u32,
        holders: Vec<(u64, Option<f64>, Option<f64>)>, // conn, lease expiry, ttl
        queue: Vec<(u64, f64, Option<f64>)>,           // conn, deadline, ttl
    }
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let base = t0();
    for _round in 0..300 {
        let mut t = Table::new(1);
        let mut model: HashMap<&str, Name> = HashMap::new();
        let mut where_: HashMap<u64, &str> = HashMap::new();
        let mut clock = 0.0_f64;
        let mut next_conn = 1;
        let names = ["p", "q"];
        for _step in 0..60 {
            let at = base + secs(clock);
            let mut expected: Vec<Event<u64>> = Vec::new();
            // Model of promotion, shared by every operation.
            let promote = |m: &mut Name, clock: f64, expected: &mut Vec<Event<u64>>| {
                while m.holders.len() < m.max as usize && !m.queue.is_empty() {
                    let (c, deadline, ttl) = m.queue.remove(0);
                    if deadline <= clock {
                        expected.push(Event::TimedOut {
                            conn: ConnId(c),
                            handle: c,
                        });
                    } else {
                        expected.push(Event::Granted {
                            conn: ConnId(c),
                            token: 0,
                            handle: c,
                        });
                        m.holders.push((c, ttl.map(|l| clock + l), ttl));
                    }
                }
            };
            let strip = |events: Vec<Event<u64>>| -> Vec<Event<u64>> {
                events
                    .into_iter()
                    .map(|e| match e {
                        Event::Granted { conn, handle, .. } => Event::Granted {
                            conn,
                            token: 0,
                            handle,
                        },
                        e => e,
                    })
                    .collect()
            };
            match next(4) {
                0 | 1 => {
                    // A new connection asks for a lock.
                    let c = next_conn;
                    next_conn += 1;
                    let name = names[next(2) as usize];
                    let max = 1 + next(2) as u32;
                    let wait = [None, Some(0.0), Some(1.0), Some(3.0)][next(4) as usize];
                    let ttl = [None, None, Some(1.0), Some(2.5)][next(4) as usize];
                    let mut r = req(c).max(max);
                    r.wait = wait.map(secs);
                    r.ttl = ttl.map(secs);
                    let got = t.lock(name, r, at);
                    let m = model.entry(name).or_insert_with(|| Name {
                        max,
                        ..Name::default()
                    });
                    let want = if m.max != max {
                        Decision::MaxMismatch { max: m.max }
                    } else if m.holders.len() < m.max as usize && m.queue.is_empty() {
                        m.holders.push((c, ttl.map(|l| clock + l), ttl));
                        where_.insert(c, name);
                        Decision::Granted { token: 0 }
                    } else if let Some(w) = wait.filter(|w| *w > 0.0) {
                        m.queue.push((c, clock + w, ttl));
                        where_.insert(c, name);
                        Decision::Queued
                    } else {
                        Decision::NotGranted
                    };
                    let got = match got {
                        Decision::Granted { .. } => Decision::Granted { token: 0 },
                        d => d,
                    };
                    assert_eq!(got, want);
                }
                2 => {
                    // A connection leaves (release, close, reset, dead half-close).
                    let known: Vec<u64> = where_.keys().copied().collect();
                    if known.is_empty() {
                        continue;
                    }
                    let c = known[next(known.len() as u64) as usize];
                    let name = where_.remove(&c).unwrap();
                    let (state, events) = t.leave(name, ConnId(c), at);
                    let m = model.get_mut(name).unwrap();
                    let want_state = if let Some(i) = m.holders.iter().position(|h| h.0 == c) {
                        m.holders.remove(i);
                        State::Holding
                    } else if let Some(i) = m.queue.iter().position(|w| w.0 == c) {
                        m.queue.remove(i);
                        State::Waiting
                    } else {
                        State::Absent
                    };
                    assert_eq!(state, want_state);
                    promote(m, clock, &mut expected);
                    assert_eq!(strip(events), expected);
                }
                _ => {
                    // Some connections send a request (renewing a lease), then time passes.
                    let mut conns: Vec<(u64, &str)> =
                        where_.iter().map(|(&c, &n)| (c, n)).collect();
                    conns.sort();
                    for (c, name) in conns {
                        if next(2) == 0 {
                            let m = model.get_mut(name).unwrap();
                            let want = match m.holders.iter_mut().find(|h| h.0 == c) {
                                Some(h) => {
                                    h.1 = h.2.map(|l| clock + l);
                                    State::Holding
                                }
                                None => State::Waiting,
                            };
                            assert_eq!(t.activity(name, ConnId(c), at), want);
                        }
                    }
                    clock += [0.25, 0.5, 1.0][next(3) as usize];
                    let at = base + secs(clock);
                    let events = t.tick(at);
                    // Model: everything due by now, soonest first, then promotion per name.
                    let mut due: Vec<(f64, u64, &str, bool)> = Vec::new();
                    for (&name, m) in &model {
                        for h in &m.holders {
                            if let Some(e) = h.1
                                && e <= clock
                            {
                                due.push((e, h.0, name, true));
                            }
                        }
                        for w in &m.queue {
                            if w.1 <= clock {
                                due.push((w.1, w.0, name, false));
                            }
                        }
                    }
                    due.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap().then(a.1.cmp(&b.1)));
                    let mut touched: Vec<&str> = Vec::new();
                    for (_, c, name, holder) in due {
                        let m = model.get_mut(name).unwrap();
                        if holder {
                            m.holders.retain(|h| h.0 != c);
                            expected.push(Event::Expired {
                                conn: ConnId(c),
                                handle: c,
                            });
                        } else {
                            m.queue.retain(|w| w.0 != c);
                            expected.push(Event::TimedOut {
                                conn: ConnId(c),
                                handle: c,
                            });
                        }
                        where_.remove(&c);
                        touched.push(name);
                    }
                    for name in touched {
                        promote(model.get_mut(name).unwrap(), clock, &mut expected);
                    }
                    assert_eq!(strip(events), expected);
                }
            }
            model.retain(|_, m| !m.holders.is_empty() || !m.queue.is_empty());
            for e in &expected {
                if let Event::TimedOut { conn, .. } | Event::Expired { conn, .. } = e {
                    where_.remove(&conn.0);
                }
            }
            // Invariants, and the table agrees with the model about everyone.
            for (&name, m) in &model {
                assert!(m.holders.len() <= m.max as usize);
                for h in &m.holders {
                    assert_eq!(t.state(name, ConnId(h.0)), State::Holding);
                }
                for w in &m.queue {
                    assert_eq!(t.state(name, ConnId(w.0)), State::Waiting);
                }
            }
            assert_eq!(t.names(), model.len());
            assert_eq!(
                t.waiting(),
                model.values().map(|m| m.queue.len()).sum::<usize>()
            );
        }
    }
}
