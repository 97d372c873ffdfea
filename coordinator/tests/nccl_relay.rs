//! The NCCL id's way through the real coordinator, over gRPC on loopback: two fake GPU workers
//! (clients of `WorkerService` that joined with `cuda:0` and `cuda:1`) get the two ranks of one
//! group, rank 0's `PublishNcclId` reaches rank 1 as a `WorkerCommand`, a publisher that is not
//! rank 0 is refused naming the field, and when rank 1's worker leaves, rank 0 is told the group is
//! lost. No GPU and no NCCL: the coordinator only moves the id's bytes.

use std::sync::Arc;
use std::time::Duration;

use awq_coordinator::store::MemoryStore;
use awq_coordinator::{Coordinator, CoordinatorConfig};
use awq_model::synthetic::{write_checkpoint, SyntheticSpec};
use awq_job::{CalibOptions, GroupSize, JobOptions, QuantSpec};
use awq_proto::v1::job_service_client::JobServiceClient;
use awq_proto::v1::worker_command::Command;
use awq_proto::v1::worker_service_client::WorkerServiceClient;
use awq_proto::v1::{self as pb};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Streaming;

/// How long a command may take to arrive on loopback.
const WAIT: Duration = Duration::from_secs(10);

/// A fake worker: its id and its command stream.
struct FakeWorker {
    id: String,
    commands: Streaming<pb::WorkerCommand>,
}

impl FakeWorker {
    async fn join(client: &mut WorkerServiceClient<Channel>, name: &str, device: &str, port: u16) -> FakeWorker {
        let join = pb::JoinRequest {
            name: name.into(),
            compute_device: Some(awq_job::wire::device_to_wire(device.parse().expect("a device name"))),
            gpu_model: String::new(),
            memory_bytes: 1 << 40,
            stage_address: format!("127.0.0.1:{port}"),
            protocol_version: awq_proto::PROTOCOL_VERSION,
            replicas: Vec::new(),
            serving_devices: Vec::new(),
        };
        let mut commands = client.join(join).await.expect("join accepted").into_inner();
        let id = match next(&mut commands).await {
            Command::WelcomeWorkerId(id) => id,
            other => panic!("{name}: expected a welcome, got {other:?}"),
        };
        FakeWorker { id, commands }
    }

    async fn next(&mut self) -> Command {
        next(&mut self.commands).await
    }
}

async fn next(commands: &mut Streaming<pb::WorkerCommand>) -> Command {
    let msg = tokio::time::timeout(WAIT, commands.next()).await.expect("a command within the wait");
    msg.expect("the stream is open").expect("a command, not an error").command.expect("a command in the message")
}

#[tokio::test]
async fn rank_0_publishes_the_id_rank_1_gets_it_and_a_lost_rank_stops_the_group() {
    let dir = tempfile::tempdir().expect("a scratch folder");
    let model = dir.path().join("tiny6");
    write_checkpoint(&model, &SyntheticSpec { n_blocks: 6, ..SyntheticSpec::tiny_llama() }).expect("a synthetic model");

    let coordinator = Coordinator::start(Arc::new(MemoryStore::default()), CoordinatorConfig::default()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(coordinator.serve(listener, async move {
        let _ = stopped.await;
    }));

    let channel = tonic::transport::Endpoint::from_shared(url).unwrap().connect().await.unwrap();
    let mut workers = WorkerServiceClient::new(channel.clone());
    let mut jobs = JobServiceClient::new(channel);
    let mut g0 = FakeWorker::join(&mut workers, "g0", "cuda:0", 7001).await;
    let mut g1 = FakeWorker::join(&mut workers, "g1", "cuda:1", 7002).await;

    let request = pb::SubmitRequest {
        model_path: model.to_string_lossy().into_owned(),
        output_path: dir.path().join("out").to_string_lossy().into_owned(),
        options: Some(pb::QuantOptions::from(&JobOptions {
            quant: QuantSpec { bits: 4, group_size: GroupSize::G64, zero_point: true },
            calib: CalibOptions { n_samples: 16, seqlen: 128, seed: 42 },
            max_shard_bytes: 1 << 30,
            ..JobOptions::default()
        })),
        overwrite: false,
        deploy: None,
    };
    let job = jobs.submit(request).await.expect("submitted").into_inner().job.expect("a job");
    let group = format!("{}/0/0", job.id);

    let (a0, a1) = match (g0.next().await, g1.next().await) {
        (Command::Assign(a0), Command::Assign(a1)) => (a0, a1),
        other => panic!("expected two assignments, got {other:?}"),
    };
    for (a, rank) in [(&a0, 0), (&a1, 1)] {
        assert_eq!(a.transport(), pb::ActivationTransport::Nccl, "{a:?}");
        assert_eq!((a.nccl_group.as_str(), a.nccl_rank, a.nccl_ranks), (group.as_str(), rank, 2), "{a:?}");
    }
    assert_eq!(a0.next_stage_address, "127.0.0.1:7002");

    // Only rank 0 may publish; the error names the field.
    let id = vec![42u8; 128];
    let publish = |worker_id: &str| pb::NcclIdMessage {
        job_id: job.id.clone(),
        nccl_group: group.clone(),
        id: id.clone(),
        worker_id: worker_id.to_string(),
    };
    let refused = workers.publish_nccl_id(publish(&g1.id)).await.expect_err("rank 1 may not publish");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
    assert!(refused.message().starts_with("worker_id: "), "{refused}");

    workers.publish_nccl_id(publish(&g0.id)).await.expect("rank 0 publishes");
    match g1.next().await {
        Command::NcclId(m) => assert_eq!((m.job_id, m.nccl_group, m.id), (job.id.clone(), group.clone(), id.clone())),
        other => panic!("rank 1 expected the id, got {other:?}"),
    }

    // Rank 1's worker goes away: rank 0, still running its stage, is told the group is lost.
    drop(g1);
    match g0.next().await {
        Command::NcclGroupLost(m) => {
            assert_eq!((m.job_id.as_str(), m.nccl_group.as_str()), (job.id.as_str(), group.as_str()));
            assert!(m.reason.contains("rank 1"), "{}", m.reason);
        }
        other => panic!("rank 0 expected the group lost, got {other:?}"),
    }

    // A graceful shutdown would wait for g0's Join stream: end the server outright.
    drop((g0, stop));
    server.abort();
}
