//! Tenant isolation (acceptance 3): merchant B using merchant A's ids gets
//! exactly the 404 a missing id gets, on every route, and changes nothing.
//!
//! Also home of small helpers the other black-box files share: raw requests,
//! error-shape checks and direct row counts.

use cardvault::crypto::CryptoMode;
use cardvault::domain::new_id;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::matrix;
use crate::support::*;

/// A request with full control over headers and body bytes. Returns the
/// status, the body as text and the headers.
pub(crate) async fn raw(
    app: &TestApp,
    method: Method,
    path: &str,
    key: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Result<(StatusCode, String, HeaderMap), reqwest::Error> {
    let mut req = app.client.request(method, format!("{}{}", app.base, path));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let resp = req.send().await?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await?;
    Ok((status, text, headers))
}

/// A JSON request with extra headers (e.g. `Idempotency-Key`).
pub(crate) async fn json_with(
    app: &TestApp,
    method: Method,
    path: &str,
    key: &str,
    headers: &[(&str, &str)],
    body: Value,
) -> (StatusCode, Value, HeaderMap) {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    let (s, text, h) = raw(
        app,
        method,
        path,
        Some(key),
        &all,
        Some(body.to_string().into_bytes()),
    )
    .await
    .expect("request");
    (s, serde_json::from_str(&text).unwrap_or(Value::Null), h)
}

/// Checks `{"error": {type, code, message, param, request_id}}` (and nothing
/// else), and that the `Request-Id` header equals `error.request_id`.
pub(crate) fn assert_error_shape(
    status: StatusCode,
    body: &Value,
    headers: &HeaderMap,
    what: &str,
) {
    assert!(
        status.is_client_error() || status.is_server_error(),
        "{what}: {status} is not an error: {body}"
    );
    let top = body
        .as_object()
        .unwrap_or_else(|| panic!("{what}: error body is not a JSON object: {body}"));
    assert_eq!(
        top.len(),
        1,
        "{what}: only `error` at the top level: {body}"
    );
    let err = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("{what}: no error object: {body}"));
    let mut keys: Vec<&str> = err.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["code", "message", "param", "request_id", "type"],
        "{what}: error fields: {body}"
    );
    for field in ["type", "code", "message", "request_id"] {
        assert!(
            err[field].as_str().is_some_and(|s| !s.is_empty()),
            "{what}: error.{field} must be a non-empty string: {body}"
        );
    }
    assert!(
        err["param"].is_null() || err["param"].is_string(),
        "{what}: error.param must be null or a string: {body}"
    );
    let rid = err["request_id"].as_str().unwrap_or_default();
    assert!(rid.starts_with("req_"), "{what}: request_id {rid}");
    let header = headers
        .get("request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("{what}: no Request-Id header"));
    assert_eq!(header, rid, "{what}: Request-Id header vs error.request_id");
}

/// The error body without its per-request id, for comparing two errors.
pub(crate) fn without_request_id(body: &Value) -> Value {
    let mut b = body.clone();
    if let Some(e) = b.get_mut("error").and_then(Value::as_object_mut) {
        e.remove("request_id");
    }
    b
}

/// `SELECT COUNT(*) FROM table`, read straight from the database.
pub(crate) async fn count_rows(app: &TestApp, table: &str) -> i64 {
    use sqlx::Connection;
    let sql = format!("SELECT COUNT(*) FROM {table}");
    match app.backend {
        Backend::Sqlite => {
            use sqlx::ConnectOptions;
            let opts: sqlx::sqlite::SqliteConnectOptions = app.db.url.parse().expect("sqlite url");
            let mut conn = opts
                .create_if_missing(false)
                .connect()
                .await
                .expect("sqlite connect");
            let n: i64 = sqlx::query_scalar(&sql)
                .fetch_one(&mut conn)
                .await
                .expect("count");
            conn.close().await.expect("close");
            n
        }
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(&app.db.url)
                .await
                .expect("pg connect");
            let n: i64 = sqlx::query_scalar(&sql)
                .fetch_one(&mut conn)
                .await
                .expect("count");
            conn.close().await.expect("close");
            n
        }
    }
}

struct Probe<'a> {
    app: &'a TestApp,
    key: &'a str,
}

impl Probe<'_> {
    async fn send(
        &self,
        method: &Method,
        path: &str,
        body: &Option<Value>,
        idem: Option<&str>,
    ) -> (StatusCode, Value, HeaderMap) {
        let mut headers = vec![];
        if let Some(k) = idem {
            headers.push(("idempotency-key", k));
        }
        let (bytes, ct) = match body {
            Some(b) => (Some(b.to_string().into_bytes()), true),
            None => (None, false),
        };
        if ct {
            headers.push(("content-type", "application/json"));
        }
        let (s, text, h) = raw(
            self.app,
            method.clone(),
            path,
            Some(self.key),
            &headers,
            bytes,
        )
        .await
        .expect("request");
        (s, serde_json::from_str(&text).unwrap_or(Value::Null), h)
    }

    /// `attack` (with another merchant's ids) must answer 404 with exactly
    /// the error `missing` (the same route with well-formed ids that exist
    /// nowhere) answers, apart from the request id.
    async fn same_as_missing(
        &self,
        method: Method,
        attack: &str,
        missing: &str,
        body: Option<Value>,
        idem: Option<(&str, &str)>,
    ) {
        let what = format!("{method} {attack}");
        let (s, got, h) = self.send(&method, attack, &body, idem.map(|i| i.0)).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{what}: {got}");
        assert_error_shape(s, &got, &h, &what);
        let (s2, reference, h2) = self.send(&method, missing, &body, idem.map(|i| i.1)).await;
        assert_eq!(s2, StatusCode::NOT_FOUND, "{method} {missing}: {reference}");
        assert_error_shape(s2, &reference, &h2, &format!("{method} {missing}"));
        assert_eq!(
            without_request_id(&got),
            without_request_id(&reference),
            "{what}: another merchant's id must look exactly like a missing one"
        );
        assert_eq!(got["error"]["type"], "invalid_request_error", "{what}");
        assert_eq!(got["error"]["code"], "resource_missing", "{what}");
    }
}

/// Everything merchant A can see of its own data, as the API shows it.
async fn view_of(app: &TestApp, sk: &str, cus: &str, cards: &[String]) -> Value {
    let mut out = serde_json::Map::new();
    for path in [
        format!("/v1/customers/{cus}"),
        format!("/v1/customers/{cus}/cards"),
        "/v1/customers?limit=100".to_string(),
    ]
    .into_iter()
    .chain(
        cards
            .iter()
            .map(|c| format!("/v1/customers/{cus}/cards/{c}")),
    ) {
        let (s, v) = app.get(&path, sk).await;
        assert_eq!(s, StatusCode::OK, "GET {path}: {v}");
        out.insert(path, v);
    }
    Value::Object(out)
}

async fn tenant_isolation(backend: Backend, mode: CryptoMode) {
    let app = TestApp::spawn(backend, mode).await;
    let a = app.merchant(true).await;
    let b = app.merchant(true).await;

    // Merchant A: a customer with two cards (the second one added with an
    // Idempotency-Key, revealed with another).
    let a_email = format!("{}@tenant-a.example.com", new_id("iso").to_lowercase());
    let a_cus = app.customer(&a.sk, &a_email).await;
    let (s, patched) = app
        .patch(
            &format!("/v1/customers/{a_cus}"),
            &a.sk,
            json!({"first_name": "Alice", "metadata": {"tier": "gold"}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{patched}");
    let card1 = app.card(&a.sk, &a_cus, VISA).await;
    let a_card1 = card1["id"].as_str().expect("id").to_string();
    let shared_idem = new_id("idem");
    let card2_body =
        json!({"number": MASTERCARD, "exp_month": 7, "exp_year": 2032, "holder_name": "Alice A"});
    let (s, card2, _) = json_with(
        &app,
        Method::POST,
        &format!("/v1/customers/{a_cus}/cards"),
        &a.sk,
        &[("idempotency-key", &shared_idem)],
        card2_body.clone(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{card2}");
    let a_card2 = card2["id"].as_str().expect("id").to_string();
    // A reveals each card under its own Idempotency-Key.
    let mut reveal_idems = Vec::new();
    for (card, number) in [(&a_card1, VISA), (&a_card2, MASTERCARD)] {
        let key = new_id("idem");
        let (s, rev, _) = json_with(
            &app,
            Method::POST,
            &format!("/v1/cards/{card}/reveal"),
            &a.sk,
            &[("idempotency-key", &key)],
            json!({}),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{rev}");
        assert_eq!(rev["number"], number);
        reveal_idems.push(key);
    }
    let a_cards = vec![a_card1.clone(), a_card2.clone()];

    // Merchant B: its own customer with one card.
    let b_cus = app.customer(&b.sk, "bob@tenant-b.example.com").await;
    let b_card = app.card(&b.sk, &b_cus, AMEX).await;
    let b_card = b_card["id"].as_str().expect("id").to_string();

    let a_before = view_of(&app, &a.sk, &a_cus, &a_cards).await;
    let b_before = view_of(&app, &b.sk, &b_cus, std::slice::from_ref(&b_card)).await;
    let cards_before = count_rows(&app, "cards").await;
    let customers_before = count_rows(&app, "customers").await;
    assert_eq!(cards_before, 3);
    assert_eq!(customers_before, 2);

    let missing_cus = new_id("cus");
    let missing_card = new_id("card");
    let p = Probe {
        app: &app,
        key: &b.sk,
    };
    let new_pan =
        json!({"number": ELO, "exp_month": 1, "exp_year": 2033, "holder_name": "Mallory"});

    // A's customer.
    p.same_as_missing(
        Method::GET,
        &format!("/v1/customers/{a_cus}"),
        &format!("/v1/customers/{missing_cus}"),
        None,
        None,
    )
    .await;
    p.same_as_missing(
        Method::PATCH,
        &format!("/v1/customers/{a_cus}"),
        &format!("/v1/customers/{missing_cus}"),
        Some(json!({"email": "mallory@evil.example.com", "first_name": "Mallory", "metadata": {"owned": "yes"}})),
        None,
    )
    .await;
    p.same_as_missing(
        Method::GET,
        &format!("/v1/customers/{a_cus}/cards"),
        &format!("/v1/customers/{missing_cus}/cards"),
        None,
        None,
    )
    .await;
    // Adding a new card to A's customer, plainly and replaying A's own
    // Idempotency-Key with A's exact request.
    p.same_as_missing(
        Method::POST,
        &format!("/v1/customers/{a_cus}/cards"),
        &format!("/v1/customers/{missing_cus}/cards"),
        Some(new_pan.clone()),
        None,
    )
    .await;
    p.same_as_missing(
        Method::POST,
        &format!("/v1/customers/{a_cus}/cards"),
        &format!("/v1/customers/{missing_cus}/cards"),
        Some(card2_body.clone()),
        Some((&shared_idem, &new_id("idem"))),
    )
    .await;

    // A's cards under A's customer.
    for (card, reveal_idem) in a_cards.iter().zip(&reveal_idems) {
        p.same_as_missing(
            Method::GET,
            &format!("/v1/customers/{a_cus}/cards/{card}"),
            &format!("/v1/customers/{missing_cus}/cards/{missing_card}"),
            None,
            None,
        )
        .await;
        p.same_as_missing(
            Method::PATCH,
            &format!("/v1/customers/{a_cus}/cards/{card}"),
            &format!("/v1/customers/{missing_cus}/cards/{missing_card}"),
            Some(json!({"alias": "mine now", "holder_name": "Mallory", "exp_month": 1, "exp_year": 2034, "default": true})),
            None,
        )
        .await;
        // Reveal, plainly and with the Idempotency-Key A used to reveal.
        p.same_as_missing(
            Method::POST,
            &format!("/v1/cards/{card}/reveal"),
            &format!("/v1/cards/{missing_card}/reveal"),
            None,
            None,
        )
        .await;
        p.same_as_missing(
            Method::POST,
            &format!("/v1/cards/{card}/reveal"),
            &format!("/v1/cards/{missing_card}/reveal"),
            Some(json!({})),
            Some((reveal_idem, &new_id("idem"))),
        )
        .await;
        // A's card under B's own customer.
        p.same_as_missing(
            Method::GET,
            &format!("/v1/customers/{b_cus}/cards/{card}"),
            &format!("/v1/customers/{b_cus}/cards/{missing_card}"),
            None,
            None,
        )
        .await;
        p.same_as_missing(
            Method::PATCH,
            &format!("/v1/customers/{b_cus}/cards/{card}"),
            &format!("/v1/customers/{b_cus}/cards/{missing_card}"),
            Some(json!({"alias": "stolen", "default": true})),
            None,
        )
        .await;
    }

    // Paging with A's customer as the cursor.
    p.same_as_missing(
        Method::GET,
        &format!("/v1/customers?starting_after={a_cus}"),
        &format!("/v1/customers?starting_after={missing_cus}"),
        None,
        None,
    )
    .await;
    p.same_as_missing(
        Method::GET,
        &format!("/v1/customers?limit=5&starting_after={a_cus}&email={b_cus}%40x.example.com"),
        &format!(
            "/v1/customers?limit=5&starting_after={missing_cus}&email={b_cus}%40x.example.com"
        ),
        None,
        None,
    )
    .await;

    // Searching for A's customer's email finds nothing.
    let (s, found) = app
        .get(
            &format!("/v1/customers?email={}", a_email.replace('@', "%40")),
            &b.sk,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{found}");
    assert_eq!(found["object"], "list");
    assert_eq!(
        found["data"],
        json!([]),
        "B's email search must not see A's customer"
    );
    assert_eq!(found["has_more"], json!(false));
    // ... while A finds it (the search works at all).
    let (s, found) = app
        .get(
            &format!("/v1/customers?email={}", a_email.replace('@', "%40")),
            &a.sk,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{found}");
    assert_eq!(found["data"][0]["id"], a_cus.as_str());

    // Deletes last, so a failing isolation above is not masked.
    for card in &a_cards {
        p.same_as_missing(
            Method::DELETE,
            &format!("/v1/customers/{b_cus}/cards/{card}"),
            &format!("/v1/customers/{b_cus}/cards/{missing_card}"),
            None,
            None,
        )
        .await;
        p.same_as_missing(
            Method::DELETE,
            &format!("/v1/customers/{a_cus}/cards/{card}"),
            &format!("/v1/customers/{missing_cus}/cards/{missing_card}"),
            None,
            None,
        )
        .await;
    }
    p.same_as_missing(
        Method::DELETE,
        &format!("/v1/customers/{a_cus}"),
        &format!("/v1/customers/{missing_cus}"),
        None,
        None,
    )
    .await;

    // Nothing changed, for A or for B.
    let a_after = view_of(&app, &a.sk, &a_cus, &a_cards).await;
    assert_eq!(a_after, a_before, "merchant A's data changed");
    let b_after = view_of(&app, &b.sk, &b_cus, std::slice::from_ref(&b_card)).await;
    assert_eq!(b_after, b_before, "merchant B's data changed");
    assert_eq!(
        a_after[format!("/v1/customers/{a_cus}/cards")]["data"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    assert_eq!(
        b_after[format!("/v1/customers/{b_cus}/cards")]["data"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    assert_eq!(count_rows(&app, "cards").await, cards_before, "card rows");
    assert_eq!(
        count_rows(&app, "customers").await,
        customers_before,
        "customer rows"
    );
    assert_eq!(
        app.storage()
            .list_cards(&a.id, &a_cus)
            .await
            .expect("list")
            .len(),
        2
    );
    assert_eq!(
        app.storage()
            .list_cards(&b.id, &b_cus)
            .await
            .expect("list")
            .len(),
        1
    );
    assert!(app
        .storage()
        .list_cards(&b.id, &a_cus)
        .await
        .expect("list")
        .is_empty());

    // A still reveals both cards with the right numbers.
    for (card, number) in [(&a_card1, VISA), (&a_card2, MASTERCARD)] {
        let (s, rev) = app
            .post(&format!("/v1/cards/{card}/reveal"), &a.sk, json!({}))
            .await;
        assert_eq!(s, StatusCode::OK, "{rev}");
        assert_eq!(rev["number"], number);
    }
    // B's failed attempts left no successful reveal of A's cards in the
    // audit log under B's name.
    let audit = app.storage().list_audit(0, 10_000).await.expect("audit");
    assert!(
        !audit
            .iter()
            .any(|r| r.entry.merchant_id.as_deref() == Some(b.id.as_str())
                && r.entry.outcome == "success"
                && r.entry
                    .resource
                    .as_deref()
                    .is_some_and(|res| a_cards.iter().any(|c| c == res))),
        "an audit entry shows B succeeding on A's card"
    );
    app.stop().await;
}
matrix!(tenant_isolation);
