//! `awq synthetic DIR`: write a checkpoint with random weights of a chosen shape.
//!
//! For tests and benchmarks that need real shapes without a real model (no model hub is reachable
//! from our machines): e.g. Llama-3-8B's shapes for timing, a tiny model for a smoke test.

use std::path::PathBuf;

use anyhow::Result;
use awq_kernels::DType;
use awq_model::arch::REGISTRY;
use awq_model::synthetic::{write_checkpoint, SyntheticSpec};
use clap::{Args, ValueEnum};

#[derive(Clone, Copy, ValueEnum)]
pub enum Preset {
    /// 3 blocks, hidden 128: a smoke test.
    Tiny,
    /// SmolLM2-135M's shapes: 30 blocks, hidden 576, 9 heads / 3 kv heads.
    Smollm2135m,
    /// Llama-3-8B's shapes: 32 blocks, hidden 4096, intermediate 14336, 32 / 8 heads, vocab 128256.
    Llama38b,
    /// Llama-3-70B's shapes: 80 blocks, hidden 8192, intermediate 28672, 64 / 8 heads, vocab 128256
    /// (bf16, ~141 GB: give it --shards).
    Llama370b,
    /// Qwen3-30B-A3B's shapes (a qwen3_moe): 48 blocks, all sparse, hidden 2048, 32 / 4 heads of
    /// 128, 128 experts of width 768, 8 per token, renormalised, vocab 151936 (bf16, ~61 GB).
    #[value(name = "qwen3-30b-a3b")]
    Qwen330bA3b,
}

#[derive(Args)]
pub struct SyntheticArgs {
    /// Directory to write (created).
    pub dir: PathBuf,
    #[arg(long, value_enum, default_value_t = Preset::Tiny)]
    pub preset: Preset,
    /// Architecture (config.json's model_type): llama, mistral, qwen2, qwen3, phi3, gemma3_text, mixtral or
    /// qwen3_moe (any registered one). Default: the preset's (qwen3_moe for qwen3-30b-a3b), else llama.
    #[arg(long)]
    pub model_type: Option<String>,
    /// Experts per sparse block (mixtral, qwen3_moe; default 4 and 8, the tiny specs').
    #[arg(long)]
    pub experts: Option<usize>,
    /// Experts each token takes (default 2).
    #[arg(long)]
    pub experts_per_token: Option<usize>,
    /// Override the number of blocks.
    #[arg(long)]
    pub blocks: Option<usize>,
    /// config.json's `sliding_window`: the positions a windowed block attends to (which blocks are
    /// windowed is the architecture's rule: all for mistral, mixtral, phi3; Gemma's sliding ones).
    #[arg(long, value_name = "N")]
    pub sliding_window: Option<usize>,
    /// Gemma 3: every N-th block attends globally, the others through the window (default: the
    /// architecture's pattern, 6).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub full_attention_every: Option<u64>,
    /// Number of safetensors shards.
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

pub fn run(args: SyntheticArgs) -> Result<()> {
    let base = SyntheticSpec::tiny_llama();
    let mut spec = match args.preset {
        Preset::Tiny => base,
        Preset::Smollm2135m => SyntheticSpec {
            hidden_size: 576,
            intermediate_size: 1536,
            n_blocks: 30,
            n_heads: 9,
            n_kv_heads: 3,
            vocab_size: 49152,
            tie_word_embeddings: true,
            ..base
        },
        Preset::Llama38b => SyntheticSpec {
            hidden_size: 4096,
            intermediate_size: 14336,
            n_blocks: 32,
            n_heads: 32,
            n_kv_heads: 8,
            vocab_size: 128256,
            dtype: DType::BF16,
            ..base
        },
        Preset::Llama370b => SyntheticSpec {
            hidden_size: 8192,
            intermediate_size: 28672,
            n_blocks: 80,
            n_heads: 64,
            n_kv_heads: 8,
            vocab_size: 128256,
            dtype: DType::BF16,
            ..base
        },
        Preset::Qwen330bA3b => SyntheticSpec {
            model_type: "qwen3_moe",
            hidden_size: 2048,
            intermediate_size: 6144,
            n_blocks: 48,
            n_heads: 32,
            n_kv_heads: 4,
            head_dim: Some(128),
            vocab_size: 151936,
            dtype: DType::BF16,
            n_experts: 128,
            experts_per_token: 8,
            expert_intermediate_size: 768,
            norm_topk_prob: Some(true),
            decoder_sparse_step: Some(1),
            ..base
        },
    };
    let model_type = args.model_type.as_deref().unwrap_or(spec.model_type);
    let arch = match REGISTRY.iter().find(|d| d.model_type == model_type) {
        Some(d) => d,
        None => {
            let known: Vec<&str> = REGISTRY.iter().map(|d| d.model_type).collect();
            anyhow::bail!("--model-type {model_type}: expected one of {}", known.join(", "))
        }
    };
    spec.model_type = arch.model_type;
    if arch.moe.is_some() {
        // The tiny mixture-of-experts specs' rules (Qwen3-MoE: dense and sparse blocks); a larger
        // preset gives each expert its MLP width, as Mixtral does.
        let moe = match (args.preset, arch.model_type) {
            (Preset::Qwen330bA3b, _) => spec.clone(),
            (_, "qwen3_moe") => SyntheticSpec::tiny_qwen3_moe(),
            _ => SyntheticSpec::tiny_mixtral(),
        };
        spec.n_experts = args.experts.unwrap_or(moe.n_experts);
        spec.experts_per_token = args.experts_per_token.unwrap_or(moe.experts_per_token);
        spec.expert_intermediate_size = match args.preset {
            Preset::Tiny | Preset::Qwen330bA3b => moe.expert_intermediate_size,
            _ => spec.intermediate_size,
        };
        (spec.norm_topk_prob, spec.decoder_sparse_step) = (moe.norm_topk_prob, moe.decoder_sparse_step);
    } else if args.experts.is_some() || args.experts_per_token.is_some() {
        anyhow::bail!("--experts and --experts-per-token are for architectures with experts (mixtral, qwen3_moe)");
    }
    spec.n_blocks = args.blocks.unwrap_or(spec.n_blocks);
    spec.sliding_window = args.sliding_window.or(spec.sliding_window);
    if let Some(n) = args.full_attention_every {
        if arch.windowed_blocks != awq_model::arch::WindowedBlocks::SlidingAttention {
            anyhow::bail!("--full-attention-every is for architectures with sliding and global blocks (gemma3_text)");
        }
        spec.full_attention_every = Some(n as usize);
    }
    spec.shards = args.shards;
    spec.seed = args.seed;
    write_checkpoint(&args.dir, &spec)?;
    out!("wrote a synthetic {} checkpoint ({} blocks, hidden {}) to {}", spec.model_type, spec.n_blocks, spec.hidden_size, args.dir.display());
    Ok(())
}
