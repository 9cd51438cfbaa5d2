//! Crypto: the keyring of data keys, sealing/opening of records and keyed
//! fingerprints. The only module that ever holds key bytes.
//!
//! Key hierarchy (labels are HSM object labels):
//! - `cardvault-kek-v{n}`: AES-256 in the HSM, wraps system data keys.
//! - `cardvault-mk-{merchant}-v{n}`: AES-256 in the HSM, wraps that merchant's
//!   data keys; destroying it shreds the merchant.
//! - data keys (`dek_…`), one per (owner, purpose, version): in `envelope` mode
//!   32 random bytes from the OS CSPRNG, stored wrapped and cached unwrapped in
//!   zeroizing memory; in `hsm` mode an HSM object that never leaves the token.
//!
//! In envelope mode a seal or open of a cached key makes no HSM call at all.

mod hsm_workers;
mod keyring;
pub mod record;

pub use keyring::{
    label_version, merchant_key_label, AuditMacKey, KeyOwner, Keyring, KeyringConfig, Purpose,
    AUDIT_HSM_LABEL, DEFAULT_SEAL_LIMIT,
};

#[cfg(test)]
mod tests;

use cardvault_hsm::HsmError;

use crate::storage::StorageError;

/// How records are sealed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CryptoMode {
    /// Data keys unwrapped once by the HSM, AES-256-GCM in process.
    Envelope,
    /// Every seal/open is a `C_Encrypt`/`C_Decrypt` inside the HSM.
    Hsm,
}

impl CryptoMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CryptoMode::Envelope => "envelope",
            CryptoMode::Hsm => "hsm",
        }
    }
}

impl std::str::FromStr for CryptoMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "envelope" => Ok(CryptoMode::Envelope),
            "hsm" => Ok(CryptoMode::Hsm),
            other => Err(format!(
                "crypto mode must be envelope or hsm, not {other:?}"
            )),
        }
    }
}

/// Errors of the crypto layer. None of them carries key or record bytes.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The HSM failed; `is_retryable` tells whether it is an outage.
    #[error("hsm: {0}")]
    Hsm(#[from] HsmError),
    #[error("key storage: {0}")]
    Storage(#[from] StorageError),
    /// Malformed record, wrong merchant/record/key binding or a failed tag.
    #[error("record does not open: malformed, tampered with, or bound to another row")]
    InvalidRecord,
    /// The data key a record names is unknown (or belongs to someone else).
    #[error("data key not found")]
    KeyNotFound,
    /// A data key reached its seal limit and no successor could be made.
    #[error("data key reached its usage limit")]
    KeyExhausted,
    /// A blocking HSM task was cancelled or panicked.
    #[error("hsm task failed: {0}")]
    Task(String),
}

impl CryptoError {
    /// True when the failure is an outage of the HSM or database (503).
    pub fn is_unavailable(&self) -> bool {
        match self {
            CryptoError::Hsm(e) => e.is_retryable(),
            CryptoError::Storage(StorageError::Unavailable(_)) => true,
            CryptoError::Task(_) => true,
            _ => false,
        }
    }
}
