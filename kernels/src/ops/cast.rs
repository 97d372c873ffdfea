//! Dtype conversion on the tensor's own device. Widening is exact; narrowing rounds to nearest even
//! (the `half` crate on the CPU, `__float2half_rn` / `__float2bfloat16_rn` on CUDA), so both devices
//! give the same bits.

use super::{operands, Operands};
use crate::{DType, Result, Tensor};

/// `x` converted to `dtype`, on `x`'s device (a clone when it already has that dtype).
pub fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    let on = operands("cast", [x])?;
    if x.dtype() == dtype {
        return Ok(x.clone());
    }
    match on {
        Operands::Cpu => Ok(x.clone().into_dtype(dtype)),
        #[cfg(feature = "cuda")]
        Operands::Cuda([sx], _) => Ok(Tensor::from_cuda(x.shape(), cuda::cast(sx, dtype)?)),
    }
}

#[cfg(feature = "cuda")]
pub(crate) const CUDA_SOURCE: crate::cuda::CudaSource = crate::cuda::CudaSource {
    file: "ops/cast.cu",
    code: include_str!("cast.cu"),
    headers: &[],
    kernels: &[
        "cast_f32_f16", "cast_f32_bf16", "cast_f16_f32", "cast_f16_bf16", "cast_bf16_f32", "cast_bf16_f16",
    ],
};

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use cudarc::driver::PushKernelArg;

    use super::CUDA_SOURCE;
    use crate::cuda::{grid_for, CudaStorage};
    use crate::{DType, Result};

    /// `src` converted to `dtype` on its device; shared, not copied, when it has that dtype
    /// already. What the other ops' CUDA paths call on device data.
    pub(crate) fn cast(src: &CudaStorage, dtype: DType) -> Result<CudaStorage> {
        if src.dtype() == dtype {
            return Ok(src.clone());
        }
        let dev = src.dev();
        let n = src.len();
        let mut out = dev.alloc_buf(dtype, n)?;
        if n > 0 {
            let n64 = n as u64;
            let kernel = dev.kernel(&CUDA_SOURCE, &format!("cast_{}_{}", src.dtype(), dtype))?;
            let mut args = kernel.args();
            src.buf().arg(&mut args);
            out.arg_mut(&mut args);
            args.arg(&n64);
            // SAFETY: cast_<from>_<to>(const From* src, To* dst, u64 n), the dtypes those of src
            // and out; both hold n values, and the grid-stride loop stops at n.
            unsafe { kernel.launch(args, grid_for(n, 256)) }?;
        }
        Ok(CudaStorage::new(dev.clone(), out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cast_rounds_like_into_dtype() {
        let x = Tensor::from_f32(&[1, 4], vec![1.0, 1.0 + 1.0 / 4096.0, -65504.0, 3.0e-8]).unwrap();
        for dtype in [DType::F16, DType::BF16] {
            assert_eq!(cast(&x, dtype).unwrap(), x.clone().into_dtype(dtype));
        }
        assert_eq!(cast(&x, DType::F32).unwrap(), x);
    }
}
