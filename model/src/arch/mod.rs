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
mod tests;
