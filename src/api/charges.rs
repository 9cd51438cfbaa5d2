//! `/v1/charges`: create, get, list, confirm, capture, refund, cancel.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{mask_digits, ApiError};
use super::extract::{EmptyBody, JsonBody};
use super::{path_id, AppState};
use crate::service::{charge_object, refund_object, Context, NewCharge};
use crate::storage::{LineItem, Metadata};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateCharge {
    amount: i64,
    currency: String,
    customer: String,
    card: Option<String>,
    token: Option<String>,
    capture: Option<bool>,
    description: Option<String>,
    metadata: Option<Metadata>,
    line_items: Option<Vec<LineItemIn>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineItemIn {
    name: String,
    unit_price: i64,
    quantity: i64,
    sku: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Confirm {
    token: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmountBody {
    amount: Option<i64>,
}

/// An optional JSON body: empty means `None`; otherwise as strict as
/// [`JsonBody`] (content type, size, unknown fields).
pub struct MaybeJson<T>(pub Option<T>);

impl<T: serde::de::DeserializeOwned> axum::extract::FromRequest<AppState> for MaybeJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &AppState) -> Result<Self, ApiError> {
        let json_type = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|m| m.trim().eq_ignore_ascii_case("application/json"));
        let bytes = super::extract::read_body(req.into_body(), state.limits.max_body_bytes).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(MaybeJson(None));
        }
        if json_type != Some(true) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "unsupported_content_type",
                "request body must be JSON with Content-Type: application/json",
            )
            .with_param("Content-Type"));
        }
        super::extract::parse_json(&bytes).map(|v| MaybeJson(Some(v)))
    }
}

/// Pagination and filters of a list route.
pub(crate) struct ListParams {
    pub limit: u32,
    pub starting_after: Option<String>,
    pub filters: HashMap<String, String>,
}

/// Parses `limit`, `starting_after` (an id with `prefix`) and the allowed
/// filters; anything else is a 400 naming the parameter.
pub(crate) fn list_params(
    query: HashMap<String, String>,
    prefix: &str,
    what: &str,
    filters: &[&str],
) -> Result<ListParams, ApiError> {
    let mut out = ListParams {
        limit: 10,
        starting_after: None,
        filters: HashMap::new(),
    };
    for (k, v) in query {
        match k.as_str() {
            "limit" => {
                out.limit = v
                    .parse()
                    .ok()
                    .filter(|l| (1..=100).contains(l))
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "invalid_limit",
                            "limit must be an integer between 1 and 100",
                        )
                        .with_param("limit")
                    })?
            }
            "starting_after" => {
                path_id(prefix, &v, what, "starting_after")?;
                out.starting_after = Some(v);
            }
            other if filters.contains(&other) => {
                out.filters.insert(k, v);
            }
            other => {
                let masked = mask_digits(other);
                return Err(ApiError::invalid(
                    "parameter_unknown",
                    format!("unknown query parameter {masked}"),
                )
                .with_param(masked));
            }
        }
    }
    Ok(out)
}

pub async fn create(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    JsonBody(body): JsonBody<CreateCharge>,
) -> Result<Response, ApiError> {
    if !crate::domain::is_valid_id("cus", &body.customer) {
        return Err(ApiError::not_found("customer").with_param("customer"));
    }
    if let Some(card) = &body.card {
        if !crate::domain::is_valid_id("card", card) {
            return Err(ApiError::not_found("card").with_param("card"));
        }
    }
    let new = NewCharge {
        amount: body.amount,
        currency: body.currency,
        customer: body.customer,
        card: body.card,
        token: body.token,
        capture: body.capture.unwrap_or(true),
        description: body.description,
        metadata: body.metadata.unwrap_or_default(),
        line_items: body.line_items.map(|items| {
            items
                .into_iter()
                .map(|i| LineItem {
                    name: i.name,
                    unit_price: i.unit_price,
                    quantity: i.quantity,
                    sku: i.sku,
                })
                .collect()
        }),
    };
    let vault = state.vault.clone();
    let charge = state
        .detach(async move { vault.create_charge(&ctx, new).await })
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(state.vault.charge_json(&charge).await),
    )
        .into_response())
}

pub async fn get(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    path_id("ch", &id, "charge", "charge")?;
    let charge = state.vault.get_charge(&ctx, &id).await?;
    let refunds = state.vault.list_refunds(&ctx, &id).await?;
    let mut out = state.vault.charge_json(&charge).await;
    out["refunds"] = json!({
        "object": "list",
        "data": refunds.iter().map(refund_object).collect::<Vec<_>>(),
        "has_more": false,
    });
    Ok(Json(out))
}

pub async fn list(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let params = list_params(query, "ch", "charge", &["customer"])?;
    let customer = params.filters.get("customer");
    if let Some(c) = customer {
        path_id("cus", c, "customer", "customer")?;
    }
    let page = state
        .vault
        .list_charges(
            &ctx,
            customer.map(String::as_str),
            params.limit,
            params.starting_after.as_deref(),
        )
        .await?;
    let mut data = Vec::with_capacity(page.data.len());
    for charge in &page.data {
        data.push(state.vault.charge_json(charge).await);
    }
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "has_more": page.has_more,
    })))
}

pub async fn confirm(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<Confirm>,
) -> Result<Json<Value>, ApiError> {
    path_id("ch", &id, "charge", "charge")?;
    let vault = state.vault.clone();
    let charge = state
        .detach(async move { vault.confirm_charge(&ctx, &id, &body.token).await })
        .await?;
    Ok(Json(state.vault.charge_json(&charge).await))
}

pub async fn capture(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    Path(id): Path<String>,
    MaybeJson(body): MaybeJson<AmountBody>,
) -> Result<Json<Value>, ApiError> {
    path_id("ch", &id, "charge", "charge")?;
    let amount = body.and_then(|b| b.amount);
    let vault = state.vault.clone();
    let charge = state
        .detach(async move { vault.capture_charge(&ctx, &id, amount).await })
        .await?;
    Ok(Json(charge_object(&charge)))
}

pub async fn refund(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    Path(id): Path<String>,
    MaybeJson(body): MaybeJson<AmountBody>,
) -> Result<Response, ApiError> {
    path_id("ch", &id, "charge", "charge")?;
    let amount = body.and_then(|b| b.amount);
    let vault = state.vault.clone();
    let (_, refund) = state
        .detach(async move { vault.refund_charge(&ctx, &id, amount).await })
        .await?;
    Ok((StatusCode::CREATED, Json(refund_object(&refund))).into_response())
}

pub async fn cancel(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    Path(id): Path<String>,
    _body: EmptyBody,
) -> Result<Json<Value>, ApiError> {
    path_id("ch", &id, "charge", "charge")?;
    let vault = state.vault.clone();
    let charge = state
        .detach(async move { vault.cancel_charge(&ctx, &id).await })
        .await?;
    Ok(Json(charge_object(&charge)))
}
