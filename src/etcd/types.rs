//! Requests and answers of etcd's v3 API, shaped as its JSON gateway sends them.
//!
//! The gateway maps protobuf to JSON with two habits that these types absorb, so callers see
//! plain Rust values: 64-bit integers travel as JSON strings (JavaScript cannot hold them), and
//! keys and values travel as base64. Fields at their default value are left out of answers
//! (a PUT event has no `type`, a failed txn no `succeeded`), hence `#[serde(default)]`
//! everywhere. Requests use the protobuf field names, which every gateway version accepts.

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

/// 64-bit integers as the gateway writes them: a JSON string of digits. Plain numbers are
/// accepted too, so a proxy or a future gateway that sends numbers still parses.
pub(super) mod num {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::fmt::Display;
    use std::str::FromStr;

    pub fn serialize<S: Serializer, T: Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Unsigned(u64),
        Signed(i64),
    }

    pub fn deserialize<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr,
        T::Err: Display,
    {
        let text = match Raw::deserialize(d)? {
            Raw::Text(t) => t,
            Raw::Unsigned(n) => n.to_string(),
            Raw::Signed(n) => n.to_string(),
        };
        text.parse()
            .map_err(|e| serde::de::Error::custom(format!("integer {text:?}: {e}")))
    }
}

/// Bytes as base64 text (standard alphabet, padded), as protobuf's JSON mapping has it.
pub(super) mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(|e| serde::de::Error::custom(format!("base64 {text:?}: {e}")))
    }
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The end of the key range that holds exactly the keys starting with `prefix`, by etcd's rule:
/// the prefix with its last byte below 0xff incremented. An empty or all-0xff prefix gives
/// `[0]`, which etcd reads as "every key from `key` on".
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Which member answered, and the store's revision when it did.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ResponseHeader {
    #[serde(with = "num")]
    pub cluster_id: u64,
    #[serde(with = "num")]
    pub member_id: u64,
    /// The key-value store's revision when the request was served.
    #[serde(with = "num")]
    pub revision: i64,
    #[serde(with = "num")]
    pub raft_term: u64,
}

/// One key as stored. Revisions are etcd's global write counter: `create_revision` is the
/// revision of the write that created this incarnation of the key, which makes it a total
/// order of key creations across the whole cluster.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct KeyValue {
    #[serde(with = "b64")]
    pub key: Vec<u8>,
    #[serde(with = "num")]
    pub create_revision: i64,
    #[serde(with = "num")]
    pub mod_revision: i64,
    /// Writes since creation (1 after the first put); 0 for a deleted key in an event.
    #[serde(with = "num")]
    pub version: i64,
    #[serde(with = "b64")]
    pub value: Vec<u8>,
    /// The lease the key is attached to, 0 for none.
    #[serde(with = "num")]
    pub lease: i64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SortOrder {
    #[default]
    None,
    Ascend,
    Descend,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum SortTarget {
    #[default]
    #[serde(rename = "KEY")]
    Key,
    #[serde(rename = "VERSION")]
    Version,
    #[serde(rename = "CREATE")]
    CreateRevision,
    #[serde(rename = "MOD")]
    ModRevision,
    #[serde(rename = "VALUE")]
    Value,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// A read of one key, a key range or a prefix. Linearizable unless [`serializable`] is asked.
///
/// [`serializable`]: RangeRequest::serializable
#[derive(Clone, Debug, Default, Serialize)]
pub struct RangeRequest {
    #[serde(with = "b64")]
    key: Vec<u8>,
    #[serde(with = "b64", skip_serializing_if = "Vec::is_empty")]
    range_end: Vec<u8>,
    #[serde(with = "num", skip_serializing_if = "is_zero")]
    limit: i64,
    #[serde(with = "num", skip_serializing_if = "is_zero")]
    revision: i64,
    #[serde(skip_serializing_if = "is_default")]
    sort_order: SortOrder,
    #[serde(skip_serializing_if = "is_default")]
    sort_target: SortTarget,
    #[serde(skip_serializing_if = "is_false")]
    serializable: bool,
    #[serde(skip_serializing_if = "is_false")]
    keys_only: bool,
    #[serde(skip_serializing_if = "is_false")]
    count_only: bool,
}

impl RangeRequest {
    pub fn key(key: impl Into<Vec<u8>>) -> RangeRequest {
        RangeRequest {
            key: key.into(),
            ..RangeRequest::default()
        }
    }

    /// Every key that starts with `prefix`.
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> RangeRequest {
        let key = prefix.into();
        RangeRequest {
            range_end: prefix_end(&key),
            key,
            ..RangeRequest::default()
        }
    }

    /// Keys in `[from, to)`.
    pub fn range(from: impl Into<Vec<u8>>, to: impl Into<Vec<u8>>) -> RangeRequest {
        RangeRequest {
            key: from.into(),
            range_end: to.into(),
            ..RangeRequest::default()
        }
    }

    pub fn sort(mut self, target: SortTarget, order: SortOrder) -> Self {
        self.sort_target = target;
        self.sort_order = order;
        self
    }

    /// At most `n` keys; [`RangeResponse::count`] still counts them all.
    pub fn limit(mut self, n: i64) -> Self {
        self.limit = n;
        self
    }

    /// Read the store as it was at `revision` (fails once that revision is compacted).
    pub fn at_revision(mut self, revision: i64) -> Self {
        self.revision = revision;
        self
    }

    /// Answered by the member from its local copy, without a round to the leader: faster, and
    /// possibly stale. Never use it for a decision that needs the latest state.
    pub fn serializable(mut self) -> Self {
        self.serializable = true;
        self
    }

    pub fn keys_only(mut self) -> Self {
        self.keys_only = true;
        self
    }

    pub fn count_only(mut self) -> Self {
        self.count_only = true;
        self
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RangeResponse {
    pub header: ResponseHeader,
    pub kvs: Vec<KeyValue>,
    /// More keys matched than `limit` let through.
    pub more: bool,
    /// How many keys matched (all of them, whatever the limit).
    #[serde(with = "num")]
    pub count: i64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PutRequest {
    #[serde(with = "b64")]
    key: Vec<u8>,
    #[serde(with = "b64")]
    value: Vec<u8>,
    #[serde(with = "num", skip_serializing_if = "is_zero")]
    lease: i64,
    #[serde(skip_serializing_if = "is_false")]
    prev_kv: bool,
}

impl PutRequest {
    pub fn new(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> PutRequest {
        PutRequest {
            key: key.into(),
            value: value.into(),
            ..PutRequest::default()
        }
    }

    /// Attach the key to a lease: it is deleted when the lease expires or is revoked.
    pub fn lease(mut self, id: i64) -> Self {
        self.lease = id;
        self
    }

    /// Return the key as it was before this put.
    pub fn prev_kv(mut self) -> Self {
        self.prev_kv = true;
        self
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct PutResponse {
    pub header: ResponseHeader,
    pub prev_kv: Option<KeyValue>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DeleteRequest {
    #[serde(with = "b64")]
    key: Vec<u8>,
    #[serde(with = "b64", skip_serializing_if = "Vec::is_empty")]
    range_end: Vec<u8>,
    #[serde(skip_serializing_if = "is_false")]
    prev_kv: bool,
}

impl DeleteRequest {
    pub fn key(key: impl Into<Vec<u8>>) -> DeleteRequest {
        DeleteRequest {
            key: key.into(),
            ..DeleteRequest::default()
        }
    }

    pub fn prefix(prefix: impl Into<Vec<u8>>) -> DeleteRequest {
        let key = prefix.into();
        DeleteRequest {
            range_end: prefix_end(&key),
            key,
            ..DeleteRequest::default()
        }
    }

    /// Return the deleted keys.
    pub fn prev_kv(mut self) -> Self {
        self.prev_kv = true;
        self
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct DeleteResponse {
    pub header: ResponseHeader,
    #[serde(with = "num")]
    pub deleted: i64,
    pub prev_kvs: Vec<KeyValue>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CompareOp {
    Equal,
    Greater,
    Less,
    NotEqual,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum CompareTarget {
    Version(i64),
    CreateRevision(i64),
    ModRevision(i64),
    Value(Vec<u8>),
    Lease(i64),
}

/// One condition of a transaction. `Compare::create_revision(key, Equal, 0)` is "the key does
/// not exist", the usual guard of a lock's put.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    key: Vec<u8>,
    range_end: Vec<u8>,
    op: CompareOp,
    target: CompareTarget,
}

impl Compare {
    fn new(key: impl Into<Vec<u8>>, op: CompareOp, target: CompareTarget) -> Compare {
        Compare {
            key: key.into(),
            range_end: Vec::new(),
            op,
            target,
        }
    }

    pub fn version(key: impl Into<Vec<u8>>, op: CompareOp, version: i64) -> Compare {
        Compare::new(key, op, CompareTarget::Version(version))
    }

    pub fn create_revision(key: impl Into<Vec<u8>>, op: CompareOp, revision: i64) -> Compare {
        Compare::new(key, op, CompareTarget::CreateRevision(revision))
    }

    pub fn mod_revision(key: impl Into<Vec<u8>>, op: CompareOp, revision: i64) -> Compare {
        Compare::new(key, op, CompareTarget::ModRevision(revision))
    }

    pub fn value(key: impl Into<Vec<u8>>, op: CompareOp, value: impl Into<Vec<u8>>) -> Compare {
        Compare::new(key, op, CompareTarget::Value(value.into()))
    }

    pub fn lease(key: impl Into<Vec<u8>>, op: CompareOp, id: i64) -> Compare {
        Compare::new(key, op, CompareTarget::Lease(id))
    }

    /// Apply the condition to every key starting with the key given (etcd 3.3 and newer):
    /// it holds when it holds for each of them.
    pub fn with_prefix(mut self) -> Self {
        self.range_end = prefix_end(&self.key);
        self
    }
}

/// The gateway wants the compared value in a field named after the target (`create_revision`,
/// `value`, ...), which derive cannot express for an enum beside other fields.
impl Serialize for Compare {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine;
        use base64::engine::general_purpose::STANDARD;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("result", &self.op)?;
        let (target, field, value) = match &self.target {
            CompareTarget::Version(n) => ("VERSION", "version", n.to_string()),
            CompareTarget::CreateRevision(n) => ("CREATE", "create_revision", n.to_string()),
            CompareTarget::ModRevision(n) => ("MOD", "mod_revision", n.to_string()),
            CompareTarget::Value(v) => ("VALUE", "value", STANDARD.encode(v)),
            CompareTarget::Lease(n) => ("LEASE", "lease", n.to_string()),
        };
        map.serialize_entry("target", target)?;
        map.serialize_entry("key", &STANDARD.encode(&self.key))?;
        if !self.range_end.is_empty() {
            map.serialize_entry("range_end", &STANDARD.encode(&self.range_end))?;
        }
        map.serialize_entry(field, &value)?;
        map.end()
    }
}

/// One operation of a transaction branch.
#[derive(Clone, Debug, Serialize)]
pub enum Op {
    #[serde(rename = "request_range")]
    Range(RangeRequest),
    #[serde(rename = "request_put")]
    Put(PutRequest),
    #[serde(rename = "request_delete_range")]
    Delete(DeleteRequest),
}

impl Op {
    fn writes(&self) -> bool {
        !matches!(self, Op::Range(_))
    }
}

/// If every `compare` holds, run `success`, else `failure`: atomically, as one revision.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Txn {
    compare: Vec<Compare>,
    success: Vec<Op>,
    failure: Vec<Op>,
}

impl Txn {
    pub fn new() -> Txn {
        Txn::default()
    }

    pub fn when(mut self, compare: impl IntoIterator<Item = Compare>) -> Self {
        self.compare.extend(compare);
        self
    }

    pub fn and_then(mut self, ops: impl IntoIterator<Item = Op>) -> Self {
        self.success.extend(ops);
        self
    }

    pub fn or_else(mut self, ops: impl IntoIterator<Item = Op>) -> Self {
        self.failure.extend(ops);
        self
    }

    /// A transaction that only reads may be sent again after a lost answer.
    pub(super) fn writes(&self) -> bool {
        self.success.iter().chain(&self.failure).any(Op::writes)
    }
}

/// The answer to one [`Op`], in the order of the branch that ran.
#[derive(Clone, Debug, Deserialize)]
pub enum OpResponse {
    #[serde(rename = "response_range")]
    Range(RangeResponse),
    #[serde(rename = "response_put")]
    Put(PutResponse),
    #[serde(rename = "response_delete_range")]
    Delete(DeleteResponse),
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct TxnResponse {
    pub header: ResponseHeader,
    /// Whether the compares held (so `success` ran) or not (`failure` ran).
    pub succeeded: bool,
    pub responses: Vec<OpResponse>,
}

/// A granted lease: its id, and the TTL etcd granted (it may raise a TTL below its minimum).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    pub id: i64,
    pub ttl_secs: i64,
    /// The store's revision when the lease was granted.
    pub revision: i64,
}

#[derive(Serialize)]
pub(super) struct LeaseGrantRequest {
    #[serde(rename = "TTL", with = "num")]
    pub ttl: i64,
}

#[derive(Serialize)]
pub(super) struct LeaseIdRequest {
    #[serde(rename = "ID", with = "num")]
    pub id: i64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct LeaseAnswer {
    pub header: ResponseHeader,
    #[serde(rename = "ID", with = "num")]
    pub id: i64,
    #[serde(rename = "TTL", with = "num")]
    pub ttl: i64,
    pub error: String,
}

/// `/v3/lease/keepalive` is a stream: each frame wraps its answer in `result`.
#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct LeaseKeepAliveFrame {
    pub result: Option<LeaseAnswer>,
}

#[derive(Serialize)]
pub(super) struct Empty {}

#[derive(Serialize)]
pub(super) struct AuthenticateRequest<'a> {
    pub name: &'a str,
    pub password: &'a str,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct AuthenticateResponse {
    pub token: String,
}

/// One member of the cluster, as the member list gives it.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Member {
    #[serde(rename = "ID", with = "num")]
    pub id: u64,
    pub name: String,
    #[serde(rename = "peerURLs")]
    pub peer_urls: Vec<String>,
    /// Empty for a member that was added but has not started yet.
    #[serde(rename = "clientURLs")]
    pub client_urls: Vec<String>,
    #[serde(rename = "isLearner")]
    pub is_learner: bool,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct MemberListResponse {
    pub members: Vec<Member>,
}

/// One member's own view: its id, the leader it follows (0: none), raft progress.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Status {
    pub header: ResponseHeader,
    pub version: String,
    #[serde(rename = "dbSize", with = "num")]
    pub db_size: i64,
    #[serde(with = "num")]
    pub leader: u64,
    #[serde(rename = "raftIndex", with = "num")]
    pub raft_index: u64,
    #[serde(rename = "raftTerm", with = "num")]
    pub raft_term: u64,
    /// Alarms such as "NOSPACE" (3.4 and newer).
    pub errors: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum EventKind {
    #[default]
    #[serde(rename = "PUT")]
    Put,
    #[serde(rename = "DELETE")]
    Delete,
}

/// One change seen by a watch. For a delete, `kv` carries only the key and the deleting
/// revision (`mod_revision`); ask for [`WatchRequest::prev_kv`] to learn what was deleted,
/// its `create_revision` included.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: EventKind,
    pub kv: KeyValue,
    pub prev_kv: Option<KeyValue>,
}

/// What to watch, and from which revision.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WatchRequest {
    #[serde(with = "b64")]
    key: Vec<u8>,
    #[serde(with = "b64", skip_serializing_if = "Vec::is_empty")]
    range_end: Vec<u8>,
    #[serde(with = "num", skip_serializing_if = "is_zero")]
    pub(super) start_revision: i64,
    #[serde(skip_serializing_if = "is_false")]
    prev_kv: bool,
}

impl WatchRequest {
    pub fn key(key: impl Into<Vec<u8>>) -> WatchRequest {
        WatchRequest {
            key: key.into(),
            ..WatchRequest::default()
        }
    }

    pub fn prefix(prefix: impl Into<Vec<u8>>) -> WatchRequest {
        let key = prefix.into();
        WatchRequest {
            range_end: prefix_end(&key),
            key,
            ..WatchRequest::default()
        }
    }

    /// Deliver every change from `revision` on (inclusive), history first. Without it the
    /// watch starts after the revision current when it is created. Reading a range and then
    /// watching from its header revision + 1 misses nothing in between.
    pub fn start_revision(mut self, revision: i64) -> Self {
        self.start_revision = revision;
        self
    }

    /// Deleted (and overwritten) keys come with their previous value: see [`Event`].
    pub fn prev_kv(mut self) -> Self {
        self.prev_kv = true;
        self
    }
}

#[derive(Serialize)]
pub(super) struct WatchCreate<'a> {
    pub create_request: &'a WatchRequest,
}

/// One frame of the `/v3/watch` stream: a `result`, or an `error` when the gateway's stream
/// itself fails (its shape differs between gateway versions, so it stays untyped).
#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct WatchFrame {
    pub result: Option<WatchResult>,
    pub error: Option<serde_json::Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct WatchResult {
    pub header: ResponseHeader,
    pub created: bool,
    pub canceled: bool,
    #[serde(with = "num")]
    pub compact_revision: i64,
    pub cancel_reason: String,
    pub events: Vec<Event>,
}

/// An error answer of the gateway: `{"error": ..., "message": ..., "code": N}` (gRPC code).
#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct ErrorBody {
    pub error: String,
    pub message: String,
    pub code: i32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_follows_etcd() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }
}
