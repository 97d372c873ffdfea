//! Embedding lookup: one table row per token id, optionally times a constant (Gemma multiplies its
//! embeddings by `sqrt(hidden_size)`: [`embedding_scaled_at`]).

use super::{operands, Operands};
use crate::{DType, Error, Indices, Result, Tensor};

/// Gathers rows of `table[V, D]` for `ids`, returning `[ids.len(), D]` in `out_dtype`, on `table`'s
/// device (the ids come from the host either way). Every id is checked before anything is read.
pub fn embedding(table: &Tensor, ids: &[u32], out_dtype: DType) -> Result<Tensor> {
    embedding_at(table, &Indices::new(ids.to_vec(), table.device())?, out_dtype)
}

/// [`embedding`] of ids already on `table`'s device (a step's ids, uploaded once; rewritten in
/// place between replays of a recorded [`crate::Graph`]).
///
/// Errors: [`Error::Index`] for an id outside the table, [`Error::DeviceMismatch`] when the ids
/// are on another device.
pub fn embedding_at(table: &Tensor, ids: &Indices, out_dtype: DType) -> Result<Tensor> {
    embedding_scaled_at(table, ids, 1.0, out_dtype)
}

/// [`embedding_at`] times `scale`: each value widened to f32, multiplied, and rounded once to
/// `out_dtype` (a scale of 1 gives [`embedding_at`]'s bits). The scale is a kernel argument, so a
/// recorded [`crate::Graph`] holds it. Errors: as [`embedding_at`].
pub fn embedding_scaled_at(table: &Tensor, ids: &Indices, scale: f32, out_dtype: DType) -> Result<Tensor> {
    let (v, d) = table.dims2("embedding")?;
    if let Some(&bad) = ids.values().iter().find(|&&id| id as usize >= v) {
        return Err(Error::Index { op: "embedding", index: bad as usize, len: v });
    }
    if ids.device() != table.device() {
        return Err(Error::DeviceMismatch { op: "embedding", first: table.device(), other: ids.device() });
    }
    match operands("embedding", [table])? {
        Operands::Cpu => embedding_cpu(table, ids.values(), d, scale, out_dtype),
        #[cfg(feature = "cuda")]
        Operands::Cuda([st], _) => cuda::embedding(st, ids, d, scale, out_dtype),
    }
}

fn embedding_cpu(table: &Tensor, ids: &[u32], d: usize, scale: f32, out_dtype: DType) -> Result<Tensor> {
    let mut out = Vec::with_capacity(ids.len() * d);
    for &id in ids {
        out.extend(table.rows(id as usize, id as usize + 1)?.f32_values()?.iter().map(|v| v * scale));
    }
    Tensor::from_f32_as(&[ids.len(), d], out, out_dtype)
}

#[cfg(feature = "cuda")]
pub(crate) const CUDA_SOURCE: crate::cuda::CudaSource = crate::cuda::CudaSource {
    file: "ops/embedding.cu",
    code: include_str!("embedding.cu"),
    headers: &[],
    kernels: &[
        "embedding_f32_f32", "embedding_f32_f16", "embedding_f32_bf16",
        "embedding_f16_f32", "embedding_f16_f16", "embedding_f16_bf16",
        "embedding_bf16_f32", "embedding_bf16_f16", "embedding_bf16_bf16",
    ],
};

#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::PushKernelArg;

    use super::CUDA_SOURCE;
    use crate::cuda::{grid_for, kernel_dim, CudaStorage};
    use crate::{DType, Error, Indices, Result, Tensor};

    /// One thread per output value; the ids were checked.
    pub(super) fn embedding(st: &CudaStorage, ids: &Indices, d: usize, scale: f32, out_dtype: DType) -> Result<Tensor> {
        let dev = st.dev();
        let n = ids.len() * d;
        let mut out = dev.alloc_buf(out_dtype, n)?;
        if n > 0 {
            let ids_dev = ids.cuda().ok_or(Error::DeviceMismatch { op: "embedding", first: dev.device(), other: ids.device() })?;
            let (n64, d32) = (n as u64, kernel_dim("embedding", d)?);
            let kernel = dev.kernel(&CUDA_SOURCE, &format!("embedding_{}_{}", st.dtype(), out_dtype))?;
            let mut args = kernel.args();
            st.buf().arg(&mut args);
            args.arg(ids_dev);
            out.arg_mut(&mut args);
            args.arg(&n64);
            args.arg(&d32);
            args.arg(&scale);
            // SAFETY: embedding_<t>_<o>(const T* table, const u32* ids, O* out, u64 n, u32 d,
            // float scale), the
            // dtypes those of the table and out: out holds n = ids * d values, ids_dev one id per
            // row of out, each below the table's row count (checked by `embedding_at`), so row id
            // of the [rows, d] table is in bounds; the grid-stride loop stops at n.
            unsafe { kernel.launch(args, grid_for(n, 256)) }?;
        }
        Ok(Tensor::from_cuda(&[ids.len(), d], CudaStorage::new(dev.clone(), out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathers_rows_and_checks_ids() {
        let t = Tensor::from_f32(&[3, 2], vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]).unwrap().into_dtype(DType::F16);
        let e = embedding(&t, &[2, 0, 2], DType::F32).unwrap();
        assert_eq!(e.to_f32_vec().unwrap(), vec![4.0, 5.0, 0.0, 1.0, 4.0, 5.0]);
        assert!(matches!(embedding(&t, &[3], DType::F32), Err(Error::Index { index: 3, len: 3, .. })));
        let scaled = embedding_scaled_at(&t, &Indices::host(vec![1]), 2.5, DType::F32).unwrap();
        assert_eq!(scaled.to_f32_vec().unwrap(), vec![5.0, 7.5]);
    }
}
