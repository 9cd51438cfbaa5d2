//! `/v1/capture_sessions` (secret key): the merchant's server asks for a
//! hosted card-capture page for one customer and one embedding origin.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use super::extract::JsonBody;
use super::{path_id, AppState};
use crate::service::{capture_session_object, Context, NewCaptureSession};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    customer: Option<String>,
    allowed_origin: Option<String>,
    /// Seconds until the session expires.
    expires_in: Option<i64>,
}

fn required<T>(value: Option<T>, param: &str) -> Result<T, ApiError> {
    value.ok_or_else(|| {
        ApiError::invalid("parameter_missing", format!("{param} is required")).with_param(param)
    })
}

pub async fn create(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    JsonBody(body): JsonBody<CreateSession>,
) -> Result<Response, ApiError> {
    let new = NewCaptureSession {
        customer: required(body.customer, "customer")?,
        allowed_origin: required(body.allowed_origin, "allowed_origin")?,
        expires_in: body.expires_in,
    };
    let created = state.vault.create_capture_session(&ctx, new).await?;
    Ok((
        StatusCode::CREATED,
        Json(capture_session_object(&created.session, Some(&created.url))),
    )
        .into_response())
}

pub async fn get(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    path_id("cs", &id, "capture session", "capture_session")?;
    let session = state.vault.get_capture_session(&ctx, &id).await?;
    Ok(Json(capture_session_object(&session, None)))
}
