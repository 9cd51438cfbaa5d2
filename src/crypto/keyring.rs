//! The keyring: data keys per owner (merchant or system) and purpose, created
//! on first use, stored wrapped, unwrapped once and cached, and counted
//! against their seal limit.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use cardvault_hsm::{HsmError, KeyCustodian, KeyPurpose, GCM_IV_LEN};
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::RngCore;
use rustc_hash::FxHasher;
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use super::hsm_workers::HsmWorkers;
use super::record::{self, NONCE_LEN, TAG_LEN};
use super::{CryptoError, CryptoMode};
use crate::domain::new_id;
use crate::storage::{DataKeyRecord, KeyStore, StorageError};

mod rotation;
use rotation::key_audit;
pub use rotation::{label_version, AuditMacKey, AUDIT_HSM_LABEL};

/// Seals reserved in the database per round trip. A crash wastes at most
/// this many seals of a key's budget (plus [`SEAL_PREFETCH_AT`] when the
/// next block was already reserved); it can never reuse any.
const SEAL_RESERVATION_BLOCK: u64 = 16_384;

/// With this many reserved seals left, the next block is reserved in the
/// background, so seals do not wait on the database at steady state. A seal
/// that finds no reservation left still reserves synchronously.
const SEAL_PREFETCH_AT: u64 = SEAL_RESERVATION_BLOCK / 4;

/// NIST SP 800-38D: at most 2^32 invocations of GCM with random 96-bit IVs
/// under one key.
pub const DEFAULT_SEAL_LIMIT: u64 = 1 << 32;

/// Threads making HSM calls in [`KeyringConfig::default`] (tests and
/// tools; the server takes `hsm.threads`, see
/// [`crate::config::HsmConfig::threads`]).
const DEFAULT_HSM_THREADS: usize = 2;

/// What a data key is used for. Each purpose has its own keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// AES-256-GCM over card numbers.
    Pan,
    /// HMAC-SHA256 fingerprints of card numbers (never rotated: dedupe
    /// depends on stable fingerprints; only re-wrapped).
    Fingerprint,
    /// AES-256-GCM over short-lived blobs (CVV, one-time tokens).
    Volatile,
    /// HMAC-SHA256 of the audit chain.
    Audit,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Pan => "pan",
            Purpose::Fingerprint => "fingerprint",
            Purpose::Volatile => "volatile",
            Purpose::Audit => "audit",
        }
    }

    fn is_mac(self) -> bool {
        matches!(self, Purpose::Fingerprint | Purpose::Audit)
    }

    /// Slot of this purpose in [`Cache::current`].
    fn index(self) -> usize {
        match self {
            Purpose::Pan => 0,
            Purpose::Fingerprint => 1,
            Purpose::Volatile => 2,
            Purpose::Audit => 3,
        }
    }
}

const PURPOSES: usize = 4;

/// Whose key: a merchant's (wrapped by its merchant key) or the system's
/// (wrapped by the global KEK).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyOwner<'a> {
    Merchant(&'a str),
    System,
}

impl<'a> KeyOwner<'a> {
    /// The owner as it appears in AADs and the cache.
    fn as_str(self) -> &'a str {
        match self {
            KeyOwner::Merchant(m) => m,
            KeyOwner::System => "system",
        }
    }

    fn merchant_id(self) -> Option<&'a str> {
        match self {
            KeyOwner::Merchant(m) => Some(m),
            KeyOwner::System => None,
        }
    }
}

/// Keyring settings.
#[derive(Clone, Debug)]
pub struct KeyringConfig {
    pub mode: CryptoMode,
    /// Label of the KEK that wraps system keys, e.g. `cardvault-kek-v1`.
    pub kek_label: String,
    /// Seals allowed per data key before a successor is made.
    pub seal_limit: u64,
    /// Threads that make HSM calls (see [`super::hsm_workers`]).
    pub hsm_threads: usize,
}

impl Default for KeyringConfig {
    fn default() -> Self {
        KeyringConfig {
            mode: CryptoMode::Envelope,
            kek_label: "cardvault-kek-v1".to_string(),
            seal_limit: DEFAULT_SEAL_LIMIT,
            hsm_threads: DEFAULT_HSM_THREADS,
        }
    }
}

/// Label of a merchant's wrapping key.
pub fn merchant_key_label(merchant_id: &str) -> String {
    format!("cardvault-mk-{merchant_id}-v1")
}

enum Material {
    /// Envelope-mode AEAD key; the cipher's key schedule zeroizes on drop.
    Aead(Box<Aes256Gcm>),
    /// Envelope-mode MAC key, as a keyed HMAC state.
    Mac(Box<MacKey>),
    /// `hsm` mode: the key is the HSM object with this label.
    Hsm(String),
}

struct DataKey {
    id: String,
    owner: String,
    purpose: Purpose,
    material: Material,
    /// Seals counted so far (starts at the reserved total when loaded, so
    /// seals made before a restart are never forgotten).
    seals: AtomicU64,
    /// Seals reserved in the database.
    reserved: AtomicU64,
    reserve_lock: tokio::sync::Mutex<()>,
}

/// Maps keyed by ids the vault generated itself (data key ids, merchant ids,
/// "system"), never by client-chosen strings that could fill a table with
/// collisions, so a fast non-DoS-resistant hasher is fine here.
type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// The unwrapped keys, behind one lock: every lookup is one read lock and
/// one hash of a short id.
#[derive(Default)]
struct Cache {
    /// By data key id, as bytes: records are opened without a UTF-8 check.
    by_id: IdMap<Box<[u8]>, Arc<DataKey>>,
    /// Current key per owner, one map per purpose ([`Purpose::index`]).
    current: [IdMap<String, Arc<DataKey>>; PURPOSES],
}

impl Cache {
    fn current(&self, owner: KeyOwner<'_>, purpose: Purpose) -> Option<&Arc<DataKey>> {
        self.current[purpose.index()].get(owner.as_str())
    }
}

/// Outcome of counting a seal against a key's budget.
#[derive(Clone, Copy)]
enum Slot {
    /// Counted and already covered by a database reservation.
    Ready,
    /// The seal limit is reached.
    Exhausted,
    /// Counted as seal number `n`, which a new reservation must cover first.
    Reserve(u64),
}

/// Data keys by owner and purpose, backed by the HSM and the key store.
///
/// Seal, open and MAC of a cached envelope-mode key run synchronously under
/// the cache's read lock (no await, no allocation beyond the output); only
/// misses, reservations, rotations and `hsm` mode take the async slow paths,
/// which are boxed so the fast path's futures stay small.
pub struct Keyring {
    hsm: HsmWorkers,
    store: Arc<dyn KeyStore>,
    cfg: KeyringConfig,
    cache: RwLock<Cache>,
    /// Serializes key creation so concurrent first uses make one key.
    create_lock: tokio::sync::Mutex<()>,
    /// HSM operations made so far (for `/metrics` and the load tool).
    hsm_operations: std::sync::atomic::AtomicU64,
}

impl Keyring {
    pub fn new(
        custodian: Arc<dyn KeyCustodian>,
        store: Arc<dyn KeyStore>,
        cfg: KeyringConfig,
    ) -> Self {
        Keyring {
            hsm: HsmWorkers::new(custodian, cfg.hsm_threads),
            store,
            cfg,
            cache: RwLock::new(Cache::default()),
            create_lock: tokio::sync::Mutex::new(()),
            hsm_operations: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many HSM operations this keyring has made since it was built.
    pub fn hsm_operations(&self) -> u64 {
        self.hsm_operations
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn mode(&self) -> CryptoMode {
        self.cfg.mode
    }

    /// Makes sure the KEK exists in the HSM (used by `hsm init` and start-up).
    /// The KEK is the newest active one in the HSM key registry (after a
    /// rotation), else the configured label.
    pub async fn ensure_kek(&self) -> Result<(), CryptoError> {
        let label = self.kek_label().await?;
        self.hsm(move |c| c.ensure_key(&label, KeyPurpose::KeyEncryption))
            .await
            .map(|_| ())
    }

    /// Checks that the HSM answers (for `/readyz`).
    pub async fn hsm_health(&self) -> Result<(), CryptoError> {
        self.hsm(|c| c.health()).await
    }

    /// Seals `plaintext` for `record_id` under the owner's current key of
    /// `purpose` (an AEAD purpose).
    pub async fn seal(
        &self,
        owner: KeyOwner<'_>,
        purpose: Purpose,
        record_id: &str,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        debug_assert!(!purpose.is_mac());
        let cached = {
            let cache = read(&self.cache);
            match cache.current(owner, purpose) {
                Some(key) => {
                    let slot = self.claim_slot(key);
                    if let (Slot::Ready, Material::Aead(cipher)) = (slot, &key.material) {
                        return seal_aead(cipher, &key.id, owner, record_id, plaintext);
                    }
                    Some((Arc::clone(key), slot))
                }
                None => None,
            }
        };
        Box::pin(self.seal_slow(owner, purpose, record_id, plaintext, cached)).await
    }

    /// [`Keyring::seal`] after a cache miss, with a reservation or rotation
    /// due, or in `hsm` mode. `cached` is the current key and the slot
    /// already claimed on it, if any.
    async fn seal_slow(
        &self,
        owner: KeyOwner<'_>,
        purpose: Purpose,
        record_id: &str,
        plaintext: &[u8],
        cached: Option<(Arc<DataKey>, Slot)>,
    ) -> Result<Vec<u8>, CryptoError> {
        let (mut key, slot) = match cached {
            Some(c) => c,
            None => {
                let key = self.current_key(owner, purpose).await?;
                let slot = self.claim_slot(&key);
                (key, slot)
            }
        };
        // At most one successor per call: a fresh key has its whole budget.
        if !self.settle_slot(&key, slot).await? {
            key = self.rotate_exhausted(owner, purpose, &key).await?;
            let slot = self.claim_slot(&key);
            if !self.settle_slot(&key, slot).await? {
                return Err(CryptoError::KeyExhausted);
            }
        }
        match &key.material {
            Material::Aead(cipher) => seal_aead(cipher, &key.id, owner, record_id, plaintext),
            Material::Hsm(label) => {
                let mut nonce = [0u8; NONCE_LEN];
                rand::thread_rng().fill_bytes(&mut nonce);
                let aad = record::aad(owner.as_str(), record_id, &key.id);
                let mut out = Vec::with_capacity(
                    record::header_len(&key.id) + NONCE_LEN + plaintext.len() + TAG_LEN,
                );
                record::write_header(&mut out, &key.id, &nonce);
                let label = label.clone();
                let data = Zeroizing::new(plaintext.to_vec());
                let ct = self
                    .hsm(move |c| c.encrypt(&label, &nonce, &aad, &data))
                    .await?;
                out.extend_from_slice(&ct);
                Ok(out)
            }
            Material::Mac(_) => Err(CryptoError::KeyNotFound),
        }
    }

    /// Opens a record sealed by [`Keyring::seal`] for the same owner and
    /// record id. Any change to the record, or a different owner or record
    /// id, fails with [`CryptoError::InvalidRecord`].
    pub async fn open(
        &self,
        owner: KeyOwner<'_>,
        record_id: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let parts = record::parse_raw(sealed)?;
        let cached = {
            let cache = read(&self.cache);
            match cache.by_id.get(parts.dek_id) {
                Some(key) => {
                    if !key.opens_for(owner) {
                        return Err(CryptoError::InvalidRecord);
                    }
                    if let Material::Aead(cipher) = &key.material {
                        return open_aead(cipher, &key.id, owner, record_id, &parts);
                    }
                    Some(Arc::clone(key))
                }
                None => None,
            }
        };
        Box::pin(self.open_slow(owner, record_id, parts, cached)).await
    }

    /// [`Keyring::open`] after a cache miss or in `hsm` mode.
    async fn open_slow(
        &self,
        owner: KeyOwner<'_>,
        record_id: &str,
        parts: record::RawParts<'_>,
        cached: Option<Arc<DataKey>>,
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let key = match cached {
            Some(k) => k,
            None => {
                let dek_id =
                    std::str::from_utf8(parts.dek_id).map_err(|_| CryptoError::InvalidRecord)?;
                match self.key_by_id(dek_id).await {
                    Ok(k) => k,
                    // A record naming a key that does not exist or is not the
                    // owner's is indistinguishable from a tampered one.
                    Err(CryptoError::KeyNotFound) => return Err(CryptoError::InvalidRecord),
                    Err(e) => return Err(e),
                }
            }
        };
        if !key.opens_for(owner) {
            return Err(CryptoError::InvalidRecord);
        }
        match &key.material {
            Material::Aead(cipher) => open_aead(cipher, &key.id, owner, record_id, &parts),
            Material::Hsm(label) => {
                let aad = record::aad(owner.as_str(), record_id, &key.id);
                let label = label.clone();
                let nonce = *parts.nonce;
                let ct = parts.ciphertext_and_tag.to_vec();
                self.hsm(move |c| c.decrypt(&label, &nonce, &aad, &ct))
                    .await
                    .map_err(|e| match e {
                        CryptoError::Hsm(h)
                            if h.kind() == cardvault_hsm::HsmErrorKind::InvalidData =>
                        {
                            CryptoError::InvalidRecord
                        }
                        other => other,
                    })
            }
            Material::Mac(_) => Err(CryptoError::InvalidRecord),
        }
    }

    /// Keyed fingerprint (HMAC-SHA256) of `data` under the merchant's
    /// fingerprint key: equal inputs give equal fingerprints for one
    /// merchant, and nothing is learnt about the input without the key.
    pub async fn fingerprint(
        &self,
        merchant_id: &str,
        data: &[u8],
    ) -> Result<[u8; 32], CryptoError> {
        self.mac(KeyOwner::Merchant(merchant_id), Purpose::Fingerprint, data)
            .await
    }

    /// HMAC-SHA256 under the owner's current key of a MAC purpose.
    pub async fn mac(
        &self,
        owner: KeyOwner<'_>,
        purpose: Purpose,
        data: &[u8],
    ) -> Result<[u8; 32], CryptoError> {
        debug_assert!(purpose.is_mac());
        let cached = {
            let cache = read(&self.cache);
            match cache.current(owner, purpose) {
                Some(key) => {
                    if let Material::Mac(k) = &key.material {
                        return Ok(k.mac(data));
                    }
                    Some(Arc::clone(key))
                }
                None => None,
            }
        };
        Box::pin(self.mac_slow(owner, purpose, data, cached)).await
    }

    /// [`Keyring::mac`] after a cache miss or in `hsm` mode.
    async fn mac_slow(
        &self,
        owner: KeyOwner<'_>,
        purpose: Purpose,
        data: &[u8],
        cached: Option<Arc<DataKey>>,
    ) -> Result<[u8; 32], CryptoError> {
        let key = match cached {
            Some(k) => k,
            None => self.current_key(owner, purpose).await?,
        };
        match &key.material {
            Material::Mac(k) => Ok(k.mac(data)),
            Material::Hsm(label) => {
                let label = label.clone();
                let data = Zeroizing::new(data.to_vec());
                self.hsm(move |c| c.hmac_sha256(&label, &data)).await
            }
            Material::Aead(_) => Err(CryptoError::KeyNotFound),
        }
    }

    /// Forgets every cached key of a merchant (used when it is shredded).
    pub fn evict_owner(&self, owner: KeyOwner<'_>) {
        let owner = owner.as_str();
        let mut cache = write(&self.cache);
        cache.by_id.retain(|_, k| k.owner != owner);
        for map in &mut cache.current {
            map.remove(owner);
        }
    }

    async fn hsm<T, F>(&self, f: F) -> Result<T, CryptoError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn KeyCustodian) -> Result<T, HsmError> + Send + 'static,
    {
        self.hsm_operations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.hsm.run(f).await
    }

    /// The owner's current key for `purpose`: from the cache, else loaded
    /// from the store, else created.
    async fn current_key(
        &self,
        owner: KeyOwner<'_>,
        purpose: Purpose,
    ) -> Result<Arc<DataKey>, CryptoError> {
        if let Some(k) = read(&self.cache).current(owner, purpose) {
            return Ok(Arc::clone(k));
        }
        let _guard = self.create_lock.lock().await;
        if let Some(k) = read(&self.cache).current(owner, purpose) {
            return Ok(Arc::clone(k));
        }
        let key = match self
            .store
            .current_data_key(owner.merchant_id(), purpose.as_str())
            .await?
        {
            Some(rec) => self.load(&rec).await?,
            None => self.create(owner, purpose, 1).await?,
        };
        self.install_current(owner, purpose, &key);
        Ok(key)
    }

    fn install_current(&self, owner: KeyOwner<'_>, purpose: Purpose, key: &Arc<DataKey>) {
        let mut cache = write(&self.cache);
        cache.by_id.insert(id_key(&key.id), Arc::clone(key));
        cache.current[purpose.index()].insert(owner.as_str().to_string(), Arc::clone(key));
    }

    /// Replaces an exhausted current key with a new version.
    async fn rotate_exhausted(
        &self,
        owner: KeyOwner<'_>,
        purpose: Purpose,
        exhausted: &Arc<DataKey>,
    ) -> Result<Arc<DataKey>, CryptoError> {
        let _guard = self.create_lock.lock().await;
        if let Some(k) = read(&self.cache).current(owner, purpose) {
            if !Arc::ptr_eq(k, exhausted) {
                return Ok(Arc::clone(k));
            }
        }
        let version = self
            .store
            .get_data_key(&exhausted.id)
            .await?
            .map_or(1, |r| r.version + 1);
        let key = self.create(owner, purpose, version).await?;
        self.install_current(owner, purpose, &key);
        Ok(key)
    }

    /// A key by id, for opening records sealed under older versions.
    async fn key_by_id(&self, id: &str) -> Result<Arc<DataKey>, CryptoError> {
        if let Some(k) = read(&self.cache).by_id.get(id.as_bytes()) {
            return Ok(Arc::clone(k));
        }
        let rec = self
            .store
            .get_data_key(id)
            .await?
            .ok_or(CryptoError::KeyNotFound)?;
        let key = self.load(&rec).await?;
        write(&self.cache)
            .by_id
            .insert(id_key(&key.id), Arc::clone(&key));
        Ok(key)
    }

    /// Counts a seal against the key's budget (synchronous; see
    /// [`Keyring::settle_slot`] for the part that may need the database).
    fn claim_slot(&self, key: &Arc<DataKey>) -> Slot {
        let n = key.seals.fetch_add(1, Ordering::Relaxed);
        if n >= self.cfg.seal_limit {
            return Slot::Exhausted;
        }
        let reserved = key.reserved.load(Ordering::Acquire);
        if n >= reserved {
            return Slot::Reserve(n);
        }
        // Each `n` is claimed once, so one seal per block starts the prefetch.
        if reserved - n == SEAL_PREFETCH_AT && reserved < self.cfg.seal_limit {
            self.prefetch_reservation(key, reserved);
        }
        Slot::Ready
    }

    /// Reserves the next block of `key`'s seals in the background, unless a
    /// reservation past `seen` happened meanwhile. Failures are only logged:
    /// the seal that runs out of reservation reserves (and reports) itself.
    fn prefetch_reservation(&self, key: &Arc<DataKey>, seen: u64) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let key = Arc::clone(key);
        let store = Arc::clone(&self.store);
        rt.spawn(async move {
            let _guard = key.reserve_lock.lock().await;
            if key.reserved.load(Ordering::Acquire) != seen {
                return;
            }
            if let Err(e) = reserve_block(store.as_ref(), &key).await {
                tracing::warn!(error = %e, "background seal reservation failed");
            }
        });
    }

    /// Finishes a claimed seal slot: `false` when the key's budget is spent,
    /// otherwise `true` once the database reservation covers it.
    async fn settle_slot(&self, key: &DataKey, slot: Slot) -> Result<bool, CryptoError> {
        let n = match slot {
            Slot::Ready => return Ok(true),
            Slot::Exhausted => return Ok(false),
            Slot::Reserve(n) => n,
        };
        let _guard = key.reserve_lock.lock().await;
        while n >= key.reserved.load(Ordering::Acquire) {
            reserve_block(self.store.as_ref(), key).await?;
        }
        Ok(true)
    }

    /// Unwraps (envelope) or references (hsm) a stored key.
    async fn load(&self, rec: &DataKeyRecord) -> Result<Arc<DataKey>, CryptoError> {
        let purpose = purpose_from_str(&rec.purpose).ok_or(CryptoError::KeyNotFound)?;
        let owner = rec
            .merchant_id
            .clone()
            .unwrap_or_else(|| "system".to_string());
        let material = match (&rec.wrapped, rec.mode.as_str()) {
            (None, "hsm") => Material::Hsm(rec.wrapping_label.clone()),
            (Some(wrapped), "envelope") => {
                if wrapped.len() < GCM_IV_LEN {
                    return Err(CryptoError::InvalidRecord);
                }
                let (iv, ct) = wrapped.split_at(GCM_IV_LEN);
                let iv: [u8; GCM_IV_LEN] = iv.try_into().map_err(|_| CryptoError::InvalidRecord)?;
                let ct = ct.to_vec();
                let label = rec.wrapping_label.clone();
                let aad = record::wrap_aad(&rec.id, &owner, purpose.as_str());
                let bytes = self.hsm(move |c| c.decrypt(&label, &iv, &aad, &ct)).await?;
                material_from_bytes(purpose, &bytes)?
            }
            _ => return Err(CryptoError::KeyNotFound),
        };
        let used = u64::try_from(rec.seals_reserved).unwrap_or(u64::MAX);
        Ok(Arc::new(DataKey {
            id: rec.id.clone(),
            owner,
            purpose,
            material,
            seals: AtomicU64::new(used),
            reserved: AtomicU64::new(used),
            reserve_lock: tokio::sync::Mutex::new(()),
        }))
    }

    /// Creates, wraps and stores a new key version.
    async fn create(
        &self,
        owner: KeyOwner<'_>,
        purpose: Purpose,
        version: i64,
    ) -> Result<Arc<DataKey>, CryptoError> {
        self.create_in(owner, purpose, version, self.cfg.mode, true)
            .await
    }

    /// [`Keyring::create`] in a given mode; `audited: false` only for the
    /// audit key itself (nothing can be audited before it exists).
    async fn create_in(
        &self,
        owner: KeyOwner<'_>,
        purpose: Purpose,
        version: i64,
        mode: CryptoMode,
        audited: bool,
    ) -> Result<Arc<DataKey>, CryptoError> {
        let id = new_id("dek");
        let owner_str = owner.as_str().to_string();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let (material, wrapped, wrapping_label) = match mode {
            CryptoMode::Envelope => {
                let label = self.wrapping_label(owner).await?;
                let mut bytes = Zeroizing::new([0u8; 32]);
                OsRng.fill_bytes(bytes.as_mut());
                let mut iv = [0u8; GCM_IV_LEN];
                OsRng.fill_bytes(&mut iv);
                let aad = record::wrap_aad(&id, &owner_str, purpose.as_str());
                let (l, b) = (label.clone(), bytes.clone());
                let ct = self
                    .hsm(move |c| {
                        c.ensure_key(&l, KeyPurpose::KeyEncryption)?;
                        c.encrypt(&l, &iv, &aad, b.as_slice())
                    })
                    .await?;
                let mut wrapped = iv.to_vec();
                wrapped.extend_from_slice(&ct);
                (
                    material_from_bytes(purpose, bytes.as_slice())?,
                    Some(wrapped),
                    label,
                )
            }
            CryptoMode::Hsm => {
                let label = format!("cardvault-{}-{id}", purpose.as_str());
                let kind = if purpose.is_mac() {
                    KeyPurpose::Mac
                } else {
                    KeyPurpose::DataEncryption
                };
                let l = label.clone();
                self.hsm(move |c| c.ensure_key(&l, kind)).await?;
                (Material::Hsm(label.clone()), None, label)
            }
        };
        let rec = DataKeyRecord {
            id: id.clone(),
            merchant_id: owner.merchant_id().map(str::to_string),
            purpose: purpose.as_str().to_string(),
            version,
            mode: mode.as_str().to_string(),
            wrapped,
            wrapping_label,
            seals_reserved: 0,
            created_at: now,
            retired_at: None,
        };
        let audit = audited.then(|| key_audit("key.create", &rec));
        match self.store.insert_data_key(&rec, audit.as_ref()).await {
            Ok(()) => {}
            // Another node made this version first: use theirs.
            Err(StorageError::Conflict(_)) => {
                if let Some(theirs) = self
                    .store
                    .current_data_key(owner.merchant_id(), purpose.as_str())
                    .await?
                {
                    return self.load(&theirs).await;
                }
                return Err(CryptoError::KeyNotFound);
            }
            Err(e) => return Err(e.into()),
        }
        Ok(Arc::new(DataKey {
            id,
            owner: owner_str,
            purpose,
            material,
            seals: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
            reserve_lock: tokio::sync::Mutex::new(()),
        }))
    }
}

/// A data key id as a [`Cache::by_id`] key.
fn id_key(id: &str) -> Box<[u8]> {
    id.as_bytes().into()
}

/// Reserves the next block of a key's seals in the database. The database
/// total also counts blocks other vault nodes reserved since this one's last
/// reservation: those are added to this node's count, so every node's count
/// stays an upper bound of the seals made under the key by all nodes. Called
/// with the key's `reserve_lock` held.
async fn reserve_block(store: &dyn KeyStore, key: &DataKey) -> Result<(), StorageError> {
    let block = SEAL_RESERVATION_BLOCK;
    let before = key.reserved.load(Ordering::Acquire);
    let total = u64::try_from(store.reserve_seals(&key.id, block as i64).await?).unwrap_or(0);
    let others = total.saturating_sub(block).saturating_sub(before);
    if others > 0 {
        key.seals.fetch_add(others, Ordering::AcqRel);
    }
    key.reserved.store(total, Ordering::Release);
    Ok(())
}

fn purpose_from_str(s: &str) -> Option<Purpose> {
    [
        Purpose::Pan,
        Purpose::Fingerprint,
        Purpose::Volatile,
        Purpose::Audit,
    ]
    .into_iter()
    .find(|p| p.as_str() == s)
}

fn material_from_bytes(purpose: Purpose, bytes: &[u8]) -> Result<Material, CryptoError> {
    if bytes.len() != 32 {
        return Err(CryptoError::InvalidRecord);
    }
    if purpose.is_mac() {
        Ok(Material::Mac(Box::new(MacKey::new(bytes)?)))
    } else {
        let cipher = Aes256Gcm::new_from_slice(bytes).map_err(|_| CryptoError::InvalidRecord)?;
        Ok(Material::Aead(Box::new(cipher)))
    }
}

impl DataKey {
    /// Whether records sealed under this key may be opened for `owner`.
    fn opens_for(&self, owner: KeyOwner<'_>) -> bool {
        self.owner == owner.as_str() && !self.purpose.is_mac()
    }
}

/// Envelope-mode seal: a fresh random 96-bit nonce, AAD binding owner,
/// record and key id.
fn seal_aead(
    cipher: &Aes256Gcm,
    dek_id: &str,
    owner: KeyOwner<'_>,
    record_id: &str,
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut nonce);
    let mut out =
        Vec::with_capacity(record::header_len(dek_id) + NONCE_LEN + plaintext.len() + TAG_LEN);
    record::write_header(&mut out, dek_id, &nonce);
    let start = out.len();
    out.extend_from_slice(plaintext);
    let sealed = record::with_aad(owner.as_str(), record_id, dek_id, |aad| {
        cipher.encrypt_in_place_detached(Nonce::from_slice(&nonce), aad, &mut out[start..])
    });
    match sealed {
        Ok(tag) => {
            out.extend_from_slice(&tag);
            Ok(out)
        }
        Err(_) => {
            // Never drop the plaintext copy unwiped.
            out.zeroize();
            Err(CryptoError::InvalidRecord)
        }
    }
}

/// Envelope-mode open; the plaintext is returned in zeroizing memory.
fn open_aead(
    cipher: &Aes256Gcm,
    dek_id: &str,
    owner: KeyOwner<'_>,
    record_id: &str,
    parts: &record::RawParts<'_>,
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let body_len = parts.ciphertext_and_tag.len() - TAG_LEN;
    let (body, tag) = parts.ciphertext_and_tag.split_at(body_len);
    let mut buf = Zeroizing::new(body.to_vec());
    record::with_aad(owner.as_str(), record_id, dek_id, |aad| {
        let nonce = Nonce::from_slice(parts.nonce);
        cipher.decrypt_in_place_detached(nonce, aad, &mut buf, Tag::from_slice(tag))
    })
    .map_err(|_| CryptoError::InvalidRecord)?;
    Ok(buf)
}

/// An envelope-mode HMAC-SHA256 key, held as the HMAC state right after
/// keying: the SHA-256 midstates after the `key ⊕ ipad` and `key ⊕ opad`
/// blocks. Each MAC clones it, which saves two of the four SHA-256
/// compressions a short input costs when keying per call (about 100 ns of a
/// seal+open+fingerprint, without which the hot path misses its goal).
///
/// Trade-off: the midstates are key-equivalent (they compute any MAC), and
/// `hmac` 0.12 does not zeroize them. The raw key bytes are not kept at all;
/// on drop the state is overwritten with that of an all-zero key, behind
/// [`std::hint::black_box`] so the store is not optimized away. That is a
/// best-effort wipe, not `zeroize`'s volatile-write guarantee. The per-call
/// copies live on the stack only, exactly as the keyed state did when it was
/// derived per call.
struct MacKey(Hmac<Sha256>);

impl MacKey {
    fn new(key: &[u8]) -> Result<Self, CryptoError> {
        <Hmac<Sha256> as Mac>::new_from_slice(key)
            .map(MacKey)
            .map_err(|_| CryptoError::InvalidRecord)
    }

    fn mac(&self, data: &[u8]) -> [u8; 32] {
        let mut mac = self.0.clone();
        mac.update(data);
        mac.finalize().into_bytes().into()
    }
}

impl Drop for MacKey {
    fn drop(&mut self) {
        if let Ok(blank) = <Hmac<Sha256> as Mac>::new_from_slice(&[0u8; 32]) {
            self.0 = blank;
        }
        std::hint::black_box(&mut self.0);
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keyed_state_macs_like_fresh_hmac() {
        let key = [7u8; 32];
        let prepared = MacKey::new(&key).unwrap();
        for len in [0usize, 1, 19, 55, 56, 63, 64, 65, 200] {
            let data = vec![0xa5u8; len];
            let mut fresh = <Hmac<Sha256> as Mac>::new_from_slice(&key).unwrap();
            fresh.update(&data);
            let want: [u8; 32] = fresh.finalize().into_bytes().into();
            assert_eq!(prepared.mac(&data), want, "len {len}");
            assert_eq!(prepared.mac(&data), want, "len {len}, second use");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn next_seal_block_is_reserved_ahead_of_need() {
        let store = Arc::new(crate::crypto::tests::MemKeyStore::default());
        let kr = Keyring::new(
            crate::testkit::fresh_custodian(),
            store.clone(),
            KeyringConfig::default(),
        );
        let owner = KeyOwner::Merchant("mer_a");
        let first = kr.seal(owner, Purpose::Pan, "c", b"x").await.unwrap();
        let id = record::parse(&first).unwrap().dek_id.to_string();
        let reserved = || async {
            store
                .get_data_key(&id)
                .await
                .unwrap()
                .unwrap()
                .seals_reserved
        };
        assert_eq!(reserved().await, SEAL_RESERVATION_BLOCK as i64);
        for _ in 0..SEAL_RESERVATION_BLOCK - SEAL_PREFETCH_AT {
            kr.seal(owner, Purpose::Pan, "c", b"x").await.unwrap();
        }
        for _ in 0..500 {
            if reserved().await == 2 * SEAL_RESERVATION_BLOCK as i64 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(reserved().await, 2 * SEAL_RESERVATION_BLOCK as i64);
        // Sealing on through the old block's end needs no further reservation.
        for _ in 0..SEAL_PREFETCH_AT {
            kr.seal(owner, Purpose::Pan, "c", b"x").await.unwrap();
        }
        assert_eq!(reserved().await, 2 * SEAL_RESERVATION_BLOCK as i64);
    }

    /// Two vault nodes share one key: a block the other node reserved counts
    /// as used on this one, so neither can undercount the key's seals.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocks_reserved_by_other_nodes_count_as_used() {
        let store = Arc::new(crate::crypto::tests::MemKeyStore::default());
        let custodian = crate::testkit::fresh_custodian();
        let a = Keyring::new(custodian.clone(), store.clone(), KeyringConfig::default());
        let owner = KeyOwner::Merchant("mer_a");
        let first = a.seal(owner, Purpose::Pan, "c", b"x").await.unwrap();
        let id = record::parse(&first).unwrap().dek_id.to_string();
        // Node B loads the key and reserves a block of its own.
        let b = Keyring::new(custodian, store.clone(), KeyringConfig::default());
        b.seal(owner, Purpose::Pan, "c", b"x").await.unwrap();
        let key_a = a.key_by_id(&id).await.unwrap();
        let before = key_a.seals.load(Ordering::Acquire);
        let _guard = key_a.reserve_lock.lock().await;
        reserve_block(store.as_ref(), &key_a).await.unwrap();
        // A's count jumped over B's block.
        assert_eq!(
            key_a.seals.load(Ordering::Acquire),
            before + SEAL_RESERVATION_BLOCK
        );
        assert_eq!(
            key_a.reserved.load(Ordering::Acquire),
            3 * SEAL_RESERVATION_BLOCK
        );
    }
}
