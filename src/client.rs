//! A blocking client for a tcpnetlock server, and the guard a granted lock lives in.
//!
//! The connection *is* the lock: [`Client::lock`] opens one TCP connection, asks for the name,
//! and on `ok` hands back a [`Lock`] that owns the connection. Dropping the `Lock` (or calling
//! [`Lock::release`]) sends `release` and waits for the server's `released`, so when it returns
//! the next client can have the lock; if the process dies instead, the kernel closes the
//! connection and the server frees the lock all the same.
//!
//! ```no_run
//! use std::time::Duration;
//! use tcpnetlock::client::Client;
//!
//! let client = Client::new("localhost", 7654)
//!     .client_id("migrations-job")
//!     .wait(Duration::from_secs(60)); // queue for up to a minute instead of giving up at once
//! let lock = client.lock("django-migrations")?;
//! // ... run the migrations ...
//! lock.release()?; // or just drop it
//! # Ok::<(), tcpnetlock::client::Error>(())
//! ```
//!
//! A lock can be lost while held: the server restarts, the network fails, or a lease
//! ([`Client::ttl`]) runs out. [`Lock::lost`] says so without blocking, [`Lock::wait_lost`]
//! blocks until it happens, and the `Lock` is [`AsFd`] so that a program with its own `poll`
//! loop can wait for it alongside other events (readable means: call [`Lock::lost`]).
//!
//! Two threads may read the connection: the owner (asking whether the lock is lost, or
//! releasing it) and, when keepalives are on, a background thread that sends `.keepalive` and
//! drains the `alive` replies. Reads happen only under one mutex and never block inside it;
//! waiting for data is a `poll` outside it. Every socket this module opens has TCP keepalive set
//! tighter than the server's (see [`DEAD_PEER_BOUND`]) so that a holder cut off from the server
//! finds out before the server gives its lock to somebody else.

use std::fmt;
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::protocol;

/// The port a tcpnetlock server listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 7654;

/// Idle time before the client's TCP keepalive probes the server, the interval between probes,
/// and how many may go unanswered: a silent server is given up on after 10 + 5 × 2 = 20 s.
/// The server drops a silent client after 40 s by default (20 + 5 × 4), so a holder cut off by
/// a partition learns of it well before the server hands its lock to someone else.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_PROBES: u32 = 2;
/// How long after the server goes silent the client declares the lock lost, at most.
pub const DEAD_PEER_BOUND: Duration = Duration::from_secs(20);

/// Where to find the server and how to ask for locks. Cheap to clone; every request opens its
/// own connection.
#[derive(Debug, Clone)]
pub struct Client {
    host: String,
    port: u16,
    client_id: Option<String>,
    wait: Option<Duration>,
    fencing: bool,
    ttl: Option<Duration>,
    max: Option<u32>,
    keepalive: Option<Duration>,
    connect_timeout: Duration,
    reply_timeout: Duration,
}

impl Client {
    /// A client for the server at `host` (a name or an address) and `port`. Nothing is sent
    /// until a request is made.
    pub fn new(host: impl Into<String>, port: u16) -> Client {
        Client {
            host: host.into(),
            port,
            client_id: None,
            wait: None,
            fencing: false,
            ttl: None,
            max: None,
            keepalive: None,
            connect_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(10),
        }
    }

    /// Labels this client's locks in the server's logs and `.locks` (`[A-Za-z0-9.@_-]`, at most
    /// 128 characters).
    #[must_use]
    pub fn client_id(mut self, id: impl Into<String>) -> Client {
        self.client_id = Some(id.into());
        self
    }

    /// Queue for a held lock for up to `wait` (first come, first served) instead of being
    /// refused at once. Zero means try once.
    #[must_use]
    pub fn wait(mut self, wait: Duration) -> Client {
        self.wait = Some(wait);
        self
    }

    /// Ask for a fencing token with each grant ([`Lock::token`]): a number larger than that of
    /// every earlier grant, to pass to the resource the lock protects.
    #[must_use]
    pub fn fencing(mut self, on: bool) -> Client {
        self.fencing = on;
        self
    }

    /// Hold locks as leases: the server revokes one after `ttl` without hearing from its
    /// holder. The `Lock` sends a keepalive every third of `ttl` from a background thread.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Client {
        self.ttl = Some(ttl);
        self
    }

    /// Let up to `max` clients hold the same name at once (a semaphore). Everyone using the name
    /// must ask with the same `max`.
    #[must_use]
    pub fn max(mut self, max: u32) -> Client {
        self.max = Some(max);
        self
    }

    /// Send `.keepalive` every `every` while a lock is held (0.1.8's `--keep-alive`). With a
    /// [`ttl`](Client::ttl), the shorter of this and a third of the ttl is used.
    #[must_use]
    pub fn keepalive(mut self, every: Duration) -> Client {
        self.keepalive = Some(every);
        self
    }

    /// Longest time to establish the connection (per address the host resolves to). Default 10 s.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Client {
        self.connect_timeout = timeout;
        self
    }

    /// Longest wait for a reply (on top of [`wait`](Client::wait) for a grant). Default 10 s.
    #[must_use]
    pub fn reply_timeout(mut self, timeout: Duration) -> Client {
        self.reply_timeout = timeout;
        self
    }

    /// `host:port`, as messages name the server.
    pub fn server(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Takes the lock `name`, waiting if [`wait`](Client::wait) says so. Fails with
    /// [`Error::NotGranted`] when somebody else holds it.
    pub fn lock(&self, name: &str) -> Result<Lock, Error> {
        if !protocol::valid_lock_name(name, usize::MAX) {
            return Err(Error::InvalidName(name.to_owned()));
        }
        if let Some(id) = &self.client_id
            && !protocol::valid_client_id(id)
        {
            return Err(Error::InvalidClientId(id.clone()));
        }
        let stream = self.connect()?;
        let mut reader = LineReader::default();
        send(&stream, &self.lock_line(name))?;
        let patience = self.wait.unwrap_or(Duration::ZERO) + self.reply_timeout;
        let token = match reader.line(&stream, Instant::now() + patience)? {
            Some(line) => parse_grant(&line)?,
            None => {
                return Err(Error::Protocol(
                    "the server closed the connection without answering".into(),
                ));
            }
        };
        Lock::start(self, name, token, stream, reader)
    }

    /// Asks the server for `.ping`; returns the time from request to `pong`.
    pub fn ping(&self) -> Result<Duration, Error> {
        let start = Instant::now();
        self.ask(".ping", "pong")?;
        Ok(start.elapsed())
    }

    /// The server's `.stats` JSON object, as sent.
    pub fn stats_json(&self) -> Result<String, Error> {
        self.ask(".stats", "stats,")
    }

    /// The server's `.locks` JSON object (held names, holders, queue lengths), as sent.
    pub fn locks_json(&self) -> Result<String, Error> {
        self.ask(".locks", "locks,")
    }

    /// One request on a fresh connection; the reply must start with `expect`, which is cut off.
    fn ask(&self, request: &str, expect: &str) -> Result<String, Error> {
        let stream = self.connect()?;
        send(&stream, request)?;
        let mut reader = LineReader::default();
        match reader.line(&stream, Instant::now() + self.reply_timeout)? {
            Some(line) => match line.strip_prefix(expect) {
                Some(rest) => Ok(rest.to_owned()),
                None => Err(unexpected(&line)),
            },
            None => Err(Error::Protocol(
                "the server closed the connection without answering".into(),
            )),
        }
    }

    /// The `lock` request. Only the parameters asked for are sent, so a plain request is the
    /// 0.1.8 protocol and works against a 0.1.8 server.
    fn lock_line(&self, name: &str) -> String {
        let mut line = format!("lock,name:{name}");
        if let Some(id) = &self.client_id {
            line += &format!(",client-id:{id}");
        }
        if let Some(wait) = self.wait {
            line += &format!(",wait:{}", seconds(wait));
        }
        if self.fencing {
            line += ",fencing:1";
        }
        if let Some(max) = self.max {
            line += &format!(",max:{max}");
        }
        if let Some(ttl) = self.ttl {
            line += &format!(",ttl:{}", seconds(ttl));
        }
        line
    }

    /// Tries every address the host resolves to, in order.
    fn connect(&self) -> Result<TcpStream, Error> {
        let addrs: Vec<SocketAddr> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|source| Error::Connect {
                server: self.server(),
                source,
            })?
            .collect();
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, self.connect_timeout) {
                Ok(stream) => {
                    configure(&stream, self.reply_timeout);
                    return Ok(stream);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(e) if e.kind() == io::ErrorKind::ConnectionRefused => Error::Refused {
                server: self.server(),
            },
            Some(source) => Error::Connect {
                server: self.server(),
                source,
            },
            None => Error::Connect {
                server: self.server(),
                source: io::Error::new(io::ErrorKind::NotFound, "the name has no addresses"),
            },
        })
    }

    /// How often the held lock's connection should carry a `.keepalive`, if at all.
    fn keepalive_every(&self) -> Option<Duration> {
        let for_ttl = self.ttl.map(|t| t / 3);
        match (self.keepalive, for_ttl) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
        .map(|d| d.max(Duration::from_millis(10)))
    }
}

/// Options on a fresh connection. Failures only weaken loss detection, so they are not errors.
fn configure(stream: &TcpStream, write_timeout: Duration) {
    let _ = stream.set_nodelay(true);
    // A write only blocks when the server stops reading; past this the lock counts as lost.
    let _ = stream.set_write_timeout(Some(write_timeout));
    let socket = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    let _ = socket.set_tcp_keepalive(&keepalive);
    // The same bound while data we sent is unacknowledged (a keepalive, a release).
    let _ = socket.set_tcp_user_timeout(Some(DEAD_PEER_BOUND));
}

/// `ok` or `ok,token:N` to the token; anything else to the error it means.
fn parse_grant(line: &str) -> Result<Option<u64>, Error> {
    if line == "ok" {
        return Ok(None);
    }
    if let Some(token) = line.strip_prefix("ok,token:") {
        return token
            .parse()
            .map(Some)
            .map_err(|_| Error::Protocol(format!("bad token in {line:?}")));
    }
    if line == "not-granted" {
        return Err(Error::NotGranted);
    }
    Err(unexpected(line))
}

/// An `err,` line becomes the server's message; anything else is a protocol error.
fn unexpected(line: &str) -> Error {
    match line.strip_prefix("err,") {
        Some(msg) => Error::Server(msg.to_owned()),
        None => Error::Protocol(format!("unexpected reply {line:?}")),
    }
}

/// Decimal seconds as the protocol writes them: `30`, `2.5`, `0.001`.
fn seconds(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        return d.as_secs().to_string();
    }
    let text = format!("{}.{:09}", d.as_secs(), d.subsec_nanos());
    text.trim_end_matches('0').to_owned()
}

fn send(mut stream: &TcpStream, line: &str) -> Result<(), Error> {
    stream
        .write_all(format!("{line}\n").as_bytes())
        .map_err(Error::Io)
}

/// Why a held lock is no longer held.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Lost {
    /// The lease ran out: the server wrote `expired`.
    Expired,
    /// The server closed the connection: it was restarted or stopped, or dropped this client.
    Closed,
    /// The connection failed: reset, or the server stopped answering (host or network gone).
    Broken(String),
}

impl fmt::Display for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lost::Expired => f.write_str("the lease expired"),
            Lost::Closed => f.write_str("the server closed the connection (restarted or stopped?)"),
            Lost::Broken(e) => write!(f, "the connection to the server failed: {e}"),
        }
    }
}

/// Everything a request can end with other than success.
///
/// ```
/// use tcpnetlock::client::{Client, Error};
///
/// // A port nobody listens on.
/// let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
/// match Client::new("127.0.0.1", port).lock("nightly-report") {
///     Err(Error::Refused { server }) => assert_eq!(server, format!("127.0.0.1:{port}")),
///     Err(Error::NotGranted) => println!("someone else is on it"),
///     other => panic!("{other:?}"),
/// }
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The name is not `[A-Za-z0-9_-]+`; nothing was sent.
    InvalidName(String),
    /// The client id is not `[A-Za-z0-9.@_-]{1,128}`; nothing was sent.
    InvalidClientId(String),
    /// Nothing listens at the server's address.
    Refused { server: String },
    /// The server could not be reached: unknown host, unreachable network, timeout.
    Connect { server: String, source: io::Error },
    /// Somebody else holds the lock (and the wait, if any, ran out).
    NotGranted,
    /// The server refused the request with an `err,` line; this is its message.
    Server(String),
    /// The server said something this client does not understand, or hung up without a reply.
    Protocol(String),
    /// Reading or writing an established connection failed.
    Io(io::Error),
    /// The lock was lost before it was released.
    Lost(Lost),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidName(name) => write!(
                f,
                "invalid lock name {name:?}: use letters, digits, '_' and '-'"
            ),
            Error::InvalidClientId(id) => write!(
                f,
                "invalid client id {id:?}: use letters, digits, '.', '@', '_' and '-' (at most 128)"
            ),
            Error::Refused { server } => {
                write!(
                    f,
                    "cannot connect to {server}: connection refused (is the server running?)"
                )
            }
            Error::Connect { server, source } => write!(f, "cannot connect to {server}: {source}"),
            Error::NotGranted => f.write_str("not granted: the lock is held by another client"),
            Error::Server(msg) => write!(f, "the server refused the request: {msg}"),
            Error::Protocol(msg) => write!(f, "protocol error: {msg}"),
            Error::Io(e) => write!(f, "connection to the server failed: {e}"),
            Error::Lost(lost) => write!(f, "lock lost: {lost}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Connect { source, .. } | Error::Io(source) => Some(source),
            _ => None,
        }
    }
}

/// A granted lock. It is held until this is dropped or [released](Lock::release), or until it
/// is [lost](Lock::lost).
///
/// # Example
///
/// Against a stand-in for the server, so that the example runs anywhere (the protocol is one
/// line per request; docs/PROTOCOL.md):
///
/// ```
/// use std::io::{BufRead, BufReader, Write};
/// use std::net::TcpListener;
/// use tcpnetlock::client::Client;
///
/// let listener = TcpListener::bind("127.0.0.1:0")?;
/// let port = listener.local_addr()?.port();
/// let server = std::thread::spawn(move || -> std::io::Result<Vec<String>> {
///     let (mut stream, _) = listener.accept()?;
///     let mut lines = BufReader::new(stream.try_clone()?).lines();
///     let request = lines.next().unwrap()?;
///     stream.write_all(b"ok,token:42\n")?;
///     let release = lines.next().unwrap()?;
///     stream.write_all(b"released\n")?;
///     Ok(vec![request, release])
/// });
///
/// let lock = Client::new("127.0.0.1", port).fencing(true).lock("report")?;
/// assert_eq!(lock.token(), Some(42)); // pass it on to what the lock protects
/// assert_eq!(lock.lost(), None);
/// lock.release()?;
/// assert_eq!(server.join().unwrap()?, ["lock,name:report,fencing:1", "release"]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Lock {
    name: String,
    token: Option<u64>,
    shared: Arc<Shared>,
    /// The thread sending `.keepalive`, when there is one.
    keeper: Option<JoinHandle<()>>,
    reply_timeout: Duration,
    finished: bool,
}

/// What the owner and the keepalive thread share.
#[derive(Debug)]
struct Shared {
    stream: TcpStream,
    state: Mutex<State>,
    /// Wakes the keepalive thread early: the lock is being released.
    wake: Condvar,
}

#[derive(Debug)]
struct State {
    reader: LineReader,
    lost: Option<Lost>,
    stopping: bool,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// Reads whatever the server sent, without blocking, and notes a loss.
    fn pump(&mut self, stream: &TcpStream) {
        while self.lost.is_none() {
            match self.reader.line_now(stream) {
                Ok(Read::Line(line)) if line == "expired" => self.lost = Some(Lost::Expired),
                // `alive` answers a keepalive; nothing else is sent to a holder.
                Ok(Read::Line(_)) => {}
                Ok(Read::Eof) => self.lost = Some(Lost::Closed),
                Ok(Read::Pending) => return,
                Err(e) => self.lost = Some(Lost::Broken(e.to_string())),
            }
        }
    }
}

impl Lock {
    fn start(
        client: &Client,
        name: &str,
        token: Option<u64>,
        stream: TcpStream,
        reader: LineReader,
    ) -> Result<Lock, Error> {
        let shared = Arc::new(Shared {
            stream,
            state: Mutex::new(State {
                reader,
                lost: None,
                stopping: false,
            }),
            wake: Condvar::new(),
        });
        let keeper = match client.keepalive_every() {
            Some(every) => {
                let shared = Arc::clone(&shared);
                Some(spawn_without_signals(move || keep_alive(&shared, every)).map_err(Error::Io)?)
            }
            None => None,
        };
        Ok(Lock {
            name: name.to_owned(),
            token,
            shared,
            keeper,
            reply_timeout: client.reply_timeout,
            finished: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fencing token of this grant, when the client asked for one ([`Client::fencing`]).
    pub fn token(&self) -> Option<u64> {
        self.token
    }

    /// Why the lock is no longer held, or `None` while it is. Never blocks (beyond a keepalive
    /// being sent at that moment).
    pub fn lost(&self) -> Option<Lost> {
        let mut state = self.shared.state();
        state.pump(&self.shared.stream);
        state.lost.clone()
    }

    /// Blocks until the lock is lost (and says why) or `timeout` passes (`None`); no timeout
    /// waits for as long as the lock is held.
    pub fn wait_lost(&self, timeout: Option<Duration>) -> Option<Lost> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(lost) = self.lost() {
                return Some(lost);
            }
            let left = match deadline {
                Some(d) if Instant::now() >= d => return None,
                Some(d) => Some(d - Instant::now()),
                None => None,
            };
            // Another thread may read what woke us; `lost` then finds nothing and we wait again.
            let _ = wait_readable(&self.shared.stream, left);
        }
    }

    /// Releases the lock and waits for the server to confirm, so that when this returns the next
    /// client can have it. Fails with [`Error::Lost`] if it had already been lost.
    pub fn release(mut self) -> Result<(), Error> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), Error> {
        if std::mem::replace(&mut self.finished, true) {
            return Ok(());
        }
        self.stop_keeper();
        let stream = &self.shared.stream;
        let mut state = self.shared.state();
        state.pump(stream);
        if let Some(lost) = state.lost.clone() {
            return Err(Error::Lost(lost));
        }
        send(stream, "release")?;
        let deadline = Instant::now() + self.reply_timeout;
        loop {
            match state.reader.line(stream, deadline)?.as_deref() {
                Some("released") => return Ok(()),
                Some("expired") => return Err(Error::Lost(Lost::Expired)),
                Some(_) => continue, // a late `alive`
                None => return Err(Error::Lost(Lost::Closed)),
            }
        }
    }

    fn stop_keeper(&mut self) {
        if let Some(keeper) = self.keeper.take() {
            self.shared.state().stopping = true;
            self.shared.wake.notify_all();
            let _ = keeper.join();
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Readable means something happened on the connection: call [`Lock::lost`].
impl AsFd for Lock {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.shared.stream.as_fd()
    }
}

/// The keepalive thread: a `.keepalive` every `every`, the replies drained so they never pile
/// up, until the lock is released or lost.
fn keep_alive(shared: &Shared, every: Duration) {
    let mut state = shared.state();
    loop {
        state = shared
            .wake
            .wait_timeout_while(state, every, |s| !s.stopping)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        if state.stopping || state.lost.is_some() {
            return;
        }
        if let Err(e) = (&shared.stream).write_all(b".keepalive\n") {
            state.lost = Some(Lost::Broken(e.to_string()));
        } else {
            state.pump(&shared.stream);
        }
        if state.lost.is_some() {
            // Make the socket readable (end of file) for an owner that polls it.
            let _ = shared.stream.shutdown(Shutdown::Read);
            return;
        }
    }
}

/// Starts a thread that takes none of the process's signals: a program that blocks a signal to
/// wait for it (as `tcpnetlock do` does) must not have it delivered to a thread of ours instead.
fn spawn_without_signals(f: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    // SAFETY: sigset_t values owned by this frame; pthread_sigmask only reads `all` and writes
    // `old`. A new thread inherits the mask of the thread creating it.
    unsafe {
        let mut all = std::mem::zeroed::<libc::sigset_t>();
        let mut old = std::mem::zeroed::<libc::sigset_t>();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let spawned = thread::Builder::new()
            .name("tcpnetlock-keepalive".into())
            .stack_size(64 * 1024)
            .spawn(f);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        spawned
    }
}

/// What one read attempt found.
#[derive(Debug)]
enum Read {
    Line(String),
    Eof,
    /// No complete line yet.
    Pending,
}

/// Splits the connection into lines. Reads never block: they follow a `poll`, or are attempts.
#[derive(Debug, Default)]
struct LineReader {
    buf: Vec<u8>,
}

impl LineReader {
    /// The next line by `deadline`; `None` at end of file.
    fn line(&mut self, stream: &TcpStream, deadline: Instant) -> Result<Option<String>, Error> {
        loop {
            match self.line_now(stream).map_err(Error::Io)? {
                Read::Line(line) => return Ok(Some(line)),
                Read::Eof => return Ok(None),
                Read::Pending => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !wait_readable(stream, Some(left)).map_err(Error::Io)? {
                return Err(Error::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no reply from the server in time",
                )));
            }
        }
    }

    /// A buffered line, or what one non-blocking read brings.
    fn line_now(&mut self, stream: &TcpStream) -> io::Result<Read> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Read::Line(String::from_utf8_lossy(&line).into_owned()));
            }
            let mut chunk = [0u8; 4096];
            // SAFETY: recv writes at most chunk.len() bytes into the buffer we own.
            let n = unsafe {
                libc::recv(
                    stream.as_raw_fd(),
                    chunk.as_mut_ptr().cast(),
                    chunk.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            match n {
                0 => return Ok(Read::Eof),
                n if n > 0 => self.buf.extend_from_slice(&chunk[..n as usize]),
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
}

/// Waits until the socket has something to read (data, end of file or an error); false on
/// timeout.
fn wait_readable(stream: &TcpStream, timeout: Option<Duration>) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.map_or(-1, |t| t.as_millis().clamp(1, i32::MAX as u128) as i32);
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

    #[test]
    fn request_lines() {
        let c = Client::new("h", 1);
        assert_eq!(c.lock_line("a"), "lock,name:a");
        let c = c
            .client_id("me")
            .wait(Duration::from_millis(2500))
            .fencing(true)
            .max(3)
            .ttl(Duration::from_secs(30));
        assert_eq!(
            c.lock_line("a"),
            "lock,name:a,client-id:me,wait:2.5,fencing:1,max:3,ttl:30"
        );
    }

    #[test]
    fn durations_in_protocol_seconds() {
        assert_eq!(seconds(Duration::from_secs(7)), "7");
        assert_eq!(seconds(Duration::from_millis(1)), "0.001");
        assert_eq!(seconds(Duration::from_nanos(1_000_000_001)), "1.000000001");
        for d in [1, 1500, 999_999] {
            let d = Duration::from_millis(d);
            assert_eq!(protocol::parse_seconds(&seconds(d)), Some(d));
        }
    }

    #[test]
    fn grant_lines() {
        assert_eq!(parse_grant("ok").unwrap(), None);
        assert_eq!(parse_grant("ok,token:42").unwrap(), Some(42));
        assert!(matches!(parse_grant("not-granted"), Err(Error::NotGranted)));
        assert!(
            matches!(parse_grant("err,server busy"), Err(Error::Server(m)) if m == "server busy")
        );
        assert!(matches!(parse_grant("ok,token:x"), Err(Error::Protocol(_))));
        assert!(matches!(parse_grant("bad-action"), Err(Error::Protocol(_))));
    }

    #[test]
    fn keepalive_interval() {
        let c = Client::new("h", 1);
        assert_eq!(c.keepalive_every(), None);
        let ttl = c.clone().ttl(Duration::from_secs(30));
        assert_eq!(ttl.keepalive_every(), Some(Duration::from_secs(10)));
        let both = ttl.keepalive(Duration::from_secs(15));
        assert_eq!(both.keepalive_every(), Some(Duration::from_secs(10)));
        let ka = c.keepalive(Duration::from_secs(15));
        assert_eq!(ka.keepalive_every(), Some(Duration::from_secs(15)));
    }

    #[test]
    fn server_names() {
        assert_eq!(Client::new("localhost", 7654).server(), "localhost:7654");
        assert_eq!(Client::new("::1", 7654).server(), "[::1]:7654");
    }

    #[test]
    fn invalid_names_are_refused_before_connecting() {
        // Port 1 on a TEST-NET address: a connection attempt would fail differently.
        let c = Client::new("192.0.2.1", 1);
        assert!(matches!(c.lock("a b"), Err(Error::InvalidName(_))));
        assert!(matches!(c.lock(""), Err(Error::InvalidName(_))));
        let c = c.client_id("x y");
        assert!(matches!(c.lock("a"), Err(Error::InvalidClientId(_))));
    }
}
