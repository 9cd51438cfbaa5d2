//! The hosted pages, served by the vault itself: the card-capture form a
//! merchant embeds in an iframe, the CVV re-collect page, their static
//! assets, and the JSON endpoints their scripts call.
//!
//! Security model:
//! - No API key ever reaches a browser. A page's credential (the capture
//!   session secret, the CVV link MAC) travels in the URL fragment, which
//!   browsers never send to a server; the page's script reads it and sends
//!   it in the JSON body of a same-origin `fetch`.
//! - Strict Content-Security-Policy: only the vault's own scripts, styles
//!   and connections, no inline code, `frame-ancestors` limited to the
//!   session's `allowed_origin` (the CVV page may not be framed at all).
//! - The JSON endpoints accept only `application/json` (a cross-site form
//!   cannot send it without a CORS preflight, which the vault never
//!   answers), refuse requests whose `Origin` or `Sec-Fetch-Site` says they
//!   come from another site, and need the page's credential anyway.
//! - Card inputs have no `name`, so even a native form submission (script
//!   blocked) would send no card data; numbers only ever travel in POST
//!   bodies. `Cache-Control: no-store` (set for every response by the
//!   request-id middleware), `Referrer-Policy: no-referrer`, `nosniff`.

use std::sync::OnceLock;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use zeroize::Zeroizing;

use super::error::{current_request_id, ApiError};
use super::extract::JsonBody;
use super::{AppState, PeerAddr};
use crate::domain::brand::detection_table;
use crate::domain::{Brand, Currency};
use crate::service::{Caller, HostedCard, SessionState};

const CAPTURE_HTML: &str = include_str!("assets/capture.html");
const CLOSED_HTML: &str = include_str!("assets/closed.html");
const CVC_HTML: &str = include_str!("assets/cvc.html");

/// Static assets: name, content type, body.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "hosted.css",
        "text/css; charset=utf-8",
        include_str!("assets/hosted.css"),
    ),
    (
        "card.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/card.js"),
    ),
    (
        "capture.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/capture.js"),
    ),
    (
        "cvc.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/cvc.js"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_str!("assets/favicon.svg"),
    ),
];

/// The routes of the hosted pages (no API key: see the module docs).
pub fn router(state: AppState) -> Router<AppState> {
    let calls = Router::new()
        .route("/hosted/capture/{session}/card", post(submit_card))
        .route("/hosted/cvc/{charge}/details", post(cvc_details))
        .route("/hosted/cvc/{charge}/confirm", post(cvc_confirm))
        .route_layer(middleware::from_fn_with_state(state, same_origin));
    Router::new()
        .route("/hosted/capture/{session}", get(capture_page))
        .route("/hosted/cvc/{charge}", get(cvc_page))
        .route("/hosted/assets/{file}", get(asset))
        .merge(calls)
        .route_layer(middleware::from_fn(security_headers))
}

/// The Content-Security-Policy of a page that `ancestors` may frame.
pub fn page_csp(ancestors: &str) -> String {
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
         connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors {ancestors}"
    )
}

/// Headers every hosted response carries; pages set their own CSP first.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        HeaderName::from_static("cross-origin-resource-policy"),
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        HeaderName::from_static("permissions-policy"),
        HeaderValue::from_static("camera=(), microphone=(), geolocation=(), payment=(), usb=()"),
    );
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
        );
    }
    resp
}

/// Refuses calls that a browser says come from another site. Clients that
/// are not browsers send neither header and still need the credential.
async fn same_origin(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let own = state.vault.hosted_settings().public_url.as_bytes();
    let origin_ok = req
        .headers()
        .get(header::ORIGIN)
        .is_none_or(|o| o.as_bytes() == own);
    let site_ok = req
        .headers()
        .get("sec-fetch-site")
        .is_none_or(|s| s.as_bytes() == b"same-origin");
    if origin_ok && site_ok {
        next.run(req).await
    } else {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "cross_origin_request",
            "hosted page calls must come from the vault's own pages",
        )
        .with_param("Origin")
        .into_response()
    }
}

fn caller(req_peer: Option<PeerAddr>) -> Caller {
    Caller {
        origin: req_peer.map(|p| p.0.ip().to_string()),
        request_id: current_request_id(),
    }
}

/// Escapes text for an HTML element or a double-quoted attribute.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Fills `{{name}}` placeholders with escaped values.
fn render(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = template.to_string();
    for (name, value) in values {
        out = out.replace(&format!("{{{{{name}}}}}"), &html_escape(value));
    }
    out
}

fn html(status: StatusCode, csp: &str, body: String) -> Response {
    let mut resp = (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(csp) {
        resp.headers_mut()
            .insert(header::CONTENT_SECURITY_POLICY, v);
    }
    resp
}

async fn capture_page(
    State(state): State<AppState>,
    Path(session): Path<String>,
) -> Result<Response, ApiError> {
    let Some(page) = state.vault.capture_page(&session).await? else {
        return Ok(html(
            StatusCode::NOT_FOUND,
            &page_csp("'none'"),
            render(
                CLOSED_HTML,
                &[
                    ("state", "unknown"),
                    ("parent_origin", ""),
                    ("title", "Card form not found"),
                    (
                        "message",
                        "This link is not valid. Go back to the page you came from and try again.",
                    ),
                ],
            ),
        ));
    };
    let csp = page_csp(&page.allowed_origin);
    let merchant = if page.merchant_name.is_empty() {
        "the merchant".to_string()
    } else {
        page.merchant_name
    };
    let body = match page.state {
        SessionState::Open => {
            return Ok(html(
                StatusCode::OK,
                &csp,
                render(
                    CAPTURE_HTML,
                    &[
                        ("parent_origin", &page.allowed_origin),
                        ("merchant", &merchant),
                    ],
                ),
            ))
        }
        SessionState::Used => render(
            CLOSED_HTML,
            &[
                ("state", "used"),
                ("parent_origin", &page.allowed_origin),
                ("title", "This card form was already used"),
                (
                    "message",
                    "Each card form saves one card. To add another card, reload the page you came from.",
                ),
            ],
        ),
        SessionState::Expired => render(
            CLOSED_HTML,
            &[
                ("state", "expired"),
                ("parent_origin", &page.allowed_origin),
                ("title", "This card form has expired"),
                (
                    "message",
                    "For your security, card forms stay open for a few minutes only. Reload the page you came from to get a new one.",
                ),
            ],
        ),
    };
    Ok(html(StatusCode::GONE, &csp, body))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardSubmission {
    secret: String,
    number: Option<Zeroizing<String>>,
    exp_month: Option<i64>,
    exp_year: Option<i64>,
    cvc: Option<Zeroizing<String>>,
    holder_name: Option<String>,
}

async fn submit_card(
    State(state): State<AppState>,
    peer: Option<axum::Extension<PeerAddr>>,
    Path(session): Path<String>,
    JsonBody(body): JsonBody<CardSubmission>,
) -> Result<Response, ApiError> {
    let card = HostedCard {
        number: body.number,
        exp_month: body.exp_month,
        exp_year: body.exp_year,
        cvc: body.cvc,
        holder_name: body.holder_name,
    };
    let captured = state
        .vault
        .capture_card(caller(peer.map(|p| p.0)), &session, &body.secret, card)
        .await?;
    let status = if captured.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    // Exactly what the page may pass on to its parent: never the number.
    Ok((
        status,
        Json(json!({
            "card": {
                "id": captured.card.id,
                "brand": captured.card.brand,
                "last4": captured.card.last4,
            },
            "parent_origin": captured.allowed_origin,
        })),
    )
        .into_response())
}

async fn cvc_page(Path(_charge): Path<String>) -> Response {
    // The page is the same for every charge: what it shows is fetched by
    // its script with the link's credential, which only it can read.
    html(StatusCode::OK, &page_csp("'none'"), render(CVC_HTML, &[]))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CvcDetailsBody {
    credential: String,
}

async fn cvc_details(
    State(state): State<AppState>,
    Path(charge): Path<String>,
    JsonBody(body): JsonBody<CvcDetailsBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let page = state.vault.cvc_page(&charge, &body.credential).await?;
    let c = &page.charge;
    let exponent = Currency::parse(&c.currency).map_or(2, Currency::exponent);
    let code = page.brand.security_code();
    let status = if page.awaiting_cvc {
        "awaiting_cvc"
    } else {
        crate::service::charge_object(c)["status"]
            .as_str()
            .map_or("pending", |s| match s {
                "succeeded" => "succeeded",
                "failed" => "failed",
                "canceled" => "canceled",
                _ => "pending",
            })
    };
    Ok(Json(json!({
        "merchant": page.merchant_name,
        "amount": c.amount,
        "currency": c.currency.to_ascii_uppercase(),
        "exponent": exponent,
        "brand": page.brand.as_str(),
        "brand_name": page.brand.display_name(),
        "last4": page.last4,
        "cvc_length": code.length,
        "cvc_location": code.location.as_str(),
        "status": status,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CvcConfirmBody {
    credential: String,
    cvc: Option<Zeroizing<String>>,
}

async fn cvc_confirm(
    State(state): State<AppState>,
    peer: Option<axum::Extension<PeerAddr>>,
    Path(charge): Path<String>,
    JsonBody(body): JsonBody<CvcConfirmBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Some(cvc) = body.cvc else {
        return Err(ApiError::invalid("parameter_missing", "cvc is required").with_param("cvc"));
    };
    let vault = state.vault.clone();
    let who = caller(peer.map(|p| p.0));
    let credential = body.credential;
    let done = state
        .detach(async move {
            vault
                .confirm_charge_hosted(who, &charge, &credential, cvc)
                .await
        })
        .await?;
    let shown = crate::service::charge_object(&done);
    Ok(Json(json!({
        "status": shown["status"],
        "failure_code": done.failure_code,
    })))
}

/// The brand table of [`Brand::detect`] as a script, so that the page's
/// live brand badge agrees with what the vault will store.
fn brands_js() -> &'static str {
    static JS: OnceLock<String> = OnceLock::new();
    JS.get_or_init(|| {
        let describe = |b: Brand| {
            let code = b.security_code();
            json!({
                "brand": b.as_str(),
                "name": b.display_name(),
                "cvc": code.length,
                "cvcFront": code.location.as_str() == "front",
                "cvcRequired": b.security_code_required(),
                "lengths": b.valid_lengths(),
            })
        };
        let rules: Vec<_> = detection_table()
            .into_iter()
            .map(|(brand, ranges)| {
                let mut entry = describe(brand);
                entry["ranges"] = json!(ranges
                    .iter()
                    .map(|r| [r.len as u64, u64::from(r.lo), u64::from(r.hi)])
                    .collect::<Vec<_>>());
                entry
            })
            .collect();
        let table = json!({"rules": rules, "unknown": describe(Brand::Unknown)});
        format!("\"use strict\";\nwindow.CardvaultBrands = {table};\n")
    })
}

async fn asset(Path(file): Path<String>) -> Response {
    let found = if file == "brands.js" {
        Some(("text/javascript; charset=utf-8", brands_js()))
    } else {
        ASSETS
            .iter()
            .find(|(name, _, _)| *name == file)
            .map(|(_, ct, body)| (*ct, *body))
    };
    match found {
        Some((ct, body)) => ([(header::CONTENT_TYPE, ct)], body).into_response(),
        None => ApiError::not_found("asset").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_rendering() {
        assert_eq!(
            html_escape(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(
            render("<p title=\"{{t}}\">{{t}}</p>", &[("t", "a<b")]),
            "<p title=\"a&lt;b\">a&lt;b</p>"
        );
    }

    #[test]
    fn pages_have_no_inline_code_and_no_named_card_inputs() {
        for page in [CAPTURE_HTML, CLOSED_HTML, CVC_HTML] {
            let lower = page.to_ascii_lowercase();
            assert!(!lower.contains("<style"), "inline style element");
            assert!(!lower.contains(" style="), "inline style attribute");
            assert!(!lower.contains("javascript:"), "script URL");
            for tag in lower.split('<').skip(1) {
                let tag = tag.split('>').next().unwrap_or("");
                // No inline event handlers (on…= attributes).
                let handler = tag
                    .split_whitespace()
                    .skip(1)
                    .any(|attr| attr.starts_with("on") && attr.contains('='));
                assert!(!handler, "inline handler in <{tag}>");
                // An input without a name is never part of a native form
                // submission, so card data cannot end up in a URL.
                if tag.starts_with("input") {
                    assert!(!tag.contains("name="), "named input <{tag}>");
                }
            }
            for script in lower.split("<script").skip(1) {
                assert!(script.trim_start().starts_with("src=\"/hosted/assets/"));
                assert!(script.contains("></script>"));
            }
        }
        assert!(brands_js().contains("\"visa\""));
    }
}
