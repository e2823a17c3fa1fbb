//! What a request can end with other than success, as types a program can match on: the
//! outcomes a caller acts on differently (refused, semaphore size disagreed, no answer in time,
//! lock lost, bad argument) are variants of their own rather than text inside an `Io` or
//! `Server` error.

use std::fmt;
use std::io;
use std::time::Duration;

use crate::protocol::{MAX_HOLDERS, MAX_SECONDS};

/// Everything a request can end with other than success.
///
/// ```
/// use tcpnetlock::client::{Client, Error};
///
/// // A port nobody listens on.
/// let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
/// match Client::new("127.0.0.1", port).try_lock("nightly-report") {
///     Err(Error::Refused { server }) => assert_eq!(server, format!("127.0.0.1:{port}")),
///     Err(Error::NotGranted) => println!("someone else is on it"),
///     other => panic!("{other:?}"),
/// }
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// An argument the server would refuse, or that cannot work; found before connecting, so
    /// nothing was sent.
    InvalidArgument(InvalidArgument),
    /// Nothing listens at the server's address.
    Refused {
        /// `host:port`, as [`Client::server`](super::Client::server) writes it.
        server: String,
    },
    /// The server could not be reached: unknown host, unreachable network, connect timeout.
    Connect {
        /// `host:port`, as [`Client::server`](super::Client::server) writes it.
        server: String,
        /// What the system said.
        source: io::Error,
    },
    /// Somebody else holds the lock (and the wait, if any, ran out).
    NotGranted,
    /// The name is held as a semaphore of another size: everyone using a name must ask with the
    /// same [`max`](super::LockBuilder::max). The server's `err,max mismatch: NAME is held with
    /// max:K`.
    MaxMismatch {
        /// The `max` the name is held with.
        held_max: u32,
    },
    /// The server did not answer in time: no reply line within the reply timeout (plus the
    /// wait, for a lock), or a request could not be written for as long. Nothing is known of
    /// the request's fate; the connection has been given up, which frees a lock the server may
    /// have granted meanwhile.
    Timeout {
        /// How long the client waited.
        after: Duration,
    },
    /// The server refused the request with an `err,` line; this is its message.
    Server(String),
    /// The server said something this client does not understand, or hung up without a reply.
    Protocol(String),
    /// Reading or writing an established connection failed.
    Io(io::Error),
    /// The lock was lost before it was released.
    Lost(Lost),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(what) => what.fmt(f),
            Error::Refused { server } => write!(
                f,
                "cannot connect to {server}: connection refused (is the server running?)"
            ),
            Error::Connect { server, source } => write!(f, "cannot connect to {server}: {source}"),
            Error::NotGranted => f.write_str("not granted: the lock is held by another client"),
            Error::MaxMismatch { held_max } => write!(
                f,
                "max mismatch: the name is held with max:{held_max} (everyone using a name must \
                 ask with the same max)"
            ),
            Error::Timeout { after } => write!(
                f,
                "no reply from the server within {after:?} (is it overloaded, or the network \
                 stalled?)"
            ),
            Error::Server(msg) => write!(f, "the server refused the request: {msg}"),
            Error::Protocol(msg) => write!(f, "protocol error: {msg}"),
            Error::Io(e) => write!(f, "connection to the server failed: {e}"),
            Error::Lost(lost) => write!(f, "lock lost: {lost}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Connect { source, .. } | Error::Io(source) => Some(source),
            _ => None,
        }
    }
}

impl From<InvalidArgument> for Error {
    fn from(e: InvalidArgument) -> Error {
        Error::InvalidArgument(e)
    }
}

/// An argument refused before anything is sent: what the server would refuse, and what cannot
/// work at all (a zero timeout). Each variant holds the value given.
///
/// ```
/// use std::time::Duration;
/// use tcpnetlock::client::{Client, Error, InvalidArgument};
///
/// let client = Client::new("localhost", 7654);
/// match client.request("reports").shared(true).max(3).take() {
///     Err(Error::InvalidArgument(InvalidArgument::SharedWithMax(3))) => {}
///     other => panic!("{other:?}"),
/// }
/// let e = client.lock("reports", Duration::from_secs(8 * 24 * 3600)).unwrap_err();
/// assert_eq!(
///     e.to_string(),
///     "invalid wait 691200s: expected at most 604800 s (a week)"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidArgument {
    /// A lock name that is not `[A-Za-z0-9_-]+`.
    Name(String),
    /// A client id that is not `[A-Za-z0-9.@_-]{1,128}`.
    ClientId(String),
    /// A semaphore size of 0 or above 65535.
    Max(u32),
    /// A lease of 0 or longer than a week.
    Ttl(Duration),
    /// A wait longer than a week.
    Wait(Duration),
    /// Shared mode with a semaphore size other than 1: a shared lock has any number of holders.
    SharedWithMax(u32),
    /// A renewal interval of 0 or longer than a week.
    RenewEvery(Duration),
    /// A connect timeout of 0 or longer than a week.
    ConnectTimeout(Duration),
    /// A reply timeout of 0 or longer than a week.
    ReplyTimeout(Duration),
}

impl fmt::Display for InvalidArgument {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let week = || format!("{MAX_SECONDS} s (a week)");
        let positive = |f: &mut fmt::Formatter<'_>, what: &str, d: &Duration| {
            write!(
                f,
                "invalid {what} {d:?}: expected above 0, at most {}",
                week()
            )
        };
        match self {
            InvalidArgument::Name(name) => write!(
                f,
                "invalid lock name {name:?}: use letters, digits, '_' and '-'"
            ),
            InvalidArgument::ClientId(id) => write!(
                f,
                "invalid client id {id:?}: use letters, digits, '.', '@', '_' and '-' (at most 128)"
            ),
            InvalidArgument::Max(k) => write!(f, "invalid max {k}: expected 1 to {MAX_HOLDERS}"),
            InvalidArgument::Ttl(d) => positive(f, "ttl", d),
            InvalidArgument::Wait(d) => {
                write!(f, "invalid wait {d:?}: expected at most {}", week())
            }
            InvalidArgument::SharedWithMax(k) => write!(
                f,
                "invalid max {k} for a shared lock: a shared lock has any number of holders \
                 (leave max out)"
            ),
            InvalidArgument::RenewEvery(d) => positive(f, "renewal interval", d),
            InvalidArgument::ConnectTimeout(d) => positive(f, "connect timeout", d),
            InvalidArgument::ReplyTimeout(d) => positive(f, "reply timeout", d),
        }
    }
}

/// Why a held lock is no longer held.
///
/// ```no_run
/// use tcpnetlock::client::{Client, Lost};
///
/// let lock = Client::new("localhost", 7654).try_lock("deploy")?;
/// match lock.wait_lost(None) {
///     Some(Lost::Closed) => eprintln!("the server went away: stop deploying"),
///     Some(why) => eprintln!("lock lost: {why}"),
///     None => unreachable!("no timeout was given"),
/// }
/// # Ok::<(), tcpnetlock::client::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Lost {
    /// The lease ran out: the server wrote `expired`.
    Expired,
    /// The server closed the connection: it was restarted or stopped, or dropped this client.
    Closed,
    /// The connection failed: reset, or the server stopped answering (host or network gone).
    Broken(String),
    /// A lease ([`LockBuilder::ttl`](super::LockBuilder::ttl)) whose renewals the server has
    /// not answered for the ttl less the [`lease_margin`](super::lease_margin): the network or
    /// the server stalled, and the server may revoke the lease at any moment now. Counted on
    /// the client's own clock, so it is known even when no byte arrives at all.
    LeaseUnconfirmed,
}

impl fmt::Display for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lost::Expired => f.write_str("the lease expired"),
            Lost::Closed => f.write_str("the server closed the connection (restarted or stopped?)"),
            Lost::Broken(e) => write!(f, "the connection to the server failed: {e}"),
            Lost::LeaseUnconfirmed => f.write_str(
                "the server answered no lease renewal within the ttl (network or server stalled?)",
            ),
        }
    }
}
