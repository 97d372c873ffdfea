//! `awq`: one binary for every role of awq-cluster.
//!
//! Each subcommand lives in `commands/` and is thin glue over the library crates: parse arguments,
//! call the library, show progress, print a result (human-readable, or JSON with `--json`).

mod commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Quantize large language models to 4-bit with AWQ, and evaluate them.
///
/// Models are Hugging Face checkpoint directories: config.json, safetensors weights (one file or
/// sharded with model.safetensors.index.json) and tokenizer.json. Supported architectures: llama,
/// mistral, qwen2.
#[derive(Parser)]
#[command(name = "awq", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure a model: perplexity on a text.
    #[command(subcommand)]
    Eval(commands::eval::EvalCommand),
    /// Quantize a model to 4 bits with AWQ (or round-to-nearest) into an AutoAWQ GEMM checkpoint.
    ///
    /// Calibrates on text (built-in by default), searches per-channel scales and clip thresholds
    /// block by block exactly as AutoAWQ 0.2.9 does, and writes a checkpoint that vLLM,
    /// transformers and AutoAWQ load unchanged, plus awq_report.json (chosen ratios, losses, clips).
    Quantize(commands::quantize::QuantizeArgs),
    /// Check a checkpoint directory and print what it holds.
    Inspect(commands::inspect::InspectArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AWQ_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Eval(cmd) => commands::eval::run(cmd),
        Command::Quantize(args) => commands::quantize::run(args),
        Command::Inspect(args) => commands::inspect::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
