//! Qwen3-MoE (`model_type: qwen3_moe`: Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (per-head
//! q/k norms before RoPE, biases only with `attention_bias`) with a mixture of experts in the
//! sparse blocks, transformers' `Qwen3MoeSparseMoeBlock`:
//! - the router `mlp.gate` (`[num_experts, hidden]`, no bias); softmax over all experts, the top
//!   `num_experts_per_tok` kept, renormalised only when `norm_topk_prob` (default false);
//! - expert `e` is `mlp.experts.{e}`: `down_proj(silu(gate_proj(x)) * up_proj(x))` of
//!   `moe_intermediate_size` columns, no biases;
//! - which blocks are sparse: block `i` unless `mlp_only_layers` lists it, when `(i + 1) %
//!   decoder_sparse_step == 0` and `num_experts > 0`; the others have Qwen3's dense MLP
//!   (`mlp.gate_proj`, ...) of `intermediate_size`.
//!
//! `Qwen3MoeConfig`'s defaults: Qwen3's, except that a missing `head_dim` is `hidden_size /
//! num_attention_heads` (`Qwen3MoeAttention` takes `getattr(config, "head_dim", ...)`; 5.x has no
//! such field); `norm_topk_prob=False`, `decoder_sparse_step=1`, `mlp_only_layers=[]`;
//! `num_experts=128`, `num_experts_per_tok=8` and `moe_intermediate_size=768` are a reference
//! model's sizes, so required here. transformers 5 may write the expert count as
//! `num_local_experts`: either name is read, both must agree.
//!
//! AWQ follows AutoAWQ 0.2.9's `Qwen3MoeAWQForCausalLM` (awq/models/qwen3_moe.py): a sparse block
//! has Mixtral's groups in Qwen's names (input_layernorm -> q, k, v; v -> o where the shapes match;
//! post_attention_layernorm -> every expert's gate_proj and up_proj inspecting the whole `mlp`,
//! the router not scaled; each expert's up_proj -> its down_proj on its routed tokens; see
//! mixtral.rs for the router and for experts no calibration token reached); a dense block has
//! Qwen3's (Llama's) four. Clipping: AutoAWQ's `avoid_clipping` matches no expert name here
//! (`mlp.experts.3.gate_proj`), so every expert linear is clipped; q and k are not.
//!
//! One difference from AutoAWQ, asked for by our format contract: AutoAWQ 0.2.9 sets no
//! `modules_to_not_convert` for Qwen3-MoE, so it would quantize (and clip) the router `mlp.gate`
//! like any linear. We keep the router in f16, unscaled, as vLLM's Qwen3-MoE runs it, and list each
//! sparse block's router by its full path in `modules_to_not_convert`
//! (`model.layers.3.mlp.gate`): a bare `gate`, Mixtral's entry, would also match every
//! `gate_proj` under transformers 4's and vLLM's substring matching.

use super::llama::MOE_GROUPS;
use super::mixtral::expert_linears;
use super::qwen3::QWEN3;
use super::{ArchDescriptor, ConfigDefaults, HeadDimDefault, LinearSpec, MoeSpec, NotConvert, Renormalize, SparseBlocks};

pub const QWEN3_MOE: ArchDescriptor = ArchDescriptor {
    model_type: "qwen3_moe",
    config_defaults: ConfigDefaults { head_dim: HeadDimDefault::HiddenOverHeads, ..QWEN3.config_defaults },
    moe: Some(&MOE),
    ..QWEN3
};

const MOE: MoeSpec = MoeSpec {
    router: "mlp.gate",
    experts: "mlp.experts",
    expert_linears: &EXPERT_LINEARS,
    n_experts_fields: ["num_experts", "num_local_experts"],
    expert_intermediate_field: "moe_intermediate_size",
    renormalize: Renormalize::IfNormTopkProb,
    sparse_blocks: SparseBlocks::StepExceptMlpOnly,
    scaling_groups: &MOE_GROUPS,
    clip_experts: true,
    not_convert: NotConvert::RouterPaths,
};

const EXPERT_LINEARS: [LinearSpec; 3] = expert_linears("gate_proj", "up_proj", "down_proj");
