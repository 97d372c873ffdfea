//! The import's tests, and the tiny models they build (which `gemma3.rs`' tests share).

use awq_kernels::rng::SplitMix64;

use super::super::fixture::{with_vocab, Gguf, Value as V};
use super::*;
use crate::safetensors::SafetensorsFile;
use crate::{Checkpoint, Tokenizer};

pub(in crate::gguf) const HIDDEN: usize = 64;
pub(in crate::gguf) const HEADS: usize = 4;
pub(in crate::gguf) const KV_HEADS: usize = 2;
pub(in crate::gguf) const HEAD_DIM: usize = 16;
pub(in crate::gguf) const FFN: usize = 96;
pub(in crate::gguf) const BLOCKS: usize = 2;
pub(in crate::gguf) const VOCAB: usize = 263;

/// llama.cpp's `LlamaModel.permute` (the forward direction), on f32 rows of `cols` values.
fn permute(w: &[f32], cols: usize, n_heads: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let (head_dim, half) = (rows / n_heads, rows / n_heads / 2);
    let mut out = vec![0.0; w.len()];
    for h in 0..n_heads {
        for i in 0..2 {
            for j in 0..half {
                let (hf, gguf) = (h * head_dim + i * half + j, h * head_dim + 2 * j + i);
                out[gguf * cols..(gguf + 1) * cols].copy_from_slice(&w[hf * cols..(hf + 1) * cols]);
            }
        }
    }
    out
}

/// Hugging Face tensors by name: shape and values.
pub(in crate::gguf) type HfTensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// config.json's `model_type` of a GGUF architecture.
pub(in crate::gguf) fn model_type(arch: &str) -> &str {
    if arch == "gemma3" {
        "gemma3_text"
    } else {
        arch
    }
}

/// A tiny model as llama.cpp's converter would write it (F32 tensors, Q/K permuted for llama,
/// 1 added to Gemma's norms), and the Hugging Face tensors it came from (values exact in f16;
/// Gemma's norms are the stored values less 1 in f32, as the reference converter computes
/// them). Qwen3's and Gemma 3's heads are twice as wide as `hidden / heads` (stated in
/// `attention.key_length`) and have q/k norms; Gemma 3's blocks also norm their sublayers'
/// outputs.
pub(in crate::gguf) fn tiny(arch: &str, tied: bool) -> (Gguf, HfTensors) {
    let mut g = with_vocab("smollm");
    let k = |s: &str| format!("{arch}.{s}");
    let head_norms = matches!(arch, "qwen3" | "gemma3");
    let head_dim = if head_norms { 2 * HEAD_DIM } else { HEAD_DIM };
    g.kv("general.architecture", V::Str(arch.into()))
        .kv("general.name", V::Str("Tiny".into()))
        .kv(&k("block_count"), V::U32(BLOCKS as u32))
        .kv(&k("context_length"), V::U32(2048))
        .kv(&k("embedding_length"), V::U32(HIDDEN as u32))
        .kv(&k("feed_forward_length"), V::U32(FFN as u32))
        .kv(&k("attention.head_count"), V::U32(HEADS as u32))
        .kv(&k("attention.head_count_kv"), V::U32(KV_HEADS as u32))
        .kv(&k("rope.freq_base"), V::F32(100000.0))
        .kv(&k("attention.layer_norm_rms_epsilon"), V::F32(1e-5))
        .kv(&k("rope.dimension_count"), V::U32(head_dim as u32));
    if head_dim != HEAD_DIM {
        g.kv(&k("attention.key_length"), V::U32(head_dim as u32))
            .kv(&k("attention.value_length"), V::U32(head_dim as u32));
    }
    if arch == "gemma3" {
        g.kv(&k("attention.sliding_window"), V::U32(4));
    }
    let mut rng = SplitMix64::new(7);
    let mut hf = BTreeMap::new();
    let mut add = |g: &mut Gguf, gguf: &str, hf_name: String, shape: Vec<usize>, heads: Option<usize>| {
        let n: usize = shape.iter().product();
        let mut values: Vec<f32> = (0..n).map(|_| f16::from_f32(rng.normal()).to_f32()).collect();
        let stored = match heads {
            Some(h) if arch == "llama" => permute(&values, n / shape[0], h),
            _ if arch == "gemma3" && gguf.ends_with("norm.weight") => {
                let stored: Vec<f32> = values.iter().map(|v| v + 1.0).collect();
                values = stored.iter().map(|s| s - 1.0).collect();
                stored
            }
            _ => values.clone(),
        };
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        g.tensor_f32(gguf, &dims, &stored);
        hf.insert(hf_name, (shape, values));
    };
    let d = descriptor_for(model_type(arch), Path::new("x")).unwrap();
    add(&mut g, "token_embd.weight", d.embed_tokens.into(), vec![VOCAB, HIDDEN], None);
    for b in 0..BLOCKS {
        add(&mut g, &format!("blk.{b}.attn_norm.weight"), d.norm_name(b, NormRole::Attn), vec![HIDDEN], None);
        add(&mut g, &format!("blk.{b}.ffn_norm.weight"), d.norm_name(b, NormRole::Mlp), vec![HIDDEN], None);
        if head_norms {
            for (stem, role) in [("attn_q_norm", NormRole::QHead), ("attn_k_norm", NormRole::KHead)] {
                add(&mut g, &format!("blk.{b}.{stem}.weight"), d.norm_name(b, role), vec![head_dim], None);
            }
        }
        if arch == "gemma3" {
            for (stem, role) in [("post_attention_norm", NormRole::AttnOut), ("post_ffw_norm", NormRole::MlpOut)] {
                add(&mut g, &format!("blk.{b}.{stem}.weight"), d.norm_name(b, role), vec![HIDDEN], None);
            }
        }
        let q = (HEADS * head_dim, Some(HEADS));
        let kv = (KV_HEADS * head_dim, Some(KV_HEADS));
        for (stem, role, out_dim, in_dim, heads) in [
            ("attn_q", LinearRole::Q, q.0, HIDDEN, q.1),
            ("attn_k", LinearRole::K, kv.0, HIDDEN, kv.1),
            ("attn_v", LinearRole::V, kv.0, HIDDEN, None),
            ("attn_output", LinearRole::O, HIDDEN, q.0, None),
            ("ffn_gate", LinearRole::Gate, FFN, HIDDEN, None),
            ("ffn_up", LinearRole::Up, FFN, HIDDEN, None),
            ("ffn_down", LinearRole::Down, HIDDEN, FFN, None),
        ] {
            add(&mut g, &format!("blk.{b}.{stem}.weight"), d.linear_name(b, role), vec![out_dim, in_dim], heads);
            if arch == "qwen2" && matches!(role, LinearRole::Q | LinearRole::K | LinearRole::V) {
                add(&mut g, &format!("blk.{b}.{stem}.bias"), d.bias_name(b, role), vec![out_dim], None);
            }
        }
    }
    add(&mut g, "output_norm.weight", d.final_norm.into(), vec![HIDDEN], None);
    if !tied {
        add(&mut g, "output.weight", d.lm_head.into(), vec![VOCAB, HIDDEN], None);
    }
    (g, hf)
}

pub(in crate::gguf) struct Imported {
    dir: tempfile::TempDir,
    pub result: Result<ImportReport>,
}

impl Imported {
    pub fn out(&self) -> std::path::PathBuf {
        self.dir.path().join("out")
    }
}

pub(in crate::gguf) fn import_with(g: &Gguf, dtype: DType) -> Imported {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    std::fs::write(&path, g.bytes()).unwrap();
    let options = ImportOptions { dtype, ..ImportOptions::default() };
    let result = import(&path, &dir.path().join("out"), &options);
    Imported { dir, result }
}

pub(in crate::gguf) fn import_err(g: &Gguf) -> Error {
    let r = import_with(g, DType::F16);
    assert!(!r.out().exists(), "a failed import leaves no output");
    r.result.expect_err("the import must fail")
}

/// Imports and checks every tensor against the Hugging Face original, bit for bit.
pub(in crate::gguf) fn check_round_trip(arch: &str, tied: bool, dtype: DType) -> Imported {
    let (g, hf) = tiny(arch, tied);
    let r = import_with(&g, dtype);
    let report = r.result.as_ref().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((report.architecture, report.n_blocks, report.n_tensors), (arch, BLOCKS, hf.len()));
    assert_eq!((report.tie_word_embeddings, report.n_tokens, report.dtype), (tied, VOCAB, dtype));
    assert_eq!(report.model_name.as_deref(), Some("Tiny"));
    let ck = Checkpoint::open(r.out()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ck.config().model_type, model_type(arch));
    let st = SafetensorsFile::open(r.out().join("model.safetensors")).unwrap();
    assert_eq!(st.tensors().len(), hf.len());
    for (name, (shape, values)) in &hf {
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((t.shape(), t.dtype()), (&shape[..], dtype), "{name}");
        let rounded = values.iter().map(|&v| match dtype {
            DType::F16 => f16::from_f32(v).to_f32(),
            DType::BF16 => bf16::from_f32(v).to_f32(),
            DType::F32 => v,
        });
        let got = t.to_f32_vec().unwrap();
        if let Some((i, (g, w))) = got.iter().zip(rounded).enumerate().find(|(_, (g, w))| g.to_bits() != w.to_bits()) {
            panic!("{name}: element {i} is {g}, expected {w}");
        }
    }
    r
}

#[test]
fn llama_round_trips_with_q_and_k_unpermuted() {
    let r = check_round_trip("llama", true, DType::F16);
    let config: Value = serde_json::from_slice(&std::fs::read(r.out().join("config.json")).unwrap()).unwrap();
    let want = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": BLOCKS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "rope_scaling": null, "max_position_embeddings": 2048,
        "vocab_size": VOCAB, "tie_word_embeddings": true, "bos_token_id": 260, "eos_token_id": 261,
        "pad_token_id": null, "torch_dtype": "float16", "initializer_range": 0.02, "attention_dropout": 0.0,
        "use_cache": true, "attention_bias": false, "mlp_bias": false, "pretraining_tp": 1,
    });
    assert_eq!(config, want);
    let generation: Value = serde_json::from_slice(&std::fs::read(r.out().join("generation_config.json")).unwrap()).unwrap();
    assert_eq!(generation, json!({"bos_token_id": 260, "eos_token_id": 261}));
    let ck = Checkpoint::open(r.out()).unwrap();
    let tok = Tokenizer::from_dir(&r.out(), ck.config()).unwrap();
    assert_eq!(tok.encode("<|im_start|> the").unwrap(), vec![260, 258]);
}

#[test]
fn qwen2_round_trips_untouched_with_biases_and_its_own_head() {
    let r = check_round_trip("qwen2", false, DType::F16);
    let ck = Checkpoint::open(r.out()).unwrap();
    assert!(!ck.config().tie_word_embeddings);
    let raw = &ck.config().raw;
    assert_eq!((raw["use_sliding_window"].as_bool(), raw["sliding_window"].as_u64()), (Some(false), Some(2048)));
}

#[test]
fn qwen3_round_trips_untouched_with_q_and_k_norms_and_its_head_dim() {
    let r = check_round_trip("qwen3", true, DType::F16);
    let ck = Checkpoint::open(r.out()).unwrap();
    assert_eq!((ck.config().head_dim, ck.config().q_dim()), (2 * HEAD_DIM, HEADS * 2 * HEAD_DIM));
    let raw = &ck.config().raw;
    assert_eq!((raw["attention_bias"].as_bool(), raw["use_sliding_window"].as_bool()), (Some(false), Some(false)));
    assert_eq!(raw["architectures"], json!(["Qwen3ForCausalLM"]));
    // The norms are part of a qwen3 block: a file without one is refused naming it.
    let (mut g, _) = tiny("qwen3", true);
    g.remove_tensor("blk.1.attn_k_norm.weight");
    let err = import_err(&g).to_string();
    let says = "tensor blk.1.attn_k_norm.weight is missing (it becomes model.layers.1.self_attn.k_norm.weight, \
                which a qwen3 model needs)";
    assert!(err.contains(says), "{err}");
}

#[test]
fn other_dtypes_round_to_nearest_even() {
    check_round_trip("llama", false, DType::BF16);
    check_round_trip("llama", true, DType::F32);
    // 1 + 2^-11 lies halfway between two f16 values and rounds to the even one, 1.0; 1 + 3 * 2^-11
    // rounds up to 1 + 2^-9.
    let mut out = [0u8; 4];
    assert_eq!(encode(&[1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11)], DType::F16, &mut out), None);
    assert_eq!(out, [f16::ONE.to_le_bytes(), f16::from_f32(1.0 + 2f32.powi(-9)).to_le_bytes()].concat()[..]);
}

#[test]
fn unpermute_inverts_llama_cpp_permute() {
    let w: Vec<f32> = (0..24 * 3).map(|i| i as f32).collect();
    let permuted = permute(&w, 3, 2);
    assert_ne!(permuted, w);
    // Head 0 holds rows 0..12; GGUF row 1 is HF row 6 (the first row of the second half).
    assert_eq!(&permuted[3..6], &w[18..21]);
    let bytes: Vec<u8> = permuted.iter().flat_map(|v| v.to_le_bytes()).collect();
    let back = unpermute_rows(&bytes, 24, 2);
    let back: Vec<f32> = back.chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(back, w);
}

#[test]
fn values_the_dtype_cannot_hold_name_the_tensor() {
    let (mut g, _) = tiny("llama", true);
    let t = g.tensors.iter_mut().find(|t| t.name == "blk.1.ffn_up.weight").unwrap();
    t.data[40..44].copy_from_slice(&1e6f32.to_le_bytes());
    let err = import_err(&g).to_string();
    assert!(err.ends_with("tiny.gguf: tensor blk.1.ffn_up.weight: element 10 is 1000000, which f16 cannot hold (import as f32 to keep every value)"), "{err}");
    let r = import_with(&g, DType::BF16);
    r.result.expect("bf16 holds 1e6");
}

#[test]
fn unsupported_architecture_is_named_with_the_supported_ones() {
    let (mut g, _) = tiny("llama", true);
    g.set("general.architecture", V::Str("gpt2".into()));
    let err = import_err(&g);
    assert!(matches!(err, Error::UnsupportedGgufArchitecture { ref architecture, .. } if architecture == "gpt2"));
    assert!(err.to_string().ends_with("tiny.gguf: general.architecture `gpt2` is not supported (supported: llama, qwen2, qwen3, gemma3)"), "{err}");
}

#[test]
fn tensors_that_do_not_fit_name_the_gguf_tensor() {
    let check = |edit: &dyn Fn(&mut Gguf), says: &str| {
        let (mut g, _) = tiny("llama", true);
        edit(&mut g);
        let err = import_err(&g).to_string();
        assert!(err.contains("tiny.gguf: ") && err.contains(says), "expected {says:?} in: {err}");
    };
    check(&|g| { g.remove_tensor("blk.1.ffn_gate.weight"); },
        "tensor blk.1.ffn_gate.weight is missing (it becomes model.layers.1.mlp.gate_proj.weight, which a llama model needs)");
    check(&|g| { g.remove_tensor("token_embd.weight"); }, "tensor token_embd.weight is missing");
    check(&|g| { g.tensor_f32("blk.0.attn_q_norm.weight", &[16], &[1.0; 16]); },
        "tensor blk.0.attn_q_norm.weight: no Hugging Face name for this tensor of a llama model");
    check(&|g| { g.tensor_f32("rope_freqs.weight", &[8], &[1.0; 8]); },
        "tensor rope_freqs.weight: RoPE frequency factors (Llama 3.1 rope scaling) are not supported");
    check(&|g| { g.tensor_f32("blk.2.attn_norm.weight", &[64], &[1.0; 64]); },
        "tensor blk.2.attn_norm.weight: model.layers.2.input_layernorm.weight is not part of a llama model with this metadata");
    check(&|g| { g.tensor_f32("blk.0.ffn_up.bias", &[96], &[1.0; 96]); },
        "tensor blk.0.ffn_up.bias: model.layers.0.mlp.up_proj.bias is not part of a llama model");
    check(&|g| { g.set("llama.feed_forward_length", V::U32(128)); },
        "tensor blk.0.ffn_gate.weight: shape [96, 64], but the metadata implies [128, 64] for model.layers.0.mlp.gate_proj.weight");
    check(&|g| {
        let t = g.tensors.iter_mut().find(|t| t.name == "blk.0.attn_v.weight").unwrap();
        t.type_id = GgmlType::IQ2_XXS.id();
        t.dims = vec![256, 4];
        t.data = vec![0; 4 * 66];
    }, "tensor blk.0.attn_v.weight: tensor type IQ2_XXS is not supported (supported: F32, F16, BF16, Q4_0");
}

#[test]
fn metadata_that_does_not_fit_names_the_key() {
    let check = |edit: &dyn Fn(&mut Gguf), key: &str, says: &str| {
        let (mut g, _) = tiny("llama", true);
        edit(&mut g);
        let err = import_err(&g);
        let msg = err.to_string();
        assert!(matches!(&err, Error::GgufKey { key: k, .. } if k == key), "expected key {key}: {msg}");
        assert!(msg.contains("tiny.gguf: ") && msg.contains(says), "expected {says:?} in: {msg}");
    };
    check(&|g| { g.remove_key("llama.block_count"); }, "llama.block_count", "required key is missing");
    check(&|g| { g.set("llama.attention.head_count_kv", V::U32(3)); }, "llama.attention.head_count_kv", "3 does not divide the 4 attention heads");
    check(&|g| { g.set("llama.rope.dimension_count", V::U32(8)); }, "llama.rope.dimension_count", "partial rotary embeddings are not supported");
    check(&|g| { g.kv("llama.rope.scaling.type", V::Str("yarn".into())); }, "llama.rope.scaling.type", "`yarn` is not supported (none, linear)");
    check(&|g| { g.set("llama.context_length", V::Str("long".into())); }, "llama.context_length", "expected a non-negative integer, found string \"long\"");
    check(&|g| { g.remove_key("general.architecture"); }, "general.architecture", "required key is missing");
}

#[test]
fn linear_rope_scaling_and_missing_kv_heads_follow_llama_cpp() {
    let (mut g, _) = tiny("llama", true);
    g.kv("llama.rope.scaling.type", V::Str("linear".into())).kv("llama.rope.scaling.factor", V::F32(4.0));
    g.remove_key("llama.attention.head_count_kv");
    // Without head_count_kv every head has its own K and V: the tensors must say so too.
    for t in g.tensors.iter_mut().filter(|t| t.name.contains("attn_k.") || t.name.contains("attn_v.")) {
        t.dims = vec![HIDDEN as u64, (HEADS * HEAD_DIM) as u64];
        t.data = vec![0; HIDDEN * HEADS * HEAD_DIM * 4];
    }
    let r = import_with(&g, DType::F16);
    r.result.as_ref().unwrap_or_else(|e| panic!("{e}"));
    let ck = Checkpoint::open(r.out()).unwrap();
    assert_eq!(ck.config().n_kv_heads, HEADS);
    assert_eq!(ck.config().rope_scaling, Some(crate::RopeScaling::Linear { factor: 4.0 }));
}

#[test]
fn existing_output_is_refused_before_any_work_unless_overwriting() {
    let (g, _) = tiny("llama", true);
    let r = import_with(&g, DType::F16);
    r.result.as_ref().unwrap();
    let path = r.dir.path().join("tiny.gguf");
    let err = import(&path, &r.out(), &ImportOptions::default()).unwrap_err().to_string();
    assert!(err.contains("output directory exists"), "{err}");
    let options = ImportOptions { overwrite: Overwrite::Replace, ..ImportOptions::default() };
    import(&path, &r.out(), &options).unwrap();
}

#[test]
fn same_file_same_bytes() {
    let (g, _) = tiny("qwen2", false);
    let (a, b) = (import_with(&g, DType::F16), import_with(&g, DType::F16));
    for name in ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(std::fs::read(a.out().join(name)).unwrap(), std::fs::read(b.out().join(name)).unwrap(), "{name}");
    }
}

#[test]
fn chunks_cover_quantized_tensors_of_many_chunks() {
    // 3 chunks and a bit of Q8_0 blocks: every element lands where a single pass puts it.
    let n_blocks = 3 * CHUNK_ELEMS / 32 + 5;
    let mut rng = SplitMix64::new(3);
    let mut data = Vec::new();
    for _ in 0..n_blocks {
        data.extend_from_slice(&f16::from_f32(rng.uniform(0.01, 1.0)).to_le_bytes());
        data.extend((0..32).map(|_| (rng.next_u64() & 0xFF) as u8));
    }
    let mut g = Gguf::new();
    g.tensor_raw("x", &[32, n_blocks as u64], GgmlType::Q8_0, &data);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("q.gguf"), g.bytes()).unwrap();
    let file = GgufFile::open(dir.path().join("q.gguf")).unwrap();
    let t = &file.tensors()[0];
    let got = to_dtype(&file, t, DType::F32, None).unwrap();
    let mut want = vec![0f32; t.n_elements()];
    dequant::dequantize(GgmlType::Q8_0, file.tensor_data(t), &mut want).unwrap();
    let want: Vec<u8> = want.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert!(got == want);
}
