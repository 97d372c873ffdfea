//! Row-wise softmax, stabilised by subtracting the row maximum.

use rayon::prelude::*;

use super::{operands, Operands};
use crate::{Error, Indices, Result, Tensor};

/// Softmax over the last dimension of a matrix; output in `x`'s dtype.
pub fn softmax_rows(x: &Tensor) -> Result<Tensor> {
    let (r, c) = x.dims2("softmax")?;
    match operands("softmax", [x])? {
        Operands::Cpu => softmax_cpu(x, r, c),
        #[cfg(feature = "cuda")]
        Operands::Cuda([sx], _) => cuda::softmax_rows(sx, r, c),
    }
}

/// What [`argmax_rows`] answers for a row holding a NaN or an infinity.
pub const NOT_FINITE: u32 = u32::MAX;

/// Per row of `x[rows, cols]`, the index of its largest value (the lowest index among equal ones),
/// or [`NOT_FINITE`] for a row holding a NaN or an infinity; on the host. What a greedy sampler
/// needs of a row of logits, without copying the row (128k values per token for Llama 3).
pub fn argmax_rows(x: &Tensor) -> Result<Vec<u32>> {
    let (r, _) = x.dims2("argmax")?;
    let mut out = Indices::zeros(r, x.device())?;
    argmax_rows_into(x, &mut out)?;
    Ok(out.read_back()?.to_vec())
}

/// [`argmax_rows`] into the first `rows` entries of `out` (on `x`'s device), without waiting for
/// it: on a CUDA device the host copy of `out` is stale until [`Indices::read_back`] (what a
/// recorded [`crate::Graph`] does: its output stays on the device until the replay is read).
///
/// Errors: [`Error::Shape`] when `out` has fewer entries than `x` rows,
/// [`Error::DeviceMismatch`] when it is on another device.
pub fn argmax_rows_into(x: &Tensor, out: &mut Indices) -> Result<()> {
    let (r, c) = x.dims2("argmax")?;
    if out.len() < r {
        return Err(Error::Shape { op: "argmax", detail: format!("{r} rows into {} indices", out.len()) });
    }
    if out.device() != x.device() {
        return Err(Error::DeviceMismatch { op: "argmax", first: x.device(), other: out.device() });
    }
    match operands("argmax", [x])? {
        Operands::Cpu => {
            let values = x.f32_values()?;
            for (o, row) in out.values_mut().iter_mut().zip(values.chunks_exact(c.max(1)).take(r)) {
                *o = match row.iter().all(|v| v.is_finite()) {
                    false => NOT_FINITE,
                    // The first of the largest values: `>` keeps an earlier equal one.
                    true => row.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 || i == 0 { (i, v) } else { best }).0 as u32,
                };
            }
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda([sx], _) => cuda::argmax_rows_into(sx, r, c, out),
    }
}

/// The reference: f32 maximum and exponentials, f64 sum.
fn softmax_cpu(x: &Tensor, r: usize, c: usize) -> Result<Tensor> {
    let mut out = x.to_f32_vec()?;
    out.par_chunks_mut(c.max(1)).for_each(|row| {
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f64;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v as f64;
        }
        let inv = (1.0 / sum) as f32;
        row.iter_mut().for_each(|v| *v *= inv);
    });
    Tensor::from_f32_as(&[r, c], out, x.dtype())
}

#[cfg(feature = "cuda")]
pub(crate) const CUDA_SOURCE: crate::cuda::CudaSource = crate::cuda::CudaSource {
    file: "ops/softmax.cu",
    code: include_str!("softmax.cu"),
    headers: &[],
    kernels: &[
        "softmax_rows_f32", "softmax_rows_f16", "softmax_rows_bf16",
        "argmax_rows_f32", "argmax_rows_f16", "argmax_rows_bf16",
    ],
};

#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::{LaunchConfig, PushKernelArg};

    use super::CUDA_SOURCE;
    use crate::cuda::{kernel_dim, CudaStorage};
    use crate::{Error, Indices, Result, Tensor};

    /// One block per row, one thread per 32-value slice of the row up to 1024 threads.
    pub(super) fn softmax_rows(sx: &CudaStorage, r: usize, c: usize) -> Result<Tensor> {
        let dev = sx.dev();
        let mut out = dev.alloc_buf(sx.dtype(), r * c)?;
        if r > 0 && c > 0 {
            let (rows, cols) = (kernel_dim("softmax", r)?, kernel_dim("softmax", c)?);
            let threads = (c.div_ceil(32) * 32).clamp(32, 1024) as u32;
            let cfg = LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
            let kernel = dev.kernel(&CUDA_SOURCE, &format!("softmax_rows_{}", sx.dtype()))?;
            let mut args = kernel.args();
            sx.buf().arg(&mut args);
            out.arg_mut(&mut args);
            args.arg(&cols);
            // SAFETY: softmax_rows_<t>(const T* x, T* out, u32 cols), the dtype that of x and out:
            // both hold r rows of c values (r blocks, block b on row b only).
            unsafe { kernel.launch(args, cfg) }?;
        }
        Ok(Tensor::from_cuda(&[r, c], CudaStorage::new(dev.clone(), out)))
    }

    /// One block of up to 1024 threads per row, writing `out`'s device copy.
    pub(super) fn argmax_rows_into(sx: &CudaStorage, r: usize, c: usize, out: &mut Indices) -> Result<()> {
        let dev = sx.dev();
        if r == 0 {
            return Ok(());
        }
        let out_device = out.device();
        let out = out.cuda_mut().ok_or(Error::DeviceMismatch { op: "argmax", first: dev.device(), other: out_device })?;
        let (rows, cols) = (kernel_dim("argmax", r)?, kernel_dim("argmax", c)?);
        let threads = (c.div_ceil(32) * 32).clamp(32, 1024) as u32;
        let cfg = LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        let kernel = dev.kernel(&CUDA_SOURCE, &format!("argmax_rows_{}", sx.dtype()))?;
        let mut args = kernel.args();
        sx.buf().arg(&mut args);
        args.arg(out);
        args.arg(&cols);
        // SAFETY: argmax_rows_<t>(const T* x, u32* out, u32 cols), the dtype that of x: x holds r
        // rows of c values, out at least r indices (checked by `argmax_rows_into`; r blocks, block
        // b reads row b and writes out[b]).
        unsafe { kernel.launch(args, cfg) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_sum_to_one_and_match_formula() {
        let x = Tensor::from_f32(&[2, 3], vec![1.0, 2.0, 3.0, 1000.0, 1000.0, -1000.0]).unwrap();
        let y = softmax_rows(&x).unwrap().to_f32_vec().unwrap();
        let z: f64 = [1.0f64, 2.0, 3.0].iter().map(|v| v.exp()).sum();
        for (i, v) in [1.0f64, 2.0, 3.0].iter().enumerate() {
            assert!((y[i] as f64 - v.exp() / z).abs() < 1e-7);
        }
        assert_eq!(&y[3..], &[0.5, 0.5, 0.0]);
    }

    #[test]
    fn argmax_takes_the_first_largest_and_flags_non_finite_rows() {
        let rows = vec![1.0, 3.0, 3.0, -1.0, -5.0, -4.0, -4.0, -9.0, 0.0, f32::NAN, 1.0, 0.0, 0.0, f32::INFINITY, 0.0, 0.0];
        let x = Tensor::from_f32(&[4, 4], rows).unwrap();
        assert_eq!(argmax_rows(&x).unwrap(), vec![1, 1, NOT_FINITE, NOT_FINITE]);
        let x = Tensor::from_f32(&[1, 3], vec![-f32::INFINITY, 0.0, 0.0]).unwrap();
        assert_eq!(argmax_rows(&x).unwrap(), vec![NOT_FINITE]);
        // Into a longer list: the first rows only.
        let mut out = Indices::host(vec![7; 3]);
        argmax_rows_into(&Tensor::from_f32(&[2, 2], vec![0.0, 1.0, 2.0, 1.0]).unwrap(), &mut out).unwrap();
        assert_eq!(out.read_back().unwrap(), [1, 0, 7]);
        assert!(matches!(argmax_rows_into(&x, &mut Indices::host(vec![])), Err(Error::Shape { .. })));
    }
}
