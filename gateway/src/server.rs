//! The routes, their OpenAI response shapes and SSE (TGI's `router/src/server.rs`): each handler
//! finds the request's model (`Gateway::served`: its backend from the gateway's `Models`),
//! validates once (`validation`), submits to the [`Backend`](crate::Backend), and formats the
//! engine's events as one JSON response or as `data: {...}` chunks ending in `data: [DONE]`. The
//! API key check and the body limits wrap the routes here; status codes come only from
//! [`ApiError`].

use std::collections::VecDeque;
use std::convert::Infallible;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use awq_serve::engine::{
    EngineEvent, GenerateRequest, GeneratedToken, ModelInfo, PromptToken, RequestStream, Usage as EngineUsage,
};
use awq_serve::sampling::TokenLogprob;
use awq_serve::{FinishReason, StopCause};
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::RequestBodyTimeoutLayer;

use crate::error::ApiError;
use crate::listener::PeerAddr;
use crate::metrics::{Ending, ModelMetrics};
use crate::protocol::{
    self, ChatChoice, ChatChunk, ChatChunkChoice, ChatDelta, ChatLogprobs, ChatResponse, ChatResponseMessage,
    ChatTokenLogprob, ChatTopLogprob, CompletionChoice, CompletionLogprobs, CompletionResponse, DetokenizeRequest,
    ModelField, TokenizeRequest, Usage,
};
use crate::validation::{self, LogprobsFormat, ValidRequest};
use crate::{Gateway, Served};

pub(crate) fn router(gw: Gateway) -> Router {
    let config = &gw.inner.config;
    let api = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route_layer(middleware::from_fn_with_state(gw.clone(), require_api_key));
    Router::new()
        .merge(api)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|req: Request| async move { ApiError::no_route(req.uri().path()) })
        .layer(DefaultBodyLimit::disable())
        .layer(RequestBodyLimitLayer::new(config.max_body_bytes))
        .layer(RequestBodyTimeoutLayer::new(config.body_timeout))
        .layer(middleware::from_fn_with_state(gw.clone(), crate::drain::admit))
        .with_state(gw)
}

/// Lets a request in when it carries one of the API keys (every key compared in constant time),
/// else answers 401 and logs the refusal: the client's address (when the server was started with
/// connect info) and path, never a key.
async fn require_api_key(State(gw): State<Gateway>, req: Request, next: Next) -> Response {
    let keys = &gw.inner.config.api_keys;
    if !keys.is_empty() {
        let given = req.headers().get(header::AUTHORIZATION).map(|v| awq_auth::bearer(v.as_bytes()));
        let refused = match given {
            Some(Some(key)) if keys.accepts(key) => None,
            None => Some("no API key"),
            Some(None) => Some("an Authorization that is not `Bearer KEY`"),
            Some(Some(_)) => Some("a wrong API key"),
        };
        if let Some(refused) = refused {
            let peer = req.extensions().get::<ConnectInfo<PeerAddr>>().map(|ConnectInfo(PeerAddr(a))| a.to_string());
            let peer = peer.unwrap_or_else(|| "an unknown peer".into());
            tracing::warn!(%peer, path = req.uri().path(), "refused: {refused}");
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// 200 while the gateway serves a model (one engine: once it is loaded; several: while at least
/// one has a ready replica), else 503 saying why.
async fn health(State(gw): State<Gateway>) -> Response {
    gw.inner.models.refresh().await;
    match gw.inner.models.health() {
        Ok(()) => (StatusCode::OK, Json(json!({"status": "ok"}))).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn metrics(State(gw): State<Gateway>) -> Response {
    let stats = gw.inner.models.stats().await;
    let text = gw.inner.metrics.render(&stats);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// Every model served; while none is (one engine still loading), the 503 of /health.
async fn models(State(gw): State<Gateway>) -> Result<Json<Value>, ApiError> {
    gw.inner.models.refresh().await;
    let list = gw.inner.models.list();
    if list.is_empty() {
        gw.inner.models.health()?;
    }
    let data: Vec<Value> = list
        .into_iter()
        .map(|m| {
            json!({
                "id": m.name, "object": "model", "created": m.created, "owned_by": "awq",
                "root": m.name, "parent": null, "max_model_len": m.max_model_len,
            })
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

async fn tokenize(State(gw): State<Gateway>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let req: TokenizeRequest = protocol::parse(&body)?;
    let served = gw.served(req.model.as_deref()).await?;
    let model = &served.model;
    let tokens = match (req.messages, req.prompt) {
        (Some(messages), _) => {
            let text = validation::template(&served.template, model)?
                .render(&messages, req.add_generation_prompt.unwrap_or(true))?;
            validation::encode(model, &text, req.add_special_tokens.unwrap_or(false))?
        }
        (None, Some(prompt)) => validation::encode(model, &prompt, req.add_special_tokens.unwrap_or(true))?,
        (None, None) => return Err(ApiError::invalid_param("prompt", "prompt (or messages) is required")),
    };
    Ok(Json(json!({"count": tokens.len(), "max_model_len": model.max_model_len, "tokens": tokens, "token_strs": null})))
}

async fn detokenize(State(gw): State<Gateway>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let req: DetokenizeRequest = protocol::parse(&body)?;
    let model = &gw.served(req.model.as_deref()).await?.model;
    let tokens = req.tokens.ok_or_else(|| ApiError::invalid_param("tokens", "tokens is required"))?;
    let vocab = model.tokenizer.get_vocab_size(true);
    if let Some(i) = tokens.iter().position(|&t| t as usize >= vocab) {
        return Err(ApiError::invalid_param(
            format!("tokens[{i}]"),
            format!("token id {} is not in the vocabulary ({vocab} tokens)", tokens[i]),
        ));
    }
    let text = model.tokenizer.decode(&tokens, false).map_err(|e| ApiError::internal(format!("tokenizer: {e}")))?;
    Ok(Json(json!({"prompt": text})))
}

// ----- running a request -----

/// A submitted request: the engine's events and the gateway's latency measurements.
struct Running {
    stream: RequestStream,
    tracker: Tracker,
}

/// Latencies of one request, into its model's histograms; a request dropped before its end (the
/// client went away) counts as aborted.
struct Tracker {
    metrics: Arc<ModelMetrics>,
    start: Instant,
    last_token: Option<Instant>,
    ended: bool,
}

impl Tracker {
    fn observe(&mut self, event: &EngineEvent) {
        let m = &self.metrics;
        match event {
            EngineEvent::Tokens { tokens, .. } if !tokens.is_empty() => {
                let now = Instant::now();
                match self.last_token {
                    None => m.time_to_first_token.observe(now - self.start),
                    Some(last) => {
                        let gap = (now - last) / tokens.len() as u32;
                        for _ in 0..tokens.len() {
                            m.inter_token_latency.observe(gap);
                        }
                    }
                }
                self.last_token = Some(now);
            }
            EngineEvent::Finished { reason, .. } => self.end(match reason {
                FinishReason::Stop(_) => Ending::Stop,
                FinishReason::Length => Ending::Length,
                FinishReason::Abort => Ending::Abort,
            }),
            EngineEvent::Error(_) => self.end(Ending::Error),
            _ => {}
        }
    }

    fn end(&mut self, ending: Ending) {
        if !self.ended {
            self.ended = true;
            self.metrics.e2e_request_latency.observe(self.start.elapsed());
            self.metrics.finished(ending);
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.end(Ending::Abort);
    }
}

/// Submits `valid` to the model's backend. Its latencies count from here (a remote replica's
/// `submit` returns with the first event, so its wait is the time to first token).
async fn submit(served: &Served, valid: &ValidRequest) -> Result<Running, ApiError> {
    let request = GenerateRequest {
        prompt: valid.prompt.clone(),
        params: valid.params.clone(),
        prompt_logprobs: valid.prompt_logprobs,
    };
    let start = Instant::now();
    let stream = served.backend.submit(request).await?;
    Ok(Running { stream, tracker: Tracker { metrics: served.metrics.clone(), start, last_token: None, ended: false } })
}

/// The model a request body asks for, found before the body is validated (with its tokenizer).
async fn served_for(gw: &Gateway, body: &[u8]) -> Result<Served, ApiError> {
    let field: ModelField = protocol::parse(body)?;
    gw.served(field.model.as_deref()).await
}

/// Everything a request produced, for a response that is not streamed.
struct Collected {
    prompt_logprobs: Option<Vec<Option<PromptToken>>>,
    tokens: Vec<GeneratedToken>,
    text: String,
    reason: FinishReason,
    usage: EngineUsage,
}

async fn collect(mut run: Running) -> Result<Collected, ApiError> {
    let (mut prompt_logprobs, mut tokens, mut text) = (None, Vec::new(), String::new());
    loop {
        let event = run.stream.next().await.ok_or_else(|| ApiError::internal("the engine dropped the request"))?;
        run.tracker.observe(&event);
        match event {
            EngineEvent::PromptLogprobs(lp) => prompt_logprobs = Some(lp),
            EngineEvent::Tokens { tokens: t, text: s } => {
                tokens.extend(t);
                text.push_str(&s);
            }
            EngineEvent::Finished { text: s, reason, usage } => {
                text.push_str(&s);
                return Ok(Collected { prompt_logprobs, tokens, text, reason, usage });
            }
            EngineEvent::Error(message) => {
                return Err(ApiError::internal(format!("the request failed in the engine: {message}")))
            }
        }
    }
}

/// Formats the events of one request as SSE payloads.
trait Chunks: Send + 'static {
    fn on_event(&mut self, event: &EngineEvent) -> Vec<Value>;
}

fn sse(run: Running, chunks: impl Chunks) -> Response {
    struct St<C> {
        run: Running,
        chunks: C,
        pending: VecDeque<Event>,
        done: bool,
    }
    let state = St { run, chunks, pending: VecDeque::new(), done: false };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(event) = st.pending.pop_front() {
                return Some((Ok::<_, Infallible>(event), st));
            }
            if st.done {
                return None;
            }
            let event = st
                .run
                .stream
                .next()
                .await
                .unwrap_or_else(|| EngineEvent::Error("the engine dropped the request".into()));
            st.run.tracker.observe(&event);
            let last = matches!(event, EngineEvent::Finished { .. } | EngineEvent::Error(_));
            let payloads = match &event {
                EngineEvent::Error(message) => {
                    vec![ApiError::internal(format!("the request failed in the engine: {message}")).body()]
                }
                _ => st.chunks.on_event(&event),
            };
            st.pending.extend(payloads.into_iter().map(|v| Event::default().data(v.to_string())));
            if last {
                st.pending.push_back(Event::default().data("[DONE]"));
                st.done = true;
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A response id: `PREFIX-` + the process's start time and a counter, in hex.
fn response_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static START: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    let start = START.get_or_init(|| SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    format!("{prefix}-{:x}{:08x}", start & 0xffff_ffff_ffff, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// vLLM's `stop_reason`: the stop token id or stop string that ended the text (EOS: none).
fn stop_reason(reason: &FinishReason) -> Option<Value> {
    match reason {
        FinishReason::Stop(StopCause::StopToken(id)) => Some(json!(id)),
        FinishReason::Stop(StopCause::StopString(s)) => Some(json!(s)),
        _ => None,
    }
}

/// A token's text on its own (what logprobs list), e.g. " the".
fn token_str(model: &ModelInfo, id: u32) -> String {
    model.tokenizer.decode(&[id], false).unwrap_or_default()
}

// ----- /v1/completions -----

async fn completions(State(gw): State<Gateway>, body: Bytes) -> Result<Response, ApiError> {
    let served = served_for(&gw, &body).await?;
    let model = &served.model;
    let valid = validation::completion(&body, model)?;
    let run = submit(&served, &valid).await?;
    let (id, created) = (response_id("cmpl"), now_unix());
    if valid.stream {
        let chunks = CompletionChunks {
            id,
            created,
            model: model.clone(),
            prompt: valid.prompt,
            echo: valid.echo,
            logprobs: valid.logprobs,
            include_usage: valid.include_usage,
            offset: 0,
        };
        return Ok(sse(run, chunks));
    }
    let c = collect(run).await?;
    let mut logprobs = LegacyLogprobs::new(model, 0);
    let mut text = String::new();
    if let Some(echo) = &valid.echo {
        if let Some(lp) = &c.prompt_logprobs {
            logprobs.push_prompt(&valid.prompt, lp);
        }
        text.push_str(echo);
        logprobs.offset = echo.chars().count();
    }
    text.push_str(&c.text);
    if let LogprobsFormat::Legacy(_) = valid.logprobs {
        logprobs.push_generated(&c.tokens);
    }
    let response = CompletionResponse {
        id,
        object: "text_completion",
        created,
        model: model.name.clone(),
        choices: vec![CompletionChoice {
            index: 0,
            text,
            logprobs: matches!(valid.logprobs, LogprobsFormat::Legacy(_)).then_some(logprobs.out),
            finish_reason: Some(c.reason.as_openai_str()),
            stop_reason: stop_reason(&c.reason),
        }],
        usage: Some(c.usage.into()),
    };
    Ok(Json(response).into_response())
}

/// Builds the legacy `logprobs` object; `offset` is where the next token's text starts in `text`.
struct LegacyLogprobs<'a> {
    model: &'a ModelInfo,
    offset: usize,
    out: CompletionLogprobs,
}

impl<'a> LegacyLogprobs<'a> {
    fn new(model: &'a ModelInfo, offset: usize) -> Self {
        LegacyLogprobs { model, offset, out: CompletionLogprobs::default() }
    }

    fn push(&mut self, id: u32, logprob: Option<f32>, top: Option<&[TokenLogprob]>) {
        let s = token_str(self.model, id);
        let top = top.map(|top| {
            let mut map = Map::new();
            for t in top {
                map.entry(token_str(self.model, t.token)).or_insert(json!(t.logprob));
            }
            if let Some(lp) = logprob {
                map.entry(s.clone()).or_insert(json!(lp));
            }
            map
        });
        self.out.text_offset.push(self.offset);
        self.offset += s.chars().count();
        self.out.tokens.push(s);
        self.out.token_logprobs.push(logprob);
        self.out.top_logprobs.push(top);
    }

    /// The prompt's tokens: the first has no logprob (nothing before it), as OpenAI's echo.
    fn push_prompt(&mut self, prompt: &[u32], logprobs: &[Option<PromptToken>]) {
        for (i, &id) in prompt.iter().enumerate() {
            // The engine's list is per position, `None` at position 0.
            let lp = logprobs.get(i).and_then(Option::as_ref);
            self.push(id, lp.map(|t| t.logprob), lp.map(|t| t.top_logprobs.as_slice()));
        }
    }

    fn push_generated(&mut self, tokens: &[GeneratedToken]) {
        for t in tokens {
            self.push(t.id, t.logprob, Some(&t.top_logprobs));
        }
    }
}

struct CompletionChunks {
    id: String,
    created: u64,
    model: Arc<ModelInfo>,
    prompt: Vec<u32>,
    /// The prompt text still to send (echo), sent with the first chunk.
    echo: Option<String>,
    logprobs: LogprobsFormat,
    include_usage: bool,
    /// Characters sent so far (the next token's `text_offset`).
    offset: usize,
}

impl CompletionChunks {
    fn chunk(&self, text: String, logprobs: Option<CompletionLogprobs>, reason: Option<&FinishReason>) -> Value {
        let choice = CompletionChoice {
            index: 0,
            text,
            logprobs,
            finish_reason: reason.map(FinishReason::as_openai_str),
            stop_reason: reason.and_then(stop_reason),
        };
        let mut v = json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model.name, "choices": [choice]});
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// The echoed prompt text (and its logprobs) not sent yet, to go in front of this chunk.
    fn take_echo(&mut self, prompt_logprobs: Option<&[Option<PromptToken>]>, lp: &mut LegacyLogprobs) -> String {
        let Some(echo) = self.echo.take() else { return String::new() };
        if let Some(p) = prompt_logprobs {
            lp.push_prompt(&self.prompt, p);
        }
        self.offset += echo.chars().count();
        lp.offset = self.offset;
        echo
    }
}

impl Chunks for CompletionChunks {
    fn on_event(&mut self, event: &EngineEvent) -> Vec<Value> {
        let model = self.model.clone();
        let mut lp = LegacyLogprobs::new(&model, self.offset);
        let want_logprobs = matches!(self.logprobs, LogprobsFormat::Legacy(_));
        match event {
            EngineEvent::PromptLogprobs(p) => {
                let text = self.take_echo(Some(p), &mut lp);
                vec![self.chunk(text, want_logprobs.then_some(lp.out), None)]
            }
            EngineEvent::Tokens { tokens, text } => {
                let mut out = self.take_echo(None, &mut lp);
                out.push_str(text);
                if want_logprobs {
                    lp.push_generated(tokens);
                }
                self.offset = lp.offset;
                // A chunk per step that generated tokens, even when their text is held back (a
                // partial UTF-8 character, a possible stop string) or empty: as vLLM, so a client
                // sees every token's timing (`awq bench serve`'s TTFT and ITL).
                if out.is_empty() && lp.out.tokens.is_empty() && tokens.is_empty() {
                    return Vec::new();
                }
                vec![self.chunk(out, want_logprobs.then_some(lp.out), None)]
            }
            EngineEvent::Finished { text, reason, usage } => {
                let mut out = self.take_echo(None, &mut lp);
                out.push_str(text);
                let mut chunks = vec![self.chunk(out, None, Some(reason))];
                if self.include_usage {
                    chunks.push(json!({"id": self.id, "object": "text_completion", "created": self.created,
                        "model": self.model.name, "choices": [], "usage": Usage::from(*usage)}));
                }
                chunks
            }
            EngineEvent::Error(_) => Vec::new(),
        }
    }
}

// ----- /v1/chat/completions -----

async fn chat_completions(State(gw): State<Gateway>, body: Bytes) -> Result<Response, ApiError> {
    let served = served_for(&gw, &body).await?;
    let model = &served.model;
    let valid = validation::chat(&body, model, &served.template)?;
    let run = submit(&served, &valid).await?;
    let (id, created) = (response_id("chatcmpl"), now_unix());
    if valid.stream {
        let chunks = ChatChunks {
            id,
            created,
            model: model.clone(),
            logprobs: valid.logprobs,
            include_usage: valid.include_usage,
            sent_role: false,
        };
        return Ok(sse(run, chunks));
    }
    let c = collect(run).await?;
    let response = ChatResponse {
        id,
        object: "chat.completion",
        created,
        model: model.name.clone(),
        choices: vec![ChatChoice {
            index: 0,
            message: ChatResponseMessage { role: "assistant", content: c.text },
            logprobs: chat_logprobs(model, valid.logprobs, &c.tokens),
            finish_reason: Some(c.reason.as_openai_str()),
            stop_reason: stop_reason(&c.reason),
        }],
        usage: c.usage.into(),
    };
    Ok(Json(response).into_response())
}

fn chat_logprobs(model: &ModelInfo, format: LogprobsFormat, tokens: &[GeneratedToken]) -> Option<ChatLogprobs> {
    let LogprobsFormat::Chat(n) = format else { return None };
    let entry = |id: u32, logprob: f32| {
        let token = token_str(model, id);
        (token.clone().into_bytes(), token, logprob)
    };
    let content = tokens
        .iter()
        .map(|t| {
            let (bytes, token, logprob) = entry(t.id, t.logprob.unwrap_or(f32::NAN));
            let top = t.top_logprobs.iter().take(n).map(|a| {
                let (bytes, token, logprob) = entry(a.token, a.logprob);
                ChatTopLogprob { token, logprob, bytes }
            });
            ChatTokenLogprob { token, logprob, bytes, top_logprobs: Some(top.collect()) }
        })
        .collect();
    Some(ChatLogprobs { content })
}

struct ChatChunks {
    id: String,
    created: u64,
    model: Arc<ModelInfo>,
    logprobs: LogprobsFormat,
    include_usage: bool,
    sent_role: bool,
}

impl ChatChunks {
    fn chunk(&self, delta: ChatDelta, logprobs: Option<ChatLogprobs>, reason: Option<&FinishReason>) -> Value {
        let chunk = ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.name.clone(),
            choices: vec![ChatChunkChoice {
                index: 0,
                delta,
                logprobs,
                finish_reason: reason.map(FinishReason::as_openai_str),
                stop_reason: reason.and_then(stop_reason),
            }],
            usage: self.include_usage.then_some(None),
        };
        serde_json::to_value(chunk).expect("a chunk serialises")
    }
}

impl Chunks for ChatChunks {
    fn on_event(&mut self, event: &EngineEvent) -> Vec<Value> {
        let mut out = Vec::new();
        if !self.sent_role {
            self.sent_role = true;
            out.push(self.chunk(ChatDelta { role: Some("assistant"), content: Some(String::new()) }, None, None));
        }
        match event {
            EngineEvent::Tokens { tokens, text } => {
                let logprobs = chat_logprobs(&self.model, self.logprobs, tokens);
                // As for completions: one chunk per step with tokens, even with no text yet.
                if !text.is_empty() || logprobs.is_some() || !tokens.is_empty() {
                    out.push(self.chunk(ChatDelta { role: None, content: Some(text.clone()) }, logprobs, None));
                }
            }
            EngineEvent::Finished { text, reason, usage } => {
                if !text.is_empty() {
                    out.push(self.chunk(ChatDelta { role: None, content: Some(text.clone()) }, None, None));
                }
                out.push(self.chunk(ChatDelta::default(), None, Some(reason)));
                if self.include_usage {
                    let usage = ChatChunk {
                        id: self.id.clone(),
                        object: "chat.completion.chunk",
                        created: self.created,
                        model: self.model.name.clone(),
                        choices: Vec::new(),
                        usage: Some(Some((*usage).into())),
                    };
                    out.push(serde_json::to_value(usage).expect("a chunk serialises"));
                }
            }
            EngineEvent::PromptLogprobs(_) | EngineEvent::Error(_) => {}
        }
        out
    }
}

#[cfg(test)]
mod tests {
    //! The HTTP edge with a backend that refuses every request as the engine does when its queue
    //! is full: status codes, headers and error bodies (the engine itself: tests/tests/serve.rs).
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;
    use crate::validation::tests::tiny_model;
    use crate::{Backend, GatewayConfig};

    struct QueueFullBackend(ModelInfo);

    #[crate::async_trait]
    impl Backend for QueueFullBackend {
        async fn submit(&self, _: GenerateRequest) -> Result<RequestStream, awq_serve::Error> {
            Err(awq_serve::Error::QueueFull { max_waiting: 3 })
        }
        async fn stats(&self) -> Result<awq_serve::engine::EngineStats, awq_serve::Error> {
            Ok(awq_serve::engine::EngineStats { num_requests_waiting: 3, ..Default::default() })
        }
        fn model(&self) -> &ModelInfo {
            &self.0
        }
    }

    async fn call(
        gw: &Gateway,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: &str,
    ) -> (u16, Option<String>, String) {
        let mut req = Request::builder().method(method).uri(path).header("content-type", "application/json");
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let resp = gw.router().oneshot(req.body(Body::from(body.to_string())).unwrap()).await.unwrap();
        let retry = resp.headers().get(header::RETRY_AFTER).map(|v| v.to_str().unwrap().to_string());
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, retry, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn statuses_at_the_edge() {
        let keys = ["sesame", "open-up"].map(|k| awq_auth::Secret::new(k, "test").unwrap());
        let gw = Gateway::new(GatewayConfig { api_keys: keys.into_iter().collect(), ..Default::default() });
        let (status, _, body) = call(&gw, "GET", "/health", None, "").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("still loading"), "{body}");
        let (status, _, _) = call(&gw, "POST", "/v1/completions", Some("sesame"), r#"{"prompt": "hi"}"#).await;
        assert_eq!(status, 503);

        gw.set_ready(Arc::new(QueueFullBackend(tiny_model(32, false))));
        assert_eq!(call(&gw, "GET", "/health", None, "").await.0, 200);
        let (status, _, body) = call(&gw, "GET", "/v1/models", None, "").await;
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("\"authentication_error\""), "{body}");
        assert_eq!(call(&gw, "GET", "/v1/models", Some("wrong!"), "").await.0, 401);
        assert_eq!(call(&gw, "GET", "/v1/models", Some("sesame open-up"), "").await.0, 401);
        assert_eq!(call(&gw, "GET", "/v1/models", Some("open-up"), "").await.0, 200, "the second key");
        let (status, _, body) = call(&gw, "GET", "/v1/models", Some("sesame"), "").await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!((v["data"][0]["id"].as_str(), v["data"][0]["max_model_len"].as_u64()), (Some("tiny"), Some(32)));

        let (status, retry, body) = call(&gw, "POST", "/v1/completions", Some("sesame"), r#"{"prompt": "hi"}"#).await;
        assert_eq!((status, retry.as_deref()), (429, Some("1")), "{body}");
        let (status, _, body) =
            call(&gw, "POST", "/v1/completions", Some("sesame"), r#"{"prompt": "hi", "top_p": 0}"#).await;
        assert_eq!(status, 400);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["param"], "top_p", "{body}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{body}");
        let (status, _, body) =
            call(&gw, "POST", "/v1/chat/completions", Some("sesame"), r#"{"model": "gpt-4", "messages": []}"#).await;
        assert_eq!(status, 404, "{body}");
        let (status, _, body) = call(
            &gw,
            "POST",
            "/v1/chat/completions",
            Some("sesame"),
            r#"{"messages": [{"role": "user", "content": "x"}]}"#,
        )
        .await;
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("no chat_template"), "{body}");
        let (status, _, body) = call(&gw, "POST", "/tokenize", Some("sesame"), r#"{"prompt": "hi"}"#).await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["count"], 2, "{body}");
        let (status, _, body) =
            call(&gw, "POST", "/detokenize", Some("sesame"), &json!({"tokens": v["tokens"]}).to_string()).await;
        assert_eq!((status, body.as_str()), (200, r#"{"prompt":"hi"}"#));
        assert_eq!(call(&gw, "GET", "/nowhere", None, "").await.0, 404);
        let (status, _, body) = call(&gw, "GET", "/metrics", None, "").await;
        assert_eq!(status, 200);
        assert!(body.contains("awq:num_requests_waiting{model_name=\"tiny\",model=\"tiny\"} 3"), "{body}");
        let big = format!(r#"{{"prompt": "{}"}}"#, "x".repeat(33 << 20));
        assert_eq!(call(&gw, "POST", "/v1/completions", Some("sesame"), &big).await.0, 413);
    }

    /// The drain: a response admitted before it counts until its body is read to the end; every
    /// request after it, /health included, gets 503 `server_shutting_down` and `Connection:
    /// close`; /metrics stays open.
    #[tokio::test]
    async fn a_drain_refuses_new_requests_and_waits_for_admitted_responses() {
        let gw = Gateway::new(GatewayConfig::default());
        gw.set_ready(Arc::new(QueueFullBackend(tiny_model(32, false))));
        let req = Request::builder().uri("/v1/models").body(Body::empty()).unwrap();
        let admitted = gw.router().oneshot(req).await.unwrap();
        assert_eq!((admitted.status().as_u16(), gw.in_flight()), (200, 1), "its body is not read yet");
        gw.start_draining();
        for path in ["/health", "/v1/models", "/nowhere"] {
            let resp = gw.router().oneshot(Request::builder().uri(path).body(Body::empty()).unwrap()).await.unwrap();
            assert_eq!(resp.status().as_u16(), 503, "{path} during the drain");
            assert_eq!(resp.headers()[header::CONNECTION], "close", "{path}");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["error"]["code"], "server_shutting_down", "{v}");
            assert_eq!(v["error"]["type"], "service_unavailable_error", "{v}");
        }
        assert_eq!(call(&gw, "GET", "/metrics", None, "").await.0, 200);
        let drained = tokio::spawn({
            let gw = gw.clone();
            async move { gw.drained().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!drained.is_finished(), "drained while a response was being sent");
        let body = admitted.into_body().collect().await.unwrap().to_bytes();
        assert!(body.starts_with(b"{"), "the admitted response is whole");
        let waited = tokio::time::timeout(std::time::Duration::from_secs(5), drained).await;
        assert!(waited.is_ok(), "not drained once the last response was read");
        assert_eq!(gw.in_flight(), 0);
    }
}
