//! The OpenAI-compatible HTTP API of one replica (DESIGN.md, "Serving"), on axum.
//!
//! [`Gateway`] is the server's state: the API key, the metrics it measures, and the engine once it
//! is loaded (a [`Backend`]; until then every API route answers 503 and /health says so).
//! [`Gateway::router`] gives the routes (`server`): /v1/completions, /v1/chat/completions (SSE
//! with `stream: true`), /v1/models, /health, /metrics, /tokenize, /detokenize.
//!
//! A request goes: `protocol` (OpenAI's JSON shapes) -> `validation` (checked once into a
//! `ValidRequest`: model name, chat template (`chat_template`), tokens, length, sampling params) ->
//! [`Backend::submit`] -> the engine's events, formatted as one response or as SSE chunks. Errors
//! become HTTP statuses in one place (`error`, [`ApiError`]). A client that goes away drops the
//! response, which drops the engine's `RequestStream`, which aborts the request and frees its KV
//! blocks. `metrics` writes the Prometheus exposition.
//!
//! What this crate never does: compute on tensors, schedule, sample (the engine, `awq-serve`), or
//! parse command lines (`awq serve` in `cli/`).

mod chat_template;
mod error;
mod metrics;
mod protocol;
mod server;
mod validation;

use std::sync::{Arc, OnceLock};

use awq_serve::engine::{EngineStats, GenerateRequest, ModelInfo, RequestStream};

pub use chat_template::ChatTemplate;
pub use error::ApiError;

/// What the gateway needs of an engine: [`awq_serve::engine::EngineHandle`] in the server.
pub trait Backend: Send + Sync + 'static {
    /// Queues a tokenized request; its events arrive on the returned stream (dropping it aborts).
    fn submit(&self, request: GenerateRequest) -> Result<RequestStream, awq_serve::Error>;
    fn stats(&self) -> EngineStats;
    fn model(&self) -> &ModelInfo;
}

impl Backend for awq_serve::engine::EngineHandle {
    fn submit(&self, request: GenerateRequest) -> Result<RequestStream, awq_serve::Error> {
        awq_serve::engine::EngineHandle::submit(self, request)
    }
    fn stats(&self) -> EngineStats {
        awq_serve::engine::EngineHandle::stats(self)
    }
    fn model(&self) -> &ModelInfo {
        awq_serve::engine::EngineHandle::model(self)
    }
}

/// Settings of the HTTP side.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Required as `Authorization: Bearer KEY` on /v1/*, /tokenize and /detokenize when set.
    pub api_key: Option<String>,
    /// The largest request body accepted (413 above).
    pub max_body_bytes: usize,
    /// How long a client may take to send its body.
    pub body_timeout: std::time::Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig { api_key: None, max_body_bytes: 32 << 20, body_timeout: std::time::Duration::from_secs(60) }
    }
}

/// The loaded engine and what is derived from its model once.
struct Ready {
    backend: Arc<dyn Backend>,
    /// The compiled chat template, or why the model has none.
    template: Result<ChatTemplate, String>,
    /// When the model became available (`created` of /v1/models).
    created: u64,
}

struct Inner {
    config: GatewayConfig,
    metrics: metrics::Metrics,
    /// Unset while loading; the engine, or why it failed to load.
    engine: OnceLock<Result<Ready, String>>,
}

/// The server's state (cheap to clone). See the crate docs.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

impl Gateway {
    /// A gateway whose engine is still loading: /health answers 503 until [`Gateway::set_ready`].
    pub fn new(config: GatewayConfig) -> Gateway {
        Gateway { inner: Arc::new(Inner { config, metrics: metrics::Metrics::default(), engine: OnceLock::new() }) }
    }

    /// The engine is loaded: serve it. A chat template that does not compile makes chat requests
    /// answer 400 with the reason (and is logged); completions still work.
    pub fn set_ready(&self, backend: Arc<dyn Backend>) {
        let model = backend.model();
        let template = match &model.chat_template {
            None => Err("it has no chat_template in tokenizer_config.json".to_string()),
            Some(source) => ChatTemplate::new(source.clone(), model.bos_token.clone(), model.eos_token.clone()),
        };
        if let Err(why) = &template {
            tracing::warn!(model = %model.name, "chat requests will be refused: {why}");
        }
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let _ = self.inner.engine.set(Ok(Ready { backend, template, created }));
    }

    /// The engine failed to load: /health and every API route answer 503 with `why`.
    pub fn set_failed(&self, why: String) {
        let _ = self.inner.engine.set(Err(why));
    }

    /// Whether the engine is loaded and serving.
    pub fn is_ready(&self) -> bool {
        matches!(self.inner.engine.get(), Some(Ok(_)))
    }

    /// The routes, with the API key check, body limits and timeouts.
    pub fn router(&self) -> axum::Router {
        server::router(self.clone())
    }

    fn ready(&self) -> Result<&Ready, ApiError> {
        match self.inner.engine.get() {
            None => Err(ApiError::unavailable("the model is still loading; try again when /health answers 200")),
            Some(Err(why)) => Err(ApiError::unavailable(format!("the engine failed to load: {why}"))),
            Some(Ok(ready)) => Ok(ready),
        }
    }
}
