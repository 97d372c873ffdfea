//! Continuous batching: which tokens of which requests the model computes each step.
//!
//! [`Scheduler`] holds the waiting queue (bounded: [`Error::QueueFull`] becomes HTTP 429) and the
//! running set, and owns the [`KvCache`] bookkeeping. Each [`Scheduler::step`] returns a
//! [`StepPlan`]: for every scheduled sequence the positions to compute (a prefill chunk, or the one
//! token of a decode), their token ids, its block table, and whether a token is sampled from the
//! step's last position (only once every known token of the sequence is computed). The model
//! runner executes the plan; the engine reports sampled tokens (and stop conditions it found) to
//! [`Scheduler::on_step_done`], which appends them, finishes sequences and frees their blocks.
//!
//! Policy, per step, under `max_num_batched_tokens` and `max_num_seqs`: running decodes first, then
//! running prefills in arrival order, each taking a chunk of the remaining token budget (chunked
//! prefill: a long prompt never stalls running decodes), then waiting requests first come, first
//! served (the head blocks the queue, so nothing starves), unless a preemption happened this step.
//! When the cache cannot give a running sequence its slots, the most recently arrived running
//! sequence is preempted by recompute: its blocks are freed, it returns to the front of the waiting
//! queue and later recomputes prompt + generated tokens (through the prefix cache when its blocks
//! survived). A sequence's state is `tokens` (prompt + generated) and `n_computed` (tokens whose KV
//! is in the cache), as in vLLM v1's `scheduler.py`, which this follows; the plan is a plain value
//! like its `SchedulerOutput`. Not here: sampling, stop strings, tokenization, the forward pass,
//! time (no clock: the caller decides when to step).

use std::collections::{HashMap, VecDeque};
use std::ops::Range;

use crate::kv_cache::{BlockId, KvCache, KvCacheConfig, KvCacheStats, PrefixLookup};
use crate::{Error, FinishReason, RequestId, Result, StopCause};

/// Limits of one engine; checked by [`Scheduler::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Sequences running at once (vLLM's `max_num_seqs`).
    pub max_num_seqs: usize,
    /// Tokens computed per step over all sequences (vLLM's `max_num_batched_tokens`); at least
    /// `max_num_seqs`, so every running decode fits in one step.
    pub max_num_batched_tokens: usize,
    /// Prompt + generated tokens of one sequence; at most the cache's capacity, so a sequence alone
    /// always fits and preemption always makes progress.
    pub max_model_len: usize,
    /// Requests waiting to be scheduled before `add_request` answers `QueueFull` (preempted
    /// sequences go back regardless: they were accepted already).
    pub max_waiting: usize,
    pub kv_cache: KvCacheConfig,
}

/// A request as the scheduler sees it: token ids and a length limit (sampling lives elsewhere).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub id: RequestId,
    pub prompt: Vec<u32>,
    /// Most tokens to generate (OpenAI `max_tokens`); also stopped at `max_model_len`.
    pub max_new_tokens: usize,
    /// Whether the runner must score every prompt token (`echo` with `logprobs`): such a request
    /// computes its whole prompt, never taking it from the prefix cache.
    pub prompt_logprobs: bool,
}

/// What one step computes. Empty when nothing can run; then no `on_step_done` is expected.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepPlan {
    pub seqs: Vec<ScheduledSeq>,
    /// Tokens computed this step over all sequences (at most `max_num_batched_tokens`).
    pub n_tokens: usize,
    /// Sequences preempted by this step (their blocks were freed; they will recompute).
    pub preempted: Vec<RequestId>,
}

impl StepPlan {
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

/// One sequence's share of a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub id: RequestId,
    /// Positions computed this step; attention covers `0..positions.end` (earlier ones are cached).
    pub positions: Range<usize>,
    /// The token ids at `positions`.
    pub token_ids: Vec<u32>,
    /// Where the sequence's KV lives (see [`crate::kv_cache::slot_of`]); covers `0..positions.end`.
    pub block_table: Vec<BlockId>,
    /// Whether the logits of the last position are sampled into a new token.
    pub sample: bool,
    /// Positions whose logits score the next prompt token (`echo` with `logprobs`); empty otherwise.
    pub prompt_logprob_positions: Range<usize>,
}

/// A token the engine sampled for a scheduled sequence, with the stop condition it found (EOS, a
/// stop token id, a stop string in the detokenized text), if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SampledToken {
    pub id: RequestId,
    pub token: u32,
    pub stop: Option<StopCause>,
}

/// What `on_step_done` did with a sampled token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqUpdate {
    pub id: RequestId,
    pub token: u32,
    /// Tokens generated so far, this one included.
    pub n_generated: usize,
    /// Set when the sequence ended with this token; its blocks are already freed.
    pub finish: Option<FinishReason>,
}

/// Counts for metrics (vLLM's `num_requests_running`, `num_requests_waiting`, `num_preemptions`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SchedulerStats {
    pub n_running: usize,
    pub n_waiting: usize,
    pub n_preemptions: u64,
    pub kv_cache: KvCacheStats,
}

#[derive(Debug)]
struct Sequence {
    /// Admission order; orders `running` and picks preemption victims.
    arrival: u64,
    tokens: Vec<u32>,
    prompt_len: usize,
    max_new_tokens: usize,
    n_computed: usize,
    prompt_logprobs: bool,
    /// Prompt positions whose scoring logits were already produced (kept across preemption).
    n_prompt_positions_scored: usize,
}

impl Sequence {
    fn n_generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    fn n_uncomputed(&self) -> usize {
        self.tokens.len() - self.n_computed
    }

    /// The prompt positions whose logits score a prompt token (all but the last).
    fn scoring_positions(&self, positions: &Range<usize>) -> Range<usize> {
        if !self.prompt_logprobs {
            return 0..0;
        }
        let start = positions.start.max(self.n_prompt_positions_scored);
        start..positions.end.min(self.prompt_len - 1).max(start)
    }

    fn prefix_lookup(&self) -> PrefixLookup {
        match self.prompt_logprobs && self.n_prompt_positions_scored < self.prompt_len - 1 {
            true => PrefixLookup::Skip,
            false => PrefixLookup::Use,
        }
    }
}

/// One scheduled entry of the step in flight.
#[derive(Clone, Copy, Debug)]
struct Scheduled {
    id: RequestId,
    n_new: usize,
    sample: bool,
}

/// The continuous-batching scheduler of one replica (see the module docs).
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    kv: KvCache,
    seqs: HashMap<RequestId, Sequence>,
    /// Front first; preempted sequences return to the front.
    waiting: VecDeque<RequestId>,
    /// Ascending arrival: the last is the preemption victim.
    running: Vec<RequestId>,
    next_arrival: u64,
    in_flight: Option<Vec<Scheduled>>,
    n_preemptions: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Result<Scheduler> {
        let bad =
            |field, expected: String, got: usize| Err(Error::InvalidConfig { field, expected, got: got.to_string() });
        if config.max_num_seqs == 0 {
            return bad("max_num_seqs", "at least 1".into(), 0);
        }
        if config.max_num_batched_tokens < config.max_num_seqs {
            let expected = format!("at least max_num_seqs ({})", config.max_num_seqs);
            return bad("max_num_batched_tokens", expected, config.max_num_batched_tokens);
        }
        let capacity = config.kv_cache.capacity_tokens();
        if config.max_model_len < 2 || config.max_model_len > capacity {
            let expected = format!("in [2, {capacity}] (the KV cache's capacity in tokens)");
            return bad("max_model_len", expected, config.max_model_len);
        }
        if config.max_waiting == 0 {
            return bad("max_waiting", "at least 1".into(), 0);
        }
        Ok(Scheduler {
            config,
            kv: KvCache::new(config.kv_cache)?,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_arrival: 0,
            in_flight: None,
            n_preemptions: 0,
        })
    }

    pub fn config(&self) -> SchedulerConfig {
        self.config
    }

    /// Queues a request. Errors: `QueueFull` (try later), `EmptyPrompt`, `PromptTooLong` (no room
    /// for one generated token), `InvalidParameter` (`max_tokens` of 0), `DuplicateRequest`.
    pub fn add_request(&mut self, request: Request) -> Result<()> {
        let prompt_len = request.prompt.len();
        if prompt_len == 0 {
            return Err(Error::EmptyPrompt);
        }
        if prompt_len >= self.config.max_model_len {
            return Err(Error::PromptTooLong { prompt_len, max_model_len: self.config.max_model_len });
        }
        if request.max_new_tokens == 0 {
            return Err(Error::InvalidParameter {
                field: "max_tokens".into(),
                expected: "at least 1".into(),
                got: "0".into(),
            });
        }
        // An id still in the step in flight (aborted meanwhile) would receive that step's results.
        let in_flight = self.in_flight.iter().flatten().any(|e| e.id == request.id);
        if self.seqs.contains_key(&request.id) || in_flight {
            return Err(Error::DuplicateRequest(request.id));
        }
        if self.waiting.len() >= self.config.max_waiting {
            return Err(Error::QueueFull { max_waiting: self.config.max_waiting });
        }
        let seq = Sequence {
            arrival: self.next_arrival,
            tokens: request.prompt,
            prompt_len,
            max_new_tokens: request.max_new_tokens,
            n_computed: 0,
            prompt_logprobs: request.prompt_logprobs,
            n_prompt_positions_scored: 0,
        };
        self.next_arrival += 1;
        self.seqs.insert(request.id, seq);
        self.waiting.push_back(request.id);
        Ok(())
    }

    /// Removes a request wherever it is (a client disconnect) and frees its blocks at once. Safe
    /// while its step is in flight: blocks are only reused by a later step, and `on_step_done`
    /// ignores the request. Returns false if the request is unknown (finished already).
    pub fn abort(&mut self, id: RequestId) -> bool {
        if self.seqs.remove(&id).is_none() {
            return false;
        }
        self.kv.free(id);
        self.waiting.retain(|w| *w != id);
        self.running.retain(|r| *r != id);
        true
    }

    /// Decides the next step (see the module docs). Error: `StepInFlight` if the previous plan's
    /// results were not reported yet.
    pub fn step(&mut self) -> Result<StepPlan> {
        if self.in_flight.is_some() {
            return Err(Error::StepInFlight);
        }
        let mut batch =
            Batch { budget: self.config.max_num_batched_tokens, entries: Vec::new(), preempted: Vec::new() };
        let snapshot = self.running.clone();
        let decodes = snapshot.iter().filter(|id| self.seqs[*id].n_uncomputed() == 1);
        let prefills = snapshot.iter().filter(|id| self.seqs[*id].n_uncomputed() > 1);
        let order: Vec<RequestId> = decodes.chain(prefills).copied().collect();
        for id in order {
            if batch.budget == 0 {
                break;
            }
            // Preempted earlier in this step as another sequence's victim.
            if !self.running.contains(&id) {
                continue;
            }
            let seq = &self.seqs[&id];
            let (n_computed, n_uncomputed) = (seq.n_computed, seq.n_uncomputed());
            let n_new = n_uncomputed.min(batch.budget);
            if self.reserve_slots(id, n_computed + n_new, &mut batch) {
                batch.push(id, n_new, n_uncomputed == n_new);
            }
        }
        // Admitting after a preemption would only preempt again: memory is short this step.
        if batch.preempted.is_empty() {
            self.admit_waiting(&mut batch);
        }
        Ok(self.build_plan(batch))
    }

    /// Slots for `n_tokens` tokens of running sequence `id`, preempting the most recently arrived
    /// running sequences until they fit; false if `id` itself had to be preempted.
    fn reserve_slots(&mut self, id: RequestId, n_tokens: usize, batch: &mut Batch) -> bool {
        loop {
            match self.kv.ensure_slots(id, n_tokens) {
                Ok(()) => return true,
                Err(Error::OutOfBlocks { .. }) => {}
                Err(e) => unreachable!("running sequence {id} has a block table: {e}"),
            }
            let victim = *self.running.last().expect("the sequence asking is running");
            self.preempt(victim, batch);
            if victim == id {
                return false;
            }
        }
    }

    fn preempt(&mut self, victim: RequestId, batch: &mut Batch) {
        self.kv.free(victim);
        self.running.retain(|r| *r != victim);
        self.seqs.get_mut(&victim).expect("running sequences exist").n_computed = 0;
        self.waiting.push_front(victim);
        if let Some(i) = batch.entries.iter().position(|e| e.id == victim) {
            batch.budget += batch.entries.remove(i).n_new;
        }
        batch.preempted.push(victim);
        self.n_preemptions += 1;
    }

    /// Moves waiting requests to running, first come first served, while sequences, budget and
    /// blocks allow; the head that does not fit waits, and everything behind it.
    fn admit_waiting(&mut self, batch: &mut Batch) {
        while let Some(&id) = self.waiting.front() {
            if self.running.len() >= self.config.max_num_seqs || batch.budget == 0 {
                return;
            }
            let seq = self.seqs.get_mut(&id).expect("waiting sequences exist");
            let allocation = match self.kv.allocate(id, &seq.tokens, seq.prefix_lookup(), batch.budget) {
                Ok(a) => a,
                Err(Error::OutOfBlocks { .. }) => return,
                Err(e) => unreachable!("waiting sequence {id} holds no blocks: {e}"),
            };
            seq.n_computed = allocation.n_cached_tokens;
            let sample = seq.n_uncomputed() == allocation.n_new_tokens;
            let arrival = seq.arrival;
            self.waiting.pop_front();
            let at = self.running.partition_point(|r| self.seqs[r].arrival < arrival);
            self.running.insert(at, id);
            batch.push(id, allocation.n_new_tokens, sample);
        }
    }

    fn build_plan(&mut self, batch: Batch) -> StepPlan {
        let mut plan = StepPlan { seqs: Vec::new(), n_tokens: 0, preempted: batch.preempted };
        for e in &batch.entries {
            let seq = &self.seqs[&e.id];
            let positions = seq.n_computed..seq.n_computed + e.n_new;
            plan.n_tokens += e.n_new;
            plan.seqs.push(ScheduledSeq {
                id: e.id,
                token_ids: seq.tokens[positions.clone()].to_vec(),
                block_table: self.kv.block_table(e.id).expect("scheduled sequences hold blocks").to_vec(),
                sample: e.sample,
                prompt_logprob_positions: seq.scoring_positions(&positions),
                positions,
            });
        }
        if !plan.seqs.is_empty() {
            self.in_flight = Some(batch.entries);
        }
        plan
    }

    /// Reports the step in flight as computed, with one [`SampledToken`] for every scheduled
    /// sequence that samples (tokens of requests aborted meanwhile are ignored). Appends each token,
    /// finishes a sequence on the caller's stop condition or on length, and frees its blocks.
    /// Errors (`NoStepInFlight`, `StepResultMismatch`) leave the step in flight unchanged.
    pub fn on_step_done(&mut self, sampled: &[SampledToken]) -> Result<Vec<SeqUpdate>> {
        let entries = self.in_flight.as_ref().ok_or(Error::NoStepInFlight)?;
        let mut tokens: HashMap<RequestId, &SampledToken> = HashMap::with_capacity(sampled.len());
        for s in sampled {
            let live = self.seqs.contains_key(&s.id);
            match entries.iter().find(|e| e.id == s.id) {
                _ if !live => continue,
                Some(e) if e.sample => {}
                _ => {
                    return Err(Error::StepResultMismatch {
                        id: s.id,
                        problem: "a token for a sequence that samples none",
                    })
                }
            }
            if tokens.insert(s.id, s).is_some() {
                return Err(Error::StepResultMismatch { id: s.id, problem: "two tokens for one sequence" });
            }
        }
        if let Some(e) =
            entries.iter().find(|e| e.sample && self.seqs.contains_key(&e.id) && !tokens.contains_key(&e.id))
        {
            return Err(Error::StepResultMismatch { id: e.id, problem: "no token for a sequence that samples" });
        }
        let entries = self.in_flight.take().expect("checked above");
        let mut updates = Vec::new();
        for e in entries {
            let Some(seq) = self.seqs.get_mut(&e.id) else { continue };
            let positions = seq.n_computed..seq.n_computed + e.n_new;
            seq.n_prompt_positions_scored = seq.n_prompt_positions_scored.max(seq.scoring_positions(&positions).end);
            seq.n_computed = positions.end;
            self.kv.cache_computed(e.id, &seq.tokens, seq.n_computed).expect("running sequences hold blocks");
            let Some(s) = tokens.get(&e.id) else { continue };
            seq.tokens.push(s.token);
            let finish = match &s.stop {
                Some(cause) => Some(FinishReason::Stop(cause.clone())),
                None if seq.n_generated() >= seq.max_new_tokens => Some(FinishReason::Length),
                None if seq.tokens.len() >= self.config.max_model_len => Some(FinishReason::Length),
                None => None,
            };
            updates.push(SeqUpdate {
                id: e.id,
                token: s.token,
                n_generated: seq.n_generated(),
                finish: finish.clone(),
            });
            if finish.is_some() {
                self.seqs.remove(&e.id);
                self.kv.free(e.id);
                self.running.retain(|r| *r != e.id);
            }
        }
        Ok(updates)
    }

    pub fn has_unfinished(&self) -> bool {
        !self.seqs.is_empty()
    }

    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            n_running: self.running.len(),
            n_waiting: self.waiting.len(),
            n_preemptions: self.n_preemptions,
            kv_cache: self.kv.stats(),
        }
    }

    #[cfg(test)]
    pub(crate) fn kv_cache(&self) -> &KvCache {
        &self.kv
    }
}

/// The step being built: remaining budget, entries in plan order, preemptions so far.
struct Batch {
    budget: usize,
    entries: Vec<Scheduled>,
    preempted: Vec<RequestId>,
}

impl Batch {
    fn push(&mut self, id: RequestId, n_new: usize, sample: bool) {
        self.budget -= n_new;
        self.entries.push(Scheduled { id, n_new, sample });
    }
}

#[cfg(test)]
mod tests;
