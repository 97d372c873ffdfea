//! Draining before a shutdown: requests in flight finish, new ones are refused with 503 while the
//! port stays open.
//!
//! Why 503 rather than a closed port: a client (or a load balancer) that gets a refused
//! connection cannot tell a server that is going away from one that is down, while 503 with
//! OpenAI's error JSON says "not here, try again elsewhere", and /health answering 503 is what
//! takes a pod out of a Kubernetes Service (its readiness probe fails) while it finishes its work.
//!
//! [`Drain`] counts the requests it admitted ([`Drain::admit`] gives an [`Admitted`], held by the
//! response's body until the body is dropped: sent to its last byte, or abandoned by its client;
//! a streamed completion counts until its `[DONE]`). [`admit`], the router's outermost layer, asks
//! it for every request and answers 503 when refused. Once [`Drain::start`] is called, it admits
//! nothing more, and [`Drain::drained`] resolves when the last admitted request is gone. What it
//! does not do: close connections or stop the server (the binary does, once drained) or refuse
//! /metrics ([`admit`] leaves it out, for a last scrape).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Notify;

use crate::{ApiError, Gateway};

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Drain {
    draining: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
}

/// A request admitted before the drain began; counted in flight until dropped.
#[derive(Debug)]
pub(crate) struct Admitted(Arc<Drain>);

impl Drop for Admitted {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Drain {
    /// Admits a request, unless the drain has begun (`None`: answer 503).
    pub(crate) fn admit(self: &Arc<Self>) -> Option<Admitted> {
        // Counted before the flag is read (both SeqCst): either `start` sees this request in
        // flight, or this request sees the drain; never neither.
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let admitted = Admitted(self.clone());
        (!self.draining.load(Ordering::SeqCst)).then_some(admitted)
    }

    /// Admits nothing from now on.
    pub(crate) fn start(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Requests admitted and not yet finished.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Resolves once no admitted request is in flight (at once if none is). Call it after
    /// [`Drain::start`], or more may be admitted meanwhile.
    pub(crate) async fn drained(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Registered before the count is read: a last request that ends in between wakes it.
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Lets a request in unless the gateway drains before a shutdown: then 503 with
/// `Connection: close`, /health included. /metrics is never refused nor counted (a last scrape).
/// An admitted request counts as in flight until its response's body is dropped: sent to its end,
/// or its client gone.
pub(crate) async fn admit(State(gw): State<Gateway>, req: Request, next: Next) -> Response {
    if req.uri().path() == "/metrics" {
        return next.run(req).await;
    }
    let Some(admitted) = gw.inner.drain.admit() else {
        let mut response = ApiError::shutting_down().into_response();
        response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
        return response;
    };
    next.run(req).await.map(|body| axum::body::Body::new(Counted { body, _admitted: admitted }))
}

/// A response body that keeps its request counted in flight (this module) until it is dropped.
struct Counted {
    body: axum::body::Body,
    _admitted: Admitted,
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn admitted_requests_finish_and_later_ones_are_refused() {
        let drain = Arc::new(Drain::default());
        let (a, b) = (drain.admit().expect("admitted"), drain.admit().expect("admitted"));
        assert_eq!(drain.in_flight(), 2);
        drain.start();
        assert!(drain.admit().is_none(), "admitted during the drain");
        assert_eq!(drain.in_flight(), 2, "a refused request is not counted");
        let waiting = tokio::spawn({
            let drain = drain.clone();
            async move { drain.drained().await }
        });
        drop(a);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "drained with a request still in flight");
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("drained once the last one ended").unwrap();
        tokio::time::timeout(Duration::from_secs(1), drain.drained()).await.expect("drained at once when idle");
    }
}
