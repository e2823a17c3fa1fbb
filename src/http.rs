//! Just enough HTTP/1.x to answer `GET /metrics` on the lock port.
//!
//! A Prometheus scrape and `curl http://host:7654/metrics` then work with no second port, also
//! when systemd passes the socket. The line protocol and HTTP share the port by the first line
//! alone: exactly `GET /metrics HTTP/1.1` or `GET /metrics HTTP/1.0` (a `\r` before the `\n`
//! allowed) is HTTP; every other line, `GET /`, `HEAD /metrics` and `GET /metrics?x` included,
//! gets the v1 answer it got from tcpnetlock 0.1.8 (`bad-action`, or `bad-request`), so no 0.1.8
//! client can see a difference. The request line is all the dispatch the server needs: the rest
//! of the head is read only once the line is known to be HTTP.
//!
//! Pure: bytes in, bytes out. The caller reads lines, with its own limits and timeouts, and
//! writes the bytes this module returns. Self-contained (std only, nothing else from the crate),
//! so it can be mounted wherever the server lives.

use std::time::{SystemTime, UNIX_EPOCH};

/// Most bytes of header lines after the request line, line endings and the final blank line
/// counted. Prometheus sends about 400, curl about 80; 8 KiB is what common servers allow.
pub const MAX_HEAD: usize = 8 * 1024;
/// Most header lines after the request line.
pub const MAX_FIELDS: usize = 100;

/// The HTTP version of the request line; the response is HTTP/1.1 either way (the server's own
/// version, as RFC 9110 §6.2 asks), and the connection is closed after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// Whether a connection's first line (without its `\n`) is the metrics request line, and which
/// version. Exact bytes: method and version are case-sensitive in HTTP, the path is `/metrics`
/// with no query string (Prometheus sends none unless a scrape job sets `params:`, which mean
/// nothing here), one space between the parts.
pub fn metrics_request(line: &[u8]) -> Option<Version> {
    match line.strip_suffix(b"\r").unwrap_or(line) {
        b"GET /metrics HTTP/1.1" => Some(Version::Http11),
        b"GET /metrics HTTP/1.0" => Some(Version::Http10),
        _ => None,
    }
}

/// Why a request head was refused. Each is answered with [`error_response`], then the
/// connection is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// More than [`MAX_HEAD`] bytes or [`MAX_FIELDS`] lines of header fields.
    TooLarge,
    /// The head did not end (with a blank line) in time; the caller's timeout.
    TimedOut,
    /// A header line that is not `name: value`, or a field this endpoint refuses.
    Malformed(&'static str),
}

impl HttpError {
    pub fn status(&self) -> Status {
        match self {
            HttpError::TooLarge => Status::HEADERS_TOO_LARGE,
            HttpError::TimedOut => Status::REQUEST_TIMEOUT,
            HttpError::Malformed(_) => Status::BAD_REQUEST,
        }
    }

    /// The response body: one line a person reading curl's output can act on.
    pub fn message(&self) -> String {
        match self {
            HttpError::TooLarge => format!(
                "request header fields too large: at most {MAX_HEAD} bytes in {MAX_FIELDS} lines"
            ),
            HttpError::TimedOut => "the request head did not end with a blank line in time".into(),
            HttpError::Malformed(why) => format!("bad request: {why}"),
        }
    }
}

/// Checks the header lines after the metrics request line, one line at a time, as the caller
/// reads them. Nothing in them changes the answer; they are checked so that a request that is
/// not a well-formed HTTP/1.x GET without a body gets a 400 instead of metrics.
#[derive(Debug)]
pub struct Head {
    version: Version,
    bytes: usize,
    fields: usize,
    hosts: usize,
}

impl Head {
    pub fn new(version: Version) -> Head {
        Head {
            version,
            bytes: 0,
            fields: 0,
            hosts: 0,
        }
    }

    /// One line after the request line, without its `\n` (a `\r` before it is allowed: HTTP ends
    /// lines with CRLF, and RFC 9112 §2.2 lets a server accept a bare LF too). Ok(true) when it
    /// was the blank line that ends the head: answer then.
    pub fn line(&mut self, line: &[u8]) -> Result<bool, HttpError> {
        self.bytes += line.len() + 1;
        if self.bytes > MAX_HEAD {
            return Err(HttpError::TooLarge);
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if self.version == Version::Http11 && self.hosts == 0 {
                // RFC 9112 §3.2: a server must answer an HTTP/1.1 request without Host with 400.
                return Err(HttpError::Malformed(
                    "an HTTP/1.1 request needs a Host header",
                ));
            }
            return Ok(true);
        }
        self.fields += 1;
        if self.fields > MAX_FIELDS {
            return Err(HttpError::TooLarge);
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(HttpError::Malformed(
                "header line folded onto the previous one (obsolete, RFC 9112 section 5.2)",
            ));
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(HttpError::Malformed("header line without a colon"))?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.is_empty() || !name.iter().all(|&b| is_token_char(b)) {
            return Err(HttpError::Malformed(
                "header name empty or not an HTTP token (no space before the colon)",
            ));
        }
        // Field values: visible ASCII, space, tab, and bytes above 0x7f (RFC 9110 §5.5).
        if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(HttpError::Malformed("control character in a header value"));
        }
        let value = value.trim_ascii();
        if name.eq_ignore_ascii_case(b"host") {
            self.hosts += 1;
            if self.hosts > 1 {
                return Err(HttpError::Malformed("more than one Host header"));
            }
        }
        // Nothing reads a body here, and the connection closes after the response: a body would
        // be unread bytes, which make the close a reset that can destroy the response.
        if name.eq_ignore_ascii_case(b"transfer-encoding")
            || (name.eq_ignore_ascii_case(b"content-length") && value != b"0")
        {
            return Err(HttpError::Malformed("GET /metrics takes no request body"));
        }
        Ok(false)
    }
}

/// `tchar` of RFC 9110 §5.6.2.
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A response status: code and reason phrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub code: u16,
    pub reason: &'static str,
}

impl Status {
    pub const OK: Status = Status {
        code: 200,
        reason: "OK",
    };
    pub const BAD_REQUEST: Status = Status {
        code: 400,
        reason: "Bad Request",
    };
    pub const REQUEST_TIMEOUT: Status = Status {
        code: 408,
        reason: "Request Timeout",
    };
    pub const HEADERS_TOO_LARGE: Status = Status {
        code: 431,
        reason: "Request Header Fields Too Large",
    };
}

/// A whole response, head and body. `now` goes into the Date header (RFC 9110 §6.6.1: an
/// origin server with a clock sends one). `Connection: close`: one request per connection, as
/// the line protocol, and the body's end is also the connection's.
pub fn response(status: Status, content_type: &str, body: &[u8], now: SystemTime) -> Vec<u8> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nDate: {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        status.code,
        status.reason,
        http_date(now),
        body.len(),
    );
    let mut out = Vec::with_capacity(head.len() + body.len());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
    out
}

/// The response for a refused head: its status, and the reason as a line of text.
pub fn error_response(error: &HttpError, now: SystemTime) -> Vec<u8> {
    let body = format!("{}\n", error.message());
    response(
        error.status(),
        "text/plain; charset=utf-8",
        body.as_bytes(),
        now,
    )
}

/// IMF-fixdate (RFC 9110 §5.6.7): `Sun, 06 Nov 1994 08:49:37 GMT`. A clock before 1970 prints
/// as 1970.
pub fn http_date(t: SystemTime) -> String {
    // 1970-01-01 was a Thursday.
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[(days % 7) as usize],
        MONTHS[month as usize - 1],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01: counted in 400-year eras (146,097
/// days), each starting on a 1 March so that the leap day ends a year.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153; // month from March = 0
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn only_the_exact_metrics_request_line_is_http() {
        assert_eq!(
            metrics_request(b"GET /metrics HTTP/1.1\r"),
            Some(Version::Http11)
        );
        assert_eq!(
            metrics_request(b"GET /metrics HTTP/1.1"),
            Some(Version::Http11)
        );
        assert_eq!(
            metrics_request(b"GET /metrics HTTP/1.0\r"),
            Some(Version::Http10)
        );
        for line in NOT_METRICS {
            assert_eq!(metrics_request(line.as_bytes()), None, "{line:?}");
        }
    }

    /// Lines that must keep their v1 answer. tests/metrics.rs sends the same ones to the real
    /// server.
    const NOT_METRICS: &[&str] = &[
        "GET / HTTP/1.1\r",
        "GET /metrics/ HTTP/1.1\r",
        "GET /metrics?x=1 HTTP/1.1\r",
        "GET /Metrics HTTP/1.1\r",
        "HEAD /metrics HTTP/1.1\r",
        "POST /metrics HTTP/1.1\r",
        "get /metrics HTTP/1.1\r",
        "GET /metrics http/1.1\r",
        "GET /metrics HTTP/1.2\r",
        "GET /metrics HTTP/2.0\r",
        "GET /metrics\r",
        "GET  /metrics HTTP/1.1\r",
        " GET /metrics HTTP/1.1\r",
        "GET /metrics HTTP/1.1 \r",
        "GET /metrics HTTP/1.1\r\r",
        "GET http://localhost:7654/metrics HTTP/1.1\r",
        "GET /metrics HTTP/1.1,name:x",
        "",
    ];

    /// [`Head::line`] over a buffer holding what followed the request line. Ok(Some(n)): the head is
    /// complete and well-formed in the first `n` bytes; Ok(None): no blank line yet, read more.
    fn check_head(rest: &[u8], version: Version) -> Result<Option<usize>, HttpError> {
        let mut head = Head::new(version);
        let mut start = 0;
        while let Some(nl) = rest[start..].iter().position(|&b| b == b'\n') {
            let end = start + nl;
            if head.line(&rest[start..end])? {
                return Ok(Some(end + 1));
            }
            start = end + 1;
        }
        // The unterminated tail counts against the limit too, or a client could send it forever.
        if head.bytes + (rest.len() - start) > MAX_HEAD {
            return Err(HttpError::TooLarge);
        }
        Ok(None)
    }

    fn head(text: &str) -> Result<Option<usize>, HttpError> {
        check_head(text.as_bytes(), Version::Http11)
    }

    #[test]
    fn heads_from_prometheus_and_curl_are_accepted() {
        // What Prometheus 2.42 and curl 7.88 send after the request line.
        let prometheus = "Host: 127.0.0.1:7654\r\nUser-Agent: Prometheus/2.42.0\r\n\
            Accept: application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
            version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\n\
            Accept-Encoding: gzip\r\nX-Prometheus-Scrape-Timeout-Seconds: 10\r\n\r\n";
        assert_eq!(head(prometheus), Ok(Some(prometheus.len())));
        let curl = "Host: localhost:7654\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n";
        assert_eq!(head(curl), Ok(Some(curl.len())));
        // Bytes after the blank line are not part of the head.
        assert_eq!(head("Host: a\n\nrest"), Ok(Some(9)));
        // HTTP/1.0 needs no Host.
        assert_eq!(check_head(b"\r\n", Version::Http10), Ok(Some(2)));
        assert_eq!(head("Host: a\r\nContent-Length: 0\r\n\r\n"), Ok(Some(30)));
        assert_eq!(head("Host:\r\nX-Empty:\r\n\r\n"), Ok(Some(19)));
    }

    #[test]
    fn an_unfinished_head_asks_for_more_until_the_limit() {
        assert_eq!(head(""), Ok(None));
        assert_eq!(head("Host: a\r\nUser-Agent: x"), Ok(None));
        let long = format!("Host: a\r\nX-Long: {}", "a".repeat(MAX_HEAD));
        assert_eq!(head(&long), Err(HttpError::TooLarge));
        let many = "X: y\r\n".repeat(MAX_FIELDS + 1);
        assert_eq!(head(&many), Err(HttpError::TooLarge));
        let just = format!("Host: a\r\nX: {}\r\n\r\n", "b".repeat(MAX_HEAD - 16));
        assert_eq!(just.len(), MAX_HEAD);
        assert_eq!(head(&just), Ok(Some(MAX_HEAD)));
        let over = format!("Host: a\r\nX: {}\r\n\r\n", "b".repeat(MAX_HEAD - 15));
        assert_eq!(head(&over), Err(HttpError::TooLarge));
    }

    #[test]
    fn malformed_heads_are_refused_with_a_reason() {
        for (text, why) in [
            ("\r\n", "an HTTP/1.1 request needs a Host header"),
            ("Host: a\r\nHost: b\r\n\r\n", "more than one Host header"),
            ("Host: a\r\nno colon\r\n\r\n", "header line without a colon"),
            (
                "Host : a\r\n\r\n",
                "header name empty or not an HTTP token (no space before the colon)",
            ),
            (
                ": a\r\n\r\n",
                "header name empty or not an HTTP token (no space before the colon)",
            ),
            (
                "Host: a\r\nX: b\r\n c\r\n\r\n",
                "header line folded onto the previous one (obsolete, RFC 9112 section 5.2)",
            ),
            ("Host: a\0b\r\n\r\n", "control character in a header value"),
            ("Host: a\rb\r\n\r\n", "control character in a header value"),
            (
                "Host: a\r\nContent-Length: 5\r\n\r\n",
                "GET /metrics takes no request body",
            ),
            (
                "Host: a\r\nTransfer-Encoding: chunked\r\n\r\n",
                "GET /metrics takes no request body",
            ),
        ] {
            assert_eq!(head(text), Err(HttpError::Malformed(why)), "{text:?}");
        }
    }

    #[test]
    fn the_response_has_a_complete_http_head() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777);
        let r = response(
            Status::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            b"a 1\n",
            now,
        );
        assert_eq!(
            String::from_utf8(r).unwrap(),
            "HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n\
             Content-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: 4\r\n\
             Connection: close\r\n\r\na 1\n"
        );
        let e = error_response(&HttpError::Malformed("header line without a colon"), now);
        assert_eq!(
            String::from_utf8(e).unwrap(),
            "HTTP/1.1 400 Bad Request\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n\
             Content-Type: text/plain; charset=utf-8\r\nContent-Length: 41\r\n\
             Connection: close\r\n\r\nbad request: header line without a colon\n"
        );
        assert_eq!(HttpError::TooLarge.status().code, 431);
        assert_eq!(HttpError::TimedOut.status().code, 408);
    }

    #[test]
    fn dates_follow_the_gregorian_calendar() {
        let at = |s: u64| http_date(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(at(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(at(4_107_542_399), "Sun, 28 Feb 2100 23:59:59 GMT");
        assert_eq!(at(4_107_542_400), "Mon, 01 Mar 2100 00:00:00 GMT");
        assert_eq!(at(1_767_225_599), "Wed, 31 Dec 2025 23:59:59 GMT");
        assert_eq!(
            http_date(UNIX_EPOCH - Duration::from_secs(1)),
            "Thu, 01 Jan 1970 00:00:00 GMT"
        );
        // Every day of 400 years against a day-by-day count.
        let mut date = (1970u64, 1u64, 1u64);
        for days in 0..146_097u64 {
            assert_eq!(civil_from_days(days), date, "day {days}");
            let (y, m, d) = date;
            let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
            let len = [
                31,
                if leap { 29 } else { 28 },
                31,
                30,
                31,
                30,
                31,
                31,
                30,
                31,
                30,
                31,
            ];
            date = if d < len[m as usize - 1] {
                (y, m, d + 1)
            } else if m < 12 {
                (y, m + 1, 1)
            } else {
                (y + 1, 1, 1)
            };
        }
    }
}
