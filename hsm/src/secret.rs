//! `Pin`: a token PIN that cannot be printed and is zeroized when dropped.
//!
//! PINs come from the environment or a file, never from argv.

use std::fmt;
use std::path::Path;

use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use crate::error::{HsmError, HsmErrorKind};

/// A PKCS#11 PIN. No `Display`; `Debug` prints `Pin(<redacted>)`; the
/// buffer is zeroized on drop.
#[derive(Clone)]
pub struct Pin(Zeroizing<String>);

impl Pin {
    /// Wraps a PIN that is already in memory.
    pub fn new(pin: String) -> Self {
        Pin(Zeroizing::new(pin))
    }

    /// Reads the PIN from the environment variable `var`. An unset, empty or
    /// non-UTF-8 variable is an error of kind
    /// [`HsmErrorKind::InvalidInput`]; the error names the variable, never
    /// its value.
    pub fn from_env(var: &str) -> Result<Pin, HsmError> {
        match std::env::var(var) {
            Ok(value) => {
                let pin = Pin::new(value);
                pin.non_empty("Pin::from_env", var)
            }
            Err(std::env::VarError::NotPresent) => Err(HsmError::new(
                "Pin::from_env",
                HsmErrorKind::InvalidInput,
                format!("environment variable {var} is not set"),
            )),
            // The value is dropped unprinted (it is not zeroized: std owns it).
            Err(std::env::VarError::NotUnicode(_)) => Err(HsmError::new(
                "Pin::from_env",
                HsmErrorKind::InvalidInput,
                format!("environment variable {var} is not UTF-8"),
            )),
        }
    }

    /// Reads the PIN from a file, dropping one trailing newline (`\n` or
    /// `\r\n`) as written by `echo` or a secrets manager.
    pub fn from_file(path: &Path) -> Result<Pin, HsmError> {
        let content = std::fs::read_to_string(path).map_err(|e| {
            HsmError::new(
                "Pin::from_file",
                HsmErrorKind::InvalidInput,
                format!("cannot read PIN file {}: {}", path.display(), e.kind()),
            )
        })?;
        let mut pin = Zeroizing::new(content);
        if pin.ends_with('\n') {
            pin.pop();
            if pin.ends_with('\r') {
                pin.pop();
            }
        }
        Pin(pin).non_empty("Pin::from_file", &path.display().to_string())
    }

    fn non_empty(self, op: &'static str, source: &str) -> Result<Pin, HsmError> {
        if self.0.is_empty() {
            Err(HsmError::new(
                op,
                HsmErrorKind::InvalidInput,
                format!("PIN from {source} is empty"),
            ))
        } else {
            Ok(self)
        }
    }

    /// The PIN in the form `cryptoki` takes (a `secrecy` box, zeroized on
    /// drop).
    pub(crate) fn auth_pin(&self) -> AuthPin {
        AuthPin::from(self.0.as_str())
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Write;

    #[test]
    fn debug_is_redacted() {
        let pin = Pin::new("123456".to_owned());
        assert_eq!(format!("{pin:?}"), "Pin(<redacted>)");
    }

    #[test]
    fn file_trailing_newline_is_trimmed_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(b"12 34\r\n")
            .unwrap();
        let pin = Pin::from_file(&path).unwrap();
        assert_eq!(pin.0.as_str(), "12 34");

        std::fs::write(&path, "\n").unwrap();
        let err = Pin::from_file(&path).unwrap_err();
        assert_eq!(err.kind(), HsmErrorKind::InvalidInput);
        let err = Pin::from_file(&dir.path().join("missing")).unwrap_err();
        assert_eq!(err.kind(), HsmErrorKind::InvalidInput);
    }

    #[test]
    fn env_errors_name_the_variable_not_the_value() {
        let err = Pin::from_env("CARDVAULT_TEST_SURELY_UNSET_PIN_VAR").unwrap_err();
        assert!(err
            .to_string()
            .contains("CARDVAULT_TEST_SURELY_UNSET_PIN_VAR"));
    }
}
