//! Hosted card capture and CVV re-collect (issue 7), over the real TLS
//! server: capture session creation and its validation, isolation between
//! merchants, the page's security headers, the session-authenticated card
//! submission (single use, expiry, origin checks, no partial writes), the
//! CVV re-collect link of a pending charge, and no PAN, CVV or session
//! secret in logs or at rest. The browser half is tests/browser/.

use std::time::Duration;

use cardvault::crypto::CryptoMode;
use cardvault::processor::sandbox;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::http_processor::random_visa;
use crate::isolation::raw;
use crate::leaks::{dump_postgres, files_under, find_bytes, latin1, text_needles};
use crate::matrix;
use crate::support::*;

const SHOP: &str = "https://shop.example.com";

/// `(path of the page, secret)` of a capture session URL, or `(path,
/// credential)` of a CVV link: the part after `#` never reaches a server.
fn split_url(app: &TestApp, url: &str) -> (String, String) {
    let public = &app.vault.hosted_settings().public_url;
    let rest = url
        .strip_prefix(public.as_str())
        .unwrap_or_else(|| panic!("{url} is not under {public}"));
    let (path, fragment) = rest.split_once('#').expect("fragment");
    (path.to_string(), fragment.to_string())
}

async fn session(app: &TestApp, key: &str, customer: &str) -> (Value, String, String) {
    let (s, v) = app
        .post(
            "/v1/capture_sessions",
            key,
            json!({"customer": customer, "allowed_origin": SHOP}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (path, secret) = split_url(app, v["url"].as_str().unwrap());
    (v, path, secret)
}

/// A JSON POST without an API key, with optional extra headers.
async fn post_json(
    app: &TestApp,
    path: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> (StatusCode, Value, HeaderMap) {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    let (s, text, h) = raw(
        app,
        Method::POST,
        path,
        None,
        &all,
        Some(body.to_string().into_bytes()),
    )
    .await
    .expect("request");
    (s, serde_json::from_str(&text).unwrap_or(Value::Null), h)
}

async fn get_page(app: &TestApp, path: &str) -> (StatusCode, String, HeaderMap) {
    raw(app, Method::GET, path, None, &[], None)
        .await
        .expect("request")
}

fn card_body(secret: &str, number: &str) -> Value {
    json!({"secret": secret, "number": number, "exp_month": 11, "exp_year": 2032,
           "cvc": "123", "holder_name": "Ana Silva"})
}

fn csp(ancestors: &str) -> String {
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
         connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors {ancestors}"
    )
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

fn assert_page_headers(h: &HeaderMap, ancestors: &str) {
    assert_eq!(header(h, "content-security-policy"), csp(ancestors));
    assert_eq!(header(h, "cache-control"), "no-store");
    assert_eq!(header(h, "referrer-policy"), "no-referrer");
    assert_eq!(header(h, "x-content-type-options"), "nosniff");
    assert_eq!(header(h, "content-type"), "text/html; charset=utf-8");
}

async fn audit_events(app: &TestApp) -> Vec<cardvault::storage::AuditEntry> {
    app.storage()
        .list_audit(0, 100_000)
        .await
        .expect("audit")
        .into_iter()
        .map(|r| r.entry)
        .collect()
}

/// Moves a session's clock back by `secs` (both timestamps, so the row's
/// CHECK holds), straight in the database.
async fn age_session(app: &TestApp, id: &str, secs: i64) {
    use sqlx::Connection;
    match app.backend {
        Backend::Sqlite => {
            let mut c = sqlx::SqliteConnection::connect(&app.db.url).await.unwrap();
            sqlx::query("UPDATE capture_sessions SET created_at = created_at - ?, expires_at = expires_at - ? WHERE id = ?")
                .bind(secs)
                .bind(secs)
                .bind(id)
                .execute(&mut c)
                .await
                .unwrap();
        }
        Backend::Postgres => {
            let mut c = sqlx::PgConnection::connect(&app.db.url).await.unwrap();
            sqlx::query("UPDATE capture_sessions SET created_at = created_at - $1, expires_at = expires_at - $1 WHERE id = $2")
                .bind(secs)
                .bind(id)
                .execute(&mut c)
                .await
                .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_sessions_are_validated_and_isolated() {
    let app = TestApp::spawn(Backend::Sqlite, CryptoMode::Envelope).await;
    let a = app.merchant(false).await;
    let b = app.merchant(false).await;
    let cus = app.customer(&a.sk, "ana@example.com").await;
    let post = |body: Value, key: String| {
        let app = &app;
        async move { app.post("/v1/capture_sessions", &key, body).await }
    };

    let (s, v) = post(json!({"allowed_origin": SHOP}), a.sk.clone()).await;
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("customer")),
        "{v}"
    );
    let (s, v) = post(json!({"customer": cus}), a.sk.clone()).await;
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("allowed_origin")),
        "{v}"
    );
    let (s, v) = post(
        json!({"customer": cus, "allowed_origin": SHOP, "colour": 1}),
        a.sk.clone(),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("parameter_unknown")),
        "{v}"
    );
    for bad in [
        "",
        "shop.example.com",
        "https://shop.example.com/",
        "https://shop.example.com/checkout",
        "https://shop.example.com?a=1",
        "https://*.example.com",
        "https://user:pw@shop.example.com",
        "http://shop.example.com",
        "ftp://shop.example.com",
        "https://[::1]:8443",
        "javascript:alert(1)",
        "https://shop.example.com:99999",
    ] {
        let (s, v) = post(
            json!({"customer": cus, "allowed_origin": bad}),
            a.sk.clone(),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert_eq!(v["error"]["param"], "allowed_origin", "{bad}");
        assert_eq!(v["error"]["code"], "invalid_allowed_origin", "{bad}");
    }
    for bad in [json!(59), json!(3601), json!(-1), json!("60")] {
        let (s, v) = post(
            json!({"customer": cus, "allowed_origin": SHOP, "expires_in": bad}),
            a.sk.clone(),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert_eq!(v["error"]["param"], "expires_in", "{bad}");
    }
    for missing in ["cus_doesnotexist", "not-an-id"] {
        let (s, v) = post(
            json!({"customer": missing, "allowed_origin": SHOP}),
            a.sk.clone(),
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
        assert_eq!(v["error"]["param"], "customer");
    }
    // Another merchant's customer is as missing as a customer can be.
    let (s, v) = post(
        json!({"customer": cus, "allowed_origin": SHOP}),
        b.sk.clone(),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    // A publishable key cannot make sessions.
    let (s, v) = post(
        json!({"customer": cus, "allowed_origin": SHOP}),
        a.pk.clone(),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");

    // Canonical origin, default life, URL with the secret in its fragment.
    let (s, v) = post(
        json!({"customer": cus, "allowed_origin": "HTTPS://Shop.Example.COM:443"}),
        a.sk.clone(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("cs_"));
    assert_eq!(v["object"], "capture_session");
    assert_eq!(v["allowed_origin"], SHOP);
    assert_eq!(v["customer"], cus.as_str());
    assert_eq!(v["status"], "open");
    assert_eq!(v["card"], Value::Null);
    assert_eq!(
        v["expires_at"].as_i64().unwrap() - v["created"].as_i64().unwrap(),
        900
    );
    let (path, secret) = split_url(&app, v["url"].as_str().unwrap());
    assert_eq!(path, format!("/hosted/capture/{id}"));
    assert!(
        secret.starts_with("css_") && secret.len() == 4 + 43,
        "{secret}"
    );
    let (s, v2) = post(
        json!({"customer": cus, "allowed_origin": "http://localhost:3000", "expires_in": 120}),
        a.sk.clone(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v2}");
    assert_eq!(
        v2["expires_at"].as_i64().unwrap() - v2["created"].as_i64().unwrap(),
        120
    );
    assert_ne!(split_url(&app, v2["url"].as_str().unwrap()).1, secret);

    // Read back: no URL (the secret is not kept), and only by its merchant.
    let (s, got) = app.get(&format!("/v1/capture_sessions/{id}"), &a.sk).await;
    assert_eq!(s, StatusCode::OK, "{got}");
    assert!(got.get("url").is_none());
    assert_eq!(got["status"], "open");
    let (s, _) = app.get(&format!("/v1/capture_sessions/{id}"), &b.sk).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = app.get("/v1/capture_sessions/cs_nope", &a.sk).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // The creation is audited, and the secret is in no audit entry.
    let creations = audit_events(&app)
        .await
        .into_iter()
        .filter(|e| {
            e.event == "capture_session.create" && e.resource.as_deref() == Some(id.as_str())
        })
        .count();
    assert_eq!(creations, 1, "the creation is audited");
    let all = format!("{:?}", audit_events(&app).await);
    assert!(!all.contains(&secret));
}

async fn hosted_capture_end_to_end(backend: Backend, mode: CryptoMode) {
    let app = TestApp::spawn(backend, mode).await;
    let m = app.merchant(false).await;
    let cus = app.customer(&m.sk, "ana@example.com").await;
    let (created, path, secret) = session(&app, &m.sk, &cus).await;
    let id = created["id"].as_str().unwrap().to_string();
    let submit = format!("{path}/card");

    // The page: strict headers, framed by the session's origin only, and
    // nothing secret in it.
    let (s, html, h) = get_page(&app, &path).await;
    assert_eq!(s, StatusCode::OK);
    assert_page_headers(&h, SHOP);
    assert!(html.contains(&format!("data-parent-origin=\"{SHOP}\"")));
    assert!(html.contains("Test Merchant"));
    assert!(!html.contains(&secret) && !html.contains("css_"));
    for (asset, ct) in [
        ("capture.js", "text/javascript; charset=utf-8"),
        ("card.js", "text/javascript; charset=utf-8"),
        ("brands.js", "text/javascript; charset=utf-8"),
        ("hosted.css", "text/css; charset=utf-8"),
    ] {
        let (s, body, h) = get_page(&app, &format!("/hosted/assets/{asset}")).await;
        assert_eq!(s, StatusCode::OK, "{asset}");
        assert_eq!(header(&h, "content-type"), ct, "{asset}");
        assert_eq!(header(&h, "x-content-type-options"), "nosniff");
        assert!(!body.is_empty());
    }
    let (s, _, _) = get_page(&app, "/hosted/assets/../../Cargo.toml").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, h) = get_page(&app, "/hosted/capture/cs_unknownsession").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_page_headers(&h, "'none'");

    // Wrong secret: exactly like an unknown session, and audited.
    let wrong = format!("css_{}", "A".repeat(43));
    let (s, v, _) = post_json(&app, &submit, card_body(&wrong, VISA), &[]).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("resource_missing")),
        "{v}"
    );
    let (s, v, _) = post_json(
        &app,
        "/hosted/capture/cs_unknownsession/card",
        card_body(&secret, VISA),
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert!(audit_events(&app)
        .await
        .iter()
        .any(|e| e.event == "capture_session.use"
            && e.outcome == "denied"
            && e.resource.as_deref() == Some(id.as_str())));

    // Requests a browser marks as cross-site are refused before anything.
    for headers in [
        [("origin", "https://evil.example")],
        [("origin", "null")],
        [("sec-fetch-site", "cross-site")],
        [("sec-fetch-site", "same-site")],
    ] {
        let (s, v, _) = post_json(&app, &submit, card_body(&secret, VISA), &headers).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{headers:?}: {v}");
        assert_eq!(v["error"]["code"], "cross_origin_request");
    }
    // The vault's own origin passes (used below).
    let own = app.vault.hosted_settings().public_url.clone();
    // Not JSON: refused (a plain cross-site form cannot send JSON).
    let (s, _, _) = raw(
        &app,
        Method::POST,
        &submit,
        None,
        &[("content-type", "application/x-www-form-urlencoded")],
        Some(b"number=4111111111111111".to_vec()),
    )
    .await
    .unwrap();
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // Card mistakes: 400 naming the field; the session stays open.
    let bad_luhn = card_body(&secret, "4242424242424241");
    let mut expired = card_body(&secret, VISA);
    expired["exp_year"] = json!(2020);
    let mut no_cvc = card_body(&secret, VISA);
    no_cvc.as_object_mut().unwrap().remove("cvc");
    let mut short_cvc = card_body(&secret, VISA);
    short_cvc["cvc"] = json!("12");
    let mut amex_3 = card_body(&secret, AMEX);
    amex_3["cvc"] = json!("123");
    let mut digits_name = card_body(&secret, VISA);
    digits_name["holder_name"] = json!("Ana 4242");
    let mut no_number = card_body(&secret, VISA);
    no_number.as_object_mut().unwrap().remove("number");
    for (body, param, code) in [
        (bad_luhn, "number", "incorrect_number"),
        (expired, "exp_year", "expired_card"),
        (no_cvc, "cvc", "parameter_missing"),
        (short_cvc, "cvc", "invalid_cvc"),
        (amex_3, "cvc", "invalid_cvc"),
        (digits_name, "holder_name", "invalid_holder_name"),
        (no_number, "number", "parameter_missing"),
    ] {
        let (s, v, _) = post_json(&app, &submit, body, &[("origin", own.as_str())]).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{param}: {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(!v.to_string().contains("4242424242"), "{v}");
    }
    let (_, cards) = app.get(&format!("/v1/customers/{cus}/cards"), &m.sk).await;
    assert_eq!(
        cards["data"].as_array().unwrap().len(),
        0,
        "a refused card was stored"
    );
    let (_, got) = app.get(&format!("/v1/capture_sessions/{id}"), &m.sk).await;
    assert_eq!(got["status"], "open");

    // The card: 201 with only id, brand and last4 (and where to report it).
    let (s, v, h) = post_json(
        &app,
        &submit,
        card_body(&secret, VISA),
        &[("origin", own.as_str()), ("sec-fetch-site", "same-origin")],
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(header(&h, "cache-control"), "no-store");
    let card_id = v["card"]["id"].as_str().unwrap().to_string();
    assert_eq!(
        v,
        json!({"card": {"id": card_id, "brand": "visa", "last4": "1111"}, "parent_origin": SHOP})
    );
    let (_, cards) = app.get(&format!("/v1/customers/{cus}/cards"), &m.sk).await;
    let cards = cards["data"].as_array().unwrap().clone();
    assert_eq!(cards.len(), 1);
    assert_eq!(cards[0]["id"], card_id.as_str());
    assert_eq!(cards[0]["default"], true);
    assert_eq!(cards[0]["holder_name"], "Ana Silva");
    assert_eq!(
        (
            cards[0]["exp_month"].as_i64(),
            cards[0]["exp_year"].as_i64()
        ),
        (Some(11), Some(2032))
    );
    let (_, events) = app.get("/v1/events?type=card.created", &m.sk).await;
    assert!(events["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["data"]["object"]["id"] == card_id.as_str()));
    let audit = audit_events(&app).await;
    let used = audit
        .iter()
        .find(|e| e.event == "capture_session.use" && e.outcome == "success")
        .expect("use audited");
    assert_eq!(used.actor, id);
    assert_eq!(used.resource.as_deref(), Some(id.as_str()));
    assert!(audit.iter().any(|e| e.event == "card.create"
        && e.resource.as_deref() == Some(card_id.as_str())
        && e.actor == id));

    // Single use: a second card through the same session is refused, and
    // the page says so (410), still framed by the same origin only.
    let (s, v, _) = post_json(&app, &submit, card_body(&secret, MASTERCARD), &[]).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("capture_session_used")),
        "{v}"
    );
    let (_, cards) = app.get(&format!("/v1/customers/{cus}/cards"), &m.sk).await;
    assert_eq!(cards["data"].as_array().unwrap().len(), 1);
    let (s, html, h) = get_page(&app, &path).await;
    assert_eq!(s, StatusCode::GONE);
    assert_page_headers(&h, SHOP);
    assert!(html.contains("already used") && html.contains("data-state=\"used\""));
    let (_, got) = app.get(&format!("/v1/capture_sessions/{id}"), &m.sk).await;
    assert_eq!(
        (got["status"].as_str(), got["card"].as_str()),
        (Some("used"), Some(card_id.as_str()))
    );

    // The same number through a new session finds the saved card (200) and
    // adds nothing; that session is used up too.
    let (again, path2, secret2) = session(&app, &m.sk, &cus).await;
    let (s, v, _) = post_json(
        &app,
        &format!("{path2}/card"),
        card_body(&secret2, VISA),
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["card"]["id"], card_id.as_str());
    let (_, cards) = app.get(&format!("/v1/customers/{cus}/cards"), &m.sk).await;
    assert_eq!(cards["data"].as_array().unwrap().len(), 1);
    let (_, got) = app
        .get(
            &format!("/v1/capture_sessions/{}", again["id"].as_str().unwrap()),
            &m.sk,
        )
        .await;
    assert_eq!(
        (got["status"].as_str(), got["card"].as_str()),
        (Some("used"), Some(card_id.as_str()))
    );

    // Expiry: an expired session saves nothing and its page says so.
    let (late, path3, secret3) = session(&app, &m.sk, &cus).await;
    let late_id = late["id"].as_str().unwrap();
    age_session(&app, late_id, 901).await;
    let (s, v, _) = post_json(
        &app,
        &format!("{path3}/card"),
        card_body(&secret3, MASTERCARD),
        &[],
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("capture_session_expired")),
        "{v}"
    );
    let (s, html, _) = get_page(&app, &path3).await;
    assert_eq!(s, StatusCode::GONE);
    assert!(html.contains("expired") && html.contains("data-state=\"expired\""));
    let (_, got) = app
        .get(&format!("/v1/capture_sessions/{late_id}"), &m.sk)
        .await;
    assert_eq!(got["status"], "expired");
    let (_, cards) = app.get(&format!("/v1/customers/{cus}/cards"), &m.sk).await;
    assert_eq!(cards["data"].as_array().unwrap().len(), 1);
    // A day past expiry the sweeper deletes it; the used ones stay until
    // their own expiry has passed by a day.
    age_session(&app, late_id, 2 * 86_400).await;
    assert_eq!(app.vault.sweep_capture_sessions().await.unwrap(), 1);
    let (s, _) = app
        .get(&format!("/v1/capture_sessions/{late_id}"), &m.sk)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = app.get(&format!("/v1/capture_sessions/{id}"), &m.sk).await;
    assert_eq!(s, StatusCode::OK);

    // Deleting the customer takes its sessions with it.
    let (_, open, open_secret) = session(&app, &m.sk, &cus).await;
    let (s, _) = app.delete(&format!("/v1/customers/{cus}"), &m.sk).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v, _) = post_json(
        &app,
        &format!("{open}/card"),
        card_body(&open_secret, MASTERCARD),
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
}
matrix!(hosted_capture_end_to_end);

/// Of several concurrent submissions to one session, exactly one saves a
/// card; the others are told the session is used, and nothing else is
/// written.
async fn capture_session_is_single_use_under_concurrency(backend: Backend, mode: CryptoMode) {
    let app = TestApp::spawn(backend, mode).await;
    let m = app.merchant(false).await;
    let cus = app.customer(&m.sk, "race@example.com").await;
    let (_, path, secret) = session(&app, &m.sk, &cus).await;
    let submit = format!("{path}/card");
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let pan = random_visa();
        let body = card_body(&secret, &pan);
        let client = app.client.clone();
        let url = format!("{}{}", app.base, submit);
        tasks.push(tokio::spawn(async move {
            client.post(url).json(&body).send().await.unwrap().status()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::CREATED)
            .count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::CREATED || *s == StatusCode::CONFLICT),
        "{statuses:?}"
    );
    let (_, cards) = app.get(&format!("/v1/customers/{cus}/cards"), &m.sk).await;
    assert_eq!(cards["data"].as_array().unwrap().len(), 1);
    let (_, events) = app.get("/v1/events?type=card.created", &m.sk).await;
    assert_eq!(events["data"].as_array().unwrap().len(), 1);
}
matrix!(capture_session_is_single_use_under_concurrency);

async fn cvc_page_completes_a_pending_charge(backend: Backend, mode: CryptoMode) {
    let app = TestApp::spawn(backend, mode).await;
    let m = app.merchant(false).await;
    let other = app.merchant(false).await;
    let cus = app.customer(&m.sk, "cvc@example.com").await;
    let card = app.card(&m.sk, &cus, sandbox::REQUIRES_CVC).await;
    let (s, ch) = app
        .post(
            "/v1/charges",
            &m.sk,
            json!({"amount": 4999, "currency": "usd", "customer": cus}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{ch}");
    assert_eq!(ch["status"], "pending");
    let id = ch["id"].as_str().unwrap().to_string();
    let next = &ch["next_action"]["provide_cvc"];
    assert_eq!(ch["next_action"]["type"], "provide_cvc");
    assert_eq!(next["confirm_url"], format!("/v1/charges/{id}/confirm"));
    assert_eq!(next["card"], card["id"]);
    let url = next["hosted_url"].as_str().expect("hosted_url").to_string();
    let (path, credential) = split_url(&app, &url);
    assert_eq!(path, format!("/hosted/cvc/{id}"));
    let expires = next["hosted_url_expires_at"].as_i64().unwrap();
    assert!(expires >= cardvault::service::now() + 899, "{expires}");
    assert!(credential.starts_with(&format!("{expires}.")));

    // Every read of the charge offers the page; so did the pending event.
    let (_, got) = app.get(&format!("/v1/charges/{id}"), &m.sk).await;
    let again = got["next_action"]["provide_cvc"]["hosted_url"]
        .as_str()
        .unwrap();
    assert_eq!(split_url(&app, again).0, path);
    let (_, list) = app.get("/v1/charges", &m.sk).await;
    assert!(list["data"][0]["next_action"]["provide_cvc"]["hosted_url"].is_string());
    let (_, events) = app.get("/v1/events?type=charge.pending", &m.sk).await;
    let pending = &events["data"][0]["data"]["object"];
    assert_eq!(pending["id"], id.as_str());
    assert!(pending["next_action"]["provide_cvc"]["hosted_url"]
        .as_str()
        .unwrap()
        .contains(&path));

    // The page: never framed, and the same for every charge (what it shows
    // comes with the credential).
    let (s, html, h) = get_page(&app, &path).await;
    assert_eq!(s, StatusCode::OK);
    assert_page_headers(&h, "'none'");
    assert!(!html.contains(&credential) && !html.contains("0101"));

    // Bad credentials all look alike.
    let details = format!("{path}/details");
    let (exp, mac) = credential.split_once('.').unwrap();
    // A different first character changes MAC bits (the last one of an
    // unpadded 32-byte value also carries padding bits).
    let first = if mac.starts_with('A') { "B" } else { "A" };
    let flipped = format!("{first}{}", &mac[1..]);
    for bad in [
        format!("{exp}.{flipped}"),
        format!("{}.{mac}", expires + 300),
        mac.to_string(),
        String::new(),
        format!("{exp}.{mac}{mac}"),
    ] {
        let (s, v, _) = post_json(&app, &details, json!({"credential": bad}), &[]).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{bad}: {v}");
        assert_eq!(v["error"]["param"], "credential");
    }
    // Another charge's credential does not open this one.
    let cus2 = app.customer(&m.sk, "cvc2@example.com").await;
    app.card(&m.sk, &cus2, sandbox::REQUIRES_CVC).await;
    let (_, ch2) = app
        .post(
            "/v1/charges",
            &m.sk,
            json!({"amount": 100, "currency": "usd", "customer": cus2}),
        )
        .await;
    let (_, cred2) = split_url(
        &app,
        ch2["next_action"]["provide_cvc"]["hosted_url"]
            .as_str()
            .unwrap(),
    );
    let (s, _, _) = post_json(&app, &details, json!({"credential": cred2}), &[]).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // A link that has run out.
    let charge = app.storage().get_charge(&m.id, &id).await.unwrap().unwrap();
    let old = app
        .vault
        .cvc_link_at(&charge, cardvault::service::now() - 7200)
        .await
        .unwrap()
        .unwrap();
    let (s, v, _) = post_json(
        &app,
        &details,
        json!({"credential": split_url(&app, &old.url).1}),
        &[],
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("payment_link_expired")),
        "{v}"
    );
    // The other merchant's API cannot see the charge at all.
    let (s, _) = app.get(&format!("/v1/charges/{id}"), &other.sk).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // What the page shows: brand and last four, the payment, nothing more.
    let (s, v, _) = post_json(&app, &details, json!({"credential": credential}), &[]).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v,
        json!({"merchant": "Test Merchant", "amount": 4999, "currency": "USD", "exponent": 2,
               "brand": "visa", "brand_name": "Visa", "last4": "0101", "cvc_length": 3,
               "cvc_location": "back", "status": "awaiting_cvc"})
    );

    // A CVV of the wrong shape, or none, leaves the charge waiting.
    let confirm = format!("{path}/confirm");
    for (body, code) in [
        (
            json!({"credential": credential, "cvc": "12"}),
            "invalid_cvc",
        ),
        (
            json!({"credential": credential, "cvc": "12a"}),
            "invalid_cvc",
        ),
        (json!({"credential": credential}), "parameter_missing"),
    ] {
        let (s, v, _) = post_json(&app, &confirm, body, &[]).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some(code)),
            "{v}"
        );
        assert_eq!(v["error"]["param"], "cvc");
    }
    let (s, v, _) = post_json(
        &app,
        &confirm,
        json!({"credential": credential, "cvc": "123"}),
        &[("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (_, got) = app.get(&format!("/v1/charges/{id}"), &m.sk).await;
    assert_eq!(got["status"], "pending");

    // The CVV completes it; the charge's event and audit follow.
    let (s, v, _) = post_json(
        &app,
        &confirm,
        json!({"credential": credential, "cvc": "123"}),
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"status": "succeeded", "failure_code": null}));
    let (_, got) = app.get(&format!("/v1/charges/{id}"), &m.sk).await;
    assert_eq!(got["status"], "succeeded");
    assert_eq!(got["captured"], true);
    assert_eq!(got["next_action"], Value::Null);
    let (_, events) = app.get("/v1/events?type=charge.succeeded", &m.sk).await;
    assert!(events["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["data"]["object"]["id"] == id.as_str()));
    assert!(audit_events(&app)
        .await
        .iter()
        .any(|e| e.event == "charge.confirm"
            && e.actor == "hosted_cvc_page"
            && e.resource.as_deref() == Some(id.as_str())));

    // Spent: a second CVV is refused; the page now shows the outcome.
    let (s, v, _) = post_json(
        &app,
        &confirm,
        json!({"credential": credential, "cvc": "123"}),
        &[],
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("charge_not_awaiting_cvc")),
        "{v}"
    );
    let (_, v, _) = post_json(&app, &details, json!({"credential": credential}), &[]).await;
    assert_eq!(v["status"], "succeeded");
}
matrix!(cvc_page_completes_a_pending_charge);

/// After hosted captures (saved, refused, replayed) and a CVV page
/// confirmation, no PAN, no CVV and no session secret is in the logs or at
/// rest.
async fn hosted_pages_leak_nothing(backend: Backend, mode: CryptoMode) {
    let app = TestApp::spawn(backend, mode).await;
    let m = app.merchant(false).await;
    let cus = app.customer(&m.sk, "leak@example.com").await;
    let mut pans = Vec::new();
    let mut secrets = Vec::new();

    let (_, path, secret) = session(&app, &m.sk, &cus).await;
    secrets.push(secret.clone());
    let good = random_visa();
    let bad = {
        let mut p = random_visa();
        let last = p.pop().unwrap().to_digit(10).unwrap();
        p.push(char::from_digit((last + 1) % 10, 10).unwrap());
        p
    };
    pans.push(good.clone());
    pans.push(bad.clone());
    let cvc = "739";
    let mut body = card_body(&secret, &bad);
    body["cvc"] = json!(cvc);
    let (s, _, _) = post_json(&app, &format!("{path}/card"), body, &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let mut body = card_body(&secret, &good);
    body["cvc"] = json!(cvc);
    body["exp_year"] = json!(2019);
    let (s, _, _) = post_json(&app, &format!("{path}/card"), body, &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let mut body = card_body(&secret, &good);
    body["cvc"] = json!(cvc);
    let (s, _, _) = post_json(&app, &format!("{path}/card"), body.clone(), &[]).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _, _) = post_json(&app, &format!("{path}/card"), body, &[]).await;
    assert_eq!(s, StatusCode::CONFLICT);
    // A PAN typed into the URL of the page is masked in the access log.
    let in_path = random_visa();
    pans.push(in_path.clone());
    let (s, _, _) = get_page(&app, &format!("/hosted/capture/{in_path}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // The CVV page with a CVV of its own.
    let cus2 = app.customer(&m.sk, "leak2@example.com").await;
    app.card(&m.sk, &cus2, sandbox::REQUIRES_CVC).await;
    pans.push(sandbox::REQUIRES_CVC.to_string());
    let (_, ch) = app
        .post(
            "/v1/charges",
            &m.sk,
            json!({"amount": 250, "currency": "eur", "customer": cus2}),
        )
        .await;
    let (cvc_path, credential) = split_url(
        &app,
        ch["next_action"]["provide_cvc"]["hosted_url"]
            .as_str()
            .unwrap(),
    );
    let cvc2 = "418";
    let (s, v, _) = post_json(
        &app,
        &format!("{cvc_path}/confirm"),
        json!({"credential": credential, "cvc": cvc2}),
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Give the delivery worker and the loggers a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let cvc_needles = |c: &str| {
        vec![
            format!("\"cvc\":\"{c}\""),
            format!("cvc={c}"),
            format!("cvc: {c}"),
        ]
    };
    let scan = |text: &str| -> Vec<String> {
        let mut hits = Vec::new();
        for pan in &pans {
            for n in text_needles(pan) {
                if text.contains(&n) {
                    hits.push(format!("PAN as {n:?}"));
                }
            }
        }
        for s in &secrets {
            if text.contains(s.as_str()) {
                hits.push("capture session secret".to_string());
            }
        }
        for c in [cvc, cvc2] {
            for n in cvc_needles(c) {
                if text.contains(&n) {
                    hits.push(format!("CVV as {n:?}"));
                }
            }
        }
        hits
    };
    let mut problems = Vec::new();
    let logs = captured_logs();
    assert!(
        logs.contains("/hosted/capture/"),
        "the access log must show the hosted calls"
    );
    for hit in scan(&logs) {
        problems.push(format!("log: {hit}"));
    }
    if backend == Backend::Postgres {
        let rows = dump_postgres(&app.db.url).await;
        assert!(rows.iter().any(|(t, _)| t.ends_with(".capture_sessions")));
        for (table, row) in &rows {
            for hit in scan(row) {
                problems.push(format!("table {table}: {hit}"));
            }
        }
    }
    let mut app = app;
    let data = std::mem::replace(&mut app.data, tempfile::tempdir().expect("tempdir"));
    app.stop().await;
    if backend == Backend::Sqlite {
        for (file, bytes) in files_under(data.path()) {
            let hay = latin1(&bytes);
            for pan in &pans {
                for n in text_needles(pan) {
                    if find_bytes(&hay, n.as_bytes()) {
                        problems.push(format!("{}: PAN as {n:?}", file.display()));
                    }
                }
            }
            for s in &secrets {
                if find_bytes(&hay, s.as_bytes()) {
                    problems.push(format!("{}: capture session secret", file.display()));
                }
            }
        }
    }
    assert!(problems.is_empty(), "found:\n{}", problems.join("\n"));
}
matrix!(hosted_pages_leak_nothing);
