//! `POST /v1/tokens` (publishable or secret key): one-time tokens from card
//! data, or a fresh CVV for a saved card.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use zeroize::Zeroizing;

use super::error::ApiError;
use super::extract::JsonBody;
use super::AppState;
use crate::service::{token_object, Context, NewToken};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    number: Option<Zeroizing<String>>,
    exp_month: Option<i64>,
    exp_year: Option<i64>,
    cvc: Option<Zeroizing<String>>,
    holder_name: Option<String>,
    card: Option<String>,
}

fn required<T>(value: Option<T>, param: &str) -> Result<T, ApiError> {
    value.ok_or_else(|| {
        ApiError::invalid("parameter_missing", format!("{param} is required")).with_param(param)
    })
}

pub async fn create(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    JsonBody(body): JsonBody<CreateToken>,
) -> Result<Response, ApiError> {
    let new = match (body.number, body.card) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "parameter_conflict",
                "pass either number or card, not both",
            )
            .with_param("card"))
        }
        (Some(number), None) => NewToken::Card {
            number,
            exp_month: required(body.exp_month, "exp_month")?,
            exp_year: required(body.exp_year, "exp_year")?,
            cvc: body.cvc,
            holder_name: body.holder_name,
        },
        (None, Some(card)) => {
            if body.exp_month.is_some() || body.exp_year.is_some() || body.holder_name.is_some() {
                return Err(ApiError::invalid(
                    "parameter_unknown",
                    "a CVV token for a saved card takes only card and cvc",
                )
                .with_param("card"));
            }
            super::path_id("card", &card, "card", "card")?;
            NewToken::Cvc {
                card_id: card,
                cvc: required(body.cvc, "cvc")?,
            }
        }
        (None, None) => {
            return Err(
                ApiError::invalid("parameter_missing", "number (or card) is required")
                    .with_param("number"),
            )
        }
    };
    let token = state.vault.create_token(&ctx, new).await?;
    Ok((StatusCode::CREATED, Json(token_object(&token))).into_response())
}
