//! `awq quantize MODEL -o OUT`: the whole cluster in this process.
//!
//! An embedded coordinator and one worker per `--device` (one CPU worker by default; `local`)
//! talk over loopback gRPC exactly as a real cluster does, so a job gives the same bytes here as
//! on a cluster of any size. With several GPUs, the job is cut into one pipeline stage per
//! GPU and the stages pass their activations over NCCL (the workers share this process, each
//! stage on its own thread and device). The job is submitted once every local worker has joined:
//! a plan covers the workers that are idle when it is made.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use awq_job::Method;
use awq_kernels::Device;
use clap::Args;
use serde_json::{json, Value};

use super::jobs::{connect, job_json, state_name, status_error, watch, QuantArgs};
use super::local::LocalCluster;

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

pub async fn run(args: QuantizeArgs) -> Result<()> {
    let start = Instant::now();
    let options = args.quant.options()?;
    let request = args.quant.request(&options, &args.model, &args.output)?;
    let output = PathBuf::from(&request.output_path);

    let devices = super::local::local_devices(&args.devices)?;
    let workers: Vec<Vec<Device>> = devices.iter().map(|&d| vec![d]).collect();
    let cluster = LocalCluster::start(&workers, args.resident_bytes).await?;
    let result = async {
        let mut client = connect(&cluster.url, None, None).await?;
        let job = client
            .submit(request)
            .await
            .map_err(|s| status_error("quantize", s))?
            .into_inner()
            .job
            .context("no job in the reply")?;
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
    cluster.stop().await;
    let job = result?;
    if job.state != awq_proto::v1::JobState::Done as i32 {
        anyhow::bail!("quantization {}: {}", state_name(job.state), job.error);
    }
    let seconds = start.elapsed().as_secs_f64();
    let report_path = output.join(options.method.report_file_name());
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(&report_path).with_context(|| format!("cannot read {}", report_path.display()))?,
    )?;
    if args.json {
        out!("{}", json!({"job": job_json(&job), "output": output, "seconds": seconds, "report": report}));
        return Ok(());
    }
    if let Some(c) = report.get("calibration").filter(|c| !c.is_null()) {
        out!(
            "calibration: {} rows x {} tokens from {} texts ({} longer than {} tokens skipped)",
            c["rows"],
            c["seqlen"],
            c["samples_used"],
            c["samples_too_long"],
            c["seqlen"]
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
                                    .filter_map(|g| {
                                        Some(
                                            1.0 - g["loss_best"].as_f64()?
                                                / g["loss_ratio0"].as_f64()?.max(f64::MIN_POSITIVE),
                                        )
                                    })
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
        out!(
            "scale search cut the quantization loss by {:.1}% on average; per block (%): {}",
            100.0 * mean,
            list.join(" ")
        );
    }
    Ok(())
}
