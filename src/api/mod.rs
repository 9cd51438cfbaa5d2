//! HTTP API v1: routing, middleware (request ids, authentication,
//! idempotency, access log), DTOs and handlers. Handlers translate between
//! JSON and the service layer and nothing else.

mod capture_sessions;
mod cards;
mod charges;
mod customers;
pub mod error;
mod events;
mod extract;
pub mod hosted;
mod idempotency;
mod payments;
mod tokens;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tracing::Instrument;

pub use error::ApiError;

use crate::config::Limits;
use crate::domain::{is_valid_id, new_id};
use crate::service::{Context, ServiceError, Vault};
use crate::storage::ApiKeyKind;

/// The peer address of a connection, put into each request's extensions by
/// the server.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub std::net::SocketAddr);

#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// What every request shares. Behind one `Arc`: axum clones the state for
/// each extractor and middleware, and one reference count to bump on the
/// request path is cheaper, across cores, than three.
pub struct Shared {
    pub vault: Arc<Vault>,
    pub limits: Arc<Limits>,
    /// Slots for requests running on a task of their own (see
    /// [`AppState::detach`]): `limits.max_connections` of them.
    pub detached: Arc<tokio::sync::Semaphore>,
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    pub fn new(vault: Arc<Vault>, limits: Arc<Limits>) -> Self {
        let detached = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
        AppState(Arc::new(Shared {
            vault,
            limits,
            detached,
        }))
    }

    /// Runs `work` on a task of its own (see [`AppState::run_detached`]),
    /// or refuses it (503 `server_busy`) when no slot is free.
    pub(crate) async fn detach<T, E, F>(&self, work: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        E: Into<ApiError> + Send + 'static,
        F: std::future::Future<Output = Result<T, E>> + Send + 'static,
    {
        let slot = self.detached_slot()?;
        self.run_detached(slot, work).await
    }

    /// A slot for a detached request: taken before the request starts
    /// anything, so that a refusal leaves nothing half done. At most
    /// `limits.max_connections` are out at once: a detached request
    /// outlives its connection, so the connection limit does not bound it.
    pub(crate) fn detached_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        Arc::clone(&self.detached).try_acquire_owned().map_err(|_| {
            tracing::warn!("detached request limit reached; refusing a request");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "server_busy",
                "too many requests are in progress; retry shortly",
            )
        })
    }

    /// Runs `work` on a task of its own, holding `slot`, with the request's
    /// id and span, so that a client hanging up (or the request timeout
    /// answering first) cannot cancel it halfway: between a processor's
    /// answer and the write that records it, or between claiming an
    /// idempotency key and storing the answer.
    pub(crate) async fn run_detached<T, E, F>(
        &self,
        slot: tokio::sync::OwnedSemaphorePermit,
        work: F,
    ) -> Result<T, ApiError>
    where
        T: Send + 'static,
        E: Into<ApiError> + Send + 'static,
        F: std::future::Future<Output = Result<T, E>> + Send + 'static,
    {
        let request_id = error::current_request_id();
        let task = tokio::spawn(
            error::REQUEST_ID
                .scope(request_id, async move {
                    let done = work.await;
                    drop(slot);
                    done
                })
                .in_current_span(),
        );
        match task.await {
            Ok(done) => done.map_err(Into::into),
            Err(e) => {
                tracing::error!(error = %e, "detached request task failed");
                Err(ApiError::internal())
            }
        }
    }
}

/// The full application router.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route(
            "/v1/customers",
            post(customers::create).get(customers::list),
        )
        .route(
            "/v1/customers/{customer}",
            get(customers::get)
                .patch(customers::update)
                .delete(customers::delete),
        )
        .route(
            "/v1/customers/{customer}/cards",
            post(cards::create).get(cards::list),
        )
        .route(
            "/v1/customers/{customer}/cards/{card}",
            get(cards::get).patch(cards::update).delete(cards::delete),
        )
        .route("/v1/cards/{card}/reveal", post(cards::reveal))
        .route("/v1/capture_sessions", post(capture_sessions::create))
        .route("/v1/capture_sessions/{session}", get(capture_sessions::get))
        .route("/v1/charges", post(charges::create).get(charges::list))
        .route("/v1/charges/{charge}", get(charges::get))
        .route("/v1/charges/{charge}/confirm", post(charges::confirm))
        .route("/v1/charges/{charge}/capture", post(charges::capture))
        .route("/v1/charges/{charge}/refunds", post(charges::refund))
        .route("/v1/charges/{charge}/cancel", post(charges::cancel))
        .route("/v1/events", get(events::list))
        .route("/v1/events/{event}", get(events::get))
        .route(
            "/v1/customers/{customer}/cards/{card}/verifications",
            post(payments::start_verification),
        )
        .route(
            "/v1/customers/{customer}/cards/{card}/verifications/{verification}",
            get(payments::get_verification),
        )
        .route(
            "/v1/customers/{customer}/cards/{card}/verifications/{verification}/confirm",
            post(payments::confirm_verification),
        )
        .route(
            "/v1/webhook_endpoints",
            post(payments::create_endpoint).get(payments::list_endpoints),
        )
        .route(
            "/v1/webhook_endpoints/{endpoint}",
            get(payments::get_endpoint).delete(payments::delete_endpoint),
        )
        .route(
            "/v1/webhook_endpoints/{endpoint}/deliveries",
            get(payments::list_deliveries),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            idempotency::layer,
        ))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    // Token creation is the one route a publishable key may call.
    let public = Router::new()
        .route("/v1/tokens", post(tokens::create))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            idempotency::layer,
        ))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            authenticate_publishable,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(v1)
        .merge(public)
        .merge(hosted::router(state.clone()))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "route_not_found",
        "no such route",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        "this route does not accept that method",
    )
}

/// Gives every request an id (`Request-Id` header, error bodies, logs) and
/// writes one access-log line without query strings or bodies.
async fn request_id(req: Request, next: Next) -> Response {
    let id = new_id("req");
    let method = req.method().clone();
    // The path holds object ids only; query strings (e.g. an email search)
    // and bodies are never logged.
    // A client may put a card number in a path by mistake: digit runs that
    // could be one are masked.
    let path = error::mask_digit_runs(&req.uri().path().chars().take(200).collect::<String>());
    let started = Instant::now();
    REQUESTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut resp = error::REQUEST_ID.scope(id.clone(), next.run(req)).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("request-id", v);
    }
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    tracing::info!(
        request_id = %id,
        %method,
        %path,
        status = resp.status().as_u16(),
        micros = started.elapsed().as_micros() as u64,
        "request"
    );
    resp
}

/// Resolves the bearer secret key into a [`Context`]. Publishable keys are
/// refused on these routes.
async fn authenticate(State(state): State<AppState>, req: Request, next: Next) -> Response {
    authenticate_key(state, req, next, false).await
}

/// Like [`authenticate`], also accepting publishable keys (token creation).
async fn authenticate_publishable(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    authenticate_key(state, req, next, true).await
}

async fn authenticate_key(
    state: AppState,
    mut req: Request,
    next: Next,
    publishable_ok: bool,
) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let origin = req
        .extensions()
        .get::<PeerAddr>()
        .map(|p| p.0.ip().to_string());
    let Some(presented) = presented.filter(|p| !p.is_empty()) else {
        state
            .vault
            .record_auth_failure(origin, error::current_request_id(), "missing_key")
            .await;
        return ApiError::unauthenticated("missing API key: send Authorization: Bearer sk_…")
            .into_response();
    };
    let principal = match state.vault.authenticate(presented).await {
        Ok(p) => p,
        Err(ServiceError::Unauthenticated) => {
            state
                .vault
                .record_auth_failure(origin, error::current_request_id(), "invalid_key")
                .await;
            return ApiError::unauthenticated("invalid API key").into_response();
        }
        Err(e) => return ApiError::from(e).into_response(),
    };
    if principal.kind != ApiKeyKind::Secret && !publishable_ok {
        state
            .vault
            .record_scope_denial(
                &principal,
                origin,
                error::current_request_id(),
                "secret_key",
            )
            .await;
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "secret_key_required",
            "this route needs a secret key (sk_…); publishable keys may only create tokens",
        )
        .into_response();
    }
    req.extensions_mut().insert(Context {
        principal,
        origin,
        request_id: error::current_request_id(),
    });
    next.run(req).await
}

/// Validates an id from the path; a malformed one is simply not found.
pub(crate) fn path_id(prefix: &str, value: &str, what: &str, param: &str) -> Result<(), ApiError> {
    if is_valid_id(prefix, value) {
        Ok(())
    } else {
        Err(ApiError::not_found(what).with_param(param))
    }
}

/// A JSON response whose body is secret (a revealed number, a replayed
/// sealed response). The body is handed to the server without another
/// copy and wiped when the server drops it after sending.
pub(crate) fn secret_json(status: StatusCode, body: zeroize::Zeroizing<Vec<u8>>) -> Response {
    let mut resp = Response::new(axum::body::Body::from(bytes::Bytes::from_owner(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

/// Requests answered since start (every route, `/metrics` included).
static REQUESTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Only loopback peers may read `/metrics`; a request without a known
/// peer may not.
fn metrics_allowed(peer: Option<&PeerAddr>) -> bool {
    peer.is_some_and(|p| p.0.ip().is_loopback())
}

/// Prometheus text-format counters. Only a client on the loopback interface
/// (a local scraper or sidecar) gets them; to anyone else the route does not
/// exist. No counter carries a merchant, card or key identifier.
async fn metrics(State(state): State<AppState>, req: Request) -> Response {
    if !metrics_allowed(req.extensions().get::<PeerAddr>()) {
        return not_found().await.into_response();
    }
    let (hsm, writes, reads) = state.vault.counters();
    let requests = REQUESTS.load(std::sync::atomic::Ordering::Relaxed);
    let mut out = String::new();
    for (name, help, value) in [
        (
            "cardvault_http_requests_total",
            "HTTP requests answered.",
            requests,
        ),
        (
            "cardvault_hsm_operations_total",
            "Operations sent to the HSM (key loads, wraps, and in hsm mode every seal and open).",
            hsm,
        ),
        (
            "cardvault_db_write_batches_total",
            "Group-commit transactions committed.",
            writes.batches,
        ),
        (
            "cardvault_db_write_units_total",
            "Write units committed in those transactions.",
            writes.units,
        ),
        (
            "cardvault_db_read_batches_total",
            "Batched read queries sent (PostgreSQL card and wallet reads).",
            reads.queries,
        ),
        (
            "cardvault_db_batched_reads_total",
            "Reads those batched queries answered.",
            reads.reads,
        ),
    ] {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
        ));
    }
    let name = "cardvault_db_write_seconds_total";
    out.push_str(&format!(
        "# HELP {name} Time the group-commit writer spent on committed batches, by phase: \
         the units' statements, the batch's multi-row inserts, COMMIT.\n# TYPE {name} counter\n"
    ));
    for (phase, us) in [
        ("units", writes.collect_us),
        ("flush", writes.flush_us),
        ("commit", writes.commit_us),
    ] {
        out.push_str(&format!(
            "{name}{{phase=\"{phase}\"}} {}\n",
            us as f64 / 1e6
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    let (db, hsm) = state.vault.readiness().await;
    let ok = db.is_ok() && hsm.is_ok();
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    if let Err(e) = &db {
        tracing::warn!(error = %e, "readiness: database down");
    }
    if let Err(e) = &hsm {
        tracing::warn!(error = %e, "readiness: hsm down");
    }
    let word = |r: &Result<(), String>| if r.is_ok() { "up" } else { "down" };
    (
        status,
        Json(serde_json::json!({
            "status": if ok { "ready" } else { "unavailable" },
            "database": word(&db),
            "hsm": word(&hsm),
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::{metrics_allowed, PeerAddr};

    #[test]
    fn metrics_are_for_loopback_peers_only() {
        let peer = |a: &str| PeerAddr(a.parse().unwrap());
        assert!(metrics_allowed(Some(&peer("127.0.0.1:5000"))));
        assert!(metrics_allowed(Some(&peer("[::1]:5000"))));
        assert!(!metrics_allowed(Some(&peer("10.1.2.3:5000"))));
        assert!(!metrics_allowed(Some(&peer("[2001:db8::1]:5000"))));
        assert!(!metrics_allowed(None));
    }
}
