//! Mutual exclusion under churn on one server: client processes in processes of their own
//! contend, leave every way there is, and are SIGKILLed at random; their own CLOCK_MONOTONIC
//! records must show at most K holders of a name at any instant (tests/common/churn.rs says how).
//!
//! TCPNETLOCK_LONG_FAULTS=1 runs ten times as many grants.

#[path = "common/churn.rs"]
mod churn;
mod common;

use std::process::Command;
use std::time::Duration;

use common::{BIN, Server, json_number, wait_until};

/// Runs as a client process when TCPNETLOCK_CHURN_WORKER is set; otherwise does nothing.
#[test]
fn churn_worker() {
    churn::worker_main();
}

#[test]
fn exclusion_holds_with_clients_killed_reset_and_half_closed() {
    let long = std::env::var("TCPNETLOCK_LONG_FAULTS").is_ok_and(|v| v == "1");
    let target = if long { 200_000 } else { 20_000 };
    let time_limit = Duration::from_secs(if long { 1800 } else { 150 });

    // Without -v: a log line per grant would only slow the server down.
    let mut cmd = Command::new(BIN);
    cmd.args(["server", "--listen", "127.0.0.1:0", "--log", "stderr"]);
    let server = Server::spawn(cmd);
    let run = churn::drive(&[server.addr], target, time_limit, || server.stats());

    // Every killed client's connection is found gone: nothing stays held or queued.
    let mut stats = String::new();
    let drained = wait_until(Duration::from_secs(10), || {
        stats = server.stats();
        json_number(&stats, "holders") == Some(0.0) && json_number(&stats, "waiting") == Some(0.0)
    });
    assert!(drained.is_some(), "locks left behind: {stats}");
    assert_eq!(json_number(&stats, "wait_timeout_count"), Some(0.0));

    let summary = churn::check(&run.text, &run.kills);
    eprintln!(
        "churn: {summary}; {} client processes SIGKILLed; {:?}; server: {stats}",
        run.kills.len(),
        run.took
    );
}

/// The checker's own tests: records padded as `record` writes them.
fn records(lines: &[&str]) -> String {
    lines
        .iter()
        .map(|l| format!("{l:<width$}\n", width = churn::RECORD - 1))
        .collect()
}

#[test]
fn the_check_sees_two_holders_of_a_mutex() {
    let text = records(&[
        "G 1 m0 1 10 100 200",
        "G 2 m0 1 11 150 300",
        "E 1 10 400 R",
        "E 2 11 500 R",
    ]);
    let outcome = std::panic::catch_unwind(|| churn::check(&text, &[]));
    let message = *outcome
        .expect_err("overlap not seen")
        .downcast::<String>()
        .unwrap();
    assert!(
        message.contains("m0 (max 1) had 2 holders at once"),
        "{message}"
    );
}

#[test]
fn the_check_takes_a_hold_killed_as_it_read_ok_as_ended_there() {
    // Worker 1 was stamped killed at 150, read `ok` at 200 before the signal landed: its hold
    // is [200, 200]; worker 2's grant after it is no overlap.
    let text = records(&["G 1 m0 1 10 100 200", "G 2 m0 1 11 150 300", "E 2 11 400 R"]);
    churn::check(&text, &[(1, 150)]);
}
