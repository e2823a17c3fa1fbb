//! HTTP to etcd's JSON gateway: one POST to one endpoint, and the failover loop over all of them.
//!
//! The loop's one hard rule: a request that writes is sent to at most one member per call once it
//! may have left this process. If its answer is lost, the write may have been applied (a member
//! that was frozen or cut off can still apply it later), so the call ends with
//! [`EtcdError::OutcomeUnknown`] and the caller decides. Reads, lease renewals and failures that
//! happen before anything was sent move on to the next endpoint until the deadline.
//!
//! Every request but a member's status carries `Grpc-Metadata-hasleader: true`, the gateway spelling of the gRPC
//! metadata etcd's own client sends as "require leader": a member that has lost its leader
//! answers "no leader" at once (and ends watches) instead of holding the request until its own
//! timeout. Such a request was never proposed, so it is safe to send elsewhere.

use std::io::ErrorKind;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::error::{EndpointFailure, EtcdError};
use super::types::{AuthenticateRequest, AuthenticateResponse, ErrorBody};

/// Answers larger than this are refused: a range over a huge key space should page with limit.
const MAX_ANSWER_BYTES: u64 = 64 << 20;
/// Pause after every endpoint failed once, so a down cluster is not polled in a busy loop.
const ROUND_PAUSE: Duration = Duration::from_millis(50);
/// The attempt's budget is a hair longer than its connect timeout, so that a deadline reached
/// while connecting is reported as a connect timeout (nothing sent) and not as ureq's global
/// timeout, which cannot say whether the request had left.
const GRACE: Duration = Duration::from_millis(20);
/// A retry-safe call splits its remaining time among the endpoints it has yet to try, so a
/// frozen member cannot eat the whole deadline; but no attempt gets less than this.
const MIN_ATTEMPT: Duration = Duration::from_millis(250);

/// How an endpoint last failed within one call, to choose the error when time runs out.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Failed {
    NotSent,
    Lost,
    NoLeader,
}

/// Whether a request may be sent again after its answer was lost.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Resend {
    /// Reads, renewals, deletes by key: sending twice has the effect of sending once.
    Safe,
    /// Writes whose second application differs from the first (a guarded put that would now
    /// find its own key): never sent twice.
    Never,
}

/// How one attempt on one endpoint ended.
pub(super) enum Attempt<T> {
    Done(T),
    /// Failed before the request could reach etcd (connect, DNS, TLS handshake).
    NotSent(String),
    /// Failed after the request may have reached etcd, with no answer.
    Lost(String),
    /// etcd answered "no leader" before proposing anything.
    NoLeader(String),
    /// etcd refused the auth token: it expired or the member restarted.
    TokenRefused,
    /// A final answer: no other endpoint would answer differently.
    Fail(EtcdError),
}

pub(super) struct Credentials {
    pub user: String,
    pub password: String,
}

/// Endpoints, the HTTP agent, and the auth token, shared by every call and watch of a client.
pub(super) struct Transport {
    pub endpoints: Vec<String>,
    pub agent: ureq::Agent,
    pub connect_timeout: Duration,
    /// The endpoint that answered last; calls start there, so a dead member costs one failover,
    /// not one per call.
    preferred: AtomicUsize,
    credentials: Option<Credentials>,
    token: Mutex<Option<String>>,
}

impl Transport {
    pub fn new(
        endpoints: Vec<String>,
        agent: ureq::Agent,
        connect_timeout: Duration,
        credentials: Option<Credentials>,
    ) -> Transport {
        Transport {
            endpoints,
            agent,
            connect_timeout,
            preferred: AtomicUsize::new(0),
            credentials,
            token: Mutex::new(None),
        }
    }

    pub fn preferred(&self) -> usize {
        self.preferred.load(Ordering::Relaxed) % self.endpoints.len()
    }

    /// POSTs `body` to `path` through the endpoints until one answers or the deadline passes,
    /// and returns the answer's bytes.
    pub fn call(
        &self,
        path: &str,
        body: &[u8],
        resend: Resend,
        deadline: Instant,
    ) -> Result<Vec<u8>, EtcdError> {
        self.failover(
            resend,
            deadline,
            true,
            |endpoint, attempt_deadline, token| {
                self.post(endpoint, path, body, attempt_deadline, token, true)
            },
        )
    }

    /// POSTs to one given endpoint only (a member's own status), with the auth token, and
    /// without "require leader": a member without a leader must still say so.
    pub fn call_one(
        &self,
        index: usize,
        path: &str,
        body: &[u8],
        deadline: Instant,
    ) -> Result<Vec<u8>, EtcdError> {
        let endpoint = &self.endpoints[index];
        let mut refreshed = false;
        loop {
            let token = self.token(deadline)?;
            let failure = |reason| {
                vec![EndpointFailure {
                    endpoint: endpoint.clone(),
                    reason,
                }]
            };
            return match self.post(endpoint, path, body, deadline, token.as_deref(), false) {
                Attempt::Done(bytes) => Ok(bytes),
                Attempt::NotSent(reason) => Err(EtcdError::Unreachable {
                    failures: failure(reason),
                }),
                Attempt::Lost(reason) => Err(EtcdError::Timeout {
                    failures: failure(reason),
                }),
                Attempt::NoLeader(reason) => Err(EtcdError::NoLeader {
                    failures: failure(reason),
                }),
                Attempt::TokenRefused if !refreshed => {
                    refreshed = true;
                    self.forget_token(token.as_deref());
                    continue;
                }
                Attempt::TokenRefused => Err(token_refused(endpoint)),
                Attempt::Fail(e) => Err(e),
            };
        }
    }

    /// The failover loop, for any kind of attempt (a unary POST, or opening a watch stream).
    /// `attempt` gets the endpoint, its own deadline and the auth token.
    pub fn failover<T>(
        &self,
        resend: Resend,
        deadline: Instant,
        authenticated: bool,
        mut attempt: impl FnMut(&str, Instant, Option<&str>) -> Attempt<T>,
    ) -> Result<T, EtcdError> {
        let n = self.endpoints.len();
        let mut last: Vec<Option<(Failed, String)>> = vec![None; n];
        let mut refreshed = false;
        let mut next = self.preferred();
        loop {
            for tried in 0..n {
                let now = Instant::now();
                if now >= deadline {
                    return Err(give_up(&self.endpoints, &last));
                }
                let index = (next + tried) % n;
                let endpoint = &self.endpoints[index];
                let attempt_deadline = match resend {
                    Resend::Safe => {
                        let share = (deadline - now) / (n - tried) as u32;
                        (now + share.max(MIN_ATTEMPT)).min(deadline)
                    }
                    Resend::Never => deadline,
                };
                let token = if authenticated {
                    self.token(deadline)?
                } else {
                    None
                };
                match attempt(endpoint, attempt_deadline, token.as_deref()) {
                    Attempt::Done(value) => {
                        self.preferred.store(index, Ordering::Relaxed);
                        return Ok(value);
                    }
                    Attempt::NotSent(reason) => {
                        record(&mut last[index], Failed::NotSent, reason, deadline)
                    }
                    Attempt::Lost(cause) if resend == Resend::Never => {
                        return Err(EtcdError::OutcomeUnknown {
                            endpoint: endpoint.clone(),
                            cause,
                        });
                    }
                    Attempt::Lost(reason) => {
                        record(&mut last[index], Failed::Lost, reason, deadline)
                    }
                    Attempt::NoLeader(reason) => last[index] = Some((Failed::NoLeader, reason)),
                    Attempt::TokenRefused if !refreshed => {
                        // Refused before anything was proposed: safe to send again, once, with a
                        // fresh token. Restart the round at the same endpoint.
                        refreshed = true;
                        self.forget_token(token.as_deref());
                        next = index;
                        break;
                    }
                    Attempt::TokenRefused => return Err(token_refused(endpoint)),
                    Attempt::Fail(e) => return Err(e),
                }
                if tried + 1 == n {
                    next = index + 1;
                    let pause = deadline.saturating_duration_since(Instant::now());
                    thread::sleep(pause.min(ROUND_PAUSE));
                }
            }
        }
    }

    /// One POST to one endpoint, its answer read in full.
    fn post(
        &self,
        endpoint: &str,
        path: &str,
        body: &[u8],
        deadline: Instant,
        token: Option<&str>,
        require_leader: bool,
    ) -> Attempt<Vec<u8>> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Attempt::NotSent("deadline passed before sending".into());
        }
        let mut request = self
            .agent
            .post(format!("{endpoint}{path}"))
            .header("Content-Type", "application/json");
        if require_leader {
            request = request.header("Grpc-Metadata-hasleader", "true");
        }
        if let Some(token) = token {
            request = request.header("Authorization", token);
        }
        let request = request
            .config()
            .timeout_global(Some(remaining + GRACE))
            .timeout_resolve(Some(self.connect_timeout.min(remaining)))
            .timeout_connect(Some(self.connect_timeout.min(remaining)))
            .build();
        let response = match request.send(body) {
            Ok(response) => response,
            Err(e) => return classify_transport(e),
        };
        let status = response.status().as_u16();
        let bytes = match response
            .into_body()
            .into_with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_to_vec()
        {
            Ok(bytes) => bytes,
            Err(ureq::Error::BodyExceedsLimit(limit)) => {
                return Attempt::Fail(EtcdError::Protocol {
                    endpoint: endpoint.into(),
                    detail: format!("answer larger than {limit} bytes (use a limit)"),
                });
            }
            Err(e) => return Attempt::Lost(format!("reading the answer: {}", describe(&e))),
        };
        if status == 200 {
            Attempt::Done(bytes)
        } else {
            classify_answer(endpoint, status, &bytes)
        }
    }

    /// The token to send, authenticating first when there is none yet.
    fn token(&self, deadline: Instant) -> Result<Option<String>, EtcdError> {
        let Some(credentials) = &self.credentials else {
            return Ok(None);
        };
        if let Some(token) = self.token.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(Some(token));
        }
        let body = serde_json::to_vec(&AuthenticateRequest {
            name: &credentials.user,
            password: &credentials.password,
        })
        .expect("serializing strings cannot fail");
        // Authenticate is a raft write, but a second one only makes a second token.
        let bytes = self.failover(Resend::Safe, deadline, false, |endpoint, d, _| {
            match self.post(endpoint, "/v3/auth/authenticate", &body, d, None, true) {
                Attempt::Fail(EtcdError::Etcd {
                    endpoint, message, ..
                }) => Attempt::Fail(EtcdError::Auth { endpoint, message }),
                other => other,
            }
        })?;
        let answer: AuthenticateResponse =
            serde_json::from_slice(&bytes).map_err(|e| EtcdError::Protocol {
                endpoint: self.endpoints[self.preferred()].clone(),
                detail: format!("authenticate answer: {e}"),
            })?;
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(answer.token.clone());
        Ok(Some(answer.token))
    }

    /// Drops the cached token if it is still the one etcd refused (another thread may have
    /// fetched a fresh one meanwhile).
    pub fn forget_token(&self, refused: Option<&str>) {
        let mut token = self.token.lock().unwrap_or_else(|e| e.into_inner());
        if token.as_deref() == refused {
            *token = None;
        }
    }
}

/// Keeps an endpoint's failure for the final error, unless it is only the call's deadline
/// cutting an attempt short and an earlier attempt there said something more useful.
fn record(slot: &mut Option<(Failed, String)>, kind: Failed, reason: String, deadline: Instant) {
    if slot.is_none() || Instant::now() < deadline {
        *slot = Some((kind, reason));
    }
}

fn token_refused(endpoint: &str) -> EtcdError {
    EtcdError::Auth {
        endpoint: endpoint.into(),
        message: "etcd refused a fresh auth token".into(),
    }
}

/// The error for a call that ran out of time: "no leader" if any member said so (the most
/// useful thing to tell), else unreachable if no request got out, else a timeout.
fn give_up(endpoints: &[String], last: &[Option<(Failed, String)>]) -> EtcdError {
    let failures: Vec<EndpointFailure> = endpoints
        .iter()
        .zip(last)
        .filter_map(|(endpoint, failure)| {
            failure.as_ref().map(|(_, reason)| EndpointFailure {
                endpoint: endpoint.clone(),
                reason: reason.clone(),
            })
        })
        .collect();
    let kinds = || last.iter().flatten().map(|(kind, _)| *kind);
    if kinds().any(|kind| kind == Failed::NoLeader) {
        EtcdError::NoLeader { failures }
    } else if !failures.is_empty() && kinds().all(|kind| kind == Failed::NotSent) {
        EtcdError::Unreachable { failures }
    } else {
        EtcdError::Timeout { failures }
    }
}

/// ureq's error as a short reason for a message.
pub(super) fn describe(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Io(io) => io.to_string(),
        ureq::Error::Timeout(t) => format!("timed out ({t})"),
        other => other.to_string(),
    }
}

/// Sorts a transport error by whether the request may have reached etcd. Only errors that can
/// happen before the first byte of the request is written count as "not sent"; anything else
/// (a reset, an early close, a timeout while waiting for the answer) may follow a request etcd
/// received, and is "lost".
pub(super) fn classify_transport<T>(e: ureq::Error) -> Attempt<T> {
    let reason = describe(&e);
    let before_sending = match &e {
        ureq::Error::HostNotFound | ureq::Error::ConnectionFailed => true,
        ureq::Error::Timeout(ureq::Timeout::Resolve | ureq::Timeout::Connect) => true,
        ureq::Error::Io(io) => {
            matches!(
                io.kind(),
                ErrorKind::ConnectionRefused
                    | ErrorKind::AddrNotAvailable
                    | ErrorKind::AddrInUse
                    | ErrorKind::HostUnreachable
                    | ErrorKind::NetworkUnreachable
                    | ErrorKind::PermissionDenied
                    // Only a write fails with EPIPE, and ureq writes only the request: the
                    // peer had closed before it was complete, so it cannot have been served.
                    | ErrorKind::BrokenPipe
            ) || io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(handshake_refused)
        }
        ureq::Error::Tls(_) | ureq::Error::Pem(_) => true,
        ureq::Error::Rustls(e) => handshake_refused(e),
        _ => false,
    };
    if before_sending {
        Attempt::NotSent(reason)
    } else {
        Attempt::Lost(reason)
    }
}

/// A TLS failure that proves the member never read our request: we refused its certificate
/// (checked before any request byte is written), or it refused the handshake with an alert a
/// server sends only then (with TLS 1.3 a refused client certificate is reported after the
/// client thinks the handshake is done, but the member drops the request unread).
fn handshake_refused(e: &rustls::Error) -> bool {
    use rustls::AlertDescription as A;
    match e {
        rustls::Error::InvalidCertificate(_)
        | rustls::Error::NoCertificatesPresented
        | rustls::Error::UnsupportedNameType
        | rustls::Error::PeerIncompatible(_)
        | rustls::Error::InappropriateHandshakeMessage { .. }
        | rustls::Error::HandshakeNotComplete => true,
        rustls::Error::AlertReceived(alert) => matches!(
            alert,
            A::HandshakeFailure
                | A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
                | A::AccessDenied
                | A::ProtocolVersion
                | A::InsufficientSecurity
                | A::CertificateRequired
        ),
        _ => false,
    }
}

/// Sorts an etcd error answer. gRPC codes 1 (cancelled), 2 (unknown), 4 (deadline exceeded),
/// 13 (internal) and 14 (unavailable) come from proposals that timed out or were cut short:
/// the write may still be committed, so they count as a lost answer. Other codes are etcd's
/// verdict on the request itself.
pub(super) fn classify_answer<T>(endpoint: &str, status: u16, bytes: &[u8]) -> Attempt<T> {
    let Ok(answer) = serde_json::from_slice::<ErrorBody>(bytes) else {
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
        let detail = format!("HTTP {status}: {}", text.trim());
        return if status >= 500 {
            Attempt::Lost(detail)
        } else {
            Attempt::Fail(EtcdError::Protocol {
                endpoint: endpoint.into(),
                detail,
            })
        };
    };
    let message = if answer.message.is_empty() {
        answer.error
    } else {
        answer.message
    };
    if message.contains("no leader") {
        return Attempt::NoLeader(message);
    }
    if message.contains("invalid auth token") {
        return Attempt::TokenRefused;
    }
    match answer.code {
        1 | 2 | 4 | 13 | 14 => Attempt::Lost(format!("{message} (code {})", answer.code)),
        16 => Attempt::Fail(EtcdError::Auth {
            endpoint: endpoint.into(),
            message,
        }),
        code => Attempt::Fail(EtcdError::Etcd {
            endpoint: endpoint.into(),
            code,
            message,
        }),
    }
}
