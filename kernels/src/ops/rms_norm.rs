//! RMSNorm (Zhang & Sennrich 2019): `y = x / sqrt(mean(x^2) + eps) * w`, row by row.
//!
//! Architectures that scale by `(1 + w)` (Gemma) fold the 1 into the weight when they load it, so
//! this op has one form.

use rayon::prelude::*;

use super::{operands, Operands};
use crate::{DType, Error, Result, Tensor};

/// Normalises every row of `x[R, D]` and scales by `weight[D]`; output in `x`'s dtype.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    rms_norm_to(x, weight, eps, x.dtype())
}

/// [`rms_norm`] with the output in `out`, rounded once from the f32 product: what reads an f32
/// residual stream into f16 linears in one pass (one kernel on CUDA for every dtype triple).
pub fn rms_norm_to(x: &Tensor, weight: &Tensor, eps: f32, out: DType) -> Result<Tensor> {
    let (r, d) = x.dims2("rms_norm")?;
    if weight.shape() != [d] {
        return Err(Error::Shape {
            op: "rms_norm",
            detail: format!("rows have {d} values, weight has shape {:?}", weight.shape()),
        });
    }
    match operands("rms_norm", [x, weight])? {
        Operands::Cpu => rms_norm_cpu(x, weight, eps, r, d, out),
        #[cfg(feature = "cuda")]
        Operands::Cuda([xs, ws], _) => cuda::rms_norm(xs, ws, eps, r, d, out),
    }
}

/// The reference: f64 sum of squares per row, f32 products.
fn rms_norm_cpu(x: &Tensor, weight: &Tensor, eps: f32, r: usize, d: usize, out_dtype: DType) -> Result<Tensor> {
    let (xv, wv) = (x.f32_values()?, weight.f32_values()?);
    let mut out = vec![0.0f32; r * d];
    out.par_chunks_mut(d.max(1)).zip(xv.par_chunks(d.max(1))).for_each(|(o, row)| {
        let mean_sq = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
        let inv = (1.0 / (mean_sq + eps as f64).sqrt()) as f32;
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(wv.iter()) {
            *o = v * inv * w;
        }
    });
    Tensor::from_f32_as(&[r, d], out, out_dtype)
}

#[cfg(feature = "cuda")]
pub(crate) const CUDA_SOURCE: crate::cuda::CudaSource = crate::cuda::CudaSource {
    file: "ops/rms_norm.cu",
    code: include_str!("rms_norm.cu"),
    headers: &[],
    kernels: &[
        "rms_norm_f32_f32", "rms_norm_f32_f16", "rms_norm_f32_bf16",
        "rms_norm_f16_f32", "rms_norm_f16_f16", "rms_norm_f16_bf16",
        "rms_norm_bf16_f32", "rms_norm_bf16_f16", "rms_norm_bf16_bf16",
        "rms_norm_f32_f32_to_f32", "rms_norm_f32_f32_to_f16", "rms_norm_f32_f32_to_bf16",
        "rms_norm_f32_f16_to_f32", "rms_norm_f32_f16_to_f16", "rms_norm_f32_f16_to_bf16",
        "rms_norm_f32_bf16_to_f32", "rms_norm_f32_bf16_to_f16", "rms_norm_f32_bf16_to_bf16",
        "rms_norm_f16_f32_to_f32", "rms_norm_f16_f32_to_f16", "rms_norm_f16_f32_to_bf16",
        "rms_norm_f16_f16_to_f32", "rms_norm_f16_f16_to_f16", "rms_norm_f16_f16_to_bf16",
        "rms_norm_f16_bf16_to_f32", "rms_norm_f16_bf16_to_f16", "rms_norm_f16_bf16_to_bf16",
        "rms_norm_bf16_f32_to_f32", "rms_norm_bf16_f32_to_f16", "rms_norm_bf16_f32_to_bf16",
        "rms_norm_bf16_f16_to_f32", "rms_norm_bf16_f16_to_f16", "rms_norm_bf16_f16_to_bf16",
        "rms_norm_bf16_bf16_to_f32", "rms_norm_bf16_bf16_to_f16", "rms_norm_bf16_bf16_to_bf16",
    ],
};

#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::{LaunchConfig, PushKernelArg};

    use super::CUDA_SOURCE;
    use crate::cuda::{kernel_dim, CudaStorage};
    use crate::{DType, Result, Tensor};

    /// One block per row, one thread per 32-value slice of the row up to 1024 threads; the output
    /// in `out_dtype`, rounded once from the f32 product.
    pub(super) fn rms_norm(
        xs: &CudaStorage,
        ws: &CudaStorage,
        eps: f32,
        r: usize,
        d: usize,
        out_dtype: DType,
    ) -> Result<Tensor> {
        let dev = xs.dev();
        let mut out = dev.alloc_buf(out_dtype, r * d)?;
        if r > 0 && d > 0 {
            let (rows, d32) = (kernel_dim("rms_norm", r)?, kernel_dim("rms_norm", d)?);
            let threads = (d.div_ceil(32) * 32).clamp(32, 1024) as u32;
            let cfg = LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
            let name = match out_dtype == xs.dtype() {
                true => format!("rms_norm_{}_{}", xs.dtype(), ws.dtype()),
                false => format!("rms_norm_{}_{}_to_{out_dtype}", xs.dtype(), ws.dtype()),
            };
            let kernel = dev.kernel(&CUDA_SOURCE, &name)?;
            let mut args = kernel.args();
            xs.buf().arg(&mut args);
            ws.buf().arg(&mut args);
            out.arg_mut(&mut args);
            args.arg(&d32);
            args.arg(&eps);
            // SAFETY: rms_norm_<x>_<w>(const X* x, const W* w, X* out, u32 d, float eps), or
            // rms_norm_<x>_<w>_to_<o>(const X* x, const W* w, O* out, ...) when out_dtype is not
            // x's, the dtypes those of x, w and out: x
            // and out hold r rows of d values, w holds d (checked by `rms_norm_to`); block b reads
            // and writes row b < r only.
            unsafe { kernel.launch(args, cfg) }?;
        }
        Ok(Tensor::from_cuda(&[r, d], CudaStorage::new(dev.clone(), out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{randn, rel};
    use crate::rng::SplitMix64;
    use crate::DType;

    #[test]
    fn matches_f64_reference() {
        let mut rng = SplitMix64::new(1);
        for &(r, d) in &[(1, 1), (3, 576), (37, 100)] {
            let x = randn(&mut rng, &[r, d], 3.0, DType::F32);
            let w = randn(&mut rng, &[d], 1.0, DType::F32);
            let (xv, wv) = (x.to_f32_vec().unwrap(), w.to_f32_vec().unwrap());
            let mut want = vec![0.0f64; r * d];
            for i in 0..r {
                let row = &xv[i * d..(i + 1) * d];
                let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
                for j in 0..d {
                    want[i * d + j] = row[j] as f64 / (ms + 1e-5).sqrt() * wv[j] as f64;
                }
            }
            let got = rms_norm(&x, &w, 1e-5).unwrap();
            assert!(rel(&got.to_f32_vec().unwrap(), &want) < 1e-6);
        }
        let bad = Tensor::zeros(&[3], DType::F32);
        assert!(rms_norm(&Tensor::zeros(&[2, 4], DType::F32), &bad, 1e-5).is_err());
    }
}
