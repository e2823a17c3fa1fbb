//! The server's Prometheus metrics: counters and histograms updated by every connection's thread,
//! rendered in the text exposition format 0.0.4 when a scraper asks.
//!
//! Built for a hot path shared by thousands of threads: an update is one or two relaxed atomic
//! additions, never a lock, so counting a grant cannot make a grant wait. A histogram keeps one
//! atomic per bucket (not cumulative: an observation touches one bucket, and rendering adds them
//! up) and its sum as integer microseconds (integer, so it can be atomic; microseconds, so it
//! holds 584,000 years of summed hold time where nanoseconds would run out after 584, which
//! 10,000 holders reach in three weeks). What the server already counts elsewhere is not counted
//! twice: the caller reads it when rendering and passes it in, the state now as [`Gauges`] and
//! the lock table's totals (grants, refusals, timeouts, expiries: counted where they are
//! decided, and shown by `.stats` too) as [`Totals`].
//!
//! No metric has a per-lock-name label: lock names are chosen by clients, so such a label would
//! let any client create series without bound. `.locks` answers per-name questions.
//!
//! Self-contained and std-only on purpose: it uses nothing else from the crate, so it can be
//! mounted wherever the server lives (and by a test, with `#[path]`).

use std::fmt::Write as _;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The `Content-Type` of [`ServerMetrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Histogram bucket upper bounds, in nanoseconds, from 100 µs to an hour.
///
/// Below a second: 1-2.5-5 steps per decade, the steps of Prometheus' own default buckets
/// (0.005 … 10 s), extended down to 100 µs, about where a queued waiter gets a released lock on
/// loopback (29 µs p50, 110 µs max in docs/BENCHMARKS.md; 272 µs p50 between processes). From a
/// second on: 1, 2.5, 5, 10 s, then minutes, 30 s to an hour, because waits and holds are
/// configured and alerted on in round minutes ("waited over 5 minutes") and a `le` bound that
/// equals the threshold makes that count exact instead of interpolated. No step is wider than
/// 3x, which bounds `histogram_quantile`'s interpolation error the same way everywhere.
/// 23 bounds (+Inf makes 24 series per histogram).
pub const BUCKETS_NANOS: [u64; 23] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
    60_000_000_000,
    120_000_000_000,
    300_000_000_000,
    600_000_000_000,
    1_800_000_000_000,
    3_600_000_000_000,
];

/// A value that only goes up.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// The closed set of values one label can take. A metric labelled with it has every value's
/// series from the start, at 0, so that `rate()` sees the first event.
pub trait LabelSet: Copy + 'static {
    /// The label's name.
    const KEY: &'static str;
    /// Every value, in the order of [`LabelSet::index`].
    const VALUES: &'static [&'static str];
    /// Every value, as [`LabelSet::VALUES`] writes them.
    const ALL: &'static [Self];
    fn index(self) -> usize;
}

/// Declares an enum whose variants are a label's values, so the variants and their text cannot
/// drift apart.
macro_rules! label_set {
    ($(#[$doc:meta])* $name:ident, $key:literal,
     { $($(#[$vdoc:meta])* $variant:ident = $value:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl LabelSet for $name {
            const KEY: &'static str = $key;
            const VALUES: &'static [&'static str] = &[$($value),+];
            const ALL: &'static [Self] = &[$($name::$variant),+];
            fn index(self) -> usize {
                self as usize
            }
        }
    };
}

label_set!(
    /// What a connection's first request asked for.
    RequestKind, "kind", {
        Lock = "lock",
        /// `.ping`, with or without `serving:1`.
        Ping = "ping",
        Stats = "stats",
        Locks = "locks",
        Info = "info",
        /// `GET /metrics` over HTTP.
        Metrics = "metrics",
        Shutdown = "shutdown",
        /// Answered with `bad-action`, `bad-request` or an `err,invalid ...` line.
        Bad = "bad",
    }
);

label_set!(
    /// How a lock was granted.
    Grant, "how", {
        /// On request.
        Immediate = "immediate",
        /// After waiting in the queue (`wait:`).
        AfterWait = "after_wait",
    }
);

label_set!(
    /// Why a lock request was refused at once.
    Refusal, "reason", {
        /// `not-granted`: held, or others wait, and the request would not wait.
        NotGranted = "not_granted",
        /// `err,max mismatch`.
        MaxMismatch = "max_mismatch",
    }
);

label_set!(
    /// How a holder let go (a revoked lease is counted apart, as an expiry).
    Release, "how", {
        /// The client sent `release`.
        Release = "release",
        /// The connection closed, was reset, was found dead, or was closed by the server for a
        /// bad line.
        Disconnect = "disconnect",
    }
);

label_set!(
    /// Why a connection was refused at accept, before or instead of serving its request.
    ConnRefusal, "reason", {
        /// `--max-connections`: `err,too many connections`.
        MaxConnections = "max_connections",
        /// `--max-connections-per-peer`: `err,too many connections from your address`.
        MaxConnectionsPerPeer = "max_connections_per_peer",
        /// No worker thread could be started: `err,server busy`.
        ServerBusy = "server_busy",
        /// Out of file descriptors: `err,server out of file descriptors`.
        OutOfFds = "out_of_fds",
    }
);

/// A counter for each value of one label.
#[derive(Debug)]
pub struct CounterVec<L: LabelSet> {
    counts: Box<[Counter]>,
    label: PhantomData<L>,
}

impl<L: LabelSet> Default for CounterVec<L> {
    fn default() -> Self {
        CounterVec {
            counts: L::VALUES.iter().map(|_| Counter::default()).collect(),
            label: PhantomData,
        }
    }
}

impl<L: LabelSet> CounterVec<L> {
    pub fn inc(&self, value: L) {
        self.counts[value.index()].inc();
    }

    pub fn get(&self, value: L) -> u64 {
        self.counts[value.index()].get()
    }
}

/// Durations counted in [`BUCKETS_NANOS`].
#[derive(Debug)]
pub struct Histogram {
    /// Observations per bucket, not cumulative; the last one is above every bound (+Inf).
    buckets: [AtomicU64; BUCKETS_NANOS.len() + 1],
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // A bucket counts what is at most its bound (`le`).
        let i = BUCKETS_NANOS.partition_point(|&bound| bound < nanos);
        self.buckets[i].fetch_add(1, Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Relaxed);
    }

    /// Cumulative counts per bound, +Inf last (which is the count), and the sum in microseconds.
    /// Read while others observe, the sum may be a few observations ahead of or behind the
    /// counts; the counts agree with each other.
    fn snapshot(&self) -> ([u64; BUCKETS_NANOS.len() + 1], u64) {
        let mut total = 0u64;
        let cumulative = std::array::from_fn(|i| {
            total = total.wrapping_add(self.buckets[i].load(Relaxed));
            total
        });
        (cumulative, self.sum_micros.load(Relaxed))
    }
}

/// What the server knows now and keeps elsewhere; read by the caller at render time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Names held now.
    pub locks_held: u64,
    /// Connections holding a lock now (more than `locks_held` with semaphores or shared locks).
    pub holders: u64,
    /// Connections queued now.
    pub waiters: u64,
    /// Connections open now.
    pub connections: u64,
    /// Worker threads alive.
    pub threads: u64,
    /// Worker threads waiting for work.
    pub threads_idle: u64,
}

/// Totals since start that the server keeps elsewhere (the lock table counts its decisions under
/// its own mutex, for `.stats`); read by the caller at render time, so that the metrics and
/// `.stats` come from one count and always agree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    /// Connections accepted (`.stats` `requests_count`).
    pub accepted: u64,
    pub granted_immediately: u64,
    pub granted_after_wait: u64,
    /// Grants in shared mode, immediate or after waiting (also in the two above).
    pub granted_shared: u64,
    /// Lock requests refused at once with `not-granted`.
    pub not_granted: u64,
    pub max_mismatches: u64,
    pub wait_timeouts: u64,
    pub lease_expiries: u64,
    pub log_lines_dropped: u64,
}

/// What only the server's threads see as it happens, one field each: requests by kind, how
/// holders let go, refused connections, and the durations. Callers record events through the
/// methods, which keep the counters and histograms that describe one event in step.
#[derive(Debug)]
pub struct ServerMetrics {
    started: SystemTime,
    requests: CounterVec<RequestKind>,
    releases: CounterVec<Release>,
    refused_connections: CounterVec<ConnRefusal>,
    /// Grants after waiting: from joining the queue to the grant.
    wait: Histogram,
    /// Every holder that let go or lost its lease: from its grant to then.
    hold: Histogram,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        ServerMetrics::new()
    }
}

impl ServerMetrics {
    /// All zero; `process_start_time_seconds` is now, so create this when the server starts.
    pub fn new() -> ServerMetrics {
        ServerMetrics {
            started: SystemTime::now(),
            requests: CounterVec::default(),
            releases: CounterVec::default(),
            refused_connections: CounterVec::default(),
            wait: Histogram::default(),
            hold: Histogram::default(),
        }
    }

    /// A connection's first request, once answered.
    pub fn request(&self, kind: RequestKind) {
        self.requests.inc(kind);
    }

    /// A queued request was granted after `waited` in the queue (the grant itself is counted
    /// in [`Totals::granted_after_wait`]).
    pub fn granted_after_wait(&self, waited: Duration) {
        self.wait.observe(waited);
    }

    /// A lease was revoked after `held` since its grant (counted in [`Totals::lease_expiries`]).
    pub fn lease_expired(&self, held: Duration) {
        self.hold.observe(held);
    }

    /// A holder let go after `held` since its grant. A waiter that leaves the queue is not a
    /// release.
    pub fn released(&self, how: Release, held: Duration) {
        self.releases.inc(how);
        self.hold.observe(held);
    }

    pub fn connection_refused(&self, why: ConnRefusal) {
        self.refused_connections.inc(why);
    }

    /// The text exposition format 0.0.4, with what the caller read now and what `/proc/self`
    /// shows now.
    pub fn render(&self, totals: &Totals, gauges: &Gauges) -> String {
        self.render_with(totals, gauges, &Process::read())
    }

    fn render_with(&self, totals: &Totals, gauges: &Gauges, process: &Process) -> String {
        let mut out = Text(String::with_capacity(8 * 1024));
        out.help_type(
            "tcpnetlock_build_info",
            "The running server's version, as a label; the value is always 1.",
            "gauge",
        );
        out.sample(
            "tcpnetlock_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            "1",
        );
        out.counter(
            "tcpnetlock_connections_accepted_total",
            "Client connections accepted, refused ones included.",
            totals.accepted,
        );
        out.counter_by(
            "tcpnetlock_requests_total",
            "First requests of connections, by kind (bad: answered bad-action, bad-request, \
             err,invalid or an HTTP 400 or 431).",
            |kind| self.requests.get(kind),
        );
        out.counter_by(
            "tcpnetlock_grants_total",
            "Locks granted, at once or after waiting in the queue.",
            |how| match how {
                Grant::Immediate => totals.granted_immediately,
                Grant::AfterWait => totals.granted_after_wait,
            },
        );
        out.counter(
            "tcpnetlock_shared_grants_total",
            "Locks granted in shared mode (shared:1), also counted in tcpnetlock_grants_total.",
            totals.granted_shared,
        );
        out.counter_by(
            "tcpnetlock_refusals_total",
            "Lock requests refused at once: not-granted (held or waited for) or a max mismatch.",
            |why| match why {
                Refusal::NotGranted => totals.not_granted,
                Refusal::MaxMismatch => totals.max_mismatches,
            },
        );
        out.counter(
            "tcpnetlock_wait_timeouts_total",
            "Queued lock requests whose wait ran out (answered not-granted).",
            totals.wait_timeouts,
        );
        out.counter(
            "tcpnetlock_lease_expiries_total",
            "Locks revoked because the holder sent nothing for its ttl.",
            totals.lease_expiries,
        );
        out.counter_by(
            "tcpnetlock_releases_total",
            "Holders that let go: by release, or by their connection ending.",
            |how| self.releases.get(how),
        );
        out.counter_by(
            "tcpnetlock_refused_connections_total",
            "Connections refused because a limit was reached.",
            |why| self.refused_connections.get(why),
        );
        out.counter(
            "tcpnetlock_log_lines_dropped_total",
            "Log lines dropped because the log destination did not keep up.",
            totals.log_lines_dropped,
        );
        out.histogram(
            "tcpnetlock_wait_seconds",
            "Time in the queue of lock requests granted after waiting (immediate grants are not \
             observed).",
            &self.wait,
        );
        out.histogram(
            "tcpnetlock_hold_seconds",
            "Time from grant to release, disconnect or lease expiry.",
            &self.hold,
        );
        for (name, help, value) in [
            (
                "tcpnetlock_locks_held",
                "Lock names held now.",
                gauges.locks_held,
            ),
            (
                "tcpnetlock_holders",
                "Connections holding a lock now.",
                gauges.holders,
            ),
            (
                "tcpnetlock_waiters",
                "Connections waiting for a lock now.",
                gauges.waiters,
            ),
            (
                "tcpnetlock_connections",
                "Client connections open now.",
                gauges.connections,
            ),
            (
                "tcpnetlock_threads",
                "Worker threads alive.",
                gauges.threads,
            ),
            (
                "tcpnetlock_threads_idle",
                "Worker threads waiting for work.",
                gauges.threads_idle,
            ),
        ] {
            out.gauge(name, help, &value.to_string());
        }
        let started = self
            .started
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        // The process_* help texts are the Go client library's, word for word: a Go program that
        // gathers these families together with its own (node_exporter's textfile collector, a
        // federating exporter) refuses one family with two help texts.
        out.gauge(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            &decimal_seconds(started.as_secs(), started.subsec_micros() as u64, 6),
        );
        let process_gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                process.resident_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                process.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                process.max_fds,
            ),
        ];
        for (name, help, value) in process_gauges {
            // Not readable (no /proc): left out rather than reported as 0.
            if let Some(v) = value {
                out.gauge(name, help, &v.to_string());
            }
        }
        out.0
    }
}

/// The exposition format, written line by line.
struct Text(String);

impl Text {
    fn help_type(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.0, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: &str) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape_label_value(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.help_type(name, help, "counter");
        self.sample(name, &[], &value.to_string());
    }

    /// A counter with one label: a sample for each of its values, `count` of each.
    fn counter_by<L: LabelSet>(&mut self, name: &str, help: &str, count: impl Fn(L) -> u64) {
        self.help_type(name, help, "counter");
        for &value in L::ALL {
            let text = L::VALUES[value.index()];
            self.sample(name, &[(L::KEY, text)], &count(value).to_string());
        }
    }

    fn gauge(&mut self, name: &str, help: &str, value: &str) {
        self.help_type(name, help, "gauge");
        self.sample(name, &[], value);
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.help_type(name, help, "histogram");
        let (cumulative, sum_micros) = h.snapshot();
        let bucket = format!("{name}_bucket");
        for (bound, count) in BUCKETS_NANOS.iter().zip(cumulative.iter()) {
            let le = decimal_seconds(bound / 1_000_000_000, bound % 1_000_000_000, 9);
            self.sample(&bucket, &[("le", &le)], &count.to_string());
        }
        let count = cumulative[BUCKETS_NANOS.len()];
        self.sample(&bucket, &[("le", "+Inf")], &count.to_string());
        let sum = decimal_seconds(sum_micros / 1_000_000, sum_micros % 1_000_000, 6);
        self.sample(&format!("{name}_sum"), &[], &sum);
        self.sample(&format!("{name}_count"), &[], &count.to_string());
    }
}

/// `secs.frac` exactly, `frac` having `digits` decimal digits, trailing zeros dropped: `0.00025`,
/// `3600`. Integers in, so bucket bounds print as written, never as `0.00025000000000000006`.
fn decimal_seconds(secs: u64, frac: u64, digits: usize) -> String {
    if frac == 0 {
        return secs.to_string();
    }
    let frac = format!("{frac:0digits$}");
    format!("{secs}.{}", frac.trim_end_matches('0'))
}

/// `# HELP` text: a backslash and a line feed are the only characters escaped (format 0.0.4).
fn escape_help(text: &str) -> String {
    text.replace('\\', r"\\").replace('\n', r"\n")
}

/// A label value: backslash, double quote and line feed are escaped (format 0.0.4).
fn escape_label_value(text: &str) -> String {
    text.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// The `process_*` metrics the Prometheus client libraries export, those cheap to read from
/// `/proc/self`. None where it cannot be read.
#[derive(Debug, Default)]
struct Process {
    resident_bytes: Option<u64>,
    open_fds: Option<u64>,
    max_fds: Option<u64>,
}

impl Process {
    fn read() -> Process {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        Process {
            resident_bytes: vm_rss_bytes(&status),
            // read_dir's own descriptor is in the listing: not one of the server's.
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| (d.count() as u64).saturating_sub(1)),
            max_fds: max_open_files(&limits),
        }
    }
}

/// `VmRSS:  4180 kB` in /proc/self/status, in bytes. Read there rather than from statm, whose
/// pages would need the page size (a libc call).
fn vm_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The soft limit in `Max open files  1024  524288  files` of /proc/self/limits; None when
/// unlimited.
fn max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    fn sample<'a>(text: &'a str, series: &str) -> Option<&'a str> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
    }

    #[test]
    fn bucket_bounds_rise_from_100us_to_an_hour_at_most_3x_apart() {
        assert_eq!(BUCKETS_NANOS[0], 100_000);
        assert_eq!(*BUCKETS_NANOS.last().unwrap(), 3_600 * 1_000_000_000);
        for pair in BUCKETS_NANOS.windows(2) {
            assert!(pair[0] < pair[1] && pair[1] <= 3 * pair[0], "{pair:?}");
        }
    }

    #[test]
    fn an_observation_counts_in_the_first_bucket_whose_bound_it_does_not_exceed() {
        let h = Histogram::default();
        for d in [
            Duration::ZERO,
            Duration::from_micros(100), // on the bound: le="0.0001"
            Duration::from_nanos(100_001),
            Duration::from_secs(3600),
            Duration::from_nanos(3_600_000_000_001),
            Duration::MAX,
        ] {
            h.observe(d);
        }
        let (cumulative, sum) = h.snapshot();
        assert_eq!(cumulative[0], 2, "0 and 100 µs are le=0.0001");
        assert_eq!(cumulative[1], 3, "100.001 µs is le=0.00025");
        assert_eq!(cumulative[BUCKETS_NANOS.len() - 2], 3);
        assert_eq!(cumulative[BUCKETS_NANOS.len() - 1], 4, "an hour is le=3600");
        assert_eq!(cumulative[BUCKETS_NANOS.len()], 6, "+Inf counts everything");
        // Duration::MAX saturates the sum rather than panicking; the sum wraps as counters do.
        let expected = 100u64
            .wrapping_add(100)
            .wrapping_add(3_600_000_000)
            .wrapping_add(3_600_000_000)
            .wrapping_add(u64::MAX);
        assert_eq!(sum, expected);
    }

    #[test]
    fn seconds_print_exactly_without_exponent_or_trailing_zeros() {
        let les: Vec<String> = BUCKETS_NANOS
            .iter()
            .map(|b| decimal_seconds(b / 1_000_000_000, b % 1_000_000_000, 9))
            .collect();
        assert_eq!(
            les,
            [
                "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05",
                "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "30", "60", "120", "300", "600",
                "1800", "3600"
            ]
        );
        assert_eq!(decimal_seconds(12, 345, 6), "12.000345");
        assert_eq!(decimal_seconds(0, 0, 6), "0");
    }

    #[test]
    fn help_and_label_values_are_escaped() {
        assert_eq!(escape_help("a\\b\nc\"d"), "a\\\\b\\nc\"d");
        assert_eq!(escape_label_value("a\\b\nc\"d"), "a\\\\b\\nc\\\"d");
        let mut t = Text(String::new());
        t.help_type("m", "two\nlines \\ here", "gauge");
        t.sample("m", &[("a", "x\"y"), ("b", "\\\n")], "1");
        assert_eq!(
            t.0,
            "# HELP m two\\nlines \\\\ here\n# TYPE m gauge\nm{a=\"x\\\"y\",b=\"\\\\\\n\"} 1\n"
        );
    }

    #[test]
    fn every_label_value_is_rendered_from_the_start_at_zero() {
        let text = ServerMetrics::new().render_with(
            &Totals::default(),
            &Gauges::default(),
            &Process::default(),
        );
        for kind in RequestKind::VALUES {
            assert_eq!(
                sample(
                    &text,
                    &format!("tcpnetlock_requests_total{{kind=\"{kind}\"}}")
                ),
                Some("0")
            );
        }
        for (name, set) in [
            ("tcpnetlock_grants_total", Grant::VALUES),
            ("tcpnetlock_refusals_total", Refusal::VALUES),
            ("tcpnetlock_releases_total", Release::VALUES),
            ("tcpnetlock_refused_connections_total", ConnRefusal::VALUES),
        ] {
            assert!(!set.is_empty());
            let rendered = text.lines().filter(|l| l.starts_with(&format!("{name}{{")));
            assert_eq!(rendered.count(), set.len(), "{name}");
        }
        assert_eq!(sample(&text, "tcpnetlock_wait_seconds_count"), Some("0"));
        assert_eq!(sample(&text, "tcpnetlock_wait_seconds_sum"), Some("0"));
    }

    #[test]
    fn events_are_rendered_in_their_metrics() {
        let m = ServerMetrics::new();
        m.request(RequestKind::Lock);
        m.request(RequestKind::Lock);
        m.request(RequestKind::Bad);
        m.granted_after_wait(Duration::from_millis(3));
        m.granted_after_wait(Duration::from_secs(400));
        m.lease_expired(Duration::from_secs(10));
        m.released(Release::Release, Duration::from_micros(50));
        m.released(Release::Disconnect, Duration::from_secs(7200));
        m.connection_refused(ConnRefusal::OutOfFds);
        let totals = Totals {
            accepted: 21,
            granted_immediately: 1,
            granted_after_wait: 2,
            granted_shared: 3,
            not_granted: 4,
            max_mismatches: 5,
            wait_timeouts: 6,
            lease_expiries: 7,
            log_lines_dropped: 8,
        };
        let gauges = Gauges {
            locks_held: 2,
            holders: 3,
            waiters: 4,
            connections: 9,
            threads: 11,
            threads_idle: 5,
        };
        let process = Process {
            resident_bytes: Some(4096),
            open_fds: Some(12),
            max_fds: None,
        };
        let text = m.render_with(&totals, &gauges, &process);
        let expect = [
            ("tcpnetlock_connections_accepted_total", "21"),
            ("tcpnetlock_requests_total{kind=\"lock\"}", "2"),
            ("tcpnetlock_requests_total{kind=\"ping\"}", "0"),
            ("tcpnetlock_requests_total{kind=\"bad\"}", "1"),
            ("tcpnetlock_grants_total{how=\"immediate\"}", "1"),
            ("tcpnetlock_grants_total{how=\"after_wait\"}", "2"),
            ("tcpnetlock_shared_grants_total", "3"),
            ("tcpnetlock_refusals_total{reason=\"not_granted\"}", "4"),
            ("tcpnetlock_refusals_total{reason=\"max_mismatch\"}", "5"),
            ("tcpnetlock_wait_timeouts_total", "6"),
            ("tcpnetlock_lease_expiries_total", "7"),
            ("tcpnetlock_log_lines_dropped_total", "8"),
            ("tcpnetlock_releases_total{how=\"release\"}", "1"),
            ("tcpnetlock_releases_total{how=\"disconnect\"}", "1"),
            (
                "tcpnetlock_refused_connections_total{reason=\"out_of_fds\"}",
                "1",
            ),
            (
                "tcpnetlock_refused_connections_total{reason=\"max_connections\"}",
                "0",
            ),
            ("tcpnetlock_wait_seconds_bucket{le=\"0.0025\"}", "0"),
            ("tcpnetlock_wait_seconds_bucket{le=\"0.005\"}", "1"),
            ("tcpnetlock_wait_seconds_bucket{le=\"300\"}", "1"),
            ("tcpnetlock_wait_seconds_bucket{le=\"600\"}", "2"),
            ("tcpnetlock_wait_seconds_bucket{le=\"+Inf\"}", "2"),
            ("tcpnetlock_wait_seconds_sum", "400.003"),
            ("tcpnetlock_wait_seconds_count", "2"),
            ("tcpnetlock_hold_seconds_bucket{le=\"0.0001\"}", "1"),
            ("tcpnetlock_hold_seconds_bucket{le=\"10\"}", "2"),
            ("tcpnetlock_hold_seconds_bucket{le=\"3600\"}", "2"),
            ("tcpnetlock_hold_seconds_bucket{le=\"+Inf\"}", "3"),
            ("tcpnetlock_hold_seconds_sum", "7210.00005"),
            ("tcpnetlock_hold_seconds_count", "3"),
            ("tcpnetlock_locks_held", "2"),
            ("tcpnetlock_holders", "3"),
            ("tcpnetlock_waiters", "4"),
            ("tcpnetlock_connections", "9"),
            ("tcpnetlock_threads", "11"),
            ("tcpnetlock_threads_idle", "5"),
            ("process_resident_memory_bytes", "4096"),
            ("process_open_fds", "12"),
        ];
        for (series, value) in expect {
            assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
        }
        assert_eq!(sample(&text, "process_max_fds"), None, "unknown: left out");
        let build = format!(
            "tcpnetlock_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(sample(&text, &build), Some("1"));
    }

    #[test]
    fn every_family_has_help_then_type_then_its_samples_only() {
        let m = ServerMetrics::new();
        m.granted_after_wait(Duration::from_secs(1));
        let text = m.render(&Totals::default(), &Gauges::default());
        assert!(text.ends_with('\n'));
        let mut family = String::new();
        let mut seen = std::collections::HashSet::new();
        let all = lines(&text);
        for (i, line) in all.iter().enumerate() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                family = rest.split(' ').next().unwrap().to_owned();
                assert!(seen.insert(family.clone()), "{family} twice");
                assert!(
                    all[i + 1].starts_with(&format!("# TYPE {family} ")),
                    "TYPE after HELP for {family}"
                );
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .filter(|b| *b == family)
                    .unwrap_or(name);
                assert_eq!(base, family, "{line} outside its family");
            }
        }
    }

    #[test]
    fn process_metrics_come_from_proc_self() {
        let p = Process::read();
        assert!(
            p.resident_bytes.is_some_and(|b| b > 1 << 20),
            "{:?}",
            p.resident_bytes
        );
        // stdin, stdout, stderr at least.
        assert!(p.open_fds.is_some_and(|n| n >= 3), "{:?}", p.open_fds);
        let text = ServerMetrics::new().render(&Totals::default(), &Gauges::default());
        assert!(sample(&text, "process_resident_memory_bytes").is_some());
        let start: f64 = sample(&text, "process_start_time_seconds")
            .unwrap()
            .parse()
            .unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(now - start >= 0.0 && now - start < 60.0, "{start} vs {now}");
    }

    #[test]
    fn proc_text_is_parsed() {
        assert_eq!(
            vm_rss_bytes("Name:\tx\nVmRSS:\t    4180 kB\nVmData: 1 kB\n"),
            Some(4180 * 1024)
        );
        assert_eq!(vm_rss_bytes("Name:\tx\n"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(max_open_files(limits), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files     \n";
        assert_eq!(max_open_files(unlimited), None);
    }

    #[test]
    fn observations_from_many_threads_are_all_counted() {
        let m = ServerMetrics::new();
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let m = &m;
                s.spawn(move || {
                    for i in 0..10_000u64 {
                        m.granted_after_wait(Duration::from_micros(t * 1000 + i % 7));
                        m.request(RequestKind::Lock);
                    }
                });
            }
        });
        let text = m.render(&Totals::default(), &Gauges::default());
        assert_eq!(
            sample(&text, "tcpnetlock_wait_seconds_count"),
            Some("80000")
        );
        assert_eq!(
            sample(&text, "tcpnetlock_requests_total{kind=\"lock\"}"),
            Some("80000")
        );
        // Sum of t*1000 + i%7 µs over every thread and iteration.
        let per_thread_rest: u64 = (0..10_000u64).map(|i| i % 7).sum();
        let total: u64 = (0..8u64).map(|t| t * 1000 * 10_000 + per_thread_rest).sum();
        let expected = decimal_seconds(total / 1_000_000, total % 1_000_000, 6);
        assert_eq!(
            sample(&text, "tcpnetlock_wait_seconds_sum"),
            Some(expected.as_str())
        );
    }
}
