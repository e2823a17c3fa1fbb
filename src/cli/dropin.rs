//! The binary as tcpnetlock 0.1.8's three programs, when invoked under their names (symlinks):
//! their flags (argparse's unique prefixes included, `--lock` for `--lock-name`), defaults,
//! environment variables, messages where scripts may look at them, and exit statuses.
//!
//! - `tcpnetlock_server [--listen localhost] [--port 7654] [--info|--debug]`: binds the first
//!   IPv4 address of `--listen`, as 0.1.8 did (it was an AF_INET server); logs to stderr,
//!   warnings only unless `--info` or `--debug`. Exit 2 when it cannot bind, 3 when it fails
//!   later.
//! - `tcpnetlock_client LOCK_NAME [--host] [--port] [--client-id] [--keep-alive]
//!   [--keep-alive-secs N] [--info|--debug]`: takes the lock and holds it until killed or
//!   until the connection is lost. Exit 2 connection refused, 3 connection failed, 4 other
//!   errors (and Ctrl-C, as 0.1.8's KeyboardInterrupt), 122 disconnected while holding, 123 not
//!   granted.
//! - `tcpnetlock_do`: `tcpnetlock do` (whose flags and statuses are a superset of 0.1.8's).

use std::ffi::OsString;
use std::net::ToSocketAddrs;
use std::time::Duration;

use clap::Parser;
use log::LevelFilter;

use super::r#do::DoArgs;
use super::lock::{End, hold, watch_signals};
use super::output::{err_line, printable};
use super::{
    EXIT_CLIENT_CONNECT_FAILED, EXIT_CLIENT_REFUSED, EXIT_CLIENT_UNKNOWN, EXIT_LOST,
    EXIT_NOT_GRANTED, EXIT_SERVER_FAILED, EXIT_USAGE, Fail, ServerAddr, parse_bounded_secs,
};
use crate::log::Target;
use crate::server::Config;
use tcpnetlock::client;

#[derive(Debug, Parser)]
#[command(
    name = "tcpnetlock_server",
    infer_long_args = true,
    args_override_self = true,
    about = "tcpnetlock server (0.1.8's command line)",
    long_about = "The lock server as tcpnetlock 0.1.8's tcpnetlock_server ran it: on the first \
IPv4 address of --listen, logging to stderr. This is the tcpnetlock binary called by this name \
(a symlink); `tcpnetlock server` has every option.\n\n\
Exits 2 when it cannot bind (with 0.1.8's message: [Errno 98] Address already in use), 3 when \
it fails while serving."
)]
struct ServerArgs {
    /// Host name or address to listen on (its first IPv4 address).
    #[arg(long, default_value = "localhost")]
    listen: String,
    /// Port to listen on.
    #[arg(long, default_value_t = client::DEFAULT_PORT)]
    port: u16,
    /// Log start-up and shutdown too (warnings only by default).
    #[arg(long)]
    info: bool,
    /// Log every request and decision too.
    #[arg(long)]
    debug: bool,
}

pub fn server(argv: Vec<OsString>) -> Result<u8, Fail> {
    let args = ServerArgs::parse_from(argv);
    let addr = (args.listen.as_str(), args.port)
        .to_socket_addrs()
        .map_err(|e| Fail::new(EXIT_USAGE, &format!("cannot resolve {}: {e}", args.listen)))?
        .find(|a| a.is_ipv4())
        .ok_or_else(|| Fail::new(EXIT_USAGE, &format!("{} has no IPv4 address", args.listen)))?;
    // 0.1.8 printed Python's text for a failed bind(), `[Errno 98] Address already in use`,
    // and exited 2; scripts may look for it. Trying the address first keeps that exact text
    // (the server binds again for real just after).
    if let Err(e) = std::net::TcpListener::bind(addr) {
        return Err(Fail::plain(EXIT_USAGE, &python_error(&e)));
    }
    let level = if args.debug {
        LevelFilter::Debug
    } else if args.info {
        LevelFilter::Info
    } else {
        LevelFilter::Warn
    };
    let settings = super::server::Settings {
        config: Config::default(),
        listen: vec![addr.to_string()],
        port: addr.port(),
        log: Target::Stderr,
        level,
    };
    super::server::run(settings)
        .map(|()| 0)
        .map_err(|fail| match fail.code {
            EXIT_USAGE => fail,
            _ => Fail {
                code: EXIT_SERVER_FAILED,
                ..fail
            },
        })
}

#[derive(Debug, Parser)]
#[command(
    name = "tcpnetlock_client",
    infer_long_args = true,
    args_override_self = true,
    about = "Take a lock and hold it until killed (0.1.8's command line)",
    long_about = "Takes the lock LOCK_NAME and holds it until killed or until the connection is \
lost, as tcpnetlock 0.1.8's tcpnetlock_client did. This is the tcpnetlock binary called by this \
name (a symlink).\n\n\
Exits 2 when the connection is refused, 3 when it fails otherwise, 4 on other errors and on \
Ctrl-C (the lock is released), 122 when the connection is lost while holding the lock, 123 when \
the lock is not granted. SIGTERM ends it by the signal."
)]
struct ClientArgs {
    /// Name of the lock to take.
    lock_name: String,
    #[command(flatten)]
    server: ServerAddr,
    /// Client id the server shows for this holder.
    #[arg(long, env = "TCPNETLOCK_CLIENT_ID")]
    client_id: Option<String>,
    /// Send the protocol's .keepalive while holding the lock.
    #[arg(long)]
    keep_alive: bool,
    /// Seconds between keepalives.
    #[arg(long, default_value = "15", value_parser = parse_bounded_secs)]
    keep_alive_secs: Duration,
    /// Say on stderr when the lock is granted.
    #[arg(long)]
    info: bool,
    /// As --info.
    #[arg(long)]
    debug: bool,
}

pub fn client(argv: Vec<OsString>) -> Result<u8, Fail> {
    let args = ClientArgs::parse_from(argv);
    let name = &args.lock_name;
    let mut client = args.server.client();
    if let Some(id) = &args.client_id {
        client = client.client_id(id);
    }
    let mut request = client.request(name);
    if args.keep_alive {
        // 0.1.8's --keep-alive: a lease renewal (`.keepalive`), whatever the flag is called.
        request = request.renew_every(args.keep_alive_secs.max(Duration::from_millis(100)));
    }
    // Ctrl-C is watched from before the lock is taken: one arriving just after the grant must
    // still end in a release and 0.1.8's status 4, not in death by signal. (0.1.8's client never
    // waits, so blocking SIGINT while connecting delays it by a round trip at most.)
    // SIGTERM keeps its default (the process ends, the lock with it), as in 0.1.8.
    let signals = watch_signals(&[libc::SIGINT])?;
    let lock = request.take().map_err(|e| {
        use client::Error as E;
        match e {
            E::Refused { .. } => Fail::plain(
                EXIT_CLIENT_REFUSED,
                &format!("[Errno {}] Connection refused", libc::ECONNREFUSED),
            ),
            E::Connect { source, .. } => {
                Fail::plain(EXIT_CLIENT_CONNECT_FAILED, &python_error(&source))
            }
            E::NotGranted | E::Server(_) | E::MaxMismatch { .. } => Fail::plain(
                EXIT_NOT_GRANTED,
                &format!("ERROR: lock '{name}' not granted by server"),
            ),
            e => Fail::plain(EXIT_CLIENT_UNKNOWN, &printable(&e.to_string())),
        }
    })?;
    if args.info || args.debug {
        err_line(&format!(
            "INFO: lock '{name}' granted; holding it until killed"
        ));
    }
    match hold(&lock, &signals, None) {
        End::Release => {
            drop(lock);
            Err(Fail::silent(EXIT_CLIENT_UNKNOWN))
        }
        End::Lost(_) => Err(Fail::plain(
            EXIT_LOST,
            &format!(
                "ERROR: Unexpected disconnection while holding the lock '{name}'. Server was killed?"
            ),
        )),
    }
}

/// An OS error the way Python prints one: `[Errno 111] Connection refused`.
fn python_error(e: &std::io::Error) -> String {
    let text = e.to_string();
    match e.raw_os_error() {
        Some(code) => {
            let reason = text
                .strip_suffix(&format!(" (os error {code})"))
                .unwrap_or(&text);
            format!("[Errno {code}] {reason}")
        }
        None => text,
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "tcpnetlock_do",
    infer_long_args = true,
    args_override_self = true,
    about = "Run a command while holding a lock (tcpnetlock do under 0.1.8's name)"
)]
struct DropinDoArgs {
    #[command(flatten)]
    args: DoArgs,
}

pub fn run(argv: Vec<OsString>) -> Result<u8, Fail> {
    super::r#do::run(DropinDoArgs::parse_from(argv).args)
}

/// The three command lines, for their man pages (cli/assets.rs).
#[cfg(feature = "assets")]
pub fn commands() -> [clap::Command; 3] {
    use clap::CommandFactory;
    [
        ServerArgs::command(),
        ClientArgs::command(),
        DropinDoArgs::command(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_are_consistent() {
        use clap::CommandFactory;
        ServerArgs::command().debug_assert();
        ClientArgs::command().debug_assert();
        DropinDoArgs::command().debug_assert();
    }

    #[test]
    fn errors_read_like_python() {
        let e = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(python_error(&e), "[Errno 111] Connection refused");
    }

    #[test]
    fn prefixes_work_as_in_argparse() {
        let a =
            DropinDoArgs::try_parse_from(["tcpnetlock_do", "--lock", "x", "--keep-alive", "true"])
                .unwrap();
        assert!(format!("{a:?}").contains("lock_name: Some(\"x\")"));
        assert!(format!("{a:?}").contains("keep_alive: true"));
    }
}
