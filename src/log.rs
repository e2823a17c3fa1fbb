//! Where log lines go: syslog (RFC 3164 to /dev/log or another socket, tagged `tcpnetlock`) or
//! stderr.
//!
//! Logging must never stall the server, so the syslog socket is non-blocking: when the syslog
//! daemon falls behind, lines are dropped rather than holding up a connection. If the daemon is
//! restarted, the socket is reopened on the next line.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use log::{Level, LevelFilter, Log, Metadata, Record};
use syslog::{Facility, Formatter3164, LoggerBackend};

const DEV_LOG: &str = "/dev/log";

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

/// Installs the logger. Fails only when syslog was asked for explicitly and cannot be reached.
pub fn init(target: Target, level: LevelFilter) -> Result<(), String> {
    let target = match target {
        Target::Auto if Path::new(DEV_LOG).exists() => Target::Syslog(DEV_LOG.into()),
        Target::Auto => Target::Stderr,
        t => t,
    };
    TO_STDERR.store(target == Target::Stderr, Ordering::Relaxed);
    let logger: Box<dyn Log> = match target {
        Target::Syslog(path) => {
            let conn = connect(&path)
                .map_err(|e| format!("cannot log to syslog at {}: {e}", path.display()))?;
            Box::new(Syslog {
                path,
                conn: Mutex::new(Some(conn)),
            })
        }
        _ => Box::new(Stderr {
            // Under systemd, stderr goes to the journal, which reads a `<N>` prefix as the
            // line's priority.
            journal: std::env::var_os("JOURNAL_STREAM").is_some(),
        }),
    };
    log::set_boxed_logger(logger).map_err(|e| e.to_string())?;
    log::set_max_level(level);
    Ok(())
}

/// Set by [`init`]: log lines go to stderr.
static TO_STDERR: AtomicBool = AtomicBool::new(false);

/// Log lines go to stderr: the CLI's final error, printed there anyway, is not logged too.
pub fn to_stderr() -> bool {
    TO_STDERR.load(Ordering::Relaxed)
}

type SyslogConn = syslog::Logger<LoggerBackend, Formatter3164>;

struct Syslog {
    path: PathBuf,
    conn: Mutex<Option<SyslogConn>>,
}

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

impl Log for Syslog {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let message = record.args().to_string();
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = conn.as_mut()
            && write_record(c, record.level(), &message).is_ok()
        {
            return;
        }
        // The daemon may have restarted (stale socket) or be overloaded (full queue, the line is
        // lost either way): reconnect once and retry.
        *conn = connect(&self.path).ok();
        if let Some(c) = conn.as_mut() {
            let _ = write_record(c, record.level(), &message);
        }
    }

    fn flush(&self) {}
}

struct Stderr {
    journal: bool,
}

impl Log for Stderr {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = if self.journal {
            let priority = match record.level() {
                Level::Error => 3,
                Level::Warn => 4,
                Level::Info => 6,
                Level::Debug | Level::Trace => 7,
            };
            format!("<{priority}>{}\n", record.args())
        } else {
            format!("tcpnetlock: {}: {}\n", record.level(), record.args())
        };
        let _ = io::stderr().write_all(line.as_bytes());
    }

    fn flush(&self) {}
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
}
