//! Qwen2 (Qwen2, Qwen2.5): the Llama block with biases on q, k and v (never on o). Its
//! `sliding_window` field is off by default (`use_sliding_window: false`) and ignored here.

use super::{llama_linears, LinearRole, ArchDescriptor, Bias, LinearSpec, LLAMA_NORMS, LLAMA_SCALING_GROUPS};

const LINEARS: [LinearSpec; 7] = llama_linears(Bias::Always, Bias::Never);

pub const QWEN2: ArchDescriptor = ArchDescriptor {
    model_type: "qwen2",
    block_prefix: "model.layers",
    embed_tokens: "model.embed_tokens.weight",
    final_norm: "model.norm.weight",
    lm_head: "lm_head.weight",
    norms: &LLAMA_NORMS,
    linears: &LINEARS,
    scaling_groups: &LLAMA_SCALING_GROUPS,
    clip_skip: &[LinearRole::Q, LinearRole::K],
    honours_sliding_window: false,
};
