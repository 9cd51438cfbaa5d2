//! After a payments session (card and CVV tokens, charges, the pending-CVV
//! flow, verification, webhooks), neither the database (every table, and
//! the SQLite file bytes after shutdown) nor the logs hold a PAN or a CVV.
//!
//! CVVs are 3–4 digits, which random ciphertext contains by chance, so they
//! are searched in the textual shapes a leak would take (`"1234"`,
//! `cvc=1234`, `"cvc":"1234"`), while PANs are searched in every form
//! `leaks.rs` knows.

use std::time::Duration;

use cardvault::crypto::CryptoMode;
use cardvault::processor::sandbox;
use rand::Rng;
use reqwest::StatusCode;
use serde_json::json;

use crate::http_processor::random_visa;
use crate::leaks::{dump_postgres, files_under, find_bytes, latin1, text_needles};
use crate::matrix;
use crate::support::*;
use crate::webhooks::{Mode, Receiver};

fn cvc_needles(cvc: &str) -> Vec<String> {
    vec![
        format!("\"{cvc}\""),
        format!("cvc={cvc}"),
        format!("cvc: {cvc}"),
        format!("\"cvc\":\"{cvc}\""),
        format!("cvc\":\"{cvc}"),
    ]
}

struct Secrets {
    pans: Vec<String>,
    cvcs: Vec<String>,
}

impl Secrets {
    fn in_text(&self, text: &str) -> Vec<String> {
        let mut hits = Vec::new();
        for pan in &self.pans {
            for n in text_needles(pan) {
                if text.contains(&n) {
                    hits.push(format!("PAN as {n:?}"));
                }
            }
        }
        for cvc in &self.cvcs {
            for n in cvc_needles(cvc) {
                if text.contains(&n) {
                    hits.push(format!("CVV as {n:?}"));
                }
            }
        }
        hits
    }

    fn in_bytes(&self, bytes: &[u8]) -> Vec<String> {
        let hay = latin1(bytes);
        let mut hits = Vec::new();
        for pan in &self.pans {
            for n in text_needles(pan) {
                if find_bytes(&hay, n.as_bytes()) {
                    hits.push(format!("PAN as {n:?}"));
                }
            }
        }
        for cvc in &self.cvcs {
            // Raw pages of random ciphertext hold `"123"` by chance (about
            // once per 10^9 bytes); in bytes, only shapes naming the field.
            for n in cvc_needles(cvc).into_iter().filter(|n| n.contains("cvc")) {
                if find_bytes(&hay, n.as_bytes()) {
                    hits.push(format!("CVV as {n:?}"));
                }
            }
        }
        hits
    }
}

fn random_cvc(len: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| char::from(b'0' + rng.gen_range(0..10u8)))
        .collect()
}

/// A CVV for a payment that is never a prefix of the control value (nor
/// the other way round): a secret `896` would otherwise be "found" as
/// `cvc=896` inside the control's `cvc=8961`, which is stored in clear on
/// purpose (a false alarm in about one run in 250).
fn secret_cvc(len: usize, control: &Secrets) -> String {
    loop {
        let cvc = random_cvc(len);
        if !control
            .cvcs
            .iter()
            .any(|c| c.starts_with(&cvc) || cvc.starts_with(c.as_str()))
        {
            return cvc;
        }
    }
}

async fn no_pan_or_cvv_after_payments(backend: Backend, mode: CryptoMode) {
    let app = TestApp::spawn_with(backend, mode, |cfg| {
        cfg.payments.webhooks.poll_ms = 50;
    })
    .await;
    let m = app.merchant(false).await;
    let receiver = Receiver::start(Mode::FailThenOk(0)).await;
    let (s, _) = app
        .post(
            "/v1/webhook_endpoints",
            &m.sk,
            json!({"url": receiver.url, "events": ["*"]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let mut secrets = Secrets {
        pans: Vec::new(),
        cvcs: Vec::new(),
    };
    // A control: a CVV-shaped value stored in clear on purpose (customer
    // metadata), which the scans below must find, proving they see the data.
    let control = Secrets {
        pans: Vec::new(),
        cvcs: vec![random_cvc(4)],
    };
    let (s, _) = app
        .post("/v1/customers", &m.sk, json!({"email": "control@example.com", "metadata": {"note": format!("cvc={}", control.cvcs[0])}}))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let mut saw_control = false;

    // A card added from a token that carried a CVV.
    let pan = random_visa();
    let cvc = secret_cvc(3, &control);
    secrets.pans.push(pan.clone());
    secrets.cvcs.push(cvc.clone());
    let cus = app.customer(&m.sk, "leak@example.com").await;
    let (s, tok) = app
        .post(
            "/v1/tokens",
            &m.pk,
            json!({"number": pan, "exp_month": 11, "exp_year": 2032, "cvc": cvc}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{tok}");
    let (s, card) = app
        .post(
            &format!("/v1/customers/{cus}/cards"),
            &m.sk,
            json!({"token": tok["id"]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{card}");
    let card_id = card["id"].as_str().unwrap().to_string();
    // A charge with a CVV token, and a verification with another.
    let cvc2 = secret_cvc(3, &control);
    secrets.cvcs.push(cvc2.clone());
    let (_, t2) = app
        .post("/v1/tokens", &m.pk, json!({"card": card_id, "cvc": cvc2}))
        .await;
    let (s, ch) = app
        .post(
            "/v1/charges",
            &m.sk,
            json!({"amount": 990, "currency": "eur", "customer": cus, "token": t2["id"]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{ch}");
    assert_eq!(ch["status"], "succeeded");
    let cvc3 = secret_cvc(3, &control);
    secrets.cvcs.push(cvc3.clone());
    let (_, t3) = app
        .post("/v1/tokens", &m.pk, json!({"card": card_id, "cvc": cvc3}))
        .await;
    let (s, v) = app
        .post(
            &format!("/v1/customers/{cus}/cards/{card_id}/verifications"),
            &m.sk,
            json!({"method": "cvc", "token": t3["id"]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");

    // The pending-CVV flow on a sandbox card, with a 4-digit CID on Amex
    // for a token that is never used (the sweeper's business).
    let cus2 = app.customer(&m.sk, "leak2@example.com").await;
    let card2 = app.card(&m.sk, &cus2, sandbox::REQUIRES_CVC).await;
    let card2_id = card2["id"].as_str().unwrap();
    let (_, pending) = app
        .post(
            "/v1/charges",
            &m.sk,
            json!({"amount": 100, "currency": "usd", "customer": cus2}),
        )
        .await;
    let cvc4 = secret_cvc(3, &control);
    secrets.cvcs.push(cvc4.clone());
    let (_, t4) = app
        .post("/v1/tokens", &m.pk, json!({"card": card2_id, "cvc": cvc4}))
        .await;
    let (s, done) = app
        .post(
            &format!("/v1/charges/{}/confirm", pending["id"].as_str().unwrap()),
            &m.sk,
            json!({"token": t4["id"]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{done}");
    assert_eq!(done["status"], "succeeded");
    let amex_cvc = secret_cvc(4, &control);
    secrets.cvcs.push(amex_cvc.clone());
    let (s, unused) = app
        .post(
            "/v1/tokens",
            &m.pk,
            json!({"number": AMEX, "exp_month": 1, "exp_year": 2033, "cvc": amex_cvc}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{unused}");
    secrets.pans.push(AMEX.to_string());
    secrets.pans.push(sandbox::REQUIRES_CVC.to_string());

    // Webhooks carried the events; none of them held a secret.
    let delivered = receiver.wait_delivered(3, Duration::from_secs(20)).await;
    let mut problems = Vec::new();
    for (_, body) in &delivered {
        for hit in secrets.in_text(body) {
            problems.push(format!("webhook body: {hit}"));
        }
    }

    match backend {
        Backend::Postgres => {
            let rows = dump_postgres(&app.db.url).await;
            assert!(rows.iter().any(|(t, _)| t.ends_with(".card_tokens")));
            for (table, row) in &rows {
                saw_control |= !control.in_text(row).is_empty();
                for hit in secrets.in_text(row) {
                    problems.push(format!("table {table}: {hit}"));
                }
            }
        }
        Backend::Sqlite => {}
    }
    let mut app = app;
    let data = std::mem::replace(&mut app.data, tempfile::tempdir().expect("tempdir"));
    app.stop().await;
    if backend == Backend::Sqlite {
        let files = files_under(data.path());
        assert!(files.iter().any(|(p, _)| p.ends_with("cardvault.db")));
        for (path, bytes) in &files {
            saw_control |= !control.in_bytes(bytes).is_empty();
            for hit in secrets.in_bytes(bytes) {
                problems.push(format!("{}: {hit}", path.display()));
            }
        }
    }
    assert!(saw_control, "the database scan must see the control value");
    let logs = captured_logs();
    for hit in secrets.in_text(&logs) {
        problems.push(format!("log: {hit}"));
    }
    assert!(
        problems.is_empty(),
        "found secrets:\n{}",
        problems.join("\n")
    );
}
matrix!(no_pan_or_cvv_after_payments);
