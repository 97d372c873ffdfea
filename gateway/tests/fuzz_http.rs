//! Fuzzing every HTTP endpoint's JSON (issue 20, "Bad input"): the gateway's router, in front of a
//! real engine on a tiny synthetic model (CPU), gets request bodies mutated from valid OpenAI
//! requests (fields of every wrong type, numbers at and past their limits, huge `max_tokens`,
//! `logprobs`, `n` and `stop` lists, nested and truncated JSON, chat messages that break the
//! template) and random requests to any route. Every answer must be a status with OpenAI's error
//! body (never a 500), every stream must end, and no request may stay in the engine afterwards.
//! Budgets and replay: the `awq-fuzz` crate docs (`AWQ_FUZZ_SECONDS`, ...).

use std::sync::Arc;
use std::time::Duration;

use awq_fuzz::{json, Outcome, Rng, Target};
use awq_gateway::{Gateway, GatewayConfig};
use awq_model::synthetic::{write_checkpoint, SyntheticSpec};
use awq_serve::engine::{EngineConfig, EngineHandle};
use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

#[global_allocator]
static ALLOC: awq_fuzz::TrackingAllocator = awq_fuzz::TrackingAllocator;

fn pick<'a, T>(rng: &mut Rng, items: &'a [T]) -> &'a T {
    &items[rng.below(items.len())]
}

const API_KEY: &str = "fuzz-key";

/// ChatML, as SmolLM2's tokenizer_config.json has it.
const CHAT_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}\
{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + \
message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The gateway over an engine on a tiny model, and that engine (to see it return to idle).
struct Server {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
    engine: Arc<EngineHandle>,
    _model: tempfile::TempDir,
}

fn start(target: &str) -> Server {
    let model = tempfile::tempdir().unwrap();
    write_checkpoint(model.path(), &SyntheticSpec { n_blocks: 2, ..SyntheticSpec::tiny_llama() }).unwrap();
    let tokenizer_config = json!({"add_bos_token": false, "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE});
    std::fs::write(model.path().join("tokenizer_config.json"), tokenizer_config.to_string()).unwrap();
    let config = EngineConfig {
        served_model_name: Some("tiny".into()),
        max_model_len: Some(96),
        kv_cache_bytes: Some(4 << 20),
        max_num_seqs: 8,
        max_waiting: 8,
        ..EngineConfig::new(model.path())
    };
    let engine = Arc::new(EngineHandle::start(config).unwrap());
    let gateway = Gateway::new(GatewayConfig {
        api_keys: [awq_auth::Secret::new(API_KEY, "test").expect("a key")].into_iter().collect(),
        max_body_bytes: 1 << 20,
        ..Default::default()
    });
    gateway.set_ready(engine.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(awq_fuzz::thread_name(target))
        .enable_all()
        .build()
        .unwrap();
    Server { runtime, router: gateway.router(), engine, _model: model }
}

impl Server {
    /// Sends one request and reads the whole answer; checks what every answer must be.
    fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Outcome {
        let mut request = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let Ok(request) = request.body(Body::from(body)) else { return Outcome::Refused };
        let router = self.router.clone();
        let (status, content_type, bytes) = self.runtime.block_on(async move {
            let response = router.oneshot(request).await.expect("the router answers");
            let status = response.status().as_u16();
            let content_type =
                response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            let bytes = response.into_body().collect().await.expect("the body ends").to_bytes();
            (status, content_type, bytes)
        });
        let text = String::from_utf8_lossy(&bytes);
        assert!(status != 500, "a client's request made a 500: {text}");
        if method == "HEAD" {
            // Headers only, by definition.
        } else if status >= 400 {
            if content_type.starts_with("application/json") {
                let v: Value = serde_json::from_slice(&bytes)
                    .unwrap_or_else(|e| panic!("{status}: error body is not JSON ({e}): {text}"));
                assert!(v["error"]["message"].is_string(), "{status}: not OpenAI's error shape: {text}");
            }
        } else if content_type.starts_with("text/event-stream") {
            let events: Vec<&str> = text.split("\n\n").filter(|e| !e.trim().is_empty()).collect();
            let last = events.last().copied().unwrap_or("");
            assert!(
                last.trim() == "data: [DONE]" || last.contains("\"error\""),
                "a stream ends with [DONE] or an error: {text}"
            );
        } else if content_type.starts_with("application/json") {
            serde_json::from_slice::<Value>(&bytes)
                .unwrap_or_else(|e| panic!("{status}: body is not JSON ({e}): {text}"));
        }
        self.wait_idle();
        if (200..300).contains(&status) {
            Outcome::Accepted
        } else {
            Outcome::Refused
        }
    }

    /// Every request ended: none may stay running or waiting in the engine.
    fn wait_idle(&self) {
        for _ in 0..2000 {
            let s = self.engine.stats();
            if s.num_requests_running == 0 && s.num_requests_waiting == 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("a request stayed in the engine after its answer: {:?}", self.engine.stats());
    }

    fn post(&self, path: &str, body: &[u8]) -> Outcome {
        let auth = format!("Bearer {API_KEY}");
        self.send("POST", path, &[("content-type", "application/json"), ("authorization", &auth)], body.to_vec())
    }
}

/// The sampling fields both generating endpoints take.
const SAMPLING_FIELDS: &[&str] = &[
    "model",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "max_tokens",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "n",
    "stream",
    "stream_options",
    "include_usage",
];

/// Fuzzes the JSON of `path`: seeds and tree mutations of them with `fields` set to anything.
fn fuzz_endpoint(name: &'static str, path: &'static str, seeds: Vec<Value>, fields: &'static [&'static str]) {
    let mut target = Target::new(name).input_timeout(Duration::from_secs(20));
    for s in &seeds {
        target = target.seed(serde_json::to_vec(s).unwrap());
    }
    target = target.generator(move |rng| {
        let all: Vec<&str> = fields.iter().chain(SAMPLING_FIELDS).copied().collect();
        serde_json::to_vec(&json::mutate(pick(rng, &seeds), rng, &all)).unwrap()
    });
    target.run(move || {
        let server = start(name);
        move |input: &[u8]| server.post(path, input)
    });
}

#[test]
fn fuzz_completions() {
    let seeds = vec![
        json!({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}),
        json!({"prompt": [1, 2, 3, 4], "max_tokens": 4, "echo": true, "logprobs": 2, "stream": true,
               "stream_options": {"include_usage": true}}),
        json!({"prompt": ["one prompt"], "max_tokens": 6, "stop": ["e", "t"], "top_k": 5, "top_p": 0.9,
               "seed": 7, "temperature": 0.8, "presence_penalty": 0.5, "frequency_penalty": 0.5}),
        json!({"prompt": [[5, 6, 7]], "max_tokens": 3, "min_p": 0.1, "repetition_penalty": 1.2,
               "stop_token_ids": [9], "ignore_eos": true, "n": 1}),
    ];
    fuzz_endpoint("completions", "/v1/completions", seeds, &["prompt", "echo", "logprobs", "best_of", "suffix"]);
}

#[test]
fn fuzz_chat_completions() {
    let seeds = vec![
        json!({"model": "tiny", "messages": [{"role": "user", "content": "What is the capital of France?"}],
               "max_tokens": 8, "temperature": 0}),
        json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}],
               "max_completion_tokens": 4, "stream": true, "logprobs": true, "top_logprobs": 2}),
        json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "parts"}, {"type": "text", "text": "!"}]}],
               "max_tokens": 4, "add_generation_prompt": false, "stop": "."}),
    ];
    let fields = &[
        "messages",
        "role",
        "content",
        "name",
        "type",
        "text",
        "logprobs",
        "top_logprobs",
        "max_completion_tokens",
        "add_generation_prompt",
    ];
    fuzz_endpoint("chat_completions", "/v1/chat/completions", seeds, fields);
}

#[test]
fn fuzz_tokenize() {
    let seeds = vec![
        json!({"model": "tiny", "prompt": "tokens of this text"}),
        json!({"prompt": "x", "add_special_tokens": true}),
        json!({"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": true}),
    ];
    fuzz_endpoint(
        "tokenize",
        "/tokenize",
        seeds,
        &["prompt", "messages", "role", "content", "add_special_tokens", "add_generation_prompt"],
    );
}

#[test]
fn fuzz_detokenize() {
    let seeds = vec![
        json!({"model": "tiny", "tokens": [72, 105, 33]}),
        json!({"tokens": []}),
        json!({"tokens": [256, 0, 319]}),
    ];
    fuzz_endpoint("detokenize", "/detokenize", seeds, &["tokens"]);
}

/// An input to any route: method, path, headers from its first three bytes, then the body.
fn route_input(method: u8, path: u8, headers: u8, body: &[u8]) -> Vec<u8> {
    let mut input = vec![method, path, headers];
    input.extend_from_slice(body);
    input
}

const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH"];
const PATHS: &[&str] = &[
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/tokenize",
    "/detokenize",
    "/health",
    "/metrics",
    "/",
    "/v1",
    "/v1/completions/",
    "/v1/models/tiny",
    "/v1/completions?stream=true",
    "/%2e%2e/etc/passwd",
    "//v1//models",
];

#[test]
fn fuzz_http_routes() {
    let mut target = Target::new("http_routes").input_timeout(Duration::from_secs(20));
    let body = br#"{"prompt": "hi", "max_tokens": 2}"#;
    for (m, p) in [(1, 0), (0, 2), (0, 5), (0, 6), (1, 3), (1, 4), (2, 0), (0, 7)] {
        target = target.seed(route_input(m, p, 0b11, body));
    }
    target.run(|| {
        let server = start("http_routes");
        move |input: &[u8]| {
            let [method, path, flags, body @ ..] = input else { return Outcome::Refused };
            let method = METHODS[*method as usize % METHODS.len()];
            let path = PATHS[*path as usize % PATHS.len()];
            let auth = match flags & 0b11 {
                0 => None,
                1 => Some("Bearer wrong".to_string()),
                2 => Some(API_KEY.to_string()),
                _ => Some(format!("Bearer {API_KEY}")),
            };
            let content_type = match (flags >> 2) & 0b11 {
                0 => Some("application/json"),
                1 => Some("text/plain"),
                2 => Some("application/json; charset=utf-8"),
                _ => None,
            };
            let mut headers: Vec<(&str, &str)> = Vec::new();
            if let Some(a) = &auth {
                headers.push(("authorization", a));
            }
            if let Some(c) = content_type {
                headers.push(("content-type", c));
            }
            server.send(method, path, &headers, body.to_vec())
        }
    });
}

#[test]
fn regress_repetition_penalty_that_is_zero_as_f32() {
    // 1e-300 passed the check (> 0 as f64) and became 0 as f32: logits divided by it were infinite,
    // no token was a candidate, the sampler panicked on the engine's thread and the request hung.
    let server = start("regress_penalty");
    for penalty in ["1e-300", "1e300"] {
        let body = format!(r#"{{"prompt": [1, 2], "max_tokens": 3, "min_p": 0.1, "repetition_penalty": {penalty}}}"#);
        assert_eq!(server.post("/v1/completions", body.as_bytes()), Outcome::Refused, "{penalty}");
    }
    let body = br#"{"prompt": [1, 2], "max_tokens": 3, "repetition_penalty": 1.5}"#;
    assert_eq!(server.post("/v1/completions", body), Outcome::Accepted);
}
