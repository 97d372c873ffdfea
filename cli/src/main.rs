//! `awq`: one binary for every role of awq-cluster.
//!
//! Each subcommand lives in `commands/` and is thin glue over the library crates: parse arguments,
//! call the library, show progress, print a result (human-readable, or JSON with `--json`).

/// `println!` for command output that ends the process quietly when stdout is closed early
/// (`awq jobs | head`) instead of panicking on the broken pipe.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("error: cannot write to stdout: {e}");
            std::process::exit(1);
        }
    }};
}

mod commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc rather than the system allocator: see cli/Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Quantize large language models to 4-bit with AWQ, and evaluate them.
///
/// Models are Hugging Face checkpoint directories: config.json, safetensors weights (one file or
/// sharded with model.safetensors.index.json) and tokenizer.json. Supported architectures: llama,
/// mistral, qwen2.
#[derive(Parser)]
#[command(name = "awq", version, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    kernels: KernelArgs,
    #[command(subcommand)]
    command: Command,
}

/// How GPU kernels are compiled and launched, for every command (before or after its name). Each
/// flag also reads its environment variable; `awq_kernels::configure` installs them at the start.
#[derive(clap::Args)]
struct KernelArgs {
    /// Where compiled GPU kernels are kept: a folder, or `off` to compile them in every process
    /// [default: $XDG_CACHE_HOME/awq/kernels, else ~/.cache/awq/kernels]
    #[arg(long, global = true, env = "AWQ_KERNEL_CACHE", value_name = "DIR|off")]
    kernel_cache: Option<std::ffi::OsString>,
    /// Folders holding CUDA's headers (cuda_fp16.h) for the kernel compiler, a path list [default:
    /// searched beside $LD_LIBRARY_PATH, in $CUDA_HOME, $CUDA_PATH, /usr/local/cuda]
    #[arg(long, global = true, env = "AWQ_CUDA_INCLUDE", value_name = "DIRS")]
    cuda_include: Option<std::ffi::OsString>,
    /// Print ptxas's register and spill report of every kernel compiled (skips the kernel cache).
    #[arg(long, global = true, env = "AWQ_NVRTC_VERBOSE", value_parser = clap::builder::FalseyValueParser::new(), hide = true)]
    nvrtc_verbose: bool,
    /// Preprocessor definitions for the kernel compiler ("-DNAME=VALUE ..."): only a build with
    /// awq-kernels' `kernel-probes` feature takes any.
    #[arg(long, global = true, env = "AWQ_NVRTC_DEFINES", value_name = "DEFINES", hide = true)]
    nvrtc_defines: Option<String>,
    /// Launch the W4A16 split-K kernels without overlapping the kernel before them (benchmarks).
    #[arg(long, global = true, env = "AWQ_W4A16_SERIAL_LAUNCH", value_parser = clap::builder::FalseyValueParser::new(), hide = true)]
    w4a16_serial_launch: bool,
}

impl KernelArgs {
    fn settings(self) -> awq_kernels::KernelSettings {
        use awq_kernels::KernelCache;
        let kernel_cache = match self.kernel_cache {
            None => KernelCache::Default,
            Some(dir) if dir.is_empty() || dir == "off" => KernelCache::Off,
            Some(dir) => KernelCache::Dir(dir.into()),
        };
        let cuda_include = self.cuda_include.map(|list| std::env::split_paths(&list).filter(|p| !p.as_os_str().is_empty()).collect());
        let nvrtc_defines = self.nvrtc_defines.map(|d| d.split_whitespace().map(str::to_string).collect());
        awq_kernels::KernelSettings {
            kernel_cache,
            cuda_include: cuda_include.unwrap_or_default(),
            nvrtc_verbose: self.nvrtc_verbose,
            nvrtc_defines: nvrtc_defines.unwrap_or_default(),
            w4a16_serial_launch: self.w4a16_serial_launch,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Measure a model: `awq eval ppl` (perplexity on a text), `awq eval kl` (a quantized model's
    /// next-token distributions against its original's).
    #[command(subcommand)]
    Eval(commands::eval::EvalCommand),
    /// Quantize a model to 4 bits with AWQ (or round-to-nearest) into an AutoAWQ GEMM checkpoint.
    ///
    /// Calibrates on text (built-in by default), searches per-channel scales and clip thresholds
    /// block by block exactly as AutoAWQ 0.2.9 does, and writes a checkpoint that vLLM,
    /// transformers and AutoAWQ load unchanged, plus awq_report.json (chosen ratios, losses, clips).
    Quantize(commands::quantize::QuantizeArgs),
    /// Check a checkpoint directory and print what it holds.
    Inspect(commands::inspect::InspectArgs),
    /// Make a checkpoint from another format: `awq import gguf FILE -o DIR`.
    #[command(subcommand)]
    Import(commands::import::ImportCommand),
    /// Run a coordinator: the job API for clients and the worker API, with state in memory or etcd.
    Coordinator(commands::cluster::CoordinatorArgs),
    /// Run a worker: join a coordinator and compute the blocks it assigns.
    Worker(commands::cluster::WorkerArgs),
    /// Submit a quantization job to a coordinator (prints the job id; --wait follows it).
    Submit(commands::jobs::SubmitArgs),
    /// Show a job: state, blocks done, stages.
    Status(commands::jobs::JobArgs),
    /// Follow a job to its end with a progress bar per stage.
    Watch(commands::jobs::JobArgs),
    /// Cancel a job.
    Cancel(commands::jobs::JobArgs),
    /// List the coordinator's jobs.
    Jobs(commands::jobs::ClientArgs),
    /// List the workers joined to the coordinator.
    Workers(commands::jobs::ClientArgs),
    /// Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, ...).
    Serve(commands::serve::ServeArgs),
    /// Serve a checkpoint on the cluster's workers (replicas placed by the coordinator; its HTTP
    /// gateway answers the OpenAI API with `model` = the deployment's served model name).
    Deploy(commands::deploy::DeployArgs),
    /// List the deployments: each replica's state, worker and address.
    Deployments(commands::jobs::ClientArgs),
    /// Stop a deployment's replicas and forget it.
    Undeploy(commands::deploy::UndeployArgs),
    /// Write a checkpoint with random weights of a chosen shape (tests, benchmarks).
    Synthetic(commands::synthetic::SyntheticArgs),
    /// Measure performance: `awq bench serve` loads an OpenAI-compatible server (TTFT, TPOT, tokens/s),
    /// `awq bench kernels` times the INT4 kernels on a GPU.
    #[command(subcommand)]
    Bench(commands::bench::BenchCommand),
}

/// The async runtime of the network commands (the compute runs on its blocking threads).
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = awq_kernels::configure(cli.kernels.settings()) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    // Services log what they do; one-shot commands report through their own output and errors.
    let default_filter = match cli.command {
        Command::Coordinator(_) | Command::Worker(_) | Command::Serve(_) => "info",
        _ => "error",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AWQ_LOG").unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Eval(cmd) => commands::eval::run(cmd),
        Command::Quantize(args) => runtime().and_then(|rt| rt.block_on(commands::quantize::run(args))),
        Command::Coordinator(args) => runtime().and_then(|rt| rt.block_on(commands::cluster::coordinator(args))),
        Command::Worker(args) => runtime().and_then(|rt| rt.block_on(commands::cluster::worker(args))),
        Command::Submit(args) => runtime().and_then(|rt| rt.block_on(commands::jobs::submit(args))),
        Command::Status(args) => runtime().and_then(|rt| rt.block_on(commands::jobs::status(args))),
        Command::Watch(args) => runtime().and_then(|rt| rt.block_on(commands::jobs::watch_cmd(args))),
        Command::Cancel(args) => runtime().and_then(|rt| rt.block_on(commands::jobs::cancel(args))),
        Command::Jobs(args) => runtime().and_then(|rt| rt.block_on(commands::jobs::jobs(args))),
        Command::Workers(args) => runtime().and_then(|rt| rt.block_on(commands::jobs::workers(args))),
        Command::Serve(args) => runtime().and_then(|rt| rt.block_on(commands::serve::run(args))),
        Command::Deploy(args) => runtime().and_then(|rt| rt.block_on(commands::deploy::deploy(args))),
        Command::Deployments(args) => runtime().and_then(|rt| rt.block_on(commands::deploy::deployments(args))),
        Command::Undeploy(args) => runtime().and_then(|rt| rt.block_on(commands::deploy::undeploy(args))),
        Command::Inspect(args) => commands::inspect::run(args),
        Command::Synthetic(args) => commands::synthetic::run(args),
        Command::Import(cmd) => commands::import::run(cmd),
        Command::Bench(cmd) => commands::bench::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
