//! `awq serve MODEL`: the OpenAI-compatible HTTP API (`awq_gateway`) in front of one replica, in
//! this process, through the same path as a cluster's: an embedded coordinator and a local worker
//! (`local`, as `awq quantize` runs), the model deployed on them (one replica of `--tp` ranks), and
//! the gateway finding the replica as the coordinator's does (`ClusterModels`, over loopback gRPC).
//!
//! Order: bind the address first (a port in use fails at once, and /health answers 503 while the
//! weights load), start the local cluster, deploy, wait for the replica, serve. Ctrl-C or SIGTERM:
//! drain (the port stays open; new requests and /health get 503, OpenAI's error JSON, while the
//! running requests finish, for `--shutdown-timeout` seconds at most), stop the server and the
//! worker (what is still running then is aborted), exit. A model the coordinator refuses, or a replica
//! that fails to load, ends the command with its error.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use awq_gateway::cluster::ClusterModels;
use awq_gateway::{Gateway, GatewayConfig, Models};
use awq_kernels::Device;
use awq_proto::v1 as pb;
use clap::Args;

use super::cluster::Directory;
use super::deploy::{connect as deployment_client, default_name};
use super::jobs::status_error;
use super::local::LocalCluster;

#[derive(Args)]
#[command(after_help = "\
Examples:
  awq serve ./SmolLM2-135M-AWQ                         # CPU, http://127.0.0.1:8000/v1
  awq serve ./Llama-3-8B-AWQ --device cuda:0 --listen 0.0.0.0:8000 --served-model-name llama3
  awq serve ./Llama-3-70B-AWQ --device cuda:0,cuda:1 --tp 2   # tensor-parallel over 2 GPUs (NCCL)
  awq serve ./Llama-3-70B-AWQ --device cuda:0,cuda:1   # a pipeline stage per GPU (--pp 2)
  AWQ_API_KEY=secret awq serve ./model                 # clients send Authorization: Bearer secret

Then, as with vLLM:
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{\"prompt\": \"The capital of France is\", \"max_tokens\": 8, \"temperature\": 0}'
  python -c 'from openai import OpenAI; c = OpenAI(base_url=\"http://127.0.0.1:8000/v1\", api_key=\"none\"); \\
             print(c.models.list().data[0].id)'

Endpoints: POST /v1/completions, POST /v1/chat/completions (stream: true for SSE), GET /v1/models,
GET /health (200 once the model is loaded), GET /metrics (Prometheus, awq:*), POST /tokenize,
POST /detokenize.")]
pub struct ServeArgs {
    /// The model: a Hugging Face checkpoint directory (AutoAWQ GEMM, fp16, bf16 or fp32) with
    /// config.json, *.safetensors, tokenizer.json and, for chat, tokenizer_config.json's chat_template.
    pub model: PathBuf,
    /// Devices to run on: `cpu`, `cuda:N`, or `cuda:0,cuda:1,...` (split into --pp stages of --tp
    /// GPUs each).
    #[arg(long = "device", value_name = "DEVICE", value_delimiter = ',', default_value = "cpu")]
    pub devices: Vec<Device>,
    /// Tensor-parallel ranks (vLLM's --tensor-parallel-size) of each stage: on the CPU, N ranks on
    /// threads; on GPUs, one rank per GPU, N consecutive GPUs of --device per stage, their partial
    /// sums joined by NCCL all-reduces. Default 1.
    #[arg(long, visible_alias = "tensor-parallel-size", value_name = "N")]
    pub tp: Option<usize>,
    /// Pipeline stages (vLLM's --pipeline-parallel-size): the model's blocks cut into N contiguous
    /// ranges, one local worker each: --tp GPUs of --device each (N x --tp = their count), or N
    /// workers sharing the CPU. Default: 1 on the CPU, the GPUs given over --tp.
    #[arg(long, visible_alias = "pipeline-parallel-size", value_name = "N")]
    pub pp: Option<usize>,
    /// Address to listen on; 0.0.0.0:PORT to accept other machines.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// The model name clients send (`"model": NAME`) and /v1/models lists; default: MODEL as given.
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// Prompt plus generated tokens per request, at most; default: config.json's
    /// max_position_embeddings. Longer prompts are refused with 400.
    #[arg(long, value_name = "N")]
    pub max_model_len: Option<usize>,
    /// The share of each GPU's memory the engine may take (weights, activations, KV cache).
    #[arg(long, value_name = "F", default_value_t = 0.9)]
    pub gpu_memory_utilization: f32,
    #[command(flatten)]
    pub api_keys: super::auth::ApiKeyArgs,
    #[command(flatten)]
    pub tls: super::auth::HttpsArgs,
    /// Requests in the running batch, at most.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Tokens computed per engine step (chunked prefill's budget); default: the larger of
    /// --max-num-seqs and 2048 on the CPU, 8192 on a GPU.
    #[arg(long, value_name = "N")]
    pub max_num_batched_tokens: Option<usize>,
    /// Requests waiting for a place in the batch, at most; beyond, requests get 429 with Retry-After.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_waiting: usize,
    /// Tokens per KV-cache block.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub block_size: usize,
    /// The KV cache's size in bytes (default on the CPU: 1 GiB; on GPUs: what
    /// --gpu-memory-utilization leaves).
    #[arg(long, value_name = "BYTES")]
    pub kv_cache_bytes: Option<u64>,
    /// Run every kernel of every step one by one (GPUs); by default decode steps are recorded as
    /// CUDA graphs per batch size and replayed, which removes most of their launch overhead.
    #[arg(long)]
    pub enforce_eager: bool,
    /// Seconds that running requests may take to finish after Ctrl-C or SIGTERM (meanwhile new
    /// requests and /health get 503).
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub shutdown_timeout: u64,
}

impl ServeArgs {
    /// The local workers' devices, one worker per pipeline stage: the CPU (`--pp` workers share
    /// it), or `--tp` consecutive GPUs of `--device` each.
    fn stage_devices(&self) -> Result<Vec<Vec<Device>>> {
        let devices = super::local::local_devices(&self.devices)?;
        let tp = self.tp.unwrap_or(1);
        if tp == 0 {
            bail!("--tp must be at least 1");
        }
        let names = || devices.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",");
        match devices.as_slice() {
            [Device::Cpu] => match self.pp.unwrap_or(1) {
                0 => bail!("--pp must be at least 1"),
                pp => Ok(vec![vec![Device::Cpu]; pp]),
            },
            gpus if gpus.contains(&Device::Cpu) => bail!("--device {}: the CPU or GPUs, not both", names()),
            gpus => {
                let pp = self.pp.unwrap_or(gpus.len() / tp);
                if pp == 0 || pp * tp != gpus.len() {
                    bail!(
                        "--device {} with --tp {tp} --pp {}: {} GPUs given, and each of the --pp stages takes --tp \
                         GPUs (one per rank), so --tp x --pp must be {}",
                        names(),
                        self.pp.map_or("(default)".to_string(), |p| p.to_string()),
                        gpus.len(),
                        gpus.len()
                    );
                }
                Ok(gpus.chunks(tp).map(<[Device]>::to_vec).collect())
            }
        }
    }

    /// The deployment `awq serve` makes on its local cluster of `stages` workers: one replica of
    /// `--tp` ranks per stage, named after the model's directory, served as `--served-model-name`.
    fn deployment(&self, stages: &[Vec<Device>]) -> Result<pb::DeploymentSpec> {
        let tp = self.tp.unwrap_or(1);
        if !(self.gpu_memory_utilization > 0.0 && self.gpu_memory_utilization <= 1.0) {
            bail!("--gpu-memory-utilization must be in (0, 1], got {}", self.gpu_memory_utilization);
        }
        let n = |flag: &str, v: usize| u32::try_from(v).with_context(|| format!("--{flag} {v} is too large"));
        let engine = pb::EngineOptions {
            max_model_len: self.max_model_len.map(|v| n("max-model-len", v)).transpose()?.unwrap_or(0),
            max_num_seqs: n("max-num-seqs", self.max_num_seqs)?,
            max_num_batched_tokens: self
                .max_num_batched_tokens
                .map(|v| n("max-num-batched-tokens", v))
                .transpose()?
                .unwrap_or(0),
            block_size: n("block-size", self.block_size)?,
            gpu_memory_utilization: self.gpu_memory_utilization,
            kv_cache_bytes: self.kv_cache_bytes.unwrap_or(0),
            max_waiting: n("max-waiting", self.max_waiting)?,
            enforce_eager: self.enforce_eager,
        };
        // Zero means "the engine's default" on the wire: a zero given here is refused instead.
        for (flag, v) in [("max-num-seqs", self.max_num_seqs), ("block-size", self.block_size)] {
            if v == 0 {
                bail!("--{flag} must be at least 1");
            }
        }
        let model = std::path::absolute(&self.model).with_context(|| format!("{}", self.model.display()))?;
        let name = match default_name(&model) {
            name if name.is_empty() => "model".to_string(),
            name => name,
        };
        // vLLM's default: the model as given.
        let served = self.served_model_name.clone().unwrap_or_else(|| self.model.display().to_string());
        awq_job::deployment::check_served_model_name(&served)
            .map_err(|e| anyhow::anyhow!("--served-model-name: {}", e.detail))?;
        Ok(pb::DeploymentSpec {
            name,
            model_path: model.to_string_lossy().into_owned(),
            tp: tp as u32,
            pp: stages.len() as u32,
            replicas: 1,
            engine: Some(engine),
            served_model_name: served,
        })
    }
}

pub async fn run(args: ServeArgs) -> Result<()> {
    let api_keys = args.api_keys.keys()?;
    let tls = args.tls.config()?;
    let stages = args.stage_devices()?;
    let spec = args.deployment(&stages)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}: cannot bind", args.listen))?;
    let addr = listener.local_addr()?;
    let cluster = LocalCluster::start(&stages, None).await?;
    let models = ClusterModels::start(Directory(cluster.coordinator.clone()), None, None);
    let gateway = Gateway::with_models(GatewayConfig { api_keys, ..Default::default() }, models.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        let _ = stop_rx.await;
    };
    let (scheme, mut server) = spawn_http(listener, tls.as_ref(), gateway.router(), stop)?;
    tracing::info!("listening on {scheme}://{addr} (/health answers 503 until {} is loaded)", args.model.display());

    let mut signal = std::pin::pin!(shutdown_signal());
    let served = spec.served_model_name.clone();
    let loaded = tokio::select! {
        loaded = deploy_and_wait(&cluster.url, spec) => loaded,
        _ = &mut signal => {
            tracing::info!("stopped while loading");
            let _ = stop_tx.send(());
            cluster.stop().await;
            return Ok(());
        }
        result = &mut server => {
            cluster.stop().await;
            return server_ended(result);
        }
    };
    if let Err(e) = loaded {
        let _ = stop_tx.send(());
        cluster.stop().await;
        return Err(e).with_context(|| format!("cannot serve {}", args.model.display()));
    }
    // Connected now rather than at the gateway's next refresh: /health answers 200 from here on.
    if let Err(e) = models.pick(&served).await {
        tracing::warn!("the replica is ready but the gateway cannot reach it yet: {}", e.message);
    }
    tracing::info!("ready: serving `{served}` on http://{addr}/v1");
    let ended = tokio::select! {
        _ = &mut signal => None,
        result = &mut server => Some(result),
    };
    if let Some(result) = ended {
        cluster.stop().await;
        return server_ended(result);
    }
    // The drain: the port stays open, new requests (and /health) get 503 while the running ones
    // finish; then the server stops, closing the idle connections, and the worker goes.
    let grace = Duration::from_secs(args.shutdown_timeout);
    let deadline = tokio::time::Instant::now() + grace;
    gateway.start_draining();
    tracing::info!(
        "shutting down: new requests get 503; {} running have {} s to finish",
        gateway.in_flight(),
        grace.as_secs()
    );
    let drained = tokio::time::timeout_at(deadline, gateway.drained()).await.is_ok();
    let result = match drained {
        true => {
            tracing::info!("every running request finished: stopping");
            let _ = stop_tx.send(());
            // Only idle connections are left: closing them takes moments; bounded all the same.
            let closing = deadline.max(tokio::time::Instant::now() + Duration::from_secs(5));
            match tokio::time::timeout_at(closing, &mut server).await {
                Ok(result) => server_ended(result),
                Err(_) => {
                    server.abort();
                    Ok(())
                }
            }
        }
        false => {
            tracing::warn!("{} requests still running after {} s are aborted", gateway.in_flight(), grace.as_secs());
            server.abort();
            Ok(())
        }
    };
    cluster.stop().await;
    result
}

/// Deploys `spec` on the local cluster and waits until its replica is ready. Errors: the
/// coordinator's refusal (a model that is not a checkpoint, options out of range), or the
/// replica's failure to load, with the worker's reason.
async fn deploy_and_wait(url: &str, spec: pb::DeploymentSpec) -> Result<()> {
    let name = spec.name.clone();
    let mut client = deployment_client(url, None, None).await?;
    let mut d = client.deploy(spec).await.map_err(|s| status_error("serve", s))?.into_inner();
    loop {
        let replica = d.replicas.first().context("the deployment has no replica")?;
        match pb::ReplicaState::try_from(replica.state) {
            Ok(pb::ReplicaState::Ready) => return Ok(()),
            Ok(pb::ReplicaState::Failed) => bail!("{}", replica.error),
            // One worker here: a placement lost for another reason will not find another one.
            _ if !replica.error.is_empty() => bail!("{}", replica.error),
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let request = pb::GetDeploymentRequest { name: name.clone() };
        d = client.get_deployment(request).await.map_err(|s| status_error("serve", s))?.into_inner();
    }
}

/// Serves `router` on `listener` until `stop`: HTTPS when `tls` holds a certificate (the API
/// keys then travel encrypted), plain HTTP otherwise; with the URL scheme it speaks. TCP_NODELAY
/// on every connection and the client's address for the logs (`awq_gateway::listener`).
pub(crate) fn spawn_http(
    listener: tokio::net::TcpListener,
    tls: Option<&awq_auth::TlsConfig>,
    router: axum::Router,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(&'static str, tokio::task::JoinHandle<std::io::Result<()>>)> {
    use awq_gateway::listener::{self, PeerAddr};
    let app = router.into_make_service_with_connect_info::<PeerAddr>();
    Ok(match tls.and_then(awq_auth::TlsConfig::https_acceptor) {
        Some(acceptor) => {
            let listener = listener::https(listener, acceptor)?;
            ("https", tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(stop).await }))
        }
        None => {
            let listener = listener::plain(listener);
            ("http", tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(stop).await }))
        }
    })
}

fn server_ended(result: Result<std::io::Result<()>, tokio::task::JoinError>) -> Result<()> {
    result.context("the HTTP server panicked")?.context("the HTTP server failed")
}

/// Ctrl-C, or SIGTERM (what Kubernetes and systemd send).
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
