//! NCCL groups: which chains of stages pass their activations over NCCL, and what the coordinator
//! keeps for each one (its members and, once rank 0 published it, its unique id).
//!
//! The rule ([`plan_groups`]), applied to the stages of one planning round: a chain starts at a
//! stage that receives no activations (its input is recomputed from the embeddings: the first
//! stage of a first plan, and every stage planned again after a lost worker) and follows the
//! stages that receive the activations of the one before. A chain of two stages or more whose
//! workers all compute on CUDA devices, each on its own GPU, becomes one group: its stages are the
//! ranks 0..n in chain order, and the group is named `{job}/{attempt}/{first stage index}`, unique
//! per job, attempt and chain. Every other stage (a chain with a CPU worker in it, a stage alone)
//! keeps gRPC. Since a re-planned stage starts from the embeddings, it is rank 0 of a new group
//! whenever it starts a chain again, and never joins the group of a lost attempt.
//!
//! Two ranks on one GPU are refused by NCCL, so a chain whose workers share a host and a device
//! (two `awq worker --device cuda:0` on one machine) stays on gRPC. The host is the one in each
//! worker's stage address, the address its peers reach it at.
//!
//! What this module does not do: send anything (the scheduler turns groups into assignment fields
//! and commands) or look inside an id (bytes, relayed as they came).

use std::collections::BTreeSet;

use awq_job::Device;

/// A stage of one planning round, as the group rule sees it.
#[derive(Clone, Debug)]
pub(crate) struct PlannedStage<'a> {
    pub index: u32,
    pub attempt: u32,
    pub worker_id: &'a str,
    /// The device the stage computes on.
    pub device: Device,
    /// `host:port` of the worker's StageService.
    pub stage_address: &'a str,
    /// Position, in the round, of the stage that receives this one's output activations.
    pub next: Option<usize>,
}

/// One rank of a group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Member {
    pub worker_id: String,
    pub stage_index: u32,
}

/// The communicator of one chain of GPU stages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NcclGroup {
    pub name: String,
    /// Rank 0 first.
    pub members: Vec<Member>,
    /// The unique id, once rank 0 published it.
    pub id: Option<Vec<u8>>,
}

impl NcclGroup {
    /// The rank of stage `stage_index`, when it is a member.
    pub fn rank_of(&self, stage_index: u32) -> Option<usize> {
        self.members.iter().position(|m| m.stage_index == stage_index)
    }
}

/// The GPU a stage runs on: its worker's host and device.
fn gpu_key<'a>(s: &PlannedStage<'a>) -> (&'a str, Device) {
    let host = s.stage_address.rsplit_once(':').map_or(s.stage_address, |(host, _port)| host);
    (host, s.device)
}

/// The groups among the stages of one planning round of job `job_id` (see the module docs), and
/// for each stage, its group (a position in the returned list) and rank, or `None` for gRPC.
pub(crate) fn plan_groups(job_id: &str, stages: &[PlannedStage<'_>]) -> (Vec<NcclGroup>, Vec<Option<(usize, u32)>>) {
    let receivers: BTreeSet<usize> = stages.iter().filter_map(|s| s.next).collect();
    let mut groups = Vec::new();
    let mut ranks = vec![None; stages.len()];
    for start in (0..stages.len()).filter(|k| !receivers.contains(k)) {
        let mut chain = vec![start];
        while let Some(next) = stages[*chain.last().expect("a chain holds its start")].next {
            // A malformed plan (a link back into the chain) must not loop forever.
            if next >= stages.len() || chain.contains(&next) {
                break;
            }
            chain.push(next);
        }
        let distinct_gpus: BTreeSet<(&str, Device)> = chain.iter().map(|&k| gpu_key(&stages[k])).collect();
        let nccl = chain.len() >= 2 && chain.iter().all(|&k| matches!(stages[k].device, Device::Cuda(_))) && distinct_gpus.len() == chain.len();
        if !nccl {
            continue;
        }
        let first = &stages[start];
        for (rank, &k) in chain.iter().enumerate() {
            ranks[k] = Some((groups.len(), rank as u32));
        }
        groups.push(NcclGroup {
            name: format!("{job_id}/{}/{}", first.attempt, first.index),
            members: chain
                .iter()
                .map(|&k| Member { worker_id: stages[k].worker_id.to_string(), stage_index: stages[k].index })
                .collect(),
            id: None,
        });
    }
    (groups, ranks)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stages `index` = position, attempt 0, on workers `w{k}` at `host{k}:1` unless `host` says
    /// otherwise: (device, host, next).
    fn check(stages: &[(&str, &str, Option<usize>)], expected_names: &[&str], expected_ranks: &[Option<(usize, u32)>]) {
        let workers: Vec<String> = (0..stages.len()).map(|k| format!("w{k}")).collect();
        let addresses: Vec<String> = stages.iter().map(|(_, host, _)| format!("{host}:50152")).collect();
        let planned: Vec<PlannedStage> = stages
            .iter()
            .enumerate()
            .map(|(k, &(device, _, next))| PlannedStage {
                index: 3 + k as u32,
                attempt: 1,
                worker_id: &workers[k],
                device: device.parse().unwrap(),
                stage_address: &addresses[k],
                next,
            })
            .collect();
        let (groups, ranks) = plan_groups("j1", &planned);
        let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, expected_names, "{stages:?}");
        assert_eq!(ranks, expected_ranks, "{stages:?}");
        for (g, group) in groups.iter().enumerate() {
            for (rank, m) in group.members.iter().enumerate() {
                let k = (m.stage_index - 3) as usize;
                assert_eq!(m.worker_id, workers[k]);
                assert_eq!(ranks[k], Some((g, rank as u32)), "members in rank order");
                assert_eq!(group.rank_of(m.stage_index), Some(rank));
            }
            assert!(group.id.is_none());
        }
    }

    #[test]
    fn a_chain_of_gpu_stages_is_one_group_in_chain_order() {
        check(
            &[("cuda:0", "a", Some(1)), ("cuda:1", "a", Some(2)), ("cuda:0", "b", None)],
            &["j1/1/3"],
            &[Some((0, 0)), Some((0, 1)), Some((0, 2))],
        );
        // Hosts tell GPUs of the same ordinal apart.
        check(&[("cuda", "a", Some(1)), ("cuda:0", "b", None)], &["j1/1/3"], &[Some((0, 0)), Some((0, 1))]);
    }

    #[test]
    fn mixed_chains_lone_stages_and_shared_gpus_stay_on_grpc() {
        // A CPU worker anywhere in the chain.
        check(&[("cuda:0", "a", Some(1)), ("cpu", "a", Some(2)), ("cuda:1", "a", None)], &[], &[None, None, None]);
        check(&[("cpu", "a", Some(1)), ("cuda:1", "a", None)], &[], &[None, None]);
        // Nobody to talk to.
        check(&[("cuda:0", "a", None)], &[], &[None]);
        // Two workers on one GPU of one host.
        check(&[("cuda:0", "a", Some(1)), ("cuda", "a", None)], &[], &[None, None]);
    }

    #[test]
    fn each_recomputed_input_starts_a_group_of_its_own() {
        // Two chains in one round (0 -> 1 and 2 -> 3), and a stage alone: two groups, each named
        // after its first stage, with its own ranks from 0.
        check(
            &[("cuda:0", "a", Some(1)), ("cuda:1", "a", None), ("cuda:2", "a", Some(3)), ("cuda:3", "a", None), ("cuda:4", "a", None)],
            &["j1/1/3", "j1/1/5"],
            &[Some((0, 0)), Some((0, 1)), Some((1, 0)), Some((1, 1)), None],
        );
        // A GPU chain after a CPU stage that is not linked to it.
        check(&[("cpu", "a", None), ("cuda:0", "a", Some(2)), ("cuda:1", "a", None)], &["j1/1/4"], &[None, Some((0, 0)), Some((0, 1))]);
    }

    #[test]
    fn a_link_back_into_the_chain_ends_it() {
        // Not something the scheduler plans; the rule must still end.
        check(&[("cuda:0", "a", Some(1)), ("cuda:1", "a", Some(1))], &["j1/1/3"], &[Some((0, 0)), Some((0, 1))]);
    }
}
