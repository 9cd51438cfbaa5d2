//! Keyring extensions for the audit trail and key life cycle: the audit MAC
//! key, HSM-signed checkpoints, wrapping-key resolution through the HSM key
//! registry, data-key rotation and re-wrapping under a new HSM key. None of
//! this is on the seal/open path: it runs at key creation, from operator
//! commands and from background maintenance.

use subtle::ConstantTimeEq;

use super::*;
use crate::storage::{AuditEntry, AuditSealer, HsmKeyRecord};

/// Label of the HSM HMAC key that signs audit checkpoints.
pub const AUDIT_HSM_LABEL: &str = "cardvault-audit-v1";

/// The audit MAC key, unwrapped in memory (zeroized on drop). Always an
/// envelope key wrapped by the KEK, in both crypto modes: the MAC runs
/// inside database transactions and must not wait on the HSM.
pub struct AuditMacKey {
    key: Arc<DataKey>,
}

impl AuditSealer for AuditMacKey {
    fn key_id(&self) -> &str {
        &self.key.id
    }

    fn mac(&self, data: &[u8]) -> [u8; 32] {
        match &self.key.material {
            Material::Mac(k) => k.mac(data),
            // `mac_key` only builds an `AuditMacKey` around a MAC key.
            _ => [0u8; 32],
        }
    }
}

impl AuditMacKey {
    /// Constant-time check of a stored MAC.
    pub fn verify(&self, data: &[u8], mac: &[u8]) -> bool {
        bool::from(self.mac(data).as_slice().ct_eq(mac))
    }
}

/// The version of a label ending in `-v{n}` (1 otherwise).
pub fn label_version(label: &str) -> i64 {
    label
        .rsplit_once("-v")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(1)
}

/// The audit entry recording a change to a data key (ids and labels only).
pub(super) fn key_audit(event: &str, rec: &DataKeyRecord) -> AuditEntry {
    AuditEntry {
        at: time::OffsetDateTime::now_utc().unix_timestamp(),
        actor: "system".to_string(),
        merchant_id: rec.merchant_id.clone(),
        event: event.to_string(),
        resource: Some(rec.id.clone()),
        outcome: "success".to_string(),
        detail: Some(format!(
            "purpose={} version={} mode={} wrapping_label={}",
            rec.purpose, rec.version, rec.mode, rec.wrapping_label
        )),
        ..AuditEntry::default()
    }
}

impl Keyring {
    /// The HSM key new data keys of `owner` are wrapped under: the newest
    /// active one in the registry, else the configured/default label (which
    /// is then registered).
    pub(super) async fn wrapping_label(&self, owner: KeyOwner<'_>) -> Result<String, CryptoError> {
        let (kind, default) = match owner {
            KeyOwner::Merchant(m) => ("merchant", merchant_key_label(m)),
            KeyOwner::System => ("kek", self.cfg.kek_label.clone()),
        };
        if let Some(label) = self.store.active_hsm_key(kind, owner.merchant_id()).await? {
            return Ok(label);
        }
        self.store
            .register_hsm_key(&HsmKeyRecord {
                version: label_version(&default),
                label: default.clone(),
                kind: kind.to_string(),
                merchant_id: owner.merchant_id().map(str::to_string),
                state: "active".to_string(),
                created_at: time::OffsetDateTime::now_utc().unix_timestamp(),
                retired_at: None,
                destroyed_at: None,
            })
            .await?;
        Ok(default)
    }

    /// The HSM key new data keys of `owner` are wrapped under.
    pub async fn current_wrapping_label(&self, owner: KeyOwner<'_>) -> Result<String, CryptoError> {
        self.wrapping_label(owner).await
    }

    /// The current KEK label (see [`Keyring::ensure_kek`]).
    pub async fn kek_label(&self) -> Result<String, CryptoError> {
        self.wrapping_label(KeyOwner::System).await
    }

    /// The audit MAC key, created (wrapped by the KEK) on first use. The
    /// flag tells whether it was created now, so the caller can record that
    /// once the audit trail can be written.
    pub async fn audit_key(&self) -> Result<(Arc<AuditMacKey>, bool), CryptoError> {
        let _guard = self.create_lock.lock().await;
        let (key, created) = match self
            .store
            .current_data_key(None, Purpose::Audit.as_str())
            .await?
        {
            Some(rec) if rec.mode == CryptoMode::Envelope.as_str() => {
                (self.load(&rec).await?, false)
            }
            other => {
                let version = other.map_or(1, |r| r.version + 1);
                let key = self
                    .create_in(
                        KeyOwner::System,
                        Purpose::Audit,
                        version,
                        CryptoMode::Envelope,
                        false,
                    )
                    .await?;
                (key, true)
            }
        };
        write(&self.cache)
            .by_id
            .insert(id_key(&key.id), Arc::clone(&key));
        Ok((mac_key(&key)?, created))
    }

    /// An audit MAC key by id (for verifying entries sealed under any
    /// version).
    pub async fn audit_key_by_id(&self, id: &str) -> Result<Arc<AuditMacKey>, CryptoError> {
        let key = self.key_by_id(id).await?;
        if key.owner != KeyOwner::System.as_str() || key.purpose != Purpose::Audit {
            return Err(CryptoError::KeyNotFound);
        }
        mac_key(&key)
    }

    /// HMAC-SHA256 of a checkpoint inside the HSM, under
    /// [`AUDIT_HSM_LABEL`] (created on first use).
    pub async fn sign_checkpoint(&self, data: Vec<u8>) -> Result<[u8; 32], CryptoError> {
        self.hsm(move |c| {
            c.ensure_key(AUDIT_HSM_LABEL, KeyPurpose::Mac)?;
            c.hmac_sha256(AUDIT_HSM_LABEL, &data)
        })
        .await
    }

    /// Creates a new version of the owner's `purpose` key and makes it
    /// current in this process. Returns the key it replaces (to be retired
    /// by the caller) and the new key's id.
    pub async fn rotate_data_key(
        &self,
        owner: KeyOwner<'_>,
        purpose: Purpose,
    ) -> Result<(Option<DataKeyRecord>, String), CryptoError> {
        let _guard = self.create_lock.lock().await;
        let old = self
            .store
            .current_data_key(owner.merchant_id(), purpose.as_str())
            .await?;
        let version = old.as_ref().map_or(1, |r| r.version + 1);
        let key = self.create(owner, purpose, version).await?;
        self.install_current(owner, purpose, &key);
        Ok((old, key.id.clone()))
    }

    /// Ids of the current keys cached now (take this before reading the
    /// store for [`Keyring::drop_keys_not_in`]).
    pub fn cached_current_ids(&self) -> std::collections::HashSet<String> {
        read(&self.cache)
            .current
            .iter()
            .flat_map(|m| m.values().map(|k| k.id.clone()))
            .collect()
    }

    /// Drops every cached key among `candidates` that is not in `live` (the
    /// ids of the data keys in the store that are not retired), so the next
    /// seal picks the newest version. Keys cached after `candidates` was
    /// taken are left alone (the store listing may predate them). An owner whose current key no longer exists at all
    /// (a shredded merchant) loses every cached key. Returns how many
    /// current keys were dropped.
    pub fn drop_keys_not_in(
        &self,
        candidates: &std::collections::HashSet<String>,
        live: &std::collections::HashSet<String>,
        existing: &std::collections::HashSet<String>,
    ) -> usize {
        let mut dropped = 0;
        let mut gone_owners = Vec::new();
        let mut cache = write(&self.cache);
        for map in cache.current.iter_mut() {
            map.retain(|owner, k| {
                if live.contains(&k.id) || !candidates.contains(&k.id) {
                    return true;
                }
                if !existing.contains(&k.id) {
                    gone_owners.push(owner.clone());
                }
                dropped += 1;
                false
            });
        }
        if !gone_owners.is_empty() {
            cache.by_id.retain(|_, k| !gone_owners.contains(&k.owner));
        }
        dropped
    }

    /// Unwraps an envelope data key and wraps it again under `new_label`;
    /// returns the new `iv ‖ ciphertext ‖ tag`. The key bytes exist only
    /// inside this call.
    pub async fn rewrap(
        &self,
        rec: &DataKeyRecord,
        new_label: &str,
    ) -> Result<Vec<u8>, CryptoError> {
        let wrapped = rec.wrapped.as_ref().ok_or(CryptoError::KeyNotFound)?;
        if wrapped.len() < GCM_IV_LEN {
            return Err(CryptoError::InvalidRecord);
        }
        let (iv, ct) = wrapped.split_at(GCM_IV_LEN);
        let iv: [u8; GCM_IV_LEN] = iv.try_into().map_err(|_| CryptoError::InvalidRecord)?;
        let ct = ct.to_vec();
        let owner = rec
            .merchant_id
            .clone()
            .unwrap_or_else(|| "system".to_string());
        let aad = record::wrap_aad(&rec.id, &owner, &rec.purpose);
        let (old, new) = (rec.wrapping_label.clone(), new_label.to_string());
        let mut new_iv = [0u8; GCM_IV_LEN];
        OsRng.fill_bytes(&mut new_iv);
        let ct = self
            .hsm(move |c| {
                let bytes = c.decrypt(&old, &iv, &aad, &ct)?;
                c.encrypt(&new, &new_iv, &aad, &bytes)
            })
            .await?;
        let mut out = new_iv.to_vec();
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Creates (or finds) an HSM key-encryption key with this label.
    pub async fn hsm_ensure_wrapping_key(&self, label: &str) -> Result<(), CryptoError> {
        let l = label.to_string();
        self.hsm(move |c| c.ensure_key(&l, KeyPurpose::KeyEncryption))
            .await
            .map(|_| ())
    }

    /// Destroys an HSM key; `false` when there was none.
    pub async fn hsm_destroy(&self, label: &str) -> Result<bool, CryptoError> {
        let l = label.to_string();
        self.hsm(move |c| c.destroy_key(&l)).await
    }

    /// Every key object in the token (attributes only).
    pub async fn hsm_inventory(&self) -> Result<Vec<cardvault_hsm::KeyInfo>, CryptoError> {
        self.hsm(|c| c.inventory()).await
    }
}

fn mac_key(key: &Arc<DataKey>) -> Result<Arc<AuditMacKey>, CryptoError> {
    match &key.material {
        Material::Mac(_) => Ok(Arc::new(AuditMacKey {
            key: Arc::clone(key),
        })),
        _ => Err(CryptoError::KeyNotFound),
    }
}
