//! The engine of one replica, as the gateway sees it: submit a tokenized request, receive its
//! tokens and text as events, abort it, read the replica's counters.
//!
//! [`EngineHandle`] is cheap to clone and `Send + Sync`; the engine itself runs on a thread of its
//! own (the loop in the crate header: scheduler -> model runner -> sampler -> detokenizer ->
//! scheduler), so the async side never blocks on a forward pass. Each submitted request gets a
//! [`RequestStream`]: an unbounded channel of [`EngineEvent`]s ending with exactly one
//! [`EngineEvent::Finished`] or [`EngineEvent::Error`]. Dropping the stream aborts the request
//! (a client that disconnects frees its KV blocks at the next step boundary, at once).
//!
//! What the gateway does before [`EngineHandle::submit`]: render the chat template, tokenize
//! (with [`ModelInfo`]'s tokenizer and BOS rule), check and build [`SamplingParams`]. What it maps
//! after: [`Error::QueueFull`] -> 429, [`Error::PromptTooLong`] / [`Error::EmptyPrompt`] /
//! [`Error::InvalidParameter`] -> 400, [`EngineEvent::Error`] -> an error event (the request
//! failed mid-way: a device fault), and [`EngineStats`] -> /metrics.

mod handle;

use std::sync::Arc;

pub use handle::{EngineConfig, EngineHandle, KeptTensors, DEFAULT_CPU_KV_CACHE_BYTES};
pub(crate) use handle::cache_budget;

use crate::sampling::{SamplingParams, TokenLogprob};
use crate::{FinishReason, RequestId};

/// What a request asks the engine for: the prompt already tokenized.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// `Some(n)`: the logprob of every prompt token after the first (and the `n` most likely
    /// tokens there), for `echo` with `logprobs` (lm-evaluation-harness scores this way).
    pub prompt_logprobs: Option<usize>,
}

/// One generated token, with its logprobs when the request asked for them.
#[derive(Clone, Debug, PartialEq)]
pub struct GeneratedToken {
    pub id: u32,
    pub logprob: Option<f32>,
    pub top_logprobs: Vec<TokenLogprob>,
}

/// A prompt token as scored by the model (`echo` with `logprobs`): its logprob given the tokens
/// before it, and the `logprobs` most likely tokens at that position (what lm-evaluation-harness
/// compares to tell whether the prompt's continuation is the greedy one).
#[derive(Clone, Debug, PartialEq)]
pub struct PromptToken {
    pub token: u32,
    pub logprob: f32,
    pub top_logprobs: Vec<TokenLogprob>,
}

/// Token counts of a finished request (OpenAI's `usage`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
}

/// What happens to a request, in order: [`EngineEvent::PromptLogprobs`] once when asked (before
/// the first token), then [`EngineEvent::Tokens`] as tokens are generated, then exactly one of
/// [`EngineEvent::Finished`] or [`EngineEvent::Error`].
#[derive(Clone, Debug, PartialEq)]
pub enum EngineEvent {
    /// Logprobs of prompt positions 1.. (position 0 has none: `None` first, as OpenAI's echo).
    PromptLogprobs(Vec<Option<PromptToken>>),
    /// New tokens and the text they completed (may be empty while a UTF-8 character or a possible
    /// stop string is held back).
    Tokens { tokens: Vec<GeneratedToken>, text: String },
    /// The end: the last text held back (if any), why it stopped, and the counts.
    Finished { text: String, reason: FinishReason, usage: Usage },
    /// The request failed inside the engine (a device fault); nothing more follows.
    Error(String),
}

/// The model a replica serves, for the gateway's `/v1/models`, tokenization and chat templates.
#[derive(Clone)]
pub struct ModelInfo {
    /// The name clients use (`--served-model-name`, else the model directory).
    pub name: String,
    /// Prompt plus generated tokens, at most.
    pub max_model_len: usize,
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    /// Whether a BOS token goes in front of a prompt (tokenizer_config.json's `add_bos_token`).
    pub add_bos_token: bool,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Token ids that end generation (config and generation_config's `eos_token_id`s).
    pub eos_token_ids: Vec<u32>,
    /// tokenizer_config.json's `chat_template`, when the model has one.
    pub chat_template: Option<String>,
}

/// The replica's counters, for /metrics (vLLM's names under `awq:`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EngineStats {
    pub num_requests_running: usize,
    pub num_requests_waiting: usize,
    /// Fraction of KV blocks in use, 0..=1.
    pub kv_cache_usage: f64,
    pub prompt_tokens_total: u64,
    pub generation_tokens_total: u64,
    pub prefix_cache_queries_tokens: u64,
    pub prefix_cache_hits_tokens: u64,
    pub num_preemptions_total: u64,
    /// KV capacity: tokens, and sequences of `max_model_len` that fit at once.
    pub kv_capacity_tokens: usize,
}

/// The events of one request; dropping it aborts the request.
pub struct RequestStream {
    pub id: RequestId,
    pub events: tokio::sync::mpsc::UnboundedReceiver<EngineEvent>,
    /// Aborts the request when dropped (set by the engine; `None` once finished).
    pub(crate) abort_on_drop: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl RequestStream {
    /// A stream whose events come from elsewhere than this process's engine (the gateway's
    /// `RemoteReplica`: a replica in another process, over `ReplicaService`); `abort_on_drop` runs
    /// when the stream is dropped, and should stop the request wherever it runs.
    pub fn new(
        id: RequestId,
        events: tokio::sync::mpsc::UnboundedReceiver<EngineEvent>,
        abort_on_drop: impl FnOnce() + Send + Sync + 'static,
    ) -> RequestStream {
        RequestStream { id, events, abort_on_drop: Some(Box::new(abort_on_drop)) }
    }

    /// The next event; `None` after the last one.
    pub async fn next(&mut self) -> Option<EngineEvent> {
        self.events.recv().await
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if let Some(abort) = self.abort_on_drop.take() {
            abort();
        }
    }
}

#[cfg(test)]
mod tests;
