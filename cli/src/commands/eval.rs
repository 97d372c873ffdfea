//! `awq eval ...`: quality measurements of a model.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use awq_model::{Checkpoint, Tokenizer};
use awq_worker::{perplexity, Windows};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Perplexity over non-overlapping windows of a text.
    ///
    /// The text is tokenized without special tokens and cut into windows of --ctx tokens; each
    /// window predicts its own next tokens (with a BOS token in front when tokenizer_config.json
    /// sets add_bos_token). This is the measure of ../shared/assets/check-model.py and of the
    /// AWQ paper's tables. Runs on the CPU, streaming the model one block at a time.
    Ppl(PplArgs),
}

#[derive(Args)]
pub struct PplArgs {
    /// Checkpoint directory (config.json, *.safetensors, tokenizer.json).
    pub model: PathBuf,
    /// UTF-8 text file to score.
    #[arg(long)]
    pub text: PathBuf,
    /// Window length in tokens.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Score only the first N tokens of the text (default: all of it).
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<usize>,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::Ppl(args) => ppl(args),
    }
}

fn ppl(args: PplArgs) -> Result<()> {
    let checkpoint = Checkpoint::open(&args.model).with_context(|| format!("cannot load model {}", args.model.display()))?;
    let tokenizer = Tokenizer::from_dir(&args.model, checkpoint.config())?;
    let text = std::fs::read_to_string(&args.text).with_context(|| format!("cannot read text {}", args.text.display()))?;
    let mut ids = tokenizer.encode(&text)?;
    if let Some(n) = args.max_tokens {
        ids.truncate(n);
    }
    let windows = Windows::new(&ids, args.ctx, tokenizer.bos()).with_context(|| format!("cannot score {}", args.text.display()))?;
    let to_score = windows.scored_tokens();

    let bar = if args.json { ProgressBar::hidden() } else { ProgressBar::new(0) };
    bar.set_style(
        ProgressStyle::with_template("{spinner} perplexity [{bar:40}] {pos}/{len} block steps, {msg} ({elapsed}, eta {eta})")
            .expect("template is valid")
            .progress_chars("=> "),
    );
    let start = Instant::now();
    let report = perplexity(&checkpoint, &windows, |p| {
        bar.set_length(p.steps_total as u64);
        bar.set_position(p.steps_done as u64);
        bar.set_message(format!("{}/{to_score} tokens scored", p.tokens_scored));
    })?;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let tokens_per_second = report.tokens_scored as f64 / seconds;
    if args.json {
        let out = json!({
            "model": args.model,
            "text": args.text,
            "ctx": args.ctx,
            "tokens": ids.len(),
            "tokens_scored": report.tokens_scored,
            "windows": report.windows,
            "bos": tokenizer.bos().is_some(),
            "nll_sum": report.nll_sum,
            "perplexity": report.perplexity(),
            "seconds": seconds,
            "tokens_per_second": tokens_per_second,
        });
        out!("{out}");
    } else {
        out!(
            "perplexity {:.4} over {} tokens ({} windows of {}), {:.1} s, {:.0} tokens/s",
            report.perplexity(),
            report.tokens_scored,
            report.windows,
            args.ctx,
            seconds,
            tokens_per_second
        );
    }
    Ok(())
}
