//! The descriptors systemd passes (LISTEN_FDS) with their names (LISTEN_FDNAMES), and the
//! identity of a socket that survives being passed around.
//!
//! systemd 252 passes the socket units' listeners first (named by the socket unit's
//! `FileDescriptorName=`, by default its unit name, e.g. `tcpnetlock.socket`), then the fd store,
//! newest first, each named by the FDNAME it was stored with ("stored" without one). Descriptors
//! stored by one message come out in no particular order (systemd keeps them in a hash set on
//! the way), so a receiver goes by names and [`inode`], never by position.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// One descriptor passed by systemd.
#[derive(Debug)]
pub struct Passed {
    pub fd: OwnedFd,
    pub name: String,
}

/// Takes the descriptors systemd passed this process, close-on-exec, and removes LISTEN_PID,
/// LISTEN_FDS and LISTEN_FDNAMES from the environment so that no child or exec sees them again.
/// Empty when they were meant for another process (LISTEN_PID) or none were passed.
///
/// # Safety
/// Changes the environment: call it before any thread starts.
pub unsafe fn take_passed() -> io::Result<Vec<Passed>> {
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    // SAFETY: the caller promises no other thread runs.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    let (Some(pid), Some(count)) = (pid, count) else {
        return Ok(Vec::new());
    };
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(Vec::new());
    }
    let count: usize = count.parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("LISTEN_FDS={count:?} is not a number"),
        )
    })?;
    let names: Vec<&str> = names
        .as_deref()
        .map_or(Vec::new(), |n| n.split(':').collect());
    let mut passed = Vec::with_capacity(count);
    for i in 0..count {
        let fd = (3 + i) as RawFd;
        // SAFETY: F_SETFD on a descriptor systemd promised is open.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "descriptor {fd} passed by systemd (LISTEN_FDS={count}) is not open: {}",
                    io::Error::last_os_error()
                ),
            ));
        }
        passed.push(Passed {
            // SAFETY: systemd passed it to us alone; we own it from here.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            name: names.get(i).copied().unwrap_or("unknown").to_owned(),
        });
    }
    Ok(passed)
}

/// The socket's inode number: the same in every process that has the socket, unique among the
/// sockets that exist, so the state can name connections by it across a hand-over.
pub fn inode(fd: RawFd) -> io::Result<u64> {
    // SAFETY: stat is plain data, filled by fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into st.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_ino)
}
