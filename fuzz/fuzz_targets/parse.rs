//! Arbitrary bytes as one request line (what the server hands the parser, `\n` removed).
//!
//! Checks properties, not just "no panic":
//! - a parsed `lock` has a name that passes `valid_lock_name`, a client-id that passes
//!   `valid_client_id`, `wait` in 0..=604800 s, `ttl` in (0, 604800] s, `max` in 1..=65535, and
//!   writing it back out canonically parses to the same request;
//! - a smaller name limit can only turn a result into `err,invalid lock name`;
//! - `parse_seconds` agrees with an independent reference on the whole input and on every
//!   parameter value;
//! - every reply line ends with exactly one `\n` and holds no other `\n` or `\r`;
//! - parsing is deterministic.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tcpnetlock::protocol::{
    DEFAULT_MAX_NAME_LEN, HeldRequest, LockRequest, MAX_HOLDERS, MAX_SECONDS, Reply, Request,
    parse_seconds, valid_client_id, valid_lock_name,
};

const NAME_LIMITS: [usize; 6] = [0, 1, 3, 16, DEFAULT_MAX_NAME_LEN, usize::MAX];

fuzz_target!(|data: &[u8]| {
    let unlimited = Request::parse(data, usize::MAX);
    for limit in NAME_LIMITS {
        let got = Request::parse(data, limit);
        assert_eq!(got, Request::parse(data, limit), "deterministic");
        check_request(&got, limit);
        if got != unlimited {
            assert_eq!(got, Err(Reply::err("invalid lock name")), "limit {limit}");
        }
    }

    let held = HeldRequest::parse(data);
    assert_eq!(held, HeldRequest::parse(data), "deterministic");
    match &held {
        Ok(_) => {}
        Err(reply) => {
            assert!(matches!(reply, Reply::BadAction | Reply::BadRequest));
            check_line(reply);
        }
    }

    let Ok(text) = std::str::from_utf8(data) else {
        assert_eq!(unlimited, Err(Reply::BadRequest));
        assert_eq!(held, Err(Reply::BadRequest));
        return;
    };
    // The action is what comes before the first comma, surrounding whitespace removed.
    let action = text.split_once(',').map_or(text, |(a, _)| a).trim();
    let want = match action {
        "release" => Ok(HeldRequest::Release),
        ".keepalive" => Ok(HeldRequest::Renew),
        _ => Err(Reply::BadAction),
    };
    assert_eq!(held, want);

    check_seconds(text);
    for param in text.split(',').skip(1) {
        if let Some((_, value)) = param.split_once(':') {
            check_seconds(value.trim());
        }
    }
});

fn check_request(result: &Result<Request<'_>, Reply>, limit: usize) {
    match result {
        Ok(Request::Lock(r)) => {
            assert!(valid_lock_name(r.name, limit), "{:?}", r.name);
            assert!(r.name.len() <= limit);
            if let Some(id) = r.client_id {
                assert!(valid_client_id(id), "{id:?}");
            }
            let week = Duration::from_secs(MAX_SECONDS);
            assert!(r.wait.is_none_or(|w| w <= week), "{:?}", r.wait);
            assert!(
                r.ttl.is_none_or(|t| !t.is_zero() && t <= week),
                "{:?}",
                r.ttl
            );
            assert!((1..=MAX_HOLDERS).contains(&r.max), "{}", r.max);
            // Written back out canonically, it parses to the same request.
            let line = canonical(r);
            match Request::parse(line.as_bytes(), limit) {
                Ok(Request::Lock(again)) => assert_eq!(&again, r, "{line}"),
                other => panic!("{line}: {other:?}"),
            }
            check_line(&Reply::granted(u64::MAX, r.fencing));
            check_line(&Reply::Err(
                format!("max mismatch: {} is held with max:{}", r.name, r.max).into(),
            ));
        }
        Ok(_) => {}
        Err(reply) => {
            match reply {
                Reply::BadAction | Reply::BadRequest => {}
                Reply::Err(msg) => {
                    // Client text is echoed only after "unknown parameter ", 64 characters at
                    // most, escaped: every character prints as itself (no controls, format
                    // characters or line separators).
                    if let Some(key) = msg.strip_prefix("unknown parameter ") {
                        assert!(key.chars().count() <= 64, "{msg:?}");
                        assert!(
                            key.chars().all(|c| matches!(c, '\\' | '\'' | '"')
                                || c.escape_debug().eq([c])),
                            "{msg:?}"
                        );
                    } else {
                        assert!(
                            [
                                "invalid lock name",
                                "invalid client-id",
                                "invalid wait: expected seconds from 0 to 604800",
                                "invalid ttl: expected seconds above 0, at most 604800",
                                "invalid fencing: expected 0 or 1",
                                "invalid max: expected 1 to 65535",
                            ]
                            .contains(&&**msg),
                            "{msg:?}"
                        );
                    }
                }
                other => panic!("parse error reply {other:?}"),
            }
            check_line(reply);
        }
    }
}

fn canonical(r: &LockRequest<'_>) -> String {
    let secs = |d: Duration| format!("{}.{:09}", d.as_secs(), d.subsec_nanos());
    let mut line = format!("lock,name:{}", r.name);
    if let Some(id) = r.client_id {
        line += &format!(",client-id:{id}");
    }
    if let Some(w) = r.wait {
        line += &format!(",wait:{}", secs(w));
    }
    if r.fencing {
        line += ",fencing:1";
    }
    if r.max != 1 {
        line += &format!(",max:{}", r.max);
    }
    if let Some(t) = r.ttl {
        line += &format!(",ttl:{}", secs(t));
    }
    line
}

/// One line on the wire: exactly one `\n`, at the end, and no `\r`.
fn check_line(reply: &Reply) {
    let line = reply.to_line();
    assert_eq!(line.last(), Some(&b'\n'), "{reply:?}");
    let body = &line[..line.len() - 1];
    assert!(
        !body.contains(&b'\n') && !body.contains(&b'\r'),
        "{reply:?}"
    );
}

fn check_seconds(text: &str) {
    let got = parse_seconds(text);
    assert_eq!(got, parse_seconds(text), "deterministic");
    assert_eq!(got, reference_seconds(text), "{text:?}");
    if let Some(d) = got {
        assert!(d <= Duration::from_secs(MAX_SECONDS));
    }
}

/// `[0-9]+(\.[0-9]{1,9})?` up to 604800 s, computed in nanoseconds without `str::parse`.
fn reference_seconds(text: &str) -> Option<Duration> {
    let bytes = text.as_bytes();
    let (whole, frac) = match bytes.iter().position(|&b| b == b'.') {
        Some(i) => (&bytes[..i], Some(&bytes[i + 1..])),
        None => (bytes, None),
    };
    let digits = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_digit);
    if !digits(whole) || frac.is_some_and(|f| !digits(f) || f.len() > 9) {
        return None;
    }
    let limit = u128::from(MAX_SECONDS) * 1_000_000_000;
    let mut nanos: u128 = 0;
    for &b in whole {
        nanos = (nanos * 10 + u128::from(b - b'0') * 1_000_000_000).min(limit + 1);
    }
    let mut scale = 100_000_000;
    for &b in frac.unwrap_or(&[]) {
        nanos += u128::from(b - b'0') * scale;
        scale /= 10;
    }
    (nanos <= limit).then(|| Duration::from_nanos(nanos as u64))
}
