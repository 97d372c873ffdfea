//! Causal scaled dot-product attention with grouped-query heads (Ainslie et al. 2023).
//!
//! Query head `h` reads key/value head `h / (n_heads / n_kv_heads)`, as `repeat_kv` does in the
//! Hugging Face models. Scores are `q k^T * scale`, masked to `j <= i` (and, with a sliding window
//! `w`, to `i - j < w`), soft-maxed in f32 and applied to v. Sequences are independent: rows of
//! different sequences in a batch never attend to each other.
//!
//! The CPU reference forms each (sequence, head)'s score matrix with the gemm crate. The CUDA
//! version does the same on the tensor cores: one batched cuBLAS GEMM for every (sequence, head)'s
//! scores `q k^T` (f32 output), a masked softmax kernel (`attention.cu`, probabilities in the input
//! dtype, as flash attention feeds its second product), and one batched GEMM for `p v`, written
//! straight into the output's head columns. The score matrices of calibration-length sequences
//! fit in device memory (32 MiB per sequence of 512 tokens and 32 heads); longer batches run in
//! chunks of sequences.

use rayon::prelude::*;

use super::linear::{matmul_f32, StridedMatrix};
use super::{operands, Operands};
use crate::{Error, Result, Tensor};

/// The head layout of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Tokens per sequence; rows are `batch * seq_len`.
    pub seq_len: usize,
    /// Attend only to the last `w` positions (Mistral, Gemma local layers); `None` for full causal.
    pub sliding_window: Option<usize>,
}

/// `q[B*T, H*hd]`, `k, v[B*T, KV*hd]` (rotary already applied) to `out[B*T, H*hd]` in `q`'s dtype.
///
/// Errors: [`Error::Shape`] when the shapes disagree with `shape`.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, shape: AttentionShape, scale: f32) -> Result<Tensor> {
    let AttentionShape { n_heads, n_kv_heads, head_dim, seq_len, .. } = shape;
    let (rows, q_width) = q.dims2("attention")?;
    let kv_width = n_kv_heads * head_dim;
    let ok = n_kv_heads > 0
        && n_heads % n_kv_heads == 0
        && q_width == n_heads * head_dim
        && seq_len > 0
        && rows % seq_len == 0
        && k.shape() == [rows, kv_width]
        && v.shape() == [rows, kv_width];
    if !ok {
        return Err(Error::Shape {
            op: "attention",
            detail: format!(
                "q {:?}, k {:?}, v {:?} with {n_heads} heads, {n_kv_heads} kv heads of {head_dim}, sequence length {seq_len}",
                q.shape(),
                k.shape(),
                v.shape()
            ),
        });
    }
    match operands("attention", [q, k, v])? {
        Operands::Cpu => attention_cpu(q, k, v, shape, scale, rows),
        #[cfg(feature = "cuda")]
        Operands::Cuda([sq, sk, sv], _) => {
            Ok(Tensor::from_cuda(&[rows, q_width], cuda::causal_attention(sq, sk, sv, shape, scale, rows)?))
        }
    }
}

/// The reference, on shapes `causal_attention` checked.
fn attention_cpu(q: &Tensor, k: &Tensor, v: &Tensor, shape: AttentionShape, scale: f32, rows: usize) -> Result<Tensor> {
    let AttentionShape { n_heads, n_kv_heads, head_dim, seq_len, sliding_window } = shape;
    let (q_width, kv_width) = (n_heads * head_dim, n_kv_heads * head_dim);
    let (qv, kv, vv) = (q.f32_values()?, k.f32_values()?, v.f32_values()?);
    let batch = rows / seq_len;
    let group = n_heads / n_kv_heads;
    let t = seq_len;

    // One task per (sequence, head); each returns its [T, hd] output, scattered afterwards.
    let per_head: Vec<Vec<f32>> = (0..batch * n_heads)
        .into_par_iter()
        .map(|task| {
            let (b, h) = (task / n_heads, task % n_heads);
            let kvh = h / group;
            let q_view = StridedMatrix { data: &qv[b * t * q_width + h * head_dim..], row_stride: q_width as isize, col_stride: 1 };
            // k^T as a [hd, T] view of k's rows.
            let kt_view = StridedMatrix { data: &kv[b * t * kv_width + kvh * head_dim..], row_stride: 1, col_stride: kv_width as isize };
            let mut scores = vec![0.0f32; t * t];
            matmul_f32(t, t, head_dim, q_view, kt_view, &mut scores, t, false, false);
            for (i, row) in scores.chunks_exact_mut(t).enumerate() {
                let first = sliding_window.map_or(0, |w| (i + 1).saturating_sub(w));
                let visible = &mut row[first..=i];
                let max = visible.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s * scale));
                let mut sum = 0.0f32;
                for s in visible.iter_mut() {
                    *s = (*s * scale - max).exp();
                    sum += *s;
                }
                let inv = 1.0 / sum;
                visible.iter_mut().for_each(|s| *s *= inv);
                row[..first].fill(0.0);
                row[i + 1..].fill(0.0);
            }
            let p_view = StridedMatrix { data: &scores, row_stride: t as isize, col_stride: 1 };
            let v_view = StridedMatrix { data: &vv[b * t * kv_width + kvh * head_dim..], row_stride: kv_width as isize, col_stride: 1 };
            let mut out = vec![0.0f32; t * head_dim];
            matmul_f32(t, head_dim, t, p_view, v_view, &mut out, head_dim, false, false);
            out
        })
        .collect();

    let mut out = vec![0.0f32; rows * q_width];
    for (task, head_out) in per_head.iter().enumerate() {
        let (b, h) = (task / n_heads, task % n_heads);
        for (i, src) in head_out.chunks_exact(head_dim).enumerate() {
            let start = (b * t + i) * q_width + h * head_dim;
            out[start..start + head_dim].copy_from_slice(src);
        }
    }
    Tensor::from_f32_as(&[rows, q_width], out, q.dtype())
}

#[cfg(feature = "cuda")]
pub(crate) const CUDA_SOURCE: crate::cuda::CudaSource = crate::cuda::CudaSource {
    file: "ops/attention.cu",
    code: include_str!("attention.cu"),
    headers: &[],
    kernels: &["attention_softmax_f32", "attention_softmax_f16", "attention_softmax_bf16"],
};

#[cfg(feature = "cuda")]
mod cuda {
    use std::ffi::c_void;

    use cudarc::cublas::result::CublasError;
    use cudarc::cublas::sys::{self as cublas, cublasComputeType_t, cublasOperation_t, cudaDataType};
    use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

    use super::{AttentionShape, CUDA_SOURCE};
    use crate::cuda::{kernel_dim, CudaBuf, CudaDevice, CudaStorage};
    use crate::ops::cast::cuda::cast;
    use crate::{DType, Error, Result};

    /// Bytes of f32 scores per chunk of sequences (at least one sequence per chunk).
    const SCORE_BYTES_PER_CHUNK: usize = 1 << 30;

    fn cuda_type(dtype: DType) -> cudaDataType {
        match dtype {
            DType::F32 => cudaDataType::CUDA_R_32F,
            DType::F16 => cudaDataType::CUDA_R_16F,
            DType::BF16 => cudaDataType::CUDA_R_16BF,
        }
    }

    /// The raw address of a device buffer (valid while `buf` lives; the launches below are ordered
    /// on the device's one stream, so no event tracking is needed).
    fn address(dev: &CudaDevice, buf: &CudaBuf) -> u64 {
        let stream = dev.stream();
        match buf {
            CudaBuf::F32(s) => s.device_ptr(stream).0,
            CudaBuf::F16(s) => s.device_ptr(stream).0,
            CudaBuf::BF16(s) => s.device_ptr(stream).0,
        }
    }

    /// One column-major batched GEMM `C_i = op(A_i) B_i` over pointer arrays (f32 accumulation).
    struct Batched<'a> {
        dev: &'a CudaDevice,
        transa: cublasOperation_t,
        m: usize,
        n: usize,
        k: usize,
        a: (&'a [u64], usize, DType),
        b: (&'a [u64], usize, DType),
        c: (&'a [u64], usize, DType),
    }

    impl Batched<'_> {
        fn run(self) -> Result<()> {
            let dev = self.dev;
            let (a, b, c) = (dev.upload(self.a.0)?, dev.upload(self.b.0)?, dev.upload(self.c.0)?);
            let dim = |v: usize| -> Result<i32> { Ok(kernel_dim("attention", v)? as i32) };
            let (alpha, beta) = (1.0f32, 0.0f32);
            let batch = dim(self.a.0.len())?;
            dev.with_blas(|blas| {
                let stream = dev.stream();
                let (pa, pb, mut_c) = (a.device_ptr(stream).0, b.device_ptr(stream).0, c.device_ptr(stream).0);
                // SAFETY: the three pointer arrays hold `batch` addresses of matrices inside live
                // buffers of the stated types, each big enough for its m x k, k x n and m x n operand
                // with the leading dimensions given (the caller's layout arithmetic, checked against the
                // CPU reference by tests/cuda_ops.rs); alpha and beta are f32 as COMPUTE_32F requires.
                let status = unsafe {
                    cublas::cublasGemmBatchedEx(
                        *blas.handle(),
                        self.transa,
                        cublasOperation_t::CUBLAS_OP_N,
                        dim(self.m)?,
                        dim(self.n)?,
                        dim(self.k)?,
                        (&alpha as *const f32).cast::<c_void>(),
                        pa as *const *const c_void,
                        cuda_type(self.a.2),
                        dim(self.a.1)?,
                        pb as *const *const c_void,
                        cuda_type(self.b.2),
                        dim(self.b.1)?,
                        (&beta as *const f32).cast::<c_void>(),
                        mut_c as *const *mut c_void,
                        cuda_type(self.c.2),
                        dim(self.c.1)?,
                        batch,
                        cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        cublas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                };
                status.result().map_err(|source: CublasError| Error::Cublas { device: dev.device(), call: "cublasGemmBatchedEx", source })
            })
        }
    }

    /// Chunks of sequences: per chunk, scores = q k^T for every (sequence, head) (one batched
    /// GEMM, f32 out), probabilities = masked softmax(scores * scale) in q's dtype, out = p v (one
    /// batched GEMM into the output's columns). Row-major matrices are read as cuBLAS's
    /// column-major transposes: `scores^T = K Q^T` and `out_h^T = V^T P^T`. The result
    /// `[rows, n_heads * head_dim]` has q's dtype.
    pub(super) fn causal_attention(
        sq: &CudaStorage,
        sk: &CudaStorage,
        sv: &CudaStorage,
        shape: AttentionShape,
        scale: f32,
        rows: usize,
    ) -> Result<CudaStorage> {
        let AttentionShape { n_heads, n_kv_heads, head_dim, seq_len, sliding_window } = shape;
        // The GEMMs read q, k and v in one dtype. Mixed dtypes (rare: all three come from linears
        // of one input) run on f32 copies; widening is exact, so the result is the same.
        if sk.dtype() != sq.dtype() || sv.dtype() != sq.dtype() {
            let (q32, k32, v32) = (cast(sq, DType::F32)?, cast(sk, DType::F32)?, cast(sv, DType::F32)?);
            return cast(&causal_attention(&q32, &k32, &v32, shape, scale, rows)?, sq.dtype());
        }
        let dtype = sq.dtype();
        let dev = sq.dev();
        let (q_width, kv_width) = (n_heads * head_dim, n_kv_heads * head_dim);
        let out = dev.alloc_buf(dtype, rows * q_width)?;
        let batch = rows / seq_len;
        if rows == 0 || q_width == 0 {
            return Ok(CudaStorage::new(dev.clone(), out));
        }
        let (t, group, size) = (seq_len, n_heads / n_kv_heads, dtype.size_bytes() as u64);
        let scores_per_sequence = n_heads * t * t;
        let chunk = (SCORE_BYTES_PER_CHUNK / (scores_per_sequence * 4)).clamp(1, batch);
        let mut scores = dev.alloc::<f32>(chunk * scores_per_sequence)?;
        let mut probs = dev.alloc_buf(dtype, chunk * scores_per_sequence)?;
        let (q_base, k_base, v_base) = (address(dev, sq.buf()), address(dev, sk.buf()), address(dev, sv.buf()));
        let out_base = address(dev, &out);
        let scores_base = scores.device_ptr_mut(dev.stream()).0;
        let probs_base = address(dev, &probs);
        let window = kernel_dim("attention", sliding_window.map_or(seq_len, |w| w.min(seq_len)))?;
        let t32 = kernel_dim("attention", t)?;
        for first in (0..batch).step_by(chunk) {
            let n_seq = chunk.min(batch - first);
            // Matrix `(s, h)` of the chunk: sequence `first + s`, query head `h`, kv head `h / group`.
            let pairs = || (0..n_seq).flat_map(|s| (0..n_heads).map(move |h| (first + s, h, s * n_heads + h)));
            let q_of = |b: usize, h: usize| q_base + ((b * t * q_width + h * head_dim) as u64) * size;
            let kv_of = |base: u64, b: usize, h: usize| base + ((b * t * kv_width + (h / group) * head_dim) as u64) * size;
            let (ks, qs): (Vec<u64>, Vec<u64>) = pairs().map(|(b, h, _)| (kv_of(k_base, b, h), q_of(b, h))).unzip();
            let score_of: Vec<u64> = pairs().map(|(_, _, i)| scores_base + (i * t * t * 4) as u64).collect();
            Batched {
                dev,
                transa: cublasOperation_t::CUBLAS_OP_T,
                m: t,
                n: t,
                k: head_dim,
                a: (&ks, kv_width, dtype),
                b: (&qs, q_width, dtype),
                c: (&score_of, t, DType::F32),
            }
            .run()?;
            let n_rows = n_seq * n_heads * t;
            let cfg = LaunchConfig { grid_dim: (kernel_dim("attention", n_rows)?, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
            let kernel = dev.kernel(&CUDA_SOURCE, &format!("attention_softmax_{dtype}"))?;
            let mut args = kernel.args();
            args.arg(&scores);
            probs.arg_mut(&mut args);
            args.arg(&t32);
            args.arg(&window);
            args.arg(&scale);
            // SAFETY: attention_softmax_<t>(const float* scores, T* probs, u32 seq_len, u32 window,
            // float scale), the dtype that of probs: both buffers hold chunk * n_heads * t * t
            // values, of which the n_rows = n_seq * n_heads * t rows of t are read and written (one
            // block per row).
            unsafe { kernel.launch(args, cfg) }?;
            let vs: Vec<u64> = pairs().map(|(b, h, _)| kv_of(v_base, b, h)).collect();
            let prob_of: Vec<u64> = pairs().map(|(_, _, i)| probs_base + (i * t * t) as u64 * size).collect();
            let out_of: Vec<u64> = pairs().map(|(b, h, _)| out_base + ((b * t * q_width + h * head_dim) as u64) * size).collect();
            Batched {
                dev,
                transa: cublasOperation_t::CUBLAS_OP_N,
                m: head_dim,
                n: t,
                k: t,
                a: (&vs, kv_width, dtype),
                b: (&prob_of, t, dtype),
                c: (&out_of, q_width, dtype),
            }
            .run()?;
        }
        // The pointer arrays and buffers above are freed in stream order after the launches.
        drop((scores, probs));
        Ok(CudaStorage::new(dev.clone(), out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{randn, rel};
    use crate::rng::SplitMix64;
    use crate::DType;

    /// Attention written element by element in f64, with repeat_kv spelled out.
    fn reference(q: &[f32], k: &[f32], v: &[f32], s: AttentionShape, rows: usize, scale: f64) -> Vec<f64> {
        let (h_n, kv_n, hd, t) = (s.n_heads, s.n_kv_heads, s.head_dim, s.seq_len);
        let mut out = vec![0.0f64; rows * h_n * hd];
        for b in 0..rows / t {
            for h in 0..h_n {
                let kvh = h / (h_n / kv_n);
                for i in 0..t {
                    let qi = (b * t + i) * h_n * hd + h * hd;
                    let visible: Vec<usize> =
                        (0..=i).filter(|&j| s.sliding_window.is_none_or(|w| i - j < w)).collect();
                    let logits: Vec<f64> = visible
                        .iter()
                        .map(|&j| {
                            let kj = (b * t + j) * kv_n * hd + kvh * hd;
                            (0..hd).map(|d| q[qi + d] as f64 * k[kj + d] as f64).sum::<f64>() * scale
                        })
                        .collect();
                    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = logits.iter().map(|l| (l - max).exp()).sum();
                    for (&j, l) in visible.iter().zip(&logits) {
                        let p = (l - max).exp() / z;
                        let vj = (b * t + j) * kv_n * hd + kvh * hd;
                        for d in 0..hd {
                            out[qi + d] += p * v[vj + d] as f64;
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_f64_reference() {
        let mut rng = SplitMix64::new(11);
        let cases = [(4, 2, 16, 9, 2, None), (3, 3, 8, 33, 1, None), (6, 1, 4, 10, 3, Some(4)), (1, 1, 8, 1, 1, None)];
        for &(n_heads, n_kv_heads, head_dim, seq_len, batch, sliding_window) in &cases {
            let s = AttentionShape { n_heads, n_kv_heads, head_dim, seq_len, sliding_window };
            let rows = batch * seq_len;
            let q = randn(&mut rng, &[rows, n_heads * head_dim], 1.0, DType::F32);
            let k = randn(&mut rng, &[rows, n_kv_heads * head_dim], 1.0, DType::F32);
            let v = randn(&mut rng, &[rows, n_kv_heads * head_dim], 1.0, DType::F32);
            let scale = 1.0 / (head_dim as f32).sqrt();
            let got = causal_attention(&q, &k, &v, s, scale).unwrap();
            let want = reference(&q.to_f32_vec().unwrap(), &k.to_f32_vec().unwrap(), &v.to_f32_vec().unwrap(), s, rows, scale as f64);
            let e = rel(&got.to_f32_vec().unwrap(), &want);
            assert!(e < 1e-5, "{s:?}: {e}");
        }
    }

    #[test]
    fn rejects_heads_that_do_not_group() {
        let s = AttentionShape { n_heads: 3, n_kv_heads: 2, head_dim: 4, seq_len: 2, sliding_window: None };
        let q = Tensor::zeros(&[2, 12], DType::F32);
        let k = Tensor::zeros(&[2, 8], DType::F32);
        assert!(matches!(causal_attention(&q, &k, &k, s, 1.0), Err(Error::Shape { op: "attention", .. })));
    }
}
