//! NCCL between GPU stages, end to end: one synthetic model quantized on one GPU, on two GPUs in
//! one process (`awq quantize --device cuda:0,cuda:1`: one stage per GPU, activations over NCCL)
//! and on a cluster of two `awq worker --device cuda:N` processes (NCCL between processes); the
//! three outputs must hold the same bytes. Each two-GPU run must have carried its activations over
//! NCCL (the workers log every transfer), in one plan (no stage planned again after a failure).
//!
//! Serving the same way: a replica pipelined over two `awq worker` processes carries its hidden
//! states between the stages over NCCL (one GPU each; again with NCCL's network transport, as
//! between nodes), or over gRPC where NCCL refuses the link (both workers on one GPU), and answers
//! with the greedy tokens of `awq serve` on one GPU.
//!
//! Needs `AWQ_GPU_TESTS=1` (then a missing GPU is a failure) and two GPUs (on a machine with one,
//! the two-GPU tests skip with a note). Built with this crate's `cuda` feature: `scripts/build-gpu` puts it in
//! `gpu-bin/tests/`, and `gpu-bin/run-gpu-tests` points `AWQ_BIN` at `gpu-bin/awq`.
#![cfg(feature = "cuda")]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use awq_e2e::cluster::{free_port, Cluster, StoreKind};
use awq_e2e::serve::{Endpoint, Server};
use awq_e2e::*;
use awq_kernels::Device;
use serde_json::{json, Value};

/// A job on the tiny model takes seconds on a GPU; the margin is for NCCL's first set-up.
const JOB_TIMEOUT: Duration = Duration::from_secs(600);

/// How many GPUs this machine has, or `None` with a note when GPU tests are off.
fn gpus() -> Option<usize> {
    if std::env::var("AWQ_GPU_TESTS").map_or(true, |v| v.is_empty() || v == "0") {
        eprintln!("skipped: set AWQ_GPU_TESTS=1 on a machine with GPUs (gpu-bin/run-gpu-tests does)");
        return None;
    }
    if let Err(e) = Device::Cuda(0).check_available() {
        panic!("AWQ_GPU_TESTS=1 but cuda:0 is not usable: {e}");
    }
    Some(awq_kernels::cuda::device_count())
}

/// Two GPUs, or `None` with a note (GPU tests off, or one GPU).
fn two_gpus() -> Option<()> {
    let n = gpus()?;
    if n < 2 {
        eprintln!("skipped: this test needs 2 GPUs, this machine has {n}");
        return None;
    }
    Some(())
}

fn arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `awq quantize MODEL -o OUT --device DEVICES --json` with `AWQ_LOG=info` (the workers' NCCL
/// lines go to stderr); returns the job it printed and its stderr.
fn quantize(model: &Path, out: &Path, devices: &str) -> (Value, String) {
    let args = ["quantize".to_string(), arg(model), "-o".into(), arg(out), "--device".into(), devices.into(), "--json".into()];
    let output = Command::new(awq_bin())
        .args(&args)
        .env("AWQ_LOG", "info")
        .env("NO_COLOR", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot start awq: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "awq {} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}", args.join(" "), output.status);
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("no JSON on stdout ({e}): {stdout}"));
    (summary["job"].clone(), stderr)
}

/// (block_start, block_end, attempt) of each stage of `job`.
fn stages(job: &Value) -> Vec<(u64, u64, u64)> {
    let count = |s: &Value, k: &str| s[k].as_u64().unwrap_or_else(|| panic!("no `{k}` in {s}"));
    job["stages"]
        .as_array()
        .unwrap_or_else(|| panic!("no stages in {job}"))
        .iter()
        .map(|s| (count(s, "block_start"), count(s, "block_end"), count(s, "attempt")))
        .collect()
}

/// Whether `log` shows rank 0 sending and rank 1 receiving activations over NCCL.
fn used_nccl(log: &str) -> bool {
    log.contains("NCCL rank 0: sent") && log.contains("NCCL rank 1: received")
}

#[test]
fn two_gpus_in_one_process_and_in_two_workers_write_the_bytes_of_one_gpu() {
    let Some(()) = two_gpus() else { return };
    let s = scratch();
    let dir = s.path();
    let model = dir.join("tiny6");
    awq_ok(["synthetic".to_string(), arg(&model), "--blocks".into(), "6".into(), "--seed".into(), "7".into()]);

    // The reference: one GPU, one stage, nothing to transfer.
    let one = dir.join("one-gpu");
    let (job, stderr) = quantize(&model, &one, "cuda:0");
    assert_eq!(stages(&job), [(0, 6, 0)], "{job}");
    assert!(!stderr.contains("NCCL rank"), "one stage used NCCL:\n{stderr}");

    // Two GPUs in this process: two stages, activations over NCCL, the same bytes.
    let two = dir.join("two-gpus");
    let (job, stderr) = quantize(&model, &two, "cuda:0,cuda:1");
    assert_eq!(stages(&job), [(0, 3, 0), (3, 6, 0)], "{job}");
    assert!(used_nccl(&stderr), "no NCCL transfer in the log:\n{stderr}");
    assert_same_files(&one, &two);

    // Two worker processes, one GPU each: NCCL between processes, the same bytes.
    let mut c = Cluster::start(dir, StoreKind::Memory, &[], &[]);
    c.add_worker_with("g0", &["--device", "cuda:0"]);
    c.add_worker_with("g1", &["--device", "cuda:1"]);
    let cluster_out = dir.join("cluster");
    let (m, o) = (arg(&model), arg(&cluster_out));
    let job = c.json_within(&["submit", &m, "-o", &o, "--wait"], JOB_TIMEOUT);
    assert_eq!(job["state"], "done", "{job}\n{}", c.logs());
    assert_eq!(stages(&job), [(0, 3, 0), (3, 6, 0)], "{job}");
    let logs = format!("{}\n{}", c.worker_log("g0"), c.worker_log("g1"));
    assert!(used_nccl(&logs), "no NCCL transfer in the workers' logs:\n{}", c.logs());
    assert_same_files(&one, &cluster_out);
}

const PROMPTS: &[&str] = &["The capital of France is", "def fibonacci(n):", "Once upon a time"];
/// Both sides run every kernel one by one, on the same rows: the same tokens, bit for bit. A KV
/// cache of a set size: two stages that share a GPU would each see the other's memory in use.
const ENGINE: &[&str] = &["--enforce-eager", "--max-model-len", "256", "--kv-cache-bytes", "268435456"];

/// The greedy completions (24 tokens, EOS ignored) of [`PROMPTS`] by `model` at `api`.
fn greedy(api: &Endpoint, model: &str) -> Vec<String> {
    let text = |prompt: &str| {
        let body = json!({"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": true});
        let (status, body) = api.post("/v1/completions", &body);
        assert_eq!(status, 200, "{prompt:?}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
        v["choices"][0]["text"].as_str().unwrap_or_else(|| panic!("no text: {body}")).to_string()
    };
    PROMPTS.iter().map(|p| text(p)).collect()
}

/// A replica of `model` pipelined over two workers on `devices` (with `env` for NCCL): the greedy
/// completions and both workers' logs.
fn pipelined(dir: &Path, model: &Path, devices: [&str; 2], env: &[(&str, &str)]) -> (Vec<String>, String) {
    std::fs::create_dir_all(dir).expect("the cluster's folder");
    let http = format!("127.0.0.1:{}", free_port());
    let mut c = Cluster::start_with(dir, StoreKind::Memory, &[], &[], &["--http-listen", &http]);
    c.add_worker_env("s0", &["--device", devices[0]], env);
    c.add_worker_env("s1", &["--device", devices[1]], env);
    let m = arg(model);
    let mut deploy = vec!["deploy", &m, "--name", "piped", "--pp", "2", "--wait", "--timeout", "300"];
    deploy.extend(ENGINE);
    let d = c.json_within(&deploy, JOB_TIMEOUT);
    assert_eq!(d["replicas"][0]["stage_workers"].as_array().map(Vec::len), Some(2), "{d}");
    let texts = greedy(&Endpoint { addr: http, api_key: None }, "piped");
    (texts, format!("{}\n{}", c.worker_log("s0"), c.worker_log("s1")))
}

/// The greedy completions of `awq serve` of `model` on cuda:0, the whole model in one process.
fn served_whole(model: &Path) -> Vec<String> {
    let mut args = vec!["--device", "cuda:0"];
    args.extend(ENGINE);
    let server = Server::start(model, &args);
    let (_, body) = server.endpoint().get("/v1/models");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("/v1/models: not JSON ({e}): {body}"));
    let name = v["data"][0]["id"].as_str().unwrap_or_else(|| panic!("/v1/models: no model: {body}")).to_string();
    greedy(&server.endpoint(), &name)
}

/// Between GPU stages the hidden states take the NCCL link (over P2P or shared memory, and over
/// NCCL's network transport as between nodes); on one GPU shared by both stages NCCL refuses the
/// link and they keep gRPC. Every way gives the tokens of the whole model in one process.
#[test]
fn a_replica_pipelined_over_gpu_workers_carries_hidden_states_over_nccl_or_grpc() {
    let Some(n) = gpus() else { return };
    let s = scratch();
    let dir = s.path();
    let model = dir.join("tiny6");
    awq_ok(["synthetic".to_string(), arg(&model), "--blocks".into(), "6".into(), "--seed".into(), "11".into()]);
    let want = served_whole(&model);

    let (texts, logs) = pipelined(&dir.join("one-gpu"), &model, ["cuda:0", "cuda:0"], &[]);
    assert!(logs.contains("to the next stage at") && logs.contains("over gRPC ("), "no fallback in the log:\n{logs}");
    assert_eq!(texts, want, "two stages on one GPU, over gRPC");

    if n < 2 {
        eprintln!("the NCCL link needs 2 GPUs, this machine has {n}: only the gRPC road ran");
        return;
    }
    let (texts, logs) = pipelined(&dir.join("two-gpus"), &model, ["cuda:0", "cuda:1"], &[]);
    assert!(logs.contains("to the next stage at") && logs.contains("over NCCL"), "no NCCL link in the log:\n{logs}");
    assert_eq!(texts, want, "two stages on two GPUs, over NCCL");

    let network = [("NCCL_P2P_DISABLE", "1"), ("NCCL_SHM_DISABLE", "1")];
    let (texts, logs) = pipelined(&dir.join("network"), &model, ["cuda:0", "cuda:1"], &network);
    assert!(logs.contains("over NCCL"), "no NCCL link in the log:\n{logs}");
    assert_eq!(texts, want, "two stages on two GPUs, over NCCL's network transport");
}
