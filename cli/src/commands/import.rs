//! `awq import gguf FILE -o DIR`: a llama.cpp GGUF file as a Hugging Face checkpoint.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use awq_kernels::DType;
use awq_model::gguf::{import, ImportOptions};
use awq_model::writer::Overwrite;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

#[derive(Subcommand)]
pub enum ImportCommand {
    /// Convert a GGUF file (llama.cpp's format) into a Hugging Face checkpoint.
    ///
    /// Writes config.json, model.safetensors (or shards and an index), tokenizer.json,
    /// tokenizer_config.json and generation_config.json. Every tensor is dequantized exactly as
    /// llama.cpp defines its block formats (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K,
    /// Q3_K, Q4_K, Q5_K, Q6_K), then rounded once to --dtype; llama.cpp's Q/K row permutation
    /// is undone for llama models, and the 1 it adds to Gemma's norm weights is subtracted.
    /// Architectures: llama, qwen2 and qwen3 with a byte-level BPE vocabulary
    /// (tokenizer.ggml.model gpt2) and one of the pre-tokenizers smollm, starcoder, refact,
    /// codeshell, qwen2: SmolLM/SmolLM2, Qwen2, Qwen2.5, Qwen3; gemma3 (Gemma 3 text models) with
    /// its SentencePiece-style vocabulary (tokenizer.ggml.model llama), whose merges are rebuilt
    /// from the tokens' scores. Anything else (Llama 3's pre-tokenizer, other architectures) is
    /// refused with the metadata key or tensor that is in the way.
    ///
    /// The weights of a quantized GGUF are its quantization grid, not the original release:
    /// quantizing them again (awq quantize) measures AWQ on a model that was already rounded.
    Gguf(GgufArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DTypeArg {
    /// float16, as the Hugging Face releases of these models.
    F16,
    /// bfloat16: the range of float32, for values float16 cannot hold.
    Bf16,
    /// float32: every dequantized value exactly (twice the size).
    F32,
}

#[derive(Args)]
pub struct GgufArgs {
    /// The .gguf file.
    pub file: PathBuf,
    /// Output checkpoint directory; written beside it first and renamed when complete.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Element type of every tensor written. A value the type cannot hold is an error naming
    /// the tensor.
    #[arg(long, value_enum, default_value_t = DTypeArg::F16)]
    pub dtype: DTypeArg,
    /// Largest safetensors file to write, in bytes (default 5 GB, as transformers).
    #[arg(long, default_value_t = 5_000_000_000, value_name = "BYTES")]
    pub max_shard_size: u64,
    /// Replace OUTPUT if it exists (only once the new checkpoint is complete).
    #[arg(long)]
    pub overwrite: bool,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: ImportCommand) -> Result<()> {
    match cmd {
        ImportCommand::Gguf(args) => gguf(args),
    }
}

fn gguf(args: GgufArgs) -> Result<()> {
    if args.output.exists() && !args.overwrite {
        bail!("output {} exists; pass --overwrite to replace it", args.output.display());
    }
    let options = ImportOptions {
        dtype: match args.dtype {
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
            DTypeArg::F32 => DType::F32,
        },
        max_shard_bytes: args.max_shard_size,
        overwrite: if args.overwrite { Overwrite::Replace } else { Overwrite::Refuse },
    };
    let start = Instant::now();
    let report = import(&args.file, &args.output, &options)
        .with_context(|| format!("cannot import {}", args.file.display()))?;
    let seconds = start.elapsed().as_secs_f64();
    let types: Vec<String> = report.source_types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    if args.json {
        let out = json!({
            "file": args.file,
            "output": args.output,
            "architecture": report.architecture,
            "name": report.model_name,
            "blocks": report.n_blocks,
            "tensors": report.n_tensors,
            "parameters": report.n_parameters,
            "source_types": report.source_types.iter().map(|(t, n)| (t.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
            "tokens": report.n_tokens,
            "tied_embeddings": report.tie_word_embeddings,
            "dtype": report.dtype.to_string(),
            "seconds": seconds,
        });
        out!("{out}");
    } else {
        out!(
            "imported {} ({}, {} blocks, {:.1}M parameters, {} tokens) from {} tensors ({}) as {} into {} in {:.1} s",
            report.model_name.as_deref().unwrap_or("an unnamed model"),
            report.architecture,
            report.n_blocks,
            report.n_parameters as f64 / 1e6,
            report.n_tokens,
            report.n_tensors,
            types.join(", "),
            report.dtype,
            args.output.display(),
            seconds
        );
    }
    Ok(())
}
