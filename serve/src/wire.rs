//! The engine's API on the wire (`awq.v1`'s `ReplicaService`): what a gateway sends a replica that
//! runs in another process, and what comes back. Each direction is one function, so the two ends
//! cannot disagree; everything from the wire is checked here into the engine's own types (a
//! request's sampling parameters by `SamplingParams::new`, exactly as for a local request).
//!
//! - a request: [`request_to_wire`] / [`request_from_wire`] (`GenerateCall`);
//! - its refusal before it starts (a full queue, a bad parameter): [`refusal_to_wire`] /
//!   [`refusal_from_wire`], so the gateway answers the same status as for a local engine;
//! - its events: [`event_to_wire`] / [`event_from_wire`] (`GenerateEvent`);
//! - the model, for tokenizing and templating at the gateway: [`describe`] / [`model_from_wire`]
//!   (`ModelDescription`, with the tokenizer's JSON);
//! - the counters: [`stats_to_wire`] / [`stats_from_wire`].

use std::sync::Arc;

use awq_proto::v1 as pb;
use pb::generate_event::{self, finished::StopCause as WireStop};

use crate::engine::{EngineEvent, EngineStats, GenerateRequest, GeneratedToken, ModelInfo, PromptToken, Usage};
use crate::sampling::{RawSamplingParams, SamplingParams, TokenLogprob};
use crate::{Error, FinishReason, Result, StopCause};

/// A malformed message from the wire: the field and what was wrong.
fn malformed(field: &str, detail: impl std::fmt::Display) -> Error {
    Error::InvalidParameter {
        field: field.to_string(),
        expected: "a well-formed awq.v1 message".into(),
        got: detail.to_string(),
    }
}

/// The `GenerateCall` of `request` for replica `replica` of `deployment`.
pub fn request_to_wire(deployment: &str, replica: u32, request: &GenerateRequest) -> pb::GenerateCall {
    let raw = request.params.to_raw();
    pb::GenerateCall {
        replica: Some(pb::ReplicaRef { deployment: deployment.to_string(), replica }),
        prompt: request.prompt.clone(),
        params: Some(pb::SamplingParams {
            temperature: raw.temperature,
            top_p: raw.top_p,
            top_k: raw.top_k,
            min_p: raw.min_p,
            seed: raw.seed,
            presence_penalty: raw.presence_penalty,
            frequency_penalty: raw.frequency_penalty,
            repetition_penalty: raw.repetition_penalty,
            max_tokens: raw.max_tokens,
            stop: raw.stop,
            stop_token_ids: raw.stop_token_ids,
            ignore_eos: raw.ignore_eos,
            logprobs: raw.logprobs,
            top_logprobs: raw.top_logprobs,
        }),
        prompt_logprobs: request.prompt_logprobs.map(|n| n as u32),
    }
}

/// The request a `GenerateCall` carries, checked as a local request is. Errors:
/// `InvalidParameter` naming the field.
pub fn request_from_wire(call: pb::GenerateCall) -> Result<GenerateRequest> {
    let p = call.params.unwrap_or_default();
    let params = SamplingParams::new(RawSamplingParams {
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k,
        min_p: p.min_p,
        seed: p.seed,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        repetition_penalty: p.repetition_penalty,
        max_tokens: p.max_tokens,
        stop: p.stop,
        stop_token_ids: p.stop_token_ids,
        ignore_eos: p.ignore_eos,
        logprobs: p.logprobs,
        top_logprobs: p.top_logprobs,
    })?;
    Ok(GenerateRequest { prompt: call.prompt, params, prompt_logprobs: call.prompt_logprobs.map(|n| n as usize) })
}

/// Why `submit` refused a request, as the first (and only) event of its call; `None` for an error
/// that is not a refusal of the request (the caller answers it as a fault).
pub fn refusal_to_wire(error: &Error) -> Option<pb::Refusal> {
    use pb::refusal::Kind;
    let refusal = |kind: Kind| pb::Refusal { kind: kind as i32, ..Default::default() };
    Some(match error {
        Error::InvalidParameter { field, expected, got } => pb::Refusal {
            field: field.clone(),
            expected: expected.to_string(),
            got: got.clone(),
            ..refusal(Kind::InvalidParameter)
        },
        Error::EmptyPrompt => refusal(Kind::EmptyPrompt),
        Error::PromptTooLong { prompt_len, max_model_len } => {
            pb::Refusal { count: *prompt_len as u64, limit: *max_model_len as u64, ..refusal(Kind::PromptTooLong) }
        }
        Error::QueueFull { max_waiting } => pb::Refusal { limit: *max_waiting as u64, ..refusal(Kind::QueueFull) },
        Error::TokenOutOfVocabulary { index, token, vocab_size } => pb::Refusal {
            count: *index as u64,
            token: *token,
            limit: *vocab_size as u64,
            ..refusal(Kind::TokenOutOfVocabulary)
        },
        Error::EngineStopped { reason } => pb::Refusal { reason: reason.clone(), ..refusal(Kind::EngineStopped) },
        _ => return None,
    })
}

/// The engine's error for a refusal from the wire.
pub fn refusal_from_wire(r: pb::Refusal) -> Error {
    use pb::refusal::Kind;
    let n = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    match Kind::try_from(r.kind).unwrap_or(Kind::Unspecified) {
        Kind::InvalidParameter => Error::InvalidParameter { field: r.field, expected: r.expected.into(), got: r.got },
        Kind::EmptyPrompt => Error::EmptyPrompt,
        Kind::PromptTooLong => Error::PromptTooLong { prompt_len: n(r.count), max_model_len: n(r.limit) },
        Kind::QueueFull => Error::QueueFull { max_waiting: n(r.limit) },
        Kind::TokenOutOfVocabulary => {
            Error::TokenOutOfVocabulary { index: n(r.count), token: r.token, vocab_size: n(r.limit) }
        }
        Kind::EngineStopped => Error::EngineStopped { reason: r.reason },
        Kind::Unspecified => Error::EngineStopped { reason: format!("the replica refused the request: {}", r.reason) },
    }
}

fn logprobs_to_wire(l: &[TokenLogprob]) -> Vec<pb::TokenLogprob> {
    l.iter().map(|t| pb::TokenLogprob { token: t.token, logprob: t.logprob }).collect()
}

fn logprobs_from_wire(l: Vec<pb::TokenLogprob>) -> Vec<TokenLogprob> {
    l.into_iter().map(|t| TokenLogprob { token: t.token, logprob: t.logprob }).collect()
}

/// An engine event on the wire.
pub fn event_to_wire(event: EngineEvent) -> pb::GenerateEvent {
    use generate_event::Event;
    let event = match event {
        EngineEvent::PromptLogprobs(tokens) => Event::PromptLogprobs(generate_event::PromptLogprobs {
            tokens: tokens
                .iter()
                .map(|t| match t {
                    None => pb::PromptToken::default(),
                    Some(t) => pb::PromptToken {
                        present: true,
                        token: t.token,
                        logprob: t.logprob,
                        top_logprobs: logprobs_to_wire(&t.top_logprobs),
                    },
                })
                .collect(),
        }),
        EngineEvent::Tokens { tokens, text } => Event::Tokens(generate_event::Tokens {
            tokens: tokens
                .iter()
                .map(|t| pb::GeneratedToken {
                    id: t.id,
                    logprob: t.logprob,
                    top_logprobs: logprobs_to_wire(&t.top_logprobs),
                })
                .collect(),
            text,
        }),
        EngineEvent::Finished { text, reason, usage } => {
            let (reason, stop_cause) = match reason {
                FinishReason::Stop(StopCause::Eos(t)) => (pb::FinishReason::Stop, Some(WireStop::Eos(t))),
                FinishReason::Stop(StopCause::StopToken(t)) => (pb::FinishReason::Stop, Some(WireStop::StopToken(t))),
                FinishReason::Stop(StopCause::StopString(s)) => (pb::FinishReason::Stop, Some(WireStop::StopString(s))),
                FinishReason::Length => (pb::FinishReason::Length, None),
                FinishReason::Abort => (pb::FinishReason::Abort, None),
            };
            let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
            Event::Finished(generate_event::Finished {
                text,
                reason: reason as i32,
                usage: Some(pb::Usage {
                    prompt_tokens: count(usage.prompt_tokens),
                    completion_tokens: count(usage.completion_tokens),
                    cached_tokens: count(usage.cached_tokens),
                }),
                stop_cause,
            })
        }
        EngineEvent::Error(e) => Event::Error(e),
    };
    pb::GenerateEvent { event: Some(event) }
}

/// What a `GenerateEvent` says: an engine event, or the request's refusal. Errors: a malformed
/// event (no event, an unknown finish reason).
pub fn event_from_wire(event: pb::GenerateEvent) -> Result<std::result::Result<EngineEvent, Error>> {
    use generate_event::Event;
    let Some(event) = event.event else { return Err(malformed("GenerateEvent.event", "none")) };
    Ok(Ok(match event {
        Event::Refused(r) => return Ok(Err(refusal_from_wire(r))),
        Event::Accepted(_) => return Err(malformed("GenerateEvent.accepted", "only a call's first event may be one")),
        Event::PromptLogprobs(p) => EngineEvent::PromptLogprobs(
            p.tokens
                .into_iter()
                .map(|t| {
                    t.present.then(|| PromptToken {
                        token: t.token,
                        logprob: t.logprob,
                        top_logprobs: logprobs_from_wire(t.top_logprobs),
                    })
                })
                .collect(),
        ),
        Event::Tokens(t) => EngineEvent::Tokens {
            tokens: t
                .tokens
                .into_iter()
                .map(|g| GeneratedToken {
                    id: g.id,
                    logprob: g.logprob,
                    top_logprobs: logprobs_from_wire(g.top_logprobs),
                })
                .collect(),
            text: t.text,
        },
        Event::Finished(f) => {
            let reason = match (pb::FinishReason::try_from(f.reason), f.stop_cause) {
                (Ok(pb::FinishReason::Stop), Some(WireStop::Eos(t))) => FinishReason::Stop(StopCause::Eos(t)),
                (Ok(pb::FinishReason::Stop), Some(WireStop::StopToken(t))) => {
                    FinishReason::Stop(StopCause::StopToken(t))
                }
                (Ok(pb::FinishReason::Stop), Some(WireStop::StopString(s))) => {
                    FinishReason::Stop(StopCause::StopString(s))
                }
                (Ok(pb::FinishReason::Length), _) => FinishReason::Length,
                (Ok(pb::FinishReason::Abort), _) => FinishReason::Abort,
                (reason, cause) => {
                    return Err(malformed("GenerateEvent.finished", format!("{reason:?} with {cause:?}")))
                }
            };
            let usage = f.usage.unwrap_or_default();
            EngineEvent::Finished {
                text: f.text,
                reason,
                usage: Usage {
                    prompt_tokens: usage.prompt_tokens as usize,
                    completion_tokens: usage.completion_tokens as usize,
                    cached_tokens: usage.cached_tokens as usize,
                },
            }
        }
        Event::Error(e) => EngineEvent::Error(e),
    }))
}

/// The refusal of a request as its call's one event.
pub fn refused_event(refusal: pb::Refusal) -> pb::GenerateEvent {
    pb::GenerateEvent { event: Some(generate_event::Event::Refused(refusal)) }
}

/// The first event of an accepted call (`GenerateEvent.Accepted`).
pub fn accepted_event() -> pb::GenerateEvent {
    pb::GenerateEvent { event: Some(generate_event::Event::Accepted(generate_event::Accepted {})) }
}

/// Whether `event` is [`accepted_event`]'s.
pub fn is_accepted(event: &pb::GenerateEvent) -> bool {
    matches!(event.event, Some(generate_event::Event::Accepted(_)))
}

/// What a gateway needs of `model` (see [`ModelDescription`](pb::ModelDescription)).
pub fn describe(model: &ModelInfo) -> pb::ModelDescription {
    pb::ModelDescription {
        name: model.name.clone(),
        max_model_len: u32::try_from(model.max_model_len).unwrap_or(u32::MAX),
        tokenizer_json: model.tokenizer.to_string(false).unwrap_or_default().into_bytes(),
        add_bos_token: model.add_bos_token,
        bos_token: model.bos_token.clone().unwrap_or_default(),
        eos_token: model.eos_token.clone().unwrap_or_default(),
        eos_token_ids: model.eos_token_ids.clone(),
        chat_template: model.chat_template.clone().unwrap_or_default(),
    }
}

/// The model a description names, its tokenizer rebuilt from its JSON. Errors: `Tokenizer`-like
/// `InvalidParameter` when the JSON is not a tokenizer.
pub fn model_from_wire(d: pb::ModelDescription) -> Result<ModelInfo> {
    // JSON first: `tokenizers` can panic on some malformed input it is handed as a string.
    let json: serde_json::Value = serde_json::from_slice(&d.tokenizer_json)
        .map_err(|e| malformed("ModelDescription.tokenizer_json", format!("not JSON: {e}")))?;
    let tokenizer: tokenizers::Tokenizer =
        serde_json::from_value(json).map_err(|e| malformed("ModelDescription.tokenizer_json", e))?;
    let some = |s: String| (!s.is_empty()).then_some(s);
    Ok(ModelInfo {
        name: d.name,
        max_model_len: d.max_model_len as usize,
        tokenizer: Arc::new(tokenizer),
        add_bos_token: d.add_bos_token,
        bos_token: some(d.bos_token),
        eos_token: some(d.eos_token),
        eos_token_ids: d.eos_token_ids,
        chat_template: some(d.chat_template),
    })
}

pub fn stats_to_wire(s: &EngineStats) -> pb::ReplicaStats {
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    pb::ReplicaStats {
        num_requests_running: count(s.num_requests_running),
        num_requests_waiting: count(s.num_requests_waiting),
        kv_cache_usage: s.kv_cache_usage,
        prompt_tokens_total: s.prompt_tokens_total,
        generation_tokens_total: s.generation_tokens_total,
        prefix_cache_queries_tokens: s.prefix_cache_queries_tokens,
        prefix_cache_hits_tokens: s.prefix_cache_hits_tokens,
        num_preemptions_total: s.num_preemptions_total,
        kv_capacity_tokens: s.kv_capacity_tokens as u64,
    }
}

pub fn stats_from_wire(s: &pb::ReplicaStats) -> EngineStats {
    EngineStats {
        num_requests_running: s.num_requests_running as usize,
        num_requests_waiting: s.num_requests_waiting as usize,
        kv_cache_usage: s.kv_cache_usage,
        prompt_tokens_total: s.prompt_tokens_total,
        generation_tokens_total: s.generation_tokens_total,
        prefix_cache_queries_tokens: s.prefix_cache_queries_tokens,
        prefix_cache_hits_tokens: s.prefix_cache_hits_tokens,
        num_preemptions_total: s.num_preemptions_total,
        kv_capacity_tokens: usize::try_from(s.kv_capacity_tokens).unwrap_or(usize::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_crosses_the_wire_unchanged() {
        let params = SamplingParams::new(RawSamplingParams {
            temperature: Some(0.7),
            top_p: Some(0.9),
            top_k: Some(40),
            min_p: Some(0.05),
            seed: Some(-3),
            presence_penalty: Some(0.5),
            frequency_penalty: Some(-0.25),
            repetition_penalty: Some(1.1),
            max_tokens: Some(17),
            stop: vec!["\n\n".into()],
            stop_token_ids: vec![2, 7],
            ignore_eos: true,
            logprobs: true,
            top_logprobs: Some(3),
        })
        .unwrap();
        for params in [params, SamplingParams::default()] {
            let request = GenerateRequest { prompt: vec![1, 5, 9], params, prompt_logprobs: Some(2) };
            let back = request_from_wire(request_to_wire("m", 1, &request)).unwrap();
            assert_eq!(
                (back.prompt, back.params, back.prompt_logprobs),
                (request.prompt, request.params, request.prompt_logprobs)
            );
        }
        // The far end checks what it receives.
        let mut call = request_to_wire(
            "m",
            0,
            &GenerateRequest { prompt: vec![1], params: SamplingParams::default(), prompt_logprobs: None },
        );
        call.params.as_mut().unwrap().temperature = Some(9.0);
        assert!(
            matches!(request_from_wire(call), Err(Error::InvalidParameter { field, .. }) if field == "temperature")
        );
    }

    #[test]
    fn events_and_refusals_cross_the_wire_unchanged() {
        let lp = |token, logprob| TokenLogprob { token, logprob };
        let events = [
            EngineEvent::PromptLogprobs(vec![
                None,
                Some(PromptToken { token: 4, logprob: -1.5, top_logprobs: vec![lp(4, -1.5), lp(9, -2.0)] }),
            ]),
            EngineEvent::Tokens {
                tokens: vec![GeneratedToken { id: 3, logprob: Some(-0.25), top_logprobs: vec![lp(3, -0.25)] }],
                text: "é".into(),
            },
            EngineEvent::Tokens {
                tokens: vec![GeneratedToken { id: 8, logprob: None, top_logprobs: vec![] }],
                text: String::new(),
            },
            EngineEvent::Finished {
                text: "x".into(),
                reason: FinishReason::Stop(StopCause::StopString("\n".into())),
                usage: Usage { prompt_tokens: 3, completion_tokens: 2, cached_tokens: 1 },
            },
            EngineEvent::Finished {
                text: String::new(),
                reason: FinishReason::Stop(StopCause::Eos(2)),
                usage: Usage::default(),
            },
            EngineEvent::Finished { text: String::new(), reason: FinishReason::Length, usage: Usage::default() },
            EngineEvent::Error("device lost".into()),
        ];
        for event in events {
            assert_eq!(event_from_wire(event_to_wire(event.clone())).unwrap().unwrap(), event);
        }
        let refusals = [
            Error::QueueFull { max_waiting: 4 },
            Error::PromptTooLong { prompt_len: 300, max_model_len: 256 },
            Error::InvalidParameter { field: "top_p".into(), expected: "in (0, 1]".into(), got: "2".into() },
            Error::EmptyPrompt,
            Error::TokenOutOfVocabulary { index: 2, token: 99, vocab_size: 50 },
            Error::EngineStopped { reason: "gone".into() },
        ];
        for error in refusals {
            let wire = refused_event(refusal_to_wire(&error).unwrap());
            assert_eq!(event_from_wire(wire).unwrap().unwrap_err().to_string(), error.to_string());
        }
        assert!(refusal_to_wire(&Error::NoStepInFlight).is_none());
        assert!(event_from_wire(pb::GenerateEvent { event: None }).is_err());
    }
}
