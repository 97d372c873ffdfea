//! The inference engine of one replica: what to compute each step, where its KV lives, the forward
//! pass over the paged KV cache, which token comes next and what text it makes (DESIGN.md,
//! "Serving").
//!
//! - [`engine`]: the API the gateway uses ([`engine::EngineHandle`]: `start`, `submit` ->
//!   [`engine::RequestStream`] of [`engine::EngineEvent`]s, `stats`, `model`) and the engine loop
//!   thread that drives the pieces below.
//! - [`runner`]: [`runner::ModelRunner`], the model's weights and the KV cache tensors on their
//!   device; executes a step plan and returns the logits to sample and score.
//! - [`scheduler`]: continuous batching. [`scheduler::Scheduler`] holds the waiting and running
//!   requests; each [`step`](scheduler::Scheduler::step) returns a [`scheduler::StepPlan`] (per
//!   sequence: the positions to compute, their token ids, the block table, whether a token is
//!   sampled), a plain value the model runner executes. Token budget, chunked prefill, preemption by
//!   recompute, abort, a bounded waiting queue.
//! - [`kv_cache`]: [`kv_cache::KvCache`], the paged KV cache's bookkeeping (blocks, block tables,
//!   reference counts, prefix caching by hashing full blocks, LRU eviction). Block ids, never tensors.
//! - [`sampling`]: [`sampling::SamplingParams`] (checked once, errors naming the OpenAI field) and
//!   [`sampling::Sampler`], the CPU sampler of one request (penalties, temperature, top-k/p, min-p,
//!   seed, logprobs).
//! - [`detokenizer`]: [`detokenizer::Detokenizer`], incremental detokenization that never splits a
//!   UTF-8 character, and stop strings held back and cut (OpenAI semantics).
//! - [`wire`]: the engine's API as `awq.v1` messages (requests, events, refusals, the model's
//!   description, counters), for a gateway in another process than its replica.
//!
//! The engine loop (`engine/handle.rs`) drives them in this order:
//!
//! ```text
//! gateway: SamplingParams::new(raw)?; scheduler.add_request(Request { max_new_tokens:
//!          params.max_new_tokens(prompt_len, max_model_len), .. })?   (QueueFull -> 429)
//!          per request: Sampler::new(params, prompt), Detokenizer::new(tokenizer, prompt, skip, stop)
//!          client gone: scheduler.abort(id)                            (blocks freed at once)
//! loop:
//!   plan = scheduler.step()?                 // positions, token ids, block tables, sample flags
//!   logits = runner.execute(&plan)           // forward pass over the paged cache
//!   for each seq of plan with sample:        // one row of logits each
//!     s = sampler.sample(row)?               // token + logprobs
//!     stop = params.stop_for_token(s.token, eos_ids)          // EOS, stop_token_ids
//!     piece = detokenizer.push(s.token)? unless stop  // text (a stop token's never shows);
//!                                            // piece.stop: a stop string was found, text cut before it
//!     sampled.push(SampledToken { id, token: s.token, stop })  // StopString(piece.stop) if found
//!   for u in scheduler.on_step_done(&sampled)?: // appends, finishes (stop or length), frees blocks
//!     if u.finish is Some and not a stop string: text += detokenizer.finish()?.text
//!     stream piece (+ logprobs) and u.finish to the gateway
//! ```
//!
//! What this crate never knows: HTTP, JSON, SSE, chat templates or API keys (`gateway/` owns the
//! OpenAI API and maps [`Error`] to status codes). Devices and tensors appear only in [`runner`];
//! scheduler, cache bookkeeping, sampler and detokenizer are pure and deterministic given their
//! inputs (the sampler's randomness comes from a per-request seeded RNG), so they are tested
//! without a model.

pub mod detokenizer;
pub mod engine;
pub mod eval;
mod error;
pub mod kv_cache;
pub mod pipeline;
pub mod runner;
pub mod sampling;
pub mod scheduler;
pub mod wire;

pub use error::{Error, Result};

use std::fmt;

/// One request, as the gateway names it. A request is one sequence (OpenAI's `n` > 1 is not
/// supported), so the KV cache keys its block tables by this id too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why a sequence stopped generating; OpenAI's `finish_reason` is `"stop"`, `"length"` or (vLLM's)
/// `"abort"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The caller found a stop condition ([`StopCause`] says which, for vLLM's `stop_reason`).
    Stop(StopCause),
    /// `max_tokens` generated, or the model's maximum length reached.
    Length,
    /// Aborted (the client went away, or the engine gave up on it).
    Abort,
}

impl FinishReason {
    /// The OpenAI `finish_reason` string.
    pub fn as_openai_str(&self) -> &'static str {
        match self {
            FinishReason::Stop(_) => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// The stop condition that ended a sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopCause {
    /// The model's end-of-sequence token (not honoured with `ignore_eos`).
    Eos(u32),
    /// One of the request's `stop_token_ids`.
    StopToken(u32),
    /// One of the request's `stop` strings (the text is cut before it).
    StopString(String),
}
