//! Issue 6 acceptance 5: the audit report passes every check on a clean
//! vault, and flags a plaintext PAN planted in a customer's metadata and a
//! KEK past its cryptoperiod.

use cardvault::crypto::CryptoMode;
use cardvault::report::Report;
use cardvault::storage::{CustomerUpdate, Metadata};

use crate::support::{Backend, TestApp};

fn failing(r: &Report) -> Vec<String> {
    r.checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| format!("{}: {}", c.id, c.finding))
        .collect()
}

/// Writes the report where `CARDVAULT_REPORT_DIR` says (to look at it).
fn keep(r: &Report, name: &str) {
    if let Ok(dir) = std::env::var("CARDVAULT_REPORT_DIR") {
        std::fs::write(format!("{dir}/{name}.html"), cardvault::report::html(r)).unwrap();
        std::fs::write(
            format!("{dir}/{name}.json"),
            serde_json::to_string_pretty(r).unwrap(),
        )
        .unwrap();
    }
}

async fn report_flags_planted_pan_and_old_kek(backend: Backend, mode: CryptoMode) {
    let mut app = TestApp::spawn(backend, mode).await;
    crate::audit::scripted_session(&mut app).await;
    let clean = cardvault::report::build(&app.vault, &app.cfg)
        .await
        .unwrap();
    keep(&clean, "clean");
    assert_eq!(failing(&clean), Vec::<String>::new(), "clean vault");
    assert_eq!(clean.summary.verdict, "PASS");
    let html = cardvault::report::html(&clean);
    assert!(html.contains("PASS") && html.contains("PCI DSS 3.5.1"));

    // A merchant stores a card number in a customer's metadata (what
    // `PATCH /v1/customers/{id}` with that metadata does), and the KEK
    // gets old.
    let mut found = None;
    for m in app.storage().list_merchants().await.unwrap() {
        let page = app
            .storage()
            .list_customers(&m.id, None, 1, None)
            .await
            .unwrap();
        if let Some(c) = page.data.into_iter().next() {
            found = Some((m, c));
        }
    }
    let (merchant, customer) = found.expect("a customer");
    let mut meta = Metadata::new();
    meta.insert(
        "note".to_string(),
        "card 4111 1111 1111 1111 exp 12/31".to_string(),
    );
    let update = CustomerUpdate {
        metadata: Some(meta),
        ..CustomerUpdate::default()
    };
    app.storage()
        .update_customer(&merchant.id, &customer.id, &update)
        .await
        .unwrap();
    crate::audit::exec_sql(
        &app,
        &["UPDATE hsm_keys SET created_at = created_at - 800 * 86400 WHERE kind = 'kek'"],
    )
    .await;
    let flagged = cardvault::report::build(&app.vault, &app.cfg)
        .await
        .unwrap();
    keep(&flagged, "flagged");
    assert_eq!(flagged.summary.verdict, "FAIL");
    let pan = flagged.checks.iter().find(|c| c.id == "pan_scan").unwrap();
    assert!(!pan.passed);
    assert!(
        pan.finding.contains("customers.metadata"),
        "{}",
        pan.finding
    );
    assert!(
        !pan.finding.contains("4111"),
        "the report must not repeat the PAN"
    );
    let kek = flagged
        .checks
        .iter()
        .find(|c| c.id == "wrapping_key_cryptoperiod")
        .unwrap();
    assert!(!kek.passed);
    assert!(kek.finding.contains("cardvault-kek-v2"), "{}", kek.finding);
    let others: Vec<_> = failing(&flagged)
        .into_iter()
        .filter(|f| !f.starts_with("pan_scan") && !f.starts_with("wrapping_key_cryptoperiod"))
        .collect();
    assert!(others.is_empty(), "{others:?}");
}
crate::matrix!(report_flags_planted_pan_and_old_kek);
