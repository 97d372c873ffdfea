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
mod tests;
