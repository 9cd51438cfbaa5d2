//! API errors: `{"error": {type, code, message, param, request_id}}` with the
//! right status. Internal causes are logged with the request id, never sent.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::service::ServiceError;

tokio::task_local! {
    /// The id of the request being served, set by the request-id middleware.
    pub static REQUEST_ID: String;
}

/// The current request's id (empty outside a request).
pub fn current_request_id() -> String {
    REQUEST_ID.try_with(Clone::clone).unwrap_or_default()
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    code: &'a str,
    message: &'a str,
    param: Option<&'a str>,
    request_id: String,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            kind,
            code,
            message: message.into(),
            param: None,
        }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        )
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "resource_missing",
            format!("no such {what}"),
        )
    }

    pub fn unauthenticated(message: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_api_key",
            message,
        )
    }

    pub fn idempotency(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "idempotency_error",
            "idempotency_key_in_use",
            message,
        )
        .with_param("Idempotency-Key")
    }

    pub fn unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            "service_unavailable",
            "a backing service (HSM or database) is unavailable; retry later",
        )
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            "internal_error",
            "internal error; quote the request id when reporting it",
        )
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Invalid {
                param,
                code,
                message,
            } => ApiError::invalid(code, message).with_param(param),
            ServiceError::NotFound { resource, param } => {
                let err = ApiError::not_found(resource);
                match param {
                    Some(p) => err.with_param(p),
                    None => err,
                }
            }
            ServiceError::Unauthenticated => ApiError::unauthenticated("invalid API key"),
            ServiceError::Forbidden(scope) => ApiError::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                "missing_scope",
                format!("this API key lacks the {scope} scope"),
            ),
            ServiceError::Conflict(_) => ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "conflict",
                "the request conflicts with the current state; retry",
            ),
            ServiceError::InvalidState { code, message } => {
                ApiError::new(StatusCode::CONFLICT, "invalid_request_error", code, message)
            }
            ServiceError::Unavailable(cause) => {
                tracing::warn!(request_id = %current_request_id(), %cause, "backing service unavailable");
                ApiError::unavailable()
            }
            ServiceError::Internal(cause) => {
                tracing::error!(request_id = %current_request_id(), %cause, "internal error");
                ApiError::internal()
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: Inner {
                kind: self.kind,
                code: self.code,
                message: &self.message,
                param: self.param.as_deref(),
                request_id: current_request_id(),
            },
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        resp
    }
}

/// Masks runs of 12 or more digits in text that came from a client, so
/// nothing that could be a card number is echoed back or logged. The result
/// is cut to 100 characters.
pub fn mask_digits(s: &str) -> String {
    mask_digit_runs(s).chars().take(100).collect()
}

/// [`mask_digits`] without the length cut.
pub fn mask_digit_runs(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.len() >= 12 {
            out.push_str("[redacted]");
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in s.chars() {
        if c.is_ascii_digit() {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}
