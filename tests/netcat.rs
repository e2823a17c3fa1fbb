//! The shell recipe `echo 'lock,name:X' | nc host 7654` with every common nc, socat and bash's
//! /dev/tcp. Most of these shut down their sending side when stdin ends while they keep running;
//! the lock must stay held for as long as the process lives and be freed within 2 s of its death.

mod common;

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{Server, require_tool, try_lock, wait_until};

/// Starts the `client` command (PORT replaced by the server's port) with `lock,name:NAME` on its stdin and then
/// end of file, checks it was granted and that it keeps the lock after its stdin ended, then kills
/// it and measures how long the server takes to notice.
fn holds_while_alive(argv: &[&str]) {
    let s = Server::start(&[]);
    let name = "nc-lock";
    let port = s.addr.port().to_string();
    let argv: Vec<String> = argv.iter().map(|a| a.replace("PORT", &port)).collect();
    let client = argv.join(" ");
    let mut child: Child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(format!("lock,name:{name}\n").as_bytes())
        .unwrap();
    drop(stdin);
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 3];
    out.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"ok\n", "{client}");

    // Well past stdin's end (and past any half-close): still the holder.
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        assert_eq!(
            try_lock(s.addr, name).1,
            "not-granted",
            "{client} lost its lock"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "{client} exited by itself"
        );
        thread::sleep(Duration::from_millis(200));
    }

    let killed = Instant::now();
    child.kill().unwrap();
    child.wait().unwrap();
    let freed = wait_until(Duration::from_secs(5), || try_lock(s.addr, name).1 == "ok");
    assert!(freed.is_some(), "{client}: lock never freed after kill");
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "{client}: freed {took:?} after the process died"
    );
    // The probes never reached the program's output: `ok` was all it printed.
    let mut rest = Vec::new();
    out.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{client} printed {rest:?} after ok");
}

#[test]
fn openbsd_nc_with_n_half_closes() {
    require_tool("nc.openbsd", "netcat-openbsd");
    holds_while_alive(&["nc.openbsd", "-N", "127.0.0.1", "PORT"]);
}

#[test]
fn openbsd_nc_plain() {
    require_tool("nc.openbsd", "netcat-openbsd");
    holds_while_alive(&["nc.openbsd", "127.0.0.1", "PORT"]);
}

#[test]
fn traditional_nc() {
    require_tool("nc.traditional", "netcat-traditional");
    holds_while_alive(&["nc.traditional", "127.0.0.1", "PORT"]);
}

#[test]
fn ncat_half_closes() {
    require_tool("ncat", "ncat");
    holds_while_alive(&["ncat", "127.0.0.1", "PORT"]);
}

#[test]
fn busybox_nc_half_closes() {
    require_tool("busybox", "busybox");
    holds_while_alive(&["busybox", "nc", "127.0.0.1", "PORT"]);
}

#[test]
fn socat_half_closes() {
    require_tool("socat", "socat");
    // socat's own default is to exit 0.5 s after stdin ends (-t); a script that wants to hold
    // the lock tells it to wait.
    holds_while_alive(&["socat", "-t", "1000000", "-", "TCP:127.0.0.1:PORT"]);
}

#[test]
fn bash_dev_tcp() {
    require_tool("bash", "bash");
    holds_while_alive(&[
        "bash",
        "-c",
        "exec 3<>/dev/tcp/127.0.0.1/PORT; cat >&3; read -r reply <&3; echo \"$reply\"; \
         exec sleep 1000000 <&3",
    ]);
}

/// The shell recipe from the README: nc holds the lock in the background, its output goes to a
/// file the script reads the answer from. (Not a fifo: openbsd nc exits when the reader of its
/// stdout goes away, which would drop the lock as soon as the answer was read.)
#[test]
fn shell_recipe_reads_the_reply_and_releases_on_exit() {
    require_tool("nc.openbsd", "netcat-openbsd");
    let s = Server::start(&[]);
    let script = format!(
        r#"set -e
        out=$(mktemp)
        echo lock,name:recipe | nc.openbsd -N 127.0.0.1 {port} > "$out" &
        nc_pid=$!
        for _ in $(seq 100); do [ -s "$out" ] && break; sleep 0.05; done
        read -r answer < "$out"
        echo "answer=$answer"
        sleep 1.5
        other=$(echo lock,name:recipe | nc.openbsd -N 127.0.0.1 {port} | head -n 1)
        echo "other=$other"
        kill "$nc_pid"; wait "$nc_pid" || true
        rm "$out""#,
        port = s.addr.port()
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("answer=ok\n"), "{text}");
    assert!(text.contains("other=not-granted\n"), "{text}");
    let freed = wait_until(Duration::from_secs(2), || {
        try_lock(s.addr, "recipe").1 == "ok"
    });
    assert!(freed.is_some(), "lock not freed after the script killed nc");
}
