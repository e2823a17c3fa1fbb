//! Where log lines go: syslog (RFC 3164 to /dev/log or another socket, tagged `tcpnetlock`) or
//! stderr; and how logging is kept from ever holding up a connection.
//!
//! No thread that serves clients writes to the log destination itself. It formats its line and
//! puts it in a bounded queue that one logging thread writes out. A destination that stalls (a
//! stderr pipe nobody reads, a journal that falls behind, a full syslog socket) then delays only
//! that thread; once the queue is full, new lines are dropped and counted, and a line saying how
//! many follows as soon as the destination takes lines again ([`dropped`] gives the total, which
//! `.stats` reports). The syslog socket is non-blocking too, and is reopened after the daemon
//! restarts.
//!
//! Clients can provoke warnings as fast as they can connect (a refused `.server-shutdown`, say),
//! so warnings and errors are limited per place in the code that logs them: [`BURST`] per
//! [`WINDOW`], then one line with the number suppressed and the last of them.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use log::{Level, LevelFilter, Log, Metadata, Record};
use syslog::{Facility, Formatter3164, LoggerBackend};

const DEV_LOG: &str = "/dev/log";

/// Bytes of log text that may wait for the logging thread. Far more than a burst of ordinary
/// lines, small enough that a stalled destination cannot make the queue a memory problem.
const QUEUE_BYTES: usize = 256 * 1024;
/// Warnings and errors from one place in the code: at most this many per [`WINDOW`].
pub const BURST: u32 = 10;
pub const WINDOW: Duration = Duration::from_secs(10);
/// How long [`Log::flush`] (called before the process exits) waits for queued lines to be
/// written: long enough for any working destination, short enough that a stalled one cannot
/// hold up an exit.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

/// Lines dropped because the destination did not keep up, since start.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Whether log lines go to stderr (so a message printed there need not also be logged).
static ON_STDERR: AtomicBool = AtomicBool::new(false);

/// Log lines dropped since start because the destination did not keep up.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Records a fatal error before the process exits with it, when the log is not stderr: the
/// caller prints the message on stderr, and on stderr it would otherwise appear twice.
pub fn fatal(message: &str) {
    if log::max_level() != LevelFilter::Off && !ON_STDERR.load(Ordering::Relaxed) {
        log::error!("{message}");
        log::logger().flush();
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Syslog when /dev/log exists, stderr otherwise (containers).
    Auto,
    Stderr,
    Syslog(PathBuf),
}

impl FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Target, String> {
        match s {
            "auto" => Ok(Target::Auto),
            "stderr" => Ok(Target::Stderr),
            "syslog" => Ok(Target::Syslog(DEV_LOG.into())),
            _ => match s.strip_prefix("syslog:") {
                Some(path) if !path.is_empty() => Ok(Target::Syslog(path.into())),
                _ => Err("expected auto, stderr, syslog or syslog:PATH".into()),
            },
        }
    }
}

/// Installs the logger and starts its thread. Fails when syslog was asked for explicitly and
/// cannot be reached, or when the thread cannot be started.
pub fn init(target: Target, level: LevelFilter) -> Result<(), String> {
    let target = match target {
        Target::Auto if Path::new(DEV_LOG).exists() => Target::Syslog(DEV_LOG.into()),
        Target::Auto => Target::Stderr,
        t => t,
    };
    let destination = match target {
        Target::Syslog(path) => {
            let conn = connect(&path)
                .map_err(|e| format!("cannot log to syslog at {}: {e}", path.display()))?;
            Destination::Syslog {
                path,
                conn: Some(conn),
            }
        }
        _ => Destination::Stderr {
            // Under systemd, stderr goes to the journal, which reads a `<N>` prefix as the
            // line's priority.
            journal: std::env::var_os("JOURNAL_STREAM").is_some(),
        },
    };
    let on_stderr = matches!(destination, Destination::Stderr { .. });
    let shared = Arc::new(Shared::default());
    let theirs = Arc::clone(&shared);
    thread::Builder::new()
        .name("tcpnetlock-log".into())
        .spawn(move || write_loop(&theirs, destination))
        .map_err(|e| format!("cannot start the logging thread: {e}"))?;
    log::set_boxed_logger(Box::new(Logger { shared })).map_err(|e| e.to_string())?;
    log::set_max_level(level);
    ON_STDERR.store(on_stderr, Ordering::Relaxed);
    Ok(())
}

struct Logger {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<Queue>,
    /// Wakes the logging thread: lines are queued.
    queued: Condvar,
    /// Wakes [`Log::flush`]: the logging thread has written everything queued.
    drained: Condvar,
}

#[derive(Default)]
struct Queue {
    queue: VecDeque<Line>,
    queued_bytes: usize,
    /// Dropped since the logging thread last said so.
    dropped: u64,
    /// The logging thread is writing lines it took from the queue.
    writing: bool,
    /// Rate limits, by the place in the code (file, line) that logs.
    sites: HashMap<(&'static str, u32), Site>,
}

struct Line {
    level: Level,
    text: String,
}

/// One place in the code that logs warnings or errors, in its current window.
struct Site {
    since: Instant,
    passed: u32,
    suppressed: u64,
    /// The last line suppressed, for the summary.
    last: Option<Line>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Queue {
    /// Queues a line, or counts it as dropped when the queue is full. Never waits for the
    /// destination.
    fn push(&mut self, line: Line) {
        if self.queued_bytes + line.text.len() > QUEUE_BYTES {
            self.dropped += 1;
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.queued_bytes += line.text.len();
        self.queue.push_back(line);
    }

    /// Applies the per-site limit: the line back when it may be logged, None when it is
    /// suppressed (it is then kept as the site's last suppressed line, for the summary).
    fn admit(&mut self, site: (&'static str, u32), line: Line, now: Instant) -> Option<Line> {
        let s = self.sites.entry(site).or_insert(Site {
            since: now,
            passed: 0,
            suppressed: 0,
            last: None,
        });
        if now.duration_since(s.since) >= WINDOW {
            let summary = s.summary(now);
            *s = Site {
                since: now,
                passed: 0,
                suppressed: 0,
                last: None,
            };
            if let Some(summary) = summary {
                self.push(summary);
            }
        }
        let s = self.sites.get_mut(&site).expect("inserted above");
        if s.passed < BURST {
            s.passed += 1;
            return Some(line);
        }
        s.suppressed += 1;
        s.last = Some(line);
        None
    }

    /// Summaries for every site whose window has ended with lines suppressed; the earliest
    /// end of a window still holding suppressed lines.
    fn close_windows(&mut self, now: Instant) -> Option<Instant> {
        let mut summaries = Vec::new();
        let mut next: Option<Instant> = None;
        for s in self.sites.values_mut() {
            if s.suppressed == 0 {
                continue;
            }
            if now.duration_since(s.since) >= WINDOW {
                summaries.extend(s.summary(now));
                // A new window with nothing in it yet: the next line passes, up to BURST.
                s.since = now;
                s.passed = 0;
            } else {
                let end = s.since + WINDOW;
                next = Some(next.map_or(end, |n| n.min(end)));
            }
        }
        for line in summaries {
            self.push(line);
        }
        next
    }
}

impl Site {
    /// Takes the suppressed count and last line, as one line to log.
    fn summary(&mut self, now: Instant) -> Option<Line> {
        let last = self.last.take()?;
        let n = std::mem::take(&mut self.suppressed);
        Some(Line {
            level: last.level,
            text: format!(
                "{n} similar messages suppressed in the last {:.0}s; the last: {}",
                now.duration_since(self.since).as_secs_f64(),
                last.text
            ),
        })
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        let level = metadata.level();
        level <= log::max_level()
            // The etcd client's HTTP and TLS crates narrate every request at debug level: -vv
            // shows their lines, -v only ours.
            && (level <= Level::Info
                || metadata.target().starts_with("tcpnetlock")
                || log::max_level() >= LevelFilter::Trace)
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = Line {
            level: record.level(),
            text: record.args().to_string(),
        };
        let mut state = self.shared.lock();
        let line = match record.level() {
            Level::Error | Level::Warn => {
                let site = (
                    record.file_static().unwrap_or(""),
                    record.line().unwrap_or(0),
                );
                match state.admit(site, line, Instant::now()) {
                    Some(line) => line,
                    None => {
                        // The first one suppressed: the logging thread must now wake at the
                        // window's end to write the summary.
                        if state.sites[&site].suppressed == 1 {
                            drop(state);
                            self.shared.queued.notify_one();
                        }
                        return;
                    }
                }
            }
            _ => line,
        };
        state.push(line);
        drop(state);
        self.shared.queued.notify_one();
    }

    /// Waits, for [`FLUSH_WAIT`] at most, until every queued line is written.
    fn flush(&self) {
        let deadline = Instant::now() + FLUSH_WAIT;
        let mut state = self.shared.lock();
        while !state.queue.is_empty() || state.writing {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            state = self
                .shared
                .drained
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// The logging thread: writes queued lines out, says how many were dropped, and writes the
/// summaries of suppressed warnings when their window ends.
fn write_loop(shared: &Shared, mut destination: Destination) {
    let mut state = shared.lock();
    loop {
        let next_summary = state.close_windows(Instant::now());
        if state.queue.is_empty() {
            state.writing = false;
            shared.drained.notify_all();
            state = match next_summary {
                Some(at) => {
                    let wait = at.saturating_duration_since(Instant::now());
                    shared
                        .queued
                        .wait_timeout(state, wait)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => shared
                    .queued
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
            };
            continue;
        }
        let batch = std::mem::take(&mut state.queue);
        state.queued_bytes = 0;
        let dropped = std::mem::take(&mut state.dropped);
        state.writing = true;
        drop(state);
        for line in batch {
            destination.write(&line);
        }
        if dropped > 0 {
            destination.write(&Line {
                level: Level::Warn,
                text: format!(
                    "{dropped} log lines dropped: the log destination did not keep up \
                     (see log_lines_dropped in .stats)"
                ),
            });
        }
        state = shared.lock();
    }
}

enum Destination {
    Stderr {
        journal: bool,
    },
    Syslog {
        path: PathBuf,
        conn: Option<SyslogConn>,
    },
}

impl Destination {
    fn write(&mut self, line: &Line) {
        match self {
            Destination::Stderr { journal } => {
                let text = if *journal {
                    let priority = match line.level {
                        Level::Error => 3,
                        Level::Warn => 4,
                        Level::Info => 6,
                        Level::Debug | Level::Trace => 7,
                    };
                    format!("<{priority}>{}\n", line.text)
                } else {
                    format!("tcpnetlock: {}: {}\n", line.level, line.text)
                };
                // A closed or broken stderr loses the line; nothing better can be done with it.
                let _ = io::stderr().write_all(text.as_bytes());
            }
            Destination::Syslog { path, conn } => {
                if let Some(c) = conn.as_mut()
                    && write_record(c, line.level, &line.text).is_ok()
                {
                    return;
                }
                // The daemon may have restarted (stale socket) or be overloaded (full queue,
                // the line is lost either way): reconnect once and retry.
                *conn = connect(path).ok();
                if let Some(c) = conn.as_mut() {
                    let _ = write_record(c, line.level, &line.text);
                }
            }
        }
    }
}

type SyslogConn = syslog::Logger<LoggerBackend, Formatter3164>;

fn connect(path: &Path) -> io::Result<SyslogConn> {
    let formatter = Formatter3164 {
        facility: Facility::LOG_DAEMON,
        hostname: None,
        process: "tcpnetlock".into(),
        pid: std::process::id(),
    };
    let conn = syslog::unix_custom(formatter, path).map_err(io::Error::other)?;
    if let LoggerBackend::Unix(socket) = &conn.backend {
        socket.set_nonblocking(true)?;
    }
    Ok(conn)
}

fn write_record(conn: &mut SyslogConn, level: Level, message: &str) -> syslog::Result<()> {
    match level {
        Level::Error => conn.err(message),
        Level::Warn => conn.warning(message),
        Level::Info => conn.info(message),
        Level::Debug | Level::Trace => conn.debug(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!("auto".parse(), Ok(Target::Auto));
        assert_eq!("stderr".parse(), Ok(Target::Stderr));
        assert_eq!("syslog".parse(), Ok(Target::Syslog("/dev/log".into())));
        assert_eq!(
            "syslog:/run/x.sock".parse(),
            Ok(Target::Syslog("/run/x.sock".into()))
        );
        assert!("syslog:".parse::<Target>().is_err());
        assert!("file".parse::<Target>().is_err());
    }

    fn line(text: &str) -> Line {
        Line {
            level: Level::Warn,
            text: text.into(),
        }
    }

    #[test]
    fn a_site_passes_a_burst_per_window_then_one_summary() {
        let mut state = Queue::default();
        let t0 = Instant::now();
        let site = ("conn.rs", 7);
        let passed = (0..25)
            .filter(|i| state.admit(site, line(&format!("w{i}")), t0).is_some())
            .count();
        assert_eq!(passed, BURST as usize);
        // Another site has its own budget.
        assert!(state.admit(("mod.rs", 1), line("other"), t0).is_some());
        assert_eq!(state.close_windows(t0), Some(t0 + WINDOW));
        assert!(state.queue.is_empty());
        state.close_windows(t0 + WINDOW);
        let texts: Vec<_> = state.queue.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(
            texts,
            ["15 similar messages suppressed in the last 10s; the last: w24"]
        );
        assert!(state.admit(site, line("again"), t0 + WINDOW).is_some());
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let mut state = Queue::default();
        let big = "x".repeat(QUEUE_BYTES / 4 + 1);
        for _ in 0..5 {
            state.push(line(&big));
        }
        assert_eq!(state.queue.len(), 3);
        assert_eq!(state.dropped, 2);
    }
}
