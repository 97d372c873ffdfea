//! The numeric ops. One module per op: its public function, the CPU reference and (with the `cuda`
//! feature, later) the CUDA launcher, with the tests that hold them together at the bottom.
//!
//! Conventions shared by every op:
//! - matrices are row-major; a batch of sequences is flattened to `[batch * seq_len, width]` rows and
//!   ops that care about positions (rotary, attention) take `seq_len`;
//! - linear weights are `[out_features, in_features]`, as Hugging Face stores them;
//! - inputs may be f32, f16 or bf16; arithmetic is f32 with f32 or f64 accumulators, and the output has
//!   the dtype of the first input unless the op says otherwise.

mod activation;
mod attention;
mod elementwise;
mod embedding;
mod linear;
mod quantize;
mod loss;
mod reduce;
mod rms_norm;
mod rope;
mod softmax;

pub use activation::{gated_activation, GatedActivation};
pub use attention::{causal_attention, AttentionShape};
pub use elementwise::{add, add_assign, scale_columns};
pub use embedding::embedding;
pub use linear::{linear, matmul_f32, StridedMatrix};
pub use quantize::{pseudo_quantize, quantize_groups, QuantSpec, QuantizedGroups};
pub use loss::nll_sum;
pub use reduce::{max_abs, mean_abs_columns, relative_error};
pub use rms_norm::rms_norm;
pub use rope::{apply_rope, RopeTable};
pub use softmax::softmax_rows;

use crate::{Device, Result, Tensor};

/// Checks that every tensor lives on the CPU, the only device with implementations in this build.
fn cpu_only(tensors: &[&Tensor]) -> Result<()> {
    tensors.iter().try_for_each(|t| match t.device() {
        Device::Cpu => Ok(()),
        other => other.check_available(),
    })
}

#[cfg(test)]
pub(crate) mod test_util {
    use crate::rng::SplitMix64;
    use crate::{DType, Tensor};

    /// A random normal tensor of the given dtype.
    pub fn randn(rng: &mut SplitMix64, shape: &[usize], std: f32, dtype: DType) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_f32_as(shape, rng.normal_vec(n, std), dtype).unwrap()
    }

    /// ||a - b|| / ||b|| in f64.
    pub fn rel(a: &[f32], b: &[f64]) -> f64 {
        let (mut num, mut den) = (0.0, 0.0);
        for (x, y) in a.iter().zip(b) {
            num += (*x as f64 - y) * (*x as f64 - y);
            den += y * y;
        }
        assert!(den > 0.0, "reference must not be all zero");
        (num / den).sqrt()
    }
}
