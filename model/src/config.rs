//! config.json, parsed into a checked [`ModelConfig`].
//!
//! Only the fields a decoder forward pass and AWQ need are read. A missing required field or a value
//! of the wrong type is an error naming the file and the field; optional fields take the defaults
//! transformers gives them. Which architecture-specific fields matter (sliding window, biases) is
//! said by the architecture's descriptor, not here.

use std::path::{Path, PathBuf};

use awq_kernels::ops::GatedActivation;
use awq_kernels::DType;
use serde_json::{Map, Value};

use crate::{Error, Result};

/// RoPE frequency scaling as config.json's `rope_scaling` describes it.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor` (`"type": "linear"`).
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
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    /// Fraction of each head's dimensions that are rotated (1.0 for full rotary).
    pub partial_rotary_factor: f64,
    pub tie_word_embeddings: bool,
    /// `torch_dtype`; `None` when config.json does not say.
    pub dtype: Option<DType>,
    pub activation: GatedActivation,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
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
        let f = Fields { path, raw: &raw };
        let hidden_size = f.usize("hidden_size")?;
        let n_heads = f.usize("num_attention_heads")?;
        let n_kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(n_heads);
        if n_heads == 0 || hidden_size % n_heads != 0 && f.opt_usize("head_dim")?.is_none() {
            return Err(f.bad("num_attention_heads", format!("{n_heads} heads do not divide hidden_size {hidden_size}")));
        }
        if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(f.bad("num_key_value_heads", format!("{n_kv_heads} does not divide {n_heads} attention heads")));
        }
        let head_dim = f.opt_usize("head_dim")?.unwrap_or(hidden_size / n_heads);
        let activation = match f.opt_str("hidden_act")?.or(f.opt_str("hidden_activation")?).unwrap_or("silu") {
            "silu" | "swish" => GatedActivation::Silu,
            "gelu_pytorch_tanh" | "gelu_tanh" => GatedActivation::GeluTanh,
            other => return Err(f.bad("hidden_act", format!("activation `{other}` is not supported (silu, gelu_pytorch_tanh)"))),
        };
        let dtype = match f.opt_str("torch_dtype")?.or(f.opt_str("dtype")?) {
            None => None,
            Some("float16") => Some(DType::F16),
            Some("bfloat16") => Some(DType::BF16),
            Some("float32") => Some(DType::F32),
            Some(other) => return Err(f.bad("torch_dtype", format!("`{other}` is not float16, bfloat16 or float32"))),
        };
        let partial_rotary_factor = f.opt_f64("partial_rotary_factor")?.unwrap_or(1.0);
        if !(partial_rotary_factor > 0.0 && partial_rotary_factor <= 1.0) {
            return Err(f.bad("partial_rotary_factor", format!("{partial_rotary_factor} is not in (0, 1]")));
        }
        Ok(ModelConfig {
            model_type: f.str("model_type")?.to_string(),
            intermediate_size: f.usize("intermediate_size")?,
            n_blocks: f.usize("num_hidden_layers")?,
            vocab_size: f.usize("vocab_size")?,
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: f.opt_f64("rope_theta")?.unwrap_or(10000.0),
            rope_scaling: f.rope_scaling()?,
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            attention_bias: f.opt_bool("attention_bias")?.unwrap_or(false),
            mlp_bias: f.opt_bool("mlp_bias")?.unwrap_or(false),
            sliding_window: f.opt_usize("sliding_window")?,
            bos_token_id: f.opt_usize("bos_token_id")?.map(|v| v as u32),
            hidden_size,
            n_heads,
            n_kv_heads,
            head_dim,
            partial_rotary_factor,
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

/// Typed access to config.json fields with errors that name the field.
struct Fields<'a> {
    path: &'a Path,
    raw: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn bad(&self, field: &str, detail: String) -> Error {
        Error::ConfigField { path: self.path.into(), field: field.into(), detail }
    }

    fn get(&self, field: &str) -> Option<&'a Value> {
        self.raw.get(field).filter(|v| !v.is_null())
    }

    fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        self.get(field)
            .map(|v| v.as_u64().map(|n| n as usize).ok_or_else(|| self.bad(field, format!("expected a non-negative integer, got {v}"))))
            .transpose()
    }

    fn usize(&self, field: &str) -> Result<usize> {
        self.opt_usize(field)?.ok_or_else(|| self.bad(field, "required field is missing".into()))
    }

    fn opt_f64(&self, field: &str) -> Result<Option<f64>> {
        self.get(field).map(|v| v.as_f64().ok_or_else(|| self.bad(field, format!("expected a number, got {v}")))).transpose()
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

    fn rope_scaling(&self) -> Result<Option<RopeScaling>> {
        let Some(v) = self.get("rope_scaling") else { return Ok(None) };
        let obj = v.as_object().ok_or_else(|| self.bad("rope_scaling", format!("expected an object, got {v}")))?;
        let num = |k: &str| {
            obj.get(k).and_then(Value::as_f64).ok_or_else(|| self.bad(&format!("rope_scaling.{k}"), "required number is missing".into()))
        };
        let kind = obj.get("rope_type").or(obj.get("type")).and_then(Value::as_str).unwrap_or("default");
        Ok(match kind {
            "default" => None,
            "linear" => Some(RopeScaling::Linear { factor: num("factor")? }),
            "llama3" => Some(RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            }),
            other => return Err(self.bad("rope_scaling.rope_type", format!("`{other}` is not supported (linear, llama3)"))),
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
}
