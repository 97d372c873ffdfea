//! Gated activations of the MLP: `act(gate) * up` (Shazeer 2020, "GLU variants").

use rayon::prelude::*;

use super::{operands, Operands};
use crate::{Error, Result, Tensor};

/// Which nonlinearity gates the MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatedActivation {
    /// SwiGLU: `silu(g) = g / (1 + e^-g)` (Llama, Mistral, Qwen2).
    Silu,
    /// GeGLU with the tanh approximation of GELU (Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

impl GatedActivation {
    /// The name in kernel names (`gated_silu_f16_f16`).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn kernel_name(self) -> &'static str {
        match self {
            GatedActivation::Silu => "silu",
            GatedActivation::GeluTanh => "gelu_tanh",
        }
    }

    /// The activation applied to one value, in f32.
    pub fn apply(self, g: f32) -> f32 {
        match self {
            GatedActivation::Silu => g / (1.0 + (-g).exp()),
            GatedActivation::GeluTanh => {
                const SQRT_2_OVER_PI: f32 = 0.797_884_6;
                0.5 * g * (1.0 + (SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)).tanh())
            }
        }
    }
}

/// `act(gate) * up`, elementwise; output in `gate`'s dtype.
pub fn gated_activation(act: GatedActivation, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        return Err(Error::Shape {
            op: "gated_activation",
            detail: format!("gate {:?} vs up {:?}", gate.shape(), up.shape()),
        });
    }
    match operands("gated_activation", [gate, up])? {
        Operands::Cpu => {
            let (g, u) = (gate.f32_values()?, up.f32_values()?);
            let out: Vec<f32> = g.par_iter().zip(u.par_iter()).map(|(&g, &u)| act.apply(g) * u).collect();
            Tensor::from_f32_as(gate.shape(), out, gate.dtype())
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda([gs, us], _) => cuda::gated_activation(act, gs, us, gate.shape()),
    }
}

#[cfg(feature = "cuda")]
pub(crate) const CUDA_SOURCE: crate::cuda::CudaSource = crate::cuda::CudaSource {
    file: "ops/activation.cu",
    code: include_str!("activation.cu"),
    headers: &[],
    kernels: &[
        "gated_silu_f32_f32", "gated_silu_f32_f16", "gated_silu_f32_bf16",
        "gated_silu_f16_f32", "gated_silu_f16_f16", "gated_silu_f16_bf16",
        "gated_silu_bf16_f32", "gated_silu_bf16_f16", "gated_silu_bf16_bf16",
        "gated_gelu_tanh_f32_f32", "gated_gelu_tanh_f32_f16", "gated_gelu_tanh_f32_bf16",
        "gated_gelu_tanh_f16_f32", "gated_gelu_tanh_f16_f16", "gated_gelu_tanh_f16_bf16",
        "gated_gelu_tanh_bf16_f32", "gated_gelu_tanh_bf16_f16", "gated_gelu_tanh_bf16_bf16",
    ],
};

#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::PushKernelArg;

    use super::{GatedActivation, CUDA_SOURCE};
    use crate::cuda::{grid_for, CudaStorage};
    use crate::{Result, Tensor};

    pub(super) fn gated_activation(act: GatedActivation, gs: &CudaStorage, us: &CudaStorage, shape: &[usize]) -> Result<Tensor> {
        let dev = gs.dev();
        let n = gs.len();
        let mut out = dev.alloc_buf(gs.dtype(), n)?;
        if n > 0 {
            let n64 = n as u64;
            let name = format!("gated_{}_{}_{}", act.kernel_name(), gs.dtype(), us.dtype());
            let kernel = dev.kernel(&CUDA_SOURCE, &name)?;
            let mut args = kernel.args();
            gs.buf().arg(&mut args);
            us.buf().arg(&mut args);
            out.arg_mut(&mut args);
            args.arg(&n64);
            // SAFETY: gated_<act>_<g>_<u>(const G* gate, const U* up, G* out, u64 n), the dtypes
            // those of gate, up and out; all three hold n values (the op checked the shapes), and
            // the grid-stride loop stops at n.
            unsafe { kernel.launch(args, grid_for(n, 256)) }?;
        }
        Ok(Tensor::from_cuda(shape, CudaStorage::new(dev.clone(), out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    #[test]
    fn matches_closed_forms() {
        let g = Tensor::from_f32(&[1, 5], vec![-3.0, -0.5, 0.0, 0.7, 4.0]).unwrap();
        let u = Tensor::from_f32(&[1, 5], vec![1.0, 2.0, 3.0, -1.0, 0.5]).unwrap();
        let silu = gated_activation(GatedActivation::Silu, &g, &u).unwrap().to_f32_vec().unwrap();
        let gelu = gated_activation(GatedActivation::GeluTanh, &g, &u).unwrap().to_f32_vec().unwrap();
        for (i, (&gv, &uv)) in g.to_f32_vec().unwrap().iter().zip(&u.to_f32_vec().unwrap()).enumerate() {
            let x = gv as f64;
            let want_silu = x / (1.0 + (-x).exp()) * uv as f64;
            let inner = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3));
            let want_gelu = 0.5 * x * (1.0 + inner.tanh()) * uv as f64;
            assert!((silu[i] as f64 - want_silu).abs() < 1e-6, "silu {x}");
            assert!((gelu[i] as f64 - want_gelu).abs() < 1e-6, "gelu {x}");
        }
        let bad = Tensor::zeros(&[1, 4], DType::F32);
        assert!(gated_activation(GatedActivation::Silu, &g, &bad).is_err());
    }
}
