//! `tcpnetlock ping`, `stats` and `locks`: ask the server, show the answer to a person, or pass
//! the server's JSON on with `--json`.
//!
//! Replies are read into the library's [`Stats`] and [`Locks`], the types the server writes
//! from: integers stay exact (a fencing token above 2^53 is shown as the server sent it), and
//! a value that does not fit its field (0.1.8's `"maxrss": "n/a"`, a number no duration can
//! hold) is shown as sent rather than dropped or turned into a duration that cannot exist.
//! Text from the server is escaped before it reaches a terminal ([`output::printable`]);
//! `--json` passes the server's bytes on unchanged, once they are known to be the object
//! expected.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Args;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::output::{self, printable};
use super::{EXIT_FAILURE, EXIT_UNREACHABLE, Fail, ServerAddr};
use tcpnetlock::client;
use tcpnetlock::status::{LockInfo, Locks, Mode, Stats};

const EXIT_CODES: &str = "\
Exit status: 0 on an answer (also when stdout is a pipe closed early, as by `head`); 125 if the \
server cannot be reached; 1 if it answered with an error or something unexpected (ping: also a \
cluster member that cannot grant locks now), or stdout cannot be written; 2 for bad options.";

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
    // Up is not enough: a cluster member cut off from etcd answers, and grants nothing.
    let rtt = client.ping_serving().map_err(|e| match &e {
        client::Error::Server(why) if why.starts_with("not serving locks") => Fail::new(
            EXIT_FAILURE,
            &format!(
                "{} answers but cannot grant locks now: {}",
                printable(&client.server()),
                printable(why)
            ),
        ),
        _ => failure(&e),
    })?;
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

#[derive(Debug, Args)]
#[command(after_help = EXIT_CODES)]
pub struct StatsArgs {
    #[command(flatten)]
    status: StatusArgs,

    /// Print the server's Prometheus metrics instead, in the text format (what `GET /metrics`
    /// on the lock port answers), for node_exporter's textfile collector.
    #[arg(long, conflicts_with = "json")]
    prometheus: bool,
}

pub fn stats(args: StatsArgs) -> Result<u8, Fail> {
    let StatsArgs {
        status: args,
        prometheus,
    } = args;
    if prometheus {
        let text = args.server.client().metrics().map_err(|e| failure(&e))?;
        return show(&prometheus_text(&text)?);
    }
    let text = args.server.client().stats_json().map_err(|e| failure(&e))?;
    let stats: Stats = parse(&text)?;
    if args.json {
        return show(&format!("{text}\n"));
    }
    show(&render_stats(&stats))
}

pub fn locks(args: StatusArgs) -> Result<u8, Fail> {
    let text = args.server.client().locks_json().map_err(|e| failure(&e))?;
    let locks: Locks = parse(&text)?;
    if args.json {
        return show(&format!("{text}\n"));
    }
    // SAFETY: isatty only looks at fd 1.
    if unsafe { libc::isatty(1) } == 1 {
        show(&render_locks_for_terminal(&locks))
    } else {
        show(&render_locks(&locks))
    }
}

/// The metrics text to pass on: as sent, without the `process_*` families, which describe the
/// server's process and which node_exporter exports about its own under the same names (its
/// textfile collector fails a whole scrape over a duplicate). Text that a terminal would act
/// on (an escape sequence) is refused rather than passed on or changed.
fn prometheus_text(text: &str) -> Result<String, Fail> {
    if let Some((n, line)) = text.lines().enumerate().find(|(_, l)| printable(l) != *l) {
        return Err(Fail::new(
            EXIT_FAILURE,
            &format!(
                "the server's metrics text has a control character on line {}: {}",
                n + 1,
                printable(line)
            ),
        ));
    }
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let name = match line
            .strip_prefix("# HELP ")
            .or(line.strip_prefix("# TYPE "))
        {
            Some(rest) => rest,
            None => line,
        };
        if !name.starts_with("process_") {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(out)
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
        E::Refused { .. } | E::Connect { .. } | E::Io(_) | E::Timeout { .. } => EXIT_UNREACHABLE,
        _ => EXIT_FAILURE,
    };
    Fail::new(code, &printable(&e.to_string()))
}

fn parse<T: DeserializeOwned>(text: &str) -> Result<T, Fail> {
    serde_json::from_str(text).map_err(|e| {
        // Enough of the reply to recognise it, not a screenful.
        let start: String = text.chars().take(200).collect();
        let more = if start.len() < text.len() { "…" } else { "" };
        let what = if e.is_data() {
            "the JSON object expected"
        } else {
            "JSON"
        };
        Fail::new(
            EXIT_FAILURE,
            &format!(
                "the server's reply is not {what} ({e}): {}{more}",
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
            Some(f) if n.is_f64() => number(f),
            _ => n.to_string(),
        },
        Value::Bool(b) => b.to_string(),
        Value::Array(_) | Value::Object(_) => "…".into(),
    }
}

fn number(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e15 {
        format!("{}", f as i64)
    } else {
        Value::from(f).to_string()
    }
}

/// Seconds from the server as a duration (`2m07s`); a number no duration can hold is shown
/// as it is.
fn seconds(secs: f64) -> String {
    Duration::try_from_secs_f64(secs.max(0.0)).map_or_else(|_| number(secs), human_duration)
}

/// The field read, or else the value the server sent under its key when it did not fit the
/// field (0.1.8's `"maxrss": "n/a"`): shown as sent rather than left out.
fn or_sent(typed: Option<String>, other: &BTreeMap<String, Value>, key: &str) -> Option<String> {
    typed.or_else(|| other.get(key).map(plain))
}

fn count(n: Option<u64>) -> Option<String> {
    n.map(|n| n.to_string())
}

/// What a person wants of `.stats`, in the order it makes sense, with labels; then whatever a
/// newer server adds, under its own name.
fn render_stats(s: &Stats) -> String {
    let threads = s.threads.map(|t| match s.threads_idle {
        Some(idle) => format!("{t} ({idle} idle)"),
        None => t.to_string(),
    });
    let known: [(&str, &str, Option<String>); 17] = [
        ("version", "version", s.version.as_deref().map(printable)),
        ("uptime_secs", "uptime", s.uptime_secs.map(seconds)),
        ("locks_held", "locks held", count(s.locks_held)),
        ("holders", "holders", count(s.holders)),
        ("waiting", "waiting", count(s.waiting)),
        ("connections", "connections open", count(s.connections)),
        (
            "requests_count",
            "connections accepted",
            count(s.requests_count),
        ),
        (
            "lock_acquired_count",
            "grants",
            count(s.lock_acquired_count),
        ),
        (
            "granted_after_wait_count",
            "grants after waiting",
            count(s.granted_after_wait_count),
        ),
        (
            "lock_not_acquired_count",
            "refusals",
            count(s.lock_not_acquired_count),
        ),
        (
            "wait_timeout_count",
            "waits timed out",
            count(s.wait_timeout_count),
        ),
        (
            "lease_expired_count",
            "leases expired",
            count(s.lease_expired_count),
        ),
        (
            "lock_released_count",
            "releases",
            count(s.lock_released_count),
        ),
        (
            "max_mismatch_count",
            "max mismatches",
            count(s.max_mismatch_count),
        ),
        ("threads", "worker threads", threads),
        (
            "maxrss",
            "peak memory",
            s.maxrss
                .map(|kib| format!("{:.1} MiB", kib as f64 / 1024.0)),
        ),
        (
            "log_lines_dropped",
            "log lines dropped",
            count(s.log_lines_dropped),
        ),
    ];
    let mut rows: Vec<(String, String)> = Vec::new();
    for (key, label, typed) in &known {
        if let Some(shown) = or_sent(typed.clone(), &s.other, key) {
            rows.push(((*label).to_owned(), shown));
        }
    }
    for (key, value) in &s.other {
        if !known.iter().any(|(k, _, _)| k == key) {
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

/// A lock's name as the tables show it: with its `max` when it is a semaphore.
fn lock_title(lock: &LockInfo) -> String {
    let name = printable(&lock.name);
    match or_sent(count(lock.max.map(u64::from)), &lock.other, "max") {
        Some(max) if max != "1" => format!("{name} (max {max})"),
        _ => name,
    }
}

/// For a file or a pipe: one row per holder, the columns of tcpnetlock 0.2 (scripts read them).
fn render_locks(locks: &Locks) -> String {
    if locks.is_empty() {
        return "no locks held\n".into();
    }
    let mut rows = vec![
        ["NAME", "HOLDER", "PEER", "HELD", "TOKEN", "TTL", "WAITING"]
            .map(String::from)
            .to_vec(),
    ];
    for lock in locks {
        let title = lock_title(lock);
        let waiting = or_sent(count(lock.waiting), &lock.other, "waiting").unwrap_or("0".into());
        for h in &lock.holders {
            let cell = |typed: Option<String>, key: &str| {
                or_sent(typed, &h.other, key).unwrap_or("-".into())
            };
            rows.push(vec![
                title.clone(),
                cell(h.client_id.as_deref().map(printable), "client_id"),
                cell(h.peer.as_deref().map(printable), "peer"),
                cell(h.held_secs.map(seconds), "held_secs"),
                cell(count(h.token), "token"),
                cell(h.ttl_secs.map(seconds), "ttl_secs"),
                waiting.clone(),
            ]);
        }
    }
    table(&rows)
}

/// For a person at a terminal: each lock's holders, then its waiters in queue order (the next
/// to be granted first), each with its mode and for how long; the name only on a lock's first
/// row. A column nobody has a value in (no leases: TTL; no waiters: LEFT) is left out.
fn render_locks_for_terminal(locks: &Locks) -> String {
    if locks.is_empty() {
        return "no locks held\n".into();
    }
    let header = [
        "NAME", "ROLE", "MODE", "CLIENT", "PEER", "FOR", "LEFT", "TOKEN", "TTL",
    ];
    let mut rows = vec![header.map(String::from).to_vec()];
    let sent = |typed: Option<String>, other: &BTreeMap<String, Value>, key: &str| {
        or_sent(typed, other, key).unwrap_or("-".into())
    };
    let mode = |m: Option<Mode>| m.map(|m| m.as_str().to_owned());
    for lock in locks {
        let mut title = Some(lock_title(lock));
        let mut row = |cells: [String; 8]| {
            let mut row = vec![title.take().unwrap_or_default()];
            row.extend(cells);
            rows.push(row);
        };
        for h in &lock.holders {
            let o = &h.other;
            row([
                "holder".into(),
                sent(mode(h.mode), o, "mode"),
                sent(h.client_id.as_deref().map(printable), o, "client_id"),
                sent(h.peer.as_deref().map(printable), o, "peer"),
                sent(h.held_secs.map(seconds), o, "held_secs"),
                String::new(),
                sent(count(h.token), o, "token"),
                sent(h.ttl_secs.map(seconds), o, "ttl_secs"),
            ]);
        }
        for (i, w) in lock.waiters.iter().enumerate() {
            let o = &w.other;
            row([
                format!("waiter {}", i + 1),
                sent(mode(w.mode), o, "mode"),
                sent(w.client_id.as_deref().map(printable), o, "client_id"),
                sent(w.peer.as_deref().map(printable), o, "peer"),
                sent(w.waited_secs.map(seconds), o, "waited_secs"),
                sent(w.left_secs.map(seconds), o, "left_secs"),
                String::new(),
                String::new(),
            ]);
        }
        // A server that counts its waiters without listing them (0.2).
        let unlisted = or_sent(count(lock.waiting), &lock.other, "waiting")
            .filter(|n| lock.waiters.is_empty() && n != "0");
        if let Some(n) = unlisted {
            let mut cells: [String; 8] = Default::default();
            cells[0] = format!("{n} waiting");
            row(cells);
        }
    }
    let empty = |c: usize| rows[1..].iter().all(|r| matches!(r[c].as_str(), "" | "-"));
    let keep: Vec<usize> = (0..header.len()).filter(|&c| c < 2 || !empty(c)).collect();
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| keep.iter().map(|&c| r[c].clone()).collect())
        .collect();
    table(&rows)
}

/// Columns padded to their widest cell, two spaces apart, no trailing blanks.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
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
pub(super) fn human_duration(d: Duration) -> String {
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

    /// tcpnetlock 0.1.8's own reply (src/status/tests.rs says how it was captured), and the
    /// `"n/a"` it sends when getrusage fails.
    #[test]
    fn stats_from_0_1_8() {
        let reply = r#"{"lock_count": 1, "maxrss": 13840, "requests_count": 3, "lock_acquired_count": 1, "lock_not_acquired_count": 1}"#;
        assert_eq!(
            render_stats(&parse(reply).unwrap()),
            "locks held            1\n\
             connections accepted  3\n\
             grants                1\n\
             refusals              1\n\
             peak memory           13.5 MiB\n"
        );
        let text = render_stats(&parse(&reply.replace("13840", "\"n/a\"")).unwrap());
        assert!(text.ends_with("peak memory           n/a\n"), "{text}");
    }

    #[test]
    fn stats_of_this_server() {
        let reply = r#"{"requests_count": 12, "lock_acquired_count": 5, "lock_not_acquired_count": 2, "lock_count": 1, "maxrss": 4180, "locks_held": 1, "holders": 1, "waiting": 0, "lock_released_count": 4, "granted_after_wait_count": 1, "wait_timeout_count": 0, "lease_expired_count": 0, "max_mismatch_count": 0, "connections": 2, "threads": 3, "threads_idle": 1, "uptime_secs": 81.250, "log_lines_dropped": 0, "version": "0.2.0", "shared_grants_count": 3}"#;
        assert_eq!(
            render_stats(&parse(reply).unwrap()),
            "version               0.2.0\n\
             uptime                1m21s\n\
             locks held            1\n\
             holders               1\n\
             waiting               0\n\
             connections open      2\n\
             connections accepted  12\n\
             grants                5\n\
             grants after waiting  1\n\
             refusals              2\n\
             waits timed out       0\n\
             leases expired        0\n\
             releases              4\n\
             max mismatches        0\n\
             worker threads        3 (1 idle)\n\
             peak memory           4.1 MiB\n\
             log lines dropped     0\n\
             shared_grants_count   3\n"
        );
    }

    #[test]
    fn locks_table() {
        let locks = parse(
            r#"{"a": {"max": 1, "waiting": 2, "holders": [{"client_id": "ci-7", "peer": "127.0.0.1:5", "held_secs": 1.25, "token": 17, "ttl_secs": null}]},
                "s": {"max": 3, "waiting": 0, "holders": [{"client_id": null, "peer": "[::1]:9", "held_secs": 0.5, "token": 18, "ttl_secs": 30.0}, {"client_id": null, "peer": "[::1]:8", "held_secs": 0.1, "token": 19, "ttl_secs": 30.0}]},
                "t": {"max": "two", "waiting": "many", "holders": [{"client_id": 7, "token": 18446744073709551615, "held_secs": -1}]}}"#,
        )
        .unwrap();
        assert_eq!(
            render_locks(&locks),
            "NAME         HOLDER  PEER         HELD   TOKEN                 TTL    WAITING\n\
             a            ci-7    127.0.0.1:5  1.2s   17                    -      2\n\
             s (max 3)    -       [::1]:9      500ms  18                    30.0s  0\n\
             s (max 3)    -       [::1]:8      100ms  19                    30.0s  0\n\
             t (max two)  7       -            0ms    18446744073709551615  -      many\n"
        );
        assert_eq!(render_locks(&parse("{}").unwrap()), "no locks held\n");
    }

    #[test]
    fn locks_for_a_terminal() {
        let locks = parse(
            r#"{"a": {"max": 1, "waiting": 2, "holders": [{"client_id": "ci-7", "peer": "127.0.0.1:5", "held_secs": 127.25, "token": 17, "ttl_secs": null, "mode": "exclusive"}],
                      "waiters": [{"client_id": "pod-8", "peer": "127.0.0.1:6", "waited_secs": 3.1, "left_secs": 26.9, "mode": "exclusive"},
                                  {"client_id": null, "peer": "127.0.0.1:7", "waited_secs": 0.85, "left_secs": 59.15, "mode": "upgradable"}]},
                "old": {"max": 3, "waiting": 2, "holders": [{"client_id": null, "peer": "[::1]:9", "held_secs": 0.5, "token": 18, "ttl_secs": null}]}}"#,
        )
        .unwrap();
        // No lease anywhere: no TTL column. A mode this version does not know is shown as sent;
        // a server that only counts its waiters (0.2) gets a row that says how many.
        assert_eq!(
            render_locks_for_terminal(&locks),
            "NAME         ROLE       MODE        CLIENT  PEER         FOR    LEFT   TOKEN\n\
             a            holder     exclusive   ci-7    127.0.0.1:5  2m07s         17\n\
             \x20            waiter 1   exclusive   pod-8   127.0.0.1:6  3.1s   26.9s\n\
             \x20            waiter 2   upgradable  -       127.0.0.1:7  850ms  59.1s\n\
             old (max 3)  holder     -           -       [::1]:9      500ms         18\n\
             \x20            2 waiting\n"
        );
        assert_eq!(
            render_locks_for_terminal(&parse("{}").unwrap()),
            "no locks held\n"
        );
    }
}
