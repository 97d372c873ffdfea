//! OpenAI's request and response shapes, as serde types; nothing here checks a value's range.
//!
//! Request types are the raw side of validation ([`crate::validation`] turns them into checked
//! values): every field optional, wide numeric types (so `temperature: 3` reaches our range check
//! and its message), unknown fields ignored as OpenAI ignores them. A field of the wrong JSON type
//! fails in [`parse`], whose error names the field's path (`messages[1].content`). Response types
//! serialise to exactly the fields the `openai` client reads (vLLM's extensions where it has them:
//! `stop_reason`, `prompt_tokens_details`).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// Parses a request body into `T`; a wrong type is a 400 naming the field's path.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Err(e) => return Err(ApiError::bad_request(format!("the request body is not JSON: {e}"))),
        Ok(v) if !v.is_object() => return Err(ApiError::bad_request("the request body must be a JSON object")),
        Ok(_) => {}
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // serde's message without its " at line 1 column 42": the field is named instead.
        let message = inner.to_string();
        let message = message.split(" at line ").next().unwrap_or(&message);
        let message = match path.as_str() {
            "prompt" => "must be a string, a list of token ids, or a list of one of them".to_string(),
            "stop" => "must be a string or a list of strings".to_string(),
            p if p.ends_with(".content") => "must be a string or a list of content parts".to_string(),
            _ => message.replace("data did not match any variant of untagged enum", "expected one of the forms of"),
        };
        ApiError::invalid_param(path.clone(), format!("{path}: {message}"))
    })
}

/// The sampling fields common to both endpoints (parsed from the same body as the endpoint's own).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SamplingFields {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub max_tokens: Option<i64>,
    pub stop: Option<Stop>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub ignore_eos: Option<bool>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// `prompt` of /v1/completions: text, token ids, or a list of one of either.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

/// The `model` field alone: which model a request is for, read before the rest (whose checks need
/// that model's tokenizer).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ModelField {
    pub model: Option<String>,
}

/// POST /v1/completions, beyond [`SamplingFields`].
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Option<Prompt>,
    /// The number of most likely tokens to return per position (and the chosen token's logprob).
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub best_of: Option<i64>,
    pub suffix: Option<String>,
}

/// POST /v1/chat/completions, beyond [`SamplingFields`].
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    /// OpenAI's newer name for `max_tokens`.
    pub max_completion_tokens: Option<i64>,
    /// vLLM's: end the rendered prompt with the assistant's header (default true).
    pub add_generation_prompt: Option<bool>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A message's content: a string, or parts of which only text is understood here.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

/// POST /tokenize (vLLM's shape): a prompt, or chat messages rendered through the template.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    pub add_special_tokens: Option<bool>,
    pub add_generation_prompt: Option<bool>,
}

/// POST /detokenize (vLLM's shape).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Option<Vec<u32>>,
}

// ----- responses -----

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

impl From<awq_serve::engine::Usage> for Usage {
    fn from(u: awq_serve::engine::Usage) -> Usage {
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens: u.cached_tokens },
        }
    }
}

/// The legacy completions `logprobs` object: one entry per token in each list.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<serde_json::Map<String, serde_json::Value>>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
    /// vLLM's: the stop token id or stop string that ended the text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One token of chat's logprobs.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<Vec<ChatTopLogprob>>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Serialize)]
pub struct ChatResponseMessage {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatResponseMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub struct ChatResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Default, Serialize)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub struct ChatChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    /// With `stream_options.include_usage`: null on every chunk but the last, which has no choices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> ApiError {
        match parse::<CompletionRequest>(body.as_bytes()) {
            Ok(_) => match parse::<SamplingFields>(body.as_bytes()) {
                Ok(_) => panic!("{body} parsed"),
                Err(e) => e,
            },
            Err(e) => e,
        }
    }

    #[test]
    fn wrong_types_name_the_field_unknown_fields_are_ignored() {
        let e = err(r#"{"prompt": "hi", "temperature": "hot"}"#);
        assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, Some("temperature")), "{e}");
        assert!(e.message.starts_with("temperature: invalid type: string \"hot\", expected f64"), "{e}");
        let e = err(r#"{"prompt": {"a": 1}}"#);
        assert_eq!(e.param.as_deref(), Some("prompt"));
        assert!(e.message.contains("a list of token ids"), "{e}");
        let e = err(r#"{"prompt": "x", "stop": 3}"#);
        assert_eq!(e.param.as_deref(), Some("stop"));
        let e = err(r#"{"prompt": "x", "echo": 1}"#);
        assert_eq!(e.param.as_deref(), Some("echo"));
        let e = err("[1, 2");
        assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, None));
        let e = parse::<ChatRequest>(br#"{"messages": [{"role": "user", "content": 5}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content"), "{e}");
        let ok: CompletionRequest =
            parse(br#"{"prompt": [1, 2], "user": "x", "some_future_field": {"a": []}}"#).unwrap();
        assert!(matches!(ok.prompt, Some(Prompt::Tokens(ref t)) if t == &[1, 2]));
    }
}
