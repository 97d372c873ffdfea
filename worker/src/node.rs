//! The worker process: joins a coordinator, runs the stages it is assigned, moves activations to
//! the next stage and results to the coordinator.
//!
//! One assignment runs at a time, on a blocking thread (the engine is synchronous code); the
//! async side keeps the `Join` stream, the `StageService` that receives activations, and the
//! uploads. If the coordinator goes away, the running stage is cancelled and the worker joins
//! again (with back-off) once it is back: finished blocks were uploaded and are kept there.
//!
//! Activations travel over gRPC (`GrpcStageIo`: pushed to the next worker's `StageService`, taken
//! from the `Mailbox`) unless the assignment says NCCL: then `nccl_io` wraps the gRPC stage IO
//! (uploads stay on gRPC) and the NCCL ids and lost-group notices that come on the `Join` stream
//! wait in its `NcclIds` for the stages that need them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use awq_auth::{AttachToken, Authed, RequireToken, Secret, TokenKind};
use awq_job::wire::{device_from_wire, device_to_wire};
use awq_job::{InvalidOption, JobOptions};
use awq_kernels::{Device, Tensor};
use awq_proto::v1::replica_service_server::ReplicaServiceServer;
use awq_proto::v1::stage_service_client::StageServiceClient;
use awq_proto::v1::stage_service_server::{StageService, StageServiceServer};
use awq_proto::v1::worker_command::Command;
use awq_proto::v1::worker_service_client::WorkerServiceClient;
use awq_proto::v1::{self as pb, activation_message, upload_message};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tracing::{info, info_span, warn};

use crate::nccl_io::{nccl_stage_io, NcclIds, Publish};
use crate::serving::{ReplicaServer, Replicas};
use crate::kept::KeptBlocks;
use crate::stage::{run_stage, StageInput, StageIo, StageResult, StageSpec};
use crate::{Error, Result};

/// How a worker process is run.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// `http://host:port` of the coordinator, or `https://host:port` for one that serves TLS; with
    /// several (a leader and its standbys on one etcd), the worker tries them in turn until one
    /// takes it.
    pub coordinators: Vec<String>,
    pub name: String,
    pub device: Device,
    /// Where its replicas' tensor-parallel ranks may run: `device` first (empty: `device` alone).
    /// A replica of `tp` ranks takes the first `tp`.
    pub serving_devices: Vec<Device>,
    pub memory_bytes: u64,
    /// Bytes of block weights a stage may keep on the device (`None`: a share of its free memory).
    pub resident_bytes: Option<u64>,
    /// Tests only: the first stage that reaches this block fails with a device fault (once per
    /// process), to show that a fault re-plans the stage instead of failing the job.
    pub inject_fault_at_block: Option<usize>,
    /// Where the StageService listens (port 0: any free port).
    pub stage_listen: SocketAddr,
    /// The address other workers reach the StageService at (default: the bound address).
    pub stage_advertise: Option<String>,
    /// The worker token: sent on every call to the coordinator and to other workers, and required
    /// on this worker's own port (`None`: sent nowhere, required of no one).
    pub worker_token: Option<Secret>,
    /// TLS: with a certificate, this worker's port serves only TLS and other workers' ports are
    /// called over `https://` (a cluster is all-TLS or all-plain); its CA (or the system's roots)
    /// verifies the coordinator (an `https://` URL) and the other workers. `None`: plain TCP.
    pub tls: Option<awq_auth::TlsConfig>,
}

impl WorkerConfig {
    /// [`WorkerConfig::serving_devices`], `device` alone when none are given.
    pub fn serving_devices(&self) -> Vec<Device> {
        match self.serving_devices.is_empty() {
            true => vec![self.device],
            false => self.serving_devices.clone(),
        }
    }
}

/// Memory this machine can give to blocks: MemAvailable from /proc/meminfo.
pub fn available_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(8 << 30, |kb| kb * 1024)
}

type MailKey = (String, u32, u32);

/// Activations received for stages, until their stage takes them.
#[derive(Default)]
struct Mailbox {
    slots: Mutex<HashMap<MailKey, Tensor>>,
    arrived: Condvar,
}

impl Mailbox {
    fn put(&self, key: MailKey, x: Tensor) {
        self.slots.lock().expect("mailbox lock").insert(key, x);
        self.arrived.notify_all();
    }

    /// Waits for `key`, giving up when `cancel` is set.
    fn take(&self, key: &MailKey, cancel: &AtomicBool) -> Option<Tensor> {
        let mut slots = self.slots.lock().expect("mailbox lock");
        loop {
            if let Some(x) = slots.remove(key) {
                return Some(x);
            }
            if cancel.load(Ordering::Relaxed) {
                return None;
            }
            slots = self.arrived.wait_timeout(slots, Duration::from_millis(100)).expect("mailbox lock").0;
        }
    }

    fn drop_job(&self, job_id: &str) {
        self.slots.lock().expect("mailbox lock").retain(|k, _| k.0 != job_id);
    }
}

struct StageServer {
    mailbox: Arc<Mailbox>,
}

#[tonic::async_trait]
impl StageService for StageServer {
    async fn push_activations(
        &self,
        request: tonic::Request<tonic::Streaming<pb::ActivationMessage>>,
    ) -> Result<tonic::Response<pb::PushActivationsResponse>, tonic::Status> {
        let mut stream = request.into_inner();
        let header = match stream.next().await {
            Some(Ok(pb::ActivationMessage { part: Some(activation_message::Part::Header(h)) })) => h,
            Some(Err(e)) => return Err(e),
            _ => return Err(tonic::Status::invalid_argument("activations start with their header")),
        };
        // What the header claims is checked against what arrives, never reserved up front.
        let (rows, cols) = (header.rows, header.cols);
        let expected = (rows as u64).checked_mul(cols as u64).and_then(|n| n.checked_mul(4)).ok_or_else(|| {
            tonic::Status::invalid_argument(format!("activations of {rows} x {cols} f32 overflow a byte count"))
        })?;
        let mut payload = Vec::new();
        while let Some(msg) = stream.next().await {
            let Some(activation_message::Part::Chunk(c)) = msg?.part else {
                return Err(tonic::Status::invalid_argument("only chunks may follow the header"));
            };
            if c.total_bytes != expected || c.offset != payload.len() as u64 || crc32fast::hash(&c.data) != c.crc32 {
                return Err(tonic::Status::data_loss(format!("activation chunk at offset {} failed its checks", c.offset)));
            }
            awq_proto::reserve_for_chunk(&mut payload, c.data.len(), expected);
            payload.extend_from_slice(&c.data);
        }
        if payload.len() as u64 != expected || crc32fast::hash(&payload) != header.payload_crc32 {
            return Err(tonic::Status::data_loss(format!("activations: {} of {expected} bytes, or a CRC mismatch", payload.len())));
        }
        let x = Tensor::from_le_bytes(awq_kernels::DType::F32, &[header.rows as usize, header.cols as usize], &payload)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        self.mailbox.put((header.job_id, header.stage_index, header.attempt), x);
        Ok(tonic::Response::new(pb::PushActivationsResponse {}))
    }
}

/// Splits `payload` into CRC-checked chunks.
fn chunks(payload: &[u8]) -> Vec<pb::Chunk> {
    payload
        .chunks(awq_proto::CHUNK_BYTES)
        .enumerate()
        .map(|(i, data)| pb::Chunk {
            offset: (i * awq_proto::CHUNK_BYTES) as u64,
            data: data.to_vec(),
            crc32: crc32fast::hash(data),
            total_bytes: payload.len() as u64,
        })
        .collect()
}

/// Bytes of results a stage keeps in flight while it goes on computing (at least one result,
/// whatever its size): the search of the next blocks overlaps the transfer (and the coordinator's
/// durable write) of the previous ones, and of the tail (2 GB for Llama-3-8B), which goes early.
const UPLOAD_BYTES_IN_FLIGHT: usize = 4 << 30;

/// The gRPC side of a running stage.
struct GrpcStageIo {
    assignment: pb::Assignment,
    worker_id: String,
    coordinator: WorkerServiceClient<Authed>,
    /// The worker token, for the next stage's worker.
    token: AttachToken,
    /// How the next stage's worker is reached (TLS when this worker serves it).
    tls: Option<awq_auth::TlsConfig>,
    mailbox: Arc<Mailbox>,
    cancel: Arc<AtomicBool>,
    runtime: tokio::runtime::Handle,
    /// Uploads started and not yet waited for, oldest first, with their payload sizes.
    uploads: std::collections::VecDeque<(usize, tokio::task::JoinHandle<Result<()>>)>,
}

impl GrpcStageIo {
    /// Waits for the oldest upload in flight.
    fn wait_oldest(&mut self) -> Result<()> {
        match self.uploads.pop_front() {
            Some((_, upload)) => self.runtime.block_on(upload).map_err(|e| Error::Transfer(format!("upload task: {e}")))?,
            None => Ok(()),
        }
    }
}

impl StageIo for GrpcStageIo {
    fn receive_input(&mut self) -> Result<Tensor> {
        let a = &self.assignment;
        let key = (a.job_id.clone(), a.stage_index, a.attempt);
        self.mailbox.take(&key, &self.cancel).ok_or_else(|| Error::Cancelled(a.job_id.clone()))
    }

    fn send_output(&mut self, x: &Tensor, seq_len: usize) -> Result<()> {
        let a = &self.assignment;
        if a.next_stage_address.is_empty() {
            return Ok(());
        }
        let (rows, cols) = x.dims2("send_output")?;
        // f32 on the wire whatever the stage computes in (the receiver reads f32).
        let payload = x.clone().into_dtype(awq_kernels::DType::F32).to_le_bytes()?;
        let header = pb::ActivationHeader {
            job_id: a.job_id.clone(),
            stage_index: a.next_stage_index,
            attempt: a.attempt,
            rows: rows as u32,
            cols: cols as u32,
            seq_len: seq_len as u32,
            payload_crc32: crc32fast::hash(&payload),
        };
        let mut messages = vec![pb::ActivationMessage { part: Some(activation_message::Part::Header(header)) }];
        messages.extend(chunks(&payload).into_iter().map(|c| pb::ActivationMessage { part: Some(activation_message::Part::Chunk(c)) }));
        let address = awq_auth::peer_url(&a.next_stage_address, self.tls.as_ref());
        let endpoint = awq_auth::endpoint(&address, self.tls.as_ref());
        let token = self.token.clone();
        self.runtime.block_on(async move {
            let unreachable =
                |e: &dyn std::fmt::Display| Error::Transfer(format!("cannot reach the next stage at {address}: {e}"));
            let endpoint = endpoint.map_err(|e| unreachable(&e))?.connect_timeout(Duration::from_secs(5));
            let channel = endpoint.connect().await.map_err(|e| unreachable(&e))?;
            let mut client = StageServiceClient::with_interceptor(channel, token)
                .max_encoding_message_size(awq_proto::MAX_MESSAGE_BYTES);
            client
                .push_activations(tokio_stream::iter(messages))
                .await
                .map_err(|e| Error::Transfer(format!("sending activations to {address}: {e}")))?;
            Ok(())
        })
    }

    fn upload(&mut self, result: StageResult) -> Result<()> {
        let size = result.payload.len();
        while !self.uploads.is_empty() && self.uploads.iter().map(|(bytes, _)| bytes).sum::<usize>() + size > UPLOAD_BYTES_IN_FLIGHT {
            self.wait_oldest()?;
        }
        let a = &self.assignment;
        let header = pb::ResultHeader {
            job_id: a.job_id.clone(),
            worker_id: self.worker_id.clone(),
            stage_index: a.stage_index,
            attempt: a.attempt,
            block_idx: result.block_idx.unwrap_or(0) as u32,
            is_tail: result.block_idx.is_none(),
            report_json: result.report_json,
            payload_crc32: 0,
        };
        let (mut client, cancel) = (self.coordinator.clone(), self.cancel.clone());
        self.uploads.push_back((size, self.runtime.spawn(async move {
            // The CRCs and chunk copies run here too, off the stage's thread.
            let header = pb::ResultHeader { payload_crc32: crc32fast::hash(&result.payload), ..header };
            let mut backoff = awq_job::RetryBackoff::default();
            loop {
                let mut messages = vec![pb::UploadMessage { part: Some(upload_message::Part::Header(header.clone())) }];
                messages.extend(chunks(&result.payload).into_iter().map(|c| pb::UploadMessage { part: Some(upload_message::Part::Chunk(c)) }));
                match client.upload(tokio_stream::iter(messages)).await {
                    Ok(_) => return Ok(()),
                    // The coordinator's disk is full, or its state store (etcd) does not answer:
                    // faults there that pass. The result stays here and goes again, until it is
                    // taken or the stage cancelled (losing the coordinator cancels it).
                    Err(status)
                        if matches!(status.code(), tonic::Code::ResourceExhausted | tonic::Code::Unavailable)
                            && !cancel.load(Ordering::Relaxed) =>
                    {
                        let wait = backoff.next_wait();
                        warn!("upload to the coordinator refused, sending it again in {wait:?}: {}", status.message());
                        tokio::time::sleep(wait).await;
                    }
                    Err(status) => return Err(Error::Transfer(format!("upload to the coordinator: {status}"))),
                }
            }
        })));
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        while !self.uploads.is_empty() {
            self.wait_oldest()?;
        }
        Ok(())
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// How rank 0 of an NCCL group publishes the group's id: through the coordinator, which relays it
/// to the other ranks (called on the stage's blocking thread).
fn publish_nccl_id(client: WorkerServiceClient<Authed>, a: &pb::Assignment, worker_id: &str) -> Publish {
    let message = pb::NcclIdMessage {
        job_id: a.job_id.clone(),
        nccl_group: a.nccl_group.clone(),
        id: Vec::new(),
        worker_id: worker_id.to_string(),
    };
    let runtime = tokio::runtime::Handle::current();
    Box::new(move |id: &[u8]| {
        let group = message.nccl_group.clone();
        let message = pb::NcclIdMessage { id: id.to_vec(), ..message };
        let mut client = client;
        runtime
            .block_on(client.publish_nccl_id(message))
            .map_err(|e| Error::Transfer(format!("publishing the NCCL id of group {group} to the coordinator: {e}")))?;
        Ok(())
    })
}

impl TryFrom<&pb::Assignment> for StageSpec {
    type Error = InvalidOption;

    /// The one place a worker checks an assignment: every field becomes a typed value, or the
    /// error names the field. The worker's own settings (`resident_bytes`, `inject_fault_at_block`)
    /// are left unset for the caller to fill in.
    fn try_from(a: &pb::Assignment) -> std::result::Result<StageSpec, InvalidOption> {
        let options = a.options.as_ref().ok_or_else(|| InvalidOption::new("options", "missing"))?;
        if a.model_path.is_empty() {
            return Err(InvalidOption::new("model_path", "missing"));
        }
        if a.block_start > a.block_end {
            return Err(InvalidOption::new("block_start", format!("blocks {}..{} are no range", a.block_start, a.block_end)));
        }
        let input = match a.input() {
            pb::StageInput::PreviousStage => StageInput::PreviousStage,
            pb::StageInput::Embeddings => StageInput::Embeddings,
            pb::StageInput::Unspecified => return Err(InvalidOption::new("input", "unspecified")),
        };
        Ok(StageSpec {
            job_id: a.job_id.clone(),
            model: PathBuf::from(&a.model_path),
            job: JobOptions::try_from(options)?,
            blocks: a.block_start as usize..a.block_end as usize,
            blocks_done: a.blocks_done.iter().map(|&b| b as usize).collect(),
            input,
            has_next: !a.next_stage_address.is_empty(),
            produce_tail: a.produce_tail,
            device: device_from_wire(a.compute_device.as_ref(), "compute_device")?,
            resident_bytes: None,
            inject_fault_at_block: None,
            keep: None,
        })
    }
}

/// The stage `a` describes, on this worker: its device must be the worker's.
fn stage_spec(a: &pb::Assignment, config: &WorkerConfig, inject_fault: &AtomicBool, kept: &Arc<KeptBlocks>) -> Result<StageSpec> {
    let mut spec = StageSpec::try_from(a).map_err(|e| Error::Input(format!("assignment: {e}")))?;
    if spec.device != config.device {
        return Err(Error::Input(format!("assignment: compute_device {} is not this worker's device {}", spec.device, config.device)));
    }
    spec.resident_bytes = config.resident_bytes;
    if a.keep_for_serving {
        kept.begin(&spec.job_id);
        spec.keep = Some(kept.clone());
    }
    // One-shot, for the first stage holding the block: its re-plan (maybe on this worker) runs
    // undisturbed.
    if let Some(block) = config.inject_fault_at_block {
        if spec.blocks.contains(&block) && !spec.blocks_done.contains(&block) && !inject_fault.swap(true, Ordering::Relaxed) {
            spec.inject_fault_at_block = Some(block);
        }
    }
    Ok(spec)
}

/// Runs a worker until `shutdown` resolves: serves activations, joins the coordinator, runs stages.
pub async fn run_worker(config: WorkerConfig, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<()> {
    let mailbox = Arc::new(Mailbox::default());
    let nccl_ids = Arc::new(NcclIds::default());
    let kept = Arc::new(KeptBlocks::default());
    let replicas = Arc::new(Replicas::new(config.worker_token.clone(), config.tls.clone(), kept.clone()));
    let fault_injected = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(config.stage_listen)
        .await
        .map_err(|e| Error::Transfer(format!("cannot listen on {}: {e}", config.stage_listen)))?;
    let bound = listener.local_addr().map_err(|e| Error::Transfer(e.to_string()))?;
    let advertise = config.stage_advertise.clone().unwrap_or_else(|| bound.to_string());
    if config.worker_token.is_none() && !bound.ip().is_loopback() {
        warn!("listening on {bound} without a worker token: anyone who reaches it can push activations and call this worker's replicas");
    }
    if !config.tls.as_ref().is_some_and(awq_auth::TlsConfig::serves) && !bound.ip().is_loopback() {
        warn!("listening on {bound} without TLS: activations, prompts and tokens travel in clear text (--tls-cert, --tls-key)");
    }
    // Activations and replica calls come from other workers and the coordinator's gateway, all
    // holding the worker token; the health service stays open for Kubernetes' probes.
    let server = StageServiceServer::new(StageServer { mailbox: mailbox.clone() })
        .max_decoding_message_size(awq_proto::MAX_MESSAGE_BYTES);
    let server = RequireToken::new(server, config.worker_token.clone(), TokenKind::Worker);
    let replica_server = ReplicaServiceServer::new(ReplicaServer { replicas: replicas.clone() })
        .max_decoding_message_size(awq_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(awq_proto::MAX_MESSAGE_BYTES);
    let replica_server = RequireToken::new(replica_server, config.worker_token.clone(), TokenKind::Worker);
    // grpc.health.v1 (Kubernetes' readiness probe): SERVING while a session with the coordinator is
    // joined, NOT_SERVING while the worker (re)connects.
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut stop_server = stop_rx.clone();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = config.tls.as_ref().and_then(awq_auth::TlsConfig::server) {
        builder = builder.tls_config(tls).map_err(|e| Error::Transfer(format!("cannot serve TLS on {bound}: {e}")))?;
    }
    tokio::spawn(async move {
        // TCP_NODELAY on every connection (tonic applies its own setting only to listeners it
        // binds): a replica's token events and a pipeline's steps are small messages that Nagle's
        // algorithm would hold back behind unacknowledged ones.
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener)
            .map(|accepted| accepted.inspect(|s| drop(s.set_nodelay(true))));
        let _ = builder
            .add_service(server)
            .add_service(replica_server)
            .add_service(health_service)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop_server.changed().await;
            })
            .await;
    });
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let mut backoff = Duration::from_millis(200);
    let mut next_coordinator = 0;
    let mut stop = stop_rx;
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let session = Session {
            mailbox: mailbox.clone(),
            nccl_ids: nccl_ids.clone(),
            replicas: replicas.clone(),
            kept: kept.clone(),
            health: health.clone(),
        };
        let coordinator = &config.coordinators[next_coordinator % config.coordinators.len().max(1)];
        let ended = join_once(&config, coordinator, &advertise, session, fault_injected.clone(), stop.clone()).await;
        health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        match ended {
            Ok(()) => backoff = Duration::from_millis(200),
            // Joining again would send the same token: the worker stops, saying why.
            Err(e @ Error::Unauthenticated { .. }) => return Err(e),
            Err(e) => {
                // The next URL's turn (a standby's refusal names the leader; the list holds it).
                next_coordinator += 1;
                let then = &config.coordinators[next_coordinator % config.coordinators.len().max(1)];
                warn!("coordinator {coordinator}: {e}; joining {then} in {backoff:?}");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return Ok(()),
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// An assignment queued or running on this worker: its job id and its cancellation flag.
type RunningAssignment = (String, Arc<AtomicBool>);

/// What outlives a session with the coordinator.
struct Session {
    mailbox: Arc<Mailbox>,
    nccl_ids: Arc<NcclIds>,
    replicas: Arc<Replicas>,
    /// Blocks kept for a job's deployment (see [`crate::kept`]).
    kept: Arc<KeptBlocks>,
    health: tonic_health::server::HealthReporter,
}

/// One session with the coordinator: join, run commands until the stream ends.
async fn join_once(
    config: &WorkerConfig,
    coordinator: &str,
    advertise: &str,
    session: Session,
    fault_injected: Arc<AtomicBool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
    let Session { mailbox, nccl_ids, replicas, kept, health } = session;
    let channel = awq_auth::endpoint(coordinator, config.tls.as_ref())
        .map_err(|e| Error::Transfer(format!("bad coordinator URL: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .initial_stream_window_size(awq_proto::STREAM_WINDOW_BYTES)
        .initial_connection_window_size(awq_proto::CONNECTION_WINDOW_BYTES)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect()
        .await;
    let channel = match channel {
        Ok(channel) => channel,
        Err(e) => match awq_auth::explain("the coordinator", coordinator, &e).await {
            Some(explained) => return Err(Error::Transfer(explained)),
            None => return Err(Error::Transfer(format!("cannot connect: {e}"))),
        },
    };
    if let Some(explained) = awq_auth::plaintext_to_tls("the coordinator", coordinator).await {
        return Err(Error::Transfer(explained));
    }
    let client = WorkerServiceClient::with_interceptor(channel, AttachToken::new(config.worker_token.as_ref()))
        .max_encoding_message_size(awq_proto::MAX_MESSAGE_BYTES)
        .max_decoding_message_size(awq_proto::MAX_MESSAGE_BYTES);
    let join = pb::JoinRequest {
        name: config.name.clone(),
        compute_device: Some(device_to_wire(config.device)),
        gpu_model: String::new(),
        memory_bytes: config.memory_bytes,
        stage_address: advertise.to_string(),
        protocol_version: awq_proto::PROTOCOL_VERSION,
        replicas: replicas.listing(),
        serving_devices: config.serving_devices().into_iter().map(device_to_wire).collect(),
    };
    let mut commands = match client.clone().join(join).await {
        Ok(commands) => commands.into_inner(),
        Err(s) if s.code() == tonic::Code::Unauthenticated => {
            let message = s.message().to_string();
            return Err(Error::Unauthenticated { coordinator: coordinator.to_string(), message });
        }
        Err(s) => return Err(Error::Transfer(format!("join refused: {s}"))),
    };

    // Assignments run one at a time on a blocking thread, in the order they came.
    let (queue_tx, mut queue_rx) = mpsc::unbounded_channel::<(pb::Assignment, Arc<AtomicBool>)>();
    let current: Arc<Mutex<Vec<RunningAssignment>>> = Arc::default();
    let worker_id: Arc<Mutex<String>> = Arc::default();
    let runner = {
        let (client, mailbox, worker_id, current) = (client.clone(), mailbox.clone(), worker_id.clone(), current.clone());
        let (nccl_ids, kept) = (nccl_ids.clone(), kept.clone());
        let (config, fault_injected) = (config.clone(), fault_injected.clone());
        tokio::spawn(async move {
            while let Some((assignment, cancel)) = queue_rx.recv().await {
                if cancel.load(Ordering::Relaxed) {
                    continue;
                }
                let wid = worker_id.lock().expect("id lock").clone();
                let mut io = GrpcStageIo {
                    assignment: assignment.clone(),
                    worker_id: wid.clone(),
                    coordinator: client.clone(),
                    token: AttachToken::new(config.worker_token.as_ref()),
                    tls: config.tls.clone(),
                    mailbox: mailbox.clone(),
                    cancel: cancel.clone(),
                    runtime: tokio::runtime::Handle::current(),
                    uploads: Default::default(),
                };
                let span = info_span!("stage", job = %assignment.job_id, stage = assignment.stage_index, worker = %wid);
                let (job_id, stage_index, attempt) = (assignment.job_id.clone(), assignment.stage_index, assignment.attempt);
                let (config, fault_injected) = (config.clone(), fault_injected.clone());
                let nccl = assignment.transport == pb::ActivationTransport::Nccl as i32;
                let publish = publish_nccl_id(client.clone(), &assignment, &wid);
                let (nccl_ids, cancel_stage, kept) = (nccl_ids.clone(), cancel.clone(), kept.clone());
                let result = tokio::task::spawn_blocking(move || {
                    let _enter = span.enter();
                    if nccl {
                        info!(
                            "blocks {}..{}, activations over NCCL (group {}, rank {} of {})",
                            assignment.block_start, assignment.block_end, assignment.nccl_group, assignment.nccl_rank, assignment.nccl_ranks
                        );
                    } else {
                        info!("blocks {}..{}", assignment.block_start, assignment.block_end);
                    }
                    let spec = stage_spec(&assignment, &config, &fault_injected, &kept)?;
                    if nccl {
                        let mut io = nccl_stage_io(io, &assignment, spec.device, nccl_ids, cancel_stage, publish)?;
                        run_stage(&spec, io.as_mut())
                    } else {
                        run_stage(&spec, &mut io)
                    }
                })
                .await;
                current.lock().expect("current lock").retain(|(_, flag)| !Arc::ptr_eq(flag, &cancel));
                let (error, bad_input) = match result {
                    Ok(Ok(t)) => {
                        info!(
                            job = %job_id,
                            stage = stage_index,
                            "stage done: input {:.2} s, forward {:.2} s, send {:.2} s, load {:.2} s, search {:.2} s, upload {:.2} s",
                            t.input_s, t.forward_s, t.send_s, t.load_s, t.search_s, t.upload_s
                        );
                        continue;
                    }
                    Ok(Err(Error::Cancelled(_))) => continue,
                    Ok(Err(e)) => (e.to_string(), e.is_bad_input()),
                    Err(e) => (format!("stage panicked: {e}"), false),
                };
                warn!(job = %job_id, "stage {stage_index} failed: {error}");
                let failure = pb::StageFailure { job_id, worker_id: wid, stage_index, attempt, error, bad_input };
                let _ = client.clone().report_failure(failure).await;
            }
        })
    };

    // Replica reports go out as they come, for as long as this session lasts.
    let reporter = {
        let (replicas, client, worker_id) = (replicas.clone(), client.clone(), worker_id.clone());
        tokio::spawn(async move {
            loop {
                for report in replicas.next_reports().await {
                    let report = pb::ReplicaReport { worker_id: worker_id.lock().expect("id lock").clone(), ..report };
                    if let Err(e) = client.clone().report_replica(report).await {
                        warn!("cannot report a replica's state to the coordinator: {e}");
                    }
                }
            }
        })
    };

    let outcome = loop {
        let msg = tokio::select! {
            m = commands.next() => m,
            _ = stop.changed() => break Ok(()),
        };
        let cmd = match msg {
            Some(Ok(pb::WorkerCommand { command: Some(c) })) => c,
            Some(Ok(_)) => continue,
            Some(Err(e)) => break Err(Error::Transfer(format!("command stream: {e}"))),
            None => break Err(Error::Transfer("the coordinator closed the command stream".into())),
        };
        match cmd {
            Command::WelcomeWorkerId(id) => {
                info!(worker = %id, "joined {}", coordinator);
                health.set_service_status("", tonic_health::ServingStatus::Serving).await;
                *worker_id.lock().expect("id lock") = id;
            }
            Command::Assign(a) => {
                let cancel = Arc::new(AtomicBool::new(false));
                current.lock().expect("current lock").push((a.job_id.clone(), cancel.clone()));
                let _ = queue_tx.send((a, cancel));
            }
            Command::Cancel(c) => {
                for (job, flag) in current.lock().expect("current lock").iter() {
                    if *job == c.job_id {
                        flag.store(true, Ordering::Relaxed);
                    }
                }
                mailbox.drop_job(&c.job_id);
                nccl_ids.drop_job(&c.job_id);
                kept.drop_job(&c.job_id);
            }
            // May come before the assignment it belongs to: kept until its stage takes it.
            Command::NcclId(m) => nccl_ids.put_id(&m.job_id, &m.nccl_group, m.id),
            Command::NcclGroupLost(m) => {
                warn!(job = %m.job_id, "NCCL group {} lost: {}", m.nccl_group, m.reason);
                nccl_ids.lose(&m.job_id, &m.nccl_group, m.reason);
            }
            Command::Serve(cmd) => replicas.serve(cmd, &config.serving_devices(), config.memory_bytes),
            Command::StopReplica(cmd) => replicas.stop(&cmd),
        }
    };
    reporter.abort();
    // Losing the coordinator cancels every stage this session was given (replicas go on serving).
    for (_, flag) in current.lock().expect("current lock").iter() {
        flag.store(true, Ordering::Relaxed);
    }
    drop(queue_tx);
    let _ = runner.await;
    outcome
}
