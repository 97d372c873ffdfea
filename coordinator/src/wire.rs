//! The one conversion between the coordinator's state ([`crate::state`]) and its `awq.v1` messages:
//! jobs (answered to clients, stored as the encoded `Job` message), workers (`WorkerInfo`), job
//! events and worker commands.
//!
//! A job's `request` is written back from its [`JobSpec`]: the request it was validated from, field
//! for field (paths as given, options through [`awq_job::wire`], which maps every valid option both
//! ways), so a record read back and written again is the same bytes. Records are read back only for
//! jobs that can run on ([`job_from_record`]); the service keeps the ones that ended as read.
//! Nothing here fails but the reading of a job's state.

use awq_job::wire::device_to_wire;
use awq_proto::v1 as pb;
use awq_proto::v1::worker_command::Command;

use crate::state::{
    Assignment, Deployment, Job, JobEvent, JobState, ReplicaReport, ReplicaState, Stage, StageInput, Transport,
    WorkerCommand, WorkerRecord,
};
use crate::validate::JobSpec;

impl From<JobState> for pb::JobState {
    fn from(state: JobState) -> pb::JobState {
        match state {
            JobState::Queued => pb::JobState::Queued,
            JobState::Running => pb::JobState::Running,
            JobState::Assembling => pb::JobState::Assembling,
            JobState::Done => pb::JobState::Done,
            JobState::Failed => pb::JobState::Failed,
            JobState::Cancelled => pb::JobState::Cancelled,
        }
    }
}

/// The state a `Job` message's `state` field names; `None` for unspecified and unknown values.
pub fn job_state_from_wire(state: i32) -> Option<JobState> {
    match pb::JobState::try_from(state).ok()? {
        pb::JobState::Unspecified => None,
        pb::JobState::Queued => Some(JobState::Queued),
        pb::JobState::Running => Some(JobState::Running),
        pb::JobState::Assembling => Some(JobState::Assembling),
        pb::JobState::Done => Some(JobState::Done),
        pb::JobState::Failed => Some(JobState::Failed),
        pb::JobState::Cancelled => Some(JobState::Cancelled),
    }
}

/// The request `spec` was validated from.
fn request_of(spec: &JobSpec) -> pb::SubmitRequest {
    pb::SubmitRequest {
        model_path: spec.model.to_string_lossy().into_owned(),
        output_path: spec.output.to_string_lossy().into_owned(),
        options: Some((&spec.options).into()),
        overwrite: spec.overwrite,
        deploy: spec.deploy.as_ref().map(pb::DeploymentSpec::from),
    }
}

impl From<&Stage> for pb::Stage {
    fn from(s: &Stage) -> pb::Stage {
        pb::Stage {
            index: s.index,
            worker_id: s.worker.clone().unwrap_or_default(),
            block_start: s.blocks.start,
            block_end: s.blocks.end,
            blocks_done: s.blocks_done,
            attempt: s.attempt,
        }
    }
}

impl From<&Job> for pb::Job {
    fn from(job: &Job) -> pb::Job {
        pb::Job {
            id: job.id.clone(),
            state: pb::JobState::from(job.state) as i32,
            request: Some(request_of(&job.spec)),
            n_blocks: job.n_blocks,
            blocks_done: job.blocks_done,
            stages: job.stages.iter().map(pb::Stage::from).collect(),
            error: job.error.clone().unwrap_or_default(),
            created_unix_ms: job.created_unix_ms,
            finished_unix_ms: job.finished_unix_ms.unwrap_or(0),
            model_type: job.model_type.clone(),
            waiting_for_disk_space: job.waiting_for_space.clone().unwrap_or_default(),
        }
    }
}

/// The job of a stored `record` that can run on (its state queued, running or assembling; `None`
/// otherwise), with `spec`, what its request validates to now.
pub fn job_from_record(record: &pb::Job, spec: JobSpec) -> Option<Job> {
    let state = job_state_from_wire(record.state).filter(|s| !s.is_terminal())?;
    let stages = record
        .stages
        .iter()
        .map(|s| Stage {
            index: s.index,
            worker: Some(s.worker_id.clone()).filter(|w| !w.is_empty()),
            blocks: s.block_start..s.block_end,
            blocks_done: s.blocks_done,
            attempt: s.attempt,
        })
        .collect();
    Some(Job {
        id: record.id.clone(),
        state,
        spec,
        n_blocks: record.n_blocks,
        blocks_done: record.blocks_done,
        stages,
        error: Some(record.error.clone()).filter(|e| !e.is_empty()),
        created_unix_ms: record.created_unix_ms,
        finished_unix_ms: Some(record.finished_unix_ms).filter(|&t| t != 0),
        model_type: record.model_type.clone(),
        waiting_for_space: Some(record.waiting_for_disk_space.clone()).filter(|w| !w.is_empty()),
    })
}

impl From<JobEvent> for pb::JobEvent {
    fn from(event: JobEvent) -> pb::JobEvent {
        pb::JobEvent { job: Some((&event.job).into()), message: event.message }
    }
}

impl From<&WorkerRecord> for pb::WorkerInfo {
    fn from(w: &WorkerRecord) -> pb::WorkerInfo {
        pb::WorkerInfo {
            worker_id: w.id.clone(),
            name: w.name.clone(),
            compute_device: Some(device_to_wire(w.device)),
            gpu_model: w.gpu_model.clone(),
            memory_bytes: w.memory_bytes,
            stage_address: w.stage_address.clone(),
            busy_with_job: w.busy_with.as_ref().map(|s| s.job_id.clone()).unwrap_or_default(),
            connected_unix_ms: w.connected_unix_ms,
            serving: w.serving.as_ref().map(|(d, r)| format!("{d}/{r}")).unwrap_or_default(),
            serving_devices: w.serving_devices.iter().map(|&d| device_to_wire(d)).collect(),
        }
    }
}

impl From<Assignment> for pb::Assignment {
    fn from(a: Assignment) -> pb::Assignment {
        let (transport, nccl_group, nccl_rank, nccl_ranks) = match a.transport {
            Transport::Grpc => (pb::ActivationTransport::Grpc, String::new(), 0, 0),
            Transport::Nccl { group, rank, ranks } => (pb::ActivationTransport::Nccl, group, rank, ranks),
        };
        let input = match a.input {
            StageInput::Embeddings => pb::StageInput::Embeddings,
            StageInput::PreviousStage => pb::StageInput::PreviousStage,
        };
        pb::Assignment {
            job_id: a.job_id,
            model_path: a.model.to_string_lossy().into_owned(),
            options: Some((&a.options).into()),
            compute_device: Some(device_to_wire(a.device)),
            stage_index: a.stage_index,
            attempt: a.attempt,
            block_start: a.blocks.start,
            block_end: a.blocks.end,
            blocks_done: a.blocks_done,
            input: input as i32,
            next_stage_address: a.next.as_ref().map(|n| n.address.clone()).unwrap_or_default(),
            next_stage_index: a.next.map_or(0, |n| n.index),
            produce_tail: a.produce_tail,
            transport: transport as i32,
            nccl_group,
            nccl_rank,
            nccl_ranks,
            keep_for_serving: a.keep_for_serving,
        }
    }
}

impl From<WorkerCommand> for pb::WorkerCommand {
    fn from(command: WorkerCommand) -> pb::WorkerCommand {
        let command = match command {
            WorkerCommand::Assign(a) => Command::Assign(a.into()),
            WorkerCommand::Cancel { job_id } => Command::Cancel(pb::CancelAssignment { job_id }),
            WorkerCommand::NcclId { job_id, group, id } => {
                Command::NcclId(pb::NcclIdMessage { job_id, nccl_group: group, id, worker_id: String::new() })
            }
            WorkerCommand::NcclGroupLost { job_id, group, reason } => {
                Command::NcclGroupLost(pb::NcclGroupLost { job_id, nccl_group: group, reason })
            }
            WorkerCommand::Serve { spec, replica, generation, devices, stage, kept_job } => Command::Serve(pb::ServeReplica {
                spec: Some((&spec).into()),
                replica,
                generation,
                devices: devices.into_iter().map(device_to_wire).collect(),
                // All zero and empty: the whole model.
                stage: stage.as_ref().map_or(0, |s| s.index as u32),
                block_start: stage.as_ref().map_or(0, |s| s.blocks.start as u32),
                block_end: stage.as_ref().map_or(0, |s| s.blocks.end as u32),
                next_stage_address: stage.and_then(|s| s.next).unwrap_or_default(),
                kept_job_id: kept_job.unwrap_or_default(),
            }),
            WorkerCommand::StopReplica { deployment, replica, generation } => {
                Command::StopReplica(pb::StopReplica { deployment, replica, generation })
            }
        };
        pb::WorkerCommand { command: Some(command) }
    }
}

impl From<ReplicaState> for pb::ReplicaState {
    fn from(state: ReplicaState) -> pb::ReplicaState {
        match state {
            ReplicaState::Pending => pb::ReplicaState::Pending,
            ReplicaState::Loading => pb::ReplicaState::Loading,
            ReplicaState::Ready => pb::ReplicaState::Ready,
            ReplicaState::Failed => pb::ReplicaState::Failed,
        }
    }
}

/// A worker's report from the wire; `None` when its state is none a worker reports.
pub fn replica_report_from_wire(r: pb::ReplicaReport) -> Option<ReplicaReport> {
    let state = match pb::ReplicaState::try_from(r.state).ok()? {
        pb::ReplicaState::Loading => ReplicaState::Loading,
        pb::ReplicaState::Ready => ReplicaState::Ready,
        pb::ReplicaState::Failed => ReplicaState::Failed,
        pb::ReplicaState::Pending | pb::ReplicaState::Unspecified => return None,
    };
    Some(ReplicaReport {
        worker_id: r.worker_id,
        deployment: r.deployment,
        replica: r.replica,
        generation: r.generation,
        state,
        error: r.error,
        bad_input: r.bad_input,
        stage: r.stage as usize,
    })
}

/// A deployment as clients see it (and the store records it), with each replica's worker's
/// `ReplicaService` address from `address_of`.
pub fn deployment_to_wire(d: &Deployment, address_of: impl Fn(&str) -> Option<String>) -> pb::Deployment {
    pb::Deployment {
        spec: Some((&d.spec).into()),
        replicas: d
            .replicas
            .iter()
            .map(|r| pb::Replica {
                index: r.index,
                state: pb::ReplicaState::from(r.state) as i32,
                worker_id: r.leader().unwrap_or_default().to_string(),
                address: r.leader().and_then(&address_of).unwrap_or_default(),
                stage_workers: if r.workers.len() > 1 { r.workers.clone() } else { Vec::new() },
                devices: r.devices.iter().copied().map(device_to_wire).collect(),
                generation: r.generation,
                error: r.error.clone().unwrap_or_default(),
            })
            .collect(),
        created_unix_ms: d.created_unix_ms,
        n_blocks: d.n_blocks as u32,
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::state::scheduler::NextStage;
    use crate::state::StageRef;
    use awq_job::JobOptions;

    /// A request as a client sends it, every option away from its default.
    fn request() -> pb::SubmitRequest {
        let options = pb::QuantOptions {
            w_bit: 4,
            group_size: 64,
            zero_point: false,
            n_samples: 16,
            seqlen: 256,
            seed: 7,
            calib_path: "/data/calib.jsonl".into(),
            max_shard_bytes: 1 << 30,
            quant_method: pb::QuantMethod::Rtn as i32,
            engine_dtype: pb::EngineDtype::Bf16 as i32,
        };
        pb::SubmitRequest {
            model_path: "/models/m/".into(),
            output_path: "/out/m-awq".into(),
            options: Some(options),
            overwrite: true,
            deploy: None,
        }
    }

    /// What `request()` validates to.
    fn spec() -> JobSpec {
        let req = request();
        let options = JobOptions::try_from(req.options.as_ref().expect("request() has options"))
            .expect("request()'s options are valid");
        JobSpec {
            model: req.model_path.into(),
            output: req.output_path.into(),
            overwrite: req.overwrite,
            options,
            n_blocks: 4,
            model_type: "llama".into(),
            per_block_bytes: 1,
            fixed_bytes: 2,
            deploy: None,
        }
    }

    /// A record as a coordinator stores it: submitted with `spec`'s request, planned, one stage
    /// lost and planned again.
    fn record(state: pb::JobState) -> pb::Job {
        let stage = |index, worker_id: &str, block_start, block_end, blocks_done, attempt| pb::Stage {
            index,
            worker_id: worker_id.into(),
            block_start,
            block_end,
            blocks_done,
            attempt,
        };
        pb::Job {
            id: "j18f".into(),
            state: state as i32,
            request: Some(request()),
            n_blocks: 4,
            blocks_done: 3,
            stages: vec![stage(0, "a-1", 0, 2, 2, 0), stage(1, "", 2, 4, 1, 0), stage(2, "b-3", 3, 4, 0, 1)],
            error: String::new(),
            created_unix_ms: 399,
            finished_unix_ms: 0,
            model_type: "llama".into(),
            waiting_for_disk_space: "block 3: disk full".into(),
        }
    }

    #[test]
    fn a_record_read_back_is_written_again_byte_for_byte() {
        for state in [pb::JobState::Queued, pb::JobState::Running, pb::JobState::Assembling] {
            let stored = record(state);
            let job = job_from_record(&stored, spec()).expect("a job that runs on");
            assert_eq!(job.stages[1].worker, None);
            assert_eq!(pb::Job::from(&job).encode_to_vec(), stored.encode_to_vec(), "{state:?}");
        }
        for state in [pb::JobState::Unspecified, pb::JobState::Done, pb::JobState::Failed, pb::JobState::Cancelled] {
            assert!(job_from_record(&record(state), spec()).is_none(), "{state:?}");
        }
        assert_eq!(job_state_from_wire(42), None);
        // An ended job's error and end time go out as they were set.
        let job = Job {
            state: JobState::Failed,
            error: Some("why".into()),
            finished_unix_ms: Some(5),
            ..job_from_record(&record(pb::JobState::Running), spec()).unwrap()
        };
        let wire = pb::Job::from(&job);
        assert_eq!((wire.state(), wire.error.as_str(), wire.finished_unix_ms), (pb::JobState::Failed, "why", 5));
    }

    #[test]
    fn commands_carry_every_field_of_their_message() {
        let assignment = Assignment {
            job_id: "j1".into(),
            model: "/models/m".into(),
            options: spec().options,
            device: "cuda:1".parse().unwrap(),
            stage_index: 2,
            attempt: 1,
            blocks: 4..6,
            blocks_done: vec![5],
            input: StageInput::PreviousStage,
            next: Some(NextStage { address: "b:50153".into(), index: 3 }),
            produce_tail: true,
            transport: Transport::Nccl { group: "j1/1/1".into(), rank: 1, ranks: 3 },
            keep_for_serving: true,
        };
        let want = pb::Assignment {
            job_id: "j1".into(),
            model_path: "/models/m".into(),
            options: Some((&spec().options).into()),
            compute_device: Some(pb::Device { kind: pb::DeviceKind::Cuda as i32, ordinal: 1 }),
            stage_index: 2,
            attempt: 1,
            block_start: 4,
            block_end: 6,
            blocks_done: vec![5],
            input: pb::StageInput::PreviousStage as i32,
            next_stage_address: "b:50153".into(),
            next_stage_index: 3,
            produce_tail: true,
            transport: pb::ActivationTransport::Nccl as i32,
            nccl_group: "j1/1/1".into(),
            nccl_rank: 1,
            nccl_ranks: 3,
            keep_for_serving: true,
        };
        assert_eq!(
            pb::WorkerCommand::from(WorkerCommand::Assign(assignment.clone())).command,
            Some(Command::Assign(want))
        );
        let alone = Assignment { input: StageInput::Embeddings, next: None, transport: Transport::Grpc, ..assignment };
        let wire = pb::Assignment::from(alone);
        assert_eq!(
            (wire.input(), wire.next_stage_address.as_str(), wire.next_stage_index),
            (pb::StageInput::Embeddings, "", 0)
        );
        assert_eq!(
            (wire.transport(), wire.nccl_group.as_str(), wire.nccl_rank, wire.nccl_ranks),
            (pb::ActivationTransport::Grpc, "", 0, 0)
        );

        let id = WorkerCommand::NcclId { job_id: "j1".into(), group: "j1/0/0".into(), id: vec![7; 128] };
        let want = pb::NcclIdMessage {
            job_id: "j1".into(),
            nccl_group: "j1/0/0".into(),
            id: vec![7; 128],
            worker_id: String::new(),
        };
        assert_eq!(pb::WorkerCommand::from(id).command, Some(Command::NcclId(want)));
        let lost =
            WorkerCommand::NcclGroupLost { job_id: "j1".into(), group: "j1/0/0".into(), reason: "rank 1".into() };
        let want = pb::NcclGroupLost { job_id: "j1".into(), nccl_group: "j1/0/0".into(), reason: "rank 1".into() };
        assert_eq!(pb::WorkerCommand::from(lost).command, Some(Command::NcclGroupLost(want)));
        let cancel = pb::WorkerCommand::from(WorkerCommand::Cancel { job_id: "j1".into() });
        assert_eq!(cancel.command, Some(Command::Cancel(pb::CancelAssignment { job_id: "j1".into() })));
    }

    #[test]
    fn a_worker_is_listed_with_the_job_it_is_busy_with() {
        let worker = WorkerRecord {
            id: "gpu-2".into(),
            name: "gpu".into(),
            device: "cpu".parse().unwrap(),
            serving_devices: vec![awq_job::Device::Cpu],
            gpu_model: String::new(),
            memory_bytes: 1 << 30,
            stage_address: "a:1".into(),
            busy_with: Some(StageRef { job_id: "j1".into(), stage_index: 3 }),
            serving: None,
            connected_unix_ms: 11,
        };
        let want = pb::WorkerInfo {
            worker_id: "gpu-2".into(),
            name: "gpu".into(),
            compute_device: Some(pb::Device { kind: pb::DeviceKind::Cpu as i32, ordinal: 0 }),
            gpu_model: String::new(),
            memory_bytes: 1 << 30,
            stage_address: "a:1".into(),
            busy_with_job: "j1".into(),
            connected_unix_ms: 11,
            serving: String::new(),
            serving_devices: vec![pb::Device { kind: pb::DeviceKind::Cpu as i32, ordinal: 0 }],
        };
        assert_eq!(pb::WorkerInfo::from(&worker), want);
        assert_eq!(pb::WorkerInfo::from(&WorkerRecord { busy_with: None, ..worker }).busy_with_job, "");
    }
}
