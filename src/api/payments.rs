//! Card verifications and webhook endpoints.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{EmptyBody, JsonBody};
use super::{path_id, AppState};
use crate::service::webhooks::endpoint_object;
use crate::service::{verification_object, Context};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartVerification {
    method: String,
    currency: Option<String>,
    token: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfirmVerification {
    amount: i64,
}

pub async fn start_verification(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    Path((customer, card)): Path<(String, String)>,
    JsonBody(body): JsonBody<StartVerification>,
) -> Result<Response, ApiError> {
    path_id("cus", &customer, "customer", "customer")?;
    path_id("card", &card, "card", "card")?;
    let vault = state.vault.clone();
    let v = state
        .detach(async move {
            vault
                .start_verification(
                    &ctx,
                    &customer,
                    &card,
                    &body.method,
                    body.currency.as_deref(),
                    body.token.as_deref(),
                )
                .await
        })
        .await?;
    Ok((StatusCode::CREATED, Json(verification_object(&v))).into_response())
}

pub async fn get_verification(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    Path((customer, card, id)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    path_id("cus", &customer, "customer", "customer")?;
    path_id("card", &card, "card", "card")?;
    path_id("cver", &id, "card_verification", "verification")?;
    let card_rec = state.vault.get_card(&ctx, &customer, &card).await?;
    let v = state
        .vault
        .get_verification(&ctx, &card_rec.card.id, &id)
        .await?;
    Ok(Json(verification_object(&v)))
}

pub async fn confirm_verification(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    Path((customer, card, id)): Path<(String, String, String)>,
    JsonBody(body): JsonBody<ConfirmVerification>,
) -> Result<Json<Value>, ApiError> {
    path_id("cus", &customer, "customer", "customer")?;
    path_id("card", &card, "card", "card")?;
    path_id("cver", &id, "card_verification", "verification")?;
    let v = state
        .vault
        .confirm_verification(&ctx, &customer, &card, &id, body.amount)
        .await?;
    Ok(Json(verification_object(&v)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateEndpoint {
    url: String,
    events: Vec<String>,
}

pub async fn create_endpoint(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    JsonBody(body): JsonBody<CreateEndpoint>,
) -> Result<Response, ApiError> {
    let (endpoint, secret) = state
        .vault
        .create_webhook_endpoint(&ctx, &body.url, body.events)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(endpoint_object(&endpoint, Some(&secret))),
    )
        .into_response())
}

pub async fn list_endpoints(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
) -> Result<Json<Value>, ApiError> {
    let all = state.vault.list_webhook_endpoints(&ctx).await?;
    Ok(Json(json!({
        "object": "list",
        "data": all.iter().map(|e| endpoint_object(e, None)).collect::<Vec<_>>(),
        "has_more": false,
    })))
}

pub async fn get_endpoint(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    path_id("we", &id, "webhook_endpoint", "webhook_endpoint")?;
    let e = state.vault.get_webhook_endpoint(&ctx, &id).await?;
    Ok(Json(endpoint_object(&e, None)))
}

pub async fn delete_endpoint(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    Path(id): Path<String>,
    _body: EmptyBody,
) -> Result<Json<Value>, ApiError> {
    path_id("we", &id, "webhook_endpoint", "webhook_endpoint")?;
    state.vault.delete_webhook_endpoint(&ctx, &id).await?;
    Ok(Json(
        json!({"id": id, "object": "webhook_endpoint", "deleted": true}),
    ))
}

pub async fn list_deliveries(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    path_id("we", &id, "webhook_endpoint", "webhook_endpoint")?;
    let all = state.vault.list_webhook_deliveries(&ctx, &id, 100).await?;
    Ok(Json(json!({
        "object": "list",
        "data": all.iter().map(crate::service::webhooks::delivery_object).collect::<Vec<_>>(),
        "has_more": false,
    })))
}
