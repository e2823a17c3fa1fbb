//! The `tcpnetlock` program: the lock server and the command-line tools, one static binary.
//!
//! The library (`tcpnetlock::client`, `protocol`, `status`) is what programs link; everything
//! here is the program's own: [`cli`] parses the command line and runs a subcommand, [`server`]
//! does the sockets and threads around the lock table ([`table`], a pure state machine), and
//! [`log`] sends the server's log lines to syslog or stderr without ever blocking a client. The
//! server counts what it does in [`metrics`] and answers a Prometheus scrape on the lock port
//! with [`http`]'s few rules. With the `etcd` feature, [`etcd`] is the etcd client behind the
//! cluster mode (`server::cluster`).

mod cli;
// A whole client (tests/etcd_client.rs and examples/etcd-probe.rs use all of it); the server
// needs only part of it.
#[cfg(feature = "etcd")]
#[allow(dead_code, unused_imports)]
mod etcd;
mod http;
mod log;
mod metrics;
mod server;
mod table;

fn main() -> std::process::ExitCode {
    // Asked by a running server before it re-executes this file (SIGUSR2): which hand-over
    // state versions this build reads. Hidden: not a command for people.
    if let [_, flag] = &std::env::args_os().collect::<Vec<_>>()[..]
        && flag == server::handover::VERSIONS_COMMAND
    {
        let versions: Vec<String> = server::handover::wire::READS
            .iter()
            .map(u32::to_string)
            .collect();
        println!("{}", versions.join(" "));
        return std::process::ExitCode::SUCCESS;
    }
    #[cfg(feature = "assets")]
    if let [_, flag, dir] = &std::env::args_os().collect::<Vec<_>>()[..]
        && flag == "__assets"
    {
        return match cli::assets::main(std::path::Path::new(dir)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tcpnetlock __assets: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    cli::main()
}
