//! The model runner: executes a [`StepPlan`] on the model's weights and the paged KV cache, and
//! returns the logits the engine samples and scores.
//!
//! [`ModelRunner`] owns the weights on its devices ([`Linear`]) and the KV cache tensors: per block one
//! K and one V of shape `[n_blocks, block_size, n_kv_heads, head_dim]`, addressed through the plan's
//! block tables ([`crate::kv_cache::slot_of`]). On the CPU everything is f32 (AWQ checkpoints
//! dequantized by `Checkpoint::load_block`); on a GPU the linears' inputs and outputs and the KV
//! cache are in the architecture's 16-bit dtype (`ArchDescriptor::gpu_dtype`: f16, bf16 for Gemma),
//! AWQ linears stay INT4 (`Int4Weight`, the W4A16 kernels) and fp16/bf16 ones are converted to
//! that dtype (cuBLAS), while the residual stream between blocks stays f32 everywhere (each norm
//! reads it into the linears' dtype, `ops::rms_norm_to`): thirty-odd f16 roundings of every hidden
//! state are what moved a GPU's greedy tokens off the CPU's at near ties.
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
//! `worker/tests/serve_runner.rs`). Tensor parallelism ([`shard`]): `tp` ranks, each a
//! `rank::RankRunner` with its query heads, KV heads (and their cache) and MLP columns on its
//! device, each on a thread of its own (`threads`), running the same step; their partial outputs
//! after o_proj and down_proj meet in an all-reduce (`awq_kernels::Collective`: NCCL between GPUs,
//! each rank on its own GPU; host memory on the CPU, added in rank order). One rank runs on the
//! caller's thread. Not here: scheduling, sampling, text.

mod attention;
pub mod block;
mod graphs;
pub mod moe;
mod rank;
pub mod shard;
mod threads;

use std::ops::Range;
use std::sync::Arc;

use awq_kernels::ops::{self, Int4Weight};
use awq_kernels::{Collective, CollectiveGroup, DType, Device, Tensor};
use awq_model::arch::ArchDescriptor;
use awq_model::{Checkpoint, LinearWeights};

pub use block::{gated_mlp, head_rms_norm, norm_weight, norm_weight_as, ApplyLinear, BlockAttention, BlockShape};
pub use moe::{moe_mlp, ExpertRoute, MoeOutput, MoeRouting, Routes};
pub use shard::RankSlice;

use rank::RankRunner;
use threads::RankThreads;

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

/// The model of one replica (or of one pipeline stage) on its devices, with its KV cache (see the
/// module docs).
pub struct ModelRunner {
    ranks: Ranks,
    /// The device of each rank, in rank order.
    devices: Vec<Device>,
    /// Each rank's KV cache block, in bytes (the same on every rank).
    kv_bytes_per_rank_block: u64,
    /// What every rank has alike, read from the leader at load.
    dtype: DType,
    max_positions: usize,
    vocab_size: usize,
    hidden_size: usize,
    block_size: usize,
    block_range: Range<usize>,
    whole_model: bool,
    n_cache_blocks: usize,
}

/// The ranks: one on the caller's thread, or several on threads of their own.
enum Ranks {
    One(Box<RankRunner>),
    Threads(RankThreads),
}

/// What one pipeline stage's [`ModelRunner::execute_stage`] gives: the hidden states for the next
/// stage, or (the last stage) the step's logits.
#[derive(Debug)]
pub enum StageOutput {
    /// The residual stream after this stage's last block: `[rows, hidden]` f32, the step's rows in
    /// plan order, on the leader's device (where a link between GPUs sends it from).
    Hidden(Tensor),
    Logits(StepLogits),
}

impl ModelRunner {
    /// The dtype of activations and of the KV cache on `device` for a model of `arch` (f32 on the
    /// CPU; on a GPU `ArchDescriptor::gpu_dtype`: f16, bf16 for Gemma).
    pub fn dtype_on(device: Device, arch: &ArchDescriptor) -> DType {
        RankRunner::dtype_on(device, arch)
    }

    /// Bytes of KV cache one block of `block_size` tokens takes over all decoder blocks and all `tp`
    /// ranks on `device` (K and V in [`ModelRunner::dtype_on`]; KV heads replicated over ranks count
    /// once per rank). Errors as [`RankSlice::all`].
    pub fn kv_bytes_per_block(checkpoint: &Checkpoint, block_size: usize, tp: usize, device: Device) -> Result<u64> {
        let c = checkpoint.config();
        let kv_heads: usize = RankSlice::all(c, tp)?.iter().map(|r| r.kv_heads.len()).sum();
        Ok((2 * c.n_blocks * block_size * kv_heads * c.head_dim * ModelRunner::dtype_on(device, checkpoint.arch()).size_bytes()) as u64)
    }

    /// The device of each of `tp` ranks over `devices`: every rank on the CPU (`[Cpu]`), or the
    /// GPUs' ranks in contiguous runs, `tp / devices.len()` per GPU (one each is the usual way;
    /// several ranks on one GPU meet in host memory, which is slow, and is how the tensor-parallel
    /// GPU path runs on a machine with one GPU). Errors (`InvalidConfig`): no device, the CPU
    /// beside GPUs, a GPU given twice, `tp` not a multiple of the GPUs.
    pub fn rank_devices(devices: &[Device], tp: usize) -> Result<Vec<Device>> {
        let names = || devices.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",");
        let bad = |expected: &str| Error::InvalidConfig { field: "devices", expected: expected.into(), got: names() };
        match devices {
            [] => Err(bad("at least one device")),
            [Device::Cpu] => Ok(vec![Device::Cpu; tp]),
            gpus if gpus.contains(&Device::Cpu) => Err(bad("cpu alone, or GPUs (cuda:N) alone")),
            gpus if gpus.iter().enumerate().any(|(i, d)| gpus[..i].contains(d)) => Err(bad("each GPU once")),
            gpus if tp == 0 || !tp.is_multiple_of(gpus.len()) => Err(Error::InvalidConfig {
                field: "tp",
                expected: format!("a multiple of the {} GPUs given (one rank per GPU)", gpus.len()),
                got: tp.to_string(),
            }),
            gpus => Ok((0..tp).map(|rank| gpus[rank / (tp / gpus.len())]).collect()),
        }
    }

    /// [`ModelRunner::load_weights`] then [`ModelRunner::allocate_cache`] of `n_cache_blocks`.
    pub fn load(
        checkpoint: &Checkpoint,
        devices: &[Device],
        tp: usize,
        block_size: usize,
        n_cache_blocks: usize,
    ) -> Result<ModelRunner> {
        let mut runner = ModelRunner::load_weights(checkpoint, devices, tp, block_size)?;
        runner.allocate_cache(n_cache_blocks)?;
        Ok(runner)
    }

    /// Loads `checkpoint` as `tp` tensor-parallel ranks over `devices` ([`ModelRunner::rank_devices`];
    /// the ranks load at once, each on its thread), without a KV cache yet (a GPU's cache is sized
    /// from the memory the weights leave). Errors: `Model`, `InvalidConfig` (`tp`, `devices`),
    /// `Kernel` (a device: unavailable, out of memory; NCCL).
    pub fn load_weights(
        checkpoint: &Checkpoint,
        devices: &[Device],
        tp: usize,
        block_size: usize,
    ) -> Result<ModelRunner> {
        let all = 0..checkpoint.config().n_blocks;
        ModelRunner::load_stage_weights(checkpoint, devices, tp, block_size, all)
    }

    /// [`ModelRunner::load_weights`] of one pipeline stage: the decoder blocks `blocks` only, with
    /// the embeddings when it starts at block 0 and the final norm and LM head when it ends at the
    /// last block. Errors: as `load_weights`, and `InvalidConfig` (`blocks`) for an empty range or
    /// one past the model's blocks.
    pub fn load_stage_weights(
        checkpoint: &Checkpoint,
        devices: &[Device],
        tp: usize,
        block_size: usize,
        block_range: Range<usize>,
    ) -> Result<ModelRunner> {
        // `tp` checked against the model first: it bounds the ranks placed next.
        let slices = RankSlice::all(checkpoint.config(), tp)?;
        let rank_devices = ModelRunner::rank_devices(devices, tp)?;
        let kernel = |e: awq_kernels::Error| Error::Kernel { block_idx: None, cause: Box::new(e) };
        let (leader, ranks) = match tp {
            1 => {
                let runner = RankRunner::load(
                    checkpoint,
                    rank_devices[0],
                    &slices[0],
                    Collective::alone(),
                    block_size,
                    block_range,
                )?;
                (RankInfo::of(&runner), Ranks::One(Box::new(runner)))
            }
            _ => {
                let group = CollectiveGroup::new(&rank_devices).map_err(kernel)?;
                let loaded = std::thread::scope(|scope| {
                    let loading: Vec<_> = slices
                        .iter()
                        .zip(&rank_devices)
                        .map(|(slice, &device)| {
                            let (group, block_range) = (&group, block_range.clone());
                            scope.spawn(move || {
                                // NCCL: joining waits for every rank, which is why they load at once.
                                let collective = group.join(slice.rank).map_err(kernel)?;
                                RankRunner::load(checkpoint, device, slice, collective, block_size, block_range)
                            })
                        })
                        .collect();
                    loading
                        .into_iter()
                        .map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                        .collect::<Result<Vec<_>>>()
                })?;
                let leader = RankInfo::of(&loaded[0]);
                (leader, Ranks::Threads(RankThreads::start(loaded, group)?))
            }
        };
        Ok(ModelRunner {
            ranks,
            devices: rank_devices,
            kv_bytes_per_rank_block: leader.kv_bytes_per_rank_block,
            dtype: leader.dtype,
            max_positions: leader.max_positions,
            vocab_size: leader.vocab_size,
            hidden_size: checkpoint.config().hidden_size,
            block_size,
            whole_model: leader.whole_model,
            block_range: leader.block_range,
            n_cache_blocks: 0,
        })
    }

    /// Allocates (or replaces) the KV cache: `n_cache_blocks` blocks per rank and decoder block
    /// (on a GPU one more, the spare block of [`graphs`]), zeroed on the device. Recorded decode
    /// steps are dropped (they name the old cache). Errors: `Kernel` (out of device memory).
    pub fn allocate_cache(&mut self, n_cache_blocks: usize) -> Result<()> {
        self.on_every_rank(move |rank| rank.allocate_cache(n_cache_blocks))?;
        self.n_cache_blocks = n_cache_blocks;
        Ok(())
    }

    /// From now on, records decode steps of up to `max_num_seqs` sequences of up to
    /// `max_model_len` positions as CUDA graphs and replays them (see [`graphs`]); nothing on the
    /// CPU, on a pipeline stage, or for ranks that meet in host memory. Errors: `Kernel`.
    pub fn enable_decode_graphs(&mut self, max_model_len: usize, max_num_seqs: usize) -> Result<()> {
        self.on_every_rank(move |rank| rank.enable_decode_graphs(max_model_len, max_num_seqs)).map(drop)
    }

    /// How many decode steps are recorded now (one per bucket met so far), on the leader.
    pub fn recorded_decode_steps(&mut self) -> usize {
        match &mut self.ranks {
            Ranks::One(rank) => rank.recorded_decode_steps(),
            Ranks::Threads(_) => {
                self.on_every_rank(|rank| Ok(rank.recorded_decode_steps())).map_or(0, |counts| counts[0])
            }
        }
    }

    /// The highest position + 1 a sequence may reach (what RoPE's table covers).
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The leader's device (rank 0's).
    pub fn device(&self) -> Device {
        self.devices[0]
    }

    /// The device of each rank, in rank order.
    pub fn rank_devices_in_use(&self) -> &[Device] {
        &self.devices
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
        self.block_size
    }

    /// The decoder blocks this runner holds.
    pub fn block_range(&self) -> Range<usize> {
        self.block_range.clone()
    }

    /// Whether this runner holds the whole model (not one pipeline stage).
    pub fn is_whole_model(&self) -> bool {
        self.whole_model
    }

    /// Bytes one block of the KV cache takes on this runner: over its decoder blocks and ranks.
    pub fn kv_bytes_per_cache_block(&self) -> u64 {
        self.kv_bytes_per_rank_block * self.devices.len() as u64
    }

    /// Bytes one block of the KV cache takes on `device`: over the decoder blocks of the ranks there.
    pub fn kv_bytes_per_cache_block_on(&self, device: Device) -> u64 {
        self.kv_bytes_per_rank_block * self.devices.iter().filter(|&&d| d == device).count() as u64
    }

    /// Tensor-parallel ranks.
    pub fn tp(&self) -> usize {
        self.devices.len()
    }

    /// Runs one step (see the module docs). The plan's block tables must name blocks of this cache.
    pub fn execute(&mut self, plan: &StepPlan) -> Result<StepLogits> {
        self.execute_picking(plan, &vec![false; plan.seqs.len()])
    }

    /// [`ModelRunner::execute`], where the sequences flagged in `argmax_on_device` (one flag per
    /// scheduled sequence) get the argmax of their sampled row ([`SeqLogits::argmax`]) instead of
    /// the row: a greedy request's token without copying 128k logits to the host.
    pub fn execute_picking(&mut self, plan: &StepPlan, argmax_on_device: &[bool]) -> Result<StepLogits> {
        if !self.whole_model {
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
            got: format!("blocks {:?}", self.block_range),
        }
    }

    /// One pipeline stage's part of a step: from the token embeddings (the first stage, `hidden`
    /// `None`) or from the previous stage's output (`hidden`: `[rows, hidden]` f32 of the step's
    /// rows in plan order, on any device: each rank copies it to its own), through this runner's blocks (their K and V written into its cache),
    /// to the next stage's input, or (the last stage) to the logits. Every stage of a replica gets
    /// the same plan; its block tables name blocks of each stage's own cache.
    pub fn execute_stage(
        &mut self,
        plan: &StepPlan,
        argmax_on_device: &[bool],
        hidden: Option<&Tensor>,
    ) -> Result<StageOutput> {
        let output = match &mut self.ranks {
            Ranks::One(rank) => rank.execute_stage(plan, argmax_on_device, hidden)?,
            Ranks::Threads(threads) => {
                // The step travels to every rank's thread.
                let step = Arc::new((plan.clone(), argmax_on_device.to_vec(), hidden.cloned()));
                let outputs = threads.on_every_rank(move |rank| {
                    let (plan, argmax_on_device, hidden) = &*step;
                    rank.execute_stage(plan, argmax_on_device, hidden.as_ref())
                })?;
                outputs.into_iter().next().flatten()
            }
        };
        output.ok_or_else(|| Error::RankStopped { rank: 0, reason: "the leader returned no output".into() })
    }

    /// `f` on every rank (one: here; several: on their threads), results in rank order.
    fn on_every_rank<R: Send + 'static>(
        &mut self,
        f: impl Fn(&mut RankRunner) -> Result<R> + Send + Sync + 'static,
    ) -> Result<Vec<R>> {
        match &mut self.ranks {
            Ranks::One(rank) => Ok(vec![f(rank)?]),
            Ranks::Threads(threads) => threads.on_every_rank(f),
        }
    }
}

/// What the facade keeps of the leader at load.
struct RankInfo {
    kv_bytes_per_rank_block: u64,
    dtype: DType,
    max_positions: usize,
    vocab_size: usize,
    block_range: Range<usize>,
    whole_model: bool,
}

impl RankInfo {
    fn of(rank: &RankRunner) -> RankInfo {
        RankInfo {
            kv_bytes_per_rank_block: rank.kv_bytes_per_cache_block(),
            dtype: rank.dtype,
            max_positions: rank.max_positions(),
            vocab_size: rank.vocab_size,
            block_range: rank.block_range(),
            whole_model: rank.is_whole_model(),
        }
    }
}
