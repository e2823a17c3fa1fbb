//! Framing: a connection's bytes into request lines, with the limits that keep a client from
//! costing more than its buffer (`--max-line-length`) or its time (`--request-timeout`). What a
//! line means is the protocol's business; what to do about it, the session's.

use std::io::{self, Read};
use std::mem::MaybeUninit;
use std::net::TcpStream;
use std::time::Instant;

#[derive(Debug)]
pub(super) enum ReadError {
    /// End of file; `partial` when an unterminated line came before it.
    Eof {
        partial: bool,
    },
    TooLong,
    /// Also the deadline passing: [`io::ErrorKind::TimedOut`].
    Io(io::Error),
}

/// A connection's requests, line by line, from a buffer of fixed size, so a connection costs the same
/// memory whatever the client sends. Bytes after a line stay buffered for the next call
/// (a client may send `lock,...\nrelease\n` in one packet).
pub(super) struct Requests {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    max_line: usize,
    timeout_set: bool,
    /// The first read of a request was tried without waiting.
    tried_without_timeout: bool,
}

impl Requests {
    pub(super) fn new(max_line: usize) -> Requests {
        Requests {
            // Room for the longest line plus its `\r\n`.
            buf: vec![0; max_line + 2].into_boxed_slice(),
            start: 0,
            end: 0,
            max_line,
            timeout_set: false,
            tried_without_timeout: false,
        }
    }

    /// A connection's requests as the previous process left them: `unparsed` comes first. The
    /// socket may still have a read timeout set by that process, so the next read sets or clears
    /// it.
    pub(super) fn resume(max_line: usize, unparsed: &[u8]) -> Requests {
        let mut r = Requests::new(max_line);
        // A previous process with a longer --max-line-length may have left more than fits; the
        // next line is then too long for this one anyway.
        if unparsed.len() > r.buf.len() {
            r.buf = vec![0; unparsed.len()].into_boxed_slice();
        }
        r.buf[..unparsed.len()].copy_from_slice(unparsed);
        r.end = unparsed.len();
        r.timeout_set = true;
        r.tried_without_timeout = true;
        r
    }

    /// Bytes read and not returned as a line yet.
    pub(super) fn unparsed(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// The next line without its `\n` (a `\r` before it is left for the parser to trim).
    ///
    /// When a hand-over to the next process asks this thread to rest (see `handover::rest`)
    /// while it waits for bytes, `rest` is called with the bytes read and not returned yet; when
    /// it returns (the hand-over was called off) the wait goes on.
    pub(super) fn next_line(
        &mut self,
        mut stream: &TcpStream,
        deadline: Option<Instant>,
        mut rest: impl FnMut(&[u8]),
    ) -> Result<&[u8], ReadError> {
        let mut scanned = self.start;
        loop {
            if let Some(i) = self.buf[scanned..self.end].iter().position(|&b| b == b'\n') {
                let nl = scanned + i;
                let line = self.start..nl;
                self.start = nl + 1;
                let content = &self.buf[line.clone()];
                let len = content.len() - usize::from(content.ends_with(b"\r"));
                if len > self.max_line {
                    return Err(ReadError::TooLong);
                }
                return Ok(&self.buf[line]);
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                return Err(ReadError::TooLong);
            }
            scanned = self.end;
            match deadline {
                // Most requests are already waiting when their connection is accepted: read
                // them without arming the timeout (which costs two system calls).
                Some(_) if !self.timeout_set && self.end == 0 && !self.tried_without_timeout => {
                    self.tried_without_timeout = true;
                    let socket = socket2::SockRef::from(stream);
                    // SAFETY: u8 and MaybeUninit<u8> have the same layout, and recv only writes
                    // initialised bytes into the slice.
                    let spare =
                        unsafe { &mut *(&mut self.buf[..] as *mut [u8] as *mut [MaybeUninit<u8>]) };
                    match socket.recv_with_flags(spare, libc::MSG_DONTWAIT) {
                        Ok(0) => return Err(ReadError::Eof { partial: false }),
                        Ok(n) => self.end += n,
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                            ) => {}
                        Err(e) => return Err(ReadError::Io(e)),
                    }
                    continue;
                }
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ReadError::Io(io::ErrorKind::TimedOut.into()));
                    }
                    stream.set_read_timeout(Some(left)).map_err(ReadError::Io)?;
                    self.timeout_set = true;
                }
                None if self.timeout_set => {
                    stream.set_read_timeout(None).map_err(ReadError::Io)?;
                    self.timeout_set = false;
                }
                None => {}
            }
            match stream.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    return Err(ReadError::Eof {
                        partial: self.end > self.start,
                    });
                }
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    if super::handover::rest::resting() {
                        rest(&self.buf[self.start..self.end]);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) && deadline.is_some() => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }
}
