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
//! A missing field is an error naming the file and the field, unless transformers' config class
//! for the architecture documents a default for it: those are the descriptor's
//! [`ConfigDefaults`](crate::arch::ConfigDefaults), so `model_type` must name a registered
//! architecture. A value of the wrong type is always an error. Which architecture-specific fields
//! matter (sliding window, biases) is said by the descriptor, not here.

use std::path::{Path, PathBuf};

use awq_kernels::ops::GatedActivation;
use awq_kernels::DType;
use serde_json::{Map, Value};

use crate::arch::{descriptor_for, HeadDimDefault, KvHeadsDefault};
use crate::{Error, Result};

/// RoPE frequency scaling, as `rope_scaling` (transformers 4) or `rope_parameters` (5) describes it.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor` (`"rope_type": "linear"`).
    Linear { factor: f64 },
    /// Llama 3.1's wavelength-dependent scaling (`"rope_type": "llama3"`).
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
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
    /// The RoPE base: `rope_parameters.rope_theta` (5.x) or `rope_theta` (4.x).
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
        let defaults = descriptor_for(model_type, path)?.config_defaults;
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
        let rope = f.rope(defaults.rope_theta)?;
        Ok(ModelConfig {
            model_type: model_type.to_string(),
            intermediate_size: f.usize("intermediate_size")?,
            n_blocks: f.usize("num_hidden_layers")?,
            vocab_size: f.usize("vocab_size")?,
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(defaults.rms_norm_eps),
            rope_theta: rope.theta,
            rope_scaling: rope.scaling,
            partial_rotary_factor: rope.partial_rotary_factor,
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
        ((self.head_dim as f64 * self.partial_rotary_factor) as usize) & !1
    }

    /// RoPE inverse frequencies after scaling, as transformers' `ROPE_INIT_FUNCTIONS` compute them.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let rot = self.rotary_dim();
        let base: Vec<f64> = (0..rot / 2).map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / rot as f64)).collect();
        match &self.rope_scaling {
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
}

/// The RoPE settings once both forms are resolved.
#[derive(Debug, PartialEq)]
struct Rope {
    theta: f64,
    scaling: Option<RopeScaling>,
    partial_rotary_factor: f64,
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

    /// RoPE from the 4.x fields and the 5.x `rope_parameters`, checked to agree where both speak.
    /// Defaults, as transformers 5 fills them in (`RotaryEmbeddingConfigMixin`, which reads the 4.x
    /// fields the same way): `rope_type` "default", `partial_rotary_factor` 1.0, `rope_theta` the
    /// architecture's.
    fn rope(&self, default_theta: f64) -> Result<Rope> {
        let top = StatedRope {
            theta: self.opt_f64("rope_theta")?,
            partial_rotary_factor: self.opt_f64("partial_rotary_factor")?,
            scaling: self.opt_object("rope_scaling")?.map(|o| self.inner("rope_scaling", o).scaling()).transpose()?,
        };
        let rope = match self.opt_object("rope_parameters")? {
            None => self.resolve(&top, &StatedRope::default(), default_theta)?,
            Some(params) if !params.values().any(Value::is_object) => {
                let inner = self.inner("rope_parameters", params);
                inner.resolve(&inner.stated_rope()?, &top, default_theta)?
            }
            Some(params) => self.per_layer_type_rope(params, &top, default_theta)?,
        };
        if !(rope.partial_rotary_factor > 0.0 && rope.partial_rotary_factor <= 1.0) {
            return Err(self.bad("partial_rotary_factor", format!("{} is not in (0, 1]", rope.partial_rotary_factor)));
        }
        Ok(rope)
    }

    /// The 5.x form with one `rope_parameters` object per layer type (Gemma 3's
    /// `full_attention` / `sliding_attention`). Every block here uses one RoPE, so the objects of
    /// the layer types the model uses (`layer_types`; all of them when it is absent) must agree.
    fn per_layer_type_rope(&self, params: &'a Map<String, Value>, top: &StatedRope, default_theta: f64) -> Result<Rope> {
        let nested = self.inner("rope_parameters", params);
        let used: Vec<&str> = match self.get("layer_types") {
            None => params.keys().map(String::as_str).collect(),
            Some(Value::Array(types)) => {
                let mut used = Vec::new();
                for t in types {
                    let t = t.as_str().ok_or_else(|| self.bad("layer_types", format!("expected layer type names, got {t}")))?;
                    if !used.contains(&t) {
                        used.push(t);
                    }
                }
                used
            }
            Some(v) => return Err(self.bad("layer_types", format!("expected an array, got {v}"))),
        };
        let mut resolved: Option<(&str, Rope)> = None;
        for layer_type in used {
            let object = nested.opt_object(layer_type)?.ok_or_else(|| {
                nested.bad(layer_type, "missing or null: blocks without RoPE are not supported".into())
            })?;
            let inner = nested.inner(layer_type, object);
            let rope = inner.resolve(&inner.stated_rope()?, top, default_theta)?;
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
    /// the top level), which must agree where both speak. Without `rope_parameters`, `own` is the
    /// top level itself and `top` says nothing.
    fn resolve(&self, own: &StatedRope, top: &StatedRope, default_theta: f64) -> Result<Rope> {
        const FORMS: &str = "the transformers 5 and 4 forms of this setting";
        let theta = self.agreeing(self.name("rope_theta"), own.theta, "rope_theta".into(), top.theta, FORMS, f64::to_string)?;
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
        Ok(Rope {
            theta: theta.unwrap_or(default_theta),
            scaling: scaling.flatten(),
            partial_rotary_factor: partial_rotary_factor.unwrap_or(1.0),
        })
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
        let full_only = per_type(10000.0).replace(r#""bos_token_id":1"#, r#""bos_token_id":1,"layer_types":["full_attention","full_attention"]"#);
        assert_eq!(parse(&full_only).unwrap().rope_theta, 500000.0);
        let missing = per_type(1.0).replace(r#""bos_token_id":1"#, r#""bos_token_id":1,"layer_types":["chunked_attention"]"#);
        check_refused(&missing, "rope_parameters.chunked_attention", &["missing or null"]);
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
        assert_eq!((c.sliding_window, arch.sliding_window(&c)), (Some(2047), Some(2047)));
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
