//! A blocking client for a tcpnetlock server, and the guard a granted lock lives in.
//!
//! The connection *is* the lock: taking a lock opens one TCP connection, asks for the name, and
//! on `ok` hands back a [`Lock`] that owns the connection. Dropping the `Lock` (or calling
//! [`Lock::release`]) sends `release` and waits for the server's `released`, so when it returns
//! the next client can have the lock; if the process dies instead, the kernel closes the
//! connection and the server frees the lock all the same.
//!
//! ```no_run
//! use std::time::Duration;
//! use tcpnetlock::client::Client;
//!
//! let client = Client::new("localhost", 7654).client_id("migrations-job");
//! // Queue for up to a minute instead of giving up at once.
//! let lock = client.lock("django-migrations", Duration::from_secs(60))?;
//! // ... run the migrations ...
//! lock.release()?; // or just drop it
//! # Ok::<(), tcpnetlock::client::Error>(())
//! ```
//!
//! Why it is shaped so:
//!
//! - A [`Client`] says where the server is and who asks (host, port, client id, timeouts), and
//!   nothing about any one lock: a program takes different locks differently, so how to ask is
//!   chosen per call. [`Client::try_lock`] is 0.1.8's only mode (granted or refused at once),
//!   [`Client::lock`] queues for up to a given wait, and [`Client::request`] gives a
//!   [`LockBuilder`] for the rest (shared mode, fencing tokens, leases, semaphores, renewals).
//!   The first two are the builder with nothing or a wait set: one way to make a request, two
//!   short names for the common cases.
//! - Arguments are checked before connecting ([`InvalidArgument`]): a value the server would
//!   refuse (a `max` of 0, a wait over a week) costs no round trip, and one that cannot work (a
//!   zero timeout) is named rather than turned into an odd system error.
//! - Outcomes a caller acts on differently are variants of their own in [`Error`]: refused
//!   ([`Error::NotGranted`]), a semaphore of another size ([`Error::MaxMismatch`]), no answer
//!   in time ([`Error::Timeout`], never an `Io` error), the lock lost ([`Error::Lost`]).
//! - Ending is bounded (release and drop wait at most the reply timeout) and has a form that
//!   does not wait at all ([`Lock::abandon`]).
//! - The library never changes the caller's signal mask: the thread that renews a lease blocks
//!   every signal itself, before [`LockBuilder::take`] returns (lock.rs says how).
//!
//! A lock can be lost while held: the server restarts, the network fails, or a lease
//! ([`LockBuilder::ttl`]) runs out. [`Lock::lost`] says so without blocking, [`Lock::wait_lost`]
//! blocks until it happens, and the `Lock` is [`AsFd`](std::os::fd::AsFd) so that a program
//! with its own `poll` loop can wait for it alongside other events (readable means: call
//! [`Lock::lost`]). Every socket this module opens has TCP keepalive set tighter than the
//! server's (see [`DEAD_PEER_BOUND`]), so that a holder cut off from the server finds out before
//! the server gives its lock to somebody else; a lease also runs on a clock of the client's own,
//! which sees a path that stalls while both ends stay up.

mod error;
mod lease;
mod lock;
mod replies;

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::protocol::{self, MAX_HOLDERS, MAX_SECONDS};
use crate::status::{Info, Locks, Stats};
pub use error::{Error, InvalidArgument, Lost};
pub use lease::lease_margin;
use lease::{LeaseClock, renewal_interval};
use lock::Grant;
pub use lock::Lock;
use replies::{Deadline, Replies};

/// The port a tcpnetlock server listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 7654;

/// Idle time before the client's TCP keepalive probes the server, the interval between probes,
/// and how many may go unanswered: a silent server is given up on after 10 + 5 × 2 = 20 s.
/// The server drops a silent client after 40 s by default (20 + 5 × 4), so a holder cut off by
/// a partition learns of it well before the server hands its lock to someone else.
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const TCP_KEEPALIVE_PROBES: u32 = 2;
/// How long after the server goes silent (TCP keepalive unanswered, or data unacknowledged)
/// the client declares the lock lost, at most.
pub const DEAD_PEER_BOUND: Duration = Duration::from_secs(20);

/// The longest `.locks` reply line accepted. A server at its default 10,000 connections, every
/// one a holder with a long name and client id, writes about 4 MB; 64 MiB leaves room for far
/// bigger servers and still bounds what a broken one can make the client allocate.
const LOCKS_LINE_MAX: usize = 64 << 20;
/// The longest of every other reply line: grants, `err,` lines, `pong`, `.stats`, the replies to
/// a holder. The longest a tcpnetlock server writes is `.stats`, under 1 KB.
const LINE_MAX: usize = 64 << 10;

/// The longest metrics text accepted. A tcpnetlock server sends about 7 KB; the bound is for a
/// broken or hostile server, as [`LOCKS_LINE_MAX`] is.
const METRICS_MAX: usize = 16 << 20;

/// The longest wait, ttl, renewal interval or timeout: the protocol's limit for `wait:` and
/// `ttl:`, a week. Longer is a mistake, and bounded durations keep every deadline computable.
const WEEK: Duration = Duration::from_secs(MAX_SECONDS);

/// Where the server is and who is asking: host, port, client id and timeouts. How to ask for a
/// lock is chosen per call ([`Client::try_lock`], [`Client::lock`], [`Client::request`]).
/// Cheap to clone; every request opens its own connection.
///
/// ```no_run
/// use std::time::Duration;
/// use tcpnetlock::client::{Client, Error};
///
/// let client = Client::new("locks.internal", 7654)
///     .client_id("billing-cron")
///     .reply_timeout(Duration::from_secs(5));
/// match client.try_lock("invoices") {
///     Ok(_lock) => { /* ... send the invoices, then drop the guard ... */ }
///     Err(Error::NotGranted) => println!("another run is sending them"),
///     Err(e) => return Err(e),
/// }
/// # Ok::<(), Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    host: String,
    port: u16,
    client_id: Option<String>,
    connect_timeout: Duration,
    reply_timeout: Duration,
}

impl Client {
    /// A client for the server at `host` (a name or an address) and `port`. Nothing is sent
    /// until a request is made.
    ///
    /// ```
    /// use tcpnetlock::client::{Client, DEFAULT_PORT};
    ///
    /// let client = Client::new("::1", DEFAULT_PORT);
    /// assert_eq!(client.server(), "[::1]:7654");
    /// ```
    pub fn new(host: impl Into<String>, port: u16) -> Client {
        Client {
            host: host.into(),
            port,
            client_id: None,
            connect_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(10),
        }
    }

    /// Labels this client's locks in the server's logs and `.locks` (`[A-Za-z0-9.@_-]`, at most
    /// 128 characters; checked when a lock is asked for).
    ///
    /// ```no_run
    /// use tcpnetlock::client::Client;
    ///
    /// let client = Client::new("localhost", 7654).client_id("worker-3@host");
    /// let _lock = client.try_lock("queue")?;
    /// let locks = client.locks()?;
    /// let holder = &locks.get("queue").unwrap().holders[0];
    /// assert_eq!(holder.client_id.as_deref(), Some("worker-3@host"));
    /// # Ok::<(), tcpnetlock::client::Error>(())
    /// ```
    #[must_use]
    pub fn client_id(mut self, id: impl Into<String>) -> Client {
        self.client_id = Some(id.into());
        self
    }

    /// Longest time to establish the connection (per address the host resolves to). Default
    /// 10 s; above 0 and at most a week.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tcpnetlock::client::Client;
    ///
    /// let client = Client::new("locks.internal", 7654).connect_timeout(Duration::from_secs(2));
    /// client.ping()?;
    /// # Ok::<(), tcpnetlock::client::Error>(())
    /// ```
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Client {
        self.connect_timeout = timeout;
        self
    }

    /// Longest wait for a reply (on top of the wait for a grant, when there is one), and for a
    /// request to be written. It also bounds releasing a lock ([`Lock::release`] and dropping a
    /// [`Lock`]). Default 10 s; above 0 and at most a week.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tcpnetlock::client::{Client, Error};
    ///
    /// let client = Client::new("localhost", 7654).reply_timeout(Duration::from_millis(500));
    /// match client.ping() {
    ///     Err(Error::Timeout { after }) => eprintln!("no pong within {after:?}"),
    ///     other => println!("{other:?}"),
    /// }
    /// ```
    #[must_use]
    pub fn reply_timeout(mut self, timeout: Duration) -> Client {
        self.reply_timeout = timeout;
        self
    }

    /// `host:port`, as messages name the server.
    ///
    /// ```
    /// use tcpnetlock::client::Client;
    ///
    /// assert_eq!(Client::new("localhost", 7654).server(), "localhost:7654");
    /// assert_eq!(Client::new("::1", 7654).server(), "[::1]:7654");
    /// ```
    pub fn server(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Takes the lock `name` if it is free, now: fails with [`Error::NotGranted`] when somebody
    /// else holds it. The request is 0.1.8's, so this works against a 0.1.8 server too.
    ///
    /// ```no_run
    /// use tcpnetlock::client::{Client, Error};
    ///
    /// match Client::new("localhost", 7654).try_lock("nightly-report") {
    ///     Ok(_lock) => { /* ... build the report ... */ }
    ///     Err(Error::NotGranted) => println!("already running"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok::<(), Error>(())
    /// ```
    pub fn try_lock(&self, name: &str) -> Result<Lock, Error> {
        self.request(name).take()
    }

    /// Takes the lock `name`, queueing for up to `wait` behind earlier askers (first come,
    /// first served) while somebody else holds it; fails with [`Error::NotGranted`] when the
    /// wait runs out. `wait` is at most a week.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tcpnetlock::client::Client;
    ///
    /// let lock = Client::new("localhost", 7654).lock("deploy", Duration::from_secs(600))?;
    /// // ... deploy ...
    /// # Ok::<(), tcpnetlock::client::Error>(())
    /// ```
    pub fn lock(&self, name: &str, wait: Duration) -> Result<Lock, Error> {
        self.request(name).wait(wait).take()
    }

    /// A request for the lock `name` with any of the protocol's options; nothing is sent until
    /// [`LockBuilder::take`].
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tcpnetlock::client::Client;
    ///
    /// let client = Client::new("localhost", 7654);
    /// let lock = client
    ///     .request("schema")
    ///     .shared(true) // readers together, never with a writer
    ///     .wait(Duration::from_secs(30))
    ///     .ttl(Duration::from_secs(20))
    ///     .take()?;
    /// # Ok::<(), tcpnetlock::client::Error>(())
    /// ```
    pub fn request(&self, name: impl Into<String>) -> LockBuilder<'_> {
        LockBuilder {
            client: self,
            name: name.into(),
            wait: None,
            fencing: false,
            ttl: None,
            max: None,
            shared: false,
            renew_every: None,
        }
    }

    /// Asks the server for `.ping`; returns the time from request to `pong`.
    ///
    /// ```no_run
    /// use tcpnetlock::client::Client;
    ///
    /// let rtt = Client::new("localhost", 7654).ping()?;
    /// println!("pong in {rtt:?}");
    /// # Ok::<(), tcpnetlock::client::Error>(())
    /// ```
    pub fn ping(&self) -> Result<Duration, Error> {
        let start = std::time::Instant::now();
        self.ask(".ping", "pong", LINE_MAX)?;
        Ok(start.elapsed())
    }

    /// Asks whether the server can grant locks now (`.ping,serving:1`); returns the time from
    /// request to `pong`. A server on its own always can; a cluster member that cannot (it holds
    /// no etcd lease) answers [`Error::Server`] with why (`not serving locks: ...`). Servers
    /// before 0.3 (0.1.8 included) ignore the question and answer `pong`.
    ///
    /// ```no_run
    /// use tcpnetlock::client::{Client, Error};
    ///
    /// match Client::new("localhost", 7654).ping_serving() {
    ///     Ok(rtt) => println!("serving; pong in {rtt:?}"),
    ///     Err(Error::Server(why)) => println!("up, but {why}"),
    ///     Err(e) => println!("down: {e}"),
    /// }
    /// ```
    pub fn ping_serving(&self) -> Result<Duration, Error> {
        let start = std::time::Instant::now();
        self.ask(".ping,serving:1", "pong", LINE_MAX)?;
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

    /// What the server says about itself before a lock is asked for (`.info`): its version and,
    /// for a cluster member, whether it can grant locks now and the longest `ttl` it accepts.
    /// A server before 0.3 (or 0.1.8) does not know `.info`: that is `Ok(None)`.
    ///
    /// ```no_run
    /// use tcpnetlock::client::Client;
    ///
    /// match Client::new("localhost", 7654).info()? {
    ///     Some(info) if info.cluster.is_some() => println!("a cluster member"),
    ///     Some(_) => println!("a server on its own"),
    ///     None => println!("an older server"),
    /// }
    /// # Ok::<(), tcpnetlock::client::Error>(())
    /// ```
    pub fn info(&self) -> Result<Option<Info>, Error> {
        match self.ask(".info", "info,", LINE_MAX) {
            Ok(json) => read_status(".info", &json).map(Some),
            Err(Error::Protocol(msg)) if msg.contains("\"bad-action\"") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The server's `.stats` JSON object, as sent: for passing on unchanged (as
    /// `tcpnetlock stats --json` does). [`Client::stats`] reads it.
    ///
    /// ```no_run
    /// use tcpnetlock::client::Client;
    ///
    /// let json = Client::new("localhost", 7654).stats_json()?;
    /// assert!(json.starts_with('{'));
    /// # Ok::<(), tcpnetlock::client::Error>(())
    /// ```
    pub fn stats_json(&self) -> Result<String, Error> {
        self.ask(".stats", "stats,", LINE_MAX)
    }

    /// The server's `.locks` JSON object, as sent. [`Client::locks`] reads it.
    ///
    /// ```no_run
    /// use tcpnetlock::client::Client;
    ///
    /// println!("{}", Client::new("localhost", 7654).locks_json()?);
    /// # Ok::<(), tcpnetlock::client::Error>(())
    /// ```
    pub fn locks_json(&self) -> Result<String, Error> {
        self.ask(".locks", "locks,", LOCKS_LINE_MAX)
    }

    /// The server's metrics in the Prometheus text format, as sent: the body of its answer to
    /// `GET /metrics` on the lock port (docs/PROTOCOL.md), what `tcpnetlock stats --prometheus`
    /// prints. A server without metrics (tcpnetlock 0.2 and before, 0.1.8) answers `bad-action`,
    /// which is a [`Error::Protocol`] naming that answer.
    ///
    /// ```no_run
    /// use tcpnetlock::client::Client;
    ///
    /// let text = Client::new("localhost", 7654).metrics()?;
    /// for line in text.lines().filter(|l| l.starts_with("tcpnetlock_grants_total")) {
    ///     println!("{line}");
    /// }
    /// # Ok::<(), tcpnetlock::client::Error>(())
    /// ```
    pub fn metrics(&self) -> Result<String, Error> {
        let stream = self.connect()?;
        // HTTP/1.0 needs no Host line; `send` ends the blank line that ends the head.
        send(&stream, "GET /metrics HTTP/1.0\r\n\r", self.reply_timeout)?;
        // One deadline for the whole answer: a server that trickles it out is given up on too.
        let deadline = Deadline::after(self.reply_timeout);
        let mut replies = Replies::new(LINE_MAX);
        let mut next = || -> Result<Option<String>, Error> { replies.line(&stream, deadline) };
        let status = next()?.ok_or_else(closed_without_answer)?;
        let Some(rest) = status.strip_prefix("HTTP/1.") else {
            return Err(match status.strip_prefix("err,") {
                Some(msg) => Error::Server(msg.to_owned()),
                None => Error::Protocol(format!(
                    "the server answered GET /metrics with {status:?}, not HTTP: it does not \
                     serve metrics (tcpnetlock 0.2 and before answer bad-action)"
                )),
            });
        };
        let code = rest.get(2..5).unwrap_or("");
        let mut length = None;
        loop {
            let line = next()?.ok_or_else(|| {
                Error::Protocol("the server closed the connection in the HTTP head".into())
            })?;
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse::<usize>().ok();
            }
        }
        let mut body = String::new();
        while let Some(line) = next()? {
            body.push_str(&line);
            body.push('\n');
            if body.len() > METRICS_MAX {
                return Err(Error::Protocol(format!(
                    "the metrics text is over {METRICS_MAX} bytes (is it a tcpnetlock server?)"
                )));
            }
        }
        if code != "200" {
            let reason = rest.get(6..).unwrap_or("");
            return Err(Error::Server(format!(
                "GET /metrics: {code} {reason}: {}",
                body.trim_end()
            )));
        }
        match length {
            Some(n) if n != body.len() => Err(Error::Protocol(format!(
                "the metrics text was cut short: {} of the {n} bytes announced",
                body.len()
            ))),
            _ => Ok(body),
        }
    }

    /// One request on a fresh connection; the reply, at most `max` bytes, must start with
    /// `expect`, which is cut off.
    fn ask(&self, request: &str, expect: &str, max: usize) -> Result<String, Error> {
        let stream = self.connect()?;
        send(&stream, request, self.reply_timeout)?;
        let mut replies = Replies::new(max);
        match replies.line(&stream, Deadline::after(self.reply_timeout))? {
            Some(line) => match line.strip_prefix(expect) {
                Some(rest) => Ok(rest.to_owned()),
                None => Err(unexpected(&line)),
            },
            None => Err(closed_without_answer()),
        }
    }

    fn check_timeouts(&self) -> Result<(), InvalidArgument> {
        let bad = |d: Duration| d.is_zero() || d > WEEK;
        if bad(self.connect_timeout) {
            return Err(InvalidArgument::ConnectTimeout(self.connect_timeout));
        }
        if bad(self.reply_timeout) {
            return Err(InvalidArgument::ReplyTimeout(self.reply_timeout));
        }
        Ok(())
    }

    /// Tries every address the host resolves to, in order.
    fn connect(&self) -> Result<TcpStream, Error> {
        self.check_timeouts()?;
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
}

/// A request for one lock, made by [`Client::request`]: set what is wanted, then
/// [`take`](LockBuilder::take) it. Only the options set are sent, so a request with none is
/// tcpnetlock 0.1.8's and works against a 0.1.8 server.
///
/// ```no_run
/// use std::time::Duration;
/// use tcpnetlock::client::Client;
///
/// let client = Client::new("localhost", 7654);
/// // At most 3 renderers at once, anywhere; each grant with a fencing token.
/// let slot = client.request("render").max(3).fencing(true).take()?;
/// println!("rendering with token {:?}", slot.token());
/// # Ok::<(), tcpnetlock::client::Error>(())
/// ```
#[derive(Debug, Clone)]
#[must_use = "a request does nothing until `take` is called"]
pub struct LockBuilder<'a> {
    client: &'a Client,
    name: String,
    wait: Option<Duration>,
    fencing: bool,
    ttl: Option<Duration>,
    max: Option<u32>,
    shared: bool,
    renew_every: Option<Duration>,
}

impl LockBuilder<'_> {
    /// Queue for up to `wait` (first come, first served) while somebody else holds the lock,
    /// instead of being refused at once. At most a week; zero means try once.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tcpnetlock::client::Client;
    ///
    /// let client = Client::new("localhost", 7654);
    /// let lock = client.request("deploy").wait(Duration::from_secs(600)).take()?;
    /// # Ok::<(), tcpnetlock::client::Error>(())
    /// ```
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// Hold the lock in shared mode (as `flock -s`): any number of shared holders at once, or
    /// one exclusive holder, never both. A request that is not shared is exclusive. Queueing
    /// stays first come, first served: a shared request does not pass an exclusive one waiting
    /// before it. Cannot be combined with a [`max`](LockBuilder::max) other than 1.
    ///
    /// ```no_run
    /// use tcpnetlock::client::Client;
    ///
    /// let client = Client::new("localhost", 7654);
    /// let read_a = client.request("catalog").shared(true).take()?;
    /// let read_b = client.request("catalog").shared(true).take()?; // both held
    /// assert!(client.try_lock("catalog").is_err()); // a writer must wait for both
    /// # Ok::<(), tcpnetlock::client::Error>(())
    /// ```
    pub fn shared(mut self, on: bool) -> Self {
        self.shared = on;
        self
    }

    /// Ask for a fencing token with the grant ([`Lock::token`]): a number larger than that of
    /// every earlier grant, to pass to the resource the lock protects.
    ///
    /// ```no_run
    /// use tcpnetlock::client::Client;
    ///
    /// let lock = Client::new("localhost", 7654).request("ledger").fencing(true).take()?;
    /// assert!(lock.token().is_some());
    /// # Ok::<(), tcpnetlock::client::Error>(())
    /// ```
    pub fn fencing(mut self, on: bool) -> Self {
        self.fencing = on;
        self
    }

    /// Hold the lock as a lease: the server revokes it after `ttl` without hearing from its
    /// holder. The [`Lock`] renews it every quarter of `ttl` from a background thread, and
    /// counts the lock as lost ([`Lost::LeaseUnconfirmed`]) once the server has answered no
    /// renewal for `ttl` less a margin ([`lease_margin`]): before the server can give it to
    /// anyone else. Above 0 and at most a week.
    ///
    /// With a [`wait`](LockBuilder::wait), a renewal is sent as soon as the lock is granted and
    /// `take` returns once it is answered: the grant may have come at any moment of the wait.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tcpnetlock::client::Client;
    ///
    /// let client = Client::new("localhost", 7654);
    /// let lock = client.request("leader").ttl(Duration::from_secs(10)).take()?;
    /// // A hung process or a frozen VM loses the lock within 10 s.
    /// # Ok::<(), tcpnetlock::client::Error>(())
    /// ```
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Let up to `max` clients hold the name at once (a counting semaphore, 1 to 65535).
    /// Everyone using the name must ask with the same `max`; another is refused with
    /// [`Error::MaxMismatch`].
    ///
    /// ```no_run
    /// use tcpnetlock::client::{Client, Error};
    ///
    /// let client = Client::new("localhost", 7654);
    /// match client.request("render").max(3).take() {
    ///     Ok(_slot) => { /* ... one of at most 3 ... */ }
    ///     Err(Error::NotGranted) => println!("3 running already"),
    ///     Err(Error::MaxMismatch { held_max }) => eprintln!("others use max {held_max}"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok::<(), Error>(())
    /// ```
    pub fn max(mut self, max: u32) -> Self {
        self.max = Some(max);
        self
    }

    /// Renew the lock (send `.keepalive`) every `every` while it is held, as 0.1.8's
    /// `--keep-alive` did, so that idle-connection timeouts on the way do not cut it; with a
    /// [`ttl`](LockBuilder::ttl), the shorter of this and a quarter of the ttl is used. Never
    /// more often than every 10 ms; above 0 and at most a week.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tcpnetlock::client::Client;
    ///
    /// let client = Client::new("localhost", 7654);
    /// let lock = client.request("batch").renew_every(Duration::from_secs(15)).take()?;
    /// # Ok::<(), tcpnetlock::client::Error>(())
    /// ```
    pub fn renew_every(mut self, every: Duration) -> Self {
        self.renew_every = Some(every);
        self
    }

    /// Sends the request and waits for the answer: the granted [`Lock`], or why not. The
    /// arguments are checked first ([`Error::InvalidArgument`], nothing sent). Waits at most
    /// the [`wait`](LockBuilder::wait) plus the reply timeout ([`Error::Timeout`]). May be
    /// called again on the same builder (to retry).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tcpnetlock::client::{Client, Error};
    ///
    /// let client = Client::new("localhost", 7654);
    /// let request = client.request("report");
    /// let lock = loop {
    ///     match request.take() {
    ///         Err(Error::NotGranted) => std::thread::sleep(Duration::from_secs(10)),
    ///         other => break other?,
    ///     }
    /// };
    /// # Ok::<(), Error>(())
    /// ```
    pub fn take(&self) -> Result<Lock, Error> {
        self.take_with(|_| {})
    }

    /// [`take`](LockBuilder::take), and once the request is sent, before its answer is awaited,
    /// `asked` is called (on this thread) with the connection's addresses. While the request
    /// waits, the server's `.locks` lists it among the lock's
    /// [`waiters`](crate::status::LockInfo::waiters) with [`Asked::local_addr`] as its `peer`
    /// (unless a NAT or proxy stands between): ask [`Client::locks`] from another thread to
    /// learn who holds the lock and how many are ahead. `asked` should return quickly: a grant
    /// is read only after it has returned. It is not called when the request fails to be sent.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tcpnetlock::client::Client;
    ///
    /// let client = Client::new("localhost", 7654);
    /// let lock = client
    ///     .request("deploy")
    ///     .wait(Duration::from_secs(600))
    ///     .take_with(|asked| {
    ///         let (me, server) = (asked.local_addr(), asked.server_addr());
    ///         std::thread::spawn(move || {
    ///             let status = Client::new(server.ip().to_string(), server.port());
    ///             let locks = status.locks()?;
    ///             let Some(deploy) = locks.get("deploy") else {
    ///                 return Ok(()); // granted meanwhile
    ///             };
    ///             let mine = |peer: Option<&str>| peer.and_then(|p| p.parse().ok()) == Some(me);
    ///             match deploy.waiters.iter().position(|w| mine(w.peer.as_deref())) {
    ///                 Some(ahead) => println!("{ahead} ahead of me"),
    ///                 None => println!("not listed under my address (a NAT?)"),
    ///             }
    ///             Ok::<(), tcpnetlock::client::Error>(())
    ///         });
    ///     })?;
    /// # Ok::<(), tcpnetlock::client::Error>(())
    /// ```
    pub fn take_with(&self, asked: impl FnOnce(&Asked)) -> Result<Lock, Error> {
        self.check()?;
        let client = self.client;
        let stream = client.connect()?;
        let mut replies = Replies::new(LINE_MAX);
        // The server's lease starts once it has read the request: not before this.
        let sent = LeaseClock::now();
        send(&stream, &self.line(), client.reply_timeout)?;
        // Either address missing means the connection has failed already: reading says how.
        if let (Ok(local_addr), Ok(server_addr)) = (stream.local_addr(), stream.peer_addr()) {
            asked(&Asked {
                local_addr,
                server_addr,
            });
        }
        let patience = Deadline::after(self.wait.unwrap_or_default() + client.reply_timeout);
        let token = match replies.line(&stream, patience)? {
            Some(line) => parse_grant(&line, &self.name)?,
            None => return Err(closed_without_answer()),
        };
        let mut lease = self.ttl.map(|ttl| LeaseClock::new(ttl, sent));
        if let Some(lease) = &mut lease
            && self.wait.is_some_and(|w| !w.is_zero())
        {
            confirm_lease(&stream, &mut replies, lease, client.reply_timeout)?;
        }
        Lock::start(Grant {
            name: self.name.clone(),
            token,
            shared: self.shared,
            stream,
            replies,
            lease,
            renew_every: renewal_interval(self.ttl, self.renew_every),
            reply_timeout: client.reply_timeout,
        })
    }

    /// Checks the arguments as [`take`](LockBuilder::take) does first, without connecting: what
    /// the server would refuse, or what cannot work ([`Error::InvalidArgument`]).
    ///
    /// ```
    /// use tcpnetlock::client::{Client, Error};
    ///
    /// let client = Client::new("localhost", 7654);
    /// assert!(matches!(client.request("a/b").validate(), Err(Error::InvalidArgument(_))));
    /// assert!(client.request("deploy").validate().is_ok());
    /// ```
    pub fn validate(&self) -> Result<(), Error> {
        Ok(self.check()?)
    }

    /// What the server would refuse, or what cannot work, found before connecting.
    fn check(&self) -> Result<(), InvalidArgument> {
        use InvalidArgument as Bad;
        let too_long = |d: Duration| d > WEEK;
        if !protocol::valid_lock_name(&self.name, usize::MAX) {
            return Err(Bad::Name(self.name.clone()));
        }
        if let Some(id) = &self.client.client_id
            && !protocol::valid_client_id(id)
        {
            return Err(Bad::ClientId(id.clone()));
        }
        self.client.check_timeouts()?;
        match (self.wait, self.ttl, self.max, self.renew_every) {
            (Some(wait), ..) if too_long(wait) => Err(Bad::Wait(wait)),
            (_, Some(ttl), ..) if ttl.is_zero() || too_long(ttl) => Err(Bad::Ttl(ttl)),
            (_, _, Some(max), _) if !(1..=MAX_HOLDERS).contains(&max) => Err(Bad::Max(max)),
            (_, _, Some(max), _) if self.shared && max != 1 => Err(Bad::SharedWithMax(max)),
            (.., Some(every)) if every.is_zero() || too_long(every) => Err(Bad::RenewEvery(every)),
            _ => Ok(()),
        }
    }

    /// The `lock` request, with only the parameters asked for.
    fn line(&self) -> String {
        let mut line = format!("lock,name:{}", self.name);
        if let Some(id) = &self.client.client_id {
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
        if self.shared {
            line += ",shared:1";
        }
        line
    }
}

/// A lock request on its way, as [`LockBuilder::take_with`] tells of it: the addresses of the
/// connection that asked, and that will hold the lock once granted.
///
/// ```no_run
/// use tcpnetlock::client::Client;
///
/// let lock = Client::new("localhost", 7654)
///     .request("deploy")
///     .take_with(|asked| eprintln!("asked {} from {}", asked.server_addr(), asked.local_addr()))?;
/// # Ok::<(), tcpnetlock::client::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asked {
    local_addr: SocketAddr,
    server_addr: SocketAddr,
}

impl Asked {
    /// This end of the connection (`getsockname`): what the server shows as the request's
    /// `peer` in `.locks`, unless a NAT or proxy stands between.
    ///
    /// ```no_run
    /// # use tcpnetlock::client::Client;
    /// # let lock = Client::new("localhost", 7654).request("a").take_with(|asked| {
    /// let me = asked.local_addr(); // 127.0.0.1:50312
    /// # })?;
    /// # Ok::<(), tcpnetlock::client::Error>(())
    /// ```
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The server's address the connection went to: one of those the client's host resolves
    /// to, the one to ask for `.locks` about this request.
    ///
    /// ```no_run
    /// # use tcpnetlock::client::Client;
    /// # let lock = Client::new("localhost", 7654).request("a").take_with(|asked| {
    /// let server = asked.server_addr(); // [::1]:7654
    /// # })?;
    /// # Ok::<(), tcpnetlock::client::Error>(())
    /// ```
    pub fn server_addr(&self) -> SocketAddr {
        self.server_addr
    }
}

/// After a grant that may have followed a wait: the server's lease started at the grant, at
/// some moment between our request and its `ok`, and a delayed `ok` could even arrive after it
/// ended. A renewal sent now and answered says for certain how long it lasts.
fn confirm_lease(
    stream: &TcpStream,
    replies: &mut Replies,
    lease: &mut LeaseClock,
    reply_timeout: Duration,
) -> Result<(), Error> {
    let sent = LeaseClock::now();
    send(stream, ".keepalive", reply_timeout)?;
    let window = lease.window();
    match replies.line(stream, Deadline::after(window.min(reply_timeout))) {
        Ok(Some(line)) if line == "alive" => {
            lease.confirmed = sent;
            Ok(())
        }
        Ok(Some(line)) if line == "expired" => Err(Error::Lost(Lost::Expired)),
        Ok(Some(line)) => Err(unexpected(&line)),
        Ok(None) => Err(Error::Lost(Lost::Closed)),
        Err(Error::Timeout { .. }) if window <= reply_timeout => {
            Err(Error::Lost(Lost::LeaseUnconfirmed))
        }
        Err(e) => Err(e),
    }
}

/// Options on a fresh connection. Failures only weaken loss detection, so they are not errors.
fn configure(stream: &TcpStream, write_timeout: Duration) {
    let _ = stream.set_nodelay(true);
    // A write only blocks when the server stops reading; past this it is a timeout.
    let _ = stream.set_write_timeout(Some(write_timeout));
    let socket = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL)
        .with_retries(TCP_KEEPALIVE_PROBES);
    let _ = socket.set_tcp_keepalive(&keepalive);
    // The same bound while data we sent is unacknowledged (a renewal, a release).
    let _ = socket.set_tcp_user_timeout(Some(DEAD_PEER_BOUND));
}

/// `ok` or `ok,token:N` to the token; anything else to the error it means.
fn parse_grant(line: &str, name: &str) -> Result<Option<u64>, Error> {
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
    if let Some(held_max) = line
        .strip_prefix("err,")
        .and_then(|msg| held_max(msg, name))
    {
        return Err(Error::MaxMismatch { held_max });
    }
    Err(unexpected(line))
}

/// K from the server's `max mismatch: NAME is held with max:K`, for the name asked for.
fn held_max(msg: &str, name: &str) -> Option<u32> {
    let k = msg
        .strip_prefix("max mismatch: ")?
        .strip_prefix(name)?
        .strip_prefix(" is held with max:")?;
    if k.is_empty() || !k.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    k.parse().ok()
}

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

/// An `err,` line becomes the server's message; anything else is a protocol error.
fn unexpected(line: &str) -> Error {
    match line.strip_prefix("err,") {
        Some(msg) => Error::Server(msg.to_owned()),
        None => Error::Protocol(format!("unexpected reply {line:?}")),
    }
}

fn closed_without_answer() -> Error {
    Error::Protocol("the server closed the connection without answering".into())
}

/// Decimal seconds as the protocol writes them: `30`, `2.5`, `0.001`.
fn seconds(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        return d.as_secs().to_string();
    }
    let text = format!("{}.{:09}", d.as_secs(), d.subsec_nanos());
    text.trim_end_matches('0').to_owned()
}

/// Writes one request line; a write that the server does not take in within `timeout` (the
/// socket's write timeout) is a [`Error::Timeout`].
fn send(mut stream: &TcpStream, line: &str, timeout: Duration) -> Result<(), Error> {
    stream
        .write_all(format!("{line}\n").as_bytes())
        .map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                Error::Timeout { after: timeout }
            }
            _ => Error::Io(e),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        let c = Client::new("h", 1);
        assert_eq!(c.request("a").line(), "lock,name:a");
        let c = c.client_id("me");
        let r = c
            .request("a")
            .wait(Duration::from_millis(2500))
            .fencing(true)
            .max(3)
            .ttl(Duration::from_secs(30));
        assert_eq!(
            r.line(),
            "lock,name:a,client-id:me,wait:2.5,fencing:1,max:3,ttl:30"
        );
        assert_eq!(
            c.request("a").shared(true).line(),
            "lock,name:a,client-id:me,shared:1"
        );
        // Off is not sent: the request stays 0.1.8's.
        assert_eq!(
            c.request("a").shared(false).fencing(false).line(),
            "lock,name:a,client-id:me"
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
        assert_eq!(protocol::parse_seconds(&seconds(WEEK)), Some(WEEK));
    }

    #[test]
    fn grant_lines() {
        let grant = |line| parse_grant(line, "sem");
        assert_eq!(grant("ok").unwrap(), None);
        assert_eq!(grant("ok,token:42").unwrap(), Some(42));
        assert!(matches!(grant("not-granted"), Err(Error::NotGranted)));
        assert!(matches!(grant("err,server busy"), Err(Error::Server(m)) if m == "server busy"));
        assert!(matches!(grant("ok,token:x"), Err(Error::Protocol(_))));
        assert!(matches!(grant("bad-action"), Err(Error::Protocol(_))));
        assert!(matches!(
            grant("err,max mismatch: sem is held with max:2"),
            Err(Error::MaxMismatch { held_max: 2 })
        ));
        // Another name, or a K that is not a count: the server's words, as they came.
        for line in [
            "err,max mismatch: other is held with max:2",
            "err,max mismatch: sem is held with max:+2",
            "err,max mismatch: sem is held with max:",
            "err,max mismatch: sem is held with max:99999999999",
        ] {
            assert!(matches!(grant(line), Err(Error::Server(_))), "{line}");
        }
    }

    #[test]
    fn arguments_are_checked_before_connecting() {
        use InvalidArgument as Bad;
        // TEST-NET: a connection attempt would fail differently (and slowly).
        let c = Client::new("192.0.2.1", 1);
        let week = WEEK;
        let over = week + Duration::from_nanos(1);
        let bad = |r: Result<Lock, Error>| match r {
            Err(Error::InvalidArgument(a)) => a,
            other => panic!("{other:?}"),
        };
        assert_eq!(bad(c.try_lock("a b")), Bad::Name("a b".into()));
        assert_eq!(bad(c.try_lock("")), Bad::Name("".into()));
        assert_eq!(bad(c.lock("a", over)), Bad::Wait(over));
        assert_eq!(bad(c.request("a").max(0).take()), Bad::Max(0));
        assert_eq!(bad(c.request("a").max(65_536).take()), Bad::Max(65_536));
        assert_eq!(
            bad(c.request("a").ttl(Duration::ZERO).take()),
            Bad::Ttl(Duration::ZERO)
        );
        assert_eq!(bad(c.request("a").ttl(over).take()), Bad::Ttl(over));
        assert_eq!(
            bad(c.request("a").shared(true).max(2).take()),
            Bad::SharedWithMax(2)
        );
        assert_eq!(
            bad(c.request("a").renew_every(Duration::ZERO).take()),
            Bad::RenewEvery(Duration::ZERO)
        );
        let id = c.clone().client_id("x y");
        assert_eq!(bad(id.try_lock("a")), Bad::ClientId("x y".into()));
        let slow = c.clone().reply_timeout(Duration::MAX);
        assert_eq!(bad(slow.try_lock("a")), Bad::ReplyTimeout(Duration::MAX));
        let never = c.clone().connect_timeout(Duration::ZERO);
        assert!(matches!(
            never.ping(),
            Err(Error::InvalidArgument(Bad::ConnectTimeout(_)))
        ));
        assert_eq!(
            Error::from(Bad::Max(0)).to_string(),
            "invalid max 0: expected 1 to 65535"
        );
    }
}
