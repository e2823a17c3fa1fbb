//! Replacing the running program with (a new version of) itself, the way nginx's binary upgrade
//! and HAProxy's master re-exec on SIGUSR2 do, keeping chosen descriptors: the process, its PID
//! and so its place under a supervisor stay the same, the code is new.
//!
//! Which file: the path the executable had when the server started, recorded then
//! ([`own_path`]). A package upgrade replaces that path by renaming a new file over it; the
//! running process's `/proc/self/exe` then reads "PATH (deleted)", and exec of
//! `/proc/self/exe` would start the old, deleted program again.
//!
//! Across execve(2) a descriptor stays open unless close-on-exec; the signal mask and pending
//! signals stay too (a server that blocks its signals in every thread starts the new image
//! with them blocked, which is what the new image expects); every other thread is gone.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// This program's path now. Call it at start, before an upgrade can rename another file over it.
pub fn own_path() -> io::Result<PathBuf> {
    let path = std::fs::read_link("/proc/self/exe")?;
    let bytes = path.as_os_str().as_bytes();
    // Started from a file already replaced: exec the path, which holds the replacement.
    Ok(match bytes.strip_suffix(b" (deleted)") {
        Some(p) => PathBuf::from(OsStr::from_bytes(p)),
        None => path,
    })
}

/// Sets or clears close-on-exec on `fd`.
pub fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    let flag = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: F_SETFD on a descriptor the caller owns.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flag) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn cstring(bytes: Vec<u8>, what: &str) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    })
}

/// execve(2) of `path` with `args` (`argv[0]` first) and exactly `env`. Returns only if the exec
/// failed; the caller then restores close-on-exec on what it meant to keep and serves on.
pub fn exec(path: &Path, args: &[OsString], env: &[(OsString, OsString)]) -> io::Error {
    let prepared = (|| -> io::Result<(CString, Vec<CString>, Vec<CString>)> {
        let p = cstring(
            path.as_os_str().as_bytes().to_vec(),
            "the executable's path",
        )?;
        let argv = args
            .iter()
            .map(|a| cstring(a.clone().into_vec(), "an argument"))
            .collect::<io::Result<Vec<_>>>()?;
        let envp = env
            .iter()
            .map(|(k, v)| {
                let mut kv = k.clone().into_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                cstring(kv, "an environment variable")
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok((p, argv, envp))
    })();
    let (p, argv, envp) = match prepared {
        Ok(x) => x,
        Err(e) => return e,
    };
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    // SAFETY: NUL-terminated strings and null-terminated arrays that outlive the call.
    unsafe { libc::execve(p.as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr()) };
    io::Error::last_os_error()
}
