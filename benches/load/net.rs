//! A blocking client connection that reads replies line by line: the tcpnetlock protocol's
//! lines end in `\n`, RESP's simple replies in `\r\n`; both come back without the ending.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::{Domain, Socket, Type};

/// Longest wait for a connect or any one reply before the bench counts an error.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Client {
    pub stream: TcpStream,
    buf: [u8; 128],
    len: usize,
}

impl Client {
    /// Connects from `src` (port chosen by the kernel), or from the default source address.
    pub fn connect(addr: SocketAddr, src: Option<Ipv4Addr>) -> io::Result<Client> {
        let stream = match src {
            None => TcpStream::connect_timeout(&addr, IO_TIMEOUT)?,
            Some(ip) => {
                let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
                let on: libc::c_int = 1;
                // SAFETY: a valid socket and a c_int option value that outlives the call.
                // IP_BIND_ADDRESS_NO_PORT leaves the port to connect(), which picks it for the
                // full 4-tuple instead of reserving one per source address at bind().
                unsafe {
                    libc::setsockopt(
                        socket.as_raw_fd(),
                        libc::IPPROTO_IP,
                        libc::IP_BIND_ADDRESS_NO_PORT,
                        (&on as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                socket.bind(&SocketAddr::from((ip, 0)).into())?;
                socket.connect_timeout(&addr.into(), IO_TIMEOUT)?;
                socket.into()
            }
        };
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        Ok(Client {
            stream,
            buf: [0; 128],
            len: 0,
        })
    }

    pub fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .map_err(|e| format!("sending {:?}: {e}", String::from_utf8_lossy(bytes).trim()))
    }

    /// Reads one reply line and checks it is `want`. Err carries what came instead.
    pub fn expect(&mut self, want: &str) -> Result<(), String> {
        let line = self
            .line()
            .map_err(|e| format!("waiting for {want}: {e}"))?;
        if line == want {
            Ok(())
        } else {
            Err(format!("expected {want:?}, got {line:?}"))
        }
    }

    /// The next line, without its `\n` or `\r\n`.
    pub fn line(&mut self) -> io::Result<String> {
        loop {
            if let Some(nl) = self.buf[..self.len].iter().position(|&b| b == b'\n') {
                let end = if nl > 0 && self.buf[nl - 1] == b'\r' {
                    nl - 1
                } else {
                    nl
                };
                let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.copy_within(nl + 1..self.len, 0);
                self.len -= nl + 1;
                return Ok(line);
            }
            if self.len == self.buf.len() {
                return Err(io::Error::other("reply line too long"));
            }
            match self.stream.read(&mut self.buf[self.len..])? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => self.len += n,
            }
        }
    }

    /// Waits for the server to close. Closing only after its FIN leaves TIME_WAIT on the
    /// server's side, so the bench does not run out of ephemeral ports.
    pub fn wait_eof(&mut self) -> Result<(), String> {
        let mut scratch = [0u8; 64];
        loop {
            match self.stream.read(&mut scratch) {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
                Err(e) => return Err(format!("waiting for the server to close: {e}")),
            }
        }
    }
}
