//! `awq bench ...`: performance measurements on the device (see BENCHMARKS.md for results).

use anyhow::{bail, Context, Result};
use awq_kernels::{DType, Device};
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Time the W4A16 kernels (4-bit AWQ weights x f16/bf16 activations) on a GPU.
    ///
    /// For each weight shape N x K (outputs x inputs) and each batch size M, times the kernel path
    /// `awq` picks (decode: the persistent TMA kernel, large weights, up to 16 rows; stream: the
    /// split-K tensor-core kernel up to 64; fused: the wgmma kernel that dequantizes in registers,
    /// for large weights from 17 to 256 rows; dq+gemm: dequantize to a 16-bit workspace, then
    /// cuBLAS), the other candidate for that M (`alt us`), and cuBLAS on the same shape with a dense
    /// 16-bit weight.
    /// Times are the median over --reps measurements, each of one pass over enough copies of the
    /// weight (--rotate-mib) that the 50 MB L2 cache never holds the one being read; each pass is
    /// queued behind a spin kernel, so the host's launch overhead is not timed (as in a serving
    /// loop that replays CUDA graphs).
    ///
    /// Columns: `us` time per call; `GB/s` bytes moved (packed weight, zero points and scales,
    /// activations, output) per second; `%copy` that rate over the device-to-device copy bandwidth
    /// measured at the start; `TFLOP/s` 2*M*N*K per second; `cuBLAS us` dense f16 GEMM time;
    /// `speedup` cuBLAS time over ours; `alt us` the path not taken.
    Kernels(KernelsArgs),
    /// Load an OpenAI-compatible server (`awq serve`, vLLM) as `vllm bench serve` does.
    ///
    /// For each --concurrency level: --warmup requests not counted, then --num-prompts streamed
    /// completions of exactly --input-len prompt tokens (sent as token ids) and --output-len
    /// generated tokens, at most that many in flight. Prints a row per level: requests done and
    /// failed, wall time, requests/s, generated tokens/s, all tokens/s, and mean/median/p99 of TTFT
    /// (time to the first chunk with text), TPOT ((end - TTFT) / (output tokens - 1)), ITL (gaps
    /// between chunks with text) and E2E (time to `data: [DONE]`), in milliseconds.
    ///
    /// Example: awq bench serve --url http://127.0.0.1:8000 --concurrency 1,8,32,128 --ignore-eos
    Serve(super::bench_serve::BenchServeArgs),
}

#[derive(Args)]
pub struct KernelsArgs {
    /// The GPU.
    #[arg(long, default_value = "cuda:0")]
    pub device: Device,
    /// Weight shapes N x K, comma-separated (default: Llama-3-8B's and -70B's projections).
    #[arg(long, value_delimiter = ',', default_value = "4096x4096,6144x4096,28672x4096,4096x14336,8192x8192,10240x8192,57344x8192,8192x28672")]
    pub shapes: Vec<String>,
    /// Batch sizes (activation rows), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64,128,256,1024,4096")]
    pub m: Vec<usize>,
    /// Quantization group size along K.
    #[arg(long, default_value_t = 128)]
    pub group_size: usize,
    /// Activation dtype: f16 or bf16.
    #[arg(long, default_value = "f16")]
    pub dtype: String,
    /// Measurements per case (the median is reported).
    #[arg(long, default_value_t = 15)]
    pub reps: usize,
    /// MiB of weight copies cycled through in each measurement (more than the L2 cache).
    #[arg(long, default_value_t = 256)]
    pub rotate_mib: usize,
    /// Print one JSON object per line instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Kernels(args) => kernels(args),
        BenchCommand::Serve(args) => super::bench_serve::run(args),
    }
}

fn parse_shape(s: &str) -> Result<(usize, usize)> {
    let parsed = s.split_once(['x', 'X']).and_then(|(n, k)| Some((n.trim().parse().ok()?, k.trim().parse().ok()?)));
    parsed.with_context(|| format!("--shapes: '{s}' is not N x K (e.g. 4096x14336)"))
}

fn kernels(args: KernelsArgs) -> Result<()> {
    let shapes = args.shapes.iter().map(|s| parse_shape(s)).collect::<Result<Vec<_>>>()?;
    let dtype = match args.dtype.as_str() {
        "f16" | "float16" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        other => bail!("--dtype: '{other}' is not f16 or bf16"),
    };
    if args.m.is_empty() || args.m.contains(&0) {
        bail!("--m: batch sizes must be positive");
    }
    let Device::Cuda(_) = args.device else { bail!("--device: the kernels are timed on a GPU (cuda:N), got {}", args.device) };
    gpu::kernels(&args, &shapes, dtype)
}

#[cfg(not(feature = "cuda"))]
mod gpu {
    use super::*;

    pub fn kernels(_: &KernelsArgs, _: &[(usize, usize)], _: DType) -> Result<()> {
        bail!("this awq was built without CUDA; scripts/build-gpu builds one with it (cargo build --release -p awq-cli --features cuda)")
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use awq_kernels::cuda::timing::GpuTimer;
    use awq_kernels::cuda::CudaDevice;
    use awq_kernels::ops::{linear, w4a16_linear_with, Int4Weight, PackedLinear, W4A16Path, DECODE_MAX_ROWS, STREAM_MAX_ROWS};
    use awq_kernels::rng::SplitMix64;
    use awq_kernels::Tensor;
    use serde_json::json;

    /// Median microseconds per call (see `GpuTimer::time_calls`).
    fn time_calls(timer: &GpuTimer, reps: usize, calls: usize, call: impl FnMut(usize) -> awq_kernels::Result<()>) -> Result<f64> {
        Ok(timer.time_calls(reps, calls, call)? * 1e3)
    }

    pub fn kernels(args: &KernelsArgs, shapes: &[(usize, usize)], dtype: DType) -> Result<()> {
        let device = args.device;
        let Device::Cuda(ordinal) = device else { unreachable!("checked by the caller") };
        let timer = GpuTimer::new(device)?;
        let name = CudaDevice::get(ordinal)?.name().to_string();
        let copy_gbs = timer.copy_bandwidth(1 << 30, 10)?;
        // What any kernel costs in this measurement: an empty one, timed like the others (the floor
        // under the small layers' times).
        let floor_us = time_calls(&timer, args.reps, 32, |_| timer.hold(0))?;
        let rotate = args.rotate_mib << 20;
        if args.json {
            out!("{}", json!({ "device": name, "copy_gb_per_s": copy_gbs, "empty_kernel_us": floor_us, "dtype": dtype.to_string(), "group_size": args.group_size }));
        } else {
            out!("# {name}: device-to-device copy {copy_gbs:.0} GB/s; empty kernel {floor_us:.1} us; {dtype}, group size {}", args.group_size);
            out!("{:>12} {:>5} {:>7} {:>9} {:>7} {:>6} {:>8} {:>10} {:>8} {:>9}", "N x K", "M", "path", "us", "GB/s", "%copy", "TFLOP/s", "cuBLAS us", "speedup", "alt us");
        }
        let mut rng = SplitMix64::new(42);
        for &(n, k) in shapes {
            let packed = PackedLinear::random(&mut rng, n, k, args.group_size, (2e-3, 8e-3));
            let host = Int4Weight::from_awq(&packed, dtype).with_context(|| format!("shape {n}x{k}"))?;
            drop(packed);
            let int4_copies = rotate.div_ceil(host.size_bytes()).clamp(2, 64);
            let weights = (0..int4_copies).map(|_| host.to_device(device)).collect::<Result<Vec<_>, _>>()?;
            let dense_copies = rotate.div_ceil(n * k * 2).clamp(2, 64);
            let dense = (0..dense_copies).map(|i| weights[i % int4_copies].dequantize()).collect::<Result<Vec<_>, _>>()?;
            let max_m = args.m.iter().copied().max().unwrap_or(1);
            let x_all = Tensor::from_f32_as(&[max_m, k], rng.normal_vec(max_m * k, 1.0), dtype)?.to_device(device)?;
            for &m in &args.m {
                let x = x_all.rows(0, m)?;
                let time_path = |path: W4A16Path| {
                    time_calls(&timer, args.reps, int4_copies, |i| w4a16_linear_with(&x, &weights[i], None, path).map(drop))
                };
                let chosen = W4A16Path::Auto.resolve(m, n, k);
                let ours = time_path(chosen)?;
                let alt = match chosen {
                    W4A16Path::Decode => Some(time_path(W4A16Path::Stream)?),
                    W4A16Path::Stream if m <= DECODE_MAX_ROWS => Some(time_path(W4A16Path::Decode)?),
                    W4A16Path::Stream => Some(time_path(W4A16Path::Fused)?),
                    W4A16Path::Fused if m <= STREAM_MAX_ROWS => Some(time_path(W4A16Path::Stream)?),
                    W4A16Path::Fused => Some(time_path(W4A16Path::DequantizeGemm)?),
                    W4A16Path::DequantizeGemm => Some(time_path(W4A16Path::Fused)?),
                    W4A16Path::Auto => None,
                };
                let cublas = time_calls(&timer, args.reps, dense_copies, |i| linear(&x, &dense[i], None).map(drop))?;
                let bytes = host.size_bytes() + (m * k + m * n) * 2;
                let gbs = bytes as f64 / (ours * 1e-6) / 1e9;
                let tflops = 2.0 * (m * n * k) as f64 / (ours * 1e-6) / 1e12;
                let path = match chosen {
                    W4A16Path::Decode => "decode",
                    W4A16Path::Stream => "stream",
                    W4A16Path::Fused => "fused",
                    _ => "dq+gemm",
                };
                if args.json {
                    out!("{}", json!({
                        "n": n, "k": k, "m": m, "path": path, "us": ours, "gb_per_s": gbs, "copy_fraction": gbs / copy_gbs,
                        "tflop_per_s": tflops, "cublas_us": cublas, "speedup": cublas / ours, "alt_us": alt,
                    }));
                } else {
                    let alt = alt.map_or("-".to_string(), |a| format!("{a:.1}"));
                    out!(
                        "{:>12} {:>5} {:>7} {:>9.1} {:>7.0} {:>5.0}% {:>8.1} {:>10.1} {:>7.2}x {:>9}",
                        format!("{n}x{k}"), m, path, ours, gbs, 100.0 * gbs / copy_gbs, tflops, cublas, cublas / ours, alt
                    );
                }
            }
        }
        Ok(())
    }
}
