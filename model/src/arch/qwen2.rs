//! Qwen2 (Qwen2, Qwen2.5): the Llama block with biases on q, k and v (never on o). Its
//! `sliding_window` field is off by default (`use_sliding_window: false`) and ignored here.

use super::llama::{linears, LLAMA};
use super::{ArchDescriptor, Bias, ConfigDefaults, KvHeadsDefault, LinearSpec};

pub const QWEN2: ArchDescriptor = ArchDescriptor {
    model_type: "qwen2",
    linears: &LINEARS,
    // Qwen2Config (4.57 `__init__`, 5.x fields): Llama's defaults, except `num_key_value_heads=32`
    // (Qwen2-7B's size, so required here); its `sliding_window=4096` applies only with
    // `use_sliding_window`, which this family ignores.
    config_defaults: ConfigDefaults { num_key_value_heads: KvHeadsDefault::Required, ..LLAMA.config_defaults },
    ..LLAMA
};

const LINEARS: [LinearSpec; 7] = linears(Bias::Always, Bias::Never, Bias::IfMlpBias);
