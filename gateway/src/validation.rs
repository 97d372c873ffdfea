//! Requests checked once into [`ValidRequest`] (TGI's `validation.rs`): the body parsed
//! ([`crate::protocol::parse`]), the model name matched, the prompt rendered (chat) and tokenized,
//! its length checked against the model's, the sampling fields turned into
//! [`SamplingParams`] (whose errors name the OpenAI field). Everything after takes only the valid
//! type; every error here is an [`ApiError`] naming its field.

use awq_serve::engine::ModelInfo;
use awq_serve::sampling::{RawSamplingParams, SamplingParams};

use crate::chat_template::ChatTemplate;
use crate::error::ApiError;
use crate::protocol::{self, ChatRequest, CompletionRequest, Prompt, SamplingFields, Stop};

/// How a response reports logprobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogprobsFormat {
    None,
    /// Completions' legacy object, with the `n` most likely tokens per position.
    Legacy(usize),
    /// Chat's `content` list, with `top_logprobs` alternatives per token.
    Chat(usize),
}

/// A checked request, ready for the engine.
#[derive(Debug)]
pub struct ValidRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the usage.
    pub include_usage: bool,
    /// Completions' `echo`: the prompt text that starts the returned text.
    pub echo: Option<String>,
    /// Logprobs of the prompt's tokens (echo with logprobs), `n` alternatives each.
    pub prompt_logprobs: Option<usize>,
    pub logprobs: LogprobsFormat,
}

/// The served model's name check: absent is fine (the model routed to), another name is a 404.
pub fn check_model_name(asked: Option<&str>, model: &ModelInfo) -> Result<(), ApiError> {
    match asked {
        Some(name) if name != model.name => Err(ApiError::model_not_found(name, std::slice::from_ref(&model.name))),
        _ => Ok(()),
    }
}

/// Token ids of `text`: the tokenizer without special tokens, and BOS in front when `add_special`
/// and the model's tokenizer_config.json asks for it (as `awq eval ppl` scores text).
pub fn encode(model: &ModelInfo, text: &str, add_special: bool) -> Result<Vec<u32>, ApiError> {
    let enc = model.tokenizer.encode(text, false).map_err(|e| ApiError::internal(format!("tokenizer: {e}")))?;
    let mut ids = Vec::with_capacity(enc.len() + 1);
    if add_special && model.add_bos_token {
        if let Some(bos) = model.bos_token.as_deref().and_then(|t| model.tokenizer.token_to_id(t)) {
            ids.push(bos);
        }
    }
    ids.extend_from_slice(enc.get_ids());
    Ok(ids)
}

/// Every id must name a token of the tokenizer's vocabulary.
fn check_ids(field: &str, ids: &[u32], model: &ModelInfo) -> Result<(), ApiError> {
    let vocab = model.tokenizer.get_vocab_size(true);
    match ids.iter().position(|&id| id as usize >= vocab) {
        Some(i) => Err(ApiError::invalid_param(
            format!("{field}[{i}]"),
            format!("token id {} is not in the vocabulary ({vocab} tokens)", ids[i]),
        )),
        None => Ok(()),
    }
}

/// The prompt must be non-empty and leave room for one generated token.
fn check_length(field: &str, prompt: &[u32], model: &ModelInfo) -> Result<(), ApiError> {
    let e = match prompt.len() {
        0 => awq_serve::Error::EmptyPrompt,
        n if n >= model.max_model_len => {
            awq_serve::Error::PromptTooLong { prompt_len: n, max_model_len: model.max_model_len }
        }
        _ => return Ok(()),
    };
    Err(ApiError { param: Some(field.into()), ..ApiError::from(e) })
}

/// The sampling fields into checked params; `rename` maps our field names to the endpoint's.
fn sampling(
    s: SamplingFields,
    max_tokens: Option<i64>,
    logprobs: bool,
    top_logprobs: Option<i64>,
    rename: &[(&str, &str)],
) -> Result<(SamplingParams, bool, bool), ApiError> {
    match s.n {
        None | Some(1) => {}
        Some(n) => return Err(ApiError::invalid_param("n", format!("n must be 1 (one choice per request), got {n}"))),
    }
    let raw = RawSamplingParams {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        min_p: s.min_p,
        seed: s.seed,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        repetition_penalty: s.repetition_penalty,
        max_tokens: max_tokens.or(s.max_tokens),
        stop: match s.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        },
        stop_token_ids: s.stop_token_ids.unwrap_or_default(),
        ignore_eos: s.ignore_eos.unwrap_or(false),
        logprobs,
        top_logprobs,
    };
    let params = SamplingParams::new(raw).map_err(|e| {
        let mut api = ApiError::from(e);
        if let Some((_, to)) = rename.iter().find(|(from, _)| api.param.as_deref() == Some(*from)) {
            api.message = api.message.replacen(api.param.as_deref().unwrap_or_default(), to, 1);
            api.param = Some(to.to_string());
        }
        api
    })?;
    let stream = s.stream.unwrap_or(false);
    let include_usage = s.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
    if include_usage && !stream {
        return Err(ApiError::invalid_param("stream_options", "stream_options is only allowed with stream: true"));
    }
    Ok((params, stream, include_usage))
}

/// POST /v1/completions.
pub fn completion(body: &[u8], model: &ModelInfo) -> Result<ValidRequest, ApiError> {
    let req: CompletionRequest = protocol::parse(body)?;
    let fields: SamplingFields = protocol::parse(body)?;
    check_model_name(req.model.as_deref(), model)?;
    if req.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::invalid_param("best_of", "best_of must be 1 (one choice per request)"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid_param("suffix", "suffix is not supported"));
    }
    let (prompt, prompt_text) = match req.prompt {
        None => return Err(ApiError::invalid_param("prompt", "prompt is required")),
        Some(Prompt::Text(t)) => (encode(model, &t, true)?, Some(t)),
        Some(Prompt::Texts(mut v)) if v.len() == 1 => {
            let t = v.pop().expect("one");
            (encode(model, &t, true)?, Some(t))
        }
        Some(Prompt::Tokens(ids)) => (ids, None),
        Some(Prompt::TokenLists(mut v)) if v.len() == 1 => (v.pop().expect("one"), None),
        Some(Prompt::Texts(v)) => return Err(one_prompt(v.len())),
        Some(Prompt::TokenLists(v)) => return Err(one_prompt(v.len())),
    };
    check_ids("prompt", &prompt, model)?;
    check_length("prompt", &prompt, model)?;
    let n = match req.logprobs {
        None => None,
        Some(n) if (0..=awq_serve::sampling::MAX_TOP_LOGPROBS as i64).contains(&n) => Some(n as usize),
        Some(n) => return Err(ApiError::invalid_param("logprobs", format!("logprobs must be in [0, 20], got {n}"))),
    };
    let (params, stream, include_usage) =
        sampling(fields, None, n.is_some(), n.map(|n| n as i64), &[("top_logprobs", "logprobs")])?;
    let echo = req.echo.unwrap_or(false);
    let echo_text = match (echo, prompt_text) {
        (false, _) => None,
        (true, Some(t)) => Some(t),
        (true, None) => {
            Some(model.tokenizer.decode(&prompt, false).map_err(|e| ApiError::internal(format!("tokenizer: {e}")))?)
        }
    };
    Ok(ValidRequest {
        prompt,
        params,
        stream,
        include_usage,
        echo: echo_text,
        prompt_logprobs: if echo { n } else { None },
        logprobs: n.map_or(LogprobsFormat::None, LogprobsFormat::Legacy),
    })
}

fn one_prompt(n: usize) -> ApiError {
    ApiError::invalid_param("prompt", format!("one prompt per request is supported, got a list of {n}"))
}

/// The chat template of `model`, or the 400 that says why there is none.
pub fn template<'a>(
    template: &'a Result<ChatTemplate, String>,
    model: &ModelInfo,
) -> Result<&'a ChatTemplate, ApiError> {
    template.as_ref().map_err(|why| {
        ApiError::invalid_param(
            "messages",
            format!("the model `{}` cannot chat: {why}; use /v1/completions with a prompt instead", model.name),
        )
    })
}

/// POST /v1/chat/completions.
pub fn chat(
    body: &[u8],
    model: &ModelInfo,
    chat_template: &Result<ChatTemplate, String>,
) -> Result<ValidRequest, ApiError> {
    let req: ChatRequest = protocol::parse(body)?;
    let fields: SamplingFields = protocol::parse(body)?;
    check_model_name(req.model.as_deref(), model)?;
    let messages = req.messages.ok_or_else(|| ApiError::invalid_param("messages", "messages is required"))?;
    let text = template(chat_template, model)?.render(&messages, req.add_generation_prompt.unwrap_or(true))?;
    let prompt = encode(model, &text, false)?;
    check_length("messages", &prompt, model)?;
    let logprobs = req.logprobs.unwrap_or(false);
    let (params, stream, include_usage) = sampling(fields, req.max_completion_tokens, logprobs, req.top_logprobs, &[])?;
    Ok(ValidRequest {
        prompt,
        stream,
        include_usage,
        echo: None,
        prompt_logprobs: None,
        logprobs: match params.logprobs() {
            Some(n) => LogprobsFormat::Chat(n),
            None => LogprobsFormat::None,
        },
        params,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;

    /// A byte-level BPE tokenizer of 256 byte tokens plus `<s>` (id 256) and `</s>` (257).
    pub(crate) fn tiny_model(max_model_len: usize, add_bos_token: bool) -> ModelInfo {
        let byte = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet();
        let mut chars: Vec<char> = byte.into_iter().collect();
        chars.sort();
        let vocab: serde_json::Map<String, serde_json::Value> =
            chars.iter().enumerate().map(|(i, c)| (c.to_string(), serde_json::json!(i))).collect();
        let json = serde_json::json!({
            "version": "1.0",
            "added_tokens": [
                {"id": 256, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": 257, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
            ],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": []}
        });
        let tokenizer = tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes()).expect("a valid tokenizer");
        ModelInfo {
            name: "tiny".into(),
            max_model_len,
            tokenizer: Arc::new(tokenizer),
            add_bos_token,
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
            eos_token_ids: vec![257],
            chat_template: None,
        }
    }

    fn check_err(result: Result<ValidRequest, ApiError>, status: u16, param: &str, message_has: &str) {
        let e = result.expect_err("the request is invalid");
        assert_eq!((e.status.as_u16(), e.param.as_deref()), (status, Some(param)), "{e}");
        assert!(e.message.contains(message_has), "{:?} lacks {message_has:?}", e.message);
    }

    #[test]
    fn completion_errors_name_their_field() {
        let m = tiny_model(16, false);
        let c = |body: &str| completion(body.as_bytes(), &m);
        check_err(
            c(r#"{"prompt": "hi", "temperature": 3}"#),
            400,
            "temperature",
            "temperature must be in [0, 2], got 3",
        );
        check_err(c(r#"{"prompt": "hi", "temperature": "3"}"#), 400, "temperature", "invalid type");
        check_err(c(r#"{"prompt": "hi", "logprobs": 21}"#), 400, "logprobs", "in [0, 20], got 21");
        check_err(c(r#"{"prompt": "hi", "max_tokens": 0}"#), 400, "max_tokens", "at least 1");
        check_err(c(r#"{"prompt": "hi", "n": 2}"#), 400, "n", "n must be 1");
        check_err(c(r#"{"prompt": "hi", "stop": ["a", ""]}"#), 400, "stop[1]", "non-empty");
        check_err(
            c(r#"{"prompt": "hi", "stream_options": {"include_usage": true}}"#),
            400,
            "stream_options",
            "stream: true",
        );
        check_err(c(r#"{"max_tokens": 3}"#), 400, "prompt", "required");
        check_err(c(r#"{"prompt": ""}"#), 400, "prompt", "empty");
        check_err(c(r#"{"prompt": ["a", "b"]}"#), 400, "prompt", "a list of 2");
        check_err(c(r#"{"prompt": [1, 999]}"#), 400, "prompt[1]", "not in the vocabulary");
        check_err(c(r#"{"prompt": "sixteen bytes!!!"}"#), 400, "prompt", "maximum length is 16");
        check_err(c(r#"{"prompt": "hi", "model": "other"}"#), 404, "model", "`other` does not exist");
    }

    #[test]
    fn completion_prompt_forms_echo_and_bos() {
        let m = tiny_model(64, true);
        let v = completion(br#"{"prompt": "hi", "echo": true, "logprobs": 2, "model": "tiny", "stream": true}"#, &m)
            .unwrap();
        assert_eq!(v.prompt, vec![256, encode(&m, "h", false).unwrap()[0], encode(&m, "i", false).unwrap()[0]]);
        assert_eq!(
            (v.echo.as_deref(), v.prompt_logprobs, v.logprobs, v.stream),
            (Some("hi"), Some(2), LogprobsFormat::Legacy(2), true)
        );
        let v = completion(br#"{"prompt": [[5, 6]], "echo": true}"#, &m).unwrap();
        assert_eq!((v.prompt, v.prompt_logprobs, v.logprobs), (vec![5, 6], None, LogprobsFormat::None));
        assert_eq!(v.echo.as_deref(), Some(m.tokenizer.decode(&[5, 6], false).unwrap().as_str()));
    }

    #[test]
    fn chat_needs_a_template_and_checks_its_fields() {
        let m = tiny_model(64, true);
        let none: Result<ChatTemplate, String> = Err("it has no chat_template in tokenizer_config.json".into());
        check_err(
            chat(br#"{"messages": [{"role": "user", "content": "hi"}]}"#, &m, &none),
            400,
            "messages",
            "cannot chat: it has no chat_template",
        );
        let t = Ok(ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}".into(),
            Some("<s>".into()),
            None,
        )
        .unwrap());
        let v = chat(br#"{"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 3, "max_completion_tokens": 5}"#, &m, &t).unwrap();
        assert_eq!(v.prompt, encode(&m, "<s>user:hi;", false).unwrap());
        assert_eq!(v.prompt[0], 256, "the template's BOS is the special token, not its bytes");
        assert_eq!((v.logprobs, v.params.max_tokens()), (LogprobsFormat::Chat(3), Some(5)));
        check_err(
            chat(br#"{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}"#, &m, &t),
            400,
            "logprobs",
            "true when top_logprobs",
        );
        check_err(chat(br#"{"messages": "hi"}"#, &m, &t), 400, "messages", "invalid type");
        check_err(chat(br#"{}"#, &m, &t), 400, "messages", "required");
    }
}
