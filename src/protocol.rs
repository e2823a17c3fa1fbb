//! The wire protocol: request lines in, reply lines out.
//!
//! Pure: no sockets, no clocks. The server hands this module the bytes of one line and gets back a
//! typed request, or the exact error reply the client must see. Every byte a client can observe is
//! decided here or in [`Reply`], so compatibility with tcpnetlock 0.1.8 is checked in one file.
//!
//! A line is `action[,key:value]*`. Whitespace around the action, keys and values is ignored,
//! a trailing `\r` (telnet) with it. A parameter without `:` has an empty value; when a key repeats,
//! the last value wins (both as in 0.1.8). See docs/PROTOCOL.md.

use std::fmt;

/// Longest lock name accepted unless the server is told otherwise.
pub const DEFAULT_MAX_NAME_LEN: usize = 128;
/// Longest client-id accepted. Not configurable: it only labels a holder.
pub const MAX_CLIENT_ID_LEN: usize = 128;

/// One request line split into its action and parameters, borrowing from the line.
#[derive(Debug, PartialEq, Eq)]
pub struct Line<'a> {
    pub action: &'a str,
    params: Vec<(&'a str, &'a str)>,
}

impl<'a> Line<'a> {
    /// Splits a line (without its `\n`). Fails only on invalid UTF-8.
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

    /// The value of `key`; the last one when it repeats.
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
#[derive(Debug, PartialEq, Eq)]
pub enum Request<'a> {
    Lock(LockRequest<'a>),
    Ping,
    Stats,
    Shutdown,
}

#[derive(Debug, PartialEq, Eq)]
pub struct LockRequest<'a> {
    pub name: &'a str,
    pub client_id: Option<&'a str>,
}

impl<'a> Request<'a> {
    /// Parses a first request. The error is the reply to send before closing.
    pub fn parse(bytes: &'a [u8], max_name_len: usize) -> Result<Request<'a>, Reply> {
        let line = Line::split(bytes)?;
        if !line.is_well_formed() {
            return Err(Reply::BadRequest);
        }
        match line.action {
            "lock" => {
                let name = line.param("name").unwrap_or("");
                if !valid_lock_name(name, max_name_len) {
                    return Err(Reply::Err("invalid lock name"));
                }
                let client_id = line.param("client-id");
                if client_id.is_some_and(|id| !valid_client_id(id)) {
                    return Err(Reply::Err("invalid client-id"));
                }
                Ok(Request::Lock(LockRequest { name, client_id }))
            }
            ".ping" => Ok(Request::Ping),
            ".stats" => Ok(Request::Stats),
            ".server-shutdown" => Ok(Request::Shutdown),
            _ => Err(Reply::BadAction),
        }
    }
}

/// A request from a client that holds a lock. 0.1.8 looks only at the action here: parameters are
/// ignored and an empty action is a `bad-action`, not a `bad-request`.
#[derive(Debug, PartialEq, Eq)]
pub enum HeldRequest {
    Release,
    Keepalive,
}

impl HeldRequest {
    pub fn parse(bytes: &[u8]) -> Result<HeldRequest, Reply> {
        match Line::split(bytes)?.action {
            "release" => Ok(HeldRequest::Release),
            ".keepalive" => Ok(HeldRequest::Keepalive),
            _ => Err(Reply::BadAction),
        }
    }
}

/// `[A-Za-z0-9_-]{1,max}`, as 0.1.8 plus a length limit.
pub fn valid_lock_name(name: &str, max_len: usize) -> bool {
    !name.is_empty()
        && name.len() <= max_len
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `[A-Za-z0-9.@_-]{1,128}`.
pub fn valid_client_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_CLIENT_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.@".contains(&b))
}

/// Every line the server writes. `Display` gives the line without its `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok,
    NotGranted,
    Released,
    Alive,
    Pong,
    ShuttingDown,
    BadAction,
    BadRequest,
    /// `err,<message>`; the message never contains a newline.
    Err(&'static str),
    /// `stats,<json>`.
    Stats(String),
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
            Reply::Err(msg) => write!(f, "err,{msg}"),
            Reply::Stats(json) => write!(f, "stats,{json}"),
        }
    }
}

impl Reply {
    /// The reply as it goes on the wire, `\n` included.
    pub fn to_line(&self) -> Vec<u8> {
        format!("{self}\n").into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Request<'_>, Reply> {
        Request::parse(line.as_bytes(), DEFAULT_MAX_NAME_LEN)
    }

    fn lock(name: &str, client_id: Option<&str>) -> Request<'static> {
        let name: &'static str = Box::leak(name.to_owned().into_boxed_str());
        let client_id = client_id.map(|c| &*Box::leak(c.to_owned().into_boxed_str()));
        Request::Lock(LockRequest { name, client_id })
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
        // 0.1.8 ignores parameters it does not know.
        assert_eq!(parse("lock,name:a,color:blue"), Ok(lock("a", None)));
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
            assert_eq!(parse(line), Err(Reply::Err("invalid lock name")), "{line}");
        }
        let longest = "n".repeat(DEFAULT_MAX_NAME_LEN);
        assert!(parse(&format!("lock,name:{longest}")).is_ok());
        assert_eq!(
            parse(&format!("lock,name:{longest}n")),
            Err(Reply::Err("invalid lock name"))
        );
        assert_eq!(
            Request::parse(b"lock,name:abcd", 3),
            Err(Reply::Err("invalid lock name"))
        );
    }

    #[test]
    fn invalid_client_ids() {
        for id in ["", "a b", "a:b", "x/y", &"c".repeat(MAX_CLIENT_ID_LEN + 1)] {
            let line = format!("lock,name:a,client-id:{id}");
            assert_eq!(parse(&line), Err(Reply::Err("invalid client-id")), "{line}");
        }
    }

    #[test]
    fn other_first_requests() {
        assert_eq!(parse(".ping"), Ok(Request::Ping));
        assert_eq!(parse(" .ping \r"), Ok(Request::Ping));
        assert_eq!(parse(".stats"), Ok(Request::Stats));
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
        assert_eq!(
            HeldRequest::parse(b".keepalive"),
            Ok(HeldRequest::Keepalive)
        );
        assert_eq!(HeldRequest::parse(b""), Err(Reply::BadAction));
        assert_eq!(HeldRequest::parse(b"lock,name:a"), Err(Reply::BadAction));
        assert_eq!(HeldRequest::parse(b"\xc3"), Err(Reply::BadRequest));
    }

    #[test]
    fn reply_bytes() {
        let cases: [(Reply, &[u8]); 10] = [
            (Reply::Ok, b"ok\n"),
            (Reply::NotGranted, b"not-granted\n"),
            (Reply::Released, b"released\n"),
            (Reply::Alive, b"alive\n"),
            (Reply::Pong, b"pong\n"),
            (Reply::ShuttingDown, b"shutting-down\n"),
            (Reply::BadAction, b"bad-action\n"),
            (Reply::BadRequest, b"bad-request\n"),
            (Reply::Err("invalid lock name"), b"err,invalid lock name\n"),
            (Reply::Stats("{}".into()), b"stats,{}\n"),
        ];
        for (reply, bytes) in cases {
            assert_eq!(reply.to_line(), bytes);
        }
    }
}
