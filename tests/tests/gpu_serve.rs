//! The serving engine on a GPU against the CPU engine (whose tokens `serve_engine.rs` checks against
//! the numpy reference): greedy decoding of SmolLM2-135M, fp16 and AWQ (INT4 on the GPU through the
//! W4A16 kernels), several prompts at once, gives the CPU engine's tokens. The GPU computes in f16
//! and the CPU in f32, so a divergence is accepted only at a step where the CPU's top two tokens
//! are within [`MARGIN`] nats of each other (the margin rule of `serve_engine.rs`, read from the
//! CPU engine's own top-2 logprobs); after it the sequences differ legitimately. The test prints
//! where each prompt diverged, if it did.
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
use awq_serve::sampling::{RawSamplingParams, SamplingParams};

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

/// Each prompt's greedy tokens and, per step, the top-2 logprobs, all prompts submitted at once.
fn generate(model: &PathBuf, device: Device, prompts: &[Vec<u32>]) -> Vec<Vec<(u32, Vec<f32>)>> {
    let config = EngineConfig {
        devices: vec![device],
        max_model_len: Some(1024),
        kv_cache_bytes: Some(256 << 20),
        ..EngineConfig::new(model)
    };
    let engine = EngineHandle::start(config).unwrap_or_else(|e| panic!("{} on {device}: {e}", model.display()));
    let params = SamplingParams::new(RawSamplingParams {
        temperature: Some(0.0),
        max_tokens: Some(MAX_NEW as i64),
        ignore_eos: true,
        logprobs: true,
        top_logprobs: Some(2),
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
    let cpu = generate(model, Device::Cpu, &prompts);
    let gpu = generate(model, Device::Cuda(0), &prompts);
    let mut exact = 0;
    for ((prompt, c), g) in PROMPTS.iter().zip(&cpu).zip(&gpu) {
        match c.iter().zip(g).position(|(a, b)| a.0 != b.0) {
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
        let first = c.iter().zip(g).take_while(|(a, b)| a.0 == b.0).count().min(8);
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
