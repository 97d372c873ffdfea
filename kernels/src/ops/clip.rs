//! AWQ's clip search (AutoAWQ 0.2.9, `_compute_best_clip` in awq/quantize/quantizer.py), the
//! numeric part: for each output row `o` and quantization group `j` of a weight `w[out, in]`, try
//! clipping the group to `±max|w| * (1 - i / n_grid)` for `i = 0 .. n_grid * max_shrink`, and keep
//! the threshold whose quantized weights give partial products `x_t · Q(clip(w))` closest to the
//! original `x_t · w` (mean squared error over the sampled tokens `x_t`; the first of equal losses
//! wins). Which tokens are sampled and which linears are searched is the engine's business.
//!
//! The CPU reference computes the partial products for every candidate with the f32 GEMM. The
//! CUDA version uses that the loss is `d^T G d / t` with `d = Q(clip(w)) - w` and the group's Gram
//! matrix `G = X^T X` (quantize.cu): the tokens are read once, and a candidate costs `g^2`
//! multiply-adds instead of `t * g`. The two agree up to f32 rounding, which can only change a
//! choice between candidates whose losses tie to ~1e-6 (tests/cuda_ops.rs measures how often).

use rayon::prelude::*;

use super::linear::{matmul_f32, StridedMatrix};
use super::{operands, Operands, QuantSpec};
#[cfg(feature = "cuda")]
use crate::Device;
use crate::{Error, Result, Tensor};

/// The candidates: `n_grid` steps of `1 / n_grid`, the first `n_grid * max_shrink` of them
/// (AutoAWQ: 20 and 0.5, so 1.0 down to 0.55).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClipGrid {
    pub n_grid: usize,
    pub max_shrink: f32,
}

impl ClipGrid {
    fn n_shrink(&self) -> usize {
        (self.max_shrink * self.n_grid as f32) as usize
    }
}

/// The best clip threshold per `(output row, group)`, row-major `[out, in / group_size]`, of
/// `w[out, in]` for the sampled inputs `xs[t, in]` (same device). The result is on the host.
pub fn clip_thresholds(w: &Tensor, xs: &Tensor, spec: QuantSpec, grid: ClipGrid) -> Result<Vec<f32>> {
    let (_, in_f) = w.dims2("clip_thresholds")?;
    let (_, x_cols) = xs.dims2("clip_thresholds")?;
    if x_cols != in_f {
        return Err(Error::Shape { op: "clip_thresholds", detail: format!("inputs have {x_cols} channels, weight {in_f}") });
    }
    spec.check(in_f)?;
    if grid.n_grid == 0 {
        return Err(Error::Shape { op: "clip_thresholds", detail: "n_grid must be positive".into() });
    }
    match operands("clip_thresholds", [w, xs])? {
        Operands::Cpu => clip_cpu(w, xs, spec, grid),
        #[cfg(feature = "cuda")]
        Operands::Cuda([sw, sx], _) if matches!(spec.group_size.get(), 32 | 64 | 128) => {
            cuda::clip_thresholds(sw, sx, w.shape()[0], in_f, xs.shape()[0], spec, grid)
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda(..) => clip_cpu(&w.to_device(Device::Cpu)?, &xs.to_device(Device::Cpu)?, spec, grid),
    }
}

/// The reference: per group (in parallel), the original partial products once, then each
/// candidate's, with the f32 GEMM; losses in f64.
fn clip_cpu(w: &Tensor, xs: &Tensor, spec: QuantSpec, grid: ClipGrid) -> Result<Vec<f32>> {
    let (out_f, in_f) = (w.shape()[0], w.shape()[1]);
    let t = xs.shape()[0];
    let g = spec.group_size.get();
    let n_groups = in_f / g;
    let (xv, wv) = (xs.f32_values()?, w.f32_values()?);
    let per_group: Vec<Vec<f32>> = (0..n_groups)
        .into_par_iter()
        .map(|j| {
            let xg: Vec<f32> = (0..t).flat_map(|r| xv[r * in_f + j * g..r * in_f + (j + 1) * g].iter().copied()).collect();
            let w_group = |o: usize| &wv[o * in_f + j * g..o * in_f + (j + 1) * g];
            // org[t, out] = xg[t, g] · w_j[out, g]^T
            let mut org = vec![0.0f32; t * out_f];
            let w_view = StridedMatrix { data: &wv[j * g..], row_stride: 1, col_stride: in_f as isize };
            let x_view = StridedMatrix { data: &xg, row_stride: g as isize, col_stride: 1 };
            matmul_f32(t, out_f, g, x_view, w_view, &mut org, out_f, false, false);
            let org_max: Vec<f32> = (0..out_f).map(|o| w_group(o).iter().fold(0.0f32, |m, v| m.max(v.abs()))).collect();
            let mut best = org_max.clone();
            let mut min_err = vec![f64::INFINITY; out_f];
            let mut qw = vec![0.0f32; out_f * g];
            let mut cur = vec![0.0f32; t * out_f];
            for i_s in 0..grid.n_shrink() {
                let factor = 1.0 - i_s as f32 / grid.n_grid as f32;
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
                    let err =
                        (0..t).map(|r| ((cur[r * out_f + o] - org[r * out_f + o]) as f64).powi(2)).sum::<f64>() / t.max(1) as f64;
                    if err < min_err[o] {
                        min_err[o] = err;
                        best[o] = org_max[o] * factor;
                    }
                }
            }
            best
        })
        .collect();
    // [group][out] to [out][group].
    Ok((0..out_f).flat_map(|o| per_group.iter().map(move |b| b[o])).collect())
}

#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::{LaunchConfig, PushKernelArg};

    use super::ClipGrid;
    use crate::cuda::{kernel_dim, CudaStorage};
    use crate::ops::cast::cuda::cast;
    use crate::ops::quantize::CUDA_SOURCE;
    use crate::ops::QuantSpec;
    use crate::Result;

    /// Output rows per block of clip_search (quantize.cu's CLIP_ROWS).
    const CLIP_ROWS: usize = 128;

    /// The Gram matrices (one block per group), then the search (one block per group and 128 rows).
    pub(super) fn clip_thresholds(
        sw: &CudaStorage,
        xs: &CudaStorage,
        out_f: usize,
        in_f: usize,
        t: usize,
        spec: QuantSpec,
        grid: ClipGrid,
    ) -> Result<Vec<f32>> {
        let g = spec.group_size.get();
        let groups = in_f / g;
        if out_f == 0 || groups == 0 {
            return Ok(Vec::new());
        }
        let sx = cast(xs, sw.dtype())?;
        let dev = sw.dev();
        let dtype = sw.dtype();
        let mut gram = dev.alloc::<f32>(groups * g * g)?;
        let mut best = dev.alloc::<f32>(out_f * groups)?;
        let (t32, in32, out32) = (kernel_dim("clip", t)? as i32, kernel_dim("clip", in_f)? as i32, kernel_dim("clip", out_f)? as i32);
        let blocks = kernel_dim("clip", groups)?;
        if t == 0 {
            dev.stream().memset_zeros(&mut gram).map_err(dev.driver_error("cuMemsetD8"))?;
        } else {
            let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            let kernel = dev.kernel(&CUDA_SOURCE, &format!("clip_gram_{dtype}_g{g}"))?;
            let mut args = kernel.args();
            sx.buf().arg(&mut args);
            args.arg(&mut gram);
            args.arg(&t32);
            args.arg(&in32);
            // SAFETY: clip_gram_<t>_g<G>(const T* xs, float* gram, int t, int in), the dtype that
            // of xs (cast to w's above) and G its group size: xs holds t rows of `in` values,
            // gram `groups` G x G matrices; block j reads the G columns of group j < groups.
            unsafe { kernel.launch(args, cfg) }?;
        }
        let name = format!("clip_search_{dtype}_g{g}");
        let smem = (g * g + 8 * g) * 4;
        dev.allow_dynamic_shared(&CUDA_SOURCE, &name, smem)?;
        let row_blocks = u32::try_from(out_f.div_ceil(CLIP_ROWS)).unwrap_or(u32::MAX).min(65535);
        let cfg = LaunchConfig { grid_dim: (blocks, row_blocks, 1), block_dim: (256, 1, 1), shared_mem_bytes: smem as u32 };
        let (n_grid, n_shrink) = (grid.n_grid as i32, grid.n_shrink() as i32);
        let (zero_point, min_int, max_int) = (spec.zero_point as i32, spec.min_int(), spec.max_int());
        let kernel = dev.kernel(&CUDA_SOURCE, &name)?;
        let mut args = kernel.args();
        sw.buf().arg(&mut args);
        args.arg(&gram);
        args.arg(&mut best);
        args.arg(&out32);
        args.arg(&in32);
        args.arg(&n_grid);
        args.arg(&n_shrink);
        args.arg(&zero_point);
        args.arg(&min_int);
        args.arg(&max_int);
        // SAFETY: clip_search_<t>_g<G>(const T* w, const float* gram, float* best, int out, int in,
        // int n_grid, int n_shrink, int zero_point, float min_int, float max_int), the dtype that
        // of w: w holds out * in values, gram the groups' G x G matrices (written above, in stream
        // order), best out * groups; the (g^2 + 8g) * 4 bytes of dynamic shared memory were
        // allowed above, and rows past `out` are skipped by the kernel.
        unsafe { kernel.launch(args, cfg) }?;
        dev.download(&best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::GroupSize;
    use crate::rng::SplitMix64;

    #[test]
    fn clipping_helps_rows_with_an_outlier_and_shapes_are_checked() {
        // One row has a huge outlier in each group: clipping it costs little on the products
        // (its input channel is small) and buys resolution for the rest.
        let mut rng = SplitMix64::new(3);
        let (out_f, in_f, t) = (4, 64, 48);
        let mut w = rng.normal_vec(out_f * in_f, 0.1);
        for j in 0..2 {
            w[j * 32] = 3.0;
        }
        let mut x = rng.normal_vec(t * in_f, 1.0);
        for r in 0..t {
            x[r * in_f] *= 0.01;
            x[r * in_f + 32] *= 0.01;
        }
        let w = Tensor::from_f32(&[out_f, in_f], w).unwrap();
        let x = Tensor::from_f32(&[t, in_f], x).unwrap();
        let spec = QuantSpec { bits: 4, group_size: GroupSize::G32, zero_point: true };
        let grid = ClipGrid { n_grid: 20, max_shrink: 0.5 };
        let best = clip_thresholds(&w, &x, spec, grid).unwrap();
        assert_eq!(best.len(), out_f * 2);
        assert!(best[0] < 3.0 && best[1] < 3.0, "row 0 clips its outliers: {best:?}");
        let wv = w.f32_values().unwrap();
        for (i, &b) in best.iter().enumerate() {
            let max = wv[(i / 2) * in_f + (i % 2) * 32..][..32].iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!(b <= max && b >= 0.5 * max, "threshold {b} outside [0.5, 1] x {max}");
        }
        let bad = Tensor::from_f32(&[t, 32], vec![0.0; t * 32]).unwrap();
        assert!(clip_thresholds(&w, &bad, spec, grid).is_err());
    }
}
