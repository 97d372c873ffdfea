//! `awq eval ...`: quality measurements of a model, computed on the serving engine's model runner
//! (`awq_serve::eval`: the windows of a text as step plans) so that they run wherever `awq serve`
//! runs. Windows follow `awq_worker::Windows` (check-model.py's rule).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use awq_kernels::Device;
use awq_model::{Checkpoint, Tokenizer};
use awq_serve::eval::{kl_divergence, perplexity, step_tokens, EvalProgress, EvalSchedule};
use awq_serve::runner::ModelRunner;
use awq_worker::Windows;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

/// Tokens per KV-cache block (`awq serve`'s default; the cache holds only one step's windows).
const BLOCK_SIZE: usize = 16;

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Perplexity over non-overlapping windows of a text.
    ///
    /// The text is tokenized without special tokens and cut into windows of --ctx tokens; each
    /// window predicts its own next tokens (with a BOS token in front when tokenizer_config.json
    /// sets add_bos_token) and sees nothing of the others. Perplexity is exp(the mean negative
    /// log-likelihood of the scored tokens, in nats): roughly how many equally likely tokens the
    /// model is choosing between at each step. Lower is better; a good 4-bit model stays within a
    /// few percent of its original. This is the measure of ../shared/assets/check-model.py and of
    /// the AWQ paper's tables; compare numbers only on the same text, --ctx and tokenizer.
    ///
    /// Runs on the serving engine's model runner, the model loaded whole on --device as `awq serve`
    /// loads it (f32 on the CPU; f16 with AWQ linears as INT4 on a GPU), several windows per step.
    #[command(after_help = "\
Example:
  awq eval ppl ./SmolLM2-135M --text pride-and-prejudice.txt --max-tokens 4096
  perplexity 22.3296 over 4095 tokens (8 windows of 512), then the time and tokens/s")]
    Ppl(PplArgs),
    /// KL divergence of a quantized model's next-token distributions from its original's.
    ///
    /// Both models score the same windows of the text (cut as `awq eval ppl` cuts them). At every
    /// scored position, KL(P_ref || P_quant) = sum over the vocabulary of p_ref * ln(p_ref / p_quant),
    /// in nats: 0 where the quantized model predicts exactly the original's distribution, larger
    /// the more probability it moves elsewhere. Unlike perplexity it needs no right answer and
    /// weighs the whole distribution at every token, so it shows damage that an average
    /// perplexity hides (errors that raise some tokens' likelihood and lower others'). Printed:
    /// mean, median, 99th percentile and maximum over the scored tokens (a low mean with a high
    /// p99 or max: most positions are fine, a few are badly hurt), and both models' perplexities.
    ///
    /// For scale, SmolLM2-135M on the first 4096 tokens of Pride and Prejudice: the quick start's AWQ
    /// model (group size 64, 16 calibration texts) has mean 0.136, median 0.089, p99 0.90 nats and
    /// perplexity 25.36 against 22.33; round-to-nearest at group size 64, mean 0.298, median 0.224,
    /// p99 1.51 and perplexity 27.52.
    ///
    /// The two models must share the tokenizer (the text must give the same token ids). Both are
    /// loaded at once (memory for two models) and go through the text step by step; keeping the
    /// reference's distributions instead would take vocabulary x tokens x 4 bytes (800 MB for
    /// SmolLM2 over 4096 tokens).
    #[command(after_help = "\
Example:
  awq eval kl ./SmolLM2-135M-AWQ --reference ./SmolLM2-135M --text pride-and-prejudice.txt --max-tokens 4096")]
    Kl(KlArgs),
}

#[derive(Args)]
pub struct PplArgs {
    /// Checkpoint directory (config.json, *.safetensors, tokenizer.json); AWQ checkpoints too.
    pub model: PathBuf,
    #[command(flatten)]
    pub scoring: ScoringArgs,
}

#[derive(Args)]
pub struct KlArgs {
    /// The quantized checkpoint directory (what `awq quantize` wrote, or any model to compare).
    pub quantized: PathBuf,
    /// The original checkpoint directory the distributions are compared with.
    #[arg(long, value_name = "DIR")]
    pub reference: PathBuf,
    #[command(flatten)]
    pub scoring: ScoringArgs,
}

/// What to score and where: shared by `eval ppl` and `eval kl`.
#[derive(Args)]
pub struct ScoringArgs {
    /// UTF-8 text file to score.
    #[arg(long)]
    pub text: PathBuf,
    /// Window length in tokens (BOS included when the tokenizer adds one).
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Score only the first N tokens of the text (default: all of it).
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<usize>,
    /// Devices to compute on: `cpu`, or GPUs `cuda:0[,cuda:1,...]` (one tensor-parallel rank per
    /// GPU, joined by NCCL all-reduces).
    #[arg(long = "device", value_name = "DEVICE", value_delimiter = ',', default_value = "cpu")]
    pub devices: Vec<Device>,
    /// Tensor-parallel ranks of the model runner (default: one per device given). On the CPU, ranks
    /// on threads (partial sums added in rank order, so results equal one rank's within float
    /// rounding); on GPUs a multiple of the GPUs given.
    #[arg(long, value_name = "N")]
    pub tp: Option<usize>,
    /// Print the result as one JSON object (and no progress bar).
    #[arg(long)]
    pub json: bool,
}

impl ScoringArgs {
    /// `--tp`, or one rank per device.
    fn tp(&self) -> usize {
        self.tp.unwrap_or(self.devices.len().max(1))
    }

    /// The devices as given: `cuda:0,cuda:1`.
    fn device_names(&self) -> String {
        self.devices.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",")
    }
}

pub fn run(cmd: EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::Ppl(args) => ppl(args),
        EvalCommand::Kl(args) => kl(args),
    }
}

/// A checkpoint and the token ids of the text under its tokenizer (cut to --max-tokens).
struct Scored {
    checkpoint: Checkpoint,
    bos: Option<u32>,
    ids: Vec<u32>,
}

fn open_and_tokenize(model: &Path, args: &ScoringArgs, text: &str) -> Result<Scored> {
    let checkpoint = Checkpoint::open(model).with_context(|| format!("cannot load model {}", model.display()))?;
    let tokenizer = Tokenizer::from_dir(model, checkpoint.config())?;
    let mut ids = tokenizer.encode(text)?;
    if let Some(n) = args.max_tokens {
        ids.truncate(n);
    }
    Ok(Scored { checkpoint, bos: tokenizer.bos(), ids })
}

fn read_text(args: &ScoringArgs) -> Result<String> {
    std::fs::read_to_string(&args.text).with_context(|| format!("cannot read text {}", args.text.display()))
}

fn load_runner(
    model: &Path,
    checkpoint: &Checkpoint,
    args: &ScoringArgs,
    schedule: &EvalSchedule,
) -> Result<ModelRunner> {
    let tp = args.tp();
    ModelRunner::load(checkpoint, &args.devices, tp, schedule.block_size(), schedule.n_cache_blocks())
        .with_context(|| format!("cannot load model {} on {} (--tp {tp})", model.display(), args.device_names()))
}

/// A bar over the schedule's steps on stderr (hidden with --json), showing tokens scored.
fn progress_bar(what: &str, json: bool, schedule: &EvalSchedule) -> ProgressBar {
    let bar = if json { ProgressBar::hidden() } else { ProgressBar::new(schedule.n_steps() as u64) };
    let template = format!("{{spinner}} {what} [{{bar:40}}] {{pos}}/{{len}} steps, {{msg}} ({{elapsed}}, eta {{eta}})");
    bar.set_style(ProgressStyle::with_template(&template).expect("template is valid").progress_chars("=> "));
    bar
}

fn on_progress(bar: &ProgressBar, total: usize) -> impl FnMut(EvalProgress) + '_ {
    move |p| {
        bar.set_position(p.steps_done as u64);
        bar.set_message(format!("{}/{total} tokens scored", p.tokens_scored));
    }
}

fn ppl(args: PplArgs) -> Result<()> {
    let s = &args.scoring;
    let text = read_text(s)?;
    let Scored { checkpoint, bos, ids } = open_and_tokenize(&args.model, s, &text)?;
    let windows = Windows::new(&ids, s.ctx, bos).with_context(|| format!("cannot score {}", s.text.display()))?;
    let schedule = EvalSchedule::new(&windows.windows, BLOCK_SIZE, step_tokens(checkpoint.config().vocab_size))?;

    let load_start = Instant::now();
    let mut runner = load_runner(&args.model, &checkpoint, s, &schedule)?;
    let load_seconds = load_start.elapsed().as_secs_f64();
    let bar = progress_bar("perplexity", s.json, &schedule);
    let start = Instant::now();
    let report = perplexity(&mut runner, &schedule, on_progress(&bar, schedule.tokens_scored()))
        .with_context(|| format!("cannot score {} with {}", s.text.display(), args.model.display()))?;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let tokens_per_second = report.tokens_scored as f64 / seconds;
    if s.json {
        let out = json!({
            "model": args.model,
            "text": s.text,
            "ctx": s.ctx,
            "device": s.device_names(),
            "tp": s.tp(),
            "tokens": ids.len(),
            "tokens_scored": report.tokens_scored,
            "windows": report.windows,
            "bos": bos.is_some(),
            "nll_sum": report.nll_sum,
            "perplexity": report.perplexity(),
            "load_seconds": load_seconds,
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
            s.ctx,
            seconds,
            tokens_per_second
        );
    }
    Ok(())
}

fn kl(args: KlArgs) -> Result<()> {
    let s = &args.scoring;
    let text = read_text(s)?;
    let quantized = open_and_tokenize(&args.quantized, s, &text)?;
    let reference = open_and_tokenize(&args.reference, s, &text)?;
    let (q_vocab, r_vocab) = (quantized.checkpoint.config().vocab_size, reference.checkpoint.config().vocab_size);
    if q_vocab != r_vocab {
        bail!(
            "{} has a vocabulary of {q_vocab} tokens, the reference {} one of {r_vocab}: KL divergence compares \
             next-token distributions token by token, so both models need the same tokenizer",
            args.quantized.display(),
            args.reference.display()
        );
    }
    if quantized.bos != reference.bos {
        bail!(
            "{} and the reference {} disagree on the BOS token ({:?} vs {:?}): the windows would differ",
            args.quantized.display(),
            args.reference.display(),
            quantized.bos,
            reference.bos
        );
    }
    if quantized.ids != reference.ids {
        let at = quantized
            .ids
            .iter()
            .zip(&reference.ids)
            .position(|(a, b)| a != b)
            .unwrap_or(quantized.ids.len().min(reference.ids.len()));
        bail!(
            "{} and the reference {} tokenize {} differently (from token {at} on: {:?} vs {:?}); \
             KL divergence needs the same tokenizer",
            args.quantized.display(),
            args.reference.display(),
            s.text.display(),
            quantized.ids.get(at),
            reference.ids.get(at)
        );
    }
    let ids = &quantized.ids;
    let windows =
        Windows::new(ids, s.ctx, quantized.bos).with_context(|| format!("cannot score {}", s.text.display()))?;
    let schedule = EvalSchedule::new(&windows.windows, BLOCK_SIZE, step_tokens(q_vocab))?;

    let load_start = Instant::now();
    let mut q_runner = load_runner(&args.quantized, &quantized.checkpoint, s, &schedule)?;
    let mut r_runner = load_runner(&args.reference, &reference.checkpoint, s, &schedule)?;
    let load_seconds = load_start.elapsed().as_secs_f64();
    let bar = progress_bar("KL divergence", s.json, &schedule);
    let start = Instant::now();
    let report = kl_divergence(&mut q_runner, &mut r_runner, &schedule, on_progress(&bar, schedule.tokens_scored()))
        .with_context(|| {
            format!(
                "cannot score {} with {} and {}",
                s.text.display(),
                args.quantized.display(),
                args.reference.display()
            )
        })?;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let n = report.per_token.len();
    let tokens_per_second = n as f64 / seconds;
    let kl = report.summary();
    let (q_ppl, r_ppl) = (report.quantized.perplexity(), report.reference.perplexity());
    if s.json {
        let out = json!({
            "quantized": args.quantized,
            "reference": args.reference,
            "text": s.text,
            "ctx": s.ctx,
            "device": s.device_names(),
            "tp": s.tp(),
            "tokens": ids.len(),
            "tokens_scored": n,
            "windows": report.quantized.windows,
            "bos": quantized.bos.is_some(),
            "kl_mean": kl.mean,
            "kl_median": kl.median,
            "kl_p99": kl.p99,
            "kl_max": kl.max,
            "quantized_nll_sum": report.quantized.nll_sum,
            "quantized_perplexity": q_ppl,
            "reference_nll_sum": report.reference.nll_sum,
            "reference_perplexity": r_ppl,
            "load_seconds": load_seconds,
            "seconds": seconds,
            "tokens_per_second": tokens_per_second,
        });
        out!("{out}");
    } else {
        out!(
            "KL(reference || quantized), nats per token: mean {:.5}, median {:.5}, p99 {:.4}, max {:.4} over {n} tokens \
             ({} windows of {})",
            kl.mean,
            kl.median,
            kl.p99,
            kl.max,
            report.quantized.windows,
            s.ctx
        );
        out!("perplexity: quantized {q_ppl:.4}, reference {r_ppl:.4} ({:+.2}%)", (q_ppl / r_ppl - 1.0) * 100.0);
        out!("{seconds:.1} s, {tokens_per_second:.0} tokens/s (each token through both models)");
    }
    Ok(())
}
