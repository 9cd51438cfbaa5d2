//! Storage: one trait per aggregate, implemented for SQLite (`sqlite.rs`) and
//! PostgreSQL (`postgres.rs`). Backend SQL lives only in those files.
//!
//! Every method is one atomic unit: where a change must be recorded in the
//! audit log, the entry is passed in and appended in the same transaction, so
//! a change is never visible without its audit record (and vice versa).
//! Records hold only ciphertext and non-sensitive metadata; no type here can
//! carry a plaintext PAN.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

mod batch;
mod cards_sql;
pub mod chain;
mod charges_sql;
mod common;
mod group;
pub mod hosted;
mod hosted_sql;
mod lean;
pub mod payments;
mod payments_sql;
mod postgres;
mod postgres_audit;
mod sqlite;
mod sqlite_audit;
mod sqlite_checkpoint;
mod sqlite_direct;
mod sqlite_inline;
#[cfg(test)]
mod tests;

pub use chain::{AuditSealer, ChainRow, Checkpoint};
pub use group::{GroupSnapshot, GroupStats};
pub use hosted::*;
pub use payments::*;
pub use postgres::PgStorage;
pub use sqlite::SqliteStorage;

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The database cannot be reached or the pool timed out: retryable (503).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A uniqueness constraint was violated (e.g. duplicate id or fingerprint).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The row addressed does not exist (or belongs to another merchant).
    #[error("not found")]
    NotFound,
    /// Any other database error.
    #[error("database error: {0}")]
    Other(String),
}

pub type StorageResult<T> = Result<T, StorageError>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MerchantRecord {
    pub id: String,
    pub name: String,
    pub created_at: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiKeyKind {
    Secret,
    Publishable,
}

impl ApiKeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiKeyKind::Secret => "secret",
            ApiKeyKind::Publishable => "publishable",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "secret" => Some(ApiKeyKind::Secret),
            "publishable" => Some(ApiKeyKind::Publishable),
            _ => None,
        }
    }
}

/// An API key as stored: only a SHA-256 hash of the full key string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKeyRecord {
    /// `key_…`, safe to log and to show auditors.
    pub id: String,
    pub merchant_id: String,
    pub kind: ApiKeyKind,
    /// SHA-256 of the whole key string (`sk_live_…`). Keys carry 256 bits of
    /// randomness, so an unsalted hash is not brute-forceable.
    pub hash: [u8; 32],
    /// e.g. `["cards:reveal"]`.
    pub scopes: Vec<String>,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Document {
    #[serde(rename = "type")]
    pub doc_type: String,
    pub number: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Address {
    pub line1: Option<String>,
    pub line2: Option<String>,
    pub city: Option<String>,
    pub state: Option<String>,
    pub postal_code: Option<String>,
    pub country: Option<String>,
}

pub type Metadata = std::collections::BTreeMap<String, String>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CustomerRecord {
    pub id: String,
    pub merchant_id: String,
    pub email: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub phone: Option<String>,
    pub document: Option<Document>,
    pub billing_address: Option<Address>,
    pub metadata: Metadata,
    pub default_card_id: Option<String>,
    pub created_at: i64,
}

/// A saved card: ciphertext plus the metadata the API may show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CardRecord {
    pub id: String,
    pub merchant_id: String,
    pub customer_id: String,
    /// Sealed record (see `crypto::seal`); opens only for this merchant, this
    /// card id and the data key `dek_id`.
    pub pan_ciphertext: Vec<u8>,
    pub dek_id: String,
    /// Keyed HMAC-SHA256 of the PAN under the merchant's fingerprint key.
    pub fingerprint: Vec<u8>,
    pub bin: String,
    pub last4: String,
    pub pan_length: i64,
    pub brand: String,
    pub funding: String,
    pub exp_month: i64,
    pub exp_year: i64,
    pub holder_name: Option<String>,
    pub alias: Option<String>,
    pub status: String,
    pub created_at: i64,
}

/// Fields of a card a merchant may change. `None` leaves a field as it is;
/// `Some(None)` clears an optional one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CardUpdate {
    pub alias: Option<Option<String>>,
    pub holder_name: Option<Option<String>>,
    pub exp_month: Option<i64>,
    pub exp_year: Option<i64>,
    pub make_default: bool,
}

/// Fields of a customer a merchant may change (same conventions as
/// [`CardUpdate`]). `metadata` replaces the whole map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CustomerUpdate {
    pub email: Option<String>,
    pub first_name: Option<Option<String>>,
    pub last_name: Option<Option<String>>,
    pub phone: Option<Option<String>>,
    pub document: Option<Option<Document>>,
    pub billing_address: Option<Option<Address>>,
    pub metadata: Option<Metadata>,
}

/// A data key as stored: wrapped under an HSM key, or (in `hsm` mode) only a
/// reference to an HSM key object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataKeyRecord {
    /// `dek_…`
    pub id: String,
    /// `None` for system keys (volatile, audit) wrapped by the global KEK.
    pub merchant_id: Option<String>,
    /// `pan`, `fingerprint`, `volatile`, `audit`.
    pub purpose: String,
    pub version: i64,
    /// `envelope` or `hsm`.
    pub mode: String,
    /// Wrapped key bytes (`iv ‖ ciphertext ‖ tag` under `wrapping_label`);
    /// `None` in `hsm` mode, where the key never leaves the HSM.
    pub wrapped: Option<Vec<u8>>,
    /// Label of the HSM key that wraps it (envelope) or that *is* it (hsm).
    pub wrapping_label: String,
    /// Seals reserved so far against the usage limit: the in-memory counter
    /// reserves blocks ahead, so a crash can only waste, never reuse, budget.
    pub seals_reserved: i64,
    pub created_at: i64,
    pub retired_at: Option<i64>,
}

/// One audit-log entry. Never holds a PAN, CVV or secret: last4 and ids only.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct AuditEntry {
    pub at: i64,
    /// API key id (`key_…`) or `operator`/`system`.
    pub actor: String,
    pub merchant_id: Option<String>,
    /// e.g. `card.reveal`, `card.create`, `card.delete`, `customer.delete`.
    pub event: String,
    pub resource: Option<String>,
    /// `success` / `denied` / `failure`.
    pub outcome: String,
    pub origin: Option<String>,
    pub request_id: Option<String>,
    /// Free text without secrets, e.g. `last4=4242`.
    pub detail: Option<String>,
}

/// A stored audit entry with its sequence number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRow {
    pub seq: i64,
    pub entry: AuditEntry,
}

/// Result of claiming an idempotency key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdempotencyClaim {
    /// Nobody used the key yet; it is now held by this request.
    Claimed,
    /// The key was used before and completed: replay this response.
    Completed {
        request_hash: [u8; 32],
        status: u16,
        body: Vec<u8>,
    },
    /// Another request with this key has not finished (or used another
    /// body); `created_at` is when it claimed the key, so a caller can tell
    /// a request still running from one a crash interrupted.
    InFlight {
        request_hash: [u8; 32],
        created_at: i64,
    },
}

/// A page of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub has_more: bool,
}

#[async_trait]
pub trait MerchantStore: Send + Sync {
    /// Creates a merchant with its initial API keys (one transaction).
    async fn create_merchant(
        &self,
        merchant: &MerchantRecord,
        keys: &[ApiKeyRecord],
        audit: &AuditEntry,
    ) -> StorageResult<()>;
    async fn get_merchant(&self, id: &str) -> StorageResult<Option<MerchantRecord>>;
    /// Finds a non-revoked API key by hash.
    async fn find_api_key(&self, hash: &[u8; 32]) -> StorageResult<Option<ApiKeyRecord>>;
    /// Records a use of the key (best effort; callers may batch).
    async fn touch_api_key(&self, id: &str, at: i64) -> StorageResult<()>;
}

#[async_trait]
pub trait CustomerStore: Send + Sync {
    async fn insert_customer(&self, c: &CustomerRecord, audit: &AuditEntry) -> StorageResult<()>;
    async fn get_customer(
        &self,
        merchant_id: &str,
        id: &str,
    ) -> StorageResult<Option<CustomerRecord>>;
    /// Applies the update; `NotFound` when the customer is not the merchant's.
    async fn update_customer(
        &self,
        merchant_id: &str,
        id: &str,
        update: &CustomerUpdate,
    ) -> StorageResult<CustomerRecord>;
    /// Deletes the customer and all its cards (ciphertext included), recording
    /// `audit` plus one entry per deleted card built by `card_audit`.
    async fn delete_customer(
        &self,
        merchant_id: &str,
        id: &str,
        audit: &AuditEntry,
        card_audit: &(dyn for<'c> Fn(&'c CardRecord) -> AuditEntry + Send + Sync),
    ) -> StorageResult<()>;
    /// Newest first. `starting_after` is a customer id of this merchant (a
    /// cursor from a previous page); an unknown cursor is `NotFound`.
    async fn list_customers(
        &self,
        merchant_id: &str,
        email: Option<&str>,
        limit: u32,
        starting_after: Option<&str>,
    ) -> StorageResult<Page<CustomerRecord>>;
}

/// Outcome of inserting a card.
// Returned once per insert and never stored in bulk: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CardInsert {
    /// Inserted; `default` tells whether it became the customer's default.
    Created { default: bool },
    /// The customer already has a card with this fingerprint: that one.
    Existing(CardRecord),
}

#[async_trait]
pub trait CardStore: Send + Sync {
    /// Inserts the card unless the customer already has one with the same
    /// fingerprint; the first card of a customer becomes its default. The
    /// customer must exist for that merchant (`NotFound` otherwise).
    async fn insert_card(&self, card: &CardRecord, audit: &AuditEntry)
        -> StorageResult<CardInsert>;
    async fn get_card(&self, merchant_id: &str, card_id: &str)
        -> StorageResult<Option<CardRecord>>;
    /// The card and whether it is its customer's default, in one query.
    async fn get_card_view(
        &self,
        merchant_id: &str,
        card_id: &str,
    ) -> StorageResult<Option<(CardRecord, bool)>>;
    /// Cards of a customer, oldest first, each with whether it is the
    /// customer's default, in one query. Empty also when the customer is
    /// not the merchant's: tell the two apart with `get_customer`.
    async fn list_card_views(
        &self,
        merchant_id: &str,
        customer_id: &str,
    ) -> StorageResult<Vec<(CardRecord, bool)>>;
    /// Cards of a customer, oldest first.
    async fn list_cards(
        &self,
        merchant_id: &str,
        customer_id: &str,
    ) -> StorageResult<Vec<CardRecord>>;
    async fn update_card(
        &self,
        merchant_id: &str,
        card_id: &str,
        update: &CardUpdate,
    ) -> StorageResult<CardRecord>;
    /// Deletes the card and its ciphertext; when it was the default, the
    /// customer's newest remaining card becomes the default.
    async fn delete_card(
        &self,
        merchant_id: &str,
        card_id: &str,
        audit: &AuditEntry,
    ) -> StorageResult<()>;
}

#[async_trait]
pub trait KeyStore: Send + Sync {
    /// Stores a new data key, recording `audit` in the same transaction
    /// (`None` only for the audit key itself, which must exist before
    /// anything can be audited; its creation is recorded right after).
    async fn insert_data_key(
        &self,
        key: &DataKeyRecord,
        audit: Option<&AuditEntry>,
    ) -> StorageResult<()>;
    async fn get_data_key(&self, id: &str) -> StorageResult<Option<DataKeyRecord>>;
    /// The newest non-retired key for (merchant, purpose).
    async fn current_data_key(
        &self,
        merchant_id: Option<&str>,
        purpose: &str,
    ) -> StorageResult<Option<DataKeyRecord>>;
    /// Atomically adds `block` to `seals_reserved` and returns the new total.
    async fn reserve_seals(&self, id: &str, block: i64) -> StorageResult<i64>;
    /// Label of the newest `active` HSM key of `kind` (`kek`, or `merchant`
    /// with its id) in the registry, if any.
    async fn active_hsm_key(
        &self,
        kind: &str,
        merchant_id: Option<&str>,
    ) -> StorageResult<Option<String>>;
    /// Records an HSM key (no-op when the label is known).
    async fn register_hsm_key(&self, k: &HsmKeyRecord) -> StorageResult<()>;
}

#[async_trait]
pub trait IdempotencyStore: Send + Sync {
    async fn claim_idempotency_key(
        &self,
        merchant_id: &str,
        key: &str,
        request_hash: &[u8; 32],
        now: i64,
    ) -> StorageResult<IdempotencyClaim>;
    async fn complete_idempotency_key(
        &self,
        merchant_id: &str,
        key: &str,
        status: u16,
        body: &[u8],
    ) -> StorageResult<()>;
    /// Frees a claimed key whose request failed in a retryable way.
    async fn release_idempotency_key(&self, merchant_id: &str, key: &str) -> StorageResult<()>;
    /// Deletes up to `limit` records (completed or not) created before
    /// `before`: the retention sweep. Returns how many went.
    async fn sweep_idempotency_keys(&self, before: i64, limit: u32) -> StorageResult<u64>;
}

#[async_trait]
pub trait AuditStore: Send + Sync {
    async fn append_audit(&self, entry: &AuditEntry) -> StorageResult<()>;
    async fn list_audit(&self, after_seq: i64, limit: u32) -> StorageResult<Vec<AuditRow>>;
}

// ---- issue 6: audit chain, key life cycle, shredding, report evidence ----

/// The audit hash chain and its HSM-signed checkpoints (see [`chain`]).
#[async_trait]
pub trait AuditChainStore: Send + Sync {
    /// Installs the sealer every later append MACs with.
    fn set_audit_sealer(&self, sealer: std::sync::Arc<dyn AuditSealer>);
    /// Rows in `seq` order with their chain fields.
    async fn chain_rows(&self, after_seq: i64, limit: u32) -> StorageResult<Vec<ChainRow>>;
    /// The highest `seq` in the log (0 when it is empty).
    async fn chain_end(&self) -> StorageResult<i64>;
    /// Every hash that more than one row up to `upto_seq` holds. Counted
    /// by the database, so that finding replayed entries needs no memory
    /// in proportion to the log.
    async fn chain_duplicate_hashes(&self, upto_seq: i64) -> StorageResult<Vec<Vec<u8>>>;
    /// `(seq, hash, chained entries up to it)` of the newest chained row.
    /// `counted` is `(seq, entries)` already known to hold (a checkpoint's
    /// head and count): then only the chained rows after that seq are
    /// counted, and added to it, instead of the whole log (which grows
    /// without end; a full count read 3 million rows in half a second).
    /// A `counted` past the head is ignored.
    async fn chain_head(
        &self,
        counted: Option<(i64, i64)>,
    ) -> StorageResult<Option<(i64, Vec<u8>, i64)>>;
    async fn insert_checkpoint(&self, c: &Checkpoint) -> StorageResult<()>;
    async fn list_checkpoints(&self) -> StorageResult<Vec<Checkpoint>>;
    /// The checkpoint stored last, if any.
    async fn latest_checkpoint(&self) -> StorageResult<Option<Checkpoint>>;
    /// Entries per event type and outcome.
    async fn audit_event_counts(&self) -> StorageResult<Vec<(String, String, i64)>>;
}

/// An HSM key the vault created (KEK or merchant wrapping key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HsmKeyRecord {
    pub label: String,
    /// `kek` or `merchant`.
    pub kind: String,
    pub merchant_id: Option<String>,
    pub version: i64,
    /// `active`, `retired` or `destroyed`.
    pub state: String,
    pub created_at: i64,
    pub retired_at: Option<i64>,
    pub destroyed_at: Option<i64>,
}

/// A card whose ciphertext is under a retired data key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaleCard {
    pub seq: i64,
    pub id: String,
    pub merchant_id: String,
    pub dek_id: String,
    pub pan_ciphertext: Vec<u8>,
}

/// A re-sealed card: replaces the ciphertext only if it is still under
/// `old_dek_id` (a concurrent update or delete wins).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reseal {
    pub id: String,
    pub old_dek_id: String,
    pub new_dek_id: String,
    pub pan_ciphertext: Vec<u8>,
}

/// Where a scan of the database found something.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ScanHit {
    pub table: String,
    pub column: String,
    /// Rows of that column that matched.
    pub rows: i64,
}

/// Key life cycle and operator tooling (rotation, re-encryption, shredding)
/// and the read-only evidence the audit report is built from.
#[async_trait]
pub trait AdminStore: Send + Sync {
    async fn list_hsm_keys(&self) -> StorageResult<Vec<HsmKeyRecord>>;
    /// Moves a key to `retired` or `destroyed`, recording `audit`.
    async fn set_hsm_key_state(
        &self,
        label: &str,
        state: &str,
        at: i64,
        audit: &AuditEntry,
    ) -> StorageResult<()>;
    async fn list_data_keys(&self) -> StorageResult<Vec<DataKeyRecord>>;
    /// Replaces the wrapping of a data key if it is still wrapped by
    /// `old_label`; `false` otherwise.
    async fn rewrap_data_key(
        &self,
        id: &str,
        old_label: &str,
        new_label: &str,
        wrapped: &[u8],
        audit: &AuditEntry,
    ) -> StorageResult<bool>;
    /// Retires a data key (no new seals); `false` when already retired.
    async fn retire_data_key(&self, id: &str, at: i64, audit: &AuditEntry) -> StorageResult<bool>;
    /// Cards under retired data keys, in `seq` order after `after_seq`.
    async fn stale_cards(&self, after_seq: i64, limit: u32) -> StorageResult<Vec<StaleCard>>;
    async fn count_stale_cards(&self) -> StorageResult<i64>;
    /// Applies re-seals in one transaction; returns how many applied.
    async fn reseal_cards(&self, reseals: &[Reseal], audit: &AuditEntry) -> StorageResult<u64>;
    /// Deletes every row of the merchant (cards, customers, keys, data
    /// keys, idempotency records, the merchant), recording `audit`.
    async fn delete_merchant_rows(
        &self,
        merchant_id: &str,
        audit: &AuditEntry,
    ) -> StorageResult<()>;
    async fn list_merchants(&self) -> StorageResult<Vec<MerchantRecord>>;
    async fn list_api_keys(&self) -> StorageResult<Vec<ApiKeyRecord>>;
    /// Revokes an API key, recording `audit`.
    async fn revoke_api_key(&self, id: &str, at: i64, audit: &AuditEntry) -> StorageResult<()>;
    /// Every text and binary value of every column of every table, offered
    /// to `matches`; counts matching rows per column. Values are streamed,
    /// never held a column at a time.
    async fn scan_all_columns(
        &self,
        matches: for<'b> fn(&'b [u8]) -> bool,
    ) -> StorageResult<(Vec<ScanHit>, i64)>;
    /// Rows of `table` whose `column` is below `before` (and, with `held`,
    /// whose `held` column is not NULL); `None` when the table or column
    /// does not exist.
    async fn count_older(
        &self,
        table: &str,
        column: &str,
        before: i64,
        held: Option<&str>,
    ) -> StorageResult<Option<i64>>;
}

/// Everything the service layer needs from a database.
#[async_trait]
pub trait Storage:
    MerchantStore
    + CustomerStore
    + CardStore
    + KeyStore
    + IdempotencyStore
    + AuditStore
    + AuditChainStore
    + AdminStore
    + TokenStore
    + ChargeStore
    + VerificationStore
    + EventStore
    + WebhookStore
    + HostedStore
{
    /// Applies pending migrations.
    async fn migrate(&self) -> StorageResult<()>;
    /// A trivial round trip, for `/readyz`.
    async fn health(&self) -> StorageResult<()>;
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;
    /// What the group-commit writer has committed so far, and the time it
    /// took.
    fn group_commit_stats(&self) -> GroupSnapshot;
    /// Batched read queries run so far and the reads they answered (see
    /// `batch`); zero where reads are not batched (SQLite).
    fn read_batch_stats(&self) -> ReadBatchStats {
        ReadBatchStats::default()
    }
    /// Gathers planner statistics for tables that have grown without any
    /// yet, and returns their names (PostgreSQL; nothing to do on SQLite,
    /// whose planner never caches a plan made for an empty table).
    async fn prime_statistics(&self) -> StorageResult<Vec<String>> {
        Ok(Vec::new())
    }
}

/// Totals of the batched reads: queries sent, and reads they answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadBatchStats {
    pub queries: u64,
    pub reads: u64,
}

/// Opens the storage named by `url` (`sqlite://path` or `postgres://…`).
pub async fn connect(
    url: &str,
    max_connections: u32,
) -> StorageResult<std::sync::Arc<dyn Storage>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(std::sync::Arc::new(
            PgStorage::connect(url, max_connections).await?,
        ))
    } else if url.starts_with("sqlite:") {
        Ok(std::sync::Arc::new(
            SqliteStorage::connect(url, max_connections).await?,
        ))
    } else {
        Err(StorageError::Other(
            "database_url must start with sqlite: or postgres://".to_string(),
        ))
    }
}
