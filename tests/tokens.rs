//! Fencing tokens across restarts, through the real binary with `--state-dir`: tokens grow across
//! restarts and stay on the wall clock, so losing the reservation file cannot make them go back;
//! a reservation a little ahead of the clock is waited out, one far ahead (a clock stepped back)
//! is continued above, a damaged one does not stop the server, errors name the file, and the
//! reservation is durable (the directory is synced after the rename).
//!
//! "On the clock" is checked as: the wall clock in microseconds before the server was started
//! < a run's first token <= the wall clock after its grant was read.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{BIN, Server, TempDir, children, require_tool, run_within, signal};

const FILE: &str = "token-reservation";

fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn start(dir: &Path) -> Server {
    Server::start(&["--state-dir", dir.to_str().unwrap()])
}

/// A fencing grant of `name` (waiting for the previous holder to be gone), released at once:
/// the connection closes.
fn grant(s: &Server, name: &str) -> u64 {
    let reply = s
        .connect()
        .ask(&format!("lock,name:{name},fencing:1,wait:10"));
    reply
        .strip_prefix("ok,token:")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("not a grant with a token: {reply:?}"))
}

fn store(dir: &Path, text: &str) {
    fs::write(dir.join(FILE), text).unwrap();
}

/// One run: starts the server, takes one grant, kills the server (SIGKILL, as a crash would).
/// Returns (clock before the start, the token, clock after the grant).
fn one_run(dir: &Path) -> (u64, u64, u64) {
    let before = wall_us();
    let s = start(dir);
    let token = grant(&s, "run");
    (before, token, wall_us())
}

#[test]
fn tokens_never_go_back_when_the_reservation_file_is_lost() {
    let dir = TempDir::new("tokens-lost");
    let mut runs: Vec<(u64, u64, u64)> = (0..4).map(|_| one_run(&dir.path)).collect();
    // The package's purge, a replaced disk: the reservation is gone.
    fs::remove_file(dir.path.join(FILE)).unwrap();
    runs.push(one_run(&dir.path));
    let tokens: Vec<u64> = runs.iter().map(|r| r.1).collect();
    for w in tokens.windows(2) {
        assert!(
            w[1] > w[0],
            "token {} after token {}: tokens went back (first token of each run, the last after \
             the file was deleted: {tokens:?})",
            w[1],
            w[0]
        );
    }
    for (before, token, after) in runs {
        assert!(
            before < token && token <= after,
            "token {token} is not on the clock: {before} µs before the start, {after} µs after \
             the grant ({} µs ahead)",
            token as i64 - after as i64
        );
    }
}

#[test]
fn the_reservation_moves_ahead_with_the_grants() {
    // The server keeps the stored reservation 0.1 s (100,000 tokens) above the tokens or the
    // clock and extends it when a grant comes within half of that: 51,000 grants get there.
    const GRANTS: usize = 51_000;
    const THREADS: usize = 4;
    let dir = TempDir::new("tokens-extend");
    let s = start(&dir.path);
    let read = || -> u64 {
        fs::read_to_string(dir.path.join(FILE))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let at_start = read();
    let addr = s.addr;
    let highest = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                scope.spawn(move || {
                    (0..GRANTS / THREADS)
                        .map(|i| {
                            let mut c = common::Client::connect(addr);
                            let reply = c.ask(&format!("lock,name:x{t}-{i},fencing:1"));
                            reply["ok,token:".len()..].parse::<u64>().unwrap()
                        })
                        .max()
                        .unwrap()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap())
            .max()
            .unwrap()
    });
    // Every grant's reply came after the write that covers it.
    let at_end = read();
    assert!(
        at_end > at_start && at_end > highest,
        "reservation {at_start} at start, {at_end} after tokens up to {highest}"
    );
    assert!(
        at_end <= wall_us() + 100_000,
        "the reservation {at_end} is more than 0.1 s ahead of the clock {}",
        wall_us()
    );
}

#[test]
fn a_reservation_slightly_ahead_of_the_clock_is_waited_out() {
    let dir = TempDir::new("tokens-wait");
    let ahead = 600_000;
    let reservation = wall_us() + ahead;
    store(&dir.path, &format!("{reservation}\n"));
    let started = Instant::now();
    let s = start(&dir.path);
    let took = started.elapsed();
    let token = grant(&s, "w");
    let after = wall_us();
    assert!(
        token > reservation,
        "token {token} <= reservation {reservation}"
    );
    assert!(
        token <= after,
        "token {token} is {} µs ahead of the clock",
        token - after
    );
    assert!(
        took >= Duration::from_micros(ahead - 50_000) && took <= Duration::from_secs(3),
        "the start took {took:?} for a reservation {ahead} µs ahead of the clock"
    );
    assert!(
        s.log_text().contains("waiting for the clock to pass it"),
        "log:\n{}",
        s.log_text()
    );
}

#[test]
fn a_reservation_far_ahead_is_continued_above_with_a_warning() {
    // What a clock stepped back by three days leaves: the start does not wait for days, and
    // tokens go on right above the reservation (not a further jump ahead per restart).
    let dir = TempDir::new("tokens-ahead");
    let day = 86_400_000_000;
    let reservation = wall_us() + 3 * day;
    store(&dir.path, &reservation.to_string());
    let started = Instant::now();
    let s = start(&dir.path);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let first = grant(&s, "a");
    let second = grant(&s, "a");
    assert!(
        first > reservation && second > first,
        "{reservation} {first} {second}"
    );
    let log = s.log_text();
    let path = dir.path.join(FILE);
    assert!(
        log.contains(&format!("WARN: {}", path.display())) && log.contains("ahead of the clock"),
        "log:\n{log}"
    );
    drop(s);
    let s = start(&dir.path);
    let third = grant(&s, "a");
    assert!(third > second, "token {third} after {second}");
    // Within seconds of the old reservation: only blocks of 0.1 s were added.
    assert!(
        third - reservation < 10_000_000,
        "token {third} is {} s above the reservation {reservation}",
        (third - reservation) / 1_000_000
    );
}

#[test]
fn a_huge_reservation_starts_with_a_warning_and_tokens_still_grow() {
    for huge in [(1u64 << 63) - 1, u64::MAX - 1, u64::MAX] {
        let dir = TempDir::new("tokens-huge");
        store(&dir.path, &format!("{huge}\n"));
        let mut last = 0;
        for run in 0..3 {
            let s = start(&dir.path);
            if run == 0 {
                let log = s.log_text();
                assert!(
                    log.contains(&format!("WARN: {}", dir.path.join(FILE).display())),
                    "{huge}: log:\n{log}"
                );
            }
            for _ in 0..2 {
                let token = grant(&s, "h");
                assert!(
                    token > last,
                    "{huge}, run {run}: token {token} after token {last}"
                );
                last = token;
            }
        }
        // Far from wrapping: the reservation leaves room for 2^62 more tokens.
        assert!(last < u64::MAX - (1 << 62), "{huge}: token {last}");
    }
}

#[test]
fn errors_about_the_state_file_name_it() {
    let dir = TempDir::new("tokens-errors");
    let not_a_dir = dir.path.join("plain-file");
    fs::write(&not_a_dir, "").unwrap();
    let inside_a_file = not_a_dir.join("state");
    let reservation_is_a_dir = dir.path.join("dir-instead");
    fs::create_dir_all(reservation_is_a_dir.join(FILE)).unwrap();
    let damaged = dir.path.join("damaged");
    fs::create_dir_all(&damaged).unwrap();
    store(&damaged, "12x34\n");
    // The temporary file cannot be made (as root too): a write error.
    let unwritable = dir.path.join("unwritable");
    fs::create_dir_all(unwritable.join(format!("{FILE}.tmp"))).unwrap();
    for (state_dir, named, says) in [
        (
            &dir.path.join("missing"),
            dir.path.join("missing"),
            "does not exist",
        ),
        (&not_a_dir, not_a_dir.clone(), "is not a directory"),
        (&inside_a_file, inside_a_file.clone(), "Not a directory"),
        (
            &unwritable,
            unwritable.join(format!("{FILE}.tmp")),
            "cannot create",
        ),
        (
            &reservation_is_a_dir,
            reservation_is_a_dir.join(FILE),
            "directory",
        ),
        (&damaged, damaged.join(FILE), "delete it"),
    ] {
        let (code, _, stderr) = run_within(
            Command::new(BIN).args([
                "server",
                "--listen",
                "127.0.0.1:0",
                "--log",
                "stderr",
                "--state-dir",
                state_dir.to_str().unwrap(),
            ]),
            Duration::from_secs(10),
        );
        assert_eq!(code, 2, "{}: {stderr}", state_dir.display());
        assert!(
            stderr.contains(&named.display().to_string()) && stderr.contains(says),
            "{}: the error should name {} and say {says:?}:\n{stderr}",
            state_dir.display(),
            named.display()
        );
    }
}

#[test]
fn the_reservation_is_synced_and_so_is_its_directory_after_the_rename() {
    let strace = require_tool("strace", "strace");
    let dir = TempDir::new("tokens-sync");
    let trace = dir.path.join("trace");
    let state = dir.path.join("state");
    fs::create_dir_all(&state).unwrap();
    let mut cmd = Command::new(strace);
    cmd.arg("-f")
        .args(["-e", "trace=openat,fsync,rename,renameat,renameat2"])
        .arg("-o")
        .arg(&trace)
        .args([BIN, "server", "--listen", "127.0.0.1:0", "--log", "stderr"])
        .arg("--state-dir")
        .arg(&state);
    let s = Server::spawn(cmd);
    // The reservation is stored before the server listens. Killing strace would leave the
    // server running untraced: it goes first.
    for pid in children(s.child.id() as i32) {
        signal(pid, libc::SIGKILL);
    }
    let lines: Vec<String> = fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    drop(s);
    let tmp = format!("{}/{FILE}.tmp\"", state.display());
    let fd_of = |line: &str| line.rsplit("= ").next().unwrap_or("").trim().to_owned();
    let tmp_fd = lines
        .iter()
        .find(|l| l.contains("openat(") && l.contains(&tmp))
        .map(|l| fd_of(l))
        .unwrap_or_else(|| panic!("no open of {tmp}:\n{}", lines.join("\n")));
    let rename = lines
        .iter()
        .position(|l| l.contains("rename") && l.contains(&tmp))
        .unwrap_or_else(|| panic!("no rename of {tmp}:\n{}", lines.join("\n")));
    assert!(
        lines[..rename]
            .iter()
            .any(|l| l.contains(&format!("fsync({tmp_fd})"))),
        "the file is not synced before the rename:\n{}",
        lines.join("\n")
    );
    let dir_open = format!("\"{}\", O_RDONLY", state.display());
    let dir_fd = lines[rename..]
        .iter()
        .find(|l| l.contains("openat(") && l.contains(&dir_open))
        .map(|l| fd_of(l))
        .unwrap_or_else(|| {
            panic!(
                "the directory is not opened after the rename:\n{}",
                lines.join("\n")
            )
        });
    assert!(
        lines[rename..]
            .iter()
            .any(|l| l.contains(&format!("fsync({dir_fd})"))),
        "the directory is not synced after the rename:\n{}",
        lines.join("\n")
    );
}
