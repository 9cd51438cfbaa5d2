//! `/v1/customers/{customer}/cards` and `/v1/cards/{card}/reveal`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::customers::ListOut;
use super::error::ApiError;
use super::extract::{double_option, EmptyBody, JsonBody};
use super::{path_id, AppState};
use crate::domain::Brand;
use crate::service::{CardView, Context, NewCard};
use crate::storage::CardUpdate;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateCard {
    number: Option<Zeroizing<String>>,
    exp_month: Option<i64>,
    exp_year: Option<i64>,
    holder_name: Option<String>,
    /// A one-time card token (`tok_…`) instead of the fields above.
    token: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateCard {
    #[serde(default, deserialize_with = "double_option")]
    alias: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    holder_name: Option<Option<String>>,
    exp_month: Option<i64>,
    exp_year: Option<i64>,
    default: Option<bool>,
}

#[derive(Serialize)]
struct SecurityCodeOut {
    length: u8,
    location: &'static str,
}

#[derive(Serialize)]
pub struct CardOut {
    id: String,
    object: &'static str,
    customer: String,
    bin: String,
    last4: String,
    brand: String,
    funding: String,
    exp_month: i64,
    exp_year: i64,
    holder_name: Option<String>,
    alias: Option<String>,
    fingerprint: String,
    security_code: SecurityCodeOut,
    status: String,
    default: bool,
    created: i64,
}

impl From<CardView> for CardOut {
    fn from(v: CardView) -> Self {
        let c = v.card;
        let code = c
            .brand
            .parse::<Brand>()
            .unwrap_or(Brand::Unknown)
            .security_code();
        // The first 16 bytes of the keyed fingerprint are plenty to tell
        // cards apart and say nothing about the number.
        let fingerprint = hex::encode(&c.fingerprint[..c.fingerprint.len().min(16)]);
        CardOut {
            id: c.id,
            object: "card",
            customer: c.customer_id,
            bin: c.bin,
            last4: c.last4,
            brand: c.brand,
            funding: c.funding,
            exp_month: c.exp_month,
            exp_year: c.exp_year,
            holder_name: c.holder_name,
            alias: c.alias,
            fingerprint,
            security_code: SecurityCodeOut {
                length: code.length,
                location: code.location.as_str(),
            },
            status: c.status,
            default: v.is_default,
            created: c.created_at,
        }
    }
}

fn required<T>(value: Option<T>, param: &str) -> Result<T, ApiError> {
    value.ok_or_else(|| {
        ApiError::invalid("parameter_missing", format!("{param} is required")).with_param(param)
    })
}

pub async fn create(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    Path(customer): Path<String>,
    JsonBody(body): JsonBody<CreateCard>,
) -> Result<Response, ApiError> {
    path_id("cus", &customer, "customer", "customer")?;
    if let Some(token) = body.token {
        if body.number.is_some()
            || body.exp_month.is_some()
            || body.exp_year.is_some()
            || body.holder_name.is_some()
        {
            return Err(ApiError::invalid(
                "parameter_conflict",
                "pass either token or the card fields, not both",
            )
            .with_param("token"));
        }
        let (view, created) = state
            .vault
            .add_card_from_token(&ctx, &customer, &token)
            .await?;
        let status = if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        return Ok((status, Json(CardOut::from(view))).into_response());
    }
    let new = NewCard {
        number: required(body.number, "number")?,
        exp_month: required(body.exp_month, "exp_month")?,
        exp_year: required(body.exp_year, "exp_year")?,
        holder_name: body.holder_name,
    };
    let (view, created) = state.vault.add_card(&ctx, &customer, new).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(CardOut::from(view))).into_response())
}

pub async fn list(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    Path(customer): Path<String>,
) -> Result<Json<ListOut<CardOut>>, ApiError> {
    path_id("cus", &customer, "customer", "customer")?;
    let cards = state.vault.list_cards(&ctx, &customer).await?;
    Ok(Json(ListOut {
        object: "list",
        data: cards.into_iter().map(Into::into).collect(),
        has_more: false,
    }))
}

pub async fn get(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    Path((customer, card)): Path<(String, String)>,
) -> Result<Json<CardOut>, ApiError> {
    path_id("cus", &customer, "customer", "customer")?;
    path_id("card", &card, "card", "card")?;
    Ok(Json(
        state.vault.get_card(&ctx, &customer, &card).await?.into(),
    ))
}

pub async fn update(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    Path((customer, card)): Path<(String, String)>,
    JsonBody(body): JsonBody<UpdateCard>,
) -> Result<Json<CardOut>, ApiError> {
    path_id("cus", &customer, "customer", "customer")?;
    path_id("card", &card, "card", "card")?;
    let make_default = match body.default {
        None => false,
        Some(true) => true,
        Some(false) => {
            return Err(ApiError::invalid(
                "invalid_default",
                "default can only be set to true; make another card the default instead",
            )
            .with_param("default"))
        }
    };
    let update = CardUpdate {
        alias: body.alias,
        holder_name: body.holder_name,
        exp_month: body.exp_month,
        exp_year: body.exp_year,
        make_default,
    };
    Ok(Json(
        state
            .vault
            .update_card(&ctx, &customer, &card, update)
            .await?
            .into(),
    ))
}

pub async fn delete(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    Path((customer, card)): Path<(String, String)>,
    _body: EmptyBody,
) -> Result<Json<serde_json::Value>, ApiError> {
    path_id("cus", &customer, "customer", "customer")?;
    path_id("card", &card, "card", "card")?;
    state.vault.delete_card(&ctx, &customer, &card).await?;
    Ok(Json(
        serde_json::json!({"id": card, "object": "card", "deleted": true}),
    ))
}

#[derive(Serialize)]
struct RevealOut<'a> {
    id: &'a str,
    object: &'static str,
    number: &'a str,
    exp_month: i64,
    exp_year: i64,
}

pub async fn reveal(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    Path(card): Path<String>,
    _body: EmptyBody,
) -> Result<Response, ApiError> {
    path_id("card", &card, "card", "card")?;
    let revealed = state.vault.reveal_card(&ctx, &card).await?;
    let body = Zeroizing::new(
        serde_json::to_vec(&RevealOut {
            id: &card,
            object: "card_reveal",
            number: &revealed.number,
            exp_month: revealed.exp_month,
            exp_year: revealed.exp_year,
        })
        .map_err(|_| ApiError::internal())?,
    );
    Ok(super::secret_json(StatusCode::OK, body))
}
