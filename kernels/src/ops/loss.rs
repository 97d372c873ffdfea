//! Negative log-likelihood of target tokens under logits: the sum behind perplexity.

use rayon::prelude::*;

use super::{operands, Operands};
use crate::{Error, Result, Tensor};

/// `-sum_i log softmax(logits[i])[targets[i]]` in f64, for `logits[T, V]` and `T` targets (from the
/// host, whatever `logits`' device). Every target is checked before anything is read.
pub fn nll_sum(logits: &Tensor, targets: &[u32]) -> Result<f64> {
    let (t, v) = logits.dims2("nll")?;
    if targets.len() != t {
        return Err(Error::Shape { op: "nll", detail: format!("{t} rows of logits, {} targets", targets.len()) });
    }
    if let Some(&bad) = targets.iter().find(|&&id| id as usize >= v) {
        return Err(Error::Index { op: "nll", index: bad as usize, len: v });
    }
    match operands("nll", [logits])? {
        Operands::Cpu => nll_cpu(logits, targets, v),
        #[cfg(feature = "cuda")]
        Operands::Cuda([sl], _) => cuda::nll_sum(sl, targets, t, v),
    }
}

/// The reference: f32 row maximum, f64 log-sum-exp.
fn nll_cpu(logits: &Tensor, targets: &[u32], v: usize) -> Result<f64> {
    let values = logits.f32_values()?;
    Ok(values
        .par_chunks(v.max(1))
        .zip(targets.par_iter())
        .map(|(row, &target)| {
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let log_z = row.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln() + max;
            log_z - row[target as usize] as f64
        })
        .sum())
}

#[cfg(feature = "cuda")]
pub(crate) const CUDA_SOURCE: crate::cuda::CudaSource = crate::cuda::CudaSource {
    file: "ops/loss.cu",
    code: include_str!("loss.cu"),
    headers: &[],
    kernels: &["nll_rows_f32", "nll_rows_f16", "nll_rows_bf16"],
};

#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::{LaunchConfig, PushKernelArg};

    use super::CUDA_SOURCE;
    use crate::cuda::{kernel_dim, CudaStorage};
    use crate::Result;

    /// One block per row writes that row's nll (f64); the host adds them in row order.
    pub(super) fn nll_sum(sl: &CudaStorage, targets: &[u32], t: usize, v: usize) -> Result<f64> {
        if t == 0 {
            return Ok(0.0);
        }
        let dev = sl.dev();
        let targets_dev = dev.upload(targets)?;
        let mut nll = dev.alloc::<f64>(t)?;
        // t > 0 and every target < v, so v > 0.
        let (rows, vocab) = (kernel_dim("nll", t)?, kernel_dim("nll", v)?);
        let threads = (v.div_ceil(32) * 32).clamp(32, 1024) as u32;
        let cfg = LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        let kernel = dev.kernel(&CUDA_SOURCE, &format!("nll_rows_{}", sl.dtype()))?;
        let mut args = kernel.args();
        sl.buf().arg(&mut args);
        args.arg(&targets_dev);
        args.arg(&mut nll);
        args.arg(&vocab);
        // SAFETY: nll_rows_<t>(const T* logits, const u32* targets, double* nll, u32 vocab), the
        // dtype that of the logits: t rows of v logits, t targets each below v (checked by
        // `nll_sum`), t f64 outputs; block b reads row b and target b, writes nll[b].
        unsafe { kernel.launch(args, cfg) }?;
        Ok(dev.download(&nll)?.iter().sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_logits_give_log_vocab() {
        let logits = Tensor::from_f32(&[2, 4], vec![0.5; 8]).unwrap();
        let nll = nll_sum(&logits, &[1, 3]).unwrap();
        assert!((nll - 2.0 * 4f64.ln()).abs() < 1e-12);
        let peaked = Tensor::from_f32(&[1, 3], vec![0.0, 50.0, 0.0]).unwrap();
        assert!(nll_sum(&peaked, &[1]).unwrap() < 1e-20);
        assert!(nll_sum(&peaked, &[3]).is_err());
        assert!(nll_sum(&peaked, &[0, 1]).is_err());
    }
}
