//! `tcpnetlock do` against the real server: exit statuses, the command's environment, waiting
//! and retrying, signals into the command's process group, a lock lost while the command runs,
//! and `do` itself killed.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    BIN, Client, Running, Server, TempDir, alive, await_file, children, free_port, group_members,
    run_within, signal, try_lock, wait_until,
};

const LIMIT: Duration = Duration::from_secs(20);

/// `tcpnetlock do --host 127.0.0.1 --port PORT ARGS...`, with none of the test's own
/// TCPNETLOCK_* variables.
fn tnl_do(port: u16, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["do", "--host", "127.0.0.1", "--port", &port.to_string()])
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

fn run(s: &Server, args: &[&str]) -> (i32, String, String) {
    run_within(&mut tnl_do(s.addr.port(), args), LIMIT)
}

/// The lock is free: a fresh client gets it (and lets it go).
fn is_free(s: &Server, name: &str) -> bool {
    common::is_free(s.addr, name)
}

/// Starts `do` on the shell command `then`, and waits until it has run up to `$READY` (where it
/// touches the marker file; at the start if it does not say).
fn start_marked(s: &Server, dir: &TempDir, do_args: &[&str], then: &str) -> (Running, String) {
    let ready = dir.path.join("ready");
    let touch = format!("touch {}", ready.display());
    let script = if then.contains("$READY") {
        then.replace("$READY", &touch)
    } else {
        format!("{touch}; {then}")
    };
    let mut args = do_args.to_vec();
    args.extend(["--", "sh", "-c", &script]);
    let mut cmd = tnl_do(s.addr.port(), &args);
    cmd.stdin(Stdio::null());
    let running = Running::spawn(&mut cmd);
    await_file(&ready);
    (running, ready.display().to_string())
}

/// The guardian `do` started: its only child, leader of the command's process group.
fn guardian_of(do_pid: i32) -> i32 {
    let mut found = Vec::new();
    wait_until(Duration::from_secs(5), || {
        found = children(do_pid);
        found.len() == 1
    });
    assert_eq!(found.len(), 1, "children of do: {found:?}");
    found[0]
}

/// Kills a process group when the test ends, passed or failed: with `--on-lost ignore` nothing
/// else ends a command whose `do` is gone.
struct KillGroup(i32);

impl Drop for KillGroup {
    fn drop(&mut self) {
        // SAFETY: plain system call; ESRCH when the group is already gone.
        unsafe { libc::kill(-self.0, libc::SIGKILL) };
    }
}

fn comms(group: i32) -> Vec<String> {
    let mut names: Vec<String> = group_members(group).into_iter().map(|m| m.1).collect();
    names.sort();
    names
}

#[test]
fn exits_with_the_command_status_and_releases_first() {
    let s = Server::start(&[]);
    assert_eq!(run(&s, &["--lock-name", "st", "--", "true"]).0, 0);
    assert_eq!(
        run(&s, &["--lock-name", "st", "--", "sh", "-c", "exit 5"]).0,
        5
    );
    let (code, out, err) = run(&s, &["--lock-name", "st", "--", "echo", "hello"]);
    assert_eq!((code, out.as_str(), err.as_str()), (0, "hello\n", ""));
    // Back to back: each `do` has released before it exits, so none is refused.
    for _ in 0..20 {
        assert_eq!(run(&s, &["--lock-name", "st", "--", "true"]).0, 0);
    }
    assert!(is_free(&s, "st"));
    assert_eq!(s.stat("lock_not_acquired_count"), 0.0);
}

#[test]
fn stdin_and_stdout_pass_through() {
    let s = Server::start(&[]);
    let mut cmd = tnl_do(
        s.addr.port(),
        &["--lock-name", "io", "--", "tr", "a-z", "A-Z"],
    );
    cmd.stdin(Stdio::piped());
    let mut running = Running::spawn(&mut cmd);
    running
        .child
        .stdin
        .take()
        .unwrap()
        .write_all(b"shout\n")
        .unwrap();
    assert_eq!(running.finish(LIMIT), (0, "SHOUT\n".into(), String::new()));
}

#[test]
fn not_granted_is_123_quietly_or_the_conflict_exit_code() {
    let s = Server::start(&[]);
    let (_holder, reply) = try_lock(s.addr, "busy");
    assert_eq!(reply, "ok");
    let start = Instant::now();
    assert_eq!(
        run(&s, &["--lock-name", "busy", "--", "echo", "ran"]),
        (123, String::new(), String::new())
    );
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(
        run(&s, &["-E", "9", "--lock-name", "busy", "--", "true"]).0,
        9
    );
    assert_eq!(
        run(
            &s,
            &[
                "--conflict-exit-code",
                "0",
                "--lock-name",
                "busy",
                "--",
                "true"
            ]
        )
        .0,
        0
    );
    let (code, _, err) = run(&s, &["-v", "--lock-name", "busy", "--", "true"]);
    assert_eq!(code, 123);
    assert!(err.contains("lock busy: not granted"), "{err}");
}

#[test]
fn command_not_found_is_127_and_not_runnable_is_124() {
    let s = Server::start(&[]);
    let (code, _, err) = run(&s, &["--", "/no/such/program", "1"]);
    assert_eq!(code, 127);
    assert!(
        err.contains("command not found: '/no/such/program'"),
        "{err}"
    );
    assert_eq!(run(&s, &["--", "no-such-program-on-path"]).0, 127);

    let dir = TempDir::new("do-noexec");
    let file = dir.path.join("not-executable");
    std::fs::write(&file, "#!/bin/sh\n").unwrap();
    let (code, _, err) = run(&s, &["--lock-name", "x", "--", file.to_str().unwrap()]);
    assert_eq!(code, 124);
    assert!(err.contains("Permission denied"), "{err}");
    // The lock was let go in both cases.
    assert!(is_free(&s, "x"));
    assert!(is_free(&s, "no_such_program_1"));
}

#[test]
fn unreachable_server_is_125() {
    let port = free_port();
    let (code, _, err) = run_within(&mut tnl_do(port, &["--", "echo", "ran"]), LIMIT);
    assert_eq!(code, 125);
    assert!(err.contains("connection refused"), "{err}");
    let mut cmd2 = Command::new(BIN);
    cmd2.args(["do", "--host", "no-such-host.invalid", "--", "true"]);
    let (code, _, err) = run_within(&mut cmd2, LIMIT);
    assert_eq!(code, 125, "{err}");
    assert!(
        err.contains("cannot connect to no-such-host.invalid:7654"),
        "{err}"
    );
}

#[test]
fn bad_options_are_2() {
    let s = Server::start(&[]);
    let cases: [&[&str]; 9] = [
        &["--shell", "--", "vmstat", "other-arg"],
        &[],
        &["--wait", "-1", "--", "true"],
        &["--wait", "604801", "--", "true"],
        &["--on-lost", "sometimes", "--", "true"],
        &["--no-such-flag", "--", "true"],
        &["--lock-name", "a b", "--", "true"],
        &["--client-id", "a b", "--", "true"],
        &["--", "é"], // no lock name can be made from it
    ];
    for args in cases {
        let (code, out, err) = run(&s, args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(out.is_empty() && !err.is_empty(), "{args:?}");
    }
    let mut cmd = Command::new(BIN);
    cmd.args(["do", "--port", "x", "--", "true"]);
    assert_eq!(run_within(&mut cmd, LIMIT).0, 2);
    let mut cmd = Command::new(BIN);
    cmd.args(["do", "--", "true"]).env("TCPNETLOCK_PORT", "x");
    assert_eq!(run_within(&mut cmd, LIMIT).0, 2);
}

#[test]
fn max_lets_that_many_commands_run_at_once() {
    let s = Server::start(&[]);
    let (d1, d2) = (TempDir::new("do-max-1"), TempDir::new("do-max-2"));
    let args = ["--max", "2", "--lock-name", "sem"];
    let (mut first, _) = start_marked(&s, &d1, &args, "sleep 30");
    let (mut second, _) = start_marked(&s, &d2, &args, "sleep 30");
    // Full: a third is refused, quietly, as for a mutex.
    assert_eq!(
        run(&s, &["--max", "2", "--lock-name", "sem", "--", "true"]),
        (123, String::new(), String::new())
    );
    // A different N for the same name is a mistake, and said so.
    let (code, _, err) = run(&s, &["--lock-name", "sem", "--", "true"]);
    assert_eq!(code, 123);
    assert!(
        err.contains("max mismatch: sem is held with max:2"),
        "{err}"
    );
    // A place frees up: the next one runs.
    signal(first.pid(), libc::SIGTERM);
    assert_eq!(first.finish(LIMIT).0, 143);
    assert_eq!(
        run(&s, &["--max", "2", "--lock-name", "sem", "--", "true"]).0,
        0
    );
    signal(second.pid(), libc::SIGTERM);
    second.finish(LIMIT);
    // Out of range: a usage error before anything is sent.
    assert_eq!(
        run(&s, &["--max", "0", "--lock-name", "sem", "--", "true"]).0,
        2
    );
    assert_eq!(
        run(&s, &["--max", "65536", "--lock-name", "sem", "--", "true"]).0,
        2
    );
}

#[test]
fn shared_do_runs_side_by_side_and_an_exclusive_do_waits_for_them() {
    let s = Server::start(&[]);
    let (d1, d2) = (TempDir::new("do-shared-1"), TempDir::new("do-shared-2"));
    // The second starts its command while the first still runs its own.
    let (mut first, _) = start_marked(&s, &d1, &["-s", "--lock-name", "cat"], "sleep 30");
    let (mut second, _) = start_marked(&s, &d2, &["--shared", "--lock-name", "cat"], "sleep 30");
    // An exclusive `do` is refused while they hold it, quietly, as for any conflict...
    assert_eq!(
        run(&s, &["--lock-name", "cat", "--", "true"]),
        (123, String::new(), String::new())
    );
    // ...and, when it waits, runs once both have ended, not when the first has.
    let mut writer = Running::spawn(&mut tnl_do(
        s.addr.port(),
        &["-w", "20", "--lock-name", "cat", "--", "echo", "wrote"],
    ));
    assert!(wait_until(LIMIT, || s.stat("waiting") == 1.0).is_some());
    signal(first.pid(), libc::SIGTERM);
    assert_eq!(first.finish(LIMIT).0, 143);
    // `do` read `released` before exiting: the server has let the first go.
    assert_eq!(s.stat("waiting"), 1.0);
    assert_eq!(writer.stdout(), "");
    signal(second.pid(), libc::SIGTERM);
    assert_eq!(second.finish(LIMIT).0, 143);
    assert_eq!(writer.finish(LIMIT), (0, "wrote\n".into(), String::new()));
    let (code, _, err) = run(&s, &["-v", "-s", "--lock-name", "cat", "--", "true"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("tcpnetlock: lock cat granted (shared)\n"),
        "{err}"
    );
    // A shared lock has any number of holders: a semaphore size makes no sense with it.
    let (code, _, err) = run(
        &s,
        &["-s", "--max", "2", "--lock-name", "cat", "--", "true"],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("invalid max 2 for a shared lock: a shared lock has any number of holders"),
        "{err}"
    );
}

#[test]
fn the_command_sees_the_lock_name_and_token() {
    let s = Server::start(&[]);
    let show = "echo name=$TCPNETLOCK_LOCK_NAME token=${TCPNETLOCK_TOKEN-unset}";
    let (code, out, _) = run(&s, &["--", "sh", "-c", show]);
    assert_eq!(code, 0);
    // 0.1.8's name for this command.
    assert_eq!(
        out,
        "name=sh_-c_echo_nameTCPNETLOCK_LOCK_NAME_tokenTCPNETLOCK_TOKEN-unset token=unset\n"
    );
    let (_, out, _) = run(
        &s,
        &["--", "sh", "-c", "echo $TCPNETLOCK_LOCK_NAME", "./x.y/z"],
    );
    assert_eq!(out, "sh_-c_echo_TCPNETLOCK_LOCK_NAME___x_y_z\n");

    let mut cmd = tnl_do(
        s.addr.port(),
        &["--fencing", "--lock-name", "f", "--", "sh", "-c", show],
    );
    cmd.env("TCPNETLOCK_TOKEN", "stale");
    let (_, out, _) = run_within(&mut cmd, LIMIT);
    let token: u64 = out
        .trim()
        .strip_prefix("name=f token=")
        .unwrap_or_else(|| panic!("{out}"))
        .parse()
        .unwrap();
    let mut c = Client::connect(s.addr);
    let next: u64 = c.ask("lock,name:f,fencing:1")[9..].parse().unwrap();
    assert!(next > token);
    // Without --fencing an inherited token is not passed on.
    let mut cmd = tnl_do(s.addr.port(), &["--lock-name", "g", "--", "sh", "-c", show]);
    cmd.env("TCPNETLOCK_TOKEN", "stale");
    assert_eq!(run_within(&mut cmd, LIMIT).1, "name=g token=unset\n");
}

#[test]
fn host_port_and_client_id_come_from_the_environment() {
    let s = Server::start(&[]);
    let dir = TempDir::new("do-env");
    let ready = dir.path.join("ready");
    let mut cmd = Command::new(BIN);
    cmd.args(["do", "--lock-name", "envy", "--", "sh", "-c"])
        .arg(format!("touch {}; sleep 100", ready.display()))
        .env("TCPNETLOCK_HOST", "127.0.0.1")
        .env("TCPNETLOCK_PORT", s.addr.port().to_string())
        .env("TCPNETLOCK_CLIENT_ID", "ci-job.7@host");
    let running = Running::spawn(&mut cmd);
    await_file(&ready);
    let mut c = Client::connect(s.addr);
    let locks = c.ask(".locks");
    assert!(
        locks.contains("\"envy\"") && locks.contains("\"client_id\": \"ci-job.7@host\""),
        "{locks}"
    );
    drop(running);

    let mut cmd = Command::new(BIN);
    cmd.args(["do", "--", "true"])
        .env("TCPNETLOCK_HOST", "127.0.0.1")
        .env("TCPNETLOCK_PORT", free_port().to_string());
    assert_eq!(run_within(&mut cmd, LIMIT).0, 125);
}

#[test]
fn wait_queues_for_the_lock() {
    let s = Server::start(&[]);
    let (mut holder, _) = try_lock(s.addr, "q");
    let mut waiting = Running::spawn(&mut tnl_do(
        s.addr.port(),
        &["-w", "10", "--lock-name", "q", "--", "echo", "got it"],
    ));
    assert!(wait_until(LIMIT, || s.stat("waiting") == 1.0).is_some());
    assert_eq!(holder.ask("release"), "released");
    assert_eq!(waiting.finish(LIMIT).0, 0);
    assert_eq!(waiting.stdout(), "got it\n");

    let (_holder, _) = try_lock(s.addr, "q");
    let start = Instant::now();
    assert_eq!(
        run(&s, &["--wait", "0.3", "--lock-name", "q", "--", "true"]).0,
        123
    );
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[test]
fn retry_asks_again_after_retry_wait() {
    let s = Server::start(&[]);
    let (mut holder, _) = try_lock(s.addr, "r");
    let start = Instant::now();
    let args = [
        "--retry",
        "2",
        "--retry-wait",
        "0.2",
        "--lock-name",
        "r",
        "--",
        "true",
    ];
    assert_eq!(run(&s, &args).0, 123);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(390) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(s.stat("lock_not_acquired_count"), 3.0);

    // Released between two attempts: the retry gets it.
    let mut retrying = Running::spawn(&mut tnl_do(
        s.addr.port(),
        &[
            "--retry",
            "5",
            "--retry-wait",
            "0.2",
            "--lock-name",
            "r",
            "--",
            "true",
        ],
    ));
    assert!(wait_until(LIMIT, || s.stat("lock_not_acquired_count") >= 4.0).is_some());
    assert_eq!(holder.ask("release"), "released");
    assert_eq!(retrying.finish(LIMIT).0, 0);
}

#[test]
fn signals_are_passed_to_the_command_and_the_status_is_128_plus_n() {
    let s = Server::start(&[]);
    for (sig, name) in [
        (libc::SIGINT, "INT"),
        (libc::SIGTERM, "TERM"),
        (libc::SIGHUP, "HUP"),
        (libc::SIGQUIT, "QUIT"),
    ] {
        let dir = TempDir::new("do-sig");
        let lock = format!("sig-{name}");
        let (mut running, _) = start_marked(&s, &dir, &["--lock-name", &lock], "exec sleep 100");
        signal(running.pid(), sig);
        let (code, _, err) = running.finish(LIMIT);
        assert_eq!(code, 128 + sig, "SIG{name}: {err}");
        assert!(is_free(&s, &lock), "SIG{name}");
    }
}

#[test]
fn a_forwarded_signal_reaches_the_command_s_handler() {
    let s = Server::start(&[]);
    let dir = TempDir::new("do-trap");
    let (mut running, _) = start_marked(
        &s,
        &dir,
        &["--lock-name", "trap"],
        "trap 'echo got TERM; exit 7' TERM; sleep 100 & $READY; wait",
    );
    let guardian = guardian_of(running.pid());
    signal(running.pid(), libc::SIGTERM);
    let (code, out, _) = running.finish(LIMIT);
    assert_eq!((code, out.as_str()), (7, "got TERM\n"));
    // The background `sleep` is in the group: it got the SIGTERM too.
    assert!(wait_until(LIMIT, || group_members(guardian).is_empty()).is_some());
}

#[test]
fn a_shell_pipeline_runs_in_one_group_and_all_of_it_gets_the_signal() {
    let s = Server::start(&[]);
    let mut running = Running::spawn(&mut tnl_do(
        s.addr.port(),
        &["--shell", "--lock-name", "pipe", "--", "sleep 100 | cat"],
    ));
    let guardian = guardian_of(running.pid());
    let mut members = Vec::new();
    wait_until(LIMIT, || {
        members = comms(guardian);
        members.contains(&"sleep".into()) && members.contains(&"cat".into())
    });
    assert_eq!(members, ["cat", "sh", "sleep", "tnl-guardian"]);
    // `do` is not in that group: a signal for the group is not one for `do`.
    assert!(group_members(guardian).iter().all(|m| m.0 != running.pid()));
    signal(running.pid(), libc::SIGTERM);
    assert_eq!(running.finish(LIMIT).0, 128 + libc::SIGTERM);
    assert!(wait_until(LIMIT, || group_members(guardian).is_empty()).is_some());
    assert!(is_free(&s, "pipe"));
}

#[test]
fn kill_9_of_do_ends_the_command_and_frees_the_lock() {
    let s = Server::start(&[]);
    for command in ["exec sleep 100", "sleep 100 | cat"] {
        let dir = TempDir::new("do-kill9");
        let (mut running, _) = start_marked(&s, &dir, &["--lock-name", "k9"], command);
        let guardian = guardian_of(running.pid());
        let sleeping = || group_members(guardian).iter().any(|m| m.1 == "sleep");
        assert!(wait_until(LIMIT, sleeping).is_some(), "{command}");
        signal(running.pid(), libc::SIGKILL);
        running.wait_within(LIMIT);
        // SIGTERM to the group at once; `sleep` obeys it.
        let gone = wait_until(LIMIT, || group_members(guardian).is_empty());
        assert!(
            gone.is_some_and(|t| t < Duration::from_secs(5)),
            "{command}: {gone:?}"
        );
        assert!(wait_until(LIMIT, || is_free(&s, "k9")).is_some());
    }
}

#[test]
fn kill_9_of_do_with_on_lost_ignore_leaves_the_command_running() {
    let s = Server::start(&[]);
    let dir = TempDir::new("do-kill9-ignore");
    let (mut running, _) = start_marked(
        &s,
        &dir,
        &["--on-lost", "ignore", "--lock-name", "k9i"],
        "exec sleep 100",
    );
    let guardian = guardian_of(running.pid());
    let _cleanup = KillGroup(guardian);
    let mut sleep = None;
    wait_until(LIMIT, || {
        sleep = group_members(guardian).into_iter().find(|m| m.1 == "sleep");
        sleep.is_some()
    });
    let sleep = sleep.expect("sleep never started").0;
    signal(running.pid(), libc::SIGKILL);
    running.wait_within(LIMIT);
    assert!(wait_until(LIMIT, || is_free(&s, "k9i")).is_some());
    assert!(alive(sleep), "ignore means the command runs on");
}

#[test]
fn lost_lock_terminates_the_command_with_122() {
    let s = Server::start(&[]);
    let dir = TempDir::new("do-lost");
    let (mut running, _) = start_marked(&s, &dir, &["--lock-name", "lost"], "exec sleep 100");
    let guardian = guardian_of(running.pid());
    let start = Instant::now();
    drop(s); // the server goes away: the lock with it
    let (code, _, err) = running.finish(LIMIT);
    assert_eq!(code, 122, "{err}");
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(
        err.contains("lock lost lost: the server closed the connection")
            && err.contains("terminating the command"),
        "{err}"
    );
    assert!(group_members(guardian).is_empty());
}

#[test]
fn a_command_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let s = Server::start(&[]);
    let dir = TempDir::new("do-grace");
    let (mut running, _) = start_marked(
        &s,
        &dir,
        &["--grace", "0.5", "--lock-name", "stubborn"],
        "trap '' TERM; sleep 100 & $READY; wait",
    );
    let guardian = guardian_of(running.pid());
    let start = Instant::now();
    drop(s);
    assert_eq!(running.finish(LIMIT).0, 122);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(490) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // The background sleep (which ignores TERM too) went with the sweep.
    assert!(group_members(guardian).is_empty());
}

#[test]
fn lost_lock_with_on_lost_ignore_warns_and_lets_the_command_finish() {
    let s = Server::start(&[]);
    let dir = TempDir::new("do-ignore");
    let go = dir.path.join("go");
    let (mut running, _) = start_marked(
        &s,
        &dir,
        &["--on-lost", "ignore", "--lock-name", "ign"],
        &format!(
            "while [ ! -e {} ]; do sleep 0.02; done; exit 3",
            go.display()
        ),
    );
    let _cleanup = KillGroup(guardian_of(running.pid()));
    drop(s);
    let warned = wait_until(LIMIT, || {
        running.stderr().contains("warning: lock ign lost")
    });
    assert!(warned.is_some(), "{}", running.stderr());
    std::fs::write(&go, "").unwrap();
    let (code, _, err) = running.finish(LIMIT);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("the command keeps running"), "{err}");
}

#[test]
fn a_loss_found_on_release_is_122_not_the_command_s_status() {
    for (policy, expected) in [("terminate", 122), ("ignore", 3)] {
        let s = Server::start(&[]);
        let dir = TempDir::new("do-lost-at-release");
        let go = dir.path.join("go");
        let (mut running, _) = start_marked(
            &s,
            &dir,
            &["--on-lost", policy, "--lock-name", "late"],
            &format!(
                "while [ ! -e {} ]; do sleep 0.02; done; exit 3",
                go.display()
            ),
        );
        let do_pid = running.pid();
        let guardian = guardian_of(do_pid);
        let _cleanup = KillGroup(guardian);
        // `do` is stopped while the lock goes and the command ends: when it runs again, both
        // are there to see at once, and the command's end is looked at first.
        signal(do_pid, libc::SIGSTOP);
        assert!(wait_until(LIMIT, || common::proc_stat(do_pid).unwrap().1 == 'T').is_some());
        drop(s);
        std::fs::write(&go, "").unwrap();
        let ended = wait_until(LIMIT, || {
            common::proc_stat(guardian).is_none_or(|(_, state, _, _)| state == 'Z')
        });
        assert!(ended.is_some(), "the command did not end");
        signal(do_pid, libc::SIGCONT);
        let (code, _, err) = running.finish(LIMIT);
        assert_eq!(code, expected, "--on-lost {policy}: {err}");
        if policy == "terminate" {
            assert!(
                err.contains(
                    "lock late lost: the server closed the connection (restarted or stopped?); \
                     found on releasing it after the command ended (status 3)"
                ),
                "{err}"
            );
        } else {
            assert!(err.contains("warning: lock late: lock lost"), "{err}");
        }
    }
}

#[test]
fn a_lease_is_renewed_while_the_command_runs() {
    let s = Server::start(&[]);
    let start = Instant::now();
    let (code, _, err) = run(
        &s,
        &["--ttl", "0.3", "--lock-name", "lease", "--", "sleep", "1.2"],
    );
    assert_eq!((code, err.as_str()), (0, ""));
    assert!(start.elapsed() >= Duration::from_millis(1200));
    assert_eq!(s.stat("lease_expired_count"), 0.0);
    assert!(is_free(&s, "lease"));
}

/// A stand-in server for one lock connection (after any `.info`, answered as a server on its
/// own): returns its address and a thread that runs `script` with the request line already read.
fn fake_server(
    script: impl FnOnce(String, &mut BufReader<std::net::TcpStream>) + Send + 'static,
) -> (SocketAddr, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = thread::spawn(move || {
        loop {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            // `do` asks first whether the server is a cluster member: a server on its own.
            if line.trim_end() == ".info" {
                let info = "info,{\"version\": \"0.3.0\", \"cluster\": null}\n";
                reader.get_mut().write_all(info.as_bytes()).unwrap();
                continue;
            }
            script(line.trim_end().to_owned(), &mut reader);
            return;
        }
    });
    (addr, handle)
}

#[test]
fn an_expired_lease_terminates_the_command() {
    let dir = TempDir::new("do-expired");
    let ready = dir.path.join("ready");
    let ready2 = ready.clone();
    let (addr, server) = fake_server(move |request, reader| {
        assert_eq!(request, "lock,name:ex,ttl:30");
        reader.get_mut().write_all(b"ok\n").unwrap();
        await_file(&ready2);
        reader.get_mut().write_all(b"expired\n").unwrap();
    });
    let mut cmd = tnl_do(
        addr.port(),
        &["--ttl", "30", "--lock-name", "ex", "--", "sh", "-c"],
    );
    cmd.arg(format!("touch {}; exec sleep 100", ready.display()));
    let (code, _, err) = run_within(&mut cmd, LIMIT);
    assert_eq!(code, 122, "{err}");
    assert!(err.contains("lock ex lost: the lease expired"), "{err}");
    server.join().unwrap();
}

#[test]
fn requests_are_0_1_8_lines_and_keep_alive_sends_keepalives() {
    let (addr, server) = fake_server(|request, reader| {
        assert_eq!(request, "lock,name:ka,client-id:me");
        reader.get_mut().write_all(b"ok\n").unwrap();
        let mut keepalives = 0;
        loop {
            let mut line = String::new();
            assert!(
                reader.read_line(&mut line).unwrap() > 0,
                "closed before release"
            );
            match line.trim_end() {
                ".keepalive" => {
                    keepalives += 1;
                    reader.get_mut().write_all(b"alive\n").unwrap();
                }
                "release" => {
                    reader.get_mut().write_all(b"released\n").unwrap();
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // 0.55 s at one every 0.1 s: about 5; slack for a busy machine.
        assert!((2..=6).contains(&keepalives), "{keepalives} keepalives");
    });
    let args = [
        "--client-id",
        "me",
        "--keep-alive",
        "--keep-alive-secs",
        "0.1",
        "--lock-name",
        "ka",
        "--",
        "sleep",
        "0.55",
    ];
    let (code, _, err) = run_within(&mut tnl_do(addr.port(), &args), LIMIT);
    assert_eq!((code, err.as_str()), (0, ""));
    server.join().unwrap();
}

#[test]
fn a_server_error_line_is_not_granted() {
    let (addr, server) = fake_server(|_, reader| {
        reader.get_mut().write_all(b"err,server busy\n").unwrap();
    });
    let (code, _, err) = run_within(&mut tnl_do(addr.port(), &["--", "true"]), LIMIT);
    assert_eq!(code, 123);
    assert!(err.contains("server busy"), "{err}");
    server.join().unwrap();
}

#[test]
fn on_a_terminal_the_command_gets_the_foreground() {
    let script = common::require_tool("script", "bsdutils");
    let s = Server::start(&[]);
    // `read` from a background process group would be stopped by SIGTTIN and hang.
    let inner = format!(
        "{BIN} do --host 127.0.0.1 --port {} --lock-name tty -- sh -c 'read x; echo got:$x'",
        s.addr.port()
    );
    let mut cmd = Command::new(script);
    cmd.args(["-qec", &inner, "/dev/null"])
        .stdin(Stdio::piped());
    let mut running = Running::spawn(&mut cmd);
    running
        .child
        .stdin
        .take()
        .unwrap()
        .write_all(b"typed\n")
        .unwrap();
    let (code, out, _) = running.finish(LIMIT);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("got:typed"), "{out:?}");
}

#[test]
fn verbose_says_what_happens() {
    let s = Server::start(&[]);
    let (code, _, err) = run(&s, &["-v", "--fencing", "--", "true"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert_eq!(
        lines[0],
        "tcpnetlock: lock name true (made from the command)"
    );
    assert!(lines[1].starts_with("tcpnetlock: lock true granted (token "));
    assert_eq!(lines[2], "tcpnetlock: lock true released");
}

/// An interactive bash on a pseudo-terminal of its own: what a user at a terminal has, with job
/// control. Everything the terminal shows is collected.
struct Terminal {
    master: std::fs::File,
    shell: std::process::Child,
    screen: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Terminal {
    fn bash() -> Terminal {
        use std::ffi::CStr;
        use std::io::Read;
        use std::os::fd::FromRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::process::CommandExt;

        let bash = common::require_tool("bash", "bash");
        // SAFETY: posix_openpt returns a new descriptor that the File then owns; ptsname's
        // static buffer is copied before anything else can call it.
        let (master, path) = unsafe {
            let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
            assert!(fd >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
            assert_eq!(libc::grantpt(fd), 0);
            assert_eq!(libc::unlockpt(fd), 0);
            let path = CStr::from_ptr(libc::ptsname(fd))
                .to_str()
                .unwrap()
                .to_owned();
            (std::fs::File::from_raw_fd(fd), path)
        };
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&path)
            .unwrap();
        let mut cmd = Command::new(bash);
        cmd.args(["--norc", "--noprofile", "-i"])
            .env("PS1", "$ ")
            .env("TERM", "dumb")
            .stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave);
        // SAFETY: setsid and ioctl are async-signal-safe; the new session takes the terminal
        // on fd 0 as its controlling terminal.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let shell = cmd.spawn().expect("bash on a pty");
        let screen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut reader = master.try_clone().unwrap();
        let sink = std::sync::Arc::clone(&screen);
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Terminal {
            master,
            shell,
            screen,
        }
    }

    fn typing(&mut self, keys: &str) {
        self.master.write_all(keys.as_bytes()).unwrap();
    }

    /// Waits until the screen shows `text` past what it showed at `from`; returns the
    /// screen's length after it.
    fn shows(&self, text: &str, from: usize) -> usize {
        let found = wait_until(LIMIT, || self.screen.lock().unwrap()[from..].contains(text));
        let screen = self.screen.lock().unwrap().clone();
        assert!(
            found.is_some(),
            "{text:?} not shown; the terminal: {screen:?}; its processes: {}",
            self.processes()
        );
        screen.len()
    }

    /// The shell's descendants (pid, name, state, parent, group) and the terminal's foreground
    /// group, for failure messages.
    fn processes(&self) -> String {
        use std::os::fd::AsRawFd;
        let mut fg: libc::pid_t = 0;
        // SAFETY: TIOCGPGRP writes one pid_t into `fg`.
        unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCGPGRP, &mut fg) };
        let mut family = vec![self.shell.id() as i32];
        let mut out = format!("foreground group {fg};");
        let all: Vec<_> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter_map(|pid| Some((pid, common::proc_stat(pid)?)))
            .collect();
        for _ in 0..4 {
            for (pid, (comm, state, ppid, pgrp)) in &all {
                if family.contains(ppid) && !family.contains(pid) {
                    family.push(*pid);
                    out += &format!(" {pid} {comm} {state} ppid {ppid} pgrp {pgrp};");
                }
            }
        }
        out
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        // An interactive bash passes SIGHUP on to its jobs, stopped ones included.
        signal(self.shell.id() as i32, libc::SIGHUP);
        thread::sleep(Duration::from_millis(100));
        let _ = self.shell.kill();
        let _ = self.shell.wait();
    }
}

impl Terminal {
    /// A bash with `do` started in it on lock `name` (in the background with `&`), once the
    /// command has said `started`; and where the screen was then. The command then reads a
    /// line from the terminal and prints it twice. Only built-ins: a Ctrl-Z between dash's
    /// vfork and exec leaves dash unstoppable (it waits for the stopped child in the kernel),
    /// with or without `do`.
    fn with_job(s: &Server, name: &str, background: bool) -> (Terminal, usize) {
        let mut term = Terminal::bash();
        // What the shell prints, not what it echoes: the typed lines never contain the words
        // awaited ("st""arted" is echoed as typed, printed as `started`).
        term.typing("echo ready-$((1+1))\n");
        let at = term.shows("ready-2", 0);
        term.typing(&format!(
            "{BIN} do --host 127.0.0.1 --port {} --lock-name {name} -- \
             sh -c 'echo st\"\"arted; read x; echo got:$x$x' {}\n",
            s.addr.port(),
            if background { "&" } else { "" }
        ));
        let at = term.shows("started", at);
        assert!(!common::is_free(s.addr, name));
        (term, at)
    }

    /// `fg`, and a line typed for the command: it reads it (a background group's `read` would
    /// stop it again), the job ends with status 0, and the lock is free.
    fn fg_answers(&mut self, s: &Server, name: &str, at: usize) {
        self.typing("fg\n");
        self.typing("typed\n");
        let at = self.shows("got:typedtyped", at);
        self.typing("echo status-$?-end\n");
        self.shows("status-0-end", at);
        assert!(
            common::is_free(s.addr, name),
            "released after the job ended"
        );
    }
}

/// Ctrl-Z works as on any command: the job stops, the shell gets the terminal back, the lock
/// stays held, and `fg` hands the terminal to the command again.
#[test]
fn ctrl_z_stops_the_job_and_fg_resumes_it() {
    let s = Server::start(&[]);
    let (mut term, at) = Terminal::with_job(&s, "tstp", false);
    term.typing("\x1a");
    let at = term.shows("Stopped", at);
    term.typing("echo back-$((2+3))\n");
    let at = term.shows("back-5", at);
    assert!(
        !common::is_free(s.addr, "tstp"),
        "the lock is held while stopped"
    );
    term.fg_answers(&s, "tstp", at);
}

/// `bg` continues the job without the terminal: the command reading it stops again (SIGTTIN),
/// and the shell says so; `kill %1` on the stopped job ends the command and frees the lock.
#[test]
fn bg_and_kill_on_a_stopped_job() {
    let s = Server::start(&[]);
    let (mut term, at) = Terminal::with_job(&s, "bg", false);
    term.typing("\x1a");
    let at = term.shows("Stopped", at);
    // `jobs -l` names the stop signal (the notices and `jobs` say only "Stopped").
    term.typing("bg; sleep 2; jobs -l\n");
    let at = term.shows("Stopped (tty input)", at);
    assert!(!common::is_free(s.addr, "bg"));
    // (`wait` would not wait: it returns at once for a stopped job.)
    let jobs = common::children(term.shell.id() as i32);
    term.typing("kill %1\n");
    let freed = wait_until(LIMIT, || common::is_free(s.addr, "bg"));
    assert!(freed.is_some(), "not freed: {}", term.processes());
    // bash tells of the job's end before its next prompt, once it has reaped `do`.
    let reaped = wait_until(LIMIT, || {
        jobs.iter().all(|&pid| common::proc_stat(pid).is_none())
    });
    assert!(reaped.is_some(), "{}", term.processes());
    term.typing("true\n");
    term.shows("Exit 143", at);
}

/// Started in the background (`&`), the job stops when the command reads the terminal, as
/// `cat &` would, and `fg` gives it the terminal.
#[test]
fn a_background_job_stops_on_reading_the_terminal_and_fg_gives_it() {
    let s = Server::start(&[]);
    let (mut term, at) = Terminal::with_job(&s, "amp", true);
    term.typing("sleep 1; jobs -l\n");
    let at = term.shows("Stopped (tty input)", at);
    term.fg_answers(&s, "amp", at);
}

/// `do` inside a script run from the terminal: Ctrl-Z stops the script too (as it would
/// without `do`), so the interactive shell gets its prompt back; `fg` resumes both.
#[test]
fn ctrl_z_stops_a_script_that_runs_do() {
    let s = Server::start(&[]);
    let mut term = Terminal::bash();
    term.typing("echo ready-$((1+1))\n");
    let at = term.shows("ready-2", 0);
    // The script's shell has no job control: it, `do` and the rest share one process group.
    term.typing(&format!(
        "sh -c '{BIN} do --host 127.0.0.1 --port {} --lock-name scr -- \
         sh -c \"echo st\\\"\\\"arted; read x; echo got:\\$x\\$x\"; echo aft\"\"er-do'\n",
        s.addr.port()
    ));
    let at = term.shows("started", at);
    term.typing("\x1a");
    let at = term.shows("Stopped", at);
    term.typing("echo back-$((2+3))\n");
    let at = term.shows("back-5", at);
    term.typing("fg\n");
    term.typing("typed\n");
    term.shows("got:typedtyped\r\nafter-do", at);
    assert!(common::is_free(s.addr, "scr"));
}

/// A pipe whose reader is gone: writing to it fails with EPIPE (`2>&1 | head -0`).
fn closed_pipe() -> Stdio {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills both descriptors; the read end is closed, the write end is owned by
    // the OwnedFd.
    unsafe {
        assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0);
        libc::close(fds[0]);
        Stdio::from(OwnedFd::from_raw_fd(fds[1]))
    }
}

/// `do -v` says what it does on stderr; when nobody reads stderr any more, the command runs
/// all the same and `do` exits with its status.
#[test]
fn a_closed_stderr_does_not_stop_verbose_do() {
    let s = Server::start(&[]);
    let mut cmd = tnl_do(
        s.addr.port(),
        &["-v", "--lock-name", "quiet", "--", "echo", "ran"],
    );
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(closed_pipe());
    let out = cmd.output().unwrap();
    assert_eq!(
        (
            common::code(out.status),
            String::from_utf8_lossy(&out.stdout).as_ref()
        ),
        (0, "ran\n")
    );
    assert!(is_free(&s, "quiet"));
}

/// The lock is lost while stderr is a closed pipe: the message cannot be written, and the
/// command is ended as always, SIGTERM first (its handler runs), not SIGKILL.
#[test]
fn a_closed_stderr_does_not_change_how_the_command_is_ended() {
    let s = Server::start(&[]);
    let dir = TempDir::new("do-lost-closed-stderr");
    let (ready, termed) = (dir.path.join("ready"), dir.path.join("termed"));
    let mut cmd = tnl_do(
        s.addr.port(),
        &[
            "--grace",
            "5",
            "--lock-name",
            "lost-quietly",
            "--",
            "sh",
            "-c",
        ],
    );
    cmd.arg(format!(
        "trap 'touch {}; exit 0' TERM; touch {}; sleep 100 & wait",
        termed.display(),
        ready.display()
    ))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(closed_pipe());
    let mut running = common::KillOnDrop(cmd.spawn().unwrap());
    await_file(&ready);
    let guardian = guardian_of(running.0.id() as i32);
    let start = Instant::now();
    drop(s);
    let mut status = None;
    wait_until(LIMIT, || {
        status = running.0.try_wait().unwrap();
        status.is_some()
    });
    assert_eq!(status.map(common::code), Some(122));
    assert!(termed.exists(), "the command's SIGTERM handler did not run");
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    assert!(wait_until(LIMIT, || group_members(guardian).is_empty()).is_some());
}

/// Every duration flag of `do` is bounded when the command line is read: a usage error that
/// names the flag, before anything is sent. (`--grace 1e19` used to panic when the lock was
/// lost, and left the guardian spinning after a `kill -9` of `do`.)
#[test]
fn duration_flags_are_bounded() {
    let s = Server::start(&[]);
    for flag in ["--grace", "--retry-wait", "--keep-alive-secs"] {
        for value in ["1e19", "604801", "-1", "NaN"] {
            let arg = format!("{flag}={value}");
            let (code, out, err) = run(&s, &[&arg, "--lock-name", "b", "--", "true"]);
            assert_eq!((code, out.as_str()), (2, ""), "{flag} {value}: {err}");
            assert!(
                err.starts_with(&format!(
                    "error: invalid value '{value}' for '{flag} <SECONDS>': "
                )) && err.contains("expected seconds from 0 to 604800"),
                "{flag} {value}: {err}"
            );
        }
        let (code, _, err) = run(&s, &[flag, "604800", "--lock-name", "b", "--", "true"]);
        assert_eq!(code, 0, "{flag}: {err}");
    }
    for (flag, value) in [("--wait", "604801"), ("--ttl", "1e19")] {
        let (code, _, err) = run(&s, &[flag, value, "--lock-name", "b", "--", "true"]);
        assert_eq!(code, 2, "{flag} {value}: {err}");
        assert!(err.contains(&format!("for '{flag} <SECONDS>'")), "{err}");
    }
    assert_eq!(
        s.stat("lock_acquired_count"),
        3.0,
        "only the three good ones were sent"
    );
}

/// CPU time (user + system) a process has used, in clock ticks, from /proc.
fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    // utime and stime are fields 14 and 15 of stat(5), the 12th and 13th after the name.
    Some(fields[11].parse::<u64>().ok()? + fields[12].parse::<u64>().ok()?)
}

/// `do` killed with the longest grace allowed, while the command ignores SIGTERM: the
/// guardian waits out the grace asleep (it used to spin at 70-85% of a core when the grace
/// overflowed its timeout).
#[test]
fn after_kill_9_the_guardian_waits_out_the_longest_grace_asleep() {
    let s = Server::start(&[]);
    let dir = TempDir::new("do-kill9-grace");
    let (mut running, _) = start_marked(
        &s,
        &dir,
        &["--grace", "604800", "--lock-name", "k9g"],
        "trap '' TERM; sleep 100 & $READY; wait",
    );
    let guardian = guardian_of(running.pid());
    let _cleanup = KillGroup(guardian);
    signal(running.pid(), libc::SIGKILL);
    running.wait_within(LIMIT);
    assert!(wait_until(LIMIT, || is_free(&s, "k9g")).is_some());
    // The command ignores SIGTERM: the group is still there, waiting for its SIGKILL.
    let before = cpu_ticks(guardian).expect("the guardian is gone");
    thread::sleep(Duration::from_millis(1500));
    let used = cpu_ticks(guardian).expect("the guardian is gone") - before;
    // Clock ticks are 10 ms: a spinning guardian uses about 100 in 1.5 s.
    assert!(used <= 5, "the guardian used {used} ticks of CPU in 1.5 s");
    assert!(group_members(guardian).iter().any(|m| m.1 == "sleep"));
}

/// With `stty tostop`, a process outside the terminal's foreground group that writes to the
/// terminal is stopped, and `do` is outside it while its command has the terminal. When the
/// lock is lost, `do` must still end the command and say so: it signals first, and its words
/// are never stopped by the terminal.
#[test]
fn with_tostop_a_lost_lock_still_ends_the_command_and_is_reported() {
    let s = Server::start(&[]);
    let mut term = Terminal::bash();
    term.typing("stty tostop; echo ready-$((1+1))\n");
    let at = term.shows("ready-2", 0);
    term.typing(&format!(
        "{BIN} do --host 127.0.0.1 --port {} --lock-name tostop -- \
         sh -c 'trap \"echo got-T\"\"ERM; exit 0\" TERM; echo st\"\"arted; sleep 100 & wait'\n",
        s.addr.port()
    ));
    let at = term.shows("started", at);
    drop(s);
    term.shows("got-TERM", at);
    term.shows("tcpnetlock: lock tostop lost: ", at);
    term.typing("echo status-$?-end\n");
    term.shows("status-122-end", at);
}
