//! Storage traits and records of payments: one-time tokens, charges and
//! refunds, card verifications, the event outbox and webhook endpoints.
//!
//! As in the rest of storage, each method is one transaction: a state change,
//! the events describing it (outbox) and its audit entry commit together or
//! not at all. State changes of a charge or verification are optimistic: the
//! caller passes the version it read and gets `Conflict` if someone else
//! changed the row in between.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{AuditEntry, Metadata, Page, StorageResult};

/// A one-time token. The number and CVV are only inside `payload`, sealed
/// under the merchant's volatile key for this token id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    /// `tok_…`
    pub id: String,
    pub merchant_id: String,
    /// The saved card, for a CVV re-capture token.
    pub card_id: Option<String>,
    /// `None` once the token has been used or has expired.
    pub payload: Option<Vec<u8>>,
    pub last4: String,
    pub brand: String,
    pub exp_month: i64,
    pub exp_year: i64,
    pub created_at: i64,
    pub expires_at: i64,
    pub used_at: Option<i64>,
}

/// What taking a token found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenTake {
    /// The token was live; it is now used and its payload gone from the
    /// database (the record returned still carries it).
    Taken(TokenRecord),
    Used,
    Expired,
}

/// An order line; the amounts are in the charge's currency.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineItem {
    pub name: String,
    pub unit_price: i64,
    pub quantity: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sku: Option<String>,
}

/// A charge. `status` is `processing` (processor call under way),
/// `pending`, `succeeded`, `failed` or `canceled`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChargeRecord {
    /// `ch_…`
    pub id: String,
    pub merchant_id: String,
    pub customer_id: String,
    pub card_id: String,
    pub amount: i64,
    pub currency: String,
    pub status: String,
    pub captured: bool,
    pub amount_captured: i64,
    pub amount_refunded: i64,
    /// Whether the merchant asked to capture on authorization.
    pub capture_requested: bool,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    /// e.g. `provide_cvc` while pending on the cardholder.
    pub next_action: Option<String>,
    pub description: Option<String>,
    pub metadata: Metadata,
    pub line_items: Vec<LineItem>,
    pub processor: String,
    pub processor_ref: Option<String>,
    pub version: i64,
    pub created_at: i64,
    pub updated_at: i64,
    /// A capture or void sent (or about to be sent) to the processor whose
    /// answer is not stored yet: `capture` or `cancel`.
    pub pending_action: Option<String>,
    /// The amount of a pending capture.
    pub pending_amount: Option<i64>,
}

/// Which charges [`PaymentStore::unsettled_charges`] finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unsettled {
    /// Authorizations whose outcome is unknown: `processing`, or `pending`
    /// with `processor_unavailable`.
    Authorization,
    /// Charges with a pending capture or void.
    Action,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefundRecord {
    /// `re_…`
    pub id: String,
    pub merchant_id: String,
    pub charge_id: String,
    pub amount: i64,
    pub status: String,
    pub created_at: i64,
}

/// A card verification. The micro-charge amount is sealed and is removed
/// (`None`) once the verification is over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerificationRecord {
    /// `cver_…`
    pub id: String,
    pub merchant_id: String,
    pub card_id: String,
    /// `micro_charge` or `cvc`.
    pub method: String,
    /// `pending`, `succeeded` or `failed`.
    pub status: String,
    pub amount_sealed: Option<Vec<u8>>,
    pub currency: Option<String>,
    pub attempts: i64,
    pub max_attempts: i64,
    pub failure_code: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// An event of the outbox. `data` is the JSON of the object after the
/// change; it never holds a PAN or CVV.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRecord {
    /// `evt_…`
    pub id: String,
    pub merchant_id: String,
    /// e.g. `charge.succeeded`.
    pub event_type: String,
    pub data: String,
    pub created_at: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookEndpointRecord {
    /// `we_…`
    pub id: String,
    pub merchant_id: String,
    pub url: String,
    /// Event types, or `["*"]` for all.
    pub events: Vec<String>,
    /// The signing secret, sealed under the merchant's key.
    pub secret_sealed: Vec<u8>,
    pub created_at: i64,
}

/// A delivery due now, with what the worker needs to send it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DueDelivery {
    pub seq: i64,
    pub attempts: i64,
    pub event: EventRecord,
    pub endpoint: WebhookEndpointRecord,
}

/// A delivery as shown to the merchant (attempts recorded so far).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryRecord {
    pub event_id: String,
    pub event_type: String,
    pub endpoint_id: String,
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub updated_at: i64,
}

/// The result of one delivery attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryAttempt {
    pub seq: i64,
    pub attempts: i64,
    /// `delivered`, `pending` (retry at `next_attempt_at`) or `failed`.
    pub status: String,
    pub next_attempt_at: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub at: i64,
}

#[async_trait]
pub trait TokenStore: Send + Sync {
    async fn insert_token(&self, token: &TokenRecord, audit: &AuditEntry) -> StorageResult<()>;
    /// Marks a live token used and removes its payload, returning it; `None`
    /// when the merchant has no such token.
    /// `audit` (the token's use) is appended in the same transaction.
    async fn take_token(
        &self,
        merchant_id: &str,
        id: &str,
        now: i64,
        audit: &AuditEntry,
    ) -> StorageResult<Option<TokenTake>>;
    /// Removes the payloads of expired tokens and deletes tokens long past
    /// their expiry. Returns how many payloads were purged.
    async fn sweep_tokens(&self, now: i64) -> StorageResult<u64>;
}

#[async_trait]
pub trait ChargeStore: Send + Sync {
    async fn insert_charge(
        &self,
        charge: &ChargeRecord,
        events: &[EventRecord],
        audit: &AuditEntry,
    ) -> StorageResult<()>;
    /// Replaces the charge's mutable fields if its version is still
    /// `expected_version` (the stored version becomes `charge.version`);
    /// `Conflict` otherwise. Stores `refund` when given: a new refund, or
    /// the outcome of one still `pending` (its status is all that changes).
    async fn update_charge(
        &self,
        charge: &ChargeRecord,
        expected_version: i64,
        refund: Option<&RefundRecord>,
        events: &[EventRecord],
        audit: &AuditEntry,
    ) -> StorageResult<()>;
    async fn get_charge(&self, merchant_id: &str, id: &str) -> StorageResult<Option<ChargeRecord>>;
    /// Charges of every merchant sent through `processor` that last changed
    /// before `before` and wait for a processor outcome of the `kind`
    /// given. In (`updated_at`, `id`) order, after the cursor `after` (the
    /// last charge of the previous page; `(i64::MIN, "")` to start).
    async fn unsettled_charges(
        &self,
        kind: Unsettled,
        processor: &str,
        before: i64,
        after: (i64, &str),
        limit: u32,
    ) -> StorageResult<Vec<ChargeRecord>>;
    /// Newest first; `starting_after` is a charge id of this merchant.
    async fn list_charges(
        &self,
        merchant_id: &str,
        customer_id: Option<&str>,
        limit: u32,
        starting_after: Option<&str>,
    ) -> StorageResult<Page<ChargeRecord>>;
    /// Refunds of every merchant whose charge went through `processor`,
    /// still `pending` (the processor's answer was lost, or the node
    /// stopped during the call) and created before `before`. In
    /// (`created_at`, `id`) order, after the cursor `after`
    /// (`(i64::MIN, "")` to start).
    async fn pending_refunds(
        &self,
        processor: &str,
        before: i64,
        after: (i64, &str),
        limit: u32,
    ) -> StorageResult<Vec<RefundRecord>>;
    /// Oldest first.
    async fn list_refunds(
        &self,
        merchant_id: &str,
        charge_id: &str,
    ) -> StorageResult<Vec<RefundRecord>>;
}

#[async_trait]
pub trait VerificationStore: Send + Sync {
    async fn insert_verification(
        &self,
        v: &VerificationRecord,
        audit: &AuditEntry,
    ) -> StorageResult<()>;
    async fn get_verification(
        &self,
        merchant_id: &str,
        id: &str,
    ) -> StorageResult<Option<VerificationRecord>>;
    /// Saves the verification if `attempts` is still `expected_attempts`
    /// (`Conflict` otherwise) and, when given, sets the card's status.
    async fn update_verification(
        &self,
        v: &VerificationRecord,
        expected_attempts: i64,
        card_status: Option<&str>,
        events: &[EventRecord],
        audit: &AuditEntry,
    ) -> StorageResult<()>;
}

#[async_trait]
pub trait EventStore: Send + Sync {
    /// Newest first; `starting_after` is an event id of this merchant.
    async fn list_events(
        &self,
        merchant_id: &str,
        event_type: Option<&str>,
        limit: u32,
        starting_after: Option<&str>,
    ) -> StorageResult<Page<EventRecord>>;
    async fn get_event(&self, merchant_id: &str, id: &str) -> StorageResult<Option<EventRecord>>;
}

#[async_trait]
pub trait WebhookStore: Send + Sync {
    async fn insert_webhook_endpoint(
        &self,
        e: &WebhookEndpointRecord,
        audit: &AuditEntry,
    ) -> StorageResult<()>;
    async fn list_webhook_endpoints(
        &self,
        merchant_id: &str,
    ) -> StorageResult<Vec<WebhookEndpointRecord>>;
    async fn get_webhook_endpoint(
        &self,
        merchant_id: &str,
        id: &str,
    ) -> StorageResult<Option<WebhookEndpointRecord>>;
    /// Deletes the endpoint and its pending deliveries.
    async fn delete_webhook_endpoint(
        &self,
        merchant_id: &str,
        id: &str,
        audit: &AuditEntry,
    ) -> StorageResult<()>;
    /// Deliveries whose next attempt is due (unix ms), oldest first, each
    /// leased to the caller until `lease_until` (rows another caller leased
    /// first are skipped).
    async fn due_deliveries(
        &self,
        now: i64,
        lease_until: i64,
        limit: u32,
    ) -> StorageResult<Vec<DueDelivery>>;
    async fn record_delivery(&self, attempt: &DeliveryAttempt) -> StorageResult<()>;
    /// The newest deliveries to one endpoint of the merchant.
    async fn list_deliveries(
        &self,
        merchant_id: &str,
        endpoint_id: &str,
        limit: u32,
    ) -> StorageResult<Vec<DeliveryRecord>>;
}
