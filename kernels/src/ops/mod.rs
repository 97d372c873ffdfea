//! The numeric ops. One module per op: its public function, the CPU reference and (with the `cuda`
//! feature) the CUDA launcher, whose kernels sit next to it in a `.cu` file of the same name; the
//! tests that hold them together are at the bottom of the module (CPU) and in `tests/cuda_ops.rs`
//! (CUDA against the CPU reference, run on a GPU machine).
//!
//! Each public function checks shapes first, then dispatches on where its operands' data is
//! (`operands`: operands on different devices are an error, [`crate::Error::DeviceMismatch`]): the
//! CPU reference, or the CUDA launcher, which receives the operands' device data from that match.
//! Every op has a CUDA implementation today; an op added without one answers CUDA operands with
//! [`crate::Error::NoCudaImplementation`] until it gets one. Index lists an op reads on the device
//! (positions, cache slots) are [`crate::Indices`], uploaded once by their maker. Ops that return host values
//! (`max_abs`, `mean_abs_columns`, `nll_sum`, `quantize_groups`) copy their result from the device.
//!
//! Conventions shared by every op:
//! - matrices are row-major; a batch of sequences is flattened to `[batch * seq_len, width]` rows and
//!   ops that care about positions (rotary, attention) take `seq_len`;
//! - linear weights are `[out_features, in_features]`, as Hugging Face stores them;
//! - inputs may be f32, f16 or bf16; arithmetic is f32 with f32 or f64 accumulators, and the output has
//!   the dtype of the first input unless the op says otherwise.

pub(crate) mod activation;
pub(crate) mod attention;
pub(crate) mod cast;
mod clip;
pub(crate) mod elementwise;
pub(crate) mod embedding;
pub(crate) mod groups;
pub(crate) mod linear;
pub(crate) mod paged_attention;
pub(crate) mod quantize;
pub(crate) mod loss;
pub(crate) mod reduce;
pub(crate) mod rms_norm;
pub(crate) mod rope;
pub(crate) mod rope_positions;
pub(crate) mod rows;
pub(crate) mod softmax;
pub(crate) mod w4a16;

pub use activation::{gated_activation, gated_activation_fused, GatedActivation};
pub use cast::cast;
pub use clip::{clip_thresholds, ClipGrid};
pub use attention::{causal_attention, AttentionShape};
pub use elementwise::{add, add_assign, divide_rows, scale_columns, softcap};
pub use embedding::{embedding, embedding_at, embedding_scaled_at};
pub use groups::{clamp_groups, group_relative_abs_sums, max_abs_groups};
pub use linear::{linear, linear_to};
pub use paged_attention::{
    kv_cache_shape, paged_attention, write_kv_slots, zeros_kv_cache, FixedLayout, PagedAttentionShape, PagedBatch, PagedSeq,
    WHOLE_PROMPT_ROWS,
};
pub use quantize::{pseudo_quantize, quantize_groups, quantize_packed, GroupSize, QuantSpec, QuantizedGroups};
pub use loss::nll_sum;
pub use reduce::{max_abs, mean_abs_columns, relative_error, squared_distance};
pub use rms_norm::{rms_norm, rms_norm_to};
pub use rope::{apply_rope, RopeTable};
pub use rope_positions::{apply_rope_at, rope_qkv_into_cache, RopeCache};
pub use rows::{gather_rows, scatter_add_rows};
pub use softmax::{argmax_rows, argmax_rows_into, softmax_rows, NOT_FINITE};
pub use w4a16::{
    decode_pays, fused_pays, w4a16_linear, w4a16_linear_with, Int4Weight, PackedLinear, W4A16Path, AWQ_ORDER, DECODE_MAX_ROWS, FUSED_MAX_ROWS, STREAM_MAX_ROWS,
};

use crate::{Device, Error, Result, Tensor};

/// Every `.cu` file of the crate, each declared by the module that launches its kernels (and
/// `cuda/timing.cu`, the benchmark timer's): what `Device::prepare` compiles ahead of use, and what
/// the NVRTC test (`tests/nvrtc.rs`) checks against the files on disk.
#[cfg(feature = "cuda")]
pub const CUDA_SOURCES: &[&crate::cuda::CudaSource] = &[
    &cast::CUDA_SOURCE,
    &elementwise::CUDA_SOURCE,
    &groups::CUDA_SOURCE,
    &activation::CUDA_SOURCE,
    &rms_norm::CUDA_SOURCE,
    &reduce::CUDA_SOURCE,
    &quantize::CUDA_SOURCE,
    &linear::CUDA_SOURCE,
    &rope::CUDA_SOURCE,
    &attention::CUDA_SOURCE,
    &embedding::CUDA_SOURCE,
    &rows::CUDA_SOURCE,
    &paged_attention::CUDA_SOURCE,
    &softmax::CUDA_SOURCE,
    &loss::CUDA_SOURCE,
    &w4a16::decode::CUDA_SOURCE,
    &w4a16::stream::CUDA_SOURCE,
    &w4a16::fused::CUDA_SOURCE,
    &w4a16::dequantize::CUDA_SOURCE,
    &crate::cuda::timing::CUDA_SOURCE,
];

/// The one device every operand of `op` lives on.
fn common_device(op: &'static str, tensors: &[&Tensor]) -> Result<Device> {
    let first = tensors.first().map_or(Device::Cpu, |t| t.device());
    match tensors.iter().map(|t| t.device()).find(|&d| d != first) {
        Some(other) => Err(Error::DeviceMismatch { op, first, other }),
        None => Ok(first),
    }
}

/// Where the operands of one op are, with their data when it is on a device: what each op matches
/// on to run its CPU reference or its CUDA launcher.
pub(crate) enum Operands<'a, const N: usize> {
    /// Every operand in host memory.
    Cpu,
    /// Every operand on one CUDA device: their device data in the order given, then the optional
    /// last operand's (a bias), when there is one.
    #[cfg(feature = "cuda")]
    Cuda([&'a crate::cuda::CudaStorage; N], Option<&'a crate::cuda::CudaStorage>),
    /// A build without CUDA has no device data: this variant cannot be built (an uninhabited
    /// field), so matches need no arm for it; it only carries the lifetime.
    #[cfg(not(feature = "cuda"))]
    #[allow(dead_code)]
    Never(std::marker::PhantomData<&'a ()>, std::convert::Infallible),
}

/// Where `tensors` (at least one) are; see [`Operands`]. Errors: [`Error::DeviceMismatch`] naming
/// the first two devices that differ.
fn operands<'a, const N: usize>(op: &'static str, tensors: [&'a Tensor; N]) -> Result<Operands<'a, N>> {
    operands_and(op, tensors, None)
}

/// [`operands`] with an optional last operand (a bias) that must share the device when given.
fn operands_and<'a, const N: usize>(op: &'static str, tensors: [&'a Tensor; N], optional: Option<&'a Tensor>) -> Result<Operands<'a, N>> {
    let all: Vec<&Tensor> = tensors.iter().copied().chain(optional).collect();
    common_device(op, &all)?;
    #[cfg(feature = "cuda")]
    {
        let on_cuda: Vec<&'a crate::cuda::CudaStorage> = tensors.iter().filter_map(|t| t.cuda_storage()).collect();
        // All on CUDA or none: they share one device (checked above).
        if let (Ok(data), true) = (<[_; N]>::try_from(on_cuda), N > 0) {
            return Ok(Operands::Cuda(data, optional.and_then(|b| b.cuda_storage())));
        }
    }
    Ok(Operands::Cpu)
}

/// What a build without the `cuda` feature answers for CUDA operands (it cannot create any: every
/// tensor of such a build is on the CPU, so this only keeps the ops' matches exhaustive).
#[cfg(not(feature = "cuda"))]
fn built_without_cuda(ordinal: usize) -> Error {
    Error::CudaUnavailable { ordinal, reason: crate::device::NO_CUDA_FEATURE }
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
