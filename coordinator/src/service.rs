//! The coordinator's gRPC services and the scheduler behind them.
//!
//! One [`Coordinator`] holds the state of every job and every joined worker under one lock; the
//! lock is never held across an await. Each state change that matters after a restart is written
//! to the [`Store`] (jobs, finished blocks and tails) right after the lock is released.
//!
//! Scheduling ([`State::schedule`]) runs after every event (submit, join, loss, finished stage):
//! for each job in submission order, the blocks that are neither finished nor held by a live stage
//! are planned over the idle workers. A first plan chains its stages (stage k+1 receives its input
//! activations from stage k); a re-plan after a lost worker recomputes its input from the
//! embeddings, which is exact and cheap next to the search.
//!
//! Results ([`WorkerService::upload`]) are checked, staged and written into the job's output
//! checkpoint on a blocking thread, without the state lock, so uploads of one job write
//! concurrently ([`crate::assemble`] says how). A job that ends without output has its output
//! closed and its staging and temporary output folders removed, after the lock is released.
//!
//! A chain whose stages all run on GPUs passes its activations over NCCL (the rule is in
//! [`crate::nccl`]): its assignments carry the group and each stage's rank, rank 0 publishes the
//! group's unique id ([`WorkerService::publish_nccl_id`]) and the coordinator relays it to the
//! other ranks; when a member is lost, the members still running are told the group is lost
//! (`NcclGroupLost`), so none of them waits for a peer that is gone. Groups live as long as their
//! job runs, in memory only (a restarted coordinator plans everything running again anyway).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use awq_model::manifest::ModelPart;
use awq_model::safetensors::SafetensorsFile;
use awq_proto::v1::job_service_server::{JobService, JobServiceServer};
use awq_proto::v1::worker_command::Command;
use awq_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use awq_proto::v1::{self as pb, upload_message::Part, JobState};
use prost::Message;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, info_span, warn, Instrument};

use crate::assemble::{assemble, output_temp_dir, staged_file, staging_dir, write_staged, OutputSlot};
use crate::nccl::{plan_groups, Member, NcclGroup, PlannedStage};
use crate::planner::{block_capacity, plan};
use crate::store::{keys, Store};
use crate::validate::{validate, JobSpec};
use awq_job::wire::{device_from_wire, device_to_wire};
use awq_job::Device;
use crate::{Error, Result};

/// How the coordinator is run.
#[derive(Clone, Debug, Default)]
pub struct CoordinatorConfig {
    /// Models, outputs and calibration files must lie under one of these (none: anywhere).
    pub roots: Vec<PathBuf>,
}

/// Seconds a worker's lease in the store lives without renewal.
const WORKER_LEASE_TTL_S: i64 = 10;
/// Stage faults (device errors, failed transfers) a job survives; one more fails it.
const MAX_FAULTS_PER_JOB: u32 = 3;
/// Largest upload payload accepted (a block of a 400B-parameter model is well below).
const MAX_PAYLOAD_BYTES: u64 = 16 << 30;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn cancel_command(job_id: &str) -> pb::WorkerCommand {
    pb::WorkerCommand { command: Some(Command::Cancel(pb::CancelAssignment { job_id: job_id.to_string() })) }
}

fn nccl_lost_command(job_id: &str, group: &str, reason: String) -> pb::WorkerCommand {
    let lost = pb::NcclGroupLost { job_id: job_id.to_string(), nccl_group: group.to_string(), reason };
    pb::WorkerCommand { command: Some(Command::NcclGroupLost(lost)) }
}

fn is_terminal(state: i32) -> bool {
    [JobState::Done as i32, JobState::Failed as i32, JobState::Cancelled as i32].contains(&state)
}

struct JobRuntime {
    job: pb::Job,
    spec: JobSpec,
    done: BTreeSet<u32>,
    tail_done: bool,
    events: broadcast::Sender<pb::JobEvent>,
    /// The NCCL groups of its stages, by name, until the job ends.
    nccl_groups: BTreeMap<String, NcclGroup>,
    /// The output checkpoint being written (see [`crate::assemble`]).
    output: Arc<OutputSlot>,
    /// Stage faults so far (see [`State::stage_fault`]).
    faults: u32,
}

impl JobRuntime {
    fn staging(&self) -> PathBuf {
        staging_dir(&self.spec.output, &self.job.id)
    }

    /// What goes when the job ends without output: its output (closed) and its working folders,
    /// the staging folder and the output's temporary folder.
    fn discard(&self) -> Discard {
        let dirs = [Some(self.staging()), output_temp_dir(&self.spec.output, &self.job.id).ok()].into_iter().flatten().collect();
        Discard { output: self.output.clone(), dirs }
    }

    fn emit(&self, message: impl Into<String>) {
        let _ = self.events.send(pb::JobEvent { job: Some(self.job.clone()), message: message.into() });
    }

    fn all_done(&self) -> bool {
        self.tail_done && self.done.len() as u32 == self.job.n_blocks
    }
}

/// Whether stage `s` has delivered everything it was asked for: its blocks and, when it holds the
/// last block, the tail.
fn stage_complete(s: &pb::Stage, done: &BTreeSet<u32>, tail_done: bool, n_blocks: u32) -> bool {
    (s.block_start..s.block_end).all(|b| done.contains(&b)) && (s.block_end != n_blocks || tail_done)
}

struct WorkerConn {
    info: pb::WorkerInfo,
    /// Where it computes (checked when it joined).
    device: Device,
    tx: mpsc::Sender<Result<pb::WorkerCommand, Status>>,
    /// (job, stage index) it is working on.
    current: Option<(String, u32)>,
}

#[derive(Default)]
struct State {
    jobs: BTreeMap<String, JobRuntime>,
    workers: BTreeMap<String, WorkerConn>,
    next_worker: u64,
    next_job: u64,
}

/// Side effects decided under the lock and carried out after it is released.
#[derive(Default)]
struct Effects {
    send: Vec<(mpsc::Sender<Result<pb::WorkerCommand, Status>>, pb::WorkerCommand)>,
    persist: Vec<pb::Job>,
    assemble: Vec<String>,
    /// Jobs that ended without output: their block and tail keys go from the store.
    forget: Vec<String>,
    /// Jobs that ended without output: their output closes, their working folders go.
    discard: Vec<Discard>,
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

impl State {
    /// Which stage of `job` produces the tail: the one holding the last block.
    fn tail_stage(job: &pb::Job, s: &pb::Stage) -> bool {
        s.block_end == job.n_blocks
    }

    fn schedule(&mut self, fx: &mut Effects) {
        let mut order: Vec<(u64, String)> = self
            .jobs
            .values()
            .filter(|j| j.job.state == JobState::Queued as i32 || j.job.state == JobState::Running as i32)
            .map(|j| (j.job.created_unix_ms, j.job.id.clone()))
            .collect();
        order.sort();
        for (_, job_id) in order {
            let mut idle: Vec<String> = self.workers.iter().filter(|(_, w)| w.current.is_none()).map(|(id, _)| id.clone()).collect();
            if idle.is_empty() {
                return;
            }
            let rt = self.jobs.get_mut(&job_id).expect("job ids come from the map");
            let live = |s: &pb::Stage| !s.worker_id.is_empty();
            let covered: BTreeSet<u32> =
                rt.job.stages.iter().filter(|s| live(s)).flat_map(|s| s.block_start..s.block_end).collect();
            let missing: Vec<u32> = (0..rt.job.n_blocks).filter(|b| !rt.done.contains(b) && !covered.contains(b)).collect();
            let tail_held = rt.job.stages.iter().any(|s| live(s) && State::tail_stage(&rt.job, s));
            let need_tail = !rt.tail_done && !tail_held;
            if missing.is_empty() && !need_tail {
                continue;
            }
            // Contiguous runs of missing blocks; an empty run carries a lone tail.
            let mut runs: Vec<std::ops::Range<u32>> = Vec::new();
            for &b in &missing {
                match runs.last_mut() {
                    Some(r) if r.end == b => r.end += 1,
                    _ => runs.push(b..b + 1),
                }
            }
            if runs.is_empty() {
                runs.push(rt.job.n_blocks..rt.job.n_blocks);
            }
            let fresh = rt.job.stages.is_empty();
            let attempt = rt.job.stages.iter().map(|s| s.attempt + 1).max().unwrap_or(0);
            let mut new_stages: Vec<pb::Stage> = Vec::new();
            for run in runs {
                if idle.is_empty() {
                    break;
                }
                let capacities: Vec<usize> = idle
                    .iter()
                    .map(|w| block_capacity(self.workers[w].info.memory_bytes, rt.spec.per_block_bytes, rt.spec.fixed_bytes))
                    .collect();
                let ranges = if run.is_empty() {
                    // One empty range: the stage that only has the tail to produce.
                    #[allow(clippy::single_range_in_vec_init)]
                    let empty = vec![run.start as usize..run.start as usize];
                    empty
                } else {
                    plan(run.start as usize..run.end as usize, &capacities)
                };
                let mut taken = Vec::new();
                for (i, r) in ranges.into_iter().enumerate() {
                    if r.is_empty() && !(run.is_empty() && i == 0) {
                        continue;
                    }
                    let worker_id = idle[i].clone();
                    new_stages.push(pb::Stage {
                        index: (rt.job.stages.len() + new_stages.len()) as u32,
                        worker_id: worker_id.clone(),
                        block_start: r.start as u32,
                        block_end: r.end as u32,
                        blocks_done: (r.start as u32..r.end as u32).filter(|b| rt.done.contains(b)).count() as u32,
                        attempt,
                    });
                    taken.push(i);
                }
                for i in taken.into_iter().rev() {
                    idle.remove(i);
                }
            }
            if new_stages.is_empty() {
                continue;
            }
            let method_awq = rt.spec.options.method.needs_activations();
            let n = new_stages.len();
            // A first AWQ plan chains its stages; everything else starts from the embeddings.
            let next_of = |k: usize| (fresh && method_awq && k + 1 < n).then_some(k + 1);
            let planned: Vec<PlannedStage> = new_stages
                .iter()
                .enumerate()
                .map(|(k, s)| {
                    let info = &self.workers[&s.worker_id].info;
                    PlannedStage {
                        index: s.index,
                        attempt: s.attempt,
                        worker_id: &s.worker_id,
                        device: self.workers[&s.worker_id].device,
                        stage_address: &info.stage_address,
                        next: next_of(k),
                    }
                })
                .collect();
            let (groups, ranks) = plan_groups(&rt.job.id, &planned);
            for (k, stage) in new_stages.iter().enumerate() {
                let worker = &self.workers[&stage.worker_id];
                let chained = fresh && method_awq && k > 0;
                let next = next_of(k).map(|k| &new_stages[k]);
                let (transport, nccl_group, nccl_rank, nccl_ranks) = match ranks[k] {
                    Some((g, rank)) => {
                        (pb::ActivationTransport::Nccl, groups[g].name.clone(), rank, groups[g].members.len() as u32)
                    }
                    None => (pb::ActivationTransport::Grpc, String::new(), 0, 0),
                };
                let assignment = pb::Assignment {
                    job_id: rt.job.id.clone(),
                    model_path: rt.spec.model.to_string_lossy().into_owned(),
                    options: Some((&rt.spec.options).into()),
                    compute_device: Some(device_to_wire(worker.device)),
                    stage_index: stage.index,
                    attempt: stage.attempt,
                    block_start: stage.block_start,
                    block_end: stage.block_end,
                    blocks_done: (stage.block_start..stage.block_end).filter(|b| rt.done.contains(b)).collect(),
                    input: if chained { pb::StageInput::PreviousStage } else { pb::StageInput::Embeddings } as i32,
                    next_stage_address: next.map(|s| self.workers[&s.worker_id].info.stage_address.clone()).unwrap_or_default(),
                    next_stage_index: next.map_or(0, |s| s.index),
                    produce_tail: !rt.tail_done && State::tail_stage(&rt.job, stage),
                    transport: transport as i32,
                    nccl_group,
                    nccl_rank,
                    nccl_ranks,
                };
                fx.send.push((worker.tx.clone(), pb::WorkerCommand { command: Some(Command::Assign(assignment)) }));
            }
            for stage in &new_stages {
                let w = self.workers.get_mut(&stage.worker_id).expect("planned over known workers");
                w.current = Some((rt.job.id.clone(), stage.index));
                w.info.busy_with_job = rt.job.id.clone();
            }
            let mut summary: Vec<String> =
                new_stages.iter().map(|s| format!("{}..{} on {}", s.block_start, s.block_end, s.worker_id)).collect();
            for g in &groups {
                let stages: Vec<String> = g.members.iter().map(|m| m.stage_index.to_string()).collect();
                summary.push(format!("stages {} pass activations over NCCL (group {})", stages.join(" -> "), g.name));
            }
            rt.nccl_groups.extend(groups.into_iter().map(|g| (g.name.clone(), g)));
            rt.job.stages.extend(new_stages);
            rt.job.state = JobState::Running as i32;
            info!(job = %rt.job.id, "planned {}", summary.join(", "));
            rt.emit(format!("planned {}", summary.join(", ")));
            fx.persist.push(rt.job.clone());
        }
    }

    /// Marks the stages of `worker_id` lost, with every unfinished stage downstream of them in
    /// the same chain (they wait for activations that will not come). When the lost stage was in
    /// an NCCL group, the members still running are told the group is lost.
    fn lose_worker(&mut self, worker_id: &str, fx: &mut Effects) {
        let Some(conn) = self.workers.remove(worker_id) else { return };
        let Some((job_id, stage_index)) = conn.current else { return };
        let mut cancelled_workers = Vec::new();
        let mut group_lost = None;
        if let Some(rt) = self.jobs.get_mut(&job_id) {
            group_lost = rt.nccl_groups.values().find_map(|g| g.rank_of(stage_index).map(|rank| (g.clone(), rank)));
            let lost_attempt = rt.job.stages.iter().find(|s| s.index == stage_index).map(|s| s.attempt);
            let n_blocks = rt.job.n_blocks;
            for s in rt.job.stages.iter_mut() {
                let downstream = Some(s.attempt) == lost_attempt && s.index > stage_index && s.attempt == 0;
                let complete = stage_complete(s, &rt.done, rt.tail_done, n_blocks);
                if s.index == stage_index || (downstream && !complete && !s.worker_id.is_empty()) {
                    if s.index != stage_index {
                        cancelled_workers.push(s.worker_id.clone());
                    }
                    s.worker_id.clear();
                }
            }
            warn!(job = %job_id, worker = worker_id, "worker lost; its blocks will be planned again");
            rt.emit(format!("worker {worker_id} lost; re-planning its blocks"));
            fx.persist.push(rt.job.clone());
        }
        for w in cancelled_workers {
            if let Some(conn) = self.workers.get_mut(&w) {
                conn.current = None;
                conn.info.busy_with_job.clear();
                fx.send.push((conn.tx.clone(), cancel_command(&job_id)));
            }
        }
        if let Some((group, rank)) = group_lost {
            let reason = format!("rank {rank} (stage {stage_index} on {worker_id}) was lost");
            for m in group.members.iter().filter(|m| m.stage_index != stage_index) {
                // Only members still running their stage (the cancelled ones stop anyway).
                if let Some(conn) = self.running(&job_id, m) {
                    fx.send.push((conn.tx.clone(), nccl_lost_command(&job_id, &group.name, reason.clone())));
                }
            }
        }
    }

    /// The connection of `member`'s worker while it still runs the member's stage of `job_id`.
    fn running(&self, job_id: &str, member: &Member) -> Option<&WorkerConn> {
        self.workers
            .get(&member.worker_id)
            .filter(|c| c.current.as_ref().is_some_and(|(j, s)| j == job_id && *s == member.stage_index))
    }

    /// Relays the NCCL id that rank 0 of a group published to the workers of the other ranks
    /// still running their stage. A job that has ended takes the id and drops it.
    fn relay_nccl_id(&mut self, msg: &pb::NcclIdMessage, fx: &mut Effects) -> Result<()> {
        let rt = self.jobs.get_mut(&msg.job_id).ok_or_else(|| Error::NoSuchJob(msg.job_id.clone()))?;
        if is_terminal(rt.job.state) {
            return Ok(());
        }
        let invalid = |field, detail: String| Error::Invalid { field, detail };
        let group = rt
            .nccl_groups
            .get_mut(&msg.nccl_group)
            .ok_or_else(|| invalid("nccl_group", format!("job {} has no NCCL group {}", msg.job_id, msg.nccl_group)))?;
        let rank0 = &group.members[0];
        if msg.worker_id != rank0.worker_id {
            return Err(invalid(
                "worker_id",
                format!("{} does not hold rank 0 of NCCL group {} ({} does)", msg.worker_id, group.name, rank0.worker_id),
            ));
        }
        if msg.id.is_empty() {
            return Err(invalid("id", format!("an empty NCCL id for group {}", group.name)));
        }
        match &group.id {
            Some(id) if *id == msg.id => return Ok(()),
            Some(_) => return Err(invalid("id", format!("NCCL group {} already has another id", group.name))),
            None => group.id = Some(msg.id.clone()),
        }
        let group = group.clone();
        for m in &group.members[1..] {
            if let Some(conn) = self.running(&msg.job_id, m) {
                let id = pb::NcclIdMessage { worker_id: String::new(), ..msg.clone() };
                fx.send.push((conn.tx.clone(), pb::WorkerCommand { command: Some(Command::NcclId(id)) }));
            }
        }
        Ok(())
    }

    /// Ends `job_id` in a terminal `state` (cancelled or failed): records why, frees its
    /// workers (telling them to drop its stages) and has its staged results and unfinished output
    /// removed.
    fn end_job(&mut self, job_id: &str, state: JobState, message: String, fx: &mut Effects) {
        let Some(rt) = self.jobs.get_mut(job_id) else { return };
        rt.job.state = state as i32;
        rt.job.finished_unix_ms = now_ms();
        if state == JobState::Failed {
            rt.job.error = message.clone();
        }
        for s in rt.job.stages.iter_mut() {
            s.worker_id.clear();
        }
        rt.nccl_groups.clear();
        rt.emit(message);
        fx.persist.push(rt.job.clone());
        fx.forget.push(job_id.to_string());
        fx.discard.push(rt.discard());
        for w in self.workers.values_mut() {
            if w.current.as_ref().is_some_and(|(j, _)| j == job_id) {
                w.current = None;
                w.info.busy_with_job.clear();
                fx.send.push((w.tx.clone(), cancel_command(job_id)));
            }
        }
    }

    /// A stage of `job_id` failed through a fault of its worker or device (not of the job): its
    /// blocks are planned again, as for a lost worker, and the worker stays available (the fault
    /// may have been passing). A job whose stages keep failing so ([`MAX_FAULTS_PER_JOB`]) fails
    /// with the last fault, instead of going round for ever.
    fn stage_fault(&mut self, job_id: &str, worker_id: &str, message: String, fx: &mut Effects) {
        let Some(rt) = self.jobs.get_mut(job_id) else { return };
        rt.faults += 1;
        if rt.faults > MAX_FAULTS_PER_JOB {
            let message = format!("{} stage faults (at most {MAX_FAULTS_PER_JOB} are planned again); the last: {message}", rt.faults);
            self.end_job(job_id, JobState::Failed, message, fx);
            return;
        }
        rt.emit(format!("{message}; a fault of the worker, not of the job: planning its blocks again"));
        if let Some(w) = self.workers.get(worker_id) {
            let (tx, info, device) = (w.tx.clone(), w.info.clone(), w.device);
            self.lose_worker(worker_id, fx);
            let info = pb::WorkerInfo { busy_with_job: String::new(), ..info };
            self.workers.insert(worker_id.to_string(), WorkerConn { info, device, tx, current: None });
        }
    }

    /// Frees the workers whose stages of `job_id` have delivered everything.
    fn release_finished_stages(&mut self, job_id: &str) {
        let Some(rt) = self.jobs.get_mut(job_id) else { return };
        for s in rt.job.stages.iter_mut() {
            if s.worker_id.is_empty() {
                continue;
            }
            s.blocks_done = (s.block_start..s.block_end).filter(|b| rt.done.contains(b)).count() as u32;
            if stage_complete(s, &rt.done, rt.tail_done, rt.job.n_blocks) {
                if let Some(w) = self.workers.get_mut(&s.worker_id) {
                    if w.current.as_ref() == Some(&(job_id.to_string(), s.index)) {
                        w.current = None;
                        w.info.busy_with_job.clear();
                    }
                }
            }
        }
    }
}

/// The coordinator: cheap to clone, every clone shares one state.
#[derive(Clone)]
pub struct Coordinator {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    store: Arc<dyn Store>,
    config: CoordinatorConfig,
}

impl Coordinator {
    /// A coordinator over `store`, with the unfinished jobs of an earlier run read back from it.
    pub async fn start(store: Arc<dyn Store>, config: CoordinatorConfig) -> Result<Coordinator> {
        let mut state = State::default();
        let mut reassemble = Vec::new();
        for (key, value) in store.list(keys::JOBS).await? {
            let mut job = pb::Job::decode(&value[..]).map_err(|e| Error::Store(format!("{key}: not a Job: {e}")))?;
            let Some(req) = job.request.clone() else { continue };
            if is_terminal(job.state) {
                let (events, _) = broadcast::channel(64);
                let spec = JobSpec::recorded(&req, job.n_blocks, &job.model_type);
                state.jobs.insert(job.id.clone(), JobRuntime { job, spec, done: BTreeSet::new(), tail_done: false, events, nccl_groups: BTreeMap::new(), output: Arc::default(), faults: 0 });
                continue;
            }
            // Everything that was running lost its workers with the old coordinator.
            for s in job.stages.iter_mut() {
                s.worker_id.clear();
            }
            // The output may exist by now (a job that was assembling): checked as if it may be
            // replaced, then given back the request's own choice.
            let spec = match validate(&pb::SubmitRequest { overwrite: true, ..req.clone() }, &[]) {
                Ok(spec) => JobSpec { overwrite: req.overwrite, ..spec },
                Err(e) => {
                    job.state = JobState::Failed as i32;
                    job.error = format!("cannot resume after a coordinator restart: {e}");
                    let (events, _) = broadcast::channel(64);
                    let spec = JobSpec::recorded(&req, job.n_blocks, &job.model_type);
                    state.jobs.insert(job.id.clone(), JobRuntime { job, spec, done: BTreeSet::new(), tail_done: false, events, nccl_groups: BTreeMap::new(), output: Arc::default(), faults: 0 });
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
            job.blocks_done = done.len() as u32;
            info!(job = %job.id, blocks_done = done.len(), "resuming job after restart");
            if job.state == JobState::Assembling as i32 {
                reassemble.push(job.id.clone());
            }
            state.next_job = state.next_job.max(job.created_unix_ms);
            let (events, _) = broadcast::channel(64);
            state.jobs.insert(job.id.clone(), JobRuntime { job, spec, done, tail_done, events, nccl_groups: BTreeMap::new(), output: Arc::default(), faults: 0 });
        }
        let coordinator = Coordinator { shared: Arc::new(Shared { state: Mutex::new(state), store, config }) };
        for id in reassemble {
            coordinator.spawn_assembly(id);
        }
        Ok(coordinator)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().expect("the state lock is never held across a panic")
    }

    /// Carries out what was decided under the lock.
    async fn apply(&self, fx: Effects) {
        // Started before the first await: even if this future is dropped (a request whose client
        // went away), an ended job's folders go.
        let removals: Vec<_> = fx.discard.into_iter().map(Discard::start).collect();
        for job in fx.persist {
            if let Err(e) = self.shared.store.put(&keys::job(&job.id), job.encode_to_vec()).await {
                warn!(job = %job.id, "cannot persist job: {e}");
            }
        }
        for (tx, cmd) in fx.send {
            // A worker that went away is noticed by its own connection task.
            let _ = tx.send(Ok(cmd)).await;
        }
        for id in fx.assemble {
            self.spawn_assembly(id);
        }
        for id in fx.forget {
            self.forget_results(&id).await;
        }
        for removal in removals {
            if let Err(e) = removal.await {
                warn!("removing a job's working folders panicked: {e}");
            }
        }
    }

    /// Removes a job's block and tail keys from the store (a job that ended, with or without
    /// output, is never resumed; only its job record stays).
    async fn forget_results(&self, job_id: &str) {
        for prefix in [keys::blocks(job_id), keys::tail(job_id)] {
            if let Err(e) = self.shared.store.delete_prefix(&prefix).await {
                warn!(job = %job_id, "cannot remove {prefix} from the store: {e}");
            }
        }
    }

    fn spawn_assembly(&self, job_id: String) {
        let this = self.clone();
        tokio::spawn(async move {
            let (spec, staging, output) = {
                let mut st = this.lock();
                let Some(rt) = st.jobs.get_mut(&job_id) else { return };
                rt.job.state = JobState::Assembling as i32;
                rt.emit("assembling the checkpoint");
                (rt.spec.clone(), rt.staging(), rt.output.clone())
            };
            let job = this.lock().jobs.get(&job_id).map(|rt| rt.job.clone());
            if let Some(job) = job {
                let _ = this.shared.store.put(&keys::job(&job_id), job.encode_to_vec()).await;
            }
            let id = job_id.clone();
            let result = tokio::task::spawn_blocking(move || assemble(&spec, &id, &staging, &output)).await;
            if !matches!(result, Ok(Ok(()))) {
                // A failed job is never resumed: its staged results and unfinished output would
                // only be litter. Removed before the failure is told, so that a watcher that
                // exits on it (the embedded `awq quantize`) leaves nothing behind.
                let discard = this.lock().jobs.get(&job_id).map(JobRuntime::discard);
                if let Some(discard) = discard {
                    discard.run().await;
                }
            }
            let job = {
                let mut st = this.lock();
                let Some(rt) = st.jobs.get_mut(&job_id) else { return };
                rt.nccl_groups.clear();
                match result {
                    Ok(Ok(())) => {
                        rt.job.state = JobState::Done as i32;
                        info!(job = %job_id, "done");
                    }
                    Ok(Err(e)) => {
                        rt.job.state = JobState::Failed as i32;
                        rt.job.error = format!("assembly failed: {e}");
                    }
                    Err(e) => {
                        rt.job.state = JobState::Failed as i32;
                        rt.job.error = format!("assembly panicked: {e}");
                    }
                }
                rt.job.finished_unix_ms = now_ms();
                let msg = if rt.job.state == JobState::Done as i32 { "done".to_string() } else { rt.job.error.clone() };
                rt.emit(msg);
                rt.job.clone()
            };
            let _ = this.shared.store.put(&keys::job(&job_id), job.encode_to_vec()).await;
            this.forget_results(&job_id).await;
            let mut fx = Effects::default();
            this.lock().schedule(&mut fx);
            this.apply(fx).await;
        });
    }

    /// Serves the job and worker services on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::result::Result<(), tonic::transport::Error> {
        let limit = awq_proto::MAX_MESSAGE_BYTES;
        let jobs = JobServiceServer::new(self.clone()).max_decoding_message_size(limit).max_encoding_message_size(limit);
        let workers = WorkerServiceServer::new(self).max_decoding_message_size(limit).max_encoding_message_size(limit);
        tonic::transport::Server::builder()
            // Results are tens to hundreds of MB: HTTP/2's default 64 KiB windows would stall the
            // stream on a window update every 64 KiB.
            .initial_stream_window_size(Some(awq_proto::STREAM_WINDOW_BYTES))
            .initial_connection_window_size(Some(awq_proto::CONNECTION_WINDOW_BYTES))
            .http2_keepalive_interval(Some(Duration::from_secs(5)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(jobs)
            .add_service(workers)
            .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
            .await
    }

    /// Records a staged result and moves the job on.
    async fn finish_result(&self, header: &pb::ResultHeader) -> Result<()> {
        let key = if header.is_tail { keys::tail(&header.job_id) } else { keys::block(&header.job_id, header.block_idx) };
        self.shared.store.put(&key, b"staged".to_vec()).await?;
        let fx = self.record_result(header);
        self.apply(fx).await;
        Ok(())
    }

    /// Records a stored result in the job's state; what follows from it is returned, to apply
    /// once the state lock is released.
    fn record_result(&self, header: &pb::ResultHeader) -> Effects {
        let mut fx = Effects::default();
        let mut st = self.lock();
        let Some(rt) = st.jobs.get_mut(&header.job_id).filter(|rt| !is_terminal(rt.job.state)) else {
            // The job ended while this result was on its way: its keys may have been removed
            // before ours was written.
            fx.forget.push(header.job_id.clone());
            return fx;
        };
        if header.is_tail {
            rt.tail_done = true;
        } else {
            rt.done.insert(header.block_idx);
        }
        rt.job.blocks_done = rt.done.len() as u32;
        let what = if header.is_tail { "tail".to_string() } else { format!("block {}", header.block_idx) };
        st.release_finished_stages(&header.job_id);
        let rt = st.jobs.get_mut(&header.job_id).expect("present above");
        rt.emit(format!("{what} done by {}", header.worker_id));
        fx.persist.push(rt.job.clone());
        if rt.all_done() && rt.job.state == JobState::Running as i32 {
            rt.job.state = JobState::Assembling as i32;
            fx.assemble.push(header.job_id.clone());
        }
        st.schedule(&mut fx);
        fx
    }

    fn job_or_404(&self, id: &str) -> Result<pb::Job> {
        self.lock().jobs.get(id).map(|rt| rt.job.clone()).ok_or_else(|| Error::NoSuchJob(id.to_string()))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;
type CommandStream = Pin<Box<dyn Stream<Item = Result<pb::WorkerCommand, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for Coordinator {
    async fn submit(&self, request: Request<pb::SubmitRequest>) -> Result<Response<pb::SubmitResponse>, Status> {
        let req = request.into_inner();
        let roots = self.shared.config.roots.clone();
        let check = req.clone();
        let spec = tokio::task::spawn_blocking(move || validate(&check, &roots))
            .await
            .map_err(|e| Status::internal(format!("validation panicked: {e}")))??;
        let mut fx = Effects::default();
        let job = {
            let mut st = self.lock();
            // Ids sort by submission time and stay unique across restarts (the counter starts
            // above every id read back).
            st.next_job = st.next_job.max(now_ms()) + 1;
            let id = format!("j{:x}", st.next_job);
            let job = pb::Job {
                id: id.clone(),
                state: JobState::Queued as i32,
                request: Some(req),
                n_blocks: spec.n_blocks,
                created_unix_ms: st.next_job,
                model_type: spec.model_type.clone(),
                ..Default::default()
            };
            let (events, _) = broadcast::channel(256);
            st.jobs.insert(id.clone(), JobRuntime { job, spec, done: BTreeSet::new(), tail_done: false, events, nccl_groups: BTreeMap::new(), output: Arc::default(), faults: 0 });
            let job = st.jobs[&id].job.clone();
            fx.persist.push(job.clone());
            st.schedule(&mut fx);
            info!(job = %id, "submitted");
            st.jobs[&id].job.clone()
        };
        self.apply(fx).await;
        Ok(Response::new(pb::SubmitResponse { job: Some(job) }))
    }

    async fn get_job(&self, request: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        Ok(Response::new(self.job_or_404(&request.into_inner().job_id)?))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(&self, request: Request<pb::WatchJobRequest>) -> Result<Response<EventStream>, Status> {
        let id = request.into_inner().job_id;
        let (job, mut rx) = {
            let st = self.lock();
            let rt = st.jobs.get(&id).ok_or_else(|| Error::NoSuchJob(id.clone()))?;
            (rt.job.clone(), rt.events.subscribe())
        };
        let (tx, out) = mpsc::channel(64);
        let this = self.clone();
        tokio::spawn(async move {
            let terminal = is_terminal(job.state);
            if tx.send(Ok(pb::JobEvent { job: Some(job), message: "current state".into() })).await.is_err() || terminal {
                return;
            }
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
                let terminal = event.job.as_ref().is_some_and(|j| is_terminal(j.state));
                if tx.send(Ok(event)).await.is_err() || terminal {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn cancel_job(&self, request: Request<pb::CancelJobRequest>) -> Result<Response<pb::Job>, Status> {
        let id = request.into_inner().job_id;
        let mut fx = Effects::default();
        let job = {
            let mut st = self.lock();
            let rt = st.jobs.get(&id).ok_or_else(|| Error::NoSuchJob(id.clone()))?;
            if is_terminal(rt.job.state) || rt.job.state == JobState::Assembling as i32 {
                return Err(Status::failed_precondition(format!("job {id} is {:?} and cannot be cancelled", rt.job.state())));
            }
            st.end_job(&id, JobState::Cancelled, "cancelled".into(), &mut fx);
            st.schedule(&mut fx);
            st.jobs[&id].job.clone()
        };
        self.apply(fx).await;
        Ok(Response::new(job))
    }

    async fn list_jobs(&self, _: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        let jobs = self.lock().jobs.values().map(|rt| rt.job.clone()).collect();
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn list_workers(&self, _: Request<pb::ListWorkersRequest>) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let workers = self.lock().workers.values().map(|w| w.info.clone()).collect();
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
        let worker_id = {
            let mut st = self.lock();
            st.next_worker += 1;
            let name = if req.name.is_empty() { "worker".to_string() } else { req.name.clone() };
            format!("{name}-{}", st.next_worker)
        };
        let device = device_from_wire(req.compute_device.as_ref(), "compute_device").map_err(Error::from)?;
        let info = pb::WorkerInfo {
            worker_id: worker_id.clone(),
            name: req.name,
            compute_device: req.compute_device,
            gpu_model: req.gpu_model,
            memory_bytes: req.memory_bytes,
            stage_address: req.stage_address,
            busy_with_job: String::new(),
            connected_unix_ms: now_ms(),
        };
        let lease = self.shared.store.grant_lease(WORKER_LEASE_TTL_S).await?;
        self.shared.store.put_leased(&keys::worker(&worker_id), info.encode_to_vec(), lease).await?;
        let welcome = pb::WorkerCommand { command: Some(Command::WelcomeWorkerId(worker_id.clone())) };
        tx.send(Ok(welcome)).await.map_err(|_| Status::cancelled("worker left while joining"))?;
        let mut fx = Effects::default();
        {
            let mut st = self.lock();
            st.workers.insert(worker_id.clone(), WorkerConn { info, device, tx: tx.clone(), current: None });
            st.schedule(&mut fx);
        }
        info!(worker = %worker_id, "joined");
        self.apply(fx).await;

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
                let mut fx = Effects::default();
                {
                    let mut st = this.lock();
                    st.lose_worker(&worker_id, &mut fx);
                    st.schedule(&mut fx);
                }
                info!("left");
                this.apply(fx).await;
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn upload(&self, request: Request<Streaming<pb::UploadMessage>>) -> Result<Response<pb::UploadResponse>, Status> {
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
                return Err(Status::resource_exhausted(format!("payload of {} bytes exceeds {MAX_PAYLOAD_BYTES}", chunk.total_bytes)));
            }
            // The whole payload at once: gigabytes for a large model's tail, which growing by
            // doubling would copy over and over.
            if payload.is_empty() {
                payload.reserve_exact(chunk.total_bytes as usize);
            }
            if chunk.offset != payload.len() as u64 || crc32fast::hash(&chunk.data) != chunk.crc32 {
                return Err(Error::DataLoss(format!("chunk at offset {} failed its offset or CRC check", chunk.offset)).into());
            }
            payload.extend_from_slice(&chunk.data);
        }
        if crc32fast::hash(&payload) != header.payload_crc32 {
            return Err(Error::DataLoss(format!("payload of {} bytes failed its CRC check", payload.len())).into());
        }
        let (spec, staging, output) = {
            let st = self.lock();
            match st.jobs.get(&header.job_id) {
                Some(rt) if !is_terminal(rt.job.state) => (rt.spec.clone(), rt.staging(), rt.output.clone()),
                // Late results of a cancelled or finished job are dropped.
                _ => return Ok(Response::new(pb::UploadResponse {})),
            }
        };
        let part = if header.is_tail { ModelPart::Tail } else { ModelPart::Block(header.block_idx as usize) };
        let (job_id, source, report) = (header.job_id.clone(), format!("upload from {}", header.worker_id), header.report_json.clone());
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
        let written = tokio::task::spawn_blocking(write).await.map_err(|e| Status::internal(e.to_string()))??;
        // The job may have ended (cancelled, failed) while the result was written; its folders
        // were removed then, and the write above may have created them again.
        let ended = self.lock().jobs.get(&header.job_id).filter(|rt| is_terminal(rt.job.state)).map(JobRuntime::discard);
        if let Some(discard) = ended {
            discard.run().await;
            return Ok(Response::new(pb::UploadResponse {}));
        }
        if !written {
            return Ok(Response::new(pb::UploadResponse {}));
        }
        self.finish_result(&header).await?;
        Ok(Response::new(pb::UploadResponse {}))
    }

    async fn publish_nccl_id(&self, request: Request<pb::NcclIdMessage>) -> Result<Response<pb::PublishNcclIdResponse>, Status> {
        let msg = request.into_inner();
        let mut fx = Effects::default();
        self.lock().relay_nccl_id(&msg, &mut fx)?;
        self.apply(fx).await;
        Ok(Response::new(pb::PublishNcclIdResponse {}))
    }

    async fn report_failure(&self, request: Request<pb::StageFailure>) -> Result<Response<pb::ReportFailureResponse>, Status> {
        let f = request.into_inner();
        let mut fx = Effects::default();
        {
            let mut st = self.lock();
            if let Some(rt) = st.jobs.get_mut(&f.job_id) {
                if !is_terminal(rt.job.state) {
                    warn!(job = %f.job_id, worker = %f.worker_id, "stage {} failed: {}", f.stage_index, f.error);
                    let message = format!("stage {} on {}: {}", f.stage_index, f.worker_id, f.error);
                    if f.bad_input {
                        st.end_job(&f.job_id, JobState::Failed, message, &mut fx);
                    } else {
                        st.stage_fault(&f.job_id, &f.worker_id, message, &mut fx);
                    }
                }
            }
            st.schedule(&mut fx);
        }
        self.apply(fx).await;
        Ok(Response::new(pb::ReportFailureResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state with workers `(id, device, host)` (plenty of memory each) and one job `j1` of
    /// `n_blocks` blocks with `method`, not yet planned.
    fn state(workers: &[(&str, &str, &str)], n_blocks: u32, method: &str) -> State {
        let mut st = State::default();
        for (k, &(id, device, host)) in workers.iter().enumerate() {
            add_worker(&mut st, id, device, &format!("{host}:{}", 50152 + k));
        }
        let method = match method {
            "awq" => awq_job::Method::Awq,
            _ => awq_job::Method::Rtn,
        };
        let options = awq_job::JobOptions { method, ..Default::default() };
        let request = pb::SubmitRequest {
            model_path: "/models/m".into(),
            output_path: "/nonexistent/awq-out".into(),
            options: Some((&options).into()),
            overwrite: false,
        };
        let job = pb::Job {
            id: "j1".into(),
            state: JobState::Queued as i32,
            request: Some(request.clone()),
            n_blocks,
            created_unix_ms: 1,
            ..Default::default()
        };
        let spec = JobSpec { per_block_bytes: 1, ..JobSpec::recorded(&request, n_blocks, "llama") };
        let (events, _) = broadcast::channel(64);
        st.jobs.insert("j1".into(), JobRuntime { job, spec, done: BTreeSet::new(), tail_done: false, events, nccl_groups: BTreeMap::new(), output: Arc::default(), faults: 0 });
        st
    }

    fn add_worker(st: &mut State, id: &str, device: &str, stage_address: &str) {
        let (tx, _rx) = mpsc::channel(8);
        let device: Device = device.parse().unwrap();
        let info = pb::WorkerInfo {
            worker_id: id.into(),
            compute_device: Some(device_to_wire(device)),
            memory_bytes: 1 << 40,
            stage_address: stage_address.into(),
            ..Default::default()
        };
        st.workers.insert(id.into(), WorkerConn { info, device, tx, current: None });
    }

    /// The commands `fx` sends to worker `id` (which must still be known), in order.
    fn commands_to(st: &State, fx: &Effects, id: &str) -> Vec<Command> {
        let tx = &st.workers[id].tx;
        fx.send.iter().filter(|(to, _)| to.same_channel(tx)).filter_map(|(_, cmd)| cmd.command.clone()).collect()
    }

    /// The one assignment `fx` sends to worker `id`.
    fn assignment_of(st: &State, fx: &Effects, id: &str) -> pb::Assignment {
        let assigned: Vec<pb::Assignment> = commands_to(st, fx, id)
            .into_iter()
            .filter_map(|c| match c {
                Command::Assign(a) => Some(a),
                _ => None,
            })
            .collect();
        assert_eq!(assigned.len(), 1, "assignments to {id}: {assigned:?}");
        assigned.into_iter().next().expect("one")
    }

    /// (transport, group, rank, ranks, input) of an assignment.
    fn nccl_of(a: &pb::Assignment) -> (pb::ActivationTransport, &str, u32, u32, pb::StageInput) {
        (a.transport(), a.nccl_group.as_str(), a.nccl_rank, a.nccl_ranks, a.input())
    }

    fn schedule(st: &mut State) -> Effects {
        let mut fx = Effects::default();
        st.schedule(&mut fx);
        fx
    }

    fn publish(st: &mut State, group: &str, worker: &str, id: &[u8]) -> (Result<()>, Effects) {
        let mut fx = Effects::default();
        let msg = pb::NcclIdMessage { job_id: "j1".into(), nccl_group: group.into(), id: id.to_vec(), worker_id: worker.into() };
        (st.relay_nccl_id(&msg, &mut fx), fx)
    }

    use pb::ActivationTransport::{Grpc, Nccl};
    use pb::StageInput::{Embeddings, PreviousStage};

    #[test]
    fn a_first_awq_plan_over_gpus_is_one_nccl_group_in_chain_order() {
        let mut st = state(&[("w0", "cuda:0", "a"), ("w1", "cuda:1", "a"), ("w2", "cuda:0", "b")], 6, "awq");
        let fx = schedule(&mut st);
        assert_eq!(nccl_of(&assignment_of(&st, &fx, "w0")), (Nccl, "j1/0/0", 0, 3, Embeddings));
        assert_eq!(nccl_of(&assignment_of(&st, &fx, "w1")), (Nccl, "j1/0/0", 1, 3, PreviousStage));
        assert_eq!(nccl_of(&assignment_of(&st, &fx, "w2")), (Nccl, "j1/0/0", 2, 3, PreviousStage));
        // The chain itself is as before: each stage names the next one.
        let (a0, a2) = (assignment_of(&st, &fx, "w0"), assignment_of(&st, &fx, "w2"));
        assert_eq!((a0.next_stage_address.as_str(), a0.next_stage_index), ("a:50153", 1));
        assert_eq!((a0.block_start, a0.block_end, a2.block_start, a2.block_end), (0, 2, 4, 6));
        assert!(a2.next_stage_address.is_empty());
        let group = &st.jobs["j1"].nccl_groups["j1/0/0"];
        let members: Vec<(&str, u32)> = group.members.iter().map(|m| (m.worker_id.as_str(), m.stage_index)).collect();
        assert_eq!(members, [("w0", 0), ("w1", 1), ("w2", 2)]);
        assert_eq!(group.id, None);
    }

    #[test]
    fn mixed_chains_and_unchained_jobs_stay_on_grpc() {
        let mut st = state(&[("w0", "cuda:0", "a"), ("w1", "cpu", "a")], 4, "awq");
        let fx = schedule(&mut st);
        assert_eq!(nccl_of(&assignment_of(&st, &fx, "w0")), (Grpc, "", 0, 0, Embeddings));
        assert_eq!(nccl_of(&assignment_of(&st, &fx, "w1")), (Grpc, "", 0, 0, PreviousStage));
        assert!(st.jobs["j1"].nccl_groups.is_empty());

        // RTN passes no activations: no chain, no group, even on GPUs.
        let mut st = state(&[("w0", "cuda:0", "a"), ("w1", "cuda:1", "a")], 4, "rtn");
        let fx = schedule(&mut st);
        assert_eq!(nccl_of(&assignment_of(&st, &fx, "w0")), (Grpc, "", 0, 0, Embeddings));
        assert_eq!(nccl_of(&assignment_of(&st, &fx, "w1")), (Grpc, "", 0, 0, Embeddings));

        // Two workers on one GPU: NCCL would refuse them.
        let mut st = state(&[("w0", "cuda:0", "a"), ("w1", "cuda:0", "a")], 4, "awq");
        let fx = schedule(&mut st);
        assert_eq!(nccl_of(&assignment_of(&st, &fx, "w1")), (Grpc, "", 0, 0, PreviousStage));
    }

    #[test]
    fn rank_0_publishes_and_the_id_reaches_the_other_ranks_only() {
        let mut st = state(&[("w0", "cuda:0", "a"), ("w1", "cuda:1", "a"), ("w2", "cuda:2", "a")], 6, "awq");
        schedule(&mut st);
        let id = [7u8; 128];
        let (result, fx) = publish(&mut st, "j1/0/0", "w0", &id);
        result.unwrap();
        assert!(commands_to(&st, &fx, "w0").is_empty());
        for w in ["w1", "w2"] {
            match &commands_to(&st, &fx, w)[..] {
                [Command::NcclId(m)] => assert_eq!((m.job_id.as_str(), m.nccl_group.as_str(), &m.id[..]), ("j1", "j1/0/0", &id[..])),
                other => panic!("{w} got {other:?}"),
            }
        }
        assert_eq!(st.jobs["j1"].nccl_groups["j1/0/0"].id.as_deref(), Some(&id[..]));

        // The same id again is a no-op; anything else names the field at fault.
        let (result, fx) = publish(&mut st, "j1/0/0", "w0", &id);
        result.unwrap();
        assert!(fx.send.is_empty());
        let refused = |st: &mut State, group: &str, worker: &str, id: &[u8], field: &str, text: &str| {
            let (result, fx) = publish(st, group, worker, id);
            let err = result.unwrap_err();
            assert!(matches!(&err, Error::Invalid { field: f, .. } if *f == field), "{err}");
            assert!(err.to_string().contains(text), "{err}");
            assert!(fx.send.is_empty());
        };
        refused(&mut st, "j1/0/0", "w0", &[8u8; 128], "id", "already has another id");
        refused(&mut st, "j1/0/0", "w1", &id, "worker_id", "w1 does not hold rank 0");
        refused(&mut st, "j1/0/9", "w0", &id, "nccl_group", "no NCCL group j1/0/9");
        let mut st2 = state(&[("w0", "cuda:0", "a"), ("w1", "cuda:1", "a")], 6, "awq");
        schedule(&mut st2);
        refused(&mut st2, "j1/0/0", "w0", &[], "id", "empty NCCL id");
        let mut fx = Effects::default();
        let unknown = pb::NcclIdMessage { job_id: "j9".into(), ..Default::default() };
        assert!(matches!(st2.relay_nccl_id(&unknown, &mut fx), Err(Error::NoSuchJob(j)) if j == "j9"));
    }

    #[test]
    fn a_lost_rank_stops_the_group_and_its_blocks_start_over_from_the_embeddings() {
        let mut st = state(&[("w0", "cuda:0", "a"), ("w1", "cuda:1", "a"), ("w2", "cuda:2", "a")], 6, "awq");
        schedule(&mut st);
        let mut fx = Effects::default();
        st.lose_worker("w1", &mut fx);
        // Downstream: cancelled, as on gRPC. Upstream, still running its stage: told the group is
        // lost, so it stops waiting for rank 1.
        assert!(matches!(&commands_to(&st, &fx, "w2")[..], [Command::Cancel(c)] if c.job_id == "j1"));
        match &commands_to(&st, &fx, "w0")[..] {
            [Command::NcclGroupLost(m)] => {
                assert_eq!((m.job_id.as_str(), m.nccl_group.as_str()), ("j1", "j1/0/0"));
                assert!(m.reason.contains("rank 1 (stage 1 on w1) was lost"), "{}", m.reason);
            }
            other => panic!("w0 got {other:?}"),
        }

        // Planned again over w2 (now idle) and a new GPU worker: attempt 1, inputs from the
        // embeddings, so no stage joins the old group and none receives anything.
        add_worker(&mut st, "w3", "cuda:3", "a:50160");
        let fx = schedule(&mut st);
        for w in ["w2", "w3"] {
            let a = assignment_of(&st, &fx, w);
            assert_eq!((a.attempt, nccl_of(&a)), (1, (Grpc, "", 0, 0, Embeddings)), "{w}");
        }
        // An id published late for the old group still reaches nobody who stopped.
        let (result, fx) = publish(&mut st, "j1/0/0", "w0", &[1u8; 128]);
        result.unwrap();
        assert!(fx.send.is_empty(), "{:?}", fx.send.iter().map(|(_, c)| c).collect::<Vec<_>>());
    }

    #[test]
    fn a_job_that_ends_drops_its_groups_and_takes_late_ids_without_relaying() {
        let mut st = state(&[("w0", "cuda:0", "a"), ("w1", "cuda:1", "a")], 4, "awq");
        schedule(&mut st);
        let mut fx = Effects::default();
        st.end_job("j1", JobState::Cancelled, "cancelled".into(), &mut fx);
        assert!(st.jobs["j1"].nccl_groups.is_empty());
        let (result, fx) = publish(&mut st, "j1/0/0", "w0", &[1u8; 128]);
        result.unwrap();
        assert!(fx.send.is_empty());
    }

    #[test]
    fn a_stage_fault_plans_the_blocks_again_until_the_job_has_had_too_many() {
        let mut st = state(&[("w0", "cpu", "a"), ("w1", "cpu", "b")], 4, "awq");
        schedule(&mut st);
        for fault in 1..=MAX_FAULTS_PER_JOB {
            let mut fx = Effects::default();
            st.stage_fault("j1", "w1", format!("stage on w1: device fault {fault}"), &mut fx);
            st.schedule(&mut fx);
            let rt = &st.jobs["j1"];
            assert_eq!(rt.job.state, JobState::Running as i32, "fault {fault}");
            // The worker stays, idle, and takes the blocks again (from the embeddings).
            let a = assignment_of(&st, &fx, "w1");
            assert_eq!((a.attempt, a.input()), (fault, Embeddings), "fault {fault}");
            assert_eq!(rt.job.stages.iter().filter(|s| s.worker_id == "w1").count(), 1);
        }
        let mut fx = Effects::default();
        st.stage_fault("j1", "w1", "stage on w1: device fault again".into(), &mut fx);
        let rt = &st.jobs["j1"];
        assert_eq!(rt.job.state, JobState::Failed as i32);
        assert!(rt.job.error.contains("4 stage faults") && rt.job.error.contains("device fault again"), "{}", rt.job.error);
    }
}
