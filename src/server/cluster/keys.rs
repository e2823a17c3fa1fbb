//! Where a cluster keeps its lock state in etcd, and what each key says.
//!
//! Under the prefix P (`--etcd-prefix`, `/tcpnetlock/` by default):
//!
//! - `P/locks/<name>/<member>/<conn>`: one key per `lock` request, holder or waiter, written with
//!   the member's etcd lease. `<member>` is that lease's id in hex (unique per lease, so per
//!   start of a server), `<conn>` the connection's number in that server. The order of a name's
//!   keys is their create revision; the value only describes the request (for `.locks`, and the
//!   `max`/`shared` the queue rule needs).
//! - `P/token-offset`: written once, by the first member ever to start, with the wall clock in
//!   microseconds. A fencing token is this offset plus an etcd revision.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::table::ConnId;
use crate::table::queue::Entry;

/// The key names under one prefix.
#[derive(Debug, Clone)]
pub struct Layout {
    /// `P/locks/`.
    locks: String,
    offset: String,
}

impl Layout {
    /// `prefix` as given; a missing trailing `/` is added, so that `/a` and `/ab` never share
    /// keys.
    pub fn new(prefix: &str) -> Layout {
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Layout {
            locks: format!("{prefix}locks/"),
            offset: format!("{prefix}token-offset"),
        }
    }

    /// Every lock key starts with this.
    pub fn locks(&self) -> &str {
        &self.locks
    }

    /// Every key of `name` starts with this.
    pub fn name(&self, name: &str) -> String {
        format!("{}{name}/", self.locks)
    }

    pub fn key(&self, name: &str, member: i64, conn: ConnId) -> String {
        format!("{}{name}/{}/{}", self.locks, member_id(member), conn.0)
    }

    pub fn offset(&self) -> &str {
        &self.offset
    }

    /// The parts of a lock key: its name, and the member and connection that wrote it. `None`
    /// for a key under `P/locks/` that no member wrote (it is then no part of any name).
    pub fn parse<'k>(&self, key: &'k [u8]) -> Option<KeyParts<'k>> {
        let rest = key.strip_prefix(self.locks.as_bytes())?;
        let rest = std::str::from_utf8(rest).ok()?;
        let mut parts = rest.split('/');
        let (name, member, conn) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || name.is_empty() || member.is_empty() {
            return None;
        }
        Some(KeyParts {
            name,
            member,
            conn: conn.parse().ok().map(ConnId),
        })
    }
}

/// What a lock key's name says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyParts<'k> {
    pub name: &'k str,
    /// The writer's lease id, in hex.
    pub member: &'k str,
    pub conn: Option<ConnId>,
}

/// A member's id as it appears in its keys.
pub fn member_id(lease: i64) -> String {
    format!("{lease:x}")
}

/// A lock key's value: the request, as `.locks` on any member shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Value {
    pub max: u32,
    pub shared: bool,
    pub client_id: Option<String>,
    /// The client's address, as the member saw it.
    pub peer: Option<String>,
    /// The member's name (`--etcd-name`).
    pub server: Option<String>,
    pub ttl_secs: Option<f64>,
    /// Wall clock (ms since the epoch) when the member received the request.
    pub asked_unix_ms: u64,
    /// When the wait runs out, for a waiter.
    pub wait_until_unix_ms: Option<u64>,
    /// When a waiter was granted (absent for a request granted at once: then `asked_unix_ms`).
    pub granted_unix_ms: Option<u64>,
}

impl Value {
    /// The value of a key found in etcd. One that no member wrote (unreadable) counts as an
    /// exclusive request with max 1: it blocks the name rather than let two holders in.
    pub fn read(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap_or(Value {
            max: 1,
            ..Value::default()
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serializing a key's value cannot fail")
    }

    pub fn entry(&self) -> Entry {
        Entry {
            max: self.max.max(1),
            shared: self.shared,
        }
    }
}

/// The wall clock in milliseconds since the epoch (0 if it is set before 1970).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The wall clock in microseconds since the epoch.
pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let layout = Layout::new("/tnl");
        assert_eq!(layout.locks(), "/tnl/locks/");
        assert_eq!(layout.offset(), "/tnl/token-offset");
        let key = layout.key("deploy", 0x694d_7c2a_11f0, ConnId(42));
        assert_eq!(key, "/tnl/locks/deploy/694d7c2a11f0/42");
        assert_eq!(
            layout.parse(key.as_bytes()),
            Some(KeyParts {
                name: "deploy",
                member: "694d7c2a11f0",
                conn: Some(ConnId(42)),
            })
        );
        assert_eq!(layout.name("deploy"), "/tnl/locks/deploy/");
        for foreign in [
            "/tnl/locks/deploy",
            "/tnl/locks/a/b/c/d",
            "/other/locks/a/b/1",
        ] {
            assert_eq!(layout.parse(foreign.as_bytes()), None, "{foreign}");
        }
        assert_eq!(
            Layout::new("/tnl/")
                .parse(b"/tnl/locks/a/b/x")
                .map(|p| p.conn),
            Some(None)
        );
    }

    #[test]
    fn values_round_trip_and_garbage_blocks() {
        let v = Value {
            max: 3,
            shared: false,
            client_id: Some("ci-7".into()),
            peer: Some("127.0.0.1:5000".into()),
            server: Some("tnl-a".into()),
            ttl_secs: Some(2.5),
            asked_unix_ms: 1_764_154_800_123,
            wait_until_unix_ms: None,
            granted_unix_ms: None,
        };
        assert_eq!(Value::read(&v.to_bytes()), v);
        let garbage = Value::read(b"not json");
        assert_eq!(
            garbage.entry(),
            Entry {
                max: 1,
                shared: false
            }
        );
    }
}
