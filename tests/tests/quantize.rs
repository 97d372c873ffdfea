//! `awq quantize` end to end: the AutoAWQ GEMM checkpoints it writes, read back by independent
//! implementations of the format, and its refusals.
//!
//! - An independent reader in Python (`tests/py/awq_dequant.py`, numpy only, written from the format
//!   rules) checks every tensor name, dtype and shape and the quantization_config, dequantizes the
//!   checkpoint to plain float16, and check-model.py scores that; `awq eval ppl` on the AWQ
//!   checkpoint must agree. So our writer and our loader agree with a third party on the format.
//! - An independent unpacker and quantizer in this file: RTN codes, zeros and scales are exactly
//!   AutoAWQ's formula applied to the original weights.
//! - Same job, same bytes: twice, from a sharded source, and through the shard writer.
//! - SmolLM2-135M: AWQ beats RTN on Pride and Prejudice, and both lose to the float16 model.
//! - Bad requests fail with a message that says what to change, and leave nothing behind.
//!
//! Synthetic models use a byte-level tokenizer (one token per byte), so calibration uses short rows
//! (`--seqlen 64`) from a file of short lines cut from [`ENGLISH_SAMPLE`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use awq_e2e::*;
use awq_kernels::{f16, DType};
use awq_model::safetensors::{self, RawTensor, SafetensorsFile, StDtype};
use awq_model::synthetic::{write_checkpoint, SyntheticSpec};
use serde_json::{json, Value};

/// Window length for perplexity on synthetic models (as in synthetic.rs: the sample's 2493 bytes
/// leave a short last window).
const CTX: usize = 300;
/// Calibration rows of 64 tokens (bytes) from at most 16 lines of at most 60 bytes.
const SEQLEN: usize = 64;
const N_SAMPLES: usize = 16;

/// A tiny Llama (hidden 128, intermediate 256, 3 blocks, GQA 4/2).
fn llama() -> SyntheticSpec {
    SyntheticSpec { seed: 21, ..SyntheticSpec::tiny_llama() }
}

/// A tiny Qwen2: biases on q, k and v, one kv head; intermediate 384 is a multiple of 128, 64 and
/// 32, so every group size applies.
fn qwen2() -> SyntheticSpec {
    SyntheticSpec { seed: 22, ..SyntheticSpec::tiny_qwen2() }
}

/// A tiny Qwen3: per-head q/k norms (kept float16, never scaled), heads of 64 in a hidden size of
/// 128, no biases.
fn qwen3() -> SyntheticSpec {
    SyntheticSpec { seed: 23, ..SyntheticSpec::tiny_qwen3() }
}

/// A tiny Phi-3: q|k|v and gate|up stored fused (written fused: `qkv_proj.qweight`, ...), as many
/// KV heads as heads, so that AWQ's v -> o group applies.
fn phi3() -> SyntheticSpec {
    SyntheticSpec { seed: 24, ..SyntheticSpec::tiny_phi3() }
}

/// A tiny Gemma 3: `1 + w` norms (two of them scaled by AWQ, four not), output norms, sliding and
/// full blocks, 4 heads of 64 over 2 KV heads, tied embeddings.
fn gemma3() -> SyntheticSpec {
    SyntheticSpec { seed: 25, ..SyntheticSpec::tiny_gemma3() }
}

/// A tiny Mixtral: every block a mixture of 4 experts (w1, w3, w2 of width 128), 2 per token.
fn mixtral() -> SyntheticSpec {
    SyntheticSpec { seed: 26, ..SyntheticSpec::tiny_mixtral() }
}

/// A tiny Qwen3-MoE: blocks dense, sparse (8 experts of width 64), dense.
fn qwen3_moe() -> SyntheticSpec {
    SyntheticSpec { seed: 27, ..SyntheticSpec::tiny_qwen3_moe() }
}

/// The linears of a Llama-family block, by their Hugging Face module names (spelled out here, not
/// taken from the architecture descriptors).
const LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Writes `spec` into `dir/name` and returns the folder.
fn synthetic(dir: &Path, name: &str, spec: &SyntheticSpec) -> PathBuf {
    let model = dir.join(name);
    write_checkpoint(&model, spec).unwrap_or_else(|e| panic!("cannot write {spec:?}: {e}"));
    model
}

/// Writes `dir/calib.txt`: [`ENGLISH_SAMPLE`]'s words in lines of at most 60 bytes, no blank lines
/// (so each line is one calibration text, shorter than [`SEQLEN`] tokens).
fn write_calib(dir: &Path) -> PathBuf {
    let mut lines: Vec<String> = vec![String::new()];
    for word in ENGLISH_SAMPLE.split_whitespace() {
        let last = lines.last_mut().expect("never empty");
        if !last.is_empty() && last.len() + 1 + word.len() > 60 {
            lines.push(word.to_string());
        } else {
            if !last.is_empty() {
                last.push(' ');
            }
            last.push_str(word);
        }
    }
    assert!(lines.len() >= 40 && lines.iter().all(|l| l.len() <= 60 || !l.contains(' ')));
    let path = dir.join("calib.txt");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path
}

/// `awq quantize MODEL -o OUT --json --calib CALIB --seqlen 64 --n-samples 16 EXTRA...`, parsed.
fn quantize(model: &Path, out: &Path, calib: &Path, extra: &[&str]) -> Value {
    let mut args: Vec<String> = vec!["quantize".into(), path_arg(model), "-o".into(), path_arg(out), "--json".into()];
    args.extend(["--calib".into(), path_arg(calib), "--seqlen".into(), SEQLEN.to_string()]);
    args.extend(["--n-samples".into(), N_SAMPLES.to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let stdout = awq_ok(&args);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("awq {} printed no JSON ({e}): {stdout}", args.join(" ")))
}

fn path_arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Runs `tests/py/awq_dequant.py AWQ_DIR OUT_DIR` with the reference Python.
fn run_dequant(awq_dir: &Path, out_dir: &Path) -> std::process::Output {
    let script = repo_root().join("tests").join("py").join("awq_dequant.py");
    let mut cmd = Command::new(reference_python());
    cmd.arg(&script).arg(awq_dir).arg(out_dir);
    cmd.output().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// [`run_dequant`], asserting success.
fn dequant_ok(awq_dir: &Path, out_dir: &Path) {
    let out = run_dequant(awq_dir, out_dir);
    assert!(
        out.status.success(),
        "awq_dequant.py {} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        awq_dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// [`run_dequant`], asserting it refuses the checkpoint with a message containing `expected`.
fn dequant_refuses(awq_dir: &Path, out_dir: &Path, expected: &str) {
    let out = run_dequant(awq_dir, out_dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "awq_dequant.py should refuse {}: {stderr}", awq_dir.display());
    assert!(stderr.contains(expected), "expected {expected:?} in awq_dequant.py's message:\n{stderr}");
}

// ---------------------------------------------------------------------------------------------
// 1. The independent Python reader agrees with `awq eval ppl`.
// ---------------------------------------------------------------------------------------------

/// Quantizes `spec` with `flags`, checks the output folder's files, dequantizes it with
/// awq_dequant.py and asserts that check-model.py on the result and `awq eval ppl` on the AWQ
/// checkpoint agree to 1e-4 relative.
fn python_reader_agrees(spec: SyntheticSpec, flags: &[&str]) {
    let s = scratch();
    let model = synthetic(s.path(), "model", &spec);
    let (calib, text) = (write_calib(s.path()), write_sample_text(s.path()));
    let awq_dir = s.path().join("awq");
    let summary = quantize(&model, &awq_dir, &calib, flags);

    let rtn = flags.windows(2).any(|w| w == ["--method", "rtn"]);
    let report = if rtn { "rtn_report.json" } else { "awq_report.json" };
    let names = file_names(&awq_dir);
    for expected in ["config.json", "tokenizer.json", "tokenizer_config.json", report] {
        assert!(names.iter().any(|n| n == expected), "{expected} is not in the output: {names:?}");
    }
    assert_eq!(leftovers(s.path(), "awq"), Vec::<String>::new(), "working folders left after a successful run");
    let sharded = names.iter().any(|n| n == "model.safetensors.index.json");
    assert!(sharded || names.iter().any(|n| n == "model.safetensors"), "no weights in the output: {names:?}");
    let report_json: Value = serde_json::from_slice(&std::fs::read(awq_dir.join(report)).expect("report readable"))
        .unwrap_or_else(|e| panic!("{report} is not JSON: {e}"));
    assert_eq!(report_json, summary["report"], "{report} and --json print different reports");

    let plain = s.path().join("dequantized");
    dequant_ok(&awq_dir, &plain);
    let reference = check_model(&plain, &text, ENGLISH_SAMPLE.len(), CTX);
    let ours = awq_ppl_json(&awq_dir, &text, None, CTX);
    let original = awq_ppl_json(&model, &text, None, CTX);
    assert_eq!(json_usize(&ours, "tokens_scored"), reference.scored, "{ours}\n{reference:?}");
    let (ppl, ppl_fp16) = (json_f64(&ours, "perplexity"), json_f64(&original, "perplexity"));
    assert!(
        rel_diff(ppl, reference.ppl) < 1e-4,
        "{} {flags:?}: awq eval ppl {ppl} on the AWQ checkpoint, check-model.py {} on awq_dequant.py's float16 \
         (relative difference {:e}); float16 original {ppl_fp16}",
        spec.model_type,
        reference.ppl,
        rel_diff(ppl, reference.ppl)
    );
    eprintln!(
        "{} {flags:?}: awq eval ppl {ppl}, check-model.py {} (relative difference {:e}), float16 {ppl_fp16}",
        spec.model_type,
        reference.ppl,
        rel_diff(ppl, reference.ppl)
    );
    // Quantization did happen (and did not wreck the model).
    assert!(ppl != ppl_fp16 && rel_diff(ppl, ppl_fp16) < 0.5, "{flags:?}: quantized {ppl}, float16 {ppl_fp16}");
}

#[test]
fn python_reader_agrees_llama_awq_g128_zero_point() {
    python_reader_agrees(llama(), &["--group-size", "128"]);
}

#[test]
fn python_reader_agrees_llama_rtn_g32_symmetric() {
    python_reader_agrees(llama(), &["--method", "rtn", "--group-size", "32", "--no-zero-point"]);
}

#[test]
fn python_reader_agrees_qwen2_awq_g64_symmetric_sharded() {
    python_reader_agrees(qwen2(), &["--group-size", "64", "--no-zero-point", "--max-shard-size", "100000"]);
}

#[test]
fn python_reader_agrees_qwen2_rtn_g128_zero_point() {
    python_reader_agrees(qwen2(), &["--method", "rtn", "--group-size", "128"]);
}

#[test]
fn python_reader_agrees_qwen3_awq_g64_zero_point() {
    python_reader_agrees(qwen3(), &["--group-size", "64"]);
}

#[test]
fn python_reader_agrees_phi3_awq_g64_zero_point() {
    python_reader_agrees(phi3(), &["--group-size", "64"]);
}

#[test]
fn python_reader_agrees_gemma3_awq_g64_zero_point() {
    python_reader_agrees(gemma3(), &["--group-size", "64"]);
}

#[test]
fn python_reader_agrees_mixtral_awq_g64_zero_point() {
    python_reader_agrees(mixtral(), &["--group-size", "64"]);
}

/// Routing is discontinuous: here one token of the quantized model has two experts with exactly
/// equal f32 router logits in check-model.py's numpy (experts 1 and 4 at token 1960, the 2nd and 3rd
/// largest), which our sums, added in another order, tell apart in their last bit. Each side then
/// routes that token to another expert, and the perplexities differ by 3.2e-5: inside the
/// tolerance, but far more than the 1e-7 of the other models here.
#[test]
fn python_reader_agrees_qwen3_moe_awq_g32_symmetric() {
    python_reader_agrees(qwen3_moe(), &["--group-size", "32", "--no-zero-point"]);
}

#[test]
fn python_reader_agrees_llama_awq_g32_zero_point_from_bf16() {
    python_reader_agrees(SyntheticSpec { dtype: DType::BF16, ..llama() }, &["--group-size", "32"]);
}

/// Rewrites `dir/model.safetensors` through `edit`, which gets every tensor.
fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut Vec<RawTensor>)) {
    let path = dir.join("model.safetensors");
    let mut tensors: Vec<RawTensor> = {
        let file = SafetensorsFile::open(&path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        file.tensors()
            .iter()
            .map(|(name, info)| RawTensor {
                name: name.clone(),
                dtype: info.dtype,
                shape: info.shape.clone(),
                data: file.bytes(name).expect("listed tensor").to_vec(),
            })
            .collect()
    };
    edit(&mut tensors);
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::write(&path, &tensors, &metadata).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// (name, dtype, shape) of every tensor of an output folder's one safetensors file.
fn output_tensors(dir: &Path) -> BTreeMap<String, (StDtype, Vec<usize>)> {
    let file = SafetensorsFile::open(dir.join("model.safetensors")).expect("the output opens");
    file.tensors().iter().map(|(name, info)| (name.clone(), (info.dtype, info.shape.clone()))).collect()
}

/// The AWQ checkpoints of a Mixtral and a Qwen3-MoE, tensor by tensor against names and shapes
/// spelled out here from transformers' modules: every expert's linears packed (I32 qweight and
/// qzeros, F16 scales; no float weight left), each router an F16 `.weight` holding the source's
/// bytes (never quantized, never scaled), Qwen3-MoE's dense blocks with their dense MLP, and
/// `modules_to_not_convert` naming the routers (`["gate"]`, AutoAWQ's for Mixtral; each router's
/// path for Qwen3-MoE, where `gate` would match `gate_proj`).
#[test]
fn moe_outputs_pack_every_expert_and_keep_the_routers_f16() {
    let s = scratch();
    let calib = write_calib(s.path());
    let packed = |i: usize, o: usize, g: usize| {
        [
            ("qweight", StDtype::I32, vec![i, o / 8]),
            ("qzeros", StDtype::I32, vec![i / g, o / 8]),
            ("scales", StDtype::F16, vec![i / g, o]),
        ]
    };
    // (spec, the router's module, the experts' module and linears, experts, width, sparse blocks,
    // modules_to_not_convert)
    let (mixtral_linears, qwen_linears) = (["w1", "w3", "w2"], ["gate_proj", "up_proj", "down_proj"]);
    let cases = [
        (mixtral(), "block_sparse_moe.gate", "block_sparse_moe.experts", mixtral_linears, 4, 128, vec![0, 1], json!(["gate"])),
        (qwen3_moe(), "mlp.gate", "mlp.experts", qwen_linears, 8, 64, vec![1], json!(["model.layers.1.mlp.gate"])),
    ];
    for (spec, router, experts, [gate, up, down], n_experts, width, sparse, not_convert) in cases {
        let model = synthetic(s.path(), spec.model_type, &spec);
        let out = s.path().join(format!("{}-awq", spec.model_type));
        quantize(&model, &out, &calib, &["--group-size", "64"]);
        let tensors = output_tensors(&out);
        let source = SafetensorsFile::open(model.join("model.safetensors")).expect("the source opens");
        let output = SafetensorsFile::open(out.join("model.safetensors")).expect("the output opens");
        let mut expected: BTreeMap<String, (StDtype, Vec<usize>)> = BTreeMap::new();
        let mut add = |name: String, dtype, shape: Vec<usize>| drop(expected.insert(name, (dtype, shape)));
        let h = 128;
        add("model.embed_tokens.weight".into(), StDtype::F16, vec![spec.vocab_size, h]);
        add("model.norm.weight".into(), StDtype::F16, vec![h]);
        add("lm_head.weight".into(), StDtype::F16, vec![spec.vocab_size, h]);
        for b in 0..spec.n_blocks {
            let p = format!("model.layers.{b}");
            for norm in ["input_layernorm", "post_attention_layernorm"] {
                add(format!("{p}.{norm}.weight"), StDtype::F16, vec![h]);
            }
            if spec.model_type == "qwen3_moe" {
                for norm in ["self_attn.q_norm", "self_attn.k_norm"] {
                    add(format!("{p}.{norm}.weight"), StDtype::F16, vec![64]);
                }
            }
            let hd = spec.head_dim.unwrap_or(32);
            let mut linears: Vec<(String, usize, usize)> = vec![
                (format!("{p}.self_attn.q_proj"), h, 4 * hd),
                (format!("{p}.self_attn.k_proj"), h, 2 * hd),
                (format!("{p}.self_attn.v_proj"), h, 2 * hd),
                (format!("{p}.self_attn.o_proj"), 4 * hd, h),
            ];
            if sparse.contains(&b) {
                add(format!("{p}.{router}.weight"), StDtype::F16, vec![n_experts, h]);
                for e in 0..n_experts {
                    linears.push((format!("{p}.{experts}.{e}.{gate}"), h, width));
                    linears.push((format!("{p}.{experts}.{e}.{up}"), h, width));
                    linears.push((format!("{p}.{experts}.{e}.{down}"), width, h));
                }
                let name = format!("{p}.{router}.weight");
                let (stored, original) = (output.bytes(&name).unwrap(), source.bytes(&name).unwrap());
                assert_eq!(stored, original, "{name}: the source's f16 bytes");
            } else {
                for (m, i, o) in [("gate_proj", h, 256), ("up_proj", h, 256), ("down_proj", 256, h)] {
                    linears.push((format!("{p}.mlp.{m}"), i, o));
                }
            }
            for (module, i, o) in linears {
                for (part, dtype, shape) in packed(i, o, 64) {
                    add(format!("{module}.{part}"), dtype, shape);
                }
            }
        }
        assert_eq!(tensors.len(), expected.len(), "{}: {} tensors", spec.model_type, tensors.len());
        for (name, want) in &expected {
            assert_eq!(tensors.get(name), Some(want), "{}: {name}", spec.model_type);
        }
        let config: Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["quantization_config"]["modules_to_not_convert"], not_convert, "{}", spec.model_type);
        assert_eq!(config["torch_dtype"], "float16");
    }
}

/// An expert no calibration token reaches (Qwen3-MoE's block 1 of 5 experts, its router edited so
/// that experts 0 and 1 score `+-50 x[0]`, 2 and 3 `+-50 x[1]`, and 4 zero: top-2 never picks 4):
/// AutoAWQ stops there; `awq quantize` finishes, names it in the report, and the output is a
/// working checkpoint that the Python reader and check-model.py score as `awq eval ppl` does.
#[test]
fn an_expert_no_calibration_token_reaches_is_reported_and_the_output_still_agrees() {
    let s = scratch();
    let spec = SyntheticSpec { n_experts: 5, ..qwen3_moe() };
    let model = synthetic(s.path(), "model", &spec);
    edit_tensors(&model, |tensors| {
        let router = tensors.iter_mut().find(|t| t.name == "model.layers.1.mlp.gate.weight").expect("the router");
        let mut values = vec![0.0f32; 5 * 128];
        for (e, sign) in [(0, 1.0), (1, -1.0), (2, 1.0), (3, -1.0)] {
            values[e * 128 + e / 2] = 50.0 * sign;
        }
        router.data = values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect();
    });
    let (calib, text) = (write_calib(s.path()), write_sample_text(s.path()));
    let awq_dir = s.path().join("awq");
    let summary = quantize(&model, &awq_dir, &calib, &["--group-size", "64"]);
    let blocks = summary["report"]["blocks"].as_array().expect("block reports");
    assert_eq!(blocks[1]["unrouted_experts"], json!([4]), "{}", blocks[1]);
    assert!(blocks[0].get("unrouted_experts").is_none() && blocks[2].get("unrouted_experts").is_none());
    let plain = s.path().join("dequantized");
    dequant_ok(&awq_dir, &plain);
    let reference = check_model(&plain, &text, ENGLISH_SAMPLE.len(), CTX);
    let ppl = json_f64(&awq_ppl_json(&awq_dir, &text, None, CTX), "perplexity");
    assert!(rel_diff(ppl, reference.ppl) < 1e-4, "awq eval ppl {ppl}, check-model.py {}", reference.ppl);
}

/// The reader's router rules: a MoE checkpoint whose `modules_to_not_convert` is null, leaves a
/// router out, or also matches quantized linears (a bare `gate` in Qwen3-MoE matches every
/// `gate_proj`) is refused naming it; so is a quantized router.
#[test]
fn python_reader_refuses_moe_checkpoints_that_misname_their_routers() {
    let s = scratch();
    let model = synthetic(s.path(), "model", &qwen3_moe());
    let calib = write_calib(s.path());
    let good = s.path().join("good");
    quantize(&model, &good, &calib, &["--method", "rtn", "--group-size", "64"]);
    dequant_ok(&good, &s.path().join("ok"));
    let cases: [(&str, Value, &str); 3] = [
        ("null", Value::Null, "modules_to_not_convert is null, but model.layers.1.mlp.gate is not quantized"),
        ("another block", json!(["model.layers.2.mlp.gate"]), "does not name the router model.layers.1.mlp.gate"),
        ("bare gate", json!(["gate"]), "model.layers.0.mlp.gate_proj: quantization_config.modules_to_not_convert"),
    ];
    for (k, (what, value, expected)) in cases.into_iter().enumerate() {
        let dir = s.path().join(format!("case{k}"));
        std::fs::create_dir(&dir).expect("fresh folder");
        for f in file_names(&good) {
            std::fs::copy(good.join(&f), dir.join(&f)).expect("copy");
        }
        edit_config(&dir, |c| c["quantization_config"]["modules_to_not_convert"] = value.clone());
        eprintln!("case: {what}");
        dequant_refuses(&dir, &s.path().join(format!("case{k}-out")), expected);
    }
    let dir = s.path().join("quantized-router");
    std::fs::create_dir(&dir).expect("fresh folder");
    for f in file_names(&good) {
        std::fs::copy(good.join(&f), dir.join(&f)).expect("copy");
    }
    let name = "model.layers.1.mlp.gate.qweight".to_string();
    edit_tensors(&dir, |t| t.push(RawTensor { name, dtype: StDtype::I32, shape: vec![128, 1], data: vec![0; 512] }));
    let expected = "model.layers.1.mlp.gate: the router must not be quantized";
    dequant_refuses(&dir, &s.path().join("quantized-router-out"), expected);
}

/// The Python reader is not a rubber stamp: each broken rule is refused with a message naming it.
#[test]
fn python_reader_refuses_broken_checkpoints() {
    let s = scratch();
    let model = synthetic(s.path(), "model", &llama());
    let calib = write_calib(s.path());
    let good = s.path().join("good");
    quantize(&model, &good, &calib, &["--method", "rtn", "--group-size", "128"]);
    dequant_ok(&good, &s.path().join("ok"));

    let copy_of_good = |name: &str| -> PathBuf {
        let dir = s.path().join(name);
        std::fs::create_dir(&dir).expect("fresh folder");
        for f in file_names(&good) {
            std::fs::copy(good.join(&f), dir.join(&f)).expect("copy");
        }
        dir
    };
    let q_proj = "model.layers.0.self_attn.q_proj";
    type Corrupt = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Corrupt, &str)> = vec![
        (
            "version",
            Box::new(|d| edit_config(d, |c| c["quantization_config"]["version"] = "gemv".into())),
            "quantization_config.version is 'gemv'",
        ),
        (
            "bits",
            Box::new(|d| edit_config(d, |c| c["quantization_config"]["bits"] = 8.into())),
            "quantization_config.bits is 8",
        ),
        ("no quantization_config", Box::new(|d| edit_config(d, |c| drop(c.remove("quantization_config")))), "no quantization_config"),
        (
            "group size that does not match the shapes",
            Box::new(|d| edit_config(d, |c| c["quantization_config"]["group_size"] = 64.into())),
            "model.layers.0.self_attn.q_proj.qzeros: shape [1, 16], expected [2, 16]",
        ),
        (
            "asymmetric zeros claimed symmetric",
            Box::new(|d| edit_config(d, |c| c["quantization_config"]["zero_point"] = false.into())),
            "every zero must be 8",
        ),
        (
            "leftover float weight",
            Box::new(move |d| {
                edit_tensors(d, |t| {
                    t.push(RawTensor { name: format!("{q_proj}.weight"), dtype: StDtype::F16, shape: vec![128, 128], data: vec![0; 128 * 128 * 2] })
                })
            }),
            "model.layers.0.self_attn.q_proj.weight: a quantized linear must not keep its float weight",
        ),
        (
            "scales in F32",
            Box::new(move |d| {
                edit_tensors(d, |t| {
                    let s = t.iter_mut().find(|t| t.name == format!("{q_proj}.scales")).expect("scales");
                    s.data = s.data.chunks_exact(2).flat_map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32().to_le_bytes()).collect();
                    s.dtype = StDtype::F32;
                })
            }),
            "model.layers.0.self_attn.q_proj.scales: dtype F32, expected F16",
        ),
        (
            "qweight transposed",
            Box::new(move |d| {
                edit_tensors(d, |t| {
                    let q = t.iter_mut().find(|t| t.name == format!("{q_proj}.qweight")).expect("qweight");
                    q.shape = vec![16, 128];
                })
            }),
            "model.layers.0.self_attn.q_proj.qweight: shape [16, 128], expected [128, 16]",
        ),
        (
            "missing qzeros",
            Box::new(move |d| edit_tensors(d, |t| t.retain(|t| t.name != format!("{q_proj}.qzeros")))),
            "missing tensor model.layers.0.self_attn.q_proj.qzeros",
        ),
        (
            "unexpected tensor",
            Box::new(|d| {
                edit_tensors(d, |t| {
                    t.push(RawTensor { name: "model.extra.weight".into(), dtype: StDtype::F16, shape: vec![2], data: vec![0; 4] })
                })
            }),
            "unexpected tensors: ['model.extra.weight']",
        ),
    ];
    for (k, (what, corrupt, expected)) in cases.iter().enumerate() {
        let dir = copy_of_good(&format!("case{k}"));
        corrupt(&dir);
        eprintln!("case: {what}");
        dequant_refuses(&dir, &s.path().join(format!("case{k}-out")), expected);
    }
}

// ---------------------------------------------------------------------------------------------
// 2. RTN codes, zeros and scales are exactly AutoAWQ's, by an unpacker and quantizer written here.
// ---------------------------------------------------------------------------------------------

/// AutoAWQ's nibble order: nibble k of an int32 holds output column 8c + ORDER[k].
const ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// Unpacks an I32 `[rows, cols / 8]` tensor into `rows x cols` nibbles (row-major).
fn unpack_nibbles(packed: &[i32], rows: usize, cols: usize) -> Vec<u8> {
    assert_eq!(packed.len(), rows * cols / 8, "packed length");
    let mut out = vec![0u8; rows * cols];
    for r in 0..rows {
        for c in 0..cols / 8 {
            let word = packed[r * cols / 8 + c] as u32;
            for (k, &o) in ORDER.iter().enumerate() {
                out[r * cols + 8 * c + o] = ((word >> (4 * k)) & 0xF) as u8;
            }
        }
    }
    out
}

/// AutoAWQ's `pseudo_quantize_tensor` for one group of f32 weights: (scale, zero, codes), codes
/// and zero already in the stored 0..16 range (symmetric ones shifted by 8).
fn autoawq_group(w: &[f32], zero_point: bool) -> (f32, u8, Vec<u8>) {
    if zero_point {
        let max = w.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let min = w.iter().copied().fold(f32::INFINITY, f32::min);
        let scale = (max - min).max(1e-5) / 15.0;
        let zero = (-(min / scale).round_ties_even()).clamp(0.0, 15.0);
        let codes = w.iter().map(|&v| ((v / scale).round_ties_even() + zero).clamp(0.0, 15.0) as u8).collect();
        (scale, zero as u8, codes)
    } else {
        let max = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = max.max(1e-5) / 7.0;
        let codes = w.iter().map(|&v| ((v / scale).round_ties_even().clamp(-8.0, 7.0) + 8.0) as u8).collect();
        (scale, 8, codes)
    }
}

/// Reads an F16 tensor's raw bits.
fn f16_bits(file: &SafetensorsFile, name: &str) -> Vec<u16> {
    let info = file.info(name).unwrap_or_else(|| panic!("{}: no tensor {name}", file.path().display()));
    assert_eq!(info.dtype, StDtype::F16, "{name}");
    file.bytes(name).expect("listed").chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect()
}

/// Quantizes `spec` with `--method rtn`, then for every linear of every block recomputes the codes,
/// zeros and scales from the source weights and compares them with what was written, exactly.
/// Everything else (embeddings, norms, biases, head) must be the source's float16 bytes.
fn rtn_matches_autoawq(spec: SyntheticSpec, group_size: usize, zero_point: bool) {
    assert_eq!(spec.dtype, DType::F16, "the pass-through check compares float16 bytes");
    let s = scratch();
    let model = synthetic(s.path(), "model", &spec);
    let calib = write_calib(s.path());
    let out = s.path().join("rtn");
    let g = group_size.to_string();
    let mut flags = vec!["--method", "rtn", "--group-size", &g];
    if !zero_point {
        flags.push("--no-zero-point");
    }
    quantize(&model, &out, &calib, &flags);
    let src = SafetensorsFile::open(model.join("model.safetensors")).expect("source opens");
    let dst = SafetensorsFile::open(out.join("model.safetensors")).expect("output opens");

    let mut checked = 0usize;
    let mut expected_names = Vec::new();
    for b in 0..spec.n_blocks {
        for lin in LINEARS {
            let m = format!("model.layers.{b}.{lin}");
            let info = src.info(&format!("{m}.weight")).expect("source weight");
            let (o, i) = (info.shape[0], info.shape[1]);
            let n_groups = i / group_size;
            let w: Vec<f32> = f16_bits(&src, &format!("{m}.weight")).into_iter().map(|b| f16::from_bits(b).to_f32()).collect();

            let qinfo = dst.info(&format!("{m}.qweight")).unwrap_or_else(|| panic!("no {m}.qweight"));
            assert_eq!((qinfo.dtype, qinfo.shape.clone()), (StDtype::I32, vec![i, o / 8]), "{m}.qweight");
            let zinfo = dst.info(&format!("{m}.qzeros")).unwrap_or_else(|| panic!("no {m}.qzeros"));
            assert_eq!((zinfo.dtype, zinfo.shape.clone()), (StDtype::I32, vec![n_groups, o / 8]), "{m}.qzeros");
            let q = unpack_nibbles(&dst.i32_values(&format!("{m}.qweight")).expect("I32"), i, o); // [in, out]
            let z = unpack_nibbles(&dst.i32_values(&format!("{m}.qzeros")).expect("I32"), n_groups, o); // [groups, out]
            let scales = f16_bits(&dst, &format!("{m}.scales")); // [groups, out]
            assert_eq!(dst.info(&format!("{m}.scales")).expect("scales").shape, vec![n_groups, o], "{m}.scales");

            let mut code_mismatches = Vec::new();
            for row in 0..o {
                for j in 0..n_groups {
                    let group = &w[row * i + j * group_size..row * i + (j + 1) * group_size];
                    let (scale, zero, codes) = autoawq_group(group, zero_point);
                    assert_eq!(
                        scales[j * o + row],
                        f16::from_f32(scale).to_bits(),
                        "{m}.scales[{j}, {row}]: stored {}, AutoAWQ's {scale} (f16 {})",
                        f16::from_bits(scales[j * o + row]),
                        f16::from_f32(scale)
                    );
                    assert_eq!(z[j * o + row], zero, "{m}.qzeros group {j}, output {row}");
                    for (k, &c) in codes.iter().enumerate() {
                        let input = j * group_size + k;
                        if q[input * o + row] != c {
                            code_mismatches.push(format!(
                                "output {row}, input {input}: stored {}, expected {c} (w {}, w/scale {}, zero {zero})",
                                q[input * o + row],
                                group[k],
                                group[k] / scale
                            ));
                        }
                    }
                }
            }
            assert!(
                code_mismatches.is_empty(),
                "{m}.qweight: {} of {} codes differ from AutoAWQ's; first: {:?}",
                code_mismatches.len(),
                o * i,
                &code_mismatches[..code_mismatches.len().min(5)]
            );
            checked += o * i;
            expected_names.extend(["qweight", "qzeros", "scales"].map(|t| format!("{m}.{t}")));
        }
    }
    assert!(checked > 0);

    // Everything that is not a quantized linear is the source's float16, bit for bit.
    for (name, info) in src.tensors() {
        if LINEARS.iter().any(|l| name.ends_with(&format!("{l}.weight"))) {
            assert!(dst.info(name).is_none(), "{name} is still in the output");
            continue;
        }
        assert_eq!(dst.info(name).map(|i| (i.dtype, i.shape.clone())), Some((info.dtype, info.shape.clone())), "{name}");
        assert!(dst.bytes(name).expect("listed") == src.bytes(name).expect("listed"), "{name} changed");
        expected_names.push(name.clone());
    }
    expected_names.sort();
    let written: Vec<String> = dst.tensors().keys().cloned().collect();
    assert_eq!(written, expected_names, "the output holds other tensors than expected");
}

#[test]
fn rtn_codes_zeros_and_scales_are_autoawq_s_llama_g32_zero_point() {
    rtn_matches_autoawq(llama(), 32, true);
}

#[test]
fn rtn_codes_zeros_and_scales_are_autoawq_s_qwen2_g64_symmetric() {
    rtn_matches_autoawq(qwen2(), 64, false);
}

#[test]
fn rtn_codes_zeros_and_scales_are_autoawq_s_qwen2_g128_zero_point() {
    rtn_matches_autoawq(qwen2(), 128, true);
}

// ---------------------------------------------------------------------------------------------
// 3. Same job, same bytes.
// ---------------------------------------------------------------------------------------------

#[test]
fn awq_is_deterministic_across_runs_source_sharding_and_output_sharding() {
    let s = scratch();
    let single = synthetic(s.path(), "single", &llama());
    let sharded = synthetic(s.path(), "sharded", &SyntheticSpec { shards: 3, ..llama() });
    assert!(sharded.join("model.safetensors.index.json").is_file() && !sharded.join("model.safetensors").exists());
    let (calib, text) = (write_calib(s.path()), write_sample_text(s.path()));
    let flags = ["--group-size", "64"];

    let (a, b, c) = (s.path().join("a"), s.path().join("b"), s.path().join("c"));
    let summary = quantize(&single, &a, &calib, &flags);
    quantize(&single, &b, &calib, &flags);
    assert_same_files(&a, &b);
    quantize(&sharded, &c, &calib, &flags);
    assert_same_files(&a, &c);
    // Nor does the number of threads (3 splits every parallel loop differently from this machine's
    // default).
    let threads = s.path().join("threads");
    let mut cmd = Command::new(awq_bin());
    cmd.args(["quantize", &path_arg(&single), "-o", &path_arg(&threads), "--json", "--calib", &path_arg(&calib)]);
    cmd.args(["--seqlen", &SEQLEN.to_string(), "--n-samples", &N_SAMPLES.to_string()]).args(flags);
    let run = cmd.env("RAYON_NUM_THREADS", "3").output().expect("awq starts");
    assert!(run.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&run.stderr));
    assert_same_files(&a, &threads);
    assert_eq!(
        file_names(&a),
        ["awq_report.json", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"],
        "output files"
    );
    let calibration = &summary["report"]["calibration"];
    assert_eq!(calibration["seqlen"], SEQLEN, "{summary}");
    assert!(calibration["rows"].as_u64().unwrap_or(0) >= 10, "16 lines of ~57 bytes make 14 rows of 64: {summary}");

    // Written in shards of at most 100 kB: the same tensors, and the same perplexity to the bit.
    let d = s.path().join("d");
    quantize(&single, &d, &calib, &["--group-size", "64", "--max-shard-size", "100000"]);
    let names = file_names(&d);
    let shards: Vec<&String> = names.iter().filter(|n| n.ends_with(".safetensors")).collect();
    let n = shards.len();
    assert!(n >= 2, "expected several shards: {names:?}");
    for (k, shard) in shards.iter().enumerate() {
        assert_eq!(**shard, format!("model-{:05}-of-{n:05}.safetensors", k + 1), "{names:?}");
    }
    assert!(names.iter().any(|n| n == "model.safetensors.index.json") && !names.iter().any(|n| n == "model.safetensors"));
    let index: Value = serde_json::from_slice(&std::fs::read(d.join("model.safetensors.index.json")).expect("index"))
        .expect("index is JSON");
    let whole = SafetensorsFile::open(a.join("model.safetensors")).expect("opens");
    let mut seen = 0;
    let mut total = 0u64;
    for shard in &shards {
        let file = SafetensorsFile::open(d.join(shard)).expect("shard opens");
        let bytes: usize = file.tensors().keys().map(|t| file.bytes(t).expect("listed").len()).sum();
        assert!(bytes <= 100_000 || file.tensors().len() == 1, "{shard} holds {bytes} bytes of tensors");
        for (name, info) in file.tensors() {
            assert_eq!(index["weight_map"][name], shard.as_str(), "index entry of {name}");
            let w = whole.info(name).unwrap_or_else(|| panic!("{name} is not in the single-file output"));
            assert_eq!((w.dtype, &w.shape), (info.dtype, &info.shape), "{name}");
            assert!(file.bytes(name).expect("listed") == whole.bytes(name).expect("listed"), "{name} differs");
            total += info.shape.iter().product::<usize>() as u64 * info.dtype.size_bytes() as u64;
            seen += 1;
        }
    }
    assert_eq!(seen, whole.tensors().len(), "the shards hold {seen} tensors, the single file {}", whole.tensors().len());
    assert_eq!(index["weight_map"].as_object().map(|m| m.len()), Some(seen), "index entries");
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total), "index total_size");
    for f in ["awq_report.json", "config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(std::fs::read(a.join(f)).expect("readable") == std::fs::read(d.join(f)).expect("readable"), "{f} differs");
    }
    let (ppl_single, ppl_sharded) = (awq_ppl_json(&a, &text, None, CTX), awq_ppl_json(&d, &text, None, CTX));
    assert_eq!(ppl_single["nll_sum"], ppl_sharded["nll_sum"], "single {ppl_single}\nsharded {ppl_sharded}");
    assert_eq!(ppl_single["tokens_scored"], ppl_sharded["tokens_scored"]);
}

// ---------------------------------------------------------------------------------------------
// 4. SmolLM2-135M: AWQ beats RTN.
// ---------------------------------------------------------------------------------------------

/// SmolLM2-135M's float16 perplexity on the first 1024 tokens of Pride and Prejudice
/// (smollm2.rs checks it against check-model.py).
const SMOLLM2_FP16_PPL_1024: f64 = 19.3366;

#[test]
fn smollm2_awq_beats_rtn_on_pride_and_prejudice() {
    let (model, text) = (smollm2_135m(), text_dir().join("austen").join("pride-and-prejudice.txt"));
    let s = scratch();
    awq_bin(); // build first, so the timings below are the quantization's alone
    let run = |name: &str, method: &str| -> (f64, f64) {
        let out = s.path().join(name);
        let start = Instant::now();
        let args = ["quantize", &path_arg(&model), "-o", &path_arg(&out), "--json"];
        let stdout = awq_ok(args.iter().copied().chain(["--method", method, "--group-size", "64", "--n-samples", "8"]));
        let quantize_seconds = start.elapsed().as_secs_f64();
        let summary: Value = serde_json::from_str(stdout.trim()).expect("--json prints JSON");
        let calibration = &summary["report"]["calibration"];
        if method == "awq" {
            assert_eq!(calibration["seqlen"], 512, "{calibration}");
            assert_eq!(calibration["samples_used"], 8, "{calibration}");
        }
        let report = awq_ppl_json(&out, &text, Some(1024), 512);
        assert_eq!(json_usize(&report, "tokens"), 1024, "{report}");
        let ppl = json_f64(&report, "perplexity");
        eprintln!(
            "SmolLM2-135M {method} g64: perplexity {ppl:.4}; quantize {quantize_seconds:.1} s wall, {:.1} s reported; calibration {calibration}",
            json_f64(&summary, "seconds")
        );
        (ppl, quantize_seconds)
    };
    let (awq, awq_seconds) = run("awq", "awq");
    let (rtn, rtn_seconds) = run("rtn", "rtn");
    eprintln!(
        "SmolLM2-135M on 1024 tokens: float16 {SMOLLM2_FP16_PPL_1024}, AWQ {awq:.4} ({awq_seconds:.1} s), RTN {rtn:.4} ({rtn_seconds:.1} s)"
    );
    assert!(awq < rtn, "AWQ {awq} should beat RTN {rtn}");
    assert!(awq > SMOLLM2_FP16_PPL_1024 && rtn > SMOLLM2_FP16_PPL_1024, "float16 {SMOLLM2_FP16_PPL_1024}, AWQ {awq}, RTN {rtn}");
}

// ---------------------------------------------------------------------------------------------
// 5. Refusals.
// ---------------------------------------------------------------------------------------------

/// Runs `awq quantize MODEL -o OUT --json ARGS...`, asserts it fails as a user error, that OUT's
/// folder has no writer leftovers, and returns stderr. (--json: no progress lines on stderr, so
/// the error is all there is, as [`awq_err`] wants.)
fn quantize_err(model: &Path, out: &Path, args: &[&str]) -> String {
    let mut all = vec!["quantize".to_string(), path_arg(model), "-o".into(), path_arg(out), "--json".into()];
    all.extend(args.iter().map(|a| a.to_string()));
    let stderr = awq_err(&all);
    let parent = out.parent().expect("output has a parent");
    let name = out.file_name().expect("output has a name").to_string_lossy().into_owned();
    assert_eq!(leftovers(parent, &name), Vec::<String>::new(), "temporary folders left after: {stderr}");
    stderr
}

fn assert_contains(stderr: &str, expected: &[&str]) {
    for e in expected {
        assert!(stderr.contains(e), "expected {e:?} in:\n{stderr}");
    }
}

/// Input features that are not a multiple of the group size: the error names the first tensor
/// that does not divide, and points at --group-size with a value that works.
#[test]
fn group_size_that_does_not_divide_is_refused_naming_the_tensor_and_the_flag() {
    let s = scratch();
    // Hidden 192 = 3 x 64, like SmolLM2's 576 = 9 x 64: 128 fails, 64 works.
    // Hidden 96 (4 heads of 24): 128 and 64 fail, only 32 works.
    for (hidden, bad, good) in [(192, &["128"][..], "64"), (96, &["128", "64"][..], "32")] {
        let spec = SyntheticSpec { hidden_size: hidden, intermediate_size: 2 * hidden, ..llama() };
        let model = synthetic(s.path(), &format!("h{hidden}"), &spec);
        let out = s.path().join(format!("out{hidden}"));
        for g in bad {
            let stderr = quantize_err(&model, &out, &["--method", "rtn", "--group-size", g]);
            let weight = format!("[{hidden}, {hidden}]");
            assert_contains(&stderr, &["model.layers.0.self_attn.q_proj.weight", &weight, g, "--group-size", good]);
            assert!(!out.exists());
        }
        awq_ok(["quantize", &path_arg(&model), "-o", &path_arg(&out), "--method", "rtn", "--group-size", good]);
    }
}

#[test]
fn unsupported_group_size_is_refused() {
    let s = scratch();
    let model = synthetic(s.path(), "model", &llama());
    // Refused while the flags are parsed, before anything starts: clap's usage error (exit 2).
    let out = s.path().join("out");
    let args = ["quantize".to_string(), path_arg(&model), "-o".into(), path_arg(&out), "--group-size".into(), "48".into()];
    let run = awq(&args);
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert_eq!(run.status.code(), Some(2), "expected a usage error:\n{stderr}");
    assert!(stderr.starts_with("error: ") && !stderr.contains("panicked"), "{stderr}");
    assert_contains(&stderr, &["--group-size", "48", "32", "64", "128"]);
    assert!(!out.exists());
}

/// An existing output is left alone without --overwrite, and replaced with it.
#[test]
fn existing_output_needs_overwrite() {
    let s = scratch();
    let model = synthetic(s.path(), "model", &llama());
    let out = s.path().join("out");
    std::fs::create_dir(&out).expect("fresh folder");
    std::fs::write(out.join("keep.txt"), "precious").expect("writable");
    let stderr = quantize_err(&model, &out, &["--method", "rtn"]);
    assert_contains(&stderr, &[&path_arg(&out), "exists", "overwrite"]);
    assert_eq!(file_names(&out), ["keep.txt"]);
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).expect("readable"), "precious");

    awq_ok(["quantize", &path_arg(&model), "-o", &path_arg(&out), "--method", "rtn", "--overwrite"]);
    assert!(!out.join("keep.txt").exists() && out.join("model.safetensors").is_file(), "{:?}", file_names(&out));
    assert_eq!(leftovers(s.path(), "out"), Vec::<String>::new());
}

/// A failure while writing (here: a source "tokenizer file" that is a folder, found only when it is
/// copied, after the tensors are written) removes the temporary folder and leaves an existing
/// output as it was, even with --overwrite.
#[test]
fn failure_while_writing_leaves_no_temporary_folder() {
    let s = scratch();
    let model = synthetic(s.path(), "model", &llama());
    std::fs::create_dir(model.join("generation_config.json")).expect("fresh folder");
    let out = s.path().join("out");
    let stderr = quantize_err(&model, &out, &["--method", "rtn"]);
    assert_contains(&stderr, &["generation_config.json"]);
    assert!(!out.exists(), "{:?}", file_names(s.path()));

    std::fs::create_dir(&out).expect("fresh folder");
    std::fs::write(out.join("keep.txt"), "precious").expect("writable");
    quantize_err(&model, &out, &["--method", "rtn", "--overwrite"]);
    assert_eq!(file_names(&out), ["keep.txt"]);
}

#[test]
fn bad_calibration_files_are_refused() {
    let s = scratch();
    let model = synthetic(s.path(), "model", &llama());
    let out = s.path().join("out");
    let with_calib = |calib: &Path| -> Vec<String> {
        ["--calib", &path_arg(calib), "--seqlen", "64", "--n-samples", "16"].map(String::from).to_vec()
    };
    let err = |calib: &Path| -> String {
        let args = with_calib(calib);
        quantize_err(&model, &out, &args.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // Missing file.
    let missing = s.path().join("no-such-file.txt");
    let stderr = err(&missing);
    assert_contains(&stderr, &[&path_arg(&missing)]);

    // JSON Lines with a line that has no "text".
    let jsonl = s.path().join("calib.jsonl");
    std::fs::write(&jsonl, "{\"text\": \"The lighthouse keeper rose before dawn.\"}\n\n{\"content\": \"no text here\"}\n")
        .expect("writable");
    let stderr = err(&jsonl);
    assert_contains(&stderr, &[&path_arg(&jsonl), "line 3", "\"text\""]);

    // Too little text for one row of 64 tokens (bytes).
    let small = s.path().join("small.txt");
    std::fs::write(&small, "Too short.\nAlso short.\n").expect("writable");
    let stderr = err(&small);
    assert_contains(&stderr, &["not one row of 64 tokens"]);

    // Every text longer than a row: all skipped.
    let long = s.path().join("long.txt");
    std::fs::write(&long, "x".repeat(100) + "\n" + &"y".repeat(100) + "\n").expect("writable");
    let stderr = err(&long);
    assert_contains(&stderr, &["2 longer than 64 tokens skipped", "not one row"]);
    assert!(!out.exists());
}

#[test]
fn quantized_checkpoint_is_not_quantized_again() {
    let s = scratch();
    let model = synthetic(s.path(), "model", &llama());
    let once = s.path().join("once");
    awq_ok(["quantize", &path_arg(&model), "-o", &path_arg(&once), "--method", "rtn"]);
    let twice = s.path().join("twice");
    let stderr = quantize_err(&once, &twice, &["--method", "rtn"]);
    assert_contains(&stderr, &[&path_arg(&once), "already"]);
    assert!(!twice.exists());
}
