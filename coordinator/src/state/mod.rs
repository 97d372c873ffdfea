//! The coordinator's state: every job and every joined worker, and what each event does to them
//! (a submit, a join, a lost worker, a result, a stage failure, a cancel, an NCCL id, an assembly).
//!
//! [`State`] holds [`Job`]s (with what the coordinator keeps per job while it runs: finished blocks,
//! NCCL groups, faults) and [`WorkerRecord`]s. Each transition records what it decided in
//! [`Effects`]: commands to workers named by id ([`WorkerCommand`]), job events for watchers, jobs to
//! persist, assemblies to start, results to forget and working folders to remove. The caller
//! (`crate::service`) runs transitions under its lock and carries the effects out after it.
//! Planning (which idle worker takes which unfinished blocks) is [`scheduler`]'s part of `State`.
//!
//! Pure: no gRPC or channels, no store, no files, no clock (callers pass the time), no `awq.v1`
//! types (`crate::wire` converts at the edge). It never decides how a command travels or whether a
//! result's bytes are good; it takes what the service checked.

pub mod scheduler;
pub mod serving;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use awq_job::Device;
use awq_model::manifest::ModelPart;
use tracing::{info, warn};

use crate::nccl::{Member, NcclGroup};
use crate::validate::JobSpec;
use crate::{Error, Result};
pub use scheduler::{Assignment, StageInput, Transport};
pub use serving::{Deployment, RejoinedStage, ReplicaRecord, ReplicaReport, ReplicaState, REJOIN_GRACE};

/// Stage faults (device errors, failed transfers) a job survives; one more fails it.
pub const MAX_FAULTS_PER_JOB: u32 = 3;

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Accepted, waiting for workers.
    Queued,
    /// Stages planned and computing.
    Running,
    /// Every result in; the checkpoint is being written.
    Assembling,
    /// The output was renamed into place.
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    /// Whether the job has ended: nothing about it changes again.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Done | JobState::Failed | JobState::Cancelled)
    }
}

/// A job, as clients see it and the store records it.
#[derive(Clone, Debug)]
pub struct Job {
    pub id: String,
    pub state: JobState,
    /// What was asked for, checked.
    pub spec: JobSpec,
    /// The model's blocks, as recorded at submission (what planning covers; a resumed job keeps
    /// its record's count even if the model on disk changed).
    pub n_blocks: u32,
    pub blocks_done: u32,
    /// Every stage planned so far, in planning order.
    pub stages: Vec<Stage>,
    /// Why it failed.
    pub error: Option<String>,
    pub created_unix_ms: u64,
    pub finished_unix_ms: Option<u64>,
    /// The model's architecture, as recorded at submission.
    pub model_type: String,
    /// Why its results wait (the coordinator's disk is full) since the last one was written.
    pub waiting_for_space: Option<String>,
}

/// A pipeline stage: a contiguous block range given to one worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    pub index: u32,
    /// The worker it was given to; `None` once it was taken back (its worker lost, a stage before
    /// it in its chain lost, its job ended). A stage that delivered everything keeps its worker.
    pub worker: Option<String>,
    pub blocks: Range<u32>,
    /// Blocks of the range finished, as of the last result while the stage held its worker.
    pub blocks_done: u32,
    /// 0 for the first plan, +1 for each plan after.
    pub attempt: u32,
}

/// One stage of one job, as a worker's current work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageRef {
    pub job_id: String,
    pub stage_index: u32,
}

/// A joined worker.
#[derive(Clone, Debug)]
pub struct WorkerRecord {
    /// Its name and a number, unique for this coordinator's life.
    pub id: String,
    /// The name it joined with (may be empty).
    pub name: String,
    /// Where it computes.
    pub device: Device,
    /// Where its replicas' tensor-parallel ranks may run: `device` first (a replica of `tp` ranks
    /// on a GPU worker takes the first `tp`).
    pub serving_devices: Vec<Device>,
    pub gpu_model: String,
    /// Memory it offers for blocks and activations.
    pub memory_bytes: u64,
    /// `host:port` of its StageService, where the stage before its own sends activations.
    pub stage_address: String,
    /// The stage it works on; `None` when idle.
    pub busy_with: Option<StageRef>,
    /// The replica it serves (deployment, index); a serving worker takes no stage.
    pub serving: Option<(String, u32)>,
    pub connected_unix_ms: u64,
}

/// What the coordinator tells a worker.
#[derive(Clone, Debug, PartialEq)]
pub enum WorkerCommand {
    /// Run a stage.
    Assign(Assignment),
    /// Drop every stage of the job.
    Cancel { job_id: String },
    /// The unique id of an NCCL group the worker holds a rank of (published by rank 0).
    NcclId { job_id: String, group: String, id: Vec<u8> },
    /// A member of the group was lost: give up its NCCL calls.
    NcclGroupLost { job_id: String, group: String, reason: String },
    /// Load and serve a replica of a deployment on `devices` (the worker's).
    Serve {
        spec: awq_job::deployment::DeploymentSpec,
        replica: u32,
        generation: u32,
        devices: Vec<Device>,
        /// The stage it runs of a pipelined replica (`None`: the whole model).
        stage: Option<serving::StageAssignment>,
        /// The job that deployed its output, whose blocks the worker may hold in memory.
        kept_job: Option<String>,
    },
    /// Stop serving a replica (undeployed, or placed elsewhere), unless a newer generation replaced it.
    StopReplica { deployment: String, replica: u32, generation: u32 },
}

/// A stage that failed, as its worker reported it.
#[derive(Clone, Debug)]
pub struct StageFailure {
    pub job_id: String,
    pub worker_id: String,
    pub stage_index: u32,
    pub error: String,
    pub cause: FailureCause,
}

/// Whose fault a stage failure is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureCause {
    /// The job itself is bad (its model, its options): it fails.
    BadInput,
    /// The worker or its device failed: the blocks are planned again (see [`State::stage_fault`]).
    Fault,
}

/// A change of a job, for its watchers: the job as it was right after the change, and what changed.
#[derive(Clone, Debug)]
pub struct JobEvent {
    pub job: Job,
    pub message: String,
}

/// What transitions decided, to carry out once the state's lock is released.
#[derive(Debug, Default)]
pub struct Effects {
    /// Commands, in order, to the workers named by id.
    pub commands: Vec<(String, WorkerCommand)>,
    /// Job events, in order.
    pub events: Vec<JobEvent>,
    /// Jobs to write to the store, as they were then.
    pub persist: Vec<Job>,
    /// Jobs whose every result is in: their assembly starts.
    pub assemble: Vec<String>,
    /// Jobs that ended: their block and tail keys go from the store.
    pub forget: Vec<String>,
    /// Jobs that ended without output: their output closes, their working folders go.
    pub discard: Vec<String>,
    /// Deployments to write to the store, as they were then.
    pub persist_deployments: Vec<Deployment>,
    /// Deployments that were undeployed: their keys go from the store.
    pub forget_deployments: Vec<String>,
    /// Pipelined replicas `(deployment, replica, generation)` whose first stage rejoined: after
    /// `serving::REJOIN_GRACE`, [`State::rejoin_expired`].
    pub rejoin_deadlines: Vec<(String, u32, u32)>,
}

/// A job and what the coordinator keeps about it while it runs.
#[derive(Debug)]
struct JobRuntime {
    job: Job,
    /// Finished blocks.
    done: BTreeSet<u32>,
    tail_done: bool,
    /// The NCCL groups of its stages, by name, until the job ends.
    nccl_groups: BTreeMap<String, NcclGroup>,
    /// Stage faults so far (see [`State::stage_fault`]).
    faults: u32,
}

impl JobRuntime {
    fn new(job: Job, done: BTreeSet<u32>, tail_done: bool) -> JobRuntime {
        JobRuntime { job, done, tail_done, nccl_groups: BTreeMap::new(), faults: 0 }
    }

    fn emit(&self, message: impl Into<String>, fx: &mut Effects) {
        fx.events.push(JobEvent { job: self.job.clone(), message: message.into() });
    }

    fn all_done(&self) -> bool {
        self.tail_done && self.done.len() as u32 == self.job.n_blocks
    }

    /// Whether stage `s` has delivered everything it was asked for: its blocks and, when it holds
    /// the last block, the tail.
    fn stage_complete(&self, s: &Stage) -> bool {
        s.blocks.clone().all(|b| self.done.contains(&b)) && (s.blocks.end != self.job.n_blocks || self.tail_done)
    }
}

/// Every job and every joined worker (see the module docs).
#[derive(Debug, Default)]
pub struct State {
    jobs: BTreeMap<String, JobRuntime>,
    workers: BTreeMap<String, WorkerRecord>,
    deployments: serving::Deployments,
    next_worker: u64,
    next_job: u64,
}

impl State {
    pub fn job(&self, id: &str) -> Option<&Job> {
        self.jobs.get(id).map(|rt| &rt.job)
    }

    /// Every job, by id.
    pub fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values().map(|rt| &rt.job)
    }

    /// Every joined worker, by id.
    pub fn workers(&self) -> impl Iterator<Item = &WorkerRecord> {
        self.workers.values()
    }

    /// Takes back a job recorded by an earlier coordinator that can run on (queued, running or
    /// assembling), with the blocks (and tail) it finished then; returns its state now. Nothing is
    /// planned yet. A job whose every result was recorded is `Assembling` (the caller assembles
    /// it), whatever its record said: the earlier coordinator may have died between recording the
    /// last result and recording that the job assembles, and nothing would plan such a job again.
    pub fn resume(&mut self, job: Job, done: BTreeSet<u32>, tail_done: bool) -> JobState {
        let job = Job { blocks_done: done.len() as u32, ..job };
        // Ids sort by submission time and stay unique across restarts.
        self.next_job = self.next_job.max(job.created_unix_ms);
        let mut rt = JobRuntime::new(job, done, tail_done);
        if rt.all_done() && !rt.job.state.is_terminal() {
            rt.job.state = JobState::Assembling;
        }
        let state = rt.job.state;
        self.jobs.insert(rt.job.id.clone(), rt);
        state
    }

    /// Queues a job for `spec` submitted at `now_ms` and plans what it can; the job after planning.
    pub fn submit(&mut self, spec: JobSpec, now_ms: u64, fx: &mut Effects) -> Job {
        // Ids sort by submission time and stay unique across restarts (the counter starts above
        // every id read back).
        self.next_job = self.next_job.max(now_ms) + 1;
        let id = format!("j{:x}", self.next_job);
        let job = Job {
            id: id.clone(),
            state: JobState::Queued,
            n_blocks: spec.n_blocks,
            model_type: spec.model_type.clone(),
            spec,
            blocks_done: 0,
            stages: Vec::new(),
            error: None,
            waiting_for_space: None,
            created_unix_ms: self.next_job,
            finished_unix_ms: None,
        };
        fx.persist.push(job.clone());
        self.jobs.insert(id.clone(), JobRuntime::new(job, BTreeSet::new(), false));
        self.schedule(fx);
        info!(job = %id, "submitted");
        self.jobs[&id].job.clone()
    }

    /// Cancels `job_id` at `now_ms` (refused once it ended or is assembling); the job after.
    pub fn cancel(&mut self, job_id: &str, now_ms: u64, fx: &mut Effects) -> Result<Job> {
        let rt = self.jobs.get(job_id).ok_or_else(|| Error::NoSuchJob(job_id.to_string()))?;
        if rt.job.state.is_terminal() || rt.job.state == JobState::Assembling {
            return Err(Error::CannotCancel { job: job_id.to_string(), state: rt.job.state });
        }
        self.end_job(job_id, JobState::Cancelled, "cancelled".into(), now_ms, fx);
        self.schedule(fx);
        Ok(self.jobs[job_id].job.clone())
    }

    /// The id of the next worker that joins with `name`.
    pub fn name_worker(&mut self, name: &str) -> String {
        self.next_worker += 1;
        let name = if name.is_empty() { "worker" } else { name };
        format!("{name}-{}", self.next_worker)
    }

    /// A worker joined, running the replicas it lists (taken back or stopped, see [`serving`]);
    /// plans what it can take.
    pub fn join(&mut self, worker: WorkerRecord, replicas: Vec<ReplicaReport>, fx: &mut Effects) {
        let id = worker.id.clone();
        self.workers.insert(id.clone(), WorkerRecord { busy_with: None, serving: None, ..worker });
        self.adopt_replicas(&id, replicas, fx);
        self.schedule(fx);
    }

    /// A worker left (its stream broke): its stage is planned again (see [`State::lose_worker`]).
    pub fn worker_left(&mut self, worker_id: &str, fx: &mut Effects) {
        self.lose_worker(worker_id, fx);
        self.schedule(fx);
    }

    /// A result of `job_id` from `worker_id` was staged and recorded in the store: the job moves on
    /// (its workers that delivered everything are freed; with its last result it assembles). A
    /// job that ended meanwhile only has the result's key forgotten again.
    pub fn record_result(&mut self, job_id: &str, part: ModelPart, worker_id: &str, fx: &mut Effects) {
        let Some(rt) = self.jobs.get_mut(job_id).filter(|rt| !rt.job.state.is_terminal()) else {
            // The job ended while this result was on its way: its keys may have been removed
            // before ours was written.
            fx.forget.push(job_id.to_string());
            return;
        };
        let what = match part {
            ModelPart::Tail => {
                rt.tail_done = true;
                "tail".to_string()
            }
            ModelPart::Block(b) => {
                rt.done.insert(b as u32);
                format!("block {b}")
            }
        };
        rt.job.blocks_done = rt.done.len() as u32;
        self.release_finished_stages(job_id);
        let rt = self.jobs.get_mut(job_id).expect("present above");
        if rt.job.waiting_for_space.take().is_some() {
            info!(job = %job_id, "disk space available again: results are written");
            rt.emit("disk space available again: results are written", fx);
        }
        rt.emit(format!("{what} done by {worker_id}"), fx);
        fx.persist.push(rt.job.clone());
        if rt.all_done() && rt.job.state == JobState::Running {
            rt.job.state = JobState::Assembling;
            fx.assemble.push(job_id.to_string());
        }
        self.schedule(fx);
    }

    /// A result of `job_id` could not be written for want of disk space (`why`): the job goes on
    /// waiting (its worker sends the result again), and says so once, until a result is written.
    pub fn wait_for_space(&mut self, job_id: &str, why: &str, fx: &mut Effects) {
        let Some(rt) = self.jobs.get_mut(job_id).filter(|rt| !rt.job.state.is_terminal()) else { return };
        if rt.job.waiting_for_space.replace(why.to_string()).is_none() {
            warn!(job = %job_id, "waiting for disk space: {why}");
            rt.emit(format!("waiting for disk space (free some beside the output; nothing is lost): {why}"), fx);
        }
    }

    /// A worker reported that its stage failed (at `now_ms`): bad input fails the job, a fault
    /// has its blocks planned again. Reports about jobs that ended are ignored.
    pub fn stage_failed(&mut self, f: StageFailure, now_ms: u64, fx: &mut Effects) {
        if self.jobs.get(&f.job_id).is_some_and(|rt| !rt.job.state.is_terminal()) {
            warn!(job = %f.job_id, worker = %f.worker_id, "stage {} failed: {}", f.stage_index, f.error);
            let message = format!("stage {} on {}: {}", f.stage_index, f.worker_id, f.error);
            match f.cause {
                FailureCause::BadInput => self.end_job(&f.job_id, JobState::Failed, message, now_ms, fx),
                FailureCause::Fault => self.stage_fault(&f.job_id, &f.worker_id, message, now_ms, fx),
            }
        }
        self.schedule(fx);
    }

    /// The assembly of `job_id` starts; the job then (`None` if there is no such job).
    pub fn start_assembly(&mut self, job_id: &str, fx: &mut Effects) -> Option<Job> {
        let rt = self.jobs.get_mut(job_id)?;
        rt.job.state = JobState::Assembling;
        info!(job = %job_id, "assembling the checkpoint");
        rt.emit("assembling the checkpoint", fx);
        Some(rt.job.clone())
    }

    /// The assembly of `job_id` ended at `now_ms`: done, or failed with `outcome`'s message; the
    /// job then.
    pub fn finish_assembly(
        &mut self,
        job_id: &str,
        outcome: std::result::Result<(), String>,
        now_ms: u64,
        fx: &mut Effects,
    ) -> Option<Job> {
        let rt = self.jobs.get_mut(job_id)?;
        rt.nccl_groups.clear();
        rt.job.finished_unix_ms = Some(now_ms);
        rt.job.waiting_for_space = None;
        let deploy = match outcome {
            Ok(()) => {
                rt.job.state = JobState::Done;
                info!(job = %job_id, "done");
                rt.job.spec.deploy.clone().map(|spec| (spec, rt.job.n_blocks as usize))
            }
            Err(error) => {
                rt.job.state = JobState::Failed;
                rt.job.error = Some(error.clone());
                rt.emit(error, fx);
                return Some(rt.job.clone());
            }
        };
        // A job that asked to be served is deployed now; a name taken since the submission is
        // told in the job's last event (the job stays done).
        let message = match deploy {
            None => "done".to_string(),
            Some((spec, n_blocks)) => {
                let name = spec.name.clone();
                match self.deploy(spec, n_blocks, Some(job_id), now_ms, fx) {
                    Ok(_) => format!("done; deployed as {name}"),
                    Err(e) => {
                        warn!(job = %job_id, deployment = %name, "not deployed: {e}");
                        format!("done; not deployed: {e}")
                    }
                }
            }
        };
        let rt = self.jobs.get_mut(job_id)?;
        rt.emit(message, fx);
        Some(rt.job.clone())
    }

    /// Marks the stage of `worker_id` lost, with every unfinished stage downstream of it in the
    /// same chain (they wait for activations that will not come), and forgets the worker. When the
    /// lost stage was in an NCCL group, the members still running are told the group is lost.
    fn lose_worker(&mut self, worker_id: &str, fx: &mut Effects) {
        let Some(worker) = self.workers.remove(worker_id) else { return };
        self.lose_replicas(worker_id, fx);
        let Some(StageRef { job_id, stage_index }) = worker.busy_with else { return };
        let mut cancelled_workers = Vec::new();
        let mut group_lost = None;
        if let Some(rt) = self.jobs.get_mut(&job_id) {
            group_lost = rt.nccl_groups.values().find_map(|g| g.rank_of(stage_index).map(|rank| (g.clone(), rank)));
            let lost_attempt = rt.job.stages.iter().find(|s| s.index == stage_index).map(|s| s.attempt);
            let complete: Vec<bool> = rt.job.stages.iter().map(|s| rt.stage_complete(s)).collect();
            for (s, complete) in rt.job.stages.iter_mut().zip(complete) {
                let downstream = Some(s.attempt) == lost_attempt && s.index > stage_index && s.attempt == 0;
                if s.index == stage_index || (downstream && !complete && s.worker.is_some()) {
                    let worker = s.worker.take();
                    if s.index != stage_index {
                        cancelled_workers.extend(worker);
                    }
                }
            }
            warn!(job = %job_id, worker = worker_id, "worker lost; its blocks will be planned again");
            rt.emit(format!("worker {worker_id} lost; re-planning its blocks"), fx);
            fx.persist.push(rt.job.clone());
        }
        for w in cancelled_workers {
            if let Some(worker) = self.workers.get_mut(&w) {
                worker.busy_with = None;
                fx.commands.push((w, WorkerCommand::Cancel { job_id: job_id.clone() }));
            }
        }
        if let Some((group, rank)) = group_lost {
            let reason = format!("rank {rank} (stage {stage_index} on {worker_id}) was lost");
            for m in group.members.iter().filter(|m| m.stage_index != stage_index) {
                // Only members still running their stage (the cancelled ones stop anyway).
                if self.running(&job_id, m) {
                    let lost = WorkerCommand::NcclGroupLost {
                        job_id: job_id.clone(),
                        group: group.name.clone(),
                        reason: reason.clone(),
                    };
                    fx.commands.push((m.worker_id.clone(), lost));
                }
            }
        }
    }

    /// Whether `member`'s worker still runs the member's stage of `job_id`.
    fn running(&self, job_id: &str, member: &Member) -> bool {
        self.workers.get(&member.worker_id).is_some_and(|w| {
            w.busy_with.as_ref().is_some_and(|s| s.job_id == job_id && s.stage_index == member.stage_index)
        })
    }

    /// Relays the NCCL id that `publisher`, rank 0 of `group` of `job_id`, published to the
    /// workers of the other ranks still running their stage. A job that has ended takes the id and
    /// drops it. Errors name the `NcclIdMessage` field at fault.
    pub fn relay_nccl_id(
        &mut self,
        job_id: &str,
        group: &str,
        publisher: &str,
        id: &[u8],
        fx: &mut Effects,
    ) -> Result<()> {
        let rt = self.jobs.get_mut(job_id).ok_or_else(|| Error::NoSuchJob(job_id.to_string()))?;
        if rt.job.state.is_terminal() {
            return Ok(());
        }
        let invalid = |field, detail: String| Error::Invalid { field, detail };
        let g = rt
            .nccl_groups
            .get_mut(group)
            .ok_or_else(|| invalid("nccl_group", format!("job {job_id} has no NCCL group {group}")))?;
        let rank0 = &g.members[0];
        if publisher != rank0.worker_id {
            return Err(invalid(
                "worker_id",
                format!("{publisher} does not hold rank 0 of NCCL group {} ({} does)", g.name, rank0.worker_id),
            ));
        }
        if id.is_empty() {
            return Err(invalid("id", format!("an empty NCCL id for group {}", g.name)));
        }
        match &g.id {
            Some(known) if known.as_slice() == id => return Ok(()),
            Some(_) => return Err(invalid("id", format!("NCCL group {} already has another id", g.name))),
            None => g.id = Some(id.to_vec()),
        }
        let g = g.clone();
        for m in &g.members[1..] {
            if self.running(job_id, m) {
                let command =
                    WorkerCommand::NcclId { job_id: job_id.to_string(), group: group.to_string(), id: id.to_vec() };
                fx.commands.push((m.worker_id.clone(), command));
            }
        }
        Ok(())
    }

    /// Ends `job_id` at `now_ms` in a terminal `state` (cancelled or failed): records why, frees
    /// its workers (telling them to drop its stages) and has its stored results and working folders
    /// removed.
    fn end_job(&mut self, job_id: &str, state: JobState, message: String, now_ms: u64, fx: &mut Effects) {
        let Some(rt) = self.jobs.get_mut(job_id) else { return };
        rt.job.state = state;
        rt.job.finished_unix_ms = Some(now_ms);
        if state == JobState::Failed {
            rt.job.error = Some(message.clone());
        }
        for s in rt.job.stages.iter_mut() {
            s.worker = None;
        }
        rt.nccl_groups.clear();
        rt.emit(message, fx);
        fx.persist.push(rt.job.clone());
        fx.forget.push(job_id.to_string());
        fx.discard.push(job_id.to_string());
        for (id, w) in self.workers.iter_mut() {
            if w.busy_with.as_ref().is_some_and(|s| s.job_id == job_id) {
                w.busy_with = None;
                fx.commands.push((id.clone(), WorkerCommand::Cancel { job_id: job_id.to_string() }));
            }
        }
    }

    /// A stage of `job_id` failed through a fault of its worker or device (not of the job): its
    /// blocks are planned again, as for a lost worker, and the worker stays available (the fault
    /// may have been passing). A job whose stages keep failing so ([`MAX_FAULTS_PER_JOB`]) fails
    /// with the last fault, instead of going round for ever.
    fn stage_fault(&mut self, job_id: &str, worker_id: &str, message: String, now_ms: u64, fx: &mut Effects) {
        let Some(rt) = self.jobs.get_mut(job_id) else { return };
        rt.faults += 1;
        if rt.faults > MAX_FAULTS_PER_JOB {
            let message = format!(
                "{} stage faults (at most {MAX_FAULTS_PER_JOB} are planned again); the last: {message}",
                rt.faults
            );
            self.end_job(job_id, JobState::Failed, message, now_ms, fx);
            return;
        }
        rt.emit(format!("{message}; a fault of the worker, not of the job: planning its blocks again"), fx);
        if let Some(worker) = self.workers.get(worker_id).cloned() {
            self.lose_worker(worker_id, fx);
            self.workers.insert(worker_id.to_string(), WorkerRecord { busy_with: None, ..worker });
        }
    }

    /// Frees the workers whose stages of `job_id` have delivered everything.
    fn release_finished_stages(&mut self, job_id: &str) {
        let Some(rt) = self.jobs.get_mut(job_id) else { return };
        let complete: Vec<bool> = rt.job.stages.iter().map(|s| rt.stage_complete(s)).collect();
        for (s, complete) in rt.job.stages.iter_mut().zip(complete) {
            if s.worker.is_none() {
                continue;
            }
            s.blocks_done = s.blocks.clone().filter(|b| rt.done.contains(b)).count() as u32;
            let Some(w) = s.worker.as_ref().and_then(|id| self.workers.get_mut(id)).filter(|_| complete) else {
                continue;
            };
            if w.busy_with.as_ref().is_some_and(|b| b.job_id == job_id && b.stage_index == s.index) {
                w.busy_with = None;
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use awq_job::{JobOptions, Method};

    use super::*;

    /// A state with workers `(id, device, host)` (plenty of memory each) and one job `j1` of
    /// `n_blocks` blocks with `method`, not yet planned.
    pub(super) fn state(workers: &[(&str, &str, &str)], n_blocks: u32, method: Method) -> State {
        let mut st = State::default();
        for (k, &(id, device, host)) in workers.iter().enumerate() {
            add_worker(&mut st, id, device, &format!("{host}:{}", 50152 + k));
        }
        let job = Job { id: "j1".into(), created_unix_ms: 1, ..job(spec(n_blocks, method)) };
        st.jobs.insert("j1".into(), JobRuntime::new(job, BTreeSet::new(), false));
        st
    }

    fn spec(n_blocks: u32, method: Method) -> JobSpec {
        JobSpec {
            model: "/models/m".into(),
            output: "/nonexistent/awq-out".into(),
            overwrite: false,
            options: JobOptions { method, ..Default::default() },
            n_blocks,
            model_type: "llama".into(),
            per_block_bytes: 1,
            fixed_bytes: 0,
            deploy: None,
        }
    }

    /// A queued job of `spec`, not yet planned, with no id.
    fn job(spec: JobSpec) -> Job {
        Job {
            id: String::new(),
            state: JobState::Queued,
            n_blocks: spec.n_blocks,
            model_type: spec.model_type.clone(),
            spec,
            blocks_done: 0,
            stages: Vec::new(),
            error: None,
            waiting_for_space: None,
            created_unix_ms: 0,
            finished_unix_ms: None,
        }
    }

    pub(super) fn add_worker(st: &mut State, id: &str, device: &str, stage_address: &str) {
        let device: Device = device.parse().expect("a device name");
        let worker = WorkerRecord {
            id: id.into(),
            name: id.into(),
            device,
            serving_devices: vec![device],
            gpu_model: String::new(),
            memory_bytes: 1 << 40,
            stage_address: stage_address.into(),
            busy_with: None,
            serving: None,
            connected_unix_ms: 0,
        };
        st.workers.insert(id.into(), worker);
    }

    /// The commands `fx` sends to worker `id`, in order.
    pub(super) fn commands_to(fx: &Effects, id: &str) -> Vec<WorkerCommand> {
        fx.commands.iter().filter(|(to, _)| to == id).map(|(_, c)| c.clone()).collect()
    }

    /// The one assignment `fx` sends to worker `id`.
    pub(super) fn assignment_of(fx: &Effects, id: &str) -> Assignment {
        let assigned: Vec<Assignment> = commands_to(fx, id)
            .into_iter()
            .filter_map(|c| match c {
                WorkerCommand::Assign(a) => Some(a),
                _ => None,
            })
            .collect();
        assert_eq!(assigned.len(), 1, "assignments to {id}: {assigned:?}");
        assigned.into_iter().next().expect("one")
    }

    fn schedule(st: &mut State) -> Effects {
        let mut fx = Effects::default();
        st.schedule(&mut fx);
        fx
    }

    fn publish(st: &mut State, group: &str, worker: &str, id: &[u8]) -> (Result<()>, Effects) {
        let mut fx = Effects::default();
        (st.relay_nccl_id("j1", group, worker, id, &mut fx), fx)
    }

    fn messages(fx: &Effects) -> Vec<&str> {
        fx.events.iter().map(|e| e.message.as_str()).collect()
    }

    fn cancel(job_id: &str) -> WorkerCommand {
        WorkerCommand::Cancel { job_id: job_id.into() }
    }

    #[test]
    fn rank_0_publishes_and_the_id_reaches_the_other_ranks_only() {
        let mut st = state(&[("w0", "cuda:0", "a"), ("w1", "cuda:1", "a"), ("w2", "cuda:2", "a")], 6, Method::Awq);
        schedule(&mut st);
        let id = [7u8; 128];
        let (result, fx) = publish(&mut st, "j1/0/0", "w0", &id);
        result.unwrap();
        assert!(commands_to(&fx, "w0").is_empty());
        for w in ["w1", "w2"] {
            assert_eq!(
                commands_to(&fx, w),
                [WorkerCommand::NcclId { job_id: "j1".into(), group: "j1/0/0".into(), id: id.to_vec() }],
                "{w}"
            );
        }
        assert_eq!(st.jobs["j1"].nccl_groups["j1/0/0"].id.as_deref(), Some(&id[..]));

        // The same id again is a no-op; anything else names the field at fault.
        let (result, fx) = publish(&mut st, "j1/0/0", "w0", &id);
        result.unwrap();
        assert!(fx.commands.is_empty());
        let refused = |st: &mut State, group: &str, worker: &str, id: &[u8], field: &str, text: &str| {
            let (result, fx) = publish(st, group, worker, id);
            let err = result.unwrap_err();
            assert!(matches!(&err, Error::Invalid { field: f, .. } if *f == field), "{err}");
            assert!(err.to_string().contains(text), "{err}");
            assert!(fx.commands.is_empty());
        };
        refused(&mut st, "j1/0/0", "w0", &[8u8; 128], "id", "already has another id");
        refused(&mut st, "j1/0/0", "w1", &id, "worker_id", "w1 does not hold rank 0");
        refused(&mut st, "j1/0/9", "w0", &id, "nccl_group", "no NCCL group j1/0/9");
        let mut st2 = state(&[("w0", "cuda:0", "a"), ("w1", "cuda:1", "a")], 6, Method::Awq);
        schedule(&mut st2);
        refused(&mut st2, "j1/0/0", "w0", &[], "id", "empty NCCL id");
        let mut fx = Effects::default();
        assert!(matches!(st2.relay_nccl_id("j9", "", "", &[], &mut fx), Err(Error::NoSuchJob(j)) if j == "j9"));
    }

    #[test]
    fn a_lost_rank_stops_the_group_and_its_blocks_start_over_from_the_embeddings() {
        let mut st = state(&[("w0", "cuda:0", "a"), ("w1", "cuda:1", "a"), ("w2", "cuda:2", "a")], 6, Method::Awq);
        schedule(&mut st);
        let mut fx = Effects::default();
        st.lose_worker("w1", &mut fx);
        // Downstream: cancelled, as on gRPC. Upstream, still running its stage: told the group is
        // lost, so it stops waiting for rank 1.
        assert_eq!(commands_to(&fx, "w2"), [cancel("j1")]);
        match &commands_to(&fx, "w0")[..] {
            [WorkerCommand::NcclGroupLost { job_id, group, reason }] => {
                assert_eq!((job_id.as_str(), group.as_str()), ("j1", "j1/0/0"));
                assert!(reason.contains("rank 1 (stage 1 on w1) was lost"), "{reason}");
            }
            other => panic!("w0 got {other:?}"),
        }
        assert_eq!(messages(&fx), ["worker w1 lost; re-planning its blocks"]);
        let workers: Vec<Option<&str>> = st.jobs["j1"].job.stages.iter().map(|s| s.worker.as_deref()).collect();
        assert_eq!(workers, [Some("w0"), None, None]);
        assert!(!st.workers.contains_key("w1") && st.workers["w2"].busy_with.is_none());

        // Planned again over w2 (now idle) and a new GPU worker: attempt 1, inputs from the
        // embeddings, so no stage joins the old group and none receives anything.
        add_worker(&mut st, "w3", "cuda:3", "a:50160");
        let fx = schedule(&mut st);
        for w in ["w2", "w3"] {
            let a = assignment_of(&fx, w);
            assert_eq!((a.attempt, a.transport, a.input), (1, Transport::Grpc, StageInput::Embeddings), "{w}");
        }
        // An id published late for the old group still reaches nobody who stopped.
        let (result, fx) = publish(&mut st, "j1/0/0", "w0", &[1u8; 128]);
        result.unwrap();
        assert!(fx.commands.is_empty(), "{:?}", fx.commands);
    }

    #[test]
    fn a_job_that_ends_drops_its_groups_frees_its_workers_and_takes_late_ids_without_relaying() {
        let mut st = state(&[("w0", "cuda:0", "a"), ("w1", "cuda:1", "a")], 4, Method::Awq);
        schedule(&mut st);
        let mut fx = Effects::default();
        st.end_job("j1", JobState::Cancelled, "cancelled".into(), 7, &mut fx);
        assert!(st.jobs["j1"].nccl_groups.is_empty());
        assert_eq!((commands_to(&fx, "w0"), commands_to(&fx, "w1")), (vec![cancel("j1")], vec![cancel("j1")]));
        assert!(st.workers.values().all(|w| w.busy_with.is_none()));
        assert_eq!(
            (&fx.forget[..], &fx.discard[..], messages(&fx)),
            (&["j1".to_string()][..], &["j1".to_string()][..], vec!["cancelled"])
        );
        let job = &st.jobs["j1"].job;
        assert_eq!((job.state, job.finished_unix_ms, job.error.as_deref()), (JobState::Cancelled, Some(7), None));
        assert!(job.stages.iter().all(|s| s.worker.is_none()));
        let (result, fx) = publish(&mut st, "j1/0/0", "w0", &[1u8; 128]);
        result.unwrap();
        assert!(fx.commands.is_empty());
    }

    #[test]
    fn a_stage_fault_plans_the_blocks_again_until_the_job_has_had_too_many() {
        let mut st = state(&[("w0", "cpu", "a"), ("w1", "cpu", "b")], 4, Method::Awq);
        schedule(&mut st);
        for fault in 1..=MAX_FAULTS_PER_JOB {
            let mut fx = Effects::default();
            st.stage_fault("j1", "w1", format!("stage on w1: device fault {fault}"), 0, &mut fx);
            st.schedule(&mut fx);
            let rt = &st.jobs["j1"];
            assert_eq!(rt.job.state, JobState::Running, "fault {fault}");
            // The worker stays, idle, and takes the blocks again (from the embeddings).
            let a = assignment_of(&fx, "w1");
            assert_eq!((a.attempt, a.input), (fault, StageInput::Embeddings), "fault {fault}");
            assert_eq!(rt.job.stages.iter().filter(|s| s.worker.as_deref() == Some("w1")).count(), 1);
        }
        let mut fx = Effects::default();
        st.stage_fault("j1", "w1", "stage on w1: device fault again".into(), 0, &mut fx);
        let rt = &st.jobs["j1"];
        assert_eq!(rt.job.state, JobState::Failed);
        let error = rt.job.error.as_deref().unwrap_or_default();
        assert!(error.contains("4 stage faults") && error.contains("device fault again"), "{error}");
    }

    #[test]
    fn results_free_the_stages_that_delivered_everything_and_the_last_one_assembles() {
        let mut st = state(&[("w0", "cpu", "a"), ("w1", "cpu", "b")], 4, Method::Rtn);
        schedule(&mut st);
        let record = |st: &mut State, part: ModelPart, worker: &str| {
            let mut fx = Effects::default();
            st.record_result("j1", part, worker, &mut fx);
            fx
        };
        record(&mut st, ModelPart::Block(0), "w0");
        assert!(st.workers["w0"].busy_with.is_some(), "w0 still owes block 1");
        let fx = record(&mut st, ModelPart::Block(1), "w0");
        assert_eq!(messages(&fx), ["block 1 done by w0"]);
        assert!(st.workers["w0"].busy_with.is_none());
        let job = &st.jobs["j1"].job;
        assert_eq!((job.blocks_done, job.stages[0].blocks_done, job.stages[0].worker.as_deref()), (2, 2, Some("w0")));
        record(&mut st, ModelPart::Block(3), "w1");
        record(&mut st, ModelPart::Block(2), "w1");
        assert!(st.workers["w1"].busy_with.is_some(), "w1 still owes the tail");
        let fx = record(&mut st, ModelPart::Tail, "w1");
        assert_eq!((messages(&fx), &fx.assemble[..]), (vec!["tail done by w1"], &["j1".to_string()][..]));
        // Persisted as it was when the result came in; assembling from then on.
        assert_eq!(fx.persist.iter().map(|j| j.state).collect::<Vec<_>>(), [JobState::Running]);
        assert_eq!(st.jobs["j1"].job.state, JobState::Assembling);
        assert!(st.workers.values().all(|w| w.busy_with.is_none()));

        // Not cancellable now; once it ended, a late result only has its key forgotten.
        let mut fx = Effects::default();
        let err = st.cancel("j1", 0, &mut fx).unwrap_err();
        assert!(matches!(err, Error::CannotCancel { state: JobState::Assembling, .. }), "{err}");
        assert_eq!(err.to_string(), "job j1 is Assembling and cannot be cancelled");
        st.finish_assembly("j1", Ok(()), 9, &mut fx).expect("the job");
        let fx = record(&mut st, ModelPart::Block(0), "w0");
        assert_eq!((&fx.forget[..], fx.events.len(), fx.persist.len()), (&["j1".to_string()][..], 0, 0));
        assert!(matches!(st.cancel("j9", 0, &mut Effects::default()), Err(Error::NoSuchJob(j)) if j == "j9"));
    }

    /// A coordinator that died between recording a job's last result and recording that the job
    /// assembles left a `Running` record with every result: it is resumed assembling (before, it
    /// stayed running forever, since there was nothing left to plan).
    #[test]
    fn regress_a_job_resumed_with_every_result_recorded_assembles() {
        let mut st = State::default();
        let running = Job { id: "j1".into(), state: JobState::Running, ..job(spec(2, Method::Rtn)) };
        assert_eq!(st.resume(running.clone(), BTreeSet::from([0, 1]), true), JobState::Assembling);
        assert_eq!(st.job("j1").map(|j| (j.state, j.blocks_done)), Some((JobState::Assembling, 2)));
        let without_tail = Job { id: "j2".into(), ..running.clone() };
        assert_eq!(st.resume(without_tail, BTreeSet::from([0, 1]), false), JobState::Running);
        let assembling = Job { id: "j3".into(), state: JobState::Assembling, ..running };
        assert_eq!(st.resume(assembling, BTreeSet::from([0, 1]), true), JobState::Assembling);
        let mut fx = Effects::default();
        st.schedule(&mut fx);
        assert!(fx.commands.is_empty() && fx.assemble.is_empty(), "nothing planned without workers: {fx:?}");
    }

    #[test]
    fn job_ids_follow_submission_time_and_stay_above_every_resumed_job() {
        let mut st = State::default();
        let mut fx = Effects::default();
        assert_eq!(st.submit(spec(2, Method::Rtn), 1000, &mut fx).id, "j3e9");
        assert_eq!(st.submit(spec(2, Method::Rtn), 1000, &mut fx).id, "j3ea", "same millisecond");
        st.resume(
            Job { id: "j1388".into(), created_unix_ms: 5000, ..job(spec(2, Method::Rtn)) },
            BTreeSet::from([1]),
            false,
        );
        assert_eq!(st.job("j1388").map(|j| j.blocks_done), Some(1));
        let submitted = st.submit(spec(2, Method::Rtn), 1000, &mut fx);
        assert_eq!(
            (submitted.id.as_str(), submitted.created_unix_ms, submitted.state),
            ("j1389", 5001, JobState::Queued)
        );
        assert_eq!(fx.persist.len(), 3, "each submit is persisted; nothing was planned without workers");
        assert_eq!((st.name_worker(""), st.name_worker("gpu")), ("worker-1".to_string(), "gpu-2".to_string()));
    }
}
