//! A replica pipelined over three workers (issue 17): each worker's `Replicas` and `ReplicaService`
//! on its own loopback port, told by `ServeReplica` commands (as the coordinator sends them) to run
//! one stage each: blocks 0..1 with the engine, 1..2, 2..3 with the LM head. The first stage is told
//! first and waits for the later ones to load; a request through its `Generate` gets the greedy
//! tokens of the whole model in one engine; the later stages have no engine to call, and on the CPU
//! refuse an NCCL link (and a step that claims one); a later stage that stops ends the next request
//! with an error event, promptly, and nothing hangs.

use std::sync::Arc;
use std::time::Duration;

use awq_kernels::Device;
use awq_model::synthetic::{write_checkpoint, SyntheticSpec};
use awq_proto::v1 as pb;
use awq_proto::v1::replica_service_client::ReplicaServiceClient;
use awq_proto::v1::replica_service_server::ReplicaServiceServer;
use awq_serve::engine::{EngineConfig, EngineEvent, EngineHandle, GenerateRequest};
use awq_serve::sampling::{RawSamplingParams, SamplingParams};
use awq_serve::wire;
use awq_worker::serving::{ReplicaServer, Replicas};

/// Every wait of the test is bounded by this.
const WAIT: Duration = Duration::from_secs(60);

/// A worker's replicas, served on a loopback port: (its replicas, `host:port`).
async fn worker() -> (Arc<Replicas>, String) {
    let replicas = Arc::new(Replicas::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let service = ReplicaServiceServer::new(ReplicaServer { replicas: replicas.clone() })
        .max_decoding_message_size(awq_proto::MAX_MESSAGE_BYTES);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming));
    (replicas, address)
}

fn greedy(max_tokens: i64) -> SamplingParams {
    let raw = RawSamplingParams {
        temperature: Some(0.0),
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..Default::default()
    };
    SamplingParams::new(raw).unwrap()
}

/// The generated tokens of `prompt` through the `Generate` of the replica's first stage at
/// `address`, or the error event that ended it.
async fn generate(address: &str, prompt: &[u32]) -> Result<Vec<u32>, String> {
    let mut client = ReplicaServiceClient::connect(format!("http://{address}")).await.unwrap();
    let request = GenerateRequest { prompt: prompt.to_vec(), params: greedy(8), prompt_logprobs: None };
    let call = wire::request_to_wire("p", 0, &request);
    let mut events = client.generate(call).await.unwrap().into_inner();
    let mut tokens = Vec::new();
    while let Some(event) = tokio::time::timeout(WAIT, events.message()).await.expect("an event in time").unwrap() {
        if wire::is_accepted(&event) {
            continue;
        }
        match wire::event_from_wire(event).unwrap().unwrap() {
            EngineEvent::Tokens { tokens: t, .. } => tokens.extend(t.iter().map(|t| t.id)),
            EngineEvent::Finished { .. } => return Ok(tokens),
            EngineEvent::Error(e) => return Err(e),
            EngineEvent::PromptLogprobs(_) => {}
        }
    }
    panic!("the call ended without a final event")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_pipelined_over_three_workers_gives_the_whole_models_tokens() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &SyntheticSpec::tiny_llama()).unwrap();
    let model = dir.path().to_string_lossy().into_owned();
    let engine =
        pb::EngineOptions { max_model_len: 64, kv_cache_bytes: 1 << 20, max_num_seqs: 4, ..Default::default() };
    let spec = pb::DeploymentSpec {
        name: "p".into(),
        model_path: model.clone(),
        tp: 1,
        pp: 3,
        replicas: 1,
        engine: Some(engine),
        ..Default::default()
    };
    let workers = [worker().await, worker().await, worker().await];
    let stages = [(0..1, workers[1].1.clone()), (1..2, workers[2].1.clone()), (2..3, String::new())];
    // The first stage first: it waits for the later ones to answer.
    for (i, ((replicas, _), (blocks, next))) in workers.iter().zip(&stages).enumerate() {
        let cmd = pb::ServeReplica {
            spec: Some(spec.clone()),
            replica: 0,
            generation: 1,
            devices: vec![awq_job::wire::device_to_wire(Device::Cpu)],
            stage: i as u32,
            block_start: blocks.start,
            block_end: blocks.end,
            next_stage_address: next.clone(),
            kept_job_id: String::new(),
        };
        replicas.serve(cmd, &[Device::Cpu], 1 << 30);
    }
    for (i, (replicas, _)) in workers.iter().enumerate() {
        loop {
            let reports = tokio::time::timeout(WAIT, replicas.next_reports()).await.expect("a report in time");
            let last = reports.last().expect("at least one report");
            assert_ne!(last.state(), pb::ReplicaState::Failed, "stage {i}: {}", last.error);
            if last.state() == pb::ReplicaState::Ready {
                break;
            }
        }
    }

    let prompts: Vec<Vec<u32>> = (0..3).map(|i| (0..5 + 9 * i).map(|t| (t * 31 + i * 7 + 3) % 320).collect()).collect();
    let whole = EngineHandle::start(EngineConfig {
        max_model_len: Some(64),
        kv_cache_bytes: Some(1 << 20),
        max_num_seqs: 4,
        ..EngineConfig::new(&model)
    })
    .unwrap();
    for prompt in &prompts {
        let mut stream =
            whole.submit(GenerateRequest { prompt: prompt.clone(), params: greedy(8), prompt_logprobs: None }).unwrap();
        let mut want = Vec::new();
        while let Some(event) = stream.events.recv().await {
            if let EngineEvent::Tokens { tokens, .. } = event {
                want.extend(tokens.iter().map(|t| t.id));
            }
        }
        assert_eq!(want.len(), 8);
        assert_eq!(generate(&workers[0].1, prompt).await.unwrap(), want, "prompt {prompt:?}");
    }

    // A later stage has no engine to call.
    let mut client = ReplicaServiceClient::connect(format!("http://{}", workers[1].1)).await.unwrap();
    let p0 = pb::ReplicaRef { deployment: "p".into(), replica: 0 };
    let status = client.stats(p0.clone()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");

    // A CPU stage refuses an NCCL link (its hidden states keep coming over gRPC), and a step that
    // says its hidden states come over a link this stage does not have is refused, not waited on.
    let link = pb::StageLinkCall { replica: Some(p0.clone()), nccl_id: vec![1; 128] };
    let status = client.stage_link(link).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("CPU"), "{status:?}");
    let plan = awq_serve::scheduler::StepPlan {
        seqs: vec![awq_serve::scheduler::ScheduledSeq {
            id: awq_serve::RequestId(1),
            positions: 0..2,
            token_ids: vec![5, 6],
            block_table: vec![awq_serve::kv_cache::BlockId(0)],
            sample: true,
            prompt_logprob_positions: 0..0,
        }],
        n_tokens: 2,
        preempted: Vec::new(),
    };
    let step = awq_serve::pipeline::step_to_wire(p0, &plan, &[false], None);
    let status = tokio::time::timeout(WAIT, client.stage_step(tokio_stream::iter(step)))
        .await
        .expect("an answer in time")
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("no NCCL link"), "{status:?}");

    // The last stage stops: the next request ends with an error naming the stage, in time.
    workers[2].0.stop(&pb::StopReplica { deployment: "p".into(), replica: 0, generation: 1 });
    let err = generate(&workers[0].1, &prompts[0]).await.unwrap_err();
    assert!(err.contains("next stage") && err.contains(&workers[1].1), "{err}");
}
