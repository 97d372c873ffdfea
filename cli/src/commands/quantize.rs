//! `awq quantize MODEL -o OUT`: the whole cluster in this process.
//!
//! An embedded coordinator (in-memory store) and one worker per local device (one CPU worker on a
//! machine without GPUs) talk over loopback gRPC exactly as a real cluster does, so a job gives
//! the same bytes here as on a cluster of any size.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use awq_coordinator::store::MemoryStore;
use awq_coordinator::{Coordinator, CoordinatorConfig};
use awq_worker::node::{available_memory_bytes, run_worker, WorkerConfig};
use clap::Args;
use serde_json::{json, Value};

use super::jobs::{connect, job_json, state_name, status_error, watch, QuantArgs};

#[derive(Args)]
pub struct QuantizeArgs {
    /// Checkpoint directory to quantize (config.json, *.safetensors, tokenizer.json).
    pub model: PathBuf,
    /// Output directory for the AutoAWQ GEMM checkpoint; written beside it first and renamed when
    /// complete.
    #[arg(short, long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub quant: QuantArgs,
    /// Device the local worker computes on: `cpu` or `cuda:N` (a build with the `cuda` feature).
    /// The output is the same on either, up to the rounding of GPU arithmetic.
    #[arg(long, default_value = "cpu")]
    pub device: awq_kernels::Device,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: QuantizeArgs) -> Result<()> {
    let start = Instant::now();
    args.device.check_available()?;
    let request = args.quant.request(&args.model, &args.output)?;
    let output = PathBuf::from(&request.output_path);

    let coordinator = Coordinator::start(Arc::new(MemoryStore::default()), CoordinatorConfig::default()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("cannot open a loopback port")?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.changed().await;
    };
    let server = tokio::spawn(coordinator.serve(listener, stopped(stop_rx.clone())));
    let worker_config = WorkerConfig {
        coordinator: url.clone(),
        name: "local".into(),
        device: args.device.to_string(),
        memory_bytes: available_memory_bytes(),
        stage_listen: "127.0.0.1:0".parse().expect("a valid address"),
        stage_advertise: None,
    };
    let worker = tokio::spawn(run_worker(worker_config, stopped(stop_rx)));

    let result = async {
        let mut client = connect(&url).await?;
        let job = client.submit(request).await.map_err(|s| status_error("quantize", s))?.into_inner().job.context("no job in the reply")?;
        if !args.json {
            let o = job.request.as_ref().and_then(|r| r.options.clone()).unwrap_or_default();
            eprintln!(
                "quantizing {} ({} blocks, {}) with {}, w{} g{} {}",
                args.model.display(),
                job.n_blocks,
                job.model_type,
                o.method.to_uppercase(),
                o.w_bit,
                o.group_size,
                if o.zero_point { "asymmetric" } else { "symmetric" }
            );
        }
        watch(&mut client, &job.id, args.json, false).await
    }
    .await;
    let _ = stop_tx.send(true);
    let _ = worker.await;
    let _ = server.await;
    let job = result?;
    if job.state != awq_proto::v1::JobState::Done as i32 {
        anyhow::bail!("quantization {}: {}", state_name(job.state), job.error);
    }
    let seconds = start.elapsed().as_secs_f64();
    let method = job.request.as_ref().and_then(|r| r.options.as_ref()).map_or("awq".to_string(), |o| o.method.clone());
    let report_path = output.join(format!("{method}_report.json"));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report_path).with_context(|| format!("cannot read {}", report_path.display()))?)?;
    if args.json {
        out!("{}", json!({"job": job_json(&job), "output": output, "seconds": seconds, "report": report}));
        return Ok(());
    }
    if let Some(c) = report.get("calibration").filter(|c| !c.is_null()) {
        out!(
            "calibration: {} rows x {} tokens from {} texts ({} longer than {} tokens skipped)",
            c["rows"], c["seqlen"], c["samples_used"], c["samples_too_long"], c["seqlen"]
        );
    }
    out!("wrote {} in {:.1} s", output.display(), seconds);
    if method == "awq" {
        let per_block: Vec<f64> = report["blocks"]
            .as_array()
            .map(|blocks| {
                blocks
                    .iter()
                    .map(|b| {
                        let cuts: Vec<f64> = b["groups"]
                            .as_array()
                            .map(|gs| {
                                gs.iter()
                                    .filter_map(|g| Some(1.0 - g["loss_best"].as_f64()? / g["loss_ratio0"].as_f64()?.max(f64::MIN_POSITIVE)))
                                    .collect()
                            })
                            .unwrap_or_default();
                        cuts.iter().sum::<f64>() / cuts.len().max(1) as f64
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mean = per_block.iter().sum::<f64>() / per_block.len().max(1) as f64;
        let list: Vec<String> = per_block.iter().map(|r| format!("{:.0}", 100.0 * r)).collect();
        out!("scale search cut the quantization loss by {:.1}% on average; per block (%): {}", 100.0 * mean, list.join(" "));
    }
    Ok(())
}
