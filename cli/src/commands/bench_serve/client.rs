//! The HTTP side of `awq bench serve`: a pooled HTTP/1.1 client (hyper), the server's JSON
//! endpoints, and one streamed completion measured as `vllm bench serve` measures it
//! (`async_request_openai_completions` in vllm/benchmarks/lib/endpoint_request_func.py).
//!
//! Every wait is bounded by the `--timeout` of one request. A streamed request never fails the
//! command: what went wrong (a status other than 200, an error payload in the stream, a stream cut
//! before `data: [DONE]`, a timeout) becomes its [`Outcome`]'s message. The SSE parser and the
//! per-request bookkeeping ([`StreamTimer`]) are pure and tested here; plain `http://` only.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::stats::{Outcome, RequestTiming};

/// The most of a JSON answer (or an error body) read into memory.
const MAX_BODY_BYTES: usize = 64 << 20;

/// A server's base URL with a connection pool and the API key: one per run, shared by every
/// request (cloning shares the pool).
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    /// `http://host:port` plus any path prefix, without a trailing `/` or `/v1`.
    base: String,
    auth: Option<HeaderValue>,
    timeout: Duration,
}

impl Http {
    pub fn new(url: &str, api_key: Option<&str>, timeout: Duration) -> Result<Http> {
        let base = base_url(url)?;
        let auth = match api_key.filter(|k| !k.is_empty()) {
            None => None,
            Some(k) => Some(
                HeaderValue::from_str(&format!("Bearer {k}"))
                    .context("--api-key holds characters an HTTP header cannot carry")?,
            ),
        };
        let mut connector = HttpConnector::new();
        // Requests are small and latency is what is measured: no Nagle delay on their bytes.
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Http { client, base, auth, timeout })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str, body: Bytes) -> Result<Request<Full<Bytes>>> {
        let uri: Uri =
            format!("{}{path}", self.base).parse().with_context(|| format!("{}{path} is not a URL", self.base))?;
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(auth) = &self.auth {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        if !body.is_empty() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        Ok(req.body(Full::new(body))?)
    }

    /// GET `path`, expecting 200 and JSON.
    pub async fn get_json(&self, path: &str) -> Result<Value> {
        self.json(Method::GET, path, Bytes::new()).await
    }

    /// POST `body` to `path`, expecting 200 and JSON.
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Value> {
        self.json(Method::POST, path, Bytes::from(body.to_string())).await
    }

    async fn json(&self, method: Method, path: &str, body: Bytes) -> Result<Value> {
        let what = format!("{method} {}{path}", self.base);
        let call = async {
            let resp =
                self.client.request(self.request(method, path, body)?).await.map_err(|e| anyhow::anyhow!(chain(&e)))?;
            let status = resp.status();
            let bytes = read_body(resp.into_body()).await?;
            if status != StatusCode::OK {
                bail!("{}", error_message(status, &bytes));
            }
            serde_json::from_slice(&bytes).context("the answer is not JSON")
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.with_context(|| what),
            Err(_) => bail!("{what}: no answer within {} s (--timeout)", self.timeout.as_secs_f64()),
        }
    }

    /// POST one streamed completion (`body` is its JSON, with `stream: true`) and measure it;
    /// `prompt_len` stands in for the usage chunk's `prompt_tokens` when the server sends none.
    pub async fn completion(&self, body: Bytes, prompt_len: usize) -> Outcome {
        let sent = Instant::now();
        match tokio::time::timeout(self.timeout, self.stream(body, prompt_len, sent)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("no complete answer within {} s (--timeout)", self.timeout.as_secs_f64())),
        }
    }

    async fn stream(&self, body: Bytes, prompt_len: usize, sent: Instant) -> Outcome {
        let req = self.request(Method::POST, "/v1/completions", body).map_err(|e| format!("{e:#}"))?;
        let resp = self.client.request(req).await.map_err(|e| chain(&e))?;
        let status = resp.status();
        if status != StatusCode::OK {
            let bytes = read_body(resp.into_body()).await.unwrap_or_default();
            return Err(error_message(status, &bytes));
        }
        let mut body = resp.into_body();
        let mut sse = SseParser::default();
        let mut timer = StreamTimer::default();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("the stream broke: {}", chain(&e)))?;
            let Ok(data) = frame.into_data() else { continue };
            // One clock reading per network read: every event in it arrived at that moment.
            let t = sent.elapsed().as_secs_f64();
            for event in sse.push(&data) {
                timer.on_data(&event, t)?;
            }
        }
        // Read to the end of the body even after `[DONE]` (the chunked body's last, empty chunk follows it),
        // so the connection goes back to the pool instead of being closed and opened again.
        timer.finish(sent.elapsed().as_secs_f64(), prompt_len)
    }
}

/// The base of every request path: scheme and authority (plus a path prefix, for a server behind
/// a proxy), without a trailing `/`; a trailing `/v1` is dropped, since OpenAI clients are
/// usually given `http://host:port/v1` and the paths here start with `/v1` themselves.
pub fn base_url(url: &str) -> Result<String> {
    let uri: Uri = url.trim().parse().with_context(|| format!("--url {url:?} is not a URL"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => bail!("--url {url}: only plain http:// is supported, not {other}://"),
        None => bail!("--url {url}: give the scheme too, e.g. http://{url}"),
    }
    let authority = uri.authority().with_context(|| format!("--url {url}: no host"))?;
    let path = uri.path().trim_end_matches('/');
    let path = path.strip_suffix("/v1").unwrap_or(path);
    Ok(format!("http://{authority}{path}"))
}

/// A body read to its end, at most [`MAX_BODY_BYTES`].
async fn read_body(body: hyper::body::Incoming) -> Result<Bytes> {
    let collected =
        Limited::new(body, MAX_BODY_BYTES).collect().await.map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?;
    Ok(collected.to_bytes())
}

/// An error and its causes on one line (hyper's own message alone is just "client error (Connect)").
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// "HTTP 400: <message>", the message taken from OpenAI's `{"error": {"message"}}`, vLLM's
/// `{"message"}`, or the start of the body.
pub fn error_message(status: StatusCode, body: &[u8]) -> String {
    format!("HTTP {}: {}", status.as_u16(), payload_error(body).unwrap_or_else(|| body_excerpt(body)))
}

/// The message of an error object, if `body` is one.
fn payload_error(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let message = match v.get("error") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(e) => e.get("message").and_then(Value::as_str).map(str::to_string),
        None => None,
    };
    let vllm = || {
        (v.get("object").and_then(Value::as_str) == Some("error"))
            .then(|| v.get("message")?.as_str().map(str::to_string))
            .flatten()
    };
    message.or_else(vllm)
}

fn body_excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(300) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None if text.is_empty() => "(empty body)".to_string(),
        None => text.to_string(),
    }
}

/// Server-sent events out of a byte stream cut anywhere: [`SseParser::push`] returns the `data` of
/// every event completed by the bytes given (data lines of one event joined by `\n`, as the SSE
/// specification says); comments (`: keep-alive`) and other fields are skipped.
#[derive(Default)]
pub struct SseParser {
    /// Bytes after the last line break.
    partial: Vec<u8>,
    /// The data lines of the event being read.
    data: Option<String>,
}

impl SseParser {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.partial.extend_from_slice(bytes);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(end) = self.partial[start..].iter().position(|&b| b == b'\n').map(|i| start + i) {
            let line = &self.partial[start..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                events.extend(self.data.take());
            } else if let Some(value) = line.strip_prefix(b"data:") {
                let value = value.strip_prefix(b" ").unwrap_or(value);
                let value = String::from_utf8_lossy(value);
                match &mut self.data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(&value);
                    }
                    None => self.data = Some(value.into_owned()),
                }
            }
            start = end + 1;
        }
        self.partial.drain(..start);
        events
    }
}

/// The measurements of one stream, fed its events in order with their arrival times (seconds after
/// the request was sent).
#[derive(Debug, Default)]
pub struct StreamTimer {
    first_text: Option<f64>,
    last_text: f64,
    itl: Vec<f64>,
    text_chunks: usize,
    usage: Option<(usize, usize, usize)>,
    /// When `data: [DONE]` arrived: the end of the request.
    done: Option<f64>,
}

impl StreamTimer {
    /// One event's data; an error payload or a chunk that is not JSON ends the request with an error.
    pub fn on_data(&mut self, data: &str, t: f64) -> Result<(), String> {
        if self.done.is_some() {
            return Ok(());
        }
        if data.trim() == "[DONE]" {
            self.done = Some(t);
            return Ok(());
        }
        let v: Value = serde_json::from_str(data)
            .map_err(|e| format!("a chunk is not JSON ({e}): {}", body_excerpt(data.as_bytes())))?;
        if v.get("error").is_some() || v.get("object").and_then(Value::as_str) == Some("error") {
            let message = payload_error(data.as_bytes()).unwrap_or_else(|| body_excerpt(data.as_bytes()));
            return Err(format!("error in the stream: {message}"));
        }
        // Every chunk of a choice that is not its finish marker carries new tokens, with or without
        // text yet (a token whose text the server holds back until the next completes a
        // character, or a model whose tokens decode to no text): as `vllm bench serve`, each one
        // is a token arrival, so that TTFT and ITL are the tokens' and not the text's.
        let choice = v.pointer("/choices/0");
        let finish = choice.and_then(|c| c.get("finish_reason")).is_some_and(|f| !f.is_null());
        let text = choice.and_then(|c| c.get("text")).and_then(Value::as_str).unwrap_or_default();
        if choice.is_some() && (!finish || !text.is_empty()) {
            match self.first_text {
                None => self.first_text = Some(t),
                Some(_) => self.itl.push(t - self.last_text),
            }
            self.last_text = t;
            self.text_chunks += 1;
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            let count = |p: &str| u.pointer(p).and_then(Value::as_u64).map(|n| n as usize);
            if let Some(out) = count("/completion_tokens") {
                let prompt = count("/prompt_tokens").unwrap_or(0);
                self.usage = Some((prompt, out, count("/prompt_tokens_details/cached_tokens").unwrap_or(0)));
            }
        }
        Ok(())
    }

    /// The request's timing (it ended at `data: [DONE]`), the body having ended at `closed`; a
    /// stream that ended before `data: [DONE]` failed.
    pub fn finish(self, closed: f64, prompt_len: usize) -> Outcome {
        let Some(end) = self.done else {
            return Err(format!("the stream ended after {closed:.3} s without `data: [DONE]`"));
        };
        let (input_tokens, output_tokens, cached_tokens) = match self.usage {
            Some((prompt, out, cached)) => (if prompt > 0 { prompt } else { prompt_len }, out, cached),
            None => (prompt_len, self.text_chunks, 0),
        };
        // No visible text at all: the first token is only known to have come by the end.
        let ttft = self.first_text.unwrap_or(end);
        Ok(RequestTiming { ttft, itl: self.itl, e2e: end, input_tokens, output_tokens, cached_tokens })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_survive_any_cut() {
        let stream = b": keep-alive\n\ndata: {\"a\":1}\r\n\r\nevent: x\ndata: one\ndata: two\n\ndata:[DONE]\n\n";
        for cut in 0..stream.len() {
            let mut p = SseParser::default();
            let mut events = p.push(&stream[..cut]);
            events.extend(p.push(&stream[cut..]));
            assert_eq!(events, ["{\"a\":1}", "one\ntwo", "[DONE]"], "cut at {cut}");
        }
    }

    fn chunk(text: &str) -> String {
        serde_json::json!({"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": null}]})
            .to_string()
    }

    fn finish(text: &str) -> String {
        serde_json::json!({"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": "length"}]})
            .to_string()
    }

    #[test]
    fn timer_measures_text_chunks_and_takes_usage() {
        let mut t = StreamTimer::default();
        t.on_data(&chunk("Hello"), 0.5).unwrap();
        // A token whose text is held back: it came, it counts.
        t.on_data(&chunk(""), 0.6).unwrap();
        t.on_data(&chunk(" world"), 0.7).unwrap();
        t.on_data(&chunk("!"), 1.0).unwrap();
        // The finish marker without text brings no token.
        t.on_data(&finish(""), 1.005).unwrap();
        let usage = r#"{"choices": [], "usage": {"prompt_tokens": 32, "completion_tokens": 4,
            "prompt_tokens_details": {"cached_tokens": 16}}}"#;
        t.on_data(usage, 1.01).unwrap();
        t.on_data("[DONE]", 1.02).unwrap();
        t.on_data(&chunk("after the end"), 1.5).unwrap();
        let r = t.finish(1.6, 99).unwrap();
        assert_eq!((r.ttft, r.e2e, r.input_tokens, r.output_tokens, r.cached_tokens), (0.5, 1.02, 32, 4, 16));
        let want = [0.1, 0.1, 0.3];
        assert_eq!(r.itl.len(), want.len(), "{:?}", r.itl);
        assert!(r.itl.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12), "{:?}", r.itl);
    }

    #[test]
    fn timer_counts_chunks_without_usage() {
        let mut t = StreamTimer::default();
        for (i, text) in ["a", "b", "c"].iter().enumerate() {
            t.on_data(&chunk(text), i as f64).unwrap();
        }
        t.on_data("[DONE]", 3.0).unwrap();
        let r = t.finish(3.0, 8).unwrap();
        assert_eq!((r.input_tokens, r.output_tokens, r.ttft), (8, 3, 0.0));
    }

    #[test]
    fn broken_streams_and_errors_are_failures() {
        let mut t = StreamTimer::default();
        t.on_data(&chunk("a"), 0.1).unwrap();
        assert!(t.finish(0.2, 1).unwrap_err().contains("without `data: [DONE]`"));
        let mut t = StreamTimer::default();
        let e = t.on_data(r#"{"error": {"message": "the engine died", "type": "InternalError"}}"#, 0.1).unwrap_err();
        assert_eq!(e, "error in the stream: the engine died");
        assert!(StreamTimer::default().on_data("{not json", 0.1).unwrap_err().contains("not JSON"));
    }

    #[test]
    fn error_messages_name_status_and_message() {
        let openai =
            br#"{"error": {"message": "prompt[3]: token id 99999 is not in the vocabulary", "param": "prompt[3]"}}"#;
        assert_eq!(
            error_message(StatusCode::BAD_REQUEST, openai),
            "HTTP 400: prompt[3]: token id 99999 is not in the vocabulary"
        );
        let vllm = br#"{"object": "error", "message": "too long", "type": "BadRequestError", "code": 400}"#;
        assert_eq!(error_message(StatusCode::BAD_REQUEST, vllm), "HTTP 400: too long");
        assert_eq!(error_message(StatusCode::NOT_FOUND, b"Not Found"), "HTTP 404: Not Found");
        assert_eq!(error_message(StatusCode::BAD_GATEWAY, b""), "HTTP 502: (empty body)");
    }

    #[test]
    fn base_urls() {
        assert_eq!(base_url("http://127.0.0.1:8000").unwrap(), "http://127.0.0.1:8000");
        assert_eq!(base_url("http://127.0.0.1:8000/v1/").unwrap(), "http://127.0.0.1:8000");
        assert_eq!(base_url("http://host/proxy/llm").unwrap(), "http://host/proxy/llm");
        assert!(base_url("https://host").unwrap_err().to_string().contains("plain http://"));
        assert!(base_url("127.0.0.1:8000").is_err());
    }
}
