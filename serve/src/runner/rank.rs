//! One tensor-parallel rank of a [`super::ModelRunner`]: its share of the weights on its device,
//! its KV heads' cache, and a step's forward pass (see the parent module's docs for the step).
//!
//! A rank holds its query heads, KV heads and MLP columns of every block ([`super::shard`]); the
//! embeddings, norms and RoPE tables are replicated, so every rank carries the whole residual
//! stream, and after o_proj and down_proj each rank's partial output goes through the group's
//! [`Collective`] (the all-reduce: NCCL between GPUs, host memory on the CPU), which gives every
//! rank the same sum. Rank 0, the leader, alone holds the final norm and the LM head and returns
//! the step's logits; the others return nothing. With one rank the collective hands the partial
//! output back as it is, which is the plain single-device model.

use std::ops::Range;

use awq_kernels::ops::{self, Int4Weight, PackedLinear, PagedAttentionShape, PagedBatch, PagedSeq, RopeCache};
use awq_kernels::{Collective, DType, Device, Indices, Tensor};
use awq_model::arch::{ArchDescriptor, LinearId, LinearRole, NormRole};
use awq_model::{Checkpoint, LinearWeights};

use super::attention::{rank_attention, QkNorms, QkvProjection};
use super::block::{gated_mlp, norm_weight_as, ApplyLinear, BlockShape};
use super::graphs::{self, GraphStep};
use super::moe::moe_mlp;
use super::shard::RankSlice;
use super::{Linear, SeqLogits, StageOutput, StepLogits};
use crate::scheduler::StepPlan;
use crate::{Error, Result};

/// One decoder block of a rank: its norms (replicated, as the factors they apply: `block::norm_weight`)
/// and its share.
struct RunnerBlock {
    block_idx: usize,
    attn_norm: Tensor,
    mlp_norm: Tensor,
    qk_norms: Option<QkNorms>,
    /// The attention's and the MLP's output norms, where the architecture has them (Gemma 3).
    out_norms: Option<(Tensor, Tensor)>,
    rank: RankBlock,
}

/// One rank's linears of a block (its heads and MLP columns, [`super::shard`]) and its KV heads'
/// cache (of no blocks until [`RankRunner::allocate_cache`]).
pub(super) struct RankBlock {
    /// The attention's.
    pub(super) projections: Projections,
    pub(super) mlp: RankMlp,
    pub(super) k_cache: Tensor,
    pub(super) v_cache: Tensor,
}

/// How a rank's attention linears are kept.
#[allow(clippy::large_enum_variant)] // one per rank and block: the size does not matter
pub(super) enum Projections {
    /// q, k, v and o, by `LinearRole::index()` (the CPU: the worker's `block_forward`'s ops, one by
    /// one).
    Separate(Vec<Linear>),
    /// q|k|v stacked into one linear (a GPU): one matrix product where there were three, and one
    /// kernel for RoPE and the cache writes (`ops::rope_qkv_into_cache`); q, k and v stay apart
    /// where q/k norms come between projection and RoPE ([`QkvProjection`]).
    Fused { qkv: QkvProjection, o: Linear },
}

/// A rank's MLP of a block: dense, or a sparse block's router (replicated, in the rank's dtype) and
/// its share of every expert.
#[allow(clippy::large_enum_variant)] // one per rank and block: the size does not matter
pub(super) enum RankMlp {
    Dense(GatedLinears),
    Moe { router: Tensor, experts: Vec<GatedLinears> },
}

/// One gated MLP's linears (a dense block's, or one expert's).
pub(super) enum GatedLinears {
    /// gate, up and down apart (the CPU: `block::gated_mlp`, as the worker runs it).
    Separate { gate: Linear, up: Linear, down: Linear },
    /// gate|up stacked into one linear (a GPU): one matrix product, the activation on its halves
    /// (`ops::gated_activation_fused`).
    Fused { gate_up: Linear, down: Linear },
}

impl GatedLinears {
    /// `down(act(gate(x)) * up(x))` on rows `x`: `(down input, output)`.
    fn forward(&self, x: &Tensor, activation: ops::GatedActivation) -> awq_kernels::Result<(Tensor, Tensor)> {
        match self {
            GatedLinears::Separate { gate, up, down } => gated_mlp(x, gate, up, down, activation),
            GatedLinears::Fused { gate_up, down } => {
                let down_in = ops::gated_activation_fused(activation, &gate_up.apply(x)?)?;
                let out = down.apply(&down_in)?;
                Ok((down_in, out))
            }
        }
    }
}

/// One rank of a replica (or of a pipeline stage) on one device, with its KV cache.
pub(super) struct RankRunner {
    pub(super) device: Device,
    /// The linears' and the KV cache's dtype: f32 on the CPU, the architecture's `gpu_dtype` on GPUs
    /// (the residual stream is f32).
    pub(super) dtype: DType,
    /// This rank's place in the group, and the group's all-reduce.
    collective: Collective,
    /// cos and sin for every position a sequence may reach, one per RoPE of `shape.ropes`.
    ropes: Vec<RopeCache>,
    /// The whole model's shape (norms' epsilon, RoPE); `rank_shape` is this rank's heads.
    pub(super) shape: BlockShape,
    rank_shape: BlockShape,
    /// This rank's cache layout.
    pub(super) paged: PagedAttentionShape,
    /// Blocks of the KV cache the plans may name; a GPU's cache has one more, the spare block that
    /// the padding rows of a recorded decode step write into ([`graphs`]).
    pub(super) n_cache_blocks: usize,
    /// Decode steps recorded as CUDA graphs, once enabled ([`RankRunner::enable_decode_graphs`]).
    pub(super) graphs: Option<graphs::DecodeGraphs>,
    /// The decoder blocks this runner holds: all of them, or a pipeline stage's range.
    block_range: Range<usize>,
    /// The model's decoder blocks (all stages').
    n_model_blocks: usize,
    /// The first stage's: the token embeddings, and the factor they are read with
    /// (`ArchDescriptor::embedding_scale`).
    embed: Option<Tensor>,
    embed_scale: f32,
    blocks: Vec<RunnerBlock>,
    /// The last stage's leader's: the final norm and the LM head.
    final_norm: Option<Tensor>,
    lm_head: Option<Tensor>,
    /// `final_logit_softcapping`, when config.json sets it.
    logit_softcap: Option<f32>,
    pub(super) vocab_size: usize,
    /// The residual stream's width.
    hidden_size: usize,
}

impl RankRunner {
    /// Loads `slice`'s share of `checkpoint`'s decoder blocks `block_range` (one rank of `tp`) onto
    /// `device`, with the embeddings when the range starts at block 0 and, for the leader (rank
    /// 0) of a range that ends at the last block, the final norm and the LM head; no KV cache yet.
    /// Errors: `Model`, `InvalidConfig` (`blocks`, `tp`), `Kernel` (the device: unavailable, out
    /// of memory).
    pub(super) fn load(
        checkpoint: &Checkpoint,
        device: Device,
        slice: &RankSlice,
        collective: Collective,
        block_size: usize,
        block_range: Range<usize>,
    ) -> Result<RankRunner> {
        let n_model_blocks = checkpoint.config().n_blocks;
        if block_range.is_empty() || block_range.end > n_model_blocks {
            return Err(Error::InvalidConfig {
                field: "blocks",
                expected: format!("a non-empty range of the model's {n_model_blocks} blocks"),
                got: format!("{block_range:?}"),
            });
        }
        let kernel =
            |block_idx: Option<usize>| move |e: awq_kernels::Error| Error::Kernel { block_idx, cause: Box::new(e) };
        device.check_available().map_err(kernel(None))?;
        let dtype = RankRunner::dtype_on(device, checkpoint.arch());
        let (c, tp) = (checkpoint.config(), collective.n_ranks());
        let shape = BlockShape::of(checkpoint);
        let rank_shape = BlockShape { n_heads: slice.q_heads.len(), n_kv_heads: slice.kv_heads.len(), ..shape.clone() };
        let paged = rank_shape.paged_shape(block_size);
        let to_device = |t: Tensor, block_idx| t.into_dtype(dtype).to_device(device).map_err(kernel(block_idx));
        let norm_form = checkpoint.arch().norm_form;
        // A norm's factor on the device: in `dtype`, or f32 for `1 + w` norms (`block::norm_weight`).
        let norm_to_device = |t: Tensor, block_idx| {
            norm_weight_as(t, norm_form, dtype).and_then(|t| t.to_device(device)).map_err(kernel(block_idx))
        };
        let blocks = block_range
            .clone()
            .map(|block_idx| {
                let (projections, mlp, attn_norm, mlp_norm) = match device {
                    Device::Cuda(_) => {
                        let (projections, mlp) =
                            fused_projections(checkpoint, block_idx, shape.qk_norm, device, dtype, slice, tp)?;
                        let norm = |role| checkpoint.tensor(&checkpoint.arch().norm_name(block_idx, role));
                        (projections, mlp, norm(NormRole::Attn)?, norm(NormRole::Mlp)?)
                    }
                    Device::Cpu => {
                        let w = checkpoint.load_block(block_idx)?.into_dtype(dtype);
                        let linear = |id: LinearId| -> Result<Linear> {
                            let l = match tp {
                                1 => w.linear(id).clone(),
                                _ => slice.linear(checkpoint.arch(), c, id, w.linear(id))?,
                            };
                            let on_device = |t: Tensor| to_device(t, Some(block_idx));
                            Ok(Linear::Dense(LinearWeights {
                                weight: on_device(l.weight)?,
                                bias: l.bias.map(on_device).transpose()?,
                            }))
                        };
                        let gated = |expert: Option<usize>| -> Result<GatedLinears> {
                            let id = |role| LinearId { role, expert };
                            let (gate, up, down) = (id(LinearRole::Gate), id(LinearRole::Up), id(LinearRole::Down));
                            Ok(GatedLinears::Separate { gate: linear(gate)?, up: linear(up)?, down: linear(down)? })
                        };
                        let attention = [LinearRole::Q, LinearRole::K, LinearRole::V, LinearRole::O];
                        let projections = Projections::Separate(
                            attention.map(|r| linear(r.into())).into_iter().collect::<Result<_>>()?,
                        );
                        let mlp = match w.router() {
                            None => RankMlp::Dense(gated(None)?),
                            Some(router) => RankMlp::Moe {
                                router: to_device(router.clone(), Some(block_idx))?,
                                experts: (0..w.n_experts()).map(|e| gated(Some(e))).collect::<Result<_>>()?,
                            },
                        };
                        (projections, mlp, w.norm(NormRole::Attn).clone(), w.norm(NormRole::Mlp).clone())
                    }
                };
                let empty = || ops::zeros_kv_cache(0, paged, dtype, device).map_err(kernel(Some(block_idx)));
                let stored_norm = |role| checkpoint.tensor(&checkpoint.arch().norm_name(block_idx, role));
                let out_norms = match shape.post_norms {
                    false => None,
                    true => Some((
                        norm_to_device(stored_norm(NormRole::AttnOut)?, Some(block_idx))?,
                        norm_to_device(stored_norm(NormRole::MlpOut)?, Some(block_idx))?,
                    )),
                };
                Ok(RunnerBlock {
                    block_idx,
                    attn_norm: norm_to_device(attn_norm, Some(block_idx))?,
                    mlp_norm: norm_to_device(mlp_norm, Some(block_idx))?,
                    qk_norms: QkNorms::load(checkpoint, block_idx, &shape, dtype, device)?,
                    out_norms,
                    rank: RankBlock { projections, mlp, k_cache: empty()?, v_cache: empty()? },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Positions up to the model's trained length (or what the engine could ever cache).
        let n_positions = c.max_position_embeddings.unwrap_or(1 << 17);
        let head = block_range.end == n_model_blocks && collective.rank() == 0;
        Ok(RankRunner {
            device,
            dtype,
            collective,
            ropes: shape
                .ropes
                .iter()
                .map(|table| RopeCache::new(table, n_positions, device))
                .collect::<awq_kernels::Result<_>>()
                .map_err(kernel(None))?,
            paged,
            n_cache_blocks: 0,
            graphs: None,
            embed: match block_range.start {
                0 => Some(checkpoint.embed_tokens()?.to_device(device).map_err(kernel(None))?),
                _ => None,
            },
            embed_scale: checkpoint.arch().embedding_scale(c),
            blocks,
            final_norm: match head {
                true => Some(norm_to_device(checkpoint.final_norm()?, None)?),
                false => None,
            },
            logit_softcap: c.final_logit_softcapping.map(|cap| cap as f32),
            lm_head: match head {
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

    /// The dtype of activations, dense weights and the KV cache on `device` for a model of `arch`:
    /// f32 on the CPU, the architecture's 16-bit dtype on a GPU (`ArchDescriptor::gpu_dtype`).
    pub(super) fn dtype_on(device: Device, arch: &ArchDescriptor) -> DType {
        match device {
            Device::Cpu => DType::F32,
            Device::Cuda(_) => arch.gpu_dtype,
        }
    }

    /// Allocates (or replaces) the KV cache: `n_cache_blocks` blocks per decoder block (on a GPU
    /// one more, the spare block of [`graphs`]), zeroed on the device. Recorded decode steps are
    /// dropped (they name the old cache). Errors: `Kernel` (out of device memory).
    pub(super) fn allocate_cache(&mut self, n_cache_blocks: usize) -> Result<()> {
        if let Some(g) = &mut self.graphs {
            g.clear();
        }
        let allocated = n_cache_blocks + self.spare_blocks();
        for block in &mut self.blocks {
            let rank = &mut block.rank;
            let zeros = |n| {
                ops::zeros_kv_cache(n, self.paged, self.dtype, self.device)
                    .map_err(|e| Error::Kernel { block_idx: Some(block.block_idx), cause: Box::new(e) })
            };
            // Emptied first: a replaced cache's memory is reused.
            (rank.k_cache, rank.v_cache) = (zeros(0)?, zeros(0)?);
            (rank.k_cache, rank.v_cache) = (zeros(allocated)?, zeros(allocated)?);
        }
        self.n_cache_blocks = n_cache_blocks;
        Ok(())
    }

    /// Cache blocks beyond the plans' (see `n_cache_blocks`): one on a GPU.
    pub(super) fn spare_blocks(&self) -> usize {
        match self.device {
            Device::Cpu => 0,
            Device::Cuda(_) => 1,
        }
    }

    /// The highest position + 1 a sequence may reach (what RoPE's tables cover).
    pub(super) fn max_positions(&self) -> usize {
        self.ropes[0].n_positions()
    }

    /// Bytes one block of the KV cache takes on this rank, over its decoder blocks.
    pub(super) fn kv_bytes_per_cache_block(&self) -> u64 {
        let per_block =
            2 * self.paged.block_size * self.paged.n_kv_heads * self.paged.head_dim * self.dtype.size_bytes();
        (per_block * self.blocks.len()) as u64
    }

    /// Whether this rank returns the step's output (rank 0).
    fn is_leader(&self) -> bool {
        self.collective.rank() == 0
    }

    pub(super) fn block_range(&self) -> Range<usize> {
        self.block_range.clone()
    }

    /// Whether this runner holds the whole model (not one pipeline stage).
    pub(super) fn is_whole_model(&self) -> bool {
        self.block_range == (0..self.n_model_blocks)
    }

    /// Whether decode steps can be recorded as CUDA graphs here: a GPU, the whole model, and an
    /// all-reduce that a graph can record.
    pub(super) fn can_record(&self) -> bool {
        // A mixture of experts routes on the host (each sparse block copies its router's logits
        // back and picks experts there, `super::moe`), which a recording cannot do: such models
        // decode eagerly.
        self.device != Device::Cpu && self.is_whole_model() && self.collective.recordable() && self.shape.moe.is_none()
    }

    pub(super) fn not_whole(&self, what: &str) -> Error {
        Error::InvalidConfig {
            field: "blocks",
            expected: format!("the whole model for {what} (a pipeline stage runs execute_stage)"),
            got: format!("blocks {:?} of {}", self.block_range, self.n_model_blocks),
        }
    }

    /// One pipeline stage's part of a step on this rank: from the token embeddings (the first
    /// stage, `hidden` `None`) or from the previous stage's output (`hidden`: `[rows, hidden]` f32
    /// of the step's rows in plan order, on any device), through this runner's blocks (their K and V written into
    /// its cache), to the next stage's input, or (the last stage) to the logits. Every rank and
    /// every stage of a replica gets the same plan; its block tables name blocks of each one's own
    /// cache. The leader returns the output; the other ranks `None`.
    pub(super) fn execute_stage(
        &mut self,
        plan: &StepPlan,
        argmax_on_device: &[bool],
        hidden: Option<&Tensor>,
    ) -> Result<Option<StageOutput>> {
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
        if let Some(p) =
            plan.seqs.iter().map(|s| s.positions.end).max().filter(|&end| end > self.max_positions()).map(|end| end - 1)
        {
            return Err(Error::InvalidConfig {
                field: "max_model_len",
                expected: format!("at most {} (the model's max_position_embeddings)", self.max_positions()),
                got: format!("a sequence at position {p}"),
            });
        }
        if let GraphStep::Ran(logits) = graphs::decode_step(self, plan, &seqs, argmax_on_device)? {
            return Ok(logits.map(StageOutput::Logits));
        }
        let cache_blocks = self.n_cache_blocks + self.spare_blocks();
        let batch = PagedBatch::new(&seqs, bs, cache_blocks, self.device).map_err(kernel(None))?;
        let x = match (hidden, self.embed.is_some()) {
            (None, true) => self.embeddings(&Indices::new(ids, self.device).map_err(kernel(None))?)?,
            (Some(h), false) => {
                let width = self.hidden_size;
                if h.shape() != [plan.n_tokens, width] || h.dtype() != RESIDUAL {
                    return Err(Error::InvalidConfig {
                        field: "hidden",
                        expected: format!("{} rows of {width} {RESIDUAL:?} (the step's tokens)", plan.n_tokens),
                        got: format!("{:?} {:?}", h.shape(), h.dtype()),
                    });
                }
                h.to_device(self.device).map_err(kernel(None))?
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
        if !self.is_leader() {
            return Ok(None);
        }
        if self.block_range.end < self.n_model_blocks {
            return Ok(Some(StageOutput::Hidden(x)));
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
            self.head()?;
            let head = || -> awq_kernels::Result<(Vec<f32>, Vec<u32>)> {
                let rows = ops::embedding(&x, &wanted, RESIDUAL)?;
                let all = self.logits(&rows)?;
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
        Ok(Some(StageOutput::Logits(StepLogits { vocab_size: self.vocab_size, logits, seqs: seq_logits })))
    }

    /// The residual stream's first value for a step's token `ids` (the first stage's): their
    /// embeddings, times the model's embedding scale.
    pub(super) fn embeddings(&self, ids: &Indices) -> Result<Tensor> {
        let embed = self.embed.as_ref().ok_or_else(|| self.not_whole("the embeddings"))?;
        ops::embedding_scaled_at(embed, ids, self.embed_scale, RESIDUAL)
            .map_err(|e| Error::Kernel { block_idx: None, cause: Box::new(e) })
    }

    /// The logits (f32) of residual-stream `rows`: the final norm, the LM head, and the soft cap
    /// where the model has one. Only on the rank that has the head ([`RankRunner::head`]).
    pub(super) fn logits(&self, rows: &Tensor) -> awq_kernels::Result<Tensor> {
        let (Some(final_norm), Some(lm_head)) = (&self.final_norm, &self.lm_head) else {
            return Err(awq_kernels::Error::Shape { op: "logits", detail: "this rank has no LM head".into() });
        };
        let normed = ops::rms_norm_to(rows, final_norm, self.shape.rms_norm_eps, self.dtype)?;
        let logits = ops::linear_to(&normed, lm_head, None, LOGITS)?;
        match self.logit_softcap {
            Some(cap) => ops::softcap(&logits, cap),
            None => Ok(logits),
        }
    }

    /// The final norm and the LM head (the last stage's leader's), `None` on another rank.
    pub(super) fn head(&self) -> Result<(&Tensor, &Tensor)> {
        match (&self.final_norm, &self.lm_head) {
            (Some(norm), Some(head)) => Ok((norm, head)),
            _ => Err(self.not_whole("the LM head")),
        }
    }

    /// Whether this rank computes the logits (the leader of the last stage).
    pub(super) fn has_head(&self) -> bool {
        self.lm_head.is_some()
    }

    /// This runner's decoder blocks over a step's rows (`x` and `batch` on this device), their K
    /// and V written into the cache.
    pub(super) fn run_blocks(&mut self, mut x: Tensor, batch: &PagedBatch) -> Result<Tensor> {
        let kernel = |block_idx| move |e: awq_kernels::Error| Error::Kernel { block_idx, cause: Box::new(e) };
        for block in &mut self.blocks {
            let block_idx = block.block_idx;
            let step = BlockStep {
                shape: &self.rank_shape,
                paged: PagedAttentionShape { sliding_window: self.rank_shape.window(block_idx), ..self.paged },
                batch,
                rope: &self.ropes[self.rank_shape.blocks[block_idx].rope],
                dtype: self.dtype,
                collective: &self.collective,
            };
            x = step.run(block, &x).map_err(kernel(Some(block_idx)))?;
        }
        Ok(x)
    }
}

/// A rank's linears of a block on a GPU (its share, [`RankSlice`], of `tp`), in `dtype` (f16 or
/// bf16), with q|k|v (unless `qk_norm`) and gate|up stacked ([`Projections::Fused`],
/// [`GatedLinears::Fused`]; each expert's gate|up too): AWQ linears stay INT4 (`Int4Weight`, the
/// W4A16 kernels, scales in `dtype`, which run each expert on its routed rows) unless the kernels
/// refuse the shape (out_features not a multiple of 16, in_features not of 64: then dequantized to
/// `dtype`). A sparse block's router is in `dtype`, replicated.
#[allow(clippy::too_many_arguments)]
fn fused_projections(
    checkpoint: &Checkpoint,
    block_idx: usize,
    qk_norm: bool,
    device: Device,
    dtype: DType,
    slice: &RankSlice,
    tp: usize,
) -> Result<(Projections, RankMlp)> {
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
    // This rank's share of one linear, and its bias.
    enum Share {
        Dense(Tensor),
        Packed(PackedLinear),
    }
    let share = |id: LinearId| -> Result<(Share, Option<Tensor>)> {
        match &source {
            Source::Dense(w) => {
                let l = match tp {
                    1 => w.linear(id).clone(),
                    _ => slice.linear(arch, c, id, w.linear(id))?,
                };
                Ok((Share::Dense(l.weight), l.bias))
            }
            &Source::Awq(q) => {
                let (packed, bias) =
                    (checkpoint.packed_linear(block_idx, id, q)?, checkpoint.linear_bias(block_idx, id)?);
                let (packed, bias) = match tp {
                    1 => (packed, bias),
                    _ => slice.packed(arch, c, id, &packed, bias)?,
                };
                Ok((Share::Packed(packed), bias))
            }
        }
    };
    let load = |roles: &[LinearId]| -> Result<Linear> {
        let shares = roles.iter().map(|&r| share(r)).collect::<Result<Vec<_>>>()?;
        // Biases stacked like the weights; a role without one adds zeros (Qwen2: q, k, v have them).
        let bias = match shares.iter().any(|(_, b)| b.is_some()) {
            false => None,
            true => {
                let mut values = Vec::new();
                for (weight, b) in &shares {
                    match (b, weight) {
                        (Some(b), _) => values.extend_from_slice(&b.f32_values().map_err(kernel)?),
                        (None, Share::Dense(w)) => {
                            values.extend(std::iter::repeat_n(0.0, w.dims2("bias").map_err(kernel)?.0))
                        }
                        (None, Share::Packed(p)) => values.extend(std::iter::repeat_n(0.0, p.out_features)),
                    }
                }
                let n = values.len();
                Some(Tensor::from_f32_as(&[n], values, dtype).and_then(|t| t.to_device(device)).map_err(kernel)?)
            }
        };
        let weight = match &source {
            Source::Dense(_) => stack_rows(shares.iter().map(|(w, _)| match w {
                Share::Dense(w) => w,
                Share::Packed(_) => unreachable!("a dense checkpoint's shares are dense"),
            }))
            .map_err(kernel)?,
            Source::Awq(_) => {
                let parts: Vec<&PackedLinear> = shares
                    .iter()
                    .filter_map(|(w, _)| match w {
                        Share::Packed(p) => Some(p),
                        Share::Dense(_) => None,
                    })
                    .collect();
                let packed = PackedLinear::concat_outputs(&parts).map_err(kernel)?;
                match Int4Weight::from_awq(&packed, dtype) {
                    Ok(weight) => return Ok(Linear::Int4 { weight: weight.to_device(device).map_err(kernel)?, bias }),
                    Err(refused) => {
                        tracing::debug!(block_idx, ?roles, %refused, %dtype, "AWQ linear kept dequantized: the W4A16 kernels refuse its shape");
                        packed.dequantize()
                    }
                }
            }
        };
        let weight = weight.into_dtype(dtype).to_device(device).map_err(kernel)?;
        Ok(Linear::Dense(LinearWeights { weight, bias }))
    };
    let ids = |roles: &[LinearRole], expert: Option<usize>| -> Vec<LinearId> {
        roles.iter().map(|&role| LinearId { role, expert }).collect()
    };
    let qkv = match qk_norm {
        false => QkvProjection::Stacked(load(&ids(&[Q, K, V], None))?),
        true => QkvProjection::Apart([load(&ids(&[Q], None))?, load(&ids(&[K], None))?, load(&ids(&[V], None))?]),
    };
    let gated = |expert: Option<usize>| -> Result<GatedLinears> {
        Ok(GatedLinears::Fused { gate_up: load(&ids(&[Gate, Up], expert))?, down: load(&ids(&[Down], expert))? })
    };
    let mlp = match arch.is_sparse(c, block_idx) {
        false => RankMlp::Dense(gated(None)?),
        true => {
            let router = checkpoint.router(block_idx)?.into_dtype(dtype).to_device(device).map_err(kernel)?;
            let n_experts = c.moe.as_ref().map_or(0, |m| m.n_experts);
            RankMlp::Moe { router, experts: (0..n_experts).map(|e| gated(Some(e))).collect::<Result<_>>()? }
        }
    };
    Ok((Projections::Fused { qkv, o: load(&ids(&[O], None))? }, mlp))
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

/// The logits' dtype, whatever the weights': f16 would round them in steps as large as the gaps
/// between the top tokens that greedy decoding and sampling then decide (see `ops::linear_to`).
pub(super) const LOGITS: DType = DType::F32;

/// What a block of a step reads: this rank's shape, the cache layout with the block's window, the
/// step's rows, the block's RoPE, the linears' dtype and the group's all-reduce.
struct BlockStep<'a> {
    shape: &'a BlockShape,
    paged: PagedAttentionShape,
    batch: &'a PagedBatch,
    rope: &'a RopeCache,
    dtype: DType,
    collective: &'a Collective,
}

impl BlockStep<'_> {
    /// One decoder block over the step's rows (`x`, the f32 residual stream), writing their K and
    /// V into the cache: this rank computes its heads' attention and its MLP columns in `dtype`,
    /// and each partial output is summed over the ranks (the all-reduce) into the residual.
    fn run(&self, block: &mut RunnerBlock, x: &Tensor) -> awq_kernels::Result<Tensor> {
        let eps = self.shape.rms_norm_eps;
        let attn_in = ops::rms_norm_to(x, &block.attn_norm, eps, self.dtype)?;
        let qk_norms = block.qk_norms.as_ref();
        let rank = &mut block.rank;
        let part = rank_attention(rank, qk_norms, &attn_in, self.shape, self.paged, self.batch, self.rope)?;
        // An output norm reads the whole sum: after the all-reduce, on every rank alike, into the
        // residual stream's dtype.
        let out_norm = |sum: Tensor, norm: Option<&Tensor>| match norm {
            Some(w) => ops::rms_norm_to(&sum, w, eps, RESIDUAL),
            None => Ok(sum),
        };
        let out_norms = block.out_norms.as_ref();
        let attn_out = out_norm(self.collective.all_reduce_sum(part)?, out_norms.map(|n| &n.0))?;
        let mut h = ops::add(x, &attn_out)?;
        let mlp_in = ops::rms_norm_to(&h, &block.mlp_norm, eps, self.dtype)?;
        let activation = self.shape.activation;
        let part = match &rank.mlp {
            RankMlp::Dense(mlp) => mlp.forward(&mlp_in, activation)?.1,
            RankMlp::Moe { router, experts } => {
                let routing = self.shape.moe.as_ref().ok_or_else(|| awq_kernels::Error::Shape {
                    op: "moe_mlp",
                    detail: "a block with a router in a model without a routing rule".into(),
                })?;
                moe_mlp(&mlp_in, router, routing, |e, x| experts[e].forward(x, activation), false)?.out
            }
        };
        let mlp_out = out_norm(self.collective.all_reduce_sum(part)?, out_norms.map(|n| &n.1))?;
        ops::add_assign(&mut h, &mlp_out)?;
        Ok(h)
    }
}
