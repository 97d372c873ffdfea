//! Mistral: the Llama block without biases, with sliding-window attention when config.json sets
//! `sliding_window`. AutoAWQ scales it exactly as Llama.

use super::{llama_linears, LinearRole, ArchDescriptor, Bias, LinearSpec, LLAMA_NORMS, LLAMA_SCALING_GROUPS, ConfigDefaults, KvHeadsDefault, LLAMA_CONFIG_DEFAULTS};

const LINEARS: [LinearSpec; 7] = llama_linears(Bias::Never, Bias::Never);

pub const MISTRAL: ArchDescriptor = ArchDescriptor {
    model_type: "mistral",
    block_prefix: "model.layers",
    embed_tokens: "model.embed_tokens.weight",
    final_norm: "model.norm.weight",
    lm_head: "lm_head.weight",
    norms: &LLAMA_NORMS,
    linears: &LINEARS,
    scaling_groups: &LLAMA_SCALING_GROUPS,
    clip_skip: &[LinearRole::Q, LinearRole::K],
    honours_sliding_window: true,
    // MistralConfig (4.57 `__init__`, 5.x fields): Llama's defaults, except `num_key_value_heads=8`
    // (Mistral 7B's size, so required here) and `sliding_window=4096`.
    config_defaults: ConfigDefaults { num_key_value_heads: KvHeadsDefault::Required, sliding_window: Some(4096), ..LLAMA_CONFIG_DEFAULTS },
};
