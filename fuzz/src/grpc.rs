//! Raw gRPC requests: any bytes as a request's body, so a server's handlers meet random and
//! truncated protobufs and length prefixes that lie, as a broken or hostile client would send them.
//!
//! A gRPC body is a sequence of messages, each a 5-byte prefix (compression flag, big-endian
//! length) and the message's bytes ([`frame`]). [`call`] sends a body as it is over a tonic
//! [`Channel`] (HTTP/2) and reads the answer: its status, and how many messages came back before
//! the stream ended or the wait for a streamed answer ran out (a server stream that stays open,
//! `Join` or `WatchJob`, is then dropped, as a client that goes away drops it).

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::{Bytes, Service};
use tonic::transport::Channel;
use tonic::Code;

/// One message with its 5-byte prefix (uncompressed).
pub fn frame(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// Messages, framed one after the other.
pub fn frames<M: AsRef<[u8]>>(messages: &[M]) -> Vec<u8> {
    messages.iter().flat_map(|m| frame(m.as_ref())).collect()
}

/// What a server answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// `grpc-status`; `None` when the answer was still streaming at the end of the wait.
    pub code: Option<Code>,
    /// Bytes of response messages (prefixes included) received.
    pub body_bytes: usize,
}

impl Reply {
    /// An answer counts as accepted when it is OK or still streaming.
    pub fn accepted(&self) -> bool {
        matches!(self.code, None | Some(Code::Ok))
    }
}

/// Sends `body` as the request of method `path` (`/awq.v1.JobService/Submit`) and reads the
/// answer; a streamed answer is read for at most `stream_wait` after its headers. `Err`: the
/// connection failed (the server went away, or refused the request outright).
pub async fn call(channel: &mut Channel, path: &str, body: Vec<u8>, stream_wait: Duration) -> Result<Reply, String> {
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Body::new(Full::new(Bytes::from(body))))
        .map_err(|e| format!("building the request: {e}"))?;
    std::future::poll_fn(|cx| channel.poll_ready(cx)).await.map_err(|e| format!("channel: {e:?}"))?;
    let response = channel.call(request).await.map_err(|e| format!("request: {e:?}"))?;
    let header_code = status_of(response.headers());
    let mut body = response.into_body();
    let mut reply = Reply { code: header_code, body_bytes: 0 };
    if header_code.is_some() {
        // Trailers-only: the status came with the headers.
        return Ok(reply);
    }
    let deadline = tokio::time::Instant::now() + stream_wait;
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            // Still streaming: give up on it, as a client that goes away does.
            Err(_) => return Ok(reply),
            Ok(None) => return Ok(reply),
            Ok(Some(Err(e))) => return Err(format!("response body: {e}")),
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => reply.body_bytes += data.len(),
                Err(frame) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        reply.code = status_of(trailers);
                        return Ok(reply);
                    }
                }
            },
        }
    }
}

fn status_of(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?;
    let code: i32 = value.to_str().ok()?.parse().ok()?;
    Some(Code::from_i32(code))
}
