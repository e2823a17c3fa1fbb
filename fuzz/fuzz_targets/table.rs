//! Random operation sequences on the lock table, checked against the plain model in
//! src/table/model.rs (the same harness the unit test `random_operations_match_the_model` uses).
//!
//! Three names, connections that lock once each (exclusive or shared, with `max` 1 to 3 or 65535,
//! waits and ttls from a nanosecond to a week), leaves and requests from holders, waiters,
//! connections already gone
//! and stray calls for the wrong name, and a clock that only moves forward (by zero too), the
//! timer running at once or late (requests handled past a deadline first), and the table handed
//! to a new process (exported and restored: src/table/export.rs). After every step the
//! harness checks: decisions and events equal the model's (tokens by order), every token above
//! the one before, at most `max` holders per name, each connection in at most one place,
//! `waiting()` and the other counts, counters, the next deadline, the snapshot, and FIFO grants.
//! The same operations drive the cluster's queue rule (src/table/queue.rs) against the model.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use tcpnetlock::protocol::MAX_SECONDS;

// The table is the server program's, not the library's: mounted here as the program mounts it.
#[path = "../../src/table/mod.rs"]
#[allow(dead_code)]
mod table;

use table::model::{Check, CheckQueue, Op};

const NAMES: [&str; 3] = ["a", "b", "c"];
const MAX_OPS: usize = 400;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    // 0 is made 1 by the table; the others as the server picks them (the wall clock in µs).
    let first_token = *u.choose(&[0, 1, 1_764_154_800_123_457])?;
    let mut check = Check::new(&NAMES, first_token);
    // The cluster's queue rule (table::queue) must decide as the model does, on the same ops.
    let mut queue = CheckQueue::new(&NAMES);
    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        let op = match u.int_in_range(0..=8u8)? {
            0..=2 => Op::Lock {
                name: u.int_in_range(0..=NAMES.len() - 1)?,
                max: *u.choose(&[1, 1, 2, 3, 65_535])?,
                wait: wait(u)?,
                ttl: ttl(u)?,
                // Shared with any max: the protocol allows it with max 1 only, but the table's
                // rules are defined (and checked against the model) for every combination.
                shared: u.ratio(1, 3)?,
            },
            kind @ (3 | 4) => {
                let conn = conn(u, &check)?;
                // Now and then a stray call for some other name.
                let name = if u.ratio(1, 8)? {
                    Some(u.int_in_range(0..=NAMES.len() - 1)?)
                } else {
                    None
                };
                if kind == 3 {
                    Op::Leave { conn, name }
                } else {
                    Op::Activity { conn, name }
                }
            }
            5 => Op::Advance {
                advance: advance(u)?,
            },
            // The table handed to a new process (server::handover): nothing may change.
            8 => Op::HandOver {
                ahead: u.arbitrary()?,
            },
            _ => Op::Tick,
        };
        check.apply(&op);
        queue.apply(&op);
    }
    Ok(())
}

/// Mostly a connection that holds or waits; sometimes any connection so far, gone ones included.
fn conn(u: &mut Unstructured<'_>, check: &Check) -> Result<usize> {
    let pick: u8 = u.arbitrary()?;
    let present = check.present();
    Ok(if pick < 192 && !present.is_empty() {
        present[usize::from(pick) % present.len()]
    } else {
        usize::from(pick)
    })
}

fn millis(u: &mut Unstructured<'_>, most: u64) -> Result<Duration> {
    Ok(Duration::from_millis(u.int_in_range(0..=most)?))
}

fn wait(u: &mut Unstructured<'_>) -> Result<Option<Duration>> {
    Ok(match u.int_in_range(0..=7u8)? {
        0 | 1 => None,
        2 => Some(Duration::ZERO),
        3 => Some(Duration::from_nanos(1)),
        4 => Some(Duration::from_secs(1)),
        5 => Some(Duration::from_secs(3)),
        6 => Some(millis(u, 10_000)?),
        _ => Some(Duration::from_secs(MAX_SECONDS)),
    })
}

/// Above zero, at most a week: what the parser lets through.
fn ttl(u: &mut Unstructured<'_>) -> Result<Option<Duration>> {
    Ok(match u.int_in_range(0..=7u8)? {
        0..=2 => None,
        3 => Some(Duration::from_nanos(1)),
        4 => Some(Duration::from_secs(1)),
        5 => Some(Duration::from_millis(2_500)),
        6 => Some(millis(u, 10_000)?.max(Duration::from_nanos(1))),
        _ => Some(Duration::from_secs(MAX_SECONDS)),
    })
}

fn advance(u: &mut Unstructured<'_>) -> Result<Duration> {
    Ok(match u.int_in_range(0..=6u8)? {
        0 => Duration::ZERO,
        1 => Duration::from_nanos(1),
        2 => Duration::from_millis(250),
        3 => Duration::from_secs(1),
        4 => millis(u, 10_000)?,
        5 => Duration::from_secs(3),
        _ => Duration::from_secs(MAX_SECONDS),
    })
}
