//! `tcpnetlock do`: run a command while holding a lock. The options and exit statuses of
//! tcpnetlock 0.1.8's `tcpnetlock_do`, plus waiting, fencing tokens, leases and a policy for a
//! lock lost while the command runs.
//!
//! One thread, one `poll` loop: it wakes for a signal (forwarded to the command's process
//! group; SIGCHLD means look whether the command ended), for the lock's connection (lost?), and
//! for the end of the grace period after a SIGTERM. The command runs under a guardian
//! (`cli/process.rs`) so that killing `do` cannot leave it running without the lock.

use std::ffi::OsString;
use std::os::fd::AsFd;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};

use super::output::{err_line, printable};
use super::process::{self, Group};
use super::signals::{self, SignalFd};
use super::waiting;
use super::{
    EXIT_CANNOT_RUN, EXIT_LOST, EXIT_NOT_FOUND, EXIT_NOT_GRANTED, EXIT_USAGE, Fail, ServerAddr,
    parse_bounded_secs, parse_protocol_secs,
};
use tcpnetlock::client::{self, Client, Lock, LockBuilder};
use tcpnetlock::protocol::DEFAULT_MAX_NAME_LEN;

/// Signals sent to `do` that go on to the command's process group.
const FORWARDED: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

const EXIT_CODES: &str = "\
Exit status: the command's own; 128+N if it was killed by signal N; 122 if the lock was lost \
and the command terminated, or the loss was found on releasing after the command ended \
(--on-lost terminate); 123 if the lock was not granted (or the value \
of --conflict-exit-code); 124 if the command could not be started; 125 if the server cannot be \
reached; 127 if the command was not found; 2 for bad options.

The command's environment has TCPNETLOCK_LOCK_NAME, and TCPNETLOCK_TOKEN with --fencing.";

/// An option given twice takes its last value, as 0.1.8's argparse did (wrappers append flags).
#[derive(Debug, Args)]
#[command(after_help = EXIT_CODES, args_override_self = true)]
pub struct DoArgs {
    /// Name of the lock [default: made from the command, as 0.1.8 did: spaces, '.' and '/'
    /// become '_', other characters outside [A-Za-z0-9_-] are dropped].
    #[arg(long, value_name = "NAME")]
    lock_name: Option<String>,

    #[command(flatten)]
    server: ServerAddr,

    /// Client id the server shows for this holder.
    #[arg(long, value_name = "ID", env = "TCPNETLOCK_CLIENT_ID")]
    client_id: Option<String>,

    /// Wait up to SECONDS for the lock in the server's first-come-first-served queue, instead of
    /// giving up at once. While waiting, stderr says who holds the lock and how many are ahead:
    /// a status line kept up to date on a terminal, else one line (with -v, one per change of
    /// holder).
    #[arg(short, long, value_name = "SECONDS", value_parser = parse_protocol_secs)]
    wait: Option<Duration>,

    /// Ask again this many times after "not granted".
    #[arg(long, value_name = "N", default_value_t = 0)]
    retry: u32,

    /// Seconds between --retry attempts.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_bounded_secs)]
    retry_wait: Duration,

    /// Exit with N instead of 123 when the lock is not granted (as flock -E).
    #[arg(short = 'E', long, value_name = "N")]
    conflict_exit_code: Option<u8>,

    /// Let up to N commands hold the lock at once (a counting semaphore, as `consul lock -n`);
    /// everyone using the name must give the same N.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65535))]
    max: Option<u32>,

    /// Ask for a fencing token and pass it to the command as TCPNETLOCK_TOKEN.
    #[arg(long)]
    fencing: bool,

    /// Hold the lock in shared mode (as flock -s): any number of shared holders at once, never
    /// together with an exclusive one (a plain `do`). Not with --max.
    #[arg(short, long)]
    shared: bool,

    /// Hold the lock as a lease of SECONDS, renewed in the background; the server revokes it if
    /// `do` stops renewing it (a hung host, a frozen VM), and `do` counts it lost once the
    /// server has answered no renewal for SECONDS less a margin (a stalled network). Against a
    /// cluster member the default is the longest ttl it vouches for, and more is refused.
    #[arg(long, value_name = "SECONDS", value_parser = parse_protocol_secs)]
    ttl: Option<Duration>,

    /// Renew the lock (a `.keepalive` request) every --keep-alive-secs while the command runs
    /// (0.1.8's flag).
    #[arg(long)]
    keep_alive: bool,

    /// Seconds between renewals.
    #[arg(long, value_name = "SECONDS", default_value = "15", value_parser = parse_bounded_secs)]
    keep_alive_secs: Duration,

    /// What to do when the lock is lost while the command runs (server restarted, connection
    /// broken, lease expired): terminate the command (SIGTERM to its process group, SIGKILL after
    /// --grace; exit 122) or ignore it (a warning; the command runs on). Also decides whether the
    /// command is ended when `do` itself is killed.
    #[arg(long, value_enum, value_name = "POLICY", default_value = "terminate")]
    on_lost: OnLost,

    /// Seconds between SIGTERM and SIGKILL when the command is terminated.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_bounded_secs)]
    grace: Duration,

    /// Run the command with /bin/sh -c (for pipes and redirections); give it as one argument.
    #[arg(long)]
    shell: bool,

    /// Say what happens (lock name, grant, release, each change of holder while waiting) on
    /// stderr.
    #[arg(short, long)]
    verbose: bool,

    /// Same as --verbose (0.1.8's logging flag).
    #[arg(long, hide = true)]
    info: bool,

    /// Same as --verbose (0.1.8's logging flag).
    #[arg(long, hide = true)]
    debug: bool,

    /// The command to run, and its arguments.
    #[arg(required = true, trailing_var_arg = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnLost {
    Terminate,
    Ignore,
}

impl DoArgs {
    fn verbose(&self) -> bool {
        self.verbose || self.info || self.debug
    }

    fn lock_name(&self) -> Result<String, Fail> {
        if let Some(name) = &self.lock_name {
            return Ok(name.clone());
        }
        let name = name_from_command(&self.command);
        if name.is_empty() {
            return Err(Fail::new(
                EXIT_USAGE,
                "cannot make a lock name from the command; give one with --lock-name",
            ));
        }
        if self.verbose() {
            err_line(&format!(
                "tcpnetlock: lock name {name} (made from the command)"
            ));
        }
        Ok(name)
    }

    fn client(&self) -> Client {
        let client = self.server.client();
        match &self.client_id {
            Some(id) => client.client_id(id),
            None => client,
        }
    }

    /// The lock request the flags describe.
    fn request<'a>(&self, client: &'a Client, name: &str) -> Result<LockBuilder<'a>, Fail> {
        let mut request = client
            .request(name)
            .fencing(self.fencing)
            .shared(self.shared);
        if let Some(wait) = self.wait {
            request = request.wait(wait);
        }
        if let Some(ttl) = self.ttl {
            request = request.ttl(ttl);
        }
        if let Some(max) = self.max {
            request = request.max(max);
        }
        if self.keep_alive {
            if self.keep_alive_secs.is_zero() {
                return Err(Fail::new(
                    EXIT_USAGE,
                    "--keep-alive-secs must be more than 0",
                ));
            }
            // 0.1.8's --keep-alive: a lease renewal, whatever the flag is called.
            request = request.renew_every(self.keep_alive_secs);
        }
        super::cluster::with_lease_ttl(request, client, self.ttl)
    }

    fn command(&self, name: &str, token: Option<u64>) -> Command {
        let mut cmd = if self.shell {
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-c").arg(&self.command[0]);
            cmd
        } else {
            let mut cmd = Command::new(&self.command[0]);
            cmd.args(&self.command[1..]);
            cmd
        };
        cmd.env("TCPNETLOCK_LOCK_NAME", name);
        // A TCPNETLOCK_TOKEN inherited from an outer `do` would be a lie here.
        match token {
            Some(token) => cmd.env("TCPNETLOCK_TOKEN", token.to_string()),
            None => cmd.env_remove("TCPNETLOCK_TOKEN"),
        };
        cmd
    }
}

pub fn run(args: DoArgs) -> Result<u8, Fail> {
    if args.shell && args.command.len() != 1 {
        return Err(Fail::new(
            EXIT_USAGE,
            "with --shell, give the command as ONE argument (quote it)",
        ));
    }
    let name = args.lock_name()?;
    let client = args.client();
    let lock = acquire(&args.request(&client, &name)?, &name, &args)?;
    if args.verbose() {
        let mode = if lock.is_shared() { " (shared)" } else { "" };
        match lock.token() {
            Some(token) => err_line(&format!(
                "tcpnetlock: lock {name} granted{mode} (token {token})"
            )),
            None => err_line(&format!("tcpnetlock: lock {name} granted{mode}")),
        }
    }
    // Blocked before the fork, so that no signal is lost between the fork and the loop; a
    // signal arriving before this line ends `do` the default way, and the lock with it.
    let mut watched = FORWARDED.to_vec();
    watched.push(libc::SIGCHLD);
    let signals = SignalFd::new(&watched)
        .map_err(|e| Fail::new(EXIT_CANNOT_RUN, &format!("cannot watch signals: {e}")))?;
    let options = process::Options {
        terminate_orphaned: args.on_lost == OnLost::Terminate,
        grace: args.grace,
    };
    let mut group = Group::spawn(&mut args.command(&name, lock.token()), options)
        .map_err(|e| spawn_failure(&args.command[0], &e))?;
    let outcome = supervise(&mut group, &lock, &signals, &args, &name)
        .map_err(|e| Fail::new(EXIT_CANNOT_RUN, &format!("waiting for the command: {e}")))?;
    match outcome {
        Outcome::Terminated => Err(Fail::silent(EXIT_LOST)),
        // --on-lost ignore, and the loss was reported when it came.
        Outcome::Exited { code, lost: true } => Ok(code),
        Outcome::Exited { code, lost: false } => release(lock, &name, &args, code),
    }
}

/// Asks for the lock, again after a refusal if --retry says so.
fn acquire(request: &LockBuilder, name: &str, args: &DoArgs) -> Result<Lock, Fail> {
    let mut retries = args.retry;
    loop {
        let error = match waiting::take(request, name, args.wait, args.verbose()) {
            Ok(lock) => return Ok(lock),
            Err(e) => e,
        };
        // 0.1.8 treated an `err,` line (server busy, ...) as "not granted" too.
        let refused = matches!(
            error,
            client::Error::NotGranted
                | client::Error::Server(_)
                | client::Error::MaxMismatch { .. }
        );
        if refused && retries > 0 {
            retries -= 1;
            if args.verbose() {
                err_line(&format!(
                    "tcpnetlock: lock {name}: {}; {retries} retries left after this one, next \
                     in {:?}",
                    printable(&error.to_string()),
                    args.retry_wait
                ));
            }
            thread::sleep(args.retry_wait);
            continue;
        }
        return Err(match error {
            client::Error::NotGranted => {
                let code = args.conflict_exit_code.unwrap_or(EXIT_NOT_GRANTED);
                // Quiet by default, like flock: "somebody else is on it" is routine in a cron job.
                if args.verbose() {
                    Fail::new(code, &format!("lock {name}: {error}"))
                } else {
                    Fail::silent(code)
                }
            }
            client::Error::MaxMismatch { held_max } => Fail::new(
                EXIT_NOT_GRANTED,
                &max_mismatch(name, held_max, args.max.unwrap_or(1)),
            ),
            e => Fail::from_client(&e),
        });
    }
}

/// What to say when the name is held as a semaphore of another size: the server's words, and
/// what to do about it.
pub(super) fn max_mismatch(name: &str, held_max: u32, asked: u32) -> String {
    format!(
        "max mismatch: {name} is held with max:{held_max}, asked with max:{asked} (everyone \
         using a name must give the same --max)"
    )
}

fn spawn_failure(program: &OsString, e: &std::io::Error) -> Fail {
    let program = program.to_string_lossy();
    if e.kind() == std::io::ErrorKind::NotFound {
        Fail::new(EXIT_NOT_FOUND, &format!("command not found: '{program}'"))
    } else {
        Fail::new(EXIT_CANNOT_RUN, &format!("cannot run '{program}': {e}"))
    }
}

enum Outcome {
    /// The command ended by itself (or by a signal from outside); `lost` if the lock was lost
    /// on the way and the command kept running (--on-lost ignore).
    Exited { code: u8, lost: bool },
    /// The lock was lost and the command ended by us.
    Terminated,
}

fn supervise(
    group: &mut Group,
    lock: &Lock,
    signals: &SignalFd,
    args: &DoArgs,
    name: &str,
) -> std::io::Result<Outcome> {
    let mut run = Run {
        group,
        lock,
        args,
        name,
        lost: false,
        kill_at: None,
        terminating: false,
    };
    loop {
        let lock_readable = run.wait(signals)?;
        while let Some(signal) = signals.next() {
            run.pass_on(signal);
        }
        if let Some(outcome) = run.ended()? {
            return Ok(outcome);
        }
        if let Some(stop) = run.group.stopped() {
            run.group.suspend(stop);
        }
        if lock_readable {
            run.check_lock();
        }
        run.kill_when_due();
    }
}

/// One command under the lock, and what has happened to both.
struct Run<'a> {
    group: &'a mut Group,
    lock: &'a Lock,
    args: &'a DoArgs,
    name: &'a str,
    lost: bool,
    /// The command was told to end because the lock was lost.
    terminating: bool,
    /// When to follow the SIGTERM with a SIGKILL.
    kill_at: Option<Instant>,
}

impl Run<'_> {
    /// Sleeps until a signal, news on the lock's connection or the end of the lease by the
    /// client's clock (true: look at the lock), or the SIGKILL deadline. A stalled connection
    /// brings no byte at all, so the lease clock has to wake us itself.
    fn wait(&self, signals: &SignalFd) -> std::io::Result<bool> {
        let lock_fd = (!self.lost).then(|| self.lock.as_fd());
        let lease = lock_fd.and_then(|_| self.lock.lease_deadline());
        let mut fds = [
            signals::pollfd(Some(signals.as_fd())),
            signals::pollfd(lock_fd),
            signals::pollfd(self.group.stops_fd()),
        ];
        let timeout = [self.kill_at, lease]
            .into_iter()
            .flatten()
            .min()
            .map(|at| at.saturating_duration_since(Instant::now()));
        signals::poll(&mut fds, timeout)?;
        Ok(fds[1].revents != 0 || lease.is_some_and(|at| Instant::now() >= at))
    }

    /// SIGCHLD only says "look"; the others are for the command.
    fn pass_on(&self, signal: libc::c_int) {
        if signal == libc::SIGCHLD {
            return;
        }
        self.group.pass_on(signal);
        if self.args.verbose() {
            err_line(&format!(
                "tcpnetlock: passed SIG{} on to the command",
                signals::name(signal)
            ));
        }
    }

    fn ended(&mut self) -> std::io::Result<Option<Outcome>> {
        let terminating = self.terminating;
        Ok(self.group.try_wait(terminating)?.map(|code| {
            if terminating {
                Outcome::Terminated
            } else {
                Outcome::Exited {
                    code,
                    lost: self.lost,
                }
            }
        }))
    }

    fn check_lock(&mut self) {
        let Some(why) = self.lock.lost() else {
            return;
        };
        self.lost = true;
        let name = self.name;
        let why = printable(&why.to_string());
        if self.args.on_lost == OnLost::Ignore {
            err_line(&format!(
                "tcpnetlock: warning: lock {name} lost: {why}; the command keeps running \
                 (--on-lost ignore)"
            ));
            return;
        }
        // The command first, the words after: nothing that happens to the message (a closed
        // stderr, a terminal that would stop a background writer) may delay the SIGTERM.
        self.group.signal(libc::SIGTERM);
        self.terminating = true;
        // A grace the clock cannot count to never ends (the flag's bound keeps it far below).
        self.kill_at = Instant::now().checked_add(self.args.grace);
        err_line(&format!(
            "tcpnetlock: lock {name} lost: {why}; terminating the command (SIGTERM, SIGKILL \
             after {}s)",
            self.args.grace.as_secs_f64()
        ));
    }

    fn kill_when_due(&mut self) {
        if self.kill_at.is_some_and(|at| Instant::now() >= at) {
            self.group.signal(libc::SIGKILL);
            self.kill_at = None;
        }
    }
}

/// Releases the lock once the command has ended by itself; returns `do`'s status.
fn release(lock: Lock, name: &str, args: &DoArgs, code: u8) -> Result<u8, Fail> {
    match lock.release() {
        Ok(()) => {
            if args.verbose() {
                err_line(&format!("tcpnetlock: lock {name} released"));
            }
            Ok(code)
        }
        // Found only now, the loss may have come while the command ran: its success cannot be
        // trusted, as if the loss had been seen in time (--on-lost terminate).
        Err(client::Error::Lost(why)) if args.on_lost == OnLost::Terminate => Err(Fail::new(
            EXIT_LOST,
            &format!(
                "lock {name} lost: {why}; found on releasing it after the command ended \
                 (status {code})"
            ),
        )),
        Err(e) => {
            err_line(&format!(
                "tcpnetlock: warning: lock {name}: {}",
                printable(&e.to_string())
            ));
            Ok(code)
        }
    }
}

/// 0.1.8's lock name for a command: the arguments joined by spaces; spaces, dots and slashes
/// made underscores; underscores at either end stripped; then every character outside
/// `[A-Za-z0-9_-]` dropped. A name longer than the server accepts is cut to 111 characters and
/// given a hash of the whole, so that different long commands keep different locks.
pub fn name_from_command(command: &[OsString]) -> String {
    let joined = command
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let underscored: String = joined
        .chars()
        .map(|c| if matches!(c, ' ' | '.' | '/') { '_' } else { c })
        .collect();
    let name: String = underscored
        .trim_matches('_')
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .collect();
    if name.len() <= DEFAULT_MAX_NAME_LEN {
        return name;
    }
    format!("{}-{:016x}", &name[..111], fnv1a(name.as_bytes()))
}

/// FNV-1a, 64 bits: stable across Rust versions and platforms, unlike std's hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(args: &[&str]) -> String {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        name_from_command(&args)
    }

    #[test]
    fn names_as_0_1_8_makes_them() {
        assert_eq!(name(&["vmstat", "1", "1"]), "vmstat_1_1");
        assert_eq!(
            name(&["python", "manage.py", "migrate"]),
            "python_manage_py_migrate"
        );
        assert_eq!(name(&["./run.sh"]), "run_sh");
        assert_eq!(name(&["/usr/bin/backup", "--all"]), "usr_bin_backup_--all");
        assert_eq!(name(&["exit 5"]), "exit_5");
        // Strip first, filter after: `*` goes, the underscore before it stays.
        assert_eq!(name(&["ls", "*"]), "ls_");
        assert_eq!(name(&["_x_"]), "x");
        assert_eq!(name(&["é"]), "");
        assert_eq!(
            name(&["vmstat 1 1 | grep -v procs"]),
            "vmstat_1_1__grep_-v_procs"
        );
    }

    #[test]
    fn long_names_are_shortened_with_a_hash() {
        let a = name(&[&"x".repeat(300), "a"]);
        let b = name(&[&"x".repeat(300), "b"]);
        assert_eq!(a.len(), DEFAULT_MAX_NAME_LEN);
        assert_ne!(a, b);
        assert!(tcpnetlock::protocol::valid_lock_name(
            &a,
            DEFAULT_MAX_NAME_LEN
        ));
        assert_eq!(name(&[&"y".repeat(128)]), "y".repeat(128));
    }

    #[test]
    fn fnv_is_the_published_function() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
