//! Linear layers: `y = x W^T + b`, the op that carries nearly all of a decoder's FLOPs.
//!
//! The CPU path converts operands to f32 (a no-op for f32 tensors) and calls the `gemm` crate, which
//! packs panels and runs SIMD micro-kernels across rayon threads. The CUDA path calls cuBLAS: fp16 and
//! bf16 operands through `cublasGemmEx` with f32 accumulation, f32 operands through SGEMM (full f32,
//! no TF32), operands of different dtypes as f32.

use gemm::Parallelism;

use super::{operands_and, Operands};
use crate::{DType, Error, Result, Tensor};

/// `y[M, N] = x[M, K] · w[N, K]^T (+ bias[N])`, output in `x`'s dtype.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_to(x, w, bias, x.dtype())
}

/// [`linear`] with the output in `out` (the accumulator is f32 either way): f16 operands with an f32
/// result keep the f32 sums unrounded. Logits are written this way: at their magnitudes (10 to 30)
/// f16 rounds to steps of 0.008 to 0.016, as large as the gaps between the top tokens it would then
/// decide.
pub fn linear_to(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, out: DType) -> Result<Tensor> {
    let (m, k) = x.dims2("linear")?;
    let (n, kw) = w.dims2("linear")?;
    if k != kw {
        return Err(Error::Shape {
            op: "linear",
            detail: format!("input has {k} features, weight [{n}, {kw}] expects {kw}"),
        });
    }
    match bias {
        Some(b) if b.shape() != [n] => {
            return Err(Error::Shape {
                op: "linear",
                detail: format!("bias has shape {:?}, weight has {n} outputs", b.shape()),
            })
        }
        _ => {}
    }
    match operands_and("linear", [x, w], bias)? {
        Operands::Cpu => linear_cpu(x, w, bias, m, n, k, out),
        #[cfg(feature = "cuda")]
        Operands::Cuda([sx, sw], sb) => Ok(Tensor::from_cuda(&[m, n], cuda::linear(sx, sw, sb, m, n, k, out)?)),
    }
}

/// The reference: f32 operands through the `gemm` crate, the bias as the initial accumulator.
#[allow(clippy::too_many_arguments)]
fn linear_cpu(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    m: usize,
    n: usize,
    k: usize,
    to: DType,
) -> Result<Tensor> {
    let bias_values = bias.map(|b| b.f32_values()).transpose()?;
    let (xv, wv) = (x.f32_values()?, w.f32_values()?);
    let mut out = vec![0.0f32; m * n];
    if let Some(b) = &bias_values {
        for row in out.chunks_exact_mut(n) {
            row.copy_from_slice(b);
        }
    }
    // rhs[k, n] = w[n, k]: row stride 1, column stride k.
    let rhs = StridedMatrix { data: &wv, row_stride: 1, col_stride: k as isize };
    let lhs = StridedMatrix { data: &xv, row_stride: k as isize, col_stride: 1 };
    matmul_f32(m, n, k, lhs, rhs, &mut out, n, bias_values.is_some(), true);
    Tensor::from_f32_as(&[m, n], out, to)
}

#[cfg(feature = "cuda")]
pub(crate) const CUDA_SOURCE: crate::cuda::CudaSource = crate::cuda::CudaSource {
    file: "ops/linear.cu",
    code: include_str!("linear.cu"),
    headers: &[],
    kernels: &["broadcast_rows_f32", "broadcast_rows_f16", "broadcast_rows_bf16"],
};

#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::cublas::result::gemm_ex;
    use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};
    use cudarc::cublas::{Gemm, GemmConfig};
    use cudarc::driver::DevicePtrMut;
    use cudarc::driver::PushKernelArg;
    use half::{bf16, f16};

    use super::CUDA_SOURCE;
    use crate::cuda::{grid_for, kernel_dim, CudaBuf, CudaStorage};
    use crate::ops::cast::cuda::cast;
    use crate::{DType, Error, Result};

    /// cuBLAS is column-major: the row-major `y[M, N]` is the column-major `y^T[N, M]`, and
    /// `y^T = W · x^T` where the row-major `w[N, K]` read column-major is `W^T[K, N]` (so op(A) = T,
    /// lda = K) and the row-major `x[M, K]` read column-major is `x^T[K, M]` (op(B) = N, ldb = K).
    /// The result `[m, n]` has dtype `out`: f16/bf16 operands write f32 straight from the f32
    /// accumulator when `out` is f32, rather than round to their dtype and widen.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn linear(
        x: &CudaStorage,
        w: &CudaStorage,
        bias: Option<&CudaStorage>,
        m: usize,
        n: usize,
        k: usize,
        out: DType,
    ) -> Result<CudaStorage> {
        let compute = if x.dtype() == w.dtype() { x.dtype() } else { DType::F32 };
        let (sx, sw) = (cast(x, compute)?, cast(w, compute)?);
        let written = if out == DType::F32 { DType::F32 } else { compute };
        let dev = sx.dev();
        let (m32, n32, k32) = (kernel_dim("linear", m)?, kernel_dim("linear", n)?, kernel_dim("linear", k)?);
        let mut y = dev.alloc_buf(written, m * n)?;
        if m * n > 0 {
            // beta = 1 accumulates onto the bias broadcast into y; beta = 0 ignores y's contents.
            let beta = match bias {
                Some(b) => {
                    let sb = cast(b, written)?;
                    let (total, cols) = ((m * n) as u64, n32);
                    let kernel = dev.kernel(&CUDA_SOURCE, &format!("broadcast_rows_{written}"))?;
                    let mut args = kernel.args();
                    sb.buf().arg(&mut args);
                    y.arg_mut(&mut args);
                    args.arg(&total);
                    args.arg(&cols);
                    // SAFETY: broadcast_rows_<t>(const T* bias, T* out, u64 n, u32 cols), the dtype
                    // `written` of both (cast above): bias holds n values (checked by `linear`),
                    // out m * n, read at i % n for i < m * n.
                    unsafe { kernel.launch(args, grid_for(m * n, 256)) }?;
                    1.0f32
                }
                None => 0.0f32,
            };
            if k == 0 && beta == 0.0 {
                // An empty sum: make the zeros explicit rather than rely on cuBLAS with k = 0.
                let zero = |e| dev.driver_error("cuMemsetD8")(e);
                match &mut y {
                    CudaBuf::F32(s) => dev.stream().memset_zeros(s).map_err(zero)?,
                    CudaBuf::F16(s) => dev.stream().memset_zeros(s).map_err(zero)?,
                    CudaBuf::BF16(s) => dev.stream().memset_zeros(s).map_err(zero)?,
                }
            } else if k > 0 {
                dev.with_blas(|blas| {
                    fn cfg<T>(m: u32, n: u32, k: u32, alpha: T, beta: T) -> GemmConfig<T> {
                        let (m, n, k) = (m as i32, n as i32, k as i32);
                        GemmConfig {
                            transa: cublasOperation_t::CUBLAS_OP_T,
                            transb: cublasOperation_t::CUBLAS_OP_N,
                            m: n,
                            n: m,
                            k,
                            alpha,
                            lda: k,
                            ldb: k,
                            beta,
                            ldc: n,
                        }
                    }
                    let stream = dev.stream();
                    // SAFETY: w holds n*k and x m*k elements of the dtype `compute`, y holds m*n of
                    // the dtype `written`, as the shapes checked by `linear` and the casts above
                    // guarantee; the mixed call gives cublasGemmEx exactly those types.
                    let done = unsafe {
                        match (sw.buf(), sx.buf(), &mut y) {
                            (CudaBuf::F32(a), CudaBuf::F32(b), CudaBuf::F32(c)) => {
                                blas.gemm(cfg(m32, n32, k32, 1.0f32, beta), a, b, c)
                            }
                            (CudaBuf::F16(a), CudaBuf::F16(b), CudaBuf::F16(c)) => {
                                blas.gemm(cfg(m32, n32, k32, f16::ONE, f16::from_f32(beta)), a, b, c)
                            }
                            (CudaBuf::BF16(a), CudaBuf::BF16(b), CudaBuf::BF16(c)) => {
                                blas.gemm(cfg(m32, n32, k32, bf16::ONE, bf16::from_f32(beta)), a, b, c)
                            }
                            (a @ (CudaBuf::F16(_) | CudaBuf::BF16(_)), b, CudaBuf::F32(c)) => {
                                let half = match compute {
                                    DType::BF16 => cudaDataType_t::CUDA_R_16BF,
                                    _ => cudaDataType_t::CUDA_R_16F,
                                };
                                let c_cfg = cfg(m32, n32, k32, 1.0f32, beta);
                                let (pa, _a) = a.device_ptr(stream);
                                let (pb, _b) = b.device_ptr(stream);
                                let (pc, _c) = c.device_ptr_mut(stream);
                                gemm_ex(
                                    *blas.handle(),
                                    c_cfg.transa,
                                    c_cfg.transb,
                                    c_cfg.m,
                                    c_cfg.n,
                                    c_cfg.k,
                                    (&c_cfg.alpha) as *const f32 as *const _,
                                    pa as *const _,
                                    half,
                                    c_cfg.lda,
                                    pb as *const _,
                                    half,
                                    c_cfg.ldb,
                                    (&c_cfg.beta) as *const f32 as *const _,
                                    pc as *mut _,
                                    cudaDataType_t::CUDA_R_32F,
                                    c_cfg.ldc,
                                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                                )
                            }
                            _ => unreachable!("x and w were given one dtype, y that or f32, above"),
                        }
                    };
                    let call = if compute == DType::F32 { "cublasSgemm" } else { "cublasGemmEx" };
                    done.map_err(|source| Error::Cublas { device: dev.device(), call, source })
                })?;
            }
        }
        cast(&CudaStorage::new(dev.clone(), y), out)
    }
}

/// A read-only f32 matrix view with arbitrary strides (in elements).
#[derive(Clone, Copy)]
pub(crate) struct StridedMatrix<'a> {
    pub data: &'a [f32],
    pub row_stride: isize,
    pub col_stride: isize,
}

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]` on strided f32 views; `dst` is row-major with row stride
/// `dst_row_stride`. `accumulate` adds to what `dst` holds; `parallel` lets gemm use the rayon pool
/// (pass `false` when already inside a parallel loop).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_f32(
    m: usize,
    n: usize,
    k: usize,
    lhs: StridedMatrix<'_>,
    rhs: StridedMatrix<'_>,
    dst: &mut [f32],
    dst_row_stride: usize,
    accumulate: bool,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |v: &StridedMatrix<'_>, rows: usize, cols: usize| {
        (rows as isize - 1) * v.row_stride + (cols as isize - 1) * v.col_stride
    };
    // The views must cover every element the kernel will read; these hold for all callers in this
    // crate, which derive strides from checked shapes.
    assert!(k == 0 || (last(&lhs, m, k) as usize) < lhs.data.len(), "lhs view out of bounds");
    assert!(k == 0 || (last(&rhs, k, n) as usize) < rhs.data.len(), "rhs view out of bounds");
    assert!((m - 1) * dst_row_stride + n <= dst.len(), "dst view out of bounds");
    let threads = rayon::current_num_threads();
    let parallelism = if parallel && threads > 1 && m * n * k > 64 * 64 * 64 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts above keep every access inside the three slices; dst is borrowed mutably,
    // so it cannot alias lhs or rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride,
            lhs.row_stride,
            rhs.data.as_ptr(),
            rhs.col_stride,
            rhs.row_stride,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{randn, rel};
    use crate::rng::SplitMix64;
    use crate::DType;

    fn reference(x: &[f32], w: &[f32], b: Option<&[f32]>, m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = b.map_or(0.0, |b| b[j] as f64);
                for l in 0..k {
                    s += x[i * k + l] as f64 * w[j * k + l] as f64;
                }
                out[i * n + j] = s;
            }
        }
        out
    }

    #[test]
    fn matches_f64_reference_across_shapes_and_dtypes() {
        let mut rng = SplitMix64::new(7);
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (17, 33, 65), (128, 96, 200), (1, 300, 129)] {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let x = randn(&mut rng, &[m, k], 1.0, dtype);
                let w = randn(&mut rng, &[n, k], 0.2, dtype);
                let b = randn(&mut rng, &[n], 0.5, dtype);
                for bias in [None, Some(&b)] {
                    let y = linear(&x, &w, bias).unwrap();
                    assert_eq!(y.shape(), &[m, n]);
                    assert_eq!(y.dtype(), dtype);
                    let bv = bias.map(|b| b.to_f32_vec().unwrap());
                    let r = reference(&x.to_f32_vec().unwrap(), &w.to_f32_vec().unwrap(), bv.as_deref(), m, n, k);
                    // f32 accumulation: ~1e-6; the output rounding dominates for f16 (2^-11) and
                    // bf16 (2^-8).
                    let tol = match dtype {
                        DType::F32 => 1e-5,
                        DType::F16 => 1e-3,
                        DType::BF16 => 8e-3,
                    };
                    let e = rel(&y.to_f32_vec().unwrap(), &r);
                    assert!(e < tol, "{m}x{n}x{k} {dtype}: rel err {e}");
                }
            }
        }
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let x = Tensor::zeros(&[2, 3], DType::F32);
        let w = Tensor::zeros(&[4, 5], DType::F32);
        assert!(matches!(linear(&x, &w, None), Err(Error::Shape { op: "linear", .. })));
        let w = Tensor::zeros(&[4, 3], DType::F32);
        let b = Tensor::zeros(&[3], DType::F32);
        assert!(matches!(linear(&x, &w, Some(&b)), Err(Error::Shape { .. })));
    }
}
