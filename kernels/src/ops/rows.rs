//! Rows gathered and scattered by index: a mixture of experts runs each expert on the tokens routed
//! to it ([`gather_rows`]) and adds its outputs back into those tokens' rows, weighted by their
//! routing probabilities ([`scatter_add_rows`]). One call per expert, tokens grouped, no per-token
//! loop; the same calls on the CPU and on a GPU.
//!
//! `scatter_add_rows` takes one expert's tokens at a time: its row indices are distinct (a token
//! picks an expert once), which the op checks, so on a GPU every output value has one writer and
//! no atomics are needed; calls for successive experts add in call order, so the sums do not depend
//! on thread timing. The CUDA kernel rounds the product and the sum separately (`__fmul_rn`,
//! `__fadd_rn`: no fused multiply-add), as the CPU does, so both give the same bits.

use super::{common_device, embedding_at, operands, Operands};
use crate::{Error, Indices, Result, Tensor};

/// Rows `rows` of `x[R, C]`, as `[rows.len(), C]` in `x`'s dtype on `x`'s device: the embedding
/// lookup's gather (`ops::embedding_at`), whose kernel copies values bit for bit. Errors:
/// [`Error::Index`] for a row outside `x`, [`Error::DeviceMismatch`] when `rows` is elsewhere.
pub fn gather_rows(x: &Tensor, rows: &Indices) -> Result<Tensor> {
    embedding_at(x, rows, x.dtype())
}

/// `out[rows[i], :] += weights[i] * src[i, :]` for every row `i` of `src[n, C]`, into `out[R, C]` in
/// place (any dtypes; the product and the sum in f32, rounded once to `out`'s dtype). `rows` and
/// `weights` hold `n` entries, each row below `R` and none twice (one expert's tokens: see the
/// module docs). Errors: [`Error::Shape`] (widths, lengths, a repeated row), [`Error::Index`],
/// [`Error::DeviceMismatch`].
pub fn scatter_add_rows(out: &mut Tensor, src: &Tensor, rows: &Indices, weights: &[f32]) -> Result<()> {
    const OP: &str = "scatter_add_rows";
    let (r, c) = out.dims2(OP)?;
    let (n, src_c) = src.dims2(OP)?;
    if src_c != c || rows.len() != n || weights.len() != n {
        let detail = format!("out [{r}, {c}], src [{n}, {src_c}], {} rows, {} weights", rows.len(), weights.len());
        return Err(Error::Shape { op: OP, detail });
    }
    let mut seen = vec![false; r];
    for &row in rows.values() {
        let row = row as usize;
        if row >= r {
            return Err(Error::Index { op: OP, index: row, len: r });
        }
        if std::mem::replace(&mut seen[row], true) {
            return Err(Error::Shape { op: OP, detail: format!("row {row} appears twice: its sums would race") });
        }
    }
    common_device(OP, &[out, src])?;
    if rows.device() != src.device() {
        return Err(Error::DeviceMismatch { op: OP, first: src.device(), other: rows.device() });
    }
    if n == 0 || c == 0 {
        return Ok(());
    }
    match operands(OP, [src])? {
        Operands::Cpu => {}
        #[cfg(feature = "cuda")]
        Operands::Cuda([ss], _) => {
            let target = out.cuda_storage_mut().expect("out is on src's CUDA device (checked above)");
            return cuda::scatter_add_rows(target, ss, rows, weights, c);
        }
    }
    let src = src.f32_values()?;
    let add = |values: &mut [f32]| {
        for ((&row, &w), from) in rows.values().iter().zip(weights).zip(src.chunks_exact(c)) {
            let to = &mut values[row as usize * c..(row as usize + 1) * c];
            to.iter_mut().zip(from).for_each(|(o, s)| *o += w * s);
        }
    };
    match out.f32_values_mut() {
        Some(values) => add(values),
        None => {
            let mut values = out.to_f32_vec()?;
            add(&mut values);
            *out = Tensor::from_f32_as(&[r, c], values, out.dtype())?;
        }
    }
    Ok(())
}

#[cfg(feature = "cuda")]
pub(crate) const CUDA_SOURCE: crate::cuda::CudaSource = crate::cuda::CudaSource {
    file: "ops/rows.cu",
    code: include_str!("rows.cu"),
    headers: &[],
    kernels: &[
        "scatter_add_rows_f32_f32", "scatter_add_rows_f32_f16", "scatter_add_rows_f32_bf16",
        "scatter_add_rows_f16_f32", "scatter_add_rows_f16_f16", "scatter_add_rows_f16_bf16",
        "scatter_add_rows_bf16_f32", "scatter_add_rows_bf16_f16", "scatter_add_rows_bf16_bf16",
    ],
};

#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::PushKernelArg;

    use super::CUDA_SOURCE;
    use crate::cuda::{grid_for, kernel_dim, CudaStorage};
    use crate::{Error, Indices, Result};

    /// One thread per value of `src`; the rows were checked (in range, distinct).
    pub(super) fn scatter_add_rows(
        out: &mut CudaStorage,
        src: &CudaStorage,
        rows: &Indices,
        weights: &[f32],
        c: usize,
    ) -> Result<()> {
        let dev = out.dev().clone();
        let op = "scatter_add_rows";
        let rows_dev = rows.cuda().ok_or(Error::DeviceMismatch { op, first: dev.device(), other: rows.device() })?;
        let weights_dev = dev.upload(weights)?;
        let (n, c32) = ((rows.len() * c) as u64, kernel_dim(op, c)?);
        let kernel = dev.kernel(&CUDA_SOURCE, &format!("scatter_add_rows_{}_{}", out.dtype(), src.dtype()))?;
        let target = out.buf_mut()?;
        let mut args = kernel.args();
        target.arg_mut(&mut args);
        src.buf().arg(&mut args);
        args.arg(rows_dev);
        args.arg(&weights_dev);
        args.arg(&n);
        args.arg(&c32);
        // SAFETY: scatter_add_rows_<o>_<s>(O* out, const S* src, const u32* rows, const float* w,
        // u64 n, u32 c), the dtypes those of out and src: src holds n = len(rows) * c values, rows
        // and w one entry per src row; every row is below out's row count and appears once
        // (checked by `scatter_add_rows`), so each out value has at most one writer; out is not
        // shared with another tensor (`buf_mut`); the grid-stride loop stops at n.
        unsafe { kernel.launch(args, grid_for(rows.len() * c, 256)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use crate::DType;

    /// Gathered rows are the rows; scattered ones add `w * src` to exactly the named rows (an f64
    /// reference), in every dtype of `out`; repeated or outside rows and wrong lengths are refused.
    #[test]
    fn gather_then_scatter_add_the_weighted_rows_back() {
        let mut rng = SplitMix64::new(31);
        let (r, c) = (9, 13);
        let x = Tensor::from_f32(&[r, c], rng.normal_vec(r * c, 1.0)).unwrap();
        let rows = Indices::host(vec![7, 0, 4]);
        let gathered = gather_rows(&x, &rows).unwrap();
        for (i, &row) in rows.values().iter().enumerate() {
            let row = row as usize;
            assert_eq!(gathered.rows(i, i + 1).unwrap(), x.rows(row, row + 1).unwrap());
        }
        let weights = [0.25f32, -1.5, 0.8];
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let base = rng.normal_vec(r * c, 1.0);
            let mut out = Tensor::from_f32_as(&[r, c], base.clone(), dtype).unwrap();
            let start = out.to_f32_vec().unwrap();
            scatter_add_rows(&mut out, &gathered, &rows, &weights).unwrap();
            let got = out.to_f32_vec().unwrap();
            let x = x.to_f32_vec().unwrap();
            for row in 0..r {
                let routed = rows.values().iter().position(|&v| v as usize == row);
                for col in 0..c {
                    let want = start[row * c + col] as f64
                        + routed.map_or(0.0, |i| weights[i] as f64 * x[row * c + col] as f64);
                    let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 } * want.abs().max(1.0);
                    let g = got[row * c + col] as f64;
                    assert!((g - want).abs() <= tol, "{dtype} [{row}, {col}]: {g} vs {want}");
                    if routed.is_none() {
                        assert_eq!(g, start[row * c + col] as f64, "an unrouted row changed");
                    }
                }
            }
        }
        let mut out = Tensor::zeros(&[r, c], DType::F32);
        let err = scatter_add_rows(&mut out, &gathered, &Indices::host(vec![1, 2, 1]), &weights).unwrap_err();
        assert!(matches!(err, Error::Shape { .. }) && err.to_string().contains("row 1 appears twice"), "{err}");
        let err = scatter_add_rows(&mut out, &gathered, &Indices::host(vec![1, 2, 9]), &weights).unwrap_err();
        assert!(matches!(err, Error::Index { index: 9, len: 9, .. }), "{err}");
        let err = scatter_add_rows(&mut out, &gathered, &rows, &weights[..2]).unwrap_err();
        assert!(matches!(err, Error::Shape { .. }), "{err}");
        // No rows: nothing changes.
        let empty = Tensor::zeros(&[0, c], DType::F32);
        scatter_add_rows(&mut out, &empty, &Indices::host(vec![]), &[]).unwrap();
        assert!(out.to_f32_vec().unwrap().iter().all(|&v| v == 0.0));
    }
}
