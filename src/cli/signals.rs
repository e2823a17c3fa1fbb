//! Signals as readable events, for the `poll` loops of `do` and `lock`.
//!
//! The signals are blocked and read from a signalfd: no handler runs at an arbitrary point, and
//! the loop that waits for the child, the lock and stdin wakes for signals the same way. The
//! mask is set on the main thread; threads started later inherit it, and the client library's
//! lease renewal thread blocks everything (before the lock is handed over), so no other thread
//! can take these signals.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

pub struct SignalFd {
    fd: OwnedFd,
}

impl SignalFd {
    /// Blocks `signals` on this thread and opens a descriptor they can be read from.
    pub fn new(signals: &[libc::c_int]) -> io::Result<SignalFd> {
        let set = sigset(signals);
        // SAFETY: `set` is a valid, initialised sigset_t owned by this frame.
        unsafe {
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(SignalFd {
                fd: OwnedFd::from_raw_fd(fd),
            })
        }
    }

    /// The next pending signal, if any; never blocks.
    pub fn next(&self) -> Option<libc::c_int> {
        // SAFETY: signalfd_siginfo is plain data; read fills at most its size.
        let mut info = unsafe { std::mem::zeroed::<libc::signalfd_siginfo>() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        (n == size as isize).then_some(info.ssi_signo as libc::c_int)
    }
}

impl AsFd for SignalFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

pub fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset only writes into it.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// One descriptor to watch in [`poll`]; `None` is skipped.
pub fn pollfd(fd: Option<BorrowedFd<'_>>) -> libc::pollfd {
    libc::pollfd {
        fd: fd.map_or(-1, |fd| fd.as_raw_fd()),
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Waits until one of `fds` is ready or `timeout` passes (`None`: no timeout). An interrupted
/// wait returns early with nothing ready: the callers' loops look again.
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<()> {
    let ms = timeout.map_or(-1, |t| {
        // Round up, so that a deadline 0.4 ms away is not a busy loop of zero-timeout polls.
        (t.as_micros().div_ceil(1000)).min(i32::MAX as u128) as i32
    });
    // SAFETY: `fds` is a valid slice of pollfd for the duration of the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

/// The signal's name without `SIG`, for messages.
pub fn name(signal: libc::c_int) -> String {
    let known = [
        (libc::SIGHUP, "HUP"),
        (libc::SIGINT, "INT"),
        (libc::SIGQUIT, "QUIT"),
        (libc::SIGKILL, "KILL"),
        (libc::SIGTERM, "TERM"),
        (libc::SIGPIPE, "PIPE"),
        (libc::SIGABRT, "ABRT"),
        (libc::SIGSEGV, "SEGV"),
        (libc::SIGUSR1, "USR1"),
        (libc::SIGUSR2, "USR2"),
        (libc::SIGALRM, "ALRM"),
    ];
    known
        .iter()
        .find(|(s, _)| *s == signal)
        .map_or_else(|| signal.to_string(), |(_, n)| (*n).to_owned())
}
