//! Deployments: checkpoints served by replicas on workers, and what each event does to them (a
//! deploy, an undeploy, a worker's report on a replica, a worker that joins or is lost).
//!
//! A replica is one worker (pipelined replicas are not built yet: `pp` is 1) whose device runs
//! its `tp` ranks (CPU threads, or the worker's GPU when `tp` is 1). Its life: `Pending` (waiting
//! for an idle worker) -> placed, `Loading` (a `Serve` command; `generation` + 1) -> `Ready` (the
//! worker reported it) -> back to `Pending` when its worker is lost or its load failed on the
//! worker's fault; `Failed` for good when the load failed on the deployment's own input (its
//! model, its options). A worker that serves a replica takes no quantization stage, and pending
//! replicas are placed before jobs are planned (a deployment is there to answer requests now).
//! A report of an older generation is stale and changes nothing.
//!
//! A worker that joins lists the replicas it runs already: a restarted coordinator (which read its
//! deployments back with every replica pending) takes them back as they are, without a reload; a
//! replica the coordinator does not want there (undeployed meanwhile, placed elsewhere) is
//! stopped.

use std::collections::BTreeMap;

use awq_job::deployment::DeploymentSpec;
use awq_job::Device;
use tracing::{info, warn};

use super::{Effects, State, WorkerCommand};
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
    /// The worker it is placed on; `None` while pending (or failed).
    pub worker: Option<String>,
    /// Where its ranks compute (the worker's device), once placed.
    pub devices: Vec<Device>,
    /// +1 at each placement; a report names the generation it is about.
    pub generation: u32,
    /// Why it failed, or why its last placement was lost.
    pub error: Option<String>,
}

/// A deployment and its replicas.
#[derive(Clone, Debug, PartialEq)]
pub struct Deployment {
    pub spec: DeploymentSpec,
    pub replicas: Vec<ReplicaRecord>,
    pub created_unix_ms: u64,
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
}

impl Deployment {
    fn new(spec: DeploymentSpec, created_unix_ms: u64) -> Deployment {
        let replicas = (0..spec.replicas as u32)
            .map(|index| ReplicaRecord {
                index,
                state: ReplicaState::Pending,
                worker: None,
                devices: Vec::new(),
                generation: 0,
                error: None,
            })
            .collect();
        Deployment { spec, replicas, created_unix_ms }
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

    /// A new deployment of `spec`; its replicas are placed on idle workers now and as workers come.
    /// Errors: `DeploymentExists` when the name is taken, `ServedNameTaken` when another deployment
    /// serves its model name.
    pub fn deploy(&mut self, spec: DeploymentSpec, now_ms: u64, fx: &mut Effects) -> Result<Deployment> {
        self.check_names_free(&spec)?;
        let name = spec.name.clone();
        let deployment = Deployment::new(spec, now_ms);
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
    pub fn resume_deployment(&mut self, spec: DeploymentSpec, created_unix_ms: u64, generations: &[u32]) {
        let mut d = Deployment::new(spec, created_unix_ms);
        for (r, &g) in d.replicas.iter_mut().zip(generations) {
            r.generation = g;
        }
        self.deployments.insert(d.spec.name.clone(), d);
    }

    /// Stops every replica of `name` and forgets it. Errors: `NoSuchDeployment`.
    pub fn undeploy(&mut self, name: &str, fx: &mut Effects) -> Result<()> {
        let d = self.deployments.remove(name).ok_or_else(|| Error::NoSuchDeployment(name.to_string()))?;
        for r in &d.replicas {
            if let Some(w) = &r.worker {
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
        if r.generation != report.generation || r.worker.as_deref() != Some(&report.worker_id) {
            return; // stale: about a placement that was replaced
        }
        match report.state {
            ReplicaState::Loading | ReplicaState::Ready => {
                r.state = report.state;
                r.error = None;
                if report.state == ReplicaState::Ready {
                    info!(deployment = %report.deployment, replica = report.replica, worker = %report.worker_id, "replica ready");
                }
            }
            ReplicaState::Failed | ReplicaState::Pending => {
                warn!(deployment = %report.deployment, replica = report.replica, worker = %report.worker_id, "replica failed: {}", report.error);
                r.state = if report.bad_input { ReplicaState::Failed } else { ReplicaState::Pending };
                r.error = Some(report.error);
                r.worker = None;
                r.devices.clear();
                self.release(&report.worker_id);
                self.schedule(fx);
            }
        }
    }

    /// The replicas a joining worker listed: taken back where the coordinator has them pending,
    /// stopped where it does not want them (see the module docs).
    pub(super) fn adopt_replicas(&mut self, worker_id: &str, listed: Vec<ReplicaReport>, fx: &mut Effects) {
        for report in listed {
            let device = self.workers.get(worker_id).map(|w| w.device);
            let free = self.workers.get(worker_id).is_some_and(|w| w.serving.is_none());
            let wanted =
                self.deployments.get_mut(&report.deployment).and_then(|d| d.replicas.get_mut(report.replica as usize));
            match (wanted, device) {
                (Some(r), Some(device)) if r.worker.is_none() && r.state == ReplicaState::Pending && free => {
                    r.worker = Some(worker_id.to_string());
                    r.devices = vec![device];
                    r.generation = r.generation.max(report.generation);
                    r.state = report.state;
                    r.error = None;
                    info!(deployment = %report.deployment, replica = report.replica, worker = %worker_id, "replica taken back");
                    if let Some(w) = self.workers.get_mut(worker_id) {
                        w.serving = Some((report.deployment.clone(), report.replica));
                    }
                }
                _ => fx
                    .commands
                    .push((worker_id.to_string(), stop_named(&report.deployment, report.replica, report.generation))),
            }
        }
    }

    /// A worker was lost: its replica (if any) waits for another placement.
    pub(super) fn lose_replicas(&mut self, worker_id: &str) {
        for d in self.deployments.values_mut() {
            for r in d.replicas.iter_mut().filter(|r| r.worker.as_deref() == Some(worker_id)) {
                warn!(deployment = %d.spec.name, replica = r.index, worker = %worker_id, "replica lost with its worker");
                r.state = ReplicaState::Pending;
                r.worker = None;
                r.devices.clear();
                r.error = Some(format!("its worker {worker_id} was lost"));
            }
        }
    }

    /// Places pending replicas on idle workers that can run them, oldest deployment first.
    pub(super) fn place_replicas(&mut self, fx: &mut Effects) {
        let mut order: Vec<(u64, String)> =
            self.deployments.values().map(|d| (d.created_unix_ms, d.spec.name.clone())).collect();
        order.sort();
        for (_, name) in order {
            let d = self.deployments.get_mut(&name).expect("names come from the map");
            let mut placed = false;
            for r in d.replicas.iter_mut().filter(|r| r.state == ReplicaState::Pending) {
                let tp = d.spec.tp;
                // A CPU worker runs any tp on threads; a GPU worker one rank on its GPU.
                let fits = |device: Device| device == Device::Cpu || tp == 1;
                let Some(w) =
                    self.workers.values_mut().find(|w| w.busy_with.is_none() && w.serving.is_none() && fits(w.device))
                else {
                    break;
                };
                w.serving = Some((name.clone(), r.index));
                r.worker = Some(w.id.clone());
                r.devices = vec![w.device];
                r.generation += 1;
                r.state = ReplicaState::Loading;
                info!(deployment = %name, replica = r.index, worker = %w.id, generation = r.generation, "replica placed");
                fx.commands.push((
                    w.id.clone(),
                    WorkerCommand::Serve {
                        spec: d.spec.clone(),
                        replica: r.index,
                        generation: r.generation,
                        devices: r.devices.clone(),
                    },
                ));
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
    use crate::state::WorkerCommand as C;
    use crate::state::JobState;

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
        }
    }

    /// Which worker each replica of `m` is on, and its state.
    fn placement(st: &State) -> Vec<(Option<String>, ReplicaState, u32)> {
        st.deployment("m").unwrap().replicas.iter().map(|r| (r.worker.clone(), r.state, r.generation)).collect()
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
        st.deploy(spec("m", 2, 3), 10, &mut fx).unwrap();
        assert_eq!(served(&fx, "w1"), [(0, 1)]);
        assert_eq!(served(&fx, "w2"), [(1, 1)]);
        // Recorded at deploy, then with the placements' generations.
        let recorded = fx.persist_deployments.last().unwrap();
        assert_eq!(recorded.replicas.iter().map(|r| r.generation).collect::<Vec<_>>(), [1, 1]);
        assert!(matches!(st.deploy(spec("m", 1, 1), 11, &mut fx), Err(Error::DeploymentExists(_))));
        let same_served = DeploymentSpec { served_model_name: "m".into(), ..spec("m2", 1, 1) };
        assert!(matches!(st.deploy(same_served, 11, &mut fx), Err(Error::ServedNameTaken { .. })));

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
        st.deploy(spec("q", 1, 1), 10, &mut Effects::default()).unwrap();
        let mut fx = Effects::default();
        let job = st.finish_assembly("j1", Ok(()), 20, &mut fx).unwrap();
        assert_eq!(job.state, JobState::Done);
        let message = &fx.events.last().unwrap().message;
        assert!(message.starts_with("done; not deployed: a deployment named q exists"), "{message}");
    }

    #[test]
    fn a_gpu_worker_takes_one_rank_and_serving_workers_take_no_stage() {
        let mut st = state(&[("g1", "cuda:0", "h1"), ("c1", "cpu", "h2")], 4, Method::Rtn);
        let mut fx = Effects::default();
        // tp 2 fits only the CPU worker (threads); the job then has no idle worker left.
        st.deploy(spec("m", 1, 2), 10, &mut fx).unwrap();
        assert_eq!(served(&fx, "c1"), [(0, 1)]);
        assert!(served(&fx, "g1").is_empty());
        assert!(commands_to(&fx, "c1").iter().all(|c| !matches!(c, C::Assign(_))), "a serving worker takes no stage");
        assert!(commands_to(&fx, "g1").iter().any(|c| matches!(c, C::Assign(_))), "the GPU worker plans the job");
    }

    #[test]
    fn a_restarted_coordinator_takes_back_the_replicas_workers_list_and_stops_the_rest() {
        let mut st = State::default();
        st.resume_deployment(spec("m", 2, 1), 10, &[4, 7]);
        let worker = |id: &str| crate::state::WorkerRecord {
            id: id.into(),
            name: id.into(),
            device: Device::Cpu,
            gpu_model: String::new(),
            memory_bytes: 1 << 40,
            stage_address: format!("{id}:1"),
            busy_with: None,
            serving: None,
            connected_unix_ms: 0,
        };
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
}
