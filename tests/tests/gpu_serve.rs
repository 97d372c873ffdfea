//! The serving engine on a GPU against the CPU engine (whose tokens `serve_engine.rs` checks against
//! the numpy reference): greedy decoding of SmolLM2-135M, fp16 and AWQ (INT4 on the GPU through the
//! W4A16 kernels), several prompts at once, gives the CPU engine's tokens. The GPU computes in f16
//! and the CPU in f32, so a divergence is accepted only at a step where the CPU's top two tokens
//! are within [`MARGIN`] nats of each other (the margin rule of `serve_engine.rs`, read from the
//! CPU engine's own top-2 logprobs); after it the sequences differ legitimately. The test prints
//! where each prompt diverged, if it did.
//!
//! The GPU engine runs twice: replaying decode steps recorded as CUDA graphs (the default) and with
//! `enforce_eager`; both are held to the rule. A third run asks for plain greedy tokens (picked by
//! the device's argmax inside the graph, no logits copied) and must give the graph run's tokens
//! exactly. `recorded_decode_steps_give_the_eager_steps_logits` drives the runner directly: the
//! logits of recorded decode steps, at several batch sizes and padded buckets, against the same
//! steps run kernel by kernel.
//!
//! Needs a GPU and the checkpoints, which a GPU machine cannot download: `AWQ_GPU_TESTS=1` with
//! `AWQ_SMOLLM2_DIR` (the fp16 checkpoint, e.g. `awq import gguf` of the assets' GGUF) and
//! `AWQ_SMOLLM2_AWQ_DIR` (an AWQ checkpoint of it); gpu-bin/run-gpu-tests passes them when its
//! caller set them. Without `AWQ_GPU_TESTS` the test skips; with it, missing variables fail it.
#![cfg(feature = "cuda")]

use std::path::PathBuf;

use awq_kernels::Device;
use awq_model::{Checkpoint, Tokenizer};
use awq_serve::engine::{EngineConfig, EngineEvent, EngineHandle, GenerateRequest};
use awq_serve::kv_cache::BlockId;
use awq_serve::runner::ModelRunner;
use awq_serve::sampling::{RawSamplingParams, SamplingParams};
use awq_serve::scheduler::{ScheduledSeq, StepPlan};
use awq_serve::RequestId;

/// Below this CPU margin (top-1 minus top-2 logprob), the GPU may pick the other token.
const MARGIN: f32 = 0.01;
const MAX_NEW: usize = 48;
const PROMPTS: &[&str] = &[
    "The capital of France is",
    "It is a truth universally acknowledged that",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
];

fn gpu_on() -> bool {
    std::env::var("AWQ_GPU_TESTS").is_ok_and(|v| !v.is_empty() && v != "0")
}

fn model_dir(var: &str) -> PathBuf {
    let dir = std::env::var_os(var).unwrap_or_else(|| panic!("AWQ_GPU_TESTS=1 needs {var} (see the module docs)"));
    PathBuf::from(dir)
}

/// How the engine runs: its device, whether it records decode steps, whether requests ask for
/// logprobs (then every sampled row's logits come back to the host; without, greedy tokens are the
/// device's argmax).
#[derive(Clone, Copy, Debug)]
struct Run {
    device: Device,
    eager: bool,
    logprobs: bool,
}

/// Each prompt's greedy tokens and, per step, the top-2 logprobs (empty without `run.logprobs`),
/// all prompts submitted at once.
fn generate(model: &PathBuf, run: Run, prompts: &[Vec<u32>]) -> Vec<Vec<(u32, Vec<f32>)>> {
    let device = run.device;
    let config = EngineConfig {
        devices: vec![device],
        max_model_len: Some(1024),
        kv_cache_bytes: Some(256 << 20),
        enforce_eager: run.eager,
        ..EngineConfig::new(model)
    };
    let engine = EngineHandle::start(config).unwrap_or_else(|e| panic!("{} on {device}: {e}", model.display()));
    let params = SamplingParams::new(RawSamplingParams {
        temperature: Some(0.0),
        max_tokens: Some(MAX_NEW as i64),
        ignore_eos: true,
        logprobs: run.logprobs,
        top_logprobs: run.logprobs.then_some(2),
        ..Default::default()
    })
    .expect("valid parameters");
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| {
            engine
                .submit(GenerateRequest { prompt: p.clone(), params: params.clone(), prompt_logprobs: None })
                .expect("submit")
        })
        .collect();
    streams
        .into_iter()
        .map(|mut stream| {
            let mut steps = Vec::new();
            while let Some(event) = stream.events.blocking_recv() {
                match event {
                    EngineEvent::Tokens { tokens, .. } => {
                        steps.extend(tokens.iter().map(|t| (t.id, t.top_logprobs.iter().map(|l| l.logprob).collect())))
                    }
                    EngineEvent::Finished { .. } => break,
                    other => panic!("{device}: unexpected event {other:?}"),
                }
            }
            assert_eq!(steps.len(), MAX_NEW, "{device}: every request runs to max_tokens");
            steps
        })
        .collect()
}

/// The GPU's tokens equal the CPU's up to the first step where the CPU's margin is below MARGIN.
fn compare(what: &str, model: &PathBuf) {
    let ck = Checkpoint::open(model).expect("checkpoint");
    let tokenizer = Tokenizer::from_dir(model, ck.config()).expect("tokenizer");
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| tokenizer.encode(p).expect("encodes")).collect();
    let cpu = generate(model, Run { device: Device::Cpu, eager: true, logprobs: true }, &prompts);
    let graphs = Run { device: Device::Cuda(0), eager: false, logprobs: true };
    let gpu = generate(model, graphs, &prompts);
    held_to_the_cpu(&format!("{what} (CUDA graphs)"), &cpu, &gpu);
    let eager = generate(model, Run { eager: true, ..graphs }, &prompts);
    held_to_the_cpu(&format!("{what} (eager)"), &cpu, &eager);
    let argmax = generate(model, Run { logprobs: false, ..graphs }, &prompts);
    for ((prompt, with), without) in PROMPTS.iter().zip(&gpu).zip(&argmax) {
        let tokens = |steps: &Vec<(u32, Vec<f32>)>| steps.iter().map(|s| s.0).collect::<Vec<_>>();
        assert_eq!(tokens(with), tokens(without), "{what} {prompt:?}: the device's argmax against the logits' argmax");
    }
}

/// `gpu`'s tokens equal `cpu`'s up to the first step where the CPU's margin is below MARGIN.
fn held_to_the_cpu(what: &str, cpu: &[Vec<(u32, Vec<f32>)>], gpu: &[Vec<(u32, Vec<f32>)>]) {
    let mut exact = 0;
    for ((prompt, c), g) in PROMPTS.iter().zip(cpu).zip(gpu) {
        match c.iter().zip(g.iter()).position(|(a, b)| a.0 != b.0) {
            None => {
                exact += 1;
                eprintln!("{what} {prompt:?}: all {MAX_NEW} tokens equal");
            }
            Some(step) => {
                let margin = c[step].1[0] - c[step].1[1];
                eprintln!("{what} {prompt:?}: diverges at step {step}, CPU margin {margin:.4}");
                assert!(
                    margin < MARGIN,
                    "{what} {prompt:?}: the GPU picked {} at step {step} where the CPU picked {} with margin {margin} \
                     (>= {MARGIN}); tokens so far {:?}",
                    g[step].0,
                    c[step].0,
                    &c[..step].iter().map(|s| s.0).collect::<Vec<_>>()
                );
            }
        }
        // The GPU's logprob of the CPU's token is close where they still agree.
        let first = c.iter().zip(g.iter()).take_while(|(a, b)| a.0 == b.0).count().min(8);
        for (a, b) in c[..first].iter().zip(&g[..first]) {
            assert!(
                (a.1[0] - b.1[0]).abs() < 0.05,
                "{what} {prompt:?}: logprobs {} (CPU) and {} (GPU)",
                a.1[0],
                b.1[0]
            );
        }
    }
    eprintln!("{what}: {exact} of {} prompts equal over all {MAX_NEW} tokens", PROMPTS.len());
}

#[test]
fn smollm2_greedy_tokens_on_the_gpu_equal_the_cpus() {
    if !gpu_on() {
        eprintln!("skipped: set AWQ_GPU_TESTS=1, AWQ_SMOLLM2_DIR and AWQ_SMOLLM2_AWQ_DIR on a GPU machine");
        return;
    }
    compare("fp16", &model_dir("AWQ_SMOLLM2_DIR"));
    compare("AWQ", &model_dir("AWQ_SMOLLM2_AWQ_DIR"));
}

/// One decoding sequence of the runner test: its tokens so far and its block table.
struct Decoding {
    tokens: Vec<u32>,
    table: Vec<BlockId>,
}

/// A step of `seqs`: each one's whole prompt (`prefill`) or its last token, its logits sampled.
fn step_plan(seqs: &[(usize, &Decoding)], prefill: bool) -> StepPlan {
    let seqs: Vec<ScheduledSeq> = seqs
        .iter()
        .map(|&(id, d)| {
            let n = d.tokens.len();
            let positions = if prefill { 0..n } else { n - 1..n };
            ScheduledSeq {
                id: RequestId(id as u64),
                token_ids: d.tokens[positions.clone()].to_vec(),
                positions,
                block_table: d.table.clone(),
                sample: true,
                prompt_logprob_positions: 0..0,
            }
        })
        .collect();
    let n_tokens = seqs.iter().map(|s| s.positions.len()).sum();
    StepPlan { seqs, n_tokens, preempted: vec![] }
}

/// The first largest value's index.
fn argmax(row: &[f32]) -> u32 {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0 as u32
}

#[test]
fn recorded_decode_steps_give_the_eager_steps_logits() {
    if !gpu_on() {
        eprintln!("skipped: set AWQ_GPU_TESTS=1 and AWQ_SMOLLM2_AWQ_DIR on a GPU machine");
        return;
    }
    let model = model_dir("AWQ_SMOLLM2_AWQ_DIR");
    let ck = Checkpoint::open(&model).expect("checkpoint");
    let (block_size, n_blocks, max_model_len) = (16, 64, 256);
    let load = || ModelRunner::load(&ck, &[Device::Cuda(0)], 1, block_size, n_blocks).expect("runner on cuda:0");
    let (mut eager, mut graphs) = (load(), load());
    graphs.enable_decode_graphs(max_model_len, 8).expect("graphs");
    let vocab = eager.vocab_size() as u32;
    // Five sequences of different lengths, each in blocks of its own (shuffled a little).
    let mut seqs: Vec<Decoding> = (0..5)
        .map(|s| Decoding {
            tokens: (0..7 + 13 * s).map(|i| ((i * 7919 + s * 104729 + 11) as u32) % vocab).collect(),
            table: (0..8).map(|b| BlockId((b * 5 + s) as u32)).collect(),
        })
        .collect();
    let all: Vec<(usize, &Decoding)> = seqs.iter().enumerate().collect();
    let plan = step_plan(&all, true);
    let (a, b) = (eager.execute(&plan).expect("prefill"), graphs.execute(&plan).expect("prefill"));
    assert_eq!(a.logits, b.logits, "prefill runs the same kernels on both runners");
    let mut next: Vec<u32> = a.seqs.iter().map(|s| argmax(a.row(s.sample_row.expect("sampled")))).collect();
    // Batches of 5 (padded to 8), 3 (padded to 4), 2 and 1 sequences; each size for several steps.
    let mut worst = 0f64;
    for (round, live) in [5, 5, 5, 3, 3, 3, 2, 2, 1, 1, 1].into_iter().enumerate() {
        for (s, &t) in seqs.iter_mut().zip(&next).take(live) {
            s.tokens.push(t);
        }
        let live_seqs: Vec<(usize, &Decoding)> = seqs.iter().enumerate().take(live).collect();
        let plan = step_plan(&live_seqs, false);
        let a = eager.execute(&plan).expect("eager decode");
        let b = graphs.execute(&plan).expect("recorded decode");
        let picked = graphs.execute_picking(&step_plan(&live_seqs, false), &vec![true; live]);
        assert_eq!(a.seqs.len(), live);
        for (i, (sa, sb)) in a.seqs.iter().zip(&b.seqs).enumerate() {
            let (ra, rb) = (a.row(sa.sample_row.expect("row")), b.row(sb.sample_row.expect("row")));
            let num: f64 = ra.iter().zip(rb).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
            let den: f64 = ra.iter().map(|x| (*x as f64).powi(2)).sum();
            let rel = (num / den).sqrt();
            worst = worst.max(rel);
            // f16 activations, attention cut into other partitions: a few f16 ulps.
            assert!(rel < 2e-3, "round {round}, sequence {i} of {live}: recorded step logits off by {rel:.2e}");
            next[i] = argmax(ra);
        }
        // The same step again, picked on the device: a replay writes the argmax of the same logits.
        // (The step wrote the same K/V again: decoding a position twice is idempotent.)
        let picked = picked.expect("picked decode");
        for (i, (sb, sp)) in b.seqs.iter().zip(&picked.seqs).enumerate() {
            assert_eq!(sp.argmax, Some(argmax(b.row(sb.sample_row.expect("row")))), "round {round}, sequence {i}");
        }
    }
    let recorded = graphs.recorded_decode_steps();
    eprintln!("{recorded} decode steps recorded; worst relative logit difference {worst:.2e}");
    assert_eq!(recorded, 4, "one graph per row bucket met (8, 4, 2, 1) at one context bucket");
    assert_eq!(eager.recorded_decode_steps(), 0);
}

/// Relative L2 difference of two rows of logits.
fn relative_difference(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// Tensor parallelism on GPUs: SmolLM2 (AWQ, 9 heads over 3 KV heads) as 3 ranks gives one rank's
/// logits within f16 rounding (1e-2 relative), step after step, and its greedy token wherever one rank's top two
/// logits are not within [`MARGIN`]. With 3 GPUs or more the ranks sit on cuda:0..2 and meet in
/// NCCL all-reduces, which the decode steps' CUDA graphs record; with fewer, the three ranks share
/// cuda:0 and meet in host memory: everything but the all-reduce itself is the same code.
#[test]
fn tensor_parallel_ranks_on_gpus_give_one_ranks_logits() {
    if !gpu_on() {
        eprintln!("skipped: set AWQ_GPU_TESTS=1 and AWQ_SMOLLM2_AWQ_DIR on a GPU machine");
        return;
    }
    let model = model_dir("AWQ_SMOLLM2_AWQ_DIR");
    let ck = Checkpoint::open(&model).expect("checkpoint");
    let (block_size, n_blocks, max_model_len, tp) = (16, 64, 256, 3);
    let devices: Vec<Device> = match awq_kernels::cuda::device_count() {
        n if n >= tp => (0..tp).map(Device::Cuda).collect(),
        _ => vec![Device::Cuda(0)],
    };
    let mut one = ModelRunner::load(&ck, &[Device::Cuda(0)], 1, block_size, n_blocks).expect("one rank on cuda:0");
    let mut ranks = ModelRunner::load(&ck, &devices, tp, block_size, n_blocks).expect("3 ranks");
    ranks.enable_decode_graphs(max_model_len, 8).expect("graphs");
    assert_eq!(ranks.tp(), tp);
    let vocab = one.vocab_size() as u32;
    let mut seqs: Vec<Decoding> = (0..4)
        .map(|s| Decoding {
            tokens: (0..9 + 11 * s).map(|i| ((i * 7919 + s * 104729 + 3) as u32) % vocab).collect(),
            table: (0..8).map(|b| BlockId((b * 4 + s) as u32)).collect(),
        })
        .collect();
    let (mut worst, mut near_ties) = (0f64, 0);
    for round in 0..24 {
        let all: Vec<(usize, &Decoding)> = seqs.iter().enumerate().collect();
        let plan = step_plan(&all, round == 0);
        let (a, b) = (one.execute(&plan).expect("one rank"), ranks.execute(&plan).expect("3 ranks"));
        let mut next = Vec::new();
        for (i, (sa, sb)) in a.seqs.iter().zip(&b.seqs).enumerate() {
            let (ra, rb) = (a.row(sa.sample_row.expect("row")), b.row(sb.sample_row.expect("row")));
            let rel = relative_difference(ra, rb);
            worst = worst.max(rel);
            // Each rank rounds its partial o_proj and down_proj outputs to f16 before they are
            // added (in f32), where one rank rounds their sum once: three roundings of parts that
            // may be larger than the sum, 60 times over. Seen on an H100: 5.3e-3 at worst.
            assert!(rel < 1e-2, "round {round}, sequence {i}: 3 ranks' logits off one rank's by {rel:.2e}");
            let (top, second) = top_two(ra);
            if ra[top as usize] - ra[second as usize] >= MARGIN {
                assert_eq!(argmax(rb), top, "round {round}, sequence {i}: another greedy token");
            } else {
                near_ties += 1;
            }
            next.push(top);
        }
        // Both runners decode one rank's tokens next.
        for (s, t) in seqs.iter_mut().zip(next) {
            s.tokens.push(t);
        }
    }
    let recorded = ranks.recorded_decode_steps();
    eprintln!(
        "3 ranks on {devices:?}: worst relative logit difference {worst:.2e}, {near_ties} near ties, {recorded} decode steps recorded"
    );
    match devices.len() {
        1 => assert_eq!(recorded, 0, "ranks that meet in host memory run their steps directly"),
        _ => assert_eq!(recorded, 1, "one graph for 4 rows at one context bucket, NCCL all-reduces inside"),
    }
}

/// The indices of the largest and the second largest value.
fn top_two(row: &[f32]) -> (u32, u32) {
    let top = argmax(row);
    let second = row
        .iter()
        .enumerate()
        .filter(|&(i, _)| i as u32 != top)
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best })
        .0 as u32;
    (top, second)
}
