//! Keyring tests against a fresh SoftHSM token, in both crypto modes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cardvault_hsm::{HsmError, KeyCustodian, KeyInfo, KeyPurpose, GCM_IV_LEN};
use zeroize::Zeroizing;

use super::*;
use crate::storage::{DataKeyRecord, KeyStore, StorageResult};

/// A key store in memory, enough for the keyring.
#[derive(Default)]
pub(crate) struct MemKeyStore {
    keys: Mutex<HashMap<String, DataKeyRecord>>,
}

#[async_trait]
impl KeyStore for MemKeyStore {
    async fn insert_data_key(&self, key: &DataKeyRecord) -> StorageResult<()> {
        self.keys
            .lock()
            .unwrap()
            .insert(key.id.clone(), key.clone());
        Ok(())
    }
    async fn get_data_key(&self, id: &str) -> StorageResult<Option<DataKeyRecord>> {
        Ok(self.keys.lock().unwrap().get(id).cloned())
    }
    async fn current_data_key(
        &self,
        merchant_id: Option<&str>,
        purpose: &str,
    ) -> StorageResult<Option<DataKeyRecord>> {
        Ok(self
            .keys
            .lock()
            .unwrap()
            .values()
            .filter(|k| {
                k.merchant_id.as_deref() == merchant_id
                    && k.purpose == purpose
                    && k.retired_at.is_none()
            })
            .max_by_key(|k| k.version)
            .cloned())
    }
    async fn reserve_seals(&self, id: &str, block: i64) -> StorageResult<i64> {
        let mut keys = self.keys.lock().unwrap();
        let k = keys.get_mut(id).unwrap();
        k.seals_reserved += block;
        Ok(k.seals_reserved)
    }
}

/// Wraps a custodian and counts every call that reaches the HSM.
pub(crate) struct CountingCustodian {
    inner: Arc<dyn KeyCustodian>,
    pub calls: AtomicU64,
}

impl CountingCustodian {
    fn tick(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
}

impl KeyCustodian for CountingCustodian {
    fn ensure_key(&self, label: &str, purpose: KeyPurpose) -> Result<KeyInfo, HsmError> {
        self.tick();
        self.inner.ensure_key(label, purpose)
    }
    fn find_key(&self, label: &str) -> Result<Option<KeyInfo>, HsmError> {
        self.tick();
        self.inner.find_key(label)
    }
    fn destroy_key(&self, label: &str) -> Result<bool, HsmError> {
        self.tick();
        self.inner.destroy_key(label)
    }
    fn encrypt(
        &self,
        label: &str,
        iv: &[u8; GCM_IV_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        self.tick();
        self.inner.encrypt(label, iv, aad, plaintext)
    }
    fn decrypt(
        &self,
        label: &str,
        iv: &[u8; GCM_IV_LEN],
        aad: &[u8],
        ct: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        self.tick();
        self.inner.decrypt(label, iv, aad, ct)
    }
    fn hmac_sha256(&self, label: &str, data: &[u8]) -> Result<[u8; 32], HsmError> {
        self.tick();
        self.inner.hmac_sha256(label, data)
    }
    fn random(&self, len: usize) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        self.tick();
        self.inner.random(len)
    }
    fn inventory(&self) -> Result<Vec<KeyInfo>, HsmError> {
        self.tick();
        self.inner.inventory()
    }
    fn health(&self) -> Result<(), HsmError> {
        self.tick();
        self.inner.health()
    }
}

struct Fixture {
    keyring: Keyring,
    counter: Arc<CountingCustodian>,
    store: Arc<MemKeyStore>,
}

fn fixture(mode: CryptoMode, seal_limit: u64) -> Fixture {
    let custodian = crate::testkit::fresh_custodian();
    let counter = Arc::new(CountingCustodian {
        inner: custodian,
        calls: AtomicU64::new(0),
    });
    let store = Arc::new(MemKeyStore::default());
    let keyring = Keyring::new(
        counter.clone(),
        store.clone(),
        KeyringConfig {
            mode,
            seal_limit,
            ..KeyringConfig::default()
        },
    );
    Fixture {
        keyring,
        counter,
        store,
    }
}

const PAN: &[u8] = b"4111111111111111111";
const M: KeyOwner<'static> = KeyOwner::Merchant("mer_a");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_and_tamper_detection_in_both_modes() {
    for mode in [CryptoMode::Envelope, CryptoMode::Hsm] {
        let f = fixture(mode, DEFAULT_SEAL_LIMIT_FOR_TESTS);
        let sealed = f
            .keyring
            .seal(M, Purpose::Pan, "card_1", PAN)
            .await
            .unwrap();
        assert!(
            !sealed.windows(PAN.len()).any(|w| w == PAN),
            "{mode:?}: plaintext visible"
        );
        let opened = f.keyring.open(M, "card_1", &sealed).await.unwrap();
        assert_eq!(opened.as_slice(), PAN, "{mode:?}");

        // One flipped bit anywhere in the record fails.
        for i in 0..sealed.len() {
            for bit in [0u8, 7] {
                let mut bad = sealed.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    f.keyring.open(M, "card_1", &bad).await.is_err(),
                    "{mode:?}: flipped bit {bit} of byte {i} went unnoticed"
                );
            }
        }
        // Truncated or extended records fail.
        assert!(f
            .keyring
            .open(M, "card_1", &sealed[..sealed.len() - 1])
            .await
            .is_err());
        let mut longer = sealed.clone();
        longer.push(0);
        assert!(f.keyring.open(M, "card_1", &longer).await.is_err());
        // Another record id or another merchant fails.
        assert!(f.keyring.open(M, "card_2", &sealed).await.is_err());
        let other = KeyOwner::Merchant("mer_b");
        assert!(matches!(
            f.keyring.open(other, "card_1", &sealed).await,
            Err(CryptoError::InvalidRecord)
        ));
        // A record re-labelled with another data key id fails, even one that
        // belongs to the same merchant.
        let parts = record::parse(&sealed).unwrap();
        let own_key = parts.dek_id.to_string();
        let other_key = {
            let _ = f
                .keyring
                .seal(other, Purpose::Pan, "x", b"1")
                .await
                .unwrap();
            f.store
                .current_data_key(Some("mer_b"), "pan")
                .await
                .unwrap()
                .unwrap()
                .id
        };
        let mut relabelled = sealed.clone();
        let at = 2;
        relabelled[at..at + own_key.len()].copy_from_slice(other_key.as_bytes());
        assert!(f.keyring.open(M, "card_1", &relabelled).await.is_err());
        // Same merchant, a second key version: opening with the wrong key id fails.
        let v2 = f
            .keyring
            .seal(M, Purpose::Volatile, "card_1", PAN)
            .await
            .unwrap();
        let v2_key = record::parse(&v2).unwrap().dek_id.to_string();
        let mut swapped = sealed.clone();
        swapped[at..at + own_key.len()].copy_from_slice(v2_key.as_bytes());
        assert!(f.keyring.open(M, "card_1", &swapped).await.is_err());
    }
}

const DEFAULT_SEAL_LIMIT_FOR_TESTS: u64 = 1 << 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_seals_never_repeat_a_nonce() {
    let f = fixture(CryptoMode::Envelope, DEFAULT_SEAL_LIMIT_FOR_TESTS);
    let mut nonces = HashSet::with_capacity(1_000_000);
    let mut key_id = None;
    for _ in 0..1_000_000u32 {
        let sealed = f
            .keyring
            .seal(M, Purpose::Pan, "card_1", PAN)
            .await
            .unwrap();
        let parts = record::parse(&sealed).unwrap();
        match &key_id {
            None => key_id = Some(parts.dek_id.to_string()),
            Some(k) => assert_eq!(k, parts.dek_id, "all seals under one key"),
        }
        assert!(nonces.insert(*parts.nonce), "repeated nonce");
    }
    assert_eq!(nonces.len(), 1_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_mode_makes_no_hsm_call_per_operation() {
    let f = fixture(CryptoMode::Envelope, DEFAULT_SEAL_LIMIT_FOR_TESTS);
    // Warm up: creating the keys needs the HSM.
    let sealed = f
        .keyring
        .seal(M, Purpose::Pan, "card_1", PAN)
        .await
        .unwrap();
    f.keyring.fingerprint("mer_a", PAN).await.unwrap();
    assert!(f.counter.calls.load(Ordering::SeqCst) > 0);
    f.counter.calls.store(0, Ordering::SeqCst);
    for i in 0..1000 {
        let id = format!("card_{i}");
        let s = f.keyring.seal(M, Purpose::Pan, &id, PAN).await.unwrap();
        f.keyring.open(M, &id, &s).await.unwrap();
        f.keyring.fingerprint("mer_a", PAN).await.unwrap();
    }
    f.keyring.open(M, "card_1", &sealed).await.unwrap();
    assert_eq!(f.counter.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsm_mode_makes_one_hsm_call_per_operation() {
    let f = fixture(CryptoMode::Hsm, DEFAULT_SEAL_LIMIT_FOR_TESTS);
    let sealed = f
        .keyring
        .seal(M, Purpose::Pan, "card_1", PAN)
        .await
        .unwrap();
    f.keyring.fingerprint("mer_a", PAN).await.unwrap();
    for _ in 0..10 {
        f.counter.calls.store(0, Ordering::SeqCst);
        let s = f
            .keyring
            .seal(M, Purpose::Pan, "card_2", PAN)
            .await
            .unwrap();
        assert_eq!(f.counter.calls.load(Ordering::SeqCst), 1, "seal");
        f.counter.calls.store(0, Ordering::SeqCst);
        f.keyring.open(M, "card_2", &s).await.unwrap();
        assert_eq!(f.counter.calls.load(Ordering::SeqCst), 1, "open");
        f.counter.calls.store(0, Ordering::SeqCst);
        f.keyring.fingerprint("mer_a", PAN).await.unwrap();
        assert_eq!(f.counter.calls.load(Ordering::SeqCst), 1, "fingerprint");
    }
    assert_eq!(
        f.keyring
            .open(M, "card_1", &sealed)
            .await
            .unwrap()
            .as_slice(),
        PAN
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fingerprints_are_keyed_per_merchant() {
    let f = fixture(CryptoMode::Envelope, DEFAULT_SEAL_LIMIT_FOR_TESTS);
    let a1 = f.keyring.fingerprint("mer_a", PAN).await.unwrap();
    let a2 = f.keyring.fingerprint("mer_a", PAN).await.unwrap();
    let b = f.keyring.fingerprint("mer_b", PAN).await.unwrap();
    let other = f
        .keyring
        .fingerprint("mer_a", b"4242424242424242")
        .await
        .unwrap();
    assert_eq!(a1, a2);
    assert_ne!(a1, b, "fingerprints must not link merchants");
    assert_ne!(a1, other);
    use sha2::Digest;
    let unkeyed: [u8; 32] = sha2::Sha256::digest(PAN).into();
    assert_ne!(a1, unkeyed, "fingerprint must be keyed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seal_limit_is_enforced_by_rotating_to_a_new_key() {
    let f = fixture(CryptoMode::Envelope, 3);
    let mut ids = Vec::new();
    let mut sealed = Vec::new();
    for i in 0..7 {
        let s = f
            .keyring
            .seal(M, Purpose::Pan, &format!("c{i}"), PAN)
            .await
            .unwrap();
        ids.push(record::parse(&s).unwrap().dek_id.to_string());
        sealed.push(s);
    }
    // Three seals per key, then a new version.
    assert_eq!(ids[0], ids[2]);
    assert_ne!(ids[2], ids[3]);
    assert_eq!(ids[3], ids[5]);
    assert_ne!(ids[5], ids[6]);
    // Old records still open.
    for (i, s) in sealed.iter().enumerate() {
        assert_eq!(
            f.keyring
                .open(M, &format!("c{i}"), s)
                .await
                .unwrap()
                .as_slice(),
            PAN
        );
    }
    let current = f
        .store
        .current_data_key(Some("mer_a"), "pan")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(current.version, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_keyring_never_reuses_seal_budget() {
    let f = fixture(CryptoMode::Envelope, DEFAULT_SEAL_LIMIT_FOR_TESTS);
    let s = f.keyring.seal(M, Purpose::Pan, "c", PAN).await.unwrap();
    let id = record::parse(&s).unwrap().dek_id.to_string();
    let reserved = f
        .store
        .get_data_key(&id)
        .await
        .unwrap()
        .unwrap()
        .seals_reserved;
    assert!(reserved >= 1);
    // A new keyring (a restart) over the same store and HSM counts from the
    // reserved total and reserves further ahead before sealing again.
    let again = Keyring::new(f.counter.clone(), f.store.clone(), KeyringConfig::default());
    let s2 = again.seal(M, Purpose::Pan, "c2", PAN).await.unwrap();
    assert_eq!(record::parse(&s2).unwrap().dek_id, id);
    let reserved2 = f
        .store
        .get_data_key(&id)
        .await
        .unwrap()
        .unwrap()
        .seals_reserved;
    assert!(reserved2 > reserved);
    // And it opens what the first one sealed.
    assert_eq!(again.open(M, "c", &s).await.unwrap().as_slice(), PAN);
}
