//! The model runner: executes a [`StepPlan`] on the model's weights and the paged KV cache, and
//! returns the logits the engine samples and scores.
//!
//! [`ModelRunner`] owns the weights on its device ([`Linear`]: dense f32 on the CPU, AWQ checkpoints
//! dequantized by `Checkpoint::load_block`; the `Int4` variant is where the CUDA path keeps INT4
//! weights for the W4A16 kernels) and the KV cache tensors: per block one K and one V of shape
//! `[n_blocks, block_size, n_kv_heads, head_dim]`, addressed through the plan's block tables
//! ([`crate::kv_cache::slot_of`]). One [`ModelRunner::execute`] runs every scheduled token of a step
//! as one batch of rows: embeddings; per block RMSNorm, q/k/v, RoPE at each token's position, K/V
//! written into the tokens' slots, attention of each token over its sequence's cached positions
//! (`ops::paged_attention`: causal, GQA, sliding window), o_proj, residual, RMSNorm, gated MLP,
//! residual; the final norm; the LM head only on the rows that are sampled or score a prompt token.
//!
//! Numerically this is the worker's `block_forward` (the same ops in the same order, the pieces in
//! [`block`] shared with it), so a sequence gives the same logits whether computed whole, in
//! prefill chunks or one token at a time (tested against `block_forward` in
//! `worker/tests/serve_runner.rs`). Tensor parallelism ([`shard`]): `tp` ranks, each with its
//! query heads, KV heads (and their cache) and MLP columns; on the CPU the ranks run as rayon tasks
//! and their partial outputs after o_proj and down_proj are added in rank order. Not here:
//! scheduling, sampling, text.

pub mod block;
pub mod shard;

use std::ops::Range;

use awq_kernels::ops::{self, Int4Weight, PagedAttentionShape, PagedSeq};
use awq_kernels::{DType, Device, Tensor};
use awq_model::arch::{LinearRole, NormRole};
use awq_model::{Checkpoint, LinearWeights};
use rayon::prelude::*;

pub use block::{gated_mlp, ApplyLinear, BlockShape};
pub use shard::RankSlice;

use crate::kv_cache::slot_of;
use crate::scheduler::StepPlan;
use crate::{Error, Result};

/// One linear of a block, as the runner keeps it on its device.
#[derive(Clone, Debug)]
pub enum Linear {
    /// `[out, in]` weights (f32 on the CPU): fp16/bf16 checkpoints, and AWQ ones dequantized at load.
    Dense(LinearWeights),
    /// INT4 weights repacked for the W4A16 kernels (the CUDA path; its loader is not built yet).
    Int4 { weight: Int4Weight, bias: Option<Tensor> },
}

impl ApplyLinear for Linear {
    fn apply(&self, x: &Tensor) -> awq_kernels::Result<Tensor> {
        match self {
            Linear::Dense(l) => l.apply(x),
            Linear::Int4 { weight, bias } => ops::w4a16_linear(x, weight, bias.as_ref()),
        }
    }
}

/// One decoder block: its norms (replicated) and each tensor-parallel rank's share.
struct RunnerBlock {
    block_idx: usize,
    attn_norm: Tensor,
    mlp_norm: Tensor,
    ranks: Vec<RankBlock>,
}

/// One rank's linears of a block (its heads and MLP columns, [`shard`]) and its KV heads' cache.
struct RankBlock {
    /// By `LinearRole::index()`.
    linears: Vec<Linear>,
    k_cache: Tensor,
    v_cache: Tensor,
}

impl RankBlock {
    fn linear(&self, role: LinearRole) -> &Linear {
        &self.linears[role.index()]
    }
}

/// Where the logits of one scheduled sequence are in [`StepLogits::logits`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqLogits {
    /// Rows scoring the prompt tokens after the plan's `prompt_logprob_positions` (row `i` holds the
    /// logits at position `prompt_logprob_positions.start + i - rows.start`).
    pub prompt_rows: Range<usize>,
    /// The row to sample from, when the plan samples this sequence.
    pub sample_row: Option<usize>,
}

/// The logits of one step: `logits[rows * vocab_size]` (f32) and, per scheduled sequence in plan
/// order, which rows are its.
#[derive(Clone, Debug)]
pub struct StepLogits {
    pub vocab_size: usize,
    pub logits: Vec<f32>,
    pub seqs: Vec<SeqLogits>,
}

impl StepLogits {
    /// Row `r` of the logits.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.logits[r * self.vocab_size..(r + 1) * self.vocab_size]
    }
}

/// The model of one replica on one device, with its KV cache (see the module docs).
pub struct ModelRunner {
    device: Device,
    /// The whole model's shape (norms' epsilon, RoPE); `rank_shape` is one rank's heads.
    shape: BlockShape,
    rank_shape: BlockShape,
    /// One rank's cache layout.
    paged: PagedAttentionShape,
    n_cache_blocks: usize,
    embed: Tensor,
    blocks: Vec<RunnerBlock>,
    final_norm: Tensor,
    lm_head: Tensor,
    vocab_size: usize,
}

impl ModelRunner {
    /// Bytes of KV cache one block of `block_size` tokens takes over all decoder blocks and all `tp`
    /// ranks (f32 K and V; KV heads replicated over ranks count once per rank). Errors as
    /// [`RankSlice::all`].
    pub fn kv_bytes_per_block(checkpoint: &Checkpoint, block_size: usize, tp: usize) -> Result<u64> {
        let c = checkpoint.config();
        let kv_heads: usize = RankSlice::all(c, tp)?.iter().map(|r| r.kv_heads.len()).sum();
        Ok((2 * c.n_blocks * block_size * kv_heads * c.head_dim * DType::F32.size_bytes()) as u64)
    }

    /// Loads `checkpoint` onto `device` (CPU only for now) as `tp` tensor-parallel ranks (on the
    /// CPU: computed on the rayon pool's threads, partial sums added in rank order), with a KV cache
    /// of `n_cache_blocks` blocks. Errors: `Model`, `InvalidConfig` (device, `tp`).
    pub fn load(
        checkpoint: &Checkpoint,
        device: Device,
        tp: usize,
        block_size: usize,
        n_cache_blocks: usize,
    ) -> Result<ModelRunner> {
        if device != Device::Cpu {
            return Err(Error::InvalidConfig {
                field: "devices",
                expected: "[cpu] (the CUDA model runner is not built yet)".into(),
                got: device.to_string(),
            });
        }
        let c = checkpoint.config();
        let slices = RankSlice::all(c, tp)?;
        let shape = BlockShape::of(checkpoint);
        let rank_shape = BlockShape { n_heads: c.n_heads / tp, n_kv_heads: slices[0].kv_heads.len(), ..shape.clone() };
        let paged = rank_shape.paged_shape(block_size);
        let blocks = (0..c.n_blocks)
            .map(|block_idx| {
                let w = checkpoint.load_block(block_idx)?.into_dtype(DType::F32);
                let ranks = slices
                    .iter()
                    .map(|slice| {
                        let linears = LinearRole::ALL
                            .iter()
                            .map(|&role| match tp {
                                1 => Ok(Linear::Dense(w.linear(role).clone())),
                                _ => Ok(Linear::Dense(slice.linear(checkpoint.arch(), c, role, w.linear(role))?)),
                            })
                            .collect::<Result<Vec<_>>>()?;
                        Ok(RankBlock {
                            linears,
                            k_cache: ops::zeros_kv_cache(n_cache_blocks, paged),
                            v_cache: ops::zeros_kv_cache(n_cache_blocks, paged),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(RunnerBlock {
                    block_idx,
                    attn_norm: w.norm(NormRole::Attn).clone(),
                    mlp_norm: w.norm(NormRole::Mlp).clone(),
                    ranks,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ModelRunner {
            device,
            paged,
            n_cache_blocks,
            embed: checkpoint.embed_tokens()?,
            blocks,
            final_norm: checkpoint.final_norm()?.into_dtype(DType::F32),
            lm_head: checkpoint.lm_head()?.into_dtype(DType::F32),
            vocab_size: c.vocab_size,
            shape,
            rank_shape,
        })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn n_cache_blocks(&self) -> usize {
        self.n_cache_blocks
    }

    pub fn block_size(&self) -> usize {
        self.paged.block_size
    }

    /// Tensor-parallel ranks.
    pub fn tp(&self) -> usize {
        self.blocks.first().map_or(1, |b| b.ranks.len())
    }

    /// Runs one step (see the module docs). The plan's block tables must name blocks of this cache.
    pub fn execute(&mut self, plan: &StepPlan) -> Result<StepLogits> {
        let bs = self.paged.block_size;
        let mut ids = Vec::with_capacity(plan.n_tokens);
        let mut positions = Vec::with_capacity(plan.n_tokens);
        let mut slots = Vec::with_capacity(plan.n_tokens);
        let tables: Vec<Vec<u32>> = plan.seqs.iter().map(|s| s.block_table.iter().map(|b| b.0).collect()).collect();
        for s in &plan.seqs {
            if s.block_table.len() * bs < s.positions.end || s.token_ids.len() != s.positions.len() {
                return Err(Error::StepPlanInvalid {
                    id: s.id,
                    detail: format!(
                        "{} token ids for positions {:?}, a block table of {} blocks of {bs} (up to position {})",
                        s.token_ids.len(),
                        s.positions,
                        s.block_table.len(),
                        (s.block_table.len() * bs).saturating_sub(1)
                    ),
                });
            }
            ids.extend_from_slice(&s.token_ids);
            for p in s.positions.clone() {
                positions.push(p);
                slots.push(slot_of(&s.block_table, bs, p));
            }
        }
        let seqs: Vec<PagedSeq> = plan
            .seqs
            .iter()
            .zip(&tables)
            .map(|(s, t)| PagedSeq { block_table: t, first_position: s.positions.start, n_queries: s.positions.len() })
            .collect();

        let mut x = ops::embedding(&self.embed, &ids, DType::F32)?;
        for block in &mut self.blocks {
            let block_idx = block.block_idx;
            x = block_step(block, &x, &self.rank_shape, self.paged, &positions, &slots, &seqs)
                .map_err(|e| Error::Kernel { block_idx: Some(block_idx), source: Box::new(e) })?;
        }

        // The rows whose logits are needed, in plan order: prompt scoring rows, then the sampled row.
        let mut wanted = Vec::new();
        let mut seq_logits = Vec::with_capacity(plan.seqs.len());
        let mut row0 = 0;
        for s in &plan.seqs {
            let start = wanted.len();
            let scoring = &s.prompt_logprob_positions;
            wanted.extend(scoring.clone().map(|p| row0 + p - s.positions.start));
            let prompt_rows = start..wanted.len();
            let sample_row = s.sample.then(|| {
                wanted.push(row0 + s.positions.len() - 1);
                wanted.len() - 1
            });
            seq_logits.push(SeqLogits { prompt_rows, sample_row });
            row0 += s.positions.len();
        }
        let hidden = x.shape()[1];
        let xv = x.f32_values()?;
        let mut gathered = Vec::with_capacity(wanted.len() * hidden);
        for &r in &wanted {
            gathered.extend_from_slice(&xv[r * hidden..(r + 1) * hidden]);
        }
        let rows = Tensor::from_f32(&[wanted.len(), hidden], gathered)?;
        let logits = if wanted.is_empty() {
            Vec::new()
        } else {
            let normed = ops::rms_norm(&rows, &self.final_norm, self.shape.rms_norm_eps)?;
            ops::linear(&normed, &self.lm_head, None)?.to_f32_vec()?
        };
        Ok(StepLogits { vocab_size: self.vocab_size, logits, seqs: seq_logits })
    }
}

/// One decoder block over a step's rows, writing their K and V into the cache: each rank computes
/// its heads' attention and its MLP columns; their partial outputs are summed in rank order.
fn block_step(
    block: &mut RunnerBlock,
    x: &Tensor,
    shape: &BlockShape,
    paged: PagedAttentionShape,
    positions: &[usize],
    slots: &[usize],
    seqs: &[PagedSeq<'_>],
) -> awq_kernels::Result<Tensor> {
    let attn_in = ops::rms_norm(x, &block.attn_norm, shape.rms_norm_eps)?;
    let parts: Vec<_> = block
        .ranks
        .par_iter_mut()
        .map(|rank| rank_attention(rank, &attn_in, shape, paged, positions, slots, seqs))
        .collect();
    let mut h = ops::add(x, &all_reduce(parts)?)?;
    let mlp_in = ops::rms_norm(&h, &block.mlp_norm, shape.rms_norm_eps)?;
    let parts: Vec<_> = block
        .ranks
        .par_iter()
        .map(|rank| {
            let (gate, up, down) =
                (rank.linear(LinearRole::Gate), rank.linear(LinearRole::Up), rank.linear(LinearRole::Down));
            gated_mlp(&mlp_in, gate, up, down, shape.activation).map(|(_, out)| out)
        })
        .collect();
    ops::add_assign(&mut h, &all_reduce(parts)?)?;
    Ok(h)
}

/// One rank's attention (its query heads over its KV heads) through its share of o_proj: a partial
/// output `[rows, hidden]`.
fn rank_attention(
    rank: &mut RankBlock,
    attn_in: &Tensor,
    shape: &BlockShape,
    paged: PagedAttentionShape,
    positions: &[usize],
    slots: &[usize],
    seqs: &[PagedSeq<'_>],
) -> awq_kernels::Result<Tensor> {
    let (heads, kv_heads, hd) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
    let q = ops::apply_rope_at(&rank.linear(LinearRole::Q).apply(attn_in)?, heads, hd, positions, &shape.rope)?;
    let k = ops::apply_rope_at(&rank.linear(LinearRole::K).apply(attn_in)?, kv_heads, hd, positions, &shape.rope)?;
    let v = rank.linear(LinearRole::V).apply(attn_in)?;
    ops::write_kv_slots(&mut rank.k_cache, &k, slots, paged)?;
    ops::write_kv_slots(&mut rank.v_cache, &v, slots, paged)?;
    let o_in = ops::paged_attention(&q, &rank.k_cache, &rank.v_cache, seqs, paged, shape.attention_scale())?;
    rank.linear(LinearRole::O).apply(&o_in)
}

/// The all-reduce of the ranks' partial outputs: their sum, added in rank order (one rank: itself).
fn all_reduce(parts: Vec<awq_kernels::Result<Tensor>>) -> awq_kernels::Result<Tensor> {
    let mut parts = parts.into_iter();
    let mut sum = parts.next().expect("at least one rank")?;
    for part in parts {
        ops::add_assign(&mut sum, &part?)?;
    }
    Ok(sum)
}
