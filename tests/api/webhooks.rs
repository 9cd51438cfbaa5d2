//! Webhooks: endpoints, signed deliveries to a local receiver, retries with
//! backoff, and the outbox surviving a restart (see process.rs).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode as AxStatus};
use cardvault::crypto::CryptoMode;
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::Sha256;

use crate::charges::{charge, customer_with_card, APPROVED};
use crate::matrix;
use crate::support::*;

/// What the receiver should do with the next request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Answer 500 this many more times, then 200.
    FailThenOk(usize),
    /// Never answer (until the mode changes).
    Hang,
}

#[derive(Default)]
pub struct Seen {
    pub calls: usize,
    /// (Cardvault-Signature, body) of requests answered 200.
    pub delivered: Vec<(String, String)>,
}

/// A tiny HTTP server on 127.0.0.1 standing in for a merchant's endpoint.
pub struct Receiver {
    pub url: String,
    pub seen: Arc<Mutex<Seen>>,
    pub mode: Arc<Mutex<Mode>>,
}

impl Receiver {
    pub async fn start(mode: Mode) -> Receiver {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mode = Arc::new(Mutex::new(mode));
        let (s, m) = (Arc::clone(&seen), Arc::clone(&mode));
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                let (seen, mode) = (Arc::clone(&s), Arc::clone(&m));
                async move {
                    seen.lock().unwrap().calls += 1;
                    let hung = *mode.lock().unwrap() == Mode::Hang;
                    loop {
                        let current = *mode.lock().unwrap();
                        match current {
                            Mode::Hang => tokio::time::sleep(Duration::from_millis(50)).await,
                            // A request that hung is never counted as delivered.
                            _ if hung => return AxStatus::SERVICE_UNAVAILABLE,
                            Mode::FailThenOk(n) if n > 0 => {
                                *mode.lock().unwrap() = Mode::FailThenOk(n - 1);
                                return AxStatus::INTERNAL_SERVER_ERROR;
                            }
                            Mode::FailThenOk(_) => break,
                        }
                    }
                    let sig = headers
                        .get("cardvault-signature")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    seen.lock().unwrap().delivered.push((sig, body));
                    AxStatus::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            url: format!("http://{addr}/hook"),
            seen,
            mode,
        }
    }

    /// Waits until `n` requests were answered 200.
    pub async fn wait_delivered(&self, n: usize, within: Duration) -> Vec<(String, String)> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            {
                let seen = self.seen.lock().unwrap();
                if seen.delivered.len() >= n {
                    return seen.delivered.clone();
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {n} deliveries after {within:?} ({} calls)",
                self.seen.lock().unwrap().delivered.len(),
                self.seen.lock().unwrap().calls
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn calls(&self) -> usize {
        self.seen.lock().unwrap().calls
    }
}

/// Checks `t=<unix>,v1=<hex>` against HMAC-SHA256(secret, "<t>.<body>").
pub fn verify_signature(header: &str, secret: &str, body: &str) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = Some(v.to_string()),
            Some(("v1", v)) => v1 = Some(v.to_string()),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let Ok(sig) = hex::decode(v1) else {
        return false;
    };
    let age = cardvault::service::now() - t.parse::<i64>().unwrap_or(0);
    if !(0..300).contains(&age) {
        return false;
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    mac.verify_slice(&sig).is_ok()
}

async fn signed_deliveries_with_retries(backend: Backend, mode: CryptoMode) {
    let app = TestApp::spawn_with(backend, mode, |cfg| {
        cfg.payments.webhooks.backoff_base_ms = 100;
        cfg.payments.webhooks.poll_ms = 50;
        cfg.payments.webhooks.max_attempts = 6;
    })
    .await;
    let m = app.merchant(false).await;
    let other = app.merchant(false).await;
    let receiver = Receiver::start(Mode::FailThenOk(3)).await;

    // Validation.
    for (body, param) in [
        (
            json!({"url": "http://example.com/hook", "events": ["*"]}),
            "url",
        ),
        (
            json!({"url": "http://10.1.2.3/hook", "events": ["*"]}),
            "url",
        ),
        (
            json!({"url": "ftp://127.0.0.1/hook", "events": ["*"]}),
            "url",
        ),
        (
            json!({"url": receiver.url, "events": ["charge.nope"]}),
            "events[0]",
        ),
        (json!({"url": receiver.url, "events": []}), "events"),
        (json!({"url": receiver.url}), "events"),
    ] {
        let (s, e) = app.post("/v1/webhook_endpoints", &m.sk, body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {e}");
        assert_eq!(e["error"]["param"], param, "{body}: {e}");
    }

    let (s, ep) = app
        .post(
            "/v1/webhook_endpoints",
            &m.sk,
            json!({"url": receiver.url, "events": ["charge.succeeded"]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{ep}");
    let secret = ep["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"));
    let ep_id = ep["id"].as_str().unwrap().to_string();
    let (_, list) = app.get("/v1/webhook_endpoints", &m.sk).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert!(
        !list.to_string().contains(&secret),
        "the secret is shown once"
    );
    let (_, got) = app
        .get(&format!("/v1/webhook_endpoints/{ep_id}"), &m.sk)
        .await;
    assert!(got.get("secret").is_none());
    let (s, _) = app
        .get(&format!("/v1/webhook_endpoints/{ep_id}"), &other.sk)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = app
        .delete(&format!("/v1/webhook_endpoints/{ep_id}"), &other.sk)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // A declined charge (not subscribed) and an approved one (subscribed).
    let (cus_d, _) =
        customer_with_card(&app, &m.sk, cardvault::processor::sandbox::DO_NOT_HONOR).await;
    let (_, failed) = charge(
        &app,
        &m.sk,
        json!({"amount": 300, "currency": "usd", "customer": cus_d}),
    )
    .await;
    assert_eq!(failed["status"], "failed");
    let (cus, _) = customer_with_card(&app, &m.sk, APPROVED).await;
    let (_, ch) = charge(
        &app,
        &m.sk,
        json!({"amount": 1234, "currency": "usd", "customer": cus}),
    )
    .await;
    assert_eq!(ch["status"], "succeeded");

    // Fails 3 times, then recovers and gets the event, correctly signed.
    let delivered = receiver.wait_delivered(1, Duration::from_secs(30)).await;
    assert_eq!(receiver.calls(), 4, "3 failures then a success");
    let (sig, body) = &delivered[0];
    assert!(verify_signature(sig, &secret, body), "bad signature {sig}");
    assert!(!verify_signature(sig, "whsec_wrong", body));
    let event: Value = serde_json::from_str(body).unwrap();
    assert_eq!(event["type"], "charge.succeeded");
    assert_eq!(event["data"]["object"]["id"], ch["id"]);
    assert!(!body.contains(APPROVED));
    // The event is listed; nothing else was sent.
    let (_, events) = app.get("/v1/events?type=charge.succeeded", &m.sk).await;
    assert_eq!(events["data"][0]["id"], event["id"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.seen.lock().unwrap().delivered.len(), 1);

    let (s, list) = app
        .get(&format!("/v1/webhook_endpoints/{ep_id}/deliveries"), &m.sk)
        .await;
    assert_eq!(s, StatusCode::OK, "{list}");
    let d = &list["data"][0];
    assert_eq!(d["status"], "delivered", "{list}");
    assert_eq!(d["attempts"], 4, "3 failures recorded, then the success");
    assert_eq!(d["type"], "charge.succeeded");
    let (s, _) = app
        .get(
            &format!("/v1/webhook_endpoints/{ep_id}/deliveries"),
            &other.sk,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = app
        .delete(&format!("/v1/webhook_endpoints/{ep_id}"), &m.sk)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = app
        .get(&format!("/v1/webhook_endpoints/{ep_id}"), &m.sk)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}
matrix!(signed_deliveries_with_retries);

/// A receiver that never recovers: attempts stop at the limit.
async fn deliveries_give_up_at_the_limit(backend: Backend, mode: CryptoMode) {
    let app = TestApp::spawn_with(backend, mode, |cfg| {
        cfg.payments.webhooks.backoff_base_ms = 20;
        cfg.payments.webhooks.poll_ms = 20;
        cfg.payments.webhooks.max_attempts = 3;
    })
    .await;
    let m = app.merchant(false).await;
    let receiver = Receiver::start(Mode::FailThenOk(usize::MAX)).await;
    let (s, ep) = app
        .post(
            "/v1/webhook_endpoints",
            &m.sk,
            json!({"url": receiver.url, "events": ["charge.succeeded"]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let ep_id = ep["id"].as_str().unwrap().to_string();
    let (cus, _) = customer_with_card(&app, &m.sk, APPROVED).await;
    charge(
        &app,
        &m.sk,
        json!({"amount": 100, "currency": "usd", "customer": cus}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.calls(), 3);
    let (s, list) = app
        .get(&format!("/v1/webhook_endpoints/{ep_id}/deliveries"), &m.sk)
        .await;
    assert_eq!(s, StatusCode::OK, "{list}");
    let d = &list["data"][0];
    assert_eq!(d["status"], "failed", "{list}");
    assert_eq!(d["attempts"], 3);
    assert_eq!(d["last_status"], 500);
}
matrix!(deliveries_give_up_at_the_limit);
