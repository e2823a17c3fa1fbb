//! What the operator can tune: one field per `tcpnetlock server` flag, with the defaults the
//! README documents.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::listen::Keepalive;

/// Everything the operator can tune; each field is a `tcpnetlock server` flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub max_connections: usize,
    /// Open connections allowed at once from one address; `None`: no limit of its own.
    pub max_connections_per_peer: Option<usize>,
    pub max_line: usize,
    pub max_name_len: usize,
    pub request_timeout: Duration,
    pub keepalive: Option<Keepalive>,
    /// Whether `keepalive` came from flags. If not, sockets passed by systemd with their own
    /// keepalive settings (`KeepAlive=yes` in the socket unit) keep them.
    pub keepalive_from_flags: bool,
    pub allow_shutdown: bool,
    /// Where the fencing-token reservation is kept across restarts (see [`super::tokens`]).
    pub state_dir: Option<std::path::PathBuf>,
    /// Cluster mode: lock state in etcd (`--etcd`); `None` keeps it in memory.
    pub etcd: Option<EtcdSettings>,
}

/// How a cluster member reaches etcd and names itself; one field per `--etcd-*` flag.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdSettings {
    /// Client URLs, `http://HOST:PORT` or `https://HOST:PORT`.
    pub endpoints: Vec<String>,
    /// Every key the cluster writes starts with it.
    pub prefix: String,
    /// The member's etcd lease ttl.
    pub ttl: Duration,
    /// How `.locks` on every member names this one.
    pub name: String,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<String>,
}

/// Without the password: settings end up in logs and test failures.
impl fmt::Debug for EtcdSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdSettings")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .field("name", &self.name)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

/// TCP keepalive unless flags or the systemd socket unit say otherwise: a vanished peer is
/// dropped within 20 + 4 × 5 = 40 s.
pub const DEFAULT_KEEPALIVE: Keepalive = Keepalive {
    time: Duration::from_secs(20),
    interval: Duration::from_secs(5),
    probes: 4,
};

/// The defaults of the flags (the flags' own defaults are these: see the test in cli/server.rs).
impl Default for Config {
    fn default() -> Config {
        Config {
            max_connections: 10_000,
            max_connections_per_peer: None,
            max_line: 1024,
            max_name_len: tcpnetlock::protocol::DEFAULT_MAX_NAME_LEN,
            request_timeout: Duration::from_secs(10),
            keepalive: Some(DEFAULT_KEEPALIVE),
            keepalive_from_flags: false,
            allow_shutdown: false,
            state_dir: None,
            etcd: None,
        }
    }
}
