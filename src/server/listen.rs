//! Where the listening sockets come from, the options every accepted socket gets, and the TCP
//! keepalive idle time each holder's socket gets of its own.
//!
//! Under systemd socket activation the sockets arrive as inherited descriptors (LISTEN_FDS) and
//! we serve exactly those; otherwise we bind `--listen` addresses ourselves.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use socket2::{Domain, Socket, TcpKeepalive, Type};

/// The addresses one `--listen` value means: `HOST`, `HOST:PORT`, `IP`, `IP:PORT`, `[IPv6]` or
/// `[IPv6]:PORT`; `default_port` fills in a missing port. A host name is resolved here and binds
/// every address it resolves to.
pub fn resolve(text: &str, default_port: u16) -> Result<Vec<SocketAddr>, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, default_port)]);
    }
    if let Some(ip) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("invalid IPv6 address in --listen {text}"))?;
        return Ok(vec![SocketAddr::new(ip, default_port)]);
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) => {
            let port = port
                .parse::<u16>()
                .map_err(|_| format!("invalid port in --listen {text}"))?;
            (host, port)
        }
        None => (text, default_port),
    };
    if host.is_empty() || host.contains(':') {
        return Err(format!(
            "invalid --listen {text}: expected HOST, HOST:PORT or [IPv6]:PORT"
        ));
    }
    let mut addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve --listen {text}: {e}"))?
        .collect();
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(format!("cannot resolve --listen {text}: no addresses"));
    }
    Ok(addrs)
}

/// Binds one address the way a server should: SO_REUSEADDR so a restart does not wait out
/// TIME_WAIT, IPv6 sockets v6-only so `--listen :: --listen 0.0.0.0` can both bind.
pub fn bind(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// Descriptors from systemd's fd store, with their names.
pub type Stored = Vec<(String, OwnedFd)>;

/// The listening sockets systemd passed us, if any, and the descriptors of the unit's fd store
/// whose names (`FDNAME=`, in LISTEN_FDNAMES) are among `stored`: what a previous process of
/// the unit handed over. Any other passed descriptor that is not a listening TCP socket is an
/// error in the unit file, reported rather than ignored.
pub fn from_systemd(stored: &[&str]) -> Result<(Vec<TcpListener>, Stored), String> {
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    // SAFETY: called before any thread starts (the server's startup), so nothing else reads the
    // environment meanwhile; listenfd removes LISTEN_FDS and LISTEN_PID the same way.
    unsafe { std::env::remove_var("LISTEN_FDNAMES") };
    let names: Vec<&str> = names.split(':').collect();
    let mut fds = listenfd::ListenFd::from_env();
    let mut listeners = Vec::with_capacity(fds.len());
    let mut ours = Vec::new();
    for i in 0..fds.len() {
        let name = names.get(i).copied().unwrap_or("");
        if stored.contains(&name) {
            if let Ok(Some(fd)) = fds.take_raw_fd(i) {
                // SAFETY: systemd passed this descriptor to this process alone; nothing else
                // owns it. Close-on-exec, as every descriptor the server opens.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                // SAFETY: F_SETFD on a descriptor we own.
                unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
                ours.push((name.to_owned(), fd));
            }
            continue;
        }
        match fds.take_tcp_listener(i) {
            Ok(Some(l)) => listeners.push(l),
            Ok(None) => {}
            Err(e) => {
                return Err(format!(
                    "socket {} passed by systemd (LISTEN_FDS) is not a listening TCP socket: {e}",
                    i + 3
                ));
            }
        }
    }
    Ok((listeners, ours))
}

/// How fast a vanished peer (no FIN, no RST) is noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub time: Duration,
    pub interval: Duration,
    pub probes: u32,
}

impl Keepalive {
    /// The longest a dead peer can go unnoticed: idle time, then every probe unanswered.
    pub fn bound(&self) -> Duration {
        self.time + self.interval * self.probes
    }
}

/// The largest TCP_USER_TIMEOUT the kernel accepts.
const MAX_USER_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);

/// Sets the options every accepted connection needs on the listening socket, which Linux copies
/// to each socket it accepts (saving six system calls per connection): TCP keepalive, so that a
/// holder whose host vanished is dropped; TCP_USER_TIMEOUT, so the same bound holds while our
/// own writes go unacknowledged (keepalive does not probe then); no Nagle delay on replies.
///
/// `keepalive: None` turns keepalive off. With `inherit`, a socket that already has keepalive on
/// (systemd's `KeepAlive=yes` and its timings) keeps its settings. Returns the keepalive in force.
pub fn configure_listener(
    listener: &TcpListener,
    keepalive: Option<Keepalive>,
    inherit: bool,
) -> io::Result<Option<Keepalive>> {
    let socket = socket2::SockRef::from(listener);
    socket.set_tcp_nodelay(true)?;
    let keepalive = if inherit && socket.keepalive()? {
        Some(Keepalive {
            time: socket.tcp_keepalive_time()?,
            interval: socket.tcp_keepalive_interval()?,
            probes: socket.tcp_keepalive_retries()?,
        })
    } else {
        keepalive
    };
    match keepalive {
        Some(k) => {
            socket.set_tcp_keepalive(
                &TcpKeepalive::new()
                    .with_time(k.time)
                    .with_interval(k.interval)
                    .with_retries(k.probes),
            )?;
            // The kernel reads TCP_USER_TIMEOUT as a signed int of milliseconds and refuses
            // larger values: the longest keepalive bound the flags allow (32767 s + 127 ×
            // 32767 s) is past that, so the timeout is cut to its maximum (24.8 days).
            socket.set_tcp_user_timeout(Some(k.bound().min(MAX_USER_TIMEOUT)))?;
        }
        None => {
            socket.set_keepalive(false)?;
            socket.set_tcp_user_timeout(None)?;
        }
    }
    Ok(keepalive)
}

/// Gives one holder's (or waiter's) socket an idle time of its own, so that holders that
/// connected together are not probed together.
///
/// Every accepted socket inherits the listener's idle time, so a burst of holders (clients
/// reconnecting after a restart) would be probed in lockstep; the kernel's timer wheel even rounds
/// a 20 s timer to a 2 s slot (HZ=250), so holders that connected up to 2 s apart are probed in
/// the same timer run. On loopback each CPU queues at most `net.core.netdev_max_backlog` packets
/// (1000 by default) until that run ends and drops the rest; the retries come in lockstep too,
/// and a live holder whose probes were all dropped is cut off as dead. Of 8,000 holders opened at
/// once, 2,187 lost their lock with the default settings, 3,378 to 5,453 with the shorter probing
/// of tests/keepalive_burst.rs.
///
/// The idle time is spread over whole seconds in [idle/4, idle], by `seed` (the connection id:
/// consecutive ids times 2^64/φ land evenly over the range). Holders with the same idle time that
/// connected together stay together, probe after probe, so the number of distinct idle times is
/// what bounds a group: in that test, [idle/2, idle] (11 groups at 20 s) still lost 147 of 12,000
/// holders, [idle/4, idle] (16 groups) none. A live idle holder is probed at most 4 times as
/// often as without the spread: a probe and its answer are two empty segments.
///
/// What ends a probed connection is TCP_USER_TIMEOUT (set by [`configure_listener`]): it is moved
/// from the bound to the last probe of this connection's schedule that is not later than the
/// bound. So a dead peer is still dropped within the bound (at most one interval earlier), and a
/// connection that starts probing earlier gets more probes, not an earlier end. The probe
/// interval is left alone: only connections whose probes were lost retry, and together only with
/// those of their own group.
///
/// Reads the socket's own settings, which came from the flags or from systemd's socket unit.
/// Best effort: on any error the socket keeps the listener's settings.
pub fn spread_keepalive(stream: &TcpStream, seed: u64) {
    let socket = socket2::SockRef::from(stream);
    // The listener sets TCP_USER_TIMEOUT exactly when keepalive is on.
    let Ok(Some(user_timeout)) = socket.tcp_user_timeout() else {
        return;
    };
    let (Ok(idle), Ok(interval)) = (socket.tcp_keepalive_time(), socket.tcp_keepalive_interval())
    else {
        return;
    };
    let Some((idle, user_timeout)) = spread(idle, interval, user_timeout, seed) else {
        return;
    };
    let secs = idle.as_secs() as libc::c_int;
    // SAFETY: a valid socket descriptor and a c_int that outlives the call. socket2 would also
    // set SO_KEEPALIVE, one more system call for what is already on.
    let set = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_KEEPIDLE,
            (&secs as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return;
    }
    // Should this fail, the bound is at worst one interval late.
    let _ = socket.set_tcp_user_timeout(Some(user_timeout));
}

/// The idle time and user timeout for one connection (see [`spread_keepalive`]); None when there
/// is nothing to spread (an idle time of 1 s).
fn spread(
    idle: Duration,
    interval: Duration,
    user_timeout: Duration,
    seed: u64,
) -> Option<(Duration, Duration)> {
    let idle = idle.as_secs();
    let span = idle.checked_sub((idle / 4).max(1))?;
    if span == 0 || interval.is_zero() {
        return None;
    }
    // The high 32 bits of seed × 2^64/φ, scaled to 0..=span.
    let fraction = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    let idle = Duration::from_secs(idle - ((fraction * (span + 1)) >> 32));
    let probes = user_timeout.checked_sub(idle)?.as_millis() / interval.as_millis();
    let probes = u32::try_from(probes).ok().filter(|&p| p > 0)?;
    Some((idle, idle + interval * probes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(text: &str) -> Vec<String> {
        resolve(text, 7654)
            .unwrap()
            .iter()
            .map(|a| a.to_string())
            .collect()
    }

    /// Default keepalive: 20 s idle, 5 s interval, 4 probes: dropped after 40 s.
    const IDLE: Duration = Duration::from_secs(20);
    const INTERVAL: Duration = Duration::from_secs(5);
    const BOUND: Duration = Duration::from_secs(40);

    #[test]
    fn spread_keeps_the_bound_and_at_least_the_probes() {
        for seed in 0..1000 {
            let (idle, end) = spread(IDLE, INTERVAL, BOUND, seed).unwrap();
            assert!(idle >= IDLE / 4 && idle <= IDLE, "{idle:?}");
            assert_eq!(idle.subsec_nanos(), 0, "the kernel takes whole seconds");
            assert!(end <= BOUND && end > BOUND - INTERVAL, "{end:?}");
            let probes = (end - idle).as_millis() / INTERVAL.as_millis();
            assert_eq!(
                idle + INTERVAL * probes as u32,
                end,
                "off the probe schedule"
            );
            assert!(probes >= 4, "{probes} probes");
        }
    }

    #[test]
    fn consecutive_connections_spread_evenly() {
        let mut count = [0u32; 21];
        for seed in 1000..17_000 {
            count[spread(IDLE, INTERVAL, BOUND, seed).unwrap().0.as_secs() as usize] += 1;
        }
        // 16,000 connections over the 16 seconds from 5 to 20: 1,000 each, give or take 1%.
        assert!(count[..5].iter().all(|&c| c == 0), "{count:?}");
        assert!(
            count[5..].iter().all(|&c| (990..=1010).contains(&c)),
            "{count:?}"
        );
    }

    #[test]
    fn nothing_to_spread() {
        let one = Duration::from_secs(1);
        assert_eq!(spread(one, one, Duration::from_secs(5), 7), None);
        for seed in 0..100 {
            let two = spread(2 * one, one, Duration::from_secs(4), seed).unwrap();
            assert!(two.0 >= one && two.0 <= 2 * one, "{two:?}");
        }
        // A user timeout before the first probe is left alone.
        assert_eq!(spread(IDLE, INTERVAL, Duration::from_secs(5), 7), None);
    }

    #[test]
    fn listen_forms() {
        assert_eq!(addrs("127.0.0.1"), ["127.0.0.1:7654"]);
        assert_eq!(addrs("0.0.0.0:80"), ["0.0.0.0:80"]);
        assert_eq!(addrs("::1"), ["[::1]:7654"]);
        assert_eq!(addrs("[::]"), ["[::]:7654"]);
        assert_eq!(addrs("[::1]:9"), ["[::1]:9"]);
        assert!(addrs("localhost").contains(&"127.0.0.1:7654".to_owned()));
        assert!(addrs("localhost:1").iter().all(|a| a.ends_with(":1")));
    }

    #[test]
    fn bad_listen_values() {
        for bad in [
            "",
            ":80",
            "[::1",
            "[nope]",
            "127.0.0.1:x",
            "host:99999",
            "a:b:c",
        ] {
            assert!(resolve(bad, 7654).is_err(), "{bad}");
        }
    }
}
