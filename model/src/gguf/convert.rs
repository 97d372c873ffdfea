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
pub(super) mod tests;
