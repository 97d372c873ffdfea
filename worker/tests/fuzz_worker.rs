//! Fuzzing what a worker takes in (issue 20, "Bad input"): the calibration file a job names, the
//! activations other workers push to its `StageService` (random and truncated protobufs, gRPC
//! length prefixes that lie, headers whose rows x cols and chunks whose `total_bytes` claim
//! gigabytes), the calls gateways make to its `ReplicaService`, and the commands the coordinator
//! sends down its `Join` stream (assignments, replicas to serve and stop, NCCL ids). The gRPC targets run
//! a real worker (`run_worker`) on loopback against a fake coordinator. Budgets and replay: the
//! `awq-fuzz` crate docs (`AWQ_FUZZ_SECONDS`, ...).

use std::time::Duration;

use awq_fuzz::grpc::{call, frame, frames};
use awq_fuzz::{json, Outcome, Rng, Target, INTERESTING};
use awq_kernels::Device;
use awq_model::synthetic::{write_checkpoint, SyntheticSpec};
use awq_model::{ModelConfig, Tokenizer};
use awq_proto::v1::replica_service_client::ReplicaServiceClient;
use awq_proto::v1::worker_command::Command;
use awq_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use awq_proto::v1::{self as pb, activation_message};
use awq_worker::awq::calib::{self, CalibOptions};
use awq_worker::node::{run_worker, WorkerConfig};
use awq_worker::stage::StageSpec;
use prost::Message;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

#[global_allocator]
static ALLOC: awq_fuzz::TrackingAllocator = awq_fuzz::TrackingAllocator;

fn pick<'a, T>(rng: &mut Rng, items: &'a [T]) -> &'a T {
    &items[rng.below(items.len())]
}

fn lying(rng: &mut Rng) -> u64 {
    if rng.below(3) == 0 {
        rng.below(64) as u64
    } else {
        *pick(rng, INTERESTING)
    }
}

// ---- calibration files ----------------------------------------------------------------------------

/// Sample counts and row lengths an input picks from (the wire allows any u32).
const N_SAMPLES: [usize; 6] = [1, 2, 3, 16, 128, u32::MAX as usize];
const SEQLENS: [usize; 6] = [2, 3, 8, 64, 512, u32::MAX as usize];

/// An input: a byte saying .jsonl or plain text and which options, then the file's bytes.
fn calib_input(jsonl: bool, options: u8, text: &[u8]) -> Vec<u8> {
    let mut input = vec![u8::from(jsonl), options];
    input.extend_from_slice(text);
    input
}

fn calib_generated(rng: &mut Rng) -> Vec<u8> {
    let jsonl = rng.below(2) == 0;
    let n = rng.below(12);
    let text: Vec<u8> = if jsonl {
        (0..n)
            .flat_map(|i| {
                let line = json!({"text": format!("sample {i} of the fuzz, {}", "word ".repeat(rng.below(40)))});
                let line = if rng.below(3) == 0 { json::mutate(&line, rng, &["text"]) } else { line };
                let mut bytes = serde_json::to_vec(&line).unwrap();
                bytes.push(b'\n');
                bytes
            })
            .collect()
    } else {
        let sep = if rng.below(2) == 0 { "\n\n" } else { "\n" };
        (0..n)
            .map(|i| format!("paragraph {i}{}", " and more".repeat(rng.below(30))))
            .collect::<Vec<_>>()
            .join(sep)
            .into_bytes()
    };
    calib_input(jsonl, rng.next_u64() as u8, &text)
}

#[test]
fn fuzz_calibration_file() {
    let seeds = [
        calib_input(true, 0x00, b"{\"text\": \"It is a truth universally acknowledged.\"}\n{\"text\": \"second\"}\n"),
        calib_input(false, 0x11, b"First paragraph,\nstill first.\n\nSecond paragraph.\n"),
        calib_input(false, 0x22, b"one line\nanother line\n"),
    ];
    let mut target = Target::new("calibration_file").generator(calib_generated);
    for s in seeds {
        target = target.seed(s);
    }
    target.run(|| {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        write_checkpoint(&model, &SyntheticSpec::tiny_llama()).unwrap();
        let tokenizer = Tokenizer::from_dir(&model, &ModelConfig::from_dir(&model).unwrap()).unwrap();
        move |input: &[u8]| {
            let [kind, options, text @ ..] = input else { return Outcome::Refused };
            let path = dir.path().join(if kind & 1 == 1 { "calib.jsonl" } else { "calib.txt" });
            std::fs::write(&path, text).unwrap();
            let texts = match calib::load_texts(&path) {
                Ok(texts) => texts,
                Err(e) => {
                    assert!(e.to_string().contains(&path.display().to_string()), "the error names the file: {e}");
                    return Outcome::Refused;
                }
            };
            assert!(!texts.is_empty() && texts.iter().all(|t| !t.trim().is_empty()));
            let (n_samples, seqlen) = (N_SAMPLES[(options & 0xf) as usize % 6], SEQLENS[(options >> 4) as usize % 6]);
            let options = CalibOptions::new(n_samples, seqlen, 42).expect("valid options");
            match calib::build(&texts, &tokenizer, options) {
                Ok(set) => {
                    assert!(!set.rows.is_empty() && set.rows.iter().all(|r| r.len() == seqlen));
                    assert!(set.samples_used <= n_samples);
                    Outcome::Accepted
                }
                Err(_) => Outcome::Refused,
            }
        }
    });
}

// ---- a worker on loopback -------------------------------------------------------------------------

/// A coordinator that welcomes one worker, hands the test its command stream and stage address,
/// and passes the failures the worker reports on.
struct FakeCoordinator {
    joined: mpsc::UnboundedSender<(String, mpsc::Sender<Result<pb::WorkerCommand, Status>>)>,
    failures: mpsc::UnboundedSender<pb::StageFailure>,
    reports: mpsc::UnboundedSender<pb::ReplicaReport>,
}

#[tonic::async_trait]
impl WorkerService for FakeCoordinator {
    type JoinStream = ReceiverStream<Result<pb::WorkerCommand, Status>>;

    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<Self::JoinStream>, Status> {
        let (tx, rx) = mpsc::channel(1024);
        let welcome = pb::WorkerCommand { command: Some(Command::WelcomeWorkerId("fuzzed-worker".into())) };
        tx.send(Ok(welcome)).await.map_err(|_| Status::cancelled("gone"))?;
        let _ = self.joined.send((request.into_inner().stage_address, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn upload(
        &self,
        request: Request<Streaming<pb::UploadMessage>>,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        let mut stream = request.into_inner();
        while stream.next().await.is_some() {}
        Ok(Response::new(pb::UploadResponse {}))
    }

    async fn report_failure(
        &self,
        request: Request<pb::StageFailure>,
    ) -> Result<Response<pb::ReportFailureResponse>, Status> {
        let _ = self.failures.send(request.into_inner());
        Ok(Response::new(pb::ReportFailureResponse {}))
    }

    async fn publish_nccl_id(
        &self,
        _: Request<pb::NcclIdMessage>,
    ) -> Result<Response<pb::PublishNcclIdResponse>, Status> {
        Ok(Response::new(pb::PublishNcclIdResponse {}))
    }

    async fn report_replica(
        &self,
        request: Request<pb::ReplicaReport>,
    ) -> Result<Response<pb::ReportReplicaResponse>, Status> {
        let _ = self.reports.send(request.into_inner());
        Ok(Response::new(pb::ReportReplicaResponse {}))
    }
}

/// A running worker: a channel to its `StageService` (and `ReplicaService`), its command stream,
/// what it reports.
struct Worker {
    runtime: tokio::runtime::Runtime,
    stage: Channel,
    commands: mpsc::Sender<Result<pb::WorkerCommand, Status>>,
    failures: mpsc::UnboundedReceiver<pb::StageFailure>,
    reports: mpsc::UnboundedReceiver<pb::ReplicaReport>,
}

impl Worker {
    /// Sends `cmd` (its generation replaced by a fresh one, so that the worker takes it) and waits
    /// for the replica's final report.
    async fn serve(&mut self, mut cmd: pb::ServeReplica, generation: u32) -> pb::ReplicaReport {
        cmd.generation = generation;
        let (deployment, replica) = (cmd.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default(), cmd.replica);
        let serve = pb::WorkerCommand { command: Some(Command::Serve(cmd)) };
        self.commands.send(Ok(serve)).await.expect("the worker's command stream is open");
        loop {
            let report = self.reports.recv().await.expect("the worker reports");
            let done = matches!(report.state(), pb::ReplicaState::Ready | pb::ReplicaState::Failed);
            if done
                && (report.deployment.as_str(), report.replica, report.generation)
                    == (deployment.as_str(), replica, generation)
            {
                return report;
            }
        }
    }

    async fn stop(&mut self, deployment: &str, replica: u32, generation: u32) {
        let stop = pb::StopReplica { deployment: deployment.into(), replica, generation };
        let stop = pb::WorkerCommand { command: Some(Command::StopReplica(stop)) };
        self.commands.send(Ok(stop)).await.expect("the worker's command stream is open");
    }
}

fn start_worker(target: &str) -> Worker {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(awq_fuzz::thread_name(target))
        .enable_all()
        .build()
        .unwrap();
    let (joined_tx, mut joined) = mpsc::unbounded_channel();
    let (failures_tx, failures) = mpsc::unbounded_channel();
    let (reports_tx, reports) = mpsc::unbounded_channel();
    let (address, commands, stage) = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let fake = FakeCoordinator { joined: joined_tx, failures: failures_tx, reports: reports_tx };
        // Small answers without Nagle's delay (a listener of our own does not get tonic's nodelay).
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
            if let Ok(s) = &s {
                let _ = s.set_nodelay(true);
            }
            s
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(WorkerServiceServer::new(fake))
                .serve_with_incoming(incoming),
        );
        let config = WorkerConfig {
            coordinators: vec![url],
            name: "fuzz".into(),
            device: Device::Cpu,
            serving_devices: Vec::new(),
            // A CPU replica's KV cache may take at most this (the fuzzed ones ask for up to 2^64).
            memory_bytes: 128 << 20,
            resident_bytes: None,
            inject_fault_at_block: None,
            stage_listen: "127.0.0.1:0".parse().unwrap(),
            stage_advertise: None,
            worker_token: None,
            tls: None,
        };
        tokio::spawn(run_worker(config, std::future::pending()));
        let (address, commands) = tokio::time::timeout(Duration::from_secs(60), joined.recv()).await.unwrap().unwrap();
        let stage =
            tonic::transport::Endpoint::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
        (address, commands, stage)
    });
    let _ = address;
    Worker { runtime, stage, commands, failures, reports }
}

const PUSH: &str = "/awq.v1.StageService/PushActivations";

fn header(job: &str, rows: u32, cols: u32, payload: &[u8]) -> pb::ActivationMessage {
    let h = pb::ActivationHeader {
        job_id: job.into(),
        stage_index: 1,
        attempt: 0,
        rows,
        cols,
        seq_len: rows,
        payload_crc32: crc32fast::hash(payload),
    };
    pb::ActivationMessage { part: Some(activation_message::Part::Header(h)) }
}

fn chunk(offset: u64, data: &[u8], total_bytes: u64) -> pb::ActivationMessage {
    let c = pb::Chunk { offset, data: data.to_vec(), crc32: crc32fast::hash(data), total_bytes };
    pb::ActivationMessage { part: Some(activation_message::Part::Chunk(c)) }
}

/// A valid push of `rows x cols` f32 activations in chunks of `chunk_bytes`.
fn valid_push(rng: &mut Rng, rows: u32, cols: u32, chunk_bytes: usize) -> Vec<pb::ActivationMessage> {
    let payload: Vec<u8> = (0..rows * cols).flat_map(|_| rng.normal().to_le_bytes()).collect();
    let mut messages = vec![header(&format!("job-{}", rng.below(4)), rows, cols, &payload)];
    for (i, piece) in payload.chunks(chunk_bytes.max(1)).enumerate() {
        messages.push(chunk((i * chunk_bytes) as u64, piece, payload.len() as u64));
    }
    messages
}

/// Pushes whose parts lie: rows x cols of gigabytes, chunks claiming another total, offsets and
/// CRCs that do not match, parts out of order; framed with prefixes that may lie too.
fn push_generated(rng: &mut Rng) -> Vec<u8> {
    let (rows, cols) = (1 + rng.below(4) as u32, 1 + rng.below(8) as u32);
    let chunk_bytes = [4, 12, 64, 1 << 20][rng.below(4)];
    let mut messages = valid_push(rng, rows, cols, chunk_bytes);
    for _ in 0..1 + rng.below(3) {
        let i = rng.below(messages.len());
        match &mut messages[i].part {
            Some(activation_message::Part::Header(h)) => match rng.below(4) {
                0 => h.rows = lying(rng) as u32,
                1 => h.cols = lying(rng) as u32,
                2 => (h.rows, h.cols) = (lying(rng) as u32, lying(rng) as u32),
                _ => h.payload_crc32 = rng.next_u64() as u32,
            },
            Some(activation_message::Part::Chunk(c)) => match rng.below(4) {
                0 => c.total_bytes = lying(rng),
                1 => c.offset = lying(rng),
                2 => c.crc32 = rng.next_u64() as u32,
                _ => c.data.truncate(rng.below(c.data.len() + 1)),
            },
            None => {}
        }
        if rng.below(6) == 0 {
            let j = rng.below(messages.len());
            messages.swap(i, j);
        }
    }
    let mut body: Vec<u8> = Vec::new();
    for m in &messages {
        let bytes = m.encode_to_vec();
        match rng.below(16) {
            // A prefix that claims more (up to the limit and past it) or less than follows.
            0 => {
                body.push(0);
                body.extend((lying(rng) as u32).to_be_bytes());
                body.extend_from_slice(&bytes);
            }
            1 => {
                body.push(1);
                body.extend((bytes.len() as u32).to_be_bytes());
                body.extend_from_slice(&bytes);
            }
            _ => body.extend(frame(&bytes)),
        }
    }
    body
}

/// Calls `PushActivations` with `body`; a broken connection is a finding unless the worker still
/// answers a well-formed call afterwards.
fn push(worker: &mut Worker, body: Vec<u8>) -> Outcome {
    let stage = &mut worker.stage;
    worker.runtime.block_on(async {
        match call(stage, PUSH, body, Duration::from_secs(5)).await {
            Ok(reply) if reply.accepted() => Outcome::Accepted,
            Ok(_) => Outcome::Refused,
            Err(e) => {
                let probe = call(stage, PUSH, Vec::new(), Duration::from_secs(5)).await;
                assert!(probe.is_ok(), "the stage service went away: {e}; then {probe:?}");
                Outcome::Refused
            }
        }
    })
}

#[test]
fn fuzz_stage_service() {
    let mut rng = Rng::new(5);
    let mut target = Target::new("stage_service").generator(push_generated);
    for (rows, cols, chunk_bytes) in [(2, 4, 12), (3, 8, 1 << 20), (1, 1, 4)] {
        target = target.seed(frames(
            &valid_push(&mut rng, rows, cols, chunk_bytes).iter().map(Message::encode_to_vec).collect::<Vec<_>>(),
        ));
    }
    target = target.seed(frames(&[header("j", 0, 0, &[]).encode_to_vec()]));
    target.run(|| {
        let mut worker = start_worker("stage_service");
        move |input: &[u8]| push(&mut worker, input.to_vec())
    });
}

#[test]
fn regress_activations_claiming_gigabytes() {
    // rows x cols x 4 past u64 (a panic in debug builds), and 16 GiB from one header: refused
    // without allocating what the header claims.
    let mut worker = start_worker("regress_activations");
    for (rows, cols) in [(u32::MAX, u32::MAX), (65536, 65536)] {
        let body = frames(&[header("lie", rows, cols, &[]).encode_to_vec(), chunk(0, &[0; 16], 16).encode_to_vec()]);
        awq_fuzz::reset_largest_allocation();
        assert_eq!(push(&mut worker, body), Outcome::Refused);
        let largest = awq_fuzz::largest_allocation();
        assert!(largest < 1 << 30, "{rows} x {cols}: {largest} bytes allocated at once");
    }
}

// ---- ReplicaService -------------------------------------------------------------------------------

// StageInfo and StageStep take a ReplicaRef first (a StageStepCall's field 1 is one); StageLink a
// StageLinkCall whose id has any length.
const REPLICA_METHODS: &[&str] = &[
    "/awq.v1.ReplicaService/Describe",
    "/awq.v1.ReplicaService/Generate",
    "/awq.v1.ReplicaService/Stats",
    "/awq.v1.ReplicaService/StageInfo",
    "/awq.v1.ReplicaService/StageStep",
    "/awq.v1.ReplicaService/StageLink",
];

fn replica_ref(rng: &mut Rng) -> pb::ReplicaRef {
    match rng.below(6) {
        0 => pb::ReplicaRef { deployment: "other".into(), replica: 0 },
        1 => pb::ReplicaRef { deployment: "tiny".into(), replica: lying(rng) as u32 },
        _ => pb::ReplicaRef { deployment: "tiny".into(), replica: 0 },
    }
}

/// Calls of a replica whose fields lie: prompts empty, long or out of the vocabulary, sampling
/// parameters out of range, `max_tokens`, `top_logprobs` and `prompt_logprobs` claiming billions.
fn replica_generated(rng: &mut Rng) -> Vec<u8> {
    let method = rng.below(REPLICA_METHODS.len());
    let message = match method {
        1 => {
            let n = *pick(rng, &[0, 1, 3, 16, 63, 64, 200]);
            let prompt =
                (0..n).map(|_| if rng.below(16) == 0 { lying(rng) as u32 } else { rng.below(320) as u32 }).collect();
            let mut params = pb::SamplingParams { max_tokens: Some(1 + rng.below(8) as i64), ..Default::default() };
            for _ in 0..rng.below(4) {
                let f = *pick(rng, &[0.0, 0.5, 1.0, 2.0, -1.0, 1e300, f64::NAN, f64::INFINITY]);
                match rng.below(14) {
                    0 => params.temperature = Some(f),
                    1 => params.top_p = Some(f),
                    2 => params.top_k = Some(lying(rng) as i64),
                    3 => params.min_p = Some(f),
                    4 => params.seed = Some(lying(rng) as i64),
                    5 => params.presence_penalty = Some(f),
                    6 => params.frequency_penalty = Some(f),
                    7 => params.repetition_penalty = Some(f),
                    8 => params.max_tokens = Some(lying(rng) as i64),
                    9 => params.stop = vec!["e".repeat(rng.below(40)); rng.below(5)],
                    10 => params.stop_token_ids = (0..rng.below(5)).map(|_| lying(rng) as u32).collect(),
                    11 => params.ignore_eos = true,
                    12 => params.logprobs = true,
                    _ => params.top_logprobs = Some(lying(rng) as i64),
                }
            }
            let prompt_logprobs = if rng.below(4) == 0 { Some(lying(rng) as u32) } else { None };
            let replica = if rng.below(16) == 0 { None } else { Some(replica_ref(rng)) };
            pb::GenerateCall { replica, prompt, params: Some(params), prompt_logprobs }.encode_to_vec()
        }
        5 => {
            let nccl_id = vec![rng.below(256) as u8; *pick(rng, &[0, 1, 127, 128, 129, 4096])];
            pb::StageLinkCall { replica: Some(replica_ref(rng)), nccl_id }.encode_to_vec()
        }
        _ => replica_ref(rng).encode_to_vec(),
    };
    let mut input = vec![method as u8];
    input.extend(frame(&message));
    input
}

#[test]
fn fuzz_replica_service() {
    let scratch = tempfile::tempdir().unwrap();
    let model = scratch.path().join("model");
    write_checkpoint(&model, &SyntheticSpec { n_blocks: 2, ..SyntheticSpec::tiny_llama() }).unwrap();
    let mut rng = Rng::new(4);
    let mut target = Target::new("replica_service").input_timeout(Duration::from_secs(20)).generator(replica_generated);
    for _ in 0..6 {
        target = target.seed(replica_generated(&mut rng));
    }
    target.run(move || {
        let mut worker = start_worker("replica_service");
        let runtime = worker.runtime.handle().clone();
        let ready = runtime.block_on(worker.serve(valid_replica(&model.to_string_lossy()), 1));
        assert_eq!(ready.state(), pb::ReplicaState::Ready, "{ready:?}");
        move |input: &[u8]| {
            let _scratch = &scratch;
            let Some((&m, body)) = input.split_first() else { return Outcome::Refused };
            let method = REPLICA_METHODS[m as usize % REPLICA_METHODS.len()];
            let channel = &mut worker.stage;
            worker.runtime.block_on(async {
                let outcome = match call(channel, method, body.to_vec(), Duration::from_secs(15)).await {
                    Ok(reply) => {
                        assert!(reply.code.is_some(), "a call still streaming after 15 s: {method}");
                        if reply.accepted() {
                            Outcome::Accepted
                        } else {
                            Outcome::Refused
                        }
                    }
                    Err(e) => {
                        let probe = call(channel, REPLICA_METHODS[2], frame(&[]), Duration::from_secs(5)).await;
                        assert!(probe.is_ok(), "the replica service went away: {e}; then {probe:?}");
                        Outcome::Refused
                    }
                };
                // Every request ended with its call: none may stay in the engine.
                let mut client = ReplicaServiceClient::new(channel.clone());
                let tiny = pb::ReplicaRef { deployment: "tiny".into(), replica: 0 };
                for attempt in 0.. {
                    let s = client.stats(tiny.clone()).await.expect("the replica answers").into_inner();
                    if s.num_requests_running == 0 && s.num_requests_waiting == 0 {
                        break;
                    }
                    assert!(attempt < 2000, "a request stayed in the engine after its call: {s:?}");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                outcome
            })
        }
    });
}

// ---- the worker's commands ------------------------------------------------------------------------

/// An input: gRPC-framed `WorkerCommand`s, sent one by one down the worker's `Join` stream.
fn commands_generated(rng: &mut Rng, model: &str) -> Vec<u8> {
    let mut commands = Vec::new();
    for _ in 0..1 + rng.below(4) {
        let job = format!("job-{}", rng.below(4));
        let command = match rng.below(9) {
            6 | 7 => Command::Serve(serve_replica(rng, model)),
            8 => Command::StopReplica(pb::StopReplica {
                deployment: "tiny".into(),
                replica: rng.below(2) as u32,
                generation: lying(rng) as u32,
            }),
            0 => Command::WelcomeWorkerId(format!("w{}", rng.below(9))),
            1 => Command::Cancel(pb::CancelAssignment { job_id: job }),
            2 => Command::NcclId(pb::NcclIdMessage {
                job_id: job,
                nccl_group: format!("g{}", rng.below(3)),
                id: vec![7; rng.below(200)],
                worker_id: "w".into(),
            }),
            3 => Command::NcclGroupLost(pb::NcclGroupLost {
                job_id: job,
                nccl_group: "g0".into(),
                reason: "fuzz".into(),
            }),
            _ => Command::Assign(assignment(rng, job)),
        };
        let bytes = pb::WorkerCommand { command: Some(command) }.encode_to_vec();
        commands.push(bytes);
    }
    frames(&commands)
}

/// A replica of the tiny model at `model` that loads.
fn valid_replica(model: &str) -> pb::ServeReplica {
    let spec = pb::DeploymentSpec {
        name: "tiny".into(),
        served_model_name: String::new(),
        model_path: model.into(),
        tp: 1,
        pp: 1,
        replicas: 1,
        engine: Some(pb::EngineOptions {
            max_model_len: 64,
            kv_cache_bytes: 1 << 20,
            max_num_seqs: 4,
            ..Default::default()
        }),
    };
    pb::ServeReplica {
        spec: Some(spec),
        replica: 0,
        generation: 0,
        devices: vec![awq_job::wire::device_to_wire(Device::Cpu)],
        ..Default::default()
    }
}

/// [`valid_replica`], with fields that break it now and then: names,
/// paths, `tp`, `pp`, engine options out of range or claiming gigabytes, devices not the worker's.
fn serve_replica(rng: &mut Rng, model: &str) -> pb::ServeReplica {
    let pb::ServeReplica { spec, devices, .. } = valid_replica(model);
    let (mut spec, mut devices) = (spec.expect("a spec"), devices);
    for _ in 0..rng.below(3) {
        let e = spec.engine.get_or_insert_with(Default::default);
        match rng.below(13) {
            0 => spec.name = pick(rng, &["", "Tiny", "a/b", "other"]).to_string(),
            1 => spec.model_path = pick(rng, &["", "/nonexistent", "relative", "/"]).to_string(),
            2 => spec.tp = lying(rng) as u32,
            3 => spec.pp = lying(rng) as u32,
            4 => e.max_model_len = lying(rng) as u32,
            5 => e.max_num_seqs = lying(rng) as u32,
            6 => e.max_num_batched_tokens = lying(rng) as u32,
            7 => e.block_size = lying(rng) as u32,
            8 => e.gpu_memory_utilization = *pick(rng, &[0.5, 1.5, -1.0, f32::NAN]),
            9 => e.kv_cache_bytes = lying(rng),
            10 => e.max_waiting = lying(rng) as u32,
            11 => e.enforce_eager = true,
            _ => {
                devices = (0..rng.below(3))
                    .map(|_| pb::Device { kind: lying(rng) as i32, ordinal: lying(rng) as u32 })
                    .collect()
            }
        }
    }
    // Pipeline stages that lie (no next stage's address: a link to nowhere is the cluster tests').
    let (stage, block_start, block_end) = match rng.below(4) {
        0 => (lying(rng) as u32, lying(rng) as u32, lying(rng) as u32),
        _ => (0, 0, 0),
    };
    pb::ServeReplica {
        spec: Some(spec),
        replica: rng.below(2) as u32,
        generation: 0,
        devices,
        stage,
        block_start,
        block_end,
        next_stage_address: String::new(),
        // A job this worker never kept blocks of (or one it did, in the cluster tests).
        kept_job_id: if rng.below(3) == 0 { "job-never-run-here".into() } else { String::new() },
    }
}

/// An assignment that passes the worker's check of it, with fields that break it now and then:
/// ranges that are no range, inputs unspecified, options out of range, devices the worker does not
/// have, NCCL without NCCL, models and calibration files that are not there.
fn assignment(rng: &mut Rng, job_id: String) -> pb::Assignment {
    let mut options = pb::QuantOptions::from(&awq_job::JobOptions::default());
    let mut a = pb::Assignment {
        job_id,
        stage_index: rng.below(3) as u32,
        block_start: 0,
        block_end: 1 + rng.below(3) as u32,
        input: pb::StageInput::Embeddings as i32,
        model_path: "/nonexistent/model".into(),
        compute_device: Some(awq_job::wire::device_to_wire(Device::Cpu)),
        keep_for_serving: rng.below(2) == 0,
        ..Default::default()
    };
    for _ in 0..rng.below(4) {
        match rng.below(14) {
            0 => options.w_bit = lying(rng) as u32,
            1 => options.group_size = lying(rng) as u32,
            2 => options.n_samples = lying(rng) as u32,
            3 => options.seqlen = lying(rng) as u32,
            4 => options.calib_path = pick(rng, &["relative.txt", "/nonexistent/calib.jsonl", "/"]).to_string(),
            5 => options.max_shard_bytes = lying(rng),
            6 => options.quant_method = lying(rng) as i32,
            7 => options.engine_dtype = lying(rng) as i32,
            8 => (a.block_start, a.block_end) = (lying(rng) as u32, lying(rng) as u32),
            9 => a.blocks_done = (0..rng.below(4)).map(|_| lying(rng) as u32).collect(),
            10 => a.input = lying(rng) as i32,
            11 => {
                a.transport = pb::ActivationTransport::Nccl as i32;
                (a.nccl_rank, a.nccl_ranks) = (lying(rng) as u32, lying(rng) as u32);
            }
            12 => a.model_path = pick(rng, &["", "relative/model", "/"]).to_string(),
            _ => {
                a.compute_device = if rng.below(3) == 0 {
                    None
                } else {
                    Some(pb::Device { kind: lying(rng) as i32, ordinal: lying(rng) as u32 })
                }
            }
        }
    }
    a.options = if rng.below(16) == 0 { None } else { Some(options) };
    a
}

/// The commands of `input` that decode (a frame whose prefix lies ends the list).
fn decode_commands(input: &[u8]) -> Vec<pb::WorkerCommand> {
    let mut out = Vec::new();
    let mut rest = input;
    while let [_, a, b, c, d, tail @ ..] = rest {
        let len = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
        if len > tail.len() {
            break;
        }
        if let Ok(command) = pb::WorkerCommand::decode(&tail[..len]) {
            out.push(command);
        }
        rest = &tail[len..];
    }
    out
}

#[test]
fn fuzz_worker_commands() {
    let scratch = tempfile::tempdir().unwrap();
    let model = scratch.path().join("model");
    write_checkpoint(&model, &SyntheticSpec { n_blocks: 2, ..SyntheticSpec::tiny_llama() }).unwrap();
    let model = model.to_string_lossy().into_owned();
    let mut rng = Rng::new(9);
    // A replica that loads takes its KV cache (up to the worker's memory_bytes, 128 MiB) at once.
    let mut target = Target::new("worker_commands").max_alloc_bytes(192 << 20);
    for _ in 0..4 {
        target = target.seed(commands_generated(&mut rng, &model));
    }
    target = target.generator(move |rng| commands_generated(rng, &model));
    target.run(|| {
        let mut worker = start_worker("worker_commands");
        let (mut sentinel, mut generation) = (0u64, 0u32);
        move |input: &[u8]| {
            let _scratch = &scratch;
            let commands = decode_commands(input);
            // What the worker's one check of an assignment makes of them, here too.
            let mut accepted = commands
                .iter()
                .any(|c| matches!(&c.command, Some(Command::Assign(a)) if StageSpec::try_from(a).is_ok()));
            // After the input's commands, an assignment the worker refuses at once: when its
            // failure comes back, every earlier assignment has run (they run in order).
            sentinel += 1;
            let job_id = format!("sentinel-{sentinel}");
            let last = pb::Assignment { job_id: job_id.clone(), ..Default::default() };
            let runtime = worker.runtime.handle().clone();
            runtime.block_on(async {
                for c in commands {
                    match c.command {
                        // A replica's load is waited for (and the replica stopped again), so that
                        // what it allocates belongs to this input.
                        Some(Command::Serve(cmd)) => {
                            generation += 1;
                            let report = worker.serve(cmd, generation).await;
                            if report.state() == pb::ReplicaState::Ready {
                                accepted = true;
                                worker.stop(&report.deployment, report.replica, generation).await;
                            } else {
                                assert!(!report.error.is_empty(), "{report:?}");
                            }
                        }
                        _ => worker.commands.send(Ok(c)).await.expect("the worker's command stream is open"),
                    }
                }
                let last = pb::WorkerCommand { command: Some(Command::Assign(last)) };
                worker.commands.send(Ok(last)).await.expect("the worker's command stream is open");
                loop {
                    let failure = worker.failures.recv().await.expect("the worker reports");
                    if failure.job_id == job_id {
                        break;
                    }
                    assert!(!failure.error.is_empty(), "{failure:?}");
                }
            });
            if accepted {
                Outcome::Accepted
            } else {
                Outcome::Refused
            }
        }
    });
}

#[test]
fn regress_replica_asking_for_a_kv_cache_of_exabytes() {
    // A CPU engine allocates the KV cache a deployment asks for at once: 2^60 bytes aborted the
    // worker. Refused now, naming the field, when it is more than the worker's memory.
    let scratch = tempfile::tempdir().unwrap();
    let model = scratch.path().join("model");
    write_checkpoint(&model, &SyntheticSpec::tiny_llama()).unwrap();
    let cmd = valid_replica(&model.to_string_lossy());
    let mut worker = start_worker("regress_replica");
    let runtime = worker.runtime.handle().clone();
    let ready = runtime.block_on(worker.serve(cmd.clone(), 1));
    assert_eq!(ready.state(), pb::ReplicaState::Ready, "{ready:?}");
    let mut spec = cmd.spec.clone().unwrap();
    spec.engine.as_mut().unwrap().kv_cache_bytes = 1 << 60;
    awq_fuzz::reset_largest_allocation();
    let failed = runtime.block_on(worker.serve(pb::ServeReplica { spec: Some(spec), replica: 1, ..cmd }, 2));
    assert_eq!(failed.state(), pb::ReplicaState::Failed, "{failed:?}");
    assert!(failed.error.starts_with("spec.engine.kv_cache_bytes: 1152921504606846976 is more than"), "{failed:?}");
    assert!(awq_fuzz::largest_allocation() < 1 << 30, "{} bytes allocated at once", awq_fuzz::largest_allocation());
}
