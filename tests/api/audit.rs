//! Issue 6 acceptance 1 and 2: the audit trail is tamper-evident (an edit,
//! deletion, insertion or reordering of one row, done in SQL with the
//! append-only triggers dropped, is detected and named by `audit verify`),
//! and a scripted session leaves every required event type in it without
//! any PAN, CVV, secret or key.

use cardvault::crypto::CryptoMode;
use cardvault::report::pan_scan::contains_pan;
use cardvault::service::Tamper;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::matrix;
use crate::support::{Backend, TestApp, AMEX, MASTERCARD, VISA};

/// Runs SQL statements against the test's database directly.
pub async fn exec_sql(app: &TestApp, statements: &[&str]) {
    match app.backend {
        Backend::Sqlite => {
            use sqlx::Connection;
            let mut c = sqlx::SqliteConnection::connect(&app.db.url).await.unwrap();
            for s in statements {
                sqlx::query(s)
                    .execute(&mut c)
                    .await
                    .unwrap_or_else(|e| panic!("{s}: {e}"));
            }
        }
        Backend::Postgres => {
            use sqlx::Connection;
            let mut c = sqlx::PgConnection::connect(&app.db.url).await.unwrap();
            for s in statements {
                sqlx::query(s)
                    .execute(&mut c)
                    .await
                    .unwrap_or_else(|e| panic!("{s}: {e}"));
            }
        }
    }
}

fn drop_triggers(backend: Backend) -> &'static [&'static str] {
    match backend {
        Backend::Sqlite => &[
            "DROP TRIGGER audit_log_no_update",
            "DROP TRIGGER audit_log_no_delete",
        ],
        Backend::Postgres => &["DROP TRIGGER audit_log_no_change ON audit_log"],
    }
}

/// Some API activity: every request below leaves at least one audit entry.
async fn activity(app: &TestApp) {
    let m = app.merchant(true).await;
    for (i, pan) in [VISA, MASTERCARD, AMEX].iter().enumerate() {
        let cus = app.customer(&m.sk, &format!("c{i}@example.com")).await;
        let card = app.card(&m.sk, &cus, pan).await;
        let id = card["id"].as_str().unwrap();
        let (s, _) = app
            .post(&format!("/v1/cards/{id}/reveal"), &m.sk, json!({}))
            .await;
        assert_eq!(s, StatusCode::OK);
    }
}

async fn chain_seqs(app: &TestApp) -> Vec<i64> {
    app.storage()
        .chain_rows(0, 10_000)
        .await
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect()
}

/// One tamper scenario: a fresh vault with activity and a checkpoint,
/// the SQL applied, then `verify` must name `expect_seq` as `expect`.
async fn tamper_case(
    backend: Backend,
    name: &str,
    sql: impl Fn(i64, i64) -> Vec<String>,
    expect: Tamper,
    pick: usize,
) {
    let app = TestApp::spawn(backend, CryptoMode::Envelope).await;
    activity(&app).await;
    app.vault.checkpoint().await.unwrap();
    let clean = app.vault.verify_audit("test").await.unwrap();
    assert!(
        clean.ok(),
        "{name}: clean log reported tampered: {:?}",
        clean.findings
    );
    activity(&app).await;
    let seqs = chain_seqs(&app).await;
    assert!(
        seqs.len() > 12,
        "{name}: not enough entries: {}",
        seqs.len()
    );
    let target = seqs[pick.min(seqs.len() - 2)];
    let next = seqs[seqs.iter().position(|s| *s == target).unwrap() + 1];
    exec_sql(&app, drop_triggers(backend)).await;
    let stmts = sql(target, next);
    exec_sql(&app, &stmts.iter().map(String::as_str).collect::<Vec<_>>()).await;
    if backend == Backend::Postgres {
        // As a forger would: keep the sequence ahead of the rows moved up.
        exec_sql(
            &app,
            &["SELECT setval('audit_log_seq_seq', (SELECT max(seq) FROM audit_log))"],
        )
        .await;
    }
    let v = app.vault.verify_audit("test").await.unwrap();
    let first = v
        .findings
        .first()
        .unwrap_or_else(|| panic!("{name}: tampering not detected"));
    assert_eq!(first.kind, expect, "{name}: {:?}", v.findings);
    let named = match expect {
        Tamper::Deleted => next,
        Tamper::Inserted => target + 1,
        _ => target,
    };
    assert_eq!(first.seq, named, "{name}: {:?}", v.findings);
    assert!(
        first.message.contains(&format!("seq {named}")),
        "{name}: {}",
        first.message
    );
    // The verification run is itself audited, as a failure.
    let rows = app.storage().list_audit(0, 100_000).await.unwrap();
    let last = rows.last().unwrap();
    assert_eq!(
        (last.entry.event.as_str(), last.entry.outcome.as_str()),
        ("audit.verify", "failure")
    );
    app.stop().await;
}

/// Every column of `audit_log` after `seq`, in table order.
const AUDIT_COLUMNS: &str = "at, actor, merchant_id, event, resource, outcome, origin, \
    request_id, detail, prev_hash, hash, mac, mac_key_id";

/// Makes room after seq `t`, then inserts there the row `select` (columns
/// in [`AUDIT_COLUMNS`] order) makes of entry `t`.
fn insert_after(t: i64, select: &str) -> Vec<String> {
    vec![
        format!("UPDATE audit_log SET seq = -seq WHERE seq > {t}"),
        format!("UPDATE audit_log SET seq = 1 - seq WHERE seq < 0"),
        format!(
            "INSERT INTO audit_log (seq, {AUDIT_COLUMNS}) \
             SELECT {n}, {select} FROM audit_log WHERE seq = {t}",
            n = t + 1
        ),
    ]
}

async fn tampering_is_detected_and_named(backend: Backend) {
    tamper_case(
        backend,
        "edit",
        |t, _| {
            vec![format!(
                "UPDATE audit_log SET outcome = 'denied' WHERE seq = {t}"
            )]
        },
        Tamper::Edited,
        8,
    )
    .await;
    tamper_case(
        backend,
        "delete",
        |t, _| vec![format!("DELETE FROM audit_log WHERE seq = {t}")],
        Tamper::Deleted,
        8,
    )
    .await;
    tamper_case(
        backend,
        "insert",
        |t, _| {
            // A forged entry (copying the chain fields of its predecessor:
            // without the audit key no MAC can be made).
            insert_after(
                t,
                "at, 'operator', merchant_id, 'card.delete', resource, 'success', origin, \
                 request_id, NULL, hash, mac, mac, mac_key_id",
            )
        },
        Tamper::Inserted,
        8,
    )
    .await;
    tamper_case(
        backend,
        "replay",
        |t, _| {
            // Entry `t` copied whole: its MAC verifies, only its hash
            // repeats an earlier one.
            insert_after(t, AUDIT_COLUMNS)
        },
        Tamper::Inserted,
        8,
    )
    .await;
    tamper_case(
        backend,
        "reorder",
        |t, n| {
            vec![
                format!("UPDATE audit_log SET seq = -1 WHERE seq = {t}"),
                format!("UPDATE audit_log SET seq = {t} WHERE seq = {n}"),
                format!("UPDATE audit_log SET seq = {n} WHERE seq = -1"),
            ]
        },
        Tamper::Reordered,
        8,
    )
    .await;
}

mod tamper_sqlite {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::tampering_is_detected_and_named(super::Backend::Sqlite).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::tampering_is_detected_and_named(super::Backend::Postgres).await
    }
}

/// Chained entries up to `seq`, counted from the whole log.
async fn chained_upto(app: &TestApp, seq: i64) -> i64 {
    app.storage()
        .chain_rows(0, 10_000)
        .await
        .unwrap()
        .iter()
        .filter(|r| r.hash.is_some() && r.seq <= seq)
        .count() as i64
}

/// A checkpoint counts on from the newest checkpoint's count, and each
/// count equals the whole log's; a count altered in the database (its
/// signature no longer verifies) is not carried into the next checkpoint.
async fn checkpoints_count_on_from_a_verified_count(backend: Backend) {
    let app = TestApp::spawn(backend, CryptoMode::Envelope).await;
    for _ in 0..2 {
        activity(&app).await;
        app.vault.checkpoint().await.unwrap().unwrap();
    }
    // Ours, and any the vault made on its own (one at start).
    let cps = app.storage().list_checkpoints().await.unwrap();
    assert!(cps.len() >= 2, "{cps:?}");
    for c in &cps {
        assert_eq!(c.entries, chained_upto(&app, c.head_seq).await, "{c:?}");
    }
    let altered_seq = cps.last().unwrap().head_seq;
    let altered = match backend {
        Backend::Sqlite => "DROP TRIGGER audit_checkpoints_no_update",
        Backend::Postgres => "DROP TRIGGER audit_checkpoints_no_change ON audit_checkpoints",
    };
    exec_sql(
        &app,
        &[
            altered,
            "UPDATE audit_checkpoints SET entries = entries + 7 \
             WHERE seq = (SELECT max(seq) FROM audit_checkpoints)",
        ],
    )
    .await;
    activity(&app).await;
    let head = app.vault.checkpoint().await.unwrap().unwrap();
    let cps = app.storage().list_checkpoints().await.unwrap();
    let newest = cps.last().unwrap();
    assert_eq!(newest.head_seq, head);
    assert_eq!(
        newest.entries,
        chained_upto(&app, newest.head_seq).await,
        "the altered count was carried forward: {newest:?}"
    );
    // Only the altered checkpoint is reported.
    let v = app.vault.verify_audit("test").await.unwrap();
    let kinds: Vec<_> = v.findings.iter().map(|f| (f.kind, f.seq)).collect();
    assert_eq!(kinds, vec![(Tamper::ForgedCheckpoint, altered_seq)]);
    app.stop().await;
}

mod checkpoint_counts {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::checkpoints_count_on_from_a_verified_count(super::Backend::Sqlite).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::checkpoints_count_on_from_a_verified_count(super::Backend::Postgres).await
    }
}

/// Cutting the tail (entries after the last checkpoint's head included) is
/// caught by the HSM-signed checkpoint.
async fn truncated_tail_is_detected(backend: Backend, mode: CryptoMode) {
    let app = TestApp::spawn(backend, mode).await;
    activity(&app).await;
    let head = app.vault.checkpoint().await.unwrap().unwrap();
    exec_sql(&app, drop_triggers(backend)).await;
    exec_sql(
        &app,
        &[&format!("DELETE FROM audit_log WHERE seq >= {head}")],
    )
    .await;
    let v = app.vault.verify_audit("test").await.unwrap();
    let first = v.findings.first().expect("truncation not detected");
    assert_eq!(
        (first.kind, first.seq),
        (Tamper::Deleted, head),
        "{:?}",
        v.findings
    );
    app.stop().await;
}
matrix!(truncated_tail_is_detected);

/// Every event type of issue 6 appears after a scripted session, and no
/// entry holds a PAN, a secret key or key material.
pub async fn scripted_session(app: &mut TestApp) -> Vec<String> {
    let m = app.merchant(true).await;
    let plain = app.merchant(false).await;
    let cus = app.customer(&m.sk, "ana@example.com").await;
    let card = app.card(&m.sk, &cus, VISA).await;
    let card_id = card["id"].as_str().unwrap().to_string();
    let card2 = app.card(&m.sk, &cus, MASTERCARD).await;
    let (s, _) = app
        .post(&format!("/v1/cards/{card_id}/reveal"), &m.sk, json!({}))
        .await;
    assert_eq!(s, StatusCode::OK);
    // A one-time CVV token used by a charge.
    let (s, tok) = app
        .post("/v1/tokens", &m.pk, json!({"card": card_id, "cvc": "123"}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{tok}");
    let (s, ch) = app
        .post(
            "/v1/charges",
            &m.sk,
            json!({"amount": 1500, "currency": "BRL", "customer": cus, "card": card_id, "token": tok["id"]}),
        )
        .await;
    assert!(s.is_success(), "{ch}");
    // Failed authentication: a wrong key and a missing one.
    let (s, _) = app.get("/v1/customers", "sk_live_not_a_key").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = app.call(Method::GET, "/v1/customers", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Scope denials: a publishable key on a secret route, a reveal without
    // the scope.
    let (s, _) = app.get("/v1/customers", &m.pk).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let pcus = app.customer(&plain.sk, "bo@example.com").await;
    let pcard = app.card(&plain.sk, &pcus, AMEX).await;
    let (s, _) = app
        .post(
            &format!("/v1/cards/{}/reveal", pcard["id"].as_str().unwrap()),
            &plain.sk,
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = app
        .delete(
            &format!(
                "/v1/customers/{cus}/cards/{}",
                card2["id"].as_str().unwrap()
            ),
            &m.sk,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "card delete");
    let (s, _) = app
        .delete(&format!("/v1/customers/{pcus}"), &plain.sk)
        .await;
    assert_eq!(s, StatusCode::OK, "customer delete");
    // Operator actions: key rotation, retirement, an API key revoked, a
    // verification run.
    let operator = app.operator_vault().await;
    let np = cardvault::service::keys::NoProgress;
    operator.rotate_data_keys(None, "operator").await.unwrap();
    operator
        .rotate_wrapping_key(None, "operator", &np, std::time::Duration::from_millis(100))
        .await
        .unwrap();
    let keys = app.storage().list_api_keys().await.unwrap();
    let pk_id = keys
        .iter()
        .find(|k| k.merchant_id == plain.id && k.kind.as_str() == "publishable")
        .unwrap()
        .id
        .clone();
    operator.revoke_api_key(&pk_id, "operator").await.unwrap();
    let v = operator.verify_audit("operator").await.unwrap();
    assert!(v.ok(), "{:?}", v.findings);
    app.shutdown().await;
    vec![m.sk, m.pk, plain.sk, plain.pk]
}

async fn every_event_type_is_recorded_without_secrets(backend: Backend, mode: CryptoMode) {
    let mut app = TestApp::spawn(backend, mode).await;
    let secrets = scripted_session(&mut app).await;
    let coverage = app.vault.event_coverage().await.unwrap();
    let missing: Vec<_> = coverage
        .iter()
        .filter(|(_, ok, _)| !ok)
        .map(|(n, _, _)| n.clone())
        .collect();
    assert!(
        missing.is_empty(),
        "event types never recorded: {missing:?}"
    );
    let rows = app.storage().chain_rows(0, 100_000).await.unwrap();
    for r in &rows {
        let e = &r.entry;
        let fields = [
            Some(&e.actor),
            e.merchant_id.as_ref(),
            Some(&e.event),
            e.resource.as_ref(),
            Some(&e.outcome),
            e.origin.as_ref(),
            e.request_id.as_ref(),
            e.detail.as_ref(),
        ];
        for f in fields.into_iter().flatten() {
            assert!(
                !contains_pan(f.as_bytes()),
                "entry {} holds a PAN-like value: {f}",
                r.seq
            );
            for s in &secrets {
                assert!(
                    !f.contains(s.as_str()),
                    "entry {} holds a secret key",
                    r.seq
                );
            }
            assert!(
                !f.contains("sk_live_not_a_key"),
                "entry {} echoes a presented key",
                r.seq
            );
            // No key material: nothing long and hex/base64-like.
            assert!(
                !f.split(|c: char| !c.is_ascii_alphanumeric())
                    .any(|w| w.len() >= 40 && w.chars().all(|c| c.is_ascii_hexdigit())),
                "entry {} holds something like key bytes: {f}",
                r.seq
            );
        }
    }
    // The shutdown was recorded and checkpointed; the chain verifies.
    assert_eq!(rows.last().unwrap().entry.event, "service.stop");
    let v = app.vault.verify_audit("test").await.unwrap();
    assert!(v.ok(), "{:?}", v.findings);
}
matrix!(every_event_type_is_recorded_without_secrets);

/// A vault whose audit trail cannot be written refuses the action.
async fn audit_failure_refuses_the_action(backend: Backend, mode: CryptoMode) {
    let app = TestApp::spawn(backend, mode).await;
    let m = app.merchant(true).await;
    let cus = app.customer(&m.sk, "ana@example.com").await;
    let card = app.card(&m.sk, &cus, VISA).await;
    let id = card["id"].as_str().unwrap();
    // Make every append fail (the table is gone).
    exec_sql(&app, &["ALTER TABLE audit_log RENAME TO audit_log_moved"]).await;
    let (s, v) = app
        .post(&format!("/v1/cards/{id}/reveal"), &m.sk, json!({}))
        .await;
    assert!(
        s.is_server_error(),
        "reveal without audit answered {s}: {v}"
    );
    assert!(v.get("number").is_none());
    let (s, _) = app
        .post("/v1/customers", &m.sk, json!({"email": "x@example.com"}))
        .await;
    assert!(
        s.is_server_error(),
        "customer create without audit answered {s}"
    );
    exec_sql(&app, &["ALTER TABLE audit_log_moved RENAME TO audit_log"]).await;
    app.stop().await;
}
matrix!(audit_failure_refuses_the_action);
