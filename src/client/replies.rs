//! Reading the server's reply lines (the client's counterpart of the server's
//! `framing::Requests`).
//!
//! Reads never block: they follow a `poll`, or are attempts. Each attempt is at most one read,
//! so a caller's deadline is checked between reads even while a server keeps sending, and
//! each byte is searched for the line end once: a server that streams bytes without a newline
//! costs the client at most the cap in memory and the deadline in time. A holder's connection
//! is read by two threads (the owner and the renewal thread), always under one mutex and never
//! blocking inside it; that is why waiting is a separate `poll` ([`wait_readable`]).

use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::Error;

/// Bytes asked of the kernel per read: a `.locks` reply of several MB comes in a few hundred
/// reads, not thousands.
const READ_CHUNK: usize = 64 << 10;

/// When to stop waiting for a reply, and how long that was, for the [`Error::Timeout`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Deadline {
    pub(super) at: Instant,
    length: Duration,
}

impl Deadline {
    /// `length` from now. Every length is bounded (a week or two, checked before any request),
    /// so the sum cannot overflow.
    pub(super) fn after(length: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + length,
            length,
        }
    }

    pub(super) fn left(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    pub(super) fn timed_out(&self) -> Error {
        Error::Timeout { after: self.length }
    }
}

/// What one read attempt found.
#[derive(Debug)]
pub(super) enum Read {
    Line(String),
    Eof,
    /// No complete line yet.
    Pending,
}

/// Splits the connection into reply lines.
#[derive(Debug)]
pub(super) struct Replies {
    buf: Vec<u8>,
    /// How much of `buf` is known to hold no line end: every byte is searched once, not once
    /// per read.
    scanned: usize,
    /// The longest line accepted, line end not counted.
    max: usize,
}

impl Replies {
    pub(super) fn new(max: usize) -> Replies {
        Replies {
            buf: Vec::new(),
            scanned: 0,
            max,
        }
    }

    /// The next line by `deadline`; `None` at end of file.
    pub(super) fn line(
        &mut self,
        stream: &TcpStream,
        deadline: Deadline,
    ) -> Result<Option<String>, Error> {
        loop {
            let read = self.line_now(stream).map_err(|e| match e.kind() {
                io::ErrorKind::InvalidData => Error::Protocol(e.to_string()),
                _ => Error::Io(e),
            })?;
            match read {
                Read::Line(line) => return Ok(Some(line)),
                Read::Eof => return Ok(None),
                Read::Pending => {}
            }
            let left = deadline.left();
            if left.is_zero() || !wait_readable(stream, Some(left)).map_err(Error::Io)? {
                return Err(self.timed_out(deadline));
            }
        }
    }

    fn timed_out(&self, deadline: Deadline) -> Error {
        if self.buf.is_empty() {
            deadline.timed_out()
        } else {
            Error::Protocol(format!(
                "the server's reply did not end in time ({} bytes without a line end; is it a \
                 tcpnetlock server?)",
                self.buf.len()
            ))
        }
    }

    /// A buffered line, or what one non-blocking read brings.
    pub(super) fn line_now(&mut self, stream: &TcpStream) -> io::Result<Read> {
        if let Some(line) = self.buffered_line() {
            return Ok(Read::Line(line));
        }
        self.check_length()?;
        // Never more than the longest line and its line end (`\r\n`) could still need.
        let want = READ_CHUNK.min(self.max + 2 - self.buf.len());
        loop {
            self.buf.reserve(want);
            // SAFETY: recv writes at most `want` bytes, within the spare capacity just
            // reserved; set_len below counts only the bytes it reported written.
            let n = unsafe {
                libc::recv(
                    stream.as_raw_fd(),
                    self.buf.spare_capacity_mut().as_mut_ptr().cast(),
                    want,
                    libc::MSG_DONTWAIT,
                )
            };
            match n {
                0 => return Ok(Read::Eof),
                n if n > 0 => {
                    // SAFETY: the first n bytes of the spare capacity were just written.
                    unsafe { self.buf.set_len(self.buf.len() + n as usize) };
                    if let Some(line) = self.buffered_line() {
                        return Ok(Read::Line(line));
                    }
                    self.check_length()?;
                    return Ok(Read::Pending);
                }
                _ => {
                    let e = io::Error::last_os_error();
                    match e.kind() {
                        io::ErrorKind::WouldBlock => return Ok(Read::Pending),
                        io::ErrorKind::Interrupted => {}
                        _ => return Err(e),
                    }
                }
            }
        }
    }

    /// Buffered bytes without a line end must still fit a line (its end may be `\r\n`).
    fn check_length(&self) -> io::Result<()> {
        if self.buf.len() <= self.max + 1 {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the server sent over {} bytes without a line end (is it a tcpnetlock server?)",
                self.max
            ),
        ))
    }

    /// The first complete line in the buffer, searching only bytes not searched before.
    fn buffered_line(&mut self) -> Option<String> {
        let Some(at) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') else {
            self.scanned = self.buf.len();
            return None;
        };
        let mut line: Vec<u8> = self.buf.drain(..=self.scanned + at).collect();
        self.scanned = 0;
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Some(String::from_utf8_lossy(&line).into_owned())
    }
}

/// Waits until the socket has something to read (data, end of file or an error); false on
/// timeout.
pub(super) fn wait_readable(stream: &TcpStream, timeout: Option<Duration>) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // Rounded up: a deadline 0.4 ms away must not become a busy loop of 0 ms polls.
    let ms = timeout.map_or(-1, |t| {
        t.as_micros().div_ceil(1000).clamp(1, i32::MAX as u128) as i32
    });
    loop {
        // SAFETY: one pollfd owned by this frame.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n >= 0 {
            return Ok(n > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::thread;

    /// A loopback connection: the server's end and a reader on the client's end.
    fn pair(max: usize) -> (TcpStream, TcpStream, Replies) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let server = listener.accept().unwrap().0;
        (server, client, Replies::new(max))
    }

    fn soon() -> Deadline {
        Deadline::after(Duration::from_secs(5))
    }

    #[test]
    fn lines_split_across_reads_and_crlf() {
        let (mut server, client, mut replies) = pair(16);
        server.write_all(b"al").unwrap();
        assert!(matches!(replies.line_now(&client), Ok(Read::Pending)));
        server.write_all(b"ive\r\nexpired\nrel").unwrap();
        assert_eq!(replies.line(&client, soon()).unwrap().unwrap(), "alive");
        assert_eq!(replies.line(&client, soon()).unwrap().unwrap(), "expired");
        server.write_all(b"eased\n").unwrap();
        assert_eq!(replies.line(&client, soon()).unwrap().unwrap(), "released");
        drop(server);
        assert_eq!(replies.line(&client, soon()).unwrap(), None);
    }

    #[test]
    fn a_line_over_the_cap_is_a_protocol_error() {
        let (mut server, client, mut replies) = pair(16);
        // 16 bytes and a line end fit; 18 bytes without one do not.
        server.write_all(b"0123456789abcdef\n").unwrap();
        assert_eq!(replies.line(&client, soon()).unwrap().unwrap().len(), 16);
        server.write_all(&[b'x'; 18]).unwrap();
        match replies.line(&client, soon()) {
            Err(Error::Protocol(m)) => assert!(m.contains("over 16 bytes without a line end")),
            other => panic!("{other:?}"),
        }
        assert!(
            replies.buf.len() <= 18,
            "read past the cap: {}",
            replies.buf.len()
        );
    }

    #[test]
    fn silence_is_a_timeout_not_an_io_error() {
        let (_server, client, mut replies) = pair(16);
        let start = Instant::now();
        match replies.line(&client, Deadline::after(Duration::from_millis(100))) {
            Err(Error::Timeout { after }) => assert_eq!(after, Duration::from_millis(100)),
            other => panic!("{other:?}"),
        }
        assert!(start.elapsed() >= Duration::from_millis(100));
    }

    #[test]
    fn the_deadline_holds_while_bytes_keep_coming() {
        let (mut server, client, mut replies) = pair(1 << 20);
        let feeder = thread::spawn(move || {
            while server.write_all(b"x").is_ok() {
                thread::sleep(Duration::from_millis(1));
            }
        });
        let start = Instant::now();
        let r = replies.line(&client, Deadline::after(Duration::from_millis(200)));
        let took = start.elapsed();
        assert!(
            matches!(&r, Err(Error::Protocol(m)) if m.contains("did not end in time")),
            "{r:?}"
        );
        assert!(took < Duration::from_secs(2), "{took:?}");
        drop(client);
        feeder.join().unwrap();
    }
}
