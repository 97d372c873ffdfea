//! `awq serve MODEL`: the OpenAI-compatible HTTP API (`awq_gateway`) in front of one replica's engine
//! (`awq_serve::engine::EngineHandle`), in this process.
//!
//! Order: bind the address first (a port in use fails at once, and /health answers 503 while the
//! weights load), load the engine on a thread of its own, mark the gateway ready, serve. Ctrl-C or
//! SIGTERM: stop accepting, let running requests finish for `--shutdown-timeout` seconds, exit (what
//! is still running then is aborted). An engine that fails to load ends the command with its error.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use awq_gateway::{Gateway, GatewayConfig};
use awq_kernels::Device;
use awq_serve::engine::{EngineConfig, EngineHandle};
use clap::Args;

#[derive(Args)]
#[command(after_help = "\
Examples:
  awq serve ./SmolLM2-135M-AWQ                         # CPU, http://127.0.0.1:8000/v1
  awq serve ./Llama-3-8B-AWQ --device cuda:0 --listen 0.0.0.0:8000 --served-model-name llama3
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
    /// Devices to run on: `cpu`, or `cuda:0,cuda:1,...` (one tensor-parallel rank per GPU).
    #[arg(long = "device", value_name = "DEVICE", value_delimiter = ',', default_value = "cpu")]
    pub devices: Vec<Device>,
    /// Tensor-parallel ranks (vLLM's --tensor-parallel-size); default: one per device. On the CPU,
    /// N ranks on threads.
    #[arg(long, visible_alias = "tensor-parallel-size", value_name = "N")]
    pub tp: Option<usize>,
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
    /// Require `Authorization: Bearer KEY` on /v1/*, /tokenize and /detokenize.
    #[arg(long, value_name = "KEY", env = "AWQ_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
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
    /// Seconds that running requests may take to finish after Ctrl-C or SIGTERM.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub shutdown_timeout: u64,
}

impl ServeArgs {
    fn engine_config(&self) -> Result<EngineConfig> {
        if self.devices.is_empty() {
            bail!("--device: no device given");
        }
        if !(self.gpu_memory_utilization > 0.0 && self.gpu_memory_utilization <= 1.0) {
            bail!("--gpu-memory-utilization must be in (0, 1], got {}", self.gpu_memory_utilization);
        }
        let on_cpu = self.devices == [Device::Cpu];
        Ok(EngineConfig {
            model: self.model.clone(),
            served_model_name: self.served_model_name.clone(),
            devices: self.devices.clone(),
            tp: self.tp.unwrap_or(if on_cpu { 1 } else { self.devices.len() }),
            max_model_len: self.max_model_len,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            block_size: self.block_size,
            gpu_memory_utilization: self.gpu_memory_utilization,
            kv_cache_bytes: self.kv_cache_bytes,
            max_waiting: self.max_waiting,
            enforce_eager: self.enforce_eager,
        })
    }
}

pub async fn run(args: ServeArgs) -> Result<()> {
    let config = args.engine_config()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}: cannot bind", args.listen))?;
    let addr = listener.local_addr()?;
    let gateway = Gateway::new(GatewayConfig { api_key: args.api_key.clone(), ..Default::default() });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let app = gateway.router();
    let mut server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            })
            .await
    });
    tracing::info!("listening on http://{addr} (/health answers 503 until {} is loaded)", args.model.display());

    // The engine loads on a thread of its own (not the runtime's blocking pool, which a Ctrl-C during
    // the load would have to wait for).
    let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name("awq-load".into()).spawn(move || {
        let _ = loaded_tx.send(EngineHandle::start(config));
    })?;
    let mut signal = std::pin::pin!(shutdown_signal());
    tokio::select! {
        loaded = loaded_rx => match loaded.context("the loading thread died")? {
            Ok(engine) => {
                let name = engine.model().name.clone();
                gateway.set_ready(Arc::new(engine));
                tracing::info!("ready: serving `{name}` on http://{addr}/v1");
            }
            Err(e) => {
                let _ = stop_tx.send(());
                return Err(e).with_context(|| format!("cannot load {}", args.model.display()));
            }
        },
        _ = &mut signal => {
            tracing::info!("stopped while loading");
            return Ok(());
        }
        result = &mut server => return server_ended(result),
    }
    tokio::select! {
        _ = &mut signal => {}
        result = &mut server => return server_ended(result),
    }
    let grace = Duration::from_secs(args.shutdown_timeout);
    tracing::info!("shutting down: no new connections; running requests have {} s to finish", grace.as_secs());
    let _ = stop_tx.send(());
    match tokio::time::timeout(grace, &mut server).await {
        Ok(result) => server_ended(result),
        Err(_) => {
            tracing::warn!("requests still running after {} s are aborted", grace.as_secs());
            server.abort();
            Ok(())
        }
    }
}

fn server_ended(result: Result<std::io::Result<()>, tokio::task::JoinError>) -> Result<()> {
    result.context("the HTTP server panicked")?.context("the HTTP server failed")
}

/// Ctrl-C, or SIGTERM (what Kubernetes and systemd send).
async fn shutdown_signal() {
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
