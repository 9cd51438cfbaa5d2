//! Merchants, API keys and authentication. Keys are stored only as SHA-256
//! hashes; a presented key is hashed, looked up, and the stored hash compared
//! in constant time. Recently seen keys are cached for a few seconds so the
//! hot path does not hit the database for every request.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{now, ServiceError, ServiceResult, Vault};
use crate::domain::{new_id, random_secret};
use crate::storage::{ApiKeyKind, ApiKeyRecord, AuditEntry, MerchantRecord};

/// How long a verified key stays cached. Revoking a key takes effect on
/// every node within this time.
const CACHE_TTL: Duration = Duration::from_secs(10);
const CACHE_MAX: usize = 10_000;
/// A key's `last_used_at` is written at most this often per node. When a
/// busy key drops out of the cache, every connection using it misses at
/// once: without this, each of them wrote the same row (64 writes in one
/// batch in the load run). Inactivity is reported in days, so a minute of
/// precision loses nothing.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// Permissions beyond the default ones of a secret key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Read card numbers back out of the vault.
    CardsReveal,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::CardsReveal => "cards:reveal",
        }
    }
}

/// An authenticated API key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub key_id: String,
    pub merchant_id: String,
    pub kind: ApiKeyKind,
    pub scopes: Vec<String>,
}

impl Principal {
    pub fn has_scope(&self, scope: Scope) -> bool {
        self.scopes.iter().any(|s| s == scope.as_str())
    }
}

/// A newly created merchant and its keys, shown once (serialized for the
/// operator; `Debug` never prints the secret key).
#[derive(serde::Serialize)]
pub struct NewMerchant {
    pub merchant_id: String,
    pub secret_key: String,
    pub publishable_key: String,
}

impl std::fmt::Debug for NewMerchant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewMerchant")
            .field("merchant_id", &self.merchant_id)
            .field("secret_key", &"<redacted>")
            .field("publishable_key", &self.publishable_key)
            .finish()
    }
}

#[derive(Default)]
pub(super) struct KeyCache {
    entries: RwLock<HashMap<[u8; 32], (Principal, Instant)>>,
    /// When this node last recorded each key's use, by key id.
    touched: Mutex<HashMap<String, Instant>>,
}

fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl Vault {
    /// Creates a merchant with a secret and a publishable key.
    pub async fn create_merchant(&self, name: &str, reveal: bool) -> ServiceResult<NewMerchant> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 200 {
            return Err(ServiceError::invalid(
                "name",
                "invalid_name",
                "merchant name must have 1 to 200 characters",
            ));
        }
        let merchant_id = new_id("mer");
        let secret_key = random_secret("sk_live");
        let publishable_key = random_secret("pk_live");
        let at = now();
        let mut scopes = Vec::new();
        if reveal {
            scopes.push(super::Scope::CardsReveal.as_str().to_string());
        }
        let keys = [
            ApiKeyRecord {
                id: new_id("key"),
                merchant_id: merchant_id.clone(),
                kind: ApiKeyKind::Secret,
                hash: hash_key(&secret_key),
                scopes,
                created_at: at,
                last_used_at: None,
                revoked_at: None,
            },
            ApiKeyRecord {
                id: new_id("key"),
                merchant_id: merchant_id.clone(),
                kind: ApiKeyKind::Publishable,
                hash: hash_key(&publishable_key),
                scopes: Vec::new(),
                created_at: at,
                last_used_at: None,
                revoked_at: None,
            },
        ];
        let audit = AuditEntry {
            at,
            actor: "operator".to_string(),
            merchant_id: Some(merchant_id.clone()),
            event: "merchant.create".to_string(),
            resource: Some(merchant_id.clone()),
            outcome: "success".to_string(),
            detail: Some(format!(
                "reveal_scope={reveal} api_keys={},{}",
                keys[0].id, keys[1].id
            )),
            ..AuditEntry::default()
        };
        self.storage
            .create_merchant(
                &MerchantRecord {
                    id: merchant_id.clone(),
                    name: name.to_string(),
                    created_at: at,
                },
                &keys,
                &audit,
            )
            .await?;
        Ok(NewMerchant {
            merchant_id,
            secret_key,
            publishable_key,
        })
    }

    /// Resolves a presented API key. Unknown, revoked and malformed keys are
    /// all `Unauthenticated`, indistinguishably.
    pub async fn authenticate(&self, presented: &str) -> ServiceResult<Principal> {
        if presented.len() > 200 {
            return Err(ServiceError::Unauthenticated);
        }
        let hash = hash_key(presented);
        if let Some(p) = self.auth_cache.get(&hash) {
            return Ok(p);
        }
        let rec = self
            .storage
            .find_api_key(&hash)
            .await?
            .ok_or(ServiceError::Unauthenticated)?;
        if !bool::from(rec.hash.ct_eq(&hash)) || rec.revoked_at.is_some() {
            return Err(ServiceError::Unauthenticated);
        }
        let principal = Principal {
            key_id: rec.id.clone(),
            merchant_id: rec.merchant_id.clone(),
            kind: rec.kind,
            scopes: rec.scopes.clone(),
        };
        // Recording the use is best effort: it must not fail the request.
        if self.auth_cache.should_touch(&rec.id, Instant::now()) {
            if let Err(e) = self.storage.touch_api_key(&rec.id, now()).await {
                tracing::warn!(error = %e, key_id = %rec.id, "could not record API key use");
            }
        }
        self.auth_cache.put(hash, principal.clone());
        Ok(principal)
    }
}

impl KeyCache {
    fn get(&self, hash: &[u8; 32]) -> Option<Principal> {
        // The lookup is keyed by a SHA-256 of the presented key: its timing
        // reveals nothing an attacker could use without a preimage.
        let map = self.entries.read().unwrap_or_else(|e| e.into_inner());
        map.get(hash)
            .filter(|(_, at)| at.elapsed() < CACHE_TTL)
            .map(|(p, _)| p.clone())
    }

    fn put(&self, hash: [u8; 32], principal: Principal) {
        let mut map = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if map.len() >= CACHE_MAX {
            map.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
            if map.len() >= CACHE_MAX {
                map.clear();
            }
        }
        map.insert(hash, (principal, Instant::now()));
    }

    /// Whether this use of key `id` at `at` should be written: the first
    /// use, or the first after [`TOUCH_EVERY`]. Records it if so.
    fn should_touch(&self, id: &str, at: Instant) -> bool {
        let mut touched = self.touched.lock().unwrap_or_else(|e| e.into_inner());
        if touched
            .get(id)
            .is_some_and(|last| at.saturating_duration_since(*last) < TOUCH_EVERY)
        {
            return false;
        }
        if touched.len() >= CACHE_MAX {
            touched.retain(|_, last| at.saturating_duration_since(*last) < TOUCH_EVERY);
            if touched.len() >= CACHE_MAX {
                touched.clear();
            }
        }
        touched.insert(id.to_string(), at);
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    #[test]
    fn key_use_is_written_once_per_interval() {
        let cache = super::KeyCache::default();
        let t0 = Instant::now();
        assert!(cache.should_touch("key_a", t0));
        assert!(!cache.should_touch("key_a", t0 + Duration::from_secs(1)));
        assert!(cache.should_touch("key_b", t0 + Duration::from_secs(1)));
        assert!(!cache.should_touch("key_a", t0 + Duration::from_secs(59)));
        assert!(cache.should_touch("key_a", t0 + super::TOUCH_EVERY));
        assert!(!cache.should_touch("key_a", t0 + super::TOUCH_EVERY));
    }

    #[test]
    fn new_merchant_debug_hides_the_secret_key() {
        let m = super::NewMerchant {
            merchant_id: "mer_1".into(),
            secret_key: "sk_live_SECRETVALUE".into(),
            publishable_key: "pk_live_x".into(),
        };
        let shown = format!("{m:?}");
        assert!(!shown.contains("SECRETVALUE"), "{shown}");
        assert!(shown.contains("mer_1"));
    }
}
