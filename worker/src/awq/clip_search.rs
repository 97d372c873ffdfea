//! AWQ's clip search for one linear (AutoAWQ 0.2.9, `_compute_best_clip` in
//! awq/quantize/quantizer.py).
//!
//! For each output row and quantization group, tries clipping the weights to
//! `±max|w| * (1 - i / n_grid)` for `i = 0 .. n_grid * max_shrink` and keeps the threshold whose
//! quantized partial products `x_group · Q(clip(w_group))` are closest (mean squared error over
//! the sampled tokens) to the original `x_group · w_group`. Tokens are every `step`-th row of the
//! input, `step = max(1, n_tokens / n_sample_tokens)`. Which linears are searched is the
//! descriptor's business (`clip_skip`), not this module's.

use awq_kernels::ops::{matmul_f32, QuantSpec, StridedMatrix};
use awq_kernels::Tensor;
use rayon::prelude::*;

use crate::Result;

/// Clip search settings (AutoAWQ's defaults: 20, 0.5, 512).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClipOptions {
    pub n_grid: usize,
    pub max_shrink: f32,
    pub n_sample_tokens: usize,
}

impl Default for ClipOptions {
    fn default() -> Self {
        ClipOptions { n_grid: 20, max_shrink: 0.5, n_sample_tokens: 512 }
    }
}

/// Best clip threshold per `(output row, group)`, row-major `[out, in / group_size]`.
pub fn search_clip(w: &Tensor, x: &Tensor, spec: QuantSpec, options: ClipOptions) -> Result<Vec<f32>> {
    let (out_f, in_f) = w.dims2("clip_search")?;
    let (n_tokens, x_cols) = x.dims2("clip_search")?;
    if x_cols != in_f {
        return Err(crate::Error::Input(format!("clip search: input has {x_cols} channels, weight {in_f}")));
    }
    spec.check(in_f)?;
    let g = spec.group_size;
    let n_groups = in_f / g;
    let step = (n_tokens / options.n_sample_tokens).max(1);
    let xv = x.f32_values();
    let wv = w.f32_values();
    let tokens: Vec<usize> = (0..n_tokens).step_by(step).collect();
    let t = tokens.len();
    let n_shrink = (options.max_shrink * options.n_grid as f32) as usize;

    // One task per group: its sampled inputs [t, g], then each output row's candidates.
    let per_group: Vec<Vec<f32>> = (0..n_groups)
        .into_par_iter()
        .map(|j| {
            let xs: Vec<f32> = tokens.iter().flat_map(|&r| xv[r * in_f + j * g..r * in_f + (j + 1) * g].iter().copied()).collect();
            let w_group = |o: usize| &wv[o * in_f + j * g..o * in_f + (j + 1) * g];
            // org_out[t, out] = xs[t, g] · w_j[out, g]^T
            let mut org = vec![0.0f32; t * out_f];
            let w_view = StridedMatrix { data: &wv[j * g..], row_stride: 1, col_stride: in_f as isize };
            let x_view = StridedMatrix { data: &xs, row_stride: g as isize, col_stride: 1 };
            matmul_f32(t, out_f, g, x_view, w_view, &mut org, out_f, false, false);
            let org_max: Vec<f32> = (0..out_f).map(|o| w_group(o).iter().fold(0.0f32, |m, v| m.max(v.abs()))).collect();
            let mut best = org_max.clone();
            let mut min_err = vec![1e9f64; out_f];
            let mut qw = vec![0.0f32; out_f * g];
            let mut cur = vec![0.0f32; t * out_f];
            for i_s in 0..n_shrink {
                let factor = 1.0 - i_s as f32 / options.n_grid as f32;
                for o in 0..out_f {
                    let max_val = org_max[o] * factor;
                    let dst = &mut qw[o * g..(o + 1) * g];
                    for (d, &v) in dst.iter_mut().zip(w_group(o)) {
                        *d = v.clamp(-max_val, max_val);
                    }
                    let (scale, zero) = spec.group_params(dst);
                    dst.iter_mut().for_each(|v| *v = (spec.code(*v, scale, zero) - zero) * scale);
                }
                let q_view = StridedMatrix { data: &qw, row_stride: 1, col_stride: g as isize };
                matmul_f32(t, out_f, g, x_view, q_view, &mut cur, out_f, false, false);
                for o in 0..out_f {
                    let err = (0..t).map(|r| ((cur[r * out_f + o] - org[r * out_f + o]) as f64).powi(2)).sum::<f64>() / t as f64;
                    if err < min_err[o] {
                        min_err[o] = err;
                        best[o] = org_max[o] * factor;
                    }
                }
            }
            best
        })
        .collect();
    // Transpose [group][out] to [out][group].
    Ok((0..out_f).flat_map(|o| per_group.iter().map(move |b| b[o])).collect())
}

/// Clamps each `(row, group)` of `w` to `±max_val` (on the host; the result is on `w`'s device).
pub fn apply_clip(w: &Tensor, max_val: &[f32], group_size: usize) -> Result<Tensor> {
    let (out_f, in_f) = w.dims2("apply_clip")?;
    if group_size == 0 || in_f % group_size != 0 || max_val.len() != out_f * (in_f / group_size) {
        return Err(crate::Error::Input(format!(
            "apply_clip: {} thresholds for a [{out_f}, {in_f}] weight in groups of {group_size}",
            max_val.len()
        )));
    }
    let mut values = w.to_f32_vec();
    for (group, &m) in values.chunks_exact_mut(group_size).zip(max_val) {
        group.iter_mut().for_each(|v| *v = v.clamp(-m, m));
    }
    Ok(Tensor::from_f32_as(&[out_f, in_f], values, w.dtype())?.to_device(w.device())?)
}
