//! Running out of descriptors or threads: holders keep their locks, newcomers get a clear `err,`
//! line, the CPU stays idle, and service resumes when the load drops.

mod common;

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use common::{BIN, Client, Server, try_lock, wait_until};

/// CPU seconds (user + system) the process has used so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[test]
fn out_of_descriptors() {
    let mut cmd = Command::new(BIN);
    cmd.args(["server", "--listen", "127.0.0.1:0", "--log", "stderr"]);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 32,
                rlim_max: 32,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let s = Server::spawn(cmd);
    let mut holders = Vec::new();
    let refusal = loop {
        let mut c = Client::connect(s.addr);
        let reply = c.ask(&format!("lock,name:fd{}", holders.len()));
        if reply != "ok" {
            break reply;
        }
        holders.push(c);
        assert!(holders.len() < 32, "the descriptor limit was never reached");
    };
    assert_eq!(refusal, "err,server out of file descriptors");
    assert!(holders.len() >= 10, "only {} holders fit", holders.len());

    // Newcomers keep being refused, without the acceptor spinning.
    let pid = s.child.id();
    let before = cpu_secs(pid);
    for _ in 0..20 {
        let mut c = Client::connect(s.addr);
        assert_eq!(c.line(), "err,server out of file descriptors");
        std::thread::sleep(Duration::from_millis(50));
    }
    let used = cpu_secs(pid) - before;
    assert!(
        used < 0.3,
        "{used} s of CPU while refusing 20 clients over 1 s"
    );

    for h in &mut holders {
        assert_eq!(h.ask(".keepalive"), "alive");
    }
    assert_eq!(holders.pop().unwrap().ask("release"), "released");
    assert!(
        wait_until(Duration::from_secs(2), || try_lock(s.addr, "after").1
            == "ok")
        .is_some(),
        "service did not resume"
    );
}

/// A pids cgroup (v1 here) limits the server's threads, as `TasksMax=` does under systemd.
struct PidsCgroup(std::path::PathBuf);

impl PidsCgroup {
    fn new(pid: u32, max: usize) -> PidsCgroup {
        let dir = std::path::PathBuf::from(format!("/sys/fs/cgroup/pids/tcpnetlock-test-{pid}"));
        std::fs::create_dir(&dir).unwrap_or_else(|e| {
            panic!(
                "cannot create {} (needs root and cgroup v1 pids): {e}",
                dir.display()
            )
        });
        std::fs::write(dir.join("pids.max"), max.to_string()).unwrap();
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
        PidsCgroup(dir)
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        // The cgroup can only be removed once empty: the test kills the server first.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn threads(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn out_of_threads() {
    let mut s = Server::start(&[]);
    let pid = s.child.id();
    let base = threads(pid);
    let cgroup = PidsCgroup::new(pid, base + 2);

    let (mut a, r1) = try_lock(s.addr, "t1");
    let (mut b, r2) = try_lock(s.addr, "t2");
    assert_eq!((r1.as_str(), r2.as_str()), ("ok", "ok"));
    for _ in 0..3 {
        let mut c = Client::connect(s.addr);
        assert_eq!(c.ask("lock,name:t3"), "err,server busy");
    }
    assert_eq!(a.ask(".keepalive"), "alive");
    assert_eq!(b.ask(".keepalive"), "alive");
    assert!(
        s.log_text().contains("cannot start a worker thread"),
        "{}",
        s.log_text()
    );

    // A released holder's worker is reused: no new thread needed.
    assert_eq!(a.ask("release"), "released");
    assert!(
        wait_until(Duration::from_secs(2), || try_lock(s.addr, "t3").1 == "ok").is_some(),
        "service did not resume"
    );
    assert_eq!(threads(pid), base + 2);

    s.child.kill().unwrap();
    s.child.wait().unwrap();
    drop(cgroup);
}
