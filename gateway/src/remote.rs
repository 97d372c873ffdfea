//! A replica in another process as a [`Backend`]: [`RemoteReplica`] calls the `ReplicaService` of
//! the worker that runs it (awq.v1; the engine's types cross the wire through `awq_serve::wire`,
//! the one conversion each way, so a refusal maps to the same HTTP status as a local engine's).
//!
//! - [`RemoteReplica::connect`]: a tonic channel (5 s to connect; HTTP/2 keepalive pings every 5 s
//!   and 10 s to answer, as the worker's own channel to the coordinator, so a peer that vanishes
//!   without closing its connection is noticed within about 15 s) and one `Describe`: the model
//!   (tokenizer, chat template, limits) is fixed from then on.
//! - `submit`: one `Generate` call per request, whose first event decides: a refusal is the
//!   engine's error (a full queue -> 429, ...), a gRPC error or a call that ends at once is
//!   `EngineStopped` (-> 503); otherwise a task forwards the events to the request's
//!   `RequestStream`. So `submit` returns with the first event, which for an accepted request is
//!   `Accepted` (sent as the engine queues it: a waiting request's client gets its headers at
//!   once, as from a local engine). Dropping
//!   the stream aborts the task, which drops the call: h2 resets the stream, the worker's response
//!   stream is dropped, and with it the engine's `RequestStream` (the request is aborted, its KV
//!   blocks freed). A call that breaks mid-way ends the request with `EngineEvent::Error("replica
//!   ... lost: ...")`, never a hang.
//! - `stats`: one `Stats` call (at most 5 s), made when asked (/metrics), nothing cached. For
//!   choosing a replica, [`RemoteReplica::in_flight`] (this process's requests on it, counted
//!   without a call) is the cheaper and fresher measure.
//!
//! What this module does not do: choose among replicas, or notice a replica that went away
//! between requests (the coordinator knows its workers; a call to a replica that is gone fails
//! with 503 and the next request goes elsewhere).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use awq_auth::{AttachToken, Authed, Secret};
use awq_proto::v1 as pb;
use awq_serve::engine::{EngineEvent, EngineStats, GenerateRequest, ModelInfo, RequestStream};
use awq_serve::{wire, RequestId};
use pb::replica_service_client::ReplicaServiceClient;
use tokio::sync::mpsc;

use crate::{async_trait, Backend};

/// How long [`RemoteReplica::connect`] waits for the TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `Describe` may take (it carries the tokenizer: megabytes).
pub const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a `Stats` call may take.
pub const STATS_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 keepalive: a ping this often, and the connection is lost if one is not answered in
/// [`KEEPALIVE_TIMEOUT`].
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why [`RemoteReplica::connect`] failed: which replica, and what went wrong.
#[derive(Debug, thiserror::Error)]
#[error("replica {replica} of `{deployment}` at {address}: {failure}")]
pub struct ConnectError {
    pub address: String,
    pub deployment: String,
    pub replica: u32,
    pub failure: ConnectFailure,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectFailure {
    #[error("not an address: {0}")]
    BadAddress(String),
    #[error("cannot connect within {CONNECT_TIMEOUT:?}: {0}")]
    Connect(tonic::transport::Error),
    /// The worker answered `Describe` with an error: NOT_FOUND when it does not run the replica,
    /// UNAVAILABLE while the replica loads.
    #[error("Describe failed: {}", status_text(.0))]
    Describe(Box<tonic::Status>),
    #[error("no answer to Describe within {DESCRIBE_TIMEOUT:?}")]
    DescribeTimeout,
    /// The description does not make a model (its tokenizer JSON).
    #[error("its model description is malformed: {0}")]
    Description(awq_serve::Error),
}

/// One replica of a deployment, in the worker at `address`, as a [`Backend`] (see the module
/// docs). Cheap to share behind an `Arc`; every call is independent.
pub struct RemoteReplica {
    address: String,
    deployment: String,
    replica: u32,
    client: ReplicaServiceClient<Authed>,
    model: ModelInfo,
    /// Requests submitted through this value and not ended.
    in_flight: Arc<AtomicUsize>,
    /// The ids of this side's `RequestStream`s (the engine's own ids stay in the worker).
    next_id: AtomicU64,
}

impl RemoteReplica {
    /// Connects to the `ReplicaService` at `address` ("host:port", or a URL), whose worker requires
    /// `worker_token` (if any: every call carries it), over TLS when `tls` serves it (a cluster is
    /// all-TLS or all-plain; a URL says for itself), and describes replica `replica` of `deployment`.
    pub async fn connect(
        address: &str,
        deployment: &str,
        replica: u32,
        worker_token: Option<&Secret>,
        tls: Option<&awq_auth::TlsConfig>,
    ) -> Result<RemoteReplica, ConnectError> {
        let fail = |failure| ConnectError {
            address: address.to_string(),
            deployment: deployment.to_string(),
            replica,
            failure,
        };
        let url = if address.contains("://") { address.to_string() } else { awq_auth::peer_url(address, tls) };
        let endpoint = awq_auth::endpoint(&url, tls).map_err(|e| fail(ConnectFailure::BadAddress(e.to_string())))?;
        let channel = endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .connect()
            .await
            .map_err(|e| fail(ConnectFailure::Connect(e)))?;
        let mut client = ReplicaServiceClient::with_interceptor(channel, AttachToken::new(worker_token))
            .max_decoding_message_size(awq_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(awq_proto::MAX_MESSAGE_BYTES);
        let which = pb::ReplicaRef { deployment: deployment.to_string(), replica };
        let description = match tokio::time::timeout(DESCRIBE_TIMEOUT, client.describe(which)).await {
            Err(_) => return Err(fail(ConnectFailure::DescribeTimeout)),
            Ok(Err(status)) => return Err(fail(ConnectFailure::Describe(Box::new(status)))),
            Ok(Ok(response)) => response.into_inner(),
        };
        // Parsing a tokenizer of megabytes is CPU work: off the runtime's threads.
        let model = tokio::task::spawn_blocking(move || wire::model_from_wire(description))
            .await
            .expect("model_from_wire does not panic (it checks the JSON before the tokenizer reads it)")
            .map_err(|e| fail(ConnectFailure::Description(e)))?;
        Ok(RemoteReplica {
            address: address.to_string(),
            deployment: deployment.to_string(),
            replica,
            client,
            model,
            in_flight: Arc::default(),
            next_id: AtomicU64::new(0),
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn deployment(&self) -> &str {
        &self.deployment
    }

    pub fn replica(&self) -> u32 {
        self.replica
    }

    /// Requests submitted through this value that have not ended (their streams not finished or
    /// dropped): this gateway's load on the replica, without asking it.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn which(&self) -> pb::ReplicaRef {
        pb::ReplicaRef { deployment: self.deployment.clone(), replica: self.replica }
    }

    /// "replica R of `D` at ADDRESS", for messages.
    fn name(&self) -> String {
        format!("replica {} of `{}` at {}", self.replica, self.deployment, self.address)
    }

    fn stopped(&self, why: impl std::fmt::Display) -> awq_serve::Error {
        awq_serve::Error::EngineStopped { reason: format!("{}: {why}", self.name()) }
    }
}

#[async_trait]
impl Backend for RemoteReplica {
    async fn submit(&self, request: GenerateRequest) -> Result<RequestStream, awq_serve::Error> {
        let counted = InFlight::start(&self.in_flight);
        let call = wire::request_to_wire(&self.deployment, self.replica, &request);
        let mut events =
            self.client.clone().generate(call).await.map_err(|s| self.stopped(status_text(&s)))?.into_inner();
        let first = match events.message().await {
            Err(status) => return Err(self.stopped(status_text(&status))),
            Ok(None) => return Err(self.stopped("the call ended without an event")),
            Ok(Some(event)) if wire::is_accepted(&event) => None,
            Ok(Some(event)) => match wire::event_from_wire(event) {
                Err(malformed) => return Err(self.stopped(format!("a malformed event: {malformed}"))),
                Ok(Err(refusal)) => return Err(refusal),
                Ok(Ok(event)) => Some(event),
            },
        };
        let id = RequestId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(first) = first {
            let ended = is_last(&first);
            let _ = tx.send(first);
            if ended {
                return Ok(RequestStream::new(id, rx, || {}));
            }
        }
        let task = tokio::spawn(forward(events, tx, self.name(), counted));
        let task = task.abort_handle();
        Ok(RequestStream::new(id, rx, move || task.abort()))
    }

    async fn stats(&self) -> Result<EngineStats, awq_serve::Error> {
        match tokio::time::timeout(STATS_TIMEOUT, self.client.clone().stats(self.which())).await {
            Err(_) => Err(self.stopped(format!("no answer to Stats within {STATS_TIMEOUT:?}"))),
            Ok(Err(status)) => Err(self.stopped(status_text(&status))),
            Ok(Ok(response)) => Ok(wire::stats_from_wire(&response.into_inner())),
        }
    }

    fn model(&self) -> &ModelInfo {
        &self.model
    }
}

/// Whether nothing follows `event`.
fn is_last(event: &EngineEvent) -> bool {
    matches!(event, EngineEvent::Finished { .. } | EngineEvent::Error(_))
}

/// Forwards a call's events after the first until the last one, or until the call breaks (then an
/// `Error` event ends the request). Aborted when the request's stream is dropped, which drops the
/// call.
async fn forward(
    mut events: tonic::Streaming<pb::GenerateEvent>,
    tx: mpsc::UnboundedSender<EngineEvent>,
    replica: String,
    _counted: InFlight,
) {
    loop {
        let message = tokio::select! {
            message = events.message() => message,
            () = tx.closed() => return,
        };
        let event = match message {
            Ok(Some(event)) => match wire::event_from_wire(event) {
                Ok(Ok(event)) => event,
                Ok(Err(refusal)) => EngineEvent::Error(format!("{replica} refused the request mid-way: {refusal}")),
                Err(malformed) => EngineEvent::Error(format!("{replica} sent a malformed event: {malformed}")),
            },
            Ok(None) => EngineEvent::Error(format!("{replica} lost: the call ended before the request finished")),
            Err(status) => EngineEvent::Error(format!("{replica} lost: {}", status_text(&status))),
        };
        let last = is_last(&event);
        if tx.send(event).is_err() || last {
            return;
        }
    }
}

/// One request counted in [`RemoteReplica::in_flight`] while this lives.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn start(count: &Arc<AtomicUsize>) -> InFlight {
        count.fetch_add(1, Ordering::Relaxed);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A status as a message: its code and its text (tonic's `Display` adds metadata and details).
fn status_text(status: &tonic::Status) -> String {
    match status.message() {
        "" => format!("{:?}", status.code()),
        message => format!("{:?}: {message}", status.code()),
    }
}
