//! Use cases: merchants and API keys, customers, cards, reveal. Owns the
//! rules (tenancy, dedupe, defaults, audit) and the calls into crypto and
//! storage; knows nothing of HTTP.

pub mod audit;
mod auth;
mod cards;
mod charges;
mod customers;
mod events;
pub mod hosted;
pub mod keys;
mod tokens;
mod verification;
pub mod webhooks;

use std::sync::Arc;

pub use audit::{Finding, Tamper, Verification};
pub use auth::{Principal, Scope};
pub use cards::{CardView, NewCard, RevealedCard};
pub use charges::{charge_object, charge_object_with, refund_object, NewCharge};
pub use customers::{CustomerPage, NewCustomer};
pub use events::event_object;
pub use hosted::{
    capture_session_object, Caller, CapturePage, CapturedCard, CreatedCaptureSession, CvcLink,
    CvcPage, HostedCard, HostedSettings, NewCaptureSession, SessionState,
};
pub use tokens::{token_object, NewToken};
pub use verification::verification_object;

use crate::config::PaymentsConfig;
use crate::crypto::{CryptoError, Keyring};
use crate::processor::sandbox::SandboxProcessor;
use crate::processor::Processor;
use crate::storage::{AuditEntry, Storage, StorageError};

/// Errors of the service layer, mapped to HTTP by the api layer.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Client input is wrong; `param` names the field.
    #[error("{message}")]
    Invalid {
        param: String,
        code: &'static str,
        message: String,
    },
    /// No such object for this merchant (another merchant's objects answer
    /// exactly the same).
    #[error("no such {resource}")]
    NotFound {
        resource: &'static str,
        param: Option<String>,
    },
    #[error("invalid API key")]
    Unauthenticated,
    #[error("this API key lacks the {0} scope")]
    Forbidden(&'static str),
    #[error("{0}")]
    Conflict(String),
    /// The object is not in a state that allows the operation (409).
    #[error("{message}")]
    InvalidState { code: &'static str, message: String },
    /// HSM or database outage: retry later (503).
    #[error("temporarily unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServiceError {
    pub fn invalid(param: &str, code: &'static str, message: impl Into<String>) -> Self {
        ServiceError::Invalid {
            param: param.to_string(),
            code,
            message: message.into(),
        }
    }

    pub fn invalid_state(code: &'static str, message: impl Into<String>) -> Self {
        ServiceError::InvalidState {
            code,
            message: message.into(),
        }
    }

    pub fn not_found(resource: &'static str, param: &str) -> Self {
        ServiceError::NotFound {
            resource,
            param: Some(param.to_string()),
        }
    }
}

impl From<StorageError> for ServiceError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Unavailable(m) => ServiceError::Unavailable(format!("database: {m}")),
            StorageError::NotFound => ServiceError::NotFound {
                resource: "object",
                param: None,
            },
            StorageError::Conflict(m) => ServiceError::Conflict(m),
            StorageError::Other(m) => ServiceError::Internal(m),
        }
    }
}

impl From<CryptoError> for ServiceError {
    fn from(e: CryptoError) -> Self {
        if e.is_unavailable() {
            ServiceError::Unavailable(e.to_string())
        } else {
            ServiceError::Internal(e.to_string())
        }
    }
}

pub type ServiceResult<T> = Result<T, ServiceError>;

/// Who is calling and from where, for tenancy and the audit log.
#[derive(Clone, Debug)]
pub struct Context {
    pub principal: Principal,
    pub origin: Option<String>,
    pub request_id: String,
}

impl Context {
    pub fn merchant_id(&self) -> &str {
        &self.principal.merchant_id
    }

    /// An audit entry for an action of this caller.
    pub fn audit(&self, event: &str, resource: Option<&str>, outcome: &str) -> AuditEntry {
        AuditEntry {
            at: now(),
            actor: self.principal.key_id.clone(),
            merchant_id: Some(self.principal.merchant_id.clone()),
            event: event.to_string(),
            resource: resource.map(str::to_string),
            outcome: outcome.to_string(),
            origin: self.origin.clone(),
            request_id: Some(self.request_id.clone()),
            detail: None,
        }
    }
}

/// The vault's use cases over one storage and one keyring.
pub struct Vault {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) keyring: Arc<Keyring>,
    auth_cache: auth::KeyCache,
    pub(crate) processor: Arc<dyn Processor>,
    pub(crate) payments: PaymentsConfig,
    pub(crate) hosted: HostedSettings,
    webhook_client: std::sync::OnceLock<reqwest::Client>,
}

impl Vault {
    pub fn new(storage: Arc<dyn Storage>, keyring: Arc<Keyring>) -> Self {
        Vault {
            storage,
            keyring,
            auth_cache: auth::KeyCache::default(),
            processor: Arc::new(SandboxProcessor::default()),
            payments: PaymentsConfig::default(),
            hosted: HostedSettings::default(),
            webhook_client: std::sync::OnceLock::new(),
        }
    }

    /// Sets the processor and payment settings (default: sandbox).
    pub fn with_payments(
        mut self,
        payments: PaymentsConfig,
        processor: Arc<dyn Processor>,
    ) -> Self {
        self.payments = payments;
        self.processor = processor;
        self
    }

    pub fn payments_config(&self) -> &PaymentsConfig {
        &self.payments
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Analyses tables that grew before they had planner statistics (run
    /// periodically); the names of those it analysed.
    pub async fn prime_statistics(&self) -> ServiceResult<Vec<String>> {
        Ok(self.storage.prime_statistics().await?)
    }

    pub fn keyring(&self) -> &Arc<Keyring> {
        &self.keyring
    }

    /// Counters for `/metrics`: HSM operations, and what the group-commit
    /// writer has committed and how long it took.
    pub fn counters(
        &self,
    ) -> (
        u64,
        crate::storage::GroupSnapshot,
        crate::storage::ReadBatchStats,
    ) {
        (
            self.keyring.hsm_operations(),
            self.storage.group_commit_stats(),
            self.storage.read_batch_stats(),
        )
    }

    /// Deletes `Idempotency-Key` records older than `retention`, finished
    /// or not, a chunk at a time; the keys can then be used afresh.
    pub async fn sweep_idempotency_keys(
        &self,
        retention: std::time::Duration,
    ) -> ServiceResult<u64> {
        const CHUNK: u32 = 500;
        let before = now().saturating_sub(i64::try_from(retention.as_secs()).unwrap_or(i64::MAX));
        let mut total = 0;
        loop {
            let n = self.storage.sweep_idempotency_keys(before, CHUNK).await?;
            total += n;
            if n < u64::from(CHUNK) {
                return Ok(total);
            }
        }
    }

    /// Readiness: the database and the HSM both answer.
    pub async fn readiness(&self) -> (Result<(), String>, Result<(), String>) {
        let (db, hsm) = tokio::join!(self.storage.health(), self.keyring.hsm_health());
        (
            db.map_err(|e| e.to_string()),
            hsm.map_err(|e| e.to_string()),
        )
    }
}

/// Unix seconds now.
pub fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}
