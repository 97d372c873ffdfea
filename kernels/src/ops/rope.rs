//! Rotary position embedding (Su et al. 2021) in the Hugging Face `rotate_half` convention.
//!
//! For each head, the first `rotary_dim` values are split into halves `(x1, x2)` and rotated:
//! `[x1 cos - x2 sin, x2 cos + x1 sin]`, with angle `pos * inv_freq[i]`. Values past `rotary_dim`
//! (partial rotary) pass through. The inverse frequencies come from the caller, so RoPE scaling
//! variants (llama3, linear) are the model's business and this op stays one formula.

use rayon::prelude::*;

use super::{operands, Operands};
use crate::{Error, Result, Tensor};

/// Inverse frequencies of a rotary embedding: `rotary_dim / 2` of them.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeTable {
    inv_freq: Vec<f64>,
}

impl RopeTable {
    /// The standard table: `inv_freq[i] = 1 / theta^(2i / rotary_dim)`.
    pub fn new(rotary_dim: usize, theta: f64) -> RopeTable {
        let inv_freq = (0..rotary_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / rotary_dim as f64)).collect();
        RopeTable { inv_freq }
    }

    /// A table from precomputed inverse frequencies (for scaled variants).
    pub fn from_inv_freq(inv_freq: Vec<f64>) -> RopeTable {
        RopeTable { inv_freq }
    }

    pub fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }

    /// How many leading values of each head are rotated.
    pub fn rotary_dim(&self) -> usize {
        2 * self.inv_freq.len()
    }

    /// cos and sin for positions `0..seq_len`, each `[seq_len, rotary_dim / 2]`, rounded to f32 after
    /// computing the angle in f64 (as the reference implementations do).
    pub(crate) fn cos_sin(&self, seq_len: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(seq_len * half);
        let mut sin = Vec::with_capacity(seq_len * half);
        for pos in 0..seq_len {
            for &f in &self.inv_freq {
                let angle = pos as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        (cos, sin)
    }
}

/// Rotates `x[batch * seq_len, n_heads * head_dim]`; row `r` is at position `r % seq_len`. Output in
/// `x`'s dtype; on CUDA bit-identical to the CPU's (same table, same f32 operations, see `rope.cu`).
pub fn apply_rope(x: &Tensor, n_heads: usize, head_dim: usize, seq_len: usize, table: &RopeTable) -> Result<Tensor> {
    let (rows, width) = x.dims2("rope")?;
    let rot = table.rotary_dim();
    if width != n_heads * head_dim || rot > head_dim || seq_len == 0 || rows % seq_len != 0 {
        return Err(Error::Shape {
            op: "rope",
            detail: format!(
                "x is [{rows}, {width}], {n_heads} heads of {head_dim}, rotary dim {rot}, sequence length {seq_len}"
            ),
        });
    }
    match operands("rope", [x])? {
        Operands::Cpu => rope_cpu(x, head_dim, seq_len, table),
        #[cfg(feature = "cuda")]
        Operands::Cuda([sx], _) => cuda::apply_rope(sx, rows, width, head_dim, seq_len, table),
    }
}

/// The reference, on shapes `apply_rope` checked.
fn rope_cpu(x: &Tensor, head_dim: usize, seq_len: usize, table: &RopeTable) -> Result<Tensor> {
    let (rows, width) = x.dims2("rope")?;
    let (cos, sin) = table.cos_sin(seq_len);
    let half = table.rotary_dim() / 2;
    let mut out = x.to_f32_vec()?;
    out.par_chunks_mut(width.max(1)).enumerate().for_each(|(r, row)| {
        let pos = r % seq_len;
        let (c, s) = (&cos[pos * half..(pos + 1) * half], &sin[pos * half..(pos + 1) * half]);
        for head in row.chunks_exact_mut(head_dim) {
            let (x1, rest) = head.split_at_mut(half);
            let x2 = &mut rest[..half];
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * c[i] - b * s[i];
                x2[i] = b * c[i] + a * s[i];
            }
        }
    });
    Tensor::from_f32_as(&[rows, width], out, x.dtype())
}

#[cfg(feature = "cuda")]
pub(crate) const CUDA_SOURCE: crate::cuda::CudaSource = crate::cuda::CudaSource {
    file: "ops/rope.cu",
    code: include_str!("rope.cu"),
    headers: &[],
    kernels: &["rope_f32", "rope_f16", "rope_bf16"],
};

#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::PushKernelArg;

    use super::{RopeTable, CUDA_SOURCE};
    use crate::cuda::{grid_for, kernel_dim, CudaStorage};
    use crate::{Result, Tensor};

    /// One thread per value; the cos/sin table is computed on the host by the CPU path's own code
    /// and uploaded (`[seq_len, rotary_dim / 2]` f32, 256 KiB for 512 positions of a 128-wide head).
    pub(super) fn apply_rope(
        sx: &CudaStorage,
        rows: usize,
        width: usize,
        head_dim: usize,
        seq_len: usize,
        table: &RopeTable,
    ) -> Result<Tensor> {
        let dev = sx.dev();
        let n = rows * width;
        let mut out = dev.alloc_buf(sx.dtype(), n)?;
        if n > 0 {
            let (cos, sin) = table.cos_sin(seq_len);
            let (cos, sin) = (dev.upload(&cos)?, dev.upload(&sin)?);
            let n64 = n as u64;
            let (width32, head_dim32) = (kernel_dim("rope", width)?, kernel_dim("rope", head_dim)?);
            let (half32, seq_len32) = (kernel_dim("rope", table.rotary_dim() / 2)?, kernel_dim("rope", seq_len)?);
            let kernel = dev.kernel(&CUDA_SOURCE, &format!("rope_{}", sx.dtype()))?;
            let mut args = kernel.args();
            sx.buf().arg(&mut args);
            args.arg(&cos);
            args.arg(&sin);
            out.arg_mut(&mut args);
            args.arg(&n64);
            args.arg(&width32);
            args.arg(&head_dim32);
            args.arg(&half32);
            args.arg(&seq_len32);
            // SAFETY: rope_<t>(const T* x, const float* cos, const float* sin, T* out, u64 n, u32
            // width, u32 head_dim, u32 half, u32 seq_len), the dtype that of x and out: both hold n
            // = rows * width values, the tables seq_len * half (`cos_sin(seq_len)`), indexed by
            // position r % seq_len and i < half <= head_dim / 2 (checked by `apply_rope`).
            unsafe { kernel.launch(args, grid_for(n, 256)) }?;
        }
        Ok(Tensor::from_cuda(&[rows, width], CudaStorage::new(dev.clone(), out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{randn, rel};
    use crate::rng::SplitMix64;
    use crate::DType;

    /// Straight from the formula, in f64, one element at a time.
    fn reference(x: &[f32], heads: usize, hd: usize, rot: usize, seq: usize, theta: f64) -> Vec<f64> {
        let mut out: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let width = heads * hd;
        for r in 0..x.len() / width {
            let pos = (r % seq) as f64;
            for h in 0..heads {
                let base = r * width + h * hd;
                for i in 0..rot / 2 {
                    let ang = pos * theta.powf(-(2.0 * i as f64) / rot as f64);
                    let (a, b) = (x[base + i] as f64, x[base + i + rot / 2] as f64);
                    out[base + i] = a * ang.cos() - b * ang.sin();
                    out[base + i + rot / 2] = b * ang.cos() + a * ang.sin();
                }
            }
        }
        out
    }

    #[test]
    fn matches_formula_full_and_partial() {
        let mut rng = SplitMix64::new(3);
        for &(heads, hd, rot, seq, batch) in &[(3, 64, 64, 17, 2), (2, 32, 16, 5, 3), (1, 8, 8, 1, 1)] {
            let x = randn(&mut rng, &[seq * batch, heads * hd], 1.0, DType::F32);
            let table = RopeTable::new(rot, 10000.0);
            let got = apply_rope(&x, heads, hd, seq, &table).unwrap();
            let want = reference(&x.to_f32_vec().unwrap(), heads, hd, rot, seq, 10000.0);
            assert!(rel(&got.to_f32_vec().unwrap(), &want) < 1e-6);
        }
    }

    #[test]
    fn position_zero_is_identity_and_bad_shapes_fail() {
        let mut rng = SplitMix64::new(4);
        let x = randn(&mut rng, &[1, 16], 1.0, DType::F32);
        let table = RopeTable::new(8, 10000.0);
        assert_eq!(apply_rope(&x, 2, 8, 1, &table).unwrap(), x);
        assert!(apply_rope(&x, 3, 8, 1, &table).is_err());
        assert!(apply_rope(&x, 2, 8, 0, &table).is_err());
    }
}
