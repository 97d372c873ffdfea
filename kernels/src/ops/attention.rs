//! Causal scaled dot-product attention with grouped-query heads (Ainslie et al. 2023).
//!
//! Query head `h` reads key/value head `h / (n_heads / n_kv_heads)`, as `repeat_kv` does in the
//! Hugging Face models. Scores are `q k^T * scale`, masked to `j <= i` (and, with a sliding window
//! `w`, to `i - j < w`), soft-maxed in f32 and applied to v. Sequences are independent: rows of
//! different sequences in a batch never attend to each other.

use rayon::prelude::*;

use super::cpu_only;
use super::linear::{matmul_f32, StridedMatrix};
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
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, shape: AttentionShape, scale: f32) -> Result<Tensor> {
    cpu_only("attention", &[q, k, v])?;
    let AttentionShape { n_heads, n_kv_heads, head_dim, seq_len, sliding_window } = shape;
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
