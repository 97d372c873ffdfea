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
}

#[derive(Args)]
pub struct SyntheticArgs {
    /// Directory to write (created).
    pub dir: PathBuf,
    #[arg(long, value_enum, default_value_t = Preset::Tiny)]
    pub preset: Preset,
    /// Architecture (config.json's model_type): llama, mistral, qwen2, qwen3, phi3 or gemma3_text (any registered one).
    #[arg(long, default_value = "llama")]
    pub model_type: String,
    /// Override the number of blocks.
    #[arg(long)]
    pub blocks: Option<usize>,
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
    };
    spec.model_type = match REGISTRY.iter().find(|d| d.model_type == args.model_type) {
        Some(d) => d.model_type,
        None => {
            let known: Vec<&str> = REGISTRY.iter().map(|d| d.model_type).collect();
            anyhow::bail!("--model-type {}: expected one of {}", args.model_type, known.join(", "))
        }
    };
    spec.n_blocks = args.blocks.unwrap_or(spec.n_blocks);
    spec.shards = args.shards;
    spec.seed = args.seed;
    write_checkpoint(&args.dir, &spec)?;
    out!("wrote a synthetic {} checkpoint ({} blocks, hidden {}) to {}", spec.model_type, spec.n_blocks, spec.hidden_size, args.dir.display());
    Ok(())
}
