//! Group-wise integer quantization of weights, as AutoAWQ 0.2.9 defines it
//! (`pseudo_quantize_tensor` in awq/quantize/quantizer.py).
//!
//! Each row of `w[out, in]` is cut into groups of `group_size` consecutive input channels. With a
//! zero point (asymmetric, the default), a group with range `[min, max]` gets
//! `scale = max(max - min, 1e-5) / (2^bits - 1)`, `zero = clamp(-round(min / scale), 0, 2^bits - 1)`
//! and codes `q = clamp(round(w / scale) + zero, 0, 2^bits - 1)`, which dequantize to
//! `(q - zero) * scale`. Without one (symmetric), `scale = max(max |w|, 1e-5) / (2^(bits-1) - 1)`
//! and `q = clamp(round(w / scale), -2^(bits-1), 2^(bits-1) - 1)`. Rounding is half-to-even, as
//! `torch.round`.
//!
//! [`quantize_groups`] returns codes, scales and zeros; [`quantize_packed`] the same packed in
//! AutoAWQ's GEMM layout (what a checkpoint stores); [`pseudo_quantize`] returns the dequantized
//! weights (what the AWQ searches evaluate).

use rayon::prelude::*;

use super::w4a16::PackedLinear;
use super::{operands, Operands};
use crate::{Error, Result, Tensor};

/// Input channels per quantization group: a positive count. The CPU reference takes any size that
/// divides a row; AutoAWQ's GEMM format (what vLLM and transformers load) and our CUDA kernels take
/// [`GroupSize::AWQ`], which is what a job accepts ([`GroupSize::awq`]). Checked once where a number
/// enters (a command-line flag, a wire message, a checkpoint's `quantization_config`), then carried
/// as this type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupSize(u32);

impl GroupSize {
    pub const G32: GroupSize = GroupSize(32);
    pub const G64: GroupSize = GroupSize(64);
    pub const G128: GroupSize = GroupSize(128);
    /// The sizes of AutoAWQ's GEMM format, largest (and AutoAWQ's default) first.
    pub const AWQ: [GroupSize; 3] = [GroupSize::G128, GroupSize::G64, GroupSize::G32];

    /// `Some` for any positive size (the CPU reference's domain).
    pub fn new(size: u64) -> Option<GroupSize> {
        u32::try_from(size).ok().filter(|&s| s > 0).map(GroupSize)
    }

    /// `Some` for the sizes of AutoAWQ's GEMM format: 32, 64 and 128.
    pub fn awq(size: u64) -> Option<GroupSize> {
        GroupSize::AWQ.into_iter().find(|g| u64::from(g.0) == size)
    }

    /// The size as a count of channels.
    pub fn get(self) -> usize {
        self.0 as usize
    }
}

impl std::fmt::Display for GroupSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// How weights are quantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantSpec {
    /// Bits per weight (AWQ uses 4).
    pub bits: u32,
    /// Input channels per group.
    pub group_size: GroupSize,
    /// Asymmetric quantization with a per-group zero point.
    pub zero_point: bool,
}

impl QuantSpec {
    pub(crate) fn max_int(&self) -> f32 {
        if self.zero_point {
            ((1u32 << self.bits) - 1) as f32
        } else {
            ((1u32 << (self.bits - 1)) - 1) as f32
        }
    }

    pub(crate) fn min_int(&self) -> f32 {
        if self.zero_point {
            0.0
        } else {
            -((1u32 << (self.bits - 1)) as f32)
        }
    }

    /// Checks that rows of `in_features` split into whole groups and the bit width is sane.
    pub fn check(&self, in_features: usize) -> Result<()> {
        if !(2..=8).contains(&self.bits) || !in_features.is_multiple_of(self.group_size.get()) {
            return Err(Error::Shape {
                op: "quantize",
                detail: format!("{in_features} input channels, group size {}, {} bits", self.group_size, self.bits),
            });
        }
        Ok(())
    }

    /// Scale and zero of one group from its values (zero is 0 for symmetric quantization).
    pub fn group_params(&self, group: &[f32]) -> (f32, f32) {
        if self.zero_point {
            let (min, max) = group.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            let scale = (max - min).max(1e-5) / self.max_int();
            let zero = (-(min / scale).round_ties_even()).clamp(self.min_int(), self.max_int());
            (scale, zero)
        } else {
            let max = group.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
            (max.max(1e-5) / self.max_int(), 0.0)
        }
    }

    /// The integer code of `w` in a group with `scale` and `zero`.
    pub fn code(&self, w: f32, scale: f32, zero: f32) -> f32 {
        ((w / scale).round_ties_even() + zero).clamp(self.min_int(), self.max_int())
    }
}

/// Integer codes of a weight matrix, with per-group scales and zeros, all row-major:
/// `codes[out, in]`, `scales[out, in / group_size]`, `zeros[out, in / group_size]`. Symmetric codes
/// are signed; zeros are then all 0.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedGroups {
    pub out_features: usize,
    pub in_features: usize,
    pub codes: Vec<i8>,
    pub scales: Vec<f32>,
    pub zeros: Vec<f32>,
}

/// Quantizes `w[out, in]` group by group; see the module docs. The result is on the host whatever
/// `w`'s device; on CUDA it is bit-identical to the CPU's (see `quantize.cu`).
pub fn quantize_groups(w: &Tensor, spec: QuantSpec) -> Result<QuantizedGroups> {
    let (out_features, in_features) = w.dims2("quantize")?;
    spec.check(in_features)?;
    if spec.zero_point && spec.bits == 8 {
        // Codes would run 0..=255, and `QuantizedGroups::codes` holds i8 (symmetric 8-bit codes,
        // -128..=127, fit; so does everything the AWQ GEMM format stores).
        return Err(Error::Shape {
            op: "quantize_groups",
            detail: "8-bit codes with a zero point (0..=255) do not fit the i8 codes: use up to 7 bits, or symmetric 8-bit".into(),
        });
    }
    match operands("quantize_groups", [w])? {
        Operands::Cpu => quantize_groups_cpu(w, spec, out_features, in_features),
        #[cfg(feature = "cuda")]
        Operands::Cuda([sw], _) => cuda::quantize_groups(sw, spec, out_features, in_features),
    }
}

fn quantize_groups_cpu(w: &Tensor, spec: QuantSpec, out_features: usize, in_features: usize) -> Result<QuantizedGroups> {
    let values = w.f32_values()?;
    let g = spec.group_size.get();
    let n_groups = in_features / g;
    let mut codes = vec![0i8; out_features * in_features];
    let mut scales = vec![0.0f32; out_features * n_groups];
    let mut zeros = vec![0.0f32; out_features * n_groups];
    codes
        .par_chunks_mut(in_features)
        .zip(scales.par_chunks_mut(n_groups))
        .zip(zeros.par_chunks_mut(n_groups))
        .zip(values.par_chunks(in_features))
        .for_each(|(((codes, scales), zeros), row)| {
            for (j, group) in row.chunks_exact(g).enumerate() {
                let (scale, zero) = spec.group_params(group);
                scales[j] = scale;
                zeros[j] = zero;
                for (c, &v) in codes[j * g..(j + 1) * g].iter_mut().zip(group) {
                    *c = spec.code(v, scale, zero) as i8;
                }
            }
        });
    Ok(QuantizedGroups { out_features, in_features, codes, scales, zeros })
}

/// What a `spec` code is shifted by to be stored as an unsigned nibble: 0 with a zero point, and
/// `2^(bits-1)` for signed symmetric codes (AutoAWQ stores those with that shift as the zero).
pub(crate) fn awq_code_shift(spec: QuantSpec) -> u32 {
    if spec.zero_point {
        0
    } else {
        1 << (spec.bits - 1)
    }
}

/// Quantizes `w[out, in]` group-wise, as [`quantize_groups`], and packs it in AutoAWQ's GEMM layout
/// ([`PackedLinear::from_groups`]); 4 bits only, `out` a multiple of 8. On CUDA the packing runs on
/// the device too and only the packed words come to the host (an eighth of the codes' bytes); the
/// result equals the CPU's bit for bit.
pub fn quantize_packed(w: &Tensor, spec: QuantSpec) -> Result<PackedLinear> {
    let (out_features, in_features) = w.dims2("quantize_packed")?;
    spec.check(in_features)?;
    if spec.bits != 4 || !out_features.is_multiple_of(8) {
        return Err(Error::Shape {
            op: "quantize_packed",
            detail: format!("AutoAWQ's GEMM layout holds 4-bit codes of a multiple of 8 outputs: {} bits, {out_features} outputs", spec.bits),
        });
    }
    match operands("quantize_packed", [w])? {
        Operands::Cpu => Ok(PackedLinear::from_groups(&quantize_groups_cpu(w, spec, out_features, in_features)?, spec)),
        #[cfg(feature = "cuda")]
        Operands::Cuda([sw], _) => cuda::quantize_packed(sw, spec, out_features, in_features),
    }
}

/// Quantizes and dequantizes `w[out, in]` in one pass: `(q - zero) * scale` per value, in `w`'s dtype.
///
/// On CUDA the result is bit-identical to the CPU's for every input dtype: the same f32 formulas,
/// IEEE division and round-half-to-even on both (see `quantize.cu`).
pub fn pseudo_quantize(w: &Tensor, spec: QuantSpec) -> Result<Tensor> {
    let (_, in_features) = w.dims2("pseudo_quantize")?;
    spec.check(in_features)?;
    match operands("pseudo_quantize", [w])? {
        Operands::Cpu => {
            let mut out = w.to_f32_vec()?;
            out.par_chunks_mut(spec.group_size.get()).for_each(|group| {
                let (scale, zero) = spec.group_params(group);
                group.iter_mut().for_each(|v| *v = (spec.code(*v, scale, zero) - zero) * scale);
            });
            Tensor::from_f32_as(w.shape(), out, w.dtype())
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda([sw], _) => cuda::pseudo_quantize(sw, w.shape(), spec),
    }
}

#[cfg(feature = "cuda")]
pub(crate) const CUDA_SOURCE: crate::cuda::CudaSource = crate::cuda::CudaSource {
    file: "ops/quantize.cu",
    code: include_str!("quantize.cu"),
    headers: &[],
    kernels: &[
        "pseudo_quantize_f32", "pseudo_quantize_f16", "pseudo_quantize_bf16",
        "quantize_groups_f32", "quantize_groups_f16", "quantize_groups_bf16",
        "awq_pack_words", "awq_pack_zeros", "awq_pack_scales",
        "clip_gram_f32_g32", "clip_search_f32_g32", "clip_gram_f32_g64", "clip_search_f32_g64", "clip_gram_f32_g128", "clip_search_f32_g128",
        "clip_gram_f16_g32", "clip_search_f16_g32", "clip_gram_f16_g64", "clip_search_f16_g64", "clip_gram_f16_g128", "clip_search_f16_g128",
        "clip_gram_bf16_g32", "clip_search_bf16_g32", "clip_gram_bf16_g64", "clip_search_bf16_g64", "clip_gram_bf16_g128", "clip_search_bf16_g128",
    ],
};

#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::{CudaSlice, PushKernelArg};

    use super::{awq_code_shift, PackedLinear, QuantSpec, QuantizedGroups, CUDA_SOURCE};
    use crate::cuda::{grid_for, kernel_dim, CudaStorage};
    use crate::{Result, Tensor};

    /// One warp per group, 8 groups per block of 256 threads.
    pub(super) fn pseudo_quantize(sw: &CudaStorage, shape: &[usize], spec: QuantSpec) -> Result<Tensor> {
        let dev = sw.dev();
        let n = sw.len();
        let mut out = dev.alloc_buf(sw.dtype(), n)?;
        let n_groups = n / spec.group_size.get();
        if n_groups > 0 {
            let (groups64, g) = (n_groups as u64, kernel_dim("pseudo_quantize", spec.group_size.get())?);
            let (zero_point, min_int, max_int) = (i32::from(spec.zero_point), spec.min_int(), spec.max_int());
            let kernel = dev.kernel(&CUDA_SOURCE, &format!("pseudo_quantize_{}", sw.dtype()))?;
            let mut args = kernel.args();
            sw.buf().arg(&mut args);
            out.arg_mut(&mut args);
            args.arg(&groups64);
            args.arg(&g);
            args.arg(&zero_point);
            args.arg(&min_int);
            args.arg(&max_int);
            // SAFETY: pseudo_quantize_<t>(const T* w, T* out, u64 n_groups, u32 g, int zero_point,
            // float min_int, float max_int), the dtype that of w and out: both hold n = n_groups *
            // g values (rows split into whole groups: `QuantSpec::check`); warps stride over groups
            // below n_groups.
            unsafe { kernel.launch(args, grid_for(n_groups * 32, 256)) }?;
        }
        Ok(Tensor::from_cuda(shape, CudaStorage::new(dev.clone(), out)))
    }

    /// Codes, scales and zeros of `w`, on the device.
    struct DeviceGroups {
        codes: CudaSlice<i8>,
        scales: CudaSlice<f32>,
        zeros: CudaSlice<f32>,
    }

    /// As `pseudo_quantize` (one warp per group), writing codes, scales and zeros.
    fn quantize_on_device(sw: &CudaStorage, spec: QuantSpec, out_features: usize, in_features: usize) -> Result<DeviceGroups> {
        let dev = sw.dev();
        let n = out_features * in_features;
        let n_groups = n / spec.group_size.get();
        let mut codes = dev.alloc::<i8>(n)?;
        let mut scales = dev.alloc::<f32>(n_groups)?;
        let mut zeros = dev.alloc::<f32>(n_groups)?;
        if n_groups > 0 {
            let (groups64, g) = (n_groups as u64, kernel_dim("quantize_groups", spec.group_size.get())?);
            let (zero_point, min_int, max_int) = (i32::from(spec.zero_point), spec.min_int(), spec.max_int());
            let kernel = dev.kernel(&CUDA_SOURCE, &format!("quantize_groups_{}", sw.dtype()))?;
            let mut args = kernel.args();
            sw.buf().arg(&mut args);
            args.arg(&mut codes);
            args.arg(&mut scales);
            args.arg(&mut zeros);
            args.arg(&groups64);
            args.arg(&g);
            args.arg(&zero_point);
            args.arg(&min_int);
            args.arg(&max_int);
            // SAFETY: quantize_groups_<t>(const T* w, i8* codes, float* scales, float* zeros, u64
            // n_groups, u32 g, int zero_point, float min_int, float max_int), the dtype that of w:
            // w and codes hold n = n_groups * g values, scales and zeros n_groups; warps stride over
            // groups below n_groups.
            unsafe { kernel.launch(args, grid_for(n_groups * 32, 256)) }?;
        }
        Ok(DeviceGroups { codes, scales, zeros })
    }

    /// The codes, scales and zeros come to the host.
    pub(super) fn quantize_groups(
        sw: &CudaStorage,
        spec: QuantSpec,
        out_features: usize,
        in_features: usize,
    ) -> Result<QuantizedGroups> {
        let dev = sw.dev();
        let q = quantize_on_device(sw, spec, out_features, in_features)?;
        let (codes, scales, zeros) = (dev.download(&q.codes)?, dev.download(&q.scales)?, dev.download(&q.zeros)?);
        Ok(QuantizedGroups { out_features, in_features, codes, scales, zeros })
    }

    /// Quantizes on the device, then packs there (`awq_pack_words` for the codes and the zeros,
    /// `awq_pack_scales` for the scales); only the packed result comes to the host.
    pub(super) fn quantize_packed(sw: &CudaStorage, spec: QuantSpec, out_features: usize, in_features: usize) -> Result<PackedLinear> {
        let dev = sw.dev();
        let q = quantize_on_device(sw, spec, out_features, in_features)?;
        let g = spec.group_size.get();
        let n_groups = in_features / g;
        let words_per_row = out_features / 8;
        let shift = awq_code_shift(spec) as i32;
        let mut qweight = dev.alloc::<i32>(in_features * words_per_row)?;
        let mut qzeros = dev.alloc::<i32>(n_groups * words_per_row)?;
        let mut scales = dev.alloc::<u16>(n_groups * out_features)?;
        let (outs, ins, groups) = (
            kernel_dim("quantize_packed", out_features)?,
            kernel_dim("quantize_packed", in_features)?,
            kernel_dim("quantize_packed", n_groups)?,
        );
        // Codes: `[out, in]` i8 -> `[in, out / 8]` words. Zeros: `[out, groups]` f32 -> words.
        if in_features * words_per_row > 0 {
            let kernel = dev.kernel(&CUDA_SOURCE, "awq_pack_words")?;
            let mut args = kernel.args();
            args.arg(&q.codes);
            args.arg(&mut qweight);
            args.arg(&outs);
            args.arg(&ins);
            args.arg(&shift);
            // SAFETY: awq_pack_words(const i8* codes, int* qweight, u32 outs, u32 ins, int shift):
            // codes holds outs * ins values (written above, in stream order), qweight ins * outs /
            // 8 words (outs a multiple of 8: checked by `quantize_packed`); the grid-stride loop
            // stops at the word count.
            unsafe { kernel.launch(args, grid_for(in_features * words_per_row, 256)) }?;
            let kernel = dev.kernel(&CUDA_SOURCE, "awq_pack_zeros")?;
            let mut args = kernel.args();
            args.arg(&q.zeros);
            args.arg(&mut qzeros);
            args.arg(&outs);
            args.arg(&groups);
            args.arg(&shift);
            // SAFETY: awq_pack_zeros(const float* zeros, int* qzeros, u32 outs, u32 groups, int
            // shift): zeros holds outs * groups values, qzeros groups * outs / 8 words; the
            // grid-stride loop stops at the word count.
            unsafe { kernel.launch(args, grid_for(n_groups * words_per_row, 256)) }?;
            let kernel = dev.kernel(&CUDA_SOURCE, "awq_pack_scales")?;
            let mut args = kernel.args();
            args.arg(&q.scales);
            args.arg(&mut scales);
            args.arg(&outs);
            args.arg(&groups);
            // SAFETY: awq_pack_scales(const float* scales, u16* out, u32 outs, u32 groups): both
            // hold outs * groups values; the grid-stride loop stops there.
            unsafe { kernel.launch(args, grid_for(n_groups * out_features, 256)) }?;
        }
        Ok(PackedLinear {
            in_features,
            out_features,
            group_size: g,
            qweight: dev.download(&qweight)?,
            qzeros: dev.download(&qzeros)?,
            scales: dev.download(&scales)?.into_iter().map(half::f16::from_bits).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::randn;
    use crate::rng::SplitMix64;
    use crate::DType;

    #[test]
    fn asymmetric_groups_match_the_formula() {
        let spec = QuantSpec { bits: 4, group_size: GroupSize::new(4).unwrap(), zero_point: true };
        let w = Tensor::from_f32(&[1, 8], vec![-1.0, 0.0, 0.5, 2.0, 3.0, 3.0, 3.0, 3.0]).unwrap();
        let q = quantize_groups(&w, spec).unwrap();
        // group 0: scale = 3/15 = 0.2, zero = round(5) = 5; codes round(w/0.2) + 5 (0.5/0.2 = 2.5
        // rounds to even: 2).
        assert!((q.scales[0] - 0.2).abs() < 1e-7);
        assert_eq!(q.zeros[0], 5.0);
        assert_eq!(&q.codes[..4], &[0, 5, 7, 15]);
        // group 1: constant: scale = 1e-5/15, min/scale is huge -> zero clamps to 0, codes clamp to 15.
        assert_eq!(q.zeros[1], 0.0);
        assert_eq!(&q.codes[4..], &[15, 15, 15, 15]);
        let dq = pseudo_quantize(&w, spec).unwrap().to_f32_vec().unwrap();
        for (i, &c) in q.codes.iter().enumerate() {
            let want = (c as f32 - q.zeros[i / 4]) * q.scales[i / 4];
            assert_eq!(dq[i], want);
        }
    }

    #[test]
    fn symmetric_codes_are_signed_and_bounded() {
        let spec = QuantSpec { bits: 4, group_size: GroupSize::new(4).unwrap(), zero_point: false };
        let w = Tensor::from_f32(&[1, 4], vec![-1.4, -0.1, 0.35, 0.7]).unwrap();
        let q = quantize_groups(&w, spec).unwrap();
        assert!((q.scales[0] - 0.2).abs() < 1e-7);
        assert_eq!(q.codes, vec![-7, 0, 2, 4]); // round(1.75) = 2, round(-0.5) = -0 (ties to even)
        // 8 bits: symmetric codes (-128..=127) fit i8; with a zero point (0..=255) they are refused.
        let w = Tensor::from_f32(&[1, 4], vec![-1.0, -0.5, 0.25, 1.0]).unwrap();
        let q = quantize_groups(&w, QuantSpec { bits: 8, group_size: GroupSize::new(4).unwrap(), zero_point: false }).unwrap();
        assert_eq!(q.codes, vec![-127, -64, 32, 127]); // 127 / 1.0 per unit, ties to even: -63.5 -> -64
        let err = quantize_groups(&w, QuantSpec { bits: 8, group_size: GroupSize::new(4).unwrap(), zero_point: true }).unwrap_err();
        assert!(err.to_string().contains("8-bit codes with a zero point"), "{err}");
    }

    #[test]
    fn error_shrinks_with_smaller_groups_and_stays_bounded() {
        let mut rng = SplitMix64::new(9);
        let w = randn(&mut rng, &[64, 256], 1.0, DType::F32);
        let mut last = f64::INFINITY;
        for g in [128, 64, 32] {
            let spec = QuantSpec { bits: 4, group_size: GroupSize::new(g as u64).unwrap(), zero_point: true };
            let e = crate::ops::relative_error(&pseudo_quantize(&w, spec).unwrap(), &w).unwrap();
            // 4-bit uniform quantization of Gaussian groups: error ~ range/15/sqrt(12) per value.
            assert!(e < 0.12 && e < last, "group {g}: {e}");
            last = e;
        }
        let bad = QuantSpec { bits: 4, group_size: GroupSize::new(48).unwrap(), zero_point: true };
        assert!(matches!(pseudo_quantize(&w, bad), Err(Error::Shape { .. })));
    }
}
