//! The one place where failures become HTTP responses: [`ApiError`] carries the status and OpenAI's
//! error body `{"error": {"message", "type", "param", "code"}}`, and every error of the engine
//! ([`awq_serve::Error`]) or of validation reaches the client through [`ApiError::from`] or one of
//! the constructors here, never through a status code chosen at the call site.
//!
//! Status codes (OpenAI's, as vLLM and TGI answer them): 400 `invalid_request_error` for a bad
//! parameter (`param` names the field), a prompt too long for the model, a chat request to a model
//! without a chat template; 401 without the API key; 404 for an unknown model name or path; 429
//! with `Retry-After` when the engine's waiting queue is full; 503 while the engine loads (or after
//! it failed to, or stopped on a fault) and while the server drains before a shutdown; 500 for a
//! fault inside the engine.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Seconds a client told "queue full" (429) waits before trying again.
pub const RETRY_AFTER_SECONDS: u32 = 1;

/// An error answered to a client (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `param`: the request field at fault (`temperature`, `messages[2].content`).
    pub param: Option<String>,
    /// OpenAI's `code` (`model_not_found`, `invalid_api_key`, ...).
    pub code: Option<&'static str>,
}

/// OpenAI's error body.
#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), param: None, code: None }
    }

    /// 400: `param` is wrong; `message` says how.
    pub fn invalid_param(param: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError { param: Some(param.into()), ..ApiError::new(StatusCode::BAD_REQUEST, message) }
    }

    /// 400 without a single field at fault (a body that is not JSON).
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    /// 401: the server has API keys and the request did not bring one.
    pub fn unauthorized() -> ApiError {
        ApiError {
            code: Some("invalid_api_key"),
            ..ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key: send one of the server's keys (its --api-key or --api-key-file) as \
                 `Authorization: Bearer KEY`",
            )
        }
    }

    /// 404: the request names a model this server does not serve; `served` are those it does.
    pub fn model_not_found(asked: &str, served: &[String]) -> ApiError {
        let served = match served {
            [] => "no model now".to_string(),
            names => names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", "),
        };
        ApiError {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                format!("the model `{asked}` does not exist; this server serves {served} (GET /v1/models)"),
            )
        }
    }

    /// 404 for a path no route serves.
    pub fn no_route(path: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, format!("no route {path}: see /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics, /tokenize, /detokenize"))
    }

    /// 503: the engine is still loading its weights, or failed to.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    /// 503: the server is draining before it shuts down; another replica, or this server once
    /// restarted, takes the request.
    pub fn shutting_down() -> ApiError {
        ApiError {
            code: Some("server_shutting_down"),
            ..ApiError::unavailable(
                "the server is shutting down: it finishes the requests it has and takes no new ones; \
                 send this one again (to another replica)",
            )
        }
    }

    /// 500: the request failed inside the engine.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// OpenAI's error `type` for this status.
    pub fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND | StatusCode::PAYLOAD_TOO_LARGE => "invalid_request_error",
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable_error",
            _ => "internal_error",
        }
    }

    /// The JSON body alone (also what an SSE stream sends when a request fails mid-way).
    pub fn body(&self) -> serde_json::Value {
        serde_json::to_value(ErrorBody {
            error: ErrorDetail {
                message: &self.message,
                kind: self.kind(),
                param: self.param.as_deref(),
                code: self.code,
            },
        })
        .expect("the error body serialises")
    }
}

impl From<awq_serve::Error> for ApiError {
    fn from(e: awq_serve::Error) -> ApiError {
        use awq_serve::Error as E;
        let message = e.to_string();
        match e {
            E::InvalidParameter { field, .. } => ApiError::invalid_param(field, message),
            E::EmptyPrompt => ApiError::invalid_param("prompt", message),
            E::PromptTooLong { .. } => ApiError::invalid_param("prompt", message),
            E::QueueFull { .. } => {
                ApiError { code: Some("queue_full"), ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, message) }
            }
            E::TokenOutOfVocabulary { index, .. } => ApiError::invalid_param(format!("prompt[{index}]"), message),
            E::EngineStopped { .. } => ApiError::unavailable(message),
            E::DuplicateRequest(_) => ApiError::bad_request(message),
            _ => ApiError::internal(message),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(e: ApiError, status: u16, param: Option<&str>, message_has: &str) {
        assert_eq!(e.status.as_u16(), status, "{e}");
        assert_eq!(e.param.as_deref(), param, "{e}");
        assert!(e.message.contains(message_has), "{:?} lacks {message_has:?}", e.message);
        let body = e.body();
        assert_eq!(body["error"]["message"], serde_json::json!(e.message));
        assert_eq!(body["error"]["param"], serde_json::json!(param));
    }

    #[test]
    fn engine_errors_map_to_honest_statuses() {
        use awq_serve::Error as E;
        let field = |f: &str| E::InvalidParameter { field: f.into(), expected: "in [0, 2]".into(), got: "3".into() };
        check(field("temperature").into(), 400, Some("temperature"), "temperature must be in [0, 2], got 3");
        check(E::EmptyPrompt.into(), 400, Some("prompt"), "empty");
        check(E::PromptTooLong { prompt_len: 10, max_model_len: 8 }.into(), 400, Some("prompt"), "maximum length is 8");
        check(E::QueueFull { max_waiting: 4 }.into(), 429, None, "4 requests already wait");
        check(E::TokenOutOfVocabulary { index: 2, token: 9, vocab_size: 5 }.into(), 400, Some("prompt[2]"), "9");
        check(E::EngineStopped { reason: "a device fault".into() }.into(), 503, None, "a device fault");
        check(E::StepInFlight.into(), 500, None, "step");
    }

    #[test]
    fn queue_full_says_when_to_retry() {
        let r = ApiError::from(awq_serve::Error::QueueFull { max_waiting: 1 }).into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        assert_eq!(ApiError::unauthorized().into_response().status(), StatusCode::UNAUTHORIZED);
    }
}
