//! What `.stats` and `.locks` carry, as types: the server writes them, the CLI and library
//! users read them, so the two sides cannot drift apart.
//!
//! **Writing** is std-only and allocation-light ([`Stats::write_json`], [`Locks::write_json`]):
//! the server's request path does not run serde. The bytes are the format scripts already parse
//! (keys in a fixed order, `", "` and `": "` between items, seconds with three decimals), and
//! strings are escaped as JSON however restricted their alphabet is today.
//!
//! **Reading** goes through serde ([`Deserialize`]) and never fails because of one value. A
//! server is older (tcpnetlock 0.1.8 sends five keys of `.stats`), newer (it sends keys this
//! version does not know) or odd (0.1.8 sends `"maxrss": "n/a"` when `getrusage` fails); so
//! every field is an [`Option`] that is `None` when the key is missing or `null`, and a value
//! that does not fit its field (a fraction for a count, a string for a number, `1e308` for a
//! memory size) is kept in the `other` map under its key, next to the keys this version does
//! not know. Nothing the server sent is lost, and a newer server that changes a type cannot
//! break an older reader. Integers are read exactly (a token is a `u64`, never an `f64`);
//! seconds stay the `f64` the server sent, and their [`Duration`] accessors saturate instead
//! of panicking on `1e308` or a negative number.
//!
//! Every struct is `#[non_exhaustive]`, so later servers can add fields without breaking code
//! that reads these: a holder's mode (exclusive or shared) and the server it is connected to,
//! the waiters of a lock, more counters in `.stats`. New keys are written after the ones here,
//! in the order they are added, so the bytes of today's keys do not move.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::de::{self, Deserialize, DeserializeOwned, Deserializer};
use serde_json::Value;

/// The object a `.stats` request answers with.
///
/// Field names are the JSON keys. A field is `None` when the server did not send the key (0.1.8
/// sends only `requests_count`, `lock_acquired_count`, `lock_not_acquired_count`, `lock_count`
/// and `maxrss`), sent `null`, or sent a value of another type (which is then in
/// [`other`](Stats::other)).
///
/// ```
/// use tcpnetlock::status::Stats;
///
/// let stats: Stats = serde_json::from_str(
///     r#"{"lock_count": 1, "maxrss": 13840, "requests_count": 3,
///         "lock_acquired_count": 1, "lock_not_acquired_count": 1}"#,
/// )?;
/// assert_eq!(stats.locks_held, Some(1)); // 0.1.8's `lock_count`
/// assert_eq!(stats.version, None); // 0.1.8 does not say
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Stats {
    /// Connections accepted since start (0.1.8's name).
    pub requests_count: Option<u64>,
    /// Grants since start, immediate or after waiting.
    pub lock_acquired_count: Option<u64>,
    /// Refusals since start, immediate or when a wait ran out.
    pub lock_not_acquired_count: Option<u64>,
    /// The server's peak resident memory in KiB.
    pub maxrss: Option<u64>,
    /// Names held now. Read from `locks_held`, or from 0.1.8's `lock_count` when that is
    /// missing; written under both keys.
    pub locks_held: Option<u64>,
    /// Holders now: more than `locks_held` when semaphores are in use.
    pub holders: Option<u64>,
    /// Connections queued for a lock now.
    pub waiting: Option<u64>,
    /// Holders gone since start, by release or disconnect.
    pub lock_released_count: Option<u64>,
    /// Grants that came after waiting.
    pub granted_after_wait_count: Option<u64>,
    /// Waits that ran out.
    pub wait_timeout_count: Option<u64>,
    /// Leases revoked because their holder went silent.
    pub lease_expired_count: Option<u64>,
    /// Requests refused for asking a different `max` than the holders'.
    pub max_mismatch_count: Option<u64>,
    /// Connections open now.
    pub connections: Option<u64>,
    /// Worker threads alive.
    pub threads: Option<u64>,
    /// Worker threads waiting for work.
    pub threads_idle: Option<u64>,
    /// Seconds since the server started; see [`Stats::uptime`].
    pub uptime_secs: Option<f64>,
    /// Log lines dropped since start because the log destination did not keep up.
    pub log_lines_dropped: Option<u64>,
    /// Grants in shared mode since start (also counted in `lock_acquired_count`).
    pub shared_granted_count: Option<u64>,
    /// A cluster member's view of the whole cluster; `None` from a server on its own.
    pub cluster: Option<Cluster>,
    /// The server's version.
    pub version: Option<String>,
    /// Keys this version does not know, and known keys whose value did not fit the field,
    /// sorted by key. Written after the known keys.
    pub other: BTreeMap<String, Value>,
}

impl Stats {
    /// [`uptime_secs`](Stats::uptime_secs) as a [`Duration`], saturating: a negative number is
    /// zero, one too large for a `Duration` is [`Duration::MAX`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use tcpnetlock::status::Stats;
    ///
    /// let stats: Stats = serde_json::from_str(r#"{"uptime_secs": 81.25}"#)?;
    /// assert_eq!(stats.uptime(), Some(Duration::from_millis(81_250)));
    /// let hostile: Stats = serde_json::from_str(r#"{"uptime_secs": 1e308}"#)?;
    /// assert_eq!(hostile.uptime(), Some(Duration::MAX));
    /// # Ok::<(), serde_json::Error>(())
    /// ```
    pub fn uptime(&self) -> Option<Duration> {
        self.uptime_secs.map(saturating_secs)
    }

    /// Appends the JSON object as the server sends it after `stats,`. A `None` field is written
    /// as `null`; seconds with three decimals.
    ///
    /// ```
    /// use tcpnetlock::status::Stats;
    ///
    /// let mut stats = Stats::default();
    /// stats.requests_count = Some(12);
    /// stats.version = Some("0.2.0".into());
    /// let mut json = String::new();
    /// stats.write_json(&mut json);
    /// assert!(json.starts_with(r#"{"requests_count": 12, "lock_acquired_count": null, "#));
    /// assert!(json.ends_with(r#""version": "0.2.0", "shared_granted_count": null}"#));
    /// ```
    pub fn write_json(&self, out: &mut String) {
        let mut o = Object::open(out);
        o.count("requests_count", self.requests_count);
        o.count("lock_acquired_count", self.lock_acquired_count);
        o.count("lock_not_acquired_count", self.lock_not_acquired_count);
        o.count("lock_count", self.locks_held);
        o.count("maxrss", self.maxrss);
        o.count("locks_held", self.locks_held);
        o.count("holders", self.holders);
        o.count("waiting", self.waiting);
        o.count("lock_released_count", self.lock_released_count);
        o.count("granted_after_wait_count", self.granted_after_wait_count);
        o.count("wait_timeout_count", self.wait_timeout_count);
        o.count("lease_expired_count", self.lease_expired_count);
        o.count("max_mismatch_count", self.max_mismatch_count);
        o.count("connections", self.connections);
        o.count("threads", self.threads);
        o.count("threads_idle", self.threads_idle);
        o.secs("uptime_secs", self.uptime_secs);
        o.count("log_lines_dropped", self.log_lines_dropped);
        o.text("version", self.version.as_deref());
        o.count("shared_granted_count", self.shared_granted_count);
        if let Some(cluster) = &self.cluster {
            o.key("cluster");
            cluster.write_json(o.out);
        }
        o.close(&self.other);
    }

    fn from_fields(mut f: Fields) -> Stats {
        // Both names are taken, so that the one not used does not turn up in `other`.
        let lock_count = take(&mut f, "lock_count");
        let locks_held = take(&mut f, "locks_held").or(lock_count);
        Stats {
            requests_count: take(&mut f, "requests_count"),
            lock_acquired_count: take(&mut f, "lock_acquired_count"),
            lock_not_acquired_count: take(&mut f, "lock_not_acquired_count"),
            maxrss: take(&mut f, "maxrss"),
            locks_held,
            holders: take(&mut f, "holders"),
            waiting: take(&mut f, "waiting"),
            lock_released_count: take(&mut f, "lock_released_count"),
            granted_after_wait_count: take(&mut f, "granted_after_wait_count"),
            wait_timeout_count: take(&mut f, "wait_timeout_count"),
            lease_expired_count: take(&mut f, "lease_expired_count"),
            max_mismatch_count: take(&mut f, "max_mismatch_count"),
            connections: take(&mut f, "connections"),
            threads: take(&mut f, "threads"),
            threads_idle: take(&mut f, "threads_idle"),
            uptime_secs: take(&mut f, "uptime_secs"),
            log_lines_dropped: take(&mut f, "log_lines_dropped"),
            version: take(&mut f, "version"),
            shared_granted_count: take(&mut f, "shared_granted_count"),
            cluster: take::<Fields>(&mut f, "cluster").map(Cluster::from_fields),
            other: f,
        }
    }
}

/// The object an `.info` request answers with: what a client may want to know before it asks for
/// a lock.
///
/// ```
/// use tcpnetlock::status::Info;
///
/// let info: Info = serde_json::from_str(
///     r#"{"version": "0.3.0", "cluster": {"server": "tnl-a", "serving": true, "reason": null,
///         "etcd_ttl_secs": 5.000, "max_ttl_secs": 2.833, "locks_held": 3, "holders": 4,
///         "waiting": 1}}"#,
/// )?;
/// let cluster = info.cluster.unwrap();
/// assert_eq!(cluster.serving, Some(true));
/// assert_eq!(cluster.max_ttl(), Some(std::time::Duration::from_millis(2833)));
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Info {
    /// The server's version.
    pub version: Option<String>,
    /// Set by a cluster member (`tcpnetlock server --etcd`); `None` from a server on its own.
    pub cluster: Option<Cluster>,
    /// Keys this version does not know, and known keys whose value did not fit.
    pub other: BTreeMap<String, Value>,
}

impl Info {
    /// Appends the JSON object as the server sends it after `info,`.
    ///
    /// ```
    /// let mut info = tcpnetlock::status::Info::default();
    /// info.version = Some("0.3.0".into());
    /// let mut json = String::new();
    /// info.write_json(&mut json);
    /// assert_eq!(json, r#"{"version": "0.3.0", "cluster": null}"#);
    /// ```
    pub fn write_json(&self, out: &mut String) {
        let mut o = Object::open(out);
        o.text("version", self.version.as_deref());
        o.key("cluster");
        match &self.cluster {
            Some(cluster) => cluster.write_json(o.out),
            None => o.out.push_str("null"),
        }
        o.close(&self.other);
    }

    fn from_fields(mut f: Fields) -> Info {
        Info {
            version: take(&mut f, "version"),
            cluster: take::<Fields>(&mut f, "cluster").map(Cluster::from_fields),
            other: f,
        }
    }
}

/// Reads any JSON object; fails only on something that is not an object.
impl<'de> Deserialize<'de> for Info {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Info, D::Error> {
        Fields::deserialize(deserializer).map(Info::from_fields)
    }
}

/// A cluster member's state and its view of the cluster, in [`Info`] and [`Stats`].
///
/// ```
/// let mut cluster = tcpnetlock::status::Cluster::default();
/// cluster.serving = Some(false);
/// cluster.reason = Some("no etcd lease: etcd unreachable for 4.2 s".into());
/// assert_eq!(cluster.max_ttl(), None);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Cluster {
    /// This member's name (`--etcd-name`, the host name by default).
    pub server: Option<String>,
    /// Whether it can grant locks now (it holds a fresh etcd lease).
    pub serving: Option<bool>,
    /// Why not, when it cannot.
    pub reason: Option<String>,
    /// Its etcd lease's ttl (`--etcd-ttl`).
    pub etcd_ttl_secs: Option<f64>,
    /// The longest `ttl:` it accepts: a client lease this long or shorter runs out (by the
    /// client's own clock) before etcd could give the lock to someone else, even if this server
    /// freezes. See [`Cluster::max_ttl`].
    pub max_ttl_secs: Option<f64>,
    /// Names held, holders and waiters in the whole cluster.
    pub locks_held: Option<u64>,
    /// Holders in the whole cluster.
    pub holders: Option<u64>,
    /// Waiters in the whole cluster.
    pub waiting: Option<u64>,
    /// Keys this version does not know, and known keys whose value did not fit.
    pub other: BTreeMap<String, Value>,
}

impl Cluster {
    /// [`max_ttl_secs`](Cluster::max_ttl_secs) as a [`Duration`], saturating.
    ///
    /// ```
    /// let mut cluster = tcpnetlock::status::Cluster::default();
    /// cluster.max_ttl_secs = Some(2.5);
    /// assert_eq!(cluster.max_ttl(), Some(std::time::Duration::from_millis(2500)));
    /// ```
    pub fn max_ttl(&self) -> Option<Duration> {
        self.max_ttl_secs.map(saturating_secs)
    }

    fn write_json(&self, out: &mut String) {
        let mut o = Object::open(out);
        o.text("server", self.server.as_deref());
        o.flag("serving", self.serving);
        o.text("reason", self.reason.as_deref());
        o.secs("etcd_ttl_secs", self.etcd_ttl_secs);
        o.secs("max_ttl_secs", self.max_ttl_secs);
        o.count("locks_held", self.locks_held);
        o.count("holders", self.holders);
        o.count("waiting", self.waiting);
        o.close(&self.other);
    }

    fn from_fields(mut f: Fields) -> Cluster {
        Cluster {
            server: take(&mut f, "server"),
            serving: take(&mut f, "serving"),
            reason: take(&mut f, "reason"),
            etcd_ttl_secs: take(&mut f, "etcd_ttl_secs"),
            max_ttl_secs: take(&mut f, "max_ttl_secs"),
            locks_held: take(&mut f, "locks_held"),
            holders: take(&mut f, "holders"),
            waiting: take(&mut f, "waiting"),
            other: f,
        }
    }
}

/// Reads any JSON object; fails only on something that is not an object.
impl<'de> Deserialize<'de> for Cluster {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Cluster, D::Error> {
        Fields::deserialize(deserializer).map(Cluster::from_fields)
    }
}

/// Reads any JSON object; fails only on something that is not an object.
impl<'de> Deserialize<'de> for Stats {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Stats, D::Error> {
        Fields::deserialize(deserializer).map(Stats::from_fields)
    }
}

/// The object a `.locks` request answers with: every held name, sorted, with its holders.
///
/// ```
/// use tcpnetlock::status::Locks;
///
/// let locks: Locks = serde_json::from_str(
///     r#"{"deploy": {"max": 1, "waiting": 2, "holders": [{"client_id": "ci-7",
///         "peer": "[::1]:41822", "held_secs": 12.402, "token": 18446744073709551615,
///         "ttl_secs": null}]}}"#,
/// )?;
/// let deploy = locks.get("deploy").unwrap();
/// assert_eq!(deploy.waiting, Some(2));
/// assert_eq!(deploy.holders[0].token, Some(u64::MAX)); // exact
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Locks {
    locks: Vec<LockInfo>,
}

impl Locks {
    /// The locks in the order the server sent them, which is by name.
    ///
    /// ```
    /// # let locks = tcpnetlock::status::Locks::default();
    /// for lock in locks.iter() {
    ///     println!("{} has {} holders", lock.name, lock.holders.len());
    /// }
    /// ```
    pub fn iter(&self) -> std::slice::Iter<'_, LockInfo> {
        self.locks.iter()
    }

    /// The lock called `name`, if it is held.
    ///
    /// ```
    /// # let locks = tcpnetlock::status::Locks::default();
    /// let held = locks.get("deploy").is_some();
    /// ```
    pub fn get(&self, name: &str) -> Option<&LockInfo> {
        self.locks.iter().find(|l| l.name == name)
    }

    /// How many names are held.
    ///
    /// ```
    /// assert_eq!(tcpnetlock::status::Locks::default().len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.locks.len()
    }

    /// Whether no name is held.
    ///
    /// ```
    /// assert!(tcpnetlock::status::Locks::default().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.locks.is_empty()
    }

    /// Appends the JSON object as the server sends it after `locks,`, the locks in this
    /// order (the server's are sorted by name).
    ///
    /// ```
    /// use tcpnetlock::status::{HolderInfo, LockInfo, Locks};
    ///
    /// let mut holder = HolderInfo::default();
    /// holder.peer = Some("127.0.0.1:5".into());
    /// holder.held_secs = Some(1.25);
    /// holder.token = Some(17);
    /// let mut lock = LockInfo::new("a");
    /// lock.max = Some(1);
    /// lock.waiting = Some(0);
    /// lock.holders.push(holder);
    /// let mut json = String::new();
    /// Locks::from_iter([lock]).write_json(&mut json);
    /// assert_eq!(
    ///     json,
    ///     r#"{"a": {"max": 1, "waiting": 0, "holders": [{"client_id": null, "peer": "127.0.0.1:5", "held_secs": 1.250, "token": 17, "ttl_secs": null, "mode": null}], "waiters": []}}"#
    /// );
    /// ```
    pub fn write_json(&self, out: &mut String) {
        out.push('{');
        for (i, lock) in self.locks.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            push_string(out, &lock.name);
            out.push_str(": ");
            lock.write_json(out);
        }
        out.push('}');
    }
}

/// Reads a JSON object whose values are objects; a lock that is not an object is an error
/// that names it.
impl<'de> Deserialize<'de> for Locks {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Locks, D::Error> {
        let names = Fields::deserialize(deserializer)?;
        let mut locks = Vec::with_capacity(names.len());
        for (name, value) in names {
            let Value::Object(fields) = value else {
                return Err(de::Error::custom(format!(
                    "lock {name:?} is {value}, not an object"
                )));
            };
            locks.push(LockInfo::from_fields(name, fields.into_iter().collect()));
        }
        Ok(Locks { locks })
    }
}

/// ```
/// use tcpnetlock::status::{LockInfo, Locks};
///
/// let locks: Locks = [LockInfo::new("a"), LockInfo::new("b")].into_iter().collect();
/// assert_eq!(locks.len(), 2);
/// ```
impl FromIterator<LockInfo> for Locks {
    fn from_iter<I: IntoIterator<Item = LockInfo>>(iter: I) -> Locks {
        Locks {
            locks: iter.into_iter().collect(),
        }
    }
}

/// ```
/// # let locks = tcpnetlock::status::Locks::default();
/// let names: Vec<String> = locks.into_iter().map(|l| l.name).collect();
/// ```
impl IntoIterator for Locks {
    type Item = LockInfo;
    type IntoIter = std::vec::IntoIter<LockInfo>;
    fn into_iter(self) -> Self::IntoIter {
        self.locks.into_iter()
    }
}

/// ```
/// # let locks = tcpnetlock::status::Locks::default();
/// for lock in &locks {
///     println!("{}", lock.name);
/// }
/// ```
impl<'a> IntoIterator for &'a Locks {
    type Item = &'a LockInfo;
    type IntoIter = std::slice::Iter<'a, LockInfo>;
    fn into_iter(self) -> Self::IntoIter {
        self.locks.iter()
    }
}

/// One held name in [`Locks`].
///
/// ```
/// use tcpnetlock::status::LockInfo;
///
/// let mut lock = LockInfo::new("builds");
/// lock.max = Some(3); // a semaphore
/// assert!(lock.holders.is_empty());
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct LockInfo {
    /// The lock's name: the key of its entry.
    pub name: String,
    /// How many may hold it at once: 1 for a plain lock.
    pub max: Option<u32>,
    /// Connections queued for it.
    pub waiting: Option<u64>,
    /// Its holders, the longest-held first. Empty when the server sent none (or not a list of
    /// objects, which is then in `other`).
    pub holders: Vec<HolderInfo>,
    /// Who waits for it, in queue order: the first is granted next. Empty from a server that
    /// does not list waiters (before 0.3), which sends `waiting` only.
    pub waiters: Vec<WaiterInfo>,
    /// Keys this version does not know, and known keys whose value did not fit.
    pub other: BTreeMap<String, Value>,
}

impl LockInfo {
    /// A lock called `name`, with nothing else known yet.
    ///
    /// ```
    /// let lock = tcpnetlock::status::LockInfo::new("deploy");
    /// assert_eq!((lock.name.as_str(), lock.max), ("deploy", None));
    /// ```
    pub fn new(name: impl Into<String>) -> LockInfo {
        LockInfo {
            name: name.into(),
            ..LockInfo::default()
        }
    }

    fn write_json(&self, out: &mut String) {
        let mut o = Object::open(out);
        o.count("max", self.max.map(u64::from));
        o.count("waiting", self.waiting);
        o.key("holders");
        o.out.push('[');
        for (i, holder) in self.holders.iter().enumerate() {
            if i > 0 {
                o.out.push_str(", ");
            }
            holder.write_json(o.out);
        }
        o.out.push(']');
        o.key("waiters");
        o.out.push('[');
        for (i, waiter) in self.waiters.iter().enumerate() {
            if i > 0 {
                o.out.push_str(", ");
            }
            waiter.write_json(o.out);
        }
        o.out.push(']');
        o.close(&self.other);
    }

    fn from_fields(name: String, mut f: Fields) -> LockInfo {
        let holders: Option<Vec<Fields>> = take(&mut f, "holders");
        let waiters: Option<Vec<Fields>> = take(&mut f, "waiters");
        LockInfo {
            name,
            max: take(&mut f, "max"),
            waiting: take(&mut f, "waiting"),
            holders: holders
                .unwrap_or_default()
                .into_iter()
                .map(HolderInfo::from_fields)
                .collect(),
            waiters: waiters
                .unwrap_or_default()
                .into_iter()
                .map(WaiterInfo::from_fields)
                .collect(),
            other: f,
        }
    }
}

/// One holder of a lock in [`LockInfo::holders`].
///
/// ```
/// use std::time::Duration;
/// use tcpnetlock::status::HolderInfo;
///
/// let holder: HolderInfo = serde_json::from_str(
///     r#"{"client_id": null, "peer": "10.0.3.17:41822", "held_secs": 12.402,
///         "token": 1764154800123457, "ttl_secs": 30.0}"#,
/// )?;
/// assert_eq!(holder.client_id, None);
/// assert_eq!(holder.ttl(), Some(Duration::from_secs(30)));
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct HolderInfo {
    /// The `client-id` it asked with, if any.
    pub client_id: Option<String>,
    /// Its address as the server sees it (`10.0.3.17:41822`, `[::1]:41822`).
    pub peer: Option<String>,
    /// Seconds since it was granted; see [`HolderInfo::held`].
    pub held_secs: Option<f64>,
    /// The fencing token of its grant.
    pub token: Option<u64>,
    /// Its lease in seconds, `None` when it holds without one; see [`HolderInfo::ttl`].
    pub ttl_secs: Option<f64>,
    /// Exclusive or shared; `None` from a server without shared locks (before 0.3: all
    /// exclusive).
    pub mode: Option<Mode>,
    /// In a cluster, the member it is connected to; otherwise `None` (not written).
    pub server: Option<String>,
    /// Keys this version does not know, and known keys whose value did not fit.
    pub other: BTreeMap<String, Value>,
}

impl HolderInfo {
    /// [`held_secs`](HolderInfo::held_secs) as a [`Duration`], saturating (negative is zero,
    /// too large is [`Duration::MAX`]).
    ///
    /// ```
    /// # use std::time::Duration;
    /// let mut holder = tcpnetlock::status::HolderInfo::default();
    /// holder.held_secs = Some(-1.0);
    /// assert_eq!(holder.held(), Some(Duration::ZERO));
    /// ```
    pub fn held(&self) -> Option<Duration> {
        self.held_secs.map(saturating_secs)
    }

    /// [`ttl_secs`](HolderInfo::ttl_secs) as a [`Duration`], saturating.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let mut holder = tcpnetlock::status::HolderInfo::default();
    /// holder.ttl_secs = Some(1e308);
    /// assert_eq!(holder.ttl(), Some(Duration::MAX));
    /// ```
    pub fn ttl(&self) -> Option<Duration> {
        self.ttl_secs.map(saturating_secs)
    }

    fn write_json(&self, out: &mut String) {
        let mut o = Object::open(out);
        o.text("client_id", self.client_id.as_deref());
        o.text("peer", self.peer.as_deref());
        o.secs("held_secs", self.held_secs);
        o.count("token", self.token);
        o.secs("ttl_secs", self.ttl_secs);
        o.text("mode", self.mode.map(Mode::as_str));
        if let Some(server) = &self.server {
            o.text("server", Some(server));
        }
        o.close(&self.other);
    }

    fn from_fields(mut f: Fields) -> HolderInfo {
        HolderInfo {
            client_id: take(&mut f, "client_id"),
            peer: take(&mut f, "peer"),
            held_secs: take(&mut f, "held_secs"),
            token: take(&mut f, "token"),
            ttl_secs: take(&mut f, "ttl_secs"),
            mode: take(&mut f, "mode"),
            server: take(&mut f, "server"),
            other: f,
        }
    }
}

/// One connection queued for a lock, in [`LockInfo::waiters`].
///
/// ```
/// use std::time::Duration;
/// use tcpnetlock::status::{Mode, WaiterInfo};
///
/// let waiter: WaiterInfo = serde_json::from_str(
///     r#"{"client_id": "job-9", "peer": "127.0.0.1:50312", "waited_secs": 3.100,
///         "left_secs": 26.900, "mode": "shared"}"#,
/// )?;
/// assert_eq!(waiter.mode, Some(Mode::Shared));
/// assert_eq!(waiter.left(), Some(Duration::from_millis(26_900)));
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct WaiterInfo {
    /// The `client-id` it asked with, if any.
    pub client_id: Option<String>,
    /// Its address as the server sees it.
    pub peer: Option<String>,
    /// Seconds since it joined the queue; see [`WaiterInfo::waited`].
    pub waited_secs: Option<f64>,
    /// Seconds until its wait runs out; see [`WaiterInfo::left`].
    pub left_secs: Option<f64>,
    /// The mode it asked for.
    pub mode: Option<Mode>,
    /// In a cluster, the member it is connected to; otherwise `None` (not written).
    pub server: Option<String>,
    /// Keys this version does not know, and known keys whose value did not fit.
    pub other: BTreeMap<String, Value>,
}

impl WaiterInfo {
    /// [`waited_secs`](WaiterInfo::waited_secs) as a [`Duration`], saturating.
    ///
    /// ```
    /// let mut waiter = tcpnetlock::status::WaiterInfo::default();
    /// waiter.waited_secs = Some(2.5);
    /// assert_eq!(waiter.waited(), Some(std::time::Duration::from_millis(2500)));
    /// ```
    pub fn waited(&self) -> Option<Duration> {
        self.waited_secs.map(saturating_secs)
    }

    /// [`left_secs`](WaiterInfo::left_secs) as a [`Duration`], saturating.
    ///
    /// ```
    /// let mut waiter = tcpnetlock::status::WaiterInfo::default();
    /// waiter.left_secs = Some(-3.0);
    /// assert_eq!(waiter.left(), Some(std::time::Duration::ZERO));
    /// ```
    pub fn left(&self) -> Option<Duration> {
        self.left_secs.map(saturating_secs)
    }

    fn write_json(&self, out: &mut String) {
        let mut o = Object::open(out);
        o.text("client_id", self.client_id.as_deref());
        o.text("peer", self.peer.as_deref());
        o.secs("waited_secs", self.waited_secs);
        o.secs("left_secs", self.left_secs);
        o.text("mode", self.mode.map(Mode::as_str));
        if let Some(server) = &self.server {
            o.text("server", Some(server));
        }
        o.close(&self.other);
    }

    fn from_fields(mut f: Fields) -> WaiterInfo {
        WaiterInfo {
            client_id: take(&mut f, "client_id"),
            peer: take(&mut f, "peer"),
            waited_secs: take(&mut f, "waited_secs"),
            left_secs: take(&mut f, "left_secs"),
            mode: take(&mut f, "mode"),
            server: take(&mut f, "server"),
            other: f,
        }
    }
}

/// Reads any JSON object; fails only on something that is not an object.
impl<'de> Deserialize<'de> for WaiterInfo {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<WaiterInfo, D::Error> {
        Fields::deserialize(deserializer).map(WaiterInfo::from_fields)
    }
}

/// How a lock is held or asked for: `"exclusive"` (a plain `lock`) or `"shared"` (`shared:1`).
///
/// ```
/// use tcpnetlock::status::Mode;
///
/// let mode: Mode = serde_json::from_str(r#""shared""#)?;
/// assert_eq!((mode, mode.as_str()), (Mode::Shared, "shared"));
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Mode {
    /// A plain `lock`: alone, or with up to `max` other exclusive holders (a semaphore).
    Exclusive,
    /// `shared:1`: beside any number of other shared holders, never an exclusive one.
    Shared,
}

impl Mode {
    /// The word `.locks` uses.
    ///
    /// ```
    /// assert_eq!(tcpnetlock::status::Mode::Exclusive.as_str(), "exclusive");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Exclusive => "exclusive",
            Mode::Shared => "shared",
        }
    }
}

/// Reads `"exclusive"` or `"shared"`; another word is an error (and so, in a holder or waiter,
/// kept in `other`).
impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Mode, D::Error> {
        match String::deserialize(deserializer)?.as_str() {
            "exclusive" => Ok(Mode::Exclusive),
            "shared" => Ok(Mode::Shared),
            other => Err(de::Error::custom(format!("unknown mode {other:?}"))),
        }
    }
}

/// Reads any JSON object; fails only on something that is not an object.
impl<'de> Deserialize<'de> for HolderInfo {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<HolderInfo, D::Error> {
        Fields::deserialize(deserializer).map(HolderInfo::from_fields)
    }
}

type Fields = BTreeMap<String, Value>;

/// Removes `key` and reads it as a `T`. Missing or `null` is `None`; a value that is not a `T`
/// goes back into `fields`, so that it ends up in `other`.
fn take<T: DeserializeOwned>(fields: &mut Fields, key: &str) -> Option<T> {
    let value = fields.remove(key)?;
    if value.is_null() {
        return None;
    }
    match T::deserialize(&value) {
        Ok(read) => Some(read),
        Err(_) => {
            fields.insert(key.to_owned(), value);
            None
        }
    }
}

fn saturating_secs(secs: f64) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
}

/// A JSON object being written in the server's spacing: `{"a": 1, "b": null}`.
struct Object<'a> {
    out: &'a mut String,
    empty: bool,
}

impl<'a> Object<'a> {
    fn open(out: &'a mut String) -> Object<'a> {
        out.push('{');
        Object { out, empty: true }
    }

    fn key(&mut self, key: &str) {
        if !self.empty {
            self.out.push_str(", ");
        }
        self.empty = false;
        push_string(self.out, key);
        self.out.push_str(": ");
    }

    fn count(&mut self, key: &str, value: Option<u64>) {
        self.key(key);
        match value {
            Some(n) => {
                let _ = write!(self.out, "{n}");
            }
            None => self.out.push_str("null"),
        }
    }

    /// Seconds to the millisecond. JSON has no infinity or NaN: those are `null`.
    fn secs(&mut self, key: &str, value: Option<f64>) {
        self.key(key);
        match value {
            Some(s) if s.is_finite() => {
                let _ = write!(self.out, "{s:.3}");
            }
            _ => self.out.push_str("null"),
        }
    }

    fn flag(&mut self, key: &str, value: Option<bool>) {
        self.key(key);
        self.out.push_str(match value {
            Some(true) => "true",
            Some(false) => "false",
            None => "null",
        });
    }

    fn text(&mut self, key: &str, value: Option<&str>) {
        self.key(key);
        match value {
            Some(s) => push_string(self.out, s),
            None => self.out.push_str("null"),
        }
    }

    /// Writes the keys a reader kept in `other` (none, on the server) and closes the object.
    fn close(mut self, other: &BTreeMap<String, Value>) {
        for (key, value) in other {
            self.key(key);
            let _ = write!(self.out, "{value}");
        }
        self.out.push('}');
    }
}

/// `s` as a JSON string, escaped as serde_json escapes it: `"` and `\`, and the control
/// characters below U+0020 (the usual ones by letter, the rest as `\u00XX`).
fn push_string(out: &mut String, s: &str) {
    out.push('"');
    let mut clean = 0;
    for (i, byte) in s.bytes().enumerate() {
        let short = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..0x20 => "",
            _ => continue,
        };
        // Every byte escaped is ASCII, so `i` is a character boundary.
        out.push_str(&s[clean..i]);
        if short.is_empty() {
            let _ = write!(out, "\\u{byte:04x}");
        } else {
            out.push_str(short);
        }
        clean = i + 1;
    }
    out.push_str(&s[clean..]);
    out.push('"');
}

#[cfg(test)]
mod tests;
