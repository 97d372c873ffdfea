//! `awq quantize MODEL -o OUT`: the whole cluster in this process.
//!
//! An embedded coordinator (in-memory store) and one worker per `--device` (one CPU worker by
//! default) talk over loopback gRPC exactly as a real cluster does, so a job gives the same bytes
//! here as on a cluster of any size. With several GPUs, the job is cut into one pipeline stage per
//! GPU and the stages pass their activations over NCCL (the workers share this process, each
//! stage on its own thread and device). The job is submitted once every local worker has joined:
//! a plan covers the workers that are idle when it is made.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use awq_job::Method;
use awq_kernels::Device;
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
    /// Devices to compute on, one local worker each: `cpu`, `cuda:N` (a build with the `cuda`
    /// feature), or several GPUs as `cuda:0,cuda:1` (or the flag repeated): the job is then cut
    /// into one pipeline stage per GPU, and the stages pass activations over NCCL. The output is
    /// the same on any number of GPUs, and on the CPU up to the rounding of GPU arithmetic.
    #[arg(long = "device", value_name = "DEVICE", value_delimiter = ',', default_value = "cpu")]
    pub devices: Vec<Device>,
    /// Bytes of block weights a stage may keep on its GPU (default: 40% of its free memory, or
    /// none on the CPU); lower it to leave room for other work. Never changes the output.
    #[arg(long, env = "AWQ_RESIDENT_BYTES", value_name = "BYTES")]
    pub resident_bytes: Option<u64>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// How long the local workers may take to join the embedded coordinator.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The devices of `--device`, each usable and named once (two workers on one device would only
/// share it: NCCL refuses two ranks on one GPU, and the CPU engine already uses every core).
fn local_devices(devices: &[Device]) -> Result<Vec<Device>> {
    if devices.is_empty() {
        bail!("--device: no device given");
    }
    let mut seen = BTreeSet::new();
    for &device in devices {
        if !seen.insert(device.to_string()) {
            bail!("--device: {device} is given twice (one worker per device)");
        }
    }
    // Checked in parallel: opening a GPU (driver, context) takes a few hundred milliseconds.
    std::thread::scope(|scope| {
        let checks: Vec<_> = devices.iter().map(|&device| scope.spawn(move || device.check_available())).collect();
        for (device, check) in devices.iter().zip(checks) {
            check.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)).with_context(|| format!("--device {device}"))?;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(devices.to_vec())
}

/// The local worker's name: `local` alone, `local-cuda0` (...) beside others.
fn worker_name(device: Device, n_devices: usize) -> String {
    if n_devices == 1 {
        return "local".into();
    }
    format!("local-{}", device.to_string().replace(':', ""))
}

pub async fn run(args: QuantizeArgs) -> Result<()> {
    let start = Instant::now();
    let devices = local_devices(&args.devices)?;
    let options = args.quant.options()?;
    let request = args.quant.request(&options, &args.model, &args.output)?;
    let output = PathBuf::from(&request.output_path);

    let coordinator = Coordinator::start(Arc::new(MemoryStore::default()), CoordinatorConfig::default()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("cannot open a loopback port")?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.changed().await;
    };
    let server = tokio::spawn(coordinator.serve(listener, stopped(stop_rx.clone())));
    let mut workers: Vec<_> = devices
        .iter()
        .map(|&device| {
            let config = WorkerConfig {
                coordinator: url.clone(),
                name: worker_name(device, devices.len()),
                device,
                memory_bytes: available_memory_bytes(),
                resident_bytes: args.resident_bytes,
                inject_fault_at_block: None,
                stage_listen: "127.0.0.1:0".parse().expect("a valid address"),
                stage_advertise: None,
            };
            tokio::spawn(run_worker(config, stopped(stop_rx.clone())))
        })
        .collect();

    let result = async {
        let mut client = connect(&url).await?;
        wait_for_workers(&mut client, &mut workers).await?;
        tracing::debug!("devices checked and {} local worker(s) joined {:.2} s after the start", workers.len(), start.elapsed().as_secs_f64());
        let job = client.submit(request).await.map_err(|s| status_error("quantize", s))?.into_inner().job.context("no job in the reply")?;
        if !args.json {
            eprintln!(
                "quantizing {} ({} blocks, {}) with {}, w{} g{} {}",
                args.model.display(),
                job.n_blocks,
                job.model_type,
                options.method.name().to_uppercase(),
                options.quant.bits,
                options.quant.group_size,
                if options.quant.zero_point { "asymmetric" } else { "symmetric" }
            );
        }
        watch(&mut client, &job.id, args.json, false).await
    }
    .await;
    let _ = stop_tx.send(true);
    for worker in workers {
        let _ = worker.await;
    }
    let _ = server.await;
    let job = result?;
    if job.state != awq_proto::v1::JobState::Done as i32 {
        anyhow::bail!("quantization {}: {}", state_name(job.state), job.error);
    }
    let seconds = start.elapsed().as_secs_f64();
    let report_path = output.join(options.method.report_file_name());
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
    if options.method == Method::Awq {
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

/// Waits until every local worker has joined the embedded coordinator (a worker that ended
/// before, or a join that takes longer than [`JOIN_TIMEOUT`], is an error).
async fn wait_for_workers(
    client: &mut awq_proto::v1::job_service_client::JobServiceClient<tonic::transport::Channel>,
    workers: &mut [tokio::task::JoinHandle<awq_worker::Result<()>>],
) -> Result<()> {
    let start = Instant::now();
    loop {
        let joined = client
            .list_workers(awq_proto::v1::ListWorkersRequest {})
            .await
            .map_err(|s| status_error("quantize", s))?
            .into_inner()
            .workers
            .len();
        if joined >= workers.len() {
            return Ok(());
        }
        if let Some(worker) = workers.iter_mut().find(|w| w.is_finished()) {
            match worker.await {
                Ok(Err(e)) => bail!("a local worker stopped before it joined: {e}"),
                Ok(Ok(())) => bail!("a local worker stopped before it joined"),
                Err(e) => bail!("a local worker panicked before it joined: {e}"),
            }
        }
        if start.elapsed() > JOIN_TIMEOUT {
            bail!("{joined} of {} local workers joined within {JOIN_TIMEOUT:?}", workers.len());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
