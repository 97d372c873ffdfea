//! The engine's one error type. Each variant holds facts (the field, the limit, the value given),
//! so the gateway can map it to an HTTP status in one place and the message reads as a sentence.
//!
//! Which variants a caller can meet: `add_request` -> `QueueFull` (HTTP 429 with Retry-After),
//! `PromptTooLong` (400), `InvalidParameter` / `EmptyPrompt` / `DuplicateRequest` (400);
//! `SamplingParams::new` -> `InvalidParameter` (400); `EngineHandle::submit` -> those of
//! `add_request` and `TokenOutOfVocabulary` (400), `EngineStopped` (503); `EngineHandle::start` ->
//! `Model`, `InvalidConfig`; the rest are engine-internal (500).

use crate::RequestId;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request parameter is out of range; `field` is the OpenAI field name (`stop[2]` for list items).
    #[error("{field} must be {expected}, got {got}")]
    InvalidParameter { field: String, expected: std::borrow::Cow<'static, str>, got: String },
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The prompt leaves no room for a generated token within the model's length.
    #[error(
        "the prompt has {prompt_len} tokens; this model's maximum length is {max_model_len} tokens, \
         prompt plus generated"
    )]
    PromptTooLong { prompt_len: usize, max_model_len: usize },
    /// The bounded waiting queue is full: try again later (HTTP 429).
    #[error("the engine is at capacity: {max_waiting} requests already wait to be scheduled")]
    QueueFull { max_waiting: usize },
    #[error("request {0} already exists")]
    DuplicateRequest(RequestId),
    #[error("request {0} is not known to the KV cache")]
    UnknownSequence(RequestId),
    /// The KV cache cannot give `needed` more blocks (`free` can be had, evictable cached ones included).
    /// The scheduler answers with preemption or waiting; nothing reaches a client.
    #[error("the KV cache is out of blocks: {needed} needed, {free} free")]
    OutOfBlocks { needed: usize, free: usize },
    /// An engine setting is inconsistent (`field` names the setting).
    #[error("engine configuration: {field} must be {expected}, got {got}")]
    InvalidConfig { field: &'static str, expected: String, got: String },
    /// `step` was called while the previous step's results were not reported yet.
    #[error("a step is already in flight: report its results with on_step_done first")]
    StepInFlight,
    /// `on_step_done` was called without a step in flight.
    #[error("no step is in flight")]
    NoStepInFlight,
    /// The results reported for a step do not match its plan (a bug in the engine loop).
    #[error("step results for request {id}: {problem}")]
    StepResultMismatch { id: RequestId, problem: &'static str },
    /// The model produced logits the sampler cannot use (NaN, +inf, or nothing finite).
    #[error("logits at token {index}: {problem}")]
    InvalidLogits { index: usize, problem: &'static str },
    #[error("tokenizer: {0}")]
    Tokenizer(#[source] tokenizers::Error),
    /// Loading the model failed (the checkpoint's error names the file and tensor).
    #[error("model: {0}")]
    Model(#[from] awq_model::Error),
    /// A kernel failed while the runner executed a step (`block_idx` when inside a block). The
    /// kernel's error is in the message (what a failed request reports), not chained as a source:
    /// an error chain would print it twice.
    #[error("model runner{}: {cause}", block_idx.map(|b| format!(", block {b}")).unwrap_or_default())]
    Kernel { block_idx: Option<usize>, cause: Box<awq_kernels::Error> },
    /// A plan the runner cannot execute: its token ids or block table do not cover its positions.
    /// A tensor-parallel rank's thread stopped (it panicked, or an earlier step left the group
    /// broken): the runner cannot run another step.
    #[error("tensor-parallel rank {rank} stopped: {reason}")]
    RankStopped { rank: usize, reason: String },
    #[error("step plan for request {id}: {detail}")]
    StepPlanInvalid { id: RequestId, detail: String },
    /// A prompt token id outside the model's vocabulary.
    #[error("prompt[{index}] is token id {token}, outside the vocabulary of {vocab_size}")]
    TokenOutOfVocabulary { index: usize, token: u32, vocab_size: usize },
    /// The engine loop has stopped (after a fault it could not contain, or at shutdown).
    #[error("the engine has stopped: {reason}")]
    EngineStopped { reason: String },
}

impl From<awq_kernels::Error> for Error {
    fn from(e: awq_kernels::Error) -> Error {
        Error::Kernel { block_idx: None, cause: Box::new(e) }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn invalid(field: impl Into<String>, expected: &'static str, got: impl std::fmt::Display) -> Error {
        Error::InvalidParameter { field: field.into(), expected: expected.into(), got: got.to_string() }
    }
}
