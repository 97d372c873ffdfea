//! Architecture descriptors: what a model family's checkpoint and blocks look like, as data.
//!
//! One file per architecture builds one [`ArchDescriptor`]; [`descriptor_for`] is the registry, keyed
//! by config.json's `model_type`. The rest of the system (the forward pass, the AWQ engine, the
//! tensor-parallel splitter) walks the descriptor and never asks which architecture it has: tensor
//! names come from [`ArchDescriptor::linear_name`] and friends, so code passes `(block_idx,
//! LinearRole)`, never strings.
//!
//! `llama.rs` spells out the Llama block in full; a family built on it (`mistral.rs`, `qwen2.rs`,
//! `qwen3.rs`, `phi3.rs`) is Llama's descriptor plus its differences, by struct update (`ArchDescriptor {
//! model_type: "mistral", ..LLAMA }`). Adding an architecture: one file here, one line in [`REGISTRY`], its
//! values in `descriptors_hold_exactly_these_values` (which pins every descriptor), and the
//! synthetic round-trip test in `model/tests/checkpoint.rs` covers it automatically.
//!
//! Where a family's block computes differently from Llama's, the difference is data too: the norms
//! it has ([`NormRole`]: Qwen3's per-head q/k norms, Gemma 3's norms of the attention's and the MLP's
//! outputs), how every norm applies its weight ([`NormForm`]: Gemma's `1 + w`), which blocks attend
//! through a sliding window ([`WindowedBlocks`]), the attention scores' scale ([`AttentionScale`])
//! and the embeddings' ([`EmbedScale`]). The forward passes (the worker's `block_forward`, the
//! serving runner) read these values; none of them asks which architecture it runs.
//!
//! Fused storage (Phi-3's `qkv_proj`, `gate_up_proj`) is a checkpoint-format matter only: the
//! descriptor's [`FusedLinear`]s say which roles share one stored tensor and in which row order;
//! readers take a role's rows of it ([`ArchDescriptor::stored_rows`]) and writers concatenate the
//! parts again ([`ArchDescriptor::stored_linears`]). Everything in between (the forward pass, AWQ's
//! scaling groups and clipping, tensor parallelism) sees the seven roles apart.
//!
//! Mixture-of-experts families (`mixtral.rs`, `qwen3_moe.rs`) add a [`MoeSpec`]: a sparse block's MLP
//! is a router (never quantized) and `n_experts` gated MLPs of its own, each expert's linears named
//! by a [`LinearId`] (a role and the expert's index; the dense roles convert into one), which every
//! name and shape function takes. Which blocks are sparse, how many experts there are and how many
//! each token uses are config.json's ([`crate::MoeConfig`]); the block's linears
//! ([`ArchDescriptor::block_linears`]) and AWQ scaling groups ([`ArchDescriptor::block_groups`]: the
//! descriptor's [`ScalingGroup`]s with their [`Experts`] scope spelled out per expert) follow from it.

mod gemma3;
mod llama;
mod mistral;
mod mixtral;
mod phi3;
mod qwen2;
mod qwen3;
mod qwen3_moe;

use std::ops::Range;
use std::path::Path;

use awq_kernels::DType;

use crate::config::LayerType;
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

/// One linear of a block: its role, and in a mixture-of-experts block's MLP the expert it belongs to
/// (`expert: Some(e)`, roles `Gate`, `Up` and `Down` only). The dense roles convert into one, so
/// every function that names or sizes a linear takes `impl Into<LinearId>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinearId {
    pub role: LinearRole,
    pub expert: Option<usize>,
}

impl LinearId {
    /// Linear `role` (`Gate`, `Up` or `Down`) of expert `expert`.
    ///
    /// # Panics
    /// For an attention role: experts are gated MLPs.
    pub fn expert(expert: usize, role: LinearRole) -> LinearId {
        assert!(EXPERT_ROLES.contains(&role), "experts have no {role:?} linear");
        LinearId { role, expert: Some(expert) }
    }
}

impl From<LinearRole> for LinearId {
    fn from(role: LinearRole) -> LinearId {
        LinearId { role, expert: None }
    }
}

/// `Q`, ..., `Down` for a block's own linears, `experts.3.Down` for an expert's (reports, messages).
impl std::fmt::Display for LinearId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.expert {
            None => write!(f, "{:?}", self.role),
            Some(e) => write!(f, "experts.{e}.{:?}", self.role),
        }
    }
}

/// The roles of an expert's gated MLP, in block order.
pub const EXPERT_ROLES: [LinearRole; 3] = [LinearRole::Gate, LinearRole::Up, LinearRole::Down];

/// The norms of a decoder block. Every architecture has `Attn` and `Mlp`; the per-head norms only
/// where its descriptor lists them ([`ArchDescriptor::has_norm`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NormRole {
    /// Before attention (`input_layernorm`).
    Attn,
    /// Before the MLP (`post_attention_layernorm` in Llama's naming).
    Mlp,
    /// Each query head on its own, after q_proj and before RoPE (Qwen3's `self_attn.q_norm`): an
    /// RMSNorm over `head_dim` values whose weight all heads share.
    QHead,
    /// Each key head likewise, after k_proj and before RoPE (`self_attn.k_norm`).
    KHead,
    /// The attention's output, after o_proj and before the residual add (Gemma 3's
    /// `post_attention_layernorm`, a name Llama gives its `Mlp` norm).
    AttnOut,
    /// The MLP's output, after down_proj and before the residual add (Gemma 3's
    /// `post_feedforward_layernorm`).
    MlpOut,
}

impl NormRole {
    pub const ALL: [NormRole; 6] =
        [NormRole::Attn, NormRole::Mlp, NormRole::QHead, NormRole::KHead, NormRole::AttnOut, NormRole::MlpOut];

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
    /// One head: `head_dim`.
    HeadDim,
    /// One expert's MLP width (`ModelConfig::moe`: Mixtral's `intermediate_size`, Qwen3-MoE's
    /// `moe_intermediate_size`).
    ExpertIntermediate,
}

impl Dim {
    pub fn resolve(self, c: &ModelConfig) -> usize {
        match self {
            Dim::Hidden => c.hidden_size,
            Dim::Intermediate => c.intermediate_size,
            Dim::QHeads => c.q_dim(),
            Dim::KvHeads => c.kv_dim(),
            Dim::HeadDim => c.head_dim,
            Dim::ExpertIntermediate => {
                let moe = c.moe.as_ref().expect("ModelConfig::parse reads the MoE fields of architectures with experts");
                moe.expert_intermediate_size
            }
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
    /// Module path inside the block, e.g. `self_attn.q_proj`: of the stored tensor, which a fused role
    /// shares with the other parts of its [`FusedLinear`] (Phi-3's q: `self_attn.qkv_proj`).
    pub module: &'static str,
    pub out_dim: Dim,
    pub in_dim: Dim,
    pub bias: Bias,
    pub split: Split,
}

/// Linears a checkpoint stores as one tensor under `module`: the weights of `parts`, in this order,
/// concatenated along the output dimension (the rows of `weight` and of a bias; the last axis of an
/// AWQ `qweight`, `qzeros` and `scales`). Phi-3's `self_attn.qkv_proj` holds q, k, v; its
/// `mlp.gate_up_proj` gate, up. The parts share their input, bias rule and module
/// (`LinearSpec::module`).
#[derive(Clone, Copy, Debug)]
pub struct FusedLinear {
    pub module: &'static str,
    pub parts: &'static [LinearRole],
}

/// One norm of a block.
#[derive(Clone, Copy, Debug)]
pub struct NormSpec {
    pub role: NormRole,
    pub module: &'static str,
    /// The length of its weight: the hidden size, or one head's for a per-head norm.
    pub dim: Dim,
}

/// How an RMSNorm applies its weight `w` to the normalised values `y`: the same form for every norm
/// of a model (the blocks', the per-head ones, the final norm).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormForm {
    /// `y * w` (Llama's `LlamaRMSNorm`).
    Plain,
    /// `y * (1 + w)` (Gemma's `Gemma3RMSNorm`: weights stored as offsets from 1). Folding an AWQ
    /// scale `s` into such a norm divides the factor it applies, so the stored weight becomes
    /// `(1 + w) / s - 1` (AutoAWQ's `scale_ln_fcs` for its Gemma norms: `weight += 1; weight /= s;
    /// weight -= 1`).
    OnePlus,
}

/// Which blocks config.json's `sliding_window` restricts to the last `sliding_window` positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowedBlocks {
    /// None: the field is ignored (Llama; Qwen2's and Qwen3's window applies only with
    /// `use_sliding_window`, off in every released model).
    None,
    /// Every block (Mistral, Phi-3), all with the model's one RoPE.
    All,
    /// The blocks whose layer type is `sliding_attention` ([`ModelConfig::layer_types`]), which rotate
    /// with a RoPE of their own ([`ModelConfig::sliding_rope`]: Gemma 3's `rope_local_base_freq`);
    /// the `full_attention` blocks attend to every position with the global RoPE.
    SlidingAttention,
}

/// The factor of the attention scores `q k^T`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionScale {
    /// `1 / sqrt(head_dim)`.
    InvSqrtHeadDim,
    /// `1 / sqrt(query_pre_attn_scalar)` (Gemma; [`ModelConfig::query_pre_attn_scalar`]).
    InvSqrtQueryPreAttnScalar,
}

/// What multiplies the token embeddings before the first block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmbedScale {
    /// Nothing.
    One,
    /// `sqrt(hidden_size)` (Gemma's `Gemma3TextScaledWordEmbedding`); the LM head, tied to the same
    /// table, is not scaled.
    SqrtHidden,
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

/// Whose linears a scaling group's roles name in a mixture-of-experts block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Experts {
    /// The block's own linears (attention; a dense block's MLP).
    None,
    /// The roles of every expert, in one group (their shared input: the MoE's, after its norm).
    All,
    /// One group per expert, its roles and its `prev` that expert's.
    Each,
}

/// A set of linears that share an input and so share AWQ scales (AutoAWQ's `get_layers_for_scaling`).
#[derive(Clone, Copy, Debug)]
pub struct ScalingGroup {
    pub prev: Prev,
    pub linears: &'static [LinearRole],
    pub inspect: Inspect,
    pub when: When,
    pub experts: Experts,
}

/// A scaling group of one block, every linear named ([`ArchDescriptor::block_groups`]): what the
/// AWQ engine walks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockGroup {
    pub prev: BlockPrev,
    pub linears: Vec<LinearId>,
    pub inspect: BlockInspect,
}

/// [`Prev`] of one block's group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockPrev {
    Norm(NormRole),
    Linear(LinearId),
}

/// [`Inspect`] of one block's group: `Mlp` is a sparse block's whole mixture of experts (router
/// included) where the block has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockInspect {
    Attention,
    Mlp,
    Linear(LinearId),
}

/// A mixture-of-experts MLP (Mixtral's `block_sparse_moe`, Qwen3-MoE's sparse `mlp`): a router
/// linear `[n_experts, hidden]` scores each token's experts (softmax over all of them, the top
/// `num_experts_per_tok` kept, renormalised by [`Renormalize`]); each chosen expert, a gated MLP of
/// its own, runs on the token and the outputs are summed, weighted by those probabilities.
#[derive(Debug)]
pub struct MoeSpec {
    /// The router's module inside the block (`block_sparse_moe.gate`): one weight, no bias, kept in
    /// f16 by AWQ (never quantized: [`NotConvert`] names it for loaders).
    pub router: &'static str,
    /// Where the experts live inside the block: expert `e`'s linears under `{experts}.{e}.{module}`.
    pub experts: &'static str,
    /// Each expert's linears, by role (`Gate`, `Up`, `Down`), with `module` the name under the
    /// expert (Mixtral's `w1`, `w3`, `w2`).
    pub expert_linears: &'static [LinearSpec; 3],
    /// config.json's names of the expert count, either of which it may use (transformers 5 writes
    /// `num_local_experts` for Qwen3-MoE too); both stated must agree.
    pub n_experts_fields: [&'static str; 2],
    /// config.json's field of one expert's MLP width.
    pub expert_intermediate_field: &'static str,
    pub renormalize: Renormalize,
    pub sparse_blocks: SparseBlocks,
    /// The scaling groups of a sparse block (a dense one has [`ArchDescriptor::scaling_groups`]).
    pub scaling_groups: &'static [ScalingGroup],
    /// Whether AWQ's clip search runs on the experts' linears (AutoAWQ skips every linear whose
    /// name contains `k_`: all of Mixtral's `block_sparse_moe.*`).
    pub clip_experts: bool,
    /// What `quantization_config.modules_to_not_convert` says, so that loaders keep the router
    /// unquantized.
    pub not_convert: NotConvert,
}

/// Whether the top-k routing weights are divided by their sum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renormalize {
    /// Always (Mixtral).
    Always,
    /// When config.json's `norm_topk_prob` says so (default false; Qwen3-MoE).
    IfNormTopkProb,
}

/// Which blocks have the mixture of experts; the others have the dense gated MLP of
/// `intermediate_size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SparseBlocks {
    /// Every block (Mixtral).
    All,
    /// Block `i` unless config.json's `mlp_only_layers` lists it, when `(i + 1) %
    /// decoder_sparse_step == 0` and there is at least one expert (Qwen3-MoE's rule; defaults `[]`
    /// and 1).
    StepExceptMlpOnly,
}

/// How `modules_to_not_convert` names the routers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotConvert {
    /// These names, as AutoAWQ writes them (Mixtral's `["gate"]`: no other module of the block
    /// has `gate` in its name).
    Names(&'static [&'static str]),
    /// Each sparse block's router by its full module path (`model.layers.3.mlp.gate`): loaders
    /// match these names as substrings or prefixes (transformers 4, vLLM) or suffixes
    /// (transformers 5), and a bare `gate` would match every `gate_proj` too.
    RouterPaths,
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
    /// The block's norms, in [`NormRole`] order: `Attn` and `Mlp` always, the per-head ones and the
    /// output ones where the architecture has them.
    pub norms: &'static [NormSpec],
    /// How every norm of the model applies its weight.
    pub norm_form: NormForm,
    pub linears: &'static [LinearSpec],
    /// Roles stored together in one tensor (Phi-3's `qkv_proj`, `gate_up_proj`); every other role has a
    /// tensor of its own.
    pub fused: &'static [FusedLinear],
    pub scaling_groups: &'static [ScalingGroup],
    /// Linears AWQ's clip search leaves alone (AutoAWQ skips q and k: clipping them distorts the
    /// attention logits more than it saves).
    pub clip_skip: &'static [LinearRole],
    /// Which blocks config.json's `sliding_window` restricts in this family.
    pub windowed_blocks: WindowedBlocks,
    pub attention_scale: AttentionScale,
    pub embed_scale: EmbedScale,
    /// The 16-bit dtype a GPU computes this family in unless told otherwise: f16 (AutoAWQ's and
    /// vLLM's default for AWQ models), or bf16 where a trained model's activations outgrow f16's
    /// range (Gemma: its residual stream reaches past 65504, which is why vLLM refuses f16 for
    /// Gemma 2 and 3). The CPU computes in f32 whatever this says.
    pub gpu_dtype: DType,
    /// What config.json may leave out, as this family's transformers config class fills it in.
    pub config_defaults: ConfigDefaults,
    /// The mixture of experts of the sparse blocks, for families that have one.
    pub moe: Option<&'static MoeSpec>,
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
    pub head_dim: HeadDimDefault,
    /// `sliding_window` when the field is absent; an explicit `null` is no window.
    pub sliding_window: Option<usize>,
    /// Every `sliding_window_pattern`-th block is a `full_attention` one, the others
    /// `sliding_attention`, when config.json states neither `layer_types` nor the pattern
    /// (Gemma3TextConfig's 6); `None`: every block is `full_attention`.
    pub sliding_window_pattern: Option<usize>,
    /// The RoPE base of `sliding_attention` blocks where they have their own
    /// ([`WindowedBlocks::SlidingAttention`]) and config.json does not state it (4.x:
    /// `rope_local_base_freq`; 5.x: `rope_parameters.sliding_attention.rope_theta`); `None`: required,
    /// or (other families) not a field at all.
    pub rope_local_base_freq: Option<f64>,
    /// `query_pre_attn_scalar` where the attention is scaled by it
    /// ([`AttentionScale::InvSqrtQueryPreAttnScalar`]) and config.json omits it; `None`: required, or
    /// (other families) not a field at all.
    pub query_pre_attn_scalar: Option<f64>,
}

/// What a missing `num_key_value_heads` means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvHeadsDefault {
    /// As many as attention heads: no grouped-query attention (LlamaConfig's rule for old configs).
    AttentionHeads,
    /// An error: the class's default is its reference model's size (MistralConfig 8, Qwen2Config 32).
    Required,
}

/// What a missing (or null) `head_dim` means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadDimDefault {
    /// `hidden_size / num_attention_heads` (LlamaConfig's and MistralConfig's `head_dim=None`;
    /// Qwen2's attention takes `getattr(config, "head_dim", None) or ...`).
    HiddenOverHeads,
    /// An error: the class's default is its reference model's size (Qwen3Config 128, Qwen3-8B's).
    Required,
}

impl ArchDescriptor {
    pub fn linear(&self, role: LinearRole) -> &LinearSpec {
        self.linears.iter().find(|l| l.role == role).expect("every descriptor lists all seven linear roles")
    }

    /// Whether a block of this architecture has the norm `role` (every one has `Attn` and `Mlp`).
    pub fn has_norm(&self, role: NormRole) -> bool {
        self.norms.iter().any(|n| n.role == role)
    }

    /// # Panics
    /// When the architecture has no such norm ([`ArchDescriptor::has_norm`]).
    pub fn norm(&self, role: NormRole) -> &NormSpec {
        self.norms
            .iter()
            .find(|n| n.role == role)
            .unwrap_or_else(|| panic!("{} blocks have no {role:?} norm", self.model_type))
    }

    /// The roles stored in the same tensor as `role`, in row order: `[role]` unless it is part of a
    /// [`FusedLinear`].
    pub fn stored_parts(&self, role: LinearRole) -> &'static [LinearRole] {
        // One-role slices that outlive `self`.
        static ALONE: [LinearRole; 7] = LinearRole::ALL;
        match self.fused.iter().find(|f| f.parts.contains(&role)) {
            Some(f) => f.parts,
            None => std::slice::from_ref(&ALONE[role.index()]),
        }
    }

    /// The linears as the checkpoint stores them, in block order: the roles of each stored tensor
    /// ([`ArchDescriptor::stored_parts`]), named by the first (`linear_name(b, parts[0])`).
    pub fn stored_linears(&self) -> impl Iterator<Item = &'static [LinearRole]> + '_ {
        LinearRole::ALL.into_iter().filter(|&r| self.stored_parts(r)[0] == r).map(|r| self.stored_parts(r))
    }

    /// `id`'s rows of its stored tensor's `[out, in]` weight (and of its bias): all of them unless
    /// fused (experts never are).
    pub fn stored_rows(&self, id: impl Into<LinearId>, config: &ModelConfig) -> Range<usize> {
        let id = id.into();
        if id.expert.is_some() {
            return 0..self.linear_spec(id).out_dim.resolve(config);
        }
        let parts = self.stored_parts(id.role);
        let before =
            parts.iter().take_while(|&&r| r != id.role).map(|&r| self.linear(r).out_dim.resolve(config)).sum();
        before..before + self.linear(id.role).out_dim.resolve(config)
    }

    /// `[out, in]` of the tensor that stores `id`: the sum of its parts' outputs, their common input.
    pub fn stored_shape(&self, id: impl Into<LinearId>, config: &ModelConfig) -> [usize; 2] {
        let id = id.into();
        if id.expert.is_some() {
            return self.linear_shape(id, config);
        }
        let parts = self.stored_parts(id.role);
        let out = parts.iter().map(|&r| self.linear(r).out_dim.resolve(config)).sum();
        [out, self.linear(id.role).in_dim.resolve(config)]
    }

    /// The spec of linear `id`: the block's own ([`ArchDescriptor::linear`]) or an expert's
    /// ([`MoeSpec::expert_linears`]).
    ///
    /// # Panics
    /// For an expert of an architecture without experts.
    pub fn linear_spec(&self, id: impl Into<LinearId>) -> &LinearSpec {
        let id = id.into();
        match id.expert {
            None => self.linear(id.role),
            Some(_) => {
                let moe = self.moe.unwrap_or_else(|| panic!("{} blocks have no experts", self.model_type));
                moe.expert_linears.iter().find(|l| l.role == id.role).expect("experts have gate, up and down")
            }
        }
    }

    /// The module path of linear `id` inside block `block_idx`: `{block_prefix}.{block_idx}.{module}`,
    /// or `{block_prefix}.{block_idx}.{experts}.{e}.{module}` for expert `e`'s.
    fn linear_module(&self, block_idx: usize, id: LinearId) -> String {
        let module = self.linear_spec(id).module;
        match (id.expert, self.moe) {
            (Some(e), Some(moe)) => format!("{}.{block_idx}.{}.{e}.{module}", self.block_prefix, moe.experts),
            _ => format!("{}.{block_idx}.{module}", self.block_prefix),
        }
    }

    /// `{module}.weight` of linear `id` of block `block_idx`: the stored tensor, which a fused role
    /// shares with its other parts ([`ArchDescriptor::stored_rows`] says which rows are its own).
    pub fn linear_name(&self, block_idx: usize, id: impl Into<LinearId>) -> String {
        format!("{}.weight", self.linear_module(block_idx, id.into()))
    }

    /// `{module}.{part}` for the packed parts of a quantized linear (`qweight`, `qzeros`, `scales`),
    /// stored as the weight is (fused roles share them).
    pub fn packed_name(&self, block_idx: usize, id: impl Into<LinearId>, part: &str) -> String {
        format!("{}.{part}", self.linear_module(block_idx, id.into()))
    }

    /// `{module}.bias`, stored as the weight is (fused roles share it).
    pub fn bias_name(&self, block_idx: usize, id: impl Into<LinearId>) -> String {
        format!("{}.bias", self.linear_module(block_idx, id.into()))
    }

    /// The router's weight of sparse block `block_idx` (`{block_prefix}.{block_idx}.{router}.weight`).
    ///
    /// # Panics
    /// For an architecture without experts.
    pub fn router_name(&self, block_idx: usize) -> String {
        let moe = self.moe.unwrap_or_else(|| panic!("{} blocks have no router", self.model_type));
        format!("{}.{block_idx}.{}.weight", self.block_prefix, moe.router)
    }

    /// Whether block `block_idx` has the mixture of experts under `config` (never, for a family
    /// without one).
    pub fn is_sparse(&self, config: &ModelConfig, block_idx: usize) -> bool {
        self.moe.is_some() && config.moe.as_ref().is_some_and(|m| m.is_sparse(block_idx))
    }

    /// The linears of block `block_idx`, in block order: q, k, v, o, then gate, up and down, or in
    /// a sparse block each expert's gate, up and down, expert by expert.
    pub fn block_linears(&self, config: &ModelConfig, block_idx: usize) -> Vec<LinearId> {
        use LinearRole::*;
        let mut ids: Vec<LinearId> = [Q, K, V, O].into_iter().map(LinearId::from).collect();
        match (self.is_sparse(config, block_idx), &config.moe) {
            (true, Some(moe)) => {
                ids.extend((0..moe.n_experts).flat_map(|e| EXPERT_ROLES.map(|r| LinearId::expert(e, r))))
            }
            _ => ids.extend(EXPERT_ROLES.map(LinearId::from)),
        }
        ids
    }

    /// The linears of block `block_idx` as the checkpoint stores them, in block order: the parts of
    /// each stored tensor (several for a [`FusedLinear`]), named by the first.
    pub fn block_stored(&self, config: &ModelConfig, block_idx: usize) -> Vec<Vec<LinearId>> {
        let sparse = self.is_sparse(config, block_idx);
        let mut stored: Vec<Vec<LinearId>> = self
            .stored_linears()
            .filter(|parts| !(sparse && EXPERT_ROLES.contains(&parts[0])))
            .map(|parts| parts.iter().map(|&r| LinearId::from(r)).collect())
            .collect();
        if sparse {
            let experts = self.block_linears(config, block_idx).into_iter().filter(|id| id.expert.is_some());
            stored.extend(experts.map(|id| vec![id]));
        }
        stored
    }

    /// Whether AWQ's clip search runs on linear `id` ([`ArchDescriptor::clip_skip`],
    /// [`MoeSpec::clip_experts`]).
    pub fn clips(&self, id: impl Into<LinearId>) -> bool {
        let id = id.into();
        match id.expert {
            None => !self.clip_skip.contains(&id.role),
            Some(_) => self.moe.is_some_and(|m| m.clip_experts),
        }
    }

    /// The scaling groups of block `block_idx` under `config`, every linear named: the descriptor's
    /// (a sparse block's [`MoeSpec::scaling_groups`]) with [`Experts::All`] spelled out over every
    /// expert and [`Experts::Each`] into one group per expert, and the groups whose [`When`] does
    /// not hold left out.
    pub fn block_groups(&self, config: &ModelConfig, block_idx: usize) -> Vec<BlockGroup> {
        let (groups, n_experts) = match (self.is_sparse(config, block_idx), self.moe, &config.moe) {
            (true, Some(spec), Some(moe)) => (spec.scaling_groups, moe.n_experts),
            _ => (self.scaling_groups, 0),
        };
        let applies = |g: &ScalingGroup| match g.when {
            When::Always => true,
            When::SameShape(a, b) => self.linear_shape(a, config) == self.linear_shape(b, config),
        };
        let mut out = Vec::new();
        for g in groups.iter().filter(|g| applies(g)) {
            let group = |expert: Option<usize>, linears: Vec<LinearId>| {
                let id = |role| LinearId { role, expert };
                BlockGroup {
                    prev: match g.prev {
                        Prev::Norm(n) => BlockPrev::Norm(n),
                        Prev::Linear(r) => BlockPrev::Linear(id(r)),
                    },
                    linears,
                    inspect: match g.inspect {
                        Inspect::Attention => BlockInspect::Attention,
                        Inspect::Mlp => BlockInspect::Mlp,
                        Inspect::Linear(r) => BlockInspect::Linear(id(r)),
                    },
                }
            };
            match g.experts {
                Experts::None => out.push(group(None, g.linears.iter().map(|&r| LinearId::from(r)).collect())),
                Experts::All => out.push(group(
                    None,
                    (0..n_experts).flat_map(|e| g.linears.iter().map(move |&r| LinearId::expert(e, r))).collect(),
                )),
                Experts::Each => {
                    for e in 0..n_experts {
                        out.push(group(Some(e), g.linears.iter().map(|&r| LinearId::expert(e, r)).collect()));
                    }
                }
            }
        }
        out
    }

    /// `quantization_config.modules_to_not_convert` of an AWQ checkpoint of this architecture under
    /// `config`: the routers of the sparse blocks ([`NotConvert`]); `None` without experts.
    pub fn modules_to_not_convert(&self, config: &ModelConfig) -> Option<Vec<String>> {
        let moe = self.moe?;
        Some(match moe.not_convert {
            NotConvert::Names(names) => names.iter().map(|n| n.to_string()).collect(),
            NotConvert::RouterPaths => (0..config.n_blocks)
                .filter(|&b| self.is_sparse(config, b))
                .map(|b| format!("{}.{b}.{}", self.block_prefix, moe.router))
                .collect(),
        })
    }

    /// # Panics
    /// As [`ArchDescriptor::norm`].
    pub fn norm_name(&self, block_idx: usize, role: NormRole) -> String {
        format!("{}.{block_idx}.{}.weight", self.block_prefix, self.norm(role).module)
    }

    /// The length of a norm's weight under `config`.
    ///
    /// # Panics
    /// As [`ArchDescriptor::norm`].
    pub fn norm_len(&self, role: NormRole, config: &ModelConfig) -> usize {
        self.norm(role).dim.resolve(config)
    }

    /// `[out, in]` of a linear's weight under `config`.
    pub fn linear_shape(&self, id: impl Into<LinearId>, config: &ModelConfig) -> [usize; 2] {
        let spec = self.linear_spec(id);
        [spec.out_dim.resolve(config), spec.in_dim.resolve(config)]
    }

    pub fn has_bias(&self, id: impl Into<LinearId>, config: &ModelConfig) -> bool {
        match self.linear_spec(id).bias {
            Bias::Never => false,
            Bias::Always => true,
            Bias::IfAttentionBias => config.attention_bias,
            Bias::IfMlpBias => config.mlp_bias,
        }
    }

    /// The sliding window of block `block_idx` under `config`, if any ([`WindowedBlocks`]).
    pub fn sliding_window(&self, config: &ModelConfig, block_idx: usize) -> Option<usize> {
        match self.windowed_blocks {
            WindowedBlocks::None => None,
            WindowedBlocks::All => config.sliding_window,
            WindowedBlocks::SlidingAttention => match config.layer_types.of(block_idx) {
                LayerType::Sliding => config.sliding_window,
                LayerType::Full => None,
            },
        }
    }

    /// The attention scores' factor under `config` ([`AttentionScale`]), rounded to f32 once.
    pub fn score_scale(&self, config: &ModelConfig) -> f32 {
        match self.attention_scale {
            AttentionScale::InvSqrtHeadDim => 1.0 / (config.head_dim as f32).sqrt(),
            AttentionScale::InvSqrtQueryPreAttnScalar => {
                let scalar = config
                    .query_pre_attn_scalar
                    .expect("ModelConfig::parse reads query_pre_attn_scalar for the architectures scaled by it");
                scalar.powf(-0.5) as f32
            }
        }
    }

    /// The factor of the token embeddings under `config` ([`EmbedScale`]): `sqrt(hidden_size)` rounded
    /// to f32 once, as check-model.py's `np.float32(hidden ** 0.5)`.
    pub fn embedding_scale(&self, config: &ModelConfig) -> f32 {
        match self.embed_scale {
            EmbedScale::One => 1.0,
            EmbedScale::SqrtHidden => (config.hidden_size as f64).sqrt() as f32,
        }
    }
}

/// Every supported architecture, keyed by `model_type`.
pub const REGISTRY: &[&ArchDescriptor] = &[
    &llama::LLAMA,
    &mistral::MISTRAL,
    &qwen2::QWEN2,
    &qwen3::QWEN3,
    &phi3::PHI3,
    &gemma3::GEMMA3_TEXT,
    &mixtral::MIXTRAL,
    &qwen3_moe::QWEN3_MOE,
];

/// The descriptor for config.json's `model_type`; `path` names config.json in the error.
pub fn descriptor_for(model_type: &str, path: &Path) -> Result<&'static ArchDescriptor> {
    REGISTRY.iter().copied().find(|d| d.model_type == model_type).ok_or_else(|| Error::UnsupportedArchitecture {
        path: path.into(),
        model_type: model_type.into(),
        supported: REGISTRY.iter().map(|d| d.model_type).collect::<Vec<_>>().join(", "),
    })
}

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
            // Attn and Mlp in every block, each role at most once, in role order (the order of a block's
            // norms in manifests and weights).
            assert!(d.has_norm(NormRole::Attn) && d.has_norm(NormRole::Mlp), "{}", d.model_type);
            assert!(d.norms.windows(2).all(|w| w[0].role < w[1].role), "{}", d.model_type);
            // The forward pass normalises q's and k's heads together or not at all, and both
            // sublayers' outputs or neither.
            assert_eq!(d.has_norm(NormRole::QHead), d.has_norm(NormRole::KHead), "{}", d.model_type);
            assert_eq!(d.has_norm(NormRole::AttnOut), d.has_norm(NormRole::MlpOut), "{}", d.model_type);
            // Output norms and per-head norms are never a scaling group's `prev`: AWQ does not scale them.
            for g in d.scaling_groups {
                let scalable = matches!(g.prev, Prev::Linear(_) | Prev::Norm(NormRole::Attn | NormRole::Mlp));
                assert!(scalable, "{}", d.model_type);
            }
            // Fused parts: two or more roles, each in one fused linear only, under its module, with
            // one input and one bias rule (readers and writers split and join them along the output
            // only). Roles apart from each other never share a module: a stored name is one tensor.
            for f in d.fused {
                assert!(f.parts.len() >= 2, "{} {}", d.model_type, f.module);
                for &r in f.parts {
                    let (l, first) = (d.linear(r), d.linear(f.parts[0]));
                    assert_eq!(l.module, f.module, "{} {r:?}", d.model_type);
                    assert_eq!((l.in_dim, l.bias), (first.in_dim, first.bias), "{} {r:?}", f.module);
                    assert_eq!(d.fused.iter().filter(|g| g.parts.contains(&r)).count(), 1, "{} {r:?}", d.model_type);
                }
            }
            for a in LinearRole::ALL {
                for b in LinearRole::ALL {
                    let same_module = d.linear(a).module == d.linear(b).module;
                    assert_eq!(same_module, d.stored_parts(a) == d.stored_parts(b), "{} {a:?} {b:?}", d.model_type);
                }
            }
            assert_eq!(d.stored_linears().flatten().copied().collect::<Vec<_>>(), LinearRole::ALL, "{}", d.model_type);
        }
        let err = descriptor_for("gpt2", Path::new("x/config.json")).unwrap_err().to_string();
        let supported = "(supported: llama, mistral, qwen2, qwen3, phi3, gemma3_text, mixtral, qwen3_moe)";
        assert_eq!(err, format!("x/config.json: model_type `gpt2` is not supported {supported}"));
        assert_eq!(llama::LLAMA.linear_name(3, LinearRole::Down), "model.layers.3.mlp.down_proj.weight");
    }

    /// Where each role of a fused tensor lives: its rows, the stored shape and name (Phi-3-medium's
    /// sizes: 40 heads and 10 KV heads of 128, hidden 5120, intermediate 17920).
    #[test]
    fn fused_roles_map_to_rows_of_one_stored_tensor() {
        let text = r#"{"model_type": "phi3", "hidden_size": 5120, "intermediate_size": 17920, "num_hidden_layers": 40,
            "num_attention_heads": 40, "num_key_value_heads": 10, "vocab_size": 32064}"#;
        let c = ModelConfig::parse(Path::new("config.json"), text).unwrap();
        let d = &phi3::PHI3;
        use LinearRole::*;
        let rows = |r| d.stored_rows(r, &c);
        assert_eq!([rows(Q), rows(K), rows(V)], [0..5120, 5120..6400, 6400..7680]);
        assert_eq!([rows(Gate), rows(Up), rows(O), rows(Down)], [0..17920, 17920..35840, 0..5120, 0..5120]);
        assert_eq!([d.stored_shape(K, &c), d.stored_shape(Up, &c)], [[7680, 5120], [35840, 5120]]);
        assert_eq!(d.stored_shape(Down, &c), d.linear_shape(Down, &c));
        assert_eq!(d.linear_name(7, V), "model.layers.7.self_attn.qkv_proj.weight");
        assert_eq!(d.packed_name(7, Gate, "scales"), "model.layers.7.mlp.gate_up_proj.scales");
        let stored: Vec<&[LinearRole]> = d.stored_linears().collect();
        assert_eq!(stored, [&[Q, K, V][..], &[O], &[Gate, Up], &[Down]]);
        assert_eq!(llama::LLAMA.stored_linears().count(), 7);
        assert_eq!(llama::LLAMA.stored_rows(K, &c), 0..1280);
    }

    /// Every value of a descriptor, one line per item, so that a change to any shows in a diff.
    fn table(d: &ArchDescriptor) -> Vec<String> {
        let mut lines = vec![
            format!("model_type {}", d.model_type),
            format!("names {} {} {} {}", d.block_prefix, d.embed_tokens, d.final_norm, d.lm_head),
        ];
        lines.extend(d.norms.iter().map(|n| format!("norm {:?} {} {:?}", n.role, n.module, n.dim)));
        lines.extend(
            d.linears.iter().map(|l| format!("linear {:?} {} {:?}x{:?} {:?} {:?}", l.role, l.module, l.out_dim, l.in_dim, l.bias, l.split)),
        );
        lines.push(format!("fused {:?}", d.fused));
        lines.extend(d.scaling_groups.iter().map(|g| format!("{g:?}")));
        lines.push(format!("clip_skip {:?}, windowed_blocks {:?}", d.clip_skip, d.windowed_blocks));
        let (form, scores, embed) = (d.norm_form, d.attention_scale, d.embed_scale);
        lines.push(format!("norm_form {form:?}, attention_scale {scores:?}, embed_scale {embed:?}, gpu_dtype {}", d.gpu_dtype));
        lines.push(format!("{:?}", d.config_defaults));
        match d.moe {
            None => lines.push("moe None".into()),
            Some(m) => {
                lines.push(format!("moe router {} experts {}", m.router, m.experts));
                lines.extend(m.expert_linears.iter().map(|l| {
                    let (module, dims) = (l.module, format!("{:?}x{:?}", l.out_dim, l.in_dim));
                    format!("expert {:?} {module} {dims} {:?} {:?}", l.role, l.bias, l.split)
                }));
                let (fields, width) = (m.n_experts_fields, m.expert_intermediate_field);
                let rules = format!("{:?}, {:?}, clip_experts {}", m.renormalize, m.sparse_blocks, m.clip_experts);
                lines.push(format!("moe fields {fields:?} {width}, {rules}, {:?}", m.not_convert));
                lines.extend(m.scaling_groups.iter().map(|g| format!("moe {g:?}")));
            }
        }
        lines
    }

    /// The lines of `other`'s table that differ from `base`'s, as (base, other) pairs.
    fn differences(base: &ArchDescriptor, other: &ArchDescriptor) -> Vec<(String, String)> {
        let (a, b) = (table(base), table(other));
        assert_eq!(a.len(), b.len(), "{} and {} list different numbers of items", base.model_type, other.model_type);
        a.into_iter().zip(b).filter(|(x, y)| x != y).collect()
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected.iter().map(|&(a, b)| (a.to_string(), b.to_string())).collect()
    }

    /// Pins every descriptor value: Llama's in full, the others' as their differences from Llama's
    /// (AutoAWQ's `MistralAWQForCausalLM`, `Qwen2AWQForCausalLM`, `Qwen3AWQForCausalLM` and
    /// `Phi3AWQForCausalLM` scale as Llama does; Qwen3's q/k norms are neither scaled nor quantized).
    #[test]
    fn descriptors_hold_exactly_these_values() {
        let groups = [
            "ScalingGroup { prev: Norm(Attn), linears: [Q, K, V], inspect: Attention, when: Always, experts: None }",
            "ScalingGroup { prev: Linear(V), linears: [O], inspect: Linear(O), when: SameShape(V, O), experts: None }",
            "ScalingGroup { prev: Norm(Mlp), linears: [Gate, Up], inspect: Mlp, when: Always, experts: None }",
            "ScalingGroup { prev: Linear(Up), linears: [Down], inspect: Linear(Down), when: Always, experts: None }",
        ];
        let mut llama = vec![
            "model_type llama",
            "names model.layers model.embed_tokens.weight model.norm.weight lm_head.weight",
            "norm Attn input_layernorm Hidden",
            "norm Mlp post_attention_layernorm Hidden",
            "linear Q self_attn.q_proj QHeadsxHidden IfAttentionBias Column",
            "linear K self_attn.k_proj KvHeadsxHidden IfAttentionBias Column",
            "linear V self_attn.v_proj KvHeadsxHidden IfAttentionBias Column",
            "linear O self_attn.o_proj HiddenxQHeads IfAttentionBias Row",
            "linear Gate mlp.gate_proj IntermediatexHidden IfMlpBias Column",
            "linear Up mlp.up_proj IntermediatexHidden IfMlpBias Column",
            "linear Down mlp.down_proj HiddenxIntermediate IfMlpBias Row",
        ];
        llama.push("fused []");
        llama.extend(groups);
        llama.push("clip_skip [Q, K], windowed_blocks None");
        llama.push("norm_form Plain, attention_scale InvSqrtHeadDim, embed_scale One, gpu_dtype f16");
        llama.push(
            "ConfigDefaults { rms_norm_eps: 1e-6, rope_theta: 10000.0, hidden_act: \"silu\", tie_word_embeddings: false, \
             num_key_value_heads: AttentionHeads, head_dim: HiddenOverHeads, sliding_window: None, \
             sliding_window_pattern: None, rope_local_base_freq: None, query_pre_attn_scalar: None }",
        );
        llama.push("moe None");
        assert_eq!(table(&llama::LLAMA), llama);
        let defaults_line = llama.len() - 2;

        let mistral_defaults = "ConfigDefaults { rms_norm_eps: 1e-6, rope_theta: 10000.0, hidden_act: \"silu\", \
                                tie_word_embeddings: false, num_key_value_heads: Required, head_dim: HiddenOverHeads, \
                                sliding_window: Some(4096), sliding_window_pattern: None, \
                                rope_local_base_freq: None, query_pre_attn_scalar: None }";
        assert_eq!(
            differences(&llama::LLAMA, &mistral::MISTRAL),
            pairs(&[
                ("model_type llama", "model_type mistral"),
                ("linear Q self_attn.q_proj QHeadsxHidden IfAttentionBias Column", "linear Q self_attn.q_proj QHeadsxHidden Never Column"),
                ("linear K self_attn.k_proj KvHeadsxHidden IfAttentionBias Column", "linear K self_attn.k_proj KvHeadsxHidden Never Column"),
                ("linear V self_attn.v_proj KvHeadsxHidden IfAttentionBias Column", "linear V self_attn.v_proj KvHeadsxHidden Never Column"),
                ("linear O self_attn.o_proj HiddenxQHeads IfAttentionBias Row", "linear O self_attn.o_proj HiddenxQHeads Never Row"),
                ("clip_skip [Q, K], windowed_blocks None", "clip_skip [Q, K], windowed_blocks All"),
                (llama[defaults_line], mistral_defaults),
            ])
        );
        let qwen2_defaults = "ConfigDefaults { rms_norm_eps: 1e-6, rope_theta: 10000.0, hidden_act: \"silu\", \
                              tie_word_embeddings: false, num_key_value_heads: Required, head_dim: HiddenOverHeads, \
                              sliding_window: None, sliding_window_pattern: None, rope_local_base_freq: None, \
                              query_pre_attn_scalar: None }";
        assert_eq!(
            differences(&llama::LLAMA, &qwen2::QWEN2),
            pairs(&[
                ("model_type llama", "model_type qwen2"),
                ("linear Q self_attn.q_proj QHeadsxHidden IfAttentionBias Column", "linear Q self_attn.q_proj QHeadsxHidden Always Column"),
                ("linear K self_attn.k_proj KvHeadsxHidden IfAttentionBias Column", "linear K self_attn.k_proj KvHeadsxHidden Always Column"),
                ("linear V self_attn.v_proj KvHeadsxHidden IfAttentionBias Column", "linear V self_attn.v_proj KvHeadsxHidden Always Column"),
                ("linear O self_attn.o_proj HiddenxQHeads IfAttentionBias Row", "linear O self_attn.o_proj HiddenxQHeads Never Row"),
                (llama[defaults_line], qwen2_defaults),
            ])
        );
        // Qwen3: Llama's table with the per-head q/k norms after the block's two, and head_dim required.
        let mut qwen3 = llama.clone();
        qwen3[0] = "model_type qwen3";
        qwen3.splice(4..4, ["norm QHead self_attn.q_norm HeadDim", "norm KHead self_attn.k_norm HeadDim"]);
        let n = qwen3.len();
        qwen3[n - 2] = "ConfigDefaults { rms_norm_eps: 1e-6, rope_theta: 10000.0, hidden_act: \"silu\", \
                                      tie_word_embeddings: false, num_key_value_heads: Required, head_dim: Required, \
                                      sliding_window: None, sliding_window_pattern: None, rope_local_base_freq: None, \
                                      query_pre_attn_scalar: None }";
        assert_eq!(table(&qwen3::QWEN3), qwen3);

        // Phi-3: q|k|v and gate|up stored fused, no biases, Llama's scaling groups (AutoAWQ's
        // Phi3AWQForCausalLM; see phi3.rs), clipping q and k too, a sliding window when config.json
        // sets one, rms_norm_eps 1e-5.
        let phi3_defaults = "ConfigDefaults { rms_norm_eps: 1e-5, rope_theta: 10000.0, hidden_act: \"silu\", \
                             tie_word_embeddings: false, num_key_value_heads: AttentionHeads, \
                             head_dim: HiddenOverHeads, sliding_window: None, sliding_window_pattern: None, \
                             rope_local_base_freq: None, query_pre_attn_scalar: None }";
        assert_eq!(
            differences(&llama::LLAMA, &phi3::PHI3),
            pairs(&[
                ("model_type llama", "model_type phi3"),
                ("linear Q self_attn.q_proj QHeadsxHidden IfAttentionBias Column", "linear Q self_attn.qkv_proj QHeadsxHidden Never Column"),
                ("linear K self_attn.k_proj KvHeadsxHidden IfAttentionBias Column", "linear K self_attn.qkv_proj KvHeadsxHidden Never Column"),
                ("linear V self_attn.v_proj KvHeadsxHidden IfAttentionBias Column", "linear V self_attn.qkv_proj KvHeadsxHidden Never Column"),
                ("linear O self_attn.o_proj HiddenxQHeads IfAttentionBias Row", "linear O self_attn.o_proj HiddenxQHeads Never Row"),
                ("linear Gate mlp.gate_proj IntermediatexHidden IfMlpBias Column", "linear Gate mlp.gate_up_proj IntermediatexHidden Never Column"),
                ("linear Up mlp.up_proj IntermediatexHidden IfMlpBias Column", "linear Up mlp.gate_up_proj IntermediatexHidden Never Column"),
                ("linear Down mlp.down_proj HiddenxIntermediate IfMlpBias Row", "linear Down mlp.down_proj HiddenxIntermediate Never Row"),
                (
                    "fused []",
                    "fused [FusedLinear { module: \"self_attn.qkv_proj\", parts: [Q, K, V] }, \
                     FusedLinear { module: \"mlp.gate_up_proj\", parts: [Gate, Up] }]",
                ),
                ("clip_skip [Q, K], windowed_blocks None", "clip_skip [], windowed_blocks All"),
                (llama[defaults_line], phi3_defaults),
            ])
        );

        // Gemma 3: Llama's linears (no MLP biases), its norms renamed and four more (the per-head
        // q/k norms, the attention's and the MLP's output norms), all `1 + w`; Llama's scaling groups
        // with the MLP's behind pre_feedforward_layernorm (AutoAWQ's Gemma2AWQForCausalLM; see
        // gemma3.rs); sliding-attention blocks, scores scaled by query_pre_attn_scalar, embeddings by
        // sqrt(hidden); Gemma3TextConfig's defaults.
        let gemma3_defaults = "ConfigDefaults { rms_norm_eps: 1e-6, rope_theta: 1000000.0, \
                               hidden_act: \"gelu_pytorch_tanh\", tie_word_embeddings: true, \
                               num_key_value_heads: Required, head_dim: Required, sliding_window: Some(4096), \
                               sliding_window_pattern: Some(6), rope_local_base_freq: Some(10000.0), \
                               query_pre_attn_scalar: Some(256.0) }";
        let mut gemma3 = llama.clone();
        gemma3[0] = "model_type gemma3_text";
        gemma3[3] = "norm Mlp pre_feedforward_layernorm Hidden";
        gemma3.splice(
            4..4,
            [
                "norm QHead self_attn.q_norm HeadDim",
                "norm KHead self_attn.k_norm HeadDim",
                "norm AttnOut post_attention_layernorm Hidden",
                "norm MlpOut post_feedforward_layernorm Hidden",
            ],
        );
        for (i, line) in [
            (12, "linear Gate mlp.gate_proj IntermediatexHidden Never Column"),
            (13, "linear Up mlp.up_proj IntermediatexHidden Never Column"),
            (14, "linear Down mlp.down_proj HiddenxIntermediate Never Row"),
        ] {
            gemma3[i] = line;
        }
        let n = gemma3.len();
        gemma3[n - 4] = "clip_skip [Q, K], windowed_blocks SlidingAttention";
        gemma3[n - 3] = "norm_form OnePlus, attention_scale InvSqrtQueryPreAttnScalar, embed_scale SqrtHidden, gpu_dtype bf16";
        gemma3[n - 2] = gemma3_defaults;
        assert_eq!(table(&gemma3::GEMMA3_TEXT), gemma3);

        // The mixture-of-experts families: the groups of a sparse block (AutoAWQ's
        // MixtralAWQForCausalLM and Qwen3MoeAWQForCausalLM; see mixtral.rs and qwen3_moe.rs).
        let moe_groups = [
            "moe ScalingGroup { prev: Norm(Attn), linears: [Q, K, V], inspect: Attention, when: Always, experts: None }",
            "moe ScalingGroup { prev: Linear(V), linears: [O], inspect: Linear(O), when: SameShape(V, O), experts: None }",
            "moe ScalingGroup { prev: Norm(Mlp), linears: [Gate, Up], inspect: Mlp, when: Always, experts: All }",
            "moe ScalingGroup { prev: Linear(Up), linears: [Down], inspect: Linear(Down), when: Always, experts: Each }",
        ];
        // Mixtral: Mistral's table, MixtralConfig's defaults, every block sparse, experts w1/w3/w2,
        // always renormalised, no expert clipped (AutoAWQ's `k_` in `block_sparse_moe`), ["gate"].
        let mut mixtral = table(&mistral::MISTRAL);
        mixtral[0] = "model_type mixtral".into();
        let n = mixtral.len();
        mixtral[n - 2] = "ConfigDefaults { rms_norm_eps: 1e-5, rope_theta: 1000000.0, hidden_act: \"silu\", \
                          tie_word_embeddings: false, num_key_value_heads: Required, head_dim: HiddenOverHeads, \
                          sliding_window: None, sliding_window_pattern: None, rope_local_base_freq: None, \
                          query_pre_attn_scalar: None }"
            .into();
        mixtral.pop();
        mixtral.extend([
            "moe router block_sparse_moe.gate experts block_sparse_moe.experts",
            "expert Gate w1 ExpertIntermediatexHidden Never Column",
            "expert Up w3 ExpertIntermediatexHidden Never Column",
            "expert Down w2 HiddenxExpertIntermediate Never Row",
            "moe fields [\"num_local_experts\", \"num_experts\"] intermediate_size, Always, All, clip_experts false, \
             Names([\"gate\"])",
        ].map(String::from));
        mixtral.extend(moe_groups.map(String::from));
        assert_eq!(table(&mixtral::MIXTRAL), mixtral);

        // Qwen3-MoE: Qwen3's table (head_dim defaulting to hidden / heads), experts under mlp.experts,
        // renormalised by norm_topk_prob, sparse by decoder_sparse_step and mlp_only_layers,
        // experts clipped, each router named by its path.
        let mut qwen3_moe = table(&qwen3::QWEN3);
        qwen3_moe[0] = "model_type qwen3_moe".into();
        let n = qwen3_moe.len();
        qwen3_moe[n - 2] = qwen3_moe[n - 2].replace("head_dim: Required", "head_dim: HiddenOverHeads");
        qwen3_moe.pop();
        qwen3_moe.extend([
            "moe router mlp.gate experts mlp.experts",
            "expert Gate gate_proj ExpertIntermediatexHidden Never Column",
            "expert Up up_proj ExpertIntermediatexHidden Never Column",
            "expert Down down_proj HiddenxExpertIntermediate Never Row",
            "moe fields [\"num_experts\", \"num_local_experts\"] moe_intermediate_size, IfNormTopkProb, \
             StepExceptMlpOnly, clip_experts true, RouterPaths",
        ].map(String::from));
        qwen3_moe.extend(moe_groups.map(String::from));
        assert_eq!(table(&qwen3_moe::QWEN3_MOE), qwen3_moe);
    }

    /// A Qwen3-MoE block's linears, names, groups and clipping, dense and sparse, from one config;
    /// Mixtral's names and `modules_to_not_convert`.
    #[test]
    fn moe_blocks_name_their_experts_and_expand_their_groups() {
        let text = r#"{"model_type": "qwen3_moe", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "num_experts": 3,
            "num_experts_per_tok": 2, "moe_intermediate_size": 64, "decoder_sparse_step": 2, "mlp_only_layers": [3]}"#;
        let c = ModelConfig::parse(Path::new("config.json"), text).unwrap();
        let d = &qwen3_moe::QWEN3_MOE;
        use LinearRole::*;
        let sparse: Vec<bool> = (0..4).map(|b| d.is_sparse(&c, b)).collect();
        assert_eq!(sparse, [false, true, false, false], "block 3 is listed in mlp_only_layers");
        assert_eq!(d.block_linears(&c, 0), [Q, K, V, O, Gate, Up, Down].map(LinearId::from));
        let sparse_linears = d.block_linears(&c, 1);
        assert_eq!(sparse_linears.len(), 4 + 3 * 3);
        assert_eq!(sparse_linears[4..7], [Gate, Up, Down].map(|r| LinearId::expert(0, r)));
        let e2_down = LinearId::expert(2, Down);
        assert_eq!(d.linear_name(1, e2_down), "model.layers.1.mlp.experts.2.down_proj.weight");
        assert_eq!(d.packed_name(1, e2_down, "qzeros"), "model.layers.1.mlp.experts.2.down_proj.qzeros");
        assert_eq!(d.linear_name(0, Down), "model.layers.0.mlp.down_proj.weight");
        assert_eq!(d.router_name(1), "model.layers.1.mlp.gate.weight");
        assert_eq!((d.linear_shape(e2_down, &c), d.linear_shape(Down, &c)), ([128, 64], [128, 256]));
        assert_eq!(e2_down.to_string(), "experts.2.Down");
        assert!(d.clips(e2_down) && !d.clips(K) && d.clips(O));
        let stored = d.block_stored(&c, 1);
        assert_eq!(stored.len(), 4 + 9);
        assert!(stored.iter().all(|parts| parts.len() == 1));

        let groups = d.block_groups(&c, 1);
        let shown: Vec<String> =
            groups.iter().map(|g| format!("{:?} {} {:?}", g.prev, g.linears.len(), g.inspect)).collect();
        assert_eq!(
            shown,
            [
                "Norm(Attn) 3 Attention",
                "Norm(Mlp) 6 Mlp",
                "Linear(LinearId { role: Up, expert: Some(0) }) 1 Linear(LinearId { role: Down, expert: Some(0) })",
                "Linear(LinearId { role: Up, expert: Some(1) }) 1 Linear(LinearId { role: Down, expert: Some(1) })",
                "Linear(LinearId { role: Up, expert: Some(2) }) 1 Linear(LinearId { role: Down, expert: Some(2) })",
            ],
            "v -> o is left out: 2 KV heads of 32 make v [64, 128], o [128, 128]"
        );
        let (e0, e1) = (|r| LinearId::expert(0, r), |r| LinearId::expert(1, r));
        assert_eq!(groups[1].linears[..4], [e0(Gate), e0(Up), e1(Gate), e1(Up)]);
        assert_eq!(d.block_groups(&c, 0).len(), 3, "a dense block has Llama's groups (v -> o left out)");
        assert_eq!(d.modules_to_not_convert(&c), Some(vec!["model.layers.1.mlp.gate".to_string()]));
        assert_eq!(llama::LLAMA.modules_to_not_convert(&c), None);

        let text = r#"{"model_type": "mixtral", "hidden_size": 128, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 300, "num_local_experts": 2,
            "num_experts_per_tok": 1}"#;
        let c = ModelConfig::parse(Path::new("config.json"), text).unwrap();
        let m = &mixtral::MIXTRAL;
        assert!((0..2).all(|b| m.is_sparse(&c, b)));
        assert_eq!(m.linear_name(1, LinearId::expert(1, Up)), "model.layers.1.block_sparse_moe.experts.1.w3.weight");
        assert_eq!(m.router_name(0), "model.layers.0.block_sparse_moe.gate.weight");
        assert!(!m.clips(LinearId::expert(0, Gate)) && m.clips(O));
        assert_eq!(m.block_groups(&c, 0).len(), 2 + 1 + 2, "v -> o applies with as many KV heads as heads");
        assert_eq!(m.modules_to_not_convert(&c), Some(vec!["gate".to_string()]));
        let moe = c.moe.as_ref().map(|m| (m.n_experts, m.experts_per_token, m.expert_intermediate_size, m.renormalize));
        assert_eq!(moe, Some((2, 1, 64, true)));
    }

    /// Which blocks attend through the window, their scales: read from config.json by the descriptor.
    #[test]
    fn gemma3_windows_and_scales_follow_the_config() {
        let text = r#"{"model_type": "gemma3_text", "hidden_size": 640, "intermediate_size": 2048,
            "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
            "vocab_size": 262144, "sliding_window": 512}"#;
        let c = ModelConfig::parse(Path::new("config.json"), text).unwrap();
        let d = &gemma3::GEMMA3_TEXT;
        let windows: Vec<Option<usize>> = (0..7).map(|b| d.sliding_window(&c, b)).collect();
        let (w, none) = (Some(512), None);
        assert_eq!(windows, [w, w, w, w, w, none, w]);
        assert_eq!((d.score_scale(&c), d.embedding_scale(&c)), (0.0625, 640f64.sqrt() as f32));
        assert_eq!(llama::LLAMA.score_scale(&c), 1.0 / 16.0);
        assert_eq!((llama::LLAMA.embedding_scale(&c), mistral::MISTRAL.sliding_window(&c, 5)), (1.0, Some(512)));
    }
}
