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
