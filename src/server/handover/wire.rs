//! The state handed to the next process, and its format.
//!
//! Binary, little-endian, every variable part preceded by its length: a magic line, the format's
//! version (u32), then the body of that version. A reader of version N reads exactly the
//! versions in [`READS`] and refuses anything else, saying which version it found; a new build
//! that changes anything in the body (a field added, one's meaning changed) gives it a new
//! version number, and may go on reading older ones. Every structure is destructured in full
//! when written, so a field added to one of them does not compile until the format says what to
//! do with it.
//!
//! Times are durations from one moment, the export ([`State::exported_ns`], CLOCK_MONOTONIC,
//! which both processes share: same boot), so that the next process places them on its own
//! clock.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use super::rest::Phase;
use crate::metrics::ConnRefusal;
use crate::table::export::{Export, HolderExport, NameExport, WaiterExport};
use crate::table::{ConnId, Counters};

const MAGIC: &[u8; 20] = b"tcpnetlock hand-over";

/// The version this build writes.
pub const VERSION: u32 = 1;

/// The versions this build reads.
pub const READS: &[u32] = &[1];

/// Everything the next process needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// The version of the server that wrote it (for the log).
    pub server_version: String,
    /// CLOCK_MONOTONIC in ns when the hand-over was asked for (the signal), to log how long the
    /// next process took.
    pub signalled_ns: u64,
    /// CLOCK_MONOTONIC in ns at the export: the table's times count from here.
    pub exported_ns: u64,
    /// Connection numbers continue from here.
    pub next_conn: u64,
    /// Connections accepted so far (`.stats` requests_count).
    pub accepted: u64,
    pub table: Export,
    pub conns: Vec<Conn>,
}

/// One connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conn {
    pub id: ConnId,
    /// The socket's inode: how the next process finds its descriptor among those handed over.
    pub inode: u64,
    pub peer: SocketAddr,
    pub phase: Phase,
}

/// Encodes `state` as version [`VERSION`] (or `version`, for tests of refusal).
pub fn encode(state: &State, version: u32) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(256 + state.conns.len() * 96));
    w.0.extend_from_slice(MAGIC);
    w.u32(version);
    let State {
        server_version,
        signalled_ns,
        exported_ns,
        next_conn,
        accepted,
        table,
        conns,
    } = state;
    w.str(server_version);
    w.u64(*signalled_ns);
    w.u64(*exported_ns);
    w.u64(*next_conn);
    w.u64(*accepted);
    w.export(table);
    w.len(conns.len());
    for Conn {
        id,
        inode,
        peer,
        phase,
    } in conns
    {
        w.u64(id.0);
        w.u64(*inode);
        w.addr(peer);
        w.phase(phase);
    }
    w.0
}

/// Reads a state this build can read, or says why not.
pub fn decode(bytes: &[u8]) -> Result<State, String> {
    let mut r = Reader { bytes, at: 0 };
    if r.take(MAGIC.len())? != MAGIC {
        return Err("this is not a tcpnetlock hand-over state (no magic at its start)".into());
    }
    let version = r.u32()?;
    if !READS.contains(&version) {
        return Err(format!(
            "the state's format is version {version}; this build ({}) reads version{} {}",
            env!("CARGO_PKG_VERSION"),
            if READS.len() > 1 { "s" } else { "" },
            READS
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let state = State {
        server_version: r.str()?,
        signalled_ns: r.u64()?,
        exported_ns: r.u64()?,
        next_conn: r.u64()?,
        accepted: r.u64()?,
        table: r.export()?,
        conns: {
            let n = r.len()?;
            let mut conns = Vec::with_capacity(n.min(1 << 16));
            for _ in 0..n {
                conns.push(Conn {
                    id: ConnId(r.u64()?),
                    inode: r.u64()?,
                    peer: r.addr()?,
                    phase: r.phase()?,
                });
            }
            conns
        },
    };
    if r.at != bytes.len() {
        return Err(format!(
            "{} bytes follow the end of the state",
            bytes.len() - r.at
        ));
    }
    Ok(state)
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }
    fn len(&mut self, n: usize) {
        self.u32(u32::try_from(n).expect("fewer than 2^32 items"));
    }
    fn bytes(&mut self, b: &[u8]) {
        self.len(b.len());
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn dur(&mut self, d: Duration) {
        self.u64(d.as_secs());
        self.u32(d.subsec_nanos());
    }
    fn opt<T>(&mut self, v: Option<T>, mut f: impl FnMut(&mut Self, T)) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                f(self, v);
            }
        }
    }
    fn addr(&mut self, a: &SocketAddr) {
        match a.ip() {
            IpAddr::V4(ip) => {
                self.u8(4);
                self.0.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                self.u8(6);
                self.0.extend_from_slice(&ip.octets());
            }
        }
        self.0.extend_from_slice(&a.port().to_le_bytes());
    }
    fn refusal(&mut self, r: ConnRefusal) {
        self.u8(match r {
            ConnRefusal::MaxConnections => 0,
            ConnRefusal::MaxConnectionsPerPeer => 1,
            ConnRefusal::ServerBusy => 2,
            ConnRefusal::OutOfFds => 3,
        });
    }
    fn phase(&mut self, p: &Phase) {
        match p {
            Phase::FirstRequest {
                left,
                limited,
                unparsed,
            } => {
                self.u8(0);
                self.dur(*left);
                self.opt(*limited, Self::refusal);
                self.bytes(unparsed);
            }
            Phase::Session {
                name,
                fencing,
                unparsed,
                unsent,
            } => {
                self.u8(1);
                self.str(name);
                self.bool(*fencing);
                self.bytes(unparsed);
                self.bytes(unsent);
            }
            Phase::HalfClosed { name, fencing } => {
                self.u8(2);
                self.str(name);
                self.bool(*fencing);
            }
            Phase::Closing { unsent } => {
                self.u8(3);
                self.bytes(unsent);
            }
        }
    }
    fn export(&mut self, e: &Export) {
        let Export {
            next_token,
            counters,
            names,
        } = e;
        self.u64(*next_token);
        let Counters {
            acquired,
            not_acquired,
            released,
            granted_after_wait,
            wait_timeouts,
            expired,
            max_mismatches,
            shared_acquired,
        } = *counters;
        for c in [
            acquired,
            not_acquired,
            released,
            granted_after_wait,
            wait_timeouts,
            expired,
            max_mismatches,
            shared_acquired,
        ] {
            self.u64(c);
        }
        self.len(names.len());
        for NameExport {
            name,
            max,
            holders,
            waiters,
        } in names
        {
            self.str(name);
            self.u32(*max);
            self.len(holders.len());
            for HolderExport {
                conn,
                client_id,
                peer,
                token,
                ttl,
                shared,
                held_for,
                lease_due_ns,
            } in holders
            {
                self.u64(conn.0);
                self.opt(client_id.as_deref(), Self::str);
                self.opt(peer.as_ref(), Self::addr);
                self.u64(*token);
                self.opt(*ttl, Self::dur);
                self.bool(*shared);
                self.dur(*held_for);
                self.opt(*lease_due_ns, Self::i64);
            }
            self.len(waiters.len());
            for WaiterExport {
                conn,
                client_id,
                peer,
                ttl,
                shared,
                waited,
                wait_due_ns,
            } in waiters
            {
                self.u64(conn.0);
                self.opt(client_id.as_deref(), Self::str);
                self.opt(peer.as_ref(), Self::addr);
                self.opt(*ttl, Self::dur);
                self.bool(*shared);
                self.dur(*waited);
                self.i64(*wait_due_ns);
            }
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "the state ends early: {n} bytes wanted at byte {} of {}",
                    self.at,
                    self.bytes.len()
                )
            })?;
        let b = &self.bytes[self.at..end];
        self.at = end;
        Ok(b)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("N bytes taken"))
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.array::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64, String> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    fn bool(&mut self) -> Result<bool, String> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.bad("a boolean", b)),
        }
    }
    fn bad(&self, what: &str, b: u8) -> String {
        format!("byte {} should be {what}, not {b}", self.at - 1)
    }
    fn len(&mut self) -> Result<usize, String> {
        Ok(self.u32()? as usize)
    }
    fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let n = self.len()?;
        Ok(self.take(n)?.to_vec())
    }
    fn str(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?)
            .map_err(|_| format!("a text ending at byte {} is not UTF-8", self.at))
    }
    fn dur(&mut self) -> Result<Duration, String> {
        let secs = self.u64()?;
        let nanos = self.u32()?;
        if nanos >= 1_000_000_000 {
            return Err(format!("a duration ending at byte {} is invalid", self.at));
        }
        Ok(Duration::new(secs, nanos))
    }
    fn opt<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, String>,
    ) -> Result<Option<T>, String> {
        match self.u8()? {
            0 => Ok(None),
            1 => f(self).map(Some),
            b => Err(self.bad("0 or 1 (absent or present)", b)),
        }
    }
    fn addr(&mut self) -> Result<SocketAddr, String> {
        let ip = match self.u8()? {
            4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>()?)),
            b => return Err(self.bad("an address family (4 or 6)", b)),
        };
        Ok(SocketAddr::new(ip, u16::from_le_bytes(self.array()?)))
    }
    fn refusal(&mut self) -> Result<ConnRefusal, String> {
        Ok(match self.u8()? {
            0 => ConnRefusal::MaxConnections,
            1 => ConnRefusal::MaxConnectionsPerPeer,
            2 => ConnRefusal::ServerBusy,
            3 => ConnRefusal::OutOfFds,
            b => return Err(self.bad("a reason for a limit", b)),
        })
    }
    fn phase(&mut self) -> Result<Phase, String> {
        Ok(match self.u8()? {
            0 => Phase::FirstRequest {
                left: self.dur()?,
                limited: self.opt(Self::refusal)?,
                unparsed: self.bytes()?,
            },
            1 => Phase::Session {
                name: self.str()?.into(),
                fencing: self.bool()?,
                unparsed: self.bytes()?,
                unsent: self.bytes()?,
            },
            2 => Phase::HalfClosed {
                name: self.str()?.into(),
                fencing: self.bool()?,
            },
            3 => Phase::Closing {
                unsent: self.bytes()?,
            },
            b => return Err(self.bad("a connection's phase", b)),
        })
    }
    fn export(&mut self) -> Result<Export, String> {
        let next_token = self.u64()?;
        let counters = Counters {
            acquired: self.u64()?,
            not_acquired: self.u64()?,
            released: self.u64()?,
            granted_after_wait: self.u64()?,
            wait_timeouts: self.u64()?,
            expired: self.u64()?,
            max_mismatches: self.u64()?,
            shared_acquired: self.u64()?,
        };
        let n = self.len()?;
        let mut names = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            let name: Arc<str> = self.str()?.into();
            let max = self.u32()?;
            let n = self.len()?;
            let mut holders = Vec::with_capacity(n.min(1 << 16));
            for _ in 0..n {
                holders.push(HolderExport {
                    conn: ConnId(self.u64()?),
                    client_id: self.opt(Self::str)?.map(Into::into),
                    peer: self.opt(Self::addr)?,
                    token: self.u64()?,
                    ttl: self.opt(Self::dur)?,
                    shared: self.bool()?,
                    held_for: self.dur()?,
                    lease_due_ns: self.opt(Self::i64)?,
                });
            }
            let n = self.len()?;
            let mut waiters = Vec::with_capacity(n.min(1 << 16));
            for _ in 0..n {
                waiters.push(WaiterExport {
                    conn: ConnId(self.u64()?),
                    client_id: self.opt(Self::str)?.map(Into::into),
                    peer: self.opt(Self::addr)?,
                    ttl: self.opt(Self::dur)?,
                    shared: self.bool()?,
                    waited: self.dur()?,
                    wait_due_ns: self.i64()?,
                });
            }
            names.push(NameExport {
                name,
                max,
                holders,
                waiters,
            });
        }
        Ok(Export {
            next_token,
            counters,
            names,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> State {
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let peer6: SocketAddr = "[::1]:40001".parse().unwrap();
        State {
            server_version: "0.3.0".into(),
            signalled_ns: 5,
            exported_ns: 7,
            next_conn: 12,
            accepted: 99,
            table: Export {
                next_token: 1_000,
                counters: Counters {
                    acquired: 1,
                    not_acquired: 2,
                    released: 3,
                    granted_after_wait: 4,
                    wait_timeouts: 5,
                    expired: 6,
                    max_mismatches: 7,
                    shared_acquired: 8,
                },
                names: vec![NameExport {
                    name: "a".into(),
                    max: 1,
                    holders: vec![HolderExport {
                        conn: ConnId(3),
                        client_id: Some("job".into()),
                        peer: Some(peer),
                        token: 999,
                        ttl: Some(Duration::from_millis(1500)),
                        shared: false,
                        held_for: Duration::new(2, 5),
                        lease_due_ns: Some(-4),
                    }],
                    waiters: vec![WaiterExport {
                        conn: ConnId(4),
                        client_id: None,
                        peer: Some(peer6),
                        ttl: None,
                        shared: true,
                        waited: Duration::ZERO,
                        wait_due_ns: 10,
                    }],
                }],
            },
            conns: vec![
                Conn {
                    id: ConnId(3),
                    inode: 77,
                    peer,
                    phase: Phase::Session {
                        name: "a".into(),
                        fencing: true,
                        unparsed: b"rel".to_vec(),
                        unsent: b"alive\n".to_vec(),
                    },
                },
                Conn {
                    id: ConnId(4),
                    inode: 78,
                    peer: peer6,
                    phase: Phase::HalfClosed {
                        name: "a".into(),
                        fencing: false,
                    },
                },
                Conn {
                    id: ConnId(5),
                    inode: 79,
                    peer,
                    phase: Phase::FirstRequest {
                        left: Duration::from_secs(3),
                        limited: Some(ConnRefusal::MaxConnectionsPerPeer),
                        unparsed: b"lock,na".to_vec(),
                    },
                },
                Conn {
                    id: ConnId(6),
                    inode: 80,
                    peer,
                    phase: Phase::Closing {
                        unsent: b"released\n".to_vec(),
                    },
                },
            ],
        }
    }

    #[test]
    fn round_trip() {
        let state = sample();
        assert_eq!(decode(&encode(&state, VERSION)).unwrap(), state);
    }

    #[test]
    fn another_version_is_refused_by_name() {
        let err = decode(&encode(&sample(), 999)).unwrap_err();
        assert!(
            err.starts_with("the state's format is version 999; this build (")
                && err.ends_with(") reads version 1"),
            "{err}"
        );
    }

    #[test]
    fn damage_is_refused_never_a_panic() {
        let bytes = encode(&sample(), VERSION);
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            decode(&longer).unwrap_err(),
            "1 bytes follow the end of the state"
        );
        let mut wrong = bytes.clone();
        wrong[0] = b'T';
        assert!(decode(&wrong).unwrap_err().contains("no magic"));
        // Every single byte changed: an error or a state, never a panic.
        for i in MAGIC.len() + 4..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0xff;
            let _ = decode(&b);
        }
    }
}
