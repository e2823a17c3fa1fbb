//! The client's lease clock (`ttl`) against a stalled path: a proxy between client and server
//! that stops copying but keeps both connections open, as a stalled NAT or tunnel does. TCP sees
//! nothing wrong on either side; only the client's own count of unanswered renewals can tell, and
//! it must tell before the server gives the lock to somebody else. Through the library, `do` and
//! `lock`; and the renewal a waited grant gets at once (against a stand-in server).

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use common::{BIN, Running, Server, TempDir, await_file, wait_until};
use tcpnetlock::client::{Client, Error, Lost};

const LIMIT: Duration = Duration::from_secs(20);
/// The lease of every stalled test, and the client's window: the ttl less its margin, a tenth.
const TTL: &str = "2";
const WINDOW: Duration = Duration::from_millis(1800);
/// How much earlier than the window after the stall the loss may come: the answered renewal
/// was sent a round trip before its `alive` passed the proxy, plus scheduling on a busy machine.
const EARLY: Duration = Duration::from_millis(150);

/// A TCP proxy on loopback that can be told to stall.
struct Proxy {
    addr: SocketAddr,
    shared: Arc<ProxyShared>,
}

struct ProxyShared {
    /// Stall once the next `alive` has been passed on to the client.
    armed: AtomicBool,
    /// When it stalled: from then on nothing is copied either way, and both connections stay
    /// open (the proxy's kernel still acknowledges what the client sends).
    stalled: OnceLock<Instant>,
    /// The test is over: let go of every connection.
    done: AtomicBool,
}

impl Proxy {
    fn start(server: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(ProxyShared {
            armed: AtomicBool::new(false),
            stalled: OnceLock::new(),
            done: AtomicBool::new(false),
        });
        let sh = Arc::clone(&shared);
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let upstream = TcpStream::connect(server).unwrap();
                for (from, to, to_client) in [
                    (
                        client.try_clone().unwrap(),
                        upstream.try_clone().unwrap(),
                        false,
                    ),
                    (upstream, client, true),
                ] {
                    let sh = Arc::clone(&sh);
                    thread::spawn(move || copy(from, to, to_client, &sh));
                }
            }
        });
        Proxy { addr, shared }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Stalls right after the next `alive` reaches the client, and says when. The renewal it
    /// answers is then the last one the client sees answered: its lease clock runs out one
    /// window after (less a round trip).
    fn stall_after_next_alive(&self) -> Instant {
        self.shared.armed.store(true, Ordering::SeqCst);
        assert!(
            wait_until(LIMIT, || self.shared.stalled.get().is_some()).is_some(),
            "no `alive` went through the proxy"
        );
        *self.shared.stalled.get().unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.done.store(true, Ordering::SeqCst);
    }
}

fn copy(mut from: TcpStream, mut to: TcpStream, to_client: bool, sh: &ProxyShared) {
    from.set_read_timeout(Some(Duration::from_millis(10)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while !sh.done.load(Ordering::SeqCst) {
        if sh.stalled.get().is_some() {
            thread::sleep(Duration::from_millis(10));
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(std::net::Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return,
        };
        if sh.stalled.get().is_some() || to.write_all(&buf[..n]).is_err() {
            continue;
        }
        let alive = buf[..n].windows(6).any(|w| w == b"alive\n");
        if to_client && alive && sh.armed.load(Ordering::SeqCst) {
            let _ = sh.stalled.set(Instant::now());
        }
    }
}

/// A client that queues for `name` directly at the server (not through the proxy) and notes
/// when it is granted.
struct Waiter(thread::JoinHandle<Instant>);

impl Waiter {
    fn queue(s: &Server, name: &str) -> Waiter {
        let addr = s.addr;
        let request = format!("lock,name:{name},wait:60\n");
        let handle = thread::spawn(move || {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream.set_read_timeout(Some(LIMIT)).unwrap();
            stream.write_all(request.as_bytes()).unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            assert_eq!(line, "ok\n");
            Instant::now()
        });
        assert!(
            wait_until(LIMIT, || s.stat("waiting") == 1.0).is_some(),
            "the waiter never queued"
        );
        Waiter(handle)
    }

    fn granted(self) -> Instant {
        self.0.join().expect("the waiter was never granted")
    }
}

/// The loss came a window after the stall (give or take a round trip), and before the server
/// could give the lock to the waiter.
fn check_times(what: &str, stalled: Instant, lost: Instant, granted: Instant) {
    let after = lost - stalled;
    eprintln!(
        "{what}: lost {:.3} s after the stall, the waiter granted {:.3} s after it",
        after.as_secs_f64(),
        (granted - stalled).as_secs_f64()
    );
    assert!(after >= WINDOW - EARLY, "{what}: lost too early: {after:?}");
    assert!(
        lost < granted,
        "{what}: lost {after:?} after the stall, but the server granted the waiter {:?} after it",
        granted - stalled
    );
}

#[test]
fn the_library_counts_a_stalled_lease_as_lost_before_the_server_can_regrant() {
    let s = Server::start(&[]);
    let proxy = Proxy::start(s.addr);
    let lock = Client::new("127.0.0.1", proxy.port())
        .request("stall-lib")
        .ttl(Duration::from_secs(2))
        .take()
        .unwrap();
    let deadline = lock.lease_deadline().expect("a lease has a deadline");
    assert!(deadline > Instant::now() && deadline <= Instant::now() + WINDOW);
    // Through the proxy, renewals are answered: held past the ttl.
    assert_eq!(lock.wait_lost(Some(Duration::from_millis(2500))), None);
    let waiter = Waiter::queue(&s, "stall-lib");
    let stalled = proxy.stall_after_next_alive();
    let lost = lock.wait_lost(Some(LIMIT));
    let lost_at = Instant::now();
    assert_eq!(lost, Some(Lost::LeaseUnconfirmed));
    check_times("library", stalled, lost_at, waiter.granted());
    assert_eq!(lock.lost(), Some(Lost::LeaseUnconfirmed));
    assert_eq!(lock.lease_deadline(), None);
    match lock.release() {
        Err(e @ Error::Lost(Lost::LeaseUnconfirmed)) => assert_eq!(
            e.to_string(),
            "lock lost: the server answered no lease renewal within the ttl (network or server \
             stalled?)"
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn do_terminates_its_command_before_the_server_can_regrant() {
    let s = Server::start(&[]);
    let proxy = Proxy::start(s.addr);
    let dir = TempDir::new("lease-do");
    let (ready, termed) = (dir.path.join("ready"), dir.path.join("termed"));
    let script = format!(
        "trap 'touch {}; exit 0' TERM; touch {}; sleep 100 & wait",
        termed.display(),
        ready.display()
    );
    let mut cmd = Command::new(BIN);
    cmd.args([
        "do",
        "--host",
        "127.0.0.1",
        "--port",
        &proxy.port().to_string(),
    ])
    .args([
        "--ttl",
        TTL,
        "--lock-name",
        "stall-do",
        "--",
        "sh",
        "-c",
        &script,
    ])
    .env_remove("TCPNETLOCK_CLIENT_ID")
    .stdin(Stdio::null());
    let mut running = Running::spawn(&mut cmd);
    await_file(&ready);
    let waiter = Waiter::queue(&s, "stall-do");
    let stalled = proxy.stall_after_next_alive();
    let mut termed_at = None;
    wait_until(LIMIT, || {
        termed_at = termed.exists().then(Instant::now);
        termed_at.is_some()
    });
    let (code, _, err) = running.finish(LIMIT);
    let termed_at = termed_at.expect("the command never got SIGTERM");
    assert_eq!(code, 122, "{err}");
    assert!(
        err.contains(
            "lock stall-do lost: the server answered no lease renewal within the ttl (network or \
             server stalled?); terminating the command"
        ),
        "{err}"
    );
    check_times("do", stalled, termed_at, waiter.granted());
}

#[test]
fn lock_exits_122_before_the_server_can_regrant() {
    let s = Server::start(&[]);
    let proxy = Proxy::start(s.addr);
    let mut cmd = Command::new(BIN);
    cmd.args([
        "lock",
        "--host",
        "127.0.0.1",
        "--port",
        &proxy.port().to_string(),
    ])
    .args(["--ttl", TTL, "stall-lock"])
    .env_remove("TCPNETLOCK_CLIENT_ID")
    .stdin(Stdio::piped());
    let mut running = Running::spawn(&mut cmd);
    assert!(wait_until(LIMIT, || running.stdout() == "ok\n").is_some());
    let waiter = Waiter::queue(&s, "stall-lock");
    let stalled = proxy.stall_after_next_alive();
    let mut exited_at = None;
    wait_until(LIMIT, || {
        exited_at = running.child.try_wait().unwrap().map(|_| Instant::now());
        exited_at.is_some()
    });
    let (code, _, err) = running.finish(LIMIT);
    assert_eq!(code, 122, "{err}");
    assert!(
        err.contains("lock stall-lock lost: the server answered no lease renewal"),
        "{err}"
    );
    check_times("lock", stalled, exited_at.unwrap(), waiter.granted());
}

/// A stand-in server for one connection that grants `lock` after `delay` (as if the client had
/// waited), then runs `script` on the lines that follow.
fn granting_after(
    delay: Duration,
    script: impl FnOnce(&mut BufReader<TcpStream>) + Send + 'static,
) -> (u16, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(LIMIT)).unwrap();
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("lock,name:w,wait:"), "{line:?}");
        thread::sleep(delay);
        reader.get_mut().write_all(b"ok\n").unwrap();
        script(&mut reader);
    });
    (port, handle)
}

fn next_line(reader: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    line
}

#[test]
fn a_waited_grant_is_renewed_at_once_and_counted_from_that_renewal() {
    // The wait (0.6 s) is longer than the client's window (0.4 s): counted from the request,
    // the lease would be over on arrival.
    let (port, server) = granting_after(Duration::from_millis(600), |reader| {
        let start = Instant::now();
        assert_eq!(next_line(reader), ".keepalive\n");
        // At once, not a keepalive interval (a quarter of the ttl) later.
        assert!(start.elapsed() < Duration::from_millis(100));
        reader.get_mut().write_all(b"alive\n").unwrap();
        // Answer every renewal from now on, until the release.
        loop {
            match next_line(reader).as_str() {
                ".keepalive\n" => reader.get_mut().write_all(b"alive\n").unwrap(),
                "release\n" => return reader.get_mut().write_all(b"released\n").unwrap(),
                other => panic!("{other:?}"),
            }
        }
    });
    let lock = Client::new("127.0.0.1", port)
        .request("w")
        .wait(Duration::from_secs(5))
        .ttl(Duration::from_millis(500))
        .take()
        .unwrap();
    assert_eq!(lock.wait_lost(Some(Duration::from_secs(1))), None);
    lock.release().unwrap();
    server.join().unwrap();
}

#[test]
fn a_waited_grant_whose_renewal_goes_unanswered_is_not_a_lock() {
    let (port, server) = granting_after(Duration::from_millis(100), |reader| {
        assert_eq!(next_line(reader), ".keepalive\n");
        // Silence, as a stalled path; the client gives up and closes.
        assert_eq!(next_line(reader), "");
    });
    let start = Instant::now();
    let r = Client::new("127.0.0.1", port)
        .request("w")
        .wait(Duration::from_secs(5))
        .ttl(Duration::from_secs(1))
        .take();
    let took = start.elapsed();
    assert!(
        matches!(r, Err(Error::Lost(Lost::LeaseUnconfirmed))),
        "{r:?}"
    );
    // 0.1 s of waiting, then the window: 0.9 s.
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(3),
        "{took:?}"
    );
    server.join().unwrap();
}
