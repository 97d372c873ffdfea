//! `awq bench serve`: a load generator for an OpenAI-compatible server (ours, or vLLM), after
//! `vllm bench serve`.
//!
//! A sweep over `--concurrency` levels: per level, warm-up requests (not counted), then
//! `--num-prompts` streamed completions of exactly `--input-len` prompt tokens with at most that
//! many in flight, each measured (TTFT, inter-token gaps, end-to-end; `client.rs`) and the level
//! summed up (throughputs, mean/median/p99; `stats.rs`). Prompts come from `dataset.rs`. Output: one
//! table row per level, or one JSON object for the whole sweep. A failed request is counted and its
//! level's first error printed once; only an unusable setup (no server, a bad flag, a failed
//! warm-up) ends the command with an error.

mod client;
mod dataset;
mod stats;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use hyper::body::Bytes;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use client::Http;
use stats::{LevelSummary, Outcome, Spread};

/// Where the prompts come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Dataset {
    /// Random token ids (see --vocab-size): no two prompts share a prefix.
    Random,
    /// Consecutive windows of --text FILE, tokenized by the server (POST /tokenize).
    Text,
}

impl Dataset {
    fn name(self) -> &'static str {
        match self {
            Dataset::Random => "random",
            Dataset::Text => "text",
        }
    }
}

#[derive(Args)]
pub struct BenchServeArgs {
    /// The server's base URL, plain HTTP (a trailing /v1 is ignored): requests go to
    /// URL/v1/completions, URL/v1/models and URL/tokenize.
    #[arg(long, value_name = "URL")]
    pub url: String,
    /// The model to ask for [default: the first id of GET /v1/models].
    #[arg(long)]
    pub model: Option<String>,
    /// Sent as `Authorization: Bearer KEY` (what `awq serve --api-key` and `vllm serve --api-key`
    /// require).
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Where prompts come from. Either way a prompt is sent as token ids, so the server sees exactly
    /// --input-len tokens.
    #[arg(long, value_enum, default_value = "random")]
    pub dataset: Dataset,
    /// The text of `--dataset text` (UTF-8). Windows follow each other through the file from a
    /// seeded start and wrap around at its end (only as much of the file as the sweep needs is
    /// tokenized).
    #[arg(long, value_name = "FILE", required_if_eq("dataset", "text"))]
    pub text: Option<PathBuf>,
    /// `--dataset random` draws ids from 0..N (e.g. config.json's vocab_size) instead of from the
    /// ids the server's tokenizer gives a built-in English text (the default: ids surely in its
    /// vocabulary, no special tokens).
    #[arg(long, value_name = "N")]
    pub vocab_size: Option<u32>,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 1024)]
    pub input_len: usize,
    /// Tokens to generate per request (`max_tokens`; exactly this many with --ignore-eos).
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Requests measured per concurrency level [default: max(4 x concurrency, 16), so that most of
    /// a level runs with every slot busy rather than filling up or draining].
    #[arg(long, value_name = "N")]
    pub num_prompts: Option<usize>,
    /// The sweep: one run per level, each with at most that many requests in flight (a new request
    /// starts as soon as one finishes).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128", value_name = "N,N,...")]
    pub concurrency: Vec<usize>,
    /// Send `ignore_eos: true` (a vLLM extension `awq serve` supports): every request generates
    /// exactly --output-len tokens, so levels compare like for like.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Seed of the prompts (random ids, or where the text windows start). Two runs with one seed
    /// send the same prompts, which a server's prefix cache then finds: give separate runs
    /// separate seeds (one run's levels never repeat a prompt).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Requests sent before each level and not counted (they open connections and warm the
    /// server up); one that fails stops the sweep, since the measured ones would fail alike.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub warmup: usize,
    /// Seconds one request may take, from sending it to the end of its stream (also bounds each
    /// connect and the /v1/models and /tokenize calls); a request over it counts as failed.
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    pub timeout: u64,
    /// Print one JSON object for the whole sweep (levels with vllm bench serve's key names:
    /// request_throughput, mean_ttft_ms, p99_itl_ms, ...) instead of the table.
    #[arg(long)]
    pub json: bool,
}

impl BenchServeArgs {
    fn check(&self) -> Result<()> {
        if self.concurrency.is_empty() || self.concurrency.contains(&0) {
            bail!("--concurrency: levels must be positive, e.g. 1,8,32");
        }
        if self.input_len == 0 || self.output_len == 0 {
            bail!("--input-len and --output-len must be positive");
        }
        if self.num_prompts == Some(0) {
            bail!("--num-prompts must be positive");
        }
        if self.timeout == 0 {
            bail!("--timeout must be positive");
        }
        if self.text.is_some() && self.dataset != Dataset::Text {
            bail!("--text is the text of --dataset text; add --dataset text");
        }
        Ok(())
    }

    /// Requests measured at `concurrency`.
    fn prompts_at(&self, concurrency: usize) -> usize {
        self.num_prompts.unwrap_or_else(|| concurrency.saturating_mul(4).max(16))
    }
}

pub fn run(args: BenchServeArgs) -> Result<()> {
    args.check()?;
    crate::runtime()?.block_on(sweep(args))
}

async fn sweep(args: BenchServeArgs) -> Result<()> {
    let http = Http::new(&args.url, args.api_key.as_deref(), Duration::from_secs(args.timeout))?;
    let (model, max_model_len) = served_model(&http, args.model.as_deref()).await?;
    if let Some(max) = max_model_len.filter(|&max| args.input_len.saturating_add(args.output_len) > max) {
        bail!(
            "--input-len {} + --output-len {} is more than the server's max_model_len {max}: every request would \
             fail or stop short",
            args.input_len,
            args.output_len
        );
    }
    let mut prompts = match args.dataset {
        Dataset::Random => dataset::random(&http, &model, args.vocab_size, args.seed).await?,
        Dataset::Text => {
            let path = args.text.as_ref().context("--dataset text needs --text FILE")?;
            let text = std::fs::read_to_string(path).with_context(|| format!("--text {}", path.display()))?;
            let requests: usize = args
                .concurrency
                .iter()
                .map(|&c| args.warmup.saturating_add(args.prompts_at(c)))
                .fold(0, usize::saturating_add);
            dataset::text(&http, &model, &text, requests.saturating_mul(args.input_len), args.input_len, args.seed)
                .await?
        }
    };
    let header = format!(
        "# awq bench serve: {model} at {}; {} prompts of {} tokens, {} output tokens{}; {} warm-up request(s) per \
         level; latencies are mean/median/p99",
        http.base(),
        args.dataset.name(),
        args.input_len,
        args.output_len,
        if args.ignore_eos { " (ignore_eos)" } else { "" },
        args.warmup,
    );
    if !args.json {
        out!("{header}");
        out!("{}", table_head());
    }
    let mut levels = Vec::new();
    for &concurrency in &args.concurrency {
        let warmup: Vec<_> =
            (0..args.warmup).map(|_| request_body(&args, &model, &prompts.next(args.input_len))).collect();
        let (warm, _) = run_level(&http, warmup, concurrency, args.input_len, ProgressBar::hidden()).await?;
        if let Some(Err(e)) = warm.iter().find(|o| o.is_err()) {
            bail!("a warm-up request at concurrency {concurrency} failed (check the flags against the server): {e}");
        }
        let n = args.prompts_at(concurrency);
        let bodies: Vec<_> = (0..n).map(|_| request_body(&args, &model, &prompts.next(args.input_len))).collect();
        let bar = progress_bar(args.json, n, concurrency);
        let (outcomes, duration) = run_level(&http, bodies, concurrency, args.input_len, bar.clone()).await?;
        bar.finish_and_clear();
        let summary = stats::summarize(concurrency, &outcomes, duration);
        if let Some(e) = &summary.first_error {
            eprintln!("concurrency {concurrency}: {} of {n} requests failed; the first: {e}", summary.failed);
        }
        if !args.json {
            out!("{}", table_row(&summary));
        }
        levels.push(summary);
    }
    if args.json {
        let report = json!({
            "model": model,
            "base_url": http.base(),
            "dataset": args.dataset.name(),
            "input_len": args.input_len,
            "output_len": args.output_len,
            "ignore_eos": args.ignore_eos,
            "seed": args.seed,
            "warmup": args.warmup,
            "timeout_s": args.timeout,
            "levels": levels.iter().map(LevelSummary::to_json).collect::<Vec<Value>>(),
        });
        out!("{report}");
    }
    if levels.iter().all(|l| l.completed == 0) {
        bail!("no request completed");
    }
    Ok(())
}

/// The model to ask for and its `max_model_len` (when the server tells: ours and vLLM's do).
async fn served_model(http: &Http, asked: Option<&str>) -> Result<(String, Option<usize>)> {
    let v = http.get_json("/v1/models").await.context("asking the server for its models")?;
    let data = v.get("data").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let id = |m: &Value| m.get("id").and_then(Value::as_str).map(str::to_string);
    let model = match asked {
        Some(name) => name.to_string(),
        None => data.iter().find_map(id).context("GET /v1/models lists no model; name one with --model")?,
    };
    let entry = data.iter().find(|m| id(m).as_deref() == Some(model.as_str()));
    let max_model_len = entry.and_then(|m| m.get("max_model_len")).and_then(Value::as_u64).map(|n| n as usize);
    Ok((model, max_model_len))
}

/// One request's JSON: greedy (the tokens' values do not matter, their count does), streamed with
/// a last usage chunk (the exact number of generated tokens).
fn request_body(args: &BenchServeArgs, model: &str, prompt: &[u32]) -> Bytes {
    let mut body = json!({
        "model": model,
        "prompt": prompt,
        "max_tokens": args.output_len,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    // Only when asked: OpenAI's own API refuses fields it does not know.
    if args.ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    Bytes::from(body.to_string())
}

/// Sends `bodies` with at most `concurrency` in flight; their outcomes in order and the seconds from
/// the first sent to the last answered.
async fn run_level(
    http: &Http,
    bodies: Vec<Bytes>,
    concurrency: usize,
    prompt_len: usize,
    bar: ProgressBar,
) -> Result<(Vec<Outcome>, f64)> {
    let n = bodies.len();
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    // One task per slot, each taking the next request when its last one is done: vLLM's semaphore
    // with an infinite request rate.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(n) {
        let (http, bodies, next, bar) = (http.clone(), bodies.clone(), next.clone(), bar.clone());
        tasks.spawn(async move {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { break };
                done.push((i, http.completion(body.clone(), prompt_len).await));
                bar.inc(1);
            }
            done
        });
    }
    let mut outcomes: Vec<Option<Outcome>> = vec![None; n];
    while let Some(done) = tasks.join_next().await {
        for (i, outcome) in done.context("a request task panicked")? {
            outcomes[i] = Some(outcome);
        }
    }
    let duration = start.elapsed().as_secs_f64();
    let outcomes =
        outcomes.into_iter().map(|o| o.expect("every index below n is taken by one task, which records it")).collect();
    Ok((outcomes, duration))
}

fn progress_bar(json: bool, n: usize, concurrency: usize) -> ProgressBar {
    // Hidden when stderr is no terminal too (indicatif's own check), so logs stay clean.
    if json {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(n as u64);
    if let Ok(style) =
        ProgressStyle::with_template("concurrency {prefix:>4} [{bar:40}] {pos}/{len} requests ({elapsed})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(concurrency.to_string());
    bar
}

/// Milliseconds as the table shows them: one decimal below a second, whole above.
fn ms(x: f64) -> String {
    if x >= 1000.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

/// A latency cell: mean/median/p99, or `-` when nothing was measured.
fn spread_cell(s: Option<Spread>) -> String {
    s.map_or_else(|| "-".to_string(), |s| format!("{}/{}/{}", ms(s.mean), ms(s.median), ms(s.p99)))
}

fn table_head() -> String {
    format!(
        "{:>5} {:>5} {:>4} {:>8} {:>7} {:>9} {:>9}  {:>19} {:>19} {:>19} {:>19}",
        "conc", "done", "fail", "time s", "req/s", "out tok/s", "tok/s", "TTFT ms", "TPOT ms", "ITL ms", "E2E ms"
    )
}

fn table_row(s: &LevelSummary) -> String {
    format!(
        "{:>5} {:>5} {:>4} {:>8.2} {:>7.2} {:>9.1} {:>9.1}  {:>19} {:>19} {:>19} {:>19}",
        s.concurrency,
        s.completed,
        s.failed,
        s.duration,
        s.request_throughput,
        s.output_throughput,
        s.total_token_throughput,
        spread_cell(s.ttft),
        spread_cell(s.tpot),
        spread_cell(s.itl),
        spread_cell(s.e2el),
    )
}
