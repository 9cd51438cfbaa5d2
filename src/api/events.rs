//! `GET /v1/events` and `GET /v1/events/{id}`.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use serde_json::{json, Value};

use super::charges::list_params;
use super::error::ApiError;
use super::{path_id, AppState};
use crate::service::{event_object, Context};

pub async fn list(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let params = list_params(query, "evt", "event", &["type"])?;
    let page = state
        .vault
        .list_events(
            &ctx,
            params.filters.get("type").map(String::as_str),
            params.limit,
            params.starting_after.as_deref(),
        )
        .await?;
    Ok(Json(json!({
        "object": "list",
        "data": page.data.iter().map(event_object).collect::<Vec<_>>(),
        "has_more": page.has_more,
    })))
}

pub async fn get(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    path_id("evt", &id, "event", "event")?;
    Ok(Json(event_object(&state.vault.get_event(&ctx, &id).await?)))
}
