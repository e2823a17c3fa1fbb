//! The serialised state travels in a sealed memfd: any size (a lock table with 10,000 holders
//! does not fit a socket buffer or the environment), readable from the start by whoever gets
//! the descriptor, and sealed so the reader knows nobody changes it underneath.
//!
//! memfd_create is in systemd's `@system-service` system call set (via `@ipc`), so the unit's
//! `SystemCallFilter=` allows it.

use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A sealed memfd holding `bytes`.
pub fn write(name: &CStr, bytes: &[u8]) -> io::Result<OwnedFd> {
    // SAFETY: memfd_create with a valid C string.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and ours.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(bytes)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on our memfd.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file.into())
}

/// Everything in the memfd (or any file), from its start.
pub fn read(fd: OwnedFd) -> io::Result<Vec<u8>> {
    let mut file = File::from(fd);
    file.seek(SeekFrom::Start(0))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}
