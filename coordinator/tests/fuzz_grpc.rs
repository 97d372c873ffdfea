//! Fuzzing every gRPC handler of the coordinator (issue 20, "Bad input": `JobService`,
//! `DeploymentService`, `WorkerService`): the real
//! `Coordinator::serve` on loopback, with a running job, a joined worker and a model under its
//! root, gets request bodies of random and truncated protobufs, gRPC length prefixes that lie, and
//! well-formed messages whose fields lie: uploads whose chunks claim gigabytes, offsets and CRCs
//! that do not match, block indices past the model, job and worker ids that do not exist, paths
//! outside the roots, options out of range. It must answer every call with a status, stay up, and
//! never allocate what a field merely claims. Budgets and replay: the `awq-fuzz` crate docs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use awq_coordinator::store::MemoryStore;
use awq_coordinator::{Coordinator, CoordinatorConfig};
use awq_fuzz::grpc::{call, frame, frames, Reply};
use awq_fuzz::{Outcome, Rng, Target, INTERESTING};
use awq_job::{CalibOptions, GroupSize, JobOptions, QuantSpec};
use awq_model::arch::descriptor_for;
use awq_model::manifest::{AwqManifest, ModelPart};
use awq_model::safetensors::{self, RawTensor};
use awq_model::synthetic::{write_checkpoint, SyntheticSpec};
use awq_model::ModelConfig;
use awq_proto::v1::job_service_client::JobServiceClient;
use awq_proto::v1::worker_command::Command;
use awq_proto::v1::worker_service_client::WorkerServiceClient;
use awq_proto::v1::{self as pb, upload_message};
use prost::Message;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

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

const JOB_METHODS: &[&str] = &[
    "/awq.v1.JobService/Submit",
    "/awq.v1.JobService/GetJob",
    "/awq.v1.JobService/WatchJob",
    "/awq.v1.JobService/CancelJob",
    "/awq.v1.JobService/ListJobs",
    "/awq.v1.JobService/ListWorkers",
];

const DEPLOYMENT_METHODS: &[&str] = &[
    "/awq.v1.DeploymentService/Deploy",
    "/awq.v1.DeploymentService/GetDeployment",
    "/awq.v1.DeploymentService/ListDeployments",
    "/awq.v1.DeploymentService/Undeploy",
];

const WORKER_METHODS: &[&str] = &[
    "/awq.v1.WorkerService/Join",
    "/awq.v1.WorkerService/Upload",
    "/awq.v1.WorkerService/ReportFailure",
    "/awq.v1.WorkerService/PublishNcclId",
    "/awq.v1.WorkerService/ReportReplica",
];

/// An input: which method (its first byte), then the request body.
fn input(method: usize, body: &[u8]) -> Vec<u8> {
    let mut input = vec![method as u8];
    input.extend_from_slice(body);
    input
}

/// The scratch root every path of the fixture lies under, the model in it, and the ids the
/// generators aim at: the running job and the worker that holds its first stage. Inputs are made
/// before the job exists, so they name it by a stand-in of the same length (a job id is `j` and
/// the submission time in hex), which the target replaces with the running job's id.
#[derive(Clone, Debug)]
struct Names {
    root: PathBuf,
    model: PathBuf,
    job: String,
    worker: String,
}

/// A coordinator serving on loopback with one running job.
struct Fixture {
    runtime: tokio::runtime::Runtime,
    channel: Channel,
    names: Names,
    _scratch: tempfile::TempDir,
    /// The options of the fixture's jobs (their output differs per job).
    request: pb::SubmitRequest,
    n_jobs: usize,
}

fn job_request(root: &Path, model: &Path, n: usize) -> pb::SubmitRequest {
    pb::SubmitRequest {
        model_path: model.to_string_lossy().into_owned(),
        output_path: root.join(format!("out-{n}")).to_string_lossy().into_owned(),
        options: Some(pb::QuantOptions::from(&JobOptions {
            quant: QuantSpec { bits: 4, group_size: GroupSize::G64, zero_point: true },
            calib: CalibOptions { n_samples: 2, seqlen: 16, seed: 1 },
            max_shard_bytes: 1 << 20,
            ..JobOptions::default()
        })),
        overwrite: false,
        deploy: None,
    }
}

impl Fixture {
    /// The coordinator over `scratch`, a worker joined (its commands drained by a task), one job
    /// submitted.
    fn start(target: &str, scratch: tempfile::TempDir) -> Fixture {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(awq_fuzz::thread_name(target))
            .enable_all()
            .build()
            .unwrap();
        let (root, model) = (scratch.path().to_path_buf(), scratch.path().join("model"));
        let config = CoordinatorConfig { roots: vec![root.clone()], ..Default::default() };
        let request = job_request(&root, &model, 0);
        let (channel, job, worker) = runtime.block_on(async {
            let coordinator = Coordinator::start(Arc::new(MemoryStore::default()), config).await.unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(coordinator.serve(listener, std::future::pending()));
            let channel = tonic::transport::Endpoint::from_shared(url).unwrap().connect().await.unwrap();
            let join = pb::JoinRequest {
                name: "fuzz".into(),
                compute_device: Some(awq_job::wire::device_to_wire(awq_job::Device::Cpu)),
                memory_bytes: 1 << 40,
                stage_address: "127.0.0.1:9".into(),
                protocol_version: awq_proto::PROTOCOL_VERSION,
                ..Default::default()
            };
            let mut commands = WorkerServiceClient::new(channel.clone()).join(join).await.unwrap().into_inner();
            let worker = match commands.next().await.unwrap().unwrap().command {
                Some(Command::WelcomeWorkerId(id)) => id,
                other => panic!("expected a welcome, got {other:?}"),
            };
            tokio::spawn(async move { while let Some(Ok(_)) = commands.next().await {} });
            let job = JobServiceClient::new(channel.clone())
                .submit(request.clone())
                .await
                .unwrap()
                .into_inner()
                .job
                .unwrap()
                .id;
            (channel, job, worker)
        });
        let names = Names { root, model, job, worker };
        Fixture { runtime, channel, names, _scratch: scratch, request, n_jobs: 1 }
    }

    /// Sends `input` (method byte, body) to one of `methods`, the job's stand-in replaced by its
    /// id; a broken connection is a finding unless the coordinator still answers a well-formed
    /// call afterwards.
    fn call(&mut self, methods: &[&str], input: &[u8]) -> Outcome {
        let Some((&m, body)) = input.split_first() else { return Outcome::Refused };
        let mut body = body.to_vec();
        let (stand_in, job) = (JOB_STAND_IN.as_bytes(), self.names.job.as_bytes());
        assert_eq!(stand_in.len(), job.len(), "job ids keep their length");
        let mut at = 0;
        while let Some(i) = body[at..].windows(stand_in.len()).position(|w| w == stand_in) {
            body[at + i..at + i + job.len()].copy_from_slice(job);
            at += i + job.len();
        }
        let method = methods[m as usize % methods.len()];
        let channel = &mut self.channel;
        let outcome = self.runtime.block_on(async {
            match call(channel, method, body, Duration::from_millis(50)).await {
                Ok(reply) if reply.accepted() => Outcome::Accepted,
                Ok(_) => Outcome::Refused,
                Err(e) => {
                    let probe = call(channel, JOB_METHODS[4], frame(&[]), Duration::from_secs(5)).await;
                    assert!(
                        matches!(probe, Ok(Reply { code: Some(tonic::Code::Ok), .. })),
                        "the coordinator went away: {e}; then {probe:?}"
                    );
                    Outcome::Refused
                }
            }
        });
        self.keep_a_job_running();
        outcome
    }

    /// A fuzzed call may have cancelled or failed the job the generators aim at: submit another.
    fn keep_a_job_running(&mut self) {
        let id = self.names.job.clone();
        let channel = self.channel.clone();
        let ended = self.runtime.block_on(async move {
            let job =
                JobServiceClient::new(channel).get_job(pb::GetJobRequest { job_id: id }).await.unwrap().into_inner();
            !matches!(job.state(), pb::JobState::Queued | pb::JobState::Running)
        });
        if ended {
            let request = pb::SubmitRequest {
                output_path: self.names.root.join(format!("out-{}", self.n_jobs)).to_string_lossy().into_owned(),
                ..self.request.clone()
            };
            self.n_jobs += 1;
            let channel = self.channel.clone();
            self.names.job = self.runtime.block_on(async move {
                JobServiceClient::new(channel).submit(request).await.unwrap().into_inner().job.unwrap().id
            });
        }
    }
}

/// What inputs call the running job (see [`Names`]).
const JOB_STAND_IN: &str = "j0123456789a";

/// A scratch folder with a model in it, and the names inputs use.
fn scratch() -> (tempfile::TempDir, Names) {
    let scratch = tempfile::tempdir().unwrap();
    let (root, model) = (scratch.path().to_path_buf(), scratch.path().join("model"));
    write_checkpoint(&model, &SyntheticSpec::tiny_llama()).unwrap();
    // The fixture's worker joins first, as "fuzz": the coordinator's first worker id.
    (scratch, Names { root, model, job: JOB_STAND_IN.into(), worker: "fuzz-1".into() })
}

// ---- JobService ---------------------------------------------------------------------------------

fn path_under(rng: &mut Rng, names: &Names) -> String {
    let p = match rng.below(8) {
        0 => names.model.clone(),
        1 => names.root.join(format!("out-x{}", rng.below(1000))),
        2 => names.root.join("model/../model"),
        3 => names.root.join("../outside"),
        4 => PathBuf::from("relative/out"),
        5 => PathBuf::from("/"),
        6 => PathBuf::new(),
        _ => names.root.join("model/config.json"),
    };
    p.to_string_lossy().into_owned()
}

fn job_id(rng: &mut Rng, names: &Names) -> String {
    match rng.below(4) {
        0 | 1 => names.job.clone(),
        2 => String::new(),
        _ => format!("{}{}", names.job, rng.below(9)),
    }
}

fn options(rng: &mut Rng) -> pb::QuantOptions {
    pb::QuantOptions {
        w_bit: *pick(rng, &[4, 4, 3, 0, u32::MAX]),
        group_size: *pick(rng, &[128, 64, 32, 96, 0, u32::MAX]),
        zero_point: rng.below(2) == 0,
        n_samples: if rng.below(2) == 0 { 2 } else { lying(rng) as u32 },
        seqlen: if rng.below(2) == 0 { 16 } else { lying(rng) as u32 },
        seed: rng.next_u64(),
        calib_path: pick(rng, &["", "relative.jsonl", "/nonexistent.jsonl", "/"]).to_string(),
        max_shard_bytes: lying(rng),
        quant_method: rng.below(4) as i32,
        engine_dtype: rng.below(5) as i32,
    }
}

fn job_service_generated(names: &Names, rng: &mut Rng) -> Vec<u8> {
    let method = rng.below(JOB_METHODS.len());
    let message = match method {
        0 => pb::SubmitRequest {
            model_path: path_under(rng, names),
            output_path: path_under(rng, names),
            options: if rng.below(6) == 0 { None } else { Some(options(rng)) },
            overwrite: rng.below(2) == 0,
            deploy: if rng.below(4) == 0 { Some(deployment_spec(rng, names)) } else { None },
        }
        .encode_to_vec(),
        1 => pb::GetJobRequest { job_id: job_id(rng, names) }.encode_to_vec(),
        2 => pb::WatchJobRequest { job_id: job_id(rng, names) }.encode_to_vec(),
        3 => pb::CancelJobRequest { job_id: job_id(rng, names) }.encode_to_vec(),
        _ => Vec::new(),
    };
    input(method, &frame(&message))
}

#[test]
fn fuzz_job_service() {
    let (scratch, names) = scratch();
    let mut target = Target::new("job_service");
    let request = job_request(&names.root, &names.model, 99);
    target = target
        .seed(input(0, &frame(&request.encode_to_vec())))
        .seed(input(1, &frame(&pb::GetJobRequest { job_id: names.job.clone() }.encode_to_vec())))
        .seed(input(2, &frame(&pb::WatchJobRequest { job_id: names.job.clone() }.encode_to_vec())))
        .seed(input(4, &frame(&[])))
        .seed(input(5, &frame(&[])));
    let for_generator = names.clone();
    target = target.generator(move |rng| job_service_generated(&for_generator, rng));
    target.run(move || {
        let mut fixture = Fixture::start("job_service", scratch);
        assert_eq!(fixture.names.worker, names.worker, "the fixture's worker joins first");
        move |input: &[u8]| fixture.call(JOB_METHODS, input)
    });
}

// ---- DeploymentService --------------------------------------------------------------------------

fn deployment_name(rng: &mut Rng) -> String {
    pick(rng, &["tiny", "tiny", "other-1", "", "UPPER", "a/b", "x.y_z-0", &"n".repeat(64), "\u{0}"]).to_string()
}

/// A deployment of the fixture's model that the coordinator takes.
fn valid_deployment(names: &Names) -> pb::DeploymentSpec {
    pb::DeploymentSpec {
        name: "tiny".into(),
        served_model_name: String::new(),
        model_path: names.model.to_string_lossy().into_owned(),
        tp: 1,
        pp: 1,
        replicas: 1,
        engine: Some(pb::EngineOptions { max_model_len: 64, kv_cache_bytes: 1 << 20, ..Default::default() }),
    }
}

fn deployment_spec(rng: &mut Rng, names: &Names) -> pb::DeploymentSpec {
    let mut spec = valid_deployment(names);
    for _ in 0..rng.below(4) {
        match rng.below(6) {
            0 => spec.name = deployment_name(rng),
            1 => spec.model_path = path_under(rng, names),
            2 => spec.tp = lying(rng) as u32,
            3 => spec.pp = lying(rng) as u32,
            4 => spec.replicas = lying(rng) as u32,
            _ => {
                let e = spec.engine.get_or_insert_with(Default::default);
                match rng.below(7) {
                    0 => e.max_model_len = lying(rng) as u32,
                    1 => e.max_num_seqs = lying(rng) as u32,
                    2 => e.max_num_batched_tokens = lying(rng) as u32,
                    3 => e.block_size = lying(rng) as u32,
                    4 => e.gpu_memory_utilization = *pick(rng, &[0.0, -1.0, 2.0, f32::NAN, 0.5]),
                    5 => e.kv_cache_bytes = lying(rng),
                    _ => e.max_waiting = lying(rng) as u32,
                }
            }
        }
    }
    spec
}

fn deployment_service_generated(names: &Names, rng: &mut Rng) -> Vec<u8> {
    let method = rng.below(DEPLOYMENT_METHODS.len());
    let message = match method {
        0 => deployment_spec(rng, names).encode_to_vec(),
        1 => pb::GetDeploymentRequest { name: deployment_name(rng) }.encode_to_vec(),
        2 => Vec::new(),
        _ => pb::UndeployRequest { name: deployment_name(rng) }.encode_to_vec(),
    };
    input(method, &frame(&message))
}

#[test]
fn fuzz_deployment_service() {
    let (scratch, names) = scratch();
    let mut rng = Rng::new(3);
    let mut target = Target::new("deployment_service");
    for _ in 0..3 {
        target = target.seed(deployment_service_generated(&names, &mut rng));
    }
    target = target.seed(input(0, &frame(&valid_deployment(&names).encode_to_vec())));
    let for_generator = names.clone();
    target = target.generator(move |rng| deployment_service_generated(&for_generator, rng));
    target.run(move || {
        let mut fixture = Fixture::start("deployment_service", scratch);
        move |input: &[u8]| fixture.call(DEPLOYMENT_METHODS, input)
    });
}

// ---- WorkerService ------------------------------------------------------------------------------

/// A block's result as the worker uploads it: the AWQ tensors of `part` (zeros), as safetensors.
fn result_payload(model: &Path, part: ModelPart) -> Vec<u8> {
    let config = ModelConfig::from_dir(model).unwrap();
    let arch = descriptor_for(&config.model_type, &config.path).unwrap();
    let manifest = AwqManifest::new(arch, &config, QuantSpec { bits: 4, group_size: GroupSize::G64, zero_point: true });
    let tensors: Vec<RawTensor> = manifest
        .part(part)
        .unwrap()
        .iter()
        .map(|t| RawTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            data: vec![0; t.len_bytes() as usize],
        })
        .collect();
    safetensors::serialize(Path::new("result"), &tensors, &BTreeMap::new()).unwrap()
}

fn upload(names: &Names, block_idx: u32, is_tail: bool, payload: &[u8], chunk_bytes: usize) -> Vec<pb::UploadMessage> {
    let header = pb::ResultHeader {
        job_id: names.job.clone(),
        worker_id: names.worker.clone(),
        stage_index: 0,
        attempt: 0,
        block_idx,
        is_tail,
        report_json: "{}".into(),
        payload_crc32: crc32fast::hash(payload),
    };
    let mut messages = vec![pb::UploadMessage { part: Some(upload_message::Part::Header(header)) }];
    for (i, piece) in payload.chunks(chunk_bytes.max(1)).enumerate() {
        let c = pb::Chunk {
            offset: (i * chunk_bytes) as u64,
            data: piece.to_vec(),
            crc32: crc32fast::hash(piece),
            total_bytes: payload.len() as u64,
        };
        messages.push(pb::UploadMessage { part: Some(upload_message::Part::Chunk(c)) });
    }
    messages
}

/// Uploads whose parts lie (chunks claiming gigabytes, offsets, CRCs, block indices, parts out of
/// order), framed with prefixes that may lie too.
fn upload_generated(names: &Names, payloads: &[(u32, bool, Vec<u8>)], rng: &mut Rng) -> Vec<u8> {
    let (block_idx, is_tail, payload) = pick(rng, payloads).clone();
    let chunk_bytes = [64, 4096, 1 << 20][rng.below(3)];
    let mut messages = upload(names, block_idx, is_tail, &payload, chunk_bytes);
    for _ in 0..1 + rng.below(3) {
        let i = rng.below(messages.len());
        match &mut messages[i].part {
            Some(upload_message::Part::Header(h)) => match rng.below(5) {
                0 => h.block_idx = lying(rng) as u32,
                1 => h.job_id = String::new(),
                2 => h.worker_id = "someone-else".into(),
                3 => h.payload_crc32 = rng.next_u64() as u32,
                _ => h.stage_index = lying(rng) as u32,
            },
            Some(upload_message::Part::Chunk(c)) => match rng.below(4) {
                0 => c.total_bytes = lying(rng),
                1 => c.offset = lying(rng),
                2 => c.crc32 = rng.next_u64() as u32,
                _ => c.data.truncate(rng.below(c.data.len() + 1)),
            },
            None => {}
        }
        if rng.below(8) == 0 {
            let j = rng.below(messages.len());
            messages.swap(i, j);
        }
    }
    let mut body = Vec::new();
    for m in &messages {
        let bytes = m.encode_to_vec();
        if rng.below(16) == 0 {
            body.push(0);
            body.extend((lying(rng) as u32).to_be_bytes());
            body.extend_from_slice(&bytes);
        } else {
            body.extend(frame(&bytes));
        }
    }
    input(1, &body)
}

fn worker_service_generated(names: &Names, payloads: &[(u32, bool, Vec<u8>)], rng: &mut Rng) -> Vec<u8> {
    let method = rng.below(WORKER_METHODS.len());
    let message = match method {
        0 => pb::JoinRequest {
            name: pick(rng, &["fuzz", "", "a/b", "\u{0}"]).to_string(),
            gpu_model: String::new(),
            memory_bytes: lying(rng),
            stage_address: pick(rng, &["127.0.0.1:9", "", "not an address"]).to_string(),
            protocol_version: if rng.below(4) == 0 { lying(rng) as u32 } else { awq_proto::PROTOCOL_VERSION },
            compute_device: if rng.below(4) == 0 {
                None
            } else {
                Some(pb::Device { kind: rng.below(3) as i32, ordinal: lying(rng) as u32 })
            },
            ..Default::default()
        }
        .encode_to_vec(),
        1 => return upload_generated(names, payloads, rng),
        2 => pb::StageFailure {
            job_id: job_id(rng, names),
            worker_id: if rng.below(2) == 0 { names.worker.clone() } else { "nobody".into() },
            stage_index: lying(rng) as u32,
            attempt: lying(rng) as u32,
            error: "fuzz".into(),
            bad_input: rng.below(4) == 0,
        }
        .encode_to_vec(),
        3 => pb::NcclIdMessage {
            job_id: job_id(rng, names),
            nccl_group: format!("{}/0/{}", names.job, rng.below(3)),
            id: vec![1; rng.below(300)],
            worker_id: if rng.below(2) == 0 { names.worker.clone() } else { "nobody".into() },
        }
        .encode_to_vec(),
        _ => pb::ReplicaReport::default().encode_to_vec(),
    };
    input(method, &frame(&message))
}

#[test]
fn fuzz_worker_service() {
    let (scratch, names) = scratch();
    let payloads: Vec<(u32, bool, Vec<u8>)> = vec![
        (0, false, result_payload(&names.model, ModelPart::Block(0))),
        (1, false, result_payload(&names.model, ModelPart::Block(1))),
        (0, true, result_payload(&names.model, ModelPart::Tail)),
    ];
    let mut target = Target::new("worker_service");
    for (block_idx, is_tail, payload) in &payloads {
        let messages: Vec<Vec<u8>> =
            upload(&names, *block_idx, *is_tail, payload, 4096).iter().map(Message::encode_to_vec).collect();
        target = target.seed(input(1, &frames(&messages)));
    }
    let failure = pb::StageFailure {
        job_id: names.job.clone(),
        worker_id: names.worker.clone(),
        error: "fuzz".into(),
        ..Default::default()
    };
    target = target.seed(input(2, &frame(&failure.encode_to_vec())));
    let join =
        pb::JoinRequest { name: "w".into(), protocol_version: awq_proto::PROTOCOL_VERSION, ..Default::default() };
    target = target.seed(input(0, &frame(&join.encode_to_vec())));
    let for_generator = names.clone();
    target = target.generator(move |rng| worker_service_generated(&for_generator, &payloads, rng));
    target.run(move || {
        let mut fixture = Fixture::start("worker_service", scratch);
        assert_eq!(fixture.names.worker, names.worker, "the fixture's worker joins first");
        move |input: &[u8]| fixture.call(WORKER_METHODS, input)
    });
}

#[test]
fn regress_upload_claiming_gigabytes() {
    // One chunk of 16 bytes that says the payload is 16 GiB (the limit): refused, and the claim
    // is never reserved.
    let (scratch, names) = scratch();
    let mut fixture = Fixture::start("regress_upload", scratch);
    let mut messages = upload(&names, 0, false, &[0; 16], 16);
    if let Some(upload_message::Part::Chunk(c)) = &mut messages[1].part {
        c.total_bytes = 16 << 30;
    }
    let body: Vec<Vec<u8>> = messages.iter().map(Message::encode_to_vec).collect();
    awq_fuzz::reset_largest_allocation();
    assert_eq!(fixture.call(WORKER_METHODS, &input(1, &frames(&body))), Outcome::Refused);
    let largest = awq_fuzz::largest_allocation();
    assert!(largest < 1 << 30, "{largest} bytes allocated at once");
}

#[test]
fn regress_deploy_asking_for_billions_of_replicas() {
    // A record per replica was made before anything refused the count: 189 GB for u32::MAX.
    let (scratch, names) = scratch();
    let mut fixture = Fixture::start("regress_deploy", scratch);
    let spec = pb::DeploymentSpec { replicas: u32::MAX, ..valid_deployment(&names) };
    let two = pb::DeploymentSpec { replicas: 2, ..valid_deployment(&names) };
    assert_eq!(fixture.call(DEPLOYMENT_METHODS, &input(0, &frame(&two.encode_to_vec()))), Outcome::Accepted);
    let spec = pb::DeploymentSpec { name: "other".into(), ..spec };
    awq_fuzz::reset_largest_allocation();
    assert_eq!(fixture.call(DEPLOYMENT_METHODS, &input(0, &frame(&spec.encode_to_vec()))), Outcome::Refused);
    let largest = awq_fuzz::largest_allocation();
    assert!(largest < 1 << 30, "{largest} bytes allocated at once");
}
