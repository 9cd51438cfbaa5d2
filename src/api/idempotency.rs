//! `Idempotency-Key` on every POST: the same key and the same request replay
//! the first response; the same key with another request is a 409.
//!
//! The request is identified by a keyed MAC (never an unkeyed hash: bodies
//! hold card numbers), and the stored response is sealed under the
//! merchant's volatile key, since a reveal response holds a card number.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::extract::read_body;
use super::AppState;
use crate::crypto::{KeyOwner, Purpose};
use crate::service::{now, Context, ServiceError};
use crate::storage::IdempotencyClaim;

const HEADER: &str = "idempotency-key";
/// Responses larger than this are not stored (none of the API's are).
const MAX_STORED_RESPONSE: usize = 256 * 1024;

fn record_id(key: &str) -> String {
    format!("idempotency/{key}")
}

pub async fn layer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if req.method() != Method::POST {
        return next.run(req).await;
    }
    let Some(key) = req.headers().get(HEADER) else {
        return next.run(req).await;
    };
    let key = match key.to_str() {
        Ok(k) if !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()) => {
            k.to_string()
        }
        _ => {
            return ApiError::invalid(
                "invalid_idempotency_key",
                "Idempotency-Key must be 1 to 255 printable ASCII characters",
            )
            .with_param("Idempotency-Key")
            .into_response()
        }
    };
    let Some(ctx) = req.extensions().get::<Context>().cloned() else {
        return ApiError::internal().into_response();
    };
    match run(&state, &ctx, &key, req, next).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

async fn run(
    state: &AppState,
    ctx: &Context,
    key: &str,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let bytes = read_body(body, state.limits.max_body_bytes).await?;
    let vault = &state.vault;
    let merchant = ctx.merchant_id();

    let mut material = Vec::with_capacity(bytes.len() + 64);
    material.extend_from_slice(b"cardvault/idempotency/v1\0");
    material.extend_from_slice(parts.method.as_str().as_bytes());
    material.push(0);
    material.extend_from_slice(parts.uri.path().as_bytes());
    material.push(0);
    material.extend_from_slice(&bytes);
    let request_mac = vault
        .keyring()
        .fingerprint(merchant, &material)
        .await
        .map_err(|e| ApiError::from(ServiceError::from(e)))?;
    zeroize::Zeroize::zeroize(&mut material);

    let claim = vault
        .storage()
        .claim_idempotency_key(merchant, key, &request_mac, now())
        .await
        .map_err(|e| ApiError::from(ServiceError::from(e)))?;
    match claim {
        IdempotencyClaim::Completed {
            request_hash,
            status,
            body,
        } => {
            if !bool::from(request_hash.ct_eq(&request_mac)) {
                return Err(ApiError::idempotency(
                    "this Idempotency-Key was used with a different request",
                ));
            }
            let plain = vault
                .keyring()
                .open(KeyOwner::Merchant(merchant), &record_id(key), &body)
                .await
                .map_err(|e| ApiError::from(ServiceError::from(e)))?;
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            let mut resp = super::secret_json(status, plain);
            resp.headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            Ok(resp)
        }
        IdempotencyClaim::InFlight {
            request_hash,
            created_at,
        } => {
            if !bool::from(request_hash.ct_eq(&request_mac)) {
                return Err(ApiError::idempotency(
                    "this Idempotency-Key was used with a different request",
                ));
            }
            let lease = i64::try_from(state.limits.idempotency_lease_secs).unwrap_or(i64::MAX);
            if now().saturating_sub(created_at) >= lease {
                // Its node stopped before storing an answer. Whether the
                // action happened is unknown, so it is not run again (that
                // could charge twice): the client looks it up instead.
                Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "idempotency_error",
                    "idempotency_key_interrupted",
                    "the request with this Idempotency-Key was interrupted before it \
                     finished, and its outcome is unknown: look up what it was creating \
                     before sending it again with a new key",
                )
                .with_param("Idempotency-Key"))
            } else {
                Err(ApiError::idempotency(
                    "a request with this Idempotency-Key is still in progress; retry shortly",
                ))
            }
        }
        IdempotencyClaim::Claimed => {
            let req = Request::from_parts(parts, Body::from(bytes));
            // Detached from the connection: once the key is claimed the
            // request runs to its end and stores its answer (or frees the
            // key) even if the client goes away or the request timeout
            // answers first. Dropped halfway, it would leave the key held
            // with nothing to replay.
            let slot = match state.detached_slot() {
                Ok(slot) => slot,
                Err(busy) => {
                    // Refused before it started: the key is free again.
                    if let Err(e) = vault.storage().release_idempotency_key(merchant, key).await {
                        tracing::warn!(error = %e, "could not release idempotency key");
                    }
                    return Err(busy);
                }
            };
            let (owned, merchant, key) = (state.clone(), merchant.to_string(), key.to_string());
            state
                .run_detached(slot, async move {
                    let resp = next.run(req).await;
                    finish(&owned, &merchant, &key, resp).await
                })
                .await
        }
    }
}

/// Stores the outcome, or frees the key when the outcome was a server-side
/// failure the client should be able to retry.
async fn finish(
    state: &AppState,
    merchant: &str,
    key: &str,
    resp: Response,
) -> Result<Response, ApiError> {
    let storage = state.vault.storage();
    let status = resp.status();
    if status.is_server_error() || status == StatusCode::CONFLICT {
        if let Err(e) = storage.release_idempotency_key(merchant, key).await {
            tracing::warn!(error = %e, "could not release idempotency key");
        }
        return Ok(resp);
    }
    let (parts, body) = resp.into_parts();
    let bytes = read_body(body, MAX_STORED_RESPONSE)
        .await
        .map_err(|_| ApiError::internal())?;
    let sealed = state
        .vault
        .keyring()
        .seal(
            KeyOwner::Merchant(merchant),
            Purpose::Volatile,
            &record_id(key),
            &bytes,
        )
        .await;
    let stored = match sealed {
        Ok(sealed) => storage
            .complete_idempotency_key(merchant, key, status.as_u16(), &sealed)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = stored {
        // The action happened; the client gets its answer. A retry with this
        // key will see it in flight rather than run the action twice.
        tracing::warn!(error = %e, "could not store idempotent response");
    }
    Ok(Response::from_parts(parts, Body::from(bytes)))
}
