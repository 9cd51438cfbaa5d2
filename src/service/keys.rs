//! Key life cycle use cases: rotating the KEK and merchant wrapping keys
//! (re-wrapping every data key under the new HSM key, retiring the old one
//! and destroying it once nothing references it), rotating data keys,
//! re-encrypting cards to the newest data keys (batched, resumable,
//! idempotent, online), enforcing cryptoperiods, and crypto-shredding a
//! merchant. Every step is audited; a step whose audit entry cannot be
//! written does not happen.

use serde::Serialize;

use super::audit::{system_entry, system_entry_by};
use super::{now, ServiceError, ServiceResult, Vault};
use crate::config::KeysConfig;
use crate::crypto::{label_version, merchant_key_label, KeyOwner, Purpose};
use crate::storage::{AuditEntry, HsmKeyRecord, Reseal, StorageError};

/// Receives progress of long operations (the CLI draws bars with it).
pub trait Progress: Send + Sync {
    fn start(&self, what: &str, total: u64);
    fn advance(&self, n: u64);
    fn finish(&self);
}

/// Progress that goes nowhere.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

/// What a wrapping-key rotation did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WrapRotation {
    pub new_label: String,
    pub retired: Vec<String>,
    pub rewrapped: u64,
    pub destroyed: Vec<String>,
}

/// What a merchant shred did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Shred {
    pub merchant_id: String,
    pub destroyed_hsm_keys: Vec<String>,
}

/// Purposes whose keys rotate. Fingerprint keys never do (deduplication
/// depends on stable fingerprints) and the audit key keeps its own life
/// cycle; both are re-wrapped with their wrapping key.
const ROTATING: [Purpose; 2] = [Purpose::Pan, Purpose::Volatile];
/// Tries for one re-encryption batch before a database outage is reported.
const RESEAL_ATTEMPTS: u32 = 6;

fn owner_of(merchant_id: Option<&str>) -> KeyOwner<'_> {
    merchant_id.map_or(KeyOwner::System, KeyOwner::Merchant)
}

fn label_base(label: &str) -> &str {
    label.rsplit_once("-v").map_or(label, |(b, _)| b)
}

impl Vault {
    /// Rotates the wrapping key of `merchant_id` (its `cardvault-mk-…`) or,
    /// with `None`, the system KEK. After re-wrapping it waits `grace` and
    /// re-wraps again before destroying anything: a node that read the old
    /// label just before the switch may still be inserting a key wrapped
    /// under it, and destroying that KEK would make the new key unreadable.
    pub async fn rotate_wrapping_key(
        &self,
        merchant_id: Option<&str>,
        actor: &str,
        progress: &dyn Progress,
        grace: std::time::Duration,
    ) -> ServiceResult<WrapRotation> {
        let mut out = self.start_rotation(merchant_id, actor, progress).await?;
        tokio::time::sleep(grace).await;
        self.finish_rotation(merchant_id, &mut out, actor).await?;
        Ok(out)
    }

    /// Second half of a rotation, after the grace period: re-wraps what was
    /// created under a retired key meanwhile, then destroys retired keys
    /// nothing references.
    async fn finish_rotation(
        &self,
        merchant_id: Option<&str>,
        out: &mut WrapRotation,
        actor: &str,
    ) -> ServiceResult<()> {
        let kind = if merchant_id.is_some() {
            "merchant"
        } else {
            "kek"
        };
        let retired: Vec<String> = self
            .storage
            .list_hsm_keys()
            .await?
            .into_iter()
            .filter(|k| {
                k.kind == kind && k.merchant_id.as_deref() == merchant_id && k.state == "retired"
            })
            .map(|k| k.label)
            .collect();
        out.rewrapped += self
            .rewrap_all(merchant_id, &retired, &out.new_label, actor, &NoProgress)
            .await?;
        out.destroyed = self.destroy_unreferenced(merchant_id, kind, actor).await?;
        Ok(())
    }

    /// First half of a rotation: new HSM key, old ones retired, data keys
    /// re-wrapped.
    async fn start_rotation(
        &self,
        merchant_id: Option<&str>,
        actor: &str,
        progress: &dyn Progress,
    ) -> ServiceResult<WrapRotation> {
        let owner = owner_of(merchant_id);
        let kind = if merchant_id.is_some() {
            "merchant"
        } else {
            "kek"
        };
        let current = self.keyring.current_wrapping_label(owner).await?;
        let registry = self.storage.list_hsm_keys().await?;
        let mine: Vec<&HsmKeyRecord> = registry
            .iter()
            .filter(|k| k.kind == kind && k.merchant_id.as_deref() == merchant_id)
            .collect();
        let version = mine
            .iter()
            .map(|k| k.version)
            .max()
            .unwrap_or(1)
            .max(label_version(&current))
            + 1;
        let new_label = format!("{}-v{version}", label_base(&current));
        self.keyring.hsm_ensure_wrapping_key(&new_label).await?;
        let at = now();
        // Registered as active first: from here on, new data keys anywhere
        // are wrapped under it.
        self.storage
            .register_hsm_key(&HsmKeyRecord {
                label: new_label.clone(),
                kind: kind.to_string(),
                merchant_id: merchant_id.map(str::to_string),
                version,
                state: "active".to_string(),
                created_at: at,
                retired_at: None,
                destroyed_at: None,
            })
            .await?;
        let mut entry = system_entry_by(
            actor,
            "key.rotate",
            Some(&new_label),
            "success",
            Some(&format!("kind={kind} replaces={current}")),
        );
        entry.merchant_id = merchant_id.map(str::to_string);
        self.record(entry).await?;
        let mut out = WrapRotation {
            new_label: new_label.clone(),
            ..WrapRotation::default()
        };
        let mut old_labels: Vec<String> = mine
            .iter()
            .filter(|k| k.state != "destroyed" && k.label != new_label)
            .map(|k| k.label.clone())
            .collect();
        if !old_labels.contains(&current) {
            old_labels.push(current.clone());
        }
        for label in &old_labels {
            if mine
                .iter()
                .any(|k| &k.label == label && k.state == "retired")
            {
                continue;
            }
            let mut e = system_entry_by(
                actor,
                "key.retire",
                Some(label),
                "success",
                Some(&format!("kind={kind} successor={new_label}")),
            );
            e.merchant_id = merchant_id.map(str::to_string);
            self.storage
                .set_hsm_key_state(label, "retired", now(), &e)
                .await?;
            out.retired.push(label.clone());
        }
        out.rewrapped = self
            .rewrap_all(merchant_id, &old_labels, &new_label, actor, progress)
            .await?;
        Ok(out)
    }

    /// Re-wraps every data key of this owner still under one of
    /// `old_labels`; returns how many.
    async fn rewrap_all(
        &self,
        merchant_id: Option<&str>,
        old_labels: &[String],
        new_label: &str,
        actor: &str,
        progress: &dyn Progress,
    ) -> ServiceResult<u64> {
        let mut done = 0;
        // Re-wrap every data key still under an old wrapping key.
        let stale: Vec<_> = self
            .storage
            .list_data_keys()
            .await?
            .into_iter()
            .filter(|k| {
                k.merchant_id.as_deref() == merchant_id
                    && k.wrapped.is_some()
                    && old_labels.contains(&k.wrapping_label)
            })
            .collect();
        progress.start("re-wrapping data keys", stale.len() as u64);
        for rec in stale {
            let wrapped = self.keyring.rewrap(&rec, new_label).await?;
            let mut e = system_entry_by(
                actor,
                "key.rewrap",
                Some(&rec.id),
                "success",
                Some(&format!(
                    "purpose={} from={} to={new_label}",
                    rec.purpose, rec.wrapping_label
                )),
            );
            e.merchant_id = rec.merchant_id.clone();
            if self
                .storage
                .rewrap_data_key(&rec.id, &rec.wrapping_label, new_label, &wrapped, &e)
                .await?
            {
                done += 1;
            }
            progress.advance(1);
        }
        progress.finish();
        Ok(done)
    }

    /// Destroys retired wrapping keys of this owner that no data key
    /// references any more.
    async fn destroy_unreferenced(
        &self,
        merchant_id: Option<&str>,
        kind: &str,
        actor: &str,
    ) -> ServiceResult<Vec<String>> {
        let keys = self.storage.list_data_keys().await?;
        let mut destroyed = Vec::new();
        for k in self.storage.list_hsm_keys().await? {
            if k.kind != kind || k.merchant_id.as_deref() != merchant_id || k.state != "retired" {
                continue;
            }
            if keys.iter().any(|d| d.wrapping_label == k.label) {
                continue;
            }
            let mut e = system_entry_by(
                actor,
                "key.destroy",
                Some(&k.label),
                "success",
                Some(&format!("kind={kind} unreferenced")),
            );
            e.merchant_id = merchant_id.map(str::to_string);
            // Recorded first: if the trail cannot be written the key stays.
            self.storage
                .set_hsm_key_state(&k.label, "destroyed", now(), &e)
                .await?;
            self.keyring.hsm_destroy(&k.label).await?;
            destroyed.push(k.label);
        }
        Ok(destroyed)
    }

    /// Rotates the wrapping keys of every merchant that has data keys.
    pub async fn rotate_all_merchant_keys(
        &self,
        actor: &str,
        progress: &dyn Progress,
        grace: std::time::Duration,
    ) -> ServiceResult<Vec<WrapRotation>> {
        let mut merchants: Vec<String> = self
            .storage
            .list_data_keys()
            .await?
            .into_iter()
            .filter(|k| k.mode == "envelope")
            .filter_map(|k| k.merchant_id)
            .collect();
        merchants.sort();
        merchants.dedup();
        let mut out = Vec::new();
        for m in &merchants {
            out.push(self.start_rotation(Some(m), actor, progress).await?);
        }
        // One grace period for all of them.
        tokio::time::sleep(grace).await;
        for (m, rotation) in merchants.iter().zip(out.iter_mut()) {
            self.finish_rotation(Some(m), rotation, actor).await?;
        }
        Ok(out)
    }

    /// New data keys (PAN and volatile) for new seals, for one merchant or
    /// every owner; the old ones are retired (they still open what they
    /// sealed until `reencrypt` moves it). Returns `(old, new)` key ids.
    pub async fn rotate_data_keys(
        &self,
        merchant_id: Option<&str>,
        actor: &str,
    ) -> ServiceResult<Vec<(String, String)>> {
        let current: Vec<_> = self
            .storage
            .list_data_keys()
            .await?
            .into_iter()
            .filter(|k| k.retired_at.is_none())
            .filter(|k| ROTATING.iter().any(|p| p.as_str() == k.purpose))
            .filter(|k| merchant_id.is_none() || k.merchant_id.as_deref() == merchant_id)
            .collect();
        let mut out = Vec::new();
        for rec in current {
            let Some(purpose) = ROTATING.into_iter().find(|p| p.as_str() == rec.purpose) else {
                continue;
            };
            out.push(
                self.rotate_one(&rec, purpose, actor, "operator request")
                    .await?,
            );
        }
        Ok(out)
    }

    async fn rotate_one(
        &self,
        rec: &crate::storage::DataKeyRecord,
        purpose: Purpose,
        actor: &str,
        reason: &str,
    ) -> ServiceResult<(String, String)> {
        let owner = owner_of(rec.merchant_id.as_deref());
        let current = self
            .storage
            .current_data_key(rec.merchant_id.as_deref(), &rec.purpose)
            .await?;
        // Only the current version gets a successor; an older one still
        // unretired (e.g. replaced at its seal limit) is simply retired.
        let new_id = if current.is_some_and(|c| c.id == rec.id) {
            self.keyring.rotate_data_key(owner, purpose).await?.1
        } else {
            self.storage
                .current_data_key(rec.merchant_id.as_deref(), &rec.purpose)
                .await?
                .map(|c| c.id)
                .unwrap_or_default()
        };
        let mut e = system_entry_by(
            actor,
            "key.retire",
            Some(&rec.id),
            "success",
            Some(&format!(
                "purpose={} reason={reason} successor={new_id}",
                rec.purpose
            )),
        );
        e.merchant_id = rec.merchant_id.clone();
        self.storage.retire_data_key(&rec.id, now(), &e).await?;
        let mut r = system_entry_by(
            actor,
            "key.rotate",
            Some(&new_id),
            "success",
            Some(&format!("purpose={} replaces={}", rec.purpose, rec.id)),
        );
        r.merchant_id = rec.merchant_id.clone();
        self.record(r).await?;
        Ok((rec.id.clone(), new_id))
    }

    /// Re-seals every card under a retired data key with the owner's
    /// newest key, `batch` cards per transaction. Safe to run while the API
    /// serves (a card changed or deleted meanwhile is skipped), to interrupt
    /// at any point and to run again. `limit` stops after that many cards
    /// (for tests and throttled runs). Returns the cards re-sealed.
    pub async fn reencrypt(
        &self,
        batch: u32,
        limit: Option<u64>,
        actor: &str,
        progress: &dyn Progress,
    ) -> ServiceResult<u64> {
        let total = self.storage.count_stale_cards().await?;
        progress.start("re-encrypting cards", u64::try_from(total).unwrap_or(0));
        let mut after = 0;
        let mut done = 0u64;
        loop {
            let room = limit.map_or(u64::from(batch), |l| {
                l.saturating_sub(done).min(u64::from(batch))
            });
            if room == 0 {
                break;
            }
            let page = self
                .storage
                .stale_cards(after, u32::try_from(room).unwrap_or(batch))
                .await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            let mut reseals = Vec::with_capacity(page.len());
            for card in &page {
                let owner = KeyOwner::Merchant(&card.merchant_id);
                let plain = self
                    .keyring
                    .open(owner, &card.id, &card.pan_ciphertext)
                    .await?;
                let sealed = self
                    .keyring
                    .seal(owner, Purpose::Pan, &card.id, &plain)
                    .await?;
                let new_dek_id = crate::crypto::record::parse(&sealed)
                    .map_err(|_| ServiceError::Internal("fresh seal does not parse".into()))?
                    .dek_id
                    .to_string();
                reseals.push(Reseal {
                    id: card.id.clone(),
                    old_dek_id: card.dek_id.clone(),
                    new_dek_id,
                    pan_ciphertext: sealed,
                });
            }
            let entry = system_entry_by(actor, "key.reencrypt", None, "success", None);
            done += self.reseal_with_retry(&reseals, &entry).await?;
            progress.advance(page.len() as u64);
        }
        progress.finish();
        Ok(done)
    }

    /// Writes one batch of re-sealed cards, riding out short database
    /// outages (a busy SQLite file under load, a PostgreSQL fail-over): the
    /// batch is idempotent (each row is only updated while it still holds
    /// the old key), so trying again is always safe.
    async fn reseal_with_retry(
        &self,
        reseals: &[Reseal],
        entry: &AuditEntry,
    ) -> ServiceResult<u64> {
        let mut delay = std::time::Duration::from_millis(100);
        for _ in 0..RESEAL_ATTEMPTS - 1 {
            match self.storage.reseal_cards(reseals, entry).await {
                Err(StorageError::Unavailable(e)) => {
                    tracing::warn!(error = %e, "re-encryption batch: database unavailable; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(5));
                }
                other => return Ok(other?),
            }
        }
        Ok(self.storage.reseal_cards(reseals, entry).await?)
    }

    /// One maintenance pass of a serving node: retire data keys past their
    /// cryptoperiod (a successor takes over), then drop every cached key
    /// retired here or elsewhere so new seals use the newest version.
    pub async fn key_maintenance(&self, cfg: &KeysConfig) -> ServiceResult<usize> {
        let period = i64::try_from(cfg.data_key_cryptoperiod_days.saturating_mul(86_400))
            .unwrap_or(i64::MAX);
        let cutoff = now().saturating_sub(period);
        let mut rotated = 0;
        let candidates = self.keyring.cached_current_ids();
        let keys = self.storage.list_data_keys().await?;
        for rec in &keys {
            if rec.retired_at.is_some() || rec.created_at > cutoff {
                continue;
            }
            let Some(purpose) = ROTATING.into_iter().find(|p| p.as_str() == rec.purpose) else {
                continue;
            };
            self.rotate_one(rec, purpose, "system", "cryptoperiod")
                .await?;
            rotated += 1;
        }
        // Read again when something was rotated: the successors are live.
        let keys = if rotated > 0 {
            self.storage.list_data_keys().await?
        } else {
            keys
        };
        let existing = keys.iter().map(|k| k.id.clone()).collect();
        let live = keys
            .iter()
            .filter(|k| k.retired_at.is_none())
            .map(|k| k.id.clone())
            .collect();
        self.keyring.drop_keys_not_in(&candidates, &live, &existing);
        Ok(rotated)
    }

    /// Crypto-shreds a merchant: destroys its HSM wrapping keys (and, in
    /// `hsm` mode, its data keys, which live in the HSM), so its ciphertext
    /// can never be opened again, backups included; then deletes its rows.
    pub async fn shred_merchant(&self, merchant_id: &str, actor: &str) -> ServiceResult<Shred> {
        if self.storage.get_merchant(merchant_id).await?.is_none() {
            return Err(ServiceError::not_found("merchant", "merchant"));
        }
        let mut labels: Vec<String> = self
            .storage
            .list_hsm_keys()
            .await?
            .into_iter()
            .filter(|k| k.merchant_id.as_deref() == Some(merchant_id))
            .map(|k| k.label)
            .collect();
        labels.push(merchant_key_label(merchant_id));
        for k in self.storage.list_data_keys().await? {
            if k.merchant_id.as_deref() == Some(merchant_id) {
                labels.push(k.wrapping_label);
            }
        }
        labels.sort();
        labels.dedup();
        let mut start = system_entry_by(
            actor,
            "merchant.shred",
            Some(merchant_id),
            "started",
            Some(&format!("hsm_keys={}", labels.len())),
        );
        start.merchant_id = Some(merchant_id.to_string());
        self.record(start).await?;
        let mut out = Shred {
            merchant_id: merchant_id.to_string(),
            ..Shred::default()
        };
        for label in labels {
            if self.keyring.hsm_destroy(&label).await? {
                let mut e = system_entry_by(
                    actor,
                    "key.destroy",
                    Some(&label),
                    "success",
                    Some("reason=merchant shred"),
                );
                e.merchant_id = Some(merchant_id.to_string());
                self.record(e).await?;
                out.destroyed_hsm_keys.push(label);
            }
        }
        self.keyring.evict_owner(KeyOwner::Merchant(merchant_id));
        let mut done = system_entry_by(
            actor,
            "merchant.shred",
            Some(merchant_id),
            "success",
            Some(&format!("destroyed={}", out.destroyed_hsm_keys.len())),
        );
        done.merchant_id = Some(merchant_id.to_string());
        self.storage
            .delete_merchant_rows(merchant_id, &done)
            .await?;
        Ok(out)
    }

    /// Revokes an API key (takes effect on every node within the auth
    /// cache's lifetime).
    pub async fn revoke_api_key(&self, key_id: &str, actor: &str) -> ServiceResult<()> {
        let key = self
            .storage
            .list_api_keys()
            .await?
            .into_iter()
            .find(|k| k.id == key_id)
            .ok_or_else(|| ServiceError::not_found("api_key", "key"))?;
        let mut e: AuditEntry = system_entry_by(
            actor,
            "api_key.revoke",
            Some(key_id),
            "success",
            Some(&format!("kind={}", key.kind.as_str())),
        );
        e.merchant_id = Some(key.merchant_id);
        match self.storage.revoke_api_key(key_id, now(), &e).await {
            Err(StorageError::NotFound) => Err(ServiceError::not_found("api_key", "key")),
            other => Ok(other?),
        }
    }

    /// Records a service start or stop.
    pub async fn record_lifecycle(&self, event: &str, detail: &str) -> ServiceResult<()> {
        self.record(system_entry(event, None, "success", Some(detail)))
            .await
    }
}
