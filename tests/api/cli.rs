//! The issue 6 commands through the real binary (dev mode, no config):
//! `keys rotate-kek|rotate-dek|reencrypt`, `merchant delete --shred`,
//! `audit checkpoint|verify|report`, and their exit codes.

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_cardvault");

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .current_dir(dir)
        .env_remove("CARDVAULT_CONFIG")
        .env_remove("SOFTHSM2_CONF")
        .env("CARDVAULT_LOG", "warn")
        .args(args)
        .output()
        .expect("run cardvault")
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    assert!(
        out.status.success(),
        "cardvault {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn operator_commands_work_and_verify_fails_on_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let created: serde_json::Value =
        serde_json::from_str(&ok(d, &["merchant", "create", "--name", "Acme", "--json"])).unwrap();
    let other: serde_json::Value =
        serde_json::from_str(&ok(d, &["merchant", "create", "--name", "Other", "--json"])).unwrap();
    let rotated = ok(d, &["keys", "rotate-kek"]);
    assert!(rotated.contains("cardvault-kek-v2"), "{rotated}");
    ok(d, &["keys", "rotate-dek"]);
    assert!(ok(d, &["keys", "reencrypt", "--batch", "10"]).contains("re-encrypted"));
    // Deleting without shredding is refused.
    let id = other["merchant_id"].as_str().unwrap();
    assert!(!run(d, &["merchant", "delete", id]).status.success());
    let shred = ok(d, &["merchant", "delete", "--shred", id]);
    assert!(shred.contains(id), "{shred}");
    ok(d, &["audit", "checkpoint"]);
    let verified = ok(d, &["audit", "verify"]);
    assert!(verified.contains("intact"), "{verified}");
    // The report is written even when checks fail (a fresh vault has not
    // seen every event type yet), and the exit code says so.
    let report = d.join("report.html");
    let out = run(
        d,
        &[
            "audit",
            "report",
            "--format",
            "html",
            "--out",
            report.to_str().unwrap(),
        ],
    );
    let html = std::fs::read_to_string(&report).expect("report written");
    assert!(html.contains("PCI DSS 3.5.1"));
    assert_eq!(
        out.status.success(),
        html.contains("<b>PASS</b>"),
        "exit code must match the verdict"
    );
    let json_out = d.join("report.json");
    let _ = run(
        d,
        &[
            "audit",
            "report",
            "--format",
            "json",
            "--out",
            json_out.to_str().unwrap(),
        ],
    );
    let parsed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_out).unwrap()).unwrap();
    assert_eq!(parsed["checks"].as_array().unwrap().len(), 10);
    let _ = created;

    // Tamper with one row (triggers dropped) and verify again.
    let db = format!("sqlite://{}", d.join("data/cardvault.db").display());
    let seq = tokio::runtime::Runtime::new().unwrap().block_on(async {
        use sqlx::Connection;
        let mut c = sqlx::SqliteConnection::connect(&db).await.unwrap();
        sqlx::query("DROP TRIGGER audit_log_no_update")
            .execute(&mut c)
            .await
            .unwrap();
        let seq: i64 = sqlx::query_scalar(
            "SELECT seq FROM audit_log WHERE event = 'merchant.create' ORDER BY seq LIMIT 1",
        )
        .fetch_one(&mut c)
        .await
        .unwrap();
        sqlx::query("UPDATE audit_log SET actor = 'someone-else' WHERE seq = ?")
            .bind(seq)
            .execute(&mut c)
            .await
            .unwrap();
        seq
    });
    let out = run(d, &["audit", "verify"]);
    assert!(
        !out.status.success(),
        "verify must exit non-zero on tampering"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("TAMPERED") && text.contains(&format!("seq {seq} was edited")),
        "{text}"
    );
}
