//! AWQ's clip search for one linear (AutoAWQ 0.2.9, `_compute_best_clip` in
//! awq/quantize/quantizer.py).
//!
//! For each output row and quantization group, tries clipping the weights to
//! `±max|w| * (1 - i / n_grid)` for `i = 0 .. n_grid * max_shrink` and keeps the threshold whose
//! quantized partial products `x_group · Q(clip(w_group))` are closest (mean squared error over
//! the sampled tokens) to the original `x_group · w_group`. Tokens are every `step`-th row of the
//! input, `step = max(1, n_tokens / n_sample_tokens)`. Which linears are searched is the
//! descriptor's business (`clip_skip`), not this module's.

use awq_kernels::ops::{self, ClipGrid, QuantSpec};
use awq_kernels::Tensor;

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

/// Best clip threshold per `(output row, group)`, row-major `[out, in / group_size]`: samples every
/// `step`-th token of `x` (on `x`'s device) and runs [`ops::clip_thresholds`] where the tensors are.
pub fn search_clip(w: &Tensor, x: &Tensor, spec: QuantSpec, options: ClipOptions) -> Result<Vec<f32>> {
    let (n_tokens, _) = x.dims2("clip_search")?;
    let step = (n_tokens / options.n_sample_tokens.max(1)).max(1);
    let tokens: Vec<u32> = (0..n_tokens).step_by(step).map(|r| r as u32).collect();
    let sampled = ops::embedding(x, &tokens, x.dtype())?;
    let grid = ClipGrid { n_grid: options.n_grid, max_shrink: options.max_shrink };
    Ok(ops::clip_thresholds(w, &sampled, spec, grid)?)
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
