//! The model runner: executes a [`StepPlan`] on the model's weights and the paged KV cache, and
//! returns the logits the engine samples and scores.
//!
//! [`ModelRunner`] owns the weights on its device ([`Linear`]) and the KV cache tensors: per block one
//! K and one V of shape `[n_blocks, block_size, n_kv_heads, head_dim]`, addressed through the plan's
//! block tables ([`crate::kv_cache::slot_of`]). On the CPU everything is f32 (AWQ checkpoints
//! dequantized by `Checkpoint::load_block`); on a GPU the linears' inputs and outputs and the KV
//! cache are f16, AWQ linears stay INT4 (`Int4Weight`, the W4A16 kernels) and fp16/bf16 ones are
//! f16 (cuBLAS), while the residual stream between blocks stays f32 everywhere (each norm reads it
//! into the linears' dtype, `ops::rms_norm_to`): thirty-odd f16 roundings of every hidden state
//! are what moved a GPU's greedy tokens off the CPU's at near ties.
//! One [`ModelRunner::execute`] runs every scheduled token of a step as one batch of rows: the step's
//! positions, slots and block tables resolved once (`ops::PagedBatch`, on the device); embeddings;
//! per block RMSNorm, q/k/v (each q and k head RMS-normalised where the architecture has q/k norms),
//! RoPE at each token's position, K/V written into the tokens' slots, attention of each token over
//! its sequence's cached positions (`ops::paged_attention`: causal, GQA, sliding window; one rank's
//! in [`attention`]), o_proj, residual, RMSNorm, gated MLP, residual; the final norm; the LM head
//! only on the rows that are sampled or score a prompt token.
//!
//! Numerically this is the worker's `block_forward` (the same ops in the same order, the pieces in
//! [`block`] shared with it), so a sequence gives the same logits whether computed whole, in
//! prefill chunks or one token at a time (tested against `block_forward` in
//! `worker/tests/serve_runner.rs`). Tensor parallelism ([`shard`]): `tp` ranks, each with its
//! query heads, KV heads (and their cache) and MLP columns; on the CPU the ranks run as rayon tasks
//! and their partial outputs after o_proj and down_proj are added in rank order (on GPUs one rank
//! per device is not built yet: a GPU runner is one device). Not here: scheduling, sampling, text.

mod attention;
pub mod block;
mod graphs;
pub mod shard;

use std::ops::Range;

use awq_kernels::ops::{self, Int4Weight, PackedLinear, PagedAttentionShape, PagedBatch, PagedSeq, RopeCache};
use awq_kernels::{DType, Device, Indices, Tensor};
use awq_model::arch::{LinearRole, NormRole};
use awq_model::{Checkpoint, LinearWeights};
use rayon::prelude::*;

pub use block::{gated_mlp, head_rms_norm, ApplyLinear, BlockShape};
pub use shard::RankSlice;

use attention::{rank_attention, QkNorms, QkvProjection};

use crate::scheduler::StepPlan;
use crate::{Error, Result};

/// One linear of a block, as the runner keeps it on its device.
#[derive(Clone, Debug)]
pub enum Linear {
    /// `[out, in]` weights in the runner's dtype: fp16/bf16 checkpoints, and AWQ ones on the CPU
    /// (dequantized at load).
    Dense(LinearWeights),
    /// INT4 weights repacked for the W4A16 kernels: AWQ checkpoints on a GPU.
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
    qk_norms: Option<QkNorms>,
    ranks: Vec<RankBlock>,
}

/// One rank's linears of a block (its heads and MLP columns, [`shard`]) and its KV heads' cache
/// (of no blocks until [`ModelRunner::allocate_cache`]).
struct RankBlock {
    projections: Projections,
    k_cache: Tensor,
    v_cache: Tensor,
}

/// How a rank's linears are kept.
#[allow(clippy::large_enum_variant)] // one per rank and block: the size does not matter
enum Projections {
    /// One linear per role, by `LinearRole::index()` (the CPU: the worker's `block_forward`'s ops,
    /// one by one).
    Separate(Vec<Linear>),
    /// q|k|v and gate|up stacked into one linear each (a GPU): one matrix product where there were
    /// three and two, and one kernel for RoPE and the cache writes (`ops::rope_qkv_into_cache`);
    /// q, k and v stay apart where q/k norms come between projection and RoPE ([`QkvProjection`]).
    Fused { qkv: QkvProjection, o: Linear, gate_up: Linear, down: Linear },
}

/// Where the logits of one scheduled sequence are in [`StepLogits::logits`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqLogits {
    /// Rows scoring the prompt tokens after the plan's `prompt_logprob_positions` (row `i` holds the
    /// logits at position `prompt_logprob_positions.start + i - rows.start`).
    pub prompt_rows: Range<usize>,
    /// The row to sample from, when the plan samples this sequence and its token was not picked on
    /// the device.
    pub sample_row: Option<usize>,
    /// The argmax of the sampled row, picked on the device when asked (`execute_picking`); the
    /// row itself is then not copied. `ops::NOT_FINITE` for a row holding a NaN or an infinity.
    pub argmax: Option<u32>,
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
    /// The linears' and the KV cache's dtype: f32 on the CPU, f16 on GPUs (the residual stream is f32).
    dtype: DType,
    /// cos and sin for every position a sequence may reach.
    rope: RopeCache,
    /// The whole model's shape (norms' epsilon, RoPE); `rank_shape` is one rank's heads.
    shape: BlockShape,
    rank_shape: BlockShape,
    /// One rank's cache layout.
    paged: PagedAttentionShape,
    /// Blocks of the KV cache the plans may name; a GPU's cache has one more, the spare block that
    /// the padding rows of a recorded decode step write into ([`graphs`]).
    n_cache_blocks: usize,
    /// Decode steps recorded as CUDA graphs, once enabled ([`ModelRunner::enable_decode_graphs`]).
    graphs: Option<graphs::DecodeGraphs>,
    /// The decoder blocks this runner holds: all of them, or a pipeline stage's range.
    block_range: Range<usize>,
    /// The model's decoder blocks (all stages').
    n_model_blocks: usize,
    /// The first stage's: the token embeddings.
    embed: Option<Tensor>,
    blocks: Vec<RunnerBlock>,
    /// The last stage's: the final norm and the LM head.
    final_norm: Option<Tensor>,
    lm_head: Option<Tensor>,
    vocab_size: usize,
    /// The residual stream's width.
    hidden_size: usize,
}

/// What one pipeline stage's [`ModelRunner::execute_stage`] gives: the hidden states for the next
/// stage, or (the last stage) the step's logits.
#[derive(Debug)]
pub enum StageOutput {
    /// The residual stream after this stage's last block: `[rows, hidden]` f32, row-major, the
    /// step's rows in plan order.
    Hidden(Vec<f32>),
    Logits(StepLogits),
}

impl ModelRunner {
    /// The dtype of activations and of the KV cache on `device`.
    pub fn dtype_on(device: Device) -> DType {
        match device {
            Device::Cpu => DType::F32,
            Device::Cuda(_) => DType::F16,
        }
    }

    /// Bytes of KV cache one block of `block_size` tokens takes over all decoder blocks and all `tp`
    /// ranks on `device` (K and V in [`ModelRunner::dtype_on`]; KV heads replicated over ranks count
    /// once per rank). Errors as [`RankSlice::all`].
    pub fn kv_bytes_per_block(checkpoint: &Checkpoint, block_size: usize, tp: usize, device: Device) -> Result<u64> {
        let c = checkpoint.config();
        let kv_heads: usize = RankSlice::all(c, tp)?.iter().map(|r| r.kv_heads.len()).sum();
        Ok((2 * c.n_blocks * block_size * kv_heads * c.head_dim * ModelRunner::dtype_on(device).size_bytes()) as u64)
    }

    /// [`ModelRunner::load_weights`] then [`ModelRunner::allocate_cache`] of `n_cache_blocks`.
    pub fn load(
        checkpoint: &Checkpoint,
        device: Device,
        tp: usize,
        block_size: usize,
        n_cache_blocks: usize,
    ) -> Result<ModelRunner> {
        let mut runner = ModelRunner::load_weights(checkpoint, device, tp, block_size)?;
        runner.allocate_cache(n_cache_blocks)?;
        Ok(runner)
    }

    /// Loads `checkpoint` onto `device` as `tp` tensor-parallel ranks (on the CPU: computed on the
    /// rayon pool's threads, partial sums added in rank order; on a GPU `tp` must be 1), without a KV
    /// cache yet (a GPU's cache is sized from the memory the weights leave). Errors: `Model`,
    /// `InvalidConfig` (`tp`), `Kernel` (the device: unavailable, out of memory).
    pub fn load_weights(checkpoint: &Checkpoint, device: Device, tp: usize, block_size: usize) -> Result<ModelRunner> {
        let all = 0..checkpoint.config().n_blocks;
        ModelRunner::load_stage_weights(checkpoint, device, tp, block_size, all)
    }

    /// [`ModelRunner::load_weights`] of one pipeline stage: the decoder blocks `blocks` only, with
    /// the embeddings when it starts at block 0 and the final norm and LM head when it ends at the
    /// last block. Errors: as `load_weights`, and `InvalidConfig` (`blocks`) for an empty range or
    /// one past the model's blocks.
    pub fn load_stage_weights(
        checkpoint: &Checkpoint,
        device: Device,
        tp: usize,
        block_size: usize,
        block_range: Range<usize>,
    ) -> Result<ModelRunner> {
        let n_model_blocks = checkpoint.config().n_blocks;
        if block_range.is_empty() || block_range.end > n_model_blocks {
            return Err(Error::InvalidConfig {
                field: "blocks",
                expected: format!("a non-empty range of the model's {n_model_blocks} blocks"),
                got: format!("{block_range:?}"),
            });
        }
        if device != Device::Cpu && tp != 1 {
            return Err(Error::InvalidConfig {
                field: "tp",
                expected: "1 on a GPU (one device per replica; tensor parallelism over GPUs is not built yet)".into(),
                got: tp.to_string(),
            });
        }
        let kernel =
            |block_idx: Option<usize>| move |e: awq_kernels::Error| Error::Kernel { block_idx, cause: Box::new(e) };
        device.check_available().map_err(kernel(None))?;
        let dtype = ModelRunner::dtype_on(device);
        let c = checkpoint.config();
        let slices = RankSlice::all(c, tp)?;
        let shape = BlockShape::of(checkpoint);
        let rank_shape = BlockShape { n_heads: c.n_heads / tp, n_kv_heads: slices[0].kv_heads.len(), ..shape.clone() };
        let paged = rank_shape.paged_shape(block_size);
        let to_device = |t: Tensor, block_idx| t.into_dtype(dtype).to_device(device).map_err(kernel(block_idx));
        let blocks = block_range
            .clone()
            .map(|block_idx| {
                let (ranks, attn_norm, mlp_norm) = match device {
                    Device::Cuda(_) => {
                        let projections = fused_projections(checkpoint, block_idx, shape.qk_norm, device)?;
                        let norm = |role| checkpoint.tensor(&checkpoint.arch().norm_name(block_idx, role));
                        (vec![projections], norm(NormRole::Attn)?, norm(NormRole::Mlp)?)
                    }
                    Device::Cpu => {
                        let w = checkpoint.load_block(block_idx)?.into_dtype(dtype);
                        let ranks = slices
                            .iter()
                            .map(|slice| {
                                LinearRole::ALL
                                    .iter()
                                    .map(|&role| {
                                        let l = match tp {
                                            1 => w.linear(role).clone(),
                                            _ => slice.linear(checkpoint.arch(), c, role, w.linear(role))?,
                                        };
                                        let on_device = |t: Tensor| to_device(t, Some(block_idx));
                                        Ok(Linear::Dense(LinearWeights {
                                            weight: on_device(l.weight)?,
                                            bias: l.bias.map(on_device).transpose()?,
                                        }))
                                    })
                                    .collect::<Result<Vec<_>>>()
                                    .map(Projections::Separate)
                            })
                            .collect::<Result<Vec<_>>>()?;
                        (ranks, w.norm(NormRole::Attn).clone(), w.norm(NormRole::Mlp).clone())
                    }
                };
                let empty = || ops::zeros_kv_cache(0, paged, dtype, device).map_err(kernel(Some(block_idx)));
                let ranks = ranks
                    .into_iter()
                    .map(|projections| Ok(RankBlock { projections, k_cache: empty()?, v_cache: empty()? }))
                    .collect::<Result<_>>()?;
                Ok(RunnerBlock {
                    block_idx,
                    attn_norm: to_device(attn_norm, Some(block_idx))?,
                    mlp_norm: to_device(mlp_norm, Some(block_idx))?,
                    qk_norms: QkNorms::load(checkpoint, block_idx, &shape, dtype, device)?,
                    ranks,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Positions up to the model's trained length (or what the engine could ever cache).
        let n_positions = c.max_position_embeddings.unwrap_or(1 << 17);
        Ok(ModelRunner {
            device,
            dtype,
            rope: RopeCache::new(&shape.rope, n_positions, device).map_err(kernel(None))?,
            paged,
            n_cache_blocks: 0,
            graphs: None,
            embed: match block_range.start {
                0 => Some(checkpoint.embed_tokens()?.to_device(device).map_err(kernel(None))?),
                _ => None,
            },
            blocks,
            final_norm: match block_range.end == n_model_blocks {
                true => Some(to_device(checkpoint.final_norm()?, None)?),
                false => None,
            },
            lm_head: match block_range.end == n_model_blocks {
                true => Some(to_device(checkpoint.lm_head()?, None)?),
                false => None,
            },
            block_range,
            n_model_blocks,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            shape,
            rank_shape,
        })
    }

    /// Allocates (or replaces) the KV cache: `n_cache_blocks` blocks per rank and decoder block
    /// (on a GPU one more, the spare block of [`graphs`]), zeroed on the device. Recorded decode
    /// steps are dropped (they name the old cache). Errors: `Kernel` (out of device memory).
    pub fn allocate_cache(&mut self, n_cache_blocks: usize) -> Result<()> {
        if let Some(g) = &mut self.graphs {
            g.clear();
        }
        let allocated = n_cache_blocks + self.spare_blocks();
        for block in &mut self.blocks {
            for rank in &mut block.ranks {
                let zeros = |n| {
                    ops::zeros_kv_cache(n, self.paged, self.dtype, self.device)
                        .map_err(|e| Error::Kernel { block_idx: Some(block.block_idx), cause: Box::new(e) })
                };
                // Emptied first: a replaced cache's memory is reused.
                (rank.k_cache, rank.v_cache) = (zeros(0)?, zeros(0)?);
                (rank.k_cache, rank.v_cache) = (zeros(allocated)?, zeros(allocated)?);
            }
        }
        self.n_cache_blocks = n_cache_blocks;
        Ok(())
    }

    /// Cache blocks beyond the plans' (see `n_cache_blocks`): one on a GPU.
    fn spare_blocks(&self) -> usize {
        match self.device {
            Device::Cpu => 0,
            Device::Cuda(_) => 1,
        }
    }

    /// The highest position + 1 a sequence may reach (what RoPE's table covers).
    pub fn max_positions(&self) -> usize {
        self.rope.n_positions()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The residual stream's width (a pipeline stage's input and output per row).
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    pub fn n_cache_blocks(&self) -> usize {
        self.n_cache_blocks
    }

    pub fn block_size(&self) -> usize {
        self.paged.block_size
    }

    /// The decoder blocks this runner holds.
    pub fn block_range(&self) -> Range<usize> {
        self.block_range.clone()
    }

    /// Whether this runner holds the whole model (not one pipeline stage).
    pub fn is_whole_model(&self) -> bool {
        self.block_range == (0..self.n_model_blocks)
    }

    /// Bytes one block of the KV cache takes on this runner: over its decoder blocks and ranks.
    pub fn kv_bytes_per_cache_block(&self) -> u64 {
        let per_rank =
            2 * self.paged.block_size * self.paged.n_kv_heads * self.paged.head_dim * self.dtype.size_bytes();
        (per_rank * self.blocks.len() * self.tp()) as u64
    }

    /// Tensor-parallel ranks.
    pub fn tp(&self) -> usize {
        self.blocks.first().map_or(1, |b| b.ranks.len())
    }

    /// Runs one step (see the module docs). The plan's block tables must name blocks of this cache.
    pub fn execute(&mut self, plan: &StepPlan) -> Result<StepLogits> {
        self.execute_picking(plan, &vec![false; plan.seqs.len()])
    }

    /// [`ModelRunner::execute`], where the sequences flagged in `argmax_on_device` (one flag per
    /// scheduled sequence) get the argmax of their sampled row ([`SeqLogits::argmax`]) instead of
    /// the row: a greedy request's token without copying 128k logits to the host.
    pub fn execute_picking(&mut self, plan: &StepPlan, argmax_on_device: &[bool]) -> Result<StepLogits> {
        if !self.is_whole_model() {
            return Err(self.not_whole("execute"));
        }
        match self.execute_stage(plan, argmax_on_device, None)? {
            StageOutput::Logits(logits) => Ok(logits),
            StageOutput::Hidden(_) => Err(self.not_whole("execute_picking")),
        }
    }

    fn not_whole(&self, what: &str) -> Error {
        Error::InvalidConfig {
            field: "blocks",
            expected: format!("the whole model for {what} (a pipeline stage runs execute_stage)"),
            got: format!("blocks {:?} of {}", self.block_range, self.n_model_blocks),
        }
    }

    /// One pipeline stage's part of a step: from the token embeddings (the first stage, `hidden`
    /// `None`) or from the previous stage's output (`hidden`: `[rows, hidden]` f32 of the step's
    /// rows in plan order), through this runner's blocks (their K and V written into its cache),
    /// to the next stage's input, or (the last stage) to the logits. Every stage of a replica gets
    /// the same plan; its block tables name blocks of each stage's own cache.
    pub fn execute_stage(
        &mut self,
        plan: &StepPlan,
        argmax_on_device: &[bool],
        hidden: Option<&[f32]>,
    ) -> Result<StageOutput> {
        if argmax_on_device.len() != plan.seqs.len() {
            return Err(Error::InvalidConfig {
                field: "argmax_on_device",
                expected: format!("one flag per scheduled sequence ({})", plan.seqs.len()),
                got: argmax_on_device.len().to_string(),
            });
        }
        let bs = self.paged.block_size;
        let mut ids = Vec::with_capacity(plan.n_tokens);
        let tables: Vec<Vec<u32>> = plan.seqs.iter().map(|s| s.block_table.iter().map(|b| b.0).collect()).collect();
        for s in &plan.seqs {
            let outside = s.block_table.iter().find(|b| b.0 as usize >= self.n_cache_blocks);
            if let Some(b) = outside {
                return Err(Error::StepPlanInvalid {
                    id: s.id,
                    detail: format!("block {} of a cache of {} blocks", b.0, self.n_cache_blocks),
                });
            }
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
        }
        let seqs: Vec<PagedSeq> = plan
            .seqs
            .iter()
            .zip(&tables)
            .map(|(s, t)| PagedSeq { block_table: t, first_position: s.positions.start, n_queries: s.positions.len() })
            .collect();
        if self.n_cache_blocks == 0 {
            return Err(Error::InvalidConfig {
                field: "kv_cache",
                expected: "a KV cache (ModelRunner::allocate_cache)".into(),
                got: "none".into(),
            });
        }
        let kernel = |block_idx| move |e: awq_kernels::Error| Error::Kernel { block_idx, cause: Box::new(e) };
        if let Some(p) = plan
            .seqs
            .iter()
            .map(|s| s.positions.end)
            .max()
            .filter(|&end| end > self.rope.n_positions())
            .map(|end| end - 1)
        {
            return Err(Error::InvalidConfig {
                field: "max_model_len",
                expected: format!("at most {} (the model's max_position_embeddings)", self.rope.n_positions()),
                got: format!("a sequence at position {p}"),
            });
        }
        if let Some(logits) = graphs::decode_step(self, plan, &seqs, argmax_on_device)? {
            return Ok(StageOutput::Logits(logits));
        }
        let cache_blocks = self.n_cache_blocks + self.spare_blocks();
        let batch = PagedBatch::new(&seqs, bs, cache_blocks, self.device).map_err(kernel(None))?;
        let x = match (hidden, self.embed.is_some()) {
            (None, true) => self.embeddings(&Indices::new(ids, self.device).map_err(kernel(None))?)?,
            (Some(h), false) => {
                let width = self.hidden_size;
                if h.len() != plan.n_tokens * width {
                    return Err(Error::InvalidConfig {
                        field: "hidden",
                        expected: format!("{} rows of {width} (the step's tokens)", plan.n_tokens),
                        got: format!("{} values", h.len()),
                    });
                }
                Tensor::from_f32(&[plan.n_tokens, width], h.to_vec())
                    .and_then(|t| t.to_device(self.device))
                    .map_err(kernel(None))?
            }
            (given, _) => {
                return Err(Error::InvalidConfig {
                    field: "hidden",
                    expected: match self.embed.is_some() {
                        true => "none: the first stage starts from the token embeddings".into(),
                        false => "the previous stage's hidden states".into(),
                    },
                    got: if given.is_some() { "hidden states".into() } else { "none".into() },
                })
            }
        };
        let x = self.run_blocks(x, &batch)?;
        if self.lm_head.is_none() {
            return Ok(StageOutput::Hidden(x.to_f32_vec().map_err(kernel(None))?));
        }

        // The rows whose logits are needed, in plan order: prompt scoring rows, then the sampled row;
        // after them the rows whose argmax alone is needed.
        // `picked`: (sequence index, row) of the sequences whose argmax alone is needed.
        let (mut wanted, mut picked): (Vec<u32>, Vec<(usize, u32)>) = (Vec::new(), Vec::new());
        let mut seq_logits = Vec::with_capacity(plan.seqs.len());
        let mut row0 = 0;
        for (i, (s, &on_device)) in plan.seqs.iter().zip(argmax_on_device).enumerate() {
            let start = wanted.len();
            let scoring = &s.prompt_logprob_positions;
            wanted.extend(scoring.clone().map(|p| (row0 + p - s.positions.start) as u32));
            let prompt_rows = start..wanted.len();
            let last = (row0 + s.positions.len() - 1) as u32;
            let sample_row = (s.sample && !on_device).then(|| {
                wanted.push(last);
                wanted.len() - 1
            });
            if s.sample && on_device {
                picked.push((i, last));
            }
            seq_logits.push(SeqLogits { prompt_rows, sample_row, argmax: None });
            row0 += s.positions.len();
        }
        let (n_wanted, n_picked) = (wanted.len(), picked.len());
        let mut logits = Vec::new();
        if n_wanted + n_picked > 0 {
            // The rows gathered on the device (the step's hidden states as an embedding table).
            wanted.extend(picked.iter().map(|&(_, row)| row));
            let (final_norm, lm_head) = self.head()?;
            let head = || -> awq_kernels::Result<(Vec<f32>, Vec<u32>)> {
                let rows = ops::embedding(&x, &wanted, RESIDUAL)?;
                let normed = ops::rms_norm_to(&rows, final_norm, self.shape.rms_norm_eps, self.dtype)?;
                let all = ops::linear(&normed, lm_head, None)?;
                // Each part copied out of `all` only when there are two.
                let full = match (n_wanted, n_picked) {
                    (0, _) => Vec::new(),
                    (_, 0) => all.to_f32_vec()?,
                    _ => all.rows(0, n_wanted)?.to_f32_vec()?,
                };
                let argmax = match (n_wanted, n_picked) {
                    (_, 0) => Vec::new(),
                    (0, _) => ops::argmax_rows(&all)?,
                    _ => ops::argmax_rows(&all.rows(n_wanted, n_wanted + n_picked)?)?,
                };
                Ok((full, argmax))
            };
            let (full, argmax) = head().map_err(kernel(None))?;
            logits = full;
            for (&(i, _), token) in picked.iter().zip(argmax) {
                seq_logits[i].argmax = Some(token);
            }
        }
        Ok(StageOutput::Logits(StepLogits { vocab_size: self.vocab_size, logits, seqs: seq_logits }))
    }

    /// The residual stream's first value for a step's token `ids` (the first stage's).
    fn embeddings(&self, ids: &Indices) -> Result<Tensor> {
        let embed = self.embed.as_ref().ok_or_else(|| self.not_whole("the embeddings"))?;
        ops::embedding_at(embed, ids, RESIDUAL).map_err(|e| Error::Kernel { block_idx: None, cause: Box::new(e) })
    }

    /// The final norm and the LM head (the last stage's).
    fn head(&self) -> Result<(&Tensor, &Tensor)> {
        match (&self.final_norm, &self.lm_head) {
            (Some(norm), Some(head)) => Ok((norm, head)),
            _ => Err(self.not_whole("the LM head")),
        }
    }

    /// This runner's decoder blocks over a step's rows (`x` and `batch` on this device), their K
    /// and V written into the cache.
    fn run_blocks(&mut self, mut x: Tensor, batch: &PagedBatch) -> Result<Tensor> {
        let kernel = |block_idx| move |e: awq_kernels::Error| Error::Kernel { block_idx, cause: Box::new(e) };
        for block in &mut self.blocks {
            let block_idx = block.block_idx;
            x = block_step(block, &x, &self.rank_shape, self.paged, batch, &self.rope, self.dtype)
                .map_err(kernel(Some(block_idx)))?;
        }
        Ok(x)
    }
}

/// A block's linears on a GPU, f16, with q|k|v (unless `qk_norm`) and gate|up stacked
/// ([`Projections::Fused`]): AWQ linears stay INT4 (`Int4Weight`, the W4A16 kernels) unless the
/// kernels refuse the shape (out_features not a multiple of 16, in_features not of 64: then
/// dequantized to f16).
fn fused_projections(checkpoint: &Checkpoint, block_idx: usize, qk_norm: bool, device: Device) -> Result<Projections> {
    use LinearRole::*;
    let kernel = |e: awq_kernels::Error| Error::Kernel { block_idx: Some(block_idx), cause: Box::new(e) };
    let (arch, c) = (checkpoint.arch(), checkpoint.config());
    // Where the weights come from: the block's float tensors, or the AWQ packing.
    enum Source {
        Dense(awq_model::BlockWeights),
        Awq(awq_kernels::ops::QuantSpec),
    }
    let source = match checkpoint.awq() {
        None => Source::Dense(checkpoint.load_block(block_idx)?),
        Some(q) => Source::Awq(q),
    };
    let load = |roles: &[LinearRole]| -> Result<Linear> {
        // Biases stacked like the weights; a role without one adds zeros (Qwen2: q, k, v have them).
        let outs: Vec<usize> = roles.iter().map(|&r| arch.linear_shape(r, c)[0]).collect();
        let mut biases = Vec::new();
        for (&role, &out) in roles.iter().zip(&outs) {
            let b = match (&source, arch.has_bias(role, c)) {
                (Source::Dense(w), _) => w.linear(role).bias.clone(),
                (Source::Awq(_), true) => Some(checkpoint.tensor(&arch.bias_name(block_idx, role))?),
                (Source::Awq(_), false) => None,
            };
            biases.push((b, out));
        }
        let bias = match biases.iter().any(|(b, _)| b.is_some()) {
            false => None,
            true => {
                let mut values = Vec::new();
                for (b, out) in &biases {
                    match b {
                        Some(b) => values.extend_from_slice(&b.f32_values().map_err(kernel)?),
                        None => values.extend(std::iter::repeat_n(0.0, *out)),
                    }
                }
                let n = values.len();
                Some(Tensor::from_f32_as(&[n], values, DType::F16).and_then(|t| t.to_device(device)).map_err(kernel)?)
            }
        };
        let weight = match &source {
            Source::Dense(w) => stack_rows(roles.iter().map(|&r| &w.linear(r).weight)).map_err(kernel)?,
            &Source::Awq(q) => {
                let parts = roles
                    .iter()
                    .map(|&r| checkpoint.packed_linear(block_idx, r, q))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                let packed = PackedLinear::concat_outputs(&parts.iter().collect::<Vec<_>>()).map_err(kernel)?;
                match Int4Weight::from_awq(&packed, DType::F16) {
                    Ok(weight) => return Ok(Linear::Int4 { weight: weight.to_device(device).map_err(kernel)?, bias }),
                    Err(refused) => {
                        tracing::debug!(block_idx, ?roles, %refused, "AWQ linear kept dequantized (f16): the W4A16 kernels refuse its shape");
                        packed.dequantize()
                    }
                }
            }
        };
        let weight = weight.into_dtype(DType::F16).to_device(device).map_err(kernel)?;
        Ok(Linear::Dense(LinearWeights { weight, bias }))
    };
    let qkv = match qk_norm {
        false => QkvProjection::Stacked(load(&[Q, K, V])?),
        true => QkvProjection::Apart([load(&[Q])?, load(&[K])?, load(&[V])?]),
    };
    Ok(Projections::Fused { qkv, o: load(&[O])?, gate_up: load(&[Gate, Up])?, down: load(&[Down])? })
}

/// Matrices with the same columns stacked along their rows, on the host, in the first one's dtype.
fn stack_rows<'a>(parts: impl Iterator<Item = &'a Tensor>) -> awq_kernels::Result<Tensor> {
    let (mut values, mut rows, mut cols, mut dtype) = (Vec::new(), 0, 0, DType::F16);
    for (i, t) in parts.enumerate() {
        let (r, c) = t.dims2("stack_rows")?;
        if i == 0 {
            (cols, dtype) = (c, t.dtype());
        } else if c != cols {
            return Err(awq_kernels::Error::Shape { op: "stack_rows", detail: format!("{c} columns next to {cols}") });
        }
        values.extend_from_slice(&t.f32_values()?);
        rows += r;
    }
    Tensor::from_f32_as(&[rows, cols], values, dtype)
}

/// The residual stream's dtype (see the module docs).
const RESIDUAL: DType = DType::F32;

/// One decoder block over a step's rows (`x`, the f32 residual stream), writing their K and V into
/// the cache: each rank computes its heads' attention and its MLP columns in `dtype`; their
/// partial outputs are summed in rank order into the residual.
fn block_step(
    block: &mut RunnerBlock,
    x: &Tensor,
    shape: &BlockShape,
    paged: PagedAttentionShape,
    batch: &PagedBatch,
    rope: &RopeCache,
    dtype: DType,
) -> awq_kernels::Result<Tensor> {
    let attn_in = ops::rms_norm_to(x, &block.attn_norm, shape.rms_norm_eps, dtype)?;
    let qk_norms = block.qk_norms.as_ref();
    let parts = per_rank(&mut block.ranks, |rank| rank_attention(rank, qk_norms, &attn_in, shape, paged, batch, rope));
    let mut h = ops::add(x, &all_reduce(parts)?)?;
    let mlp_in = ops::rms_norm_to(&h, &block.mlp_norm, shape.rms_norm_eps, dtype)?;
    let parts = per_rank(&mut block.ranks, |rank| match &rank.projections {
        Projections::Separate(l) => {
            let role = |r: LinearRole| &l[r.index()];
            gated_mlp(&mlp_in, role(LinearRole::Gate), role(LinearRole::Up), role(LinearRole::Down), shape.activation)
                .map(|(_, out)| out)
        }
        Projections::Fused { gate_up, down, .. } => {
            down.apply(&ops::gated_activation_fused(shape.activation, &gate_up.apply(&mlp_in)?)?)
        }
    });
    ops::add_assign(&mut h, &all_reduce(parts)?)?;
    Ok(h)
}

/// `f` of every rank, in rank order: on rayon's threads when there are several (the CPU's ranks),
/// on this thread when there is one (a GPU's: handing each op to another thread would only add
/// latency, hundreds of times per step).
fn per_rank<T: Send>(ranks: &mut [RankBlock], f: impl Fn(&mut RankBlock) -> T + Sync + Send) -> Vec<T> {
    match ranks {
        [rank] => vec![f(rank)],
        ranks => ranks.par_iter_mut().map(f).collect(),
    }
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
