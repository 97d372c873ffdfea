//! W4A16 linear layers: 4-bit weights in AutoAWQ's GEMM layout times f16 or bf16 activations,
//! `y = x W^T (+ bias)` with f32 accumulation. This is the op a served AWQ model spends its time in.
//!
//! - [`PackedLinear`]: a linear as an AWQ checkpoint stores it (`qweight` I32 `[in, out / 8]`,
//!   `qzeros` I32 `[in / g, out / 8]`, `scales` F16 `[in / g, out]`; see `awq_model::awq_format`
//!   for the format and how it is written).
//! - [`Int4Weight`]: the same weight repacked once, at load time, into the layout the CUDA kernels
//!   stream: 16 output rows x 64 input columns per 512-byte tile, each lane's 16 bytes already in the
//!   register order of a tensor-core MMA operand (w4a16.cuh explains it), plus the group zero points
//!   and scales interleaved per tile. Built on the host, moved with [`Int4Weight::to_device`].
//! - [`w4a16_linear`]: the op. On the CPU it is the reference: dequantize to f32 (exactly: a 4-bit
//!   difference times a 16-bit scale fits f32's mantissa) and multiply with the f32 GEMM of
//!   [`super::linear`]. On CUDA it picks a path by the number of activation rows and the weight's
//!   size (see [`W4A16Path`]): at decode sizes a kernel that streams the packed weight once and
//!   multiplies on the tensor cores (the persistent TMA kernel for large weights, the split-K one
//!   for small); from 17 to 256 rows where it pays ([`fused_pays`]), a Hopper kernel that
//!   dequantizes in registers in front of the warpgroup MMAs (wgmma), split along K for narrow
//!   weights; above, dequantization to a 16-bit workspace and cuBLAS.
//!
//! Shapes the kernels take: `out` a multiple of 16, `in` a multiple of 64, the group size a
//! multiple of 16 that divides `in`. [`Int4Weight::from_awq`] refuses others, naming the rule.
//!
//! The folder, one file per concern: `layout.rs` (the two layouts, the repacking, the weight's
//! device buffers); one kernel family per `.rs` + `.cu` pair, the launcher beside its source:
//! `decode` (the persistent TMA kernel), `stream` (split-K mma.sync), `fused` (the wgmma prefill
//! kernel), `dequantize` (the dense weight for cuBLAS); `w4a16.cuh`, what the kernels share; and
//! here, the path choice ([`W4A16Path::resolve`]), the op, and the launcher of the split-K kernels
//! (decode and stream), which overlaps them with the kernel before.

#[cfg(feature = "cuda")]
pub(super) mod decode;
#[cfg(feature = "cuda")]
pub(super) mod dequantize;
#[cfg(feature = "cuda")]
pub(super) mod fused;
mod layout;
pub(super) mod stream;

pub use layout::{Int4Weight, PackedLinear, AWQ_ORDER};

use super::linear::{matmul_f32, StridedMatrix};
use super::{operands_and, Operands};
use crate::{Error, Result, Tensor};
use layout::Int4Storage;

/// How [`w4a16_linear_with`] computes on CUDA. On the CPU every path is the reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum W4A16Path {
    /// By the batch and the weight's size (the crossovers measured on an H100, BENCHMARKS.md):
    /// [`W4A16Path::Decode`] up to [`DECODE_MAX_ROWS`] activation rows when the weight is large
    /// enough ([`decode_pays`]), [`W4A16Path::Fused`] where it pays ([`fused_pays`]),
    /// [`W4A16Path::Stream`] otherwise up to [`STREAM_MAX_ROWS`], [`W4A16Path::DequantizeGemm`]
    /// above.
    Auto,
    /// Up to [`DECODE_MAX_ROWS`] rows (more fall back to [`W4A16Path::Stream`]): persistent blocks,
    /// one per multiprocessor, each streaming an equal share of the packed weight through a ring of
    /// TMA bulk copies into shared memory (sm_90 and later; older GPUs take `Stream`), multiplied
    /// on the tensor cores: bound by memory bandwidth on large weights, by its fixed cost per call
    /// (~8 us, see [`decode_pays`]) on small ones.
    Decode,
    /// The packed weight streamed once per 64 activation rows by blocks of 128 output rows and a
    /// range of K (split-K, so that even small layers fill the GPU), multiplied on the tensor cores
    /// (mma.sync m16n8k16): little fixed cost, so the faster one for small weights.
    Stream,
    /// Dequantize to a 16-bit `[out, in]` workspace, then cuBLAS: bound by the tensor cores at
    /// prefill sizes, at the cost of writing and reading the workspace once.
    DequantizeGemm,
    /// The prefill kernel (sm_90a; other GPUs take [`W4A16Path::Stream`] up to
    /// [`STREAM_MAX_ROWS`] rows, [`W4A16Path::DequantizeGemm`] above): warpgroup
    /// tensor-core MMAs (wgmma) with the weight dequantized in registers, so it crosses memory
    /// once, as 4 bits, and no dense copy is written.
    Fused,
}

/// The most activation rows the decode kernel takes (two 8-row MMA tiles).
pub const DECODE_MAX_ROWS: usize = 16;

/// The most activation rows [`W4A16Path::Auto`] sends to a streaming kernel (the crossover
/// measured on an H100, BENCHMARKS.md).
pub const STREAM_MAX_ROWS: usize = 64;

/// Whether the decode kernel beats the streaming one for `rows` activation rows and an `out x in`
/// weight: its fixed cost per call (on an H100 ~8 us beyond the bandwidth's share, where an empty
/// kernel costs ~2 us, with consecutive calls overlapping) pays off from 24 Mi weights (12 MiB
/// packed) at up to 4 rows, 48 Mi at up to 8 and 64 Mi at up to 16: the crossovers measured on an
/// H100 (BENCHMARKS.md). For Llama-3-8B at one token: every projection but the 4096 x 4096 ones.
pub fn decode_pays(rows: usize, out_features: usize, in_features: usize) -> bool {
    let weights = out_features * in_features;
    match rows {
        0..=4 => weights >= 24 << 20,
        5..=8 => weights >= 48 << 20,
        9..=DECODE_MAX_ROWS => weights >= 64 << 20,
        _ => false,
    }
}

/// The most activation rows [`W4A16Path::Auto`] sends to the prefill kernel.
pub const FUSED_MAX_ROWS: usize = 256;

/// Whether the prefill kernel beats the others for `rows` activation rows and an `out x in` weight,
/// by the crossovers measured on an H100 (BENCHMARKS.md). Against the streaming kernel: from 33
/// rows always, at 17 to 32 where the weight is wider than it is long (otherwise the split-K
/// stream kernel, reading less per output, is as fast or faster). Against dequantize + cuBLAS,
/// whose workspace costs 2.5 bytes per weight whatever the batch: up to [`FUSED_MAX_ROWS`] rows
/// from 32 Mi weights (Llama-3-8B's MLP and 70B's layers); above that cuBLAS's mainloop wins.
pub fn fused_pays(rows: usize, out_features: usize, in_features: usize) -> bool {
    match rows {
        0..=DECODE_MAX_ROWS => false,
        17..=32 => in_features < out_features,
        33..=STREAM_MAX_ROWS => true,
        65..=FUSED_MAX_ROWS => out_features * in_features >= 32 << 20,
        _ => false,
    }
}

impl W4A16Path {
    /// The path `self` means for `rows` activation rows and an `out x in` weight.
    pub fn resolve(self, rows: usize, out_features: usize, in_features: usize) -> W4A16Path {
        match self {
            W4A16Path::Auto if decode_pays(rows, out_features, in_features) => W4A16Path::Decode,
            W4A16Path::Auto if fused_pays(rows, out_features, in_features) => W4A16Path::Fused,
            W4A16Path::Auto if rows <= STREAM_MAX_ROWS => W4A16Path::Stream,
            W4A16Path::Auto => W4A16Path::DequantizeGemm,
            W4A16Path::Decode if rows > DECODE_MAX_ROWS => W4A16Path::Stream,
            other => other,
        }
    }
}

/// `y[M, out] = x[M, in] · W^T (+ bias[out])` for a 4-bit `W`, output in `x`'s dtype, which must
/// be the dtype the weight was packed for. See [`W4A16Path`] for how CUDA computes it.
pub fn w4a16_linear(x: &Tensor, w: &Int4Weight, bias: Option<&Tensor>) -> Result<Tensor> {
    w4a16_linear_with(x, w, bias, W4A16Path::Auto)
}

/// [`w4a16_linear`] on a chosen path (benchmarks and tests; [`W4A16Path::Auto`] is the one to use).
pub fn w4a16_linear_with(x: &Tensor, w: &Int4Weight, bias: Option<&Tensor>, path: W4A16Path) -> Result<Tensor> {
    let (m, k) = x.dims2("w4a16")?;
    let n = w.out_features;
    if k != w.in_features {
        return Err(Error::Shape { op: "w4a16", detail: format!("input has {k} features, weight [{n}, {}] expects {}", w.in_features, w.in_features) });
    }
    if x.dtype() != w.dtype {
        return Err(Error::Shape {
            op: "w4a16",
            detail: format!("activations are {} but the weight was packed for {}", x.dtype(), w.dtype),
        });
    }
    if let Some(b) = bias {
        if b.shape() != [n] {
            return Err(Error::Shape { op: "w4a16", detail: format!("bias has shape {:?}, weight has {n} outputs", b.shape()) });
        }
    }
    match (&w.storage, operands_and("w4a16", [x], bias)?) {
        (Int4Storage::Cpu { .. }, Operands::Cpu) => {
            let _ = path; // every path is the reference on the CPU
            let wv = w.dequantize_f32()?;
            let mut out = match bias {
                Some(b) => b.f32_values()?.repeat(m),
                None => vec![0.0f32; m * n],
            };
            let xv = x.f32_values()?;
            let lhs = StridedMatrix { data: &xv, row_stride: k as isize, col_stride: 1 };
            let rhs = StridedMatrix { data: &wv, row_stride: 1, col_stride: k as isize };
            matmul_f32(m, n, k, lhs, rhs, &mut out, n, bias.is_some(), true);
            Tensor::from_f32_as(&[m, n], out, x.dtype())
        }
        #[cfg(feature = "cuda")]
        (Int4Storage::Cuda(d), Operands::Cuda([sx], sb)) if d.device() == x.device() => match path.resolve(m, n, k) {
            W4A16Path::Fused if d.has_wgmma() => fused::fused(sx, sb, w, d, m, k),
            W4A16Path::Fused if m <= STREAM_MAX_ROWS => stream::stream(sx, sb, w, d, m, k),
            W4A16Path::Fused | W4A16Path::DequantizeGemm => super::linear(x, &dequantize::dequantize(w, d)?, bias),
            W4A16Path::Decode if d.has_bulk_copies() => decode::decode(sx, sb, w, d, m, k),
            _ => stream::stream(sx, sb, w, d, m, k),
        },
        // The weight on another device than the activations (and the bias, checked above).
        #[cfg(feature = "cuda")]
        _ => Err(Error::DeviceMismatch { op: "w4a16", first: x.device(), other: w.device() }),
    }
}

/// The header every W4A16 `.cu` file includes: the weight layout, the dequantization and the
/// helpers the kernels share.
#[cfg(feature = "cuda")]
pub(crate) const W4A16_HEADER: crate::cuda::CudaHeader =
    crate::cuda::CudaHeader { file: "ops/w4a16/w4a16.cuh", code: include_str!("w4a16.cuh") };

/// What the kernel families share on the Rust side: block sizes and the split-K launcher.
#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::{CudaSlice, LaunchConfig};

    use super::layout::DeviceInt4;
    use super::Int4Weight;
    use crate::cuda::{kernel_dim, CudaBuf, CudaSource, CudaStorage};
    use crate::Result;

    /// Threads per block of the stream, dequantize and helper kernels (8 warps; w4a16.cuh's
    /// STREAM_WARPS, dequantize.cu's DEQUANT_WARPS).
    pub(super) const BLOCK: u32 = 256;
    /// Warps of a stream block, one 16-row tile each: 128 output rows per row group.
    pub(super) const STREAM_WARPS: usize = 8;

    /// The buffers where a split-K kernel's blocks meet: f32 partial sums and arrival counters.
    pub(super) struct SplitK<'a> {
        pub(super) partial: &'a CudaSlice<f32>,
        pub(super) arrivals: &'a CudaSlice<u32>,
    }

    /// Launches `name`, one of the kernels whose parameters are (words, params, x, bias, y,
    /// partial, arrivals, m, n, k, group_size, ...`extra`, has_bias): the streaming and decode
    /// kernels (decode.cu, stream.cu), for activations `sx` (`[m, k]`) and an optional bias `sb`.
    /// Through [`crate::cuda::CudaDevice::launch_with`], overlapping (the kernels wait for the kernel before them where
    /// they must, see w4a16.cuh), unless `KernelSettings::w4a16_serial_launch` (a benchmark knob,
    /// `AWQ_W4A16_SERIAL_LAUNCH=1` in `awq`: BENCHMARKS.md times both); cudarc's builder cannot set that launch attribute, so the
    /// arguments are written out as parameter values.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_split_k(
        d: &DeviceInt4,
        src: &'static CudaSource,
        w: &Int4Weight,
        name: &str,
        cfg: LaunchConfig,
        (sx, sb): (&CudaStorage, Option<&CudaStorage>),
        (m, k): (usize, usize),
        y: &mut CudaBuf,
        split_k: SplitK<'_>,
        extra: &[i32],
    ) -> Result<()> {
        use cudarc::driver::DevicePtr;
        use std::ffi::c_void;
        let stream = d.dev.stream();
        let (words, _words) = d.words.device_ptr(stream);
        let (params, _params) = d.params.device_ptr(stream);
        let (x_ptr, _x) = sx.buf().device_ptr(stream);
        // Without a bias the kernels never read this pointer; x is any valid one.
        let (bias_ptr, _bias) = sb.unwrap_or(sx).buf().device_ptr(stream);
        let (y_ptr, _y) = y.device_ptr(stream);
        let (partial, _partial) = split_k.partial.device_ptr(stream);
        let (arrivals, _arrivals) = split_k.arrivals.device_ptr(stream);
        let pointers = [words, params, x_ptr, bias_ptr, y_ptr, partial, arrivals];
        let mut ints = vec![kernel_dim("w4a16", m)? as i32, w.out_features as i32, k as i32, w.group_size as i32];
        ints.extend_from_slice(extra);
        ints.push(sb.is_some() as i32);
        let mut values: Vec<*mut c_void> = pointers.iter().map(|p| p as *const _ as *mut c_void).collect();
        values.extend(ints.iter().map(|v| v as *const i32 as *mut c_void));
        let overlap = !crate::settings::settings().w4a16_serial_launch;
        // SAFETY: the values follow the kernels' parameter list (above); the buffers are sized by
        // the callers and live, with their guards, until the launch is queued, which copies the
        // values.
        unsafe { d.dev.launch_with(src, name, cfg, overlap, &mut values) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::rel;
    use crate::rng::SplitMix64;
    use crate::DType;
    use half::f16;

    fn reference(x: &[f32], w: &PackedLinear, bias: Option<&[f32]>, m: usize) -> Vec<f64> {
        let (n, k, g) = (w.out_features, w.in_features, w.group_size);
        let mut out = vec![0.0f64; m * n];
        for o in 0..n {
            // Independent of the repacking: straight from the AWQ layout's definition.
            let row: Vec<f64> = (0..k)
                .map(|i| (w.code(o, i) as f64 - w.zero(o, i / g) as f64) * w.scales[(i / g) * n + o].to_f64())
                .collect();
            for r in 0..m {
                let dot: f64 = row.iter().zip(&x[r * k..(r + 1) * k]).map(|(a, b)| a * *b as f64).sum();
                out[r * n + o] = dot + bias.map_or(0.0, |b| b[o] as f64);
            }
        }
        out
    }

    #[test]
    fn auto_picks_the_kernel_by_batch_and_weight_size() {
        let auto = |m, n, k| W4A16Path::Auto.resolve(m, n, k);
        // Llama-3-8B at one token: the MLP's projections and q/k/v decode, o (4096 x 4096) streams.
        assert_eq!(auto(1, 28672, 4096), W4A16Path::Decode);
        assert_eq!(auto(8, 4096, 14336), W4A16Path::Decode);
        assert_eq!(auto(1, 6144, 4096), W4A16Path::Decode);
        assert_eq!(auto(8, 6144, 4096), W4A16Path::Stream);
        assert_eq!(auto(1, 4096, 4096), W4A16Path::Stream);
        // 9..16 rows need a larger weight; 17 and up never decode.
        assert_eq!(auto(16, 4096, 14336), W4A16Path::Stream);
        assert_eq!(auto(16, 8192, 8192), W4A16Path::Decode);
        // 17..64: the prefill kernel, but for 17..32 rows of a weight no wider than it is long.
        assert_eq!(auto(17, 8192, 28672), W4A16Path::Stream);
        assert_eq!(auto(32, 8192, 8192), W4A16Path::Stream);
        assert_eq!(auto(17, 57344, 8192), W4A16Path::Fused);
        assert_eq!(auto(32, 6144, 4096), W4A16Path::Fused);
        assert_eq!(auto(64, 4096, 14336), W4A16Path::Fused);
        // 65..256: the prefill kernel on weights large enough, dequantize + cuBLAS on small ones.
        assert_eq!(auto(65, 57344, 8192), W4A16Path::Fused);
        assert_eq!(auto(256, 4096, 14336), W4A16Path::Fused);
        assert_eq!(auto(128, 6144, 4096), W4A16Path::DequantizeGemm);
        // Above: cuBLAS's mainloop wins.
        assert_eq!(auto(1024, 57344, 8192), W4A16Path::DequantizeGemm);
        // An explicit Decode with too many rows streams; the other choices are kept.
        assert_eq!(W4A16Path::Decode.resolve(17, 8192, 8192), W4A16Path::Stream);
        assert_eq!(W4A16Path::Stream.resolve(1, 57344, 8192), W4A16Path::Stream);
    }

    #[test]
    fn cpu_path_matches_f64_reference() {
        let mut rng = SplitMix64::new(11);
        for (m, n, k, g) in [(1, 16, 64, 64), (3, 32, 128, 32), (17, 48, 256, 128)] {
            let packed = PackedLinear::random(&mut rng, n, k, g, (1e-3, 1e-2));
            for dtype in [DType::F16, DType::BF16] {
                let w = Int4Weight::from_awq(&packed, dtype).unwrap();
                let x = Tensor::from_f32_as(&[m, k], rng.normal_vec(m * k, 1.0), dtype).unwrap();
                let b = Tensor::from_f32_as(&[n], rng.normal_vec(n, 0.1), dtype).unwrap();
                for bias in [None, Some(&b)] {
                    let y = w4a16_linear(&x, &w, bias).unwrap();
                    assert_eq!((y.shape(), y.dtype()), (&[m, n][..], dtype));
                    let bv = bias.map(|b| b.to_f32_vec().unwrap());
                    // The reference reads f16 scales; bf16 weights hold them rounded to bf16.
                    let tol = if dtype == DType::F16 { 1e-3 } else { 1e-2 };
                    let e = rel(&y.to_f32_vec().unwrap(), &reference(&x.to_f32_vec().unwrap(), &packed, bv.as_deref(), m));
                    assert!(e < tol, "{m}x{n}x{k} g{g} {dtype}: {e}");
                }
            }
        }
    }

    #[test]
    fn unsupported_shapes_and_operands_are_refused_clearly() {
        let mut rng = SplitMix64::new(3);
        let packed = PackedLinear::random(&mut rng, 24, 64, 64, (1e-3, 1e-2));
        let e = Int4Weight::from_awq(&packed, DType::F16).unwrap_err().to_string();
        assert!(e.contains("out_features 24 must be a positive multiple of 16"), "{e}");
        let packed = PackedLinear::random(&mut rng, 16, 96, 32, (1e-3, 1e-2));
        let e = Int4Weight::from_awq(&packed, DType::F16).unwrap_err().to_string();
        assert!(e.contains("in_features 96"), "{e}");
        let mut packed = PackedLinear::random(&mut rng, 16, 128, 64, (1e-3, 1e-2));
        assert!(Int4Weight::from_awq(&packed, DType::F32).is_err());
        packed.scales.pop();
        let e = Int4Weight::from_awq(&packed, DType::F16).unwrap_err().to_string();
        assert!(e.contains("scales has 31 elements"), "{e}");
        packed.scales.push(f16::ONE);
        let w = Int4Weight::from_awq(&packed, DType::F16).unwrap();
        let x = Tensor::zeros(&[2, 64], DType::F16);
        assert!(w4a16_linear(&x, &w, None).unwrap_err().to_string().contains("input has 64 features"));
        let x = Tensor::zeros(&[2, 128], DType::BF16);
        assert!(w4a16_linear(&x, &w, None).unwrap_err().to_string().contains("packed for f16"));
    }
}
