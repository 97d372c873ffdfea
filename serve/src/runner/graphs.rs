//! Decode steps recorded as CUDA graphs (vLLM's "CUDA graph capture"), one per batch-size bucket.
//!
//! Why: a decode step of an 8B model issues some 400 kernels of a few microseconds each, and the
//! host takes longer to issue them one by one than the GPU takes to run them (6.3 ms per step at
//! one sequence, most of it launch and allocation overhead; BENCHMARKS.md). Replayed from an
//! `awq_kernels::Graph`, the same kernels cost one launch.
//!
//! How: a step where every sequence decodes one token (no prompt scoring) is padded to the next
//! bucket of rows (1, 2, 4, then multiples of 8 up to `max_num_seqs`) with rows of a spare
//! sequence whose one block is the cache's spare block (block `n_cache_blocks`, which no plan
//! names; its values are never read by a real sequence). Each bucket, and each context bucket (the
//! positions the attention kernel is cut for: 4096, then powers of two up to `max_model_len`), has
//! its inputs (token ids, and a `PagedBatch::fixed` of positions, slots and block tables padded to
//! `max_model_len`) in buffers that stay where they are; a step rewrites them and replays the graph.
//! The graph ends by writing the step's logits and their argmax into buffers shared by all graphs
//! (`logits`, `argmax`), which the step then reads: the argmax always (a few bytes), a logits row
//! only for a sequence whose sampler needs it.
//!
//! The first step of a bucket runs its kernels directly (which also loads every module and
//! allocates what the kernels allocate lazily), then records them for the next steps. Should a
//! recording fail, decode steps run directly from then on, with one warning in the log.

use std::collections::HashMap;
use std::time::Instant;

use awq_kernels::ops::{self, FixedLayout, PagedBatch, PagedSeq};
use awq_kernels::{Graph, Indices, Tensor};

use super::rank::{RankRunner, LOGITS};
use super::{SeqLogits, StepLogits};
use crate::scheduler::StepPlan;
use crate::{Error, Result};

/// The smallest context bucket: shorter contexts share one graph per row bucket (the attention
/// kernel's empty partitions cost little next to a graph more per bucket).
const MIN_CONTEXT_BUCKET: usize = 4096;

/// The recorded decode steps of one runner, and the buffers they share.
pub(super) struct DecodeGraphs {
    /// Row counts steps are padded to, ascending.
    row_buckets: Vec<usize>,
    max_model_len: usize,
    /// Entries of each sequence's block table in a recorded batch: enough for `max_model_len`.
    table_len: usize,
    recorded: HashMap<Bucket, Recorded>,
    /// `[largest row bucket, vocab]` logits of the last replay (its first rows), in the runner's dtype.
    logits: Tensor,
    /// The argmax of each of those rows.
    argmax: Indices,
    /// Set when a recording failed: decode steps then run directly.
    failed: bool,
}

/// What a recorded step is padded to: rows, and the positions its attention is cut for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Bucket {
    rows: usize,
    max_context: usize,
}

/// One bucket's graph and the inputs it reads.
struct Recorded {
    graph: Graph,
    ids: Indices,
    batch: PagedBatch,
}

impl DecodeGraphs {
    /// Forgets every recorded step (they name buffers that are about to change: the KV cache).
    pub(super) fn clear(&mut self) {
        self.recorded.clear();
    }
}

/// 1, 2, 4, then every multiple of 8, up to the first that holds `max_rows`.
fn row_buckets(max_rows: usize) -> Vec<usize> {
    let (mut buckets, mut next) = (vec![1], 2);
    while buckets.last().is_some_and(|&b| b < max_rows) {
        buckets.push(next);
        next = if next < 8 { next * 2 } else { next + 8 };
    }
    buckets
}

impl RankRunner {
    /// From now on, records decode steps of up to `max_num_seqs` sequences of up to
    /// `max_model_len` positions as CUDA graphs and replays them (see the module docs); nothing on
    /// the CPU. Takes `[max_num_seqs, vocab]` logits and a few buffers of device memory now, and
    /// each recording its activations in the driver's graph memory pool. Errors: `Kernel` (the
    /// device's).
    pub(super) fn enable_decode_graphs(&mut self, max_model_len: usize, max_num_seqs: usize) -> Result<()> {
        // Recorded steps run the whole model, embeddings to logits (not a pipeline stage's part),
        // on a GPU, with an all-reduce a graph can record.
        if !self.can_record() {
            return Ok(());
        }
        let kernel = |e: awq_kernels::Error| Error::Kernel { block_idx: None, cause: Box::new(e) };
        let row_buckets = row_buckets(max_num_seqs.max(1));
        let max_rows = *row_buckets.last().expect("at least one bucket");
        self.graphs = Some(DecodeGraphs {
            max_model_len,
            table_len: max_model_len.div_ceil(self.paged.block_size),
            recorded: HashMap::new(),
            // Only the leader writes logits.
            logits: Tensor::zeros_on(
                &[if self.has_head() { max_rows } else { 1 }, self.vocab_size],
                LOGITS,
                self.device,
            )
            .map_err(kernel)?,
            argmax: Indices::zeros(max_rows, self.device).map_err(kernel)?,
            failed: false,
            row_buckets,
        });
        Ok(())
    }

    /// How many decode steps are recorded now (one per bucket met so far).
    pub(super) fn recorded_decode_steps(&self) -> usize {
        self.graphs.as_ref().map_or(0, |g| g.recorded.len())
    }
}

/// What [`decode_step`] did with a step.
pub(super) enum GraphStep {
    /// Nothing: the step runs directly.
    NotServed,
    /// It ran through a graph; the leader's logits (another rank's `None`).
    Ran(Option<StepLogits>),
}

/// Runs `plan` through a recorded graph when it is a decode step that graphs serve (see the module
/// docs), recording one first when its bucket has none. `seqs` are the plan's sequences as the
/// attention sees them (checked by the caller). Every rank of a group decides the same way, so
/// their all-reduces meet.
pub(super) fn decode_step(
    runner: &mut RankRunner,
    plan: &StepPlan,
    seqs: &[PagedSeq<'_>],
    argmax_on_device: &[bool],
) -> Result<GraphStep> {
    let Some(graphs) = &runner.graphs else { return Ok(GraphStep::NotServed) };
    let decoding = plan.seqs.iter().all(|s| s.positions.len() == 1 && s.prompt_logprob_positions.is_empty());
    let rows = plan.seqs.len();
    let Some(&bucket_rows) = graphs.row_buckets.iter().find(|&&b| b >= rows) else { return Ok(GraphStep::NotServed) };
    if graphs.failed || !decoding || rows == 0 {
        return Ok(GraphStep::NotServed);
    }
    let longest = plan.seqs.iter().map(|s| s.positions.end).max().unwrap_or(1);
    if longest > graphs.max_model_len {
        return Ok(GraphStep::NotServed);
    }
    let bucket = Bucket {
        rows: bucket_rows,
        max_context: longest.next_power_of_two().max(MIN_CONTEXT_BUCKET).min(graphs.max_model_len),
    };
    let kernel = |e: awq_kernels::Error| Error::Kernel { block_idx: None, cause: Box::new(e) };

    // The step padded to the bucket: rows of a spare sequence at position 0 in the spare block.
    let spare = [runner.n_cache_blocks as u32];
    let mut padded: Vec<PagedSeq> = seqs.to_vec();
    padded.resize(bucket.rows, PagedSeq { block_table: &spare, first_position: 0, n_queries: 1 });
    let mut ids: Vec<u32> = plan.seqs.iter().map(|s| s.token_ids[0]).collect();
    ids.resize(bucket.rows, 0);

    // Taken out of the runner while its model runs (the recording borrows both).
    let mut graphs = runner.graphs.take().expect("checked above");
    let result = replay_or_record(runner, &mut graphs, bucket, &padded, &ids);
    runner.graphs = Some(graphs);
    result?;
    if !runner.has_head() {
        return Ok(GraphStep::Ran(None));
    }
    let vocab_size = runner.vocab_size;
    let graphs = runner.graphs.as_mut().expect("just put back");

    // Reading the argmax waits for the step.
    let argmax = graphs.argmax.read_back().map_err(kernel)?;
    let (mut logits, mut seq_logits) = (Vec::new(), Vec::with_capacity(rows));
    for (row, (s, &on_device)) in plan.seqs.iter().zip(argmax_on_device).enumerate() {
        let mut out = SeqLogits { prompt_rows: 0..0, sample_row: None, argmax: None };
        match (s.sample, on_device) {
            (false, _) => {}
            (true, true) => out.argmax = Some(argmax[row]),
            (true, false) => {
                out.sample_row = Some(logits.len() / vocab_size);
                logits.extend(graphs.logits.rows(row, row + 1).and_then(|r| r.to_f32_vec()).map_err(kernel)?);
            }
        }
        seq_logits.push(out);
    }
    Ok(GraphStep::Ran(Some(StepLogits { vocab_size, logits, seqs: seq_logits })))
}

/// Queues the step: a replay of `bucket`'s graph with its inputs rewritten, or, the first time, the
/// step run directly and then recorded.
fn replay_or_record(
    runner: &mut RankRunner,
    graphs: &mut DecodeGraphs,
    bucket: Bucket,
    seqs: &[PagedSeq<'_>],
    ids: &[u32],
) -> Result<()> {
    let kernel = |e: awq_kernels::Error| Error::Kernel { block_idx: None, cause: Box::new(e) };
    if let Some(rec) = graphs.recorded.get_mut(&bucket) {
        rec.ids.overwrite(ids).map_err(kernel)?;
        rec.batch.refill(seqs).map_err(kernel)?;
        return rec.graph.launch().map_err(kernel);
    }
    let layout = FixedLayout { rows: bucket.rows, table_len: graphs.table_len, max_context: bucket.max_context };
    let cache_blocks = runner.n_cache_blocks + runner.spare_blocks();
    let batch =
        PagedBatch::fixed(seqs, runner.paged.block_size, cache_blocks, layout, runner.device).map_err(kernel)?;
    let ids = Indices::new(ids.to_vec(), runner.device).map_err(kernel)?;
    forward_into(runner, graphs, &ids, &batch)?;
    let started = Instant::now();
    match Graph::record(runner.device, || forward_into(runner, graphs, &ids, &batch)) {
        Ok((graph, ())) => {
            tracing::debug!(
                rows = bucket.rows,
                max_context = bucket.max_context,
                ms = started.elapsed().as_secs_f64() * 1e3,
                "decode step recorded"
            );
            graphs.recorded.insert(bucket, Recorded { graph, ids, batch });
        }
        Err(e) => {
            tracing::warn!(error = %e, "recording a decode step as a CUDA graph failed; decode steps run without graphs");
            graphs.failed = true;
        }
    }
    Ok(())
}

/// The step's forward pass, ending (on the leader) in the shared `logits` and `argmax` buffers
/// (what is recorded).
fn forward_into(runner: &mut RankRunner, graphs: &mut DecodeGraphs, ids: &Indices, batch: &PagedBatch) -> Result<()> {
    let kernel = |e: awq_kernels::Error| Error::Kernel { block_idx: None, cause: Box::new(e) };
    let x = runner.embeddings(ids)?;
    let x = runner.run_blocks(x, batch)?;
    if !runner.has_head() {
        return Ok(());
    }
    let all = runner.logits(&x).map_err(kernel)?;
    graphs.logits.write_rows(0, &all).map_err(kernel)?;
    ops::argmax_rows_into(&all, &mut graphs.argmax).map_err(kernel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_buckets_are_vllms_capture_sizes() {
        assert_eq!(row_buckets(1), [1]);
        assert_eq!(row_buckets(3), [1, 2, 4]);
        assert_eq!(row_buckets(8), [1, 2, 4, 8]);
        assert_eq!(row_buckets(20), [1, 2, 4, 8, 16, 24]);
        assert_eq!(row_buckets(256).len(), 3 + 32);
    }
}
