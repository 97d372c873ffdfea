//! AWQ's scale search for one scaling group (AutoAWQ 0.2.9, `_search_best_scale` and
//! `_compute_best_scale` in awq/quantize/quantizer.py).
//!
//! The linears of a group share an input `x`. With `x_mean` the per-channel mean of |x| and
//! `w_mean` the per-channel mean of |w| / max|w| (max over each quantization group, mean over all
//! output rows of all the group's linears), each ratio `r = i / n_grid` gives scales
//! `s = clamp(x_mean^r / (w_mean^(1-r) + 1e-4), min 1e-4) / sqrt(max(s) min(s))`. The loss of a
//! ratio is the mean squared difference between the inspected module's output with the original
//! weights and with every linear of the group replaced by `Q(W diag(s)) diag(s)^-1`. The ratio with
//! the lowest loss wins (the first one on ties). Pure: weights are restored before returning.

use awq_kernels::ops::{self, QuantSpec};
use awq_kernels::Tensor;
use awq_model::arch::{BlockGroup, BlockInspect};
use awq_model::BlockWeights;

use crate::forward::{attention, mlp, BlockShape};
use crate::Result;

/// The outcome of one group's search.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleChoice {
    /// Per input channel of the group's linears.
    pub scales: Vec<f32>,
    pub best_ratio: f32,
    /// Loss at ratio 0 (plain quantization, `s = 1 / w_mean` normalised) and at the best ratio.
    pub loss_ratio0: f64,
    pub best_loss: f64,
}

/// Output of the module a group inspects, on input `x`, with the weights in `w` (`Mlp`: a sparse
/// block's whole mixture of experts, routed by its unchanged router).
pub fn inspect_output(
    inspect: BlockInspect,
    x: &Tensor,
    w: &BlockWeights,
    shape: &BlockShape,
    seq_len: usize,
) -> Result<Tensor> {
    Ok(match inspect {
        BlockInspect::Attention => attention(x, w, shape, seq_len)?.1,
        BlockInspect::Mlp => mlp(x, w, shape, false)?.1,
        BlockInspect::Linear(id) => {
            let l = w.linear(id);
            ops::linear(x, &l.weight, l.bias.as_ref())?
        }
    })
}

/// Per-column mean of |w| / (max |w| of its quantization group + 1e-6) over the rows of all
/// `weights` (AutoAWQ's `w_mean`), computed where the weights are.
fn weight_mean(weights: &[&Tensor], group_size: usize) -> Result<Vec<f32>> {
    let mut sums: Vec<f64> = Vec::new();
    let mut rows = 0usize;
    for w in weights {
        let s = ops::group_relative_abs_sums(w, group_size)?;
        if sums.is_empty() {
            sums = s;
        } else {
            sums.iter_mut().zip(s).for_each(|(a, b)| *a += b);
        }
        rows += w.dims2("scale_search")?.0;
    }
    Ok(sums.into_iter().map(|s| (s / rows.max(1) as f64) as f32).collect())
}

/// Mean squared difference in f64, computed where the tensors are.
fn mse(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok(ops::squared_distance(a, b)? / a.elem_count().max(1) as f64)
}

/// Scales for ratio `ratio` from the channel statistics (AutoAWQ's duo scaling).
pub fn scales_for_ratio(x_mean: &[f32], w_mean: &[f32], ratio: f32) -> Vec<f32> {
    let mut s: Vec<f32> =
        x_mean.iter().zip(w_mean).map(|(&x, &w)| (x.powf(ratio) / (w.powf(1.0 - ratio) + 1e-4)).max(1e-4)).collect();
    let (max, min) = s.iter().fold((f32::NEG_INFINITY, f32::INFINITY), |(hi, lo), &v| (hi.max(v), lo.min(v)));
    let norm = (max * min).sqrt();
    for v in &mut s {
        *v /= norm;
        if !v.is_finite() {
            *v = 1.0;
        }
    }
    s
}

/// Searches the best scales of `group` on its input `x`; `w` is left as it was found.
pub fn search_scale(
    group: &BlockGroup,
    x: &Tensor,
    w: &mut BlockWeights,
    shape: &BlockShape,
    seq_len: usize,
    spec: QuantSpec,
    n_grid: usize,
) -> Result<ScaleChoice> {
    let x_mean = ops::mean_abs_columns(x)?;
    let originals: Vec<Tensor> = group.linears.iter().map(|&id| w.linear(id).weight.clone()).collect();
    let w_mean = weight_mean(&originals.iter().collect::<Vec<_>>(), spec.group_size.get())?;
    let reference = inspect_output(group.inspect, x, w, shape, seq_len)?;

    let mut best: Option<ScaleChoice> = None;
    let mut loss_ratio0 = f64::NAN;
    let result = (|| -> Result<()> {
        for i in 0..n_grid {
            let ratio = i as f32 / n_grid as f32;
            let scales = scales_for_ratio(&x_mean, &w_mean, ratio);
            let inverse: Vec<f32> = scales.iter().map(|s| 1.0 / s).collect();
            for (&id, original) in group.linears.iter().zip(&originals) {
                let q = ops::pseudo_quantize(&ops::scale_columns(original, &scales)?, spec)?;
                w.linear_mut(id).weight = ops::scale_columns(&q, &inverse)?;
            }
            let loss = mse(&reference, &inspect_output(group.inspect, x, w, shape, seq_len)?)?;
            if i == 0 {
                loss_ratio0 = loss;
            }
            if best.as_ref().is_none_or(|b| loss < b.best_loss) {
                best = Some(ScaleChoice { scales, best_ratio: ratio, loss_ratio0, best_loss: loss });
            }
        }
        Ok(())
    })();
    for (&id, original) in group.linears.iter().zip(originals) {
        w.linear_mut(id).weight = original;
    }
    result?;
    let mut best = best.ok_or_else(|| crate::Error::Input("scale search: every ratio gave a NaN loss".into()))?;
    best.loss_ratio0 = loss_ratio0;
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use awq_kernels::ops::GroupSize;
    use awq_kernels::rng::SplitMix64;
    use awq_kernels::DType;
    use awq_model::arch::{BlockPrev, LinearRole};
    use awq_model::synthetic::{write_checkpoint, SyntheticSpec};
    use awq_model::Checkpoint;

    #[test]
    fn planted_outlier_channels_pull_the_ratio_up_and_the_loss_down() {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &SyntheticSpec::tiny_llama()).unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap();
        let shape = BlockShape::of(&ck);
        let mut w = ck.load_block(0).unwrap().into_dtype(DType::F32);
        let before = w.linear(LinearRole::Down).weight.clone();

        // Activations of the down projection with a few channels 30x larger than the rest: the
        // situation AWQ exists for (salient channels).
        let (rows, width) = (96, ck.config().intermediate_size);
        let mut rng = SplitMix64::new(17);
        let mut x = rng.normal_vec(rows * width, 1.0);
        for row in x.chunks_exact_mut(width) {
            for &c in &[3, 77, 150, 201] {
                row[c] *= 30.0;
            }
        }
        let x = Tensor::from_f32(&[rows, width], x).unwrap();
        let group = BlockGroup {
            prev: BlockPrev::Linear(LinearRole::Up.into()),
            linears: vec![LinearRole::Down.into()],
            inspect: BlockInspect::Linear(LinearRole::Down.into()),
        };
        let spec = QuantSpec { bits: 4, group_size: GroupSize::G64, zero_point: true };
        let choice = search_scale(&group, &x, &mut w, &shape, 32, spec, 20).unwrap();
        assert!(choice.best_ratio > 0.0, "ratio {}", choice.best_ratio);
        assert!(choice.best_loss < 0.8 * choice.loss_ratio0, "{} vs {}", choice.best_loss, choice.loss_ratio0);
        // The salient channels get the largest scales.
        let top = choice.scales.iter().cloned().fold(0.0f32, f32::max);
        assert!([3, 77, 150, 201].iter().all(|&c| choice.scales[c] > 0.5 * top));
        assert_eq!(w.linear(LinearRole::Down).weight, before, "the search must restore the weights");
    }

    #[test]
    fn scales_are_normalised_around_one() {
        let x_mean = [0.5f32, 2.0, 8.0, 1.0];
        let w_mean = [0.3f32, 0.6, 0.2, 0.9];
        for ratio in [0.0, 0.35, 0.95] {
            let s = scales_for_ratio(&x_mean, &w_mean, ratio);
            let (max, min) = s.iter().fold((0.0f32, f32::MAX), |(a, b), &v| (a.max(v), b.min(v)));
            assert!(((max * min).sqrt() - 1.0).abs() < 1e-5, "ratio {ratio}");
            // The formula, written out for channel 2.
            let raw = |c: usize| (x_mean[c].powf(ratio) / (w_mean[c].powf(1.0 - ratio) + 1e-4)).max(1e-4);
            let raws: Vec<f32> = (0..4).map(raw).collect();
            let norm = (raws.iter().cloned().fold(0.0f32, f32::max) * raws.iter().cloned().fold(f32::MAX, f32::min)).sqrt();
            assert!((s[2] - raw(2) / norm).abs() < 1e-6);
        }
    }
}
