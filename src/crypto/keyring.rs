//! The keyring: data keys per owner (merchant or system) and purpose, created
//! on first use, stored wrapped, unwrapped once and cached, and counted
//! against their seal limit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use cardvault_hsm::{HsmError, KeyCustodian, KeyPurpose, GCM_IV_LEN};
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::record::{self, NONCE_LEN, TAG_LEN};
use super::{CryptoError, CryptoMode};
use crate::domain::new_id;
use crate::storage::{DataKeyRecord, KeyStore, StorageError};

/// Seals reserved in the database per round trip. A crash wastes at most
/// this many seals of a key's budget; it can never reuse any.
const SEAL_RESERVATION_BLOCK: u64 = 16_384;

/// NIST SP 800-38D: at most 2^32 invocations of GCM with random 96-bit IVs
/// under one key.
pub const DEFAULT_SEAL_LIMIT: u64 = 1 << 32;

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
}

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
}

impl Default for KeyringConfig {
    fn default() -> Self {
        KeyringConfig {
            mode: CryptoMode::Envelope,
            kek_label: "cardvault-kek-v1".to_string(),
            seal_limit: DEFAULT_SEAL_LIMIT,
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
    /// Envelope-mode MAC key.
    Mac(Zeroizing<[u8; 32]>),
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

type OwnerMap = HashMap<String, Arc<DataKey>>;

/// Data keys by owner and purpose, backed by the HSM and the key store.
pub struct Keyring {
    custodian: Arc<dyn KeyCustodian>,
    store: Arc<dyn KeyStore>,
    cfg: KeyringConfig,
    by_id: RwLock<HashMap<String, Arc<DataKey>>>,
    current: RwLock<HashMap<Purpose, OwnerMap>>,
    /// Serializes key creation so concurrent first uses make one key.
    create_lock: tokio::sync::Mutex<()>,
}

impl Keyring {
    pub fn new(
        custodian: Arc<dyn KeyCustodian>,
        store: Arc<dyn KeyStore>,
        cfg: KeyringConfig,
    ) -> Self {
        Keyring {
            custodian,
            store,
            cfg,
            by_id: RwLock::new(HashMap::new()),
            current: RwLock::new(HashMap::new()),
            create_lock: tokio::sync::Mutex::new(()),
        }
    }

    pub fn mode(&self) -> CryptoMode {
        self.cfg.mode
    }

    /// Makes sure the KEK exists in the HSM (used by `hsm init` and start-up).
    pub async fn ensure_kek(&self) -> Result<(), CryptoError> {
        let label = self.cfg.kek_label.clone();
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
        let mut key = self.current_key(owner, purpose).await?;
        // At most one successor per call: a fresh key has its whole budget.
        if !self.take_seal_slot(&key).await? {
            key = self.rotate_exhausted(owner, purpose, &key).await?;
            if !self.take_seal_slot(&key).await? {
                return Err(CryptoError::KeyExhausted);
            }
        }
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let aad = record::aad(owner.as_str(), record_id, &key.id);
        let mut out =
            Vec::with_capacity(record::header_len(&key.id) + NONCE_LEN + plaintext.len() + TAG_LEN);
        record::write_header(&mut out, &key.id, &nonce);
        match &key.material {
            Material::Aead(cipher) => {
                let start = out.len();
                out.extend_from_slice(plaintext);
                let tag = cipher
                    .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, &mut out[start..])
                    .map_err(|_| CryptoError::InvalidRecord)?;
                out.extend_from_slice(&tag);
            }
            Material::Hsm(label) => {
                let label = label.clone();
                let data = Zeroizing::new(plaintext.to_vec());
                let ct = self
                    .hsm(move |c| c.encrypt(&label, &nonce, &aad, &data))
                    .await?;
                out.extend_from_slice(&ct);
            }
            Material::Mac(_) => return Err(CryptoError::KeyNotFound),
        }
        Ok(out)
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
        let parts = record::parse(sealed)?;
        let key = match self.key_by_id(parts.dek_id).await {
            Ok(k) => k,
            // A record naming a key that does not exist or is not the
            // owner's is indistinguishable from a tampered one.
            Err(CryptoError::KeyNotFound) => return Err(CryptoError::InvalidRecord),
            Err(e) => return Err(e),
        };
        if key.owner != owner.as_str() || key.purpose.is_mac() {
            return Err(CryptoError::InvalidRecord);
        }
        let aad = record::aad(owner.as_str(), record_id, &key.id);
        match &key.material {
            Material::Aead(cipher) => {
                let body_len = parts.ciphertext_and_tag.len() - TAG_LEN;
                let (body, tag) = parts.ciphertext_and_tag.split_at(body_len);
                let mut buf = Zeroizing::new(body.to_vec());
                cipher
                    .decrypt_in_place_detached(
                        Nonce::from_slice(parts.nonce),
                        &aad,
                        &mut buf,
                        Tag::from_slice(tag),
                    )
                    .map_err(|_| CryptoError::InvalidRecord)?;
                Ok(buf)
            }
            Material::Hsm(label) => {
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
        let key = self.current_key(owner, purpose).await?;
        match &key.material {
            Material::Mac(k) => {
                let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(k.as_slice())
                    .map_err(|_| CryptoError::KeyNotFound)?;
                mac.update(data);
                Ok(mac.finalize().into_bytes().into())
            }
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
        write(&self.by_id).retain(|_, k| k.owner != owner);
        for map in write(&self.current).values_mut() {
            map.remove(owner);
        }
    }

    async fn hsm<T, F>(&self, f: F) -> Result<T, CryptoError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn KeyCustodian) -> Result<T, HsmError> + Send + 'static,
    {
        let custodian = Arc::clone(&self.custodian);
        tokio::task::spawn_blocking(move || f(custodian.as_ref()))
            .await
            .map_err(|e| CryptoError::Task(e.to_string()))?
            .map_err(CryptoError::from)
    }

    /// The owner's current key for `purpose`: from the cache, else loaded
    /// from the store, else created.
    async fn current_key(
        &self,
        owner: KeyOwner<'_>,
        purpose: Purpose,
    ) -> Result<Arc<DataKey>, CryptoError> {
        if let Some(k) = read(&self.current)
            .get(&purpose)
            .and_then(|m| m.get(owner.as_str()))
        {
            return Ok(Arc::clone(k));
        }
        let _guard = self.create_lock.lock().await;
        if let Some(k) = read(&self.current)
            .get(&purpose)
            .and_then(|m| m.get(owner.as_str()))
        {
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
        write(&self.by_id).insert(key.id.clone(), Arc::clone(key));
        write(&self.current)
            .entry(purpose)
            .or_default()
            .insert(owner.as_str().to_string(), Arc::clone(key));
    }

    /// Replaces an exhausted current key with a new version.
    async fn rotate_exhausted(
        &self,
        owner: KeyOwner<'_>,
        purpose: Purpose,
        exhausted: &Arc<DataKey>,
    ) -> Result<Arc<DataKey>, CryptoError> {
        let _guard = self.create_lock.lock().await;
        if let Some(k) = read(&self.current)
            .get(&purpose)
            .and_then(|m| m.get(owner.as_str()))
        {
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
        if let Some(k) = read(&self.by_id).get(id) {
            return Ok(Arc::clone(k));
        }
        let rec = self
            .store
            .get_data_key(id)
            .await?
            .ok_or(CryptoError::KeyNotFound)?;
        let key = self.load(&rec).await?;
        write(&self.by_id).insert(key.id.clone(), Arc::clone(&key));
        Ok(key)
    }

    /// Reserves a seal; `false` when the key's budget is spent.
    async fn take_seal_slot(&self, key: &DataKey) -> Result<bool, CryptoError> {
        let n = key.seals.fetch_add(1, Ordering::Relaxed);
        if n >= self.cfg.seal_limit {
            return Ok(false);
        }
        if n < key.reserved.load(Ordering::Acquire) {
            return Ok(true);
        }
        let _guard = key.reserve_lock.lock().await;
        while n >= key.reserved.load(Ordering::Acquire) {
            let total = self
                .store
                .reserve_seals(&key.id, SEAL_RESERVATION_BLOCK as i64)
                .await?;
            key.reserved
                .store(u64::try_from(total).unwrap_or(0), Ordering::Release);
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
        let id = new_id("dek");
        let owner_str = owner.as_str().to_string();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let (material, wrapped, wrapping_label) = match self.cfg.mode {
            CryptoMode::Envelope => {
                let label = match owner {
                    KeyOwner::Merchant(m) => merchant_key_label(m),
                    KeyOwner::System => self.cfg.kek_label.clone(),
                };
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
            mode: self.cfg.mode.as_str().to_string(),
            wrapped,
            wrapping_label,
            seals_reserved: 0,
            created_at: now,
            retired_at: None,
        };
        match self.store.insert_data_key(&rec).await {
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
        let mut k = Zeroizing::new([0u8; 32]);
        k.copy_from_slice(bytes);
        Ok(Material::Mac(k))
    } else {
        let cipher = Aes256Gcm::new_from_slice(bytes).map_err(|_| CryptoError::InvalidRecord)?;
        Ok(Material::Aead(Box::new(cipher)))
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}
