//! The command line: one binary, one subcommand per file. Errors become a message on stderr and an
//! exit status here, at the edge, and nowhere else.

pub mod server;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Bad flags or arguments, and a server that cannot bind (as tcpnetlock 0.1.8).
pub const EXIT_USAGE: u8 = 2;

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
}

/// A failure to report: the message for stderr and the exit status.
#[derive(Debug)]
pub struct Fail {
    pub code: u8,
    pub message: String,
}

impl Fail {
    pub fn new(code: u8, message: &str) -> Fail {
        Fail {
            code,
            message: message.to_owned(),
        }
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Server(args) => server::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(fail) => {
            log::error!("{}", fail.message);
            eprintln!("tcpnetlock: error: {}", fail.message);
            ExitCode::from(fail.code)
        }
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
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
