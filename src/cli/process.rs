//! The command `do` runs under the lock: its own process group, and a guardian that ends the
//! group if `do` dies.
//!
//! `do` forks a small *guardian* (no exec: the forked copy of `do` itself), which becomes the
//! leader of a new process group and forks the command into that group. The guardian:
//!
//! - asks the kernel for a signal when `do` dies (`PR_SET_PDEATHSIG`; the fork is made from
//!   `do`'s main thread, which lives as long as `do`, because the signal follows the death of
//!   the forking *thread*). If `do` is killed, even with SIGKILL, the lock is gone with its
//!   connection; the guardian then sends SIGTERM to the whole group and SIGKILL after the grace
//!   period, so a pipeline or a `make -j` does not run on unprotected. A parent-death signal
//!   on the command alone would miss its children: the setting is not inherited across fork;
//! - waits for the command and exits the way it did (same status, or killed by the same
//!   signal), so `do` sees the command's status;
//! - blocks every signal: signals `do` forwards to the group reach the command, not the guardian.
//!
//! The guardian runs between fork and exec of a multi-threaded program, so it only makes
//! async-signal-safe system calls: no allocation, no locks, no std I/O.
//!
//! When `do` runs in the foreground of a terminal, the command's group is made the terminal's
//! foreground group, so that the command can read the terminal and Ctrl-C reaches it directly.
//! On its terminal, in the foreground or not, job control works as with any command: when the
//! command stops (Ctrl-Z, or SIGTTIN from reading the terminal in the background), the guardian
//! tells `do` through a pipe, and `do` takes the terminal back and stops its own process group
//! (itself, and a script or pipeline around it) with the same signal, so the shell sees the job
//! stopped and gets the terminal. `fg` or `bg` continue `do`, which hands the terminal on again
//! (`fg` only) and continues the command's group. The guardian itself never stops: it must stay
//! able to reap the command and to notice `do`'s death. The lock stays held while the job is
//! stopped, as flock's would.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use libc::{c_int, pid_t};

use super::output::with_sigttou_blocked;
use super::signals::sigset;

/// The guardian's parent-death signal. It is blocked and waited for, never delivered; a USR2
/// sent to the group by someone else is told apart by checking the parent.
const ORPHAN_SIGNAL: c_int = libc::SIGUSR2;

/// The command's process group, led by the guardian.
#[derive(Debug)]
pub struct Group {
    /// The guardian's pid, which is also the group id.
    pid: pid_t,
    /// `do` runs on its controlling terminal (in the foreground or not): the guardian reports
    /// the command's stops on this pipe (job control).
    stops: Option<OwnedFd>,
    /// The group has the terminal now; it is taken back when the group stops or ends.
    tty: bool,
    reaped: bool,
}

/// How the guardian behaves.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// When `do` dies: SIGTERM the group, SIGKILL it after `grace`. When false, the command
    /// runs on (`--on-lost ignore`).
    pub terminate_orphaned: bool,
    pub grace: Duration,
}

impl Group {
    /// Starts `cmd` in a new process group under a guardian. `cmd`'s stdio is inherited.
    pub fn spawn(cmd: &mut Command, options: Options) -> io::Result<Group> {
        // SAFETY: getpid cannot fail. An ignored SIGCHLD (inherited across exec from whoever
        // started us) would make the kernel reap children itself and wait() fail.
        let parent = unsafe {
            libc::signal(libc::SIGCHLD, libc::SIG_DFL);
            libc::getpid()
        };
        let tty = in_terminal_foreground();
        let (stops, report_to) = if on_our_terminal() {
            let (read, write) = stop_pipe()?;
            (Some(read), Some(write))
        } else {
            (None, None)
        };
        let report_fd = report_to.as_ref().map_or(-1, |fd| fd.as_raw_fd());
        cmd.process_group(0);
        // SAFETY: the closure only makes async-signal-safe calls (see `split`).
        unsafe {
            cmd.pre_exec(move || split(parent, tty, report_fd, options));
        }
        let child = cmd.spawn()?;
        drop(report_to);
        Ok(Group {
            pid: child.id() as pid_t,
            stops,
            tty,
            reaped: false,
        })
    }

    /// Readable when the guardian has reported a stop of the command (job control only).
    pub fn stops_fd(&self) -> Option<BorrowedFd<'_>> {
        self.stops.as_ref().map(|fd| fd.as_fd())
    }

    /// Passes a signal sent to `do` on to the group, followed by SIGCONT as systemd and the
    /// shell's `kill` do, so that it takes effect on a stopped command too.
    pub fn pass_on(&self, signal: c_int) {
        self.signal(signal);
        self.signal(libc::SIGCONT);
    }

    /// Sends `signal` to every process of the group (the guardian ignores it).
    pub fn signal(&self, signal: c_int) {
        if !self.reaped {
            // SAFETY: plain system call; a group already gone gives ESRCH, which is fine.
            unsafe { libc::kill(-self.pid, signal) };
        }
    }

    /// The command's exit status if it has ended (128+N when killed by signal N). With `sweep`,
    /// whatever is left in the group is killed first (it runs without the lock).
    pub fn try_wait(&mut self, sweep: bool) -> io::Result<Option<u8>> {
        if self.reaped {
            return Ok(None);
        }
        // SAFETY: siginfo_t is plain data filled by waitid. WNOWAIT leaves the guardian
        // unreaped, so its pid (the group id) cannot be reused before the sweep.
        unsafe {
            let mut info = std::mem::zeroed::<libc::siginfo_t>();
            let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
            if libc::waitid(libc::P_PID, self.pid as libc::id_t, &mut info, flags) < 0 {
                return Err(io::Error::last_os_error());
            }
            if info.si_pid() == 0 {
                return Ok(None);
            }
            if sweep {
                libc::kill(-self.pid, libc::SIGKILL);
            }
            let mut status = 0;
            libc::waitpid(self.pid, &mut status, 0);
            self.reaped = true;
            self.take_back_tty();
            Ok(Some(exit_code(status)))
        }
    }

    /// The stop signal if the guardian reported the command stopped, and it still is (a
    /// report can be stale: a signal passed on since, with its SIGCONT, continues the command).
    pub fn stopped(&mut self) -> Option<c_int> {
        let fd = self.stops.as_ref()?.as_raw_fd();
        let mut last = None;
        let mut record = [0u8; STOP_RECORD];
        loop {
            // SAFETY: reads at most the record's size into a buffer owned by this frame; the
            // descriptor is non-blocking.
            let n = unsafe { libc::read(fd, record.as_mut_ptr().cast(), STOP_RECORD) };
            if n == 0 {
                // The guardian is gone (its end is reported by `try_wait`): stop watching a
                // pipe that would now be readable forever.
                self.stops = None;
            }
            if n != STOP_RECORD as isize {
                break;
            }
            let [p0, p1, p2, p3, s0, s1, s2, s3] = record;
            last = Some((
                pid_t::from_ne_bytes([p0, p1, p2, p3]),
                c_int::from_ne_bytes([s0, s1, s2, s3]),
            ));
        }
        let (command, signal) = last?;
        process_stopped(command).then_some(signal)
    }

    /// The command stopped with `signal`: takes the terminal back and stops `do`'s own process
    /// group the same way, `do` with it, which tells the shell the job stopped. The whole group,
    /// as the terminal would have stopped it without `do`: the rest of a pipeline (`do ... |
    /// tee log`), or the shell of a script that runs `do`, must stop too, or the shell waiting
    /// for them would not get the terminal back. Returns once `do` is continued (`fg`, `bg`, or
    /// a SIGCONT), having handed the terminal on if `do` is in the foreground again and
    /// continued the command's group.
    pub fn suspend(&mut self, signal: c_int) {
        self.take_back_tty();
        // SAFETY: sigaction only reads the current disposition into a value we own. kill(0)
        // signals our process group; a signal to the sending process that it does not block
        // (the other threads block everything) is delivered before kill returns: the stop,
        // which ends at SIGCONT.
        unsafe {
            let mut current = std::mem::zeroed::<libc::sigaction>();
            libc::sigaction(signal, std::ptr::null(), &mut current);
            let stop = if current.sa_sigaction == libc::SIG_DFL {
                signal
            } else {
                libc::SIGSTOP
            };
            libc::kill(0, stop);
        }
        if in_terminal_foreground() {
            with_sigttou_blocked(|| {
                // SAFETY: plain system call on fd 0.
                unsafe { libc::tcsetpgrp(0, self.pid) };
            });
            self.tty = true;
        }
        self.signal(libc::SIGCONT);
    }

    fn take_back_tty(&mut self) {
        if std::mem::replace(&mut self.tty, false) {
            with_sigttou_blocked(|| {
                // SAFETY: plain system calls on fd 0.
                unsafe { libc::tcsetpgrp(0, libc::getpgrp()) };
            });
        }
    }
}

impl Drop for Group {
    /// `do` is leaving without having seen the command end: it must not outlive the lock.
    fn drop(&mut self) {
        if !self.reaped {
            self.signal(libc::SIGKILL);
            self.take_back_tty();
        }
    }
}

/// A wait status as a shell reports it.
fn exit_code(status: c_int) -> u8 {
    if libc::WIFSIGNALED(status) {
        super::EXIT_SIGNAL_BASE.saturating_add(libc::WTERMSIG(status) as u8)
    } else {
        libc::WEXITSTATUS(status) as u8
    }
}

/// A stop report from the guardian: the command's pid and the stop signal, native endian.
const STOP_RECORD: usize = 8;

/// The pipe for stop reports: `do` reads without blocking, the guardian writes without
/// blocking (a report that does not fit is dropped: `do` is not reading anyway).
fn stop_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills the two descriptors, which the OwnedFds then own.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])))
    }
}

/// Process `pid` is stopped now, from /proc/PID/stat (true if there is no /proc to tell).
fn process_stopped(pid: pid_t) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        // Gone already, or no /proc.
        return !std::path::Path::new("/proc/self/stat").exists();
    };
    // `pid (comm) STATE ...`: the name may hold spaces and parentheses; the last `)` ends it.
    stat.rsplit_once(')')
        .is_none_or(|(_, rest)| rest.trim_start().starts_with('T'))
}

/// Stdin is our session's controlling terminal: the shell that started us does job control
/// there (a shell without it gives background commands /dev/null as stdin).
fn on_our_terminal() -> bool {
    // SAFETY: plain system calls on fd 0.
    unsafe { libc::isatty(0) == 1 && libc::tcgetsid(0) == libc::getsid(0) }
}

/// Stdin is a terminal whose foreground group is ours: the command should get the terminal.
fn in_terminal_foreground() -> bool {
    // SAFETY: plain system calls on fd 0.
    unsafe { libc::isatty(0) == 1 && libc::tcgetpgrp(0) == libc::getpgrp() }
}

/// Runs in the forked child, which std has already made a group leader. Becomes the guardian
/// and forks again; returns (to go on to exec) only in the command's process.
fn split(parent: pid_t, tty: bool, report_fd: RawFd, options: Options) -> io::Result<()> {
    // SAFETY: only async-signal-safe system calls, on values owned by this frame.
    unsafe {
        let all = {
            let mut set = std::mem::zeroed::<libc::sigset_t>();
            libc::sigfillset(&mut set);
            set
        };
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
        if libc::prctl(libc::PR_SET_PDEATHSIG, ORPHAN_SIGNAL as libc::c_ulong) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::getppid() != parent {
            // `do` died before the signal was armed; its lock is gone.
            libc::_exit(1);
        }
        if tty {
            libc::tcsetpgrp(0, libc::getpid());
        }
        // What `ps -o comm` and `top` call it; its arguments still read as `do`'s.
        libc::prctl(libc::PR_SET_NAME, c"tnl-guardian".as_ptr() as libc::c_ulong);
        let guardian = libc::getpid();
        match libc::fork() {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                // The command. The guardian dies before it only if killed with SIGKILL.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                if libc::getppid() != guardian {
                    libc::_exit(1);
                }
                // std no longer resets the mask for exec; the command starts with none blocked.
                let none = sigset(&[]);
                libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
                Ok(())
            }
            command => guard(command, parent, report_fd, options),
        }
    }
}

/// The guardian's life: wait for the command, report its stops on `report_fd` (job control;
/// -1 without), and end the group if `do` dies.
///
/// # Safety
/// Must run in a freshly forked child with every signal blocked.
unsafe fn guard(command: pid_t, parent: pid_t, report_fd: RawFd, options: Options) -> ! {
    // SAFETY (whole body): async-signal-safe system calls only.
    unsafe {
        // Nothing of `do`'s may stay open here: not the pipe through which std learns that exec
        // succeeded, not the lock's socket, not a pipe someone reads `do`'s output from. Only
        // the stop reports' pipe, moved to descriptor 0.
        let job_control = report_fd >= 0 && libc::dup2(report_fd, 0) == 0;
        close_all_fds(if job_control { 1 } else { 0 });
        let set = sigset(&[libc::SIGCHLD, ORPHAN_SIGNAL]);
        let mut orphaned = false;
        let mut kill_at: Option<Duration> = None;
        loop {
            match kill_at {
                None => {
                    libc::sigwaitinfo(&set, std::ptr::null_mut());
                }
                Some(at) => {
                    let now = monotonic();
                    if now >= at {
                        libc::kill(0, libc::SIGKILL); // the whole group, the guardian with it
                    }
                    let ts = timespec(at.saturating_sub(now));
                    libc::sigtimedwait(&set, std::ptr::null_mut(), &ts);
                }
            }
            if !orphaned && libc::getppid() != parent {
                orphaned = true;
                if options.terminate_orphaned {
                    libc::kill(0, libc::SIGTERM);
                    kill_at = Some(monotonic().saturating_add(options.grace));
                }
            }
            // One SIGCHLD may stand for a stop and the end after it: look until nothing is new.
            let flags = libc::WNOHANG | if job_control { libc::WUNTRACED } else { 0 };
            let mut status = 0;
            while libc::waitpid(command, &mut status, flags) == command {
                if libc::WIFSTOPPED(status) {
                    let mut record = [0u8; STOP_RECORD];
                    record[..4].copy_from_slice(&command.to_ne_bytes());
                    record[4..].copy_from_slice(&libc::WSTOPSIG(status).to_ne_bytes());
                    libc::write(0, record.as_ptr().cast(), STOP_RECORD);
                    continue;
                }
                if orphaned && options.terminate_orphaned {
                    libc::kill(0, libc::SIGKILL); // what the command left behind
                }
                exit_like(status);
            }
        }
    }
}

/// Exits with the command's status, or dies of the signal that killed it.
unsafe fn exit_like(status: c_int) -> ! {
    // SAFETY: async-signal-safe system calls only.
    unsafe {
        if libc::WIFSIGNALED(status) {
            let signal = libc::WTERMSIG(status);
            // The command may have dumped core; a second core from the guardian helps nobody.
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            libc::signal(signal, libc::SIG_DFL);
            let one = sigset(&[signal]);
            libc::sigprocmask(libc::SIG_UNBLOCK, &one, std::ptr::null_mut());
            libc::kill(libc::getpid(), signal);
            libc::_exit(128 + signal);
        }
        libc::_exit(libc::WEXITSTATUS(status))
    }
}

/// Closes every descriptor from `first` on.
unsafe fn close_all_fds(first: u32) {
    // SAFETY: close_range and close are async-signal-safe system calls.
    unsafe {
        if libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) != 0 {
            for fd in first as c_int..4096 {
                libc::close(fd);
            }
        }
    }
}

/// A relative timeout for sigtimedwait. Clamped: a negative `tv_sec` (a cast past the largest
/// `time_t`) would make every wait fail at once, and the guardian spin. (The field's type is
/// inferred: `libc::time_t` is deprecated on musl, where it is changing width; both widths hold
/// `i32::MAX`, 68 years.)
fn timespec(left: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: left.as_secs().try_into().unwrap_or(i32::MAX.into()),
        tv_nsec: left.subsec_nanos() as libc::c_long,
    }
}

fn monotonic() -> Duration {
    // SAFETY: clock_gettime fills the timespec we own.
    let mut ts = unsafe { std::mem::zeroed::<libc::timespec>() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_saturate() {
        let ts = timespec(Duration::from_secs(u64::MAX));
        #[allow(clippy::useless_conversion)] // time_t is i32 or i64 by target
        let secs = i64::from(ts.tv_sec);
        assert_eq!(secs, i64::from(i32::MAX));
        let ts = timespec(Duration::new(3, 5));
        assert_eq!((ts.tv_sec, ts.tv_nsec), (3, 5));
    }
}
