//! Mistral: the Llama block without biases, with sliding-window attention when config.json sets
//! `sliding_window`. AutoAWQ scales it exactly as Llama.

use super::llama::{linears, LLAMA};
use super::{ArchDescriptor, Bias, ConfigDefaults, KvHeadsDefault, LinearSpec, WindowedBlocks};

pub const MISTRAL: ArchDescriptor = ArchDescriptor {
    model_type: "mistral",
    linears: &LINEARS,
    windowed_blocks: WindowedBlocks::All,
    // MistralConfig (4.57 `__init__`, 5.x fields): Llama's defaults, except `num_key_value_heads=8`
    // (Mistral 7B's size, so required here) and `sliding_window=4096`.
    config_defaults: ConfigDefaults { num_key_value_heads: KvHeadsDefault::Required, sliding_window: Some(4096), ..LLAMA.config_defaults },
    ..LLAMA
};

const LINEARS: [LinearSpec; 7] = linears(Bias::Never, Bias::Never, Bias::IfMlpBias);
