//! Crypto hot path, in one run: the raw `aes-gcm` + HMAC baseline, envelope
//! seal+open+fingerprint through the keyring, and hsm-mode seal+open.
//!
//! `cargo bench --bench crypto`; the README reports the ratio envelope /
//! baseline (goal: at least 70%).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use cardvault::config::Config;
use cardvault::crypto::{CryptoMode, KeyOwner, Keyring, Purpose};
use cardvault::server::bootstrap;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

const PAN: &[u8; 19] = b"4111111111111111003";

/// A keyring wired as the vault wires it (SQLite key store, fresh SoftHSM
/// token, audit key installed), with the bench merchant's keys loaded.
fn keyring(
    rt: &tokio::runtime::Runtime,
    mode: CryptoMode,
    dir: &std::path::Path,
) -> (Arc<Keyring>, String) {
    rt.block_on(async {
        let mut cfg = Config {
            dev: true,
            data_dir: dir.to_path_buf(),
            database_url: Some(format!(
                "sqlite://{}",
                dir.join(format!("{}.db", mode.as_str())).display()
            )),
            ..Config::default()
        };
        cfg.crypto.mode = mode;
        let storage = bootstrap::storage(&cfg).await.expect("storage");
        let vault = bootstrap::vault_with(&cfg, storage, cardvault::testkit::fresh_custodian())
            .await
            .expect("vault");
        let merchant = vault
            .create_merchant("bench", false)
            .await
            .expect("merchant")
            .merchant_id;
        let kr = Arc::clone(vault.keyring());
        let owner = KeyOwner::Merchant(&merchant);
        // Create and load the keys outside the measurement.
        let s = kr
            .seal(owner, Purpose::Pan, "card_x", PAN)
            .await
            .expect("seal");
        kr.open(owner, "card_x", &s).await.expect("open");
        kr.fingerprint(&merchant, PAN).await.expect("fingerprint");
        (kr, merchant)
    })
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let (envelope, m_env) = keyring(&rt, CryptoMode::Envelope, dir.path());
    let (hsm, m_hsm) = keyring(&rt, CryptoMode::Hsm, dir.path());

    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    let cipher = Aes256Gcm::new_from_slice(&key).expect("key");
    let mut mac_key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut mac_key);

    let mut group = c.benchmark_group("pan");
    group.throughput(Throughput::Elements(1));
    group.bench_function("baseline_aes_gcm_hmac", |b| {
        b.to_async(&rt).iter(|| async {
            let mut nonce = [0u8; 12];
            rand::thread_rng().fill_bytes(&mut nonce);
            let aad = b"cardvault/v1 merchant record key";
            let mut buf = PAN.to_vec();
            let tag = cipher
                .encrypt_in_place_detached(Nonce::from_slice(&nonce), aad, &mut buf)
                .expect("encrypt");
            cipher
                .decrypt_in_place_detached(
                    Nonce::from_slice(&nonce),
                    aad,
                    &mut buf,
                    Tag::from_slice(&tag),
                )
                .expect("decrypt");
            let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&mac_key).expect("mac");
            mac.update(&buf);
            std::hint::black_box(mac.finalize().into_bytes());
        })
    });
    group.bench_function("envelope_seal_open_fingerprint", |b| {
        b.to_async(&rt).iter(|| async {
            let owner = KeyOwner::Merchant(&m_env);
            let sealed = envelope
                .seal(owner, Purpose::Pan, "card_1", PAN)
                .await
                .expect("seal");
            let opened = envelope.open(owner, "card_1", &sealed).await.expect("open");
            let fp = envelope.fingerprint(&m_env, &opened).await.expect("fp");
            std::hint::black_box(fp);
        })
    });
    group.bench_function("hsm_seal_open", |b| {
        b.to_async(&rt).iter(|| async {
            let owner = KeyOwner::Merchant(&m_hsm);
            let sealed = hsm
                .seal(owner, Purpose::Pan, "card_1", PAN)
                .await
                .expect("seal");
            std::hint::black_box(hsm.open(owner, "card_1", &sealed).await.expect("open"));
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
