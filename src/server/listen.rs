//! Where the listening sockets come from, and the options every accepted socket gets.
//!
//! Under systemd socket activation the sockets arrive as inherited descriptors (LISTEN_FDS) and
//! we serve exactly those; otherwise we bind `--listen` addresses ourselves.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, ToSocketAddrs};
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

/// The listening sockets systemd passed us, if any. A passed descriptor that is not a listening
/// TCP socket is an error in the unit file, reported rather than ignored.
pub fn from_systemd() -> Result<Vec<TcpListener>, String> {
    let mut fds = listenfd::ListenFd::from_env();
    let mut listeners = Vec::with_capacity(fds.len());
    for i in 0..fds.len() {
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
    Ok(listeners)
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
