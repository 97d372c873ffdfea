//! The gateway in front of replicas in other processes (issue 17), on the CPU with real parts: a
//! tiny synthetic model in a real engine, served by a real tonic `ReplicaService` on loopback (a
//! minimal one written here over `awq_serve::wire`, as the worker's is), reached through
//! [`RemoteReplica`], and the gateway's HTTP API on loopback driven over plain HTTP/1.1.
//!
//! Checked: greedy tokens through the replica equal the engine's own (and HTTP answers equal a
//! local engine's); a full queue is a 429 with `Retry-After`; an unknown model a 404; a client that
//! goes away mid-stream frees the request in the engine; a replica killed mid-stream ends the
//! request with an error event (and later requests with 503); several models behind one gateway,
//! each routed to its own backend. Every wait is bounded.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use awq_gateway::{
    async_trait, combine_stats, ApiError, Backend, Gateway, GatewayConfig, ModelListing, Models, RemoteReplica,
};
use awq_model::synthetic::{write_checkpoint, SyntheticSpec};
use awq_proto::v1 as pb;
use awq_serve::engine::{EngineConfig, EngineEvent, EngineHandle, EngineStats, GenerateRequest, RequestStream};
use awq_serve::sampling::{RawSamplingParams, SamplingParams};
use awq_serve::wire;
use futures_util::Stream;
use pb::replica_service_server::{ReplicaService, ReplicaServiceServer};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tonic::{Request, Response, Status};

/// The bound on every wait of these tests.
const BOUND: Duration = Duration::from_secs(30);

async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f).await.unwrap_or_else(|_| panic!("{what}: nothing within {BOUND:?}"))
}

/// Polls `cond` every 10 ms until it holds; panics with `what` and the last value after `within`.
async fn wait_until<T: std::fmt::Debug>(
    what: &str,
    within: Duration,
    mut probe: impl FnMut() -> T,
    cond: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        let v = probe();
        if cond(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: still {v:?} after {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ----- the model and its engine -----

/// An engine on a tiny synthetic Llama (`seed` picks its weights).
struct Model {
    engine: EngineHandle,
    _dir: tempfile::TempDir,
}

fn model(seed: u64, config: impl FnOnce(EngineConfig) -> EngineConfig) -> Model {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &SyntheticSpec { seed, n_blocks: 2, ..SyntheticSpec::tiny_llama() }).unwrap();
    let base = EngineConfig {
        max_model_len: Some(256),
        kv_cache_bytes: Some(8 << 20),
        max_num_seqs: 8,
        max_waiting: 16,
        ..EngineConfig::new(dir.path())
    };
    Model { engine: EngineHandle::start(config(base)).unwrap(), _dir: dir }
}

fn greedy(max_tokens: i64) -> SamplingParams {
    let raw = RawSamplingParams {
        temperature: Some(0.0),
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..Default::default()
    };
    SamplingParams::new(raw).unwrap()
}

fn request(prompt: Vec<u32>, max_tokens: i64) -> GenerateRequest {
    GenerateRequest { prompt, params: greedy(max_tokens), prompt_logprobs: None }
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 37 + seed * 101 + 5) % 256).collect()
}

/// Every event of a stream, to its end.
async fn drain(mut stream: RequestStream) -> Vec<EngineEvent> {
    let mut events = Vec::new();
    while let Some(e) = bounded("the next event", stream.next()).await {
        events.push(e);
    }
    events
}

/// The token ids and text of a finished request's events, checking that they end with `Finished`.
fn tokens_and_text(events: &[EngineEvent]) -> (Vec<u32>, String) {
    let (last, body) = events.split_last().expect("at least the final event");
    let EngineEvent::Finished { text: tail, .. } = last else { panic!("last event: {last:?}") };
    let (mut ids, mut text) = (Vec::new(), String::new());
    for e in body {
        match e {
            EngineEvent::Tokens { tokens, text: t } => {
                ids.extend(tokens.iter().map(|t| t.id));
                text.push_str(t);
            }
            other => panic!("unexpected event before the end: {other:?}"),
        }
    }
    text.push_str(tail);
    (ids, text)
}

fn is_idle(s: &EngineStats) -> bool {
    s.num_requests_running == 0 && s.num_requests_waiting == 0 && s.kv_cache_usage == 0.0
}

// ----- the replica's gRPC service -----

/// A minimal `ReplicaService` over one engine (the worker has the production one): each call maps
/// to the engine through `awq_serve::wire`.
struct Replica {
    deployment: String,
    replica: u32,
    engine: EngineHandle,
}

impl Replica {
    fn check(&self, which: Option<&pb::ReplicaRef>) -> Result<(), Status> {
        match which {
            Some(r) if r.deployment == self.deployment && r.replica == self.replica => Ok(()),
            other => Err(Status::not_found(format!("this worker does not run {other:?}"))),
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateEvent, Status>> + Send>>;

#[async_trait]
impl ReplicaService for Replica {
    async fn describe(&self, r: Request<pb::ReplicaRef>) -> Result<Response<pb::ModelDescription>, Status> {
        self.check(Some(r.get_ref()))?;
        Ok(Response::new(wire::describe(self.engine.model())))
    }

    type GenerateStream = EventStream;

    async fn generate(&self, r: Request<pb::GenerateCall>) -> Result<Response<EventStream>, Status> {
        let call = r.into_inner();
        self.check(call.replica.as_ref())?;
        let stream: EventStream = match wire::request_from_wire(call).and_then(|req| self.engine.submit(req)) {
            Err(e) => {
                let refusal = wire::refusal_to_wire(&e).ok_or_else(|| Status::internal(e.to_string()))?;
                Box::pin(futures_util::stream::iter([Ok(wire::refused_event(refusal))]))
            }
            // Dropped when the call is (the client went away): the engine aborts the request.
            Ok(stream) => Box::pin(futures_util::stream::unfold(stream, |mut stream| async move {
                let event = stream.next().await?;
                Some((Ok(wire::event_to_wire(event)), stream))
            })),
        };
        Ok(Response::new(stream))
    }

    async fn stats(&self, r: Request<pb::ReplicaRef>) -> Result<Response<pb::ReplicaStats>, Status> {
        self.check(Some(r.get_ref()))?;
        Ok(Response::new(wire::stats_to_wire(&self.engine.stats())))
    }

    // Between pipeline stages: never called by a gateway.
    async fn stage_info(&self, _: Request<pb::ReplicaRef>) -> Result<Response<pb::StageInfoReply>, Status> {
        Err(Status::unimplemented("a whole replica"))
    }

    type StageStepStream = Pin<Box<dyn Stream<Item = Result<pb::StageStepReply, Status>> + Send>>;

    async fn stage_step(
        &self,
        _: Request<tonic::Streaming<pb::StageStepCall>>,
    ) -> Result<Response<Self::StageStepStream>, Status> {
        Err(Status::unimplemented("a whole replica"))
    }

    async fn stage_link(&self, _: Request<pb::StageLinkCall>) -> Result<Response<pb::StageLinkReply>, Status> {
        Err(Status::unimplemented("a whole replica"))
    }
}

/// A `ReplicaService` on loopback, on a runtime of its own: [`ReplicaServer::kill`] ends it as a
/// dead process ends, every connection closed and every call dropped at once.
struct ReplicaServer {
    address: String,
    runtime: Option<tokio::runtime::Runtime>,
}

impl ReplicaServer {
    fn start(engine: EngineHandle, deployment: &str, replica: u32) -> ReplicaServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let service = Replica { deployment: deployment.into(), replica, engine };
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let incoming = futures_util::stream::unfold(listener, |listener| async move {
                let accepted = listener.accept().await.map(|(socket, _)| socket);
                Some((accepted, listener))
            });
            tonic::transport::Server::builder()
                .add_service(ReplicaServiceServer::new(service))
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
        ReplicaServer { address, runtime: Some(runtime) }
    }

    fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for ReplicaServer {
    fn drop(&mut self) {
        self.kill();
    }
}

// ----- the gateway's HTTP side -----

/// A fixed set of models, as the coordinator's deployments would give them; a model without a
/// backend is one whose replicas are all down.
struct FixedModels(Vec<(String, Option<Arc<dyn Backend>>)>);

#[async_trait]
impl Models for FixedModels {
    fn list(&self) -> Vec<ModelListing> {
        let ready = self.0.iter().filter_map(|(name, b)| Some((name, b.as_ref()?)));
        ready
            .map(|(name, b)| ModelListing { name: name.clone(), created: 7, max_model_len: b.model().max_model_len })
            .collect()
    }

    async fn pick(&self, model: &str) -> Result<Arc<dyn Backend>, ApiError> {
        match self.0.iter().find(|(name, _)| name == model) {
            None => Err(ApiError::model_not_found(model, &self.0.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>())),
            Some((_, None)) => Err(ApiError::unavailable(format!("`{model}` has no ready replica"))),
            Some((_, Some(backend))) => Ok(backend.clone()),
        }
    }

    async fn stats(&self) -> Vec<(String, EngineStats)> {
        let mut out = Vec::new();
        for (name, backend) in &self.0 {
            if let Some(Ok(stats)) = match backend {
                Some(b) => Some(b.stats().await),
                None => None,
            } {
                out.push((name.clone(), combine_stats([stats])));
            }
        }
        out
    }
}

/// The gateway's routes on a loopback port (served until the test's runtime ends).
async fn serve_http(gateway: &Gateway) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = gateway.router();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// An HTTP answer: status, headers (lower-cased names), body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

async fn send_head(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> tokio::net::TcpStream {
    let mut socket = bounded("connect", tokio::net::TcpStream::connect(addr)).await.unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    bounded("send", socket.write_all(format!("{head}{body}").as_bytes())).await.unwrap();
    socket
}

/// One request over a fresh connection, read to its end.
async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Answer {
    let mut socket = send_head(addr, method, path, body).await;
    let mut raw = Vec::new();
    bounded(&format!("{method} {path}"), socket.read_to_end(&mut raw)).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok()).unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    Answer { status, headers, body: if chunked { dechunk(body) } else { body.to_string() } }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// An SSE answer being read; dropping it closes the connection (the client goes away).
struct Sse {
    status: u16,
    reader: BufReader<tokio::net::TcpStream>,
}

impl Sse {
    async fn open(addr: SocketAddr, path: &str, body: &Value) -> Sse {
        let mut reader = BufReader::new(send_head(addr, "POST", path, Some(body)).await);
        let mut status_line = String::new();
        bounded("the status line", reader.read_line(&mut status_line)).await.unwrap();
        let status = status_line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        loop {
            let mut line = String::new();
            bounded("the headers", reader.read_line(&mut line)).await.unwrap();
            if line.trim().is_empty() {
                break;
            }
        }
        Sse { status, reader }
    }

    /// The next `data:` payload; `None` at the end of the answer.
    async fn next_data(&mut self) -> Option<String> {
        loop {
            let mut line = String::new();
            if bounded("the next SSE line", self.reader.read_line(&mut line)).await.unwrap() == 0 {
                return None;
            }
            if let Some(data) = line.trim_end().strip_prefix("data: ") {
                return Some(data.to_string());
            }
        }
    }
}

fn completion(model: Option<&str>, prompt: &[u32], max_tokens: i64, more: Value) -> Value {
    let mut body = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true});
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    for (k, v) in more.as_object().into_iter().flatten() {
        body[k] = v.clone();
    }
    body
}

// ----- the tests -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_replica_generates_the_engines_tokens() {
    let m = model(1, |c| EngineConfig { served_model_name: Some("tiny".into()), ..c });
    let server = ReplicaServer::start(m.engine.clone(), "tiny-deploy", 3);
    let remote =
        bounded("connect", RemoteReplica::connect(&server.address, "tiny-deploy", 3, None, None)).await.unwrap();
    assert_eq!((remote.address(), remote.deployment(), remote.replica()), (server.address.as_str(), "tiny-deploy", 3));

    // The model as described equals the engine's.
    let (here, there) = (remote.model(), m.engine.model());
    assert_eq!(
        (&here.name, here.max_model_len, &here.eos_token_ids, &here.eos_token, here.add_bos_token),
        (&there.name, there.max_model_len, &there.eos_token_ids, &there.eos_token, there.add_bos_token)
    );
    let text = "It is a truth universally acknowledged";
    assert_eq!(
        here.tokenizer.encode(text, false).unwrap().get_ids(),
        there.tokenizer.encode(text, false).unwrap().get_ids()
    );

    // Greedy tokens: the engine alone, then through the replica, several requests at once.
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| prompt(i, 5 + 9 * i as usize)).collect();
    let mut direct = Vec::new();
    for p in &prompts {
        direct.push(tokens_and_text(&drain(m.engine.submit(request(p.clone(), 12)).unwrap()).await));
    }
    let mut streams = Vec::new();
    for p in &prompts {
        streams.push(bounded("submit", remote.submit(request(p.clone(), 12))).await.unwrap());
    }
    let mut through = Vec::new();
    for s in streams {
        through.push(tokens_and_text(&drain(s).await));
    }
    assert_eq!(through, direct);
    assert!(direct.iter().all(|(ids, _)| ids.len() == 12));
    wait_until("requests in flight", BOUND, || remote.in_flight(), |&n| n == 0).await;

    // A refusal crosses as the engine's error; the counters as the engine's.
    let too_long = bounded("submit", remote.submit(request(prompt(9, 256), 4))).await;
    assert!(
        matches!(too_long, Err(awq_serve::Error::PromptTooLong { prompt_len: 256, max_model_len: 256 })),
        "{:?}",
        too_long.err()
    );
    let idle = wait_until("the engine idle", BOUND, || m.engine.stats(), is_idle).await;
    assert_eq!(bounded("stats", remote.stats()).await.unwrap(), idle);
    assert_eq!(idle.generation_tokens_total, 2 * 4 * 12);

    // Through the HTTP API, the answer of a gateway over the local engine (echo and logprobs
    // included: the prompt's logprobs cross the wire too).
    let local = Gateway::new(GatewayConfig::default());
    local.set_ready(Arc::new(m.engine.clone()));
    let over_remote = Gateway::new(GatewayConfig::default());
    over_remote.set_ready(Arc::new(remote));
    let (local, over_remote) = (serve_http(&local).await, serve_http(&over_remote).await);
    let body = completion(Some("tiny"), &prompts[1], 6, json!({"echo": true, "logprobs": 2}));
    let a = http(local, "POST", "/v1/completions", Some(&body)).await;
    let b = http(over_remote, "POST", "/v1/completions", Some(&body)).await;
    assert_eq!((a.status, b.status), (200, 200), "{}\n{}", a.body, b.body);
    assert_eq!(a.json()["choices"], b.json()["choices"]);
    assert_eq!(b.json()["usage"]["completion_tokens"], 6);
    let (a, b) = (http(local, "GET", "/v1/models", None).await, http(over_remote, "GET", "/v1/models", None).await);
    assert_eq!(a.json()["data"][0]["id"], b.json()["data"][0]["id"]);
    assert_eq!(http(over_remote, "GET", "/health", None).await.status, 200);

    // A replica the worker does not run: connect says so.
    let err =
        bounded("connect", RemoteReplica::connect(&server.address, "tiny-deploy", 4, None, None)).await.err().unwrap();
    assert!(err.to_string().contains("replica 4 of `tiny-deploy`") && err.to_string().contains("NotFound"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after() {
    // One sequence at a time and one waiting: a long request running and one waiting fill it.
    let m = model(1, |c| EngineConfig {
        max_model_len: Some(2048),
        kv_cache_bytes: Some(16 << 20),
        max_num_seqs: 1,
        max_waiting: 1,
        ..c
    });
    let server = ReplicaServer::start(m.engine.clone(), "tiny", 0);
    let remote: Arc<dyn Backend> =
        Arc::new(bounded("connect", RemoteReplica::connect(&server.address, "tiny", 0, None, None)).await.unwrap());
    let gateway =
        Gateway::with_models(GatewayConfig::default(), Arc::new(FixedModels(vec![("tiny".into(), Some(remote))])));
    let addr = serve_http(&gateway).await;

    let running = m.engine.submit(request(prompt(1, 8), 2000)).unwrap();
    wait_until("the first request running", BOUND, || m.engine.stats(), |s| s.num_requests_running == 1).await;
    let waiting = m.engine.submit(request(prompt(2, 8), 10)).unwrap();
    let answer =
        http(addr, "POST", "/v1/completions", Some(&completion(Some("tiny"), &prompt(3, 8), 4, json!({})))).await;
    assert_eq!((answer.status, answer.header("retry-after")), (429, Some("1")), "{}", answer.body);
    let error = &answer.json()["error"];
    assert_eq!((error["type"].as_str(), error["code"].as_str()), (Some("rate_limit_error"), Some("queue_full")));
    drop((running, waiting));
    wait_until("the engine idle", BOUND, || m.engine.stats(), is_idle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_frees_its_request_in_the_replica() {
    let m = model(1, |c| EngineConfig { max_model_len: Some(2048), kv_cache_bytes: Some(16 << 20), ..c });
    let server = ReplicaServer::start(m.engine.clone(), "tiny", 0);
    let remote =
        Arc::new(bounded("connect", RemoteReplica::connect(&server.address, "tiny", 0, None, None)).await.unwrap());
    let backend: Arc<dyn Backend> = remote.clone();
    let gateway =
        Gateway::with_models(GatewayConfig::default(), Arc::new(FixedModels(vec![("tiny".into(), Some(backend))])));
    let addr = serve_http(&gateway).await;

    // Dropping a RequestStream mid-way.
    let mut stream = bounded("submit", remote.submit(request(prompt(1, 30), 1500))).await.unwrap();
    assert!(matches!(bounded("an event", stream.next()).await, Some(EngineEvent::Tokens { .. })));
    assert_eq!(remote.in_flight(), 1);
    let busy = m.engine.stats();
    assert!(busy.num_requests_running == 1 && busy.kv_cache_usage > 0.0, "{busy:?}");
    drop(stream);
    wait_until("the engine idle after the drop", Duration::from_secs(10), || m.engine.stats(), is_idle).await;
    wait_until("requests in flight", Duration::from_secs(10), || remote.in_flight(), |&n| n == 0).await;

    // A client of the HTTP API that disconnects mid-stream.
    let body = completion(None, &prompt(2, 30), 1500, json!({"stream": true}));
    let mut sse = Sse::open(addr, "/v1/completions", &body).await;
    assert_eq!(sse.status, 200);
    for _ in 0..3 {
        let data = sse.next_data().await.expect("a chunk");
        assert!(data.starts_with('{'), "{data}");
    }
    assert_eq!(m.engine.stats().num_requests_running, 1);
    drop(sse);
    wait_until("the engine idle after the disconnect", Duration::from_secs(10), || m.engine.stats(), is_idle).await;
    wait_until("requests in flight", Duration::from_secs(10), || remote.in_flight(), |&n| n == 0).await;
    let metrics = http(addr, "GET", "/metrics", None).await.body;
    assert!(
        metrics.contains("awq:request_success_total{model_name=\"tiny\",model=\"tiny\",finished_reason=\"abort\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_stream_ends_its_requests_with_an_error() {
    let m = model(1, |c| EngineConfig { max_model_len: Some(2048), kv_cache_bytes: Some(16 << 20), ..c });
    let mut server = ReplicaServer::start(m.engine.clone(), "tiny", 0);
    let remote =
        Arc::new(bounded("connect", RemoteReplica::connect(&server.address, "tiny", 0, None, None)).await.unwrap());
    let backend: Arc<dyn Backend> = remote.clone();
    let gateway =
        Gateway::with_models(GatewayConfig::default(), Arc::new(FixedModels(vec![("tiny".into(), Some(backend))])));
    let addr = serve_http(&gateway).await;

    let mut direct = bounded("submit", remote.submit(request(prompt(1, 30), 1500))).await.unwrap();
    let body = completion(Some("tiny"), &prompt(2, 30), 1500, json!({"stream": true}));
    let mut sse = Sse::open(addr, "/v1/completions", &body).await;
    assert_eq!(sse.status, 200);
    assert!(sse.next_data().await.expect("a chunk").starts_with('{'));
    assert!(matches!(bounded("an event", direct.next()).await, Some(EngineEvent::Tokens { .. })));

    let killed = Instant::now();
    server.kill();
    // The stream: tokens already on their way, then one error event naming the replica, then its
    // end; within a bound, never a hang.
    let error = loop {
        match tokio::time::timeout(Duration::from_secs(10), direct.next()).await.expect("an event within 10 s") {
            Some(EngineEvent::Tokens { .. }) => {}
            Some(EngineEvent::Error(message)) => break message,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(error.contains("replica 0 of `tiny`") && error.contains("lost"), "{error}");
    assert_eq!(bounded("the end", direct.next()).await, None);
    // The SSE answer: an error body, then [DONE].
    let mut last = Vec::new();
    while let Some(data) = sse.next_data().await {
        last.push(data);
    }
    let [.., error, done] = last.as_slice() else { panic!("{last:?}") };
    assert_eq!(done, "[DONE]");
    assert!(error.contains("\"error\"") && error.contains("lost"), "{error}");
    assert!(killed.elapsed() < Duration::from_secs(10), "{:?}", killed.elapsed());
    wait_until("requests in flight", Duration::from_secs(10), || remote.in_flight(), |&n| n == 0).await;
    // The engine lost its calls with the server: both requests aborted.
    wait_until("the engine idle after the kill", Duration::from_secs(10), || m.engine.stats(), is_idle).await;

    // Later requests: 503 at once (nothing listens there any more).
    let answer =
        http(addr, "POST", "/v1/completions", Some(&completion(Some("tiny"), &prompt(3, 8), 4, json!({})))).await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert!(answer.body.contains("replica 0 of `tiny`"), "{}", answer.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gateway_serves_several_models_each_on_its_own_backend() {
    // `alpha`: a replica in a "worker"; `beta`: an engine in this process, of other weights;
    // `gamma`: deployed, no replica ready.
    let (a, b) = (model(1, |c| c), model(2, |c| c));
    let server = ReplicaServer::start(a.engine.clone(), "alpha", 0);
    let alpha: Arc<dyn Backend> =
        Arc::new(bounded("connect", RemoteReplica::connect(&server.address, "alpha", 0, None, None)).await.unwrap());
    let models = FixedModels(vec![
        ("alpha".into(), Some(alpha)),
        ("beta".into(), Some(Arc::new(b.engine.clone()))),
        ("gamma".into(), None),
    ]);
    let gateway = Gateway::with_models(GatewayConfig::default(), Arc::new(models));
    assert!(gateway.is_ready());
    let addr = serve_http(&gateway).await;

    let listed = http(addr, "GET", "/v1/models", None).await.json();
    let ids: Vec<&str> = listed["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["alpha", "beta"]);
    assert_eq!(listed["data"][0]["max_model_len"], 256);
    assert_eq!(http(addr, "GET", "/health", None).await.status, 200);

    // Each model answers with its own engine's greedy tokens, under the name asked for.
    let p = prompt(5, 12);
    let want_a = tokens_and_text(&drain(a.engine.submit(request(p.clone(), 8)).unwrap()).await);
    let want_b = tokens_and_text(&drain(b.engine.submit(request(p.clone(), 8)).unwrap()).await);
    assert_ne!(want_a.0, want_b.0, "two models of other weights generate the same tokens");
    for (name, want, engine) in [("alpha", &want_a, &a.engine), ("beta", &want_b, &b.engine)] {
        let before = engine.stats().generation_tokens_total;
        let answer = http(addr, "POST", "/v1/completions", Some(&completion(Some(name), &p, 8, json!({})))).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        let v = answer.json();
        assert_eq!((v["model"].as_str(), v["choices"][0]["text"].as_str()), (Some(name), Some(want.1.as_str())));
        let after =
            wait_until("the counters", BOUND, || engine.stats(), |s| s.generation_tokens_total == before + 8).await;
        assert_eq!(after.generation_tokens_total, before + 8);
    }
    // /tokenize of each model with its own tokenizer; chat without a template: 400 naming it.
    let t = http(addr, "POST", "/tokenize", Some(&json!({"model": "alpha", "prompt": "hi"}))).await;
    assert_eq!((t.status, t.json()["count"].as_u64()), (200, Some(2)), "{}", t.body);
    let chat = json!({"model": "beta", "messages": [{"role": "user", "content": "hi"}]});
    let c = http(addr, "POST", "/v1/chat/completions", Some(&chat)).await;
    assert_eq!(c.status, 400, "{}", c.body);
    assert!(c.json()["error"]["message"].as_str().unwrap().contains("`beta` cannot chat"), "{}", c.body);

    // Unknown model: 404 in OpenAI's shape, naming what is served; no model: 400; no replica: 503.
    let answer = http(addr, "POST", "/v1/completions", Some(&completion(Some("delta"), &p, 2, json!({})))).await;
    assert_eq!(answer.status, 404, "{}", answer.body);
    let error = &answer.json()["error"];
    assert_eq!((error["code"].as_str(), error["param"].as_str()), (Some("model_not_found"), Some("model")));
    assert!(error["message"].as_str().unwrap().contains("`alpha`, `beta`, `gamma`"), "{error}");
    let answer = http(addr, "POST", "/v1/completions", Some(&completion(None, &p, 2, json!({})))).await;
    assert_eq!((answer.status, answer.json()["error"]["param"].as_str()), (400, Some("model")), "{}", answer.body);
    let answer = http(addr, "POST", "/v1/completions", Some(&completion(Some("gamma"), &p, 2, json!({})))).await;
    assert_eq!(answer.status, 503, "{}", answer.body);

    // /metrics: each model's series under its label, the engine's counters from its own backend.
    let metrics = http(addr, "GET", "/metrics", None).await.body;
    let series = |name: &str, model: &str| {
        let prefix = format!("{name}{{model_name=\"{model}\",model=\"{model}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(prefix.as_str())).map(str::to_string)
    };
    let generated = |e: &EngineHandle| e.stats().generation_tokens_total.to_string();
    assert_eq!(series("awq:generation_tokens_total", "alpha"), Some(generated(&a.engine)), "{metrics}");
    assert_eq!(series("awq:generation_tokens_total", "beta"), Some(generated(&b.engine)), "{metrics}");
    assert_eq!(series("awq:e2e_request_latency_seconds_count", "alpha").as_deref(), Some("1"), "{metrics}");
    assert_eq!(series("awq:generation_tokens_total", "gamma"), None, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_of_models_none_ready_is_unhealthy() {
    let gateway = Gateway::with_models(GatewayConfig::default(), Arc::new(FixedModels(vec![("gamma".into(), None)])));
    assert!(!gateway.is_ready());
    let addr = serve_http(&gateway).await;
    let health = http(addr, "GET", "/health", None).await;
    assert_eq!(health.status, 503, "{}", health.body);
    assert_eq!(http(addr, "GET", "/v1/models", None).await.status, 503);
    // A connection refused: connect fails within its bound, naming the replica.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let err = bounded("connect", RemoteReplica::connect(&closed, "gamma", 1, None, None)).await.err().unwrap();
    assert!(err.to_string().starts_with(&format!("replica 1 of `gamma` at {closed}: cannot connect")), "{err}");
}
