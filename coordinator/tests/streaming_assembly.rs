//! Streaming assembly through the real coordinator, over gRPC on loopback, with a fake worker that
//! uploads results made of deterministic bytes (the coordinator never looks at tensor values):
//! - a result that does not match the output's manifest is refused naming the tensor, and nothing
//!   is staged for it; a cancelled job leaves neither its staging folder nor its temporary output;
//! - the checkpoint streamed while the job ran, the one assembled after a coordinator restart
//!   (blocks from the staged files into a new, empty output; the tail streamed), and the one
//!   assembled entirely from staged files (the restarted coordinator found the job assembling)
//!   are the same bytes;
//! - a coordinator killed at each point of an assembly (`regress_*`) has its successor end the job
//!   done with those bytes.
//!
//! A restart is a second coordinator started on a copy of the first one's store; the first one
//! gets no more requests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use awq_coordinator::assemble::{staged_file, staging_dir, write_staged};
use awq_coordinator::store::{MemoryStore, Store};
use awq_coordinator::{Coordinator, CoordinatorConfig};
use awq_model::arch::descriptor_for;
use awq_job::{GroupSize, JobOptions, Method, QuantSpec};
use awq_model::manifest::{AwqManifest, ModelPart};
use awq_model::safetensors::{self, RawTensor, StDtype};
use awq_model::synthetic::{write_checkpoint, SyntheticSpec};
use awq_model::ModelConfig;
use awq_proto::v1::job_service_client::JobServiceClient;
use awq_proto::v1::worker_command::Command;
use awq_proto::v1::worker_service_client::WorkerServiceClient;
use awq_proto::v1::{self as pb, upload_message, JobState};
use prost::Message;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Streaming;

/// How long a command or a job may take on loopback.
const WAIT: Duration = Duration::from_secs(20);
const N_BLOCKS: usize = 3;
const AWQ: QuantSpec = QuantSpec { bits: 4, group_size: GroupSize::G64, zero_point: true };

struct Fixture {
    dir: tempfile::TempDir,
    model: PathBuf,
    manifest: AwqManifest,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("a scratch folder");
    let model = dir.path().join("tiny");
    write_checkpoint(&model, &SyntheticSpec { n_blocks: N_BLOCKS, ..SyntheticSpec::tiny_llama() }).expect("a synthetic model");
    let config = ModelConfig::from_dir(&model).expect("its config");
    let arch = descriptor_for(&config.model_type, &config.path).expect("a registered architecture");
    let manifest = AwqManifest::new(arch, &config, AWQ);
    Fixture { dir, model, manifest }
}

impl Fixture {
    fn output(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn request(&self, output: &Path) -> pb::SubmitRequest {
        pb::SubmitRequest {
            model_path: self.model.to_string_lossy().into_owned(),
            output_path: output.to_string_lossy().into_owned(),
            options: Some(pb::QuantOptions::from(&JobOptions {
                quant: AWQ,
                method: Method::Rtn,
                // The 80 KB embedding table alone exceeds it: several shards.
                max_shard_bytes: 60_000,
                ..JobOptions::default()
            })),
            overwrite: false,
            deploy: None,
        }
    }

    /// The result of `part` as a worker would upload it, with `edit` applied to its tensors.
    fn payload_with(&self, part: ModelPart, edit: impl FnOnce(&mut Vec<RawTensor>)) -> Vec<u8> {
        let mut tensors: Vec<RawTensor> = self
            .manifest
            .part(part)
            .expect("a part of the model")
            .iter()
            .map(|s| raw(&s.name, s.dtype, &s.shape))
            .collect();
        edit(&mut tensors);
        safetensors::serialize(Path::new("payload"), &tensors, &BTreeMap::new()).expect("serialises")
    }

    fn payload(&self, part: ModelPart) -> Vec<u8> {
        self.payload_with(part, |_| {})
    }

    /// Every part's report, as a worker would send it.
    fn report(part: ModelPart) -> String {
        match part {
            ModelPart::Block(b) => format!(r#"{{"block_idx": {b}, "groups": [], "clips": []}}"#),
            ModelPart::Tail => r#"{"calibration": null}"#.into(),
        }
    }
}

/// A tensor whose bytes are drawn from its name (xorshift seeded by an FNV-1a hash).
fn raw(name: &str, dtype: StDtype, shape: &[usize]) -> RawTensor {
    let mut x = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3)) | 1;
    let len = shape.iter().product::<usize>() * dtype.size_bytes();
    let data = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 56) as u8
        })
        .collect();
    RawTensor { name: name.into(), dtype, shape: shape.to_vec(), data }
}

/// A coordinator serving on loopback, and clients of both its services.
struct Running {
    jobs: JobServiceClient<Channel>,
    workers: WorkerServiceClient<Channel>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        // A graceful shutdown would wait for the workers' Join streams: end the server outright.
        self.server.abort();
    }
}

async fn serve(store: Arc<MemoryStore>) -> Running {
    let coordinator = Coordinator::start(store, CoordinatorConfig::default()).await.expect("the coordinator starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(coordinator.serve(listener, std::future::pending()));
    let channel = tonic::transport::Endpoint::from_shared(url).unwrap().connect().await.unwrap();
    Running { jobs: JobServiceClient::new(channel.clone()), workers: WorkerServiceClient::new(channel), server }
}

impl Running {
    /// Joins a fake worker and returns its command stream (past the welcome).
    async fn join(&mut self) -> Streaming<pb::WorkerCommand> {
        let join = pb::JoinRequest {
            name: "fake".into(),
            compute_device: Some(awq_job::wire::device_to_wire(awq_job::Device::Cpu)),
            gpu_model: String::new(),
            memory_bytes: 1 << 40,
            stage_address: "127.0.0.1:9".into(),
            protocol_version: awq_proto::PROTOCOL_VERSION,
            replicas: Vec::new(),
            serving_devices: Vec::new(),
        };
        let mut commands = self.workers.join(join).await.expect("join accepted").into_inner();
        assert!(matches!(next(&mut commands).await, Command::WelcomeWorkerId(_)));
        commands
    }

    async fn submit(&mut self, request: pb::SubmitRequest) -> String {
        self.jobs.submit(request).await.expect("submitted").into_inner().job.expect("a job").id
    }

    async fn upload(&mut self, job_id: &str, part: ModelPart, payload: Vec<u8>) -> Result<(), tonic::Status> {
        let header = pb::ResultHeader {
            job_id: job_id.into(),
            worker_id: "fake-1".into(),
            stage_index: 0,
            attempt: 0,
            block_idx: match part {
                ModelPart::Block(b) => b as u32,
                ModelPart::Tail => 0,
            },
            is_tail: part == ModelPart::Tail,
            report_json: Fixture::report(part),
            payload_crc32: crc32fast::hash(&payload),
        };
        let mut messages = vec![pb::UploadMessage { part: Some(upload_message::Part::Header(header)) }];
        for (i, data) in payload.chunks(awq_proto::CHUNK_BYTES).enumerate() {
            let chunk = pb::Chunk {
                offset: (i * awq_proto::CHUNK_BYTES) as u64,
                data: data.to_vec(),
                crc32: crc32fast::hash(data),
                total_bytes: payload.len() as u64,
            };
            messages.push(pb::UploadMessage { part: Some(upload_message::Part::Chunk(chunk)) });
        }
        self.workers.upload(tokio_stream::iter(messages)).await.map(|_| ())
    }

    async fn wait_for(&mut self, job_id: &str, state: JobState) -> pb::Job {
        let start = Instant::now();
        loop {
            let job = self.jobs.get_job(pb::GetJobRequest { job_id: job_id.into() }).await.expect("the job exists").into_inner();
            if job.state == state as i32 {
                return job;
            }
            assert!(start.elapsed() < WAIT, "job {job_id} is {:?} ({}), not {state:?}", job.state(), job.error);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn next(commands: &mut Streaming<pb::WorkerCommand>) -> Command {
    let msg = tokio::time::timeout(WAIT, commands.next()).await.expect("a command within the wait");
    msg.expect("the stream is open").expect("a command, not an error").command.expect("a command in the message")
}

/// A coordinator on a fresh store, with one worker and a job writing to `output`, which has
/// received `blocks` (not the tail): the store, the coordinator, the worker and the job's id.
async fn blocks_uploaded(
    f: &Fixture,
    output: &Path,
    blocks: &[ModelPart],
) -> (Arc<MemoryStore>, Running, Streaming<pb::WorkerCommand>, String) {
    let store = Arc::new(MemoryStore::default());
    let mut coordinator = serve(store.clone()).await;
    let mut worker = coordinator.join().await;
    let job_id = coordinator.submit(f.request(output)).await;
    assignment(&mut worker).await;
    for &part in blocks {
        coordinator.upload(&job_id, part, f.payload(part)).await.expect("uploaded");
    }
    (store, coordinator, worker, job_id)
}

async fn assignment(commands: &mut Streaming<pb::WorkerCommand>) -> pb::Assignment {
    match next(commands).await {
        Command::Assign(a) => a,
        other => panic!("expected an assignment, got {other:?}"),
    }
}

/// A copy of `store`'s jobs and results: what a restarted coordinator reads (workers' keys are
/// leased and gone with the old coordinator).
async fn copy_of(store: &MemoryStore) -> Arc<MemoryStore> {
    let copy = Arc::new(MemoryStore::default());
    for (key, value) in store.list("/awq/v1/").await.unwrap() {
        if !key.starts_with("/awq/v1/workers/") {
            copy.put(&key, value).await.unwrap();
        }
    }
    copy
}

fn files_in(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("an entry"))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).expect("readable")))
        .collect()
}

/// Hidden working folders beside output `name` (staging, temporary output).
fn leftovers(f: &Fixture, name: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(f.dir.path())
        .expect("the scratch folder")
        .map(|e| e.expect("an entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!(".{name}.")))
        .collect();
    names.sort();
    names
}

fn temp_output(f: &Fixture, name: &str, job_id: &str) -> PathBuf {
    f.dir.path().join(format!(".{name}.tmp-{job_id}"))
}

#[tokio::test]
async fn a_mismatching_result_is_refused_naming_the_tensor_and_a_cancel_leaves_nothing() {
    let f = fixture();
    let mut c = serve(Arc::new(MemoryStore::default())).await;
    let mut worker = c.join().await;
    let out = f.output("out");
    let job_id = c.submit(f.request(&out)).await;
    assignment(&mut worker).await;
    let staging = staging_dir(&out, &job_id);

    let refused = |result: Result<(), tonic::Status>, text: &str| {
        let status = result.expect_err("a mismatching result is refused");
        assert_eq!(status.code(), tonic::Code::DataLoss, "{status}");
        assert!(status.message().contains(text), "{status}");
    };
    let block1 = ModelPart::Block(1);
    let q = "model.layers.1.self_attn.q_proj.qweight";
    let wrong_shape = f.payload_with(block1, |ts| {
        let t = ts.iter_mut().find(|t| t.name == q).expect("q_proj's qweight");
        *t = raw(q, StDtype::I32, &[128, 15]);
    });
    refused(c.upload(&job_id, block1, wrong_shape).await, &format!("block 1: tensor {q} is I32 [128, 15]; the output checkpoint holds I32 [128, 16]"));
    let wrong_dtype = f.payload_with(block1, |ts| {
        let t = ts.iter_mut().find(|t| t.name == q).expect("q_proj's qweight");
        *t = raw(q, StDtype::F32, &[128, 16]);
    });
    refused(c.upload(&job_id, block1, wrong_dtype).await, &format!("tensor {q} is F32 [128, 16]"));
    let extra = f.payload_with(block1, |ts| ts.push(raw("model.layers.1.mlp.extra", StDtype::F16, &[4])));
    refused(c.upload(&job_id, block1, extra).await, "block 1: tensor model.layers.1.mlp.extra is not part of block 1");
    let missing = f.payload_with(block1, |ts| ts.retain(|t| t.name != q));
    refused(c.upload(&job_id, block1, missing).await, &format!("block 1: tensor {q} is missing"));
    // Block 0's tensors uploaded as block 1.
    refused(c.upload(&job_id, block1, f.payload(ModelPart::Block(0))).await, "is missing");
    refused(c.upload(&job_id, ModelPart::Block(7), f.payload(block1)).await, "block 7 is not in the model, which has 3 blocks");
    for path in [staged_file(&staging, block1), staged_file(&staging, block1).with_extension("json")] {
        assert!(!path.exists(), "{} was staged for a refused result", path.display());
    }

    // A good result is staged and written into the temporary output; a cancel removes both.
    c.upload(&job_id, ModelPart::Block(0), f.payload(ModelPart::Block(0))).await.expect("a good result");
    assert!(staged_file(&staging, ModelPart::Block(0)).is_file());
    assert!(temp_output(&f, "out", &job_id).is_dir());
    c.jobs.cancel_job(pb::CancelJobRequest { job_id: job_id.clone() }).await.expect("cancelled");
    assert_eq!(leftovers(&f, "out"), Vec::<String>::new(), "the cancelled job left working folders");
    // A late result of the cancelled job is dropped and creates nothing.
    c.upload(&job_id, block1, f.payload(block1)).await.expect("a late result is taken and dropped");
    assert_eq!(leftovers(&f, "out"), Vec::<String>::new(), "a late result left working folders");
    assert!(!out.exists());
}

#[tokio::test]
async fn streamed_restarted_and_staged_assemblies_write_the_same_bytes() {
    let f = fixture();
    let blocks: Vec<ModelPart> = (0..N_BLOCKS).map(ModelPart::Block).collect();

    // Streamed: every result written into the output as it arrives (the tail between blocks).
    let streamed = f.output("streamed");
    let mut c = serve(Arc::new(MemoryStore::default())).await;
    let mut worker = c.join().await;
    let job_id = c.submit(f.request(&streamed)).await;
    assignment(&mut worker).await;
    for part in [blocks[2], ModelPart::Tail, blocks[0], blocks[1]] {
        c.upload(&job_id, part, f.payload(part)).await.expect("uploaded");
    }
    c.wait_for(&job_id, JobState::Done).await;
    let want = files_in(&streamed);
    let n_shards = want.keys().filter(|n| n.ends_with(".safetensors")).count();
    assert!(n_shards > 2 && want.contains_key("model.safetensors.index.json"), "{:?}", want.keys());
    assert!(want.contains_key("rtn_report.json") && want.contains_key("tokenizer.json"), "{:?}", want.keys());
    assert_eq!(leftovers(&f, "streamed"), Vec::<String>::new());
    drop((worker, c));

    // Restarted: the blocks arrive at one coordinator, the tail at its successor, whose output is
    // new (it replaces the first one's temporary folder) and gets the blocks from staged files.
    let restarted = f.output("restarted");
    let (store, first, worker, job_id) = blocks_uploaded(&f, &restarted, &blocks).await;
    assert!(temp_output(&f, "restarted", &job_id).is_dir());
    let mut second = serve(copy_of(&store).await).await;
    let mut worker2 = second.join().await;
    let tail_only = assignment(&mut worker2).await;
    assert_eq!((tail_only.block_start, tail_only.block_end, tail_only.produce_tail), (N_BLOCKS as u32, N_BLOCKS as u32, true));
    second.upload(&job_id, ModelPart::Tail, f.payload(ModelPart::Tail)).await.expect("uploaded");
    second.wait_for(&job_id, JobState::Done).await;
    assert_eq!(files_in(&restarted), want, "assembled after a restart");
    assert_eq!(leftovers(&f, "restarted"), Vec::<String>::new());
    drop((worker, worker2, first, second));

    // From staged files only: the restarted coordinator finds every result staged and the job
    // assembling; no result is streamed into its output.
    let staged = f.output("staged");
    let (store, first, worker, job_id) = blocks_uploaded(&f, &staged, &blocks).await;
    let tail = staged_file(&staging_dir(&staged, &job_id), ModelPart::Tail);
    write_staged(&tail.with_extension("json"), Fixture::report(ModelPart::Tail).as_bytes()).unwrap();
    write_staged(&tail, &f.payload(ModelPart::Tail)).unwrap();
    let copy = copy_of(&store).await;
    copy.put(&format!("/awq/v1/tails/{job_id}"), b"staged".to_vec()).await.unwrap();
    let key = format!("/awq/v1/jobs/{job_id}");
    let mut job = pb::Job::decode(&copy.get(&key).await.unwrap().expect("the job record")[..]).unwrap();
    job.state = JobState::Assembling as i32;
    copy.put(&key, job.encode_to_vec()).await.unwrap();
    let mut second = serve(copy).await;
    second.wait_for(&job_id, JobState::Done).await;
    assert_eq!(files_in(&staged), want, "assembled from staged files");
    assert_eq!(leftovers(&f, "staged"), Vec::<String>::new());
    drop((worker, first, second));
}

/// The checkpoint of a job streamed to its end on one coordinator: the bytes every other way of
/// assembling must give.
async fn streamed(f: &Fixture) -> BTreeMap<String, Vec<u8>> {
    let out = f.output("reference");
    let mut c = serve(Arc::new(MemoryStore::default())).await;
    let mut worker = c.join().await;
    let job_id = c.submit(f.request(&out)).await;
    assignment(&mut worker).await;
    for part in (0..N_BLOCKS).map(ModelPart::Block).chain([ModelPart::Tail]) {
        c.upload(&job_id, part, f.payload(part)).await.expect("uploaded");
    }
    c.wait_for(&job_id, JobState::Done).await;
    files_in(&out)
}

/// What a coordinator that died with every result of a job writing to `output` staged and
/// recorded leaves: a copy of its store, the job's record in `state`; with the first coordinator
/// (which gets no more requests), its worker and the job's id.
async fn every_result_recorded(
    f: &Fixture,
    output: &Path,
    state: JobState,
) -> (Arc<MemoryStore>, Running, Streaming<pb::WorkerCommand>, String) {
    let blocks: Vec<ModelPart> = (0..N_BLOCKS).map(ModelPart::Block).collect();
    let (store, first, worker, job_id) = blocks_uploaded(f, output, &blocks).await;
    let tail = staged_file(&staging_dir(output, &job_id), ModelPart::Tail);
    write_staged(&tail.with_extension("json"), Fixture::report(ModelPart::Tail).as_bytes()).unwrap();
    write_staged(&tail, &f.payload(ModelPart::Tail)).unwrap();
    let copy = copy_of(&store).await;
    copy.put(&format!("/awq/v1/tails/{job_id}"), b"staged".to_vec()).await.unwrap();
    let key = format!("/awq/v1/jobs/{job_id}");
    let mut job = pb::Job::decode(&copy.get(&key).await.unwrap().expect("the job record")[..]).unwrap();
    job.state = state as i32;
    copy.put(&key, job.encode_to_vec()).await.unwrap();
    (copy, first, worker, job_id)
}

/// A coordinator killed after recording a job's last result and before recording that the job
/// assembles: the job's record says `running`, with every result. Its successor assembles it
/// (before, it planned nothing, since nothing was missing, and the job stayed running for ever).
#[tokio::test]
async fn regress_a_job_running_with_every_result_recorded_assembles_after_a_restart() {
    let f = fixture();
    let want = streamed(&f).await;
    let out = f.output("out");
    let (store, first, worker, job_id) = every_result_recorded(&f, &out, JobState::Running).await;
    let mut second = serve(store).await;
    second.wait_for(&job_id, JobState::Done).await;
    assert_eq!(files_in(&out), want);
    assert_eq!(leftovers(&f, "out"), Vec::<String>::new());
    drop((worker, first, second));
}

/// A coordinator killed after renaming a job's output into place and before recording the job
/// done (while removing the staging folder, or just after). Its successor finds the output under
/// the identity recorded before the rename and ends the job done, without assembling it again.
/// Before, it assembled it again and its rename was refused (the output exists: the job had no
/// `--overwrite`), or found no staged files: the job failed, its output complete on disk.
#[tokio::test]
async fn regress_a_restart_after_the_rename_ends_the_job_done_with_its_output() {
    let f = fixture();
    let want = streamed(&f).await;
    for staging_left in [true, false] {
        let name = format!("out-{staging_left}");
        let out = f.output(&name);
        let (store, first, worker, job_id) = every_result_recorded(&f, &out, JobState::Assembling).await;
        // The first coordinator's commit: its temporary folder complete, its identity recorded,
        // renamed into place.
        let temp = temp_output(&f, &name, &job_id);
        for (file, bytes) in &want {
            std::fs::write(temp.join(file), bytes).unwrap();
        }
        let id = awq_model::writer::FolderId::of(&temp).unwrap().expect("the temporary output exists");
        store.put(&format!("/awq/v1/committed/{job_id}"), id.to_string().into_bytes()).await.unwrap();
        std::fs::rename(&temp, &out).unwrap();
        let staging = staging_dir(&out, &job_id);
        if !staging_left {
            std::fs::remove_dir_all(&staging).unwrap();
        }
        let mut second = serve(store.clone()).await;
        second.wait_for(&job_id, JobState::Done).await;
        assert_eq!(files_in(&out), want);
        assert_eq!(awq_model::writer::FolderId::of(&out).unwrap(), Some(id), "the output was replaced");
        assert_eq!(leftovers(&f, &name), Vec::<String>::new());
        assert!(store.get(&format!("/awq/v1/committed/{job_id}")).await.unwrap().is_none(), "the key stayed");
        drop((worker, first, second));
    }

    // Killed between recording the identity and the rename: nothing in place, so the successor
    // assembles again, from the staged files.
    let out = f.output("out-not-renamed");
    let (store, first, worker, job_id) = every_result_recorded(&f, &out, JobState::Assembling).await;
    store.put(&format!("/awq/v1/committed/{job_id}"), b"1:2".to_vec()).await.unwrap();
    let mut second = serve(store).await;
    second.wait_for(&job_id, JobState::Done).await;
    assert_eq!(files_in(&out), want);
    assert_eq!(leftovers(&f, "out-not-renamed"), Vec::<String>::new());
    drop((worker, first, second));
}
