//! Scheduling: which idle worker takes which unfinished blocks, and the [`Assignment`] that tells it.
//!
//! [`State::schedule`] runs after every event (submit, join, loss, finished stage, failure). For
//! each running or queued job in submission order, the blocks that are neither finished nor held
//! by a live stage are cut into contiguous runs and planned over the idle workers
//! ([`crate::planner::plan`], bounded by each worker's memory); a tail that nobody holds gets a
//! stage of its own. A first AWQ plan chains its stages (stage k+1 receives its input activations
//! from stage k); every other stage recomputes its input from the embeddings, which is exact and
//! cheap next to the search. Chains of GPU stages become NCCL groups ([`crate::nccl`]).
//!
//! Pure, like the rest of [`crate::state`]: assignments are values; the service turns them into
//! `awq.v1` messages and sends them.

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::PathBuf;

use awq_job::{Device, JobOptions};
use tracing::info;

use super::{Effects, JobState, Stage, StageRef, State, WorkerCommand};
use crate::nccl::{plan_groups, PlannedStage};
use crate::planner::{block_capacity, plan};

/// A stage as its worker runs it.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    pub job_id: String,
    /// The checkpoint, as the worker sees it.
    pub model: PathBuf,
    pub options: JobOptions,
    /// Where the stage computes (the worker's device).
    pub device: Device,
    pub stage_index: u32,
    pub attempt: u32,
    pub blocks: Range<u32>,
    /// Blocks of the range already finished (by an earlier attempt): forward only.
    pub blocks_done: Vec<u32>,
    pub input: StageInput,
    /// The stage that receives this one's output activations.
    pub next: Option<NextStage>,
    /// Also deliver the tail (the tensors outside the blocks).
    pub produce_tail: bool,
    pub transport: Transport,
    /// The job is deployed when done: the worker keeps its blocks in memory to serve them.
    pub keep_for_serving: bool,
}

/// Where a stage's input activations come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageInput {
    /// Recomputed from the embeddings through the original blocks before the stage's first.
    Embeddings,
    /// Sent by the stage before it in its chain.
    PreviousStage,
}

/// The stage a stage sends its output activations to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NextStage {
    /// `host:port` of its worker's StageService.
    pub address: String,
    pub index: u32,
}

/// How a stage passes activations to its neighbours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    /// Rank `rank` of the `ranks` of NCCL group `group`.
    Nccl {
        group: String,
        rank: u32,
        ranks: u32,
    },
}

/// The worker a stage planned this round runs on.
fn worker_of(s: &Stage) -> &str {
    s.worker.as_deref().expect("a stage is planned with its worker")
}

impl State {
    /// Plans unfinished, unheld blocks over idle workers (see the module docs).
    pub fn schedule(&mut self, fx: &mut Effects) {
        // Replicas first: a deployment is there to answer requests now (see `serving`).
        self.place_replicas(fx);
        let mut order: Vec<(u64, String)> = self
            .jobs
            .values()
            .filter(|j| matches!(j.job.state, JobState::Queued | JobState::Running))
            .map(|j| (j.job.created_unix_ms, j.job.id.clone()))
            .collect();
        order.sort();
        for (_, job_id) in order {
            let mut idle: Vec<String> =
                self.workers.iter().filter(|(_, w)| w.busy_with.is_none() && w.serving.is_none()).map(|(id, _)| id.clone()).collect();
            if idle.is_empty() {
                return;
            }
            let rt = self.jobs.get_mut(&job_id).expect("job ids come from the map");
            let n_blocks = rt.job.n_blocks;
            let covered: BTreeSet<u32> = rt.job.stages.iter().filter(|s| s.worker.is_some()).flat_map(|s| s.blocks.clone()).collect();
            let missing: Vec<u32> = (0..n_blocks).filter(|b| !rt.done.contains(b) && !covered.contains(b)).collect();
            let tail_held = rt.job.stages.iter().any(|s| s.worker.is_some() && s.blocks.end == n_blocks);
            let need_tail = !rt.tail_done && !tail_held;
            if missing.is_empty() && !need_tail {
                continue;
            }
            // Contiguous runs of missing blocks; an empty run carries a lone tail.
            let mut runs: Vec<Range<u32>> = Vec::new();
            for &b in &missing {
                match runs.last_mut() {
                    Some(r) if r.end == b => r.end += 1,
                    _ => runs.push(b..b + 1),
                }
            }
            if runs.is_empty() {
                runs.push(n_blocks..n_blocks);
            }
            let fresh = rt.job.stages.is_empty();
            let attempt = rt.job.stages.iter().map(|s| s.attempt + 1).max().unwrap_or(0);
            let mut new_stages: Vec<Stage> = Vec::new();
            for run in runs {
                if idle.is_empty() {
                    break;
                }
                let capacities: Vec<usize> = idle
                    .iter()
                    .map(|w| block_capacity(self.workers[w].memory_bytes, rt.job.spec.per_block_bytes, rt.job.spec.fixed_bytes))
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
                    let blocks = r.start as u32..r.end as u32;
                    new_stages.push(Stage {
                        index: (rt.job.stages.len() + new_stages.len()) as u32,
                        worker: Some(idle[i].clone()),
                        blocks_done: blocks.clone().filter(|b| rt.done.contains(b)).count() as u32,
                        blocks,
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
            let method_awq = rt.job.spec.options.method.needs_activations();
            let n = new_stages.len();
            // A first AWQ plan chains its stages; everything else starts from the embeddings.
            let next_of = |k: usize| (fresh && method_awq && k + 1 < n).then_some(k + 1);
            let planned: Vec<PlannedStage> = new_stages
                .iter()
                .enumerate()
                .map(|(k, s)| {
                    let worker = &self.workers[worker_of(s)];
                    PlannedStage {
                        index: s.index,
                        attempt: s.attempt,
                        worker_id: &worker.id,
                        device: worker.device,
                        stage_address: &worker.stage_address,
                        next: next_of(k),
                    }
                })
                .collect();
            let (groups, ranks) = plan_groups(&rt.job.id, &planned);
            for (k, stage) in new_stages.iter().enumerate() {
                let chained = fresh && method_awq && k > 0;
                let next = next_of(k).map(|k| &new_stages[k]);
                let transport = match ranks[k] {
                    Some((g, rank)) => Transport::Nccl { group: groups[g].name.clone(), rank, ranks: groups[g].members.len() as u32 },
                    None => Transport::Grpc,
                };
                let assignment = Assignment {
                    job_id: rt.job.id.clone(),
                    model: rt.job.spec.model.clone(),
                    options: rt.job.spec.options.clone(),
                    device: self.workers[worker_of(stage)].device,
                    stage_index: stage.index,
                    attempt: stage.attempt,
                    blocks: stage.blocks.clone(),
                    blocks_done: stage.blocks.clone().filter(|b| rt.done.contains(b)).collect(),
                    input: if chained { StageInput::PreviousStage } else { StageInput::Embeddings },
                    next: next.map(|s| NextStage { address: self.workers[worker_of(s)].stage_address.clone(), index: s.index }),
                    produce_tail: !rt.tail_done && stage.blocks.end == n_blocks,
                    transport,
                    keep_for_serving: rt.job.spec.deploy.is_some(),
                };
                fx.commands.push((worker_of(stage).to_string(), WorkerCommand::Assign(assignment)));
            }
            for stage in &new_stages {
                let w = self.workers.get_mut(worker_of(stage)).expect("planned over known workers");
                w.busy_with = Some(StageRef { job_id: rt.job.id.clone(), stage_index: stage.index });
            }
            let mut summary: Vec<String> =
                new_stages.iter().map(|s| format!("{}..{} on {}", s.blocks.start, s.blocks.end, worker_of(s))).collect();
            for g in &groups {
                let stages: Vec<String> = g.members.iter().map(|m| m.stage_index.to_string()).collect();
                summary.push(format!("stages {} pass activations over NCCL (group {})", stages.join(" -> "), g.name));
            }
            rt.nccl_groups.extend(groups.into_iter().map(|g| (g.name.clone(), g)));
            rt.job.stages.extend(new_stages);
            rt.job.state = JobState::Running;
            info!(job = %rt.job.id, "planned {}", summary.join(", "));
            rt.emit(format!("planned {}", summary.join(", ")), fx);
            fx.persist.push(rt.job.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use awq_job::Method;

    use super::*;
    use crate::state::tests::{assignment_of, state};

    fn nccl(group: &str, rank: u32, ranks: u32) -> Transport {
        Transport::Nccl { group: group.into(), rank, ranks }
    }

    fn schedule(st: &mut State) -> Effects {
        let mut fx = Effects::default();
        st.schedule(&mut fx);
        fx
    }

    use StageInput::{Embeddings, PreviousStage};
    use Transport::Grpc;

    #[test]
    fn a_first_awq_plan_over_gpus_is_one_nccl_group_in_chain_order() {
        let mut st = state(&[("w0", "cuda:0", "a"), ("w1", "cuda:1", "a"), ("w2", "cuda:0", "b")], 6, Method::Awq);
        let fx = schedule(&mut st);
        let [a0, a1, a2] = ["w0", "w1", "w2"].map(|w| assignment_of(&fx, w));
        assert_eq!((&a0.transport, a0.input), (&nccl("j1/0/0", 0, 3), Embeddings));
        assert_eq!((&a1.transport, a1.input), (&nccl("j1/0/0", 1, 3), PreviousStage));
        assert_eq!((&a2.transport, a2.input), (&nccl("j1/0/0", 2, 3), PreviousStage));
        // The chain itself is as before: each stage names the next one.
        assert_eq!(a0.next, Some(NextStage { address: "a:50153".into(), index: 1 }));
        assert_eq!((a0.blocks, a2.blocks.clone()), (0..2, 4..6));
        assert_eq!(a2.next, None);
        let group = &st.jobs["j1"].nccl_groups["j1/0/0"];
        let members: Vec<(&str, u32)> = group.members.iter().map(|m| (m.worker_id.as_str(), m.stage_index)).collect();
        assert_eq!(members, [("w0", 0), ("w1", 1), ("w2", 2)]);
        assert_eq!(group.id, None);
        // Each worker is busy with its stage; the job runs.
        assert_eq!(st.workers["w2"].busy_with, Some(StageRef { job_id: "j1".into(), stage_index: 2 }));
        assert_eq!(st.jobs["j1"].job.state, JobState::Running);
        assert!(a2.produce_tail && !a0.produce_tail);
    }

    #[test]
    fn mixed_chains_and_unchained_jobs_stay_on_grpc() {
        let mut st = state(&[("w0", "cuda:0", "a"), ("w1", "cpu", "a")], 4, Method::Awq);
        let fx = schedule(&mut st);
        let [a0, a1] = ["w0", "w1"].map(|w| assignment_of(&fx, w));
        assert_eq!((a0.transport, a0.input, a1.transport, a1.input), (Grpc, Embeddings, Grpc, PreviousStage));
        assert!(st.jobs["j1"].nccl_groups.is_empty());

        // RTN passes no activations: no chain, no group, even on GPUs.
        let mut st = state(&[("w0", "cuda:0", "a"), ("w1", "cuda:1", "a")], 4, Method::Rtn);
        let fx = schedule(&mut st);
        let [a0, a1] = ["w0", "w1"].map(|w| assignment_of(&fx, w));
        assert_eq!((a0.transport, a0.input, a0.next), (Grpc, Embeddings, None));
        assert_eq!((a1.transport, a1.input), (Grpc, Embeddings));

        // Two workers on one GPU: NCCL would refuse them.
        let mut st = state(&[("w0", "cuda:0", "a"), ("w1", "cuda:0", "a")], 4, Method::Awq);
        let fx = schedule(&mut st);
        let a1 = assignment_of(&fx, "w1");
        assert_eq!((a1.transport, a1.input), (Grpc, PreviousStage));
    }
}
