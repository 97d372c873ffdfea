//! Architecture descriptors: what a model family's checkpoint and blocks look like, as data.
//!
//! One file per architecture builds one [`ArchDescriptor`]; [`descriptor_for`] is the registry, keyed
//! by config.json's `model_type`. The rest of the system (the forward pass, the AWQ engine, the
//! tensor-parallel splitter) walks the descriptor and never asks which architecture it has: tensor
//! names come from [`ArchDescriptor::linear_name`] and friends, so code passes `(block_idx,
//! LinearRole)`, never strings.
//!
//! Adding an architecture: one file here, one line in [`REGISTRY`], and a synthetic round-trip test.

mod llama;
mod mistral;
mod qwen2;

use std::path::Path;

use crate::{Error, ModelConfig, Result};

/// The linear layers of a decoder block, by what they do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinearRole {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LinearRole {
    pub const ALL: [LinearRole; 7] =
        [LinearRole::Q, LinearRole::K, LinearRole::V, LinearRole::O, LinearRole::Gate, LinearRole::Up, LinearRole::Down];

    /// Position in [`LinearRole::ALL`], for role-indexed arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The norms of a decoder block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NormRole {
    /// Before attention (`input_layernorm`).
    Attn,
    /// Before the MLP (`post_attention_layernorm` in Llama's naming).
    Mlp,
}

impl NormRole {
    pub const ALL: [NormRole; 2] = [NormRole::Attn, NormRole::Mlp];

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A dimension of a weight, resolved against the config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dim {
    Hidden,
    Intermediate,
    /// `n_heads * head_dim`
    QHeads,
    /// `n_kv_heads * head_dim`
    KvHeads,
}

impl Dim {
    pub fn resolve(self, c: &ModelConfig) -> usize {
        match self {
            Dim::Hidden => c.hidden_size,
            Dim::Intermediate => c.intermediate_size,
            Dim::QHeads => c.q_dim(),
            Dim::KvHeads => c.kv_dim(),
        }
    }
}

/// Whether a linear has a bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bias {
    Never,
    Always,
    /// When config.json says `attention_bias: true`.
    IfAttentionBias,
    /// When config.json says `mlp_bias: true`.
    IfMlpBias,
}

/// How tensor parallelism splits a linear (Megatron-LM): by output rows, or by input columns with an
/// all-reduce after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Column,
    Row,
}

/// One linear layer of a block.
#[derive(Clone, Copy, Debug)]
pub struct LinearSpec {
    pub role: LinearRole,
    /// Module path inside the block, e.g. `self_attn.q_proj`.
    pub module: &'static str,
    pub out_dim: Dim,
    pub in_dim: Dim,
    pub bias: Bias,
    pub split: Split,
}

/// One norm of a block.
#[derive(Clone, Copy, Debug)]
pub struct NormSpec {
    pub role: NormRole,
    pub module: &'static str,
}

/// What feeds a scaling group: AWQ divides the group's input by `s`, so `s` is folded into this op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prev {
    Norm(NormRole),
    Linear(LinearRole),
}

/// Whose output AWQ's scale search compares (AutoAWQ's `module2inspect`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inspect {
    /// The whole attention sub-block.
    Attention,
    /// The whole MLP sub-block.
    Mlp,
    /// One linear layer on its own.
    Linear(LinearRole),
}

/// When a scaling group applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    Always,
    /// Only when the two linears have the same weight shape (v -> o under GQA is skipped otherwise).
    SameShape(LinearRole, LinearRole),
}

/// A set of linears that share an input and so share AWQ scales (AutoAWQ's `get_layers_for_scaling`).
#[derive(Clone, Copy, Debug)]
pub struct ScalingGroup {
    pub prev: Prev,
    pub linears: &'static [LinearRole],
    pub inspect: Inspect,
    pub when: When,
}

/// Everything the system needs to know about one architecture.
#[derive(Debug)]
pub struct ArchDescriptor {
    /// config.json's `model_type`.
    pub model_type: &'static str,
    /// Prefix of block tensors: block `i` lives under `{block_prefix}.{i}.`.
    pub block_prefix: &'static str,
    pub embed_tokens: &'static str,
    pub final_norm: &'static str,
    pub lm_head: &'static str,
    pub norms: &'static [NormSpec],
    pub linears: &'static [LinearSpec],
    pub scaling_groups: &'static [ScalingGroup],
    /// Linears AWQ's clip search leaves alone (AutoAWQ skips q and k: clipping them distorts the
    /// attention logits more than it saves).
    pub clip_skip: &'static [LinearRole],
    /// Whether config.json's `sliding_window` restricts attention in this family.
    pub honours_sliding_window: bool,
    /// What config.json may leave out, as this family's transformers config class fills it in.
    pub config_defaults: ConfigDefaults,
}

/// The values transformers' config class for an architecture (`LlamaConfig`, ...) takes for fields
/// config.json leaves out, where they are rules rather than sizes. Sizes (`hidden_size`,
/// `num_hidden_layers`, ...) are always required, although the classes default them to their
/// reference model's (`LlamaConfig()` is LLaMA-7B): a missing size is an error naming it.
/// [`ModelConfig::parse`] reads these; each architecture's values cite the classes' sources
/// (transformers 4.57 `__init__` arguments and 5.x dataclass fields agree on all of them).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConfigDefaults {
    pub rms_norm_eps: f64,
    /// The RoPE base when neither `rope_theta` nor `rope_parameters.rope_theta` is given (4.x: the
    /// `rope_theta` argument's default; 5.x: the class's `default_theta`, which `RopeParameters`
    /// documents as the value of an omitted `rope_theta`).
    pub rope_theta: f64,
    pub hidden_act: &'static str,
    pub tie_word_embeddings: bool,
    pub num_key_value_heads: KvHeadsDefault,
    /// `sliding_window` when the field is absent; an explicit `null` is no window.
    pub sliding_window: Option<usize>,
}

/// What a missing `num_key_value_heads` means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvHeadsDefault {
    /// As many as attention heads: no grouped-query attention (LlamaConfig's rule for old configs).
    AttentionHeads,
    /// An error: the class's default is its reference model's size (MistralConfig 8, Qwen2Config 32).
    Required,
}

impl ArchDescriptor {
    pub fn linear(&self, role: LinearRole) -> &LinearSpec {
        self.linears.iter().find(|l| l.role == role).expect("every descriptor lists all seven linear roles")
    }

    pub fn norm(&self, role: NormRole) -> &NormSpec {
        self.norms.iter().find(|n| n.role == role).expect("every descriptor lists both norm roles")
    }

    /// `{block_prefix}.{block_idx}.{module}.weight`
    pub fn linear_name(&self, block_idx: usize, role: LinearRole) -> String {
        format!("{}.{block_idx}.{}.weight", self.block_prefix, self.linear(role).module)
    }

    /// `{block_prefix}.{block_idx}.{module}.{part}` for the packed parts of a quantized linear
    /// (`qweight`, `qzeros`, `scales`).
    pub fn packed_name(&self, block_idx: usize, role: LinearRole, part: &str) -> String {
        format!("{}.{block_idx}.{}.{part}", self.block_prefix, self.linear(role).module)
    }

    pub fn bias_name(&self, block_idx: usize, role: LinearRole) -> String {
        format!("{}.{block_idx}.{}.bias", self.block_prefix, self.linear(role).module)
    }

    pub fn norm_name(&self, block_idx: usize, role: NormRole) -> String {
        format!("{}.{block_idx}.{}.weight", self.block_prefix, self.norm(role).module)
    }

    /// `[out, in]` of a linear's weight under `config`.
    pub fn linear_shape(&self, role: LinearRole, config: &ModelConfig) -> [usize; 2] {
        let spec = self.linear(role);
        [spec.out_dim.resolve(config), spec.in_dim.resolve(config)]
    }

    pub fn has_bias(&self, role: LinearRole, config: &ModelConfig) -> bool {
        match self.linear(role).bias {
            Bias::Never => false,
            Bias::Always => true,
            Bias::IfAttentionBias => config.attention_bias,
            Bias::IfMlpBias => config.mlp_bias,
        }
    }

    /// The sliding window that applies under `config`, if any.
    pub fn sliding_window(&self, config: &ModelConfig) -> Option<usize> {
        if self.honours_sliding_window {
            config.sliding_window
        } else {
            None
        }
    }
}

/// Every supported architecture, keyed by `model_type`.
pub const REGISTRY: &[&ArchDescriptor] = &[&llama::LLAMA, &mistral::MISTRAL, &qwen2::QWEN2];

/// The descriptor for config.json's `model_type`; `path` names config.json in the error.
pub fn descriptor_for(model_type: &str, path: &Path) -> Result<&'static ArchDescriptor> {
    REGISTRY.iter().copied().find(|d| d.model_type == model_type).ok_or_else(|| Error::UnsupportedArchitecture {
        path: path.into(),
        model_type: model_type.into(),
        supported: REGISTRY.iter().map(|d| d.model_type).collect::<Vec<_>>().join(", "),
    })
}

/// `LlamaConfig`'s defaults (transformers 4.57 `LlamaConfig.__init__`, 5.x `LlamaConfig` fields):
/// `rms_norm_eps=1e-6`, `rope_theta=10000.0` (5.x: `default_theta`), `hidden_act="silu"`,
/// `tie_word_embeddings=False`, `num_key_value_heads=None` -> `num_attention_heads`; no sliding window.
pub(crate) const LLAMA_CONFIG_DEFAULTS: ConfigDefaults = ConfigDefaults {
    rms_norm_eps: 1e-6,
    rope_theta: 10000.0,
    hidden_act: "silu",
    tie_word_embeddings: false,
    num_key_value_heads: KvHeadsDefault::AttentionHeads,
    sliding_window: None,
};

/// The Llama block layout that Mistral and Qwen2 share, differing only in biases and windows.
pub(crate) const fn llama_linears(attn_bias: Bias, o_bias: Bias) -> [LinearSpec; 7] {
    use Dim::*;
    use LinearRole::*;
    [
        LinearSpec { role: Q, module: "self_attn.q_proj", out_dim: QHeads, in_dim: Hidden, bias: attn_bias, split: Split::Column },
        LinearSpec { role: K, module: "self_attn.k_proj", out_dim: KvHeads, in_dim: Hidden, bias: attn_bias, split: Split::Column },
        LinearSpec { role: V, module: "self_attn.v_proj", out_dim: KvHeads, in_dim: Hidden, bias: attn_bias, split: Split::Column },
        LinearSpec { role: O, module: "self_attn.o_proj", out_dim: Hidden, in_dim: QHeads, bias: o_bias, split: Split::Row },
        LinearSpec { role: Gate, module: "mlp.gate_proj", out_dim: Intermediate, in_dim: Hidden, bias: Bias::IfMlpBias, split: Split::Column },
        LinearSpec { role: Up, module: "mlp.up_proj", out_dim: Intermediate, in_dim: Hidden, bias: Bias::IfMlpBias, split: Split::Column },
        LinearSpec { role: Down, module: "mlp.down_proj", out_dim: Hidden, in_dim: Intermediate, bias: Bias::IfMlpBias, split: Split::Row },
    ]
}

pub(crate) const LLAMA_NORMS: [NormSpec; 2] = [
    NormSpec { role: NormRole::Attn, module: "input_layernorm" },
    NormSpec { role: NormRole::Mlp, module: "post_attention_layernorm" },
];

/// AutoAWQ's `LlamaAWQForCausalLM.get_layers_for_scaling`, as data.
pub(crate) const LLAMA_SCALING_GROUPS: [ScalingGroup; 4] = {
    use LinearRole::*;
    [
        ScalingGroup { prev: Prev::Norm(NormRole::Attn), linears: &[Q, K, V], inspect: Inspect::Attention, when: When::Always },
        ScalingGroup { prev: Prev::Linear(V), linears: &[O], inspect: Inspect::Linear(O), when: When::SameShape(V, O) },
        ScalingGroup { prev: Prev::Norm(NormRole::Mlp), linears: &[Gate, Up], inspect: Inspect::Mlp, when: When::Always },
        ScalingGroup { prev: Prev::Linear(Up), linears: &[Down], inspect: Inspect::Linear(Down), when: When::Always },
    ]
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_is_complete_and_unknown_types_are_named() {
        for d in REGISTRY {
            assert_eq!(d.linears.len(), LinearRole::ALL.len(), "{}", d.model_type);
            for role in LinearRole::ALL {
                d.linear(role);
            }
            for role in NormRole::ALL {
                d.norm(role);
            }
        }
        let err = descriptor_for("gpt2", Path::new("x/config.json")).unwrap_err().to_string();
        assert_eq!(err, "x/config.json: model_type `gpt2` is not supported (supported: llama, mistral, qwen2)");
        assert_eq!(llama::LLAMA.linear_name(3, LinearRole::Down), "model.layers.3.mlp.down_proj.weight");
    }
}
