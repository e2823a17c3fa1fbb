//! What can go wrong talking to etcd, sorted by what the caller can conclude.
//!
//! The split that matters for a lock server is whether a write *might have been applied*:
//! [`EtcdError::OutcomeUnknown`] says "maybe" and is the only variant that does. Every other
//! variant means etcd did not apply the request (or the request was a read, which changes
//! nothing), so the caller may retry it or answer its own client with an error.

use std::fmt;

/// One endpoint's last failure during a call, kept so an error can say what happened where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointFailure {
    pub endpoint: String,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EtcdError {
    /// The configuration cannot work (bad URL, unreadable certificate, ...); nothing was sent.
    Config(String),
    /// No endpoint accepted a connection before the deadline: nothing was sent.
    Unreachable { failures: Vec<EndpointFailure> },
    /// The deadline passed and no endpoint answered. Only returned when the request could not
    /// have been applied: it was never sent, or it changes nothing (reads, lease renewals).
    Timeout { failures: Vec<EndpointFailure> },
    /// Every member that answered said it has no leader: quorum is lost or an election is under
    /// way. etcd rejected the request before proposing it, so nothing was applied.
    NoLeader { failures: Vec<EndpointFailure> },
    /// A write was sent and no answer came back (timeout, connection lost, or etcd itself said the
    /// proposal timed out): it may or may not have been applied, now or later. Never retried by
    /// this client; the caller must find out (for example by reading the key it wrote).
    OutcomeUnknown { endpoint: String, cause: String },
    /// etcd answered with an error of its own (a gRPC status code and message).
    Etcd {
        endpoint: String,
        code: i32,
        message: String,
    },
    /// The user name or password was refused, or the user lacks permission.
    Auth { endpoint: String, message: String },
    /// The lease does not exist (any more): it expired or was revoked.
    LeaseNotFound { id: i64 },
    /// A watch asked for history etcd has compacted away: changes were lost. Re-read the state
    /// and watch again from the read's revision + 1. (etcd 3.4 creates such a watch and then
    /// ends it: that arrives as [`super::WatchMessage::Compacted`] instead.)
    Compacted { compact_revision: i64 },
    /// etcd refused or ended a watch for a reason of its own.
    WatchCanceled { endpoint: String, reason: String },
    /// The endpoint answered something that is not etcd's JSON gateway.
    Protocol { endpoint: String, detail: String },
}

impl EtcdError {
    /// True when etcd did not apply the request, so sending it again cannot apply it twice.
    pub fn not_applied(&self) -> bool {
        !matches!(self, EtcdError::OutcomeUnknown { .. })
    }
}

fn list(f: &mut fmt::Formatter<'_>, failures: &[EndpointFailure]) -> fmt::Result {
    for (i, failure) in failures.iter().enumerate() {
        let sep = if i == 0 { ": " } else { "; " };
        write!(f, "{sep}{}: {}", failure.endpoint, failure.reason)?;
    }
    Ok(())
}

impl fmt::Display for EtcdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EtcdError::Config(msg) => write!(f, "etcd configuration: {msg}"),
            EtcdError::Unreachable { failures } => {
                write!(f, "cannot reach any etcd endpoint")?;
                list(f, failures)?;
                write!(
                    f,
                    " (is etcd running, are these its client URLs, and do the certificates match?)"
                )
            }
            EtcdError::Timeout { failures } => {
                write!(f, "etcd did not answer in time")?;
                list(f, failures)
            }
            EtcdError::NoLeader { failures } => {
                write!(f, "etcd has no leader (quorum lost or election under way)")?;
                list(f, failures)?;
                write!(
                    f,
                    " (more than half of the members must be up and reach each other)"
                )
            }
            EtcdError::OutcomeUnknown { endpoint, cause } => write!(
                f,
                "etcd at {endpoint}: write outcome unknown ({cause}): it may or may not have \
                 been applied"
            ),
            EtcdError::Etcd {
                endpoint,
                code,
                message,
            } => {
                write!(f, "etcd at {endpoint}: {message} (code {code})")?;
                if message.contains("user name is empty") {
                    write!(
                        f,
                        " (this etcd requires authentication: give a user and password)"
                    )?;
                }
                Ok(())
            }
            EtcdError::Auth { endpoint, message } => {
                write!(f, "etcd at {endpoint}: authentication: {message}")
            }
            EtcdError::LeaseNotFound { id } => {
                write!(f, "etcd lease {id:x} not found (expired or revoked)")
            }
            EtcdError::Compacted { compact_revision } => write!(
                f,
                "etcd has compacted its history up to revision {compact_revision}: read the \
                 current state and watch again from there"
            ),
            EtcdError::WatchCanceled { endpoint, reason } => {
                write!(f, "etcd at {endpoint} canceled the watch: {reason}")
            }
            EtcdError::Protocol { endpoint, detail } => write!(
                f,
                "etcd at {endpoint}: unexpected answer: {detail} (is this an etcd client URL, \
                 etcd 3.4 or newer?)"
            ),
        }
    }
}

impl std::error::Error for EtcdError {}
