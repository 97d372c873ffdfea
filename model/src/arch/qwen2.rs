//! Qwen2 (Qwen2, Qwen2.5): the Llama block with biases on q, k and v (never on o). Its
//! `sliding_window` field is off by default (`use_sliding_window: false`) and ignored here.

use super::{llama_linears, LinearRole, ArchDescriptor, Bias, LinearSpec, LLAMA_NORMS, LLAMA_SCALING_GROUPS, ConfigDefaults, KvHeadsDefault, LLAMA_CONFIG_DEFAULTS};

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
    // Qwen2Config (4.57 `__init__`, 5.x fields): Llama's defaults, except `num_key_value_heads=32`
    // (Qwen2-7B's size, so required here); its `sliding_window=4096` applies only with
    // `use_sliding_window`, which this family ignores.
    config_defaults: ConfigDefaults { num_key_value_heads: KvHeadsDefault::Required, ..LLAMA_CONFIG_DEFAULTS },
};
