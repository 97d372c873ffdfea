//! The serving engine in process (`awq_serve::engine::EngineHandle`, CPU) against the numpy
//! reference: greedy decoding of SmolLM2-135M gives the tokens of `check-model.py MODEL --generate
//! PROMPT --max-new 32`, for the float16 checkpoint and for an AWQ GEMM checkpoint of it (the
//! engine reads it packed and dequantizes at load; the reference reads tests/py/awq_dequant.py's
//! float16 copy). The prompts run concurrently, so batching is under test too.
//!
//! The rule for a difference: the reference prints, per step, the margin between its top two
//! logits. Two correct f32 implementations may pick the other token only where that margin is tiny,
//! so a divergence is accepted only at a step whose reference margin is below [`MARGIN`]; after it
//! the sequences differ legitimately and are not compared further. The test prints where.
//!
//! Tensor parallelism: SmolLM2 has 9 heads and 3 KV heads; 3 ranks on CPU threads give the logits
//! of one rank within 1e-4 and the same greedy tokens.
//!
//! Architectures SmolLM2 does not cover run as tiny synthetic checkpoints (random weights,
//! byte-level tokenizer) under the same rule: Qwen3 (per-head q/k norms), Phi-3 (q|k|v and
//! gate|up stored fused), Gemma 3 (`1 + w` and output norms, sliding and full blocks), Mixtral and
//! Qwen3-MoE (mixtures of experts), on one rank and on two.

use std::path::Path;
use std::process::Command;

use awq_e2e::{awq_ok, reference_python, repo_root, scratch, shared_assets_dir, smollm2_135m};
use awq_kernels::Device;
use awq_model::synthetic::{write_checkpoint, SyntheticSpec};
use awq_model::{Checkpoint, Tokenizer};
use awq_serve::engine::{EngineConfig, EngineEvent, EngineHandle, GenerateRequest};
use awq_serve::kv_cache::BlockId;
use awq_serve::runner::ModelRunner;
use awq_serve::sampling::{RawSamplingParams, SamplingParams};
use awq_serve::scheduler::{ScheduledSeq, StepPlan};
use awq_serve::RequestId;
use serde_json::Value;

/// Below this reference margin (top-1 minus top-2 logit), another token is acceptable.
const MARGIN: f64 = 0.01;
const MAX_NEW: usize = 32;
const PROMPTS: &[&str] = &["The capital of France is", "It is a truth universally acknowledged that"];

/// `check-model.py MODEL --generate PROMPT --max-new N`: its JSON line (prompt_ids, ids, margins).
fn check_model_generate_json(model: &Path, prompt: &str, max_new: usize) -> Value {
    let mut cmd = Command::new(reference_python());
    cmd.arg(shared_assets_dir().join("check-model.py")).arg(model).args(["--generate", prompt]);
    cmd.args(["--max-new", &max_new.to_string()]);
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{cmd:?} failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("check-model.py printed no JSON ({e}): {stdout}"))
}

/// Greedy parameters for `MAX_NEW` tokens, EOS ignored (the reference does not stop).
fn greedy() -> SamplingParams {
    SamplingParams::new(RawSamplingParams {
        temperature: Some(0.0),
        max_tokens: Some(MAX_NEW as i64),
        ignore_eos: true,
        ..Default::default()
    })
    .expect("valid parameters")
}

/// The tokens of one greedy request on `engine`.
fn tokens_of(engine: &EngineHandle, prompt: Vec<u32>) -> Vec<u32> {
    let mut stream =
        engine.submit(GenerateRequest { prompt, params: greedy(), prompt_logprobs: None }).expect("submit");
    let mut tokens = Vec::new();
    while let Some(event) = stream.events.blocking_recv() {
        match event {
            EngineEvent::Tokens { tokens: t, .. } => tokens.extend(t.iter().map(|t| t.id)),
            EngineEvent::Finished { .. } => break,
            other => panic!("unexpected event {other:?}"),
        }
    }
    tokens
}

/// The engine's greedy tokens for every prompt (submitted together, `tp` ranks), and the reference's JSON.
fn generate_all(engine_model: &Path, reference_model: &Path, prompts: &[&str], tp: usize) -> Vec<(Vec<u32>, Value)> {
    engine_tokens(engine_model, references(reference_model, prompts), tp)
}

/// check-model.py's greedy decoding of every prompt, run as processes side by side (each about a
/// minute of numpy on SmolLM2, seconds on a tiny model).
fn references(reference_model: &Path, prompts: &[&str]) -> Vec<Value> {
    let references: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (model, prompt) = (reference_model.to_path_buf(), p.to_string());
            std::thread::spawn(move || check_model_generate_json(&model, &prompt, MAX_NEW))
        })
        .collect();
    references.into_iter().map(|h| h.join().expect("reference thread")).collect()
}

/// The engine's greedy tokens for the prompts of `references` (submitted together, `tp` ranks),
/// each with its reference.
fn engine_tokens(engine_model: &Path, references: Vec<Value>, tp: usize) -> Vec<(Vec<u32>, Value)> {
    let config = EngineConfig {
        tp,
        max_model_len: Some(512),
        kv_cache_bytes: Some(256 << 20),
        ..EngineConfig::new(engine_model)
    };
    let engine = EngineHandle::start(config).unwrap_or_else(|e| panic!("{}: {e}", engine_model.display()));
    let params = greedy();
    let streams: Vec<_> = references
        .iter()
        .map(|r| {
            let prompt: Vec<u32> =
                r["prompt_ids"].as_array().expect("prompt_ids").iter().map(|v| v.as_u64().unwrap() as u32).collect();
            engine.submit(GenerateRequest { prompt, params: params.clone(), prompt_logprobs: None }).expect("submit")
        })
        .collect();
    streams
        .into_iter()
        .zip(references)
        .map(|(mut stream, reference)| {
            let mut tokens = Vec::new();
            while let Some(event) = stream.events.blocking_recv() {
                match event {
                    EngineEvent::Tokens { tokens: t, .. } => tokens.extend(t.iter().map(|t| t.id)),
                    EngineEvent::Finished { .. } => break,
                    other => panic!("unexpected event {other:?}"),
                }
            }
            (tokens, reference)
        })
        .collect()
}

/// Compares under the margin rule (module docs); returns a line describing the comparison.
fn check(what: &str, prompt: &str, ours: &[u32], reference: &Value) -> String {
    let ids: Vec<u32> = reference["ids"].as_array().expect("ids").iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let margins: Vec<f64> =
        reference["margins"].as_array().expect("margins").iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(ours.len(), MAX_NEW, "{what} {prompt:?}: {} tokens generated", ours.len());
    match ours.iter().zip(&ids).position(|(a, b)| a != b) {
        None => format!("{what} {prompt:?}: all {MAX_NEW} tokens equal the reference"),
        Some(step) => {
            assert!(
                margins[step] < MARGIN,
                "{what} {prompt:?}: token {step} is {} where the reference chose {} with margin {} (>= {MARGIN})\n\
                 ours      {ours:?}\nreference {ids:?}",
                ours[step],
                ids[step],
                margins[step]
            );
            format!(
                "{what} {prompt:?}: equal up to step {step}, where the reference's margin is {} (< {MARGIN}); not compared after",
                margins[step]
            )
        }
    }
}

#[test]
fn smollm2_greedy_tokens_equal_check_model() {
    let model = smollm2_135m();
    for ((ours, reference), prompt) in generate_all(&model, &model, PROMPTS, 1).iter().zip(PROMPTS) {
        eprintln!("{}", check("float16", prompt, ours, reference));
    }
}

#[test]
fn smollm2_awq_greedy_tokens_equal_check_model_on_the_dequantized_copy() {
    let model = smollm2_135m();
    let s = scratch();
    let awq_dir = s.path().join("awq");
    let to_str = |p: &Path| p.to_string_lossy().into_owned();
    // RTN writes the same AutoAWQ GEMM format as AWQ, in seconds: the format is what is under test.
    awq_ok(["quantize", &to_str(&model), "-o", &to_str(&awq_dir), "--method", "rtn", "--group-size", "64", "--json"]);
    let plain = s.path().join("dequantized");
    let script = repo_root().join("tests").join("py").join("awq_dequant.py");
    let out = Command::new(reference_python()).arg(script).arg(&awq_dir).arg(&plain).output().expect("python starts");
    assert!(out.status.success(), "awq_dequant.py failed: {}", String::from_utf8_lossy(&out.stderr));
    let prompts = &PROMPTS[..1];
    for ((ours, reference), prompt) in generate_all(&awq_dir, &plain, prompts, 1).iter().zip(prompts) {
        eprintln!("{}", check("AWQ (RTN g64)", prompt, ours, reference));
    }
}

/// A tiny Qwen3 (per-head q/k norms, heads of 64 in a hidden size of 128): check-model.py's greedy
/// tokens on one rank and on two (each with two of the four query heads and one of the two KV heads,
/// the q/k norms replicated).
#[test]
fn synthetic_qwen3_greedy_tokens_equal_check_model_on_one_and_two_ranks() {
    let s = scratch();
    write_checkpoint(s.path(), &SyntheticSpec { seed: 15, ..SyntheticSpec::tiny_qwen3() }).expect("writes");
    for tp in [1, 2] {
        for ((ours, reference), prompt) in generate_all(s.path(), s.path(), PROMPTS, tp).iter().zip(PROMPTS) {
            eprintln!("{}", check(&format!("qwen3 tp={tp}"), prompt, ours, reference));
        }
    }
}

/// A tiny Phi-3 (q|k|v in one `qkv_proj`, gate|up in one `gate_up_proj`; 4 heads, 2 KV heads):
/// check-model.py's greedy tokens on one rank and on two (each with its rows of q, k, v, gate and
/// up, cut by role from the fused tensors).
#[test]
fn synthetic_phi3_greedy_tokens_equal_check_model_on_one_and_two_ranks() {
    let s = scratch();
    let spec = SyntheticSpec { seed: 17, n_kv_heads: 2, ..SyntheticSpec::tiny_phi3() };
    write_checkpoint(s.path(), &spec).expect("writes");
    for tp in [1, 2] {
        for ((ours, reference), prompt) in generate_all(s.path(), s.path(), PROMPTS, tp).iter().zip(PROMPTS) {
            eprintln!("{}", check(&format!("phi3 tp={tp}"), prompt, ours, reference));
        }
    }
}

/// A tiny Gemma 3 (blocks sliding / full / sliding with a window of 8 positions, shorter than
/// either prompt, and their own RoPE bases; 4 heads of 64, 2 KV heads; scaled embeddings and
/// scores; tied LM head): check-model.py's greedy tokens on one rank and on two (each with its KV
/// head, the norms replicated, the output norms after the all-reduce).
#[test]
fn synthetic_gemma3_greedy_tokens_equal_check_model_on_one_and_two_ranks() {
    let s = scratch();
    let spec = SyntheticSpec { seed: 19, ..SyntheticSpec::tiny_gemma3() };
    write_checkpoint(s.path(), &spec).expect("writes");
    // One reference for both rank counts.
    let references = references(s.path(), PROMPTS);
    for tp in [1, 2] {
        for ((ours, reference), prompt) in engine_tokens(s.path(), references.clone(), tp).iter().zip(PROMPTS) {
            eprintln!("{}", check(&format!("gemma3_text tp={tp}"), prompt, ours, reference));
        }
    }
}

/// Tiny mixtures of experts: Mixtral (every block, 4 experts, top-2 renormalised) and Qwen3-MoE
/// (dense, sparse, dense blocks; 8 experts, top-2 not renormalised): check-model.py's greedy tokens
/// on one rank and on two (each expert split like the dense MLP, the router replicated). Prompts
/// of many tokens run through the experts grouped (prefill), decodes one token each.
#[test]
fn synthetic_moe_greedy_tokens_equal_check_model_on_one_and_two_ranks() {
    for spec in [
        SyntheticSpec { seed: 33, ..SyntheticSpec::tiny_mixtral() },
        SyntheticSpec { seed: 34, ..SyntheticSpec::tiny_qwen3_moe() },
    ] {
        let s = scratch();
        write_checkpoint(s.path(), &spec).expect("writes");
        let references = references(s.path(), PROMPTS);
        for tp in [1, 2] {
            for ((ours, reference), prompt) in engine_tokens(s.path(), references.clone(), tp).iter().zip(PROMPTS) {
                eprintln!("{}", check(&format!("{} tp={tp}", spec.model_type), prompt, ours, reference));
            }
        }
    }
}

#[test]
fn smollm2_tensor_parallel_3_gives_the_logits_and_tokens_of_one_rank() {
    let model = smollm2_135m();
    let ck = Checkpoint::open(&model).expect("SmolLM2 opens");
    let tokenizer = Tokenizer::from_dir(&model, ck.config()).expect("tokenizer");
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| tokenizer.encode(p).expect("encodes")).collect();
    // Logits of every prompt position, through one rank and through three.
    let logits = |tp: usize| {
        let mut runner = ModelRunner::load(&ck, &[Device::Cpu], tp, 16, 4).expect("loads");
        let ids = &prompts[1];
        let seq = ScheduledSeq {
            id: RequestId(0),
            positions: 0..ids.len(),
            token_ids: ids.clone(),
            block_table: vec![BlockId(2), BlockId(0)],
            sample: false,
            prompt_logprob_positions: 0..ids.len(),
        };
        runner.execute(&StepPlan { seqs: vec![seq], n_tokens: ids.len(), preempted: vec![] }).expect("runs").logits
    };
    let (one, three) = (logits(1), logits(3));
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (a, b) in three.iter().zip(&one) {
        num += (*a as f64 - *b as f64).powi(2);
        den += (*b as f64).powi(2);
    }
    let e = (num / den).sqrt();
    assert!(e < 1e-4, "TP=3 logits against TP=1: relative error {e}");
    eprintln!("SmolLM2 TP=3 logits against TP=1: relative error {e:e}");

    let engine = |tp: usize| {
        let config =
            EngineConfig { tp, max_model_len: Some(512), kv_cache_bytes: Some(256 << 20), ..EngineConfig::new(&model) };
        EngineHandle::start(config).expect("engine starts")
    };
    let (e1, e3) = (engine(1), engine(3));
    for p in &prompts {
        assert_eq!(tokens_of(&e3, p.clone()), tokens_of(&e1, p.clone()), "prompt {p:?}");
    }
}
