//! `tcpnetlock ping`, `stats` and `locks`: ask the server, show the answer to a person, or pass
//! the server's JSON on with `--json`.
//!
//! The reply is read with serde_json: integers stay exact (a fencing token above 2^53 is shown
//! as the server sent it), and any number, however large, is shown rather than turned into a
//! duration that cannot exist. Text from the server is escaped before it reaches a terminal
//! ([`output::printable`]); `--json` passes the server's bytes on unchanged, once they are known
//! to be JSON.

use std::time::Duration;

use clap::Args;
use serde_json::Value;

use super::output::{self, printable};
use super::{EXIT_FAILURE, EXIT_UNREACHABLE, Fail, ServerAddr};
use tcpnetlock::client;

const EXIT_CODES: &str = "\
Exit status: 0 on an answer (also when stdout is a pipe closed early, as by `head`); 125 if the \
server cannot be reached; 1 if it answered with an error or something unexpected, or stdout \
cannot be written; 2 for bad options.";

#[derive(Debug, Args)]
#[command(after_help = EXIT_CODES)]
pub struct StatusArgs {
    #[command(flatten)]
    server: ServerAddr,

    /// Print JSON instead: the server's own object for stats and locks; for ping, the reply and
    /// the round trip time.
    #[arg(long)]
    json: bool,
}

pub fn ping(args: StatusArgs) -> Result<u8, Fail> {
    let client = args.server.client();
    let rtt = client.ping().map_err(|e| failure(&e))?;
    let ms = rtt.as_secs_f64() * 1000.0;
    let server = client.server();
    if args.json {
        let quoted = Value::from(server).to_string();
        show(&format!(
            "{{\"server\": {quoted}, \"reply\": \"pong\", \"rtt_ms\": {ms:.3}}}\n"
        ))
    } else {
        show(&format!("pong from {} in {ms:.2} ms\n", printable(&server)))
    }
}

pub fn stats(args: StatusArgs) -> Result<u8, Fail> {
    let text = args.server.client().stats_json().map_err(|e| failure(&e))?;
    let value = parse(&text)?;
    if args.json {
        return show(&format!("{text}\n"));
    }
    show(&render_stats(&value))
}

pub fn locks(args: StatusArgs) -> Result<u8, Fail> {
    let text = args.server.client().locks_json().map_err(|e| failure(&e))?;
    let value = parse(&text)?;
    if args.json {
        return show(&format!("{text}\n"));
    }
    show(&render_locks(&value))
}

/// Writes the answer. A reader that has gone (`| head -1`) has all it wanted: no error, as
/// ripgrep and most filters do; any other failure (a full disk) is one.
fn show(text: &str) -> Result<u8, Fail> {
    match output::out(text) {
        Ok(()) => Ok(0),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(0),
        Err(e) => Err(Fail::new(
            EXIT_FAILURE,
            &format!("cannot write to stdout: {e}"),
        )),
    }
}

fn failure(e: &client::Error) -> Fail {
    use client::Error as E;
    let code = match e {
        E::Refused { .. } | E::Connect { .. } | E::Io(_) => EXIT_UNREACHABLE,
        _ => EXIT_FAILURE,
    };
    Fail::new(code, &printable(&e.to_string()))
}

fn parse(text: &str) -> Result<Value, Fail> {
    serde_json::from_str(text).map_err(|e| {
        // Enough of the reply to recognise it, not a screenful.
        let start: String = text.chars().take(200).collect();
        let more = if start.len() < text.len() { "…" } else { "" };
        Fail::new(
            EXIT_FAILURE,
            &format!(
                "the server's reply is not JSON ({e}): {}{more}",
                printable(&start)
            ),
        )
    })
}

/// A value as a person reads it: text escaped and unquoted, whole numbers without a fraction,
/// other numbers in their shortest form (`1.25`, `1e+308`), null as `-`.
fn plain(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => printable(s),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
            _ => n.to_string(),
        },
        Value::Bool(b) => b.to_string(),
        Value::Array(_) | Value::Object(_) => "…".into(),
    }
}

/// Seconds from the server as a duration (`2m07s`); a number no duration can hold is shown
/// as it is.
fn seconds(value: &Value) -> String {
    value
        .as_f64()
        .and_then(|s| Duration::try_from_secs_f64(s.max(0.0)).ok())
        .map_or_else(|| plain(value), human_duration)
}

/// The keys of `.stats` a person wants, in the order they make sense, with their labels.
/// 0.1.8's `lock_count` is shown only when `locks_held` (the same number) is missing.
const STATS: [(&str, &str); 17] = [
    ("version", "version"),
    ("uptime_secs", "uptime"),
    ("locks_held", "locks held"),
    ("lock_count", "locks held"),
    ("holders", "holders"),
    ("waiting", "waiting"),
    ("connections", "connections open"),
    ("requests_count", "connections accepted"),
    ("lock_acquired_count", "grants"),
    ("granted_after_wait_count", "grants after waiting"),
    ("lock_not_acquired_count", "refusals"),
    ("wait_timeout_count", "waits timed out"),
    ("lease_expired_count", "leases expired"),
    ("lock_released_count", "releases"),
    ("max_mismatch_count", "max mismatches"),
    ("threads", "worker threads"),
    ("maxrss", "peak memory"),
];

fn render_stats(stats: &Value) -> String {
    let Value::Object(fields) = stats else {
        return format!("{}\n", plain(stats));
    };
    let mut rows: Vec<(String, String)> = Vec::new();
    for (key, label) in STATS {
        let Some(value) = stats.get(key) else {
            continue;
        };
        if key == "lock_count" && stats.get("locks_held").is_some() {
            continue;
        }
        let shown = match key {
            "uptime_secs" => seconds(value),
            "maxrss" => match value.as_f64() {
                Some(kib) if kib.abs() < 1e15 => format!("{:.1} MiB", kib / 1024.0),
                _ => plain(value),
            },
            "threads" => match stats.get("threads_idle") {
                Some(idle) => format!("{} ({} idle)", plain(value), plain(idle)),
                None => plain(value),
            },
            _ => plain(value),
        };
        rows.push((label.to_owned(), shown));
    }
    // Whatever a newer server adds, under its own name.
    for (key, value) in fields {
        if key != "threads_idle" && !STATS.iter().any(|(k, _)| k == key) {
            rows.push((printable(key), plain(value)));
        }
    }
    let width = rows
        .iter()
        .map(|(l, _)| l.chars().count())
        .max()
        .unwrap_or(0);
    rows.iter()
        .map(|(label, value)| format!("{label:width$}  {value}\n"))
        .collect()
}

fn render_locks(locks: &Value) -> String {
    let Value::Object(names) = locks else {
        return format!("{}\n", plain(locks));
    };
    if names.is_empty() {
        return "no locks held\n".into();
    }
    let mut rows =
        vec![["NAME", "HOLDER", "PEER", "HELD", "TOKEN", "TTL", "WAITING"].map(String::from)];
    for (name, lock) in names {
        let name = printable(name);
        let title = match lock.get("max") {
            Some(max) if max.as_u64() != Some(1) && !max.is_null() => {
                format!("{name} (max {})", plain(max))
            }
            _ => name,
        };
        let waiting = lock.get("waiting").map_or("0".into(), plain);
        let holders = match lock.get("holders") {
            Some(Value::Array(h)) => h.as_slice(),
            _ => &[],
        };
        for h in holders {
            let secs = |key: &str| h.get(key).map_or("-".into(), seconds);
            let field = |key: &str| h.get(key).map_or("-".into(), plain);
            rows.push([
                title.clone(),
                field("client_id"),
                field("peer"),
                secs("held_secs"),
                field("token"),
                secs("ttl_secs"),
                waiting.clone(),
            ]);
        }
    }
    table(&rows)
}

/// Columns padded to their widest cell, two spaces apart, no trailing blanks.
fn table(rows: &[[String; 7]]) -> String {
    let widths: Vec<usize> = (0..7)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `850ms`, `12.3s`, `5m07s`, `3h05m`, `2d04h`.
fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..60 => format!("{:.1}s", d.as_secs_f64()),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(human_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(human_duration(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(human_duration(Duration::from_secs(307)), "5m07s");
        assert_eq!(human_duration(Duration::from_secs(3 * 3600 + 300)), "3h05m");
        assert_eq!(
            human_duration(Duration::from_secs(2 * 86400 + 4 * 3600)),
            "2d04h"
        );
    }

    #[test]
    fn stats_from_0_1_8() {
        let v = serde_json::from_str(
            r#"{"requests_count": 3, "lock_acquired_count": 1, "lock_not_acquired_count": 0, "lock_count": 1, "maxrss": 20480}"#,
        )
        .unwrap();
        let text = render_stats(&v);
        assert!(text.contains("locks held            1\n"), "{text}");
        assert!(text.contains("peak memory           20.0 MiB\n"), "{text}");
    }

    #[test]
    fn locks_table() {
        let v = serde_json::from_str(
            r#"{"a": {"max": 1, "waiting": 2, "holders": [{"client_id": "ci-7", "peer": "127.0.0.1:5", "held_secs": 1.25, "token": 17, "ttl_secs": null}]},
                "s": {"max": 3, "waiting": 0, "holders": [{"client_id": null, "peer": "[::1]:9", "held_secs": 0.5, "token": 18, "ttl_secs": 30.0}, {"client_id": null, "peer": "[::1]:8", "held_secs": 0.1, "token": 19, "ttl_secs": 30.0}]}}"#,
        )
        .unwrap();
        assert_eq!(
            render_locks(&v),
            "NAME       HOLDER  PEER         HELD   TOKEN  TTL    WAITING\n\
             a          ci-7    127.0.0.1:5  1.2s   17     -      2\n\
             s (max 3)  -       [::1]:9      500ms  18     30.0s  0\n\
             s (max 3)  -       [::1]:8      100ms  19     30.0s  0\n"
        );
        assert_eq!(
            render_locks(&serde_json::from_str("{}").unwrap()),
            "no locks held\n"
        );
    }
}
