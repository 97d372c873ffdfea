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
//! to every norm weight ([`super::convert`]'s `norm_shift`).

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
    use super::*;

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
}
