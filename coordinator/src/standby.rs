//! What a standby coordinator serves on its ports while another leads ([`crate::leader`]): every
//! gRPC call answers UNAVAILABLE naming the leader, so that workers and clients given several
//! coordinator URLs move on to it, and the health service says NOT_SERVING, so that a Kubernetes
//! Service in front of both sends nothing here. The HTTP API's port answers 503 the same way.

use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use tonic::service::Routes;

/// The leader as a standby last saw it (`None`: none, or the store does not answer).
pub type SeenLeader = Arc<Mutex<Option<String>>>;

/// Why a standby refuses, naming the leader.
pub fn refusal(leader: &SeenLeader) -> String {
    match leader.lock().unwrap_or_else(|e| e.into_inner()).as_deref() {
        Some(url) => format!("this coordinator is a standby; the leader is {url}"),
        None => "this coordinator is a standby and no leader is known right now (one is being elected, or the \
                 state store does not answer): try again in a few seconds"
            .to_string(),
    }
}

/// Serves `listener` as a standby until `stop` resolves (over TLS with `tls`).
pub async fn serve_grpc(
    listener: tokio::net::TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    leader: SeenLeader,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    let refuse = move || {
        let message = refusal(&leader);
        async move { tonic::Status::unavailable(message).into_http::<axum::body::Body>() }
    };
    let routes = Routes::from(Routes::new(health_service).into_axum_router().fallback(refuse));
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    server
        .add_routes(routes)
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), stop)
        .await
}

/// The HTTP API of a standby: 503 with OpenAI's error shape, naming the leader.
pub fn http_router(leader: SeenLeader) -> axum::Router {
    axum::Router::new().fallback(move || {
        let message = refusal(&leader);
        async move {
            let body = serde_json::json!({"error": {"message": message, "type": "service_unavailable", "code": 503}});
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body))
        }
    })
}
