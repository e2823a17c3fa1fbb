//! The command line: one binary, one subcommand per file. Errors become a message on stderr and an
//! exit status here, at the edge, and nowhere else.
//!
//! The binary is also the three programs of tcpnetlock 0.1.8 when invoked under their names
//! (symlinks `tcpnetlock_server`, `tcpnetlock_client`, `tcpnetlock_do`): see [`dropin`].

pub mod dropin;
mod json;
pub mod lock;
mod process;
pub mod run;
pub mod server;
mod signals;
pub mod status;

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::client::{self, Client};

// Every exit status the commands use, in one table. The README's tables follow this one.
//
// | status | meaning                                                    | commands              |
// |--------|------------------------------------------------------------|-----------------------|
// | 0      | success                                                    | all                   |
// | 1      | the server answered with an error or something unexpected | server, ping, stats, locks |
// | 2      | bad flags or arguments; the server cannot bind             | all                   |
// | 122    | the lock was lost while held (`do`: the command was ended) | lock, do              |
// | 123    | not granted (`do --conflict-exit-code` replaces it)       | lock, do              |
// | 124    | the command could not be started                           | do                    |
// | 125    | the server cannot be reached, or the connection failed     | lock, do, ping, stats, locks |
// | 127    | the command was not found                                  | do                    |
// | 128+N  | the command was killed by signal N                         | do                    |
//
// tcpnetlock_client (0.1.8's numbers): 2 connection refused, 3 connection failed, 4 any other
// error, 122 and 123 as above. tcpnetlock_server: 2 cannot bind, 3 cannot serve.

/// A failure not covered by a more specific status.
pub const EXIT_FAILURE: u8 = 1;
/// Bad flags or arguments, and a server that cannot bind (as tcpnetlock 0.1.8).
pub const EXIT_USAGE: u8 = 2;
/// The lock was lost while held (0.1.8's tcpnetlock_client: "disconnected while holding").
pub const EXIT_LOST: u8 = 122;
/// Somebody else holds the lock.
pub const EXIT_NOT_GRANTED: u8 = 123;
/// `do`: the command could not be started (other than not found).
pub const EXIT_CANNOT_RUN: u8 = 124;
/// The server cannot be reached (refused, unknown host, unreachable), or the connection failed.
pub const EXIT_UNREACHABLE: u8 = 125;
/// `do`: the command was not found (as a shell says it).
pub const EXIT_NOT_FOUND: u8 = 127;
/// `do`: a command killed by signal N makes `do` exit with this plus N (as a shell says it).
pub const EXIT_SIGNAL_BASE: u8 = 128;
/// tcpnetlock_client: connection refused (0.1.8).
pub const EXIT_CLIENT_REFUSED: u8 = 2;
/// tcpnetlock_client: the connection failed for another reason (0.1.8).
pub const EXIT_CLIENT_CONNECT_FAILED: u8 = 3;
/// tcpnetlock_client: any other error (0.1.8).
pub const EXIT_CLIENT_UNKNOWN: u8 = 4;
/// tcpnetlock_server: the server failed after binding (0.1.8).
pub const EXIT_SERVER_FAILED: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "tcpnetlock",
    version,
    about = "A network lock server: hold a lock for as long as a TCP connection lives"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the lock server.
    Server(server::ServerArgs),
    /// Run a command while holding a lock (0.1.8's tcpnetlock_do).
    Do(run::RunArgs),
    /// Take a lock and hold it until stdin ends or a signal comes (for `coproc`).
    Lock(lock::LockArgs),
    /// Check that the server answers.
    Ping(status::StatusArgs),
    /// Show the server's counters.
    Stats(status::StatusArgs),
    /// Show the locks held now, their holders and waiters.
    Locks(status::StatusArgs),
}

/// Where the server is: shared by every client command.
#[derive(Debug, Clone, Args)]
pub struct ServerAddr {
    /// Server host name or address.
    #[arg(long, env = "TCPNETLOCK_HOST", default_value = "localhost")]
    pub host: String,

    /// Server port.
    #[arg(long, env = "TCPNETLOCK_PORT", default_value_t = client::DEFAULT_PORT)]
    pub port: u16,
}

impl ServerAddr {
    pub fn client(&self) -> Client {
        Client::new(self.host.clone(), self.port)
    }
}

/// A failure to report: the message for stderr and the exit status.
#[derive(Debug)]
pub struct Fail {
    pub code: u8,
    pub message: String,
    /// Print the message as it is, without the `tcpnetlock: error:` prefix (0.1.8's messages).
    pub plain: bool,
}

impl Fail {
    pub fn new(code: u8, message: &str) -> Fail {
        Fail {
            code,
            message: message.to_owned(),
            plain: false,
        }
    }

    /// An exit status with nothing to say (`do` is quiet when the lock is taken, like flock).
    pub fn silent(code: u8) -> Fail {
        Fail::plain(code, "")
    }

    pub fn plain(code: u8, message: &str) -> Fail {
        Fail {
            code,
            message: message.to_owned(),
            plain: true,
        }
    }

    /// A client library error, for `do` and `lock`.
    pub fn from_client(e: &client::Error) -> Fail {
        use client::Error as E;
        let code = match e {
            E::InvalidName(_) | E::InvalidClientId(_) => EXIT_USAGE,
            E::NotGranted | E::Server(_) => EXIT_NOT_GRANTED,
            E::Lost(_) => EXIT_LOST,
            E::Refused { .. } | E::Connect { .. } | E::Protocol(_) | E::Io(_) => EXIT_UNREACHABLE,
        };
        Fail::new(code, &e.to_string())
    }
}

pub fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let program = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("tcpnetlock")
        .to_owned();
    let result = match program.as_str() {
        "tcpnetlock_server" => dropin::server(args),
        "tcpnetlock_client" => dropin::client(args),
        "tcpnetlock_do" => dropin::run(args),
        _ => dispatch(Cli::parse_from(args)),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(fail) => {
            report(&program, &fail);
            ExitCode::from(fail.code)
        }
    }
}

fn dispatch(cli: Cli) -> Result<u8, Fail> {
    match cli.command {
        Command::Server(args) => server::run(args).map(|()| 0),
        Command::Do(args) => run::run(args),
        Command::Lock(args) => lock::run(args),
        Command::Ping(args) => status::ping(args),
        Command::Stats(args) => status::stats(args),
        Command::Locks(args) => status::locks(args),
    }
}

fn report(program: &str, fail: &Fail) {
    if fail.message.is_empty() {
        return;
    }
    if fail.plain {
        eprintln!("{}", fail.message);
    } else {
        crate::log::fatal(&fail.message);
        eprintln!("{program}: error: {}", fail.message);
    }
}

/// Seconds as a decimal number (`10`, `0.5`), for durations on the command line.
pub fn parse_secs(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("expected seconds, got {text:?}"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{text} seconds is out of range"))
}

/// Seconds the way the protocol takes them for `wait:` and `ttl:` (decimal, at most a week), so
/// that a value the server would refuse is a usage error here.
pub fn parse_protocol_secs(text: &str) -> Result<Duration, String> {
    crate::protocol::parse_seconds(text.trim()).ok_or_else(|| {
        format!(
            "expected seconds from 0 to {} (digits, optionally a fraction), got {text:?}",
            crate::protocol::MAX_SECONDS
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds() {
        assert_eq!(parse_secs("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_secs("0.25"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_secs("0"), Ok(Duration::ZERO));
        for bad in ["-1", "NaN", "inf", "1e30", "", "1s"] {
            assert!(parse_secs(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_protocol_secs("2.5"), Ok(Duration::from_millis(2500)));
        for bad in ["-1", "1e3", "604801", "x"] {
            assert!(parse_protocol_secs(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
