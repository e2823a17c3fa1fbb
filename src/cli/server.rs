//! `tcpnetlock server`: flags, listening sockets, logging, then serve forever.

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use clap::builder::RangedU64ValueParser;
use log::{LevelFilter, info, warn};

use crate::log::Target;
use crate::server::config::EtcdSettings;
use crate::server::listen::{self, Keepalive};
use crate::server::{self, Config, Server, handover, lifecycle};

use super::{EXIT_FAILURE, EXIT_USAGE, Fail, parse_secs};

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Address to listen on: HOST, HOST:PORT, IP or [IPv6]:PORT (repeatable). Ignored when
    /// systemd passes listening sockets (socket activation).
    #[arg(short, long, value_name = "HOST[:PORT]", default_value = "127.0.0.1")]
    listen: Vec<String>,

    /// Port for --listen values that have none.
    #[arg(short, long, default_value_t = 7654)]
    port: u16,

    /// Open connections allowed at once (1 to 1000000); past it, new clients get
    /// `err,too many connections`.
    #[arg(long, value_name = "N", default_value_t = Config::default().max_connections,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_CONNECTIONS))]
    max_connections: usize,

    /// Open connections allowed at once from one client address (1 to 1000000); past it, that
    /// address gets `err,too many connections from your address`. Off by default: behind NAT, a
    /// load balancer or a Kubernetes Service every client may share one address.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_connections_per_peer: Option<u32>,

    /// Longest request line in bytes (16 to 1048576), without its line ending; longer gets
    /// `bad-request`.
    #[arg(long, value_name = "BYTES", default_value_t = Config::default().max_line,
          value_parser = RangedU64ValueParser::<usize>::new().range(16..=MAX_LINE))]
    max_line_length: usize,

    /// Longest lock name (1 to 1048576).
    #[arg(long, value_name = "N", default_value_t = Config::default().max_name_len,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_LINE))]
    max_name_length: usize,

    /// Seconds a new connection has to send its first complete request (0.001 to 86400).
    #[arg(long, value_name = "SECS", default_value = "10",
          value_parser = secs_between(Duration::from_millis(1), MAX_REQUEST_TIMEOUT))]
    request_timeout: Duration,

    /// Longest idle seconds before TCP keepalive probes a connection (1 to 32767) [default: 20]:
    /// each holder gets its own, from a quarter of it to all of it; 0 turns keepalive off. A
    /// vanished peer is dropped within time + interval × probes (default 40 s).
    /// Without these flags, sockets passed by systemd with KeepAlive=yes keep the unit's timings.
    #[arg(long, value_name = "SECS",
          value_parser = whole_secs_between(0, MAX_KEEPALIVE_SECS))]
    keepalive_time: Option<u64>,

    /// Seconds between TCP keepalive probes (1 to 32767) [default: 5].
    #[arg(long, value_name = "SECS",
          value_parser = whole_secs_between(1, MAX_KEEPALIVE_SECS))]
    keepalive_interval: Option<u64>,

    /// Unanswered TCP keepalive probes before the connection is dropped (1 to 127) [default: 4].
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=MAX_KEEPALIVE_PROBES))]
    keepalive_probes: Option<u32>,

    /// Directory for state kept across restarts: the fencing-token reservation, so tokens keep
    /// growing even if the clock steps back (systemd: StateDirectory=).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<std::path::PathBuf>,

    /// Cluster mode: keep the lock state in etcd, shared by every server given the same etcd
    /// and prefix (etcd v3 client URLs, http:// or https://, comma-separated). A server that
    /// cannot reach etcd starts anyway and grants nothing (`tcpnetlock ping` exits 1, the
    /// systemd status says why) until it can.
    #[arg(long, value_name = "URL[,URL...]", env = "TCPNETLOCK_ETCD", value_delimiter = ',',
          value_parser = parse_endpoint, help_heading = CLUSTER)]
    etcd: Vec<String>,

    /// Prefix of every etcd key the cluster writes: servers with another prefix are another
    /// lock space.
    #[arg(long, value_name = "PREFIX", default_value = DEFAULT_PREFIX, value_parser = parse_prefix,
          requires = "etcd", help_heading = CLUSTER)]
    etcd_prefix: String,

    /// This server's etcd lease ttl, whole seconds (2 to 60): if the server dies, its locks are
    /// freed within about this long; a server cut off from etcd ends its holders' connections
    /// before it runs out. Client `ttl:`s are bounded by about 2/3 of it.
    #[arg(long, value_name = "SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(2..=60), requires = "etcd",
          help_heading = CLUSTER)]
    etcd_ttl: u64,

    /// This server's name in every server's `.locks` and `.stats` (letters, digits, '.', '_',
    /// '-'; at most 64) [default: the host name].
    #[arg(long, value_name = "NAME", value_parser = parse_member_name, requires = "etcd",
          help_heading = CLUSTER)]
    etcd_name: Option<String>,

    /// CA certificates (PEM) that signed the etcd members' certificates, as etcdctl --cacert
    /// [default for https: the system's CA bundle].
    #[arg(long, value_name = "FILE", requires = "etcd", help_heading = CLUSTER)]
    etcd_cacert: Option<PathBuf>,

    /// Client certificate (PEM) for etcd, as etcdctl --cert; needs --etcd-key.
    #[arg(long, value_name = "FILE", requires_all = ["etcd", "etcd_key"], help_heading = CLUSTER)]
    etcd_cert: Option<PathBuf>,

    /// The client certificate's private key (PEM), as etcdctl --key.
    #[arg(long, value_name = "FILE", requires_all = ["etcd", "etcd_cert"], help_heading = CLUSTER)]
    etcd_key: Option<PathBuf>,

    /// etcd user, when etcd's authentication is on; needs a password.
    #[arg(long, value_name = "USER", value_parser = parse_credential, requires = "etcd",
          help_heading = CLUSTER)]
    etcd_user: Option<String>,

    /// The etcd user's password (better given in the environment than on the command line,
    /// where other users can read it).
    #[arg(long, value_name = "PASSWORD", env = "TCPNETLOCK_ETCD_PASSWORD", hide_env_values = true,
          value_parser = parse_credential, requires = "etcd_user", help_heading = CLUSTER)]
    etcd_password: Option<String>,

    /// Obey `.server-shutdown`, from loopback peers only. Without this flag it is refused.
    #[arg(long)]
    allow_shutdown_from_loopback: bool,

    /// Where to log: auto (syslog if /dev/log exists, else stderr), stderr, syslog, syslog:PATH.
    #[arg(long, value_name = "TARGET", default_value = "auto")]
    log: Target,

    /// More log detail (-v debug, -vv trace).
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,

    /// Less log detail (-q warnings, -qq errors only).
    #[arg(short, long, action = clap::ArgAction::Count, conflicts_with = "verbose")]
    quiet: u8,

    /// Same as the default level (accepted for tcpnetlock 0.1.8 compatibility).
    #[arg(long, hide = true)]
    info: bool,

    /// Same as -v (accepted for tcpnetlock 0.1.8 compatibility).
    #[arg(long, hide = true)]
    debug: bool,
}

impl ServerArgs {
    fn level(&self) -> LevelFilter {
        if self.debug {
            return LevelFilter::Debug;
        }
        match (self.verbose, self.quiet) {
            (0, 0) => LevelFilter::Info,
            (1, _) => LevelFilter::Debug,
            (_, 0) => LevelFilter::Trace,
            (_, 1) => LevelFilter::Warn,
            (_, _) => LevelFilter::Error,
        }
    }

    /// The server's configuration; every value is already within its bounds (the flags'
    /// parsers check them).
    fn config(&self) -> Config {
        let defaults = server::config::DEFAULT_KEEPALIVE;
        let time = self
            .keepalive_time
            .map_or(defaults.time, Duration::from_secs);
        let interval = self
            .keepalive_interval
            .map_or(defaults.interval, Duration::from_secs);
        let probes = self.keepalive_probes.unwrap_or(defaults.probes);
        let keepalive = (!time.is_zero()).then_some(Keepalive {
            time,
            interval,
            probes,
        });
        let keepalive_from_flags = self.keepalive_time.is_some()
            || self.keepalive_interval.is_some()
            || self.keepalive_probes.is_some();
        Config {
            max_connections: self.max_connections,
            max_connections_per_peer: self.max_connections_per_peer.map(|n| n as usize),
            max_line: self.max_line_length,
            max_name_len: self.max_name_length,
            request_timeout: self.request_timeout,
            keepalive,
            keepalive_from_flags,
            allow_shutdown: self.allow_shutdown_from_loopback,
            state_dir: self.state_dir.clone(),
            etcd: self.etcd_settings(),
        }
    }

    fn etcd_settings(&self) -> Option<EtcdSettings> {
        if self.etcd.is_empty() {
            return None;
        }
        Some(EtcdSettings {
            endpoints: self.etcd.clone(),
            prefix: self.etcd_prefix.clone(),
            ttl: Duration::from_secs(self.etcd_ttl),
            name: self.etcd_name.clone().unwrap_or_else(host_name),
            ca_file: self.etcd_cacert.clone(),
            cert_file: self.etcd_cert.clone(),
            key_file: self.etcd_key.clone(),
            user: self.etcd_user.clone(),
            password: self.etcd_password.clone(),
        })
    }
}

const CLUSTER: &str = "Cluster mode (etcd)";
const DEFAULT_PREFIX: &str = "/tcpnetlock/";
/// The most etcd endpoints, and the longest endpoint, prefix and credential: far beyond any real
/// cluster, and bounded so that a mistake is a clear error rather than a strange one.
const MAX_ENDPOINTS: usize = 64;
const MAX_FIELD: usize = 1024;

/// One etcd client URL; its form is checked when the client is made (scheme, host, no path).
fn parse_endpoint(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err(
            "an empty etcd endpoint (expected http://HOST:PORT or https://HOST:PORT)".into(),
        );
    }
    if text.len() > MAX_FIELD || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{text:?} is not an etcd client URL (expected http://HOST:PORT or https://HOST:PORT)"
        ));
    }
    Ok(text.to_owned())
}

/// Printable, no spaces, at most 1024 bytes.
fn parse_prefix(text: &str) -> Result<String, String> {
    if text.is_empty() || text.len() > MAX_FIELD || !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{text:?}: expected 1 to {MAX_FIELD} printable ASCII characters without spaces, such \
             as {DEFAULT_PREFIX}"
        ));
    }
    Ok(text.to_owned())
}

fn valid_member_name(text: &str) -> bool {
    (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn parse_member_name(text: &str) -> Result<String, String> {
    if !valid_member_name(text) {
        return Err(format!(
            "{text:?}: expected 1 to 64 letters, digits, '.', '_' or '-'"
        ));
    }
    Ok(text.to_owned())
}

fn parse_credential(text: &str) -> Result<String, String> {
    if text.is_empty() || text.len() > MAX_FIELD {
        return Err(format!("expected 1 to {MAX_FIELD} bytes"));
    }
    Ok(text.to_owned())
}

/// The host name as a member name: what `--etcd-name` defaults to. Characters a name cannot
/// have become '-'.
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let raw = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    let name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if valid_member_name(&name) {
        name
    } else {
        "tcpnetlock".into()
    }
}

/// The largest `--max-connections`. Each connection is a descriptor, and the kernel caps a
/// process's descriptors at fs.nr_open (1048576 by default): more could never be open.
const MAX_CONNECTIONS: u64 = 1_000_000;
/// The largest `--max-line-length` and `--max-name-length`. Each connection allocates a buffer
/// of the line length when it connects, and a request is an action, a name and a few short
/// parameters: 1 MiB is far beyond any real request and still a bounded cost per connection.
const MAX_LINE: u64 = 1 << 20;
/// The longest `--request-timeout`: a day. A client that needs longer to send one line is gone.
const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// The kernel's limits for TCP_KEEPIDLE and TCP_KEEPINTVL (seconds) and TCP_KEEPCNT: larger
/// values are refused with EINVAL when the listening socket is set up. Whole seconds, as the
/// kernel counts them.
const MAX_KEEPALIVE_SECS: u64 = 32767;
const MAX_KEEPALIVE_PROBES: i64 = 127;

/// A parser for whole seconds from `min` to `max`.
fn whole_secs_between(
    min: u64,
    max: u64,
) -> impl Fn(&str) -> Result<u64, String> + Clone + Send + Sync + 'static {
    move |text| {
        text.trim()
            .parse()
            .ok()
            .filter(|s| (min..=max).contains(s))
            .ok_or_else(|| format!("expected whole seconds from {min} to {max}"))
    }
}

/// A parser for seconds (`10`, `0.5`) from `min` to `max`.
fn secs_between(
    min: Duration,
    max: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |text| {
        let d = parse_secs(text)?;
        if d < min || d > max {
            return Err(format!(
                "{text} is not in {}..={} seconds",
                min.as_secs_f64(),
                max.as_secs_f64()
            ));
        }
        Ok(d)
    }
}

/// A server to run: what `tcpnetlock server` and the `tcpnetlock_server` drop-in decide from
/// their flags.
pub struct Settings {
    pub config: Config,
    /// `--listen` values, each with or without a port; `port` fills in a missing one.
    pub listen: Vec<String>,
    pub port: u16,
    pub log: Target,
    pub level: LevelFilter,
}

impl ServerArgs {
    pub fn settings(&self) -> Settings {
        Settings {
            config: self.config(),
            listen: self.listen.clone(),
            port: self.port,
            log: self.log.clone(),
            level: self.level(),
        }
    }
}

pub fn run(settings: Settings) -> Result<(), Fail> {
    let Settings {
        config,
        listen,
        port,
        log,
        level,
    } = settings;
    // Before any thread starts, so that every thread inherits the mask.
    lifecycle::block_signals().map_err(|e| {
        Fail::new(
            EXIT_FAILURE,
            &format!("cannot block the signals that stop the server: {e}"),
        )
    })?;
    // SAFETY: no other thread runs yet (the log's starts next).
    let inherited = unsafe { handover::Inherited::from_exec() };
    crate::log::init(log, level).map_err(|e| Fail::new(EXIT_USAGE, &e))?;
    server::fdlimit::raise_fd_limit();
    handover::remember_start();
    let mut inherited = inherited.unwrap_or_else(|e| {
        warn!("{e}: starting without what the previous program handed over");
        handover::Inherited::default()
    });
    let (listeners, passed, kept) = match inherited.listeners.take() {
        Some((listeners, passed)) if !listeners.is_empty() => (listeners, passed, true),
        _ => {
            let (listeners, passed, stored) = listeners(&listen, port)?;
            inherited.add_stored(stored);
            (listeners, passed, false)
        }
    };
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().map_or("?".into(), |a| a.to_string()))
        .collect();
    if let Some(etcd) = &config.etcd {
        if etcd.endpoints.len() > MAX_ENDPOINTS {
            return Err(Fail::new(
                EXIT_USAGE,
                &format!(
                    "--etcd: {} endpoints given, at most {MAX_ENDPOINTS} are taken",
                    etcd.endpoints.len()
                ),
            ));
        }
        if etcd.ttl < Duration::from_secs(5) {
            warn!(
                "--etcd-ttl {} s: etcd treats lease ttls under 5 s as a hint (an election can \
                 take longer); a server may stop serving on a slow etcd",
                etcd.ttl.as_secs()
            );
        }
        if config.state_dir.is_some() {
            warn!("--state-dir is not used with --etcd: fencing tokens come from etcd revisions");
        }
    }
    let server = Server::new(config).map_err(|e| Fail::new(EXIT_USAGE, &e))?;
    let resumed = handover::take_over(&server, inherited);
    server.start(listeners, passed).map_err(|e| {
        Fail::new(
            EXIT_FAILURE,
            &format!("cannot start the server's threads: {e}"),
        )
    })?;
    handover::start(&server, resumed);
    // Logged once every thread runs: tests and operators may take this line as "ready".
    for addr in addrs {
        if kept {
            info!("serving {addr} (socket kept across the re-exec)");
        } else if passed {
            info!("serving {addr} (socket passed by systemd)");
        } else {
            info!("listening on {addr}");
        }
    }
    lifecycle::run(server)
}

/// The sockets to serve, whether systemd passed them, and what it passed from the unit's fd
/// store (a previous process's hand-over).
type Listeners = (Vec<TcpListener>, bool, listen::Stored);

fn listeners(listen: &[String], port: u16) -> Result<Listeners, Fail> {
    let (passed, stored) = listen::from_systemd(&[handover::FDNAME_STATE, handover::FDNAME_CONNS])
        .map_err(|e| Fail::new(EXIT_USAGE, &e))?;
    if !passed.is_empty() {
        return Ok((passed, true, stored));
    }
    let mut bound = Vec::new();
    for text in listen {
        let addrs = listen::resolve(text, port).map_err(|e| Fail::new(EXIT_USAGE, &e))?;
        let literal = addrs.len() == 1;
        let mut any = false;
        for addr in &addrs {
            match listen::bind(*addr, 4096) {
                Ok(l) => {
                    bound.push(l);
                    any = true;
                }
                // A name such as `localhost` may resolve to an address family the host lacks;
                // it fails only if none of its addresses can be bound.
                Err(e) if !literal => warn!("cannot bind {addr} (from --listen {text}): {e}"),
                Err(e) => return Err(bind_failure(addr, &e)),
            }
        }
        if !any {
            return Err(Fail::new(
                EXIT_USAGE,
                &format!("cannot bind any address of --listen {text}"),
            ));
        }
    }
    Ok((bound, false, stored))
}

fn bind_failure(addr: &std::net::SocketAddr, e: &std::io::Error) -> Fail {
    let hint = match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            " (is another tcpnetlock running? see `systemctl status tcpnetlock.socket`)"
        }
        std::io::ErrorKind::PermissionDenied => " (ports below 1024 need privileges)",
        std::io::ErrorKind::AddrNotAvailable => " (no local interface has this address)",
        _ => "",
    };
    Fail::new(EXIT_USAGE, &format!("cannot bind {addr}: {e}{hint}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        args: ServerArgs,
    }

    /// The flags' defaults are the server's (the drop-in server uses `Config::default()`).
    #[test]
    fn flag_defaults_are_the_config_defaults() {
        let args = Command::try_parse_from(["server"]).unwrap().args;
        assert_eq!(args.config(), Config::default());
    }
}
