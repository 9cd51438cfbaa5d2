//! `cardvault-hsm`: the vault's only door to the HSM.
//!
//! Everything that talks PKCS#11 lives in this crate; nothing else in the
//! workspace imports `cryptoki`. Callers see the narrow [`KeyCustodian`] trait:
//! keys are addressed by label, key bytes never leave the token, and every
//! failure is an [`HsmError`] that names the failing operation and says whether
//! retrying can help.
//!
//! The trait is synchronous and may block on the device: async callers run it
//! inside `tokio::task::spawn_blocking`.
//!
//! Layout:
//! - [`KeyCustodian`], [`KeyPurpose`], [`KeyInfo`] (here): the interface.
//! - `pkcs11`: [`Pkcs11Custodian`], the implementation over `cryptoki`, with
//!   its session pool, handle cache and reconnect-and-retry-once recovery.
//! - `error`: [`HsmError`] / [`HsmErrorKind`]; `cryptoki` errors are mapped
//!   there and nowhere else.
//! - `secret`: [`Pin`], a PIN that cannot be printed and is zeroized.
//! - `context`: the process-wide registry of initialized PKCS#11 modules
//!   (`C_Initialize` runs once per module per process).
//! - [`softhsm`]: SoftHSM fixtures for development and tests (configuration,
//!   in-process token creation). `hsm/softhsm2.conf.template` and
//!   `hsm/init-token.sh` are the same for shells.

mod context;
mod error;
mod pkcs11;
mod secret;
pub mod softhsm;

pub use error::{HsmError, HsmErrorKind};
pub use pkcs11::{Pkcs11Config, Pkcs11Custodian};
pub use secret::Pin;

/// Length in bytes of the IV used for AES-GCM operations inside the HSM.
pub const GCM_IV_LEN: usize = 12;
/// Length in bytes of the AES-GCM tag appended to HSM ciphertexts.
pub const GCM_TAG_LEN: usize = 16;

/// What a key created through the custodian is for. The PKCS#11 attributes
/// are derived from this and nothing else, so a key can never be created with
/// more capabilities than its purpose needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyPurpose {
    /// AES-256 key-encryption key: wraps/unwraps and encrypts/decrypts data
    /// keys (CKA_WRAP, CKA_UNWRAP, CKA_ENCRYPT, CKA_DECRYPT; no sign/verify,
    /// no derive).
    KeyEncryption,
    /// AES-256 key used directly for AES-GCM on records (`hsm` crypto mode):
    /// CKA_ENCRYPT and CKA_DECRYPT only.
    DataEncryption,
    /// HMAC-SHA256 key (CKK_GENERIC_SECRET, 32 bytes): CKA_SIGN and
    /// CKA_VERIFY only.
    Mac,
}

/// Everything an auditor needs to know about one key object in the token.
/// Never carries key material.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    /// `CKA_LABEL`.
    pub label: String,
    /// `CKA_CLASS`, e.g. `"SECRET_KEY"`.
    pub class: String,
    /// `CKA_KEY_TYPE`, e.g. `"AES"` or `"GENERIC_SECRET"`.
    pub key_type: String,
    /// Key length in bytes (`CKA_VALUE_LEN`), when the token reports it.
    pub value_len: Option<u64>,
    pub token: bool,
    pub private: bool,
    pub sensitive: bool,
    pub extractable: bool,
    pub always_sensitive: bool,
    pub never_extractable: bool,
    /// Creation time the custodian recorded on the object when it created it
    /// (RFC 3339, stored in `CKA_START_DATE` as a date and in `CKA_ID` as
    /// `created:<unix seconds>`). `None` for objects created by other tools.
    pub created_at_unix: Option<i64>,
}

/// The narrow interface the vault needs from an HSM.
///
/// Implementations are blocking and `Send + Sync`; they manage their own pool
/// of logged-in sessions and recover from lost sessions on the next call.
pub trait KeyCustodian: Send + Sync + 'static {
    /// Returns the key with this label, creating it (AES-256 or HMAC-SHA256
    /// according to `purpose`, as a private, sensitive, non-extractable token
    /// object) when it does not exist yet. Idempotent.
    fn ensure_key(&self, label: &str, purpose: KeyPurpose) -> Result<KeyInfo, HsmError>;

    /// Looks a key up by label without creating it.
    fn find_key(&self, label: &str) -> Result<Option<KeyInfo>, HsmError>;

    /// Destroys the key with this label. Returns `false` when there was none.
    fn destroy_key(&self, label: &str) -> Result<bool, HsmError>;

    /// Encrypts `plaintext` with AES-256-GCM under the key `label` inside the
    /// HSM (CKM_AES_GCM, 96-bit `iv`, 128-bit tag, `aad` authenticated).
    /// Returns `ciphertext ‖ tag`. Used both to wrap data keys under a KEK and
    /// to seal records in `hsm` mode.
    fn encrypt(
        &self,
        label: &str,
        iv: &[u8; GCM_IV_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, HsmError>;

    /// Inverse of [`KeyCustodian::encrypt`]. The output is zeroized on drop.
    /// A wrong key, AAD, IV or a tampered input is an error of kind
    /// [`HsmErrorKind::InvalidData`].
    fn decrypt(
        &self,
        label: &str,
        iv: &[u8; GCM_IV_LEN],
        aad: &[u8],
        ciphertext_and_tag: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, HsmError>;

    /// HMAC-SHA256 of `data` under the MAC key `label` (CKM_SHA256_HMAC).
    fn hmac_sha256(&self, label: &str, data: &[u8]) -> Result<[u8; 32], HsmError>;

    /// `len` random bytes from the token's generator.
    fn random(&self, len: usize) -> Result<zeroize::Zeroizing<Vec<u8>>, HsmError>;

    /// Every secret-key object in the token, for audit evidence.
    fn inventory(&self) -> Result<Vec<KeyInfo>, HsmError>;

    /// Cheap liveness check: a session can be had and the token answers.
    fn health(&self) -> Result<(), HsmError>;
}
