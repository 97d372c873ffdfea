//! Dtype conversion on the tensor's own device. Widening is exact; narrowing rounds to nearest even
//! (the `half` crate on the CPU, `__float2half_rn` / `__float2bfloat16_rn` on CUDA), so both devices
//! give the same bits.

use super::common_device;
use crate::{DType, Device, Result, Tensor};

/// `x` converted to `dtype`, on `x`'s device (a clone when it already has that dtype).
pub fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    let device = common_device("cast", &[x])?;
    if x.dtype() == dtype {
        return Ok(x.clone());
    }
    match device {
        Device::Cpu => Ok(x.clone().into_dtype(dtype)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::cast(x, dtype),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(ordinal) => Err(super::built_without_cuda(ordinal)),
    }
}

#[cfg(feature = "cuda")]
pub(crate) const CUDA_SOURCE: crate::cuda::CudaSource = crate::cuda::CudaSource {
    file: "ops/cast.cu",
    code: include_str!("cast.cu"),
    kernels: &[
        "cast_f32_f16", "cast_f32_bf16", "cast_f16_f32", "cast_f16_bf16", "cast_bf16_f32", "cast_bf16_f16",
    ],
};

#[cfg(feature = "cuda")]
mod cuda {
    use super::CUDA_SOURCE;
    use crate::cuda::{grid_for, launch, CudaStorage};
    use crate::{DType, Result, Tensor};

    pub(super) fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
        let src = x.cuda_storage().expect("dispatched on a CUDA operand");
        let dev = src.dev();
        let n = x.elem_count();
        let mut out = dev.alloc_buf(dtype, n)?;
        if n > 0 {
            let n64 = n as u64;
            launch!(dev, &CUDA_SOURCE, format!("cast_{}_{}", x.dtype(), dtype), grid_for(n, 256), |args| {
                src.buf().arg(&mut args);
                out.arg_mut(&mut args);
                args.arg(&n64);
            })?;
        }
        Ok(Tensor::from_cuda(x.shape(), CudaStorage::new(dev.clone(), out)))
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
