//! Serving on a worker: the replicas the coordinator placed here and the `ReplicaService` that
//! gateways call to reach them.
//!
//! A `ServeReplica` command is checked into a [`DeploymentSpec`] (this worker's edge) and its
//! engine loads on a thread of its own (seconds to minutes), the replica reported `LOADING`, then
//! `READY` or `FAILED` (with whether its deployment is at fault). A `StopReplica` of the same
//! generation drops it: its engine stops, and the streams of its running requests end. Reports
//! wait in [`Replicas`] until the session with the coordinator sends them; a worker that joins again
//! lists its replicas in its `JoinRequest` instead, so that a restarted coordinator takes them back
//! without reloading them (losing the coordinator never stops a replica).
//!
//! `ReplicaService` (on the address of the worker's `StageService`): `Describe` (the model, for the
//! gateway's tokenizer and templates), `Generate` (a request's events, converted by
//! `awq_serve::wire`; a refusal is the call's one event; cancelling the call aborts the request and
//! frees its KV blocks), `Stats`; between the stages of a pipelined replica `StageInfo`,
//! `StageStep` and `StageLink` (the NCCL link between GPU stages, [`crate::stage_link`]).

use std::collections::HashMap;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use awq_auth::Secret;
use awq_job::deployment::DeploymentSpec;
use awq_job::wire::device_from_wire;
use awq_kernels::{Device, Tensor};
use awq_proto::v1 as pb;
use awq_proto::v1::replica_service_server::ReplicaService;
use awq_serve::engine::{EngineConfig, EngineHandle, DEFAULT_CPU_KV_CACHE_BYTES};
use awq_serve::pipeline::{f32_values, logits_to_wire, step_from_wire, LaterStage, NextStages};
use awq_serve::wire;
use tokio::sync::Notify;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::kept::KeptBlocks;
use crate::pipeline::RemoteStages;
use crate::stage_link::LinkFromPrevious;

/// A replica, as the coordinator and gateways name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ReplicaKey {
    deployment: String,
    replica: u32,
}

impl ReplicaKey {
    fn of(r: &pb::ReplicaRef) -> ReplicaKey {
        ReplicaKey { deployment: r.deployment.clone(), replica: r.replica }
    }
}

/// Which placement of a replica a report is about: its generation and this worker's stage of it.
#[derive(Clone, Copy)]
struct Placement {
    generation: u32,
    stage: u32,
}

/// A replica (or a pipeline stage of one) on this worker.
struct Hosted {
    generation: u32,
    /// Which stage of its replica this worker runs (0 for a whole replica).
    stage: u32,
    /// `None` while it loads.
    loaded: Option<Loaded>,
}

/// What a hosted replica runs once loaded.
enum Loaded {
    /// The whole model, or a pipelined replica's first stage: the engine gateways call.
    Engine(EngineHandle),
    /// A later stage of a pipelined replica: the previous stage's steps arrive by `StageStep`.
    Stage(Arc<Mutex<HostedStage>>),
}

/// A later stage and, once the previous stage linked to it, the receiving end of their NCCL link.
/// One lock for both: a step receives its hidden states and runs them as one.
struct HostedStage {
    stage: LaterStage,
    from_previous: Option<LinkFromPrevious>,
}

/// Which part of its replica a `ServeReplica` asks this worker to run.
enum Part {
    Whole,
    /// Stage 0 of `spec.pp`: the engine, over `blocks`, then the next stage at `next`.
    First {
        blocks: Range<usize>,
        next: String,
    },
    /// A later stage: `blocks`, then the next stage (none for the last).
    Later {
        blocks: Range<usize>,
        next: Option<String>,
    },
}

/// The part of its replica `cmd` asks for, checked. Errors: what is wrong, naming the field.
fn part_of(cmd: &pb::ServeReplica, pp: usize) -> Result<Part, String> {
    if pp == 1 {
        return Ok(Part::Whole);
    }
    let (stage, blocks) = (cmd.stage as usize, cmd.block_start as usize..cmd.block_end as usize);
    if stage >= pp {
        return Err(format!("stage: {stage} of a replica of {pp} stages"));
    }
    if blocks.is_empty() || (stage == 0) != (blocks.start == 0) {
        return Err(format!("block_start, block_end: blocks {blocks:?} for stage {stage}"));
    }
    let next = Some(cmd.next_stage_address.clone()).filter(|a| !a.is_empty());
    match (stage, next) {
        (_, Some(_)) if stage == pp - 1 => Err("next_stage_address: set for the last stage".into()),
        (_, None) if stage < pp - 1 => Err(format!("next_stage_address: missing for stage {stage} of {pp}")),
        (0, Some(next)) => Ok(Part::First { blocks, next }),
        (_, next) => Ok(Part::Later { blocks, next }),
    }
}

/// The replicas of this worker and the reports not yet sent (see the module docs).
#[derive(Default)]
pub struct Replicas {
    state: Mutex<ReplicasState>,
    /// Woken when a report is queued.
    reported: Notify,
    /// The worker token, sent to the next stage's worker of a pipelined replica.
    worker_token: Option<Secret>,
    /// How the next stage's worker is reached (TLS when this worker serves it).
    tls: Option<awq_auth::TlsConfig>,
    /// Blocks this worker quantized for a job that deploys its output, served from memory.
    kept: Arc<KeptBlocks>,
}

#[derive(Default)]
struct ReplicasState {
    hosted: HashMap<ReplicaKey, Hosted>,
    reports: Vec<pb::ReplicaReport>,
}

impl Replicas {
    /// No replica yet; `worker_token` goes to the workers of the next stages, reached over TLS when
    /// `tls` serves it (`Default`: no token, plain TCP); a replica of a job's output takes the
    /// blocks `kept` holds of that job.
    pub fn new(worker_token: Option<Secret>, tls: Option<awq_auth::TlsConfig>, kept: Arc<KeptBlocks>) -> Replicas {
        Replicas { worker_token, tls, kept, ..Replicas::default() }
    }

    fn lock(&self) -> MutexGuard<'_, ReplicasState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn report(&self, key: &ReplicaKey, at: Placement, state: pb::ReplicaState, error: String, bad_input: bool) {
        self.lock().reports.push(pb::ReplicaReport {
            worker_id: String::new(),
            deployment: key.deployment.clone(),
            replica: key.replica,
            generation: at.generation,
            state: state as i32,
            error,
            bad_input,
            stage: at.stage,
        });
        self.reported.notify_one();
    }

    /// Takes the reports queued so far, waiting for one when there is none.
    pub async fn next_reports(&self) -> Vec<pb::ReplicaReport> {
        loop {
            let notified = self.reported.notified();
            let reports = std::mem::take(&mut self.lock().reports);
            if !reports.is_empty() {
                return reports;
            }
            notified.await;
        }
    }

    /// What this worker runs now, for its `JoinRequest` (queued reports are dropped: this listing
    /// supersedes them).
    pub fn listing(&self) -> Vec<pb::ReplicaReport> {
        let mut st = self.lock();
        st.reports.clear();
        st.hosted
            .iter()
            .map(|(key, h)| pb::ReplicaReport {
                worker_id: String::new(),
                deployment: key.deployment.clone(),
                replica: key.replica,
                generation: h.generation,
                state: if h.loaded.is_some() { pb::ReplicaState::Ready } else { pb::ReplicaState::Loading } as i32,
                error: String::new(),
                bad_input: false,
                stage: h.stage,
            })
            .collect()
    }

    /// Starts loading the replica of `cmd` on its devices (some of this worker's `serving_devices`,
    /// with `memory_bytes` for blocks, activations and a CPU engine's KV cache); its reports follow.
    pub fn serve(self: &Arc<Self>, cmd: pb::ServeReplica, serving_devices: &[Device], memory_bytes: u64) {
        let key = ReplicaKey {
            deployment: cmd.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default(),
            replica: cmd.replica,
        };
        let generation = cmd.generation;
        let at = Placement { generation, stage: cmd.stage };
        let checked = engine_config(&cmd, serving_devices, memory_bytes)
            .and_then(|(config, pp)| Ok((config, part_of(&cmd, pp)?)))
            .and_then(|(config, part)| match tokio::runtime::Handle::try_current() {
                Ok(runtime) => Ok((config, part, runtime)),
                Err(e) => Err(format!("no tokio runtime to reach the next stage: {e}")),
            });
        let (mut config, part, runtime) = match checked {
            Ok(checked) => checked,
            Err(why) => {
                warn!(deployment = %key.deployment, replica = key.replica, "refused: {why}");
                return self.report(&key, at, pb::ReplicaState::Failed, why, true);
            }
        };
        {
            let mut st = self.lock();
            if st.hosted.get(&key).is_some_and(|h| h.generation >= generation) {
                return; // a repeated or stale command: the replica is here already
            }
            st.hosted.insert(key.clone(), Hosted { generation, stage: cmd.stage, loaded: None });
        }
        self.report(&key, at, pb::ReplicaState::Loading, String::new(), false);
        info!(deployment = %key.deployment, replica = key.replica, generation, model = %config.model.display(), "loading");
        if !cmd.kept_job_id.is_empty() {
            let blocks = match &part {
                Part::Whole => 0..usize::MAX,
                Part::First { blocks, .. } | Part::Later { blocks, .. } => blocks.clone(),
            };
            config.kept = self.kept.take(&cmd.kept_job_id, blocks);
            let bytes: usize = config.kept.0.iter().map(|(_, b)| b.len()).sum();
            info!(
                deployment = %key.deployment,
                job = %cmd.kept_job_id,
                "{} blocks ({bytes} bytes) served from memory, kept since this worker quantized them",
                config.kept.0.len()
            );
        }
        let this = self.clone();
        let leader_device = config.devices.first().copied().unwrap_or(Device::Cpu);
        let spawned = std::thread::Builder::new().name(format!("load-{}", key.deployment)).spawn(move || {
            let wire_ref = pb::ReplicaRef { deployment: key.deployment.clone(), replica: key.replica };
            let link = |next: &str| -> awq_serve::Result<Box<dyn NextStages>> {
                match RemoteStages::new(
                    runtime.clone(),
                    next,
                    wire_ref.clone(),
                    this.worker_token.as_ref(),
                    this.tls.as_ref(),
                    leader_device,
                ) {
                    Ok(remote) => Ok(Box::new(remote)),
                    Err(why) => Err(awq_serve::Error::InvalidConfig {
                        field: "next_stage_address",
                        expected: "host:port".into(),
                        got: why,
                    }),
                }
            };
            let load = || match part {
                Part::Whole => EngineHandle::start(config).map(Loaded::Engine),
                Part::First { blocks, next } => {
                    link(&next).and_then(|next| EngineHandle::start_pipelined(config, blocks, next)).map(Loaded::Engine)
                }
                Part::Later { blocks, next } => next
                    .as_deref()
                    .map(link)
                    .transpose()
                    .and_then(|next| LaterStage::load(&config, blocks, next))
                    .map(|stage| Loaded::Stage(Arc::new(Mutex::new(HostedStage { stage, from_previous: None })))),
            };
            // A panic while loading (a bug) is the replica's failure, reported, not a silent thread.
            let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(load)).unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned());
                Err(awq_serve::Error::EngineStopped {
                    reason: format!("loading panicked: {}", what.unwrap_or_default()),
                })
            });
            let mut st = this.lock();
            let current = st.hosted.get_mut(&key).filter(|h| h.generation == generation && h.loaded.is_none());
            match (loaded, current) {
                (Ok(loaded), Some(hosted)) => {
                    hosted.loaded = Some(loaded);
                    drop(st);
                    info!(deployment = %key.deployment, replica = key.replica, "ready");
                    this.report(&key, at, pb::ReplicaState::Ready, String::new(), false);
                }
                // Stopped (or replaced) while it loaded: the engine goes with this scope.
                (Ok(_), None) => {}
                (Err(e), current) => {
                    if current.is_some() {
                        st.hosted.remove(&key);
                    }
                    drop(st);
                    let bad_input = is_bad_input(&e);
                    warn!(deployment = %key.deployment, replica = key.replica, "failed to load: {e}");
                    this.report(&key, at, pb::ReplicaState::Failed, e.to_string(), bad_input);
                }
            }
        });
        if let Err(e) = spawned {
            let key = ReplicaKey { deployment: cmd.spec.map(|s| s.name).unwrap_or_default(), replica: cmd.replica };
            self.lock().hosted.remove(&key);
            self.report(&key, at, pb::ReplicaState::Failed, format!("cannot start a loading thread: {e}"), false);
        }
    }

    /// Stops the replica `cmd` names, unless a newer generation of it replaced the one named.
    pub fn stop(&self, cmd: &pb::StopReplica) {
        let key = ReplicaKey { deployment: cmd.deployment.clone(), replica: cmd.replica };
        let removed = {
            let mut st = self.lock();
            match st.hosted.get(&key) {
                Some(h) if h.generation <= cmd.generation => st.hosted.remove(&key),
                _ => None,
            }
        };
        // The engine stops outside the lock (its thread is joined).
        if removed.is_some() {
            info!(deployment = %key.deployment, replica = key.replica, "stopped");
        }
    }

    /// What `r` runs here once loaded. Errors: INVALID_ARGUMENT (no replica named), NOT_FOUND
    /// (not here), UNAVAILABLE (still loading).
    fn loaded(&self, r: Option<&pb::ReplicaRef>) -> Result<(pb::ReplicaRef, Loaded), Status> {
        let r = r.ok_or_else(|| Status::invalid_argument("replica: missing"))?;
        match self.lock().hosted.get(&ReplicaKey::of(r)) {
            Some(Hosted { loaded: Some(Loaded::Engine(engine)), .. }) => {
                Ok((r.clone(), Loaded::Engine(engine.clone())))
            }
            Some(Hosted { loaded: Some(Loaded::Stage(stage)), .. }) => Ok((r.clone(), Loaded::Stage(stage.clone()))),
            Some(_) => Err(Status::unavailable(format!("replica {} of {} is still loading", r.replica, r.deployment))),
            None => Err(Status::not_found(format!("this worker runs no replica {} of {}", r.replica, r.deployment))),
        }
    }

    /// The ready engine of `r`. Errors as [`Replicas::loaded`], and FAILED_PRECONDITION for a later
    /// pipeline stage (which has no engine).
    fn engine(&self, r: Option<&pb::ReplicaRef>) -> Result<EngineHandle, Status> {
        match self.loaded(r)? {
            (_, Loaded::Engine(engine)) => Ok(engine),
            (r, Loaded::Stage(_)) => Err(Status::failed_precondition(format!(
                "this worker runs a later pipeline stage of replica {} of {}: call its first stage",
                r.replica, r.deployment
            ))),
        }
    }

    /// The ready later stage of `r`. Errors as [`Replicas::loaded`], and FAILED_PRECONDITION for a
    /// first stage or a whole replica.
    fn later_stage(&self, r: Option<&pb::ReplicaRef>) -> Result<Arc<Mutex<HostedStage>>, Status> {
        match self.loaded(r)? {
            (_, Loaded::Stage(stage)) => Ok(stage),
            (r, Loaded::Engine(_)) => Err(Status::failed_precondition(format!(
                "replica {} of {} runs its engine here: not a later pipeline stage",
                r.replica, r.deployment
            ))),
        }
    }
}

/// Whether a load failed on the deployment's own input (its model, its options), not this worker.
fn is_bad_input(e: &awq_serve::Error) -> bool {
    use awq_serve::Error as E;
    match e {
        E::Kernel { cause, .. } => !cause.is_fault(),
        E::Model(m) => !m.is_fault(),
        E::EngineStopped { .. } => false,
        _ => true,
    }
}

/// The engine configuration of a `ServeReplica`, checked here: the spec, devices that are this
/// worker's serving devices, and a CPU KV cache (asked for, or the engine's default) within its
/// `memory_bytes`: the engine allocates it at once. With the replica's pipeline stages (`spec.pp`).
/// Errors: what is wrong, naming the field.
fn engine_config(
    cmd: &pb::ServeReplica,
    serving_devices: &[Device],
    memory_bytes: u64,
) -> Result<(EngineConfig, usize), String> {
    let spec = cmd.spec.as_ref().ok_or("spec: missing")?;
    let spec = DeploymentSpec::try_from(spec).map_err(|e| format!("spec.{}: {}", e.field, e.detail))?;
    let devices = cmd
        .devices
        .iter()
        .map(|d| device_from_wire(Some(d), "devices"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {}", e.field, e.detail))?;
    // What the coordinator sends: the first of this worker's serving devices (the CPU: itself).
    if devices.is_empty() || !serving_devices.starts_with(&devices) {
        let names = |ds: &[Device]| ds.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ");
        return Err(format!("devices: [{}] are not the first of this worker's [{}]", names(&devices), names(serving_devices)));
    }
    let e = &spec.engine;
    if devices == [Device::Cpu] {
        let bytes = e.kv_cache_bytes.unwrap_or(DEFAULT_CPU_KV_CACHE_BYTES);
        if bytes > memory_bytes {
            let field = "spec.engine.kv_cache_bytes";
            return Err(format!("{field}: {bytes} is more than this worker's {memory_bytes} bytes of memory"));
        }
    }
    let defaults = EngineConfig::new(&spec.model);
    let config = EngineConfig {
        served_model_name: Some(spec.served_model_name.clone()),
        devices,
        tp: spec.tp,
        max_model_len: e.max_model_len,
        max_num_seqs: e.max_num_seqs.unwrap_or(defaults.max_num_seqs),
        max_num_batched_tokens: e.max_num_batched_tokens,
        block_size: e.block_size.unwrap_or(defaults.block_size),
        gpu_memory_utilization: e.gpu_memory_utilization.unwrap_or(defaults.gpu_memory_utilization),
        kv_cache_bytes: e.kv_cache_bytes,
        max_waiting: e.max_waiting.unwrap_or(defaults.max_waiting),
        enforce_eager: e.enforce_eager,
        ..defaults
    };
    Ok((config, spec.pp))
}

/// The `ReplicaService` of a worker over its [`Replicas`].
pub struct ReplicaServer {
    pub replicas: Arc<Replicas>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateEvent, Status>> + Send>>;

#[tonic::async_trait]
impl ReplicaService for ReplicaServer {
    type GenerateStream = EventStream;

    async fn describe(&self, request: Request<pb::ReplicaRef>) -> Result<Response<pb::ModelDescription>, Status> {
        let engine = self.replicas.engine(Some(request.get_ref()))?;
        Ok(Response::new(wire::describe(engine.model())))
    }

    async fn generate(&self, request: Request<pb::GenerateCall>) -> Result<Response<EventStream>, Status> {
        let call = request.into_inner();
        let engine = self.replicas.engine(call.replica.as_ref())?;
        let one = |event: pb::GenerateEvent| -> EventStream { Box::pin(tokio_stream::once(Ok(event))) };
        let submitted = wire::request_from_wire(call).and_then(|request| engine.submit(request));
        let stream = match submitted {
            Ok(stream) => stream,
            Err(e) => {
                return match wire::refusal_to_wire(&e) {
                    Some(refusal) => Ok(Response::new(one(wire::refused_event(refusal)))),
                    None => Err(Status::internal(e.to_string())),
                }
            }
        };
        let accepted = tokio_stream::once(Ok(wire::accepted_event()));
        Ok(Response::new(Box::pin(accepted.chain(event_stream(stream)))))
    }

    async fn stats(&self, request: Request<pb::ReplicaRef>) -> Result<Response<pb::ReplicaStats>, Status> {
        let engine = self.replicas.engine(Some(request.get_ref()))?;
        Ok(Response::new(wire::stats_to_wire(&engine.stats())))
    }

    async fn stage_info(&self, request: Request<pb::ReplicaRef>) -> Result<Response<pb::StageInfoReply>, Status> {
        let stage = self.replicas.later_stage(Some(request.get_ref()))?;
        let n_cache_blocks = stage.lock().unwrap_or_else(|e| e.into_inner()).stage.n_cache_blocks();
        Ok(Response::new(pb::StageInfoReply { n_cache_blocks: u32::try_from(n_cache_blocks).unwrap_or(u32::MAX) }))
    }

    type StageStepStream = Pin<Box<dyn Stream<Item = Result<pb::StageStepReply, Status>> + Send>>;

    async fn stage_step(
        &self,
        request: Request<tonic::Streaming<pb::StageStepCall>>,
    ) -> Result<Response<Self::StageStepStream>, Status> {
        let mut parts = request.into_inner();
        let first = parts.message().await?.ok_or_else(|| Status::invalid_argument("an empty step"))?;
        let arrived = std::time::Instant::now();
        let stage = self.replicas.later_stage(first.replica.as_ref())?;
        let (plan, argmax) = step_from_wire(&first).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let width = stage.lock().unwrap_or_else(|e| e.into_inner()).stage.hidden_size();
        // The hidden states of the plan's tokens, at most: a sender that sends more is refused
        // before it makes this worker hold it (over the link: none here).
        let bound = match first.hidden_over_nccl {
            true => 0,
            false => plan.n_tokens.saturating_mul(width).saturating_mul(4),
        };
        let mut hidden = first.hidden;
        while let Some(part) = parts.message().await? {
            if hidden.len() + part.hidden.len() > bound {
                return Err(Status::invalid_argument(format!("hidden: more than the step's {bound} bytes")));
            }
            hidden.extend_from_slice(&part.hidden);
        }
        let hidden = match first.hidden_over_nccl {
            true => None,
            false => {
                let values = f32_values("hidden", &hidden).map_err(|e| Status::invalid_argument(e.to_string()))?;
                let tensor = Tensor::from_f32(&[plan.n_tokens, width], values).map_err(|_| {
                    Status::invalid_argument(format!("hidden: {} bytes, not the step's {bound}", hidden.len()))
                })?;
                Some(tensor)
            }
        };
        // The step computes (and may wait on the stages after this one) off the async threads; one
        // step at a time per stage, as its first stage's engine sends them.
        let step = tokio::task::spawn_blocking(move || {
            let mut hosted = stage.lock().unwrap_or_else(|e| e.into_inner());
            let hidden = match hidden {
                Some(hidden) => hidden,
                None => receive_over_link(&mut hosted, plan.n_tokens, width)?,
            };
            let mut replies = hosted.stage.step(&plan, &argmax, &hidden).map(|logits| logits_to_wire(&logits)).map_err(
                |e| Status::internal(e.to_string()),
            )?;
            if let Some(first) = replies.first_mut() {
                first.step_seconds = arrived.elapsed().as_secs_f64();
            }
            Ok(replies)
        });
        match step.await {
            Ok(Ok(replies)) => Ok(Response::new(Box::pin(tokio_stream::iter(replies.into_iter().map(Ok))))),
            Ok(Err(status)) => Err(status),
            Err(e) => Err(Status::internal(format!("the stage's step panicked: {e}"))),
        }
    }

    async fn stage_link(&self, request: Request<pb::StageLinkCall>) -> Result<Response<pb::StageLinkReply>, Status> {
        let call = request.into_inner();
        let stage = self.replicas.later_stage(call.replica.as_ref())?;
        let device = stage.lock().unwrap_or_else(|e| e.into_inner()).stage.device();
        if device == Device::Cpu {
            return Err(Status::failed_precondition("this stage runs on the CPU: its hidden states come over gRPC"));
        }
        // Joining waits for the other end (bounded by stage_link::JOIN_TIMEOUT): off the async
        // threads, and outside the stage's lock (steps over gRPC go on meanwhile).
        let joined = tokio::task::spawn_blocking(move || LinkFromPrevious::join(device, &call.nccl_id))
            .await
            .map_err(|e| Status::internal(format!("joining the link panicked: {e}")))?;
        let link = joined.map_err(Status::failed_precondition)?;
        stage.lock().unwrap_or_else(|e| e.into_inner()).from_previous = Some(link);
        Ok(Response::new(pb::StageLinkReply {}))
    }
}

/// A step's hidden states, `rows` x `width`, from the previous stage over the stages' link. A
/// failed transfer breaks the link (the sender drops its end too; later steps come over gRPC).
fn receive_over_link(hosted: &mut HostedStage, rows: usize, width: usize) -> Result<Tensor, Status> {
    let Some(link) = &hosted.from_previous else {
        return Err(Status::failed_precondition("hidden_over_nccl: this stage has no NCCL link to the previous one"));
    };
    link.recv(rows, width).map_err(|why| {
        hosted.from_previous = None;
        Status::unavailable(why)
    })
}

/// A request's engine events as its call's stream. A task forwards them; when the call is
/// cancelled (the gateway's client went away) the task ends and drops the request's stream, which
/// aborts the request and frees its KV blocks.
fn event_stream(
    mut stream: awq_serve::engine::RequestStream,
) -> impl Stream<Item = Result<pb::GenerateEvent, Status>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                event = stream.next() => {
                    let Some(event) = event else { break };
                    if tx.send(Ok(wire::event_to_wire(event))).await.is_err() {
                        break;
                    }
                }
                _ = tx.closed() => break,
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
