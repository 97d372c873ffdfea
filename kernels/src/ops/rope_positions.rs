//! Rotary position embedding at given positions: [`super::apply_rope`]'s formula, for rows whose
//! positions are not `0..seq_len` (a serving step mixes prefill chunks that start mid-sequence and
//! decodes, one row each).
//!
//! Row `r` of `x` is rotated by the angle `positions[r] * inv_freq[i]`, computed in f64 and rounded
//! to f32 exactly as `apply_rope` does (a [`RopeCache`] holds those values for every position a
//! model serves, on its device), so a token gets bit-identical values from either op, on the CPU
//! and on CUDA (`paged_attention.cu`, `rope_at_*`).

use rayon::prelude::*;

use super::paged_attention::{cache_blocks, indices_on};
use super::{operands, Operands, PagedAttentionShape, PagedBatch, RopeTable};
use crate::{Device, Error, Indices, Result, Tensor};

/// cos and sin of a [`RopeTable`] for positions `0..n_positions`, each `[n_positions, rotary_dim /
/// 2]` f32, computed once on the host and kept on one device.
#[derive(Clone, Debug)]
pub struct RopeCache {
    rotary_dim: usize,
    cos: Tensor,
    sin: Tensor,
}

impl RopeCache {
    /// Errors: what moving the tables to `device` reports.
    pub fn new(table: &RopeTable, n_positions: usize, device: Device) -> Result<RopeCache> {
        let (cos, sin) = table.cos_sin(n_positions);
        let half = table.rotary_dim() / 2;
        Ok(RopeCache {
            rotary_dim: table.rotary_dim(),
            cos: Tensor::from_f32(&[n_positions, half], cos)?.to_device(device)?,
            sin: Tensor::from_f32(&[n_positions, half], sin)?.to_device(device)?,
        })
    }

    /// Positions the cache covers.
    pub fn n_positions(&self) -> usize {
        self.cos.shape()[0]
    }
}

/// Rotates `x[rows, n_heads * head_dim]`, row `r` at position `positions[r]`; output in `x`'s dtype.
///
/// Errors: [`Error::Shape`] when `positions` does not have one entry per row or the heads do not
/// fit the width, [`Error::Index`] for a position the cache does not cover,
/// [`Error::DeviceMismatch`] when the positions or the cache are elsewhere than `x`.
pub fn apply_rope_at(
    x: &Tensor,
    n_heads: usize,
    head_dim: usize,
    positions: &Indices,
    rope: &RopeCache,
) -> Result<Tensor> {
    let (rows, width) = x.dims2("rope_at")?;
    let rot = rope.rotary_dim;
    if width != n_heads * head_dim || rot > head_dim || rows != positions.len() {
        return Err(Error::Shape {
            op: "rope_at",
            detail: format!(
                "x is [{rows}, {width}], {n_heads} heads of {head_dim}, rotary dim {rot}, {} positions",
                positions.len()
            ),
        });
    }
    if let Some(&bad) = positions.values().iter().find(|&&p| p as usize >= rope.n_positions()) {
        return Err(Error::Index { op: "rope_at", index: bad as usize, len: rope.n_positions() });
    }
    if positions.device() != x.device() {
        return Err(Error::DeviceMismatch { op: "rope_at", first: x.device(), other: positions.device() });
    }
    let half = rot / 2;
    match operands("rope_at", [x, &rope.cos, &rope.sin])? {
        Operands::Cpu => {}
        #[cfg(feature = "cuda")]
        Operands::Cuda([sx, cos, sin], _) => return cuda::rope_at(sx, positions, cos, sin, rows, width, head_dim, half),
    }
    let (cos, sin) = (rope.cos.f32_values()?, rope.sin.f32_values()?);
    let mut out = x.to_f32_vec()?;
    out.par_chunks_mut(width.max(1)).zip(positions.values().par_iter()).for_each(|(row, &pos)| {
        let pos = pos as usize;
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

/// The attention inputs of a serving step from the fused q|k|v projection `qkv[rows, (n_heads + 2 *
/// n_kv_heads) * head_dim]` (q's columns, then k's, then v's): returns q rotated at each row's
/// position, `[rows, n_heads * head_dim]` in `qkv`'s dtype, and writes k rotated and v into the
/// rows' slots of `k_cache` and `v_cache`. The values of [`apply_rope_at`] on q and k and
/// [`super::write_kv_slots`] of k and v, bit for bit, in one pass (one kernel on CUDA instead of
/// four, and no copies to split the projection).
///
/// Errors: those of the ops it stands for ([`Error::Shape`] naming `rope_qkv` when `qkv`'s width
/// is not the heads').
pub fn rope_qkv_into_cache(
    qkv: &Tensor,
    batch: &PagedBatch,
    rope: &RopeCache,
    k_cache: &mut Tensor,
    v_cache: &mut Tensor,
    shape: PagedAttentionShape,
) -> Result<Tensor> {
    let PagedAttentionShape { n_heads, n_kv_heads, head_dim, .. } = shape;
    let (rows, width) = qkv.dims2("rope_qkv")?;
    let (q_width, kv_width) = (n_heads * head_dim, n_kv_heads * head_dim);
    if width != q_width + 2 * kv_width || rows != batch.rows() || rope.rotary_dim > head_dim {
        return Err(Error::Shape {
            op: "rope_qkv",
            detail: format!(
                "qkv is [{rows}, {width}] for {n_heads} + 2 x {n_kv_heads} heads of {head_dim} and {} rows",
                batch.rows()
            ),
        });
    }
    // The checks of the ops this stands for, made once here for both paths.
    let n_slots = cache_blocks("rope_qkv", k_cache, shape)? * shape.block_size;
    if cache_blocks("rope_qkv", v_cache, shape)? * shape.block_size != n_slots || v_cache.dtype() != k_cache.dtype() {
        return Err(Error::Shape {
            op: "rope_qkv",
            detail: format!("k cache {:?} {}, v cache {:?} {}", k_cache.shape(), k_cache.dtype(), v_cache.shape(), v_cache.dtype()),
        });
    }
    if let Some(&bad) = batch.slots().values().iter().find(|&&s| s as usize >= n_slots) {
        return Err(Error::Index { op: "rope_qkv", index: bad as usize, len: n_slots });
    }
    if let Some(&bad) = batch.positions().values().iter().find(|&&p| p as usize >= rope.n_positions()) {
        return Err(Error::Index { op: "rope_qkv", index: bad as usize, len: rope.n_positions() });
    }
    let device = super::common_device("rope_qkv", &[qkv, &*k_cache, &*v_cache, &rope.cos])?;
    indices_on("rope_qkv", batch.positions(), device)?;
    #[cfg(feature = "cuda")]
    if qkv.cuda_storage().is_some() {
        return cuda::rope_qkv_into_cache(qkv, batch, rope, k_cache, v_cache, shape);
    }
    // The reference: the projection split on the host, then the ops it fuses.
    let v = qkv.f32_values()?;
    let part = |from: usize, len: usize| -> Result<Tensor> {
        let cols: Vec<f32> = v.chunks(width.max(1)).flat_map(|row| row[from..from + len].to_vec()).collect();
        Tensor::from_f32_as(&[rows, len], cols, qkv.dtype())
    };
    let q = apply_rope_at(&part(0, q_width)?, n_heads, head_dim, batch.positions(), rope)?;
    let k = apply_rope_at(&part(q_width, kv_width)?, n_kv_heads, head_dim, batch.positions(), rope)?;
    super::write_kv_slots(k_cache, &k, batch.slots(), shape)?;
    super::write_kv_slots(v_cache, &part(q_width + kv_width, kv_width)?, batch.slots(), shape)?;
    Ok(q)
}

#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::PushKernelArg;

    use super::{PagedAttentionShape, PagedBatch, RopeCache};
    use crate::cuda::{grid_for, kernel_dim, CudaStorage};
    use crate::ops::paged_attention::CUDA_SOURCE;
    use crate::{Device, Error, Indices, Result, Tensor};

    /// One thread per value, as `rope.cu`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rope_at(
        sx: &CudaStorage,
        positions: &Indices,
        cos: &CudaStorage,
        sin: &CudaStorage,
        rows: usize,
        width: usize,
        head_dim: usize,
        half: usize,
    ) -> Result<Tensor> {
        let dev = sx.dev().clone();
        let n = rows * width;
        let mut out = dev.alloc_buf(sx.dtype(), n)?;
        if n > 0 {
            let positions = positions.cuda().ok_or(Error::DeviceMismatch {
                op: "rope_at",
                first: dev.device(),
                other: positions.device(),
            })?;
            let kernel = dev.kernel(&CUDA_SOURCE, &format!("rope_at_{}", sx.dtype()))?;
            let n64 = n as u64;
            let (width32, head_dim32, half32) =
                (kernel_dim("rope_at", width)?, kernel_dim("rope_at", head_dim)?, kernel_dim("rope_at", half)?);
            let mut args = kernel.args();
            sx.buf().arg(&mut args);
            args.arg(positions);
            cos.buf().arg(&mut args);
            sin.buf().arg(&mut args);
            out.arg_mut(&mut args);
            args.arg(&n64);
            args.arg(&width32);
            args.arg(&head_dim32);
            args.arg(&half32);
            // SAFETY: rope_at_<t>(const T* x, const u32* positions, const f32* cos, const f32* sin, T*
            // out, u64 n, u32 width, u32 head_dim, u32 half), the dtype that of x and out: both hold
            // n = rows * width values, positions one per row, each below the cache's n_positions
            // (checked by `apply_rope_at`), and the f32 tables n_positions * half values, indexed by
            // i < half <= head_dim / 2.
            unsafe { kernel.launch(args, grid_for(n, 256)) }?;
        }
        Ok(Tensor::from_cuda(&[rows, width], CudaStorage::new(dev, out)))
    }

    /// One thread per value of the projection (see `rope_qkv` in `paged_attention.cu`).
    pub(super) fn rope_qkv_into_cache(
        qkv: &Tensor,
        batch: &PagedBatch,
        rope: &RopeCache,
        k_cache: &mut Tensor,
        v_cache: &mut Tensor,
        shape: PagedAttentionShape,
    ) -> Result<Tensor> {
        let PagedAttentionShape { n_heads, n_kv_heads, head_dim, .. } = shape;
        let (rows, width) = qkv.dims2("rope_qkv")?;
        let (q_width, kv_width) = (n_heads * head_dim, n_kv_heads * head_dim);
        // Shapes, bounds and devices: checked by `rope_qkv_into_cache`.
        let mismatch = |other| Error::DeviceMismatch { op: "rope_qkv", first: qkv.device(), other };
        let (Some(sx), Some(cos), Some(sin)) = (qkv.cuda_storage(), rope.cos.cuda_storage(), rope.sin.cuda_storage()) else {
            return Err(mismatch(rope.cos.device()));
        };
        let (Some(positions), Some(slots)) = (batch.positions().cuda(), batch.slots().cuda()) else {
            return Err(mismatch(batch.device()));
        };
        let dev = sx.dev().clone();
        let mut q = dev.alloc_buf(sx.dtype(), rows * q_width)?;
        let n = rows * width;
        if n > 0 {
            let cache_dtype = k_cache.dtype();
            let kernel = dev.kernel(&CUDA_SOURCE, &format!("rope_qkv_{}_{}", sx.dtype(), cache_dtype))?;
            let n64 = n as u64;
            let dims = [width, q_width, kv_width, head_dim, rope.rotary_dim / 2];
            let [width32, q_width32, kv_width32, head_dim32, half32] = dims.map(|d| d as u32);
            for d in dims {
                kernel_dim("rope_qkv", d)?;
            }
            let (Some(kc), Some(vc)) = (k_cache.cuda_storage_mut(), v_cache.cuda_storage_mut()) else {
                return Err(mismatch(Device::Cpu));
            };
            let (kc, vc) = (kc.buf_mut()?, vc.buf_mut()?);
            let mut args = kernel.args();
            sx.buf().arg(&mut args);
            args.arg(positions);
            args.arg(slots);
            cos.buf().arg(&mut args);
            sin.buf().arg(&mut args);
            q.arg_mut(&mut args);
            kc.arg_mut(&mut args);
            vc.arg_mut(&mut args);
            args.arg(&n64);
            args.arg(&width32);
            args.arg(&q_width32);
            args.arg(&kv_width32);
            args.arg(&head_dim32);
            args.arg(&half32);
            // SAFETY: rope_qkv_<t>_<c>(const T* qkv, const u32* positions, const u32* slots, const
            // f32* cos, const f32* sin, T* q, C* k_cache, C* v_cache, u64 n, u32 width, u32 q_width,
            // u32 kv_width, u32 head_dim, u32 half), the dtypes those of qkv and the caches (both C,
            // checked): qkv holds n = rows * width values with width = q_width + 2 kv_width, q
            // rows * q_width; positions and slots one per row (the batch's rows, checked), each
            // slot below the caches' slot count and each position below the tables' n_positions
            // (checked above), the tables n_positions * half values, half <= head_dim / 2.
            unsafe { kernel.launch(args, grid_for(n, 256)) }?;
        }
        Ok(Tensor::from_cuda(&[rows, q_width], CudaStorage::new(dev, q)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::apply_rope;
    use crate::ops::test_util::rel;
    use crate::rng::SplitMix64;

    #[test]
    fn rope_at_positions_matches_the_f64_formula_and_apply_rope() {
        let mut rng = SplitMix64::new(3);
        let (heads, hd) = (3, 10);
        // Partial rotary (8 of 10) and a llama-like base.
        let table = RopeTable::new(8, 10_000.0);
        let cache = RopeCache::new(&table, 1001, Device::Cpu).unwrap();
        let positions = [0, 5, 1, 1000, 7, 7];
        let x = Tensor::from_f32(&[6, heads * hd], rng.normal_vec(6 * heads * hd, 1.0)).unwrap();
        let got = apply_rope_at(&x, heads, hd, &Indices::host(positions.to_vec()), &cache).unwrap();
        let xv = x.f32_values().unwrap();
        let mut want = Vec::new();
        for (r, &p) in positions.iter().enumerate() {
            for h in 0..heads {
                let head = &xv[(r * heads + h) * hd..][..hd];
                for i in 0..hd {
                    let v = if i < 4 {
                        let a = p as f64 * table.inv_freq()[i];
                        head[i] as f64 * a.cos() - head[i + 4] as f64 * a.sin()
                    } else if i < 8 {
                        let a = p as f64 * table.inv_freq()[i - 4];
                        head[i] as f64 * a.cos() + head[i - 4] as f64 * a.sin()
                    } else {
                        head[i] as f64
                    };
                    want.push(v);
                }
            }
        }
        let e = rel(&got.f32_values().unwrap(), &want);
        assert!(e < 1e-6, "relative error {e}");

        // Positions 0..T give apply_rope's values bit for bit.
        let t = 9;
        let x = Tensor::from_f32(&[t, heads * hd], rng.normal_vec(t * heads * hd, 1.0)).unwrap();
        let positions: Vec<u32> = (0..t as u32).collect();
        assert_eq!(
            apply_rope_at(&x, heads, hd, &Indices::host(positions.clone()), &cache).unwrap(),
            apply_rope(&x, heads, hd, t, &table).unwrap()
        );

        let err = apply_rope_at(&x, heads, hd, &Indices::host(positions[1..].to_vec()), &cache).unwrap_err();
        assert!(matches!(err, Error::Shape { op: "rope_at", .. }), "{err}");
        let mut beyond = positions.clone();
        beyond[3] = 1001;
        let err = apply_rope_at(&x, heads, hd, &Indices::host(beyond), &cache).unwrap_err();
        assert!(matches!(err, Error::Index { op: "rope_at", index: 1001, len: 1001 }), "{err}");
    }

    #[test]
    fn the_fused_qkv_step_is_the_unfused_ops_and_checks_its_caches() {
        use crate::ops::{kv_cache_shape, write_kv_slots, PagedSeq};
        use crate::DType;
        let mut rng = SplitMix64::new(6);
        let shape = PagedAttentionShape { n_heads: 4, n_kv_heads: 2, head_dim: 8, block_size: 4, sliding_window: None };
        let cache = RopeCache::new(&RopeTable::new(8, 10_000.0), 64, Device::Cpu).unwrap();
        let seqs = [PagedSeq { block_table: &[2, 0], first_position: 3, n_queries: 5 }];
        let batch = PagedBatch::new(&seqs, 4, 3, Device::Cpu).unwrap();
        let qkv = Tensor::from_f32(&[5, 64], rng.normal_vec(5 * 64, 1.0)).unwrap();
        let zeros = || Tensor::zeros(&kv_cache_shape(3, shape), DType::F32);
        let (mut k, mut v) = (zeros(), zeros());
        let q = rope_qkv_into_cache(&qkv, &batch, &cache, &mut k, &mut v, shape).unwrap();
        // The same through the separate ops, on the projection's column ranges.
        let cols = |from: usize, len: usize| {
            let x = qkv.f32_values().unwrap();
            Tensor::from_f32(&[5, len], x.chunks(64).flat_map(|r| r[from..from + len].to_vec()).collect()).unwrap()
        };
        assert_eq!(q, apply_rope_at(&cols(0, 32), 4, 8, batch.positions(), &cache).unwrap());
        let (mut k2, mut v2) = (zeros(), zeros());
        write_kv_slots(&mut k2, &apply_rope_at(&cols(32, 16), 2, 8, batch.positions(), &cache).unwrap(), batch.slots(), shape).unwrap();
        write_kv_slots(&mut v2, &cols(48, 16), batch.slots(), shape).unwrap();
        assert_eq!((k, v), (k2, v2));
        // A cache of another layout, or too small for the batch's slots, is refused.
        let (mut small, mut other) = (Tensor::zeros(&kv_cache_shape(1, shape), DType::F32), zeros());
        let err = rope_qkv_into_cache(&qkv, &batch, &cache, &mut small, &mut other, shape).unwrap_err();
        assert!(matches!(err, Error::Shape { op: "rope_qkv", .. }), "{err}");
        let mut small_v = Tensor::zeros(&kv_cache_shape(1, shape), DType::F32);
        let err = rope_qkv_into_cache(&qkv, &batch, &cache, &mut small, &mut small_v, shape).unwrap_err();
        assert!(matches!(err, Error::Index { op: "rope_qkv", .. }), "{err}");
    }
}
