//! Many descriptors behind one: the receiving end of a datagram socket pair whose queue holds
//! them in flight (SCM_RIGHTS messages nobody has read yet). The kernel keeps every descriptor in
//! flight open, so the bag can outlive the process that packed it, in systemd's fd store or
//! across an exec, and whoever holds the bag takes them all out with a few recvmsg calls.
//!
//! Why not store each connection in systemd's fd store: systemd 252 checks every new stored
//! descriptor against each one already stored (`same_fd()` in a list walk), so storing n
//! connections costs n²/2 comparisons inside PID 1, and the unit needs
//! `FileDescriptorStoreMax=` above the connection limit.
//!
//! The pair is SOCK_DGRAM on purpose: when the sending end closes, a SOCK_STREAM or
//! SOCK_SEQPACKET receiving end reports EPOLLHUP, and systemd drops a stored descriptor that
//! reports EPOLLHUP (unless stored with FDPOLL=0). A datagram socket reports nothing.
//!
//! Descriptors in flight count against the sender's RLIMIT_NOFILE (Linux's per-user
//! `unix_inflight` limit) until received; a server that may hold n connections needs a limit
//! above n anyway.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::notify::{MAX_FDS_PER_MESSAGE, send_with_fds};

/// Packs `fds` (copies of them: ours stay open) into a new bag.
pub fn pack(fds: &[RawFd]) -> io::Result<OwnedFd> {
    let mut pair = [0; 2];
    // SAFETY: socketpair writes two descriptors into the array.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            0,
            pair.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors nobody else owns.
    let (rx, tx) = unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
    // Each datagram in the queue counts against the sending end's buffer (about 1 KiB with its
    // overhead): the default 208 KiB holds some 200 datagrams, 50,000 descriptors. Room for
    // more, as far as net.core.wmem_max allows (the kernel caps the value silently).
    let want = (fds.len() / MAX_FDS_PER_MESSAGE + 1) * 2048;
    if want > 200 * 1024 {
        let size = libc::c_int::try_from(want).unwrap_or(libc::c_int::MAX);
        // SAFETY: a valid socket and a c_int that outlives the call. A failure leaves the
        // default, and a queue that overflows it is reported by the send below.
        unsafe {
            libc::setsockopt(
                tx.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
    for chunk in fds.chunks(MAX_FDS_PER_MESSAGE) {
        // The payload counts the descriptors, so the unpacker can tell a message whose
        // descriptors the kernel dropped (MSG_CTRUNC) from a short one.
        let count = (chunk.len() as u32).to_le_bytes();
        // MSG_DONTWAIT: a full queue is an error to report, not a reason to block the hand-over
        // forever. Between the two ends of a pair, net.unix.max_dgram_qlen does not apply; the
        // send buffer does (raised below).
        send_with_fds(tx.as_raw_fd(), None, &count, chunk, libc::MSG_DONTWAIT).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot put descriptors in flight: {e}"))
        })?;
    }
    Ok(rx)
}

/// Takes every descriptor out of a bag, in the order they were packed, close-on-exec.
pub fn unpack(bag: &OwnedFd) -> io::Result<Vec<OwnedFd>> {
    let mut out = Vec::new();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS_PER_MESSAGE * size_of::<RawFd>()) as u32) };
    let mut control = vec![0u64; (space as usize).div_ceil(8)];
    loop {
        let mut count = [0u8; 4];
        let mut iov = libc::iovec {
            iov_base: count.as_mut_ptr() as *mut libc::c_void,
            iov_len: count.len(),
        };
        // SAFETY: msghdr is plain data; zeroed is valid before the fields are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        // The field's type differs between libcs (size_t in glibc, socklen_t in musl).
        msg.msg_controllen = space as _;
        // SAFETY: msg points at live buffers for the duration of the call.
        let n = unsafe {
            libc::recvmsg(
                bag.as_raw_fd(),
                &mut msg,
                libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => return Ok(out),
                io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
        let mut got = 0;
        // SAFETY: the kernel filled msg_control; CMSG_* walk it within msg_controllen.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                    for i in 0..bytes / size_of::<RawFd>() {
                        out.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                        got += 1;
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        let expected = u32::from_le_bytes(count) as usize;
        if n != 4 || msg.msg_flags & libc::MSG_CTRUNC != 0 || got != expected {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a bag message brought {got} descriptors of {expected} (is RLIMIT_NOFILE too low?)"
                ),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn inode(fd: RawFd) -> u64 {
        // SAFETY: stat is plain data, filled by fstat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes into st.
        assert_eq!(unsafe { libc::fstat(fd, &mut st) }, 0);
        st.st_ino
    }

    /// Three datagrams' worth of descriptors (253 + 253 + 94) come out all, in order, as
    /// copies of what went in; the originals stay open.
    #[test]
    fn descriptors_come_out_in_order() {
        let originals: Vec<OwnedFd> = (0..600)
            .map(|_| {
                let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
                OwnedFd::from(a)
            })
            .collect();
        let raw: Vec<RawFd> = originals.iter().map(|f| f.as_raw_fd()).collect();
        let bag = pack(&raw).unwrap();
        let out = unpack(&bag).unwrap();
        assert_eq!(out.len(), 600);
        for (o, c) in originals.iter().zip(&out) {
            assert_ne!(o.as_raw_fd(), c.as_raw_fd());
            assert_eq!(inode(o.as_raw_fd()), inode(c.as_fd().as_raw_fd()));
        }
        // Emptied: a second unpack finds nothing.
        assert!(unpack(&bag).unwrap().is_empty());
    }
}
