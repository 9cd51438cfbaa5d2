//! Storage trait and records of the hosted pages: card-capture sessions,
//! and the one lookup the CVV re-collect page needs (which merchant a charge
//! belongs to, before anything else about it may be read).
//!
//! A session holds no card data and no usable secret: only the SHA-256 of
//! its 256-bit secret. Using a session and saving the card it captured are
//! one transaction, so a session can never add two cards, and a card is
//! never saved by a session that was not live at commit time.

use async_trait::async_trait;

use super::{AuditEntry, CardInsert, CardRecord, StorageResult};

/// A hosted card-capture session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureSessionRecord {
    /// `cs_…`
    pub id: String,
    pub merchant_id: String,
    /// The customer the captured card is added to.
    pub customer_id: String,
    /// The only origin allowed to embed the page and to receive its
    /// messages (canonical `scheme://host[:port]`).
    pub allowed_origin: String,
    /// SHA-256 of the session secret (the secret itself is never stored).
    pub secret_hash: [u8; 32],
    pub created_at: i64,
    pub expires_at: i64,
    pub used_at: Option<i64>,
    /// The card the session added (or found already saved).
    pub card_id: Option<String>,
}

/// What using a session found.
// Returned once per capture and never stored in bulk: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaptureUse {
    /// The session is now used; the card was inserted or, when the customer
    /// already had that number, the existing card is returned.
    Saved(CardInsert),
    /// Someone used the session first.
    Used,
    Expired,
    /// No such session, or its customer was deleted meanwhile.
    NotFound,
}

#[async_trait]
pub trait HostedStore: Send + Sync {
    async fn insert_capture_session(
        &self,
        s: &CaptureSessionRecord,
        audit: &AuditEntry,
    ) -> StorageResult<()>;
    /// A session by id alone: the hosted page knows nothing else yet.
    async fn find_capture_session(&self, id: &str) -> StorageResult<Option<CaptureSessionRecord>>;
    /// A session of this merchant.
    async fn get_capture_session(
        &self,
        merchant_id: &str,
        id: &str,
    ) -> StorageResult<Option<CaptureSessionRecord>>;
    /// In one transaction: marks the session used if it is still live at
    /// `now`, inserts `card` (deduplicated by fingerprint, the first card
    /// becoming the customer's default, like `CardStore::insert_card`), and
    /// appends `use_audit` plus, for a new card, `card_audit` and the
    /// `card.created` event. Nothing is written unless all of it is.
    async fn use_capture_session(
        &self,
        session_id: &str,
        now: i64,
        card: &CardRecord,
        use_audit: &AuditEntry,
        card_audit: &AuditEntry,
    ) -> StorageResult<CaptureUse>;
    /// Deletes sessions that expired before `before`. Returns how many.
    async fn sweep_capture_sessions(&self, before: i64) -> StorageResult<u64>;
    /// The merchant owning a charge, if any merchant does.
    async fn charge_owner(&self, charge_id: &str) -> StorageResult<Option<String>>;
}
