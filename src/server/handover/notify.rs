//! sd_notify messages that carry descriptors, which the sd-notify crate sends only behind its
//! `fdstore` feature (pulling in the `sendfd` crate) and without a barrier: `FDSTORE=1` to put
//! descriptors into the unit's file descriptor store, `FDSTOREREMOVE=1` to take them out again,
//! and `BARRIER=1` to wait until systemd has read every message sent before it.
//!
//! The barrier matters because the old process exits right after storing: systemd 252 reads
//! notifications before it reaps a process, but only a barrier says the store is complete.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

/// The most descriptors Linux accepts in one SCM_RIGHTS message (`SCM_MAX_FD`); more fail with
/// EINVAL. systemd 252 reads up to 768 per notification, so the kernel is the limit.
pub const MAX_FDS_PER_MESSAGE: usize = 253;

/// The service manager's notification socket, or None outside systemd (no `NOTIFY_SOCKET`).
fn notify_address() -> io::Result<Option<(libc::sockaddr_un, libc::socklen_t)>> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(None);
    };
    let bytes = path.as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    // "@name" is Linux's abstract namespace: a leading NUL and no terminating one.
    let (name, lead) = match bytes.first() {
        Some(b'@') => (&bytes[1..], 1),
        Some(b'/') => (bytes, 0),
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("NOTIFY_SOCKET={path:?} is neither a path nor an abstract socket name"),
            ));
        }
    };
    if lead + name.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("NOTIFY_SOCKET={path:?} is too long for a socket address"),
        ));
    }
    for (i, &b) in name.iter().enumerate() {
        addr.sun_path[lead + i] = b as libc::c_char;
    }
    // A path counts its terminating NUL, an abstract name its leading one: one byte either way.
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + name.len() + 1;
    Ok(Some((addr, len as libc::socklen_t)))
}

/// Sends one notification with `fds` attached. Ok(false) outside systemd. The descriptors stay
/// ours: the kernel gives systemd its own copies.
pub fn send(message: &str, fds: &[RawFd]) -> io::Result<bool> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} descriptors in one notification; Linux takes at most {MAX_FDS_PER_MESSAGE}",
                fds.len()
            ),
        ));
    }
    let Some((addr, addr_len)) = notify_address()? else {
        return Ok(false);
    };
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let sock = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sock is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    send_with_fds(
        sock.as_raw_fd(),
        Some((&addr, addr_len)),
        message.as_bytes(),
        fds,
        0,
    )?;
    Ok(true)
}

/// sendmsg(2) of `payload` with `fds` as SCM_RIGHTS, to `to` or to the connected peer. Also used
/// by [`super::bag`] (hence `pub(super)`).
pub(super) fn send_with_fds(
    sock: RawFd,
    to: Option<(&libc::sockaddr_un, libc::socklen_t)>,
    payload: &[u8],
    fds: &[RawFd],
    flags: libc::c_int,
) -> io::Result<()> {
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = if fds.is_empty() {
        0
    } else {
        unsafe { libc::CMSG_SPACE(fd_bytes as u32) }
    };
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; (space as usize).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is valid before the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    if let Some((addr, len)) = to {
        msg.msg_name = addr as *const libc::sockaddr_un as *mut libc::c_void;
        msg.msg_namelen = len;
    }
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        // The field's type differs between libcs (size_t in glibc, socklen_t in musl).
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer has room for one header and `fds` (CMSG_SPACE above);
        // CMSG_FIRSTHDR and CMSG_DATA point inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr() as *const u8,
                libc::CMSG_DATA(cmsg),
                fd_bytes,
            );
        }
    }
    loop {
        // SAFETY: msg points at live buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(sock, &msg, flags | libc::MSG_NOSIGNAL) };
        if n >= 0 {
            if n as usize != payload.len() {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "datagram sent short",
                ));
            }
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Whether systemd accepts `name` as an FDNAME: at most 255 printable ASCII characters and no
/// colon (LISTEN_FDNAMES joins names with colons). An invalid name is stored as "stored".
pub fn valid_fdname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b':')
}

/// Puts `fds` into the unit's file descriptor store under `name`, in as many messages as the
/// kernel needs. `poll: false` sends FDPOLL=0: otherwise systemd drops a stored socket as soon
/// as it reports EPOLLHUP or EPOLLERR (a peer that reset or closed both ways). Ok(false) outside
/// systemd. systemd quietly ignores descriptors beyond `FileDescriptorStoreMax=` (it logs
/// "Cannot store more fds than FileDescriptorStoreMax=…, closing remaining") and descriptors
/// already stored (the same open file: it compares each new one with every stored one).
pub fn store(name: &str, fds: &[RawFd], poll: bool) -> io::Result<bool> {
    if !valid_fdname(name) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a valid FDNAME (printable ASCII, no ':', at most 255)"),
        ));
    }
    let message = if poll {
        format!("FDSTORE=1\nFDNAME={name}")
    } else {
        format!("FDSTORE=1\nFDNAME={name}\nFDPOLL=0")
    };
    for chunk in fds.chunks(MAX_FDS_PER_MESSAGE) {
        if !send(&message, chunk)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Closes every stored descriptor named `name` in systemd (FDSTOREREMOVE=1). The next process
/// gets copies of stored descriptors and they stay stored: a connection taken over and later
/// closed by the new process would stay open in systemd, its client never seeing the close,
/// unless removed here.
pub fn remove(name: &str) -> io::Result<bool> {
    send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), &[])
}

/// Waits until systemd has processed every notification this process sent before, like
/// sd_notify_barrier(3) (systemd 246 and later): systemd closes the pipe end we send it when it
/// reads the message. Ok(false) outside systemd or if `timeout` passed first.
pub fn barrier(timeout: Duration) -> io::Result<bool> {
    let mut ends = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors nobody else owns.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
    if !send("BARRIER=1", &[write_end.as_raw_fd()])? {
        return Ok(false);
    }
    drop(write_end);
    let mut pfd = libc::pollfd {
        fd: read_end.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: one valid pollfd.
        match unsafe { libc::poll(&mut pfd, 1, ms) } {
            0 => return Ok(false),
            n if n > 0 => return Ok(pfd.revents & libc::POLLHUP != 0),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}
