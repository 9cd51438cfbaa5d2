//! Charges, one-time tokens and card verification over the sandbox
//! processor: every documented test card, the state machine of a charge and
//! its invalid transitions, the pending-CVV flow, and token rules.

use cardvault::crypto::CryptoMode;
use cardvault::processor::sandbox;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::matrix;
use crate::support::*;

pub const APPROVED: &str = "4242424242424242";

/// A customer with one card (`number`); returns (customer, card).
pub async fn customer_with_card(app: &TestApp, sk: &str, number: &str) -> (String, String) {
    let cus = app.customer(sk, "payer@example.com").await;
    let card = app.card(sk, &cus, number).await;
    (cus, card["id"].as_str().expect("card id").to_string())
}

pub async fn charge(app: &TestApp, sk: &str, body: Value) -> (StatusCode, Value) {
    app.post("/v1/charges", sk, body).await
}

async fn sandbox_outcomes(backend: Backend, mode: CryptoMode) {
    let app = TestApp::spawn(backend, mode).await;
    let m = app.merchant(false).await;
    let cases: &[(&str, &str, Option<&str>, Option<&str>)] = &[
        (APPROVED, "succeeded", None, None),
        // Not in the table, valid Luhn: approved.
        (MASTERCARD, "succeeded", None, None),
        (
            sandbox::INSUFFICIENT_FUNDS,
            "failed",
            Some("insufficient_funds"),
            None,
        ),
        (sandbox::DO_NOT_HONOR, "failed", Some("do_not_honor"), None),
        (sandbox::CARD_EXPIRED, "failed", Some("card_expired"), None),
        (sandbox::REQUIRES_CVC, "pending", None, Some("provide_cvc")),
        (
            sandbox::TIMEOUT,
            "pending",
            Some("processor_unavailable"),
            None,
        ),
        (
            sandbox::PROCESSOR_ERROR,
            "failed",
            Some("processing_error"),
            None,
        ),
    ];
    for (number, status, code, next) in cases {
        let (cus, card) = customer_with_card(&app, &m.sk, number).await;
        let (s, ch) = charge(
            &app,
            &m.sk,
            json!({"amount": 1999, "currency": "usd", "customer": cus}),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{number}: {ch}");
        assert!(ch["id"].as_str().unwrap().starts_with("ch_"));
        assert_eq!(ch["object"], "charge");
        assert_eq!(ch["card"], card.as_str(), "default card used");
        assert_eq!(ch["status"], *status, "{number}: {ch}");
        assert_eq!(ch["failure_code"].as_str(), *code, "{number}: {ch}");
        assert_eq!(ch["next_action"]["type"].as_str(), *next, "{number}: {ch}");
        if *status == "failed" {
            assert!(ch["failure_message"].is_string(), "{ch}");
        }
        assert_eq!(
            ch["captured"],
            json!(*status == "succeeded"),
            "{number}: {ch}"
        );
        let text = ch.to_string();
        assert!(!text.contains(number), "PAN in a charge: {text}");
        let (s, got) = app
            .get(
                &format!("/v1/charges/{}", ch["id"].as_str().unwrap()),
                &m.sk,
            )
            .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(got["status"], ch["status"]);
    }
}
matrix!(sandbox_outcomes);

async fn capture_refund_cancel(backend: Backend, mode: CryptoMode) {
    let app = TestApp::spawn(backend, mode).await;
    let m = app.merchant(false).await;
    let (cus, card) = customer_with_card(&app, &m.sk, APPROVED).await;

    // Authorize only, then the invalid moves of an uncaptured charge.
    let (s, ch) = charge(
        &app,
        &m.sk,
        json!({"amount": 1000, "currency": "mxn", "customer": cus, "card": card, "capture": false,
               "description": "order 77", "metadata": {"order": "77"}}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{ch}");
    assert_eq!(ch["status"], "succeeded");
    assert_eq!(ch["captured"], false);
    assert_eq!(ch["currency"], "mxn");
    let id = ch["id"].as_str().unwrap().to_string();
    let (s, e) = app
        .post(&format!("/v1/charges/{id}/refunds"), &m.sk, json!({}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    assert_eq!(e["error"]["code"], "charge_not_captured");
    let (s, e) = app
        .post(
            &format!("/v1/charges/{id}/capture"),
            &m.sk,
            json!({"amount": 1001}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["param"], "amount");

    // Partial capture, then capture twice and cancel after capture.
    let (s, c) = app
        .post(
            &format!("/v1/charges/{id}/capture"),
            &m.sk,
            json!({"amount": 600}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert_eq!(c["captured"], true);
    assert_eq!(c["amount_captured"], 600);
    let (s, e) = app
        .post(&format!("/v1/charges/{id}/capture"), &m.sk, json!({}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    assert_eq!(e["error"]["code"], "charge_already_captured");
    let (s, e) = app
        .post(&format!("/v1/charges/{id}/cancel"), &m.sk, json!({}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    assert_eq!(e["error"]["code"], "charge_already_captured");

    // Refunds: never beyond what was captured.
    let (s, e) = app
        .post(
            &format!("/v1/charges/{id}/refunds"),
            &m.sk,
            json!({"amount": 601}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["code"], "refund_exceeds_captured");
    assert_eq!(e["error"]["param"], "amount");
    let (s, r) = app
        .post(
            &format!("/v1/charges/{id}/refunds"),
            &m.sk,
            json!({"amount": 200}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    assert_eq!(r["object"], "refund");
    assert_eq!(r["amount"], 200);
    let (s, r) = app
        .post(&format!("/v1/charges/{id}/refunds"), &m.sk, json!({}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    assert_eq!(r["amount"], 400, "the default refund is what remains");
    let (s, e) = app
        .post(
            &format!("/v1/charges/{id}/refunds"),
            &m.sk,
            json!({"amount": 1}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    assert_eq!(e["error"]["code"], "charge_already_refunded");
    let (_, got) = app.get(&format!("/v1/charges/{id}"), &m.sk).await;
    assert_eq!(got["amount_refunded"], 600);
    assert_eq!(got["refunded"], true);
    assert_eq!(got["refunds"]["data"].as_array().unwrap().len(), 2);
    assert_eq!(got["metadata"]["order"], "77");

    // Full capture by default, then void of another authorization.
    let (_, ch2) = charge(
        &app,
        &m.sk,
        json!({"amount": 500, "currency": "usd", "customer": cus, "capture": false}),
    )
    .await;
    let id2 = ch2["id"].as_str().unwrap().to_string();
    let (s, c) = app
        .post(&format!("/v1/charges/{id2}/cancel"), &m.sk, json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert_eq!(c["status"], "canceled");
    let (s, e) = app
        .post(&format!("/v1/charges/{id2}/capture"), &m.sk, json!({}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    let (s, e) = app
        .post(&format!("/v1/charges/{id2}/cancel"), &m.sk, json!({}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    assert_eq!(e["error"]["code"], "charge_not_cancelable");
    let (_, ch3) = charge(
        &app,
        &m.sk,
        json!({"amount": 700, "currency": "usd", "customer": cus, "capture": false}),
    )
    .await;
    let id3 = ch3["id"].as_str().unwrap().to_string();
    let (s, c, _) = app
        .call(
            Method::POST,
            &format!("/v1/charges/{id3}/capture"),
            Some(&m.sk),
            None,
        )
        .await;
    assert_eq!(
        s,
        StatusCode::OK,
        "capture without a body captures everything: {c}"
    );
    let (_, got) = app.get(&format!("/v1/charges/{id3}"), &m.sk).await;
    assert_eq!(got["amount_captured"], 700);

    // A failed charge cannot be captured, refunded or canceled.
    let (cus_f, _) = customer_with_card(&app, &m.sk, sandbox::DO_NOT_HONOR).await;
    let (_, failed) = charge(
        &app,
        &m.sk,
        json!({"amount": 100, "currency": "usd", "customer": cus_f}),
    )
    .await;
    let fid = failed["id"].as_str().unwrap();
    for op in ["capture", "refunds", "cancel"] {
        let (s, e) = app
            .post(&format!("/v1/charges/{fid}/{op}"), &m.sk, json!({}))
            .await;
        assert_eq!(s, StatusCode::CONFLICT, "{op}: {e}");
    }

    // Listing by customer, with paging.
    let mut seen = Vec::new();
    let mut path = format!("/v1/charges?customer={cus}&limit=2");
    loop {
        let (s, page) = app.get(&path, &m.sk).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        for c in page["data"].as_array().unwrap() {
            assert_eq!(c["customer"], cus.as_str());
            seen.push(c["id"].as_str().unwrap().to_string());
        }
        if page["has_more"] != json!(true) {
            break;
        }
        path = format!(
            "/v1/charges?customer={cus}&limit=2&starting_after={}",
            seen.last().unwrap()
        );
    }
    assert_eq!(seen, vec![id3.clone(), id2.clone(), id.clone()]);
    let (s, all) = app.get("/v1/charges?limit=100", &m.sk).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(all["data"].as_array().unwrap().len(), 4);

    // Another merchant sees none of it.
    let other = app.merchant(false).await;
    let (s, _) = app.get(&format!("/v1/charges/{id}"), &other.sk).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = app
        .post(&format!("/v1/charges/{id}/refunds"), &other.sk, json!({}))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = charge(
        &app,
        &other.sk,
        json!({"amount": 100, "currency": "usd", "customer": cus}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Events were written for each change.
    let (s, events) = app.get("/v1/events?limit=100", &m.sk).await;
    assert_eq!(s, StatusCode::OK, "{events}");
    let types: Vec<&str> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    for t in [
        "charge.succeeded",
        "charge.captured",
        "charge.refunded",
        "charge.canceled",
        "charge.failed",
    ] {
        assert!(types.contains(&t), "{t} missing from {types:?}");
    }
    assert!(!events.to_string().contains(APPROVED));
}
matrix!(capture_refund_cancel);

async fn charge_validation(backend: Backend, mode: CryptoMode) {
    let app = TestApp::spawn(backend, mode).await;
    let m = app.merchant(false).await;
    let (cus, card) = customer_with_card(&app, &m.sk, APPROVED).await;
    let bad: &[(Value, &str)] = &[
        (
            json!({"amount": 0, "currency": "usd", "customer": cus}),
            "amount",
        ),
        (
            json!({"amount": -1, "currency": "usd", "customer": cus}),
            "amount",
        ),
        (
            json!({"amount": 100, "currency": "xxx", "customer": cus}),
            "currency",
        ),
        (
            json!({"amount": 100_000_000_001i64, "currency": "jpy", "customer": cus}),
            "amount",
        ),
        (
            json!({"amount": "100", "currency": "usd", "customer": cus}),
            "amount",
        ),
        (json!({"currency": "usd", "customer": cus}), "amount"),
        (
            json!({"amount": 100, "currency": "usd", "customer": cus, "colour": "red"}),
            "colour",
        ),
        (
            json!({"amount": 100, "currency": "usd", "customer": cus, "description": "card 4111111111111111"}),
            "description",
        ),
        (
            json!({"amount": 100, "currency": "usd", "customer": cus,
                "line_items": [{"name": "a", "unit_price": 30, "quantity": 3}]}),
            "line_items",
        ),
        (
            json!({"amount": 100, "currency": "usd", "customer": cus,
                "line_items": [{"name": "a", "unit_price": 50, "quantity": 0}]}),
            "line_items[0].quantity",
        ),
        (
            json!({"amount": 100, "currency": "usd", "customer": cus, "token": "tok_nope"}),
            "token",
        ),
    ];
    for (body, param) in bad {
        let (s, e) = charge(&app, &m.sk, body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {e}");
        assert_eq!(e["error"]["param"], *param, "{body}: {e}");
        assert!(!e.to_string().contains("4111111111111111"));
    }
    let (s, e) = charge(
        &app,
        &m.sk,
        json!({"amount": 100, "currency": "usd", "customer": "cus_nope"}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{e}");
    assert_eq!(e["error"]["param"], "customer");
    let empty = app.customer(&m.sk, "nocard@example.com").await;
    let (s, e) = charge(
        &app,
        &m.sk,
        json!({"amount": 100, "currency": "usd", "customer": empty}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["param"], "card");
    // A named card: the 404 names whichever of the two is missing, and
    // another customer's card is missing for this one.
    let other_merchant = app.merchant(false).await;
    let foreign_cus = app
        .customer(&other_merchant.sk, "foreign@example.com")
        .await;
    for (customer, card, param) in [
        ("cus_nope".to_string(), card.clone(), "customer"),
        (foreign_cus, card.clone(), "customer"),
        ("cus_nope".to_string(), "card_nope".to_string(), "customer"),
        (empty.clone(), card.clone(), "card"),
        (cus.clone(), "card_nope".to_string(), "card"),
    ] {
        let body = json!({"amount": 100, "currency": "usd", "customer": customer, "card": card});
        let (s, e) = charge(&app, &m.sk, body.clone()).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{body}: {e}");
        assert_eq!(e["error"]["param"], param, "{body}: {e}");
    }
    let (s, _) = app.get("/v1/charges?limit=100", &m.sk).await;
    assert_eq!(s, StatusCode::OK);
    let (_, list) = app.get("/v1/charges", &m.sk).await;
    assert_eq!(
        list["data"].as_array().unwrap().len(),
        0,
        "bad input changes nothing"
    );

    // Zero-decimal currencies and line items that add up.
    let (s, ch) = charge(
        &app,
        &m.sk,
        json!({"amount": 1500, "currency": "CLP", "customer": cus,
               "line_items": [{"name": "Café", "unit_price": 500, "quantity": 2, "sku": "C-1"},
                              {"name": "Pan", "unit_price": 500, "quantity": 1}]}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{ch}");
    assert_eq!(ch["currency"], "clp");
    assert_eq!(ch["line_items"][0]["sku"], "C-1");
    let (s, ch) = charge(
        &app,
        &m.sk,
        json!({"amount": 7, "currency": "jpy", "customer": cus}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{ch}");

    // A publishable key cannot charge.
    let (s, e) = charge(
        &app,
        &m.pk,
        json!({"amount": 100, "currency": "usd", "customer": cus}),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{e}");
}
matrix!(charge_validation);

async fn pending_cvc_flow_and_tokens(backend: Backend, mode: CryptoMode) {
    let app = TestApp::spawn(backend, mode).await;
    let m = app.merchant(false).await;
    let b = app.merchant(false).await;
    let (cus, card) = customer_with_card(&app, &m.sk, sandbox::REQUIRES_CVC).await;
    let (s, ch) = charge(
        &app,
        &m.sk,
        json!({"amount": 2500, "currency": "brl", "customer": cus}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{ch}");
    assert_eq!(ch["status"], "pending");
    assert_eq!(ch["next_action"]["type"], "provide_cvc");
    let id = ch["id"].as_str().unwrap().to_string();

    // The browser re-captures the CVV with the publishable key.
    let (s, tok) = app
        .post("/v1/tokens", &m.pk, json!({"card": card, "cvc": "123"}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{tok}");
    let tok_id = tok["id"].as_str().unwrap().to_string();
    assert!(tok_id.starts_with("tok_"));
    assert_eq!(tok["type"], "cvc_update");
    assert!(!tok.to_string().contains("\"123\""), "{tok}");
    // Merchant B cannot use merchant A's token (nor see A's charge).
    let (s, e) = app
        .post(
            &format!("/v1/charges/{id}/confirm"),
            &b.sk,
            json!({"token": tok_id}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{e}");
    let (cus_b, _) = customer_with_card(&app, &b.sk, sandbox::REQUIRES_CVC).await;
    let (s, e) = charge(
        &app,
        &b.sk,
        json!({"amount": 100, "currency": "usd", "customer": cus_b, "token": tok_id}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["code"], "token_invalid");

    let (s, done) = app
        .post(
            &format!("/v1/charges/{id}/confirm"),
            &m.sk,
            json!({"token": tok_id}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{done}");
    assert_eq!(done["status"], "succeeded");
    assert!(done["next_action"].is_null());
    assert_eq!(done["captured"], true);
    // Confirming again: the charge is no longer pending; the token is spent.
    let (s, e) = app
        .post(
            &format!("/v1/charges/{id}/confirm"),
            &m.sk,
            json!({"token": tok_id}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    assert_eq!(e["error"]["code"], "charge_not_awaiting_cvc");
    let (_, ch2) = charge(
        &app,
        &m.sk,
        json!({"amount": 100, "currency": "usd", "customer": cus}),
    )
    .await;
    assert_eq!(ch2["status"], "pending");
    let id2 = ch2["id"].as_str().unwrap();
    let (s, e) = app
        .post(
            &format!("/v1/charges/{id2}/confirm"),
            &m.sk,
            json!({"token": tok_id}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["code"], "token_already_used");
    assert_eq!(e["error"]["param"], "token");
    // A charge with the CVV token up front never goes pending.
    let (_, tok2) = app
        .post("/v1/tokens", &m.pk, json!({"card": card, "cvc": "123"}))
        .await;
    let (s, ch3) = charge(
        &app,
        &m.sk,
        json!({"amount": 100, "currency": "usd", "customer": cus, "token": tok2["id"]}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{ch3}");
    assert_eq!(ch3["status"], "succeeded");
    // Abandoning a pending charge cancels it.
    let (s, c) = app
        .post(&format!("/v1/charges/{id2}/cancel"), &m.sk, json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert_eq!(c["status"], "canceled");

    // Card tokens: a publishable key only creates tokens.
    let (s, e) = app.get("/v1/customers", &m.pk).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{e}");
    let (s, t) = app
        .post("/v1/tokens", &m.pk, json!({"number": AMEX, "exp_month": 12, "exp_year": 2031, "cvc": "1234", "holder_name": "Ana Silva"}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    assert_eq!(t["last4"], "0005");
    assert!(!t.to_string().contains(AMEX));
    let (s, added) = app
        .post(
            &format!("/v1/customers/{cus}/cards"),
            &m.sk,
            json!({"token": t["id"]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{added}");
    assert_eq!(added["last4"], "0005");
    assert_eq!(added["holder_name"], "Ana Silva");
    let (s, e) = app
        .post(
            &format!("/v1/customers/{cus}/cards"),
            &m.sk,
            json!({"token": t["id"]}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["code"], "token_already_used");
    // Bad token input.
    let (s, e) = app
        .post("/v1/tokens", &m.pk, json!({"card": card, "cvc": "12"}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["param"], "cvc");
    let (s, e) = app.post("/v1/tokens", &m.pk, json!({"card": card})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["param"], "cvc");
    let (s, e) = app
        .post("/v1/tokens", &b.pk, json!({"card": card, "cvc": "123"}))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{e}");
    let (s, e) = app
        .post(
            "/v1/tokens",
            &m.pk,
            json!({"number": "4111111111111112", "exp_month": 12, "exp_year": 2031}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["param"], "number");
    let (s, _, _) = app
        .call(
            Method::POST,
            "/v1/tokens",
            None,
            Some(json!({"card": card, "cvc": "123"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}
matrix!(pending_cvc_flow_and_tokens);

/// Tokens expire after their TTL, and the sweeper removes the sealed CVV of
/// every token nobody used.
async fn tokens_expire_and_are_swept(backend: Backend, mode: CryptoMode) {
    let app = TestApp::spawn_with(backend, mode, |cfg| {
        cfg.payments.token_ttl_secs = 1;
        cfg.payments.token_sweep_secs = 1;
    })
    .await;
    let m = app.merchant(false).await;
    let (cus, card) = customer_with_card(&app, &m.sk, sandbox::REQUIRES_CVC).await;
    let (_, tok) = app
        .post("/v1/tokens", &m.pk, json!({"card": card, "cvc": "321"}))
        .await;
    let (_, unused) = app
        .post("/v1/tokens", &m.pk, json!({"card": card, "cvc": "321"}))
        .await;
    assert!(unused["id"].is_string());
    assert_eq!(live_token_payloads(&app).await, 2);
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let (_, ch) = charge(
        &app,
        &m.sk,
        json!({"amount": 100, "currency": "usd", "customer": cus}),
    )
    .await;
    let id = ch["id"].as_str().unwrap();
    let (s, e) = app
        .post(
            &format!("/v1/charges/{id}/confirm"),
            &m.sk,
            json!({"token": tok["id"]}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["code"], "token_expired");
    assert_eq!(
        live_token_payloads(&app).await,
        0,
        "the sweeper purged expired CVVs"
    );
}
matrix!(tokens_expire_and_are_swept);

/// Rows of card_tokens that still hold a sealed payload.
pub async fn live_token_payloads(app: &TestApp) -> i64 {
    use sqlx::Connection;
    let sql = "SELECT count(*) FROM card_tokens WHERE payload IS NOT NULL";
    match app.backend {
        Backend::Sqlite => {
            let mut c = sqlx::SqliteConnection::connect(&app.db.url).await.unwrap();
            sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap()
        }
        Backend::Postgres => {
            let mut c = sqlx::PgConnection::connect(&app.db.url).await.unwrap();
            sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap()
        }
    }
}

async fn micro_charge_verification(backend: Backend, mode: CryptoMode) {
    let app = TestApp::spawn(backend, mode).await;
    let m = app.merchant(false).await;
    let (cus, card) = customer_with_card(&app, &m.sk, APPROVED).await;
    let base = format!("/v1/customers/{cus}/cards/{card}/verifications");
    let (s, v) = app
        .post(
            &base,
            &m.sk,
            json!({"method": "micro_charge", "currency": "usd"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["status"], "pending");
    assert_eq!(v["attempts_remaining"], 3);
    assert!(v.get("amount").is_none(), "{v}");
    let vid = v["id"].as_str().unwrap().to_string();
    // The cardholder reads the amount on the statement; the test reads it
    // the only other way there is: opening the sealed record.
    let amount = sealed_amount(&app, &m.id, &vid).await;
    let wrong = if amount == 99 { 98 } else { amount + 1 };
    // Another merchant can neither see nor confirm it.
    let other = app.merchant(false).await;
    let (s, _) = app.get(&format!("{base}/{vid}"), &other.sk).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = app
        .post(
            &format!("{base}/{vid}/confirm"),
            &other.sk,
            json!({"amount": amount}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = app
        .post(&base, &other.sk, json!({"method": "micro_charge"}))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, e) = app
        .post(
            &format!("{base}/{vid}/confirm"),
            &m.sk,
            json!({"amount": "12"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["param"], "amount");
    let (s, v) = app
        .post(
            &format!("{base}/{vid}/confirm"),
            &m.sk,
            json!({"amount": wrong}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "pending");
    assert_eq!(v["attempts_remaining"], 2);
    let (s, v) = app
        .post(
            &format!("{base}/{vid}/confirm"),
            &m.sk,
            json!({"amount": amount}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "succeeded");
    let (_, c) = app
        .get(&format!("/v1/customers/{cus}/cards/{card}"), &m.sk)
        .await;
    assert_eq!(c["status"], "verified");
    let (s, e) = app
        .post(
            &format!("{base}/{vid}/confirm"),
            &m.sk,
            json!({"amount": amount}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");

    // Three wrong answers lock it.
    let (cus2, card2) = customer_with_card(&app, &m.sk, MASTERCARD).await;
    let base2 = format!("/v1/customers/{cus2}/cards/{card2}/verifications");
    let (_, v) = app
        .post(&base2, &m.sk, json!({"method": "micro_charge"}))
        .await;
    let vid2 = v["id"].as_str().unwrap().to_string();
    let amount2 = sealed_amount(&app, &m.id, &vid2).await;
    let wrong = if amount2 == 99 { 98 } else { amount2 + 1 };
    let mut last = Value::Null;
    for _ in 0..3 {
        let (s, v) = app
            .post(
                &format!("{base2}/{vid2}/confirm"),
                &m.sk,
                json!({"amount": wrong}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        last = v;
    }
    assert_eq!(last["status"], "failed");
    assert_eq!(last["failure_code"], "too_many_attempts");
    let (s, e) = app
        .post(
            &format!("{base2}/{vid2}/confirm"),
            &m.sk,
            json!({"amount": amount2}),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::CONFLICT,
        "even the right amount is refused after the lock: {e}"
    );
    let (_, c) = app
        .get(&format!("/v1/customers/{cus2}/cards/{card2}"), &m.sk)
        .await;
    assert_eq!(c["status"], "verification_failed");
    let (_, got) = app.get(&format!("{base2}/{vid2}"), &m.sk).await;
    assert!(got.get("amount").is_none());
    assert!(!got.to_string().contains(&format!("\"amount\":{amount2}")));

    // CVC verification with a token.
    let (cus3, card3) = customer_with_card(&app, &m.sk, sandbox::REQUIRES_CVC).await;
    let (_, tok) = app
        .post("/v1/tokens", &m.pk, json!({"card": card3, "cvc": "456"}))
        .await;
    let (s, v) = app
        .post(
            &format!("/v1/customers/{cus3}/cards/{card3}/verifications"),
            &m.sk,
            json!({"method": "cvc", "token": tok["id"]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["status"], "succeeded");
    let (s, e) = app
        .post(
            &format!("/v1/customers/{cus3}/cards/{card3}/verifications"),
            &m.sk,
            json!({"method": "sms"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["param"], "method");

    let (_, events) = app.get("/v1/events?type=card.verified", &m.sk).await;
    assert_eq!(events["data"].as_array().unwrap().len(), 2, "{events}");
    let (_, events) = app
        .get("/v1/events?type=card.verification_failed", &m.sk)
        .await;
    assert_eq!(events["data"].as_array().unwrap().len(), 1, "{events}");

    // A merchant requiring verified cards refuses the unverified one.
    drop(app);
    let app = TestApp::spawn_with(backend, mode, |cfg| {
        cfg.payments.require_verified_cards = true
    })
    .await;
    let m = app.merchant(false).await;
    let (cus, _) = customer_with_card(&app, &m.sk, APPROVED).await;
    let (s, e) = charge(
        &app,
        &m.sk,
        json!({"amount": 100, "currency": "usd", "customer": cus}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["code"], "card_not_verified");
}
matrix!(micro_charge_verification);

async fn sealed_amount(app: &TestApp, merchant: &str, vid: &str) -> i64 {
    let v = app
        .storage()
        .get_verification(merchant, vid)
        .await
        .unwrap()
        .unwrap();
    let plain = app
        .vault
        .keyring()
        .open(
            cardvault::crypto::KeyOwner::Merchant(merchant),
            vid,
            v.amount_sealed.as_deref().unwrap(),
        )
        .await
        .unwrap();
    let plain: &[u8] = &plain;
    let bytes: [u8; 8] = plain[..8].try_into().unwrap();
    let amount = i64::from_be_bytes(bytes);
    assert!((1..=99).contains(&amount));
    amount
}

/// Customer and card changes write their events in the same transaction.
async fn lifecycle_events(backend: Backend, mode: CryptoMode) {
    let app = TestApp::spawn(backend, mode).await;
    let m = app.merchant(false).await;
    let (cus, card) = customer_with_card(&app, &m.sk, APPROVED).await;
    let card2 = app.card(&m.sk, &cus, MASTERCARD).await;
    let (s, _) = app
        .delete(&format!("/v1/customers/{cus}/cards/{card}"), &m.sk)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = app.delete(&format!("/v1/customers/{cus}"), &m.sk).await;
    assert_eq!(s, StatusCode::OK);
    let (s, events) = app.get("/v1/events?limit=100", &m.sk).await;
    assert_eq!(s, StatusCode::OK, "{events}");
    let got: Vec<(String, String)> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_string(),
                e["data"]["object"]["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let card2 = card2["id"].as_str().unwrap().to_string();
    let want = vec![
        ("card.deleted".to_string(), card2.clone()),
        ("customer.deleted".to_string(), cus.clone()),
        ("card.deleted".to_string(), card.clone()),
        ("card.created".to_string(), card2),
        ("card.created".to_string(), card),
        ("customer.created".to_string(), cus),
    ];
    assert_eq!(got, want, "newest first");
    assert!(!events.to_string().contains(APPROVED));
    let first = events["data"][5]["id"].as_str().unwrap();
    let (s, one) = app.get(&format!("/v1/events/{first}"), &m.sk).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(one["type"], "customer.created");
    let other = app.merchant(false).await;
    let (s, _) = app.get(&format!("/v1/events/{first}"), &other.sk).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, none) = app.get("/v1/events", &other.sk).await;
    assert_eq!(none["data"].as_array().unwrap().len(), 0);
}
matrix!(lifecycle_events);

/// Concurrent refunds (or captures) of one charge: exactly one applies; the
/// others get a 409, never a second refund.
async fn concurrent_changes_apply_once(backend: Backend, mode: CryptoMode) {
    let app = TestApp::spawn(backend, mode).await;
    let m = app.merchant(false).await;
    let (cus, _) = customer_with_card(&app, &m.sk, APPROVED).await;
    let (_, ch) = charge(
        &app,
        &m.sk,
        json!({"amount": 1000, "currency": "usd", "customer": cus, "capture": false}),
    )
    .await;
    let id = ch["id"].as_str().unwrap().to_string();
    let capture_path = format!("/v1/charges/{id}/capture");
    let refund_path = format!("/v1/charges/{id}/refunds");
    let captures =
        futures_util::future::join_all((0..6).map(|_| app.post(&capture_path, &m.sk, json!({}))))
            .await;
    let ok = captures
        .iter()
        .filter(|(s, _)| *s == StatusCode::OK)
        .count();
    assert_eq!(ok, 1, "{captures:?}");
    assert!(captures
        .iter()
        .all(|(s, _)| *s == StatusCode::OK || *s == StatusCode::CONFLICT));
    let refunds = futures_util::future::join_all(
        (0..6).map(|_| app.post(&refund_path, &m.sk, json!({"amount": 1000}))),
    )
    .await;
    let ok = refunds
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .count();
    assert_eq!(ok, 1, "{refunds:?}");
    assert!(refunds
        .iter()
        .all(|(s, _)| *s == StatusCode::CREATED || *s == StatusCode::CONFLICT));
    let (_, got) = app.get(&format!("/v1/charges/{id}"), &m.sk).await;
    assert_eq!(got["amount_refunded"], 1000);
    assert_eq!(got["refunds"]["data"].as_array().unwrap().len(), 1);
}
matrix!(concurrent_changes_apply_once);

/// Reconciliation with the sandbox: a charge of the timeout card (the
/// sandbox withheld its approval) becomes `succeeded`; a charge left
/// `processing`, as by a node that died during the processor call, fails
/// with nothing charged, since the processor never received it; a refund
/// of the refund-timeout card, answered `pending`, is sent again and
/// succeeds.
async fn sandbox_charges_are_reconciled(backend: Backend, mode: CryptoMode) {
    let app = TestApp::spawn_with(backend, mode, |cfg| {
        cfg.payments.reconcile_interval_secs = 1;
        cfg.payments.reconcile_after_secs = 1;
    })
    .await;
    let m = app.merchant(false).await;
    let (cus, lost_card) = customer_with_card(&app, &m.sk, sandbox::TIMEOUT).await;
    let ok_card = app.card(&m.sk, &cus, APPROVED).await;
    let (s, lost) = charge(
        &app,
        &m.sk,
        json!({"amount": 700, "currency": "usd", "customer": cus, "card": lost_card}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{lost}");
    assert_eq!(lost["failure_code"], "processor_unavailable", "{lost}");
    let (s, done) = charge(
        &app,
        &m.sk,
        json!({"amount": 800, "currency": "usd", "customer": cus, "card": ok_card["id"]}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{done}");
    // Put the second charge back where a dead node would have left it.
    let stored = app
        .storage()
        .get_charge(&m.id, done["id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    let mut orphan = stored.clone();
    orphan.status = "processing".to_string();
    orphan.captured = false;
    orphan.amount_captured = 0;
    orphan.processor_ref = None;
    orphan.version += 1;
    app.storage()
        .update_charge(
            &orphan,
            stored.version,
            None,
            &[],
            &cardvault::storage::AuditEntry {
                event: "test.orphan".to_string(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // A refund whose answer the sandbox loses (it is made).
    let slow_card = app.card(&m.sk, &cus, sandbox::REFUND_TIMEOUT).await;
    let (s, slow) = charge(
        &app,
        &m.sk,
        json!({"amount": 900, "currency": "usd", "customer": cus, "card": slow_card["id"]}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{slow}");
    let slow_id = slow["id"].as_str().unwrap();
    let (s, refund) = app
        .post(
            &format!("/v1/charges/{slow_id}/refunds"),
            &m.sk,
            json!({"amount": 300}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{refund}");
    assert_eq!(refund["status"], "pending", "{refund}");

    let started = std::time::Instant::now();
    let (l, o, r) = loop {
        let (_, l) = app
            .get(
                &format!("/v1/charges/{}", lost["id"].as_str().unwrap()),
                &m.sk,
            )
            .await;
        let (_, o) = app.get(&format!("/v1/charges/{}", orphan.id), &m.sk).await;
        let (_, r) = app.get(&format!("/v1/charges/{slow_id}"), &m.sk).await;
        if l["status"] != "pending" && o["status"] != "processing" && r["amount_refunded"] != 0 {
            break (l, o, r);
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "not reconciled: {l} {o} {r}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    assert_eq!(r["amount_refunded"], 300, "{r}");
    assert_eq!(r["refunds"]["data"][0]["id"], refund["id"], "{r}");
    assert_eq!(r["refunds"]["data"][0]["status"], "succeeded", "{r}");
    assert_eq!(l["status"], "succeeded", "{l}");
    assert_eq!(l["captured"], true, "{l}");
    assert!(l["failure_code"].is_null(), "{l}");
    assert_eq!(o["status"], "failed", "{o}");
    assert_eq!(o["failure_code"], "processor_unavailable", "{o}");
    assert_eq!(o["amount_captured"], 0, "{o}");
    let (_, events) = app.get("/v1/events?type=charge.failed", &m.sk).await;
    assert!(
        events["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["data"]["object"]["id"] == orphan.id.as_str()),
        "{events}"
    );
}
matrix!(sandbox_charges_are_reconciled);
