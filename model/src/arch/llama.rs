//! Llama (and every checkpoint that says `model_type: llama`: SmolLM2, Llama 2/3, TinyLlama, ...),
//! and the tables of its block that the families built on it reuse.
//!
//! Pre-norm decoder block: `x += o(attn(rope(q(n1 x)), rope(k(n1 x)), v(n1 x)))`, then
//! `x += down(silu(gate(n2 x)) * up(n2 x))`, RMSNorm for `n1`, `n2` and the final norm. Biases only
//! where config.json sets `attention_bias` / `mlp_bias`.

use awq_kernels::DType;

use super::{
    ArchDescriptor, AttentionScale, Bias, ConfigDefaults, Dim, EmbedScale, Experts, HeadDimDefault, Inspect,
    KvHeadsDefault, LinearRole, LinearSpec, NormForm, NormRole, NormSpec, Prev, ScalingGroup, Split, When,
    WindowedBlocks,
};

pub const LLAMA: ArchDescriptor = ArchDescriptor {
    model_type: "llama",
    block_prefix: "model.layers",
    embed_tokens: "model.embed_tokens.weight",
    final_norm: "model.norm.weight",
    lm_head: "lm_head.weight",
    norms: &NORMS,
    norm_form: NormForm::Plain,
    linears: &LINEARS,
    fused: &[],
    scaling_groups: &SCALING_GROUPS,
    clip_skip: &[LinearRole::Q, LinearRole::K],
    windowed_blocks: WindowedBlocks::None,
    attention_scale: AttentionScale::InvSqrtHeadDim,
    embed_scale: EmbedScale::One,
    gpu_dtype: DType::F16,
    config_defaults: CONFIG_DEFAULTS,
    moe: None,
};

const LINEARS: [LinearSpec; 7] = linears(Bias::IfAttentionBias, Bias::IfAttentionBias, Bias::IfMlpBias);

/// The Llama block's linears; the families built on it differ only in their biases.
pub(super) const fn linears(attn_bias: Bias, o_bias: Bias, mlp_bias: Bias) -> [LinearSpec; 7] {
    use Dim::*;
    use LinearRole::*;
    [
        LinearSpec { role: Q, module: "self_attn.q_proj", out_dim: QHeads, in_dim: Hidden, bias: attn_bias, split: Split::Column },
        LinearSpec { role: K, module: "self_attn.k_proj", out_dim: KvHeads, in_dim: Hidden, bias: attn_bias, split: Split::Column },
        LinearSpec { role: V, module: "self_attn.v_proj", out_dim: KvHeads, in_dim: Hidden, bias: attn_bias, split: Split::Column },
        LinearSpec { role: O, module: "self_attn.o_proj", out_dim: Hidden, in_dim: QHeads, bias: o_bias, split: Split::Row },
        LinearSpec { role: Gate, module: "mlp.gate_proj", out_dim: Intermediate, in_dim: Hidden, bias: mlp_bias, split: Split::Column },
        LinearSpec { role: Up, module: "mlp.up_proj", out_dim: Intermediate, in_dim: Hidden, bias: mlp_bias, split: Split::Column },
        LinearSpec { role: Down, module: "mlp.down_proj", out_dim: Hidden, in_dim: Intermediate, bias: mlp_bias, split: Split::Row },
    ]
}

pub(super) const NORMS: [NormSpec; 2] = [
    NormSpec { role: NormRole::Attn, module: "input_layernorm", dim: Dim::Hidden },
    NormSpec { role: NormRole::Mlp, module: "post_attention_layernorm", dim: Dim::Hidden },
];

/// AutoAWQ's `LlamaAWQForCausalLM.get_layers_for_scaling`, as data.
pub(super) const SCALING_GROUPS: [ScalingGroup; 4] = [ATTENTION_GROUPS[0], ATTENTION_GROUPS[1], MLP_GROUPS[0], MLP_GROUPS[1]];

/// The attention's two groups (the mixture-of-experts families share them).
pub(super) const ATTENTION_GROUPS: [ScalingGroup; 2] = {
    use LinearRole::*;
    let none = Experts::None;
    [
        ScalingGroup { prev: Prev::Norm(NormRole::Attn), linears: &[Q, K, V], inspect: Inspect::Attention, when: When::Always, experts: none },
        ScalingGroup { prev: Prev::Linear(V), linears: &[O], inspect: Inspect::Linear(O), when: When::SameShape(V, O), experts: none },
    ]
};

/// The gated MLP's two groups.
const MLP_GROUPS: [ScalingGroup; 2] = {
    use LinearRole::*;
    let none = Experts::None;
    [
        ScalingGroup { prev: Prev::Norm(NormRole::Mlp), linears: &[Gate, Up], inspect: Inspect::Mlp, when: When::Always, experts: none },
        ScalingGroup { prev: Prev::Linear(Up), linears: &[Down], inspect: Inspect::Linear(Down), when: When::Always, experts: none },
    ]
};

/// The groups of a mixture-of-experts block (AutoAWQ's `MixtralAWQForCausalLM` and
/// `Qwen3MoeAWQForCausalLM`): the attention's, then the MLP's norm -> every expert's gate and up
/// in one group inspecting the whole mixture (router included), and each expert's up -> its down.
pub(super) const MOE_GROUPS: [ScalingGroup; 4] = {
    use LinearRole::*;
    [
        ATTENTION_GROUPS[0],
        ATTENTION_GROUPS[1],
        ScalingGroup { prev: Prev::Norm(NormRole::Mlp), linears: &[Gate, Up], inspect: Inspect::Mlp, when: When::Always, experts: Experts::All },
        ScalingGroup { prev: Prev::Linear(Up), linears: &[Down], inspect: Inspect::Linear(Down), when: When::Always, experts: Experts::Each },
    ]
};

/// `LlamaConfig`'s defaults (transformers 4.57 `LlamaConfig.__init__`, 5.x `LlamaConfig` fields):
/// `rms_norm_eps=1e-6`, `rope_theta=10000.0` (5.x: `default_theta`), `hidden_act="silu"`,
/// `tie_word_embeddings=False`, `num_key_value_heads=None` -> `num_attention_heads`,
/// `head_dim=None` -> `hidden_size / num_attention_heads`; no sliding window; no Gemma fields.
const CONFIG_DEFAULTS: ConfigDefaults = ConfigDefaults {
    rms_norm_eps: 1e-6,
    rope_theta: 10000.0,
    hidden_act: "silu",
    tie_word_embeddings: false,
    num_key_value_heads: KvHeadsDefault::AttentionHeads,
    head_dim: HeadDimDefault::HiddenOverHeads,
    sliding_window: None,
    sliding_window_pattern: None,
    rope_local_base_freq: None,
    query_pre_attn_scalar: None,
};
