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
//!
//! TCP keepalive cannot see a path that stalls while both ends stay up (a NAT or a tunnel that
//! stops forwarding but still acknowledges), so a lease also runs on a clock of the client's own
//! (`LeaseClock`): the lock counts as lost once no renewal has been answered for the ttl less a
//! margin, counted from when the last answered renewal was *sent*. The server renews a lease when
//! it reads a request, never earlier than we sent it, so the client's deadline always falls
//! before the server's (docs/PROTOCOL.md, "The client's lease clock").
//!
//! Replies are read with a cap on their length and a deadline checked on every read, and each
//! byte is searched for the line end once: a server that streams bytes without a newline costs
//! the client at most the cap in memory and the reply timeout in time.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::protocol;
use crate::status::{Locks, Stats};

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

/// The longest `.locks` reply line accepted. A server at its default 10,000 connections, every
/// one a holder with a long name and client id, writes about 4 MB; 64 MiB leaves room for far
/// bigger servers and still bounds what a broken one can make the client allocate.
const LOCKS_LINE_MAX: usize = 64 << 20;
/// The longest of every other reply line: grants, `err,` lines, `pong`, `.stats`, the replies to
/// a holder. The longest a tcpnetlock server writes is `.stats`, under 1 KB.
const LINE_MAX: usize = 64 << 10;
/// The smallest lease margin (see [`lease_margin`]).
const MIN_LEASE_MARGIN: Duration = Duration::from_millis(50);

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
    /// holder. The `Lock` sends a keepalive every quarter of `ttl` from a background thread, and
    /// counts the lock as lost ([`Lost::LeaseUnconfirmed`]) once the server has answered none
    /// for `ttl` less a margin ([`lease_margin`]): before the server can give it to anyone else.
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
    /// [`ttl`](Client::ttl), the shorter of this and a quarter of the ttl is used.
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
        let mut reader = LineReader::new(LINE_MAX);
        // The server's lease starts once it has read the request: not before this.
        let sent = LeaseClock::now();
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
        let mut lease = self.ttl.map(|ttl| LeaseClock::new(ttl, sent));
        if let Some(lease) = &mut lease
            && self.wait.is_some_and(|w| !w.is_zero())
        {
            self.confirm_lease(&stream, &mut reader, lease)?;
        }
        Lock::start(self, name, token, stream, reader, lease)
    }

    /// After a grant that may have followed a wait: the server's lease started at the grant, at
    /// some moment between our request and its `ok`, and a delayed `ok` could even arrive after
    /// it ended. A renewal sent now and answered says for certain how long it lasts.
    fn confirm_lease(
        &self,
        stream: &TcpStream,
        reader: &mut LineReader,
        lease: &mut LeaseClock,
    ) -> Result<(), Error> {
        let sent = LeaseClock::now();
        send(stream, ".keepalive")?;
        let window = lease.window();
        match reader.line(stream, Instant::now() + window.min(self.reply_timeout)) {
            Ok(Some(line)) if line == "alive" => {
                lease.confirmed = sent;
                Ok(())
            }
            Ok(Some(line)) if line == "expired" => Err(Error::Lost(Lost::Expired)),
            Ok(Some(line)) => Err(unexpected(&line)),
            Ok(None) => Err(Error::Lost(Lost::Closed)),
            Err(Error::Io(e))
                if e.kind() == io::ErrorKind::TimedOut && window <= self.reply_timeout =>
            {
                Err(Error::Lost(Lost::LeaseUnconfirmed))
            }
            Err(e) => Err(e),
        }
    }

    /// Asks the server for `.ping`; returns the time from request to `pong`.
    pub fn ping(&self) -> Result<Duration, Error> {
        let start = Instant::now();
        self.ask(".ping", "pong", LINE_MAX)?;
        Ok(start.elapsed())
    }

    /// The server's counters and state (`.stats`). Works against tcpnetlock 0.1.8 too, which
    /// fills only a few of the fields; see [`Stats`] for what a field that is `None` means.
    ///
    /// ```no_run
    /// use tcpnetlock::client::Client;
    ///
    /// let stats = Client::new("localhost", 7654).stats()?;
    /// println!("{} locks held", stats.locks_held.unwrap_or(0));
    /// # Ok::<(), tcpnetlock::client::Error>(())
    /// ```
    pub fn stats(&self) -> Result<Stats, Error> {
        read_status(".stats", &self.stats_json()?)
    }

    /// Every held name with its holders and queue length (`.locks`).
    ///
    /// ```no_run
    /// use tcpnetlock::client::Client;
    ///
    /// for lock in &Client::new("localhost", 7654).locks()? {
    ///     for holder in &lock.holders {
    ///         println!("{} held by {:?} for {:?}", lock.name, holder.client_id, holder.held());
    ///     }
    /// }
    /// # Ok::<(), tcpnetlock::client::Error>(())
    /// ```
    pub fn locks(&self) -> Result<Locks, Error> {
        read_status(".locks", &self.locks_json()?)
    }

    /// The server's `.stats` JSON object, as sent: for passing on unchanged. [`Client::stats`]
    /// reads it.
    pub fn stats_json(&self) -> Result<String, Error> {
        self.ask(".stats", "stats,", LINE_MAX)
    }

    /// The server's `.locks` JSON object, as sent. [`Client::locks`] reads it.
    pub fn locks_json(&self) -> Result<String, Error> {
        self.ask(".locks", "locks,", LOCKS_LINE_MAX)
    }

    /// One request on a fresh connection; the reply, at most `max` bytes, must start with
    /// `expect`, which is cut off.
    fn ask(&self, request: &str, expect: &str, max: usize) -> Result<String, Error> {
        let stream = self.connect()?;
        send(&stream, request)?;
        let mut reader = LineReader::new(max);
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
        // Three renewals fit in the lease clock's window (ttl less at most a fifth): one
        // answered late or lost does not lose the lock.
        let for_ttl = self.ttl.map(|t| t / 4);
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
/// A `.stats` or `.locks` reply read into its type; what is not its JSON object is a
/// `Protocol` error that shows the start of it.
fn read_status<T: serde::de::DeserializeOwned>(request: &str, json: &str) -> Result<T, Error> {
    serde_json::from_str(json).map_err(|e| {
        let start: String = json.chars().take(200).collect();
        let more = if start.len() < json.len() { "…" } else { "" };
        Error::Protocol(format!(
            "the reply to {request} is not the JSON object expected ({e}): {start:?}{more}"
        ))
    })
}

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
    /// A lease ([`Client::ttl`]) whose renewals the server has not answered for the ttl less
    /// the [`lease_margin`]: the network or the server stalled, and the server may revoke the
    /// lease at any moment now. Counted on the client's own clock, so it is known even when no
    /// byte arrives at all.
    LeaseUnconfirmed,
}

impl fmt::Display for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lost::Expired => f.write_str("the lease expired"),
            Lost::Closed => f.write_str("the server closed the connection (restarted or stopped?)"),
            Lost::Broken(e) => write!(f, "the connection to the server failed: {e}"),
            Lost::LeaseUnconfirmed => f.write_str(
                "the server answered no lease renewal within the ttl (network or server stalled?)",
            ),
        }
    }
}

/// How much earlier than the server a client counts a lease of `ttl` as gone: a tenth of the
/// ttl, at least 50 ms and at most a fifth of the ttl (three renewals, a quarter of the ttl
/// apart, always fit before the client's deadline). It is the time the holder has to act
/// (wake up on a busy machine, signal its command) between giving the lock up and the earliest
/// moment the server can grant it elsewhere.
pub fn lease_margin(ttl: Duration) -> Duration {
    (ttl / 10).max(MIN_LEASE_MARGIN).min(ttl / 5)
}

/// The client's side of a lease: until when the server is certain to keep it.
///
/// The server renews a lease when it reads a request from the holder, which it cannot do before
/// we send it; so when a renewal is answered with `alive`, the lease lasts at least the ttl from
/// the renewal's send time. Answers come in the order of the requests, so the send times wait in
/// a queue and each `alive` takes the oldest.
///
/// Times are since boot (`CLOCK_BOOTTIME`): monotonic like `Instant`, but counting time the
/// machine spent suspended, as the server's clock does.
#[derive(Debug)]
struct LeaseClock {
    ttl: Duration,
    /// Send times of renewals not answered yet, oldest first.
    unanswered: VecDeque<Duration>,
    /// Send time of the newest answered renewal; at first, of the `lock` request.
    confirmed: Duration,
}

impl LeaseClock {
    fn new(ttl: Duration, request_sent: Duration) -> LeaseClock {
        LeaseClock {
            ttl,
            unanswered: VecDeque::new(),
            confirmed: request_sent,
        }
    }

    fn now() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec we own. CLOCK_BOOTTIME exists since Linux
        // 2.6.39 and cannot fail with a valid pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// How long after an answered renewal the client still counts the lease as its own.
    fn window(&self) -> Duration {
        self.ttl - lease_margin(self.ttl)
    }

    fn deadline(&self) -> Duration {
        self.confirmed + self.window()
    }

    /// The deadline on the `Instant` clock, for `poll` and condition-variable timeouts.
    fn deadline_instant(&self) -> Instant {
        Instant::now() + self.deadline().saturating_sub(LeaseClock::now())
    }

    fn sent(&mut self, at: Duration) {
        self.unanswered.push_back(at);
    }

    /// An `alive` came. One the client did not ask for (a broken server) proves nothing.
    fn answered(&mut self) {
        if let Some(sent) = self.unanswered.pop_front() {
            self.confirmed = self.confirmed.max(sent);
        }
    }

    fn expired(&self) -> bool {
        LeaseClock::now() >= self.deadline()
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
    lease: Option<LeaseClock>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Lines taken in by one [`State::pump`], at most: a server flooding a holder with lines must
/// not keep the caller in there (under the mutex) for ever. Far more than a holder is ever sent.
const PUMP_LINES: usize = 1024;

impl State {
    /// Reads whatever the server sent, without blocking, notes a loss, and looks at the lease
    /// clock.
    fn pump(&mut self, stream: &TcpStream) {
        for _ in 0..PUMP_LINES {
            if self.lost.is_some() {
                break;
            }
            match self.reader.line_now(stream) {
                Ok(Read::Line(line)) if line == "expired" => self.lost = Some(Lost::Expired),
                Ok(Read::Line(line)) if line == "alive" => {
                    if let Some(lease) = &mut self.lease {
                        lease.answered();
                    }
                }
                // Nothing else is sent to a holder.
                Ok(Read::Line(_)) => {}
                Ok(Read::Eof) => self.lost = Some(Lost::Closed),
                Ok(Read::Pending) => break,
                Err(e) => self.lost = Some(Lost::Broken(e.to_string())),
            }
        }
        if self.lost.is_none() && self.lease.as_ref().is_some_and(LeaseClock::expired) {
            self.lost = Some(Lost::LeaseUnconfirmed);
            // No byte will come to say so: make the socket readable (end of file) for whoever
            // polls it.
            let _ = stream.shutdown(Shutdown::Read);
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
        lease: Option<LeaseClock>,
    ) -> Result<Lock, Error> {
        let shared = Arc::new(Shared {
            stream,
            state: Mutex::new(State {
                reader,
                lost: None,
                stopping: false,
                lease,
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

    /// Why the lock is no longer held, or `None` while it is. Never blocks.
    pub fn lost(&self) -> Option<Lost> {
        let mut state = self.shared.state();
        state.pump(&self.shared.stream);
        state.lost.clone()
    }

    /// When a lease ([`Client::ttl`]) counts as lost unless the server answers a renewal before:
    /// a program that polls the lock's descriptor should wake up by then and ask [`Lock::lost`]
    /// (the renewals are answered in the background; the descriptor also turns readable soon
    /// after, but only if the keepalive thread gets to run). `None` without a ttl, or once lost.
    pub fn lease_deadline(&self) -> Option<Instant> {
        let state = self.shared.state();
        match (&state.lost, &state.lease) {
            (None, Some(lease)) => Some(lease.deadline_instant()),
            _ => None,
        }
    }

    /// Blocks until the lock is lost (and says why) or `timeout` passes (`None`); no timeout
    /// waits for as long as the lock is held.
    pub fn wait_lost(&self, timeout: Option<Duration>) -> Option<Lost> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(lost) = self.lost() {
                return Some(lost);
            }
            let wake = match (deadline, self.lease_deadline()) {
                (Some(d), _) if Instant::now() >= d => return None,
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            // Another thread may read what woke us; `lost` then finds nothing and we wait again.
            let _ = wait_readable(
                &self.shared.stream,
                wake.map(|w| w.saturating_duration_since(Instant::now())),
            );
        }
    }

    /// Releases the lock and waits for the server to confirm, so that when this returns the next
    /// client can have it. Fails with [`Error::Lost`] if it had already been lost, or if the
    /// connection fails on the way (the server then freed it at some moment we cannot know).
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
        let broken = |e: io::Error| Error::Lost(Lost::Broken(e.to_string()));
        send(stream, "release").map_err(|e| match e {
            Error::Io(e) => broken(e),
            e => e,
        })?;
        let deadline = Instant::now() + self.reply_timeout;
        loop {
            match state.reader.line(stream, deadline) {
                Ok(Some(line)) if line == "released" => return Ok(()),
                Ok(Some(line)) if line == "expired" => return Err(Error::Lost(Lost::Expired)),
                Ok(Some(_)) => continue, // a late `alive`
                Ok(None) => return Err(Error::Lost(Lost::Closed)),
                // No answer in time says nothing about the lock; a reset does.
                Err(Error::Io(e)) if e.kind() != io::ErrorKind::TimedOut => return Err(broken(e)),
                Err(e) => return Err(e),
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

/// Readable means something happened on the connection: call [`Lock::lost`]. With a lease, also
/// wake up by [`Lock::lease_deadline`].
impl AsFd for Lock {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.shared.stream.as_fd()
    }
}

/// The keepalive thread: a `.keepalive` every `every`, the replies drained so they never pile
/// up, the lease clock watched, until the lock is released or lost.
fn keep_alive(shared: &Shared, every: Duration) {
    let mut next = Instant::now() + every;
    let mut state = shared.state();
    loop {
        let wake = match state.lease.as_ref() {
            Some(lease) => next.min(lease.deadline_instant()),
            None => next,
        };
        state = shared
            .wake
            .wait_timeout_while(state, wake.saturating_duration_since(Instant::now()), |s| {
                !s.stopping
            })
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        if state.stopping || state.lost.is_some() {
            return;
        }
        state.pump(&shared.stream);
        if state.lost.is_none() && Instant::now() >= next {
            // Noted before it is written: the server cannot read it earlier.
            let sent = LeaseClock::now();
            if let Some(lease) = &mut state.lease {
                lease.sent(sent);
            }
            // Written outside the lock, so that a write held up by a full send buffer cannot
            // keep the owner from seeing the lease run out. Nobody else writes while the
            // keepalive thread runs: `release` stops it first.
            drop(state);
            let written = (&shared.stream).write_all(b".keepalive\n");
            state = shared.state();
            if let Err(e) = written
                && state.lost.is_none()
            {
                state.lost = Some(Lost::Broken(e.to_string()));
            }
            next = Instant::now() + every;
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

/// Bytes asked of the kernel per read: a `.locks` reply of several MB comes in a few hundred
/// reads, not thousands.
const READ_CHUNK: usize = 64 << 10;

/// Splits the connection into lines. Reads never block: they follow a `poll`, or are attempts.
/// Each attempt is at most one read, so that the callers' deadlines are checked between reads
/// even while a server keeps sending.
#[derive(Debug)]
struct LineReader {
    buf: Vec<u8>,
    /// How much of `buf` is known to hold no line end: every byte is searched once, not once
    /// per read.
    scanned: usize,
    /// The longest line accepted, line end not counted.
    max: usize,
}

impl LineReader {
    fn new(max: usize) -> LineReader {
        LineReader {
            buf: Vec::new(),
            scanned: 0,
            max,
        }
    }

    /// The next line by `deadline`; `None` at end of file.
    fn line(&mut self, stream: &TcpStream, deadline: Instant) -> Result<Option<String>, Error> {
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
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !wait_readable(stream, Some(left)).map_err(Error::Io)? {
                return Err(self.timed_out());
            }
        }
    }

    fn timed_out(&self) -> Error {
        if self.buf.is_empty() {
            Error::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                "no reply from the server in time",
            ))
        } else {
            Error::Protocol(format!(
                "the server's reply did not end in time ({} bytes without a line end; is it a \
                 tcpnetlock server?)",
                self.buf.len()
            ))
        }
    }

    /// A buffered line, or what one non-blocking read brings.
    fn line_now(&mut self, stream: &TcpStream) -> io::Result<Read> {
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
fn wait_readable(stream: &TcpStream, timeout: Option<Duration>) -> io::Result<bool> {
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
        assert_eq!(ttl.keepalive_every(), Some(Duration::from_millis(7500)));
        let both = ttl.keepalive(Duration::from_secs(15));
        assert_eq!(both.keepalive_every(), Some(Duration::from_millis(7500)));
        let ka = c.keepalive(Duration::from_secs(15));
        assert_eq!(ka.keepalive_every(), Some(Duration::from_secs(15)));
    }

    #[test]
    fn lease_margins() {
        let ms = Duration::from_millis;
        assert_eq!(lease_margin(Duration::from_secs(2)), ms(200));
        assert_eq!(
            lease_margin(Duration::from_secs(60)),
            Duration::from_secs(6)
        );
        // At least 50 ms, at most a fifth.
        assert_eq!(lease_margin(ms(300)), ms(50));
        assert_eq!(lease_margin(ms(100)), ms(20));
        // Three renewals fit the window, whatever the ttl.
        for ttl in [ms(1), ms(100), ms(300), ms(2000), Duration::from_secs(600)] {
            let every = Client::new("h", 1).ttl(ttl).keepalive_every().unwrap();
            let window = ttl - lease_margin(ttl);
            assert!(ttl < ms(40) || every * 3 < window, "{ttl:?}");
        }
    }

    #[test]
    fn the_lease_counts_from_the_send_time_of_the_last_answered_renewal() {
        let s = Duration::from_secs;
        let mut lease = LeaseClock::new(s(10), s(100));
        assert_eq!(lease.deadline(), s(109));
        lease.sent(s(102));
        lease.sent(s(105));
        lease.answered();
        assert_eq!(lease.deadline(), s(111));
        lease.answered();
        assert_eq!(lease.deadline(), s(114));
        // An answer nobody asked for proves nothing.
        lease.answered();
        assert_eq!(lease.deadline(), s(114));
    }

    /// A loopback connection: the server's end and a reader on the client's end.
    fn pair(max: usize) -> (TcpStream, TcpStream, LineReader) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let server = listener.accept().unwrap().0;
        (server, client, LineReader::new(max))
    }

    #[test]
    fn lines_split_across_reads_and_crlf() {
        let (mut server, client, mut reader) = pair(16);
        let soon = || Instant::now() + Duration::from_secs(5);
        server.write_all(b"al").unwrap();
        assert!(matches!(reader.line_now(&client), Ok(Read::Pending)));
        server
            .write_all(
                b"ive
expired
rel",
            )
            .unwrap();
        assert_eq!(reader.line(&client, soon()).unwrap().unwrap(), "alive");
        assert_eq!(reader.line(&client, soon()).unwrap().unwrap(), "expired");
        server
            .write_all(
                b"eased
",
            )
            .unwrap();
        assert_eq!(reader.line(&client, soon()).unwrap().unwrap(), "released");
        drop(server);
        assert_eq!(reader.line(&client, soon()).unwrap(), None);
    }

    #[test]
    fn a_line_over_the_cap_is_a_protocol_error() {
        let (mut server, client, mut reader) = pair(16);
        // 16 bytes and a line end fit; 18 bytes without one do not.
        server
            .write_all(
                b"0123456789abcdef
",
            )
            .unwrap();
        let soon = Instant::now() + Duration::from_secs(5);
        assert_eq!(reader.line(&client, soon).unwrap().unwrap().len(), 16);
        server.write_all(&[b'x'; 18]).unwrap();
        match reader.line(&client, soon) {
            Err(Error::Protocol(m)) => assert!(m.contains("over 16 bytes without a line end")),
            other => panic!("{other:?}"),
        }
        assert!(
            reader.buf.len() <= 18,
            "read past the cap: {}",
            reader.buf.len()
        );
    }

    #[test]
    fn the_deadline_holds_while_bytes_keep_coming() {
        let (mut server, client, mut reader) = pair(1 << 20);
        let feeder = thread::spawn(move || {
            while server.write_all(b"x").is_ok() {
                thread::sleep(Duration::from_millis(1));
            }
        });
        let start = Instant::now();
        let r = reader.line(&client, start + Duration::from_millis(200));
        let took = start.elapsed();
        assert!(
            matches!(&r, Err(Error::Protocol(m)) if m.contains("did not end in time")),
            "{r:?}"
        );
        assert!(took < Duration::from_secs(2), "{took:?}");
        drop(client);
        feeder.join().unwrap();
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
