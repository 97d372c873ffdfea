//! A replica pipelined over several workers (DESIGN.md, "Serving"): each stage holds a contiguous
//! range of decoder blocks ([`ModelRunner::load_stage_weights`](crate::runner::ModelRunner)) and
//! its own KV cache; the first stage runs the engine (scheduler, sampling, detokenizing) and, each
//! step, its blocks, then hands the step to [`NextStages`]: the stages after it, which run the same
//! plan over their blocks and return the last stage's logits. The steps are synchronous (one step
//! in the pipeline at a time): a pipeline spreads a model that one worker cannot hold, it does not
//! overlap steps.
//!
//! Every stage's cache holds the same block ids (the first stage's scheduler allocates them), so
//! the replica's capacity is the fewest blocks any stage holds ([`NextStages::n_cache_blocks`]).
//!
//! A step crosses the wire (`awq.v1` `ReplicaService.StageStep`, streamed both ways) through
//! [`step_to_wire`] / [`step_from_wire`] and its logits back through [`logits_to_wire`] /
//! [`logits_from_wire`]: one function each way, everything from the wire checked into the engine's
//! types. Hidden states and logits travel in chunks of at most [`CHUNK_BYTES`], and each receiver
//! bounds what it gathers by the step's plan (its tokens x the model's width; [`logits_bound`]), so
//! a message that lies about its size cannot make a stage hold more.

use std::ops::Range;

use awq_kernels::{Device, Tensor};
use awq_proto::v1 as pb;

use crate::engine::{cache_budget, EngineConfig};
use crate::kv_cache::BlockId;
use crate::runner::{ModelRunner, SeqLogits, StageOutput, StepLogits};
use crate::scheduler::{ScheduledSeq, StepPlan};
use crate::{Error, RequestId, Result};

/// The stages after the first one of a pipelined replica, as the first stage's engine reaches them
/// (a gRPC client in the worker; the stage runners themselves in tests).
pub trait NextStages: Send + 'static {
    /// The fewest KV-cache blocks any of these stages holds.
    fn n_cache_blocks(&mut self) -> Result<usize>;

    /// Runs `plan` through the next stages from `hidden` (this stage's output: `[tokens, hidden]`
    /// f32 of the plan's rows, on this stage's device) and returns the last stage's logits. `argmax_on_device`:
    /// one flag per scheduled sequence, as `ModelRunner::execute_picking` takes it. Errors: a
    /// stage's own, or `EngineStopped` for a stage that cannot be reached (the step's requests then
    /// end with an error, as for any failed step).
    fn forward(&mut self, plan: &StepPlan, argmax_on_device: &[bool], hidden: Tensor) -> Result<StepLogits>;
}

/// A stage after the first: its runner over its blocks with its own KV cache, and the stages after
/// it (none for the last). What a worker hosts for such a stage; its `ReplicaService` hands it the
/// steps that arrive.
pub struct LaterStage {
    runner: ModelRunner,
    next: Option<Box<dyn NextStages>>,
    /// The fewest KV blocks of this stage and the later ones.
    n_cache_blocks: usize,
}

impl LaterStage {
    /// Loads decoder blocks `blocks` of `config`'s model on its one device, with a KV cache of the
    /// blocks its budget holds (`kv_cache_bytes`, or as the engine sizes it), then asks `next` (the
    /// stages after it) for theirs. Blocking (the weights are read). Errors: as the engine's load;
    /// `InvalidConfig` for several devices or a range that starts at block 0 (the first stage runs
    /// the engine).
    pub fn load(
        config: &EngineConfig,
        blocks: Range<usize>,
        mut next: Option<Box<dyn NextStages>>,
    ) -> Result<LaterStage> {
        if blocks.start == 0 {
            return Err(Error::InvalidConfig {
                field: "blocks",
                expected: "a later stage's blocks (the first stage runs the engine)".into(),
                got: format!("{blocks:?}"),
            });
        }
        let checkpoint = config.open_checkpoint()?;
        let mut runner =
            ModelRunner::load_stage_weights(&checkpoint, &config.devices, config.tp, config.block_size, blocks)?;
        let (budget, block_bytes) = cache_budget(config, &checkpoint, &runner)?;
        let mut n_cache_blocks = (budget / block_bytes) as usize;
        if let Some(next) = &mut next {
            n_cache_blocks = n_cache_blocks.min(next.n_cache_blocks()?);
        }
        runner.allocate_cache(n_cache_blocks)?;
        Ok(LaterStage { runner, next, n_cache_blocks })
    }

    /// The fewest KV blocks of this stage and the later ones.
    pub fn n_cache_blocks(&self) -> usize {
        self.n_cache_blocks
    }

    /// The values of hidden states a step of `n_tokens` brings (what its sender may send at most).
    pub fn hidden_values(&self, n_tokens: usize) -> usize {
        n_tokens.saturating_mul(self.runner.hidden_size())
    }

    /// The width of the hidden states a step brings.
    pub fn hidden_size(&self) -> usize {
        self.runner.hidden_size()
    }

    /// The device of this stage's leader: where hidden states from the previous stage arrive when
    /// a link between GPUs carries them.
    pub fn device(&self) -> Device {
        self.runner.device()
    }

    /// One step from the previous stage's `hidden` (`[tokens, hidden]` f32, on any device) through
    /// this stage and the later ones: the last stage's logits.
    pub fn step(&mut self, plan: &StepPlan, argmax_on_device: &[bool], hidden: &Tensor) -> Result<StepLogits> {
        match (self.runner.execute_stage(plan, argmax_on_device, Some(hidden))?, &mut self.next) {
            (StageOutput::Logits(logits), _) => Ok(logits),
            (StageOutput::Hidden(hidden), Some(next)) => next.forward(plan, argmax_on_device, hidden),
            (StageOutput::Hidden(_), None) => Err(Error::InvalidConfig {
                field: "next_stage",
                expected: "the next stage of a stage that does not end the model".into(),
                got: "none".into(),
            }),
        }
    }
}

/// A malformed stage message: the field and what was wrong.
fn malformed(field: &str, detail: impl std::fmt::Display) -> Error {
    Error::InvalidParameter {
        field: field.to_string(),
        expected: "a well-formed awq.v1 stage message".into(),
        got: detail.to_string(),
    }
}

/// The most bytes of hidden states or logits one stage message carries.
pub const CHUNK_BYTES: usize = 4 << 20;

/// The largest vocabulary a stage's logits may claim (a bound on what a reply may make this side
/// hold: rows x vocabulary).
const MAX_VOCAB: usize = 1 << 24;

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// f32 values from little-endian bytes. Errors: a count of bytes that is not whole values.
pub fn f32_values(field: &str, bytes: &[u8]) -> Result<Vec<f32>> {
    if bytes.len() % 4 != 0 {
        return Err(malformed(field, format!("{} bytes, not whole f32 values", bytes.len())));
    }
    Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// `bytes` in chunks of at most [`CHUNK_BYTES`] (one empty chunk for none).
fn chunks(bytes: Vec<u8>) -> Vec<Vec<u8>> {
    match bytes.len() <= CHUNK_BYTES {
        true => vec![bytes],
        false => bytes.chunks(CHUNK_BYTES).map(<[u8]>::to_vec).collect(),
    }
}

/// The `StageStepCall` messages of one step for replica `replica`: the first with the plan, each
/// with the next chunk of `hidden`; `None`: the hidden states go over the stages' NCCL link, and
/// the one message says so.
pub fn step_to_wire(
    replica: pb::ReplicaRef,
    plan: &StepPlan,
    argmax_on_device: &[bool],
    hidden: Option<&[f32]>,
) -> Vec<pb::StageStepCall> {
    let seqs = plan
        .seqs
        .iter()
        .zip(argmax_on_device.iter().chain(std::iter::repeat(&false)))
        .map(|(s, &argmax)| pb::StageSeq {
            id: s.id.0,
            token_ids: s.token_ids.clone(),
            block_table: s.block_table.iter().map(|b| b.0).collect(),
            position_start: s.positions.start as u32,
            position_end: s.positions.end as u32,
            prompt_logprob_start: s.prompt_logprob_positions.start as u32,
            prompt_logprob_end: s.prompt_logprob_positions.end as u32,
            sample: s.sample,
            argmax_on_device: argmax,
        })
        .collect();
    let mut parts = chunks(hidden.map(f32_bytes).unwrap_or_default()).into_iter();
    let first = pb::StageStepCall {
        replica: Some(replica),
        seqs,
        hidden: parts.next().unwrap_or_default(),
        hidden_over_nccl: hidden.is_none(),
    };
    std::iter::once(first).chain(parts.map(|hidden| pb::StageStepCall { hidden, ..Default::default() })).collect()
}

/// A step's plan (its token count summed from the sequences) and argmax flags from the first
/// `StageStepCall` of a step (its hidden chunks are the caller's to gather, bounded by
/// `n_tokens` rows of the model's width, and read with [`f32_values`], or to receive over the
/// stages' NCCL link where `hidden_over_nccl` says so). Errors: a sequence whose
/// ranges are inverted, whose token ids do not match its positions, or whose prompt-scoring
/// positions fall outside them.
pub fn step_from_wire(first: &pb::StageStepCall) -> Result<(StepPlan, Vec<bool>)> {
    let mut seqs = Vec::with_capacity(first.seqs.len());
    let mut argmax = Vec::with_capacity(first.seqs.len());
    for (i, s) in first.seqs.iter().enumerate() {
        let field = |name: &str| format!("seqs[{i}].{name}");
        let (start, end) = (s.position_start as usize, s.position_end as usize);
        if start > end || s.token_ids.len() != end - start {
            return Err(malformed(
                &field("token_ids"),
                format!("{} ids for positions {start}..{end}", s.token_ids.len()),
            ));
        }
        let scoring = s.prompt_logprob_start as usize..s.prompt_logprob_end as usize;
        if scoring.start > scoring.end || (!scoring.is_empty() && (scoring.start < start || scoring.end > end)) {
            return Err(malformed(
                &field("prompt_logprob_start"),
                format!("{scoring:?} outside positions {start}..{end}"),
            ));
        }
        argmax.push(s.argmax_on_device);
        seqs.push(ScheduledSeq {
            id: RequestId(s.id),
            positions: start..end,
            token_ids: s.token_ids.clone(),
            block_table: s.block_table.iter().copied().map(BlockId).collect(),
            sample: s.sample,
            prompt_logprob_positions: scoring,
        });
    }
    let n_tokens = seqs.iter().map(|s| s.positions.len()).sum();
    Ok((StepPlan { seqs, n_tokens, preempted: Vec::new() }, argmax))
}

/// The last stage's logits on the wire: the first message with the rows of each sequence, each
/// with the next chunk of the logits.
pub fn logits_to_wire(logits: &StepLogits) -> Vec<pb::StageStepReply> {
    let seqs = logits
        .seqs
        .iter()
        .map(|s| pb::StageSeqLogits {
            prompt_rows_start: s.prompt_rows.start as u32,
            prompt_rows_end: s.prompt_rows.end as u32,
            sample_row: s.sample_row.map(|r| r as u32),
            argmax: s.argmax,
        })
        .collect();
    let mut parts = chunks(f32_bytes(&logits.logits)).into_iter();
    // The stage that sends it sets `step_seconds` (it knows when the step arrived).
    let first = pb::StageStepReply {
        vocab_size: logits.vocab_size as u32,
        seqs,
        logits: parts.next().unwrap_or_default(),
        step_seconds: 0.0,
    };
    std::iter::once(first).chain(parts.map(|logits| pb::StageStepReply { logits, ..Default::default() })).collect()
}

/// The most logits bytes the replies to `plan` may hold: one row per prompt-scoring position and
/// per sampled sequence whose token is not picked on the device, of `vocab_size` values.
pub fn logits_bound(plan: &StepPlan, argmax_on_device: &[bool], vocab_size: usize) -> Result<usize> {
    if vocab_size == 0 || vocab_size > MAX_VOCAB {
        return Err(malformed("vocab_size", format!("{vocab_size} is not in 1..={MAX_VOCAB}")));
    }
    let rows: usize = plan
        .seqs
        .iter()
        .zip(argmax_on_device.iter().chain(std::iter::repeat(&false)))
        .map(|(s, &on_device)| s.prompt_logprob_positions.len() + usize::from(s.sample && !on_device))
        .sum();
    Ok(rows * vocab_size * 4)
}

/// Logits from the first reply message and the logits bytes of all of them, checked: whole rows of
/// `vocab_size`, every sequence's rows among them.
pub fn logits_from_wire(first: pb::StageStepReply, bytes: &[u8]) -> Result<StepLogits> {
    let vocab_size = first.vocab_size as usize;
    let logits = f32_values("logits", bytes)?;
    if vocab_size == 0 || logits.len() % vocab_size != 0 {
        return Err(malformed("logits", format!("{} values in rows of {vocab_size}", logits.len())));
    }
    let rows = logits.len() / vocab_size;
    let mut seqs = Vec::with_capacity(first.seqs.len());
    for (i, s) in first.seqs.into_iter().enumerate() {
        let prompt_rows = s.prompt_rows_start as usize..s.prompt_rows_end as usize;
        let sample_row = s.sample_row.map(|r| r as usize);
        if prompt_rows.start > prompt_rows.end || prompt_rows.end > rows || sample_row.is_some_and(|r| r >= rows) {
            return Err(malformed(&format!("seqs[{i}]"), format!("rows {prompt_rows:?} / {sample_row:?} of {rows}")));
        }
        seqs.push(SeqLogits { prompt_rows, sample_row, argmax: s.argmax });
    }
    Ok(StepLogits { vocab_size, logits, seqs })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> StepPlan {
        let seq = |id, positions: std::ops::Range<usize>, scoring, sample| ScheduledSeq {
            id: RequestId(id),
            token_ids: positions.clone().map(|p| p as u32 * 7 + 1).collect(),
            positions,
            block_table: vec![BlockId(3), BlockId(0), BlockId(9)],
            sample,
            prompt_logprob_positions: scoring,
        };
        StepPlan { seqs: vec![seq(4, 0..5, 1..4, true), seq(11, 8..9, 0..0, true)], n_tokens: 6, preempted: vec![] }
    }

    /// Gathers the hidden bytes of a step's messages, as the receiving stage does.
    fn gathered(parts: &[pb::StageStepCall]) -> Vec<u8> {
        parts.iter().flat_map(|p| p.hidden.iter().copied()).collect()
    }

    #[test]
    fn a_step_and_its_logits_cross_the_wire_unchanged_and_bad_ones_are_named() {
        let replica = pb::ReplicaRef { deployment: "d".into(), replica: 1 };
        let hidden: Vec<f32> = (0..12).map(|i| i as f32 * -0.37 + 1e-7).collect();
        let parts = step_to_wire(replica.clone(), &plan(), &[false, true], Some(&hidden));
        assert_eq!(parts.len(), 1);
        assert!(!parts[0].hidden_over_nccl);
        let (got, argmax) = step_from_wire(&parts[0]).unwrap();
        assert_eq!((got.seqs, got.n_tokens), (plan().seqs, plan().n_tokens));
        assert_eq!(argmax, vec![false, true]);
        assert_eq!(f32_values("hidden", &gathered(&parts)).unwrap(), hidden);

        // Hidden states of more than a chunk travel in several messages, the plan in the first.
        let big: Vec<f32> = (0..CHUNK_BYTES / 4 * 2 + 3).map(|i| (i % 1000) as f32 * 0.5).collect();
        let parts = step_to_wire(replica.clone(), &plan(), &[false, true], Some(&big));
        assert_eq!(parts.len(), 3);
        assert!(parts[1].seqs.is_empty() && parts[1].replica.is_none());
        assert_eq!(f32_values("hidden", &gathered(&parts)).unwrap(), big);

        // Over the NCCL link: one message, the plan and the flag, no bytes.
        let over_nccl = step_to_wire(replica, &plan(), &[false, true], None);
        assert_eq!(over_nccl.len(), 1);
        assert!(over_nccl[0].hidden_over_nccl && over_nccl[0].hidden.is_empty());
        assert_eq!(step_from_wire(&over_nccl[0]).unwrap().0.seqs, plan().seqs);

        let bad = |f: fn(&mut pb::StageStepCall), field: &str| {
            let mut c = parts[0].clone();
            f(&mut c);
            let err = step_from_wire(&c).unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        };
        bad(|c| c.seqs[0].token_ids.pop().map(drop).unwrap_or(()), "seqs[0].token_ids");
        bad(|c| c.seqs[1].position_start = 10, "seqs[1].token_ids");
        bad(|c| c.seqs[0].prompt_logprob_end = 6, "seqs[0].prompt_logprob_start");
        assert!(f32_values("hidden", &[0; 5]).unwrap_err().to_string().contains("hidden"));

        let logits = StepLogits {
            vocab_size: 3,
            logits: vec![0.5, -1.0, 2.0, f32::MIN_POSITIVE, 3.5, -0.0],
            seqs: vec![
                SeqLogits { prompt_rows: 0..1, sample_row: Some(1), argmax: None },
                SeqLogits { prompt_rows: 2..2, sample_row: None, argmax: Some(2) },
            ],
        };
        let replies = logits_to_wire(&logits);
        let bytes: Vec<u8> = replies.iter().flat_map(|r| r.logits.iter().copied()).collect();
        let back = logits_from_wire(replies[0].clone(), &bytes).unwrap();
        assert_eq!((back.vocab_size, back.seqs.clone()), (logits.vocab_size, logits.seqs.clone()));
        assert!(back.logits.iter().zip(&logits.logits).all(|(a, b)| a.to_bits() == b.to_bits()));
        let mut first = replies[0].clone();
        first.seqs[0].sample_row = Some(2);
        assert!(logits_from_wire(first, &bytes).unwrap_err().to_string().contains("seqs[0]"));
        let mut first = replies[0].clone();
        first.vocab_size = 4;
        assert!(logits_from_wire(first, &bytes).unwrap_err().to_string().contains("logits"));
        // The plan's rows: seq 4 scores 3 prompt positions and samples; seq 11 is picked on the device.
        assert_eq!(logits_bound(&plan(), &[false, true], 10).unwrap(), 4 * 10 * 4);
        assert!(logits_bound(&plan(), &[false, true], 0).is_err());
    }
}
