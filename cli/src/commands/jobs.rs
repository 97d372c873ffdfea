//! Client commands against a coordinator: `submit`, `status`, `watch`, `cancel`, `jobs`,
//! `workers`, and the pieces `quantize` shares with them (quantization options, watching a job
//! with one progress bar per stage, rendering jobs as text or JSON).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use awq_auth::{AttachToken, Authed, Secret, TlsConfig};
use awq_job::wire::device_from_wire;
use awq_job::{CalibOptions, CalibSource, DType, EngineDtype, GroupSize, InvalidOption, JobOptions, Method};
use awq_proto::v1::job_service_client::JobServiceClient;
use awq_proto::v1::{self as pb, JobState};
use clap::{Args, ValueEnum};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use tokio_stream::StreamExt;

#[derive(Clone, Copy, ValueEnum)]
pub enum MethodArg {
    /// Activation-aware scale search and clip search, then quantization (AutoAWQ 0.2.9).
    Awq,
    /// Plain round-to-nearest group quantization: the baseline.
    Rtn,
}

/// `--engine-dtype`: what the AWQ engine computes in.
#[derive(Clone, Copy, ValueEnum)]
pub enum EngineDtypeArg {
    /// f16 on GPUs (as AutoAWQ; bf16 for Gemma, whose activations overflow f16), f32 on CPUs (the
    /// reference engine).
    Auto,
    F32,
    F16,
    Bf16,
}

/// `--group-size`: one of the GEMM format's sizes, checked when the flag is parsed.
fn parse_group_size(value: &str) -> Result<GroupSize, String> {
    value.parse::<u64>().ok().and_then(GroupSize::awq).ok_or_else(|| format!("`{value}` is not 32, 64 or 128"))
}

/// How to quantize: the options `quantize` and `submit` share.
#[derive(Args, Clone)]
pub struct QuantArgs {
    /// Bits per weight (the GEMM format holds 4).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(4..=4))]
    pub w_bit: u32,
    /// Input channels per quantization group: 128, 64 or 32. Every linear's input features must be
    /// a multiple of it (SmolLM2-135M's 576 needs 64).
    #[arg(long, default_value = "128", value_parser = parse_group_size)]
    pub group_size: GroupSize,
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
    pub n_samples: u32,
    /// Tokens per calibration row; the used texts are concatenated and cut into rows this long.
    #[arg(long, default_value_t = 512)]
    pub seqlen: u32,
    /// Seed of the calibration sampling order.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = MethodArg::Awq)]
    pub method: MethodArg,
    /// What the AWQ engine computes in. It changes the output's bytes, so it is part of the job
    /// (every stage uses it; awq_report.json records it): `auto` is f16 on GPUs, as AutoAWQ runs,
    /// and f32 on CPUs; a fixed dtype makes CPU and GPU runs comparable.
    #[arg(long, value_enum, default_value_t = EngineDtypeArg::Auto)]
    pub engine_dtype: EngineDtypeArg,
    /// Largest safetensors file to write, in bytes (default 5 GB, as AutoAWQ).
    #[arg(long, default_value_t = 5_000_000_000, value_name = "BYTES")]
    pub max_shard_size: u64,
    /// Replace the output if it exists (only once the new checkpoint is complete).
    #[arg(long)]
    pub overwrite: bool,
}

/// An absolute path as the cluster sees it: canonical when it exists here, made absolute against
/// the current directory otherwise.
pub fn cluster_path(path: &Path) -> Result<PathBuf> {
    if let Ok(p) = path.canonicalize() {
        return Ok(p);
    }
    let abs = if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir()?.join(path) };
    match (abs.parent().and_then(|p| p.canonicalize().ok()), abs.file_name()) {
        (Some(parent), Some(name)) => Ok(parent.join(name)),
        _ => Ok(abs),
    }
}

impl QuantArgs {
    /// The job's options, typed (the calibration numbers are checked here too, so a bad value
    /// is refused before anything is sent).
    pub fn options(&self) -> Result<JobOptions> {
        let flag = |e: InvalidOption| anyhow::anyhow!("{}", rename_fields(&e.to_string()));
        let calib_source = match &self.calib {
            Some(p) => JobOptions::calib_file(cluster_path(p)?).map_err(flag)?,
            None => CalibSource::BuiltIn,
        };
        Ok(JobOptions {
            quant: JobOptions::quant_spec(self.w_bit.into(), self.group_size.get() as u64, !self.no_zero_point).map_err(flag)?,
            method: match self.method {
                MethodArg::Awq => Method::Awq,
                MethodArg::Rtn => Method::Rtn,
            },
            calib: CalibOptions::new(self.n_samples as usize, self.seqlen as usize, self.seed).map_err(flag)?,
            calib_source,
            engine_dtype: match self.engine_dtype {
                EngineDtypeArg::Auto => EngineDtype::DeviceDefault,
                EngineDtypeArg::F32 => EngineDtype::Fixed(DType::F32),
                EngineDtypeArg::F16 => EngineDtype::Fixed(DType::F16),
                EngineDtypeArg::Bf16 => EngineDtype::Fixed(DType::BF16),
            },
            max_shard_bytes: JobOptions::shard_bytes(self.max_shard_size).map_err(flag)?,
        })
    }

    /// The request for `model` -> `output` with `options` (from [`QuantArgs::options`]).
    pub fn request(&self, options: &JobOptions, model: &Path, output: &Path) -> Result<pb::SubmitRequest> {
        Ok(pb::SubmitRequest {
            model_path: cluster_path(model)?.to_string_lossy().into_owned(),
            output_path: cluster_path(output)?.to_string_lossy().into_owned(),
            overwrite: self.overwrite,
            options: Some(pb::QuantOptions::from(options)),
            deploy: None,
        })
    }
}

/// The options a job record carries, typed (`None` for a record that holds none this build can
/// read).
pub fn job_options(job: &pb::Job) -> Option<JobOptions> {
    job.request.as_ref()?.options.as_ref().and_then(|o| JobOptions::try_from(o).ok())
}

/// The coordinator address, its token, its CA and the output format every client command takes.
#[derive(Args, Clone)]
pub struct ClientArgs {
    /// Coordinator URL (`https://` for a coordinator that serves TLS; see --tls-ca). Several,
    /// comma-separated: a leader and its standbys on one etcd; the command goes to the leader.
    #[arg(
        long,
        env = "AWQ_COORDINATOR",
        value_name = "URL",
        value_delimiter = ',',
        value_parser = super::auth::coordinator_url,
        default_value = "http://127.0.0.1:50151"
    )]
    pub coordinator: Vec<String>,
    #[command(flatten)]
    pub token: super::auth::ClientTokenArgs,
    #[command(flatten)]
    pub tls: super::auth::ClientTlsArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

impl ClientArgs {
    /// A client of the coordinator's job API, sending --token, verifying with --tls-ca.
    pub async fn jobs(&self) -> Result<JobServiceClient<Authed>> {
        let channel = self.channel().await?;
        Ok(JobServiceClient::new(channel).max_decoding_message_size(awq_proto::MAX_MESSAGE_BYTES))
    }

    /// A channel to the coordinator that leads among --coordinator's URLs (the one given, when
    /// there is one), sending --token, verifying with --tls-ca. With several, while none leads (a
    /// standby taking over from a lost leader) it asks again for up to [`FAILOVER_WAIT`].
    pub async fn channel(&self) -> Result<Authed> {
        let (token, tls) = (self.token.secret()?, self.tls.config()?);
        if let [url] = &self.coordinator[..] {
            return channel(url, token.as_ref(), tls.as_ref()).await;
        }
        let started = std::time::Instant::now();
        let mut said = false;
        loop {
            match self.leader(token.as_ref(), tls.as_ref()).await {
                Ok(channel) => return Ok(channel),
                Err(e) if started.elapsed() >= FAILOVER_WAIT => return Err(e),
                Err(_) => {
                    if !said {
                        eprintln!(
                            "no coordinator of --coordinator leads now; asking again for up to {} s (a standby may be taking over)",
                            FAILOVER_WAIT.as_secs()
                        );
                        said = true;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// One round over --coordinator's URLs: the leader is the one whose health service says
    /// SERVING (standbys say not).
    async fn leader(&self, token: Option<&awq_auth::Secret>, tls: Option<&awq_auth::TlsConfig>) -> Result<Authed> {
        let mut tried = Vec::new();
        for url in &self.coordinator {
            let channel = match channel(url, token, tls).await {
                Ok(channel) => channel,
                Err(e) => {
                    tried.push(format!("{url}: {e:#}"));
                    continue;
                }
            };
            let check = tonic_health::pb::HealthCheckRequest { service: String::new() };
            let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
            match tonic_health::pb::health_client::HealthClient::new(channel.clone()).check(check).await {
                Ok(r) if r.get_ref().status == serving => return Ok(channel),
                Ok(_) => tried.push(format!("{url}: a standby")),
                Err(s) => tried.push(format!("{url}: {}", s.message())),
            }
        }
        bail!("no coordinator of --coordinator {} leads now: {}", self.coordinator.join(","), tried.join("; "))
    }
}

/// How long a client given several coordinators waits for one of them to lead: a standby takes
/// over within the leader's lease (5 s) and the time to read the state back.
pub const FAILOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// A channel to the coordinator at `url` (`https://`: TLS verified against `tls`'s CA, or the
/// system's roots) whose calls carry `token` (if any). A client and a coordinator that disagree on
/// TLS fail here, within seconds, saying which flag or URL to change.
pub async fn channel(url: &str, token: Option<&Secret>, tls: Option<&TlsConfig>) -> Result<Authed> {
    let endpoint =
        awq_auth::endpoint(url, tls).context("--coordinator")?.connect_timeout(Duration::from_secs(5));
    let channel = match endpoint.connect().await {
        Ok(channel) => channel,
        Err(e) => match awq_auth::explain("the coordinator", url, &e).await {
            Some(explained) => bail!("{explained}"),
            None => return Err(e).with_context(|| format!("cannot reach the coordinator at {url}")),
        },
    };
    if let Some(explained) = awq_auth::plaintext_to_tls("the coordinator", url).await {
        bail!("{explained}");
    }
    if let Some(explained) = awq_auth::client_certificate_missing("the coordinator", url, tls).await {
        bail!("{explained}");
    }
    Ok(Authed::new(channel, AttachToken::new(token)))
}

/// A client of the job API of the coordinator at `url`, sending `token` (if any).
pub async fn connect(url: &str, token: Option<&Secret>, tls: Option<&TlsConfig>) -> Result<JobServiceClient<Authed>> {
    Ok(JobServiceClient::new(channel(url, token, tls).await?).max_decoding_message_size(awq_proto::MAX_MESSAGE_BYTES))
}

/// Request fields as the command line spells them, for error messages.
const FLAG_NAMES: &[(&str, &str)] = &[
    ("options.group_size:", "--group-size:"),
    ("options.w_bit:", "--w-bit:"),
    ("options.quant_method:", "--method:"),
    ("options.engine_dtype:", "--engine-dtype:"),
    ("options.n_samples:", "--n-samples/--seqlen:"),
    ("options.calib_path:", "--calib:"),
    ("options.max_shard_bytes:", "--max-shard-size:"),
    ("output_path:", "output:"),
    ("model_path:", "model:"),
    ("(set overwrite to replace it)", "(pass --overwrite to replace it)"),
];

/// `message` with request fields named as the command-line flags that set them.
fn rename_fields(message: &str) -> String {
    FLAG_NAMES.iter().fold(message.to_string(), |m, (field, flag)| m.replacen(field, flag, 1))
}

/// A gRPC error as a user reads it: the coordinator's message, without transport noise, with
/// request fields named as the command-line flags that set them.
pub fn status_error(what: &str, s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::InvalidArgument => {
            anyhow::anyhow!("{what} rejected: {}", rename_fields(s.message()))
        }
        tonic::Code::NotFound => anyhow::anyhow!("{}", s.message()),
        tonic::Code::Unavailable => anyhow::anyhow!("{what}: the coordinator is unavailable: {}", s.message()),
        tonic::Code::Unauthenticated => anyhow::anyhow!(
            "{what}: the coordinator refused the token: set --token, --token-file or AWQ_TOKEN to its admin token ({})",
            s.message()
        ),
        _ => anyhow::anyhow!("{what}: {} ({:?})", s.message(), s.code()),
    }
}

pub fn state_name(state: i32) -> &'static str {
    match JobState::try_from(state).unwrap_or(JobState::Unspecified) {
        JobState::Unspecified => "unknown",
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Assembling => "assembling",
        JobState::Done => "done",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

pub fn is_terminal(state: i32) -> bool {
    [JobState::Done as i32, JobState::Failed as i32, JobState::Cancelled as i32].contains(&state)
}

pub fn job_json(job: &pb::Job) -> Value {
    let req = job.request.clone().unwrap_or_default();
    let o = job_options(job);
    json!({
        "id": job.id,
        "state": state_name(job.state),
        "model": req.model_path,
        "output": req.output_path,
        "model_type": job.model_type,
        "method": o.as_ref().map(|o| o.method.name()),
        "group_size": o.as_ref().map(|o| o.quant.group_size.get()),
        "zero_point": o.as_ref().map(|o| o.quant.zero_point),
        "engine_dtype": o.as_ref().map(|o| o.engine_dtype.name()),
        "n_blocks": job.n_blocks,
        "blocks_done": job.blocks_done,
        "error": job.error,
        "waiting_for_disk_space": job.waiting_for_disk_space,
        "created_unix_ms": job.created_unix_ms,
        "finished_unix_ms": job.finished_unix_ms,
        "stages": job.stages.iter().map(|s| json!({
            "index": s.index, "worker": s.worker_id, "block_start": s.block_start,
            "block_end": s.block_end, "blocks_done": s.blocks_done, "attempt": s.attempt,
        })).collect::<Vec<_>>(),
    })
}

pub fn job_line(job: &pb::Job) -> String {
    let req = job.request.clone().unwrap_or_default();
    let mut line = format!(
        "{}  {:<10} {}/{} blocks  {} -> {}",
        job.id,
        state_name(job.state),
        job.blocks_done,
        job.n_blocks,
        req.model_path,
        req.output_path
    );
    if !job.error.is_empty() {
        line.push_str(&format!("\n    error: {}", job.error));
    }
    if !job.waiting_for_disk_space.is_empty() {
        line.push_str(&format!("\n    waiting for disk space beside the output: {}", job.waiting_for_disk_space));
    }
    line
}

/// Follows a job to its end, with one progress bar per stage (hidden with `json`) and, with
/// `events`, a line per event. Returns the final job.
pub async fn watch(client: &mut JobServiceClient<Authed>, job_id: &str, json: bool, events: bool) -> Result<pb::Job> {
    let mut stream = client
        .watch_job(pb::WatchJobRequest { job_id: job_id.to_string() })
        .await
        .map_err(|s| status_error("watch", s))?
        .into_inner();
    let multi = if json { MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden()) } else { MultiProgress::new() };
    let style = ProgressStyle::with_template("{prefix:>24} [{bar:30}] {pos}/{len} blocks {msg}")
        .expect("template is valid")
        .progress_chars("=> ");
    let mut bars: BTreeMap<u32, ProgressBar> = BTreeMap::new();
    let mut last: Option<pb::Job> = None;
    while let Some(event) = stream.next().await {
        let event = event.map_err(|s| status_error("watch", s))?;
        let Some(job) = event.job else { continue };
        // A full disk needs the user, events or not: said when it starts and when it ends.
        let was_waiting = last.as_ref().is_some_and(|j| !j.waiting_for_disk_space.is_empty());
        if !json && !events && was_waiting != !job.waiting_for_disk_space.is_empty() {
            multi.suspend(|| match job.waiting_for_disk_space.as_str() {
                "" => eprintln!("{}: disk space available again", job.id),
                why => eprintln!("{}: waiting for disk space (free some beside the output; nothing is lost): {why}", job.id),
            });
        }
        for s in &job.stages {
            let bar = bars.entry(s.index).or_insert_with(|| {
                let bar = multi.add(ProgressBar::new((s.block_end - s.block_start) as u64));
                bar.set_style(style.clone());
                bar
            });
            bar.set_prefix(format!("stage {} blocks {}..{}", s.index, s.block_start, s.block_end));
            bar.set_position(s.blocks_done as u64);
            if s.worker_id.is_empty() && s.blocks_done < s.block_end - s.block_start {
                bar.set_message("(worker lost)");
            } else {
                bar.set_message(s.worker_id.clone());
            }
        }
        if events && !json && !event.message.is_empty() && event.message != "current state" {
            multi.suspend(|| eprintln!("{}: {}", job.id, event.message));
        }
        let terminal = is_terminal(job.state);
        last = Some(job);
        if terminal {
            break;
        }
    }
    for bar in bars.values() {
        bar.finish_and_clear();
    }
    last.ok_or_else(|| anyhow::anyhow!("the coordinator closed the watch of {job_id} without sending the job"))
}

#[derive(Args)]
pub struct SubmitArgs {
    /// Checkpoint directory to quantize (a path the coordinator and workers can read).
    pub model: PathBuf,
    /// Output directory for the AutoAWQ GEMM checkpoint.
    #[arg(short, long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub quant: QuantArgs,
    /// Serve the output once the job is done, as the deployment NAME (as `awq deploy OUTPUT
    /// --name NAME` would; the deployment flags below apply).
    #[arg(long, value_name = "NAME")]
    pub deploy: Option<String>,
    #[command(flatten)]
    pub deployment: super::deploy::DeploymentFlags,
    /// Follow the job until it ends (like `awq watch`).
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args)]
pub struct JobArgs {
    /// Job id (as `awq submit` and `awq jobs` print it).
    pub job: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub async fn submit(args: SubmitArgs) -> Result<()> {
    let mut request = args.quant.request(&args.quant.options()?, &args.model, &args.output)?;
    request.deploy = match &args.deploy {
        Some(name) => Some(args.deployment.spec(name.clone(), String::new())),
        None if args.deployment.is_default() => None,
        None => bail!("the deployment flags (--tp, --replicas, ...) need --deploy NAME"),
    };
    let mut client = args.client.jobs().await?;
    let job = client.submit(request).await.map_err(|s| status_error("submit", s))?.into_inner().job.context("no job in the reply")?;
    if !args.wait {
        if args.client.json {
            out!("{}", job_json(&job));
        } else {
            out!("{}", job.id);
        }
        return Ok(());
    }
    if !args.client.json {
        eprintln!("submitted {}", job.id);
    }
    finish(&mut client, &job.id, args.client.json).await
}

/// Watches a job to its end and reports it; fails when the job did not finish.
async fn finish(client: &mut JobServiceClient<Authed>, job_id: &str, json: bool) -> Result<()> {
    let job = watch(client, job_id, json, true).await?;
    if json {
        out!("{}", job_json(&job));
    } else {
        out!("{}", job_line(&job));
    }
    if job.state != JobState::Done as i32 {
        bail!("job {} {}", job.id, state_name(job.state));
    }
    Ok(())
}

pub async fn status(args: JobArgs) -> Result<()> {
    let mut client = args.client.jobs().await?;
    let job = client.get_job(pb::GetJobRequest { job_id: args.job }).await.map_err(|s| status_error("status", s))?.into_inner();
    if args.client.json {
        out!("{}", job_json(&job));
    } else {
        out!("{}", job_line(&job));
        for s in &job.stages {
            let worker = if s.worker_id.is_empty() { "-" } else { &s.worker_id };
            out!("    stage {} (attempt {}): blocks {}..{} on {worker}, {} done", s.index, s.attempt, s.block_start, s.block_end, s.blocks_done);
        }
    }
    Ok(())
}

pub async fn watch_cmd(args: JobArgs) -> Result<()> {
    let mut client = args.client.jobs().await?;
    finish(&mut client, &args.job, args.client.json).await
}

pub async fn cancel(args: JobArgs) -> Result<()> {
    let mut client = args.client.jobs().await?;
    let job = client.cancel_job(pb::CancelJobRequest { job_id: args.job }).await.map_err(|s| status_error("cancel", s))?.into_inner();
    if args.client.json {
        out!("{}", job_json(&job));
    } else {
        out!("{}", job_line(&job));
    }
    Ok(())
}

pub async fn jobs(args: ClientArgs) -> Result<()> {
    let mut client = args.jobs().await?;
    let jobs = client.list_jobs(pb::ListJobsRequest {}).await.map_err(|s| status_error("jobs", s))?.into_inner().jobs;
    if args.json {
        out!("{}", Value::Array(jobs.iter().map(job_json).collect()));
    } else if jobs.is_empty() {
        out!("no jobs");
    } else {
        jobs.iter().for_each(|j| out!("{}", job_line(j)));
    }
    Ok(())
}

/// A worker's device as `--device` spells it (`?` for one this build cannot read).
fn device_name(w: &pb::WorkerInfo) -> String {
    device_from_wire(w.compute_device.as_ref(), "compute_device").map_or_else(|_| "?".into(), |d| d.to_string())
}

pub async fn workers(args: ClientArgs) -> Result<()> {
    let mut client = args.jobs().await?;
    let workers = client.list_workers(pb::ListWorkersRequest {}).await.map_err(|s| status_error("workers", s))?.into_inner().workers;
    if args.json {
        let list: Vec<Value> = workers
            .iter()
            .map(|w| json!({"id": w.worker_id, "name": w.name, "device": device_name(w), "gpu_model": w.gpu_model,
                           "memory_bytes": w.memory_bytes, "stage_address": w.stage_address, "busy_with_job": w.busy_with_job}))
            .collect();
        out!("{}", Value::Array(list));
    } else if workers.is_empty() {
        out!("no workers");
    } else {
        for w in &workers {
            let busy = if w.busy_with_job.is_empty() { "idle".to_string() } else { format!("busy with {}", w.busy_with_job) };
            out!("{}  {}  {:.1} GiB  {}  {busy}", w.worker_id, device_name(w), w.memory_bytes as f64 / (1u64 << 30) as f64, w.stage_address);
        }
    }
    Ok(())
}
