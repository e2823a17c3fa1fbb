//! The wire protocol: request lines in, reply lines out.
//!
//! Pure: no sockets, no clocks. The server hands this module the bytes of one line and gets back a
//! typed request, or the exact error reply the client must see. Every byte a client can observe is
//! decided here or in [`Reply`], so compatibility with tcpnetlock 0.1.8 is checked in one file.
//!
//! A line is `action[,key:value]*`. Whitespace around the action, keys and values is ignored,
//! a trailing `\r` (telnet) with it. A parameter without `:` has an empty value; when a key repeats,
//! the last value wins (both as in 0.1.8). See docs/PROTOCOL.md.
//!
//! Protocol v2 adds opt-in parameters to `lock` (`wait`, `fencing`, `max`, `ttl`) and the
//! `.locks` action; a v1 request gets exactly the v1 bytes back.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

/// Longest lock name accepted unless the server is told otherwise.
pub const DEFAULT_MAX_NAME_LEN: usize = 128;
/// Longest client-id accepted. Not configurable: it only labels a holder.
pub const MAX_CLIENT_ID_LEN: usize = 128;
/// Longest `wait:` and `ttl:`: one week.
pub const MAX_SECONDS: u64 = 7 * 24 * 3600;
/// Largest `max:` (semaphore size).
pub const MAX_HOLDERS: u32 = 65_535;

/// One request line split into its action and parameters, borrowing from the line.
///
/// ```
/// use tcpnetlock::protocol::Line;
///
/// let line = Line::split(b" lock , name : a ,wait:5\r")?;
/// assert_eq!(line.action, "lock");
/// assert_eq!(line.param("name"), Some("a"));
/// # Ok::<(), tcpnetlock::protocol::Reply>(())
/// ```
#[derive(Debug, PartialEq, Eq)]
pub struct Line<'a> {
    /// What is asked: `lock`, `.ping`, `release`, ...
    pub action: &'a str,
    params: Vec<(&'a str, &'a str)>,
}

impl<'a> Line<'a> {
    /// Splits a line (without its `\n`). Fails only on invalid UTF-8.
    ///
    /// ```
    /// use tcpnetlock::protocol::{Line, Reply};
    ///
    /// assert_eq!(Line::split(b"release")?.action, "release");
    /// assert_eq!(Line::split(b"lock,name:\xff"), Err(Reply::BadRequest));
    /// # Ok::<(), Reply>(())
    /// ```
    pub fn split(bytes: &'a [u8]) -> Result<Line<'a>, Reply> {
        let text = std::str::from_utf8(bytes).map_err(|_| Reply::BadRequest)?;
        let mut parts = text.split(',');
        let action = parts.next().unwrap_or("").trim();
        let params = parts
            .map(|p| match p.split_once(':') {
                Some((k, v)) => (k.trim(), v.trim()),
                None => (p.trim(), ""),
            })
            .collect();
        Ok(Line { action, params })
    }

    /// The value of `key`; the last one when it repeats. A parameter without `:` has an empty
    /// value.
    ///
    /// ```
    /// use tcpnetlock::protocol::Line;
    ///
    /// let line = Line::split(b"lock,name:a,name:b,fencing")?;
    /// assert_eq!(line.param("name"), Some("b"));
    /// assert_eq!(line.param("fencing"), Some(""));
    /// assert_eq!(line.param("wait"), None);
    /// # Ok::<(), tcpnetlock::protocol::Reply>(())
    /// ```
    pub fn param(&self, key: &str) -> Option<&'a str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
    }

    /// 0.1.8's rule for a first request: the action and every key are non-empty.
    fn is_well_formed(&self) -> bool {
        !self.action.is_empty() && self.params.iter().all(|(k, _)| !k.is_empty())
    }
}

/// A connection's first request.
///
/// ```
/// use tcpnetlock::protocol::{DEFAULT_MAX_NAME_LEN, Request};
///
/// assert_eq!(Request::parse(b".ping", DEFAULT_MAX_NAME_LEN), Ok(Request::Ping));
/// match Request::parse(b"lock,name:deploy", DEFAULT_MAX_NAME_LEN) {
///     Ok(Request::Lock(lock)) => assert_eq!(lock.name, "deploy"),
///     other => panic!("{other:?}"),
/// }
/// ```
#[derive(Debug, PartialEq, Eq)]
pub enum Request<'a> {
    /// `lock,name:NAME[,...]`: take a lock; the connection then holds it.
    Lock(LockRequest<'a>),
    /// `.ping`, answered `pong`.
    Ping,
    /// `.ping,serving:1`: `pong` only if this server can grant locks now, else an `err,` line
    /// saying why (a cluster member cut off from etcd). Servers before 0.3 (and 0.1.8) ignore
    /// the parameter and answer `pong`, so a health check may send it to any server.
    PingServing,
    /// `.info`, answered `info,{json}`: what a client may want to know before asking for a
    /// lock (version; for a cluster member, the longest `ttl` it can vouch for).
    Info,
    /// `.stats`, answered `stats,{json}`.
    Stats,
    /// `.locks`, answered `locks,{json}`.
    Locks,
    /// `.server-shutdown` (0.1.8's; refused by a tcpnetlock server unless enabled).
    Shutdown,
}

/// A `lock` request's parameters.
///
/// ```
/// use std::time::Duration;
/// use tcpnetlock::protocol::{DEFAULT_MAX_NAME_LEN, Request};
///
/// let line = b"lock,name:catalog,shared:1,wait:2.5";
/// let Ok(Request::Lock(lock)) = Request::parse(line, DEFAULT_MAX_NAME_LEN) else { panic!() };
/// assert!(lock.shared);
/// assert_eq!(lock.wait, Some(Duration::from_millis(2500)));
/// assert_eq!(lock.max, 1);
/// ```
#[derive(Debug, PartialEq, Eq)]
pub struct LockRequest<'a> {
    /// `name:NAME`, checked by [`valid_lock_name`].
    pub name: &'a str,
    /// `client-id:ID`, checked by [`valid_client_id`]: labels the holder.
    pub client_id: Option<&'a str>,
    /// `wait:S` — queue for up to S instead of being refused.
    pub wait: Option<Duration>,
    /// `fencing:1` — the grant line carries the token.
    pub fencing: bool,
    /// `max:K` — up to K holders at once; 1 for a plain lock.
    pub max: u32,
    /// `ttl:S` — revoke the lock after S without a request from the holder.
    pub ttl: Option<Duration>,
    /// `shared:1` — hold in shared mode: beside other shared holders, never an exclusive one.
    pub shared: bool,
}

impl<'a> LockRequest<'a> {
    fn parse(line: &Line<'a>, max_name_len: usize) -> Result<LockRequest<'a>, Reply> {
        const KNOWN: [&str; 7] = [
            "name",
            "client-id",
            "wait",
            "fencing",
            "max",
            "ttl",
            "shared",
        ];
        // A typo such as `wiat:30` must not silently become a try-lock.
        if let Some((key, _)) = line.params.iter().find(|(k, _)| !KNOWN.contains(k)) {
            let msg = format!("unknown parameter {}", printable(key));
            return Err(Reply::Err(msg.into()));
        }
        let name = line.param("name").unwrap_or("");
        if !valid_lock_name(name, max_name_len) {
            return Err(Reply::err("invalid lock name"));
        }
        let client_id = line.param("client-id");
        if client_id.is_some_and(|id| !valid_client_id(id)) {
            return Err(Reply::err("invalid client-id"));
        }
        let wait = match line.param("wait") {
            None => None,
            Some(v) => Some(parse_seconds(v).ok_or(Reply::err(
                "invalid wait: expected seconds from 0 to 604800",
            ))?),
        };
        let ttl = match line.param("ttl") {
            None => None,
            Some(v) => Some(parse_seconds(v).filter(|d| !d.is_zero()).ok_or(Reply::err(
                "invalid ttl: expected seconds above 0, at most 604800",
            ))?),
        };
        let fencing = match line.param("fencing") {
            None | Some("0") => false,
            Some("1") => true,
            Some(_) => return Err(Reply::err("invalid fencing: expected 0 or 1")),
        };
        let max = match line.param("max") {
            None => 1,
            Some(v) => v
                .parse::<u32>()
                .ok()
                .filter(|k| (1..=MAX_HOLDERS).contains(k) && v.bytes().all(|b| b.is_ascii_digit()))
                .ok_or(Reply::err("invalid max: expected 1 to 65535"))?,
        };
        let shared = match line.param("shared") {
            None | Some("0") => false,
            Some("1") => true,
            Some(_) => return Err(Reply::err("invalid shared: expected 0 or 1")),
        };
        if shared && max != 1 {
            // A shared lock has any number of holders; a semaphore's K would have no meaning.
            return Err(Reply::err(
                "shared:1 cannot be combined with max (a shared lock has any number of holders)",
            ));
        }
        Ok(LockRequest {
            name,
            client_id,
            wait,
            fencing,
            max,
            ttl,
            shared,
        })
    }
}

/// Decimal seconds, `[0-9]+(.[0-9]{1,9})?`, at most [`MAX_SECONDS`]. Stricter than a float parse:
/// no sign, exponent, `inf` or `NaN`.
///
/// ```
/// use std::time::Duration;
/// use tcpnetlock::protocol::parse_seconds;
///
/// assert_eq!(parse_seconds("2.5"), Some(Duration::from_millis(2500)));
/// assert_eq!(parse_seconds("1e3"), None);
/// assert_eq!(parse_seconds("604801"), None); // over a week
/// ```
pub fn parse_seconds(text: &str) -> Option<Duration> {
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || (text.contains('.') && (!digits(frac) || frac.len() > 9)) {
        return None;
    }
    let secs: u64 = whole.parse().ok().filter(|s| *s <= MAX_SECONDS)?;
    let nanos: u32 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().ok()?
    };
    let d = Duration::new(secs, nanos);
    (d <= Duration::from_secs(MAX_SECONDS)).then_some(d)
}

/// Longest client text echoed in an error line, in characters, escapes included.
const ECHO_CHARS: usize = 64;

/// Client text echoed in an error line (and so in the server's log): every character that does
/// not print as itself is escaped as Rust writes it (`\u{202e}`, `\t`), a backslash as `\\`,
/// so that nothing a client sends can end the line or reorder or hide text on the reader's
/// screen. That is C0 and C1 controls, line and paragraph separators (U+2028, U+2029), bidi
/// controls (U+200E, U+202A–U+202E, U+2066–U+2069) and every other format character, spaces
/// other than ' ', unassigned and private-use code points, and combining marks. At most
/// [`ECHO_CHARS`] characters: an escape is not cut.
fn printable(text: &str) -> String {
    let mut out = String::new();
    let mut len = 0;
    for c in text.chars() {
        let escaped: String = match c {
            // escape_debug quotes these for a Rust literal; on their own they print as themselves.
            '\'' | '"' => c.into(),
            _ => c.escape_debug().collect(),
        };
        len += escaped.chars().count();
        if len > ECHO_CHARS {
            break;
        }
        out.push_str(&escaped);
    }
    out
}

impl<'a> Request<'a> {
    /// Parses a first request, with names up to `max_name_len` long. The error is the reply
    /// to send before closing.
    ///
    /// ```
    /// use tcpnetlock::protocol::{Reply, Request};
    ///
    /// assert_eq!(Request::parse(b"hello", 128), Err(Reply::BadAction));
    /// assert_eq!(Request::parse(b"lock,name:abcd", 3), Err(Reply::err("invalid lock name")));
    /// ```
    pub fn parse(bytes: &'a [u8], max_name_len: usize) -> Result<Request<'a>, Reply> {
        let line = Line::split(bytes)?;
        if !line.is_well_formed() {
            return Err(Reply::BadRequest);
        }
        match line.action {
            "lock" => Ok(Request::Lock(LockRequest::parse(&line, max_name_len)?)),
            // Other parameters of `.ping` are ignored, as 0.1.8 ignores them all.
            ".ping" if line.param("serving") == Some("1") => Ok(Request::PingServing),
            ".ping" => Ok(Request::Ping),
            ".info" => Ok(Request::Info),
            ".stats" => Ok(Request::Stats),
            ".locks" => Ok(Request::Locks),
            ".server-shutdown" => Ok(Request::Shutdown),
            _ => Err(Reply::BadAction),
        }
    }
}

/// A request from a client that holds a lock. 0.1.8 looks only at the action here: parameters are
/// ignored and an empty action is a `bad-action`, not a `bad-request`.
///
/// ```
/// use tcpnetlock::protocol::{HeldRequest, Reply};
///
/// assert_eq!(HeldRequest::parse(b"release"), Ok(HeldRequest::Release));
/// assert_eq!(HeldRequest::parse(b".keepalive"), Ok(HeldRequest::Renew));
/// assert_eq!(HeldRequest::parse(b"lock,name:a"), Err(Reply::BadAction));
/// ```
#[derive(Debug, PartialEq, Eq)]
pub enum HeldRequest {
    /// `release`: let the lock go, answered `released`.
    Release,
    /// `.keepalive`: renews a lease (any request does), answered `alive`.
    Renew,
}

impl HeldRequest {
    /// Parses a request from a holder; the error is the reply to send (the lock stays held).
    ///
    /// ```
    /// use tcpnetlock::protocol::{HeldRequest, Reply};
    ///
    /// assert_eq!(HeldRequest::parse(b" release ,x:y\r"), Ok(HeldRequest::Release));
    /// assert_eq!(HeldRequest::parse(b""), Err(Reply::BadAction));
    /// ```
    pub fn parse(bytes: &[u8]) -> Result<HeldRequest, Reply> {
        match Line::split(bytes)?.action {
            "release" => Ok(HeldRequest::Release),
            ".keepalive" => Ok(HeldRequest::Renew),
            _ => Err(Reply::BadAction),
        }
    }
}

/// `[A-Za-z0-9_-]{1,max_len}`, as 0.1.8 plus a length limit.
///
/// ```
/// use tcpnetlock::protocol::valid_lock_name;
///
/// assert!(valid_lock_name("django-migrations", 128));
/// assert!(!valid_lock_name("a.b", 128));
/// assert!(!valid_lock_name("abcd", 3));
/// ```
pub fn valid_lock_name(name: &str, max_len: usize) -> bool {
    !name.is_empty()
        && name.len() <= max_len
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `[A-Za-z0-9.@_-]{1,128}`.
///
/// ```
/// use tcpnetlock::protocol::valid_client_id;
///
/// assert!(valid_client_id("pod-1.ns@x"));
/// assert!(!valid_client_id("a b"));
/// ```
pub fn valid_client_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_CLIENT_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.@".contains(&b))
}

/// Every line the server writes. `Display` gives the line without its `\n`.
///
/// ```
/// use tcpnetlock::protocol::Reply;
///
/// assert_eq!(Reply::NotGranted.to_string(), "not-granted");
/// assert_eq!(Reply::err("invalid lock name").to_string(), "err,invalid lock name");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `ok`: granted.
    Ok,
    /// `not-granted`: somebody else holds it (and the wait, if any, ran out).
    NotGranted,
    /// `released`: the holder's `release` is done; the next client can have the lock.
    Released,
    /// `alive`: the answer to `.keepalive` (a lease renewal).
    Alive,
    /// `pong`: the answer to `.ping`.
    Pong,
    /// `shutting-down`: the answer to an allowed `.server-shutdown`.
    ShuttingDown,
    /// `bad-action`: an action this server does not know (0.1.8's answer).
    BadAction,
    /// `bad-request`: a line that is not `action[,key:value]*` (0.1.8's answer).
    BadRequest,
    /// `ok,token:N`: a grant asked for with `fencing:1`.
    OkToken(u64),
    /// A lease ran out (`ttl:`); the connection closes after it.
    Expired,
    /// `err,<message>`; the message never contains a newline.
    Err(Cow<'static, str>),
    /// `stats,<json>`.
    Stats(String),
    /// `locks,<json>`.
    Locks(String),
    /// `info,<json>`.
    Info(String),
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reply::Ok => f.write_str("ok"),
            Reply::NotGranted => f.write_str("not-granted"),
            Reply::Released => f.write_str("released"),
            Reply::Alive => f.write_str("alive"),
            Reply::Pong => f.write_str("pong"),
            Reply::ShuttingDown => f.write_str("shutting-down"),
            Reply::BadAction => f.write_str("bad-action"),
            Reply::BadRequest => f.write_str("bad-request"),
            Reply::OkToken(token) => write!(f, "ok,token:{token}"),
            Reply::Expired => f.write_str("expired"),
            Reply::Err(msg) => write!(f, "err,{msg}"),
            Reply::Stats(json) => write!(f, "stats,{json}"),
            Reply::Locks(json) => write!(f, "locks,{json}"),
            Reply::Info(json) => write!(f, "info,{json}"),
        }
    }
}

impl Reply {
    /// `err,<message>` with a message known when compiling.
    ///
    /// ```
    /// use tcpnetlock::protocol::Reply;
    ///
    /// assert_eq!(Reply::err("server busy").to_line(), b"err,server busy\n");
    /// ```
    pub fn err(message: &'static str) -> Reply {
        Reply::Err(Cow::Borrowed(message))
    }

    /// The grant line: `ok`, or `ok,token:N` when the client asked for fencing.
    ///
    /// ```
    /// use tcpnetlock::protocol::Reply;
    ///
    /// assert_eq!(Reply::granted(7, false), Reply::Ok);
    /// assert_eq!(Reply::granted(7, true).to_string(), "ok,token:7");
    /// ```
    pub fn granted(token: u64, fencing: bool) -> Reply {
        if fencing {
            Reply::OkToken(token)
        } else {
            Reply::Ok
        }
    }

    /// The reply as it goes on the wire, `\n` included.
    ///
    /// ```
    /// use tcpnetlock::protocol::Reply;
    ///
    /// assert_eq!(Reply::Released.to_line(), b"released\n");
    /// ```
    pub fn to_line(&self) -> Vec<u8> {
        format!("{self}\n").into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl<'a> LockRequest<'a> {
        /// A plain v1 lock request.
        fn plain(name: &'a str) -> LockRequest<'a> {
            LockRequest {
                name,
                client_id: None,
                wait: None,
                fencing: false,
                max: 1,
                ttl: None,
                shared: false,
            }
        }
    }

    fn parse(line: &str) -> Result<Request<'_>, Reply> {
        Request::parse(line.as_bytes(), DEFAULT_MAX_NAME_LEN)
    }

    fn lock(name: &str, client_id: Option<&str>) -> Request<'static> {
        let name: &'static str = Box::leak(name.to_owned().into_boxed_str());
        let client_id = client_id.map(|c| &*Box::leak(c.to_owned().into_boxed_str()));
        Request::Lock(LockRequest {
            client_id,
            ..LockRequest::plain(name)
        })
    }

    fn lock_v2(line: &str) -> LockRequest<'_> {
        match parse(line) {
            Ok(Request::Lock(r)) => r,
            other => panic!("{line}: {other:?}"),
        }
    }

    #[test]
    fn v2_parameters() {
        let r = lock_v2("lock,name:a,wait:2.5,fencing:1,max:3,ttl:10,client-id:c");
        assert_eq!(r.wait, Some(Duration::from_millis(2500)));
        assert!(r.fencing);
        assert_eq!(r.max, 3);
        assert_eq!(r.ttl, Some(Duration::from_secs(10)));
        assert_eq!(r.client_id, Some("c"));
        assert_eq!(lock_v2("lock,name:a,wait:0").wait, Some(Duration::ZERO));
        assert!(!lock_v2("lock,name:a,fencing:0").fencing);
        assert_eq!(lock_v2("lock,name:a,max:65535").max, 65535);
        assert_eq!(
            lock_v2("lock,name:a,wait:604800.000000000").wait,
            Some(Duration::from_secs(604_800))
        );
        assert_eq!(
            lock_v2("lock,name:a,ttl:0.000000001").ttl,
            Some(Duration::from_nanos(1))
        );
        // Last value wins, as for every parameter.
        assert_eq!(lock_v2("lock,name:a,max:2,max:4").max, 4);
        assert_eq!(parse("lock,name:a"), Ok(lock("a", None)));
    }

    #[test]
    fn v2_bad_values() {
        let cases = [
            (
                "wait",
                [
                    "-1",
                    "1e3",
                    "NaN",
                    "inf",
                    "",
                    "1.",
                    ".5",
                    "604800.1",
                    "999999999999999999999",
                    "1.0000000001",
                    "+1",
                    " 1x",
                ],
            ),
            (
                "ttl",
                [
                    "0", "0.0", "-1", "NaN", "", "604801", "abc", "1,5", "1:5", "0x10", "1_0", "½",
                ],
            ),
        ];
        for (key, values) in cases {
            for v in values {
                let line = format!("lock,name:a,{key}:{v}");
                match parse(&line) {
                    Err(Reply::Err(msg)) => assert!(
                        msg.starts_with(&format!("invalid {key}"))
                            || msg.starts_with("unknown parameter"),
                        "{line}: {msg}"
                    ),
                    other => panic!("{line}: {other:?}"),
                }
            }
        }
        for v in ["0", "65536", "-1", "1.5", "", "+2", "x", "4294967297"] {
            let line = format!("lock,name:a,max:{v}");
            assert_eq!(
                parse(&line),
                Err(Reply::err("invalid max: expected 1 to 65535")),
                "{line}"
            );
        }
        for v in ["2", "yes", "true", ""] {
            let line = format!("lock,name:a,fencing:{v}");
            assert_eq!(
                parse(&line),
                Err(Reply::err("invalid fencing: expected 0 or 1")),
                "{line}"
            );
        }
    }

    #[test]
    fn unknown_parameters_are_refused() {
        assert_eq!(
            parse("lock,name:a,wiat:30"),
            Err(Reply::Err("unknown parameter wiat".into()))
        );
        assert_eq!(
            parse("lock,name:a,color"),
            Err(Reply::Err("unknown parameter color".into()))
        );
        let long = "k".repeat(100);
        match parse(&format!("lock,name:a,{long}:1")) {
            Err(Reply::Err(msg)) => assert_eq!(msg.len(), "unknown parameter ".len() + 64),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse("lock,name:a,\u{7}:1"),
            Err(Reply::Err("unknown parameter \\u{7}".into()))
        );
    }

    #[test]
    fn echoed_text_escapes_what_does_not_print_as_itself() {
        for (raw, echoed) in [
            (
                "a\u{2028}b\u{2029}\u{202e}\u{200e}\u{2066}\u{feff}\u{ad}",
                "a\\u{2028}b\\u{2029}\\u{202e}\\u{200e}\\u{2066}\\u{feff}\\u{ad}",
            ),
            (
                "\u{85}\u{9b}\u{1b}\t\\\u{a0}\u{e000}\u{10ffff}",
                "\\u{85}\\u{9b}\\u{1b}\\t\\\\\\u{a0}\\u{e000}\\u{10ffff}",
            ),
            ("'\"é日 x", "'\"é日 x"),
        ] {
            assert_eq!(printable(raw), echoed, "{raw:?}");
        }
        // 62 characters, then an escape that would pass 64: cut before it, not inside.
        let text = format!("{}\u{2028}", "k".repeat(62));
        assert_eq!(printable(&text), "k".repeat(62));
        let text = format!("{}\u{2028}", "k".repeat(56));
        assert_eq!(printable(&text), format!("{}\\u{{2028}}", "k".repeat(56)));
    }

    #[test]
    fn lock_requests() {
        assert_eq!(parse("lock,name:a"), Ok(lock("a", None)));
        assert_eq!(
            parse("lock,name:django-migrations,client-id:pod-1.ns@x"),
            Ok(lock("django-migrations", Some("pod-1.ns@x")))
        );
        assert_eq!(
            parse(" lock , name : space_is_ignored \r"),
            Ok(lock("space_is_ignored", None))
        );
        assert_eq!(parse("lock,name:a,name:b"), Ok(lock("b", None)));
    }

    #[test]
    fn invalid_lock_names() {
        for line in [
            "lock",
            "lock,name",
            "lock,name:",
            "lock,name:a b",
            "lock,name:a.b",
            "lock,name:ñ",
            "lock,name:a/b",
            "lock,client-id:x",
        ] {
            assert_eq!(parse(line), Err(Reply::err("invalid lock name")), "{line}");
        }
        let longest = "n".repeat(DEFAULT_MAX_NAME_LEN);
        assert!(parse(&format!("lock,name:{longest}")).is_ok());
        assert_eq!(
            parse(&format!("lock,name:{longest}n")),
            Err(Reply::err("invalid lock name"))
        );
        assert_eq!(
            Request::parse(b"lock,name:abcd", 3),
            Err(Reply::err("invalid lock name"))
        );
    }

    #[test]
    fn invalid_client_ids() {
        for id in ["", "a b", "a:b", "x/y", &"c".repeat(MAX_CLIENT_ID_LEN + 1)] {
            let line = format!("lock,name:a,client-id:{id}");
            assert_eq!(parse(&line), Err(Reply::err("invalid client-id")), "{line}");
        }
    }

    #[test]
    fn other_first_requests() {
        assert_eq!(parse(".ping"), Ok(Request::Ping));
        assert_eq!(parse(" .ping \r"), Ok(Request::Ping));
        assert_eq!(parse(".ping,serving:1"), Ok(Request::PingServing));
        assert_eq!(parse(".ping,serving:0"), Ok(Request::Ping));
        assert_eq!(parse(".ping,anything:x"), Ok(Request::Ping));
        assert_eq!(parse(".info"), Ok(Request::Info));
        assert_eq!(parse(".stats"), Ok(Request::Stats));
        assert_eq!(parse(".locks"), Ok(Request::Locks));
        assert_eq!(parse(".server-shutdown"), Ok(Request::Shutdown));
        assert_eq!(parse("release"), Err(Reply::BadAction));
        assert_eq!(parse(".keepalive"), Err(Reply::BadAction));
        assert_eq!(parse("LOCK,name:a"), Err(Reply::BadAction));
        assert_eq!(parse("hello"), Err(Reply::BadAction));
    }

    #[test]
    fn malformed_first_requests() {
        for line in [
            "",
            "  ",
            "\r",
            ",name:a",
            "lock,:a",
            "lock,name:a,",
            "lock, :x",
        ] {
            assert_eq!(parse(line), Err(Reply::BadRequest), "{line:?}");
        }
        assert_eq!(
            Request::parse(b"lock,name:\xff", 128),
            Err(Reply::BadRequest)
        );
    }

    #[test]
    fn held_requests() {
        assert_eq!(HeldRequest::parse(b"release"), Ok(HeldRequest::Release));
        assert_eq!(
            HeldRequest::parse(b" release ,x:y\r"),
            Ok(HeldRequest::Release)
        );
        assert_eq!(HeldRequest::parse(b".keepalive"), Ok(HeldRequest::Renew));
        assert_eq!(HeldRequest::parse(b""), Err(Reply::BadAction));
        assert_eq!(HeldRequest::parse(b"lock,name:a"), Err(Reply::BadAction));
        assert_eq!(HeldRequest::parse(b"\xc3"), Err(Reply::BadRequest));
    }

    #[test]
    fn reply_bytes() {
        let cases: [(Reply, &[u8]); 14] = [
            (Reply::granted(7, false), b"ok\n"),
            (Reply::granted(7, true), b"ok,token:7\n"),
            (Reply::Expired, b"expired\n"),
            (Reply::Locks("{}".into()), b"locks,{}\n"),
            (Reply::Ok, b"ok\n"),
            (Reply::NotGranted, b"not-granted\n"),
            (Reply::Released, b"released\n"),
            (Reply::Alive, b"alive\n"),
            (Reply::Pong, b"pong\n"),
            (Reply::ShuttingDown, b"shutting-down\n"),
            (Reply::BadAction, b"bad-action\n"),
            (Reply::BadRequest, b"bad-request\n"),
            (Reply::err("invalid lock name"), b"err,invalid lock name\n"),
            (Reply::Stats("{}".into()), b"stats,{}\n"),
        ];
        for (reply, bytes) in cases {
            assert_eq!(reply.to_line(), bytes);
        }
    }
}
