//! config.json, parsed into a checked [`ModelConfig`].
//!
//! Only the fields a decoder forward pass and AWQ need are read, in both forms transformers writes:
//! 4.x keeps RoPE settings at the top level (`rope_theta`, `rope_scaling`, `partial_rotary_factor`)
//! and the dtype in `torch_dtype`; 5.x moves them into one `rope_parameters` object (flat, or one
//! per layer type: `{"full_attention": {...}, "sliding_attention": {...}}`) and writes `dtype`.
//! Either form resolves into the same typed values ([`RopeScaling`], `rope_theta`,
//! `partial_rotary_factor`, [`DType`]), checked once; a file that states a value in both forms with
//! two different values is an error naming both fields (a `null` counts as not stated).
//!
//! Gemma 3 gives its `sliding_attention` blocks a RoPE of their own: 4.x states its base as
//! `rope_local_base_freq` beside `rope_theta`, 5.x as `rope_parameters.sliding_attention` beside
//! `rope_parameters.full_attention`; both resolve into [`ModelConfig::sliding_rope`]. Every other
//! family rotates every block alike, so there the per-layer-type objects must agree. Which block
//! is which type is [`ModelConfig::layer_types`] (`layer_types`, else Gemma's
//! `sliding_window_pattern`).
//!
//! A missing field is an error naming the file and the field, unless transformers' config class
//! for the architecture documents a default for it: those are the descriptor's
//! [`ConfigDefaults`](crate::arch::ConfigDefaults), so `model_type` must name a registered
//! architecture. A value of the wrong type is always an error. Which architecture-specific fields
//! matter (sliding window, biases) is said by the descriptor, not here.
//!
//! Mixture-of-experts families ([`crate::arch::MoeSpec`]) have their expert fields read and checked
//! here once, into [`MoeConfig`]: the expert count under either of its names, the experts per token
//! (1 to the count), one expert's width, whether the top-k weights are renormalised, and which
//! blocks are sparse (Qwen3-MoE's `decoder_sparse_step` and `mlp_only_layers`).

use std::path::{Path, PathBuf};

use awq_kernels::ops::GatedActivation;
use awq_kernels::DType;
use serde_json::{Map, Value};

use crate::arch::{
    descriptor_for, AttentionScale, ConfigDefaults, HeadDimDefault, KvHeadsDefault, MoeSpec, Renormalize, SparseBlocks,
    WindowedBlocks,
};
use crate::{Error, Result};

/// RoPE frequency scaling, as `rope_scaling` (transformers 4) or `rope_parameters` (5) describes it.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor` (`"rope_type": "linear"`).
    Linear { factor: f64 },
    /// Llama 3.1's wavelength-dependent scaling (`"rope_type": "llama3"`).
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

/// What attention a block has (transformers' `layer_types` entries).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerType {
    /// `full_attention`: every earlier position.
    Full,
    /// `sliding_attention`: the last `sliding_window` positions where the architecture honours the
    /// window ([`crate::arch::WindowedBlocks`]).
    Sliding,
}

impl LayerType {
    /// The name config.json gives it.
    pub fn name(self) -> &'static str {
        match self {
            LayerType::Full => "full_attention",
            LayerType::Sliding => "sliding_attention",
        }
    }
}

/// Which blocks are of which [`LayerType`] ([`LayerTypes::of`]). A rule rather than one entry per
/// block where config.json states none: a `num_hidden_layers` read from a file must not size an
/// allocation before the checkpoint's tensors have confirmed it.
#[derive(Clone, Debug, PartialEq)]
pub enum LayerTypes {
    /// `layer_types` as config.json lists it, one entry per block.
    Listed(Vec<LayerType>),
    /// Block `i` is `Full` when `(i + 1) % n == 0`, else `Sliding` (Gemma's `sliding_window_pattern`).
    Pattern(usize),
    /// Every block `Full`.
    AllFull,
}

impl LayerTypes {
    /// The type of block `block_idx` (`Full` past a listed model's blocks).
    pub fn of(&self, block_idx: usize) -> LayerType {
        match self {
            LayerTypes::Listed(types) => types.get(block_idx).copied().unwrap_or(LayerType::Full),
            LayerTypes::Pattern(n) if (block_idx + 1) % n == 0 => LayerType::Full,
            LayerTypes::Pattern(_) => LayerType::Sliding,
            LayerTypes::AllFull => LayerType::Full,
        }
    }

    /// Whether any of the first `n_blocks` blocks is of type `t`.
    fn uses(&self, t: LayerType, n_blocks: usize) -> bool {
        match self {
            LayerTypes::Listed(types) => types.contains(&t),
            LayerTypes::Pattern(n) => match t {
                LayerType::Full => n_blocks >= *n,
                LayerType::Sliding => *n > 1 && n_blocks > 0,
            },
            LayerTypes::AllFull => t == LayerType::Full && n_blocks > 0,
        }
    }
}

/// The mixture of experts of a sparse family's config.json, checked ([`crate::arch::MoeSpec`] says
/// which fields).
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    /// Experts per sparse block (`num_local_experts` / `num_experts`); 0 only where the family's
    /// rule then makes every block dense (Qwen3-MoE).
    pub n_experts: usize,
    /// The config.json field the count was read from, for messages.
    pub n_experts_field: &'static str,
    /// `num_experts_per_tok`: the experts each token runs through, 1 to `n_experts`.
    pub experts_per_token: usize,
    /// One expert's MLP width (Mixtral's `intermediate_size`, Qwen3-MoE's `moe_intermediate_size`).
    pub expert_intermediate_size: usize,
    /// Whether the top-k routing weights are divided by their sum (Mixtral always; Qwen3-MoE's
    /// `norm_topk_prob`).
    pub renormalize: bool,
    /// Which blocks are sparse.
    pub sparse: SparseRule,
}

/// Which blocks have the mixture of experts (a rule, not one entry per block: see [`LayerTypes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SparseRule {
    All,
    /// Block `i` when `(i + 1) % step == 0`, there are experts, and `dense` does not list it
    /// (Qwen3-MoE's `decoder_sparse_step`, `mlp_only_layers`).
    Step { step: usize, dense: Vec<usize> },
}

impl MoeConfig {
    /// Whether block `block_idx` has the mixture of experts.
    pub fn is_sparse(&self, block_idx: usize) -> bool {
        match &self.sparse {
            SparseRule::All => true,
            SparseRule::Step { step, dense } => {
                self.n_experts > 0 && (block_idx + 1).is_multiple_of(*step) && !dense.contains(&block_idx)
            }
        }
    }
}

/// One RoPE, resolved from either form of config.json.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeParams {
    pub theta: f64,
    pub scaling: Option<RopeScaling>,
    /// Fraction of each head's dimensions that are rotated (1.0 for full rotary).
    pub partial_rotary_factor: f64,
}

/// The checked contents of config.json.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Where it was read from, for error messages.
    pub path: PathBuf,
    /// The whole JSON object, kept so writers can copy fields they do not interpret.
    pub raw: Map<String, Value>,
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_blocks: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    /// The RoPE base: `rope_parameters.rope_theta` (5.x) or `rope_theta` (4.x); with
    /// [`ModelConfig::sliding_rope`], that of the `full_attention` blocks only
    /// (`rope_parameters.full_attention.rope_theta`).
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    /// Fraction of each head's dimensions that are rotated (1.0 for full rotary).
    pub partial_rotary_factor: f64,
    pub tie_word_embeddings: bool,
    /// `dtype` (5.x) or `torch_dtype` (4.x); `None` when config.json does not say.
    pub dtype: Option<DType>,
    pub activation: GatedActivation,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    /// The window as config.json states it (or the architecture's default when the field is
    /// absent); whether it applies is the descriptor's call.
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    /// `eos_token_id`: one id or a list (empty when config.json names none).
    pub eos_token_ids: Vec<u32>,
    /// The longest sequence the model was trained for (`max_position_embeddings`), when stated.
    pub max_position_embeddings: Option<usize>,
    /// Each block's attention ([`LayerTypes::of`]): `layer_types`, else every
    /// `sliding_window_pattern`-th block `Full` and the others `Sliding` (Gemma 3's 4.x configs; the
    /// architecture's default pattern when neither is stated), else every block `Full`.
    pub layer_types: LayerTypes,
    /// The RoPE of `Sliding` blocks, for architectures that give them their own
    /// ([`crate::arch::WindowedBlocks::SlidingAttention`]: Gemma 3's `rope_local_base_freq`, no
    /// scaling; 5.x: `rope_parameters.sliding_attention`); `None`: every block rotates with
    /// `rope_theta` / `rope_scaling`.
    pub sliding_rope: Option<RopeParams>,
    /// `query_pre_attn_scalar`, read (or defaulted) for architectures whose attention scores it
    /// scales ([`crate::arch::AttentionScale::InvSqrtQueryPreAttnScalar`]); `None` elsewhere.
    pub query_pre_attn_scalar: Option<f64>,
    /// `final_logit_softcapping`: logits become `tanh(logits / cap) * cap` (Gemma's field; absent or
    /// null in other families and in Gemma 3's configs).
    pub final_logit_softcapping: Option<f64>,
    /// The experts of a mixture-of-experts family (`ArchDescriptor::moe`); `None` for the others.
    pub moe: Option<MoeConfig>,
}

impl ModelConfig {
    /// Reads and checks `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<ModelConfig> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(Error::io(&path))?;
        ModelConfig::parse(&path, &text)
    }

    /// Parses config.json text; `path` is only used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<ModelConfig> {
        let raw: Map<String, Value> = serde_json::from_str(text).map_err(|e| Error::ConfigField {
            path: path.into(),
            field: "(file)".into(),
            detail: format!("not a JSON object: {e}"),
        })?;
        let f = Fields { path, raw: &raw, prefix: String::new() };
        let model_type = f.str("model_type")?;
        let arch = descriptor_for(model_type, path)?;
        let defaults = arch.config_defaults;
        let hidden_size = f.usize("hidden_size")?;
        let n_heads = f.usize("num_attention_heads")?;
        let n_kv_heads = match (f.opt_usize("num_key_value_heads")?, defaults.num_key_value_heads) {
            (Some(n), _) => n,
            (None, KvHeadsDefault::AttentionHeads) => n_heads,
            (None, KvHeadsDefault::Required) => return Err(f.bad("num_key_value_heads", "required field is missing".into())),
        };
        if n_heads == 0 || hidden_size % n_heads != 0 && f.opt_usize("head_dim")?.is_none() {
            return Err(f.bad("num_attention_heads", format!("{n_heads} heads do not divide hidden_size {hidden_size}")));
        }
        if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(f.bad("num_key_value_heads", format!("{n_kv_heads} does not divide {n_heads} attention heads")));
        }
        // Absent or null: the architecture's rule (`HeadDimDefault`).
        let head_dim = match (f.opt_usize("head_dim")?, defaults.head_dim) {
            (Some(d), _) => d,
            (None, HeadDimDefault::HiddenOverHeads) => hidden_size / n_heads,
            (None, HeadDimDefault::Required) => return Err(f.bad("head_dim", "required field is missing".into())),
        };
        // The query heads' width (`q_dim`) must fit a usize (the KV heads', which divide them, then do).
        if n_heads.checked_mul(head_dim).is_none() {
            return Err(f.bad("head_dim", format!("{n_heads} heads of {head_dim} overflow the query width")));
        }
        let activation = match f.opt_str("hidden_act")?.or(f.opt_str("hidden_activation")?).unwrap_or(defaults.hidden_act) {
            "silu" | "swish" => GatedActivation::Silu,
            "gelu_pytorch_tanh" | "gelu_tanh" => GatedActivation::GeluTanh,
            other => return Err(f.bad("hidden_act", format!("activation `{other}` is not supported (silu, gelu_pytorch_tanh)"))),
        };
        let dtype = f.agreeing(
            "dtype".into(),
            f.dtype("dtype")?,
            "torch_dtype".into(),
            f.dtype("torch_dtype")?,
            "the transformers 5 and 4 names of the dtype",
            |d| format!("{d:?}"),
        )?;
        let n_blocks = f.usize("num_hidden_layers")?;
        let layer_types = f.layer_types(n_blocks, defaults.sliding_window_pattern)?;
        let own_sliding_rope = arch.windowed_blocks == WindowedBlocks::SlidingAttention;
        let (rope, sliding_rope) = f.rope(&defaults, &layer_types, n_blocks, own_sliding_rope)?;
        let query_pre_attn_scalar = match arch.attention_scale {
            AttentionScale::InvSqrtHeadDim => None,
            AttentionScale::InvSqrtQueryPreAttnScalar => {
                let scalar = f.opt_f64("query_pre_attn_scalar")?.or(defaults.query_pre_attn_scalar);
                match scalar {
                    Some(v) if v > 0.0 && v.is_finite() => Some(v),
                    Some(v) => return Err(f.bad("query_pre_attn_scalar", format!("{v} is not a positive number"))),
                    None => return Err(f.bad("query_pre_attn_scalar", "required field is missing".into())),
                }
            }
        };
        let final_logit_softcapping = match f.opt_f64("final_logit_softcapping")? {
            Some(cap) if !(cap > 0.0 && cap.is_finite()) => {
                return Err(f.bad("final_logit_softcapping", format!("{cap} is not a positive number")))
            }
            cap => cap,
        };
        // Gemma 2 caps its attention scores; no forward pass here does, so such a model is refused
        // rather than run without it (Gemma 3 configs set it null).
        if let Some(cap) = f.get("attn_logit_softcapping") {
            let detail = format!("{cap}: soft-capping attention scores is not supported");
            return Err(f.bad("attn_logit_softcapping", detail));
        }
        // EmbeddingGemma's encoder attends both ways; every forward pass here is causal.
        if f.opt_bool("use_bidirectional_attention")? == Some(true) {
            return Err(f.bad("use_bidirectional_attention", "true: only causal attention is supported".into()));
        }
        let moe = arch.moe.map(|spec| f.moe(spec, n_blocks)).transpose()?;
        Ok(ModelConfig {
            moe,
            model_type: model_type.to_string(),
            intermediate_size: f.usize("intermediate_size")?,
            n_blocks,
            vocab_size: f.usize("vocab_size")?,
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(defaults.rms_norm_eps),
            rope_theta: rope.theta,
            rope_scaling: rope.scaling,
            partial_rotary_factor: rope.partial_rotary_factor,
            layer_types,
            sliding_rope,
            query_pre_attn_scalar,
            final_logit_softcapping,
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(defaults.tie_word_embeddings),
            // LlamaConfig's `attention_bias=False`, `mlp_bias=False`; the other families have no
            // such fields (their descriptors fix the biases).
            attention_bias: f.opt_bool("attention_bias")?.unwrap_or(false),
            mlp_bias: f.opt_bool("mlp_bias")?.unwrap_or(false),
            sliding_window: if raw.contains_key("sliding_window") { f.opt_usize("sliding_window")? } else { defaults.sliding_window },
            // No default: a BOS id is needed only where tokenizer_config.json adds one, and
            // `Tokenizer::from_dir` refuses a missing one there.
            bos_token_id: f.opt_usize("bos_token_id")?.map(|v| v as u32),
            eos_token_ids: f.ids("eos_token_id")?,
            max_position_embeddings: f.opt_usize("max_position_embeddings")?,
            hidden_size,
            n_heads,
            n_kv_heads,
            head_dim,
            dtype,
            activation,
            path: path.into(),
            raw: raw.clone(),
        })
    }

    /// Width of the concatenated query heads.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of the concatenated key (or value) heads.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// How many leading dimensions of each head are rotated (even).
    pub fn rotary_dim(&self) -> usize {
        rotary_dim(self.head_dim, self.partial_rotary_factor)
    }

    /// RoPE inverse frequencies after scaling, as transformers' `ROPE_INIT_FUNCTIONS` compute them:
    /// those of `rope_theta` / `rope_scaling` (every block's, or the `Full` blocks' where
    /// [`ModelConfig::sliding_rope`] is set).
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        inv_freq(self.rope_theta, &self.rope_scaling, self.rotary_dim())
    }

    /// [`ModelConfig::rope_inv_freq`] of the RoPE block `block_idx` rotates with: the sliding one
    /// for a `Sliding` block of a model that has one.
    pub fn block_rope_inv_freq(&self, block_idx: usize) -> Vec<f64> {
        match (&self.sliding_rope, self.layer_types.of(block_idx)) {
            (Some(r), LayerType::Sliding) => {
                inv_freq(r.theta, &r.scaling, rotary_dim(self.head_dim, r.partial_rotary_factor))
            }
            _ => self.rope_inv_freq(),
        }
    }
}

fn rotary_dim(head_dim: usize, partial_rotary_factor: f64) -> usize {
    ((head_dim as f64 * partial_rotary_factor) as usize) & !1
}

/// The inverse frequencies of the first `rot` dimensions for base `theta`, then `scaling`.
fn inv_freq(theta: f64, scaling: &Option<RopeScaling>, rot: usize) -> Vec<f64> {
    let base: Vec<f64> = (0..rot / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / rot as f64)).collect();
    match scaling {
        None => base,
        Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
        Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
            let (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings) =
                (*factor, *low_freq_factor, *high_freq_factor, *original_max_position_embeddings);
            let low_wavelen = original_max_position_embeddings / low_freq_factor;
            let high_wavelen = original_max_position_embeddings / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// RoPE settings as one object of config.json states them (the top level in the 4.x form, a
/// `rope_parameters` object in the 5.x form); `None` where it says nothing.
#[derive(Clone, Debug, Default, PartialEq)]
struct StatedRope {
    theta: Option<f64>,
    partial_rotary_factor: Option<f64>,
    scaling: Option<Option<RopeScaling>>,
}

/// `rope_scaling` as a sentence, for messages.
fn describe_scaling(s: &Option<RopeScaling>) -> String {
    match s {
        None => "no scaling".into(),
        Some(RopeScaling::Linear { factor }) => format!("linear scaling by {factor}"),
        Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => format!(
            "llama3 scaling (factor {factor}, low_freq_factor {low_freq_factor}, high_freq_factor {high_freq_factor}, \
             original_max_position_embeddings {original_max_position_embeddings})"
        ),
    }
}

/// What a server takes from generation_config.json: the token ids that end a generation (Llama 3
/// Instruct lists three there, config.json names one; vLLM stops at all of them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GenerationConfig {
    pub eos_token_ids: Vec<u32>,
}

impl GenerationConfig {
    /// Reads `dir/generation_config.json`; a missing file gives the empty config. Errors:
    /// `ConfigField` naming the file and field for text that is not JSON or an id that is not one.
    pub fn from_dir(dir: &Path) -> Result<GenerationConfig> {
        let path = dir.join("generation_config.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(GenerationConfig::default()),
            Err(e) => return Err(Error::io(&path)(e)),
        };
        let raw: Map<String, Value> = serde_json::from_str(&text).map_err(|e| Error::ConfigField {
            path: path.clone(),
            field: "(file)".into(),
            detail: format!("not a JSON object: {e}"),
        })?;
        let f = Fields { path: &path, raw: &raw, prefix: String::new() };
        Ok(GenerationConfig { eos_token_ids: f.ids("eos_token_id")? })
    }
}

/// Typed access to the fields of config.json (or of an object inside it, whose field names are
/// then spelled `{prefix}{field}`), with errors that name the file and the field.
struct Fields<'a> {
    path: &'a Path,
    raw: &'a Map<String, Value>,
    prefix: String,
}

impl<'a> Fields<'a> {
    fn bad(&self, field: &str, detail: String) -> Error {
        Error::ConfigField { path: self.path.into(), field: format!("{}{field}", self.prefix), detail }
    }

    fn get(&self, field: &str) -> Option<&'a Value> {
        self.raw.get(field).filter(|v| !v.is_null())
    }

    fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        self.get(field)
            .map(|v| v.as_u64().map(|n| n as usize).ok_or_else(|| self.bad(field, format!("expected a non-negative integer, got {v}"))))
            .transpose()
    }

    /// A token id or a list of them (`eos_token_id`); absent or null: none.
    fn ids(&self, field: &str) -> Result<Vec<u32>> {
        let bad = |v: &Value| self.bad(field, format!("expected a token id or a list of token ids, got {v}"));
        let id = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| bad(v));
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().map(id).collect(),
            Some(v) => Ok(vec![id(v)?]),
        }
    }

    fn usize(&self, field: &str) -> Result<usize> {
        self.opt_usize(field)?.ok_or_else(|| self.bad(field, "required field is missing".into()))
    }

    fn opt_f64(&self, field: &str) -> Result<Option<f64>> {
        self.get(field).map(|v| v.as_f64().ok_or_else(|| self.bad(field, format!("expected a number, got {v}")))).transpose()
    }

    fn f64(&self, field: &str) -> Result<f64> {
        self.opt_f64(field)?.ok_or_else(|| self.bad(field, "required field is missing".into()))
    }

    fn opt_bool(&self, field: &str) -> Result<Option<bool>> {
        self.get(field).map(|v| v.as_bool().ok_or_else(|| self.bad(field, format!("expected true or false, got {v}")))).transpose()
    }

    fn opt_str(&self, field: &str) -> Result<Option<&'a str>> {
        self.get(field).map(|v| v.as_str().ok_or_else(|| self.bad(field, format!("expected a string, got {v}")))).transpose()
    }

    fn str(&self, field: &str) -> Result<&'a str> {
        self.opt_str(field)?.ok_or_else(|| self.bad(field, "required field is missing".into()))
    }

    fn opt_object(&self, field: &str) -> Result<Option<&'a Map<String, Value>>> {
        self.get(field).map(|v| v.as_object().ok_or_else(|| self.bad(field, format!("expected an object, got {v}")))).transpose()
    }

    /// The fields of the object `field`, named `{prefix}{field}.{name}` in errors.
    fn inner(&self, field: &str, object: &'a Map<String, Value>) -> Fields<'a> {
        Fields { path: self.path, raw: object, prefix: format!("{}{field}.", self.prefix) }
    }

    /// `field` as errors spell it (with the prefix of the object it is in).
    fn name(&self, field: &str) -> String {
        format!("{}{field}", self.prefix)
    }

    /// A setting that config.json may state under two names `a` and `b` (full names, from
    /// [`Self::name`]): the value stated, or an error naming both when they differ. `forms` says
    /// what the two names are, for the message.
    fn agreeing<T: PartialEq>(&self, a: String, va: Option<T>, b: String, vb: Option<T>, forms: &str, show: impl Fn(&T) -> String) -> Result<Option<T>> {
        match (va, vb) {
            (Some(x), Some(y)) if x != y => Err(Error::ConfigField {
                path: self.path.into(),
                field: a,
                detail: format!("{} here, but {b} says {}: {forms} disagree", show(&x), show(&y)),
            }),
            (x, y) => Ok(x.or(y)),
        }
    }

    fn dtype(&self, field: &str) -> Result<Option<DType>> {
        Ok(match self.opt_str(field)? {
            None => None,
            Some("float16") => Some(DType::F16),
            Some("bfloat16") => Some(DType::BF16),
            Some("float32") => Some(DType::F32),
            Some(other) => return Err(self.bad(field, format!("`{other}` is not float16, bfloat16 or float32"))),
        })
    }

    /// The expert fields `spec` names (see [`MoeConfig`]); `n_blocks` bounds `mlp_only_layers`.
    fn moe(&self, spec: &MoeSpec, n_blocks: usize) -> Result<MoeConfig> {
        let [a, b] = spec.n_experts_fields;
        let forms = "the two names of the expert count";
        let stated = self.agreeing(a.into(), self.opt_usize(a)?, b.into(), self.opt_usize(b)?, forms, usize::to_string)?;
        let n_experts = stated.ok_or_else(|| self.bad(a, format!("required field is missing (or `{b}`)")))?;
        let n_experts_field = if self.get(a).is_some() { a } else { b };
        let sparse = match spec.sparse_blocks {
            SparseBlocks::All => SparseRule::All,
            SparseBlocks::StepExceptMlpOnly => {
                let step = self.opt_usize("decoder_sparse_step")?.unwrap_or(1);
                if step == 0 {
                    let detail = "0: every step-th block is sparse, so it must be at least 1";
                    return Err(self.bad("decoder_sparse_step", detail.into()));
                }
                let dense = match self.get("mlp_only_layers") {
                    None => Vec::new(),
                    Some(Value::Array(items)) => items
                        .iter()
                        .map(|v| match v.as_u64() {
                            Some(i) if (i as usize) < n_blocks => Ok(i as usize),
                            _ => {
                                let detail = format!("{v} is not a block index below num_hidden_layers {n_blocks}");
                                Err(self.bad("mlp_only_layers", detail))
                            }
                        })
                        .collect::<Result<_>>()?,
                    Some(v) => {
                        return Err(self.bad("mlp_only_layers", format!("expected a list of block indices, got {v}")))
                    }
                };
                SparseRule::Step { step, dense }
            }
        };
        if n_experts == 0 && sparse == SparseRule::All {
            let detail = "0 experts: every block of this architecture has a mixture of experts";
            return Err(self.bad(n_experts_field, detail.into()));
        }
        let experts_per_token = self.usize("num_experts_per_tok")?;
        if n_experts > 0 && !(1..=n_experts).contains(&experts_per_token) {
            let detail =
                format!("{experts_per_token} experts per token, but there are {n_experts} ({n_experts_field})");
            return Err(self.bad("num_experts_per_tok", detail));
        }
        let expert_intermediate_size = self.usize(spec.expert_intermediate_field)?;
        let renormalize = match spec.renormalize {
            Renormalize::Always => true,
            Renormalize::IfNormTopkProb => self.opt_bool("norm_topk_prob")?.unwrap_or(false),
        };
        Ok(MoeConfig { n_experts, n_experts_field, experts_per_token, expert_intermediate_size, renormalize, sparse })
    }

    /// Each block's [`LayerType`] (see [`ModelConfig::layer_types`]). `default_pattern`: the
    /// architecture's `sliding_window_pattern`.
    fn layer_types(&self, n_blocks: usize, default_pattern: Option<usize>) -> Result<LayerTypes> {
        if let Some(v) = self.get("layer_types") {
            let Value::Array(names) = v else {
                return Err(self.bad("layer_types", format!("expected an array, got {v}")));
            };
            let types = names
                .iter()
                .map(|t| match t.as_str() {
                    Some("full_attention") => Ok(LayerType::Full),
                    Some("sliding_attention") => Ok(LayerType::Sliding),
                    _ => Err(self.bad(
                        "layer_types",
                        format!("layer type {t} is not supported (full_attention, sliding_attention)"),
                    )),
                })
                .collect::<Result<Vec<_>>>()?;
            if types.len() != n_blocks {
                let detail = format!("{} entries for num_hidden_layers {n_blocks}", types.len());
                return Err(self.bad("layer_types", detail));
            }
            return Ok(LayerTypes::Listed(types));
        }
        Ok(match self.opt_usize("sliding_window_pattern")?.or(default_pattern) {
            Some(0) => return Err(self.bad("sliding_window_pattern", "0: every block would be of no type".into())),
            // transformers' Gemma3TextConfig: block i is global when (i + 1) % pattern == 0.
            Some(n) => LayerTypes::Pattern(n),
            None => LayerTypes::AllFull,
        })
    }

    /// RoPE from the 4.x fields and the 5.x `rope_parameters`, checked to agree where both speak:
    /// the RoPE of every block (of the `Full` blocks with `own_sliding`), and with `own_sliding` the
    /// `Sliding` blocks' own (4.x: `rope_local_base_freq`, no scaling; 5.x:
    /// `rope_parameters.sliding_attention`). Defaults, as transformers 5 fills them in
    /// (`RotaryEmbeddingConfigMixin`, which reads the 4.x fields the same way): `rope_type`
    /// "default", `partial_rotary_factor` 1.0, `rope_theta` the architecture's (for sliding blocks
    /// its `rope_local_base_freq`).
    fn rope(
        &self,
        defaults: &ConfigDefaults,
        layer_types: &LayerTypes,
        n_blocks: usize,
        own_sliding: bool,
    ) -> Result<(RopeParams, Option<RopeParams>)> {
        let top = StatedRope {
            theta: self.opt_f64("rope_theta")?,
            partial_rotary_factor: self.opt_f64("partial_rotary_factor")?,
            scaling: self.opt_object("rope_scaling")?.map(|o| self.inner("rope_scaling", o).scaling()).transpose()?,
        };
        // The 4.x statement of the sliding blocks' RoPE: its own base, the shared partial factor, and
        // no scaling (transformers 4's Gemma 3 builds its local rotary embedding with `rope_type`
        // "default"), so a 5.x `sliding_attention` object is checked against these.
        let local_top = StatedRope {
            theta: if own_sliding { self.opt_f64("rope_local_base_freq")? } else { None },
            partial_rotary_factor: top.partial_rotary_factor,
            scaling: None,
        };
        let (default_theta, local_default) = (Some(defaults.rope_theta), defaults.rope_local_base_freq);
        let none = StatedRope::default();
        let (rope, sliding) = match self.opt_object("rope_parameters")? {
            None => (
                self.resolve(&top, &none, "rope_theta", default_theta)?,
                own_sliding.then(|| self.resolve_local(&local_top, local_default)).transpose()?,
            ),
            Some(params) if !params.values().any(Value::is_object) => {
                let inner = self.inner("rope_parameters", params);
                (
                    inner.resolve(&inner.stated_rope()?, &top, "rope_theta", default_theta)?,
                    own_sliding.then(|| self.resolve_local(&local_top, local_default)).transpose()?,
                )
            }
            Some(params) if own_sliding => {
                // One object per layer type, each read on its own; a type the blocks use must have one.
                let nested = self.inner("rope_parameters", params);
                let of = |layer_type: LayerType, top: &StatedRope, top_theta: &str, default| -> Result<RopeParams> {
                    let name = layer_type.name();
                    match nested.opt_object(name)? {
                        Some(object) => {
                            let inner = nested.inner(name, object);
                            inner.resolve(&inner.stated_rope()?, top, top_theta, default)
                        }
                        None if layer_types.uses(layer_type, n_blocks) => {
                            Err(nested.bad(name, "missing or null: blocks without RoPE are not supported".into()))
                        }
                        None if layer_type == LayerType::Sliding => self.resolve_local(top, default),
                        None => self.resolve(top, &none, top_theta, default),
                    }
                };
                (
                    of(LayerType::Full, &top, "rope_theta", default_theta)?,
                    Some(of(LayerType::Sliding, &local_top, "rope_local_base_freq", local_default)?),
                )
            }
            Some(params) => (self.per_layer_type_rope(params, &top, layer_types, defaults.rope_theta)?, None),
        };
        for r in std::iter::once(&rope).chain(&sliding) {
            if !(r.partial_rotary_factor > 0.0 && r.partial_rotary_factor <= 1.0) {
                return Err(self.bad("partial_rotary_factor", format!("{} is not in (0, 1]", r.partial_rotary_factor)));
            }
        }
        Ok((rope, sliding))
    }

    /// The sliding blocks' RoPE as the 4.x form states it (`local`: `rope_local_base_freq` and the
    /// shared partial factor); `default_theta`: the architecture's `rope_local_base_freq`.
    fn resolve_local(&self, local: &StatedRope, default_theta: Option<f64>) -> Result<RopeParams> {
        let theta = local
            .theta
            .or(default_theta)
            .ok_or_else(|| self.bad("rope_local_base_freq", "required field is missing".into()))?;
        Ok(RopeParams { theta, scaling: None, partial_rotary_factor: local.partial_rotary_factor.unwrap_or(1.0) })
    }

    /// The 5.x form with one `rope_parameters` object per layer type, for an architecture that
    /// rotates every block alike: the objects of the layer types the model uses (those of
    /// `layer_types` when config.json states it; all of them otherwise) must agree.
    fn per_layer_type_rope(
        &self,
        params: &'a Map<String, Value>,
        top: &StatedRope,
        layer_types: &LayerTypes,
        default_theta: f64,
    ) -> Result<RopeParams> {
        let nested = self.inner("rope_parameters", params);
        let used: Vec<&str> = match layer_types {
            LayerTypes::Listed(types) => {
                let mut used = Vec::new();
                for t in types.iter().map(|t| t.name()) {
                    if !used.contains(&t) {
                        used.push(t);
                    }
                }
                used
            }
            LayerTypes::Pattern(_) | LayerTypes::AllFull => params.keys().map(String::as_str).collect(),
        };
        let mut resolved: Option<(&str, RopeParams)> = None;
        for layer_type in used {
            let object = nested.opt_object(layer_type)?.ok_or_else(|| {
                nested.bad(layer_type, "missing or null: blocks without RoPE are not supported".into())
            })?;
            let inner = nested.inner(layer_type, object);
            let rope = inner.resolve(&inner.stated_rope()?, top, "rope_theta", Some(default_theta))?;
            match &resolved {
                None => resolved = Some((layer_type, rope)),
                Some((first, r)) if *r != rope => {
                    return Err(nested.bad(
                        layer_type,
                        format!("{rope:?} differs from rope_parameters.{first}'s {r:?}: RoPE that differs between layer types is not supported"),
                    ))
                }
                Some(_) => {}
            }
        }
        resolved.map(|(_, rope)| rope).ok_or_else(|| self.bad("rope_parameters", "an empty object".into()))
    }

    /// What a `rope_parameters` object (this one) states; its `rope_type` defaults to "default"
    /// (`RopeParameters`), so it always states a scaling.
    fn stated_rope(&self) -> Result<StatedRope> {
        Ok(StatedRope {
            theta: self.opt_f64("rope_theta")?,
            partial_rotary_factor: self.opt_f64("partial_rotary_factor")?,
            scaling: Some(self.scaling()?),
        })
    }

    /// One RoPE from two statements of it: `own` (this object's fields) and `top` (the 4.x fields at
    /// the top level, whose base is named `top_theta`), which must agree where both speak. Without
    /// `rope_parameters`, `own` is the top level itself and `top` says nothing. A base neither
    /// states is `default_theta`, or missing (an error naming this object's `rope_theta`).
    fn resolve(
        &self,
        own: &StatedRope,
        top: &StatedRope,
        top_theta: &str,
        default_theta: Option<f64>,
    ) -> Result<RopeParams> {
        const FORMS: &str = "the transformers 5 and 4 forms of this setting";
        let theta =
            self.agreeing(self.name("rope_theta"), own.theta, top_theta.into(), top.theta, FORMS, f64::to_string)?;
        let partial_rotary_factor = self.agreeing(
            self.name("partial_rotary_factor"),
            own.partial_rotary_factor,
            "partial_rotary_factor".into(),
            top.partial_rotary_factor,
            FORMS,
            f64::to_string,
        )?;
        let own_scaling = if self.prefix.is_empty() { "rope_scaling".into() } else { self.prefix.trim_end_matches('.').to_string() };
        let scaling =
            self.agreeing(own_scaling, own.scaling.clone(), "rope_scaling".into(), top.scaling.clone(), FORMS, describe_scaling)?;
        let theta = match theta.or(default_theta) {
            Some(theta) => theta,
            None => return Err(self.bad("rope_theta", "required field is missing".into())),
        };
        let partial_rotary_factor = partial_rotary_factor.unwrap_or(1.0);
        Ok(RopeParams { theta, scaling: scaling.flatten(), partial_rotary_factor })
    }

    /// The scaling a `rope_scaling` (4.x) or `rope_parameters` (5.x) object describes (this one).
    fn scaling(&self) -> Result<Option<RopeScaling>> {
        let (rope_type, legacy_type) = (self.opt_str("rope_type")?, self.opt_str("type")?);
        let kind = self.agreeing(self.name("rope_type"), rope_type, self.name("type"), legacy_type, "its two spellings", |s| format!("`{s}`"))?;
        Ok(match kind.unwrap_or("default") {
            "default" => match self.opt_f64("factor")? {
                Some(factor) if factor != 1.0 => {
                    return Err(self.bad("factor", format!("{factor}, but rope_type is `default` (no scaling): say which scaling")))
                }
                _ => None,
            },
            "linear" => Some(RopeScaling::Linear { factor: self.f64("factor")? }),
            "llama3" => Some(RopeScaling::Llama3 {
                factor: self.f64("factor")?,
                low_freq_factor: self.f64("low_freq_factor")?,
                high_freq_factor: self.f64("high_freq_factor")?,
                original_max_position_embeddings: self.f64("original_max_position_embeddings")?,
            }),
            // Named as config.json spells it: Phi-3's long-context models write `"type": "longrope"`.
            other => {
                let field = if rope_type.is_some() { "rope_type" } else { "type" };
                return Err(self.bad(field, format!("`{other}` is not supported (default, linear, llama3)")));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = r#"{"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "vocab_size": 49152, "rms_norm_eps": 1e-05, "rope_theta": 100000.0, "rope_scaling": null,
        "tie_word_embeddings": true, "torch_dtype": "float16", "hidden_act": "silu", "bos_token_id": 1}"#;

    fn parse(text: &str) -> Result<ModelConfig> {
        ModelConfig::parse(Path::new("m/config.json"), text)
    }

    #[test]
    fn parses_a_real_config() {
        let c = parse(SMOLLM2).unwrap();
        assert_eq!((c.hidden_size, c.n_blocks, c.n_heads, c.n_kv_heads, c.head_dim), (576, 30, 9, 3, 64));
        assert_eq!((c.q_dim(), c.kv_dim(), c.rotary_dim()), (576, 192, 64));
        assert_eq!(c.dtype, Some(DType::F16));
        assert!(c.tie_word_embeddings && c.rope_scaling.is_none());
        assert_eq!(c.rope_inv_freq()[1], 1.0 / 100000f64.powf(2.0 / 64.0));
    }

    #[test]
    fn missing_and_wrong_fields_are_named() {
        let text = SMOLLM2.replace(r#""num_hidden_layers": 30,"#, "");
        let err = parse(&text).unwrap_err().to_string();
        assert_eq!(err, "m/config.json: field `num_hidden_layers`: required field is missing");
        let err = parse(&SMOLLM2.replace(r#""hidden_size": 576"#, r#""hidden_size": "576""#)).unwrap_err();
        assert!(matches!(err, Error::ConfigField { ref field, .. } if field == "hidden_size"), "{err}");
        let err = parse(&SMOLLM2.replace(r#""num_key_value_heads": 3"#, r#""num_key_value_heads": 4"#)).unwrap_err();
        assert!(err.to_string().contains("num_key_value_heads"), "{err}");
        assert!(parse("[1, 2]").unwrap_err().to_string().contains("not a JSON object"));
    }

    /// Qwen3-30B-A3B's config.json (its MoE fields, a smaller vocabulary and depth), edited.
    fn qwen3_moe(edit: impl FnOnce(&mut Map<String, Value>)) -> Result<ModelConfig> {
        let mut map: Map<String, Value> = serde_json::from_str(
            r#"{"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 6,
            "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 1000,
            "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": true,
            "decoder_sparse_step": 1, "mlp_only_layers": []}"#,
        )
        .unwrap();
        edit(&mut map);
        parse(&serde_json::to_string(&map).unwrap())
    }

    #[test]
    fn moe_fields_are_read_once_with_their_defaults_and_rules() {
        let c = qwen3_moe(|_| {}).unwrap();
        let moe = c.moe.clone().unwrap();
        assert_eq!((moe.n_experts, moe.experts_per_token, moe.expert_intermediate_size), (128, 8, 768));
        assert_eq!((moe.n_experts_field, moe.renormalize), ("num_experts", true));
        assert!((0..6).all(|b| moe.is_sparse(b)));
        // Defaults: norm_topk_prob false, decoder_sparse_step 1, mlp_only_layers [].
        let c = qwen3_moe(|m| {
            for f in ["norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"] {
                m.remove(f);
            }
        })
        .unwrap();
        let rules = c.moe.as_ref().map(|m| (m.renormalize, m.sparse.clone()));
        assert_eq!(rules, Some((false, SparseRule::Step { step: 1, dense: vec![] })));
        // Every third block sparse, but block 5 dense.
        let c = qwen3_moe(|m| {
            m.insert("decoder_sparse_step".into(), 3.into());
            m.insert("mlp_only_layers".into(), serde_json::json!([5]));
        })
        .unwrap();
        let sparse: Vec<bool> = (0..6).map(|b| c.moe.as_ref().unwrap().is_sparse(b)).collect();
        assert_eq!(sparse, [false, false, true, false, false, false]);
        // transformers 5's name of the count, alone or agreeing; no experts: every block dense.
        let c = qwen3_moe(|m| {
            let n = m.remove("num_experts").unwrap();
            m.insert("num_local_experts".into(), n);
        })
        .unwrap();
        assert_eq!(c.moe.as_ref().map(|m| (m.n_experts, m.n_experts_field)), Some((128, "num_local_experts")));
        let c = qwen3_moe(|m| {
            m.insert("num_experts".into(), 0.into());
        })
        .unwrap();
        assert!((0..6).all(|b| !c.moe.as_ref().unwrap().is_sparse(b)));
        // Mixtral: always renormalised, every block sparse, its width in intermediate_size.
        let text = r#"{"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
            "num_local_experts": 8, "num_experts_per_tok": 2, "rope_theta": 1e6, "sliding_window": null}"#;
        let c = parse(text).unwrap();
        let moe = c.moe.unwrap();
        let sizes = (moe.n_experts, moe.experts_per_token, moe.expert_intermediate_size, moe.renormalize);
        assert_eq!(sizes, (8, 2, 14336, true));
        assert_eq!((moe.sparse, c.sliding_window, c.rms_norm_eps), (SparseRule::All, None, 1e-5));
        assert!(parse(SMOLLM2).unwrap().moe.is_none());
    }

    #[test]
    fn bad_moe_fields_are_named() {
        type Edit = Box<dyn FnOnce(&mut Map<String, Value>)>;
        let cases: [(&str, Edit, &str); 8] = [
            (
                "num_experts",
                Box::new(|m| drop(m.remove("num_experts"))),
                "required field is missing (or `num_local_experts`)",
            ),
            (
                "num_experts",
                Box::new(|m| drop(m.insert("num_local_experts".into(), 64.into()))),
                "128 here, but num_local_experts says 64: the two names of the expert count disagree",
            ),
            ("num_experts_per_tok", Box::new(|m| drop(m.remove("num_experts_per_tok"))), "required field is missing"),
            (
                "num_experts_per_tok",
                Box::new(|m| drop(m.insert("num_experts_per_tok".into(), 129.into()))),
                "129 experts per token, but there are 128 (num_experts)",
            ),
            ("moe_intermediate_size", Box::new(|m| drop(m.remove("moe_intermediate_size"))), "required field is missing"),
            (
                "decoder_sparse_step",
                Box::new(|m| drop(m.insert("decoder_sparse_step".into(), 0.into()))),
                "0: every step-th block",
            ),
            (
                "mlp_only_layers",
                Box::new(|m| drop(m.insert("mlp_only_layers".into(), serde_json::json!([1, 6])))),
                "6 is not a block index below num_hidden_layers 6",
            ),
            (
                "norm_topk_prob",
                Box::new(|m| drop(m.insert("norm_topk_prob".into(), "yes".into()))),
                "expected true or false",
            ),
        ];
        for (field, edit, detail) in cases {
            let err = qwen3_moe(edit).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, Error::ConfigField { field: ref f, .. } if f == field), "{field}: {msg}");
            assert!(msg.starts_with(&format!("m/config.json: field `{field}`: ")) && msg.contains(detail), "{msg}");
        }
        let text = r#"{"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 300, "num_local_experts": 0,
            "num_experts_per_tok": 1}"#;
        let msg = parse(text).unwrap_err().to_string();
        assert!(msg.contains("field `num_local_experts`: 0 experts"), "{msg}");
    }

    /// SMOLLM2 with `edit` applied to its JSON object.
    fn edited(edit: impl FnOnce(&mut Map<String, Value>)) -> String {
        let mut map: Map<String, Value> = serde_json::from_str(SMOLLM2).unwrap();
        edit(&mut map);
        serde_json::to_string(&map).unwrap()
    }

    /// SMOLLM2 as transformers 5 writes it: RoPE settings in `rope_parameters`, `dtype`.
    fn v5(rope_parameters: Value) -> String {
        edited(|c| {
            c.remove("rope_theta");
            c.remove("rope_scaling");
            let dtype = c.remove("torch_dtype").unwrap();
            c.insert("dtype".into(), dtype);
            c.insert("rope_parameters".into(), rope_parameters);
        })
    }

    /// Llama 3.1's RoPE (theta 500000, llama3 scaling), in the 4.x form and the 5.x form.
    fn llama31_v4() -> String {
        edited(|c| {
            c.insert("rope_theta".into(), json!(500000.0));
            c.insert(
                "rope_scaling".into(),
                json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}),
            );
        })
    }

    fn llama31_v5() -> String {
        v5(json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}))
    }

    /// `text` is refused with an error naming `field`, whose message contains each of `names`.
    fn check_refused(text: &str, field: &str, names: &[&str]) {
        let err = parse(text).unwrap_err();
        let message = err.to_string();
        assert!(matches!(&err, Error::ConfigField { field: f, .. } if f == field), "expected field `{field}`: {message}");
        assert!(message.starts_with("m/config.json: "), "{message}");
        for name in names {
            assert!(message.contains(name), "expected `{name}` in: {message}");
        }
    }

    use serde_json::json;

    #[test]
    fn the_transformers_4_and_5_forms_give_the_same_config() {
        let (old, new) = (parse(&llama31_v4()).unwrap(), parse(&llama31_v5()).unwrap());
        assert_eq!(old.rope_theta, 500000.0);
        assert!(matches!(old.rope_scaling, Some(RopeScaling::Llama3 { .. })));
        assert_eq!(old.rope_inv_freq(), new.rope_inv_freq());
        assert_eq!(ModelConfig { raw: Map::new(), ..old }, ModelConfig { raw: Map::new(), ..new.clone() });

        // Regression: a 5.x config's theta was ignored (and 10000 used) because only `rope_theta` was read.
        let c = parse(&v5(json!({"rope_type": "default", "rope_theta": 500000.0}))).unwrap();
        assert_eq!((c.rope_theta, &c.rope_scaling), (500000.0, &None));
        assert_eq!(c.rope_inv_freq()[1], 1.0 / 500000f64.powf(2.0 / 64.0));

        // The same values in both forms are fine; null means "not stated".
        let both = edited(|c| {
            c.insert("rope_parameters".into(), json!({"rope_type": "default", "rope_theta": 100000.0}));
        });
        assert_eq!(parse(&both).unwrap().rope_theta, 100000.0);
        let null_scaling = llama31_v5().replace(r#""bos_token_id":1"#, r#""bos_token_id":1,"rope_scaling":null"#);
        assert_eq!(parse(&null_scaling).unwrap().rope_scaling, new.rope_scaling);

        // Linear scaling, `type` spelling, partial rotary inside rope_parameters.
        let linear = parse(&v5(json!({"type": "linear", "factor": 4.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}))).unwrap();
        assert_eq!((&linear.rope_scaling, linear.rotary_dim()), (&Some(RopeScaling::Linear { factor: 4.0 }), 32));
    }

    #[test]
    fn rope_parameters_per_layer_type_must_agree_on_the_types_in_use() {
        let per_type = |sliding_theta: f64| {
            v5(json!({"full_attention": {"rope_type": "default", "rope_theta": 500000.0},
                      "sliding_attention": {"rope_type": "default", "rope_theta": sliding_theta}}))
        };
        assert_eq!(parse(&per_type(500000.0)).unwrap().rope_theta, 500000.0);
        check_refused(&per_type(10000.0), "rope_parameters.sliding_attention", &["rope_parameters.full_attention", "not supported"]);
        // Only the layer types the model has count (transformers 5 reads the nesting through `layer_types`).
        let layer_types = |types: &str| format!(r#""bos_token_id":1,"layer_types":[{types}]"#);
        let all_full = vec![r#""full_attention""#; 30].join(",");
        let full_only = per_type(10000.0).replace(r#""bos_token_id":1"#, &layer_types(&all_full));
        let c = parse(&full_only).unwrap();
        assert_eq!((c.rope_theta, c.layer_types.of(29), &c.sliding_rope), (500000.0, LayerType::Full, &None));
        let full_rope_missing = v5(json!({"sliding_attention": {"rope_type": "default"}}))
            .replace(r#""bos_token_id":1"#, &layer_types(&all_full));
        check_refused(&full_rope_missing, "rope_parameters.full_attention", &["missing or null"]);
        // One entry per block, of the two types there are.
        let short = per_type(500000.0).replace(r#""bos_token_id":1"#, &layer_types(r#""full_attention""#));
        check_refused(&short, "layer_types", &["1 entries for num_hidden_layers 30"]);
        let chunked = vec![r#""chunked_attention""#; 30].join(",");
        let unknown = per_type(500000.0).replace(r#""bos_token_id":1"#, &layer_types(&chunked));
        check_refused(&unknown, "layer_types", &["\"chunked_attention\" is not supported"]);
    }

    /// google/gemma-3-270m's config.json as transformers 4 writes it (as the assets' converter does).
    const GEMMA3_270M: &str = r#"{"model_type": "gemma3_text", "hidden_size": 640, "intermediate_size": 2048,
        "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "vocab_size": 262144, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "rope_scaling": null, "query_pre_attn_scalar": 256, "sliding_window": 512, "sliding_window_pattern": 6,
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention",
            "sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "sliding_attention",
            "sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
            "sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        "hidden_activation": "gelu_pytorch_tanh", "attn_logit_softcapping": null, "final_logit_softcapping": null,
        "tie_word_embeddings": true, "torch_dtype": "float16", "max_position_embeddings": 32768,
        "bos_token_id": 2, "eos_token_id": 1}"#;

    /// GEMMA3_270M with `edit` applied to its JSON object.
    fn gemma3(edit: impl FnOnce(&mut Map<String, Value>)) -> String {
        let mut map: Map<String, Value> = serde_json::from_str(GEMMA3_270M).unwrap();
        edit(&mut map);
        serde_json::to_string(&map).unwrap()
    }

    /// GEMMA3_270M as transformers 5 writes it: one `rope_parameters` object per layer type, `dtype`.
    fn gemma3_v5(full: Value, sliding: Value) -> String {
        gemma3(|c| {
            for k in ["rope_theta", "rope_local_base_freq", "rope_scaling", "sliding_window_pattern"] {
                c.remove(k);
            }
            let dtype = c.remove("torch_dtype").unwrap();
            c.insert("dtype".into(), dtype);
            c.insert("rope_parameters".into(), json!({"full_attention": full, "sliding_attention": sliding}));
        })
    }

    #[test]
    fn gemma3_reads_both_forms_into_per_layer_type_rope() {
        let old = parse(GEMMA3_270M).unwrap();
        let sliding = |theta| Some(RopeParams { theta, scaling: None, partial_rotary_factor: 1.0 });
        assert_eq!((old.rope_theta, &old.rope_scaling, &old.sliding_rope), (1e6, &None, &sliding(10000.0)));
        let globals: Vec<usize> = (0..18).filter(|&b| old.layer_types.of(b) == LayerType::Full).collect();
        assert_eq!(globals, [5, 11, 17]);
        assert_eq!((old.activation, old.query_pre_attn_scalar), (GatedActivation::GeluTanh, Some(256.0)));
        assert_eq!(old.final_logit_softcapping, None);
        assert_eq!(old.block_rope_inv_freq(5), old.rope_inv_freq());
        assert_eq!(old.block_rope_inv_freq(4)[1], 1.0 / 10000f64.powf(2.0 / 256.0));
        assert_eq!(old.rope_inv_freq()[1], 1.0 / 1e6f64.powf(2.0 / 256.0));

        let new = parse(&gemma3_v5(
            json!({"rope_type": "default", "rope_theta": 1000000.0}),
            json!({"rope_type": "default", "rope_theta": 10000.0}),
        ))
        .unwrap();
        assert_eq!(ModelConfig { raw: Map::new(), ..old.clone() }, ModelConfig { raw: Map::new(), ..new });

        // Without layer_types, every sliding_window_pattern-th block is global (Gemma3TextConfig).
        let pattern = parse(&gemma3(|c| drop(c.remove("layer_types")))).unwrap();
        assert_eq!(pattern.layer_types, LayerTypes::Pattern(6));
        assert!((0..18).all(|b| pattern.layer_types.of(b) == old.layer_types.of(b)));
        let c = parse(&gemma3(|c| {
            c.remove("layer_types");
            c.insert("sliding_window_pattern".into(), json!(4));
        }))
        .unwrap();
        let first: Vec<LayerType> = (0..5).map(|b| c.layer_types.of(b)).collect();
        let (s, f) = (LayerType::Sliding, LayerType::Full);
        assert_eq!(first, [s, s, s, f, s]);

        // Gemma 3 4B's RoPE: linear scaling on the global blocks only (4.x: `rope_scaling`, which the
        // local rotary embedding replaces by "default"; 5.x: in `full_attention` alone).
        let linear = Some(RopeScaling::Linear { factor: 8.0 });
        let scaled = gemma3(|c| drop(c.insert("rope_scaling".into(), json!({"rope_type": "linear", "factor": 8.0}))));
        let old = parse(&scaled).unwrap();
        assert_eq!((&old.rope_scaling, &old.sliding_rope), (&linear, &sliding(10000.0)));
        let new = parse(&gemma3_v5(
            json!({"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}),
            json!({"rope_type": "default", "rope_theta": 10000.0}),
        ))
        .unwrap();
        assert_eq!((&new.rope_scaling, &new.sliding_rope, new.rope_theta), (&linear, &sliding(10000.0), 1e6));
        assert_eq!(old.block_rope_inv_freq(5)[0], 1.0 / 8.0);
    }

    #[test]
    fn gemma3_defaults_are_gemma3_text_configs() {
        // Gemma3TextConfig: rms_norm_eps 1e-6, rope_theta 1e6, rope_local_base_freq 1e4,
        // query_pre_attn_scalar 256, sliding_window 4096 and pattern 6, gelu_pytorch_tanh, tied.
        let bare = gemma3(|c| {
            for k in [
                "rms_norm_eps", "rope_theta", "rope_local_base_freq", "rope_scaling", "query_pre_attn_scalar",
                "sliding_window", "sliding_window_pattern", "layer_types", "hidden_activation",
                "attn_logit_softcapping", "final_logit_softcapping", "tie_word_embeddings",
            ] {
                c.remove(k);
            }
        });
        let c = parse(&bare).unwrap();
        let local_theta = c.sliding_rope.as_ref().map(|r| r.theta);
        assert_eq!((c.rms_norm_eps, c.rope_theta, local_theta), (1e-6, 1e6, Some(10000.0)));
        assert_eq!((c.query_pre_attn_scalar, c.sliding_window), (Some(256.0), Some(4096)));
        assert_eq!((c.activation, c.tie_word_embeddings), (GatedActivation::GeluTanh, true));
        assert_eq!((c.layer_types.of(5), c.layer_types.of(6)), (LayerType::Full, LayerType::Sliding));
        // The 5.x form with no RoPE objects' bases: the same defaults.
        let v5 = gemma3_v5(json!({"rope_type": "default"}), json!({"rope_type": "default"}));
        let c = parse(&v5).unwrap();
        assert_eq!((c.rope_theta, c.sliding_rope.map(|r| r.theta)), (1e6, Some(10000.0)));
        // Sizes stay required; a Llama config's query_pre_attn_scalar is not read.
        check_refused(&gemma3(|c| drop(c.remove("head_dim"))), "head_dim", &["required field is missing"]);
        check_refused(&gemma3(|c| drop(c.remove("num_key_value_heads"))), "num_key_value_heads", &["required"]);
        let llama = edited(|c| drop(c.insert("query_pre_attn_scalar".into(), json!(1.0))));
        assert_eq!(parse(&llama).unwrap().query_pre_attn_scalar, None);
    }

    #[test]
    fn gemma3_refusals_name_their_field() {
        let set = |field: &'static str, v: Value| gemma3(move |c| drop(c.insert(field.into(), v)));
        check_refused(&set("attn_logit_softcapping", json!(50.0)), "attn_logit_softcapping", &["not supported"]);
        let negative = set("final_logit_softcapping", json!(-1.0));
        check_refused(&negative, "final_logit_softcapping", &["not a positive number"]);
        assert_eq!(parse(&set("final_logit_softcapping", json!(30.0))).unwrap().final_logit_softcapping, Some(30.0));
        check_refused(&set("use_bidirectional_attention", json!(true)), "use_bidirectional_attention", &["causal"]);
        check_refused(&set("query_pre_attn_scalar", json!(0)), "query_pre_attn_scalar", &["not a positive number"]);
        let no_layer_types = |pattern: Value| {
            gemma3(move |c| {
                c.remove("layer_types");
                c.insert("sliding_window_pattern".into(), pattern);
            })
        };
        check_refused(&no_layer_types(json!(0)), "sliding_window_pattern", &["0"]);
        // The two forms of the local base disagree: both named.
        let both = gemma3_v5(json!({"rope_theta": 1000000.0}), json!({"rope_theta": 20000.0}))
            .replace(r#""bos_token_id":2"#, r#""bos_token_id":2,"rope_local_base_freq":10000.0"#);
        let names = ["rope_local_base_freq says 10000", "20000 here"];
        check_refused(&both, "rope_parameters.sliding_attention.rope_theta", &names);
        // A layer type the blocks use needs its RoPE object.
        let missing = gemma3(|c| {
            c.remove("rope_theta");
            c.insert("rope_parameters".into(), json!({"full_attention": {"rope_theta": 1000000.0}}));
        });
        check_refused(&missing, "rope_parameters.sliding_attention", &["missing or null"]);
    }

    #[test]
    fn forms_that_disagree_are_refused_naming_both_fields() {
        let theta = edited(|c| {
            c.insert("rope_parameters".into(), json!({"rope_type": "default", "rope_theta": 500000.0}));
        });
        check_refused(&theta, "rope_parameters.rope_theta", &["rope_theta says 100000", "500000 here"]);
        let scaling = llama31_v5().replace(r#""bos_token_id":1"#, r#""bos_token_id":1,"rope_scaling":{"type":"linear","factor":8.0}"#);
        check_refused(&scaling, "rope_parameters", &["rope_scaling says linear scaling by 8", "llama3 scaling"]);
        let spellings = edited(|c| {
            c.insert("rope_scaling".into(), json!({"rope_type": "llama3", "type": "linear", "factor": 8.0}));
        });
        check_refused(&spellings, "rope_scaling.rope_type", &["rope_scaling.type", "`linear`"]);
        let dtype = edited(|c| {
            c.insert("dtype".into(), json!("bfloat16"));
        });
        check_refused(&dtype, "dtype", &["torch_dtype says F16", "BF16 here"]);
        let rotary = v5(json!({"rope_theta": 10000.0, "partial_rotary_factor": 0.5}))
            .replace(r#""bos_token_id":1"#, r#""bos_token_id":1,"partial_rotary_factor":0.25"#);
        check_refused(&rotary, "rope_parameters.partial_rotary_factor", &["partial_rotary_factor says 0.25"]);
    }

    #[test]
    fn missing_rope_fields_take_documented_defaults_or_are_refused() {
        // transformers 5's `RopeParameters`: an omitted `rope_theta` is the class's `default_theta`
        // (10000 for LlamaConfig), an omitted `rope_type` is "default"; 4.x: `rope_theta=10000.0`.
        let c = parse(&v5(json!({"rope_type": "default"}))).unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling, c.partial_rotary_factor), (10000.0, None, 1.0));
        assert_eq!(parse(&v5(json!({}))).unwrap().rope_theta, 10000.0);
        assert_eq!(parse(&edited(|c| drop(c.remove("rope_theta")))).unwrap().rope_theta, 10000.0);
        // Scaling parameters have no defaults.
        let no_original = llama31_v5().replace(r#","original_max_position_embeddings":8192"#, "");
        check_refused(&no_original, "rope_parameters.original_max_position_embeddings", &["required field is missing"]);
        check_refused(&v5(json!({"rope_type": "linear"})), "rope_parameters.factor", &["required field is missing"]);
        // A scaling without a type is not read as no scaling.
        check_refused(&v5(json!({"factor": 8.0})), "rope_parameters.factor", &["`default`"]);
        check_refused(&v5(json!({"rope_type": "yarn", "factor": 4.0})), "rope_parameters.rope_type", &["`yarn`", "not supported"]);
        // Phi-3-mini-128k's LongRoPE, in its 4.x spelling (`type`) and in the 5.x form.
        let longrope = json!({"type": "longrope", "long_factor": [1.0, 1.25], "short_factor": [1.0, 1.0]});
        let phi3 = edited(|c| {
            c.insert("model_type".into(), json!("phi3"));
            c.insert("rope_scaling".into(), longrope.clone());
        });
        check_refused(&phi3, "rope_scaling.type", &["`longrope` is not supported"]);
        let v5_longrope =
            v5(json!({"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [1.0], "short_factor": [1.0]}));
        check_refused(&v5_longrope, "rope_parameters.rope_type", &["`longrope` is not supported"]);
        check_refused(&v5(json!({"rope_theta": "big"})), "rope_parameters.rope_theta", &["expected a number"]);
        check_refused(&v5(json!([1, 2])), "rope_parameters", &["expected an object"]);
    }

    #[test]
    fn other_defaults_follow_the_architecture() {
        // LlamaConfig: num_key_value_heads -> num_attention_heads, rms_norm_eps 1e-6, silu, untied.
        let bare = edited(|c| {
            for k in ["num_key_value_heads", "rms_norm_eps", "hidden_act", "tie_word_embeddings", "torch_dtype", "head_dim"] {
                c.remove(k);
            }
        });
        let c = parse(&bare).unwrap();
        assert_eq!((c.n_kv_heads, c.head_dim, c.rms_norm_eps, c.tie_word_embeddings, c.dtype), (9, 64, 1e-6, false, None));
        assert_eq!((c.activation, c.sliding_window), (GatedActivation::Silu, None));
        // MistralConfig, Qwen2Config and Qwen3Config default num_key_value_heads to their reference
        // models' 8, 32 and 32: required.
        for model_type in ["mistral", "qwen2", "qwen3"] {
            let text = bare.replace(r#""model_type":"llama""#, &format!(r#""model_type":"{model_type}""#));
            check_refused(&text, "num_key_value_heads", &["required field is missing"]);
        }
        // Qwen3Config's head_dim=128 is Qwen3-8B's, not hidden_size / heads: required too; stated, it
        // may differ from hidden_size / heads.
        let qwen3 = SMOLLM2.replace(r#""model_type": "llama""#, r#""model_type": "qwen3""#);
        check_refused(&qwen3.replace(r#""head_dim": 64,"#, ""), "head_dim", &["required field is missing"]);
        let c = parse(&qwen3.replace(r#""head_dim": 64"#, r#""head_dim": 128"#)).unwrap();
        assert_eq!((c.head_dim, c.q_dim(), c.kv_dim(), c.sliding_window), (128, 9 * 128, 3 * 128, None));
        // MistralConfig's sliding_window=4096 when absent; null is no window.
        let mistral = SMOLLM2.replace(r#""model_type": "llama""#, r#""model_type": "mistral""#);
        assert_eq!(parse(&mistral).unwrap().sliding_window, Some(4096));
        let mistral_null = mistral.replace(r#""bos_token_id": 1"#, r#""bos_token_id": 1, "sliding_window": null"#);
        assert_eq!(parse(&mistral_null).unwrap().sliding_window, None);
        // Phi3Config: num_key_value_heads -> num_attention_heads, rms_norm_eps 1e-5, no window unless
        // config.json sets one (Phi-3-mini-4k: 2047), which applies.
        let phi3 = bare.replace(r#""model_type":"llama""#, r#""model_type":"phi3""#);
        let c = parse(&phi3).unwrap();
        assert_eq!((c.n_kv_heads, c.head_dim, c.rms_norm_eps, c.tie_word_embeddings), (9, 64, 1e-5, false));
        assert_eq!(c.sliding_window, None);
        let c = parse(&phi3.replace(r#""bos_token_id":1"#, r#""bos_token_id":1,"sliding_window":2047"#)).unwrap();
        let arch = descriptor_for("phi3", Path::new("config.json")).unwrap();
        assert_eq!((c.sliding_window, arch.sliding_window(&c, 0)), (Some(2047), Some(2047)));
        // The defaults come from the descriptor, so the type must be known.
        let err = parse(&SMOLLM2.replace(r#""model_type": "llama""#, r#""model_type": "gpt2""#)).unwrap_err();
        assert!(matches!(err, Error::UnsupportedArchitecture { .. }), "{err}");
    }

    #[test]
    fn llama3_rope_scaling_keeps_high_and_divides_low_frequencies() {
        let text = SMOLLM2.replace(
            r#""rope_scaling": null"#,
            r#""rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
        );
        let c = parse(&text).unwrap();
        let (scaled, base) = (c.rope_inv_freq(), ModelConfig { rope_scaling: None, ..c.clone() }.rope_inv_freq());
        assert_eq!(scaled[0], base[0]);
        assert_eq!(*scaled.last().unwrap(), base.last().unwrap() / 8.0);
    }

    #[test]
    fn generation_config_gives_its_eos_ids_and_names_a_bad_one() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(GenerationConfig::from_dir(dir.path()).unwrap(), GenerationConfig::default());
        let file = dir.path().join("generation_config.json");
        std::fs::write(&file, r#"{"bos_token_id": 1, "eos_token_id": [128001, 128008, 128009]}"#).unwrap();
        assert_eq!(GenerationConfig::from_dir(dir.path()).unwrap().eos_token_ids, [128001, 128008, 128009]);
        std::fs::write(&file, r#"{"eos_token_id": 2}"#).unwrap();
        assert_eq!(GenerationConfig::from_dir(dir.path()).unwrap().eos_token_ids, [2]);
        std::fs::write(&file, r#"{"eos_token_id": "two"}"#).unwrap();
        let err = GenerationConfig::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("generation_config.json") && err.contains("eos_token_id"), "{err}");
    }
}
