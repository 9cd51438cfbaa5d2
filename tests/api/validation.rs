//! Bad input (acceptance 4): a 4xx whose `param` names the field, the full
//! error shape with a matching `Request-Id` header, and no change to the
//! stored data.

use cardvault::crypto::CryptoMode;
use cardvault::domain::new_id;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::isolation::{assert_error_shape, count_rows, raw};
use crate::matrix;
use crate::support::*;

enum Body {
    None,
    Json(Value),
    Raw(&'static str, Vec<u8>),
}

struct Checker<'a> {
    app: &'a TestApp,
    sk: &'a str,
    cus: &'a str,
    card: &'a str,
    baseline: Value,
}

/// What the merchant can see plus raw row counts.
async fn state(app: &TestApp, sk: &str, cus: &str, card: &str) -> Value {
    let mut out = serde_json::Map::new();
    for path in [
        "/v1/customers?limit=100".to_string(),
        format!("/v1/customers/{cus}"),
        format!("/v1/customers/{cus}/cards"),
        format!("/v1/customers/{cus}/cards/{card}"),
    ] {
        let (s, v) = app.get(&path, sk).await;
        assert_eq!(s, StatusCode::OK, "GET {path}: {v}");
        out.insert(path, v);
    }
    out.insert(
        "rows.customers".into(),
        json!(count_rows(app, "customers").await),
    );
    out.insert("rows.cards".into(), json!(count_rows(app, "cards").await));
    Value::Object(out)
}

impl Checker<'_> {
    /// Sends the request and checks status, error shape, `param` and
    /// optionally `code`; then that nothing changed. Returns the body text.
    async fn check(
        &self,
        method: Method,
        path: &str,
        body: Body,
        status: StatusCode,
        param: Option<&str>,
        code: Option<&str>,
    ) -> String {
        let what = format!("{method} {path}");
        let (headers, bytes): (Vec<(&str, &str)>, Option<Vec<u8>>) = match body {
            Body::None => (vec![], None),
            Body::Json(v) => (
                vec![("content-type", "application/json")],
                Some(v.to_string().into_bytes()),
            ),
            Body::Raw(ct, b) => (
                if ct.is_empty() {
                    vec![]
                } else {
                    vec![("content-type", ct)]
                },
                Some(b),
            ),
        };
        let (s, text, h) = raw(
            self.app,
            method.clone(),
            path,
            Some(self.sk),
            &headers,
            bytes,
        )
        .await
        .unwrap_or_else(|e| panic!("{what}: expected an HTTP answer, got {e}"));
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        assert_eq!(s, status, "{what}: {text}");
        assert_error_shape(s, &v, &h, &what);
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{what}: param: {text}");
        }
        if let Some(c) = code {
            assert_eq!(v["error"]["code"], c, "{what}: code: {text}");
        }
        let now = state(self.app, self.sk, self.cus, self.card).await;
        assert_eq!(
            now, self.baseline,
            "{what}: a refused request changed stored data"
        );
        text
    }

    async fn card(&self, body: Value, param: &str, code: Option<&str>) -> String {
        let path = format!("/v1/customers/{}/cards", self.cus);
        self.check(
            Method::POST,
            &path,
            Body::Json(body),
            StatusCode::BAD_REQUEST,
            Some(param),
            code,
        )
        .await
    }

    async fn patch_card(&self, body: Value, param: &str) {
        let path = format!("/v1/customers/{}/cards/{}", self.cus, self.card);
        self.check(
            Method::PATCH,
            &path,
            Body::Json(body),
            StatusCode::BAD_REQUEST,
            Some(param),
            None,
        )
        .await;
    }

    async fn customer(&self, body: Value, param: &str, code: Option<&str>) {
        self.check(
            Method::POST,
            "/v1/customers",
            Body::Json(body),
            StatusCode::BAD_REQUEST,
            Some(param),
            code,
        )
        .await;
    }

    async fn not_found(&self, method: Method, path: &str, body: Body) {
        self.check(method, path, body, StatusCode::NOT_FOUND, None, None)
            .await;
    }

    async fn list(&self, query: &str, param: &str) {
        self.check(
            Method::GET,
            &format!("/v1/customers?{query}"),
            Body::None,
            StatusCode::BAD_REQUEST,
            Some(param),
            None,
        )
        .await;
    }
}

fn card_body(number: Value) -> Value {
    json!({"number": number, "exp_month": 12, "exp_year": 2031, "holder_name": "Ana Silva"})
}

async fn setup(backend: Backend, mode: CryptoMode) -> (TestApp, Merchant, String, String) {
    let app = TestApp::spawn(backend, mode).await;
    let m = app.merchant(true).await;
    let cus = app.customer(&m.sk, "valid@example.com").await;
    let card = app.card(&m.sk, &cus, VISA).await;
    let card = card["id"].as_str().expect("id").to_string();
    (app, m, cus, card)
}

impl<'a> Checker<'a> {
    async fn new(app: &'a TestApp, sk: &'a str, cus: &'a str, card: &'a str) -> Checker<'a> {
        let baseline = state(app, sk, cus, card).await;
        Checker {
            app,
            sk,
            cus,
            card,
            baseline,
        }
    }
}

async fn bad_input_is_refused(backend: Backend, mode: CryptoMode) {
    let (app, m, cus, card) = setup(backend, mode).await;
    let c = Checker::new(&app, &m.sk, &cus, &card).await;
    let today = time::OffsetDateTime::now_utc();
    let year = i64::from(today.year());
    let month = i64::from(u8::from(today.month()));

    // Card numbers: Luhn, the 12-19 digit rule, letters.
    c.card(
        card_body(json!("4111111111111112")),
        "number",
        Some("incorrect_number"),
    )
    .await;
    c.card(card_body(json!("41111111111")), "number", None)
        .await;
    c.card(card_body(json!("41111111111111111110")), "number", None)
        .await;
    c.card(
        card_body(json!("4111111111111111111111111")),
        "number",
        None,
    )
    .await;
    c.card(card_body(json!("4111a11111111111")), "number", None)
        .await;
    c.card(card_body(json!("4111-1111-1111-111x")), "number", None)
        .await;
    c.card(card_body(json!("")), "number", None).await;

    // Expiry.
    c.card(
        json!({"number": MASTERCARD, "exp_month": 12, "exp_year": year - 1}),
        "exp_year",
        None,
    )
    .await;
    if month > 1 {
        let path = format!("/v1/customers/{cus}/cards");
        let text = c
            .check(
                Method::POST,
                &path,
                Body::Json(json!({"number": MASTERCARD, "exp_month": month - 1, "exp_year": year})),
                StatusCode::BAD_REQUEST,
                None,
                None,
            )
            .await;
        let v: Value = serde_json::from_str(&text).expect("json");
        assert!(
            v["error"]["param"] == "exp_month" || v["error"]["param"] == "exp_year",
            "a past month of this year must name the expiry: {text}"
        );
    }
    c.card(
        json!({"number": MASTERCARD, "exp_month": 13, "exp_year": 2031}),
        "exp_month",
        None,
    )
    .await;
    c.card(
        json!({"number": MASTERCARD, "exp_month": 0, "exp_year": 2031}),
        "exp_month",
        None,
    )
    .await;
    c.card(
        json!({"number": MASTERCARD, "exp_month": -1, "exp_year": 2031}),
        "exp_month",
        None,
    )
    .await;

    // Missing fields.
    c.card(
        json!({"exp_month": 12, "exp_year": 2031}),
        "number",
        Some("parameter_missing"),
    )
    .await;
    c.card(
        json!({"number": MASTERCARD, "exp_year": 2031}),
        "exp_month",
        Some("parameter_missing"),
    )
    .await;
    c.card(
        json!({"number": MASTERCARD, "exp_month": 12}),
        "exp_year",
        Some("parameter_missing"),
    )
    .await;

    // Wrong types. A number sent as a JSON number is not echoed anywhere.
    let text = c
        .card(
            json!({"number": 5105105105105100u64, "exp_month": 12, "exp_year": 2031}),
            "number",
            Some("invalid_type"),
        )
        .await;
    assert!(
        !text.contains("5105105105105100"),
        "the number was echoed: {text}"
    );
    assert!(
        !text.contains("510510"),
        "part of the number was echoed: {text}"
    );
    c.card(
        json!({"number": MASTERCARD, "exp_month": "12", "exp_year": 2031}),
        "exp_month",
        Some("invalid_type"),
    )
    .await;
    c.card(
        json!({"number": MASTERCARD, "exp_month": 12, "exp_year": "2031"}),
        "exp_year",
        Some("invalid_type"),
    )
    .await;
    c.card(
        json!({"number": MASTERCARD, "exp_month": 12.5, "exp_year": 2031}),
        "exp_month",
        None,
    )
    .await;
    c.card(
        json!({"number": MASTERCARD, "exp_month": 12, "exp_year": 2031, "holder_name": 7}),
        "holder_name",
        None,
    )
    .await;

    // Holder names with digits (a PAN typed in the wrong field).
    c.card(
        json!({"number": MASTERCARD, "exp_month": 12, "exp_year": 2031, "holder_name": "Ana 5555555555554444"}),
        "holder_name",
        None,
    )
    .await;
    c.card(
        json!({"number": MASTERCARD, "exp_month": 12, "exp_year": 2031, "holder_name": "R2D2"}),
        "holder_name",
        None,
    )
    .await;

    // Wrong or missing content type.
    let cards = format!("/v1/customers/{cus}/cards");
    let good = card_body(json!(MASTERCARD)).to_string().into_bytes();
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/jsonx",
        "",
    ] {
        c.check(
            Method::POST,
            &cards,
            Body::Raw(ct, good.clone()),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            None,
            None,
        )
        .await;
    }
    c.check(
        Method::PATCH,
        &format!("/v1/customers/{cus}"),
        Body::Raw("text/plain", br#"{"first_name": "Text"}"#.to_vec()),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        None,
        None,
    )
    .await;

    // A 2 MB body answers 413 (a response, not a reset), on several routes.
    let big = format!(
        r#"{{"number": "{}", "exp_month": 12, "exp_year": 2031}}"#,
        "4".repeat(2 * 1024 * 1024)
    )
    .into_bytes();
    for path in [
        cards.clone(),
        "/v1/customers".to_string(),
        format!("/v1/cards/{card}/reveal"),
    ] {
        c.check(
            Method::POST,
            &path,
            Body::Raw("application/json", big.clone()),
            StatusCode::PAYLOAD_TOO_LARGE,
            None,
            None,
        )
        .await;
    }
    {
        let (s, text, h) = raw(
            &app,
            Method::POST,
            &cards,
            Some(&m.sk),
            &[
                ("content-type", "application/json"),
                ("idempotency-key", "big-body-1"),
            ],
            Some(big.clone()),
        )
        .await
        .unwrap_or_else(|e| panic!("2 MB body with Idempotency-Key: expected 413, got {e}"));
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
        assert_error_shape(
            s,
            &serde_json::from_str(&text).unwrap_or(Value::Null),
            &h,
            "2 MB + idempotency",
        );
    }

    // Customers: email missing, malformed, 10,000 characters; nested fields.
    c.customer(
        json!({"first_name": "No Email"}),
        "email",
        Some("parameter_missing"),
    )
    .await;
    c.customer(json!({"email": ""}), "email", None).await;
    c.customer(json!({"email": "not-an-email"}), "email", None)
        .await;
    c.customer(json!({"email": "two@@example.com"}), "email", None)
        .await;
    c.customer(json!({"email": "spaces in@example.com"}), "email", None)
        .await;
    let long = format!("{}@example.com", "a".repeat(10_000 - "@example.com".len()));
    assert_eq!(long.chars().count(), 10_000);
    c.customer(json!({"email": long}), "email", None).await;
    c.customer(json!({"email": 42}), "email", Some("invalid_type"))
        .await;
    c.customer(
        json!({"email": "x@example.com", "billing_address": {"country": "BRA"}}),
        "billing_address.country",
        None,
    )
    .await;
    c.customer(
        json!({"email": "x@example.com", "document": {"type": "cpf"}}),
        "document.number",
        Some("parameter_missing"),
    )
    .await;
    c.check(
        Method::PATCH,
        &format!("/v1/customers/{cus}"),
        Body::Json(json!({"email": "not-an-email"})),
        StatusCode::BAD_REQUEST,
        Some("email"),
        None,
    )
    .await;
    c.check(
        Method::PATCH,
        &format!("/v1/customers/{cus}"),
        Body::Json(json!({"email": long})),
        StatusCode::BAD_REQUEST,
        Some("email"),
        None,
    )
    .await;

    // Card updates.
    c.patch_card(json!({"default": false}), "default").await;
    c.patch_card(json!({"holder_name": "Agent 007"}), "holder_name")
        .await;
    c.patch_card(json!({"exp_month": 13}), "exp_month").await;
    c.patch_card(json!({"exp_year": year - 1}), "exp_year")
        .await;
    c.patch_card(json!({"exp_month": "4"}), "exp_month").await;
    c.patch_card(json!({"alias": "card 4111111111111111"}), "alias")
        .await;

    // Unknown ids (well-formed) and malformed ids: 404.
    let nc = new_id("cus");
    let nk = new_id("card");
    c.not_found(Method::GET, &format!("/v1/customers/{nc}"), Body::None)
        .await;
    c.not_found(
        Method::PATCH,
        &format!("/v1/customers/{nc}"),
        Body::Json(json!({"first_name": "X"})),
    )
    .await;
    c.not_found(Method::DELETE, &format!("/v1/customers/{nc}"), Body::None)
        .await;
    c.not_found(
        Method::GET,
        &format!("/v1/customers/{nc}/cards"),
        Body::None,
    )
    .await;
    c.not_found(
        Method::POST,
        &format!("/v1/customers/{nc}/cards"),
        Body::Json(card_body(json!(MASTERCARD))),
    )
    .await;
    c.not_found(
        Method::GET,
        &format!("/v1/customers/{cus}/cards/{nk}"),
        Body::None,
    )
    .await;
    c.not_found(
        Method::PATCH,
        &format!("/v1/customers/{cus}/cards/{nk}"),
        Body::Json(json!({"alias": "x"})),
    )
    .await;
    c.not_found(
        Method::DELETE,
        &format!("/v1/customers/{cus}/cards/{nk}"),
        Body::None,
    )
    .await;
    c.not_found(
        Method::GET,
        &format!("/v1/customers/{nc}/cards/{card}"),
        Body::None,
    )
    .await;
    c.not_found(
        Method::DELETE,
        &format!("/v1/customers/{nc}/cards/{card}"),
        Body::None,
    )
    .await;
    c.not_found(Method::POST, &format!("/v1/cards/{nk}/reveal"), Body::None)
        .await;
    c.not_found(
        Method::GET,
        &format!("/v1/customers?starting_after={nc}"),
        Body::None,
    )
    .await;
    let too_long_id = format!("cus_{}", "a".repeat(65));
    for bad in [
        "nope",
        "cus_",
        "cus_a-b",
        too_long_id.as_str(),
        "cus_%00",
        "%20",
        "card_",
        "card_a%2Fb",
    ] {
        c.not_found(Method::GET, &format!("/v1/customers/{bad}"), Body::None)
            .await;
        c.not_found(
            Method::PATCH,
            &format!("/v1/customers/{bad}"),
            Body::Json(json!({"first_name": "X"})),
        )
        .await;
        c.not_found(Method::DELETE, &format!("/v1/customers/{bad}"), Body::None)
            .await;
        c.not_found(
            Method::GET,
            &format!("/v1/customers/{bad}/cards"),
            Body::None,
        )
        .await;
        c.not_found(
            Method::POST,
            &format!("/v1/customers/{bad}/cards"),
            Body::Json(card_body(json!(MASTERCARD))),
        )
        .await;
        c.not_found(
            Method::GET,
            &format!("/v1/customers/{cus}/cards/{bad}"),
            Body::None,
        )
        .await;
        c.not_found(
            Method::DELETE,
            &format!("/v1/customers/{cus}/cards/{bad}"),
            Body::None,
        )
        .await;
        c.not_found(Method::POST, &format!("/v1/cards/{bad}/reveal"), Body::None)
            .await;
    }
    // Ids of the wrong kind.
    c.not_found(Method::GET, &format!("/v1/customers/{card}"), Body::None)
        .await;
    c.not_found(
        Method::GET,
        &format!("/v1/customers/{card}/cards"),
        Body::None,
    )
    .await;
    c.not_found(
        Method::GET,
        &format!("/v1/customers/{cus}/cards/{cus}"),
        Body::None,
    )
    .await;
    c.not_found(
        Method::DELETE,
        &format!("/v1/customers/{card}/cards/{card}"),
        Body::None,
    )
    .await;
    c.not_found(Method::POST, &format!("/v1/cards/{cus}/reveal"), Body::None)
        .await;

    // Listing parameters.
    for q in [
        "limit=0",
        "limit=101",
        "limit=abc",
        "limit=-1",
        "limit=",
        "limit=1.5",
        "limit=99999999999999999999",
    ] {
        c.list(q, "limit").await;
    }
    c.list("sort=asc", "sort").await;
    c.list("limit=10&colour=red", "colour").await;

    // The boundaries of the 12-19 digit rule are accepted (after every
    // refusal above, which compared against the unchanged baseline).
    for number in ["500000000009", "4111111111111111003"] {
        let (s, v) = app.post(&cards, &m.sk, card_body(json!(number))).await;
        assert_eq!(s, StatusCode::CREATED, "{number}: {v}");
        assert_eq!(v["last4"], &number[number.len() - 4..]);
    }
    app.stop().await;
}
matrix!(bad_input_is_refused);

/// An unknown field is refused and `param` is exactly that field's name.
async fn unknown_fields_are_named(backend: Backend, mode: CryptoMode) {
    let (app, m, cus, card) = setup(backend, mode).await;
    let c = Checker::new(&app, &m.sk, &cus, &card).await;
    c.card(
        json!({"number": MASTERCARD, "exp_month": 12, "exp_year": 2031, "cvv_code": "123"}),
        "cvv_code",
        Some("parameter_unknown"),
    )
    .await;
    c.customer(
        json!({"email": "x@example.com", "nickname": "x"}),
        "nickname",
        Some("parameter_unknown"),
    )
    .await;
    c.customer(
        json!({"email": "x@example.com", "billing_address": {"line1": "Rua A", "planet": "Mars"}}),
        "billing_address.planet",
        Some("parameter_unknown"),
    )
    .await;
    c.check(
        Method::PATCH,
        &format!("/v1/customers/{cus}"),
        Body::Json(json!({"first_name": "Ana", "favourite_colour": "red"})),
        StatusCode::BAD_REQUEST,
        Some("favourite_colour"),
        Some("parameter_unknown"),
    )
    .await;
    c.patch_card(json!({"number": "5555555555554444"}), "number")
        .await;
    app.stop().await;
}
matrix!(unknown_fields_are_named);

/// Bodies that are not one JSON document are `invalid_json`, including a
/// valid document followed by anything but whitespace.
async fn invalid_json_is_refused(backend: Backend, mode: CryptoMode) {
    let (app, m, cus, card) = setup(backend, mode).await;
    let c = Checker::new(&app, &m.sk, &cus, &card).await;
    let cards = format!("/v1/customers/{cus}/cards");
    for bad in [
        &br#"{"number": "5555555555554444", "exp_month": 12,"#[..],
        b"{number: 5555555555554444}",
        b"",
        br#"{"number": "5555555555554444", "exp_month": 12, "exp_year": 2031} trailing"#,
        br#"{"number": "5555555555554444", "exp_month": 12, "exp_year": 2031}{"number": "1"}"#,
    ] {
        c.check(
            Method::POST,
            &cards,
            Body::Raw("application/json", bad.to_vec()),
            StatusCode::BAD_REQUEST,
            None,
            Some("invalid_json"),
        )
        .await;
    }
    c.check(
        Method::POST,
        "/v1/customers",
        Body::Raw(
            "application/json",
            br#"{"email": "garbage@example.com"} ]"#.to_vec(),
        ),
        StatusCode::BAD_REQUEST,
        None,
        Some("invalid_json"),
    )
    .await;
    app.stop().await;
}
matrix!(invalid_json_is_refused);
