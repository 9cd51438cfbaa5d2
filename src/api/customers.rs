//! `/v1/customers`: DTOs and handlers.

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::{double_option, EmptyBody, JsonBody};
use super::{path_id, AppState};
use crate::service::{Context, NewCustomer};
use crate::storage::{Address, CustomerRecord, CustomerUpdate, Document};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocumentIn {
    #[serde(rename = "type")]
    doc_type: String,
    number: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddressIn {
    line1: Option<String>,
    line2: Option<String>,
    city: Option<String>,
    state: Option<String>,
    postal_code: Option<String>,
    country: Option<String>,
}

impl From<DocumentIn> for Document {
    fn from(d: DocumentIn) -> Self {
        Document {
            doc_type: d.doc_type,
            number: d.number,
        }
    }
}

impl From<AddressIn> for Address {
    fn from(a: AddressIn) -> Self {
        Address {
            line1: a.line1,
            line2: a.line2,
            city: a.city,
            state: a.state,
            postal_code: a.postal_code,
            country: a.country,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateCustomer {
    email: Option<String>,
    first_name: Option<String>,
    last_name: Option<String>,
    phone: Option<String>,
    document: Option<DocumentIn>,
    billing_address: Option<AddressIn>,
    metadata: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateCustomer {
    email: Option<String>,
    #[serde(default, deserialize_with = "double_option")]
    first_name: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    last_name: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    phone: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    document: Option<Option<DocumentIn>>,
    #[serde(default, deserialize_with = "double_option")]
    billing_address: Option<Option<AddressIn>>,
    metadata: Option<BTreeMap<String, String>>,
}

#[derive(Serialize)]
pub struct CustomerOut {
    id: String,
    object: &'static str,
    email: String,
    first_name: Option<String>,
    last_name: Option<String>,
    phone: Option<String>,
    document: Option<Document>,
    billing_address: Option<Address>,
    metadata: BTreeMap<String, String>,
    default_card: Option<String>,
    created: i64,
}

impl From<CustomerRecord> for CustomerOut {
    fn from(c: CustomerRecord) -> Self {
        CustomerOut {
            id: c.id,
            object: "customer",
            email: c.email,
            first_name: c.first_name,
            last_name: c.last_name,
            phone: c.phone,
            document: c.document,
            billing_address: c.billing_address,
            metadata: c.metadata,
            default_card: c.default_card_id,
            created: c.created_at,
        }
    }
}

/// `{"object": "list", "data": [...], "has_more": bool}`
#[derive(Serialize)]
pub struct ListOut<T> {
    pub object: &'static str,
    pub data: Vec<T>,
    pub has_more: bool,
}

pub async fn create(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    JsonBody(body): JsonBody<CreateCustomer>,
) -> Result<Response, ApiError> {
    let new = NewCustomer {
        email: body.email.ok_or_else(|| {
            ApiError::invalid("parameter_missing", "email is required").with_param("email")
        })?,
        first_name: body.first_name,
        last_name: body.last_name,
        phone: body.phone,
        document: body.document.map(Into::into),
        billing_address: body.billing_address.map(Into::into),
        metadata: body.metadata,
    };
    let c = state.vault.create_customer(&ctx, new).await?;
    Ok((StatusCode::CREATED, Json(CustomerOut::from(c))).into_response())
}

pub async fn get(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    Path(id): Path<String>,
) -> Result<Json<CustomerOut>, ApiError> {
    path_id("cus", &id, "customer", "customer")?;
    Ok(Json(state.vault.get_customer(&ctx, &id).await?.into()))
}

pub async fn update(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<UpdateCustomer>,
) -> Result<Json<CustomerOut>, ApiError> {
    path_id("cus", &id, "customer", "customer")?;
    let update = CustomerUpdate {
        email: body.email,
        first_name: body.first_name,
        last_name: body.last_name,
        phone: body.phone,
        document: body.document.map(|d| d.map(Into::into)),
        billing_address: body.billing_address.map(|a| a.map(Into::into)),
        metadata: body.metadata,
    };
    Ok(Json(
        state.vault.update_customer(&ctx, &id, update).await?.into(),
    ))
}

pub async fn delete(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    Path(id): Path<String>,
    _body: EmptyBody,
) -> Result<Json<serde_json::Value>, ApiError> {
    path_id("cus", &id, "customer", "customer")?;
    state.vault.delete_customer(&ctx, &id).await?;
    Ok(Json(
        serde_json::json!({"id": id, "object": "customer", "deleted": true}),
    ))
}

pub async fn list(
    State(state): State<AppState>,
    Extension(ctx): Extension<Context>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<ListOut<CustomerOut>>, ApiError> {
    let mut limit = 10u32;
    let mut email = None;
    let mut starting_after = None;
    for (k, v) in &query {
        match k.as_str() {
            "limit" => {
                limit = v
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
            "email" => email = Some(v.as_str()),
            "starting_after" => {
                path_id("cus", v, "customer", "starting_after")?;
                starting_after = Some(v.as_str());
            }
            other => {
                return Err(ApiError::invalid(
                    "parameter_unknown",
                    format!(
                        "unknown query parameter {}",
                        super::error::mask_digits(other)
                    ),
                )
                .with_param(super::error::mask_digits(other)))
            }
        }
    }
    let page = state
        .vault
        .list_customers(&ctx, email, limit, starting_after)
        .await?;
    Ok(Json(ListOut {
        object: "list",
        data: page.data.into_iter().map(Into::into).collect(),
        has_more: page.has_more,
    }))
}
