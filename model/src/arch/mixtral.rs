//! Mixtral (`model_type: mixtral`: Mixtral-8x7B, 8x22B, and checkpoints built on them): Mistral's
//! attention (no biases, a sliding window when config.json sets one) with a mixture of experts in
//! place of every block's MLP, transformers' `MixtralSparseMoeBlock`:
//! - the router `block_sparse_moe.gate` (`[num_local_experts, hidden]`, no bias) scores each token
//!   from the MLP norm's output; softmax over all experts, the top `num_experts_per_tok` kept and
//!   always renormalised to sum to 1;
//! - expert `e` is `block_sparse_moe.experts.{e}`: `w2(silu(w1(x)) * w3(x))`, `w1` the gate, `w3`
//!   the up and `w2` the down projection, of `intermediate_size` columns, no biases;
//! - the block's output is the routing-weighted sum of its chosen experts' outputs.
//!
//! Every block is sparse, so the descriptor's dense gate/up/down (Mistral's) name no tensor.
//! `MixtralConfig`'s defaults: `rms_norm_eps=1e-5`, `rope_theta=1e6` (5.x `default_theta`),
//! `sliding_window=None`; `num_key_value_heads=8`, `num_local_experts=8` and `num_experts_per_tok=2`
//! are Mixtral-8x7B's sizes, so required here. transformers 5 calls the expert count `num_experts`
//! too (an `attribute_map`): either name is read, both must agree.
//!
//! AWQ follows AutoAWQ 0.2.9's `MixtralAWQForCausalLM` (awq/models/mixtral.py):
//! - input_layernorm -> q, k, v inspecting self_attn; v -> o where their shapes match (Llama's);
//! - post_attention_layernorm -> every expert's w1 and w3, one group inspecting the whole
//!   `block_sparse_moe` (its input: the norm's output, every token); the scales are searched with
//!   the router reading that input unchanged, and folded into the norm and the experts' w1/w3
//!   only: AutoAWQ does not fold them into the router (`scale_ln_fcs` scales the group's layers,
//!   which do not include `gate`), so the quantized model routes from `norm(x) / s` where the
//!   original routed from `norm(x)`. We do the same (llm-compressor's `_moe_default_mappings` leave
//!   the router out of the group as well);
//! - each expert: w3 -> w2 inspecting w2, on the tokens routed to that expert (`act(w1 x) * w3 x`
//!   of those rows only). An expert no calibration token reached has no input: AutoAWQ fails there
//!   (`cat_and_assert`: "an expert in MoE not being activated"); the engine gives such an expert
//!   scales of 1 and no clipping and says so in the block's report and log.
//!
//! Clipping: AutoAWQ's `avoid_clipping` (`q_`, `k_`, ...) is matched as a substring of the linear's
//! name, and every expert's name contains `block_sparse_moe` (`bloc*k_*sparse`): it clips no
//! expert, and neither do we (`clip_experts: false`); o is clipped, q and k not.
//!
//! The router is never quantized: AutoAWQ's `modules_to_not_convert = ["gate"]` keeps it out of
//! the search, the clipping and the packing, and writes it into `quantization_config`; it stays f16
//! in the output, and `["gate"]` tells transformers and vLLM to load it unquantized.

use super::llama::MOE_GROUPS;
use super::mistral::MISTRAL;
use super::{
    ArchDescriptor, Bias, ConfigDefaults, Dim, LinearRole, LinearSpec, MoeSpec, NotConvert, Renormalize,
    SparseBlocks, Split,
};

pub const MIXTRAL: ArchDescriptor = ArchDescriptor {
    model_type: "mixtral",
    // MixtralConfig (4.57 `__init__`, 5.x fields): Mistral's, except `rms_norm_eps=1e-5`,
    // `rope_theta=1e6` and `sliding_window=None`.
    config_defaults: ConfigDefaults {
        rms_norm_eps: 1e-5,
        rope_theta: 1_000_000.0,
        sliding_window: None,
        ..MISTRAL.config_defaults
    },
    moe: Some(&MOE),
    ..MISTRAL
};

const MOE: MoeSpec = MoeSpec {
    router: "block_sparse_moe.gate",
    experts: "block_sparse_moe.experts",
    expert_linears: &EXPERT_LINEARS,
    n_experts_fields: ["num_local_experts", "num_experts"],
    expert_intermediate_field: "intermediate_size",
    renormalize: Renormalize::Always,
    sparse_blocks: SparseBlocks::All,
    scaling_groups: &MOE_GROUPS,
    clip_experts: false,
    not_convert: NotConvert::Names(&["gate"]),
};

const EXPERT_LINEARS: [LinearSpec; 3] = expert_linears("w1", "w3", "w2");

/// An expert's gated MLP (gate, up, down) under the given module names: one expert's width, no
/// biases; split for tensor parallelism as the dense MLP is.
pub(super) const fn expert_linears(gate: &'static str, up: &'static str, down: &'static str) -> [LinearSpec; 3] {
    use Dim::*;
    use LinearRole::*;
    let b = Bias::Never;
    [
        LinearSpec { role: Gate, module: gate, out_dim: ExpertIntermediate, in_dim: Hidden, bias: b, split: Split::Column },
        LinearSpec { role: Up, module: up, out_dim: ExpertIntermediate, in_dim: Hidden, bias: b, split: Split::Column },
        LinearSpec { role: Down, module: down, out_dim: Hidden, in_dim: ExpertIntermediate, bias: b, split: Split::Row },
    ]
}
