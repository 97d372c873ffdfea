//! Per-group views of a weight matrix `w[out, in]`, where a group is `group_size` consecutive
//! values of one row (the quantization group): the largest |w| of each group, clamping each group
//! to its own threshold (AWQ's clip), and AWQ's group-relative weight magnitude (`w_mean` of the
//! scale search). They exist as ops so that the engine never copies a block's weights to the host
//! between its phases.

use rayon::prelude::*;

use super::{operands, Operands};
#[cfg(feature = "cuda")]
use crate::Device;
use crate::{Error, Result, Tensor};

/// Rows per partial sum of [`group_relative_abs_sums`], on every device: the chunks are added in
/// order, so CPU and CUDA add the same numbers in the same order.
const ROWS_PER_CHUNK: usize = 256;

fn check_groups(op: &'static str, w: &Tensor, group_size: usize) -> Result<(usize, usize)> {
    let (rows, cols) = w.dims2(op)?;
    if group_size == 0 || cols % group_size != 0 {
        return Err(Error::Shape { op, detail: format!("{cols} columns are not a whole number of groups of {group_size}") });
    }
    Ok((rows, cols))
}

/// The largest |w| of each group, row-major `[out, in / group_size]`, on the host. Exact (a maximum
/// does not depend on the order it is taken in), so equal on every device; NaNs are skipped.
pub fn max_abs_groups(w: &Tensor, group_size: usize) -> Result<Vec<f32>> {
    check_groups("max_abs_groups", w, group_size)?;
    match operands("max_abs_groups", [w])? {
        Operands::Cpu => Ok(w.f32_values()?.par_chunks(group_size).map(|g| g.iter().fold(0.0f32, |m, v| m.max(v.abs()))).collect()),
        #[cfg(feature = "cuda")]
        Operands::Cuda([sw], _) => {
            let (rows, cols) = w.dims2("max_abs_groups")?;
            let maxima = cuda::max_abs_groups(sw, rows, cols, group_size)?;
            Ok(Tensor::from_cuda(&[rows, cols / group_size], maxima).to_device(Device::Cpu)?.to_f32_vec()?)
        }
    }
}

/// `w` with every group clamped to `±max_val[group]` (`max_val` row-major `[out, in / group_size]`),
/// in `w`'s dtype and on its device. Bit-identical on every device: a clamp is exact, and the one
/// rounding back to the dtype is the same.
pub fn clamp_groups(w: &Tensor, max_val: &[f32], group_size: usize) -> Result<Tensor> {
    let (rows, cols) = check_groups("clamp_groups", w, group_size)?;
    if max_val.len() != rows * (cols / group_size) {
        return Err(Error::Shape {
            op: "clamp_groups",
            detail: format!("{} thresholds for a [{rows}, {cols}] weight in groups of {group_size}", max_val.len()),
        });
    }
    match operands("clamp_groups", [w])? {
        Operands::Cpu => {
            let mut values = w.to_f32_vec()?;
            values.par_chunks_mut(group_size).zip(max_val.par_iter()).for_each(|(group, &m)| {
                // Written out rather than `f32::clamp`, which panics on a NaN threshold.
                group.iter_mut().for_each(|v| *v = if *v < -m { -m } else if *v > m { m } else { *v });
            });
            Tensor::from_f32_as(w.shape(), values, w.dtype())
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda([sw], _) => cuda::clamp_groups(sw, w.shape(), max_val, group_size),
    }
}

/// Per column `c`, the sum over rows `r` of `|w[r, c]| / (max |w| of c's group in row r + 1e-6)`,
/// in f64, on the host: AWQ's `w_mean` before the division by the row count (the scale search adds
/// the sums of all the linears of a group, then divides). Each term is computed in f32, the sum
/// runs over chunks of 256 rows that are then added in order, on every device, so CPU and CUDA
/// agree bit for bit.
pub fn group_relative_abs_sums(w: &Tensor, group_size: usize) -> Result<Vec<f64>> {
    let (_, cols) = check_groups("group_relative_abs_sums", w, group_size)?;
    let partials = match operands("group_relative_abs_sums", [w])? {
        Operands::Cpu => {
            let values = w.f32_values()?;
            values
                .par_chunks(ROWS_PER_CHUNK * cols.max(1))
                .map(|chunk| {
                    let mut sums = vec![0.0f64; cols];
                    for row in chunk.chunks_exact(cols) {
                        for (j, group) in row.chunks_exact(group_size).enumerate() {
                            let max = group.iter().fold(0.0f32, |m, v| m.max(v.abs())) + 1e-6;
                            for (s, v) in sums[j * group_size..(j + 1) * group_size].iter_mut().zip(group) {
                                *s += (v.abs() / max) as f64;
                            }
                        }
                    }
                    sums
                })
                .collect::<Vec<_>>()
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda([sw], _) => cuda::group_relative_abs_partials(sw, w.dims2("group_relative_abs_sums")?.0, cols, group_size)?,
    };
    let mut total = vec![0.0f64; cols];
    for chunk in partials {
        total.iter_mut().zip(chunk).for_each(|(t, s)| *t += s);
    }
    Ok(total)
}

#[cfg(feature = "cuda")]
pub(crate) const CUDA_SOURCE: crate::cuda::CudaSource = crate::cuda::CudaSource {
    file: "ops/groups.cu",
    code: include_str!("groups.cu"),
    headers: &[],
    kernels: &[
        "max_abs_groups_f32", "max_abs_groups_f16", "max_abs_groups_bf16",
        "clamp_groups_f32", "clamp_groups_f16", "clamp_groups_bf16",
        "group_relative_abs_partial_f32", "group_relative_abs_partial_f16", "group_relative_abs_partial_bf16",
    ],
};

#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::{LaunchConfig, PushKernelArg};

    use super::{CUDA_SOURCE, ROWS_PER_CHUNK};
    use crate::cuda::{grid_for, kernel_dim, CudaStorage};
    use crate::{DType, Result, Tensor};

    /// One warp per group, 8 groups per block of 256 threads; the maxima stay on the device, as f32
    /// `[rows, cols / group_size]`.
    pub(super) fn max_abs_groups(sw: &CudaStorage, rows: usize, cols: usize, group_size: usize) -> Result<CudaStorage> {
        let dev = sw.dev();
        let n_groups = rows * (cols / group_size);
        let mut out = dev.alloc_buf(DType::F32, n_groups)?;
        if n_groups > 0 {
            let (groups64, g) = (n_groups as u64, kernel_dim("max_abs_groups", group_size)?);
            let kernel = dev.kernel(&CUDA_SOURCE, &format!("max_abs_groups_{}", sw.dtype()))?;
            let mut args = kernel.args();
            sw.buf().arg(&mut args);
            out.arg_mut(&mut args);
            args.arg(&groups64);
            args.arg(&g);
            // SAFETY: max_abs_groups_<t>(const T* w, float* out, u64 n_groups, u32 g), the dtype
            // that of w: w holds n_groups groups of g values (whole groups: checked by
            // `check_groups`), out one f32 per group; warps stride over groups below n_groups.
            unsafe { kernel.launch(args, grid_for(n_groups * 32, 256)) }?;
        }
        Ok(CudaStorage::new(dev.clone(), out))
    }

    pub(super) fn clamp_groups(sw: &CudaStorage, shape: &[usize], max_val: &[f32], group_size: usize) -> Result<Tensor> {
        let dev = sw.dev();
        let n = sw.len();
        let mut out = dev.alloc_buf(sw.dtype(), n)?;
        if n > 0 {
            let thresholds = dev.upload(max_val)?;
            let (n64, g) = (n as u64, kernel_dim("clamp_groups", group_size)?);
            let kernel = dev.kernel(&CUDA_SOURCE, &format!("clamp_groups_{}", sw.dtype()))?;
            let mut args = kernel.args();
            sw.buf().arg(&mut args);
            args.arg(&thresholds);
            out.arg_mut(&mut args);
            args.arg(&n64);
            args.arg(&g);
            // SAFETY: clamp_groups_<t>(const T* w, const float* max_val, T* out, u64 n, u32 g), the
            // dtype that of w and out: both hold n values, max_val n / g thresholds (checked by
            // `clamp_groups`), read at i / g for i < n.
            unsafe { kernel.launch(args, grid_for(n, 256)) }?;
        }
        Ok(Tensor::from_cuda(shape, CudaStorage::new(dev.clone(), out)))
    }

    /// The group maxima first (on the device), then one thread per column and chunk of rows; the
    /// chunks' sums come back to the host, which adds them in order.
    pub(super) fn group_relative_abs_partials(sw: &CudaStorage, rows: usize, cols: usize, group_size: usize) -> Result<Vec<Vec<f64>>> {
        if rows == 0 || cols == 0 {
            return Ok(Vec::new());
        }
        let sm = max_abs_groups(sw, rows, cols, group_size)?;
        let dev = sw.dev();
        let n_chunks = rows.div_ceil(ROWS_PER_CHUNK);
        let mut partial = dev.alloc::<f64>(n_chunks * cols)?;
        let (rows32, cols32, g) = (
            kernel_dim("group_relative_abs_sums", rows)?,
            kernel_dim("group_relative_abs_sums", cols)?,
            kernel_dim("group_relative_abs_sums", group_size)?,
        );
        let chunk32 = ROWS_PER_CHUNK as u32;
        let cfg = LaunchConfig {
            grid_dim: (cols.div_ceil(256) as u32, kernel_dim("group_relative_abs_sums", n_chunks)?, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let kernel = dev.kernel(&CUDA_SOURCE, &format!("group_relative_abs_partial_{}", sw.dtype()))?;
        let mut args = kernel.args();
        sw.buf().arg(&mut args);
        sm.buf().arg(&mut args);
        args.arg(&mut partial);
        args.arg(&rows32);
        args.arg(&cols32);
        args.arg(&g);
        args.arg(&chunk32);
        // SAFETY: group_relative_abs_partial_<t>(const T* w, const float* maxima, double* partial,
        // u32 rows, u32 cols, u32 g, u32 rows_per_chunk), the dtype that of w: w holds rows * cols
        // values, maxima rows * cols / g (written above, in stream order), partial n_chunks * cols;
        // thread (column, chunk) is guarded by cols and rows.
        unsafe { kernel.launch(args, cfg) }?;
        Ok(dev.download(&partial)?.chunks_exact(cols).map(<[f64]>::to_vec).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use crate::DType;

    #[test]
    fn group_maxima_and_clamps_follow_the_groups() {
        let w = Tensor::from_f32(&[2, 4], vec![1.0, -3.0, 0.5, 0.25, -2.0, 1.0, 4.0, -8.0]).unwrap();
        assert_eq!(max_abs_groups(&w, 2).unwrap(), vec![3.0, 0.5, 2.0, 8.0]);
        let clamped = clamp_groups(&w, &[2.0, 0.3, 1.5, 5.0], 2).unwrap();
        assert_eq!(clamped.to_f32_vec().unwrap(), vec![1.0, -2.0, 0.3, 0.25, -1.5, 1.0, 4.0, -5.0]);
        assert!(clamp_groups(&w, &[1.0; 3], 2).is_err());
        assert!(max_abs_groups(&w, 3).is_err());
    }

    #[test]
    fn relative_sums_match_the_formula_in_f64() {
        // 600 rows: three chunks, the last one partial.
        let (rows, cols, g) = (600, 96, 32);
        let mut rng = SplitMix64::new(3);
        let values = rng.normal_vec(rows * cols, 0.7);
        let w = Tensor::from_f32_as(&[rows, cols], values.clone(), DType::F16).unwrap();
        let got = group_relative_abs_sums(&w, g).unwrap();
        let stored = w.to_f32_vec().unwrap();
        let mut want = vec![0.0f64; cols];
        for row in stored.chunks_exact(cols) {
            for (j, group) in row.chunks_exact(g).enumerate() {
                let max = group.iter().map(|v| v.abs() as f64).fold(0.0, f64::max) + 1e-6;
                for (k, v) in group.iter().enumerate() {
                    want[j * g + k] += v.abs() as f64 / max;
                }
            }
        }
        let rel = super::super::test_util::rel(&got.iter().map(|&v| v as f32).collect::<Vec<_>>(), &want);
        assert!(rel < 1e-6, "{rel}");
        // Every term is at most 1, and the largest of each group is (almost) exactly 1.
        assert!(got.iter().all(|&s| s > 0.0 && s <= rows as f64));
    }
}
