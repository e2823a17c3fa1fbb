//! The command line: one binary, one subcommand per file. Errors become a message on stderr and an
//! exit status here, at the edge, and nowhere else.
//!
//! The binary is also the three programs of tcpnetlock 0.1.8 when invoked under their names
//! (symlinks `tcpnetlock_server`, `tcpnetlock_client`, `tcpnetlock_do`): see [`dropin`].

#[cfg(feature = "assets")]
pub mod assets;
mod cluster;
pub mod r#do;
pub mod dropin;
pub mod lock;
mod output;
mod process;
pub mod server;
mod signals;
pub mod status;
mod waiting;

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgMatches, Args, FromArgMatches, Parser, Subcommand};

use tcpnetlock::client::{self, Client};

// Every exit status the commands use, in one table. The README's tables follow this one.
//
// | status | meaning                                                    | commands              |
// |--------|------------------------------------------------------------|-----------------------|
// | 0      | success                                                    | all                   |
// | 1      | the server answered with an error or something unexpected; | server, ping, stats, locks |
// |        | stdout cannot be written (a reader gone is no error)       |                       |
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
    Do(r#do::DoArgs),
    /// Take a lock and hold it until stdin ends or a signal comes (for `coproc`).
    Lock(lock::LockArgs),
    /// Check that the server answers and can grant locks (a cluster member may not).
    Ping(status::StatusArgs),
    /// Show the server's counters.
    Stats(status::StatsArgs),
    /// Show the locks held now, their holders and waiters.
    Locks(status::StatusArgs),
}

/// Where the server is: shared by every client command. `--host` may carry the port
/// (`HOST:PORT`, `[IPv6]:PORT`), as `TCPNETLOCK_HOST` may: a port given there and another one
/// by `--port` or `TCPNETLOCK_PORT` is a usage error, not a silent choice.
#[derive(Debug, Clone)]
pub struct ServerAddr {
    /// A name or an address, without brackets.
    pub host: String,
    pub port: u16,
}

/// The flags as typed; [`ServerAddr`] is what they mean once checked together.
#[derive(Debug, Clone, Args)]
struct ServerFlags {
    /// Server host name or address; HOST:PORT or [IPv6]:PORT give the port too.
    #[arg(
        long,
        value_name = "HOST[:PORT]",
        env = "TCPNETLOCK_HOST",
        default_value = "localhost",
        value_parser = parse_host
    )]
    host: HostArg,

    /// Server port [default: 7654].
    #[arg(long, env = "TCPNETLOCK_PORT")]
    port: Option<u16>,
}

#[derive(Debug, Clone)]
struct HostArg {
    name: String,
    port: Option<u16>,
}

/// `HOST`, `HOST:PORT`, `IPv6`, `[IPv6]` or `[IPv6]:PORT`. More than one colon without
/// brackets is an IPv6 address: its last group cannot be told from a port.
fn parse_host(text: &str) -> Result<HostArg, String> {
    let bad_port = |port: &str| {
        format!(
            "{port:?} is not a port (1 to 65535) in {text:?}; expected HOST, HOST:PORT or [IPv6]:PORT"
        )
    };
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| bad_port(p))
    };
    let (name, port) = if let Some(rest) = text.strip_prefix('[') {
        let (inside, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{text:?} has no closing ']'"))?;
        match after {
            "" => (inside, None),
            _ => match after.strip_prefix(':') {
                Some(p) => (inside, Some(port(p)?)),
                None => return Err(format!("expected :PORT after ']' in {text:?}")),
            },
        }
    } else {
        match text.split_once(':') {
            Some((name, p)) if !p.contains(':') => (name, Some(port(p)?)),
            _ => (text, None),
        }
    };
    if name.is_empty() {
        return Err(format!("no host name or address in {text:?}"));
    }
    Ok(HostArg {
        name: name.to_owned(),
        port,
    })
}

impl ServerFlags {
    fn resolve(self) -> Result<ServerAddr, String> {
        let port = match (self.host.port, self.port) {
            (Some(a), Some(b)) if a != b => {
                return Err(format!(
                    "the server's port is given twice: {a} in --host (or TCPNETLOCK_HOST) and \
                     {b} by --port (or TCPNETLOCK_PORT); give it once"
                ));
            }
            (Some(p), _) | (None, Some(p)) => p,
            (None, None) => client::DEFAULT_PORT,
        };
        Ok(ServerAddr {
            host: self.host.name,
            port,
        })
    }
}

// By hand rather than derived, so that the two flags are checked together while parsing: a
// conflict is a usage error (status 2) from clap, like any other.
impl FromArgMatches for ServerAddr {
    fn from_arg_matches(matches: &ArgMatches) -> Result<ServerAddr, clap::Error> {
        ServerFlags::from_arg_matches(matches)?
            .resolve()
            .map_err(|e| clap::Error::raw(clap::error::ErrorKind::ArgumentConflict, e))
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = ServerAddr::from_arg_matches(matches)?;
        Ok(())
    }
}

impl Args for ServerAddr {
    fn group_id() -> Option<clap::Id> {
        ServerFlags::group_id()
    }

    fn augment_args(cmd: clap::Command) -> clap::Command {
        ServerFlags::augment_args(cmd)
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        ServerFlags::augment_args_for_update(cmd)
    }
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
            E::InvalidArgument(_) => EXIT_USAGE,
            E::NotGranted | E::Server(_) | E::MaxMismatch { .. } => EXIT_NOT_GRANTED,
            E::Lost(_) => EXIT_LOST,
            E::Refused { .. }
            | E::Connect { .. }
            | E::Protocol(_)
            | E::Io(_)
            | E::Timeout { .. } => EXIT_UNREACHABLE,
            // The library's errors are non-exhaustive; one it adds later is still a failure.
            _ => EXIT_FAILURE,
        };
        Fail::new(code, &output::printable(&e.to_string()))
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
        Command::Server(args) => server::run(args.settings()).map(|()| 0),
        Command::Do(args) => r#do::run(args),
        Command::Lock(args) => lock::run(args),
        Command::Ping(args) => status::ping(args),
        Command::Stats(args) => status::stats(args),
        Command::Locks(args) => status::locks(args),
    }
}

/// Prints the failure on stderr, once. The server also logs it, unless its log lines go to
/// stderr already (`--log stderr`, or no /dev/log as in a container) or stderr is the journal,
/// where the syslog copy would land beside this one.
fn report(program: &str, fail: &Fail) {
    if fail.message.is_empty() {
        return;
    }
    if fail.plain {
        output::err_line(&fail.message);
        return;
    }
    if stderr_is_journal() {
        ::log::logger().flush();
    } else {
        crate::log::fatal(&fail.message);
    }
    output::err_line(&format!("{program}: error: {}", fail.message));
}

/// systemd connected stderr to the journal: `JOURNAL_STREAM` names stderr's device and inode
/// (systemd.exec(5)).
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    // SAFETY: fstat fills the stat we own.
    let mut st = unsafe { std::mem::zeroed::<libc::stat>() };
    if unsafe { libc::fstat(2, &mut st) } != 0 {
        return false;
    }
    stream.to_str() == Some(&format!("{}:{}", st.st_dev, st.st_ino))
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
    tcpnetlock::protocol::parse_seconds(text.trim()).ok_or_else(|| {
        format!(
            "expected seconds from 0 to {} (digits, optionally a fraction), got {text:?}",
            tcpnetlock::protocol::MAX_SECONDS
        )
    })
}

/// The longest duration any client flag takes (--grace, --retry-wait, --keep-alive-secs): a
/// week, as the protocol's `wait:` and `ttl:`. Longer is a mistake, and past about 2^63 s a
/// deadline cannot be represented at all.
pub const MAX_FLAG_SECS: u64 = tcpnetlock::protocol::MAX_SECONDS;

/// Seconds as [`parse_secs`] reads them, from 0 to [`MAX_FLAG_SECS`].
pub fn parse_bounded_secs(text: &str) -> Result<Duration, String> {
    let out_of_range = || format!("expected seconds from 0 to {MAX_FLAG_SECS}, got {text:?}");
    let secs = parse_secs(text).map_err(|_| out_of_range())?;
    if secs > Duration::from_secs(MAX_FLAG_SECS) {
        return Err(out_of_range());
    }
    Ok(secs)
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
    fn hosts_may_carry_the_port() {
        let parsed = |text: &str| parse_host(text).map(|h| (h.name, h.port));
        assert_eq!(parsed("db1"), Ok(("db1".into(), None)));
        assert_eq!(parsed("db1:7000"), Ok(("db1".into(), Some(7000))));
        assert_eq!(
            parsed("127.0.0.1:7654"),
            Ok(("127.0.0.1".into(), Some(7654)))
        );
        assert_eq!(parsed("::1"), Ok(("::1".into(), None)));
        assert_eq!(parsed("fe80::1%eth0"), Ok(("fe80::1%eth0".into(), None)));
        assert_eq!(parsed("[::1]"), Ok(("::1".into(), None)));
        assert_eq!(parsed("[::1]:7000"), Ok(("::1".into(), Some(7000))));
        for bad in [
            "",
            ":7000",
            "db1:",
            "db1:x",
            "db1:70000",
            "db1:0",
            "[::1",
            "[::1]x",
            "[]:1",
        ] {
            assert!(parse_host(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_bounded_secs("604800"),
            Ok(Duration::from_secs(604_800))
        );
        for bad in ["604800.5", "1e19", "-1"] {
            assert!(parse_bounded_secs(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
