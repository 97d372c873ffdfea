//! A pipeline stage: one worker's contiguous range of a job's blocks.
//!
//! A stage runs in three phases, so that the next stage can start as early as possible:
//! 1. **input**: the activations at its first block, received from the previous stage, or
//!    recomputed from the embeddings through the original blocks before it (the first stage, and
//!    any stage planned again after a worker was lost: the fp16 chain is cheap and exact);
//! 2. **forward**: the original blocks of its range, keeping each block's input, then the
//!    activations after its last block go to the next stage at once;
//! 3. **search**: AWQ on each block not finished before, each result uploaded as soon as it exists.
//!
//! A stage that no later stage waits for (the last one, or the only one) fuses phases 2 and 3: each
//! block's search runs the forward pass that produces the next block's input anyway, so the blocks
//! go through the device once. Block weights are read, decoded, checked and copied to the device on
//! background threads (`Prefetch`), from the stage's start: a stage waiting for its input reads its
//! range meanwhile. When the range fits the device's budget (`RESIDENT_SHARE` of its free memory)
//! the weights stay there and the search reuses them; otherwise they stream, one block per reader
//! ahead, and the search reads them again.
//!
//! Finished blocks (and the tail) serialize on threads of their own and go to [`StageIo::upload`]
//! as they become ready (`Deliveries`); a stage that fails still delivers the blocks it finished
//! (a cancelled one drops them: its job is over).
//!
//! RTN needs no activations, so an RTN stage skips phases 1 and 2. How activations and results move
//! is behind [`StageIo`]: gRPC between CPU workers, NCCL between GPUs (`nccl_io`), without touching
//! the engine. Same spec, same bytes, whichever worker runs it, and whichever of the two paths.

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use awq_kernels::{DType, Device, HostStaging, Tensor};
use awq_model::arch::ArchDescriptor;
use awq_model::awq_format::check_quantizable;
use awq_model::safetensors::serialize;
use awq_model::{BlockWeights, Checkpoint, Tokenizer};
use serde_json::json;
use tracing::info_span;

use crate::awq::calib::{self, CalibrationSet};
use crate::awq::{quantize_block, quantize_rtn, tail_tensors, AwqOptions};
use awq_job::{CalibSource, JobOptions, Method};
use crate::forward::{block_forward, embeddings, BlockShape};
use crate::kept::KeptBlocks;
use crate::{Error, Result};

/// Where a stage's input activations come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageInput {
    PreviousStage,
    Embeddings,
}

/// Everything a worker needs to run a stage: what the assignment said, checked once
/// (`TryFrom<&pb::Assignment>` in [`crate::node`]), and the worker's own settings.
#[derive(Clone, Debug)]
pub struct StageSpec {
    pub job_id: String,
    pub model: PathBuf,
    /// The job's options, as the coordinator validated them.
    pub job: JobOptions,
    pub blocks: Range<usize>,
    /// Blocks of the range finished in an earlier attempt: forward only.
    pub blocks_done: BTreeSet<usize>,
    pub input: StageInput,
    /// Whether a next stage waits for this stage's output activations.
    pub has_next: bool,
    /// Also produce the tensors outside the blocks (embeddings, final norm, head).
    pub produce_tail: bool,
    /// Where the engine computes: block weights and activations live there during the stage.
    pub device: Device,
    /// Bytes of block weights the stage may keep on its device (a worker setting; `None`:
    /// [`RESIDENT_SHARE`] of the device's free memory). It never changes the output.
    pub resident_bytes: Option<u64>,
    /// Tests only: this block fails with a fault of the worker (see `awq worker
    /// --inject-fault-at-block`), as a device error would.
    pub inject_fault_at_block: Option<usize>,
    /// Where the finished blocks are kept for serving, when the job deploys its output
    /// (`Assignment.keep_for_serving`; see [`crate::kept`]).
    pub keep: Option<Arc<KeptBlocks>>,
}

impl StageSpec {
    /// What decides how each block is quantized.
    pub fn awq_options(&self) -> AwqOptions {
        AwqOptions::new(self.job.quant, self.job.method)
    }

    /// The dtype this stage's engine computes in: the job's, resolved for this stage's device and
    /// the model's architecture (`gpu_dtype`: bf16 for Gemma on a GPU).
    pub fn compute_dtype(&self, arch: &ArchDescriptor) -> DType {
        self.job.engine_dtype.on(self.device, arch.gpu_dtype)
    }
}

/// A finished piece of a stage's work, ready to upload: a safetensors file in memory and a JSON
/// report.
pub struct StageResult {
    /// `Some(block_idx)` for a block, `None` for the tail.
    pub block_idx: Option<usize>,
    /// Shared, not copied, with the blocks a worker keeps for serving ([`crate::kept`]).
    pub payload: Arc<Vec<u8>>,
    pub report_json: String,
}

/// Where a stage's time went, in seconds: the raw material of the cluster benchmark.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StageTimings {
    /// Waiting for (and receiving) the previous stage's activations, or recomputing them.
    pub input_s: f64,
    /// The original forward through the stage's blocks.
    pub forward_s: f64,
    /// Waiting for the next block's weights (read on a background thread) and copying them to the
    /// device, in the search phase.
    pub load_s: f64,
    /// Handing activations to the next stage.
    pub send_s: f64,
    /// Scale search, clip search and packing.
    pub search_s: f64,
    /// Uploading results to the coordinator.
    pub upload_s: f64,
}

/// How a stage talks to the rest of the job.
pub trait StageIo {
    /// Waits for the activations at the stage's first block.
    fn receive_input(&mut self) -> Result<Tensor>;
    /// Hands the activations after the stage's last block to the next stage.
    fn send_output(&mut self, x: &Tensor, seq_len: usize) -> Result<()>;
    /// Delivers a finished block or the tail. May return before the delivery is complete (so that
    /// the next block's search overlaps it); [`StageIo::flush`] waits for every delivery.
    fn upload(&mut self, result: StageResult) -> Result<()>;
    /// Waits until every result given to [`StageIo::upload`] was delivered, returning the first
    /// delivery's error if one failed.
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
    /// Whether the job was cancelled (checked between blocks).
    fn cancelled(&self) -> bool;
}

/// The calibration rows every stage of a job builds identically.
pub fn calibration_set(spec: &StageSpec, checkpoint: &Checkpoint) -> Result<CalibrationSet> {
    let tokenizer = Tokenizer::from_dir(&spec.model, checkpoint.config())?;
    let texts = match &spec.job.calib_source {
        CalibSource::File(path) => calib::load_texts(path)?,
        CalibSource::BuiltIn => calib::default_texts(),
    };
    calib::build(&texts, &tokenizer, spec.job.calib)
}

/// The fault a test asked for at `block` ([`StageSpec::inject_fault_at_block`]).
fn injected_fault(spec: &StageSpec, block: usize) -> Result<()> {
    match spec.inject_fault_at_block {
        Some(b) if b == block => Err(Error::InjectedFault { block_idx: block }),
        _ => Ok(()),
    }
}

fn check_cancel(io: &dyn StageIo, job_id: &str) -> Result<()> {
    if io.cancelled() {
        return Err(Error::Cancelled(job_id.to_string()));
    }
    Ok(())
}

/// Blocks read at the same time by [`Prefetch`]: reading a block (mapping its pages, decoding and
/// checking hundreds of MB) takes longer than the forward pass of a stage's phase 2 on a GPU, so
/// one reader would leave the device idle there.
const LOADERS: usize = 3;

/// The share of a device's free memory (at stage start) that a stage's block weights may take to
/// stay resident there; the rest is for activations and the search's work space.
const RESIDENT_SHARE: f64 = 0.4;

/// How far ahead of the device block weights are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadAhead {
    /// One block waiting per reader: a stage whose weights do not fit its device's budget.
    Streaming,
    /// Every block of the stage, as fast as the readers go: they fit, so a stage waiting for its
    /// input reads (and uploads) its whole range meanwhile, and its search reuses the weights its
    /// forward pass used instead of reading them again.
    Resident,
}

/// The read-ahead that fits: [`ReadAhead::Resident`] when `n_blocks` blocks of `block_bytes` fit
/// in `budget_bytes`.
fn read_ahead(n_blocks: usize, block_bytes: u64, budget_bytes: u64) -> ReadAhead {
    if (n_blocks as u64).saturating_mul(block_bytes) <= budget_bytes {
        ReadAhead::Resident
    } else {
        ReadAhead::Streaming
    }
}

/// Bytes of block weights a stage may keep on its device: the worker's setting, else
/// [`RESIDENT_SHARE`] of a GPU's free memory; none on the CPU (its memory is also the page cache
/// the weights are read from, and the CPU engine is far slower than the reads).
fn resident_budget(spec: &StageSpec) -> Result<u64> {
    if let Some(bytes) = spec.resident_bytes {
        return Ok(bytes);
    }
    Ok(spec.device.free_memory()?.map_or(0, |free| (free as f64 * RESIDENT_SHARE) as u64))
}

/// The weights of some blocks, in order, read by [`LOADERS`] background threads (block `i` of the
/// list by thread `i % LOADERS`), converted to the engine's dtype and copied to the stage's device
/// there, so that disk, host and copy work overlap the device's. Ends early after an error (which
/// it yields first). Dropping it stops the readers at their next block.
struct Prefetch {
    readers: Vec<std::sync::mpsc::Receiver<Result<BlockWeights>>>,
    next: usize,
    len: usize,
}

impl Prefetch {
    fn start<'scope, 'env>(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        checkpoint: &'env Checkpoint,
        blocks: Vec<usize>,
        dtype: DType,
        device: Device,
        ahead: ReadAhead,
    ) -> Prefetch {
        let len = blocks.len();
        let readers = (0..LOADERS.min(len))
            .map(|k| {
                let mine: Vec<usize> = blocks.iter().copied().skip(k).step_by(LOADERS).collect();
                // Blocks waiting in the channel, besides the one being read.
                let (tx, rx) = std::sync::mpsc::sync_channel(match ahead {
                    ReadAhead::Streaming => 1,
                    ReadAhead::Resident => mine.len(),
                });
                scope.spawn(move || {
                    let mut staging = HostStaging::new(device);
                    // Page-locked once, for this reader's largest tensor.
                    let largest = mine.iter().map(|&b| checkpoint.largest_block_tensor_bytes(b)).max().unwrap_or(0);
                    if let Err(e) = staging.reserve(largest) {
                        let _ = tx.send(Err(e.into()));
                        return;
                    }
                    for b in mine {
                        let start = Instant::now();
                        let read = checkpoint.load_block_staged(b, &mut staging).map_err(Error::from);
                        let read_s = start.elapsed().as_secs_f64();
                        let weights = read.and_then(|w| Ok(w.into_dtype(dtype).into_device(device)?));
                        let total_s = start.elapsed().as_secs_f64();
                        tracing::debug!(block = b, "weights read onto {device} in {read_s:.3} s, in {dtype} after {total_s:.3} s");
                        let failed = weights.is_err();
                        // A closed channel means the consumer stopped (an error, a cancellation).
                        if tx.send(weights).is_err() || failed {
                            break;
                        }
                    }
                });
                rx
            })
            .collect();
        Prefetch { readers, next: 0, len }
    }
}

impl Iterator for Prefetch {
    type Item = Result<BlockWeights>;

    fn next(&mut self) -> Option<Result<BlockWeights>> {
        if self.next == self.len {
            return None;
        }
        // A reader that stopped after its error has nothing more: the error came first.
        let weights = self.readers[self.next % LOADERS].recv().ok()?;
        self.next += 1;
        Some(weights)
    }
}

/// Runs a stage to completion; see the module docs.
pub fn run_stage(spec: &StageSpec, io: &mut dyn StageIo) -> Result<StageTimings> {
    let resident_budget = resident_budget(spec)?;
    let checkpoint = Checkpoint::open(&spec.model)?;
    std::thread::scope(|scope| run_stage_in(scope, spec, &checkpoint, io, resident_budget))
}

/// Results serialized on threads of their own (about 100 MB per block of Llama-3-8B, 2 GB for its
/// tail) and handed to [`StageIo::upload`] as they become ready, so that neither serializing nor
/// sending holds up the device. The order of delivery does not matter: results are assembled by
/// their block index.
struct Deliveries<'scope> {
    serializing: Vec<std::thread::ScopedJoinHandle<'scope, Result<StageResult>>>,
}

impl<'scope> Deliveries<'scope> {
    fn start<'env>(&mut self, scope: &'scope std::thread::Scope<'scope, 'env>, work: impl FnOnce() -> Result<StageResult> + Send + 'scope) {
        self.serializing.push(scope.spawn(work));
    }

    /// Uploads every result whose serialization has finished; with `wait`, every result.
    fn deliver(&mut self, io: &mut dyn StageIo, wait: bool) -> Result<()> {
        let mut i = 0;
        while i < self.serializing.len() {
            if wait || self.serializing[i].is_finished() {
                // A panic there is a bug: let it surface as one.
                let result = self.serializing.remove(i).join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
                io.upload(result)?;
            } else {
                i += 1;
            }
        }
        Ok(())
    }
}

fn run_stage_in<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    spec: &'env StageSpec,
    checkpoint: &'env Checkpoint,
    io: &mut dyn StageIo,
    resident_budget: u64,
) -> Result<StageTimings> {
    let mut t = StageTimings::default();
    let mut clock = Instant::now();
    // Seconds since the last lap.
    let mut lap = move || {
        let now = Instant::now();
        let s = (now - clock).as_secs_f64();
        clock = now;
        s
    };
    let (config, arch) = (checkpoint.config(), checkpoint.arch());
    let compute = spec.compute_dtype(arch);
    let options = spec.awq_options();
    check_quantizable(arch, config, options.spec.group_size)?;
    if spec.blocks.end > config.n_blocks || spec.blocks.start > spec.blocks.end {
        return Err(Error::Input(format!("stage blocks {:?} outside the model's {} blocks", spec.blocks, config.n_blocks)));
    }
    // Kernels compile while the calibration set and the first blocks are read (errors surface at
    // first use, where they name the op).
    let device = spec.device;
    scope.spawn(move || {
        let start = Instant::now();
        let prepared = device.prepare();
        tracing::debug!(%device, "kernels ready in {:.2} s", start.elapsed().as_secs_f64());
        prepared
    });
    let calib = match options.method {
        Method::Awq => Some(calibration_set(spec, checkpoint)?),
        Method::Rtn => None,
    };
    let calibration = calib.as_ref().map_or(serde_json::Value::Null, |c| {
        json!({ "rows": c.rows.len(), "seqlen": c.seqlen, "samples_used": c.samples_used, "samples_too_long": c.samples_too_long })
    });
    let mut deliveries = Deliveries { serializing: Vec::new() };
    // The tail (gigabytes for a large vocabulary: read, serialized, sent, staged and written by the
    // coordinator) starts at once in a stage no other stage waits for, which has the whole stage
    // to finish it (the last stage of a chain spends seconds waiting for its input); in a stage
    // with a next one, when its search starts, so that it competes neither with the forward pass
    // the next stage waits for nor with that pass's weight loads.
    let start_tail = |deliveries: &mut Deliveries<'scope>| {
        if spec.produce_tail {
            let report_json = json!({ "calibration": calibration }).to_string();
            deliveries.start(scope, move || {
                let start = Instant::now();
                let tensors = tail_tensors(checkpoint)?;
                let read_s = start.elapsed().as_secs_f64();
                let payload = serialize(&PathBuf::from("tail.safetensors"), &tensors, &Default::default())?;
                tracing::debug!("tail read in {read_s:.2} s, serialized after {:.2} s", start.elapsed().as_secs_f64());
                Ok(StageResult { block_idx: None, payload: Arc::new(payload), report_json })
            });
        }
    };
    // Starts serializing a finished block and delivers what is ready; returns the seconds spent.
    let upload_block = |io: &mut dyn StageIo, deliveries: &mut Deliveries<'scope>, block: crate::awq::QuantizedBlock| -> Result<f64> {
        let start = Instant::now();
        deliveries.start(scope, move || {
            let name = PathBuf::from(format!("block-{}.safetensors", block.block_idx));
            let payload = Arc::new(serialize(&name, &block.raw_tensors(arch)?, &Default::default())?);
            if let Some(kept) = &spec.keep {
                kept.keep(&spec.job_id, block.block_idx, payload.clone());
            }
            let report_json = serde_json::to_string(&block.report).expect("report serialises");
            Ok(StageResult { block_idx: Some(block.block_idx), payload, report_json })
        });
        deliveries.deliver(io, false)?;
        Ok(start.elapsed().as_secs_f64())
    };

    // The blocks; on a failure, what already finished is still delivered below.
    let todo: Vec<usize> = spec.blocks.clone().filter(|b| !spec.blocks_done.contains(b)).collect();
    if !spec.has_next || calib.is_none() {
        start_tail(&mut deliveries);
    }
    let searched = (|| -> Result<()> {
        match &calib {
            None => {
                for w in Prefetch::start(scope, checkpoint, todo, compute, spec.device, ReadAhead::Streaming) {
                    check_cancel(io, &spec.job_id)?;
                    let w = w?;
                    t.load_s += lap();
                    let _span = info_span!("block", block = w.block_idx).entered();
                    injected_fault(spec, w.block_idx)?;
                    let block = quantize_rtn(&w, options.spec)?;
                    t.search_s += lap();
                    t.upload_s += upload_block(io, &mut deliveries, block)?;
                    lap();
                }
            }
            Some(calib) => {
                let shape = BlockShape::of(checkpoint);
                let seq_len = calib.seqlen;
                let forward = |x: &Tensor, w: &BlockWeights| -> Result<Tensor> { Ok(block_forward(x, w, &shape, seq_len, false)?.0) };
                // The stage's own blocks are read from the start: while it waits for its input.
                let block_bytes = (checkpoint.block_elements() * compute.size_bytes()) as u64;
                let ahead = read_ahead(spec.blocks.len(), block_bytes, resident_budget);
                let range: Vec<usize> = spec.blocks.clone().collect();
                let mut weights = Prefetch::start(scope, checkpoint, range, compute, spec.device, ahead);
                // Phase 1: input.
                lap();
                let mut x = match spec.input {
                    StageInput::PreviousStage if spec.blocks.start > 0 => io.receive_input()?.into_dtype(compute).to_device(spec.device)?,
                    _ => {
                        let ids = calib.rows.concat();
                        let mut x = embeddings(checkpoint, &ids, compute, spec.device)?;
                        let before: Vec<usize> = (0..spec.blocks.start).collect();
                        for w in Prefetch::start(scope, checkpoint, before, compute, spec.device, ReadAhead::Streaming) {
                            check_cancel(io, &spec.job_id)?;
                            x = forward(&x, &w?)?;
                        }
                        x
                    }
                };
                t.input_s += lap();
                let expected = [calib.rows.len() * seq_len, config.hidden_size];
                if x.shape() != expected {
                    return Err(Error::Input(format!("stage input has shape {:?}, expected {expected:?}", x.shape())));
                }
                if spec.has_next {
                    // Phase 2: forward through the range, keeping the inputs of blocks still to do
                    // (and their weights, when they stay resident).
                    let mut inputs = Vec::new();
                    let mut kept = Vec::new();
                    for w in &mut weights {
                        check_cancel(io, &spec.job_id)?;
                        let w = w?;
                        let next = forward(&x, &w)?;
                        let input = std::mem::replace(&mut x, next);
                        if !spec.blocks_done.contains(&w.block_idx) {
                            inputs.push(input);
                            if ahead == ReadAhead::Resident {
                                kept.push(w);
                            }
                        }
                    }
                    t.forward_s += lap();
                    io.send_output(&x, seq_len)?;
                    t.send_s += lap();
                    drop(x);
                    // Phase 3: search and quantize.
                    start_tail(&mut deliveries);
                    let searched_weights: Box<dyn Iterator<Item = Result<BlockWeights>>> = match ahead {
                        ReadAhead::Resident => Box::new(kept.into_iter().map(Ok)),
                        ReadAhead::Streaming => Box::new(Prefetch::start(scope, checkpoint, todo, compute, spec.device, ahead)),
                    };
                    for (w, input) in searched_weights.zip(inputs) {
                        check_cancel(io, &spec.job_id)?;
                        let w = w?;
                        t.load_s += lap();
                        let _span = info_span!("block", block = w.block_idx).entered();
                        injected_fault(spec, w.block_idx)?;
                        let (block, _) = quantize_block(w, &input, &shape, seq_len, arch, config, &options)?;
                        t.search_s += lap();
                        t.upload_s += upload_block(io, &mut deliveries, block)?;
                        lap();
                    }
                } else {
                    // Phases 2 and 3 in one pass: nobody waits for this stage's output, and the search
                    // of each block computes the next block's input.
                    for w in weights {
                        check_cancel(io, &spec.job_id)?;
                        let w = w?;
                        t.load_s += lap();
                        if spec.blocks_done.contains(&w.block_idx) {
                            x = forward(&x, &w)?;
                            t.forward_s += lap();
                            continue;
                        }
                        let _span = info_span!("block", block = w.block_idx).entered();
                        injected_fault(spec, w.block_idx)?;
                        let (block, next) = quantize_block(w, &x, &shape, seq_len, arch, config, &options)?;
                        x = next;
                        t.search_s += lap();
                        t.upload_s += upload_block(io, &mut deliveries, block)?;
                        lap();
                    }
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = searched {
        // Blocks already searched are results like any other (a cancelled job drops them anyway).
        if !matches!(e, Error::Cancelled(_)) {
            let _ = deliveries.deliver(io, true).and_then(|()| io.flush());
        }
        return Err(e);
    }
    check_cancel(io, &spec.job_id)?;
    lap();
    // What is still serializing: the last blocks, the tail (of a stage without blocks to do, too).
    deliveries.deliver(io, true)?;
    io.flush()?;
    t.upload_s += lap();
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use awq_kernels::ops::{GroupSize, QuantSpec};
    use awq_model::safetensors::{self, RawTensor, SafetensorsFile};
    use awq_model::synthetic::{write_checkpoint, SyntheticSpec};

    /// Collects what a stage delivers and sends on; no cancellation.
    #[derive(Default)]
    struct Collect {
        uploaded: Vec<Option<usize>>,
        /// Block payloads by block index.
        payloads: std::collections::BTreeMap<usize, Arc<Vec<u8>>>,
        sent: Option<Vec<f32>>,
        flushed: bool,
    }

    impl StageIo for Collect {
        fn receive_input(&mut self) -> Result<Tensor> {
            unreachable!("the stage starts from the embeddings")
        }
        fn send_output(&mut self, x: &Tensor, _: usize) -> Result<()> {
            self.sent = Some(x.to_f32_vec()?);
            Ok(())
        }
        fn upload(&mut self, result: StageResult) -> Result<()> {
            self.uploaded.push(result.block_idx);
            if let Some(b) = result.block_idx {
                self.payloads.insert(b, result.payload);
            }
            Ok(())
        }
        fn flush(&mut self) -> Result<()> {
            self.flushed = true;
            Ok(())
        }
        fn cancelled(&self) -> bool {
            false
        }
    }

    fn spec(model: &std::path::Path, produce_tail: bool) -> StageSpec {
        StageSpec {
            job_id: "j".into(),
            model: model.into(),
            job: JobOptions {
                quant: QuantSpec { bits: 4, group_size: GroupSize::G64, zero_point: true },
                method: Method::Awq,
                calib: awq_job::CalibOptions { n_samples: 4, seqlen: 512, seed: 1 },
                calib_source: CalibSource::BuiltIn,
                engine_dtype: awq_job::EngineDtype::DeviceDefault,
                max_shard_bytes: 1 << 30,
            },
            blocks: 0..3,
            blocks_done: BTreeSet::new(),
            input: StageInput::Embeddings,
            has_next: false,
            produce_tail,
            device: Device::Cpu,
            resident_bytes: None,
            inject_fault_at_block: None,
            keep: None,
        }
    }

    #[test]
    fn every_block_and_the_tail_are_delivered_then_flushed() {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &SyntheticSpec::tiny_llama()).unwrap();
        let mut io = Collect::default();
        run_stage(&spec(dir.path(), true), &mut io).unwrap();
        let mut got = io.uploaded.clone();
        got.sort();
        assert_eq!(got, vec![None, Some(0), Some(1), Some(2)]);
        assert!(io.flushed);
    }

    #[test]
    fn blocks_searched_before_a_failing_block_are_still_delivered() {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &SyntheticSpec::tiny_llama()).unwrap();
        // A NaN in block 2's weights: reading that block fails, after blocks 0 and 1 were searched.
        let path = dir.path().join("model.safetensors");
        let mut tensors = SafetensorsFile::open(&path).unwrap().raw_tensors();
        let poisoned = tensors.iter_mut().find(|t| t.name == "model.layers.2.mlp.up_proj.weight").expect("tensor exists");
        let mut values = Tensor::from_le_bytes(DType::F16, &poisoned.shape, &poisoned.data).unwrap().to_f32_vec().unwrap();
        values[3] = f32::NAN;
        *poisoned = RawTensor::from_tensor(poisoned.name.clone(), &Tensor::from_f32_as(&poisoned.shape, values, DType::F16).unwrap()).unwrap();
        safetensors::write(&path, &tensors, &Default::default()).unwrap();

        let mut io = Collect::default();
        let err = run_stage(&spec(dir.path(), false), &mut io).unwrap_err();
        assert!(err.to_string().contains("model.layers.2.mlp.up_proj.weight"), "{err}");
        let mut got = io.uploaded.clone();
        got.sort();
        assert_eq!(got, vec![Some(0), Some(1)], "the blocks finished before the failure");
        assert!(io.flushed, "and their uploads were waited for");
    }

    #[test]
    fn weights_kept_on_the_device_give_the_same_bytes_as_weights_read_twice() {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &SyntheticSpec::tiny_llama()).unwrap();
        // A stage with a next one (forward, then the search) and a last stage (one fused pass),
        // each with its weights streamed (no budget) and resident (all of them fit).
        for has_next in [true, false] {
            let mut spec = spec(dir.path(), false);
            spec.blocks = 1..3;
            spec.has_next = has_next;
            let mut streamed = Collect::default();
            run_stage(&StageSpec { resident_bytes: Some(0), ..spec.clone() }, &mut streamed).unwrap();
            let mut resident = Collect::default();
            run_stage(&StageSpec { resident_bytes: Some(u64::MAX), ..spec }, &mut resident).unwrap();
            assert_eq!(streamed.payloads.keys().copied().collect::<Vec<_>>(), vec![1, 2], "has_next {has_next}");
            assert!(streamed.payloads == resident.payloads, "has_next {has_next}: block payloads differ");
            assert_eq!(streamed.sent.is_some(), has_next);
            assert!(streamed.sent == resident.sent, "has_next {has_next}: output activations differ");
        }
    }

    #[test]
    fn weights_stay_resident_only_when_the_whole_stage_fits() {
        assert_eq!(read_ahead(8, 100, 800), ReadAhead::Resident);
        assert_eq!(read_ahead(8, 100, 799), ReadAhead::Streaming);
        assert_eq!(read_ahead(8, 100, 0), ReadAhead::Streaming);
        assert_eq!(read_ahead(usize::MAX, u64::MAX, u64::MAX - 1), ReadAhead::Streaming, "no overflow");
    }
}
