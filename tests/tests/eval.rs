//! `awq eval ppl` and `awq eval kl` on SmolLM2-135M, float16 and an AWQ GEMM checkpoint of it, both
//! computed on the serving engine's model runner.
//!
//! - ppl equals the perplexity of the implementation it replaced (awq_worker's `perplexity`: every
//!   window whole through `block_forward`, a block's weights at a time; rebuilt here as
//!   [`block_forward_nll`]) within 1e-4 relative. The 1500 tokens make 3 windows of 512 (the last
//!   one short, 476) and SmolLM2's steps hold 1365 positions, so two windows share a step and the
//!   third is cut across two. smollm2.rs and quantize.rs compare `awq eval ppl` with check-model.py.
//! - kl: a model against itself gives exactly 0 at every token; the AWQ checkpoint against its
//!   float16 original a small positive divergence, and both perplexities equal `awq eval ppl`'s
//!   (same windows, same step plans: the same numbers to the bit).
//! - kl refuses two models whose vocabularies differ, naming both.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use awq_e2e::*;
use awq_kernels::{ops, DType};
use awq_model::synthetic::{write_checkpoint, SyntheticSpec};
use awq_model::{Checkpoint, Tokenizer};
use awq_worker::forward::{block_forward, BlockShape};
use awq_worker::Windows;
use serde_json::Value;

const MAX_TOKENS: usize = 1500;
const CTX: usize = 512;

fn pride_and_prejudice() -> PathBuf {
    text_dir().join("austen").join("pride-and-prejudice.txt")
}

fn path_arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// An AWQ GEMM checkpoint of SmolLM2-135M, written once per test process into target/e2e-eval/.
/// RTN (group size 64) writes the same AutoAWQ GEMM format as AWQ in seconds; the format and the
/// runner's reading of it are what is under test here, quantize.rs measures AWQ's quality.
fn smollm2_awq() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = repo_root().join("target").join("e2e-eval").join("smollm2-135m-rtn-g64");
        let model = smollm2_135m();
        let args = ["quantize", &path_arg(&model), "-o", &path_arg(&out), "--method", "rtn", "--group-size", "64"];
        awq_ok(args.iter().copied().chain(["--overwrite", "--json"]));
        out
    })
}

/// `awq eval ppl MODEL --text pride-and-prejudice.txt --max-tokens MAX_TOKENS --ctx CTX --json` for
/// the float16 model (`awq = false`) or the AWQ one, run once per process (the ppl and kl tests
/// both compare with it) with its wall time in seconds.
fn ppl_json(awq: bool) -> &'static (Value, f64) {
    static RESULTS: [OnceLock<(Value, f64)>; 2] = [OnceLock::new(), OnceLock::new()];
    RESULTS[awq as usize].get_or_init(|| {
        let model = if awq { smollm2_awq().to_path_buf() } else { smollm2_135m() };
        let start = Instant::now();
        let ppl = awq_ppl_json(&model, &pride_and_prejudice(), Some(MAX_TOKENS), CTX);
        (ppl, start.elapsed().as_secs_f64())
    })
}

/// The NLL sum and the scored tokens of `model` over the first `max_tokens` tokens of `text` in
/// windows of `ctx`, as awq_worker's streamed `perplexity` computed it before `awq eval ppl` moved
/// to the model runner: each window whole through `block_forward` (causal attention over the
/// window, no KV cache), the final norm, the LM head on the scored rows, `ops::nll_sum`.
fn block_forward_nll(model: &Path, text: &Path, max_tokens: usize, ctx: usize) -> (f64, usize) {
    let ck = Checkpoint::open(model).unwrap_or_else(|e| panic!("{}: {e}", model.display()));
    let tokenizer = Tokenizer::from_dir(model, ck.config()).expect("tokenizer");
    let mut ids = tokenizer.encode(&std::fs::read_to_string(text).expect("text")).expect("encodes");
    ids.truncate(max_tokens);
    let windows = Windows::new(&ids, ctx, tokenizer.bos()).expect("windows");
    let shape = BlockShape::of(&ck);
    let blocks: Vec<_> = (0..ck.n_blocks()).map(|b| ck.load_block(b).expect("block").into_dtype(DType::F32)).collect();
    let (embed, final_norm) = (ck.embed_tokens().expect("embeddings"), ck.final_norm().expect("norm"));
    let lm_head = ck.lm_head().expect("lm_head").into_dtype(DType::F32);
    let (mut nll, mut scored) = (0.0, 0);
    for (input, targets) in &windows.windows {
        let mut x = ops::embedding(&embed, input, DType::F32).expect("embedding");
        for w in &blocks {
            x = block_forward(&x, w, &shape, input.len(), false).expect("block_forward").0;
        }
        let x = ops::rms_norm(&x, &final_norm, shape.rms_norm_eps).expect("norm");
        let logits = ops::linear(&x.rows(0, targets.len()).expect("rows"), &lm_head, None).expect("lm_head");
        nll += ops::nll_sum(&logits, targets).expect("nll");
        scored += targets.len();
    }
    (nll, scored)
}

/// `awq eval kl QUANTIZED --reference REFERENCE --text TEXT --max-tokens N --ctx C --json`, parsed.
fn awq_kl_json(quantized: &Path, reference: &Path, text: &Path, max_tokens: usize, ctx: usize) -> Value {
    let args = [
        "eval".to_string(),
        "kl".into(),
        path_arg(quantized),
        "--reference".into(),
        path_arg(reference),
        "--text".into(),
        path_arg(text),
        "--max-tokens".into(),
        max_tokens.to_string(),
        "--ctx".into(),
        ctx.to_string(),
        "--json".into(),
    ];
    let stdout = awq_ok(&args);
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("awq {} printed no JSON ({e}): {stdout}", args.join(" ")))
}

/// `awq eval ppl` against the streamed `block_forward` perplexity, for one model.
fn check_ppl_against_block_forward(what: &str, awq: bool) {
    let (text, (ours, ours_seconds)) = (pride_and_prejudice(), ppl_json(awq));
    let model = if awq { smollm2_awq().to_path_buf() } else { smollm2_135m() };
    let start = Instant::now();
    let (nll, scored) = block_forward_nll(&model, &text, MAX_TOKENS, CTX);
    let reference_seconds = start.elapsed().as_secs_f64();
    assert_eq!(json_usize(ours, "tokens_scored"), scored, "{ours}");
    assert_eq!(json_usize(ours, "windows"), 3, "{ours}");
    let (ppl, want) = (json_f64(ours, "perplexity"), (nll / scored as f64).exp());
    eprintln!(
        "{what}: awq eval ppl {ppl:.6} ({ours_seconds:.1} s, binary), streamed block_forward {want:.6} \
         ({reference_seconds:.1} s, in process); relative difference {:e}",
        rel_diff(ppl, want)
    );
    // 1e-4: f32 sums in another order (paged attention's per-row dot products against
    // causal_attention's GEMMs, steps of several windows); the two agree far closer in practice.
    assert!(rel_diff(json_f64(ours, "nll_sum"), nll) < 1e-4, "{what}: nll {ours} vs {nll}");
    assert!(rel_diff(ppl, want) < 1e-4, "{what}: perplexity {ppl} vs {want}");
}

#[test]
fn ppl_on_the_model_runner_equals_the_streamed_block_forward_fp16() {
    check_ppl_against_block_forward("SmolLM2-135M float16", false);
}

#[test]
fn ppl_on_the_model_runner_equals_the_streamed_block_forward_awq() {
    check_ppl_against_block_forward("SmolLM2-135M AWQ GEMM (RTN g64)", true);
}

#[test]
fn kl_of_a_model_against_itself_is_zero() {
    // Two windows (512 and 88 tokens) are enough for this one.
    let model = smollm2_135m();
    let kl = awq_kl_json(&model, &model, &pride_and_prejudice(), 600, CTX);
    assert_eq!(json_usize(&kl, "tokens_scored"), 599, "{kl}");
    // Two runners of one checkpoint compute the same logits, and equal rows give 0 term by term.
    for key in ["kl_mean", "kl_median", "kl_p99", "kl_max"] {
        assert!(json_f64(&kl, key).abs() < 1e-9, "{key}: {kl}");
    }
    assert_eq!(kl["quantized_nll_sum"], kl["reference_nll_sum"], "{kl}");
}

#[test]
fn kl_of_awq_against_fp16_is_small_and_reports_the_perplexities_of_ppl() {
    let (fp16, awq, text) = (smollm2_135m(), smollm2_awq(), pride_and_prejudice());
    let kl = awq_kl_json(awq, &fp16, &text, MAX_TOKENS, CTX);
    let (mean, median, p99, max) =
        (json_f64(&kl, "kl_mean"), json_f64(&kl, "kl_median"), json_f64(&kl, "kl_p99"), json_f64(&kl, "kl_max"));
    eprintln!(
        "SmolLM2-135M RTN g64 against float16, {} tokens: KL mean {mean:.5}, median {median:.5}, p99 {p99:.4}, max \
         {max:.4} nats; perplexity {:.4} vs {:.4}; {:.1} s ({:.0} tokens/s)",
        json_usize(&kl, "tokens_scored"),
        json_f64(&kl, "quantized_perplexity"),
        json_f64(&kl, "reference_perplexity"),
        json_f64(&kl, "seconds"),
        json_f64(&kl, "tokens_per_second"),
    );
    assert!(mean > 0.0 && mean < 0.5, "{kl}");
    assert!(0.0 < median && median <= p99 && p99 <= max, "{kl}");
    // The same windows in the same step plans as `awq eval ppl`: the same sums, to the bit.
    for (is_awq, key) in [(true, "quantized"), (false, "reference")] {
        let ppl = &ppl_json(is_awq).0;
        assert_eq!(kl[format!("{key}_nll_sum")], ppl["nll_sum"], "{key}: kl {kl}\nppl {ppl}");
        assert_eq!(kl[format!("{key}_perplexity")], ppl["perplexity"], "{key}: kl {kl}\nppl {ppl}");
    }
    assert!(json_f64(&kl, "quantized_perplexity") > json_f64(&kl, "reference_perplexity"), "{kl}");
}

#[test]
fn kl_refuses_models_with_different_vocabularies() {
    let s = scratch();
    let synthetic = s.path().join("synthetic");
    write_checkpoint(&synthetic, &SyntheticSpec::tiny_llama()).unwrap_or_else(|e| panic!("{e}"));
    let text = write_sample_text(s.path());
    let model = smollm2_135m();
    let args = ["eval", "kl", &path_arg(&synthetic), "--reference", &path_arg(&model), "--text", &path_arg(&text)];
    let stderr = awq_err(args);
    for expected in [path_arg(&synthetic), path_arg(&model), "one of 49152".into(), "the same tokenizer".into()] {
        assert!(stderr.contains(&expected), "expected {expected:?} in:\n{stderr}");
    }
}
