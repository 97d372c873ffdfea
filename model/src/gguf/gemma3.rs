//! The config.json fields of transformers' `gemma3_text` for llama.cpp's `gemma3` GGUF files.
//!
//! llama.cpp's converter stores few of Gemma 3's settings: `gemma3.attention.sliding_window` (the
//! window of the local blocks, required here as llama.cpp requires it) and the general keys every
//! family has. The rest llama.cpp fixes in code for every `gemma3` model (`llama-model.cpp`, the
//! `LLM_ARCH_GEMMA3` case of `load_hparams`, and the `gemma3` graph builder); each constant below
//! names where. The values agree with transformers' `Gemma3TextConfig` for the released models and
//! with the reference converter `../shared/assets/gguf2hf.py`, except where a comment says why not.
//!
//! The tensors need nothing here: `convert.rs` maps their names and subtracts the 1 llama.cpp added
//! to every norm weight (its `GgufArch::norm_shift`). The tests here import tiny gemma3 files built
//! with `convert.rs`' test fixtures: the whole config.json, the norm offset undone before the one
//! rounding, and the errors naming the key or tensor.

use serde_json::{json, Value};

use super::convert::Facts;
use crate::{Error, Result};

/// Every 6th block attends globally, the others through the sliding window: llama.cpp's
/// `hparams.set_swa_pattern(6)` (block `i` is local unless `i % 6 == 5`), transformers'
/// `sliding_window_pattern = 6`.
const GLOBAL_EVERY: u64 = 6;

/// The RoPE base of the sliding-window blocks: llama.cpp's `rope_freq_base_train_swa = 10000.0f`
/// (with `rope_freq_scale_train_swa = 1`, so no scaling: `rope.scaling.*` applies to the global
/// blocks only, as transformers' `rope_local_base_freq` has none). The global blocks' base is
/// `gemma3.rope.freq_base`.
const LOCAL_ROPE_BASE: f64 = 10_000.0;

/// The block count of Gemma 3 27B, the one size whose attention scores llama.cpp scales by
/// `1 / sqrt(hidden / heads)` instead of `1 / sqrt(head_dim)` (`f_attention_scale`, after
/// gemma_pytorch's config: 27B has `query_pre_attn_scalar = 5376 / 32 = 168`, its heads 128 wide).
const BLOCKS_27B: u64 = 62;

/// The `gemma3_text` fields beyond the general ones `convert.rs` writes.
pub(super) fn extra_config(f: &Facts) -> Result<Value> {
    let key_error = |k: &str, detail: String| Error::GgufKey { path: f.file.path().into(), key: f.key(k), detail };
    let sliding_window =
        f.file.required(&f.key("attention.sliding_window"), f.file.uint(&f.key("attention.sliding_window"))?)?;
    if sliding_window == 0 {
        return Err(key_error("attention.sliding_window", "must be positive".into()));
    }
    // Absent in every gemma3 GGUF llama.cpp writes (Gemma 3 dropped Gemma 2's soft-capping), so
    // null; passed on when a file has them (config.rs then refuses attention soft-capping).
    let optional_float = |k: &str| -> Result<Value> { Ok(f.file.float(&f.key(k))?.map_or(Value::Null, |v| json!(v))) };
    Ok(json!({
        // llama.cpp's gemma3 graph: a gated GELU with the tanh approximation (`LLM_FFN_GELU`, ggml's
        // `gelu` is the tanh form), which transformers calls `gelu_pytorch_tanh`.
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": query_pre_attn_scalar(f.n_blocks, f.hidden, f.n_heads, f.head_dim),
        "sliding_window": sliding_window,
        "sliding_window_pattern": GLOBAL_EVERY,
        "layer_types": layer_types(f.n_blocks),
        "rope_local_base_freq": LOCAL_ROPE_BASE,
        "attn_logit_softcapping": optional_float("attn_logit_softcapping")?,
        "final_logit_softcapping": optional_float("final_logit_softcapping")?,
        // llama.cpp loads no attention biases for gemma3.
        "attention_bias": false,
    }))
}

/// transformers' `layer_types`: block `i` is `full_attention` when `(i + 1) % 6 == 0`.
fn layer_types(n_blocks: u64) -> Vec<&'static str> {
    (0..n_blocks).map(|i| if (i + 1) % GLOBAL_EVERY == 0 { "full_attention" } else { "sliding_attention" }).collect()
}

/// The attention scores are scaled by `query_pre_attn_scalar ** -0.5`: `head_dim`, except for 27B
/// (see [`BLOCKS_27B`]). gguf2hf.py writes `head_dim` for every size; the two agree on every size
/// but 27B, where `hidden / heads` is Google's value.
fn query_pre_attn_scalar(n_blocks: u64, hidden: u64, n_heads: u64, head_dim: u64) -> u64 {
    if n_blocks == BLOCKS_27B {
        hidden / n_heads
    } else {
        head_dim
    }
}

#[cfg(test)]
mod tests {
    use awq_kernels::DType;

    use super::super::convert::tests::{
        check_round_trip, import_err, import_with, tiny, BLOCKS, FFN, HEADS, HEAD_DIM, HIDDEN, KV_HEADS, VOCAB,
    };
    use super::super::fixture::Gguf;
    use super::*;
    use crate::safetensors::SafetensorsFile;
    use crate::Checkpoint;

    #[test]
    fn every_sixth_block_is_global() {
        let types = layer_types(18);
        let global: Vec<usize> = (0..18).filter(|&i| types[i] == "full_attention").collect();
        assert_eq!(global, vec![5, 11, 17]);
        assert_eq!(layer_types(5), vec!["sliding_attention"; 5]);
    }

    #[test]
    fn only_27b_scales_by_hidden_over_heads() {
        // Gemma 3 270M (18 blocks), 1B (26), 4B (34), 12B (48): head_dim; 27B: 5376 / 32.
        assert_eq!(query_pre_attn_scalar(18, 640, 4, 256), 256);
        assert_eq!(query_pre_attn_scalar(48, 3840, 16, 256), 256);
        assert_eq!(query_pre_attn_scalar(62, 5376, 32, 128), 168);
    }

    #[test]
    fn gemma3_round_trips_with_its_norms_less_one_and_llama_cpp_fixed_config() {
        let r = check_round_trip("gemma3", true, DType::F16);
        let config: Value = serde_json::from_slice(&std::fs::read(r.out().join("config.json")).unwrap()).unwrap();
        let want = json!({
            "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
            "hidden_activation": "gelu_pytorch_tanh", "hidden_size": HIDDEN, "intermediate_size": FFN,
            "num_hidden_layers": BLOCKS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
            "head_dim": 2 * HEAD_DIM,
            "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "rope_scaling": null, "max_position_embeddings": 2048,
            "vocab_size": VOCAB, "tie_word_embeddings": true, "bos_token_id": 260, "eos_token_id": 261,
            "pad_token_id": null, "torch_dtype": "float16", "initializer_range": 0.02, "attention_dropout": 0.0,
            "use_cache": true, "attention_bias": false, "query_pre_attn_scalar": 2 * HEAD_DIM, "sliding_window": 4,
            "sliding_window_pattern": 6, "layer_types": ["sliding_attention", "sliding_attention"],
            "rope_local_base_freq": 10000.0, "attn_logit_softcapping": null, "final_logit_softcapping": null,
        });
        assert_eq!(config, want);
        // What the forward passes read from it.
        let c = Checkpoint::open(r.out()).unwrap().config().clone();
        assert_eq!((c.query_pre_attn_scalar, c.sliding_window, c.final_logit_softcapping), (Some(32.0), Some(4), None));
        assert_eq!(c.activation, awq_kernels::ops::GatedActivation::GeluTanh);
    }

    #[test]
    fn gemma3_norm_offset_is_undone_in_f32_then_rounded_once() {
        let (mut g, _) = tiny("gemma3", true);
        // 1 + 2^-11 + 2^-22 less 1 is 2^-11 + 2^-22, which f16 rounds to 2^-11; rounding to f16
        // first (1 + 2^-10) and then subtracting would give 2^-10.
        let stored = [1.0 + 2f32.powi(-11) + 2f32.powi(-22), 1.0, 0.0, 3.5];
        let t = g.tensors.iter_mut().find(|t| t.name == "blk.1.post_ffw_norm.weight").unwrap();
        for (i, v) in stored.iter().enumerate() {
            t.data[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
        }
        let r = import_with(&g, DType::F16);
        r.result.as_ref().unwrap_or_else(|e| panic!("{e}"));
        let st = SafetensorsFile::open(r.out().join("model.safetensors")).unwrap();
        let got = st.tensor("model.layers.1.post_feedforward_layernorm.weight").unwrap().to_f32_vec().unwrap();
        assert_eq!(got[..4], [2f32.powi(-11), 0.0, -1.0, 2.5]);
    }

    #[test]
    fn gemma3_files_that_do_not_fit_name_the_key_or_tensor() {
        let (mut g, _) = tiny("gemma3", true);
        g.remove_key("gemma3.attention.sliding_window");
        let err = import_err(&g);
        let key = "gemma3.attention.sliding_window";
        assert!(matches!(&err, Error::GgufKey { key: k, .. } if k == key), "{err}");
        let says = format!("tiny.gguf: metadata key `{key}`: required key is missing");
        assert!(err.to_string().ends_with(&says), "{err}");
        let check = |edit: &dyn Fn(&mut Gguf), says: &str| {
            let (mut g, _) = tiny("gemma3", true);
            edit(&mut g);
            let err = import_err(&g).to_string();
            assert!(err.contains("tiny.gguf: ") && err.contains(says), "expected {says:?} in: {err}");
        };
        check(&|g| { g.remove_tensor("blk.1.post_attention_norm.weight"); },
            "tensor blk.1.post_attention_norm.weight is missing (it becomes model.layers.1.post_attention_layernorm.weight, which a gemma3 model needs)");
        let replace = |g: &mut Gguf, name: &str, len: usize| {
            g.remove_tensor(name).tensor_f32(name, &[len as u64], &vec![1.0; len]);
        };
        check(&|g| replace(g, "blk.0.post_ffw_norm.weight", 65),
            "tensor blk.0.post_ffw_norm.weight: shape [65], but the metadata implies [64] for model.layers.0.post_feedforward_layernorm.weight");
        check(&|g| replace(g, "blk.0.attn_q_norm.weight", 16),
            "tensor blk.0.attn_q_norm.weight: shape [16], but the metadata implies [32] for model.layers.0.self_attn.q_norm.weight");
        // A llama block has no output norms.
        let (mut g, _) = tiny("llama", true);
        g.tensor_f32("blk.0.post_ffw_norm.weight", &[64], &[1.0; 64]);
        let err = import_err(&g).to_string();
        let says = "tensor blk.0.post_ffw_norm.weight: no Hugging Face name for this tensor of a llama model";
        assert!(err.contains(says), "{err}");
    }
}
