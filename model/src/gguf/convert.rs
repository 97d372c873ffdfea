//! A GGUF file as a Hugging Face checkpoint: config.json from the metadata, tensor names through
//! the architecture descriptors, the inverse of what llama.cpp's converter changed (the Q/K
//! permutation, Gemma's norm offset); [`import`] writes it.
//!
//! [`GGUF_ARCHS`] lists what can be imported, keyed by `general.architecture`: the config.json
//! `model_type` (whose [`ArchDescriptor`] then names every tensor), the config fields only that
//! family has (Gemma 3's in [`super::gemma3`]), whether llama.cpp's converter permuted the Q and K
//! rows (it does for `llama`, so its interleaved RoPE can rotate adjacent pairs; Hugging Face's
//! rotate_half rotates halves) and whether it added a constant to every norm weight (`gemma3`).
//! GGUF tensor names are llama.cpp's (`blk.N.attn_q.weight`, `token_embd.weight`, ...); the tables
//! here map them to a role, and the descriptor spells the role's Hugging Face name.
//!
//! [`import`] first plans the whole checkpoint from metadata and tensor infos alone: every tensor
//! has a Hugging Face name, the shape config.json implies and a type we can dequantize; every tensor
//! the architecture needs is there; the tokenizer builds. Only then does it dequantize (exactly, see
//! [`super::dequant`]), subtract the norm offset in f32, round once to the output dtype (round to
//! nearest even; a value the dtype cannot hold is an error naming the tensor), undo the Q/K
//! permutation and write the checkpoint atomically. Without `output.weight` the embeddings are
//! tied. Same file, same bytes.

use std::collections::BTreeMap;
use std::path::Path;

use awq_kernels::DType;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;
use serde_json::{json, Map, Value};

use super::tokenizer::{generation_config, tokenizer_files};
use super::{dequant, gemma3, GgmlType, GgufFile, GgufTensor};
use crate::arch::{descriptor_for, ArchDescriptor, LinearRole, NormRole};
use crate::checkpoint::expected_tensors;
use crate::safetensors::RawTensor;
use crate::writer::{write_generated_checkpoint, Overwrite};
use crate::{Error, ModelConfig, Result};

/// An importable `general.architecture`.
struct GgufArch {
    /// `general.architecture`, also the prefix of its metadata keys (`llama.block_count`).
    name: &'static str,
    /// config.json's `model_type`, a key of [`crate::arch::REGISTRY`].
    model_type: &'static str,
    /// config.json's `architectures`.
    hf_class: &'static str,
    /// llama.cpp's `convert_hf_to_gguf.py` permuted the rows of Q and K (weights and biases) with
    /// `LlamaModel.permute`; the import applies the inverse.
    permuted_qk: bool,
    /// llama.cpp's converter added this to every value of every norm weight (the blocks' norms,
    /// the per-head q/k norms and the final norm); the import subtracts it in f32 before rounding.
    norm_shift: Option<f32>,
    /// config.json fields only this family has (the activation among them: transformers names
    /// the field `hidden_act` in most families, `hidden_activation` in Gemma's).
    extra_config: fn(&Facts) -> Result<Value>,
}

/// What the family-specific config fields depend on: the general ones, already checked, and the
/// file for the keys only the family has.
pub(super) struct Facts<'a> {
    pub file: &'a GgufFile,
    /// `general.architecture`, the prefix of the family's keys.
    pub arch: &'static str,
    pub n_blocks: u64,
    pub context_length: u64,
    pub hidden: u64,
    pub n_heads: u64,
    pub head_dim: u64,
    /// `blk.0.attn_q.bias` is present.
    pub q_bias: bool,
}

impl Facts<'_> {
    /// The full name of the family's key `k` (`gemma3.attention.sliding_window`).
    pub fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }
}

const GGUF_ARCHS: &[GgufArch] = &[
    GgufArch {
        name: "llama",
        model_type: "llama",
        hf_class: "LlamaForCausalLM",
        permuted_qk: true,
        norm_shift: None,
        extra_config: |f| {
            Ok(json!({"hidden_act": "silu", "attention_bias": f.q_bias, "mlp_bias": false, "pretraining_tp": 1}))
        },
    },
    GgufArch {
        name: "qwen2",
        model_type: "qwen2",
        hf_class: "Qwen2ForCausalLM",
        permuted_qk: false,
        norm_shift: None,
        extra_config: |f| {
            Ok(json!({"hidden_act": "silu", "use_sliding_window": false, "sliding_window": f.context_length,
                      "max_window_layers": f.n_blocks}))
        },
    },
    // llama.cpp's `Qwen3Model` is its `Qwen2Model` (no permutation) plus `attn_q_norm` / `attn_k_norm`;
    // `head_dim` comes from `attention.key_length`, which it writes.
    GgufArch {
        name: "qwen3",
        model_type: "qwen3",
        hf_class: "Qwen3ForCausalLM",
        permuted_qk: false,
        norm_shift: None,
        extra_config: |f| {
            Ok(json!({"hidden_act": "silu", "attention_bias": f.q_bias, "use_sliding_window": false,
                      "sliding_window": null, "max_window_layers": f.n_blocks}))
        },
    },
    // llama.cpp's `Gemma3Model` (convert_hf_to_gguf.py) writes HF's tensors unpermuted, but with 1
    // added to every `*norm.weight` (its `norm_shift`: Hugging Face's Gemma norms multiply by
    // `1 + w`, llama.cpp's by `w`). The config fields it does not store are in `gemma3.rs`.
    GgufArch {
        name: "gemma3",
        model_type: "gemma3_text",
        hf_class: "Gemma3ForCausalLM",
        permuted_qk: false,
        norm_shift: Some(1.0),
        extra_config: gemma3::extra_config,
    },
];

/// Where a GGUF tensor goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Embed,
    FinalNorm,
    LmHead,
    Norm(NormRole),
    Linear(LinearRole),
}

/// llama.cpp's names of the tensors outside blocks (`llama-arch.cpp`, `LLM_TENSOR_*`).
const GLOBAL_TENSORS: [(&str, Slot); 3] =
    [("token_embd", Slot::Embed), ("output_norm", Slot::FinalNorm), ("output", Slot::LmHead)];

/// llama.cpp's names of a block's tensors, under `blk.N.` (a norm only where the descriptor has it).
/// `ffn_norm` is the MLP's input norm in every family (Gemma's `pre_feedforward_layernorm`); Gemma's
/// norms of the sublayers' outputs are `post_attention_norm` and `post_ffw_norm` (`llama-arch.cpp`,
/// `LLM_TENSOR_ATTN_POST_NORM`, `LLM_TENSOR_FFN_POST_NORM`).
const BLOCK_TENSORS: [(&str, Slot); 13] = [
    ("attn_norm", Slot::Norm(NormRole::Attn)),
    ("ffn_norm", Slot::Norm(NormRole::Mlp)),
    ("attn_q_norm", Slot::Norm(NormRole::QHead)),
    ("attn_k_norm", Slot::Norm(NormRole::KHead)),
    ("post_attention_norm", Slot::Norm(NormRole::AttnOut)),
    ("post_ffw_norm", Slot::Norm(NormRole::MlpOut)),
    ("attn_q", Slot::Linear(LinearRole::Q)),
    ("attn_k", Slot::Linear(LinearRole::K)),
    ("attn_v", Slot::Linear(LinearRole::V)),
    ("attn_output", Slot::Linear(LinearRole::O)),
    ("ffn_gate", Slot::Linear(LinearRole::Gate)),
    ("ffn_up", Slot::Linear(LinearRole::Up)),
    ("ffn_down", Slot::Linear(LinearRole::Down)),
];

/// Tensors llama.cpp writes for features the import does not support, with the reason.
const UNSUPPORTED_TENSORS: [(&str, &str); 1] =
    [("rope_freqs.weight", "RoPE frequency factors (Llama 3.1 rope scaling) are not supported")];

/// How `awq import gguf` writes the checkpoint.
#[derive(Clone, Copy, Debug)]
pub struct ImportOptions {
    /// dtype of every tensor written (F16 by default, as the reference converter).
    pub dtype: DType,
    /// Largest safetensors file to write, in bytes.
    pub max_shard_bytes: u64,
    pub overwrite: Overwrite,
}

impl Default for ImportOptions {
    fn default() -> ImportOptions {
        ImportOptions { dtype: DType::F16, max_shard_bytes: 5_000_000_000, overwrite: Overwrite::Refuse }
    }
}

/// What [`import`] read and wrote.
#[derive(Clone, Debug)]
pub struct ImportReport {
    /// `general.architecture`.
    pub architecture: &'static str,
    /// `general.name`, when set.
    pub model_name: Option<String>,
    pub n_blocks: usize,
    pub n_tensors: usize,
    pub n_parameters: usize,
    /// How many tensors of each GGML type the file held.
    pub source_types: BTreeMap<GgmlType, usize>,
    /// Tokens in the vocabulary of tokenizer.json.
    pub n_tokens: usize,
    pub tie_word_embeddings: bool,
    pub dtype: DType,
}

/// One tensor of the output and where it comes from.
struct Planned<'a> {
    source: &'a GgufTensor,
    name: String,
    shape: Vec<usize>,
    /// Undo the Q/K permutation over this many heads.
    unpermute_heads: Option<usize>,
    /// Subtract this from every value before rounding ([`GgufArch::norm_shift`]).
    shift: Option<f32>,
}

/// Everything [`import`] writes, checked, before any tensor is dequantized.
struct Plan<'a> {
    arch: &'static GgufArch,
    config: Map<String, Value>,
    tensors: Vec<Planned<'a>>,
    files: Vec<(String, Vec<u8>)>,
    n_tokens: usize,
}

/// Imports the GGUF file `gguf` as a Hugging Face checkpoint in `out_dir`; see the module docs.
pub fn import(gguf: &Path, out_dir: &Path, options: &ImportOptions) -> Result<ImportReport> {
    if out_dir.exists() && options.overwrite == Overwrite::Refuse {
        return Err(Error::Io {
            path: out_dir.into(),
            cause: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "output directory exists (pass --overwrite to replace it)"),
        });
    }
    let file = GgufFile::open(gguf)?;
    let plan = plan(&file, options.dtype)?;
    let mut source_types = BTreeMap::new();
    for p in &plan.tensors {
        *source_types.entry(p.source.ty).or_insert(0) += 1;
    }
    let n_parameters = plan.tensors.iter().map(|p| p.source.n_elements()).sum();
    let tensors = plan
        .tensors
        .iter()
        .map(|p| {
            let mut data = to_dtype(&file, p.source, options.dtype, p.shift)?;
            if let Some(n_heads) = p.unpermute_heads {
                data = unpermute_rows(&data, p.shape[0], n_heads);
            }
            Ok(RawTensor { name: p.name.clone(), dtype: options.dtype.into(), shape: p.shape.clone(), data })
        })
        .collect::<Result<Vec<_>>>()?;
    let report = ImportReport {
        architecture: plan.arch.name,
        model_name: file.str("general.name")?.map(String::from),
        n_blocks: plan.config["num_hidden_layers"].as_u64().expect("plan writes num_hidden_layers") as usize,
        n_tensors: tensors.len(),
        n_parameters,
        source_types,
        n_tokens: plan.n_tokens,
        tie_word_embeddings: plan.config["tie_word_embeddings"].as_bool().expect("plan writes tie_word_embeddings"),
        dtype: options.dtype,
    };
    write_generated_checkpoint(&plan.config, tensors, &plan.files, out_dir, options.max_shard_bytes, options.overwrite)?;
    Ok(report)
}

fn plan(file: &GgufFile, dtype: DType) -> Result<Plan<'_>> {
    let path = file.path();
    let arch_name = file.required("general.architecture", file.str("general.architecture")?)?;
    let arch = GGUF_ARCHS.iter().find(|a| a.name == arch_name).ok_or_else(|| Error::UnsupportedGgufArchitecture {
        path: path.into(),
        architecture: arch_name.into(),
        supported: GGUF_ARCHS.iter().map(|a| a.name).collect::<Vec<_>>().join(", "),
    })?;
    let descriptor = descriptor_for(arch.model_type, path)?;
    let bad_tensor = |tensor: &str, detail: String| Error::BadTensor { path: path.into(), tensor: tensor.into(), detail };

    let mut named = Vec::new();
    for t in file.tensors() {
        if let Some((_, why)) = UNSUPPORTED_TENSORS.iter().find(|(n, _)| *n == t.name) {
            return Err(bad_tensor(&t.name, why.to_string()));
        }
        let (name, slot) = hf_name(descriptor, &t.name)
            .ok_or_else(|| bad_tensor(&t.name, format!("no Hugging Face name for this tensor of a {} model", arch.name)))?;
        dequant::check_supported(t.ty).map_err(|e| bad_tensor(&t.name, e.to_string()))?;
        named.push((t, name, slot));
    }
    let embed = named.iter().find(|(_, _, s)| *s == Slot::Embed).ok_or_else(|| Error::MissingTensor {
        path: path.into(),
        tensor: "token_embd.weight".into(),
        hint: String::new(),
    })?;
    let q_bias = named.iter().any(|(_, name, _)| *name == descriptor.bias_name(0, LinearRole::Q));
    let tied = !named.iter().any(|(_, _, s)| *s == Slot::LmHead);
    let config = config_json(file, arch, embed.0.shape()[0], tied, q_bias, dtype)?;
    let checked = ModelConfig::parse(path, &serde_json::to_string(&config).expect("JSON serialises"))?;

    // Every tensor the architecture needs, with its shape, and nothing else.
    let expected: BTreeMap<String, Vec<usize>> =
        expected_tensors(descriptor, &checked, None).into_iter().map(|e| (e.name, e.shape)).collect();
    let mut tensors = Vec::new();
    for (t, name, slot) in named {
        let Some(shape) = expected.get(&name) else {
            return Err(bad_tensor(
                &t.name,
                format!("{name} is not part of a {} model with this metadata", arch.name),
            ));
        };
        if t.shape() != *shape {
            return Err(bad_tensor(
                &t.name,
                format!("shape {:?}, but the metadata implies {shape:?} for {name}", t.shape()),
            ));
        }
        let unpermute_heads = match slot {
            Slot::Linear(LinearRole::Q) if arch.permuted_qk => Some(checked.n_heads),
            Slot::Linear(LinearRole::K) if arch.permuted_qk => Some(checked.n_kv_heads),
            _ => None,
        };
        if let Some(heads) = unpermute_heads {
            if shape[0] % (2 * heads) != 0 {
                return Err(bad_tensor(&t.name, format!("{} rows do not split into {heads} heads of even size", shape[0])));
            }
        }
        let shift = match slot {
            Slot::Norm(_) | Slot::FinalNorm => arch.norm_shift,
            _ => None,
        };
        tensors.push(Planned { source: t, name, shape: shape.clone(), unpermute_heads, shift });
    }
    if let Some(missing) = expected.keys().find(|name| !tensors.iter().any(|p| &p.name == *name)) {
        return Err(Error::MissingTensor {
            path: path.into(),
            tensor: gguf_name(descriptor, missing, checked.n_blocks).unwrap_or_else(|| missing.clone()),
            hint: format!(" (it becomes {missing}, which a {} model needs)", arch.name),
        });
    }

    let context_length = config["max_position_embeddings"].as_u64().expect("config_json writes max_position_embeddings");
    let tok = tokenizer_files(file, context_length)?;
    let json_bytes = |v: &Value| serde_json::to_vec_pretty(v).expect("JSON serialises");
    let files = vec![
        ("tokenizer.json".to_string(), json_bytes(&tok.tokenizer_json)),
        ("tokenizer_config.json".to_string(), json_bytes(&tok.tokenizer_config)),
        ("generation_config.json".to_string(), json_bytes(&generation_config(&config))),
    ];
    Ok(Plan { arch, config, tensors, files, n_tokens: tok.n_tokens })
}

/// The Hugging Face name of GGUF tensor `gguf_name` under `arch`, and its slot.
fn hf_name(arch: &ArchDescriptor, gguf_name: &str) -> Option<(String, Slot)> {
    let (base, suffix) = gguf_name.rsplit_once('.')?;
    let (slot, block) = match base.strip_prefix("blk.") {
        Some(rest) => {
            let (idx, stem) = rest.split_once('.')?;
            let block = idx.parse::<usize>().ok().filter(|b| b.to_string() == idx)?;
            (BLOCK_TENSORS.iter().find(|(s, _)| *s == stem)?.1, Some(block))
        }
        None => (GLOBAL_TENSORS.iter().find(|(s, _)| *s == base)?.1, None),
    };
    let name = match (slot, block, suffix) {
        (Slot::Embed, None, "weight") => arch.embed_tokens.to_string(),
        (Slot::FinalNorm, None, "weight") => arch.final_norm.to_string(),
        (Slot::LmHead, None, "weight") => arch.lm_head.to_string(),
        (Slot::Norm(role), Some(b), "weight") if arch.has_norm(role) => arch.norm_name(b, role),
        (Slot::Linear(role), Some(b), "weight") => arch.linear_name(b, role),
        (Slot::Linear(role), Some(b), "bias") => arch.bias_name(b, role),
        _ => return None,
    };
    Some((name, slot))
}

/// The GGUF name that [`hf_name`] maps to `hf` (for error messages).
fn gguf_name(arch: &ArchDescriptor, hf: &str, n_blocks: usize) -> Option<String> {
    let globals = GLOBAL_TENSORS.iter().map(|(stem, _)| format!("{stem}.weight"));
    let blocks = (0..n_blocks).flat_map(|b| {
        BLOCK_TENSORS.iter().flat_map(move |(stem, _)| ["weight", "bias"].map(|s| format!("blk.{b}.{stem}.{s}")))
    });
    globals.chain(blocks).find(|g| hf_name(arch, g).is_some_and(|(name, _)| name == hf))
}

/// config.json from the `{arch}.*` and `tokenizer.ggml.*` keys, with the fields and defaults of
/// `../shared/assets/gguf2hf.py` (which follows transformers' configs).
fn config_json(file: &GgufFile, arch: &GgufArch, vocab_size: usize, tied: bool, q_bias: bool, dtype: DType) -> Result<Map<String, Value>> {
    let key = |k: &str| format!("{}.{k}", arch.name);
    let key_error = |k: &str, detail: String| Error::GgufKey { path: file.path().into(), key: key(k), detail };
    let uint = |k: &str| file.uint(&key(k));
    let required_uint = |k: &str| file.required(&key(k), uint(k)?);

    let hidden = required_uint("embedding_length")?;
    let n_blocks = required_uint("block_count")?;
    // The expected tensors are listed per block: a count that lies must not make that list
    // gigabytes long. Every block has tensors of its own.
    if n_blocks > file.tensors().len() as u64 {
        let n_tensors = file.tensors().len();
        let detail = format!("{n_blocks} blocks, but the file holds {n_tensors} tensors in all");
        return Err(key_error("block_count", detail));
    }
    let n_heads = required_uint("attention.head_count")?;
    if n_heads == 0 {
        return Err(key_error("attention.head_count", "must be positive".into()));
    }
    // llama.cpp's default when the key is absent: no grouped-query attention.
    let n_kv_heads = uint("attention.head_count_kv")?.unwrap_or(n_heads);
    if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
        return Err(key_error("attention.head_count_kv", format!("{n_kv_heads} does not divide the {n_heads} attention heads")));
    }
    let head_dim = match uint("attention.key_length")? {
        Some(d) => d,
        None if hidden % n_heads == 0 => hidden / n_heads,
        None => return Err(key_error("attention.head_count", format!("{n_heads} heads do not divide embedding_length {hidden}"))),
    };
    if let Some(rot) = uint("rope.dimension_count")? {
        if rot != head_dim {
            return Err(key_error(
                "rope.dimension_count",
                format!("{rot} rotary dimensions for heads of {head_dim}: partial rotary embeddings are not supported"),
            ));
        }
    }
    let rms_norm_eps = file.required(&key("attention.layer_norm_rms_epsilon"), file.float(&key("attention.layer_norm_rms_epsilon"))?)?;
    let rope_theta = file.float(&key("rope.freq_base"))?.unwrap_or(10000.0);
    let context_length = required_uint("context_length")?;
    let rope_scaling = match file.str(&key("rope.scaling.type"))? {
        None | Some("none") => Value::Null,
        Some("linear") => {
            let factor = file.required(&key("rope.scaling.factor"), file.float(&key("rope.scaling.factor"))?)?;
            json!({"rope_type": "linear", "factor": factor})
        }
        Some(other) => return Err(key_error("rope.scaling.type", format!("`{other}` is not supported (none, linear)"))),
    };
    let token_id = |k: &str| -> Result<Value> { Ok(file.uint(k)?.map_or(Value::Null, |id| json!(id))) };
    let mut config = json!({
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "intermediate_size": required_uint("feed_forward_length")?,
        "num_hidden_layers": n_blocks,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": rms_norm_eps,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": context_length,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "bos_token_id": token_id("tokenizer.ggml.bos_token_id")?,
        "eos_token_id": token_id("tokenizer.ggml.eos_token_id")?,
        "pad_token_id": token_id("tokenizer.ggml.padding_token_id")?,
        "torch_dtype": match dtype { DType::F16 => "float16", DType::BF16 => "bfloat16", DType::F32 => "float32" },
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": true,
    });
    let facts = Facts { file, arch: arch.name, n_blocks, context_length, hidden, n_heads, head_dim, q_bias };
    let extra = (arch.extra_config)(&facts)?;
    let map = config.as_object_mut().expect("config is an object");
    map.extend(extra.as_object().expect("extra_config returns an object").clone());
    Ok(std::mem::take(map))
}

/// Elements dequantized per parallel task: a whole number of blocks of every type (1, 32 or 256
/// elements), big enough to amortise scheduling, small enough to stay in L2.
const CHUNK_ELEMS: usize = 16 * 1024;

/// The tensor's values in `dtype` (little-endian bytes): dequantized, less `shift` (in f32, as the
/// reference converter subtracts it from the dequantized float32 array), rounded to nearest even.
fn to_dtype(file: &GgufFile, t: &GgufTensor, dtype: DType, shift: Option<f32>) -> Result<Vec<u8>> {
    let (ty, size) = (t.ty, dtype.size_bytes());
    let mut out = vec![0u8; t.n_elements() * size];
    let chunk_bytes = CHUNK_ELEMS / ty.block_len() * ty.block_bytes();
    let first_bad = out
        .par_chunks_mut(CHUNK_ELEMS * size)
        .zip(file.tensor_data(t).par_chunks(chunk_bytes))
        .enumerate()
        .filter_map(|(k, (out, data))| {
            let mut values = vec![0f32; out.len() / size];
            dequant::dequantize(ty, data, &mut values).expect("plan checked that every tensor type is supported");
            if let Some(shift) = shift {
                values.iter_mut().for_each(|v| *v -= shift);
            }
            encode(&values, dtype, out).map(|(i, v)| (k * CHUNK_ELEMS + i, v))
        })
        .min_by_key(|(i, _)| *i);
    match first_bad {
        None => Ok(out),
        Some((i, v)) => Err(Error::BadTensor {
            path: file.path().into(),
            tensor: t.name.clone(),
            detail: format!("element {i} is {v}, which {dtype} cannot hold (import as f32 to keep every value)"),
        }),
    }
}

/// Writes `values` as `dtype` into `out`; returns the first value that is not finite there.
/// (Whole-slice conversions: half's use the CPU's F16C instructions where it has them, which round
/// to nearest even exactly as its one-value conversion does, at a fraction of the cost.)
fn encode(values: &[f32], dtype: DType, out: &mut [u8]) -> Option<(usize, f32)> {
    let bad = match dtype {
        DType::F32 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(4)) {
                o.copy_from_slice(&v.to_le_bytes());
            }
            values.iter().position(|v| !v.is_finite())
        }
        DType::F16 => {
            let mut h = vec![f16::ZERO; values.len()];
            h.convert_from_f32_slice(values);
            for (x, o) in h.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&x.to_le_bytes());
            }
            h.iter().position(|x| !x.is_finite())
        }
        DType::BF16 => {
            let mut h = vec![bf16::ZERO; values.len()];
            h.convert_from_f32_slice(values);
            for (x, o) in h.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&x.to_le_bytes());
            }
            h.iter().position(|x| !x.is_finite())
        }
    };
    bad.map(|i| (i, values[i]))
}

/// The inverse of llama.cpp's `LlamaModel.permute` on the rows of `data` (`rows` rows, any row
/// width): within each head of `head_dim = rows / n_heads` rows, GGUF row `2j + i` is Hugging Face
/// row `i * head_dim / 2 + j` (`i` in 0..2). llama.cpp interleaves the two rotated halves of each
/// head so its RoPE can rotate adjacent pairs.
fn unpermute_rows(data: &[u8], rows: usize, n_heads: usize) -> Vec<u8> {
    let row_bytes = data.len() / rows;
    let head_dim = rows / n_heads;
    let half = head_dim / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..n_heads {
        for i in 0..2 {
            for j in 0..half {
                let (dst, src) = (h * head_dim + i * half + j, h * head_dim + 2 * j + i);
                out[dst * row_bytes..(dst + 1) * row_bytes].copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    out
}

/// The import's tests, and the tiny models they build (which `gemma3.rs`' tests share).
#[cfg(test)]
pub(super) mod tests {
    use awq_kernels::rng::SplitMix64;

    use super::super::fixture::{with_vocab, Gguf, Value as V};
    use super::*;
    use crate::safetensors::SafetensorsFile;
    use crate::{Checkpoint, Tokenizer};

    pub(in crate::gguf) const HIDDEN: usize = 64;
    pub(in crate::gguf) const HEADS: usize = 4;
    pub(in crate::gguf) const KV_HEADS: usize = 2;
    pub(in crate::gguf) const HEAD_DIM: usize = 16;
    pub(in crate::gguf) const FFN: usize = 96;
    pub(in crate::gguf) const BLOCKS: usize = 2;
    pub(in crate::gguf) const VOCAB: usize = 263;

    /// llama.cpp's `LlamaModel.permute` (the forward direction), on f32 rows of `cols` values.
    fn permute(w: &[f32], cols: usize, n_heads: usize) -> Vec<f32> {
        let rows = w.len() / cols;
        let (head_dim, half) = (rows / n_heads, rows / n_heads / 2);
        let mut out = vec![0.0; w.len()];
        for h in 0..n_heads {
            for i in 0..2 {
                for j in 0..half {
                    let (hf, gguf) = (h * head_dim + i * half + j, h * head_dim + 2 * j + i);
                    out[gguf * cols..(gguf + 1) * cols].copy_from_slice(&w[hf * cols..(hf + 1) * cols]);
                }
            }
        }
        out
    }

    /// Hugging Face tensors by name: shape and values.
    pub(in crate::gguf) type HfTensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

    /// config.json's `model_type` of a GGUF architecture.
    pub(in crate::gguf) fn model_type(arch: &str) -> &str {
        if arch == "gemma3" {
            "gemma3_text"
        } else {
            arch
        }
    }

    /// A tiny model as llama.cpp's converter would write it (F32 tensors, Q/K permuted for llama,
    /// 1 added to Gemma's norms), and the Hugging Face tensors it came from (values exact in f16;
    /// Gemma's norms are the stored values less 1 in f32, as the reference converter computes
    /// them). Qwen3's and Gemma 3's heads are twice as wide as `hidden / heads` (stated in
    /// `attention.key_length`) and have q/k norms; Gemma 3's blocks also norm their sublayers'
    /// outputs.
    pub(in crate::gguf) fn tiny(arch: &str, tied: bool) -> (Gguf, HfTensors) {
        let mut g = with_vocab("smollm");
        let k = |s: &str| format!("{arch}.{s}");
        let head_norms = matches!(arch, "qwen3" | "gemma3");
        let head_dim = if head_norms { 2 * HEAD_DIM } else { HEAD_DIM };
        g.kv("general.architecture", V::Str(arch.into()))
            .kv("general.name", V::Str("Tiny".into()))
            .kv(&k("block_count"), V::U32(BLOCKS as u32))
            .kv(&k("context_length"), V::U32(2048))
            .kv(&k("embedding_length"), V::U32(HIDDEN as u32))
            .kv(&k("feed_forward_length"), V::U32(FFN as u32))
            .kv(&k("attention.head_count"), V::U32(HEADS as u32))
            .kv(&k("attention.head_count_kv"), V::U32(KV_HEADS as u32))
            .kv(&k("rope.freq_base"), V::F32(100000.0))
            .kv(&k("attention.layer_norm_rms_epsilon"), V::F32(1e-5))
            .kv(&k("rope.dimension_count"), V::U32(head_dim as u32));
        if head_dim != HEAD_DIM {
            g.kv(&k("attention.key_length"), V::U32(head_dim as u32))
                .kv(&k("attention.value_length"), V::U32(head_dim as u32));
        }
        if arch == "gemma3" {
            g.kv(&k("attention.sliding_window"), V::U32(4));
        }
        let mut rng = SplitMix64::new(7);
        let mut hf = BTreeMap::new();
        let mut add = |g: &mut Gguf, gguf: &str, hf_name: String, shape: Vec<usize>, heads: Option<usize>| {
            let n: usize = shape.iter().product();
            let mut values: Vec<f32> = (0..n).map(|_| f16::from_f32(rng.normal()).to_f32()).collect();
            let stored = match heads {
                Some(h) if arch == "llama" => permute(&values, n / shape[0], h),
                _ if arch == "gemma3" && gguf.ends_with("norm.weight") => {
                    let stored: Vec<f32> = values.iter().map(|v| v + 1.0).collect();
                    values = stored.iter().map(|s| s - 1.0).collect();
                    stored
                }
                _ => values.clone(),
            };
            let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
            g.tensor_f32(gguf, &dims, &stored);
            hf.insert(hf_name, (shape, values));
        };
        let d = descriptor_for(model_type(arch), Path::new("x")).unwrap();
        add(&mut g, "token_embd.weight", d.embed_tokens.into(), vec![VOCAB, HIDDEN], None);
        for b in 0..BLOCKS {
            add(&mut g, &format!("blk.{b}.attn_norm.weight"), d.norm_name(b, NormRole::Attn), vec![HIDDEN], None);
            add(&mut g, &format!("blk.{b}.ffn_norm.weight"), d.norm_name(b, NormRole::Mlp), vec![HIDDEN], None);
            if head_norms {
                for (stem, role) in [("attn_q_norm", NormRole::QHead), ("attn_k_norm", NormRole::KHead)] {
                    add(&mut g, &format!("blk.{b}.{stem}.weight"), d.norm_name(b, role), vec![head_dim], None);
                }
            }
            if arch == "gemma3" {
                for (stem, role) in [("post_attention_norm", NormRole::AttnOut), ("post_ffw_norm", NormRole::MlpOut)] {
                    add(&mut g, &format!("blk.{b}.{stem}.weight"), d.norm_name(b, role), vec![HIDDEN], None);
                }
            }
            let q = (HEADS * head_dim, Some(HEADS));
            let kv = (KV_HEADS * head_dim, Some(KV_HEADS));
            for (stem, role, out_dim, in_dim, heads) in [
                ("attn_q", LinearRole::Q, q.0, HIDDEN, q.1),
                ("attn_k", LinearRole::K, kv.0, HIDDEN, kv.1),
                ("attn_v", LinearRole::V, kv.0, HIDDEN, None),
                ("attn_output", LinearRole::O, HIDDEN, q.0, None),
                ("ffn_gate", LinearRole::Gate, FFN, HIDDEN, None),
                ("ffn_up", LinearRole::Up, FFN, HIDDEN, None),
                ("ffn_down", LinearRole::Down, HIDDEN, FFN, None),
            ] {
                add(&mut g, &format!("blk.{b}.{stem}.weight"), d.linear_name(b, role), vec![out_dim, in_dim], heads);
                if arch == "qwen2" && matches!(role, LinearRole::Q | LinearRole::K | LinearRole::V) {
                    add(&mut g, &format!("blk.{b}.{stem}.bias"), d.bias_name(b, role), vec![out_dim], None);
                }
            }
        }
        add(&mut g, "output_norm.weight", d.final_norm.into(), vec![HIDDEN], None);
        if !tied {
            add(&mut g, "output.weight", d.lm_head.into(), vec![VOCAB, HIDDEN], None);
        }
        (g, hf)
    }

    pub(in crate::gguf) struct Imported {
        dir: tempfile::TempDir,
        pub result: Result<ImportReport>,
    }

    impl Imported {
        pub fn out(&self) -> std::path::PathBuf {
            self.dir.path().join("out")
        }
    }

    pub(in crate::gguf) fn import_with(g: &Gguf, dtype: DType) -> Imported {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        std::fs::write(&path, g.bytes()).unwrap();
        let options = ImportOptions { dtype, ..ImportOptions::default() };
        let result = import(&path, &dir.path().join("out"), &options);
        Imported { dir, result }
    }

    pub(in crate::gguf) fn import_err(g: &Gguf) -> Error {
        let r = import_with(g, DType::F16);
        assert!(!r.out().exists(), "a failed import leaves no output");
        r.result.expect_err("the import must fail")
    }

    /// Imports and checks every tensor against the Hugging Face original, bit for bit.
    pub(in crate::gguf) fn check_round_trip(arch: &str, tied: bool, dtype: DType) -> Imported {
        let (g, hf) = tiny(arch, tied);
        let r = import_with(&g, dtype);
        let report = r.result.as_ref().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((report.architecture, report.n_blocks, report.n_tensors), (arch, BLOCKS, hf.len()));
        assert_eq!((report.tie_word_embeddings, report.n_tokens, report.dtype), (tied, VOCAB, dtype));
        assert_eq!(report.model_name.as_deref(), Some("Tiny"));
        let ck = Checkpoint::open(r.out()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ck.config().model_type, model_type(arch));
        let st = SafetensorsFile::open(r.out().join("model.safetensors")).unwrap();
        assert_eq!(st.tensors().len(), hf.len());
        for (name, (shape, values)) in &hf {
            let t = st.tensor(name).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!((t.shape(), t.dtype()), (&shape[..], dtype), "{name}");
            let rounded = values.iter().map(|&v| match dtype {
                DType::F16 => f16::from_f32(v).to_f32(),
                DType::BF16 => bf16::from_f32(v).to_f32(),
                DType::F32 => v,
            });
            let got = t.to_f32_vec().unwrap();
            if let Some((i, (g, w))) = got.iter().zip(rounded).enumerate().find(|(_, (g, w))| g.to_bits() != w.to_bits()) {
                panic!("{name}: element {i} is {g}, expected {w}");
            }
        }
        r
    }

    #[test]
    fn llama_round_trips_with_q_and_k_unpermuted() {
        let r = check_round_trip("llama", true, DType::F16);
        let config: Value = serde_json::from_slice(&std::fs::read(r.out().join("config.json")).unwrap()).unwrap();
        let want = json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": BLOCKS,
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
            "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "rope_scaling": null, "max_position_embeddings": 2048,
            "vocab_size": VOCAB, "tie_word_embeddings": true, "bos_token_id": 260, "eos_token_id": 261,
            "pad_token_id": null, "torch_dtype": "float16", "initializer_range": 0.02, "attention_dropout": 0.0,
            "use_cache": true, "attention_bias": false, "mlp_bias": false, "pretraining_tp": 1,
        });
        assert_eq!(config, want);
        let generation: Value = serde_json::from_slice(&std::fs::read(r.out().join("generation_config.json")).unwrap()).unwrap();
        assert_eq!(generation, json!({"bos_token_id": 260, "eos_token_id": 261}));
        let ck = Checkpoint::open(r.out()).unwrap();
        let tok = Tokenizer::from_dir(&r.out(), ck.config()).unwrap();
        assert_eq!(tok.encode("<|im_start|> the").unwrap(), vec![260, 258]);
    }

    #[test]
    fn qwen2_round_trips_untouched_with_biases_and_its_own_head() {
        let r = check_round_trip("qwen2", false, DType::F16);
        let ck = Checkpoint::open(r.out()).unwrap();
        assert!(!ck.config().tie_word_embeddings);
        let raw = &ck.config().raw;
        assert_eq!((raw["use_sliding_window"].as_bool(), raw["sliding_window"].as_u64()), (Some(false), Some(2048)));
    }

    #[test]
    fn qwen3_round_trips_untouched_with_q_and_k_norms_and_its_head_dim() {
        let r = check_round_trip("qwen3", true, DType::F16);
        let ck = Checkpoint::open(r.out()).unwrap();
        assert_eq!((ck.config().head_dim, ck.config().q_dim()), (2 * HEAD_DIM, HEADS * 2 * HEAD_DIM));
        let raw = &ck.config().raw;
        assert_eq!((raw["attention_bias"].as_bool(), raw["use_sliding_window"].as_bool()), (Some(false), Some(false)));
        assert_eq!(raw["architectures"], json!(["Qwen3ForCausalLM"]));
        // The norms are part of a qwen3 block: a file without one is refused naming it.
        let (mut g, _) = tiny("qwen3", true);
        g.remove_tensor("blk.1.attn_k_norm.weight");
        let err = import_err(&g).to_string();
        let says = "tensor blk.1.attn_k_norm.weight is missing (it becomes model.layers.1.self_attn.k_norm.weight, \
                    which a qwen3 model needs)";
        assert!(err.contains(says), "{err}");
    }

    #[test]
    fn other_dtypes_round_to_nearest_even() {
        check_round_trip("llama", false, DType::BF16);
        check_round_trip("llama", true, DType::F32);
        // 1 + 2^-11 lies halfway between two f16 values and rounds to the even one, 1.0; 1 + 3 * 2^-11
        // rounds up to 1 + 2^-9.
        let mut out = [0u8; 4];
        assert_eq!(encode(&[1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11)], DType::F16, &mut out), None);
        assert_eq!(out, [f16::ONE.to_le_bytes(), f16::from_f32(1.0 + 2f32.powi(-9)).to_le_bytes()].concat()[..]);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let w: Vec<f32> = (0..24 * 3).map(|i| i as f32).collect();
        let permuted = permute(&w, 3, 2);
        assert_ne!(permuted, w);
        // Head 0 holds rows 0..12; GGUF row 1 is HF row 6 (the first row of the second half).
        assert_eq!(&permuted[3..6], &w[18..21]);
        let bytes: Vec<u8> = permuted.iter().flat_map(|v| v.to_le_bytes()).collect();
        let back = unpermute_rows(&bytes, 24, 2);
        let back: Vec<f32> = back.chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert_eq!(back, w);
    }

    #[test]
    fn values_the_dtype_cannot_hold_name_the_tensor() {
        let (mut g, _) = tiny("llama", true);
        let t = g.tensors.iter_mut().find(|t| t.name == "blk.1.ffn_up.weight").unwrap();
        t.data[40..44].copy_from_slice(&1e6f32.to_le_bytes());
        let err = import_err(&g).to_string();
        assert!(err.ends_with("tiny.gguf: tensor blk.1.ffn_up.weight: element 10 is 1000000, which f16 cannot hold (import as f32 to keep every value)"), "{err}");
        let r = import_with(&g, DType::BF16);
        r.result.expect("bf16 holds 1e6");
    }

    #[test]
    fn unsupported_architecture_is_named_with_the_supported_ones() {
        let (mut g, _) = tiny("llama", true);
        g.set("general.architecture", V::Str("gpt2".into()));
        let err = import_err(&g);
        assert!(matches!(err, Error::UnsupportedGgufArchitecture { ref architecture, .. } if architecture == "gpt2"));
        assert!(err.to_string().ends_with("tiny.gguf: general.architecture `gpt2` is not supported (supported: llama, qwen2, qwen3, gemma3)"), "{err}");
    }

    #[test]
    fn tensors_that_do_not_fit_name_the_gguf_tensor() {
        let check = |edit: &dyn Fn(&mut Gguf), says: &str| {
            let (mut g, _) = tiny("llama", true);
            edit(&mut g);
            let err = import_err(&g).to_string();
            assert!(err.contains("tiny.gguf: ") && err.contains(says), "expected {says:?} in: {err}");
        };
        check(&|g| { g.remove_tensor("blk.1.ffn_gate.weight"); },
            "tensor blk.1.ffn_gate.weight is missing (it becomes model.layers.1.mlp.gate_proj.weight, which a llama model needs)");
        check(&|g| { g.remove_tensor("token_embd.weight"); }, "tensor token_embd.weight is missing");
        check(&|g| { g.tensor_f32("blk.0.attn_q_norm.weight", &[16], &[1.0; 16]); },
            "tensor blk.0.attn_q_norm.weight: no Hugging Face name for this tensor of a llama model");
        check(&|g| { g.tensor_f32("rope_freqs.weight", &[8], &[1.0; 8]); },
            "tensor rope_freqs.weight: RoPE frequency factors (Llama 3.1 rope scaling) are not supported");
        check(&|g| { g.tensor_f32("blk.2.attn_norm.weight", &[64], &[1.0; 64]); },
            "tensor blk.2.attn_norm.weight: model.layers.2.input_layernorm.weight is not part of a llama model with this metadata");
        check(&|g| { g.tensor_f32("blk.0.ffn_up.bias", &[96], &[1.0; 96]); },
            "tensor blk.0.ffn_up.bias: model.layers.0.mlp.up_proj.bias is not part of a llama model");
        check(&|g| { g.set("llama.feed_forward_length", V::U32(128)); },
            "tensor blk.0.ffn_gate.weight: shape [96, 64], but the metadata implies [128, 64] for model.layers.0.mlp.gate_proj.weight");
        check(&|g| {
            let t = g.tensors.iter_mut().find(|t| t.name == "blk.0.attn_v.weight").unwrap();
            t.type_id = GgmlType::IQ2_XXS.id();
            t.dims = vec![256, 4];
            t.data = vec![0; 4 * 66];
        }, "tensor blk.0.attn_v.weight: tensor type IQ2_XXS is not supported (supported: F32, F16, BF16, Q4_0");
    }

    #[test]
    fn metadata_that_does_not_fit_names_the_key() {
        let check = |edit: &dyn Fn(&mut Gguf), key: &str, says: &str| {
            let (mut g, _) = tiny("llama", true);
            edit(&mut g);
            let err = import_err(&g);
            let msg = err.to_string();
            assert!(matches!(&err, Error::GgufKey { key: k, .. } if k == key), "expected key {key}: {msg}");
            assert!(msg.contains("tiny.gguf: ") && msg.contains(says), "expected {says:?} in: {msg}");
        };
        check(&|g| { g.remove_key("llama.block_count"); }, "llama.block_count", "required key is missing");
        check(&|g| { g.set("llama.attention.head_count_kv", V::U32(3)); }, "llama.attention.head_count_kv", "3 does not divide the 4 attention heads");
        check(&|g| { g.set("llama.rope.dimension_count", V::U32(8)); }, "llama.rope.dimension_count", "partial rotary embeddings are not supported");
        check(&|g| { g.kv("llama.rope.scaling.type", V::Str("yarn".into())); }, "llama.rope.scaling.type", "`yarn` is not supported (none, linear)");
        check(&|g| { g.set("llama.context_length", V::Str("long".into())); }, "llama.context_length", "expected a non-negative integer, found string \"long\"");
        check(&|g| { g.remove_key("general.architecture"); }, "general.architecture", "required key is missing");
    }

    #[test]
    fn linear_rope_scaling_and_missing_kv_heads_follow_llama_cpp() {
        let (mut g, _) = tiny("llama", true);
        g.kv("llama.rope.scaling.type", V::Str("linear".into())).kv("llama.rope.scaling.factor", V::F32(4.0));
        g.remove_key("llama.attention.head_count_kv");
        // Without head_count_kv every head has its own K and V: the tensors must say so too.
        for t in g.tensors.iter_mut().filter(|t| t.name.contains("attn_k.") || t.name.contains("attn_v.")) {
            t.dims = vec![HIDDEN as u64, (HEADS * HEAD_DIM) as u64];
            t.data = vec![0; HIDDEN * HEADS * HEAD_DIM * 4];
        }
        let r = import_with(&g, DType::F16);
        r.result.as_ref().unwrap_or_else(|e| panic!("{e}"));
        let ck = Checkpoint::open(r.out()).unwrap();
        assert_eq!(ck.config().n_kv_heads, HEADS);
        assert_eq!(ck.config().rope_scaling, Some(crate::RopeScaling::Linear { factor: 4.0 }));
    }

    #[test]
    fn existing_output_is_refused_before_any_work_unless_overwriting() {
        let (g, _) = tiny("llama", true);
        let r = import_with(&g, DType::F16);
        r.result.as_ref().unwrap();
        let path = r.dir.path().join("tiny.gguf");
        let err = import(&path, &r.out(), &ImportOptions::default()).unwrap_err().to_string();
        assert!(err.contains("output directory exists"), "{err}");
        let options = ImportOptions { overwrite: Overwrite::Replace, ..ImportOptions::default() };
        import(&path, &r.out(), &options).unwrap();
    }

    #[test]
    fn same_file_same_bytes() {
        let (g, _) = tiny("qwen2", false);
        let (a, b) = (import_with(&g, DType::F16), import_with(&g, DType::F16));
        for name in ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"] {
            assert_eq!(std::fs::read(a.out().join(name)).unwrap(), std::fs::read(b.out().join(name)).unwrap(), "{name}");
        }
    }

    #[test]
    fn chunks_cover_quantized_tensors_of_many_chunks() {
        // 3 chunks and a bit of Q8_0 blocks: every element lands where a single pass puts it.
        let n_blocks = 3 * CHUNK_ELEMS / 32 + 5;
        let mut rng = SplitMix64::new(3);
        let mut data = Vec::new();
        for _ in 0..n_blocks {
            data.extend_from_slice(&f16::from_f32(rng.uniform(0.01, 1.0)).to_le_bytes());
            data.extend((0..32).map(|_| (rng.next_u64() & 0xFF) as u8));
        }
        let mut g = Gguf::new();
        g.tensor_raw("x", &[32, n_blocks as u64], GgmlType::Q8_0, &data);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("q.gguf"), g.bytes()).unwrap();
        let file = GgufFile::open(dir.path().join("q.gguf")).unwrap();
        let t = &file.tensors()[0];
        let got = to_dtype(&file, t, DType::F32, None).unwrap();
        let mut want = vec![0f32; t.n_elements()];
        dequant::dequantize(GgmlType::Q8_0, file.tensor_data(t), &mut want).unwrap();
        let want: Vec<u8> = want.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert!(got == want);
    }
}
