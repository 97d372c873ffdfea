//! Small synthetic checkpoints with random weights, written as real files.
//!
//! Tests across the workspace build their models here instead of downloading one: config.json,
//! safetensors (single or sharded with an index), a byte-level BPE tokenizer.json and
//! tokenizer_config.json, laid out exactly as a Hugging Face checkpoint of the architecture. Tensor
//! names come from the architecture descriptor, so a new architecture gets a synthetic checkpoint for
//! free. Same spec, same seed: same bytes.

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;

use awq_kernels::rng::SplitMix64;
use awq_kernels::{DType, Tensor};
use serde_json::{json, Value};

use crate::arch::{descriptor_for, ArchDescriptor, AttentionScale, Dim, HeadDimDefault, NormForm, WindowedBlocks};
use crate::checkpoint::{INDEX_FILE, SINGLE_FILE};
use crate::safetensors::{self, RawTensor};
use crate::{Error, ModelConfig, Result};

/// The shape of a synthetic model.
#[derive(Clone, Debug)]
pub struct SyntheticSpec {
    pub model_type: &'static str,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_blocks: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// `head_dim` in config.json; `None` leaves it out where the architecture allows that (and writes
    /// `hidden_size / n_heads` where it requires the field).
    pub head_dim: Option<usize>,
    /// At least 257: 256 byte tokens and one special token.
    pub vocab_size: usize,
    pub dtype: DType,
    pub tie_word_embeddings: bool,
    /// Number of safetensors files; more than one writes model.safetensors.index.json.
    pub shards: usize,
    pub seed: u64,
    /// `sliding_window` in config.json when set (which blocks it restricts is the architecture's
    /// rule); unset, the field is left out.
    pub sliding_window: Option<usize>,
    /// For architectures with `sliding_attention` blocks: every `n`-th block `full_attention`, the
    /// others `sliding_attention`, written as `layer_types`; unset, the architecture's default
    /// pattern is written out.
    pub full_attention_every: Option<usize>,
    /// Mixture-of-experts architectures only (ignored by the others): the expert count, the experts
    /// per token and one expert's width (written as the descriptor's field: Mixtral's
    /// `intermediate_size`, which then replaces [`SyntheticSpec::intermediate_size`]).
    pub n_experts: usize,
    pub experts_per_token: usize,
    pub expert_intermediate_size: usize,
    /// `norm_topk_prob`, `decoder_sparse_step` and `mlp_only_layers` when set (Qwen3-MoE's fields).
    pub norm_topk_prob: Option<bool>,
    pub decoder_sparse_step: Option<usize>,
    pub mlp_only_layers: Option<Vec<usize>>,
}

impl SyntheticSpec {
    /// A small Llama with grouped-query attention: fast enough for any unit test.
    pub fn tiny_llama() -> SyntheticSpec {
        SyntheticSpec {
            model_type: "llama",
            hidden_size: 128,
            intermediate_size: 256,
            n_blocks: 3,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: None,
            vocab_size: 320,
            dtype: DType::F16,
            tie_word_embeddings: false,
            shards: 1,
            seed: 1,
            sliding_window: None,
            full_attention_every: None,
            n_experts: 4,
            experts_per_token: 2,
            expert_intermediate_size: 128,
            norm_topk_prob: None,
            decoder_sparse_step: None,
            mlp_only_layers: None,
        }
    }

    /// A small Qwen2: biases on q, k and v, one kv head for 4 query heads, and an intermediate
    /// size (384) that every group size (128, 64, 32) divides.
    pub fn tiny_qwen2() -> SyntheticSpec {
        SyntheticSpec {
            model_type: "qwen2",
            intermediate_size: 384,
            n_blocks: 2,
            n_kv_heads: 1,
            vocab_size: 300,
            ..SyntheticSpec::tiny_llama()
        }
    }

    /// A small Qwen3: per-head q/k norms, and heads of 64 in a hidden size of 128 (4 heads), so that
    /// `head_dim` is not `hidden_size / heads`; the linears' inputs (128, 256) take every group size.
    pub fn tiny_qwen3() -> SyntheticSpec {
        SyntheticSpec {
            model_type: "qwen3",
            n_blocks: 2,
            head_dim: Some(64),
            vocab_size: 300,
            ..SyntheticSpec::tiny_llama()
        }
    }

    /// A small Phi-3: q|k|v and gate|up stored fused, as many KV heads as heads (4 of 32), so that
    /// AWQ's v -> o scaling group applies (`SyntheticSpec { n_kv_heads: 2, ..tiny_phi3() }` is the
    /// grouped-query variant, which skips it).
    pub fn tiny_phi3() -> SyntheticSpec {
        SyntheticSpec { model_type: "phi3", n_blocks: 2, n_kv_heads: 4, vocab_size: 300, ..SyntheticSpec::tiny_llama() }
    }

    /// A small Gemma 3 (text): 3 blocks, `sliding_attention`, `full_attention`, `sliding_attention`
    /// with a window of 8 positions (so short prompts cross it), heads of 64 in a hidden size of 128
    /// (4 heads, 2 KV heads), tied embeddings. Its `query_pre_attn_scalar` is `hidden_size / heads`
    /// (32), not `head_dim`, as in Gemma 3 27B, so an attention scaled by `head_dim` scores otherwise.
    pub fn tiny_gemma3() -> SyntheticSpec {
        SyntheticSpec {
            model_type: "gemma3_text",
            head_dim: Some(64),
            vocab_size: 300,
            tie_word_embeddings: true,
            sliding_window: Some(8),
            full_attention_every: Some(2),
            ..SyntheticSpec::tiny_llama()
        }
    }

    /// A small Mixtral: 4 experts of width 128 (every group size divides it), 2 per token,
    /// renormalised (always, in Mixtral), every block sparse; Mistral's attention with 2 KV heads.
    pub fn tiny_mixtral() -> SyntheticSpec {
        SyntheticSpec { model_type: "mixtral", n_blocks: 2, vocab_size: 300, ..SyntheticSpec::tiny_llama() }
    }

    /// A small Qwen3-MoE: 3 blocks with `decoder_sparse_step` 2 (block 1 sparse, 0 and 2 dense with
    /// the 256-wide MLP), 8 experts of width 64, 2 per token, not renormalised (`norm_topk_prob`
    /// false), per-head q/k norms, heads of 64 in a hidden size of 128.
    pub fn tiny_qwen3_moe() -> SyntheticSpec {
        SyntheticSpec {
            model_type: "qwen3_moe",
            head_dim: Some(64),
            vocab_size: 300,
            n_experts: 8,
            expert_intermediate_size: 64,
            norm_topk_prob: Some(false),
            decoder_sparse_step: Some(2),
            ..SyntheticSpec::tiny_llama()
        }
    }

    fn config_json(&self, arch: &ArchDescriptor) -> Value {
        let head_dim = match (self.head_dim, arch.config_defaults.head_dim) {
            (Some(d), _) => Some(d),
            (None, HeadDimDefault::Required) => Some(self.hidden_size / self.n_heads),
            (None, HeadDimDefault::HiddenOverHeads) => None,
        };
        // transformers' class for `architectures`, and the name its config gives the activation.
        let (class, activation_field) = match self.model_type {
            "qwen2" => ("Qwen2ForCausalLM", "hidden_act"),
            "qwen3" => ("Qwen3ForCausalLM", "hidden_act"),
            "phi3" => ("Phi3ForCausalLM", "hidden_act"),
            "mistral" => ("MistralForCausalLM", "hidden_act"),
            "gemma3_text" => ("Gemma3ForCausalLM", "hidden_activation"),
            "mixtral" => ("MixtralForCausalLM", "hidden_act"),
            "qwen3_moe" => ("Qwen3MoeForCausalLM", "hidden_act"),
            _ => ("LlamaForCausalLM", "hidden_act"),
        };
        let mut config = json!({
            "architectures": [class],
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_blocks,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": 1e-5,
            "rope_theta": arch.config_defaults.rope_theta,
            activation_field: arch.config_defaults.hidden_act,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": match self.dtype { DType::F16 => "float16", DType::BF16 => "bfloat16", DType::F32 => "float32" },
            "bos_token_id": 256,
            "eos_token_id": 256,
        });
        if let Some(d) = head_dim {
            config["head_dim"] = d.into();
        }
        if let Some(w) = self.sliding_window {
            config["sliding_window"] = w.into();
        }
        if arch.windowed_blocks == WindowedBlocks::SlidingAttention {
            // As transformers writes it: the architecture's pattern spelled out when the spec has none.
            if let Some(n) = self.full_attention_every.or(arch.config_defaults.sliding_window_pattern) {
                let types: Vec<&str> = (0..self.n_blocks)
                    .map(|i| if (i + 1) % n == 0 { "full_attention" } else { "sliding_attention" })
                    .collect();
                config["layer_types"] = json!(types);
            }
            config["rope_local_base_freq"] = json!(arch.config_defaults.rope_local_base_freq);
            if self.sliding_window.is_none() {
                config["sliding_window"] = json!(arch.config_defaults.sliding_window);
            }
        }
        if arch.attention_scale == AttentionScale::InvSqrtQueryPreAttnScalar {
            config["query_pre_attn_scalar"] = (self.hidden_size / self.n_heads).into();
        }
        if let Some(moe) = arch.moe {
            config[moe.n_experts_fields[0]] = self.n_experts.into();
            config["num_experts_per_tok"] = self.experts_per_token.into();
            config[moe.expert_intermediate_field] = self.expert_intermediate_size.into();
            if let Some(v) = self.norm_topk_prob {
                config["norm_topk_prob"] = v.into();
            }
            if let Some(v) = self.decoder_sparse_step {
                config["decoder_sparse_step"] = v.into();
            }
            if let Some(v) = &self.mlp_only_layers {
                config["mlp_only_layers"] = json!(v);
            }
        }
        config
    }
}

/// Writes a synthetic checkpoint for `spec` into `dir` (created if needed).
pub fn write_checkpoint(dir: &Path, spec: &SyntheticSpec) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    let config_path = dir.join("config.json");
    let arch = descriptor_for(spec.model_type, &config_path)?;
    let config_text = serde_json::to_string_pretty(&spec.config_json(arch)).expect("JSON serialises");
    write_file(&config_path, config_text.as_bytes())?;
    let config = ModelConfig::parse(&config_path, &config_text)?;
    // Each tensor, and each 1 Mi-value chunk of it, draws from its own generator, seeded from the
    // spec's seed and its position: the values do not depend on the thread count, and an 8B-parameter
    // checkpoint fills in seconds on many cores instead of minutes on one.
    let mut tensor_index = 0u64;
    let mut random = |name: String, shape: &[usize], mean: f32, std: f32| -> Result<RawTensor> {
        const CHUNK: usize = 1 << 20;
        let n = shape.iter().product();
        let tensor_seed = spec.seed ^ tensor_index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        tensor_index += 1;
        let mut values = vec![0.0f32; n];
        values.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
            let mut rng = SplitMix64::new(tensor_seed.wrapping_add((c as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)));
            chunk.iter_mut().for_each(|v| *v = mean + std * rng.normal());
        });
        RawTensor::from_tensor(name, &Tensor::from_f32_as(shape, values, spec.dtype)?)
    };

    // Shard s holds blocks with block_idx % shards == s; embeddings go to the first, head and final
    // norm to the last, as real sharded checkpoints lay them out.
    let shards = spec.shards.max(1);
    let mut files: Vec<Vec<RawTensor>> = vec![Vec::new(); shards];
    let (h, v) = (config.hidden_size, config.vocab_size);
    // The stored weight whose factor is 1: `1 + w` norms store offsets from 1.
    let norm_mean = match arch.norm_form {
        NormForm::Plain => 1.0,
        NormForm::OnePlus => 0.0,
    };
    // Unit values where the first block reads them: an architecture that scales its embeddings
    // (Gemma's sqrt(hidden)) stores them that much smaller, as its trained tables are, which also
    // keeps the logits of a tied LM head near unit size.
    let embed_std = 1.0 / arch.embedding_scale(&config);
    files[0].push(random(arch.embed_tokens.into(), &[v, h], 0.0, embed_std)?);
    for b in 0..config.n_blocks {
        let shard = &mut files[b % shards];
        // Every norm's factor random around 1: a forward pass that skips a norm, or applies one
        // weight for another, gives other logits. The per-head q/k norms spread wider: q and k leave
        // their projections at about unit RMS already, so without their weights' spread skipping
        // them would barely change the logits.
        for n in arch.norms {
            let std = if n.dim == Dim::HeadDim { 0.5 } else { 0.1 };
            shard.push(random(arch.norm_name(b, n.role), &[n.dim.resolve(&config)], norm_mean, std)?);
        }
        // As stored: a fused linear (Phi-3's qkv_proj) is one tensor, its parts' rows drawn together.
        // A router's logits come out near unit size from unit inputs, so tokens spread over the
        // experts.
        if arch.is_sparse(&config, b) {
            let n_experts = config.moe.as_ref().map_or(0, |m| m.n_experts);
            shard.push(random(arch.router_name(b), &[n_experts, h], 0.0, 1.0 / (h as f32).sqrt())?);
        }
        for parts in arch.block_stored(&config, b) {
            let id = parts[0];
            let [o, i] = arch.stored_shape(id, &config);
            shard.push(random(arch.linear_name(b, id), &[o, i], 0.0, 1.0 / (i as f32).sqrt())?);
            if arch.has_bias(id, &config) {
                shard.push(random(arch.bias_name(b, id), &[o], 0.0, 0.05)?);
            }
        }
    }
    files[shards - 1].push(random(arch.final_norm.into(), &[h], norm_mean, 0.1)?);
    if !config.tie_word_embeddings {
        files[shards - 1].push(random(arch.lm_head.into(), &[v, h], 0.0, 1.0 / (h as f32).sqrt())?);
    }

    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    if shards == 1 {
        safetensors::write(&dir.join(SINGLE_FILE), &files[0], &metadata)?;
    } else {
        let mut weight_map = BTreeMap::new();
        let mut total_size = 0usize;
        for (s, tensors) in files.iter().enumerate() {
            let name = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards);
            for t in tensors {
                weight_map.insert(t.name.clone(), name.clone());
                total_size += t.data.len();
            }
            safetensors::write(&dir.join(&name), tensors, &metadata)?;
        }
        let index = json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
        write_file(&dir.join(INDEX_FILE), serde_json::to_string_pretty(&index).expect("JSON").as_bytes())?;
    }
    write_file(&dir.join("tokenizer.json"), byte_level_tokenizer_json().as_bytes())?;
    write_file(&dir.join("tokenizer_config.json"), br#"{"add_bos_token": false, "eos_token": "<|endoftext|>"}"#)?;
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(Error::io(path))
}

/// GPT-2's byte-to-character table: printable bytes map to themselves, the rest to U+0100 onwards,
/// so every byte sequence is a string of visible characters.
fn byte_to_char() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut next = 256u32;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("below 256")
            } else {
                next += 1;
                char::from_u32(next - 1).expect("below 512")
            }
        })
        .collect()
}

/// The 256 byte tokens of a byte-level BPE vocabulary, id = byte value.
#[cfg(test)]
pub(crate) fn byte_level_vocab() -> Vec<String> {
    byte_to_char().into_iter().map(String::from).collect()
}

/// A byte-level BPE tokenizer.json with the 256 byte tokens (ids 0..256), no merges and one special
/// token `<|endoftext|>` (id 256).
pub fn byte_level_tokenizer_json() -> String {
    let vocab: serde_json::Map<String, Value> =
        byte_to_char().into_iter().enumerate().map(|(id, c)| (c.to_string(), json!(id))).collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    serde_json::to_string_pretty(&json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": 256, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    }))
    .expect("JSON serialises")
}
