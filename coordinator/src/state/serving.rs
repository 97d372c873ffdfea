//! Deployments: checkpoints served by replicas on workers, and what each event does to them (a
//! deploy, an undeploy, a worker's report on a replica, a worker that joins or is lost).
//!
//! A replica is `pp` workers, one per pipeline stage (contiguous, even ranges of the model's
//! decoder blocks, `stage_blocks`; the first stage's worker runs the engine and is where gateways
//! connect), each running the stage's `tp` ranks (CPU threads, or one per GPU of the first `tp`
//! of the worker's serving GPUs). Its life: `Pending` (waiting for `pp` idle workers) -> placed, `Loading` (a `Serve`
//! command to each stage's worker; `generation` + 1) -> `Ready` (every stage's worker reported it)
//! -> back to `Pending` when one of its workers is lost or a stage's load failed on the worker's
//! fault (the other stages are stopped); `Failed` for good when a load failed on the deployment's
//! own input (its model, its options). A worker that serves a replica takes no quantization stage, and pending
//! replicas are placed before jobs are planned (a deployment is there to answer requests now).
//! A report of an older generation is stale and changes nothing.
//!
//! A worker that joins lists the replicas it runs already: a restarted coordinator (which read its
//! deployments back with every replica pending) takes them back as they are, without a reload; a
//! replica the coordinator does not want there (undeployed meanwhile, placed elsewhere) is
//! stopped. A pipelined replica is taken back whole or not at all: its stages rejoin one by one,
//! each held (`rejoining`) until every stage of the same generation is back; when one is not back
//! within [`REJOIN_GRACE`] of the first (its worker died with the coordinator), the ones that came
//! are stopped and the replica is placed again.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Duration;

use awq_job::deployment::DeploymentSpec;
use awq_job::Device;
use tracing::{info, warn};

use super::{Effects, State, WorkerCommand, WorkerRecord};
use crate::{Error, Result};

/// Where a replica is in its life (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaState {
    Pending,
    Loading,
    Ready,
    Failed,
}

/// One replica of a deployment.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaRecord {
    pub index: u32,
    pub state: ReplicaState,
    /// The workers of its stages, in stage order (one for a replica of one stage); empty while
    /// pending (or failed).
    pub workers: Vec<String>,
    /// Which stages' workers reported the replica ready.
    pub stages_ready: Vec<bool>,
    /// Where its ranks compute (the worker's device), once placed.
    pub devices: Vec<Device>,
    /// +1 at each placement; a report names the generation it is about.
    pub generation: u32,
    /// Why it failed, or why its last placement was lost.
    pub error: Option<String>,
    /// A pipelined replica whose stages are rejoining a restarted coordinator: one entry per stage,
    /// those back so far (empty otherwise; see the module docs).
    pub rejoining: Vec<Option<RejoinedStage>>,
}

/// A stage of a pipelined replica that a worker listed when it joined a restarted coordinator.
#[derive(Clone, Debug, PartialEq)]
pub struct RejoinedStage {
    pub worker: String,
    pub device: Device,
    pub ready: bool,
}

/// How long the stages of a pipelined replica that rejoined wait for the rest of it after the first
/// one came back: workers rejoin within a second or two of a restarted coordinator's start (they
/// retry every second), so a stage missing longer than this lost its worker.
pub const REJOIN_GRACE: Duration = Duration::from_secs(10);

impl ReplicaRecord {
    /// The worker of its first stage (the engine, where gateways connect), once placed.
    pub fn leader(&self) -> Option<&str> {
        self.workers.first().map(String::as_str)
    }
}

/// A deployment and its replicas.
#[derive(Clone, Debug, PartialEq)]
pub struct Deployment {
    pub spec: DeploymentSpec,
    /// The model's decoder blocks (what pipeline stages split).
    pub n_blocks: usize,
    pub replicas: Vec<ReplicaRecord>,
    pub created_unix_ms: u64,
    /// The job that deployed its output when it finished (`awq submit --deploy`): its workers keep
    /// the blocks they quantized in memory, so replicas go to them first and serve those blocks
    /// without reading them back. Not persisted: after a restart, replicas read the output.
    pub source_job: Option<String>,
}

/// The decoder blocks of stage `stage` of `pp` over `n_blocks`: contiguous, even ranges (the
/// earlier stages take one fewer when they do not divide).
pub fn stage_blocks(n_blocks: usize, pp: usize, stage: usize) -> Range<usize> {
    n_blocks * stage / pp..n_blocks * (stage + 1) / pp
}

/// A worker's word on one of its replicas (a report, or an entry of its join).
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaReport {
    pub worker_id: String,
    pub deployment: String,
    pub replica: u32,
    pub generation: u32,
    pub state: ReplicaState,
    pub error: String,
    /// The failure is the deployment's (its model, its options), not the worker's.
    pub bad_input: bool,
    /// Which pipeline stage of the replica the worker runs (0 for a replica of one stage).
    pub stage: usize,
}

impl Deployment {
    fn new(spec: DeploymentSpec, n_blocks: usize, created_unix_ms: u64) -> Deployment {
        let replicas = (0..spec.replicas as u32)
            .map(|index| ReplicaRecord {
                index,
                state: ReplicaState::Pending,
                workers: Vec::new(),
                stages_ready: Vec::new(),
                devices: Vec::new(),
                generation: 0,
                error: None,
                rejoining: Vec::new(),
            })
            .collect();
        Deployment { spec, n_blocks, replicas, created_unix_ms, source_job: None }
    }
}

impl State {
    pub fn deployment(&self, name: &str) -> Option<&Deployment> {
        self.deployments.get(name)
    }

    /// Every deployment, by name.
    pub fn deployments(&self) -> impl Iterator<Item = &Deployment> {
        self.deployments.values()
    }

    /// A new deployment of `spec`; its replicas are placed on idle workers now and as workers come,
    /// first on those of `source_job` (the job that made the checkpoint, when it deploys it).
    /// Errors: `DeploymentExists` when the name is taken, `ServedNameTaken` when another
    /// deployment serves its model name.
    pub fn deploy(
        &mut self,
        spec: DeploymentSpec,
        n_blocks: usize,
        source_job: Option<&str>,
        now_ms: u64,
        fx: &mut Effects,
    ) -> Result<Deployment> {
        self.check_names_free(&spec)?;
        let name = spec.name.clone();
        let deployment = Deployment { source_job: source_job.map(String::from), ..Deployment::new(spec, n_blocks, now_ms) };
        fx.persist_deployments.push(deployment.clone());
        self.deployments.insert(name.clone(), deployment);
        info!(deployment = %name, "deployed");
        self.schedule(fx);
        Ok(self.deployments[&name].clone())
    }

    /// Whether `spec`'s name and served model name are free. Errors: `DeploymentExists`,
    /// `ServedNameTaken`.
    pub fn check_names_free(&self, spec: &DeploymentSpec) -> Result<()> {
        if self.deployments.contains_key(&spec.name) {
            return Err(Error::DeploymentExists(spec.name.clone()));
        }
        match self.deployments.values().find(|d| d.spec.served_model_name == spec.served_model_name) {
            Some(d) => Err(Error::ServedNameTaken { served: spec.served_model_name.clone(), by: d.spec.name.clone() }),
            None => Ok(()),
        }
    }

    /// Takes back a deployment an earlier coordinator recorded: every replica pending until its
    /// worker joins again (and lists it) or another idle worker takes it.
    pub fn resume_deployment(
        &mut self,
        spec: DeploymentSpec,
        n_blocks: usize,
        created_unix_ms: u64,
        generations: &[u32],
    ) {
        let mut d = Deployment::new(spec, n_blocks, created_unix_ms);
        for (r, &g) in d.replicas.iter_mut().zip(generations) {
            r.generation = g;
        }
        self.deployments.insert(d.spec.name.clone(), d);
    }

    /// Stops every replica of `name` and forgets it. Errors: `NoSuchDeployment`.
    pub fn undeploy(&mut self, name: &str, fx: &mut Effects) -> Result<()> {
        let d = self.deployments.remove(name).ok_or_else(|| Error::NoSuchDeployment(name.to_string()))?;
        for r in &d.replicas {
            for w in r.workers.iter().chain(r.rejoining.iter().flatten().map(|s| &s.worker)) {
                self.release(w);
                fx.commands.push((w.clone(), stop(name, r)));
            }
        }
        fx.forget_deployments.push(name.to_string());
        info!(deployment = %name, "undeployed");
        self.schedule(fx);
        Ok(())
    }

    /// What a worker said about one of its replicas (see the module docs).
    pub fn replica_report(&mut self, report: ReplicaReport, fx: &mut Effects) {
        let Some(d) = self.deployments.get_mut(&report.deployment) else {
            // Undeployed meanwhile: the worker is told to stop it (harmless if it did).
            fx.commands
                .push((report.worker_id.clone(), stop_named(&report.deployment, report.replica, report.generation)));
            return;
        };
        let Some(r) = d.replicas.get_mut(report.replica as usize) else { return };
        if r.generation == report.generation {
            let rejoined = r.rejoining.iter_mut().flatten().find(|s| s.worker == report.worker_id);
            match (rejoined, report.state) {
                (Some(s), ReplicaState::Ready) => return s.ready = true,
                (Some(_), ReplicaState::Loading) => return,
                // A rejoined stage failed: the replica is not taken back.
                (Some(_), _) => return self.rejoin_expired(&report.deployment, report.replica, report.generation, fx),
                (None, _) => {}
            }
        }
        let stage = r.workers.iter().position(|w| *w == report.worker_id);
        let Some(stage) = stage.filter(|_| r.generation == report.generation) else {
            return; // stale: about a placement that was replaced
        };
        match report.state {
            ReplicaState::Loading => {}
            ReplicaState::Ready => {
                r.stages_ready[stage] = true;
                if r.stages_ready.iter().all(|&ready| ready) {
                    r.state = ReplicaState::Ready;
                    r.error = None;
                    info!(deployment = %report.deployment, replica = report.replica, worker = %report.worker_id, "replica ready");
                }
            }
            ReplicaState::Failed | ReplicaState::Pending => {
                warn!(deployment = %report.deployment, replica = report.replica, worker = %report.worker_id, "replica failed: {}", report.error);
                r.state = if report.bad_input { ReplicaState::Failed } else { ReplicaState::Pending };
                r.error = Some(report.error);
                let workers = unplace(r);
                for w in &workers {
                    self.release(w);
                    // The other stages of a pipelined replica stop (the reporting one did).
                    if *w != report.worker_id {
                        fx.commands
                            .push((w.clone(), stop_named(&report.deployment, report.replica, report.generation)));
                    }
                }
                self.schedule(fx);
            }
        }
    }

    /// The replicas a joining worker listed: taken back where the coordinator has them pending,
    /// stopped where it does not want them (see the module docs). A pipelined replica whose first
    /// stage just rejoined goes to `fx.rejoin_deadlines`.
    pub(super) fn adopt_replicas(&mut self, worker_id: &str, listed: Vec<ReplicaReport>, fx: &mut Effects) {
        for report in listed {
            let device = self.workers.get(worker_id).filter(|w| w.serving.is_none()).map(|w| w.device);
            let wanted = self
                .deployments
                .get_mut(&report.deployment)
                .and_then(|d| Some((d.spec.pp, d.replicas.get_mut(report.replica as usize)?)))
                .filter(|(_, r)| r.workers.is_empty() && r.state == ReplicaState::Pending);
            let taken = match (wanted, device) {
                (Some((1, r)), Some(device)) => {
                    r.generation = r.generation.max(report.generation);
                    take_back(r, vec![worker_id.to_string()], vec![device], vec![report.state == ReplicaState::Ready]);
                    true
                }
                // A stage of the generation last placed (persisted at placement), not yet back.
                (Some((pp, r)), Some(device))
                    if report.generation == r.generation
                        && report.stage < pp
                        && r.rejoining.get(report.stage).is_none_or(|s| s.is_none()) =>
                {
                    if r.rejoining.is_empty() {
                        r.rejoining = vec![None; pp];
                        fx.rejoin_deadlines.push((report.deployment.clone(), report.replica, report.generation));
                    }
                    r.rejoining[report.stage] = Some(RejoinedStage {
                        worker: worker_id.to_string(),
                        device,
                        ready: report.state == ReplicaState::Ready,
                    });
                    info!(deployment = %report.deployment, replica = report.replica, worker = %worker_id, stage = report.stage, "pipeline stage rejoined");
                    if r.rejoining.iter().all(Option::is_some) {
                        let stages: Vec<RejoinedStage> =
                            std::mem::take(&mut r.rejoining).into_iter().flatten().collect();
                        take_back(
                            r,
                            stages.iter().map(|s| s.worker.clone()).collect(),
                            stages.iter().map(|s| s.device).collect(),
                            stages.iter().map(|s| s.ready).collect(),
                        );
                    }
                    true
                }
                _ => false,
            };
            if taken {
                if let Some(w) = self.workers.get_mut(worker_id) {
                    w.serving = Some((report.deployment.clone(), report.replica));
                }
            } else {
                fx.commands
                    .push((worker_id.to_string(), stop_named(&report.deployment, report.replica, report.generation)));
            }
        }
    }

    /// [`REJOIN_GRACE`] after the first stage of a pipelined replica rejoined: a replica still
    /// missing stages of `generation` gives up on them: the stages that came back are stopped and
    /// freed, and the replica is placed again.
    pub fn rejoin_expired(&mut self, deployment: &str, replica: u32, generation: u32, fx: &mut Effects) {
        let Some(r) = self.deployments.get_mut(deployment).and_then(|d| d.replicas.get_mut(replica as usize)) else {
            return;
        };
        if r.generation != generation || r.rejoining.is_empty() {
            return; // taken back whole meanwhile, or undeployed and deployed again
        }
        let back: Vec<String> = std::mem::take(&mut r.rejoining).into_iter().flatten().map(|s| s.worker).collect();
        warn!(deployment, replica, ?back, "pipelined replica not taken back: stages missing after {REJOIN_GRACE:?}");
        r.error = Some(format!("stages missing {}s after a coordinator restart", REJOIN_GRACE.as_secs()));
        for w in back {
            self.release(&w);
            fx.commands.push((w, stop_named(deployment, replica, generation)));
        }
        self.schedule(fx);
    }

    /// A worker was lost: its replica (if any) waits for another placement, and the other stages
    /// of a pipelined one are stopped.
    pub(super) fn lose_replicas(&mut self, worker_id: &str, fx: &mut Effects) {
        let mut freed = Vec::new();
        for d in self.deployments.values_mut() {
            // A rejoining replica that lost one of its stages again: the others stop now.
            for r in d.replicas.iter_mut().filter(|r| r.rejoining.iter().flatten().any(|s| s.worker == worker_id)) {
                for w in std::mem::take(&mut r.rejoining).into_iter().flatten().map(|s| s.worker) {
                    if w != worker_id {
                        fx.commands.push((w.clone(), stop_named(&d.spec.name, r.index, r.generation)));
                        freed.push(w);
                    }
                }
            }
            for r in d.replicas.iter_mut().filter(|r| r.workers.iter().any(|w| w == worker_id)) {
                warn!(deployment = %d.spec.name, replica = r.index, worker = %worker_id, "replica lost with its worker");
                r.state = ReplicaState::Pending;
                r.error = Some(format!("its worker {worker_id} was lost"));
                for w in unplace(r).into_iter().filter(|w| w != worker_id) {
                    fx.commands.push((w.clone(), stop_named(&d.spec.name, r.index, r.generation)));
                    freed.push(w);
                }
            }
        }
        for w in freed {
            self.release(&w);
        }
    }

    /// Places pending replicas on idle workers that can run them, oldest deployment first: a
    /// replica of `pp` stages takes `pp` workers at once, or waits.
    pub(super) fn place_replicas(&mut self, fx: &mut Effects) {
        let mut order: Vec<(u64, String)> =
            self.deployments.values().map(|d| (d.created_unix_ms, d.spec.name.clone())).collect();
        order.sort();
        for (_, name) in order {
            let d = self.deployments.get_mut(&name).expect("names come from the map");
            let (tp, pp) = (d.spec.tp, d.spec.pp);
            // The workers that quantized the deployment's blocks hold them in memory: first, in
            // block order, so that each stage is served from memory where it can.
            let holders: Vec<String> = d
                .source_job
                .as_ref()
                .and_then(|job| self.jobs.get(job))
                .map(|rt| {
                    let mut stages: Vec<_> = rt.job.stages.iter().filter(|s| s.worker.is_some()).collect();
                    stages.sort_by_key(|s| s.blocks.start);
                    stages.into_iter().filter_map(|s| s.worker.clone()).collect()
                })
                .unwrap_or_default();
            let mut placed = false;
            for r in d.replicas.iter_mut().filter(|r| r.state == ReplicaState::Pending && r.rejoining.is_empty()) {
                // A CPU worker runs any tp on threads; a GPU worker one rank per serving GPU.
                let fits = |w: &WorkerRecord| w.device == Device::Cpu || tp <= w.serving_devices.len();
                let mut idle: Vec<&mut WorkerRecord> = self
                    .workers
                    .values_mut()
                    .filter(|w| w.busy_with.is_none() && w.serving.is_none() && fits(w))
                    .collect();
                idle.sort_by_key(|w| holders.iter().position(|h| *h == w.id).unwrap_or(usize::MAX));
                idle.truncate(pp);
                if idle.len() < pp {
                    break;
                }
                r.generation += 1;
                r.state = ReplicaState::Loading;
                r.workers = idle.iter().map(|w| w.id.clone()).collect();
                r.stages_ready = vec![false; pp];
                r.devices = idle.iter().map(|w| w.device).collect();
                let addresses: Vec<String> = idle.iter().map(|w| w.stage_address.clone()).collect();
                for (stage, w) in idle.into_iter().enumerate() {
                    w.serving = Some((name.clone(), r.index));
                    let pipeline = (pp > 1).then(|| StageAssignment {
                        index: stage,
                        blocks: stage_blocks(d.n_blocks, pp, stage),
                        next: addresses.get(stage + 1).cloned(),
                    });
                    info!(deployment = %name, replica = r.index, worker = %w.id, generation = r.generation, stage, "replica placed");
                    fx.commands.push((
                        w.id.clone(),
                        WorkerCommand::Serve {
                            spec: d.spec.clone(),
                            replica: r.index,
                            generation: r.generation,
                            devices: match w.device {
                                Device::Cpu => vec![Device::Cpu],
                                _ => w.serving_devices[..tp].to_vec(),
                            },
                            stage: pipeline,
                            kept_job: d.source_job.clone(),
                        },
                    ));
                }
                placed = true;
            }
            // The new generations recorded: a restarted coordinator knows the latest ones.
            if placed {
                fx.persist_deployments.push(d.clone());
            }
        }
    }

    /// `worker_id` serves nothing any more.
    fn release(&mut self, worker_id: &str) {
        if let Some(w) = self.workers.get_mut(worker_id) {
            w.serving = None;
        }
    }
}

/// A replica's stage on one worker: which stage, its blocks, the next stage's address.
#[derive(Clone, Debug, PartialEq)]
pub struct StageAssignment {
    pub index: usize,
    pub blocks: Range<usize>,
    /// The next stage's worker's `ReplicaService` (`None` for the last stage).
    pub next: Option<String>,
}

/// A replica its workers still run, taken back by a restarted coordinator as they listed it.
fn take_back(r: &mut ReplicaRecord, workers: Vec<String>, devices: Vec<Device>, stages_ready: Vec<bool>) {
    r.state = if stages_ready.iter().all(|&ready| ready) { ReplicaState::Ready } else { ReplicaState::Loading };
    info!(replica = r.index, ?workers, generation = r.generation, "replica taken back");
    (r.workers, r.devices, r.stages_ready, r.error) = (workers, devices, stages_ready, None);
}

/// Takes a replica off its workers (which it returns): no workers, no devices, no stage ready.
fn unplace(r: &mut ReplicaRecord) -> Vec<String> {
    r.devices.clear();
    r.stages_ready.clear();
    std::mem::take(&mut r.workers)
}

fn stop(deployment: &str, r: &ReplicaRecord) -> WorkerCommand {
    stop_named(deployment, r.index, r.generation)
}

fn stop_named(deployment: &str, replica: u32, generation: u32) -> WorkerCommand {
    WorkerCommand::StopReplica { deployment: deployment.to_string(), replica, generation }
}

/// Deployments, by name.
pub(super) type Deployments = BTreeMap<String, Deployment>;

#[cfg(test)]
mod tests {
    use awq_job::deployment::EngineOptions;
    use awq_job::Method;

    use super::*;
    use crate::state::tests::{add_worker, commands_to, state};
    use crate::state::JobState;
    use crate::state::WorkerCommand as C;

    fn spec(name: &str, replicas: usize, tp: usize) -> DeploymentSpec {
        DeploymentSpec {
            name: name.into(),
            served_model_name: name.into(),
            model: "/models/m".into(),
            tp,
            pp: 1,
            replicas,
            engine: EngineOptions::default(),
        }
    }

    fn report(worker: &str, replica: u32, generation: u32, state: ReplicaState, bad_input: bool) -> ReplicaReport {
        ReplicaReport {
            worker_id: worker.into(),
            deployment: "m".into(),
            replica,
            generation,
            state,
            error: if state == ReplicaState::Failed { "boom".into() } else { String::new() },
            bad_input,
            stage: 0,
        }
    }

    /// Which worker each replica of `m` is on, and its state.
    fn placement(st: &State) -> Vec<(Option<String>, ReplicaState, u32)> {
        st.deployment("m")
            .unwrap()
            .replicas
            .iter()
            .map(|r| (r.leader().map(String::from), r.state, r.generation))
            .collect()
    }

    fn served(fx: &Effects, worker: &str) -> Vec<(u32, u32)> {
        commands_to(fx, worker)
            .into_iter()
            .filter_map(|c| match c {
                C::Serve { replica, generation, .. } => Some((replica, generation)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn replicas_are_placed_recovered_after_a_lost_worker_and_failed_for_good_on_bad_input() {
        // No job to plan: an empty job list (the helper's job is dropped).
        let mut st = state(&[("w1", "cpu", "h1"), ("w2", "cpu", "h2")], 4, Method::Rtn);
        st.jobs.clear();
        let mut fx = Effects::default();
        st.deploy(spec("m", 2, 3), 4, None, 10, &mut fx).unwrap();
        assert_eq!(served(&fx, "w1"), [(0, 1)]);
        assert_eq!(served(&fx, "w2"), [(1, 1)]);
        // Recorded at deploy, then with the placements' generations.
        let recorded = fx.persist_deployments.last().unwrap();
        assert_eq!(recorded.replicas.iter().map(|r| r.generation).collect::<Vec<_>>(), [1, 1]);
        assert!(matches!(st.deploy(spec("m", 1, 1), 4, None, 11, &mut fx), Err(Error::DeploymentExists(_))));
        let same_served = DeploymentSpec { served_model_name: "m".into(), ..spec("m2", 1, 1) };
        assert!(matches!(st.deploy(same_served, 4, None, 11, &mut fx), Err(Error::ServedNameTaken { .. })));

        // Ready; a stale report (an older generation) changes nothing.
        let mut fx = Effects::default();
        st.replica_report(report("w1", 0, 1, ReplicaState::Ready, false), &mut fx);
        st.replica_report(report("w2", 1, 0, ReplicaState::Failed, true), &mut fx);
        assert_eq!(placement(&st)[0], (Some("w1".into()), ReplicaState::Ready, 1));
        assert_eq!(placement(&st)[1], (Some("w2".into()), ReplicaState::Loading, 1));

        // w1 lost: its replica waits, then goes to the next idle worker as generation 2.
        let mut fx = Effects::default();
        st.worker_left("w1", &mut fx);
        assert_eq!(placement(&st)[0], (None, ReplicaState::Pending, 1));
        add_worker(&mut st, "w3", "cpu", "h3:1");
        st.schedule(&mut fx);
        assert_eq!(served(&fx, "w3"), [(0, 2)]);

        // A load that failed on the worker's fault is placed again; on bad input, never.
        let mut fx = Effects::default();
        st.replica_report(report("w2", 1, 1, ReplicaState::Failed, false), &mut fx);
        assert_eq!(served(&fx, "w2"), [(1, 2)], "placed again on the now idle w2");
        st.replica_report(report("w2", 1, 2, ReplicaState::Failed, true), &mut fx);
        assert_eq!(placement(&st)[1], (None, ReplicaState::Failed, 2));

        // Undeploy: every placed replica is stopped, the record forgotten, the workers freed.
        let mut fx = Effects::default();
        st.undeploy("m", &mut fx).unwrap();
        assert_eq!(commands_to(&fx, "w3"), [C::StopReplica { deployment: "m".into(), replica: 0, generation: 2 }]);
        assert_eq!(fx.forget_deployments, ["m"]);
        assert!(st.workers().all(|w| w.serving.is_none()));
        assert!(matches!(st.undeploy("m", &mut fx), Err(Error::NoSuchDeployment(_))));
    }

    #[test]
    fn a_job_that_asked_to_be_served_is_deployed_when_done_and_only_then() {
        let mut st = state(&[("w1", "cpu", "h1")], 4, Method::Rtn);
        st.jobs.get_mut("j1").unwrap().job.spec.deploy = Some(spec("q", 1, 1));
        let mut fx = Effects::default();
        st.finish_assembly("j1", Err("disk full".into()), 20, &mut fx);
        assert!(st.deployment("q").is_none(), "a failed job is not served");
        assert_eq!(fx.events.last().unwrap().message, "disk full");

        let mut st = state(&[("w1", "cpu", "h1")], 4, Method::Rtn);
        st.jobs.get_mut("j1").unwrap().job.spec.deploy = Some(spec("q", 1, 1));
        let mut fx = Effects::default();
        st.finish_assembly("j1", Ok(()), 20, &mut fx);
        assert!(st.deployment("q").is_some());
        assert_eq!(fx.events.last().unwrap().message, "done; deployed as q");
        assert_eq!(fx.persist_deployments.first().map(|d| d.spec.name.as_str()), Some("q"));

        // A name taken while the job ran: the job is done, and says why it is not served.
        let mut st = state(&[("w1", "cpu", "h1")], 4, Method::Rtn);
        st.jobs.get_mut("j1").unwrap().job.spec.deploy = Some(spec("q", 1, 1));
        st.deploy(spec("q", 1, 1), 4, None, 10, &mut Effects::default()).unwrap();
        let mut fx = Effects::default();
        let job = st.finish_assembly("j1", Ok(()), 20, &mut fx).unwrap();
        assert_eq!(job.state, JobState::Done);
        let message = &fx.events.last().unwrap().message;
        assert!(message.starts_with("done; not deployed: a deployment named q exists"), "{message}");
    }

    #[test]
    fn a_job_deployed_when_done_is_placed_on_the_workers_that_kept_its_blocks() {
        // w1 comes first in the workers' order; the job's blocks were quantized on w2.
        let mut st = state(&[("w1", "cpu", "h1"), ("w2", "cpu", "h2")], 4, Method::Rtn);
        let rt = st.jobs.get_mut("j1").unwrap();
        rt.job.spec.deploy = Some(spec("q", 1, 1));
        rt.job.stages = vec![crate::state::Stage { index: 0, worker: Some("w2".into()), blocks: 0..4, blocks_done: 4, attempt: 0 }];
        let mut fx = Effects::default();
        st.finish_assembly("j1", Ok(()), 20, &mut fx);
        let serve: Vec<Option<String>> = commands_to(&fx, "w2")
            .into_iter()
            .filter_map(|c| match c {
                C::Serve { kept_job, .. } => Some(kept_job),
                _ => None,
            })
            .collect();
        assert_eq!(serve, [Some("j1".to_string())], "placed on w2, told which job's blocks it kept");
        assert!(commands_to(&fx, "w1").is_empty());

        // A deployment made with `awq deploy` names no job.
        let mut st = state(&[("w1", "cpu", "h1")], 4, Method::Rtn);
        let mut fx = Effects::default();
        st.deploy(spec("m", 1, 1), 4, None, 10, &mut fx).unwrap();
        assert!(matches!(&commands_to(&fx, "w1")[..], [C::Serve { kept_job: None, .. }]));
    }

    /// The stage each worker was told to run: (replica, generation, stage, blocks, next address).
    fn stages(fx: &Effects, worker: &str) -> Vec<(u32, u32, Option<StageAssignment>)> {
        commands_to(fx, worker)
            .into_iter()
            .filter_map(|c| match c {
                C::Serve { replica, generation, stage, .. } => Some((replica, generation, stage)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_pipelined_replica_takes_a_worker_per_stage_and_is_placed_again_whole() {
        assert_eq!((0..3).map(|s| stage_blocks(30, 3, s)).collect::<Vec<_>>(), [0..10, 10..20, 20..30]);
        assert_eq!((0..4).map(|s| stage_blocks(7, 4, s)).collect::<Vec<_>>(), [0..1, 1..3, 3..5, 5..7]);

        let mut st = state(&[("w1", "cpu", "h1"), ("w2", "cpu", "h2"), ("w3", "cpu", "h3")], 4, Method::Rtn);
        st.jobs.clear();
        let mut fx = Effects::default();
        let pipelined = DeploymentSpec { pp: 2, ..spec("m", 1, 1) };
        st.deploy(pipelined, 6, None, 10, &mut fx).unwrap();
        let stage =
            |index, blocks, next: Option<&str>| Some(StageAssignment { index, blocks, next: next.map(String::from) });
        assert_eq!(stages(&fx, "w1"), [(0, 1, stage(0, 0..3, Some("h2:50153")))]);
        assert_eq!(stages(&fx, "w2"), [(0, 1, stage(1, 3..6, None))]);
        assert!(stages(&fx, "w3").is_empty(), "two stages, two workers");

        // Ready once both stages are.
        let mut fx = Effects::default();
        st.replica_report(report("w2", 0, 1, ReplicaState::Ready, false), &mut fx);
        assert_eq!(placement(&st)[0].1, ReplicaState::Loading);
        st.replica_report(report("w1", 0, 1, ReplicaState::Ready, false), &mut fx);
        assert_eq!(placement(&st), [(Some("w1".to_string()), ReplicaState::Ready, 1)]);
        let wire = crate::wire::deployment_to_wire(st.deployment("m").unwrap(), |_| None);
        assert_eq!(wire.replicas[0].stage_workers, ["w1", "w2"]);

        // The second stage's worker is lost: the first stage stops, and the replica goes whole onto
        // the two idle workers.
        let mut fx = Effects::default();
        st.worker_left("w2", &mut fx);
        assert!(commands_to(&fx, "w1").contains(&C::StopReplica { deployment: "m".into(), replica: 0, generation: 1 }));
        assert_eq!(stages(&fx, "w1"), [(0, 2, stage(0, 0..3, Some("h3:50154")))]);
        assert_eq!(stages(&fx, "w3"), [(0, 2, stage(1, 3..6, None))]);

        // A stage that fails on the deployment's input fails the replica for good; the other stops.
        let mut fx = Effects::default();
        st.replica_report(report("w3", 0, 2, ReplicaState::Failed, true), &mut fx);
        assert_eq!(placement(&st), [(None, ReplicaState::Failed, 2)]);
        assert!(commands_to(&fx, "w1").contains(&C::StopReplica { deployment: "m".into(), replica: 0, generation: 2 }));
        assert!(stages(&fx, "w1").is_empty() && stages(&fx, "w3").is_empty());
    }

    #[test]
    fn a_gpu_worker_takes_one_rank_and_serving_workers_take_no_stage() {
        let mut st = state(&[("g1", "cuda:0", "h1"), ("c1", "cpu", "h2")], 4, Method::Rtn);
        let mut fx = Effects::default();
        // tp 2 fits only the CPU worker (threads); the job then has no idle worker left.
        st.deploy(spec("m", 1, 2), 4, None, 10, &mut fx).unwrap();
        assert_eq!(served(&fx, "c1"), [(0, 1)]);
        assert!(served(&fx, "g1").is_empty());
        assert!(commands_to(&fx, "c1").iter().all(|c| !matches!(c, C::Assign(_))), "a serving worker takes no stage");
        assert!(commands_to(&fx, "g1").iter().any(|c| matches!(c, C::Assign(_))), "the GPU worker plans the job");
    }

    #[test]
    fn a_gpu_worker_with_several_serving_gpus_takes_a_replica_of_as_many_ranks() {
        let mut st = state(&[("g1", "cuda:0", "h1")], 4, Method::Rtn);
        st.jobs.clear();
        let gpus = |n: usize| (0..n).map(Device::Cuda).collect::<Vec<_>>();
        st.workers.get_mut("g1").expect("added").serving_devices = gpus(2);
        let mut fx = Effects::default();
        // 4 ranks do not fit its 2 GPUs; 2 ranks take both.
        st.deploy(spec("big", 1, 4), 4, None, 10, &mut fx).unwrap();
        assert!(served(&fx, "g1").is_empty());
        let mut fx = Effects::default();
        st.deploy(spec("m", 1, 2), 4, None, 10, &mut fx).unwrap();
        let devices: Vec<Vec<Device>> = commands_to(&fx, "g1")
            .into_iter()
            .filter_map(|c| match c {
                C::Serve { devices, .. } => Some(devices),
                _ => None,
            })
            .collect();
        assert_eq!(devices, [gpus(2)]);
    }

    fn worker(id: &str) -> crate::state::WorkerRecord {
        crate::state::WorkerRecord {
            id: id.into(),
            name: id.into(),
            device: Device::Cpu,
            serving_devices: vec![Device::Cpu],
            gpu_model: String::new(),
            memory_bytes: 1 << 40,
            stage_address: format!("{id}:1"),
            busy_with: None,
            serving: None,
            connected_unix_ms: 0,
        }
    }

    #[test]
    fn a_restarted_coordinator_takes_back_the_replicas_workers_list_and_stops_the_rest() {
        let mut st = State::default();
        st.resume_deployment(spec("m", 2, 1), 4, 10, &[4, 7]);
        let mut fx = Effects::default();
        // w1 runs replica 0 (generation 4) and a replica of a deployment that is gone.
        let gone = ReplicaReport { deployment: "old".into(), ..report("w1", 0, 1, ReplicaState::Ready, false) };
        st.join(worker("w1"), vec![report("w1", 0, 4, ReplicaState::Ready, false), gone], &mut fx);
        assert_eq!(placement(&st)[0], (Some("w1".into()), ReplicaState::Ready, 4));
        assert_eq!(commands_to(&fx, "w1"), [C::StopReplica { deployment: "old".into(), replica: 0, generation: 1 }]);
        // w2 lists replica 0 too (placed elsewhere now): stopped; it takes pending replica 1 instead.
        let mut fx = Effects::default();
        st.join(worker("w2"), vec![report("w2", 0, 3, ReplicaState::Ready, false)], &mut fx);
        assert_eq!(commands_to(&fx, "w2")[0], C::StopReplica { deployment: "m".into(), replica: 0, generation: 3 });
        assert_eq!(served(&fx, "w2"), [(1, 8)]);
    }

    #[test]
    fn a_restarted_coordinator_takes_back_a_pipelined_replica_whole_once_every_stage_rejoined() {
        let stage = |w: &str, stage: usize, generation: u32, state: ReplicaState| ReplicaReport {
            stage,
            ..report(w, 0, generation, state, false)
        };
        let mut st = State::default();
        st.resume_deployment(DeploymentSpec { pp: 3, ..spec("m", 1, 1) }, 6, 10, &[5]);

        // Stage 1 rejoins first: held (no placement, no stop), and the grace period starts.
        let mut fx = Effects::default();
        st.join(worker("w2"), vec![stage("w2", 1, 5, ReplicaState::Ready)], &mut fx);
        assert_eq!(fx.rejoin_deadlines, [("m".to_string(), 0, 5)]);
        assert!(fx.commands.is_empty(), "{:?}", fx.commands);
        assert_eq!(placement(&st), [(None, ReplicaState::Pending, 5)]);
        // A stage of an older generation is not this replica's: stopped.
        let mut fx = Effects::default();
        st.join(worker("old"), vec![stage("old", 2, 4, ReplicaState::Ready)], &mut fx);
        assert_eq!(commands_to(&fx, "old"), [C::StopReplica { deployment: "m".into(), replica: 0, generation: 4 }]);
        assert!(fx.rejoin_deadlines.is_empty());
        // Stage 0 rejoins while still loading, then stage 2: the replica is back whole, in stage order,
        // without a reload; stage 0's later report makes it ready.
        let mut fx = Effects::default();
        st.join(worker("w1"), vec![stage("w1", 0, 5, ReplicaState::Loading)], &mut fx);
        st.join(worker("w3"), vec![stage("w3", 2, 5, ReplicaState::Ready)], &mut fx);
        assert!(fx.commands.is_empty() && fx.rejoin_deadlines.is_empty(), "{fx:?}");
        let r = &st.deployment("m").unwrap().replicas[0];
        assert_eq!(
            (r.workers.clone(), r.state, r.generation),
            (vec!["w1".into(), "w2".into(), "w3".into()], ReplicaState::Loading, 5)
        );
        st.replica_report(stage("w1", 0, 5, ReplicaState::Ready), &mut fx);
        assert_eq!(placement(&st), [(Some("w1".into()), ReplicaState::Ready, 5)]);
        // The deadline of a replica taken back whole changes nothing.
        let mut fx = Effects::default();
        st.rejoin_expired("m", 0, 5, &mut fx);
        assert!(fx.commands.is_empty());
        assert_eq!(placement(&st), [(Some("w1".into()), ReplicaState::Ready, 5)]);
    }

    #[test]
    fn a_pipelined_replica_missing_a_stage_after_the_grace_is_placed_again() {
        let stage = |w: &str, stage: usize| ReplicaReport { stage, ..report(w, 0, 5, ReplicaState::Ready, false) };
        let mut st = State::default();
        st.resume_deployment(DeploymentSpec { pp: 2, ..spec("m", 1, 1) }, 6, 10, &[5]);
        let mut fx = Effects::default();
        st.join(worker("w1"), vec![stage("w1", 0)], &mut fx);
        st.join(worker("w3"), vec![], &mut fx);
        assert!(served(&fx, "w3").is_empty(), "w1 is held for its replica: one idle worker is not two");
        // Stage 1 never comes back: w1's stage stops, and the replica goes onto w1 and w3.
        let mut fx = Effects::default();
        st.rejoin_expired("m", 0, 5, &mut fx);
        assert_eq!(commands_to(&fx, "w1")[0], C::StopReplica { deployment: "m".into(), replica: 0, generation: 5 });
        assert_eq!(served(&fx, "w1").len() + served(&fx, "w3").len(), 2, "{fx:?}");
        assert_eq!(placement(&st)[0].1, ReplicaState::Loading);
        assert_eq!(placement(&st)[0].2, 6);

        // A rejoined stage whose worker is lost gives the rejoin up at once.
        let mut st = State::default();
        st.resume_deployment(DeploymentSpec { pp: 2, ..spec("m", 1, 1) }, 6, 10, &[5]);
        let mut fx = Effects::default();
        st.join(worker("w1"), vec![stage("w1", 0)], &mut fx);
        st.join(worker("w2"), vec![stage("w2", 1)], &mut fx);
        st.join(worker("w3"), vec![], &mut fx);
        assert_eq!(placement(&st)[0], (Some("w1".into()), ReplicaState::Ready, 5));
        let mut st = State::default();
        st.resume_deployment(DeploymentSpec { pp: 3, ..spec("m", 1, 1) }, 6, 10, &[5]);
        let mut fx = Effects::default();
        st.join(worker("w1"), vec![stage("w1", 0)], &mut fx);
        st.join(worker("w2"), vec![stage("w2", 1)], &mut fx);
        let mut fx = Effects::default();
        st.worker_left("w2", &mut fx);
        assert_eq!(commands_to(&fx, "w1"), [C::StopReplica { deployment: "m".into(), replica: 0, generation: 5 }]);
        assert!(st.deployment("m").unwrap().replicas[0].rejoining.is_empty());
    }
}
