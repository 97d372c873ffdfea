//! One tensor-parallel rank's attention over the paged KV cache: its q, k and v projections, the
//! per-head q/k norms where the architecture has them ([`QkNorms`], Qwen3), RoPE at each row's
//! position, K and V written into the rows' slots, `ops::paged_attention`, and its share of o_proj.
//!
//! On a GPU, q|k|v are stacked into one linear and split by one kernel that also applies RoPE and
//! writes the cache (`ops::rope_qkv_into_cache`); that kernel has no norm between projection and
//! RoPE, so a block with q/k norms keeps its three projections apart ([`QkvProjection::Apart`]) and
//! runs the ops that kernel stands for one by one, as the CPU does.

use awq_kernels::ops::{self, PagedAttentionShape, PagedBatch, RopeCache};
use awq_kernels::{DType, Device, Tensor};
use awq_model::arch::{LinearRole, NormRole};
use awq_model::Checkpoint;

use super::block::{head_rms_norm, norm_weight_as};
use super::rank::{Projections, RankBlock};
use super::{ApplyLinear, BlockShape, Linear};
use crate::{Error, Result};

/// A GPU rank's q, k and v projections.
pub(super) enum QkvProjection {
    /// Stacked into one linear `[q | k | v]`: one matrix product, then `ops::rope_qkv_into_cache`.
    Stacked(Linear),
    /// Apart, for blocks whose q and k heads are normalised between projection and RoPE.
    Apart([Linear; 3]),
}

/// A block's per-head RMSNorm factors of q and k (`[head_dim]` each, `block::norm_weight_as` on its
/// device; the epsilon is `BlockShape::rms_norm_eps`). Replicated: every rank normalises its own
/// heads with the same weights.
pub(super) struct QkNorms {
    q: Tensor,
    k: Tensor,
}

impl QkNorms {
    /// Block `block_idx`'s q/k norms when `shape` says it has them, else `None`.
    pub(super) fn load(
        checkpoint: &Checkpoint,
        block_idx: usize,
        shape: &BlockShape,
        dtype: DType,
        device: Device,
    ) -> Result<Option<QkNorms>> {
        if !shape.qk_norm {
            return Ok(None);
        }
        let norm = |role| -> Result<Tensor> {
            let t = checkpoint.tensor(&checkpoint.arch().norm_name(block_idx, role))?;
            norm_weight_as(t, shape.norm_form, dtype)
                .and_then(|t| t.to_device(device))
                .map_err(|e| Error::Kernel { block_idx: Some(block_idx), cause: Box::new(e) })
        };
        Ok(Some(QkNorms { q: norm(NormRole::QHead)?, k: norm(NormRole::KHead)? }))
    }
}

/// One rank's attention (its query heads over its KV heads) through its share of o_proj: a partial
/// output `[rows, hidden]`. `qk_norms`: the block's, when it has them; `paged` carries the block's
/// sliding window and `rope` is the block's RoPE.
pub(super) fn rank_attention(
    rank: &mut RankBlock,
    qk_norms: Option<&QkNorms>,
    attn_in: &Tensor,
    shape: &BlockShape,
    paged: PagedAttentionShape,
    batch: &PagedBatch,
    rope: &RopeCache,
) -> awq_kernels::Result<Tensor> {
    let (heads, kv_heads, hd) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
    let (k_cache, v_cache) = (&mut rank.k_cache, &mut rank.v_cache);
    // q rotated, and k rotated and v written into the cache, from three projections.
    let mut apart = |q: &Linear, k: &Linear, v: &Linear| -> awq_kernels::Result<Tensor> {
        let (mut q, mut k) = (q.apply(attn_in)?, k.apply(attn_in)?);
        if let Some(norms) = qk_norms {
            q = head_rms_norm(q, &norms.q, hd, shape.rms_norm_eps)?;
            k = head_rms_norm(k, &norms.k, hd, shape.rms_norm_eps)?;
        }
        let q = ops::apply_rope_at(&q, heads, hd, batch.positions(), rope)?;
        let k = ops::apply_rope_at(&k, kv_heads, hd, batch.positions(), rope)?;
        ops::write_kv_slots(k_cache, &k, batch.slots(), paged)?;
        ops::write_kv_slots(v_cache, &v.apply(attn_in)?, batch.slots(), paged)?;
        Ok(q)
    };
    let (q, o) = match (&rank.projections, qk_norms) {
        (Projections::Separate(l), _) => {
            let role = |r: LinearRole| &l[r.index()];
            (apart(role(LinearRole::Q), role(LinearRole::K), role(LinearRole::V))?, role(LinearRole::O))
        }
        (Projections::Fused { qkv: QkvProjection::Apart([q, k, v]), o, .. }, _) => (apart(q, k, v)?, o),
        (Projections::Fused { qkv: QkvProjection::Stacked(qkv), o, .. }, None) => {
            let qkv = qkv.apply(attn_in)?;
            (ops::rope_qkv_into_cache(&qkv, batch, rope, &mut rank.k_cache, &mut rank.v_cache, paged)?, o)
        }
        (Projections::Fused { qkv: QkvProjection::Stacked(_), .. }, Some(_)) => {
            return Err(awq_kernels::Error::Shape {
                op: "rank_attention",
                detail: "q/k norms between projection and RoPE need q, k and v projected apart".into(),
            })
        }
    };
    let o_in = ops::paged_attention(&q, &rank.k_cache, &rank.v_cache, batch, paged, shape.score_scale)?;
    o.apply(&o_in)
}
