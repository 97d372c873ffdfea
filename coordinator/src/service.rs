//! The coordinator's gRPC services: `JobService` (clients) and `WorkerService` (workers), over one
//! [`State`](crate::state::State).
//!
//! What it owns is the edge: each call's wire message is checked and converted (`crate::wire`),
//! validation and file work run on blocking threads without the lock, the state's transition runs
//! under the lock (never held across an await), and its [`Effects`] are carried out after: job
//! events go to watchers still under the lock (so none sees a change twice or misses one), then
//! jobs are written to the [`Store`], commands sent on the workers' `Join` streams (the service
//! keeps each worker's stream by id), assemblies started, ended jobs' results forgotten and their
//! working folders removed. What it never does: decide anything about jobs or workers (that is the
//! state's), or spell a store key ([`keys`]).
//!
//! Results ([`WorkerService::upload`]) are checked, staged and written into the job's output
//! checkpoint on a blocking thread, without the state lock, so uploads of one job write
//! concurrently ([`crate::assemble`] says how); only then is the result recorded in the store and
//! the state.
//!
//! Restart: jobs that can run on are read back from the store with the results they finished; the
//! records of jobs that ended (or cannot resume) are kept as read and only answered
//! ([`Coordinator::start`]).

mod assembly;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use awq_auth::{RequireToken, Secret, TokenKind};
use awq_job::wire::{device_from_wire, serving_devices_from_wire};
use awq_model::manifest::ModelPart;
use awq_model::safetensors::SafetensorsFile;
use awq_proto::v1::deployment_service_server::DeploymentServiceServer;
use awq_proto::v1::job_service_server::{JobService, JobServiceServer};
use awq_proto::v1::worker_command::Command;
use awq_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use awq_proto::v1::{self as pb, upload_message::Part};
use prost::Message;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, info_span, warn, Instrument};

use crate::assemble::{output_temp_dir, staged_file, staging_dir, write_staged, OutputSlot};
use crate::state::{
    Effects, FailureCause, Job, JobState, ReplicaReport, StageFailure, State, WorkerRecord, REJOIN_GRACE,
};
use crate::store::{keys, Store};
use crate::validate::{validate, JobSpec};
use crate::wire::{job_from_record, job_state_from_wire, replica_report_from_wire};
use crate::{Error, Result};

/// How the coordinator is run.
#[derive(Clone, Debug, Default)]
pub struct CoordinatorConfig {
    /// Models, outputs and calibration files must lie under one of these (none: anywhere).
    pub roots: Vec<PathBuf>,
    /// The token every call of the job and deployment APIs must carry, reads included (`None`:
    /// open to whoever reaches the port).
    pub admin_token: Option<Secret>,
    /// The token every call of the worker API must carry (`None`: any process that reaches the
    /// port may join as a worker, and be sent models and results).
    pub worker_token: Option<Secret>,
    /// TLS on the gRPC port when it holds a certificate (`None`: plain TCP). Workers then connect
    /// over `https://` and serve TLS themselves: a cluster is all-TLS or all-plain.
    pub tls: Option<awq_auth::TlsConfig>,
}

/// Seconds a worker's lease in the store lives without renewal.
const WORKER_LEASE_TTL_S: i64 = 10;
/// Largest upload payload accepted (a block of a 400B-parameter model is well below).
const MAX_PAYLOAD_BYTES: u64 = 16 << 30;

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The sending half of a worker's `Join` stream.
type CommandSender = mpsc::Sender<Result<pb::WorkerCommand, Status>>;

/// What the service keeps per job of the state: its watchers' channel and its output.
struct JobIo {
    events: broadcast::Sender<pb::JobEvent>,
    /// The output checkpoint being written (see [`crate::assemble`]).
    output: Arc<OutputSlot>,
}

impl JobIo {
    fn new(capacity: usize) -> JobIo {
        JobIo { events: broadcast::channel(capacity).0, output: Arc::default() }
    }
}

/// Everything under the lock: the state, and the service's handles to what it names by id.
pub(crate) struct Inner {
    pub(crate) state: State,
    jobs: BTreeMap<String, JobIo>,
    workers: BTreeMap<String, CommandSender>,
}

impl Inner {
    /// Sends `fx`'s job events to their watchers and resolves the rest into what
    /// [`Coordinator::apply`] carries out once the lock is released.
    fn outbox(&mut self, fx: Effects) -> Outbox {
        for event in fx.events {
            if let Some(io) = self.jobs.get(&event.job.id) {
                let _ = io.events.send(event.into());
            }
        }
        // A worker that left meanwhile has no channel; it is told nothing.
        let send = fx
            .commands
            .into_iter()
            .filter_map(|(w, command)| Some((self.workers.get(&w)?.clone(), command.into())))
            .collect();
        let discard = fx.discard.iter().filter_map(|id| self.discard(id)).collect();
        Outbox {
            send,
            persist: fx.persist,
            persist_deployments: fx.persist_deployments,
            forget_deployments: fx.forget_deployments,
            assemble: fx.assemble,
            forget: fx.forget,
            discard,
            rejoin_deadlines: fx.rejoin_deadlines,
        }
    }

    /// What goes when job `id` ends without output: its output (closed) and its working folders,
    /// the staging folder and the output's temporary folder.
    fn discard(&self, id: &str) -> Option<Discard> {
        let (job, io) = (self.state.job(id)?, self.jobs.get(id)?);
        let dirs = [Some(staging_dir(&job.spec.output, id)), output_temp_dir(&job.spec.output, id).ok()]
            .into_iter()
            .flatten()
            .collect();
        Some(Discard { output: io.output.clone(), dirs })
    }
}

/// Effects resolved under the lock, to carry out after it.
pub(crate) struct Outbox {
    send: Vec<(CommandSender, pb::WorkerCommand)>,
    persist: Vec<Job>,
    persist_deployments: Vec<crate::state::Deployment>,
    forget_deployments: Vec<String>,
    assemble: Vec<String>,
    forget: Vec<String>,
    discard: Vec<Discard>,
    rejoin_deadlines: Vec<(String, u32, u32)>,
}

/// A job's output and working folders, to drop once it ended without output (file I/O: after the
/// state lock is released).
struct Discard {
    output: Arc<OutputSlot>,
    dirs: Vec<PathBuf>,
}

impl Discard {
    /// Closes the output and removes the folders on a blocking thread, which runs to its end even
    /// if the returned handle is dropped (and a runtime shutting down waits for it).
    fn start(self) -> tokio::task::JoinHandle<()> {
        tokio::task::spawn_blocking(move || {
            self.output.close();
            for dir in &self.dirs {
                let _ = std::fs::remove_dir_all(dir);
            }
        })
    }

    async fn run(self) {
        if let Err(e) = self.start().await {
            warn!("removing a job's working folders panicked: {e}");
        }
    }
}

/// The record of a job read back at start that will not run again (it ended, or cannot resume):
/// answered as it was read, never written.
struct Archived {
    state: JobState,
    record: pb::Job,
}

/// The coordinator: cheap to clone, every clone shares one state.
#[derive(Clone)]
pub struct Coordinator {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    inner: Mutex<Inner>,
    /// The records read back at start that will not run again, by id; never changes.
    archive: BTreeMap<String, Archived>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) config: CoordinatorConfig,
}

impl Coordinator {
    /// A coordinator over `store`, with the unfinished jobs of an earlier run read back from it.
    pub async fn start(store: Arc<dyn Store>, config: CoordinatorConfig) -> Result<Coordinator> {
        let mut inner = Inner { state: State::default(), jobs: BTreeMap::new(), workers: BTreeMap::new() };
        let mut archive = BTreeMap::new();
        let mut reassemble = Vec::new();
        for (key, value) in store.list(keys::JOBS).await? {
            let mut record = pb::Job::decode(&value[..]).map_err(|e| Error::Store(format!("{key}: not a Job: {e}")))?;
            let Some(req) = record.request.clone() else { continue };
            if let Some(state) = job_state_from_wire(record.state).filter(|s| s.is_terminal()) {
                archive.insert(record.id.clone(), Archived { state, record });
                continue;
            }
            // Everything that was running lost its workers with the old coordinator.
            for s in record.stages.iter_mut() {
                s.worker_id.clear();
            }
            // The output may exist by now (a job that was assembling): checked as if it may be
            // replaced, then given back the request's own choice.
            let resumed = validate(&pb::SubmitRequest { overwrite: true, ..req.clone() }, &[])
                .map_err(|e| e.to_string())
                .and_then(|spec| {
                    job_from_record(&record, JobSpec { overwrite: req.overwrite, ..spec })
                        .ok_or_else(|| format!("state {} is not a job state", record.state))
                });
            let job = match resumed {
                Ok(job) => job,
                Err(e) => {
                    record.state = pb::JobState::Failed as i32;
                    record.error = format!("cannot resume after a coordinator restart: {e}");
                    archive.insert(record.id.clone(), Archived { state: JobState::Failed, record });
                    continue;
                }
            };
            let mut done = BTreeSet::new();
            for (k, _) in store.list(&keys::blocks(&job.id)).await? {
                if let Some(b) = keys::block_of(&k) {
                    done.insert(b);
                }
            }
            let tail_done = store.get(&keys::tail(&job.id)).await?.is_some();
            info!(job = %job.id, blocks_done = done.len(), "resuming job after restart");
            let id = job.id.clone();
            inner.jobs.insert(id.clone(), JobIo::new(64));
            if inner.state.resume(job, done, tail_done) == JobState::Assembling {
                reassemble.push(id);
            }
        }
        crate::deployments::resume(&*store, &mut inner.state).await?;
        let coordinator = Coordinator { shared: Arc::new(Shared { inner: Mutex::new(inner), archive, store, config }) };
        for id in reassemble {
            coordinator.spawn_assembly(id);
        }
        Ok(coordinator)
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared.inner.lock().expect("the state lock is never held across a panic")
    }

    /// Runs `transition` under the lock; its job events reach their watchers before the lock is
    /// released, the rest comes back to [`Coordinator::apply`].
    pub(crate) fn update<R>(&self, transition: impl FnOnce(&mut Inner, &mut Effects) -> R) -> (R, Outbox) {
        let mut inner = self.lock();
        let mut fx = Effects::default();
        let result = transition(&mut inner, &mut fx);
        let outbox = inner.outbox(fx);
        (result, outbox)
    }

    /// Carries out what was decided under the lock.
    pub(crate) async fn apply(&self, out: Outbox) {
        // Started before the first await: even if this future is dropped (a request whose client
        // went away), an ended job's folders go.
        let removals: Vec<_> = out.discard.into_iter().map(Discard::start).collect();
        for job in out.persist {
            if let Err(e) = self.shared.store.put(&keys::job(&job.id), pb::Job::from(&job).encode_to_vec()).await {
                warn!(job = %job.id, "cannot persist job: {e}");
            }
        }
        crate::deployments::persist(&*self.shared.store, out.persist_deployments, out.forget_deployments).await;
        for (tx, cmd) in out.send {
            // A worker that went away is noticed by its own connection task.
            let _ = tx.send(Ok(cmd)).await;
        }
        for id in out.assemble {
            self.spawn_assembly(id);
        }
        for id in out.forget {
            self.forget_results(&id).await;
        }
        for (deployment, replica, generation) in out.rejoin_deadlines {
            self.spawn_rejoin_deadline(deployment, replica, generation);
        }
        for removal in removals {
            if let Err(e) = removal.await {
                warn!("removing a job's working folders panicked: {e}");
            }
        }
    }

    /// Removes a job's block, tail and committed keys from the store (a job that ended, with or
    /// without output, is never resumed; only its job record stays).
    async fn forget_results(&self, job_id: &str) {
        for prefix in [keys::blocks(job_id), keys::tail(job_id), keys::committed(job_id)] {
            if let Err(e) = self.shared.store.delete_prefix(&prefix).await {
                warn!(job = %job_id, "cannot remove {prefix} from the store: {e}");
            }
        }
    }

    /// [`REJOIN_GRACE`] from now, gives up on the stages of a pipelined replica that did not rejoin.
    fn spawn_rejoin_deadline(&self, deployment: String, replica: u32, generation: u32) {
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(REJOIN_GRACE).await;
            let ((), out) = this.update(|inner, fx| inner.state.rejoin_expired(&deployment, replica, generation, fx));
            this.apply(out).await;
        });
    }

    /// Serves the job, deployment and worker services on `listener` until `shutdown` resolves,
    /// each behind its token of the config (the health service stays open: probes carry none),
    /// over TLS when the config has a certificate.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::result::Result<(), tonic::transport::Error> {
        let config = &self.shared.config;
        let (admin, worker) = (config.admin_token.clone(), config.worker_token.clone());
        let tls = config.tls.as_ref().and_then(awq_auth::TlsConfig::server);
        if let Ok(addr) = listener.local_addr() {
            warn_if_open(addr, admin.is_some(), worker.is_some(), tls.is_some());
        }
        let limit = awq_proto::MAX_MESSAGE_BYTES;
        let jobs =
            JobServiceServer::new(self.clone()).max_decoding_message_size(limit).max_encoding_message_size(limit);
        let jobs = RequireToken::new(jobs, admin.clone(), TokenKind::Admin);
        let deployments = RequireToken::new(DeploymentServiceServer::new(self.clone()), admin, TokenKind::Admin);
        let workers = WorkerServiceServer::new(self).max_decoding_message_size(limit).max_encoding_message_size(limit);
        let workers = RequireToken::new(workers, worker, TokenKind::Worker);
        // grpc.health.v1 (Kubernetes' probes): SERVING from the moment the APIs are, since the
        // coordinator reads its state back from the store before it listens.
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_service_status("", tonic_health::ServingStatus::Serving).await;
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            server = server.tls_config(tls)?;
        }
        server
            // Results are tens to hundreds of MB: HTTP/2's default 64 KiB windows would stall the
            // stream on a window update every 64 KiB.
            .initial_stream_window_size(Some(awq_proto::STREAM_WINDOW_BYTES))
            .initial_connection_window_size(Some(awq_proto::CONNECTION_WINDOW_BYTES))
            .http2_keepalive_interval(Some(Duration::from_secs(5)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(jobs)
            .add_service(deployments)
            .add_service(workers)
            .add_service(health_service)
            // TCP_NODELAY on every connection (tonic applies its own setting only to listeners it
            // binds): job events and commands are small messages.
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener)
                    .map(|accepted| accepted.inspect(|s| drop(s.set_nodelay(true)))),
                shutdown,
            )
            .await
    }

    /// Records a staged result in the store, then in the state, and moves the job on.
    async fn finish_result(&self, header: &pb::ResultHeader, part: ModelPart) -> Result<()> {
        let key =
            if header.is_tail { keys::tail(&header.job_id) } else { keys::block(&header.job_id, header.block_idx) };
        self.shared.store.put(&key, b"staged".to_vec()).await?;
        let ((), out) = self.update(|inner, fx| inner.state.record_result(&header.job_id, part, &header.worker_id, fx));
        self.apply(out).await;
        Ok(())
    }

    /// UNAVAILABLE, saying `what` did not happen, when the state store does not answer: what it
    /// cannot record would be lost with this process, so nothing new is taken while it is down
    /// (results already on their way wait and come again: see `finish_result`).
    pub(crate) async fn store_answers(&self, what: &str) -> std::result::Result<(), Status> {
        match self.shared.store.get(keys::PROBE).await {
            Ok(_) => Ok(()),
            Err(e) => Err(Status::unavailable(format!("{what}: {e}; try again once it answers"))),
        }
    }

    /// Job `id` as clients see it: running in the state, or as read at start.
    fn job_or_404(&self, id: &str) -> Result<pb::Job> {
        let job = self.lock().state.job(id).map(pb::Job::from);
        job.or_else(|| self.shared.archive.get(id).map(|a| a.record.clone()))
            .ok_or_else(|| Error::NoSuchJob(id.to_string()))
    }
}

/// Warns when the coordinator listens beyond this machine (`addr` not loopback) without a token:
/// anyone who reaches the port may then use the API the token would guard.
fn warn_if_open(addr: std::net::SocketAddr, admin_token: bool, worker_token: bool, tls: bool) {
    if addr.ip().is_loopback() {
        return;
    }
    if !tls {
        warn!(
            "listening on {addr} without TLS: tokens, models and results travel in clear text (--tls-cert, --tls-key)"
        );
    }
    if !admin_token {
        warn!(
            "listening on {addr} without an admin token: anyone who reaches it can submit, cancel, deploy and undeploy"
        );
    }
    if !worker_token {
        warn!("listening on {addr} without a worker token: anyone who reaches it can join as a worker");
    }
}

/// Whether a `Job` message's state has ended.
fn is_terminal(job: &pb::Job) -> bool {
    job_state_from_wire(job.state).is_some_and(JobState::is_terminal)
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;
type CommandStream = Pin<Box<dyn Stream<Item = Result<pb::WorkerCommand, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for Coordinator {
    async fn submit(&self, request: Request<pb::SubmitRequest>) -> Result<Response<pb::SubmitResponse>, Status> {
        let req = request.into_inner();
        let roots = self.shared.config.roots.clone();
        let spec = tokio::task::spawn_blocking(move || validate(&req, &roots))
            .await
            .map_err(|e| Status::internal(format!("validation panicked: {e}")))??;
        self.store_answers("the job was not submitted").await?;
        let (job, out) = self.update(|inner, fx| {
            // A deployment asked for must be possible now; it is made when the job is done.
            if let Some(deploy) = &spec.deploy {
                inner.state.check_names_free(deploy)?;
            }
            let job = inner.state.submit(spec, now_ms(), fx);
            inner.jobs.insert(job.id.clone(), JobIo::new(256));
            Ok::<_, Error>(job)
        });
        self.apply(out).await;
        Ok(Response::new(pb::SubmitResponse { job: Some((&job?).into()) }))
    }

    async fn get_job(&self, request: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        Ok(Response::new(self.job_or_404(&request.into_inner().job_id)?))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(&self, request: Request<pb::WatchJobRequest>) -> Result<Response<EventStream>, Status> {
        let id = request.into_inner().job_id;
        let (job, rx) = {
            let inner = self.lock();
            match (inner.state.job(&id), inner.jobs.get(&id)) {
                (Some(job), Some(io)) => (pb::Job::from(job), Some(io.events.subscribe())),
                _ => (self.shared.archive.get(&id).ok_or_else(|| Error::NoSuchJob(id.clone()))?.record.clone(), None),
            }
        };
        let (tx, out) = mpsc::channel(64);
        let this = self.clone();
        tokio::spawn(async move {
            let terminal = is_terminal(&job);
            if tx.send(Ok(pb::JobEvent { job: Some(job), message: "current state".into() })).await.is_err() || terminal
            {
                return;
            }
            let Some(mut rx) = rx else { return };
            loop {
                let event = match rx.recv().await {
                    Ok(event) => event,
                    // Fell behind: send the current state and go on.
                    Err(broadcast::error::RecvError::Lagged(_)) => match this.job_or_404(&id) {
                        Ok(job) => pb::JobEvent { job: Some(job), message: "current state".into() },
                        Err(_) => return,
                    },
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let terminal = event.job.as_ref().is_some_and(is_terminal);
                if tx.send(Ok(event)).await.is_err() || terminal {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn cancel_job(&self, request: Request<pb::CancelJobRequest>) -> Result<Response<pb::Job>, Status> {
        let id = request.into_inner().job_id;
        let (job, out) = self.update(|inner, fx| match (inner.state.job(&id), self.shared.archive.get(&id)) {
            (None, Some(archived)) => Err(Error::CannotCancel { job: id.clone(), state: archived.state }),
            _ => inner.state.cancel(&id, now_ms(), fx),
        });
        let job = job?;
        self.apply(out).await;
        Ok(Response::new((&job).into()))
    }

    async fn list_jobs(&self, _: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        let mut jobs: BTreeMap<String, pb::Job> =
            self.shared.archive.iter().map(|(id, a)| (id.clone(), a.record.clone())).collect();
        jobs.extend(self.lock().state.jobs().map(|job| (job.id.clone(), job.into())));
        Ok(Response::new(pb::ListJobsResponse { jobs: jobs.into_values().collect() }))
    }

    async fn list_workers(
        &self,
        _: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let workers = self.lock().state.workers().map(pb::WorkerInfo::from).collect();
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }
}

#[tonic::async_trait]
impl WorkerService for Coordinator {
    type JoinStream = CommandStream;

    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<CommandStream>, Status> {
        let req = request.into_inner();
        if req.protocol_version != awq_proto::PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "worker speaks protocol {}, this coordinator {}",
                req.protocol_version,
                awq_proto::PROTOCOL_VERSION
            )));
        }
        let (tx, rx) = mpsc::channel(64);
        let worker_id = self.lock().state.name_worker(&req.name);
        let device = device_from_wire(req.compute_device.as_ref(), "compute_device").map_err(Error::from)?;
        let serving_devices = serving_devices_from_wire(device, &req.serving_devices).map_err(Error::from)?;
        let worker = WorkerRecord {
            id: worker_id.clone(),
            name: req.name,
            device,
            serving_devices,
            gpu_model: req.gpu_model,
            memory_bytes: req.memory_bytes,
            stage_address: req.stage_address,
            busy_with: None,
            serving: None,
            connected_unix_ms: now_ms(),
        };
        let listed: Vec<ReplicaReport> = req
            .replicas
            .into_iter()
            .filter_map(replica_report_from_wire)
            .map(|r| ReplicaReport { worker_id: worker_id.clone(), ..r })
            .collect();
        let lease = self.shared.store.grant_lease(WORKER_LEASE_TTL_S).await?;
        self.shared
            .store
            .put_leased(&keys::worker(&worker_id), pb::WorkerInfo::from(&worker).encode_to_vec(), lease)
            .await?;
        let welcome = pb::WorkerCommand { command: Some(Command::WelcomeWorkerId(worker_id.clone())) };
        tx.send(Ok(welcome)).await.map_err(|_| Status::cancelled("worker left while joining"))?;
        let ((), out) = self.update(|inner, fx| {
            inner.workers.insert(worker_id.clone(), tx.clone());
            inner.state.join(worker, listed, fx);
        });
        info!(worker = %worker_id, "joined");
        self.apply(out).await;

        // The worker is alive as long as its stream is; keep its lease while it is.
        let this = self.clone();
        let span = info_span!("worker", worker = %worker_id);
        tokio::spawn(
            async move {
                let mut tick = tokio::time::interval(Duration::from_secs((WORKER_LEASE_TTL_S / 3).max(1) as u64));
                loop {
                    tokio::select! {
                        _ = tx.closed() => break,
                        _ = tick.tick() => {
                            if let Err(e) = this.shared.store.keep_alive(lease).await {
                                warn!("cannot renew the worker's lease: {e}");
                            }
                        }
                    }
                }
                let _ = this.shared.store.revoke(lease).await;
                let ((), out) = this.update(|inner, fx| {
                    inner.state.worker_left(&worker_id, fx);
                    inner.workers.remove(&worker_id);
                });
                info!("left");
                this.apply(out).await;
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn upload(
        &self,
        request: Request<Streaming<pb::UploadMessage>>,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        let mut stream = request.into_inner();
        let header = match stream.next().await {
            Some(Ok(pb::UploadMessage { part: Some(Part::Header(h)) })) => h,
            Some(Err(e)) => return Err(e),
            _ => return Err(Status::invalid_argument("an upload starts with its header")),
        };
        let started = std::time::Instant::now();
        let mut payload: Vec<u8> = Vec::new();
        while let Some(msg) = stream.next().await {
            let chunk = match msg?.part {
                Some(Part::Chunk(c)) => c,
                _ => return Err(Status::invalid_argument("only chunks may follow the header")),
            };
            if chunk.total_bytes > MAX_PAYLOAD_BYTES {
                return Err(Status::invalid_argument(format!(
                    "payload of {} bytes exceeds {MAX_PAYLOAD_BYTES}",
                    chunk.total_bytes
                )));
            }
            if chunk.offset != payload.len() as u64 || crc32fast::hash(&chunk.data) != chunk.crc32 {
                return Err(Error::DataLoss(format!(
                    "chunk at offset {} failed its offset or CRC check",
                    chunk.offset
                ))
                .into());
            }
            // Gigabytes for a large model's tail, but `total_bytes` is only a claim: room grows
            // with the chunks that arrive, up to it.
            awq_proto::reserve_for_chunk(&mut payload, chunk.data.len(), chunk.total_bytes);
            payload.extend_from_slice(&chunk.data);
        }
        if crc32fast::hash(&payload) != header.payload_crc32 {
            return Err(Error::DataLoss(format!("payload of {} bytes failed its CRC check", payload.len())).into());
        }
        let (spec, output) = {
            let inner = self.lock();
            match (inner.state.job(&header.job_id), inner.jobs.get(&header.job_id)) {
                (Some(job), Some(io)) if !job.state.is_terminal() => (job.spec.clone(), io.output.clone()),
                // Late results of a cancelled or finished job are dropped.
                _ => return Ok(Response::new(pb::UploadResponse {})),
            }
        };
        let staging = staging_dir(&spec.output, &header.job_id);
        let part = if header.is_tail { ModelPart::Tail } else { ModelPart::Block(header.block_idx as usize) };
        let (job_id, source, report) =
            (header.job_id.clone(), format!("upload from {}", header.worker_id), header.report_json.clone());
        // Checked against the output's manifest (nothing is staged for a result that does not
        // match), staged, then written into the output; `false` when the output was closed
        // meanwhile (the job ended).
        let received_s = started.elapsed().as_secs_f64();
        let write = move || -> Result<bool> {
            let file = SafetensorsFile::from_bytes(source, payload).map_err(|e| Error::DataLoss(e.to_string()))?;
            let Some(output) = output.get_or_create(&spec, &job_id)? else { return Ok(false) };
            output.check(part, &file)?;
            let path = staged_file(&staging, part);
            std::fs::create_dir_all(&staging).map_err(Error::io(&staging))?;
            write_staged(&path.with_extension("json"), report.as_bytes())?;
            write_staged(&path, file.contents())?;
            let staged_s = started.elapsed().as_secs_f64();
            output.write_result(&file)?;
            tracing::debug!(
                job = %job_id,
                "{part:?}: {} bytes received in {received_s:.2} s, staged after {staged_s:.2} s, in the output after {:.2} s",
                file.contents().len(),
                started.elapsed().as_secs_f64()
            );
            Ok(true)
        };
        let written = match tokio::task::spawn_blocking(write).await.map_err(|e| Status::internal(e.to_string()))? {
            Err(e) if e.is_storage_full() => {
                // Nothing is lost: what was staged stays, and the worker sends this result again.
                let ((), out) =
                    self.update(|inner, fx| inner.state.wait_for_space(&header.job_id, &format!("{part:?}: {e}"), fx));
                self.apply(out).await;
                return Err(e.into());
            }
            written => written?,
        };
        // The job may have ended (cancelled, failed) while the result was written; its folders
        // were removed then, and the write above may have created them again.
        let ended = {
            let inner = self.lock();
            inner
                .state
                .job(&header.job_id)
                .filter(|job| job.state.is_terminal())
                .and_then(|_| inner.discard(&header.job_id))
        };
        if let Some(discard) = ended {
            discard.run().await;
            return Ok(Response::new(pb::UploadResponse {}));
        }
        if !written {
            return Ok(Response::new(pb::UploadResponse {}));
        }
        self.finish_result(&header, part).await?;
        Ok(Response::new(pb::UploadResponse {}))
    }

    async fn publish_nccl_id(
        &self,
        request: Request<pb::NcclIdMessage>,
    ) -> Result<Response<pb::PublishNcclIdResponse>, Status> {
        let msg = request.into_inner();
        let (relayed, out) = self.update(|inner, fx| {
            if inner.state.job(&msg.job_id).is_none() && self.shared.archive.contains_key(&msg.job_id) {
                // A job that has ended takes the id and drops it.
                return Ok(());
            }
            inner.state.relay_nccl_id(&msg.job_id, &msg.nccl_group, &msg.worker_id, &msg.id, fx)
        });
        relayed?;
        self.apply(out).await;
        Ok(Response::new(pb::PublishNcclIdResponse {}))
    }

    async fn report_replica(
        &self,
        request: Request<pb::ReplicaReport>,
    ) -> Result<Response<pb::ReportReplicaResponse>, Status> {
        let report = replica_report_from_wire(request.into_inner())
            .ok_or_else(|| Status::invalid_argument("state: a worker reports LOADING, READY or FAILED"))?;
        let ((), out) = self.update(|inner, fx| inner.state.replica_report(report, fx));
        self.apply(out).await;
        Ok(Response::new(pb::ReportReplicaResponse {}))
    }

    async fn report_failure(
        &self,
        request: Request<pb::StageFailure>,
    ) -> Result<Response<pb::ReportFailureResponse>, Status> {
        let f = request.into_inner();
        let cause = if f.bad_input { FailureCause::BadInput } else { FailureCause::Fault };
        let failure = StageFailure {
            job_id: f.job_id,
            worker_id: f.worker_id,
            stage_index: f.stage_index,
            error: f.error,
            cause,
        };
        let ((), out) = self.update(|inner, fx| inner.state.stage_failed(failure, now_ms(), fx));
        self.apply(out).await;
        Ok(Response::new(pb::ReportFailureResponse {}))
    }
}
