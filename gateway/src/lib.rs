//! The OpenAI-compatible HTTP API (DESIGN.md, "Serving"), on axum, for one model (`awq serve`) or
//! for every model of a cluster (the coordinator: one model per deployment).
//!
//! [`Gateway`] is the server's state: the API keys, the metrics it measures, and where it finds each
//! model's engine ([`Models`]: by the request's `model` field, a [`Backend`] to submit to).
//! [`Gateway::new`] + [`Gateway::set_ready`] serve one engine (until it is loaded every API route
//! answers 503 and /health says so); [`Gateway::with_models`] serves a set that changes while it
//! runs (the coordinator's deployments, each backend a [`RemoteReplica`] over gRPC).
//! [`Gateway::router`] gives the routes (`server`): /v1/completions, /v1/chat/completions (SSE
//! with `stream: true`), /v1/models, /health, /metrics, /tokenize, /detokenize.
//!
//! A request goes: its `model` field -> [`Models::pick`] (404 for a model not served, 503 when none
//! of its replicas is ready) -> `protocol` (OpenAI's JSON shapes) -> `validation` (checked once
//! into a `ValidRequest`: chat template (`chat_template`, compiled once per model and backend),
//! tokens, length, sampling params) -> [`Backend::submit`] -> the engine's events, formatted as
//! one response or as SSE chunks. Errors become HTTP statuses in one place (`error`, [`ApiError`]).
//! A client that goes away drops the response, which drops the engine's `RequestStream`, which
//! aborts the request and frees its KV blocks (for a remote replica: the gRPC call is cancelled,
//! and the worker drops its stream). `metrics` writes the Prometheus exposition.
//!
//! Shutdown (`drain`): after [`Gateway::start_draining`] every new request, /health included, is
//! answered 503 while the requests already admitted finish; [`Gateway::drained`] says when they
//! have, and the binary then stops the server.
//!
//! What this crate never does: compute on tensors, schedule, sample (the engine, `awq-serve`),
//! place replicas or choose among them (the [`Models`] implementation: the coordinator's), or parse
//! command lines (`awq serve` in `cli/`).

mod chat_template;
pub mod cluster;
mod drain;
mod error;
pub mod listener;
mod metrics;
mod protocol;
pub mod remote;
mod server;
mod validation;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use awq_auth::ApiKeys;
use awq_serve::engine::{EngineStats, GenerateRequest, ModelInfo, RequestStream};

pub use chat_template::ChatTemplate;
pub use error::ApiError;
pub use remote::RemoteReplica;
/// The attribute for implementing [`Backend`] and [`Models`] (the `async-trait` crate, as tonic
/// re-exports it).
pub use tonic::async_trait;

/// What the gateway needs of one engine: [`awq_serve::engine::EngineHandle`] in `awq serve`, a
/// [`RemoteReplica`] for a replica in a worker.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Queues a tokenized request; its events arrive on the returned stream (dropping it aborts).
    /// Errors: the engine's refusal (a full queue -> 429, a bad parameter -> 400, ...), or
    /// `EngineStopped` when the engine cannot take requests (-> 503).
    async fn submit(&self, request: GenerateRequest) -> Result<RequestStream, awq_serve::Error>;
    /// The engine's counters now (for /metrics). Errors: `EngineStopped` when it cannot be asked.
    async fn stats(&self) -> Result<EngineStats, awq_serve::Error>;
    /// The model it serves (a remote backend describes it once, when it connects).
    fn model(&self) -> &ModelInfo;
}

#[async_trait]
impl Backend for awq_serve::engine::EngineHandle {
    async fn submit(&self, request: GenerateRequest) -> Result<RequestStream, awq_serve::Error> {
        awq_serve::engine::EngineHandle::submit(self, request)
    }
    async fn stats(&self) -> Result<EngineStats, awq_serve::Error> {
        Ok(awq_serve::engine::EngineHandle::stats(self))
    }
    fn model(&self) -> &ModelInfo {
        awq_serve::engine::EngineHandle::model(self)
    }
}

/// How long [`Models::refresh`] may hold up /health and /v1/models (a health probe must answer
/// within about a second).
pub const REFRESH_BOUND: std::time::Duration = std::time::Duration::from_millis(500);

/// A model as /v1/models lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelListing {
    /// The name requests give as `model` (a deployment's name on the cluster).
    pub name: String,
    /// When it became available, in seconds since the Unix epoch (OpenAI's `created`).
    pub created: u64,
    pub max_model_len: usize,
}

/// Where the gateway finds the backend of each model it serves: the coordinator's deployments,
/// or the one engine of `awq serve` (what [`Gateway::new`] builds).
#[async_trait]
pub trait Models: Send + Sync + 'static {
    /// The models served now (at least one replica ready), in the order /v1/models lists them.
    fn list(&self) -> Vec<ModelListing>;

    /// Brings [`Models::list`] up to date with the replicas ready now, within [`REFRESH_BOUND`]
    /// (a cluster's: connects those that became ready since its last look). Called before
    /// /health, /v1/models and a request without `model` answer, so that a model is listed as soon
    /// as its replica is ready, not at the next periodic refresh.
    async fn refresh(&self) {}

    /// The backend that should run a request for `model` (the least loaded ready replica).
    /// Errors: [`ApiError::model_not_found`] (404) for a model not served,
    /// [`ApiError::unavailable`] (503) when it has no ready replica.
    ///
    /// The backend's [`ModelInfo`] tokenizes and templates the request; its `name` need not be
    /// `model` (responses carry `model`).
    async fn pick(&self, model: &str) -> Result<Arc<dyn Backend>, ApiError>;

    /// The counters of each model served, for /metrics (a model of several replicas: their sum,
    /// [`combine_stats`]); a model whose replicas cannot be asked now is left out.
    async fn stats(&self) -> Vec<(String, EngineStats)>;

    /// /health: `Ok` (200) when at least one model is served, else the 503 that says why.
    fn health(&self) -> Result<(), ApiError> {
        match self.list().is_empty() {
            true => Err(no_model_served()),
            false => Ok(()),
        }
    }
}

/// The counters of several replicas of one model as one: counts and totals added, the KV cache's
/// usage weighted by each replica's capacity.
pub fn combine_stats(stats: impl IntoIterator<Item = EngineStats>) -> EngineStats {
    let mut sum = EngineStats::default();
    let mut used_tokens = 0.0;
    for s in stats {
        sum.num_requests_running += s.num_requests_running;
        sum.num_requests_waiting += s.num_requests_waiting;
        sum.prompt_tokens_total += s.prompt_tokens_total;
        sum.generation_tokens_total += s.generation_tokens_total;
        sum.prefix_cache_queries_tokens += s.prefix_cache_queries_tokens;
        sum.prefix_cache_hits_tokens += s.prefix_cache_hits_tokens;
        sum.num_preemptions_total += s.num_preemptions_total;
        sum.kv_capacity_tokens += s.kv_capacity_tokens;
        used_tokens += s.kv_cache_usage * s.kv_capacity_tokens as f64;
    }
    if sum.kv_capacity_tokens > 0 {
        sum.kv_cache_usage = used_tokens / sum.kv_capacity_tokens as f64;
    }
    sum
}

/// Settings of the HTTP side.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// One of them is required as `Authorization: Bearer KEY` on /v1/*, /tokenize and /detokenize
    /// (none: the API is open).
    pub api_keys: ApiKeys,
    /// The largest request body accepted (413 above).
    pub max_body_bytes: usize,
    /// How long a client may take to send its body.
    pub body_timeout: std::time::Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            api_keys: ApiKeys::none(),
            max_body_bytes: 32 << 20,
            body_timeout: std::time::Duration::from_secs(60),
        }
    }
}

/// The one engine of `awq serve`: loading, loaded or failed to load.
struct OneModel {
    /// Unset while loading; the engine, or why it failed to load.
    engine: OnceLock<Result<Loaded, String>>,
}

struct Loaded {
    backend: Arc<dyn Backend>,
    /// When it became ready (`created` of /v1/models).
    created: u64,
}

impl OneModel {
    fn ready(&self) -> Result<&Loaded, ApiError> {
        match self.engine.get() {
            None => Err(ApiError::unavailable("the model is still loading; try again when /health answers 200")),
            Some(Err(why)) => Err(ApiError::unavailable(format!("the engine failed to load: {why}"))),
            Some(Ok(loaded)) => Ok(loaded),
        }
    }
}

#[async_trait]
impl Models for OneModel {
    fn list(&self) -> Vec<ModelListing> {
        self.ready().map_or(Vec::new(), |loaded| {
            let m = loaded.backend.model();
            vec![ModelListing { name: m.name.clone(), created: loaded.created, max_model_len: m.max_model_len }]
        })
    }

    async fn pick(&self, model: &str) -> Result<Arc<dyn Backend>, ApiError> {
        let backend = &self.ready()?.backend;
        let served = &backend.model().name;
        match model == served {
            true => Ok(backend.clone()),
            false => Err(ApiError::model_not_found(model, std::slice::from_ref(served))),
        }
    }

    async fn stats(&self) -> Vec<(String, EngineStats)> {
        let Ok(Loaded { backend, .. }) = self.ready() else { return Vec::new() };
        match backend.stats().await {
            Ok(stats) => vec![(backend.model().name.clone(), stats)],
            Err(e) => {
                tracing::warn!("/metrics: the engine's counters: {e}");
                Vec::new()
            }
        }
    }

    fn health(&self) -> Result<(), ApiError> {
        self.ready().map(|_| ())
    }
}

/// A model as one request sees it: its backend, its [`ModelInfo`] under the name served, its chat
/// template compiled, its latency histograms.
struct Served {
    backend: Arc<dyn Backend>,
    /// The backend's model, `name` set to the name requests use.
    model: Arc<ModelInfo>,
    /// The compiled chat template, or why the model has none.
    template: Arc<Result<ChatTemplate, String>>,
    metrics: Arc<metrics::ModelMetrics>,
}

/// What is derived once from a backend's model (the chat template takes a millisecond or more to
/// compile): kept while the backend lives.
struct Prepared {
    backend: Weak<dyn Backend>,
    model: Arc<ModelInfo>,
    template: Arc<Result<ChatTemplate, String>>,
    metrics: Arc<metrics::ModelMetrics>,
}

struct Inner {
    config: GatewayConfig,
    models: Arc<dyn Models>,
    /// `Some` for [`Gateway::new`]: the engine [`Gateway::set_ready`] sets.
    one: Option<Arc<OneModel>>,
    metrics: metrics::Metrics,
    /// By the name served: what each of its backends' models gave (several replicas, each its own).
    prepared: Mutex<HashMap<String, Vec<Prepared>>>,
    /// The requests admitted, and whether new ones still are.
    drain: Arc<drain::Drain>,
}

/// The server's state (cheap to clone). See the crate docs.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

impl Gateway {
    /// A gateway of one engine, still loading: /health answers 503 until [`Gateway::set_ready`].
    pub fn new(config: GatewayConfig) -> Gateway {
        let one = Arc::new(OneModel { engine: OnceLock::new() });
        Gateway::build(config, one.clone(), Some(one))
    }

    /// A gateway of the models `models` serves, each found by the request's `model` field; /health
    /// answers 200 while at least one is served ([`Models::health`]).
    pub fn with_models(config: GatewayConfig, models: Arc<dyn Models>) -> Gateway {
        Gateway::build(config, models, None)
    }

    fn build(config: GatewayConfig, models: Arc<dyn Models>, one: Option<Arc<OneModel>>) -> Gateway {
        let inner = Inner {
            config,
            models,
            one,
            metrics: Default::default(),
            prepared: Default::default(),
            drain: Default::default(),
        };
        Gateway { inner: Arc::new(inner) }
    }

    /// The engine of a gateway made by [`Gateway::new`] is loaded: serve it. A chat template that
    /// does not compile makes chat requests answer 400 with the reason (and is logged when the
    /// engine is set); completions still work. On a gateway made by [`Gateway::with_models`] this
    /// does nothing (and logs an error).
    pub fn set_ready(&self, backend: Arc<dyn Backend>) {
        let Some(one) = &self.inner.one else {
            tracing::error!("set_ready on a gateway of several models: ignored (its Models says what it serves)");
            return;
        };
        let name = backend.model().name.clone();
        self.served_by(&name, backend.clone());
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let _ = one.engine.set(Ok(Loaded { backend, created }));
    }

    /// The engine of a gateway made by [`Gateway::new`] failed to load: /health and every API route
    /// answer 503 with `why`. On a gateway made by [`Gateway::with_models`] this does nothing.
    pub fn set_failed(&self, why: String) {
        match &self.inner.one {
            Some(one) => {
                let _ = one.engine.set(Err(why));
            }
            None => tracing::error!("set_failed on a gateway of several models: ignored ({why})"),
        }
    }

    /// Whether /health answers 200: the engine is loaded (one model), or at least one model is
    /// served.
    pub fn is_ready(&self) -> bool {
        self.inner.models.health().is_ok()
    }

    /// Begins the drain before a shutdown: from now on every request but /metrics is answered 503
    /// (`server_shutting_down`, with `Connection: close`), /health included, while those admitted
    /// before run on. See [`Gateway::drained`].
    pub fn start_draining(&self) {
        self.inner.drain.start();
    }

    /// Resolves once every request admitted before [`Gateway::start_draining`] has finished: its
    /// response sent to the last byte (a stream: its `[DONE]`), or its client gone.
    pub async fn drained(&self) {
        self.inner.drain.drained().await
    }

    /// Requests admitted whose responses are not finished yet.
    pub fn in_flight(&self) -> usize {
        self.inner.drain.in_flight()
    }

    /// The routes, with the API key check, body limits and timeouts.
    pub fn router(&self) -> axum::Router {
        server::router(self.clone())
    }

    /// The model a request asks for (`None`: the field is absent, which names the only model
    /// served, as vLLM's one-model server does), with the backend to run it.
    async fn served(&self, asked: Option<&str>) -> Result<Served, ApiError> {
        let name = match asked {
            Some(name) => name.to_string(),
            None => {
                self.inner.models.refresh().await;
                let mut list = self.inner.models.list();
                match list.len() {
                    0 => return Err(self.inner.models.health().err().unwrap_or_else(no_model_served)),
                    1 => list.pop().expect("one model").name,
                    _ => {
                        let names: Vec<String> = list.into_iter().map(|m| m.name).collect();
                        return Err(ApiError::invalid_param(
                            "model",
                            format!("model is required: this server serves {}", quoted(&names)),
                        ));
                    }
                }
            }
        };
        let backend = self.inner.models.pick(&name).await?;
        Ok(self.served_by(&name, backend))
    }

    /// `backend` serving the model named `name`, with what its model gives, computed once per
    /// backend (its chat template compiled); entries of backends since dropped are forgotten here.
    fn served_by(&self, name: &str, backend: Arc<dyn Backend>) -> Served {
        let lock = || self.inner.prepared.lock().expect("no code panics holding this lock");
        let found = lock().get(name).and_then(|entries| {
            let e = entries.iter().find(|e| std::ptr::addr_eq(e.backend.as_ptr(), Arc::as_ptr(&backend)))?;
            Some((e.model.clone(), e.template.clone(), e.metrics.clone()))
        });
        let (model, template, metrics) = match found {
            Some(found) => found,
            None => {
                // Compiled outside the lock; two requests racing compile it twice, harmlessly.
                let mut model = backend.model().clone();
                let template = Arc::new(match &model.chat_template {
                    None => Err("it has no chat_template in tokenizer_config.json".to_string()),
                    Some(source) => ChatTemplate::new(source.clone(), model.bos_token.clone(), model.eos_token.clone()),
                });
                if let Err(why) = template.as_ref() {
                    tracing::warn!(model = %name, "chat requests will be refused: {why}");
                }
                model.name = name.to_string();
                let (model, metrics) = (Arc::new(model), self.inner.metrics.of(name));
                let mut prepared = lock();
                let entries = prepared.entry(name.to_string()).or_default();
                entries.retain(|e| e.backend.strong_count() > 0);
                entries.push(Prepared {
                    backend: Arc::downgrade(&backend),
                    model: model.clone(),
                    template: template.clone(),
                    metrics: metrics.clone(),
                });
                (model, template, metrics)
            }
        };
        Served { backend, model, template, metrics }
    }
}

fn no_model_served() -> ApiError {
    ApiError::unavailable("no model is ready to serve; try again when /health answers 200")
}

/// `a`, `b`, `c` (a list of names in a message).
fn quoted(names: &[String]) -> String {
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}
