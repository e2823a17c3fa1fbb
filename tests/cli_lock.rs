//! `tcpnetlock lock NAME` against the real server: the grant line, holding until stdin ends or a
//! signal, losing the lock, and the `coproc` recipe from the README.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, Running, Server, free_port, run_within, signal, try_lock, wait_until};

const LIMIT: Duration = Duration::from_secs(20);

fn tnl_lock(port: u16, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["lock", "--host", "127.0.0.1", "--port", &port.to_string()])
        .args(args)
        .env_remove("TCPNETLOCK_CLIENT_ID");
    cmd
}

/// Starts `lock` with stdin a pipe we hold, and waits for its first line.
fn hold(s: &Server, args: &[&str]) -> Running {
    let mut cmd = tnl_lock(s.addr.port(), args);
    cmd.stdin(Stdio::piped());
    let running = Running::spawn(&mut cmd);
    let said = wait_until(LIMIT, || running.stdout().ends_with('\n'));
    assert!(said.is_some(), "no line; stderr: {}", running.stderr());
    running
}

fn held(s: &Server, name: &str) -> bool {
    !common::is_free(s.addr, name)
}

#[test]
fn prints_ok_and_holds_until_stdin_ends() {
    let s = Server::start(&[]);
    let mut running = hold(&s, &["cache"]);
    assert_eq!(running.stdout(), "ok\n");
    assert!(held(&s, "cache"));
    // Whatever is written to stdin is read and dropped; only its end counts.
    use std::io::Write;
    let mut stdin = running.child.stdin.take().unwrap();
    stdin.write_all(b"anything\n").unwrap();
    assert!(held(&s, "cache"));
    drop(stdin);
    assert_eq!(running.finish(LIMIT), (0, "ok\n".into(), String::new()));
    // `released` was read before the exit: free at once.
    assert!(!held(&s, "cache"));
}

#[test]
fn fencing_puts_the_token_on_the_line() {
    let s = Server::start(&[]);
    let running = hold(&s, &["--fencing", "f"]);
    let line = running.stdout();
    let token: u64 = line
        .trim()
        .strip_prefix("ok,token:")
        .unwrap_or_else(|| panic!("{line}"))
        .parse()
        .unwrap();
    assert!(token > 0);
}

#[test]
fn term_int_and_hup_release_and_exit_0() {
    let s = Server::start(&[]);
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        let mut running = hold(&s, &["sig"]);
        assert!(held(&s, "sig"));
        signal(running.pid(), sig);
        assert_eq!(running.finish(LIMIT).0, 0, "signal {sig}");
        assert!(!held(&s, "sig"), "signal {sig}");
    }
}

#[test]
fn max_shares_the_name_between_that_many_holders() {
    let s = Server::start(&[]);
    let mut first = hold(&s, &["--max", "2", "pool"]);
    let second = hold(&s, &["--max", "2", "pool"]);
    assert_eq!(
        (first.stdout(), second.stdout()),
        ("ok\n".into(), "ok\n".into())
    );
    let (code, out, _) = run_within(&mut tnl_lock(s.addr.port(), &["--max", "2", "pool"]), LIMIT);
    assert_eq!((code, out.as_str()), (123, "not-granted\n"));
    let (code, out, _) = run_within(&mut tnl_lock(s.addr.port(), &["--max", "3", "pool"]), LIMIT);
    assert_eq!(
        (code, out.as_str()),
        (123, "err,max mismatch: pool is held with max:2\n")
    );
    drop(first.child.stdin.take());
    assert_eq!(first.finish(LIMIT).0, 0);
    let third = hold(&s, &["--max", "2", "pool"]);
    assert_eq!(third.stdout(), "ok\n");
}

#[test]
fn shared_holds_beside_other_shared_holders_and_keeps_an_exclusive_one_out() {
    let s = Server::start(&[]);
    let mut first = hold(&s, &["--shared", "catalog"]);
    let mut second = hold(&s, &["-s", "catalog"]);
    assert_eq!(
        (first.stdout(), second.stdout()),
        ("ok\n".into(), "ok\n".into())
    );
    let (code, out, _) = run_within(&mut tnl_lock(s.addr.port(), &["catalog"]), LIMIT);
    assert_eq!((code, out.as_str()), (123, "not-granted\n"));
    for running in [&mut first, &mut second] {
        drop(running.child.stdin.take());
        assert_eq!(running.finish(LIMIT).0, 0);
    }
    let exclusive = hold(&s, &["catalog"]);
    assert_eq!(exclusive.stdout(), "ok\n");
}

/// The lease renewal thread blocks every signal itself, as its first act; the thread that
/// takes the lock (here `lock`'s main thread, which then waits for SIGTERM on a signalfd) never
/// has its mask set to block everything, not even around the thread's creation.
#[test]
fn the_renewal_thread_masks_signals_itself_not_through_the_caller() {
    let strace = common::require_tool("strace", "strace");
    let s = Server::start(&[]);
    let dir = common::TempDir::new("lock-sigmask");
    let trace = dir.path.join("trace");
    let mut cmd = Command::new(strace);
    cmd.args(["-f", "-qq", "-e", "trace=execve,rt_sigprocmask", "-o"])
        .arg(&trace)
        .arg(BIN)
        .args([
            "lock",
            "--host",
            "127.0.0.1",
            "--port",
            &s.addr.port().to_string(),
        ])
        .args(["--ttl", "30", "masked"])
        .env_remove("TCPNETLOCK_CLIENT_ID");
    // stdin at its end: granted, then released at once.
    let (code, out, err) = run_within(&mut cmd, LIMIT);
    assert_eq!((code, out.as_str()), (0, "ok\n"), "{err}");
    let text = std::fs::read_to_string(&trace).unwrap();
    // Each line starts with the thread id; the main thread is the one that ran execve.
    let tid = |line: &str| line.split_whitespace().next().unwrap_or("").to_owned();
    let main = text
        .lines()
        .find(|l| l.contains("execve("))
        .map(tid)
        .unwrap_or_else(|| panic!("no execve in:\n{text}"));
    // sigfillset: every signal but the two glibc keeps for itself (strace: ~[RTMIN RT_1]).
    let block_all: Vec<String> = text
        .lines()
        .filter(|l| l.contains("rt_sigprocmask(SIG_SETMASK, ~["))
        .map(tid)
        .collect();
    assert!(
        !block_all.is_empty(),
        "no thread blocked everything:\n{text}"
    );
    assert!(
        block_all.iter().all(|t| *t != main),
        "the main thread ({main}) set a mask blocking every signal:\n{text}"
    );
}

#[test]
fn not_granted_prints_not_granted_and_exits_123() {
    let s = Server::start(&[]);
    let (_holder, _) = try_lock(s.addr, "taken");
    let (code, out, err) = run_within(&mut tnl_lock(s.addr.port(), &["taken"]), LIMIT);
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (123, "not-granted\n", "")
    );
}

#[test]
fn wait_queues_until_the_holder_releases() {
    let s = Server::start(&[]);
    let (mut holder, _) = try_lock(s.addr, "w");
    let mut cmd = tnl_lock(s.addr.port(), &["--wait", "10", "w"]);
    cmd.stdin(Stdio::piped());
    let mut running = Running::spawn(&mut cmd);
    assert!(wait_until(LIMIT, || s.stat("waiting") == 1.0).is_some());
    assert_eq!(running.stdout(), "");
    assert_eq!(holder.ask("release"), "released");
    assert!(wait_until(LIMIT, || running.stdout() == "ok\n").is_some());
    drop(running.child.stdin.take());
    assert_eq!(running.finish(LIMIT).0, 0);
}

#[test]
fn losing_the_lock_exits_122() {
    let s = Server::start(&[]);
    let mut running = hold(&s, &["gone"]);
    let start = Instant::now();
    drop(s);
    let (code, _, err) = running.finish(LIMIT);
    assert_eq!(code, 122);
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(
        err.contains("lock gone lost: the server closed the connection"),
        "{err}"
    );
}

#[test]
fn a_lease_is_renewed_while_held() {
    let s = Server::start(&[]);
    let mut running = hold(&s, &["--ttl", "0.3", "lease"]);
    let start = Instant::now();
    // Held across several ttls.
    assert!(wait_until(LIMIT, || start.elapsed() > Duration::from_secs(1)).is_some());
    assert!(held(&s, "lease"));
    drop(running.child.stdin.take());
    assert_eq!(running.finish(LIMIT).0, 0);
    assert_eq!(s.stat("lease_expired_count"), 0.0);
}

#[test]
fn stdin_at_end_of_file_releases_at_once() {
    let s = Server::start(&[]);
    // </dev/null (and a closed stdin, which the runtime turns into /dev/null): nothing to hold
    // for.
    let (code, out, _) = run_within(&mut tnl_lock(s.addr.port(), &["n"]), LIMIT);
    assert_eq!((code, out.as_str()), (0, "ok\n"));
    assert!(!held(&s, "n"));
}

#[test]
fn unreachable_is_125_and_bad_names_are_2() {
    let (code, out, err) = run_within(&mut tnl_lock(free_port(), &["x"]), LIMIT);
    assert_eq!((code, out.as_str()), (125, ""));
    assert!(err.contains("connection refused"), "{err}");
    let (code, _, err) = run_within(&mut tnl_lock(free_port(), &["a/b"]), LIMIT);
    assert_eq!(code, 2);
    assert!(err.contains("invalid lock name"), "{err}");
}

#[test]
fn the_readme_coproc_recipe_works() {
    let s = Server::start(&[]);
    let script = format!(
        r#"
        export TCPNETLOCK_HOST=127.0.0.1 TCPNETLOCK_PORT={port}
        coproc LOCK {{ {BIN} lock build-cache; }}
        lock_pid=$LOCK_PID lock_in=${{LOCK[1]}}
        {{ read -r reply <&"${{LOCK[0]}}"; }} 2>/dev/null
        [ "$reply" = ok ] || exit 9
        echo "reply=$reply"
        {BIN} locks | grep -q '^build-cache ' && echo held
        exec {{lock_in}}>&-
        # Let bash reap the coprocess first, as a slow script would: the saved pid still works.
        sleep 0.3
        wait "$lock_pid"; echo "status=$?"
        {BIN} do --lock-name build-cache -- echo free-again
        "#,
        port = s.addr.port()
    );
    let (code, out, err) = run_within(Command::new("bash").arg("-c").arg(script), LIMIT);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out, "reply=ok\nheld\nstatus=0\nfree-again\n", "{err}");
}

#[test]
fn the_readme_coproc_recipe_takes_the_busy_branch_when_not_granted() {
    let s = Server::start(&[]);
    let (_holder, _) = try_lock(s.addr, "build-cache");
    let script = format!(
        r#"
        export TCPNETLOCK_HOST=127.0.0.1 TCPNETLOCK_PORT={port}
        coproc LOCK {{ {BIN} lock build-cache; }}
        lock_pid=$LOCK_PID lock_in=${{LOCK[1]}}
        sleep 0.3   # `lock` has exited and bash has closed its descriptors
        {{ read -r reply <&"${{LOCK[0]}}"; }} 2>/dev/null
        [ "$reply" = ok ] || {{ echo "build cache busy"; wait "$lock_pid"; echo "status=$?"; exit 1; }}
        echo "not reached"
        "#,
        port = s.addr.port()
    );
    let (code, out, err) = run_within(Command::new("bash").arg("-c").arg(script), LIMIT);
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (1, "build cache busy\nstatus=123\n", "")
    );
}

#[test]
fn the_readme_fifo_recipe_works_in_a_posix_shell() {
    let s = Server::start(&[]);
    let script = format!(
        r#"
        export TCPNETLOCK_HOST=127.0.0.1 TCPNETLOCK_PORT={port}
        dir=$(mktemp -d); mkfifo "$dir/in" "$dir/out"
        {BIN} lock build-cache < "$dir/in" > "$dir/out" &
        exec 3> "$dir/in"
        read -r reply < "$dir/out"
        echo "reply=$reply"
        {BIN} do --lock-name build-cache -- true; echo "while held: $?"
        exec 3>&-
        wait $!; echo "status=$?"; rm -r "$dir"
        {BIN} do --lock-name build-cache -- echo free-again
        "#,
        port = s.addr.port()
    );
    let (code, out, err) = run_within(Command::new("sh").arg("-c").arg(script), LIMIT);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out, "reply=ok\nwhile held: 123\nstatus=0\nfree-again\n",
        "{err}"
    );
}

#[test]
fn a_server_error_is_printed_and_is_123() {
    let s = Server::start(&[]);
    let mut a = common::Client::connect(s.addr);
    assert_eq!(a.ask("lock,name:sem,max:2"), "ok");
    // `lock` asks for a plain lock (max 1): the server refuses the mismatch with an `err,` line.
    let (code, out, err) = run_within(&mut tnl_lock(s.addr.port(), &["sem"]), LIMIT);
    assert_eq!(code, 123, "{err}");
    assert_eq!(out, "err,max mismatch: sem is held with max:2\n");
    assert!(
        err.contains(
            "tcpnetlock: error: max mismatch: sem is held with max:2, asked with max:1 (everyone \
             using a name must give the same --max)"
        ),
        "{err}"
    );
}
