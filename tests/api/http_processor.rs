//! The `http` processor against a fake processor on 127.0.0.1: it receives
//! the PAN and the CVV, while nothing merchant-facing does; a processor that
//! hangs leaves the charge pending, and a retry with the same idempotency
//! key does not charge again, also when the first request was cut off;
//! reconciliation then asks the processor what became of such charges.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cardvault::crypto::CryptoMode;
use rand::Rng;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::matrix;
use crate::support::*;

#[derive(Default)]
struct Fake {
    /// How long every authorization waits before it is answered.
    hang: Duration,
    /// How long every `refund`, `capture` or `void` named here waits before
    /// it is answered (it is made).
    op_hang: std::collections::HashMap<&'static str, Duration>,
    /// Operations (`refund`, `capture`, `void`) refused with HTTP 422.
    refuse: Vec<&'static str>,
    /// An operation and a PostgreSQL database whose other connections the
    /// next such request cuts before it answers (the vault's database goes
    /// away meanwhile).
    cut_db_on: Option<(&'static str, String)>,
    /// What a lookup of a reference answers (else `not_found`).
    found: std::collections::HashMap<String, Value>,
    /// (path, body) of every request.
    requests: Vec<(String, String)>,
    /// (path, Idempotency-Key) of every request.
    keys: Vec<(String, String)>,
}

async fn fake_processor() -> (String, Arc<Mutex<Fake>>) {
    let state = Arc::new(Mutex::new(Fake::default()));
    let s = Arc::clone(&state);
    let app = axum::Router::new().route(
        "/{op}",
        axum::routing::post(
            move |axum::extract::Path(op): axum::extract::Path<String>,
                  headers: axum::http::HeaderMap,
                  body: String| {
                let state = Arc::clone(&s);
                async move {
                    let (hang, op_hang, refuse, found, cut_db) = {
                        let mut st = state.lock().unwrap();
                        st.requests.push((op.clone(), body.clone()));
                        let key = headers
                            .get("idempotency-key")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        st.keys.push((op.clone(), key));
                        let reference = serde_json::from_str::<Value>(&body)
                            .ok()
                            .and_then(|v| v["reference"].as_str().map(str::to_string))
                            .unwrap_or_default();
                        (
                            st.hang,
                            st.op_hang.get(op.as_str()).copied().unwrap_or_default(),
                            st.refuse.iter().any(|r| *r == op),
                            st.found.get(&reference).cloned(),
                            match &st.cut_db_on {
                                Some((cut_op, _)) if *cut_op == op => {
                                    st.cut_db_on.take().map(|(_, url)| url)
                                }
                                _ => None,
                            },
                        )
                    };
                    if let Some(url) = cut_db {
                        cut_connections(&url).await;
                    }
                    tokio::time::sleep(op_hang).await;
                    if refuse {
                        return (
                            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                            axum::Json(json!({"error": "refused"})),
                        );
                    }
                    if op == "lookup" {
                        return (
                            axum::http::StatusCode::OK,
                            axum::Json(found.unwrap_or(json!({"status": "not_found"}))),
                        );
                    }
                    if op == "authorize" {
                        tokio::time::sleep(hang).await;
                    }
                    let answer = if op == "authorize" {
                        json!({"status": "approved", "reference": "fp_0001"})
                    } else {
                        json!({"ok": true})
                    };
                    (axum::http::StatusCode::OK, axum::Json(answer))
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), state)
}

/// A vault whose `http` processor is a fresh fake processor that answers
/// within `timeout_ms` or counts as unanswered; `tweak` adjusts the rest.
async fn app_with_fake_processor(
    backend: Backend,
    mode: CryptoMode,
    timeout_ms: u64,
    tweak: impl FnOnce(&mut cardvault::config::Config),
) -> (TestApp, Arc<Mutex<Fake>>) {
    let (url, fake) = fake_processor().await;
    let app = TestApp::spawn_with(backend, mode, |cfg| {
        cfg.payments.processor = "http".to_string();
        cfg.payments.http.url = url;
        cfg.payments.http.allowed_hosts = vec!["127.0.0.1".to_string()];
        cfg.payments.http.timeout_ms = timeout_ms;
        tweak(cfg);
    })
    .await;
    (app, fake)
}

/// Ends every other session on the database at `url`.
async fn cut_connections(url: &str) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .execute(&mut conn)
    .await
    .unwrap();
}

/// A vault with a fake processor (answering within `timeout_ms`, see
/// [`app_with_fake_processor`]) whose authorizations hang for `hang_secs`,
/// and a merchant with a customer whose default card is set.
async fn hanging_app(
    backend: Backend,
    mode: CryptoMode,
    timeout_ms: u64,
    hang_secs: u64,
    tweak: impl FnOnce(&mut cardvault::config::Config),
) -> (TestApp, Arc<Mutex<Fake>>, Merchant, String) {
    let (app, fake) = app_with_fake_processor(backend, mode, timeout_ms, tweak).await;
    let m = app.merchant(false).await;
    let cus = app.customer(&m.sk, "hanging@example.com").await;
    app.card(&m.sk, &cus, &random_visa()).await;
    fake.lock().unwrap().hang = Duration::from_secs(hang_secs);
    (app, fake, m, cus)
}

/// A vault whose reconciliation runs every second for what has been
/// unsettled for `after_secs`, with a merchant and a captured charge of
/// `amount`.
async fn reconciling_app_with_charge(
    backend: Backend,
    mode: CryptoMode,
    timeout_ms: u64,
    after_secs: u64,
    amount: i64,
) -> (TestApp, Arc<Mutex<Fake>>, Merchant, String) {
    let (app, fake, m, cus) = hanging_app(backend, mode, timeout_ms, 0, |cfg| {
        cfg.payments.reconcile_interval_secs = 1;
        cfg.payments.reconcile_after_secs = after_secs;
    })
    .await;
    let (s, ch) = app
        .post(
            "/v1/charges",
            &m.sk,
            json!({"amount": amount, "currency": "usd", "customer": cus}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{ch}");
    assert_eq!(ch["captured"], true, "{ch}");
    let id = ch["id"].as_str().unwrap().to_string();
    (app, fake, m, id)
}

/// Ids of `n` new authorized, uncaptured charges of `amount` (USD) on the
/// customer's default card.
async fn uncaptured_charges(
    app: &TestApp,
    sk: &str,
    customer: &str,
    amount: i64,
    n: usize,
) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let (s, ch) = app
            .post(
                "/v1/charges",
                sk,
                json!({"amount": amount, "currency": "usd", "customer": customer, "capture": false}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{ch}");
        assert_eq!(ch["status"], "succeeded", "{ch}");
        ids.push(ch["id"].as_str().unwrap().to_string());
    }
    ids
}

/// The Idempotency-Key of every `op` request the fake received.
fn keys_of(fake: &Arc<Mutex<Fake>>, op: &str) -> Vec<String> {
    fake.lock()
        .unwrap()
        .keys
        .iter()
        .filter(|(o, _)| o == op)
        .map(|(_, k)| k.clone())
        .collect()
}

/// A Luhn-valid Visa number no other test uses.
pub fn random_visa() -> String {
    let mut rng = rand::thread_rng();
    let mut digits: Vec<u32> = vec![4];
    while digits.len() < 15 {
        digits.push(rng.gen_range(0..10));
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 0 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    digits.push((10 - sum % 10) % 10);
    digits
        .iter()
        .map(|d| char::from_digit(*d, 10).unwrap())
        .collect()
}

fn requests(fake: &Arc<Mutex<Fake>>, op: &str) -> Vec<String> {
    fake.lock()
        .unwrap()
        .requests
        .iter()
        .filter(|(o, _)| o == op)
        .map(|(_, b)| b.clone())
        .collect()
}

fn authorizations(fake: &Arc<Mutex<Fake>>) -> Vec<String> {
    requests(fake, "authorize")
}

/// (type, id of the object) of the merchant's latest 100 events.
async fn event_kinds(app: &TestApp, sk: &str) -> Vec<(String, String)> {
    let (_, events) = app.get("/v1/events?limit=100", sk).await;
    events["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_string(),
                e["data"]["object"]["id"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

async fn http_processor_gets_the_card_and_nobody_else_does(backend: Backend, mode: CryptoMode) {
    let (app, fake) = app_with_fake_processor(backend, mode, 1000, |_| {}).await;
    let m = app.merchant(false).await;
    let pan = random_visa();
    let cvc = "837";
    let cus = app.customer(&m.sk, "http@example.com").await;
    let card = app.card(&m.sk, &cus, &pan).await;
    let card_id = card["id"].as_str().unwrap();
    let (s, tok) = app
        .post("/v1/tokens", &m.pk, json!({"card": card_id, "cvc": cvc}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{tok}");

    let mut merchant_facing: Vec<String> = vec![card.to_string(), tok.to_string()];
    let (s, ch) = app
        .post("/v1/charges", &m.sk, json!({"amount": 5000, "currency": "usd", "customer": cus, "token": tok["id"], "capture": false}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{ch}");
    assert_eq!(ch["status"], "succeeded", "{ch}");
    assert_eq!(ch["processor"], "http");
    merchant_facing.push(ch.to_string());
    let id = ch["id"].as_str().unwrap().to_string();
    let auths = authorizations(&fake);
    assert_eq!(auths.len(), 1);
    let sent: Value = serde_json::from_str(&auths[0]).unwrap();
    assert_eq!(
        sent["card"]["number"],
        pan.as_str(),
        "the processor gets the PAN"
    );
    assert_eq!(
        sent["card"]["cvc"], cvc,
        "and the CVV given for this charge"
    );
    assert_eq!(sent["amount"], 5000);
    assert_eq!(sent["reference"], id.as_str());
    let (s, c) = app
        .post(&format!("/v1/charges/{id}/capture"), &m.sk, json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{c}");
    merchant_facing.push(c.to_string());
    let (s, r) = app
        .post(
            &format!("/v1/charges/{id}/refunds"),
            &m.sk,
            json!({"amount": 100}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    let (s, r2) = app
        .post(
            &format!("/v1/charges/{id}/refunds"),
            &m.sk,
            json!({"amount": 200}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{r2}");
    // Each processor operation has its own idempotency key: two partial
    // refunds of one charge must not look like one refund sent twice.
    let keys = fake.lock().unwrap().keys.clone();
    let key_of = |op: &str| -> Vec<String> {
        keys.iter()
            .filter(|(o, _)| o == op)
            .map(|(_, k)| k.clone())
            .collect()
    };
    assert_eq!(key_of("authorize"), [id.as_str()]);
    assert_eq!(key_of("capture"), [format!("{id}/capture")]);
    assert_eq!(
        key_of("refund"),
        [
            r["id"].as_str().unwrap().to_string(),
            r2["id"].as_str().unwrap().to_string()
        ]
    );
    assert_ne!(r["id"], r2["id"]);

    // A processor that hangs: the charge is pending (outcome unknown), and
    // retrying with the same idempotency key does not authorize again.
    fake.lock().unwrap().hang = Duration::from_secs(5);
    let body = json!({"amount": 777, "currency": "usd", "customer": cus});
    let (s, p1, _) = app
        .call_with_headers(
            Method::POST,
            "/v1/charges",
            &m.sk,
            body.clone(),
            &[("Idempotency-Key", "order-9")],
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{p1}");
    assert_eq!(p1["status"], "pending");
    assert_eq!(p1["failure_code"], "processor_unavailable");
    assert!(p1["next_action"].is_null());
    let (s, p2, headers) = app
        .call_with_headers(
            Method::POST,
            "/v1/charges",
            &m.sk,
            body.clone(),
            &[("Idempotency-Key", "order-9")],
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{p2}");
    assert_eq!(p2["id"], p1["id"], "the same charge, replayed");
    assert_eq!(
        headers
            .get("idempotent-replayed")
            .map(|v| v.to_str().unwrap()),
        Some("true")
    );
    assert_eq!(
        authorizations(&fake).len(),
        2,
        "one authorization per charge, none for the retry"
    );
    let (_, all) = app.get(&format!("/v1/charges?customer={cus}"), &m.sk).await;
    assert_eq!(all["data"].as_array().unwrap().len(), 2);
    merchant_facing.push(p1.to_string());

    let (_, events) = app.get("/v1/events?limit=100", &m.sk).await;
    merchant_facing.push(events.to_string());
    assert!(events.to_string().contains("charge.pending"));
    for text in &merchant_facing {
        assert!(
            !text.contains(&pan),
            "PAN in a merchant-facing body: {text}"
        );
        assert!(
            !text.contains(&format!("\"{cvc}\"")),
            "CVV in a merchant-facing body: {text}"
        );
    }
    let logs = captured_logs();
    assert!(!logs.contains(&pan), "PAN in the logs");
    assert!(
        !logs.contains(&format!("\"cvc\":\"{cvc}\"")),
        "CVV in the logs"
    );
    assert_eq!(
        crate::charges::live_token_payloads(&app).await,
        0,
        "the CVV did not survive the authorization"
    );
}
matrix!(http_processor_gets_the_card_and_nobody_else_does);

/// The request timeout answers 503 while the charge is still waiting on the
/// processor: the charge runs to its end anyway and stores its answer, so a
/// retry first hears "in progress", then (past the lease) "interrupted", and
/// once the charge is done gets the stored answer. The processor sees one
/// authorization throughout.
async fn cut_off_idempotent_request_finishes_and_replays(backend: Backend, mode: CryptoMode) {
    let (app, fake, m, cus) = hanging_app(backend, mode, 6_000, 10, |cfg| {
        cfg.limits.request_timeout_secs = 2;
        cfg.limits.idempotency_lease_secs = 4;
    })
    .await;
    let body = json!({"amount": 1234, "currency": "usd", "customer": cus});
    let send = || {
        app.call_with_headers(
            Method::POST,
            "/v1/charges",
            &m.sk,
            body.clone(),
            &[("Idempotency-Key", "cut-off-1")],
        )
    };
    let started = std::time::Instant::now();
    let (s, first, _) = send().await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{first}");
    assert_eq!(first["error"]["code"], "timeout", "{first}");

    // Under the lease (claimed at most 3 s ago): still in progress.
    let (s, busy, _) = send().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the machine stalled"
    );
    assert_eq!(s, StatusCode::CONFLICT, "{busy}");
    assert_eq!(busy["error"]["code"], "idempotency_key_in_use", "{busy}");

    // Past the lease, with the processor call still running: interrupted,
    // and not run again.
    tokio::time::sleep(Duration::from_millis(4_300).saturating_sub(started.elapsed())).await;
    let (s, cut, _) = send().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the machine stalled"
    );
    assert_eq!(s, StatusCode::CONFLICT, "{cut}");
    assert_eq!(cut["error"]["code"], "idempotency_key_interrupted", "{cut}");
    assert_eq!(cut["error"]["param"], "Idempotency-Key", "{cut}");

    // The processor times out at 6 s and the charge is stored as pending;
    // from then on the key replays that answer.
    let replayed = loop {
        let (s, again, headers) = send().await;
        if s != StatusCode::CONFLICT {
            assert_eq!(s, StatusCode::CREATED, "{again}");
            assert_eq!(
                headers
                    .get("idempotent-replayed")
                    .map(|v| v.to_str().unwrap()),
                Some("true")
            );
            break again;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the cut-off charge never stored its answer: {again}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(replayed["status"], "pending", "{replayed}");
    assert_eq!(replayed["amount"], 1234);
    assert_eq!(authorizations(&fake).len(), 1, "one authorization in all");
    let (_, all) = app.get(&format!("/v1/charges?customer={cus}"), &m.sk).await;
    assert_eq!(all["data"].as_array().unwrap().len(), 1, "{all}");
}
matrix!(cut_off_idempotent_request_finishes_and_replays);

/// Two charges whose answers were lost: reconciliation looks them up once
/// they have been still for `reconcile_after_secs`. The one the processor
/// approved succeeds (captured, as asked); the one it never received fails
/// with nothing charged. Neither is authorized again, and each change is an
/// event.
async fn lost_answers_are_reconciled(backend: Backend, mode: CryptoMode) {
    let (app, fake, m, cus) = hanging_app(backend, mode, 300, 2, |cfg| {
        cfg.payments.reconcile_interval_secs = 1;
        cfg.payments.reconcile_after_secs = 1;
    })
    .await;
    let mut ids = Vec::new();
    for amount in [500, 600] {
        let (s, ch) = app
            .post(
                "/v1/charges",
                &m.sk,
                json!({"amount": amount, "currency": "usd", "customer": cus}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{ch}");
        assert_eq!(ch["status"], "pending", "{ch}");
        assert_eq!(ch["failure_code"], "processor_unavailable", "{ch}");
        ids.push(ch["id"].as_str().unwrap().to_string());
    }
    let (approved, unknown) = (&ids[0], &ids[1]);
    fake.lock().unwrap().found.insert(
        approved.clone(),
        json!({"status": "approved", "reference": "fp_late"}),
    );

    let started = std::time::Instant::now();
    let (a, u) = loop {
        let (_, a) = app.get(&format!("/v1/charges/{approved}"), &m.sk).await;
        let (_, u) = app.get(&format!("/v1/charges/{unknown}"), &m.sk).await;
        if a["status"] != "pending" && u["status"] != "pending" {
            break (a, u);
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "not reconciled: {a} {u}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(a["status"], "succeeded", "{a}");
    assert_eq!(a["captured"], true, "{a}");
    assert_eq!(a["amount_captured"], 500, "{a}");
    assert!(a["failure_code"].is_null(), "{a}");
    assert_eq!(u["status"], "failed", "{u}");
    assert_eq!(u["failure_code"], "processor_unavailable", "{u}");
    assert_eq!(u["amount_captured"], 0, "{u}");

    assert_eq!(authorizations(&fake).len(), 2, "nothing authorized again");
    let lookups = requests(&fake, "lookup");
    for id in &ids {
        assert!(
            lookups.iter().any(|b| b.contains(id.as_str())),
            "{id} looked up: {lookups:?}"
        );
    }
    let kinds = event_kinds(&app, &m.sk).await;
    assert!(
        kinds.contains(&("charge.succeeded".to_string(), approved.clone())),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("charge.failed".to_string(), unknown.clone())),
        "{kinds:?}"
    );
}
matrix!(lost_answers_are_reconciled);

/// A refund whose answer was lost is answered `pending` (a retry with the
/// same idempotency key replays it) and holds its amount; reconciliation
/// sends it again under the same processor idempotency key and stores the
/// outcome, so the processor makes it once. A refused refund fails with
/// nothing refunded. Each outcome is an event.
async fn lost_refund_answers_are_reconciled(backend: Backend, mode: CryptoMode) {
    let (app, fake, m, id) = reconciling_app_with_charge(backend, mode, 300, 2, 1000).await;
    let path = format!("/v1/charges/{id}/refunds");

    // The processor makes the refund, but its answer is lost.
    fake.lock()
        .unwrap()
        .op_hang
        .insert("refund", Duration::from_secs(1));
    let send = || {
        app.call_with_headers(
            Method::POST,
            &path,
            &m.sk,
            json!({"amount": 600}),
            &[("Idempotency-Key", "refund-600")],
        )
    };
    let (s, lost, _) = send().await;
    assert_eq!(s, StatusCode::CREATED, "{lost}");
    assert_eq!(lost["status"], "pending", "{lost}");
    let (s, again, headers) = send().await;
    assert_eq!(s, StatusCode::CREATED, "{again}");
    assert_eq!(again["id"], lost["id"], "the retry replays the refund");
    assert_eq!(
        headers
            .get("idempotent-replayed")
            .map(|v| v.to_str().unwrap()),
        Some("true")
    );
    fake.lock().unwrap().op_hang.clear();
    // Its amount is held until it is settled.
    let (s, e) = app.post(&path, &m.sk, json!({"amount": 500})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["code"], "refund_exceeds_captured", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("600 more is held by pending refunds"),
        "{e}"
    );

    // A refused refund fails and refunds nothing.
    fake.lock().unwrap().refuse = vec!["refund"];
    let (s, e) = app.post(&path, &m.sk, json!({"amount": 100})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    assert_eq!(e["error"]["code"], "refund_failed", "{e}");
    fake.lock().unwrap().refuse.clear();

    let started = std::time::Instant::now();
    let got = loop {
        let (_, got) = app.get(&format!("/v1/charges/{id}"), &m.sk).await;
        if got["amount_refunded"] != 0 {
            break got;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the lost refund was never reconciled: {got}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(got["amount_refunded"], 600, "{got}");
    let refunds = got["refunds"]["data"].as_array().unwrap();
    let status_of = |rid: &Value| {
        refunds
            .iter()
            .find(|r| r["id"] == *rid)
            .map(|r| r["status"].as_str().unwrap().to_string())
    };
    assert_eq!(status_of(&lost["id"]).as_deref(), Some("succeeded"));
    let refused = refunds
        .iter()
        .find(|r| r["amount"] == 100)
        .expect("the refused refund is listed");
    assert_eq!(refused["status"], "failed", "{got}");

    // The processor was sent the lost refund twice under one key, and each
    // refund under its own.
    let keys = keys_of(&fake, "refund");
    let lost_id = lost["id"].as_str().unwrap();
    assert_eq!(
        keys.iter().filter(|k| k.as_str() == lost_id).count(),
        2,
        "{keys:?}"
    );
    assert_eq!(keys.len(), 3, "{keys:?}");

    let kinds = event_kinds(&app, &m.sk).await;
    assert!(
        kinds.contains(&("charge.refunded".to_string(), id.clone())),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&(
            "charge.refund_failed".to_string(),
            refused["id"].as_str().unwrap().to_string()
        )),
        "{kinds:?}"
    );

    // What remains is refunded by default.
    let (s, rest) = app.post(&path, &m.sk, json!({})).await;
    assert_eq!(s, StatusCode::CREATED, "{rest}");
    assert_eq!(rest["status"], "succeeded", "{rest}");
    assert_eq!(rest["amount"], 400, "{rest}");
    let (_, got) = app.get(&format!("/v1/charges/{id}"), &m.sk).await;
    assert_eq!(got["amount_refunded"], 1000, "{got}");
    assert_eq!(got["refunded"], true, "{got}");
}
matrix!(lost_refund_answers_are_reconciled);

/// Requests that run apart from their connection (processor calls, claimed
/// idempotency keys) are bounded: past `limits.max_connections` of them a
/// request is refused with 503 `server_busy` before anything starts, so its
/// idempotency key stays free and a retry once the others are done works.
async fn detached_requests_are_bounded(backend: Backend, mode: CryptoMode) {
    let (app, fake, m, cus) = hanging_app(backend, mode, 5_000, 3, |cfg| {
        cfg.limits.max_connections = 2;
        cfg.limits.request_timeout_secs = 1;
    })
    .await;
    let charge = async |key: &str| {
        app.call_with_headers(
            Method::POST,
            "/v1/charges",
            &m.sk,
            json!({"amount": 321, "currency": "usd", "customer": cus}),
            &[("Idempotency-Key", key)],
        )
        .await
    };
    // Cut off by the request timeout, it goes on holding both slots (the
    // claimed key's and the processor call's).
    let started = std::time::Instant::now();
    let (s, first, _) = charge("busy-a").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{first}");
    assert_eq!(first["error"]["code"], "timeout", "{first}");
    let (s, refused, _) = charge("busy-b").await;
    let (s2, plain) = app
        .post(
            "/v1/charges",
            &m.sk,
            json!({"amount": 322, "currency": "usd", "customer": cus}),
        )
        .await;
    assert!(
        started.elapsed() < Duration::from_millis(2_500),
        "the machine stalled"
    );
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{refused}");
    assert_eq!(refused["error"]["code"], "server_busy", "{refused}");
    assert_eq!(s2, StatusCode::SERVICE_UNAVAILABLE, "{plain}");
    assert_eq!(plain["error"]["code"], "server_busy", "{plain}");
    assert_eq!(
        authorizations(&fake).len(),
        1,
        "nothing else reached the processor"
    );

    fake.lock().unwrap().hang = Duration::ZERO;
    let replayed = loop {
        let (s, again, _) = charge("busy-a").await;
        if s != StatusCode::CONFLICT {
            break (s, again);
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the first charge never finished: {again}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(replayed.0, StatusCode::CREATED, "{}", replayed.1);
    assert_eq!(replayed.1["status"], "succeeded", "{}", replayed.1);
    // The refused key was never claimed.
    let (s, retried, headers) = charge("busy-b").await;
    assert_eq!(s, StatusCode::CREATED, "{retried}");
    assert!(headers.get("idempotent-replayed").is_none());
    assert_ne!(retried["id"], replayed.1["id"]);
    assert_eq!(authorizations(&fake).len(), 2);
}
matrix!(detached_requests_are_bounded);

/// A capture or a void the processor refuses is final and says so (409,
/// nothing changed), where an unknown outcome is a 503 to retry; once the
/// processor accepts, the same operation goes through.
async fn refused_captures_and_voids_say_so(backend: Backend, mode: CryptoMode) {
    let (app, fake) = app_with_fake_processor(backend, mode, 1_000, |_| {}).await;
    let m = app.merchant(false).await;
    let cus = app.customer(&m.sk, "refused@example.com").await;
    app.card(&m.sk, &cus, &random_visa()).await;
    let ids = uncaptured_charges(&app, &m.sk, &cus, 900, 2).await;
    fake.lock().unwrap().refuse = vec!["capture", "void"];
    for (id, op, code) in [
        (&ids[0], "capture", "capture_failed"),
        (&ids[1], "cancel", "cancel_failed"),
    ] {
        let (s, e) = app
            .post(&format!("/v1/charges/{id}/{op}"), &m.sk, json!({}))
            .await;
        assert_eq!(s, StatusCode::CONFLICT, "{e}");
        assert_eq!(e["error"]["code"], code, "{e}");
        let (_, got) = app.get(&format!("/v1/charges/{id}"), &m.sk).await;
        assert_eq!(got["status"], "succeeded", "{got}");
        assert_eq!(got["captured"], false, "{got}");
        assert_eq!(got["pending_action"], Value::Null, "{got}");
    }
    fake.lock().unwrap().refuse.clear();
    let (s, c) = app
        .post(&format!("/v1/charges/{}/capture", ids[0]), &m.sk, json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert_eq!(c["captured"], true, "{c}");
    let (s, c) = app
        .post(&format!("/v1/charges/{}/cancel", ids[1]), &m.sk, json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert_eq!(c["status"], "canceled", "{c}");
}
matrix!(refused_captures_and_voids_say_so);

/// A capture or a void whose answer was lost stays on the charge as its
/// pending action (503, shown in the charge, blocking what would race it);
/// a retry sends it again under the same processor idempotency key, and
/// reconciliation does so for a charge nobody retried, so the charge ends
/// up showing what the processor did, with its event.
async fn lost_captures_and_voids_are_reconciled(backend: Backend, mode: CryptoMode) {
    let (app, fake, m, cus) = hanging_app(backend, mode, 300, 0, |cfg| {
        cfg.payments.reconcile_interval_secs = 1;
        // Long enough for the retry below to come first.
        cfg.payments.reconcile_after_secs = 4;
    })
    .await;
    let ids = uncaptured_charges(&app, &m.sk, &cus, 900, 2).await;
    let (capture, cancel) = (&ids[0], &ids[1]);
    let op = |id: &str, op: &str| format!("/v1/charges/{id}/{op}");
    {
        let mut f = fake.lock().unwrap();
        f.op_hang.insert("capture", Duration::from_secs(1));
        f.op_hang.insert("void", Duration::from_secs(1));
    }
    let (s, e) = app
        .post(&op(capture, "capture"), &m.sk, json!({"amount": 600}))
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{e}");
    let (s, e) = app.post(&op(cancel, "cancel"), &m.sk, json!({})).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{e}");

    // Each charge shows its pending action, and what would race it is
    // refused.
    let (_, got) = app.get(&format!("/v1/charges/{capture}"), &m.sk).await;
    assert_eq!(got["captured"], false, "{got}");
    assert_eq!(
        got["pending_action"],
        json!({"type": "capture", "amount": 600}),
        "{got}"
    );
    let (_, got) = app.get(&format!("/v1/charges/{cancel}"), &m.sk).await;
    assert_eq!(got["status"], "succeeded", "{got}");
    assert_eq!(got["pending_action"], json!({"type": "cancel"}), "{got}");
    for (path, body, code) in [
        (
            op(capture, "capture"),
            json!({"amount": 500}),
            "capture_pending",
        ),
        (op(capture, "cancel"), json!({}), "capture_pending"),
        (op(capture, "refunds"), json!({}), "capture_pending"),
        (op(cancel, "capture"), json!({}), "cancel_pending"),
    ] {
        let (s, e) = app.post(&path, &m.sk, body).await;
        assert_eq!(s, StatusCode::CONFLICT, "{path}: {e}");
        assert_eq!(e["error"]["code"], code, "{path}: {e}");
    }
    fake.lock().unwrap().op_hang.clear();

    // A retry of the void sends it again and stores it.
    let (s, c) = app.post(&op(cancel, "cancel"), &m.sk, json!({})).await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert_eq!(c["status"], "canceled", "{c}");
    assert_eq!(c["pending_action"], Value::Null, "{c}");

    // Nobody retries the capture: reconciliation sends it again.
    let started = std::time::Instant::now();
    let got = loop {
        let (_, got) = app.get(&format!("/v1/charges/{capture}"), &m.sk).await;
        if got["captured"] == true {
            break got;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the lost capture was never reconciled: {got}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(got["amount_captured"], 600, "{got}");
    assert_eq!(got["pending_action"], Value::Null, "{got}");

    // Each was sent twice, under its one key.
    assert_eq!(
        keys_of(&fake, "capture"),
        vec![format!("{capture}/capture"); 2]
    );
    assert_eq!(keys_of(&fake, "void"), vec![format!("{cancel}/void"); 2]);
    let kinds = event_kinds(&app, &m.sk).await;
    for (kind, id) in [("charge.captured", capture), ("charge.canceled", cancel)] {
        assert!(
            kinds.contains(&(kind.to_string(), id.clone())),
            "{kind} {id}: {kinds:?}"
        );
    }
    // The captured charge is refundable now.
    let (s, r) = app.post(&op(capture, "refunds"), &m.sk, json!({})).await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    assert_eq!(r["amount"], 600, "{r}");
}
matrix!(lost_captures_and_voids_are_reconciled);

/// The processor makes a refund but the vault's database goes away before
/// the outcome is stored: the refund is answered as stored, `pending`
/// (never 503, which would invite a second refund), and reconciliation
/// stores it once the database is back. PostgreSQL only: its sessions can
/// be cut from outside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refund_outcome_survives_a_database_cut() {
    let (app, fake, m, id) =
        reconciling_app_with_charge(Backend::Postgres, CryptoMode::Envelope, 2_000, 1, 700).await;
    fake.lock().unwrap().cut_db_on = Some(("refund", app.db.url.clone()));
    let (s, r) = app
        .post(
            &format!("/v1/charges/{id}/refunds"),
            &m.sk,
            json!({"amount": 250}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    assert_eq!(r["status"], "pending", "{r}");
    let started = std::time::Instant::now();
    let got = loop {
        let (s, got) = app.get(&format!("/v1/charges/{id}"), &m.sk).await;
        if s == StatusCode::OK && got["amount_refunded"] == 250 {
            break got;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never reconciled: {got}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(got["refunds"]["data"][0]["id"], r["id"], "{got}");
    assert_eq!(got["refunds"]["data"][0]["status"], "succeeded", "{got}");
    let keys = keys_of(&fake, "refund");
    assert!(keys.len() >= 2, "{keys:?}");
    assert!(
        keys.iter().all(|k| k == r["id"].as_str().unwrap()),
        "{keys:?}"
    );
}

/// The processor makes a capture but the vault's database goes away before
/// the outcome is stored: the request answers 503, and the capture, stored
/// as the charge's pending action before the call, is sent again by
/// reconciliation (same key) and stored once the database is back.
/// PostgreSQL only: its sessions can be cut from outside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_outcome_survives_a_database_cut() {
    let (app, fake, m, cus) =
        hanging_app(Backend::Postgres, CryptoMode::Envelope, 2_000, 0, |cfg| {
            cfg.payments.reconcile_interval_secs = 1;
            cfg.payments.reconcile_after_secs = 1;
        })
        .await;
    let id = uncaptured_charges(&app, &m.sk, &cus, 800, 1)
        .await
        .remove(0);
    fake.lock().unwrap().cut_db_on = Some(("capture", app.db.url.clone()));
    let (s, e) = app
        .post(&format!("/v1/charges/{id}/capture"), &m.sk, json!({}))
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{e}");
    let started = std::time::Instant::now();
    let got = loop {
        let (s, got) = app.get(&format!("/v1/charges/{id}"), &m.sk).await;
        if s == StatusCode::OK && got["captured"] == true {
            break got;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never reconciled: {got}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(got["amount_captured"], 800, "{got}");
    assert_eq!(got["pending_action"], Value::Null, "{got}");
    let keys = keys_of(&fake, "capture");
    assert!(keys.len() >= 2, "{keys:?}");
    assert!(
        keys.iter().all(|k| *k == format!("{id}/capture")),
        "{keys:?}"
    );
}

/// A micro-charge verification whose authorization got no answer: the
/// request fails (503, nothing recorded) and the possible hold is voided by
/// the same reference.
async fn unanswered_micro_charge_is_voided(backend: Backend, mode: CryptoMode) {
    let (app, fake) = app_with_fake_processor(backend, mode, 300, |_| {}).await;
    let m = app.merchant(false).await;
    let cus = app.customer(&m.sk, "hold@example.com").await;
    let card = app.card(&m.sk, &cus, &random_visa()).await;
    let card_id = card["id"].as_str().unwrap();
    fake.lock().unwrap().hang = Duration::from_secs(2);
    let (s, e) = app
        .post(
            &format!("/v1/customers/{cus}/cards/{card_id}/verifications"),
            &m.sk,
            json!({"method": "micro_charge"}),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{e}");
    let auths = authorizations(&fake);
    assert_eq!(auths.len(), 1);
    let reference = serde_json::from_str::<Value>(&auths[0]).unwrap()["reference"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reference.starts_with("cver_"), "{reference}");
    let voids = requests(&fake, "void");
    assert_eq!(voids.len(), 1, "{voids:?}");
    assert_eq!(
        serde_json::from_str::<Value>(&voids[0]).unwrap()["reference"],
        reference.as_str()
    );
}
matrix!(unanswered_micro_charge_is_voided);
