//! Llama (and every checkpoint that says `model_type: llama`: SmolLM2, Llama 2/3, TinyLlama, ...).
//!
//! Pre-norm decoder block: `x += o(attn(rope(q(n1 x)), rope(k(n1 x)), v(n1 x)))`, then
//! `x += down(silu(gate(n2 x)) * up(n2 x))`, RMSNorm for `n1`, `n2` and the final norm. Biases only
//! where config.json sets `attention_bias` / `mlp_bias`.

use super::{llama_linears, LinearRole, ArchDescriptor, Bias, LinearSpec, LLAMA_NORMS, LLAMA_SCALING_GROUPS, LLAMA_CONFIG_DEFAULTS};

const LINEARS: [LinearSpec; 7] = llama_linears(Bias::IfAttentionBias, Bias::IfAttentionBias);

pub const LLAMA: ArchDescriptor = ArchDescriptor {
    model_type: "llama",
    block_prefix: "model.layers",
    embed_tokens: "model.embed_tokens.weight",
    final_norm: "model.norm.weight",
    lm_head: "lm_head.weight",
    norms: &LLAMA_NORMS,
    linears: &LINEARS,
    scaling_groups: &LLAMA_SCALING_GROUPS,
    clip_skip: &[LinearRole::Q, LinearRole::K],
    honours_sliding_window: false,
    config_defaults: LLAMA_CONFIG_DEFAULTS,
};
