//! Processors: who actually moves the money. The service layer calls a
//! [`Processor`] with the opened card (the `Pan` secret type, the CVV when
//! the cardholder just gave one) and gets back an outcome it can store.
//!
//! - [`sandbox`]: deterministic, for development and tests: the card number
//!   decides the outcome (see the table in README.md).
//! - [`http`]: forwards the card to a configured processor endpoint.
//!
//! Errors distinguish a definitive failure (nothing was charged) from an
//! unknown outcome (the request may have reached the processor): the latter
//! must never be retried blindly, since that could charge twice.

pub mod http;
pub mod outbound;
pub mod sandbox;

use async_trait::async_trait;

use crate::domain::{Money, Pan};

/// The card as the processor needs it. Borrowed, so the secrets stay in
/// their zeroizing owners.
pub struct PaymentCard<'a> {
    pub pan: &'a Pan,
    pub exp_month: i64,
    pub exp_year: i64,
    pub holder_name: Option<&'a str>,
    /// The CVV, only when the cardholder provided it for this operation.
    pub cvc: Option<&'a str>,
}

/// An authorization (or a zero-amount verification when `amount` is `None`).
pub struct AuthorizeRequest<'a> {
    pub card: PaymentCard<'a>,
    pub amount: Option<Money>,
    /// Capture together with the authorization.
    pub capture: bool,
    /// A merchant-initiated charge of a stored card (no cardholder present).
    pub stored_credential: bool,
    /// Our id for the operation (charge or verification id); processors use
    /// it as their idempotency key.
    pub reference: &'a str,
}

/// What the processor decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthOutcome {
    Approved {
        reference: String,
    },
    Declined {
        code: String,
        message: String,
    },
    /// The issuer wants the CVV for this stored-card charge.
    CvcRequired,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProcessorError {
    /// The processor could not be reached or did not answer in time after
    /// the request may have been received: the outcome is unknown.
    #[error("processor outcome unknown: {0}")]
    Unknown(String),
    /// The processor refused or failed the request; nothing happened.
    #[error("processor error: {0}")]
    Failed(String),
}

pub type ProcessorResult<T> = Result<T, ProcessorError>;

#[async_trait]
pub trait Processor: Send + Sync {
    /// `sandbox`, `http`, … (stored with each charge).
    fn name(&self) -> &'static str;
    async fn authorize(&self, req: &AuthorizeRequest<'_>) -> ProcessorResult<AuthOutcome>;
    // `reference` is the processor's reference of the authorization;
    // `key` names this one operation (the processor's idempotency key): a
    // retry of the same operation repeats it, another operation on the same
    // authorization (a second partial refund) never does.
    async fn capture(&self, reference: &str, key: &str, amount: Money) -> ProcessorResult<()>;
    async fn refund(&self, reference: &str, key: &str, amount: Money) -> ProcessorResult<()>;
    async fn void(&self, reference: &str, key: &str) -> ProcessorResult<()>;
    /// What became of the authorization sent with `reference` whose answer
    /// was lost (reconciliation): its outcome, or `None` when the processor
    /// never received it. `Unknown` when it cannot tell yet.
    async fn lookup(&self, reference: &str) -> ProcessorResult<Option<AuthOutcome>>;
    /// A zero-amount authorization (CVV check).
    async fn verify(&self, card: PaymentCard<'_>, reference: &str) -> ProcessorResult<AuthOutcome> {
        self.authorize(&AuthorizeRequest {
            card,
            amount: None,
            capture: false,
            stored_credential: false,
            reference,
        })
        .await
    }
}

/// The processor named by the configuration.
pub fn from_config(
    cfg: &crate::config::PaymentsConfig,
) -> Result<std::sync::Arc<dyn Processor>, String> {
    match cfg.processor.as_str() {
        "sandbox" => Ok(std::sync::Arc::new(sandbox::SandboxProcessor::default())),
        "http" => Ok(std::sync::Arc::new(http::HttpProcessor::new(&cfg.http)?)),
        other => Err(format!("unknown processor {other:?}")),
    }
}
