//! Every endpoint's happy path and its documented behaviour.

use std::time::Duration;

use cardvault::crypto::CryptoMode;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::matrix;
use crate::support::*;

async fn customers_crud_and_paging(backend: Backend, mode: CryptoMode) {
    let app = TestApp::spawn(backend, mode).await;
    let m = app.merchant(false).await;

    let (s, c, headers) = app
        .call(
            Method::POST,
            "/v1/customers",
            Some(&m.sk),
            Some(json!({
                "email": "ana@example.com",
                "first_name": "Ana",
                "last_name": "Silva",
                "phone": "+55 11 5555-0100",
                "document": {"type": "cpf", "number": "123.456.789-09"},
                "billing_address": {"line1": "Rua A 1", "city": "São Paulo", "state": "SP", "postal_code": "01000-000", "country": "br"},
                "metadata": {"crm_id": "42"}
            })),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{c}");
    assert!(headers.get("request-id").is_some());
    let id = c["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("cus_"));
    assert_eq!(c["object"], "customer");
    assert_eq!(c["billing_address"]["country"], "BR");
    assert_eq!(c["document"]["type"], "cpf");
    assert_eq!(c["metadata"]["crm_id"], "42");

    let (s, got) = app.get(&format!("/v1/customers/{id}"), &m.sk).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(got, c);

    let (s, upd) = app
        .patch(
            &format!("/v1/customers/{id}"),
            &m.sk,
            json!({"first_name": "Ana Maria", "phone": null, "metadata": {"tier": "gold"}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{upd}");
    assert_eq!(upd["first_name"], "Ana Maria");
    assert_eq!(upd["last_name"], "Silva");
    assert!(upd["phone"].is_null());
    assert_eq!(upd["metadata"], json!({"tier": "gold"}));

    // 250 more customers, every fifth with a shared email.
    for i in 0..250 {
        let email = if i % 5 == 0 {
            "shared@example.com".to_string()
        } else {
            format!("c{i}@example.com")
        };
        app.customer(&m.sk, &email).await;
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/customers?limit=100&starting_after={c}"),
            None => "/v1/customers?limit=100".to_string(),
        };
        let (s, page) = app.get(&path, &m.sk).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        assert_eq!(page["object"], "list");
        let data = page["data"].as_array().unwrap();
        for c in data {
            seen.push(c["id"].as_str().unwrap().to_string());
        }
        if page["has_more"] == json!(true) {
            assert_eq!(data.len(), 100);
            cursor = Some(data.last().unwrap()["id"].as_str().unwrap().to_string());
        } else {
            break;
        }
    }
    assert_eq!(seen.len(), 251);
    let unique: std::collections::HashSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), 251, "no customer twice across pages");
    assert_eq!(
        seen.last().unwrap(),
        &id,
        "newest first: the first customer comes last"
    );

    let (s, page) = app
        .get("/v1/customers?email=shared@example.com&limit=100", &m.sk)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(page["data"].as_array().unwrap().len(), 50);
    assert!(page["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["email"] == "shared@example.com"));
    assert_eq!(page["has_more"], json!(false));
    let (_, page) = app
        .get("/v1/customers?email=SHARED@example.com&limit=10", &m.sk)
        .await;
    assert_eq!(page["data"].as_array().unwrap().len(), 10);
    assert_eq!(page["has_more"], json!(true));

    let (s, del) = app.delete(&format!("/v1/customers/{id}"), &m.sk).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(del["deleted"], json!(true));
    let (s, _) = app.get(&format!("/v1/customers/{id}"), &m.sk).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    app.stop().await;
}
matrix!(customers_crud_and_paging);

async fn cards_lifecycle(backend: Backend, mode: CryptoMode) {
    let app = TestApp::spawn(backend, mode).await;
    let m = app.merchant(true).await;
    let cus = app.customer(&m.sk, "card@example.com").await;
    let path = format!("/v1/customers/{cus}/cards");

    let (s, card) = app
        .post(
            &path,
            &m.sk,
            json!({"number": "4111 1111 1111 1111", "exp_month": 12, "exp_year": 2031, "holder_name": "Ana Silva"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{card}");
    let card_id = card["id"].as_str().unwrap().to_string();
    assert!(card_id.starts_with("card_"));
    assert_eq!(card["object"], "card");
    assert_eq!(card["customer"], cus.as_str());
    assert_eq!(card["bin"], "41111111");
    assert_eq!(card["last4"], "1111");
    assert_eq!(card["brand"], "visa");
    assert_eq!(card["exp_month"], 12);
    assert_eq!(card["exp_year"], 2031);
    assert_eq!(card["holder_name"], "Ana Silva");
    assert_eq!(
        card["security_code"],
        json!({"length": 3, "location": "back"})
    );
    assert_eq!(card["status"], "active");
    assert_eq!(card["default"], json!(true), "first card is the default");
    assert!(card["fingerprint"].as_str().unwrap().len() >= 16);
    assert!(card.get("number").is_none());
    assert!(!card.to_string().contains(VISA));

    // The same PAN again: the existing card, 200.
    let (s, again) = app
        .post(
            &path,
            &m.sk,
            json!({"number": VISA, "exp_month": 1, "exp_year": 2032}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{again}");
    assert_eq!(again["id"], card_id.as_str());

    let (s, amex) = app
        .post(
            &path,
            &m.sk,
            json!({"number": AMEX, "exp_month": 3, "exp_year": 2030}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(amex["brand"], "amex");
    assert_eq!(amex["bin"], "378282", "15-digit PAN: 6-digit BIN");
    assert_eq!(
        amex["security_code"],
        json!({"length": 4, "location": "front"})
    );
    assert_eq!(amex["default"], json!(false));
    let amex_id = amex["id"].as_str().unwrap().to_string();

    let (s, list) = app.get(&path, &m.sk).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"].as_array().unwrap().len(), 2);

    let (s, got) = app.get(&format!("{path}/{amex_id}"), &m.sk).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(got["id"], amex_id.as_str());

    let (s, upd) = app
        .patch(
            &format!("{path}/{amex_id}"),
            &m.sk,
            json!({"alias": "work card", "exp_month": 4, "exp_year": 2033, "holder_name": "A SILVA", "default": true}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{upd}");
    assert_eq!(upd["alias"], "work card");
    assert_eq!(upd["exp_month"], 4);
    assert_eq!(upd["exp_year"], 2033);
    assert_eq!(upd["holder_name"], "A SILVA");
    assert_eq!(upd["default"], json!(true));
    let (_, first) = app.get(&format!("{path}/{card_id}"), &m.sk).await;
    assert_eq!(first["default"], json!(false));
    let (_, cust) = app.get(&format!("/v1/customers/{cus}"), &m.sk).await;
    assert_eq!(cust["default_card"], amex_id.as_str());

    // Reveal.
    let (s, rev) = app
        .post(&format!("/v1/cards/{card_id}/reveal"), &m.sk, json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{rev}");
    assert_eq!(rev["number"], VISA);
    assert_eq!(rev["exp_month"], 12);
    assert_eq!(rev["exp_year"], 2031);
    let (s, rev) = app
        .post(&format!("/v1/cards/{amex_id}/reveal"), &m.sk, json!({}))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(rev["number"], AMEX);

    // Delete the default: the other card becomes the default.
    let (s, del) = app.delete(&format!("{path}/{amex_id}"), &m.sk).await;
    assert_eq!(s, StatusCode::OK, "{del}");
    let (s, _) = app.get(&format!("{path}/{amex_id}"), &m.sk).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, first) = app.get(&format!("{path}/{card_id}"), &m.sk).await;
    assert_eq!(first["default"], json!(true));

    // Audit trail: create, reveal and delete recorded with last4 only.
    let rows = app.storage().list_audit(0, 1000).await.unwrap();
    let events: Vec<&str> = rows.iter().map(|r| r.entry.event.as_str()).collect();
    assert!(events.contains(&"card.create"));
    assert!(events.contains(&"card.reveal"));
    assert!(events.contains(&"card.delete"));
    let reveal = rows
        .iter()
        .find(|r| r.entry.event == "card.reveal")
        .unwrap();
    assert_eq!(reveal.entry.outcome, "success");
    assert_eq!(reveal.entry.merchant_id.as_deref(), Some(m.id.as_str()));
    assert!(reveal.entry.actor.starts_with("key_"));
    assert_eq!(reveal.entry.origin.as_deref(), Some("127.0.0.1"));
    assert!(reveal
        .entry
        .request_id
        .as_deref()
        .unwrap()
        .starts_with("req_"));
    assert!(reveal
        .entry
        .detail
        .as_deref()
        .unwrap()
        .contains("last4=1111"));

    // Deleting the customer deletes its cards and their ciphertext.
    let (s, _) = app.delete(&format!("/v1/customers/{cus}"), &m.sk).await;
    assert_eq!(s, StatusCode::OK);
    assert!(app
        .storage()
        .get_card(&m.id, &card_id)
        .await
        .unwrap()
        .is_none());
    let rows = app.storage().list_audit(0, 1000).await.unwrap();
    assert!(rows.iter().any(|r| r.entry.event == "customer.delete"));
    app.stop().await;
}
matrix!(cards_lifecycle);

async fn reveal_needs_scope_and_keys_are_checked(backend: Backend, mode: CryptoMode) {
    let app = TestApp::spawn(backend, mode).await;
    let m = app.merchant(false).await;
    let cus = app.customer(&m.sk, "s@example.com").await;
    let card = app.card(&m.sk, &cus, MASTERCARD).await;
    let card_id = card["id"].as_str().unwrap();

    let (s, e) = app
        .post(&format!("/v1/cards/{card_id}/reveal"), &m.sk, json!({}))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(e["error"]["type"], "permission_error");
    assert!(e["error"]["request_id"]
        .as_str()
        .unwrap()
        .starts_with("req_"));
    let rows = app.storage().list_audit(0, 1000).await.unwrap();
    assert!(rows
        .iter()
        .any(|r| r.entry.event == "card.reveal" && r.entry.outcome == "denied"));

    // Missing, malformed, unknown and publishable keys.
    let (s, e, _) = app.call(Method::GET, "/v1/customers", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(e["error"]["type"], "authentication_error");
    let (s, _) = app.get("/v1/customers", "sk_live_nope").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = app.get("/v1/customers", &format!("{}x", m.sk)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, e) = app.get("/v1/customers", &m.pk).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{e}");

    // Health endpoints need no key.
    let (s, h, _) = app.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["status"], "ok");
    let (s, r, _) = app.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["hsm"], "up");
    assert_eq!(r["database"], "up");
    app.stop().await;
}
matrix!(reveal_needs_scope_and_keys_are_checked);

async fn idempotency_keys(backend: Backend, mode: CryptoMode) {
    let app = TestApp::spawn(backend, mode).await;
    let m = app.merchant(true).await;
    let send = |key: &'static str, body: serde_json::Value| {
        let app = &app;
        let sk = m.sk.clone();
        async move {
            let resp = app
                .client
                .post(format!("{}/v1/customers", app.base))
                .bearer_auth(sk)
                .header("Idempotency-Key", key)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = resp.status();
            let replayed = resp.headers().get("idempotent-replayed").is_some();
            assert_eq!(
                resp.headers()[reqwest::header::CONTENT_TYPE],
                "application/json"
            );
            let v: serde_json::Value = resp.json().await.unwrap();
            (status, v, replayed)
        }
    };
    let (s1, v1, r1) = send("k-1", json!({"email": "i@example.com"})).await;
    assert_eq!(s1, StatusCode::CREATED);
    assert!(!r1);
    let (s2, v2, r2) = send("k-1", json!({"email": "i@example.com"})).await;
    assert_eq!(s2, StatusCode::CREATED);
    assert!(r2, "second response is a replay");
    assert_eq!(v1, v2);
    let (_, list) = app.get("/v1/customers?email=i@example.com", &m.sk).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "created once");
    let (s3, v3, _) = send("k-1", json!({"email": "other@example.com"})).await;
    assert_eq!(s3, StatusCode::CONFLICT);
    assert_eq!(v3["error"]["type"], "idempotency_error");

    // A reveal replayed through the idempotency store is sealed at rest.
    let cus = v1["id"].as_str().unwrap();
    let card = app.card(&m.sk, cus, VISA).await;
    let card_id = card["id"].as_str().unwrap();
    for round in 0..2 {
        let resp = app
            .client
            .post(format!("{}/v1/cards/{card_id}/reveal", app.base))
            .bearer_auth(&m.sk)
            .header("Idempotency-Key", "reveal-1")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers()[reqwest::header::CONTENT_TYPE],
            "application/json"
        );
        assert_eq!(
            resp.headers().get("idempotent-replayed").is_some(),
            round == 1,
            "only the second reveal is a replay"
        );
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["number"], VISA);
        assert_eq!(v["object"], "card_reveal");
    }
    app.stop().await;
}
matrix!(idempotency_keys);

/// Records older than the retention are deleted by the maintenance run:
/// the key then starts afresh instead of conflicting forever.
async fn idempotency_records_expire(backend: Backend, mode: CryptoMode) {
    let app = TestApp::spawn_with(backend, mode, |cfg| {
        // Retention is never shorter than the lease: 2 s here.
        cfg.audit.idempotency_retention_days = 0;
        cfg.limits.idempotency_lease_secs = 2;
        cfg.keys.maintenance_interval_secs = 1;
    })
    .await;
    let m = app.merchant(false).await;
    let send = |email: &str| {
        app.call_with_headers(
            Method::POST,
            "/v1/customers",
            &m.sk,
            json!({ "email": email }),
            &[("Idempotency-Key", "expiring-1")],
        )
    };
    let started = std::time::Instant::now();
    let (s, first, _) = send("first@example.com").await;
    assert_eq!(s, StatusCode::CREATED, "{first}");
    let (s, e, _) = send("second@example.com").await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the machine stalled"
    );
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    let second = loop {
        let (s, v, headers) = send("second@example.com").await;
        if s == StatusCode::CREATED {
            assert!(headers.get("idempotent-replayed").is_none(), "{v}");
            break v;
        }
        assert_eq!(s, StatusCode::CONFLICT, "{v}");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the record never expired"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "swept before the retention"
    );
    assert_ne!(second["id"], first["id"]);
    assert_eq!(second["email"], "second@example.com");
    app.stop().await;
}
matrix!(idempotency_records_expire);

/// HTTP/2 and HTTP/1.1 are both offered by ALPN; TLS 1.2 and 1.3 work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_and_tls_versions() {
    let app = TestApp::spawn(Backend::Sqlite, CryptoMode::Envelope).await;
    let r = app
        .client
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.version(),
        reqwest::Version::HTTP_2,
        "h2 negotiated by ALPN"
    );
    let cert = std::fs::read(app.data.path().join("tls/cert.pem")).unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", app.base.rsplit(':').next().unwrap())
        .parse()
        .unwrap();
    for (tls12, h1) in [(true, true), (false, true), (true, false)] {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&cert).unwrap())
            .resolve("localhost", addr);
        if tls12 {
            b = b.max_tls_version(reqwest::tls::Version::TLS_1_2);
        } else {
            b = b.min_tls_version(reqwest::tls::Version::TLS_1_3);
        }
        if h1 {
            b = b.http1_only();
        }
        let r = b
            .build()
            .unwrap()
            .get(format!("{}/healthz", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        if h1 {
            assert_eq!(r.version(), reqwest::Version::HTTP_11);
        }
    }
    app.stop().await;
}

async fn metric(app: &TestApp, name: &str) -> u64 {
    metric_f64(app, name).await as u64
}

async fn metric_f64(app: &TestApp, name: &str) -> f64 {
    let text = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
        .parse()
        .unwrap()
}

/// `/metrics` (loopback only) shows that envelope mode serves adds and
/// reveals without a single HSM call once keys are cached, that hsm mode
/// makes one per seal/open, and that concurrent writes share commits.
async fn metrics_count_hsm_operations_and_group_commits(backend: Backend, mode: CryptoMode) {
    let app = TestApp::spawn(backend, mode).await;
    let m = app.merchant(true).await;
    let cus = app.customer(&m.sk, "metrics@example.com").await;
    // Warm the key caches (first use loads or creates the keys).
    let first = app.card(&m.sk, &cus, "4242424242424242").await;
    let (s, _) = app
        .post(
            &format!("/v1/cards/{}/reveal", first["id"].as_str().unwrap()),
            &m.sk,
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);

    let hsm_before = metric(&app, "cardvault_hsm_operations_total").await;
    let units_before = metric(&app, "cardvault_db_write_units_total").await;
    let batches_before = metric(&app, "cardvault_db_write_batches_total").await;
    let commit_s = r#"cardvault_db_write_seconds_total{phase="commit"}"#;
    let commit_before = metric_f64(&app, commit_s).await;
    let work = (0..20u64).map(|i| {
        let (app, m, cus) = (&app, &m, &cus);
        async move {
            let card = app
                .card(
                    &m.sk,
                    cus,
                    &cardvault::testkit::luhn_pan("4000", 5_000_000 + i),
                )
                .await;
            let (s, v) = app
                .post(
                    &format!("/v1/cards/{}/reveal", card["id"].as_str().unwrap()),
                    &m.sk,
                    json!({}),
                )
                .await;
            assert_eq!(s, StatusCode::OK, "{v}");
        }
    });
    futures_util::future::join_all(work).await;
    let hsm = metric(&app, "cardvault_hsm_operations_total").await - hsm_before;
    let units = metric(&app, "cardvault_db_write_units_total").await - units_before;
    let batches = metric(&app, "cardvault_db_write_batches_total").await - batches_before;
    match mode {
        CryptoMode::Envelope => assert_eq!(hsm, 0, "envelope mode called the HSM"),
        CryptoMode::Hsm => assert!(hsm >= 40, "hsm mode made only {hsm} HSM calls"),
    }
    // 20 card inserts and 20 reveal audit appends.
    assert!(units >= 40, "{units} write units");
    assert!(
        batches >= 1 && batches <= units,
        "{batches} batches for {units} units"
    );
    // Every commit syncs to disk: the writer's commit time grew.
    assert!(metric_f64(&app, commit_s).await > commit_before);
    assert!(metric(&app, "cardvault_http_requests_total").await > 40);
}
matrix!(metrics_count_hsm_operations_and_group_commits);
