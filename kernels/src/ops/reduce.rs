//! Reductions: per-column means, maxima, the AWQ search's squared distance and the relative error
//! used by every numeric test.

use super::{operands, Operands};
use crate::{Error, Result, Tensor};

/// Mean of |x| over the rows of `x[R, C]`, per column, accumulated in f64 (AWQ's `x_mean`). The
/// result is on the host whatever `x`'s device.
pub fn mean_abs_columns(x: &Tensor) -> Result<Vec<f32>> {
    let (r, c) = x.dims2("mean_abs_columns")?;
    match operands("mean_abs_columns", [x])? {
        Operands::Cpu => {
            let mut sums = vec![0.0f64; c];
            for row in x.f32_values()?.chunks_exact(c.max(1)) {
                sums.iter_mut().zip(row).for_each(|(s, v)| *s += v.abs() as f64);
            }
            Ok(sums.into_iter().map(|s| (s / r.max(1) as f64) as f32).collect())
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda([sx], _) => cuda::mean_abs_columns(sx, r, c),
    }
}

/// Largest |x| over all values (0 for an empty tensor; NaNs are skipped, as `f32::max` does). The
/// result is on the host whatever `x`'s device, and the same on both: a maximum does not depend on
/// the order it is taken in.
pub fn max_abs(x: &Tensor) -> Result<f32> {
    match operands("max_abs", [x])? {
        Operands::Cpu => Ok(x.f32_values()?.iter().fold(0.0f32, |m, v| m.max(v.abs()))),
        #[cfg(feature = "cuda")]
        Operands::Cuda([sx], _) => cuda::max_abs(sx),
    }
}

/// `sum (a - b)^2` over all elements: each difference in f32 (as AutoAWQ's f32 loss), its square
/// and the sum in f64 (the AWQ search's loss). Both tensors on one device, same shape (any dtypes
/// are read as f32). CPU and CUDA add in different orders: equal to ~1e-15 relative.
pub fn squared_distance(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.shape() != b.shape() {
        return Err(Error::Shape { op: "squared_distance", detail: format!("{:?} vs {:?}", a.shape(), b.shape()) });
    }
    match operands("squared_distance", [a, b])? {
        Operands::Cpu => {
            let (x, y) = (a.f32_values()?, b.f32_values()?);
            Ok(x.iter().zip(y.iter()).map(|(x, y)| ((x - y) as f64).powi(2)).sum())
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda([sa, sb], _) => cuda::squared_distance(&super::cast::cuda::cast(sa, sb.dtype())?, sb),
    }
}

/// `||out - reference|| / ||reference||` in f64: how numeric tests and benchmarks compare results.
pub fn relative_error(out: &Tensor, reference: &Tensor) -> Result<f64> {
    if out.shape() != reference.shape() {
        return Err(Error::Shape {
            op: "relative_error",
            detail: format!("{:?} vs {:?}", out.shape(), reference.shape()),
        });
    }
    let (a, b) = (out.f32_values()?, reference.f32_values()?);
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b.iter()) {
        let (x, y) = (*x as f64, *y as f64);
        num += (x - y) * (x - y);
        den += y * y;
    }
    Ok(if den == 0.0 { num.sqrt() } else { (num / den).sqrt() })
}

#[cfg(feature = "cuda")]
pub(crate) const CUDA_SOURCE: crate::cuda::CudaSource = crate::cuda::CudaSource {
    file: "ops/reduce.cu",
    code: include_str!("reduce.cu"),
    headers: &[],
    kernels: &[
        "mean_abs_columns_partial_f32", "mean_abs_columns_partial_f16", "mean_abs_columns_partial_bf16",
        "mean_abs_columns_finish",
        "max_abs_partial_f32", "max_abs_partial_f16", "max_abs_partial_bf16",
        "squared_distance_partial_f32", "squared_distance_partial_f16", "squared_distance_partial_bf16",
    ],
};

#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::{LaunchConfig, PushKernelArg};

    use super::CUDA_SOURCE;
    use crate::cuda::{kernel_dim, CudaStorage};
    use crate::Result;

    /// Rows per chunk of the first pass: at least 256, and few enough chunks for grid.y (< 2^16).
    fn rows_per_chunk(r: usize) -> usize {
        r.div_ceil(65535).max(256)
    }

    pub(super) fn mean_abs_columns(sx: &CudaStorage, r: usize, c: usize) -> Result<Vec<f32>> {
        if r == 0 || c == 0 {
            return Ok(vec![0.0; c]);
        }
        let dev = sx.dev();
        let chunk = rows_per_chunk(r);
        let n_chunks = r.div_ceil(chunk);
        let mut partial = dev.alloc::<f64>(n_chunks * c)?;
        let mut out = dev.alloc::<f32>(c)?;
        let (rows, cols) = (kernel_dim("mean_abs_columns", r)?, kernel_dim("mean_abs_columns", c)?);
        let (chunk32, chunks32) = (chunk as u32, n_chunks as u32);
        let col_blocks = c.div_ceil(256) as u32;
        let first = LaunchConfig { grid_dim: (col_blocks, chunks32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let kernel = dev.kernel(&CUDA_SOURCE, &format!("mean_abs_columns_partial_{}", sx.dtype()))?;
        let mut args = kernel.args();
        sx.buf().arg(&mut args);
        args.arg(&mut partial);
        args.arg(&rows);
        args.arg(&cols);
        args.arg(&chunk32);
        // SAFETY: mean_abs_columns_partial_<t>(const T* x, double* partial, u32 rows, u32 cols,
        // u32 rows_per_chunk), the dtype that of x: x holds rows * cols values, partial n_chunks *
        // cols (block (i, j) writes columns 256 i.. of chunk j, guarded by cols and rows).
        unsafe { kernel.launch(args, first) }?;
        let second = LaunchConfig { grid_dim: (col_blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let kernel = dev.kernel(&CUDA_SOURCE, "mean_abs_columns_finish")?;
        let mut args = kernel.args();
        args.arg(&partial);
        args.arg(&mut out);
        args.arg(&chunks32);
        args.arg(&cols);
        args.arg(&rows);
        // SAFETY: mean_abs_columns_finish(const double* partial, float* out, u32 n_chunks, u32
        // cols, u32 rows): partial holds n_chunks * cols sums (written above, in stream order),
        // out cols values; one thread per column, guarded by cols.
        unsafe { kernel.launch(args, second) }?;
        dev.download(&out)
    }

    /// At most this many blocks in `max_abs`'s pass, so the host folds at most this many partials.
    const MAX_ABS_BLOCKS: usize = 1024;

    /// Each block of 256 threads writes the maximum of its grid-stride share; the host folds the
    /// partial maxima (from 0, as the CPU does).
    pub(super) fn max_abs(sx: &CudaStorage) -> Result<f32> {
        let n = sx.len();
        if n == 0 {
            return Ok(0.0);
        }
        let dev = sx.dev();
        let blocks = n.div_ceil(256).min(MAX_ABS_BLOCKS);
        let mut partial = dev.alloc::<f32>(blocks)?;
        let n64 = n as u64;
        let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let kernel = dev.kernel(&CUDA_SOURCE, &format!("max_abs_partial_{}", sx.dtype()))?;
        let mut args = kernel.args();
        sx.buf().arg(&mut args);
        args.arg(&mut partial);
        args.arg(&n64);
        // SAFETY: max_abs_partial_<t>(const T* x, float* partial, u64 n), the dtype that of x: x
        // holds n values (grid-stride loop below n), partial one per block of the grid.
        unsafe { kernel.launch(args, cfg) }?;
        Ok(dev.download(&partial)?.into_iter().fold(0.0f32, f32::max))
    }

    /// Per-block f64 partial sums (at most MAX_ABS_BLOCKS), added on the host in block order.
    pub(super) fn squared_distance(sa: &CudaStorage, sb: &CudaStorage) -> Result<f64> {
        let n = sa.len();
        if n == 0 {
            return Ok(0.0);
        }
        let dev = sa.dev();
        let blocks = n.div_ceil(256).min(MAX_ABS_BLOCKS);
        let mut partial = dev.alloc::<f64>(blocks)?;
        let n64 = n as u64;
        let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let kernel = dev.kernel(&CUDA_SOURCE, &format!("squared_distance_partial_{}", sa.dtype()))?;
        let mut args = kernel.args();
        sa.buf().arg(&mut args);
        sb.buf().arg(&mut args);
        args.arg(&mut partial);
        args.arg(&n64);
        // SAFETY: squared_distance_partial_<t>(const T* a, const T* b, double* partial, u64 n):
        // a and b share one dtype (the caller cast a to b's) and hold n values each (same shape,
        // checked by `squared_distance`); partial holds one sum per block of the grid.
        unsafe { kernel.launch(args, cfg) }?;
        Ok(dev.download(&partial)?.into_iter().sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions_match_hand_values() {
        let x = Tensor::from_f32(&[2, 3], vec![1.0, -2.0, 3.0, -3.0, 2.0, 0.0]).unwrap();
        assert_eq!(mean_abs_columns(&x).unwrap(), vec![2.0, 2.0, 1.5]);
        assert_eq!(max_abs(&x).unwrap(), 3.0);
        let y = Tensor::from_f32(&[2, 3], vec![1.0, -2.0, 3.0, -3.0, 2.0, 1.0]).unwrap();
        let e = relative_error(&x, &y).unwrap();
        assert_eq!(squared_distance(&x, &y).unwrap(), 1.0);
        assert!((e - (1.0f64 / 28.0).sqrt()).abs() < 1e-12);
    }
}
