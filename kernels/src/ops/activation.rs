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

/// [`gated_activation`] on the output of a fused gate|up projection `gate_up[rows, 2 * width]`
/// (gate in the first `width` columns of each row, up in the last): `[rows, width]` in its dtype,
/// the same values as the two halves through `gated_activation`. One matrix product for gate and
/// up instead of two, and no copy to split them.
pub fn gated_activation_fused(act: GatedActivation, gate_up: &Tensor) -> Result<Tensor> {
    let (rows, cols) = gate_up.dims2("gated_activation")?;
    if cols % 2 != 0 {
        return Err(Error::Shape { op: "gated_activation", detail: format!("gate|up has {cols} columns, not 2 x width") });
    }
    let width = cols / 2;
    match operands("gated_activation", [gate_up])? {
        Operands::Cpu => {
            let v = gate_up.f32_values()?;
            let out: Vec<f32> = v
                .par_chunks(cols.max(1))
                .flat_map_iter(|row| row[..width].iter().zip(&row[width..]).map(|(&g, &u)| act.apply(g) * u))
                .collect();
            Tensor::from_f32_as(&[rows, width], out, gate_up.dtype())
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda([s], _) => cuda::gated_activation_fused(act, s, rows, width),
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
        "gated_fused_silu_f32", "gated_fused_silu_f16", "gated_fused_silu_bf16",
        "gated_fused_gelu_tanh_f32", "gated_fused_gelu_tanh_f16", "gated_fused_gelu_tanh_bf16",
    ],
};

#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::PushKernelArg;

    use super::{GatedActivation, CUDA_SOURCE};
    use crate::cuda::{grid_for, kernel_dim, CudaStorage};
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

    pub(super) fn gated_activation_fused(act: GatedActivation, s: &CudaStorage, rows: usize, width: usize) -> Result<Tensor> {
        let dev = s.dev();
        let n = rows * width;
        let mut out = dev.alloc_buf(s.dtype(), n)?;
        if n > 0 {
            let (n64, width32) = (n as u64, kernel_dim("gated_activation", width)?);
            let kernel = dev.kernel(&CUDA_SOURCE, &format!("gated_fused_{}_{}", act.kernel_name(), s.dtype()))?;
            let mut args = kernel.args();
            s.buf().arg(&mut args);
            out.arg_mut(&mut args);
            args.arg(&n64);
            args.arg(&width32);
            // SAFETY: gated_fused_<act>_<t>(const T* gate_up, T* out, u64 n, u32 width), the dtype
            // that of both: gate_up holds rows * 2 * width values, out n = rows * width; element e
            // of out reads row e / width's columns e % width and width + e % width.
            unsafe { kernel.launch(args, grid_for(n, 256)) }?;
        }
        Ok(Tensor::from_cuda(&[rows, width], CudaStorage::new(dev.clone(), out)))
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

    #[test]
    fn the_fused_form_equals_the_two_halves() {
        let mut rng = crate::rng::SplitMix64::new(5);
        let (rows, width) = (3, 7);
        for dtype in [DType::F32, DType::F16] {
            let gu = Tensor::from_f32_as(&[rows, 2 * width], rng.normal_vec(rows * 2 * width, 2.0), dtype).unwrap();
            let v = gu.f32_values().unwrap();
            let half = |at: usize| -> Vec<f32> { v.chunks(2 * width).flat_map(|r| r[at..at + width].to_vec()).collect() };
            let gate = Tensor::from_f32_as(&[rows, width], half(0), dtype).unwrap();
            let up = Tensor::from_f32_as(&[rows, width], half(width), dtype).unwrap();
            for act in [GatedActivation::Silu, GatedActivation::GeluTanh] {
                assert_eq!(gated_activation_fused(act, &gu).unwrap(), gated_activation(act, &gate, &up).unwrap());
            }
        }
        assert!(gated_activation_fused(GatedActivation::Silu, &Tensor::zeros(&[2, 3], DType::F32)).is_err());
    }
}
