//! A blocking etcd v3 client over etcd's JSON gateway, for the cluster mode (issue 13).
//!
//! Why the gateway: etcd documents it for clients that do not speak gRPC, it is served on every
//! member's client URL (`/v3/...`, etcd 3.4 and newer), and plain HTTP/1.1 + JSON lets the server
//! stay a program of threads and blocking sockets: no async runtime, no protobuf compiler. The
//! HTTP is `ureq`'s, the TLS rustls with the ring provider (static-friendly, no system library;
//! built for size, see Cargo.toml).
//!
//! What this layer promises its caller, the lock server:
//! - Every call takes a deadline (an `Instant`) and returns by it, give or take a scheduling
//!   delay: a member that is frozen or cut off cannot hold a caller past it.
//! - Endpoints fail over: a call that fails on one member for a reason that leaves etcd
//!   untouched (connection refused, no leader, a read that timed out) moves on to the next, in a
//!   loop, until the deadline.
//! - A write is never sent twice. If its answer is lost it may have been applied, and the call
//!   says [`EtcdError::OutcomeUnknown`]; the caller decides (typically: read its own key).
//! - Watches survive members: the stream is re-created elsewhere from the next revision.
//!
//! The module depends on std and its own crates only (ureq, serde, serde_json, base64), so it can
//! be mounted wherever the server ends up.

mod error;
mod transport;
mod types;
mod watch;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use error::{EndpointFailure, EtcdError};
pub use types::{
    Compare, CompareOp, DeleteRequest, DeleteResponse, Event, EventKind, KeyValue, Lease, Member,
    Op, OpResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, ResponseHeader,
    SortOrder, SortTarget, Status, Txn, TxnResponse, WatchRequest, prefix_end,
};
pub use watch::{EtcdWatch, WatchMessage};

use transport::{Credentials, Resend, Transport};
use types::{
    Empty, LeaseAnswer, LeaseGrantRequest, LeaseIdRequest, LeaseKeepAliveFrame, MemberListResponse,
};

/// How to reach etcd; the names follow etcdctl's flags.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// Client URLs: `http://host:port` or `https://host:port` (`host:port` means http).
    pub endpoints: Vec<String>,
    /// CA certificates (PEM) that sign the members' certificates (`--cacert`). Without it,
    /// https endpoints are checked against the system's CA bundle, as etcdctl does.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for members that require one (`--cert`); needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1) (`--key`).
    pub key_file: Option<PathBuf>,
    /// etcd user and password (`--user`), when etcd's auth is enabled.
    pub user: Option<String>,
    pub password: Option<String>,
    /// Longest wait for one TCP (and TLS) connection before trying the next endpoint.
    pub connect_timeout: Duration,
    /// A watch stream silent this long is re-created (from the next revision): how long a
    /// watch can sit on a frozen member before it moves.
    pub watch_idle: Duration,
}

impl EtcdConfig {
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> EtcdConfig {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            user: None,
            password: None,
            connect_timeout: Duration::from_secs(1),
            watch_idle: Duration::from_secs(10),
        }
    }
}

/// A handle on an etcd cluster. Cheap to clone; every clone shares one connection pool, one
/// auth token and one idea of which endpoint answers.
#[derive(Clone)]
pub struct EtcdClient {
    transport: Arc<Transport>,
    watch_idle: Duration,
}

impl EtcdClient {
    /// Checks the configuration and loads the certificates; does not connect.
    pub fn new(config: EtcdConfig) -> Result<EtcdClient, EtcdError> {
        if config.endpoints.is_empty() {
            return Err(EtcdError::Config("no endpoint given".into()));
        }
        let endpoints = config
            .endpoints
            .iter()
            .map(|e| normalize_endpoint(e))
            .collect::<Result<Vec<_>, _>>()?;
        let credentials = match (&config.user, &config.password) {
            (None, None) => None,
            (Some(user), Some(password)) => Some(Credentials {
                user: user.clone(),
                password: password.clone(),
            }),
            (Some(_), None) => return Err(EtcdError::Config("a user needs a password".into())),
            (None, Some(_)) => return Err(EtcdError::Config("a password needs a user".into())),
        };
        let agent = agent(&config, &endpoints)?;
        Ok(EtcdClient {
            transport: Arc::new(Transport::new(
                endpoints,
                agent,
                config.connect_timeout,
                credentials,
            )),
            watch_idle: config.watch_idle,
        })
    }

    /// The endpoints as used (normalized: scheme, no trailing slash).
    pub fn endpoints(&self) -> &[String] {
        &self.transport.endpoints
    }

    fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        request: &Req,
        resend: Resend,
        deadline: Instant,
    ) -> Result<Resp, EtcdError> {
        let body = serde_json::to_vec(request).expect("serializing a request cannot fail");
        let bytes = self.transport.call(path, &body, resend, deadline)?;
        self.parse(path, &bytes)
    }

    fn parse<Resp: DeserializeOwned>(&self, path: &str, bytes: &[u8]) -> Result<Resp, EtcdError> {
        serde_json::from_slice(bytes).map_err(|e| EtcdError::Protocol {
            endpoint: self.transport.endpoints[self.transport.preferred()].clone(),
            detail: format!("{path}: {e}"),
        })
    }

    /// Grants a lease of `ttl_secs` seconds. Sent again after a lost answer: a lease granted
    /// twice leaves one unused, which holds no key and expires on its own.
    pub fn lease_grant(&self, ttl_secs: i64, deadline: Instant) -> Result<Lease, EtcdError> {
        let answer: LeaseAnswer = self.call(
            "/v3/lease/grant",
            &LeaseGrantRequest { ttl: ttl_secs },
            Resend::Safe,
            deadline,
        )?;
        if !answer.error.is_empty() {
            return Err(EtcdError::Etcd {
                endpoint: self.transport.endpoints[self.transport.preferred()].clone(),
                code: 0,
                message: answer.error,
            });
        }
        Ok(Lease {
            id: answer.id,
            ttl_secs: answer.ttl,
            revision: answer.header.revision,
        })
    }

    /// Renews a lease to its full TTL and returns that TTL. A lease that no longer exists is
    /// [`EtcdError::LeaseNotFound`]. The lease is sure to live until the TTL has passed from
    /// the moment this call was *sent* (etcd renews on receipt), never longer than that is
    /// known: measure from the send time.
    pub fn lease_keep_alive(&self, id: i64, deadline: Instant) -> Result<i64, EtcdError> {
        let body = serde_json::to_vec(&LeaseIdRequest { id }).expect("serializing an id");
        let bytes = self
            .transport
            .call("/v3/lease/keepalive", &body, Resend::Safe, deadline)?;
        // A stream endpoint: the first frame is the answer to our one request.
        let frame = serde_json::Deserializer::from_slice(&bytes)
            .into_iter::<LeaseKeepAliveFrame>()
            .next();
        let answer = match frame {
            Some(Ok(LeaseKeepAliveFrame {
                result: Some(answer),
            })) => answer,
            other => {
                let detail = match other {
                    Some(Err(e)) => e.to_string(),
                    _ => "no result".into(),
                };
                return Err(EtcdError::Protocol {
                    endpoint: self.transport.endpoints[self.transport.preferred()].clone(),
                    detail: format!("/v3/lease/keepalive: {detail}"),
                });
            }
        };
        if answer.ttl <= 0 {
            return Err(EtcdError::LeaseNotFound { id });
        }
        Ok(answer.ttl)
    }

    /// Revokes a lease: every key attached to it is deleted, in one revision.
    pub fn lease_revoke(&self, id: i64, deadline: Instant) -> Result<(), EtcdError> {
        let result: Result<serde_json::Value, _> = self.call(
            "/v3/lease/revoke",
            &LeaseIdRequest { id },
            Resend::Safe,
            deadline,
        );
        match result {
            Ok(_) => Ok(()),
            Err(EtcdError::Etcd { message, .. }) if message.contains("lease not found") => {
                Err(EtcdError::LeaseNotFound { id })
            }
            Err(e) => Err(e),
        }
    }

    pub fn range(
        &self,
        request: &RangeRequest,
        deadline: Instant,
    ) -> Result<RangeResponse, EtcdError> {
        self.call("/v3/kv/range", request, Resend::Safe, deadline)
    }

    /// An unconditional put. Never sent twice: a lost answer is [`EtcdError::OutcomeUnknown`].
    pub fn put(&self, request: &PutRequest, deadline: Instant) -> Result<PutResponse, EtcdError> {
        self.call("/v3/kv/put", request, Resend::Never, deadline)
    }

    /// A transaction. One that writes is never sent twice: a lost answer is
    /// [`EtcdError::OutcomeUnknown`]. One that only reads fails over like a range.
    pub fn txn(&self, txn: &Txn, deadline: Instant) -> Result<TxnResponse, EtcdError> {
        let resend = if txn.writes() {
            Resend::Never
        } else {
            Resend::Safe
        };
        self.call("/v3/kv/txn", txn, resend, deadline)
    }

    /// Deletes a key or range. Sent again after a lost answer, since deleting twice leaves the
    /// same store: then `deleted` counts only what the last attempt deleted.
    pub fn delete(
        &self,
        request: &DeleteRequest,
        deadline: Instant,
    ) -> Result<DeleteResponse, EtcdError> {
        self.call("/v3/kv/deleterange", request, Resend::Safe, deadline)
    }

    /// Watches a key or prefix. Returns once etcd has created the watch (or fails by the
    /// deadline); `on` then runs on the watch's own thread for every message, in order.
    pub fn watch<F>(
        &self,
        request: WatchRequest,
        deadline: Instant,
        on: F,
    ) -> Result<EtcdWatch, EtcdError>
    where
        F: FnMut(WatchMessage) + Send + 'static,
    {
        watch::start(
            self.transport.clone(),
            request,
            self.watch_idle,
            deadline,
            on,
        )
    }

    pub fn member_list(&self, deadline: Instant) -> Result<Vec<Member>, EtcdError> {
        let answer: MemberListResponse =
            self.call("/v3/cluster/member/list", &Empty {}, Resend::Safe, deadline)?;
        Ok(answer.members)
    }

    /// The status of the member behind `endpoints()[index]`, from that member alone: its id,
    /// the leader it follows (0 when it has none), its raft term and index.
    pub fn status(&self, index: usize, deadline: Instant) -> Result<Status, EtcdError> {
        if index >= self.transport.endpoints.len() {
            return Err(EtcdError::Config(format!("no endpoint number {index}")));
        }
        let body = serde_json::to_vec(&Empty {}).expect("serializing {}");
        let bytes = self
            .transport
            .call_one(index, "/v3/maintenance/status", &body, deadline)?;
        self.parse("/v3/maintenance/status", &bytes)
    }
}

/// `host:port` → `http://host:port`; checks the scheme and that nothing but a host and port
/// is given (the gateway's paths are appended to it).
fn normalize_endpoint(raw: &str) -> Result<String, EtcdError> {
    let trimmed = raw.trim().trim_end_matches('/');
    let url = if trimmed.contains("://") {
        trimmed.to_owned()
    } else {
        format!("http://{trimmed}")
    };
    let bad = |why: &str| {
        EtcdError::Config(format!(
            "endpoint {raw:?}: {why} (expected http://HOST:PORT or https://HOST:PORT)"
        ))
    };
    let uri: ureq::http::Uri = url.parse().map_err(|e| bad(&format!("{e}")))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(bad("the scheme must be http or https")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("a path is not allowed"));
    }
    Ok(url)
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>, EtcdError> {
    fs::read(path)
        .map_err(|e| EtcdError::Config(format!("cannot read the {what} {}: {e}", path.display())))
}

fn certificates(
    path: &Path,
    what: &str,
) -> Result<Vec<ureq::tls::Certificate<'static>>, EtcdError> {
    let pem = read_pem(path, what)?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(ureq::tls::PemItem::Certificate(cert)) => certs.push(cert),
            Ok(_) => {}
            Err(e) => {
                return Err(EtcdError::Config(format!(
                    "the {what} {}: {e}",
                    path.display()
                )));
            }
        }
    }
    if certs.is_empty() {
        return Err(EtcdError::Config(format!(
            "the {what} {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// The system's CA bundle (as etcdctl uses without `--cacert`): SSL_CERT_FILE / SSL_CERT_DIR, or
/// the distribution's usual paths. Read when the client is made, so a missing bundle is a
/// configuration error at start, not a TLS failure on every call.
fn system_roots() -> Result<Vec<ureq::tls::Certificate<'static>>, EtcdError> {
    let found = rustls_native_certs::load_native_certs();
    if found.certs.is_empty() {
        let why = found
            .errors
            .first()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        return Err(EtcdError::Config(format!(
            "https endpoint and no CA file, and no system CA certificates found{why} (give the \
             CA that signed the etcd members' certificates)"
        )));
    }
    Ok(found
        .certs
        .iter()
        .map(|der| ureq::tls::Certificate::from_der(der).to_owned())
        .collect())
}

fn agent(config: &EtcdConfig, endpoints: &[String]) -> Result<ureq::Agent, EtcdError> {
    use ureq::tls::{ClientCert, PrivateKey, RootCerts, TlsConfig};
    // ureq takes rustls's process-wide provider; ring is the one compiled in. An error only
    // says a provider is installed already (a second client), which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut tls = TlsConfig::builder();
    if let Some(ca) = &config.ca_file {
        tls = tls.root_certs(RootCerts::from(certificates(ca, "CA file")?));
    } else if endpoints.iter().any(|e| e.starts_with("https://")) {
        tls = tls.root_certs(RootCerts::from(system_roots()?));
    } else {
        // Plain http: no certificate is ever checked, but ureq insists on a root store.
        tls = tls.root_certs(RootCerts::from(Vec::new()));
    }
    match (&config.cert_file, &config.key_file) {
        (None, None) => {}
        (Some(cert), Some(key)) => {
            let chain = certificates(cert, "client certificate")?;
            let pem = read_pem(key, "client key")?;
            let key = PrivateKey::from_pem(&pem)
                .map_err(|e| EtcdError::Config(format!("the client key {}: {e}", key.display())))?;
            tls = tls.client_cert(Some(ClientCert::new_with_certs(&chain, key)));
        }
        (Some(_), None) => {
            return Err(EtcdError::Config(
                "a client certificate needs its key".into(),
            ));
        }
        (None, Some(_)) => {
            return Err(EtcdError::Config(
                "a client key needs its certificate".into(),
            ));
        }
    }
    // A lock server sends from many threads at once; idle connections are kept for each so
    // a busy moment does not pay a TCP (and TLS) handshake per request.
    let per_host = 64;
    Ok(ureq::Agent::config_builder()
        .tls_config(tls.build())
        .http_status_as_error(false)
        // etcd is reached directly: an HTTP proxy from the environment would sit between
        // the server and its lock store, and break the watch streams.
        .proxy(None)
        .max_idle_connections(per_host * endpoints.len())
        .max_idle_connections_per_host(per_host)
        .user_agent(concat!("tcpnetlock/", env!("CARGO_PKG_VERSION")))
        .build()
        .into())
}
