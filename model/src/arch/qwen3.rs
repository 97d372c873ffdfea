//! Qwen3 (dense: Qwen3-0.6B to 32B): the Llama block with an RMSNorm on each query and key head
//! between the projection and RoPE (`self_attn.q_norm`, `self_attn.k_norm`: one `[head_dim]` weight
//! shared by all heads, transformers' `Qwen3Attention`), biases on q, k, v and o only with
//! `attention_bias`, and `head_dim` stated in config.json (it need not be `hidden_size / heads`:
//! Qwen3-0.6B has 16 heads of 128 in a hidden size of 1024). Its `sliding_window` applies only with
//! `use_sliding_window`, off in every released model, and is ignored here as Qwen2's.
//!
//! AutoAWQ's `Qwen3AWQForCausalLM` scales exactly as Llama (the same four groups); the q/k norms are
//! neither scaled nor quantized: they stay f16 in the output, as the other norms.

use super::llama::{LLAMA, NORMS};
use super::{ArchDescriptor, ConfigDefaults, Dim, HeadDimDefault, KvHeadsDefault, NormRole, NormSpec};

pub const QWEN3: ArchDescriptor = ArchDescriptor {
    model_type: "qwen3",
    norms: &[
        NORMS[0],
        NORMS[1],
        NormSpec { role: NormRole::QHead, module: "self_attn.q_norm", dim: Dim::HeadDim },
        NormSpec { role: NormRole::KHead, module: "self_attn.k_norm", dim: Dim::HeadDim },
    ],
    // Qwen3Config (4.57 `__init__`, 5.x fields): Llama's defaults, except `num_key_value_heads=32`
    // and `head_dim=128` (Qwen3-8B's sizes, so required here); `sliding_window=4096` only with
    // `use_sliding_window`, which this family ignores.
    config_defaults: ConfigDefaults {
        num_key_value_heads: KvHeadsDefault::Required,
        head_dim: HeadDimDefault::Required,
        ..LLAMA.config_defaults
    },
    ..LLAMA
};
