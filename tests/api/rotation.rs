//! Issue 6 acceptance 3 and 4: KEK, merchant-key and data-key rotation plus
//! re-encryption run from a second (operator) vault while the API serves a
//! load of card writes and reads: no request fails, re-encryption killed
//! midway finishes when run again, and afterwards every card opens under
//! the newest keys. Then crypto-shredding: a backup taken before
//! `merchant delete --shred` cannot open that merchant's cards.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cardvault::crypto::{CryptoMode, KeyOwner, Keyring, KeyringConfig};
use cardvault::service::keys::{NoProgress, Progress};
use reqwest::StatusCode;
use serde_json::json;

use crate::support::{Backend, TestApp};

/// A Luhn-valid 16-digit test PAN from a number.
fn pan(n: u64) -> String {
    let body = format!("411111{:09}", n % 1_000_000_000);
    let digits: Vec<u32> = body.chars().map(|c| c.to_digit(10).unwrap()).collect();
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
    format!("{body}{}", (10 - sum % 10) % 10)
}

/// Signals after the first batch so the test can kill the run mid-way.
struct Tripwire(tokio::sync::Notify, AtomicU64);

impl Progress for Tripwire {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, n: u64) {
        self.1.fetch_add(n, Ordering::SeqCst);
        self.0.notify_one();
    }
    fn finish(&self) {}
}

async fn rotation_under_load(backend: Backend, mode: CryptoMode) {
    let app = Arc::new(
        TestApp::spawn_with(backend, mode, |cfg| {
            cfg.keys.maintenance_interval_secs = 1;
        })
        .await,
    );
    let m = app.merchant(true).await;
    let cus = app.customer(&m.sk, "load@example.com").await;
    let mut cards = Vec::new();
    for i in 0..40 {
        let c = app.card(&m.sk, &cus, &pan(i)).await;
        cards.push((c["id"].as_str().unwrap().to_string(), pan(i)));
    }
    // The load: card writes and reveals until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let written = Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
    let mut workers = Vec::new();
    for w in 0..3u64 {
        let (app, stop, failures, written, sk, cus) = (
            Arc::clone(&app),
            Arc::clone(&stop),
            Arc::clone(&failures),
            Arc::clone(&written),
            m.sk.clone(),
            cus.clone(),
        );
        let existing = cards.clone();
        workers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let number = pan(1_000 + w * 1_000_000 + i);
                let (s, v) = app
                    .post(
                        &format!("/v1/customers/{cus}/cards"),
                        &sk,
                        json!({"number": number, "exp_month": 12, "exp_year": 2031}),
                    )
                    .await;
                if s != StatusCode::CREATED {
                    failures.lock().unwrap().push(format!("create: {s} {v}"));
                } else {
                    written
                        .lock()
                        .unwrap()
                        .push((v["id"].as_str().unwrap().to_string(), number));
                }
                let (id, want) = &existing[(i as usize * 7 + w as usize) % existing.len()];
                let (s, v) = app
                    .post(&format!("/v1/cards/{id}/reveal"), &sk, json!({}))
                    .await;
                if s != StatusCode::OK || v["number"].as_str() != Some(want.as_str()) {
                    failures.lock().unwrap().push(format!("reveal: {s} {v}"));
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The operator, in another vault (as `cardvault keys …` would be).
    let op = app.operator_vault().await;
    let kek = op
        .rotate_wrapping_key(None, "operator", &NoProgress, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(kek.new_label.ends_with("-v2"), "{kek:?}");
    assert!(
        kek.rewrapped >= 1,
        "the audit key is wrapped by the KEK: {kek:?}"
    );
    assert_eq!(
        kek.destroyed,
        vec!["cardvault-kek-v1".to_string()],
        "{kek:?}"
    );
    let mks = op
        .rotate_all_merchant_keys("operator", &NoProgress, Duration::from_secs(1))
        .await
        .unwrap();
    if mode == CryptoMode::Envelope {
        assert!(mks.iter().any(|r| r.rewrapped >= 2), "{mks:?}");
    }
    let rotated = op.rotate_data_keys(None, "operator").await.unwrap();
    assert!(!rotated.is_empty());
    // Let the serving node notice the retirement (maintenance every 1 s).
    tokio::time::sleep(Duration::from_millis(2_500)).await;

    // Re-encryption, killed after its first batch, then run again.
    let trip = Arc::new(Tripwire(tokio::sync::Notify::new(), AtomicU64::new(0)));
    let (op, t2) = (Arc::new(op), Arc::clone(&trip));
    let op2 = Arc::clone(&op);
    let run = tokio::spawn(async move { op2.reencrypt(5, None, "operator", t2.as_ref()).await });
    trip.0.notified().await;
    run.abort();
    let _ = run.await;
    let stale_midway = app.storage().count_stale_cards().await.unwrap();
    assert!(stale_midway > 0, "the killed run should have left work");
    let done = op
        .reencrypt(5, None, "operator", &NoProgress)
        .await
        .unwrap();
    assert!(done > 0);
    // Idempotent: nothing left, nothing done.
    assert_eq!(
        op.reencrypt(5, None, "operator", &NoProgress)
            .await
            .unwrap(),
        0
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} requests failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    // Cards written between the last pass and the end of the load were
    // sealed by the server with its current (newest) keys.
    assert_eq!(app.storage().count_stale_cards().await.unwrap(), 0);

    // Every card opens, under a non-retired key, via the API.
    let current: Vec<String> = app
        .storage()
        .list_data_keys()
        .await
        .unwrap()
        .into_iter()
        .filter(|k| k.retired_at.is_none())
        .map(|k| k.id)
        .collect();
    let all: Vec<(String, String)> = cards
        .into_iter()
        .chain(written.lock().unwrap().clone())
        .collect();
    assert!(all.len() > 40);
    for (id, number) in &all {
        let rec = app.storage().get_card(&m.id, id).await.unwrap().unwrap();
        assert!(
            current.contains(&rec.dek_id),
            "card {id} still under {}",
            rec.dek_id
        );
        let (s, v) = app
            .post(&format!("/v1/cards/{id}/reveal"), &m.sk, json!({}))
            .await;
        assert_eq!(
            (s, v["number"].as_str()),
            (StatusCode::OK, Some(number.as_str())),
            "card {id}"
        );
    }
    // The old KEK is gone from the HSM and the chain still verifies.
    let labels: Vec<String> = op
        .keyring()
        .hsm_inventory()
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.label)
        .collect();
    assert!(
        !labels.contains(&"cardvault-kek-v1".to_string()),
        "{labels:?}"
    );
    assert!(
        labels.contains(&"cardvault-kek-v2".to_string()),
        "{labels:?}"
    );
    let v = op.verify_audit("test").await.unwrap();
    assert!(v.ok(), "{:?}", v.findings);
}

mod rotation_under_load {
    use super::*;
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sqlite_envelope() {
        rotation_under_load(Backend::Sqlite, CryptoMode::Envelope).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sqlite_hsm() {
        rotation_under_load(Backend::Sqlite, CryptoMode::Hsm).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres_envelope() {
        rotation_under_load(Backend::Postgres, CryptoMode::Envelope).await
    }
}

/// A data key past its cryptoperiod is rotated by the serving node itself.
async fn cryptoperiod_is_enforced(backend: Backend, mode: CryptoMode) {
    let app =
        TestApp::spawn_with(backend, mode, |cfg| cfg.keys.maintenance_interval_secs = 1).await;
    let m = app.merchant(true).await;
    let cus = app.customer(&m.sk, "old@example.com").await;
    let old = app.card(&m.sk, &cus, &pan(1)).await;
    let old_dek = app
        .storage()
        .get_card(&m.id, old["id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap()
        .dek_id;
    crate::audit::exec_sql(
        &app,
        &[&format!(
            "UPDATE data_keys SET created_at = created_at - 400 * 86400 WHERE id = '{old_dek}'"
        )],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let new = app.card(&m.sk, &cus, &pan(2)).await;
    let new_dek = app
        .storage()
        .get_card(&m.id, new["id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap()
        .dek_id;
    assert_ne!(old_dek, new_dek, "a key past its cryptoperiod still seals");
    let rec = app.storage().get_data_key(&old_dek).await.unwrap().unwrap();
    assert!(rec.retired_at.is_some());
    let (s, _) = app
        .post(
            &format!("/v1/cards/{}/reveal", old["id"].as_str().unwrap()),
            &m.sk,
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    app.stop().await;
}
crate::matrix!(cryptoperiod_is_enforced);

/// Restores `rows` of a backup into a fresh SQLite database and opens the
/// merchant's cards there with the (same) HSM.
async fn open_from_backup(
    app: &TestApp,
    merchant: &cardvault::storage::MerchantRecord,
    keys: &[cardvault::storage::DataKeyRecord],
    cards: &[cardvault::storage::CardRecord],
) -> Vec<bool> {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("restored.db").display());
    let restored = cardvault::storage::connect(&url, 2).await.unwrap();
    restored.migrate().await.unwrap();
    let audit = cardvault::storage::AuditEntry::default();
    struct Null;
    impl cardvault::storage::AuditSealer for Null {
        fn key_id(&self) -> &str {
            "restore"
        }
        fn mac(&self, _: &[u8]) -> [u8; 32] {
            [0; 32]
        }
    }
    restored.set_audit_sealer(Arc::new(Null));
    restored
        .create_merchant(merchant, &[], &audit)
        .await
        .unwrap();
    for k in keys {
        restored.insert_data_key(k, None).await.unwrap();
    }
    let p11 = app.p11.clone();
    let custodian =
        tokio::task::spawn_blocking(move || cardvault_hsm::Pkcs11Custodian::connect(p11))
            .await
            .unwrap()
            .unwrap();
    let store: Arc<dyn cardvault::storage::KeyStore> = restored.clone();
    let keyring = Keyring::new(
        Arc::new(custodian),
        store,
        KeyringConfig {
            mode: app.mode,
            ..KeyringConfig::default()
        },
    );
    let mut out = Vec::new();
    for c in cards {
        out.push(
            keyring
                .open(KeyOwner::Merchant(&merchant.id), &c.id, &c.pan_ciphertext)
                .await
                .is_ok(),
        );
    }
    out
}

async fn backup_cannot_open_a_shredded_merchant(backend: Backend, mode: CryptoMode) {
    let app = TestApp::spawn(backend, mode).await;
    let a = app.merchant(true).await;
    let b = app.merchant(true).await;
    let mut backups = Vec::new();
    for m in [&a, &b] {
        let cus = app.customer(&m.sk, "x@example.com").await;
        app.card(&m.sk, &cus, &pan(7)).await;
        app.card(&m.sk, &cus, &pan(8)).await;
        // The backup: the merchant's rows as they are before the delete.
        let merchant = app.storage().get_merchant(&m.id).await.unwrap().unwrap();
        let cards = app.storage().list_cards(&m.id, &cus).await.unwrap();
        let keys: Vec<_> = app
            .storage()
            .list_data_keys()
            .await
            .unwrap()
            .into_iter()
            .filter(|k| k.merchant_id.as_deref() == Some(m.id.as_str()))
            .collect();
        backups.push((merchant, keys, cards));
    }
    // Before the shred, the backup opens.
    assert!(
        open_from_backup(&app, &backups[0].0, &backups[0].1, &backups[0].2)
            .await
            .iter()
            .all(|ok| *ok)
    );

    let shred = app.vault.shred_merchant(&a.id, "operator").await.unwrap();
    assert!(!shred.destroyed_hsm_keys.is_empty());
    // Gone from the live database, and its key cannot be used any more.
    assert!(app.storage().get_merchant(&a.id).await.unwrap().is_none());
    // The backup of A no longer opens; B is untouched.
    let opened = open_from_backup(&app, &backups[0].0, &backups[0].1, &backups[0].2).await;
    assert!(
        opened.iter().all(|ok| !ok),
        "shredded merchant's card opened from a backup: {opened:?}"
    );
    let opened_b = open_from_backup(&app, &backups[1].0, &backups[1].1, &backups[1].2).await;
    assert!(opened_b.iter().all(|ok| *ok));
    let rows = app.storage().list_audit(0, 100_000).await.unwrap();
    assert!(rows
        .iter()
        .any(|r| r.entry.event == "merchant.shred" && r.entry.outcome == "success"));
    app.stop().await;
}
crate::matrix!(backup_cannot_open_a_shredded_merchant);
