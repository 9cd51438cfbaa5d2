//! The crate's one error type: which PKCS#11 operation failed, what kind of
//! failure it was, and whether retrying can help.
//!
//! `cryptoki` errors are mapped here, at the border, and nowhere else. Error
//! text never carries a PIN or key material: `cryptoki` errors only carry
//! return codes, and the custodian's own details name labels and lengths.

use std::fmt;

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};

/// What kind of failure an [`HsmError`] is. Callers branch on this, never on
/// the detail text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HsmErrorKind {
    /// The PKCS#11 module file is missing or could not be loaded/initialized.
    ModuleLoad,
    /// No token with the configured label is present.
    TokenNotFound,
    /// The token rejected the PIN.
    PinIncorrect,
    /// The PIN is locked (or expired); an officer must reset it.
    PinLocked,
    /// The token cannot be reached right now (device removed, token not
    /// present, sessions lost and not recovered, device error). Retryable;
    /// the API answers 503.
    Unavailable,
    /// No key with the given label.
    KeyNotFound,
    /// The ciphertext did not authenticate (AEAD tag failure) or is malformed.
    InvalidData,
    /// The caller asked for something the custodian refuses (bad length,
    /// wrong key type for the operation, ...).
    InvalidInput,
    /// Anything else: a bug or an unexpected answer from the token.
    Internal,
}

impl HsmErrorKind {
    fn describe(self) -> &'static str {
        match self {
            HsmErrorKind::ModuleLoad => "PKCS#11 module could not be loaded",
            HsmErrorKind::TokenNotFound => "token not found",
            HsmErrorKind::PinIncorrect => "PIN incorrect",
            HsmErrorKind::PinLocked => "PIN locked",
            HsmErrorKind::Unavailable => "HSM unavailable",
            HsmErrorKind::KeyNotFound => "key not found",
            HsmErrorKind::InvalidData => "invalid data",
            HsmErrorKind::InvalidInput => "invalid input",
            HsmErrorKind::Internal => "internal HSM error",
        }
    }
}

impl fmt::Display for HsmErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// A failed HSM operation. `Display` reads like
/// `C_Decrypt failed: invalid data (CKR_ENCRYPTED_DATA_INVALID)`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{op} failed: {kind} ({detail})")]
pub struct HsmError {
    op: &'static str,
    kind: HsmErrorKind,
    detail: String,
}

impl HsmError {
    /// Builds an error. `op` names the PKCS#11 function or custodian step
    /// (`"C_Login"`, `"find token"`); `detail` must not contain secrets.
    pub fn new(op: &'static str, kind: HsmErrorKind, detail: impl Into<String>) -> Self {
        HsmError {
            op,
            kind,
            detail: detail.into(),
        }
    }

    /// The failing operation, e.g. `"C_Decrypt"`.
    pub fn op(&self) -> &'static str {
        self.op
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> HsmErrorKind {
        self.kind
    }

    /// Human-readable detail (a PKCS#11 return code name or a short note).
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// Whether the same call may succeed later without anyone changing
    /// configuration: only [`HsmErrorKind::Unavailable`].
    pub fn is_retryable(&self) -> bool {
        self.kind == HsmErrorKind::Unavailable
    }

    /// Maps a `cryptoki` error. `op` is used when the error does not name a
    /// PKCS#11 function itself.
    pub(crate) fn from_cryptoki(op: &'static str, err: &CkError) -> Self {
        match err {
            CkError::LibraryLoading(e) => HsmError::new(
                op,
                HsmErrorKind::ModuleLoad,
                format!("cannot load module: {e}"),
            ),
            CkError::MissingSymbol(sym) => HsmError::new(
                op,
                HsmErrorKind::ModuleLoad,
                format!("not a PKCS#11 module: missing symbol {sym}"),
            ),
            CkError::NullFunctionPointer => HsmError::new(
                op,
                HsmErrorKind::Internal,
                "module does not implement this function",
            ),
            CkError::Pkcs11(rv, function) => {
                let op = function_name(*function).unwrap_or(op);
                HsmError::new(op, kind_of(*rv), rv_name(*rv))
            }
            CkError::TryFromInt(_) | CkError::TryFromSlice(_) => {
                HsmError::new(op, HsmErrorKind::InvalidInput, "length out of range")
            }
            other => HsmError::new(op, HsmErrorKind::Internal, other.to_string()),
        }
    }

    /// Same error with another kind, keeping operation and detail.
    pub(crate) fn with_kind(mut self, kind: HsmErrorKind) -> Self {
        self.kind = kind;
        self
    }
}

/// The kind a bare PKCS#11 return value maps to, without context.
fn kind_of(rv: RvError) -> HsmErrorKind {
    use RvError as R;
    match rv {
        R::PinIncorrect | R::PinInvalid | R::PinLenRange => HsmErrorKind::PinIncorrect,
        R::PinLocked | R::PinExpired => HsmErrorKind::PinLocked,
        R::DeviceRemoved
        | R::DeviceError
        | R::DeviceMemory
        | R::TokenNotPresent
        | R::TokenNotRecognized
        | R::SlotIdInvalid
        | R::SessionHandleInvalid
        | R::SessionClosed
        | R::SessionCount
        | R::UserNotLoggedIn
        | R::CryptokiNotInitialized
        | R::ObjectHandleInvalid
        | R::KeyHandleInvalid
        | R::HostMemory
        | R::GeneralError
        | R::FunctionCanceled => HsmErrorKind::Unavailable,
        R::EncryptedDataInvalid | R::EncryptedDataLenRange => HsmErrorKind::InvalidData,
        R::ArgumentsBad
        | R::DataInvalid
        | R::DataLenRange
        | R::KeyFunctionNotPermitted
        | R::KeyTypeInconsistent
        | R::KeySizeRange => HsmErrorKind::InvalidInput,
        _ => HsmErrorKind::Internal,
    }
}

/// `RvError::EncryptedDataInvalid` → `"CKR_ENCRYPTED_DATA_INVALID"`.
pub(crate) fn rv_name(rv: RvError) -> String {
    let debug = format!("{rv:?}");
    let (name, rest) = match debug.find('(') {
        Some(i) => debug.split_at(i),
        None => (debug.as_str(), ""),
    };
    let mut out = String::from("CKR");
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out.push_str(rest);
    out
}

/// The C name of the functions this crate calls.
fn function_name(f: Function) -> Option<&'static str> {
    use Function as F;
    Some(match f {
        F::Initialize => "C_Initialize",
        F::Finalize => "C_Finalize",
        F::GetInfo => "C_GetInfo",
        F::GetSlotList => "C_GetSlotList",
        F::GetSlotInfo => "C_GetSlotInfo",
        F::GetTokenInfo => "C_GetTokenInfo",
        F::InitToken => "C_InitToken",
        F::InitPIN => "C_InitPIN",
        F::OpenSession => "C_OpenSession",
        F::CloseSession => "C_CloseSession",
        F::CloseAllSessions => "C_CloseAllSessions",
        F::GetSessionInfo => "C_GetSessionInfo",
        F::Login => "C_Login",
        F::Logout => "C_Logout",
        F::CreateObject => "C_CreateObject",
        F::DestroyObject => "C_DestroyObject",
        F::GetAttributeValue => "C_GetAttributeValue",
        F::SetAttributeValue => "C_SetAttributeValue",
        F::FindObjectsInit => "C_FindObjectsInit",
        F::FindObjects => "C_FindObjects",
        F::FindObjectsFinal => "C_FindObjectsFinal",
        F::EncryptInit => "C_EncryptInit",
        F::Encrypt => "C_Encrypt",
        F::DecryptInit => "C_DecryptInit",
        F::Decrypt => "C_Decrypt",
        F::SignInit => "C_SignInit",
        F::Sign => "C_Sign",
        F::GenerateKey => "C_GenerateKey",
        F::WrapKey => "C_WrapKey",
        F::GenerateRandom => "C_GenerateRandom",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_operation_and_return_code() {
        let err = HsmError::from_cryptoki(
            "decrypt",
            &CkError::Pkcs11(RvError::EncryptedDataInvalid, Function::Decrypt),
        );
        assert_eq!(err.op(), "C_Decrypt");
        assert_eq!(err.kind(), HsmErrorKind::InvalidData);
        assert!(!err.is_retryable());
        assert_eq!(
            err.to_string(),
            "C_Decrypt failed: invalid data (CKR_ENCRYPTED_DATA_INVALID)"
        );
    }

    #[test]
    fn session_and_device_trouble_is_retryable() {
        for rv in [
            RvError::DeviceRemoved,
            RvError::TokenNotPresent,
            RvError::SessionHandleInvalid,
            RvError::UserNotLoggedIn,
        ] {
            let err = HsmError::from_cryptoki("x", &CkError::Pkcs11(rv, Function::Encrypt));
            assert!(err.is_retryable(), "{rv:?}");
        }
        let err = HsmError::from_cryptoki(
            "x",
            &CkError::Pkcs11(RvError::PinIncorrect, Function::Login),
        );
        assert_eq!(err.kind(), HsmErrorKind::PinIncorrect);
        assert!(!err.is_retryable());
    }

    #[test]
    fn vendor_codes_keep_their_value() {
        assert_eq!(
            rv_name(RvError::VendorDefined(0x8000_0001)),
            "CKR_VENDOR_DEFINED(2147483649)"
        );
        assert_eq!(rv_name(RvError::PinIncorrect), "CKR_PIN_INCORRECT");
    }
}
