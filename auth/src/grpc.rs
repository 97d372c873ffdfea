//! Tokens on gRPC: [`RequireToken`] around a server's service, [`AttachToken`] in its clients.
//!
//! The check is a tower wrapper rather than a tonic interceptor: an interceptor sees neither the
//! call's path nor the response, and a refusal names the call in the server's log. It wraps each
//! service on its own, so a server's health service (Kubernetes' probes, which carry no token)
//! stays open beside guarded ones.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::{http, Service};
use tonic::metadata::AsciiMetadataValue;
use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::server::TcpConnectInfo;
use tonic::Status;

use crate::Secret;

/// Which token a service asks for, as refusals and logs name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// The coordinator's job and deployment APIs, every call (`awq submit`, `cancel`, `deploy`,
    /// `undeploy`, and the reads: `status`, `jobs`, `workers`, `deployments`, `watch`).
    Admin,
    /// The coordinator's worker API (join, uploads, reports, the NCCL id relay) and the workers'
    /// own ports (activations between stages, replicas called by the gateway and by other stages).
    Worker,
}

impl fmt::Display for TokenKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenKind::Admin => "admin token",
            TokenKind::Worker => "worker token",
        })
    }
}

/// A tonic service whose calls must carry `authorization: Bearer TOKEN` with one token (see the
/// module docs); without a token, every call passes. Keeps the wrapped service's name, so it is
/// added to a `tonic::transport::Server` as the service itself.
#[derive(Clone)]
pub struct RequireToken<S> {
    inner: S,
    guard: Option<Arc<Guard>>,
}

struct Guard {
    token: Secret,
    kind: TokenKind,
}

impl<S> RequireToken<S> {
    /// `inner`, whose every call must carry `token` (the `kind` named in refusals); `None`: open.
    pub fn new(inner: S, token: Option<Secret>, kind: TokenKind) -> RequireToken<S> {
        RequireToken { inner, guard: token.map(|token| Arc::new(Guard { token, kind })) }
    }
}

impl Guard {
    /// Lets `request` through, or refuses it with UNAUTHENTICATED, logging the peer and the call.
    fn check(&self, request: &http::Request<Body>) -> Result<(), Status> {
        let given = request.headers().get(http::header::AUTHORIZATION).map(|v| crate::bearer(v.as_bytes()));
        let refused = match given {
            Some(Some(token)) if self.token.matches(token) => return Ok(()),
            None => "no token",
            Some(None) => "an authorization that is not `Bearer TOKEN`",
            Some(Some(_)) => "a wrong token",
        };
        let peer = request.extensions().get::<TcpConnectInfo>().and_then(TcpConnectInfo::remote_addr);
        let peer = peer.map_or_else(|| "an unknown peer".to_string(), |a| a.to_string());
        tracing::warn!(%peer, call = request.uri().path(), "refused: {refused} where the {} is required", self.kind);
        Err(Status::unauthenticated(format!(
            "the {} is required and {refused} was sent (`authorization: Bearer TOKEN`)",
            self.kind
        )))
    }
}

impl<S: NamedService> NamedService for RequireToken<S> {
    const NAME: &'static str = S::NAME;
}

type ResponseFuture = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl<S> Service<http::Request<Body>> for RequireToken<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> ResponseFuture {
        if let Some(guard) = &self.guard {
            if let Err(refusal) = guard.check(&request) {
                return Box::pin(std::future::ready(Ok(refusal.into_http())));
            }
        }
        Box::pin(self.inner.call(request))
    }
}

/// The client side: adds `authorization: Bearer TOKEN` to every call (nothing without a token).
/// The header is marked sensitive (HTTP/2 never indexes it); `Debug` does not show it.
#[derive(Clone, Default)]
pub struct AttachToken(Option<AsciiMetadataValue>);

impl AttachToken {
    pub fn new(token: Option<&Secret>) -> AttachToken {
        AttachToken(token.map(|t| {
            let mut value = AsciiMetadataValue::try_from(format!("Bearer {}", t.expose()))
                .expect("a Secret is printable ASCII, which a header value can hold");
            value.set_sensitive(true);
            value
        }))
    }
}

impl fmt::Debug for AttachToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "AttachToken([redacted])" } else { "AttachToken(None)" })
    }
}

impl Interceptor for AttachToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel whose calls carry a token: what the clients of guarded services are built on
/// (`XClient::with_interceptor(channel, AttachToken::new(token))`).
pub type Authed<T = tonic::transport::Channel> = InterceptedService<T, AttachToken>;

#[cfg(test)]
mod tests {
    use super::*;

    /// A service that answers every call with 200 and counts them.
    #[derive(Clone, Default)]
    struct Echo(Arc<std::sync::atomic::AtomicUsize>);

    impl Service<http::Request<Body>> for Echo {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<http::Response<Body>, Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: http::Request<Body>) -> Self::Future {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::future::ready(Ok(http::Response::new(Body::default())))
        }
    }

    /// The gRPC status a call with `authorization` gets (`None`: it reached the service).
    async fn call(service: &mut RequireToken<Echo>, authorization: Option<&str>) -> Option<(tonic::Code, String)> {
        let mut request = http::Request::builder().uri("/awq.v1.JobService/Submit");
        if let Some(a) = authorization {
            request = request.header("authorization", a);
        }
        let response = service.call(request.body(Body::default()).unwrap()).await.unwrap();
        let status = Status::from_header_map(response.headers())?;
        Some((status.code(), status.message().to_string()))
    }

    #[tokio::test]
    async fn calls_without_the_token_are_refused_without_showing_it() {
        let echo = Echo::default();
        let token = Secret::new("the-admin-token", "test").unwrap();
        let mut guarded = RequireToken::new(echo.clone(), Some(token), TokenKind::Admin);
        assert_eq!(call(&mut guarded, Some("Bearer the-admin-token")).await, None);
        assert_eq!(call(&mut guarded, Some("bearer  the-admin-token ")).await, None);
        for (authorization, what) in [
            (None, "no token"),
            (Some("Bearer the-admin-tokeN"), "a wrong token"),
            (Some("Bearer the-admin-token2"), "a wrong token"),
            (Some("Bearer "), "a wrong token"),
            (Some("Basic dGhlLWFkbWluLXRva2Vu"), "not `Bearer TOKEN`"),
        ] {
            let (code, message) = call(&mut guarded, authorization).await.expect("refused");
            assert_eq!(code, tonic::Code::Unauthenticated, "{authorization:?}");
            assert!(message.contains("admin token") && message.contains(what), "{authorization:?}: {message}");
            assert!(!message.contains("the-admin-token"), "the refusal shows the token: {message}");
        }
        assert_eq!(echo.0.load(std::sync::atomic::Ordering::Relaxed), 2, "only the two good calls went through");

        let mut open = RequireToken::new(echo.clone(), None, TokenKind::Worker);
        assert_eq!(call(&mut open, None).await, None);
        assert_eq!(call(&mut open, Some("Bearer anything")).await, None);
    }

    #[test]
    fn attach_token_adds_a_sensitive_header() {
        let token = Secret::new("w0rker", "test").unwrap();
        let mut attach = AttachToken::new(Some(&token));
        assert_eq!(format!("{attach:?}"), "AttachToken([redacted])");
        let request = attach.call(tonic::Request::new(())).unwrap();
        let value = request.metadata().get("authorization").expect("the header");
        assert_eq!(value.to_str().unwrap(), "Bearer w0rker");
        assert!(value.is_sensitive());
        let request = AttachToken::new(None).call(tonic::Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());
    }
}
