//! `awq quantize MODEL -o OUT`: AWQ (or round-to-nearest) quantization on this machine.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use awq_kernels::ops::QuantSpec;
use awq_model::writer::{write_checkpoint, Overwrite};
use awq_model::{Checkpoint, Tokenizer};
use awq_worker::awq::calib::{self, CalibOptions};
use awq_worker::awq::job::quantize_model;
use awq_worker::awq::{AwqOptions, Method};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

#[derive(Clone, Copy, ValueEnum)]
pub enum MethodArg {
    /// Activation-aware scale search and clip search, then quantization (AutoAWQ 0.2.9).
    Awq,
    /// Plain round-to-nearest group quantization: the baseline.
    Rtn,
}

#[derive(Args)]
pub struct QuantizeArgs {
    /// Checkpoint directory to quantize (config.json, *.safetensors, tokenizer.json).
    pub model: PathBuf,
    /// Output directory for the AutoAWQ GEMM checkpoint; written beside it first and renamed when
    /// complete.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Bits per weight (the GEMM format holds 4).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(4..=4))]
    pub w_bit: u32,
    /// Input channels per quantization group: 128, 64 or 32. Every linear's input features must be
    /// a multiple of it (SmolLM2-135M's 576 needs 64).
    #[arg(long, default_value_t = 128)]
    pub group_size: usize,
    /// Symmetric quantization (no zero point); stored with a constant zero of 8 so GEMM loaders
    /// read it unchanged.
    #[arg(long)]
    pub no_zero_point: bool,
    /// Calibration texts: .jsonl with a "text" field, or plain text (one sample per paragraph, or
    /// per line when there are no blank lines). Default: the built-in set (paragraphs of four Jane
    /// Austen novels).
    #[arg(long, value_name = "FILE")]
    pub calib: Option<PathBuf>,
    /// Calibration texts to use (texts longer than --seqlen tokens are skipped).
    #[arg(long, default_value_t = 128)]
    pub n_samples: usize,
    /// Tokens per calibration row; the used texts are concatenated and cut into rows this long.
    #[arg(long, default_value_t = 512)]
    pub seqlen: usize,
    /// Seed of the calibration sampling order.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = MethodArg::Awq)]
    pub method: MethodArg,
    /// Largest safetensors file to write, in bytes (default 5 GB, as AutoAWQ).
    #[arg(long, default_value_t = 5_000_000_000, value_name = "BYTES")]
    pub max_shard_size: u64,
    /// Replace OUTPUT if it exists (only once the new checkpoint is complete).
    #[arg(long)]
    pub overwrite: bool,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    if ![32, 64, 128].contains(&args.group_size) {
        bail!("--group-size {} is not supported: use 128, 64 or 32", args.group_size);
    }
    if args.output.exists() && !args.overwrite {
        bail!("output {} exists; pass --overwrite to replace it", args.output.display());
    }
    let start = Instant::now();
    let checkpoint = Checkpoint::open(&args.model).with_context(|| format!("cannot load model {}", args.model.display()))?;
    if checkpoint.awq().is_some() {
        bail!("{} is already AWQ-quantized", args.model.display());
    }
    let spec = QuantSpec { bits: args.w_bit, group_size: args.group_size, zero_point: !args.no_zero_point };
    let method = match args.method {
        MethodArg::Awq => Method::Awq,
        MethodArg::Rtn => Method::Rtn,
    };
    let options = AwqOptions::new(spec, method);
    awq_worker::awq::check_quantizable(checkpoint.arch(), checkpoint.config(), spec)?;

    let calibration = match method {
        Method::Rtn => None,
        Method::Awq => {
            let tokenizer = Tokenizer::from_dir(&args.model, checkpoint.config())?;
            let texts = match &args.calib {
                Some(path) => calib::load_texts(path)?,
                None => calib::default_texts(),
            };
            let calib_options = CalibOptions { n_samples: args.n_samples, seqlen: args.seqlen, seed: args.seed };
            Some(calib::build(&texts, &tokenizer, calib_options)?)
        }
    };
    let n_blocks = checkpoint.n_blocks();
    if !args.json {
        let calib_note = match &calibration {
            None => "no calibration (round-to-nearest)".to_string(),
            Some(c) => format!(
                "calibration: {} rows x {} tokens from {} texts ({} longer than {} tokens skipped)",
                c.rows.len(),
                c.seqlen,
                c.samples_used,
                c.samples_too_long,
                c.seqlen
            ),
        };
        eprintln!(
            "quantizing {} ({} blocks) with {}, w{} g{} {}; {calib_note}",
            args.model.display(),
            n_blocks,
            match method { Method::Awq => "AWQ", Method::Rtn => "RTN" },
            spec.bits,
            spec.group_size,
            if spec.zero_point { "asymmetric" } else { "symmetric" },
        );
    }
    let bar = if args.json { ProgressBar::hidden() } else { ProgressBar::new(n_blocks as u64) };
    bar.set_style(
        ProgressStyle::with_template("{spinner} blocks [{bar:40}] {pos}/{len} {msg} ({elapsed}, eta {eta})")
            .expect("template is valid")
            .progress_chars("=> "),
    );
    bar.tick();
    let quantized = quantize_model(&checkpoint, calibration.as_ref(), &options, |report| {
        bar.inc(1);
        let gain: Vec<String> = report
            .groups
            .iter()
            .map(|g| format!("{}:{:.0}%", g.linears.join(""), 100.0 * (1.0 - g.loss_best / g.loss_ratio0.max(f64::MIN_POSITIVE))))
            .collect();
        bar.set_message(format!("block {} loss cut {}", report.block_idx, gain.join(" ")));
    })?;
    bar.finish_and_clear();
    let report = quantized.report_json();
    let quant_seconds = start.elapsed().as_secs_f64();
    let output = quantized.into_output(&checkpoint)?;
    let overwrite = if args.overwrite { Overwrite::Replace } else { Overwrite::Refuse };
    write_checkpoint(output, &args.output, args.max_shard_size, overwrite)?;
    let seconds = start.elapsed().as_secs_f64();

    // Per-block mean loss reduction of the scale search (AWQ only).
    let reductions: Vec<f64> = report["blocks"]
        .as_array()
        .map(|blocks| {
            blocks
                .iter()
                .map(|b| {
                    let groups = b["groups"].as_array().cloned().unwrap_or_default();
                    let cuts: Vec<f64> = groups
                        .iter()
                        .filter_map(|g| Some(1.0 - g["loss_best"].as_f64()? / g["loss_ratio0"].as_f64()?.max(f64::MIN_POSITIVE)))
                        .collect();
                    cuts.iter().sum::<f64>() / cuts.len().max(1) as f64
                })
                .collect()
        })
        .unwrap_or_default();
    if args.json {
        println!(
            "{}",
            json!({
                "output": args.output,
                "seconds": seconds,
                "quantize_seconds": quant_seconds,
                "report": report,
            })
        );
    } else {
        println!("wrote {} in {:.1} s", args.output.display(), seconds);
        if method == Method::Awq {
            let mean = reductions.iter().sum::<f64>() / reductions.len().max(1) as f64;
            let per_block: Vec<String> = reductions.iter().map(|r| format!("{:.0}", 100.0 * r)).collect();
            println!("scale search cut the quantization loss by {:.1}% on average; per block (%): {}", 100.0 * mean, per_block.join(" "));
        }
    }
    Ok(())
}
