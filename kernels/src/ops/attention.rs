//! Causal scaled dot-product attention with grouped-query heads (Ainslie et al. 2023).
//!
//! Query head `h` reads key/value head `h / (n_heads / n_kv_heads)`, as `repeat_kv` does in the
//! Hugging Face models. Scores are `q k^T * scale`, masked to `j <= i` (and, with a sliding window
//! `w`, to `i - j < w`), soft-maxed in f32 and applied to v. Sequences are independent: rows of
//! different sequences in a batch never attend to each other.
//!
//! The CPU reference forms each (sequence, head)'s score matrix with the gemm crate; the CUDA
//! version (`attention.cu`) is flash-style and never stores it, for heads of up to 256 values.

use rayon::prelude::*;

use super::common_device;
use super::linear::{matmul_f32, StridedMatrix};
use crate::{Device, Error, Result, Tensor};

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
/// Errors: [`Error::Shape`] when the shapes disagree with `shape`, or, on CUDA, when `head_dim`
/// exceeds 256.
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
    match common_device("attention", &[q, k, v])? {
        Device::Cpu => attention_cpu(q, k, v, shape, scale, rows),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::causal_attention(q, k, v, shape, scale, rows),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(ordinal) => Err(super::built_without_cuda(ordinal)),
    }
}

/// The reference, on shapes `causal_attention` checked.
fn attention_cpu(q: &Tensor, k: &Tensor, v: &Tensor, shape: AttentionShape, scale: f32, rows: usize) -> Result<Tensor> {
    let AttentionShape { n_heads, n_kv_heads, head_dim, seq_len, sliding_window } = shape;
    let (q_width, kv_width) = (n_heads * head_dim, n_kv_heads * head_dim);
    let (qv, kv, vv) = (q.f32_values(), k.f32_values(), v.f32_values());
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
pub(crate) const CUDA_SOURCE: crate::cuda::KernelSource = crate::cuda::KernelSource {
    file: "ops/attention.cu",
    text: include_str!("attention.cu"),
    kernels: &[
        "causal_attention_f32_hd64", "causal_attention_f32_hd128", "causal_attention_f32_hd256",
        "causal_attention_f16_hd64", "causal_attention_f16_hd128", "causal_attention_f16_hd256",
        "causal_attention_bf16_hd64", "causal_attention_bf16_hd128", "causal_attention_bf16_hd256",
    ],
};

#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::LaunchConfig;

    use super::{AttentionShape, CUDA_SOURCE};
    use crate::cuda::{kernel_dim, launch, CudaStorage};
    use crate::ops::cast;
    use crate::{DType, Error, Result, Tensor};

    /// Query rows per block, keys per tile and threads per block of `attention.cu` (`BLOCK_Q`,
    /// `BLOCK_KV`, `THREADS`): keep in step with the kernel.
    const BLOCK_Q: usize = 32;
    const BLOCK_KV: usize = 32;
    const THREADS: u32 = 128;

    /// The head widths the kernel is compiled for (`_hd64`, ...): per query row, each lane holds
    /// `HD_MAX / 32` output accumulators in registers, so a head wider than the last is refused.
    const HEAD_DIM_BUCKETS: [usize; 3] = [64, 128, 256];

    /// Bytes of dynamic shared memory per block for heads of `head_dim`: the layout at the top of
    /// `attention.cu` (q_s, kv_s, p_s, in f32).
    fn shared_bytes(head_dim: usize) -> usize {
        let q_stride = head_dim.next_multiple_of(4);
        let kv_stride = head_dim.next_multiple_of(8) + 4;
        (BLOCK_Q * q_stride + BLOCK_KV * kv_stride + BLOCK_Q * BLOCK_KV) * size_of::<f32>()
    }

    /// A block per (sequence, head, 32 queries) of 128 threads; 21 KiB of shared memory for heads
    /// of 64, 37 KiB for 128, 69 KiB for 256 (above 48 KiB the kernel opts in, as it must).
    pub(super) fn causal_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        shape: AttentionShape,
        scale: f32,
        rows: usize,
    ) -> Result<Tensor> {
        let AttentionShape { n_heads, n_kv_heads, head_dim, seq_len, sliding_window } = shape;
        let Some(bucket) = HEAD_DIM_BUCKETS.into_iter().find(|&b| head_dim <= b) else {
            return Err(Error::Shape {
                op: "attention",
                detail: format!(
                    "head dim {head_dim}: the CUDA kernel holds heads of at most {} values",
                    HEAD_DIM_BUCKETS[HEAD_DIM_BUCKETS.len() - 1]
                ),
            });
        };
        // The kernels read q, k and v in one dtype. Mixed dtypes (rare: all three come from linears
        // of one input) run on f32 copies; widening is exact, so the result is the same.
        if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
            let (q32, k32, v32) = (cast(q, DType::F32)?, cast(k, DType::F32)?, cast(v, DType::F32)?);
            return cast(&causal_attention(&q32, &k32, &v32, shape, scale, rows)?, q.dtype());
        }
        let sq = q.cuda_storage().expect("dispatched on CUDA");
        let (sk, sv) = (k.cuda_storage().expect("same device"), v.cuda_storage().expect("same device"));
        let dev = sq.dev();
        let width = n_heads * head_dim;
        let mut out = dev.alloc_buf(q.dtype(), rows * width)?;
        if rows > 0 && width > 0 {
            let batch = rows / seq_len;
            let blocks = kernel_dim("attention", seq_len.div_ceil(BLOCK_Q) * n_heads * batch)?;
            let smem = shared_bytes(head_dim);
            let name = format!("causal_attention_{}_hd{bucket}", q.dtype());
            dev.allow_dynamic_shared(&CUDA_SOURCE, &name, smem)?;
            // No window is a window of the whole sequence.
            let window = sliding_window.map_or(seq_len, |w| w.min(seq_len));
            let (seq_len32, heads32) = (kernel_dim("attention", seq_len)?, kernel_dim("attention", n_heads)?);
            let (kv_heads32, head_dim32) = (kernel_dim("attention", n_kv_heads)?, kernel_dim("attention", head_dim)?);
            let window32 = kernel_dim("attention", window)?;
            let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: smem as u32 };
            launch!(dev, &CUDA_SOURCE, name, cfg, |args| {
                sq.buf().arg(&mut args);
                sk.buf().arg(&mut args);
                sv.buf().arg(&mut args);
                out.arg_mut(&mut args);
                args.arg(&seq_len32);
                args.arg(&heads32);
                args.arg(&kv_heads32);
                args.arg(&head_dim32);
                args.arg(&window32);
                args.arg(&scale);
            })?;
        }
        Ok(Tensor::from_cuda(&[rows, width], CudaStorage::new(dev.clone(), out)))
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
            let want = reference(&q.to_f32_vec(), &k.to_f32_vec(), &v.to_f32_vec(), s, rows, scale as f64);
            let e = rel(&got.to_f32_vec(), &want);
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
