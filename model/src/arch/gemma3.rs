//! Gemma 3, text only (`model_type: gemma3_text`: google/gemma-3-270m and 1b, and the language model
//! of the larger multimodal checkpoints once extracted), as transformers' `Gemma3DecoderLayer` and
//! `Gemma3TextModel` compute it. Llama's tensor names and linears, with these differences, all as
//! data the forward passes read:
//! - every RMSNorm multiplies by `1 + w` ([`NormForm::OnePlus`]): the block's four, the per-head q/k
//!   norms and the final norm;
//! - the block normalises its sublayers' outputs too: `x += post_attention_layernorm(o_proj(..))`,
//!   `x += post_feedforward_layernorm(down_proj(..))` ([`NormRole::AttnOut`], [`NormRole::MlpOut`]),
//!   and the MLP's input norm is `pre_feedforward_layernorm` ([`NormRole::Mlp`]);
//! - per-head q/k norms before RoPE, as Qwen3's ([`NormRole::QHead`], [`NormRole::KHead`]);
//! - attention scores scaled by `query_pre_attn_scalar ** -0.5`, not `head_dim ** -0.5`;
//! - `sliding_attention` blocks (`layer_types`, or every block but each `sliding_window_pattern`-th)
//!   attend to the last `sliding_window` positions and rotate with `rope_local_base_freq`; the
//!   `full_attention` ones attend to everything with `rope_theta` ([`WindowedBlocks::SlidingAttention`]);
//! - embeddings scaled by `sqrt(hidden_size)` ([`EmbedScale::SqrtHidden`]), the LM head tied to them
//!   by default; `final_logit_softcapping` when config.json sets it (config.rs; Gemma 3 sets none);
//! - the MLP's activation is `gelu_pytorch_tanh` (`hidden_activation`), no MLP biases
//!   (`Gemma3MLP`), attention biases only with `attention_bias`.
//!
//! AWQ: AutoAWQ 0.2.9 has no Gemma 3 model; its `Gemma2AWQForCausalLM.get_layers_for_scaling`
//! (awq/models/gemma2.py; Gemma 3's block has the same modules) gives Llama's four groups with the
//! MLP's group behind `pre_feedforward_layernorm`: input_layernorm -> q, k, v inspecting self_attn;
//! v -> o where their shapes match; pre_feedforward_layernorm -> gate, up inspecting mlp; up -> down.
//! The post-norms and the q/k norms are neither scaled nor quantized (they stay f16 in the output).
//! A scale folded into a norm keeps the `1 + w` form (awq/quantize/scale.py `scale_ln_fcs`: `weight
//! += 1; weight /= s; weight -= 1`, which 0.2.9 applies to its Gemma and Gemma 2 norm classes;
//! Gemma 3's norm is the same function). The inspected modules' outputs are taken before their
//! post-norms, as AutoAWQ's `self_attn` and `mlp` return them.

use awq_kernels::DType;

use super::llama::{linears, LLAMA, NORMS, SCALING_GROUPS};
use super::{
    ArchDescriptor, AttentionScale, Bias, ConfigDefaults, Dim, EmbedScale, HeadDimDefault, KvHeadsDefault, LinearSpec,
    NormForm, NormRole, NormSpec, WindowedBlocks,
};

pub const GEMMA3_TEXT: ArchDescriptor = ArchDescriptor {
    model_type: "gemma3_text",
    norms: &[
        NORMS[0],
        NormSpec { role: NormRole::Mlp, module: "pre_feedforward_layernorm", dim: Dim::Hidden },
        NormSpec { role: NormRole::QHead, module: "self_attn.q_norm", dim: Dim::HeadDim },
        NormSpec { role: NormRole::KHead, module: "self_attn.k_norm", dim: Dim::HeadDim },
        NormSpec { role: NormRole::AttnOut, module: "post_attention_layernorm", dim: Dim::Hidden },
        NormSpec { role: NormRole::MlpOut, module: "post_feedforward_layernorm", dim: Dim::Hidden },
    ],
    norm_form: NormForm::OnePlus,
    linears: &LINEARS,
    scaling_groups: &SCALING_GROUPS,
    windowed_blocks: WindowedBlocks::SlidingAttention,
    attention_scale: AttentionScale::InvSqrtQueryPreAttnScalar,
    embed_scale: EmbedScale::SqrtHidden,
    // Trained Gemma models overflow f16 (the assets' README; vLLM refuses f16 for them).
    gpu_dtype: DType::BF16,
    // Gemma3TextConfig (4.57 `__init__`, 5.x fields): `rms_norm_eps=1e-6`, `rope_theta=1_000_000.0`,
    // `rope_local_base_freq=10_000.0`, `hidden_activation="gelu_pytorch_tanh"`,
    // `tie_word_embeddings=True`, `query_pre_attn_scalar=256`, `sliding_window=4096`, and
    // `sliding_window_pattern` 6 when `layer_types` is not given (`_sliding_window_pattern`);
    // `num_key_value_heads=4` and `head_dim=256` are Gemma-3-4B's sizes, so required here.
    config_defaults: ConfigDefaults {
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        hidden_act: "gelu_pytorch_tanh",
        tie_word_embeddings: true,
        num_key_value_heads: KvHeadsDefault::Required,
        head_dim: HeadDimDefault::Required,
        sliding_window: Some(4096),
        sliding_window_pattern: Some(6),
        rope_local_base_freq: Some(10_000.0),
        query_pre_attn_scalar: Some(256.0),
    },
    // Llama's tensor names outside the blocks, fused (none) and clip_skip (q and k).
    ..LLAMA
};

/// Llama's linears; the MLP never has biases (`Gemma3MLP`: `bias=False`), the attention's only with
/// `attention_bias` (`Gemma3Attention`).
const LINEARS: [LinearSpec; 7] = linears(Bias::IfAttentionBias, Bias::IfAttentionBias, Bias::Never);
