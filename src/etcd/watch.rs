//! A watch: one thread that reads etcd's `/v3/watch` stream and hands each change to a callback.
//!
//! The gateway turns the gRPC watch stream into one long HTTP answer with one JSON object per
//! batch. A blocking client cannot interrupt a read from another thread, so the stream has a
//! per-read idle limit: a stream silent for that long is re-created from the next revision
//! (which loses and repeats nothing, since revisions order every change), and that is also when
//! a cancelled watch notices it should stop. The same re-creation covers a member that dies, is
//! frozen, or loses its leader (which ends its watches under "require leader"): the watch moves
//! to another endpoint and goes on. Only two things end it for good: the history it needs was
//! compacted, or etcd cancels it for a reason of its own.

use std::io::BufReader;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::error::EtcdError;
use super::transport::{Attempt, Resend, Transport, classify_answer, classify_transport, describe};
use super::types::{Event, WatchCreate, WatchFrame, WatchRequest};

/// What a watch reports to its callback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchMessage {
    /// Changes, in revision order; `revision` is the store's revision when etcd sent them.
    Events { revision: i64, events: Vec<Event> },
    /// The stream broke (its member died, froze, lost its leader, or the stream was idle too
    /// long): changes are late until [`WatchMessage::Resumed`].
    Interrupted { endpoint: String, reason: String },
    /// The stream was re-created on `endpoint` from `start_revision`: nothing was lost.
    Resumed {
        endpoint: String,
        start_revision: i64,
    },
    /// The history needed to resume was compacted: changes were lost. The watch has ended; read
    /// the current state and watch again. Final.
    Compacted { compact_revision: i64 },
    /// etcd ended the watch for a reason of its own. Final.
    Canceled { reason: String },
}

/// A running watch. Dropping it (or [`EtcdWatch::cancel`]) stops the callbacks; the thread and
/// its connection end at the next frame or idle timeout.
pub struct EtcdWatch {
    stop: Arc<AtomicBool>,
    created_revision: i64,
}

impl EtcdWatch {
    /// The store's revision when the watch was created: every change after it is delivered
    /// (and, with a start revision, every change from that one on).
    pub fn created_revision(&self) -> i64 {
        self.created_revision
    }

    pub fn cancel(self) {}
}

impl Drop for EtcdWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

type Frames = serde_json::StreamDeserializer<
    'static,
    serde_json::de::IoRead<BufReader<ureq::BodyReader<'static>>>,
    WatchFrame,
>;

/// An open stream whose `created` frame has arrived.
struct Stream {
    endpoint: String,
    /// The auth token it was opened with, to drop if etcd later calls it invalid.
    token: Option<String>,
    frames: Frames,
    created_revision: i64,
}

pub(super) fn start<F>(
    transport: Arc<Transport>,
    request: WatchRequest,
    idle: Duration,
    deadline: Instant,
    on: F,
) -> Result<EtcdWatch, EtcdError>
where
    F: FnMut(WatchMessage) + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let (created_tx, created_rx) = mpsc::channel();
    let thread_stop = stop.clone();
    thread::Builder::new()
        .name("etcd-watch".into())
        .spawn(move || {
            let mut watch = Watcher {
                transport,
                request,
                idle,
                stop: thread_stop,
                on,
            };
            match watch.open(deadline) {
                Ok(stream) => {
                    let _ = created_tx.send(Ok(stream.created_revision));
                    watch.run(stream);
                }
                Err(e) => {
                    let _ = created_tx.send(Err(e));
                }
            }
        })
        .map_err(|e| EtcdError::Config(format!("cannot start a watch thread: {e}")))?;
    let wait = deadline.saturating_duration_since(Instant::now());
    match created_rx.recv_timeout(wait) {
        Ok(Ok(created_revision)) => Ok(EtcdWatch {
            stop,
            created_revision,
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => {
            stop.store(true, Ordering::SeqCst);
            Err(EtcdError::Timeout {
                failures: Vec::new(),
            })
        }
    }
}

struct Watcher<F> {
    transport: Arc<Transport>,
    /// Its start revision moves past every change delivered, so re-creating it resumes.
    request: WatchRequest,
    idle: Duration,
    stop: Arc<AtomicBool>,
    on: F,
}

/// Why reading a stream stopped.
enum End {
    /// Cancelled by its owner, or ended for good (the owner has been told).
    Done,
    Broken(String),
}

impl<F: FnMut(WatchMessage)> Watcher<F> {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn deliver(&mut self, message: WatchMessage) {
        if !self.stopped() {
            (self.on)(message);
        }
    }

    fn run(&mut self, mut stream: Stream) {
        loop {
            let reason = match self.read(&mut stream) {
                End::Done => return,
                End::Broken(reason) => reason,
            };
            self.deliver(WatchMessage::Interrupted {
                endpoint: stream.endpoint.clone(),
                reason,
            });
            stream = loop {
                if self.stopped() {
                    return;
                }
                match self.open(Instant::now() + self.idle) {
                    Ok(stream) => break stream,
                    Err(EtcdError::Compacted { compact_revision }) => {
                        self.deliver(WatchMessage::Compacted { compact_revision });
                        return;
                    }
                    Err(
                        EtcdError::WatchCanceled { reason, .. }
                        | EtcdError::Auth {
                            message: reason, ..
                        },
                    ) => {
                        self.deliver(WatchMessage::Canceled { reason });
                        return;
                    }
                    // Unreachable, no leader, timeout: etcd may come back; keep trying.
                    Err(_) => thread::sleep(Duration::from_millis(100)),
                }
            };
            self.deliver(WatchMessage::Resumed {
                endpoint: stream.endpoint.clone(),
                start_revision: self.request.start_revision,
            });
        }
    }

    fn read(&mut self, stream: &mut Stream) -> End {
        loop {
            let frame = stream.frames.next();
            if self.stopped() {
                return End::Done;
            }
            let frame = match frame {
                None => return End::Broken("the stream ended".into()),
                Some(Err(e)) if e.is_io() => {
                    return End::Broken(format!("reading the stream: {e}"));
                }
                Some(Err(e)) => return End::Broken(format!("bad frame: {e}")),
                Some(Ok(frame)) => frame,
            };
            if let Some(error) = frame.error {
                return End::Broken(format!("stream error: {error}"));
            }
            let Some(result) = frame.result else {
                continue;
            };
            if result.canceled {
                if result.compact_revision > 0 {
                    self.deliver(WatchMessage::Compacted {
                        compact_revision: result.compact_revision,
                    });
                    return End::Done;
                }
                if result.cancel_reason.contains("invalid auth token") {
                    self.transport.forget_token(stream.token.as_deref());
                    return End::Broken(result.cancel_reason);
                }
                if result.cancel_reason.contains("no leader") {
                    return End::Broken(result.cancel_reason);
                }
                self.deliver(WatchMessage::Canceled {
                    reason: result.cancel_reason,
                });
                return End::Done;
            }
            if let Some(last) = result.events.last() {
                self.request.start_revision = last.kv.mod_revision + 1;
                self.deliver(WatchMessage::Events {
                    revision: result.header.revision,
                    events: result.events,
                });
            }
        }
    }

    /// Opens a stream on the first endpoint that creates the watch, failing over like any
    /// retry-safe call (a watch changes nothing).
    fn open(&mut self, deadline: Instant) -> Result<Stream, EtcdError> {
        let body = serde_json::to_vec(&WatchCreate {
            create_request: &self.request,
        })
        .expect("serializing a watch request cannot fail");
        let transport = self.transport.clone();
        let stream = transport.failover(Resend::Safe, deadline, true, |endpoint, d, token| {
            self.open_on(endpoint, &body, d, token)
        })?;
        if self.request.start_revision == 0 {
            self.request.start_revision = stream.created_revision + 1;
        }
        Ok(stream)
    }

    fn open_on(
        &self,
        endpoint: &str,
        body: &[u8],
        deadline: Instant,
        token: Option<&str>,
    ) -> Attempt<Stream> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let mut request = self
            .transport
            .agent
            .post(format!("{endpoint}/v3/watch"))
            .header("Content-Type", "application/json")
            .header("Grpc-Metadata-hasleader", "true");
        if let Some(token) = token {
            request = request.header("Authorization", token);
        }
        // No global timeout: the answer is meant to last. The phases up to the answer's head are
        // bounded by the deadline (the caller of a first creation waits no longer than that
        // anyway), every read by the idle limit.
        let request = request
            .config()
            .timeout_connect(Some(self.transport.connect_timeout.min(remaining)))
            .timeout_send_request(Some(remaining))
            .timeout_send_body(Some(remaining))
            .timeout_recv_response(Some(remaining))
            .timeout_per_read(Some(self.idle))
            .build();
        let response = match request.send(body) {
            Ok(response) => response,
            Err(e) => return classify_transport(e),
        };
        let status = response.status().as_u16();
        let body = response.into_body();
        if status != 200 {
            return match body.into_with_config().limit(1 << 20).read_to_vec() {
                Ok(bytes) => classify_answer(endpoint, status, &bytes),
                Err(e) => Attempt::Lost(describe(&e)),
            };
        }
        let reader = BufReader::new(body.into_reader());
        let mut frames = serde_json::Deserializer::from_reader(reader).into_iter::<WatchFrame>();
        let result = match frames.next() {
            None => return Attempt::Lost("the stream ended before the watch was created".into()),
            Some(Err(e)) => return Attempt::Lost(format!("waiting for the watch: {e}")),
            Some(Ok(WatchFrame { error: Some(e), .. })) => {
                return Attempt::Lost(format!("stream error: {e}"));
            }
            Some(Ok(WatchFrame { result: None, .. })) => {
                return Attempt::Lost("a frame without result".into());
            }
            Some(Ok(WatchFrame {
                result: Some(result),
                ..
            })) => result,
        };
        if result.canceled {
            let reason = result.cancel_reason;
            return if result.compact_revision > 0 {
                Attempt::Fail(EtcdError::Compacted {
                    compact_revision: result.compact_revision,
                })
            } else if reason.contains("invalid auth token") {
                Attempt::TokenRefused
            } else if reason.contains("no leader") {
                Attempt::NoLeader(reason)
            } else {
                Attempt::Fail(EtcdError::WatchCanceled {
                    endpoint: endpoint.into(),
                    reason,
                })
            };
        }
        if !result.created {
            return Attempt::Lost("the first frame did not create the watch".into());
        }
        Attempt::Done(Stream {
            endpoint: endpoint.into(),
            token: token.map(str::to_owned),
            frames,
            created_revision: result.header.revision,
        })
    }
}
