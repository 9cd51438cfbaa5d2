//! SoftHSM fixtures for development and tests: a private configuration and
//! token directory, and token creation through PKCS#11 (so PINs never appear
//! on a command line).
//!
//! SoftHSM reads `SOFTHSM2_CONF` once, when the module is initialized
//! (`C_Initialize`, i.e. the first [`init_token`] or
//! [`crate::Pkcs11Custodian::connect`] in the process). Set the variable to the
//! path [`write_config`] returns before the first PKCS#11 use; changing it
//! later has no effect in that process.
//!
//! A token made by [`init_token`] is visible to later lookups in the same
//! process. A token made by another process (e.g. `hsm/init-token.sh`) after
//! this process initialized the module is not: SoftHSM scans its token
//! directory only at `C_Initialize`, so such a token is seen after a restart.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cryptoki::session::UserType;

use crate::context;
use crate::error::{HsmError, HsmErrorKind};
use crate::secret::Pin;

/// The configuration template; `@TOKENDIR@` stands for the token directory.
pub const CONFIG_TEMPLATE: &str = include_str!("../softhsm2.conf.template");
const TOKENDIR_PLACEHOLDER: &str = "@TOKENDIR@";

/// Where distributions install SoftHSM's PKCS#11 module.
const MODULE_CANDIDATES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

/// The first SoftHSM module found in the usual install locations. Does not
/// read `CARDVAULT_PKCS11_MODULE`; configuration handles that.
pub fn default_module_path() -> Option<PathBuf> {
    MODULE_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Creates `dir/tokens` (mode 0700) and writes `dir/softhsm2.conf` pointing
/// at it. Returns the path of the configuration file, for `SOFTHSM2_CONF`.
pub fn write_config(dir: &Path) -> io::Result<PathBuf> {
    let tokens = tokens_dir(dir);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&tokens)?;
    fs::set_permissions(&tokens, fs::Permissions::from_mode(0o700))?;
    let tokens = tokens
        .to_str()
        .filter(|s| !s.contains('\n'))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "token directory path must be UTF-8 without newlines",
            )
        })?;
    let config = dir.join("softhsm2.conf");
    fs::write(
        &config,
        CONFIG_TEMPLATE.replace(TOKENDIR_PLACEHOLDER, tokens),
    )?;
    Ok(config)
}

/// The token directory [`write_config`] sets up under `dir`.
pub fn tokens_dir(dir: &Path) -> PathBuf {
    dir.join("tokens")
}

/// The subdirectory of `tokens_dir(dir)` in which SoftHSM's file backend
/// keeps the token labelled `label` (found by reading each token's
/// `token.object`), or `None`. For tests that make a token unreachable.
pub fn token_directory(dir: &Path, label: &str) -> io::Result<Option<PathBuf>> {
    let mut padded = label.as_bytes().to_vec();
    // token.object stores the label blank-padded to 32 bytes.
    padded.resize(32, b' ');
    for entry in fs::read_dir(tokens_dir(dir))? {
        let path = entry?.path();
        let object = path.join("token.object");
        if !object.is_file() {
            continue;
        }
        let content = fs::read(&object)?;
        if content
            .windows(padded.len())
            .any(|w| w == padded.as_slice())
        {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Creates and initializes a token labelled `label` in-process: takes the
/// free (uninitialized) slot, `C_InitToken` with the SO PIN, then logs in as
/// SO and `C_InitPIN`s the user PIN. Does nothing when a token with that
/// label exists already. Uses the shared module context, so it can run in a
/// process that also has custodians; calls are serialized.
pub fn init_token(
    module: &Path,
    label: &str,
    so_pin: &Pin,
    user_pin: &Pin,
) -> Result<(), HsmError> {
    if label.is_empty() || label.len() > 32 {
        return Err(HsmError::new(
            "init token",
            HsmErrorKind::InvalidInput,
            "token label must be 1 to 32 bytes",
        ));
    }
    let ctx = context::shared(module)?;
    // One token creation at a time, and no other slot-table call meanwhile
    // (see `context::SlotTable`).
    let table = context::slot_table();
    if context::find_token_slot(&table, &ctx, label)?.is_some() {
        return Ok(());
    }
    let mut free = None;
    for slot in ctx
        .get_slots_with_token()
        .map_err(|e| HsmError::from_cryptoki("C_GetSlotList", &e))?
    {
        // Skip tokens that cannot describe themselves (broken SoftHSM tokens).
        if matches!(ctx.get_token_info(slot), Ok(info) if !info.token_initialized()) {
            free = Some(slot);
            break;
        }
    }
    let free = free.ok_or_else(|| {
        HsmError::new(
            "init token",
            HsmErrorKind::Unavailable,
            "no slot with an uninitialized token",
        )
    })?;
    ctx.init_token(free, &so_pin.auth_pin(), label)
        .map_err(|e| HsmError::from_cryptoki("C_InitToken", &e))?;
    // SoftHSM renumbers slots once a token is initialized: find it again.
    let slot = context::find_token_slot(&table, &ctx, label)?.ok_or_else(|| {
        HsmError::new(
            "init token",
            HsmErrorKind::Internal,
            format!("token {label:?} not visible after C_InitToken"),
        )
    })?;
    let session = ctx
        .open_rw_session(slot)
        .map_err(|e| HsmError::from_cryptoki("C_OpenSession", &e))?;
    session
        .login(UserType::So, Some(&so_pin.auth_pin()))
        .map_err(|e| HsmError::from_cryptoki("C_Login", &e))?;
    session
        .init_pin(&user_pin.auth_pin())
        .map_err(|e| HsmError::from_cryptoki("C_InitPIN", &e))?;
    session
        .logout()
        .map_err(|e| HsmError::from_cryptoki("C_Logout", &e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn config_points_at_a_private_token_dir() {
        let dir = tempfile::tempdir().unwrap();
        let conf = write_config(dir.path()).unwrap();
        let text = fs::read_to_string(&conf).unwrap();
        let tokens = tokens_dir(dir.path());
        assert!(text.contains(&format!("directories.tokendir = {}\n", tokens.display())));
        assert!(text.contains("objectstore.backend = file"));
        assert!(text.contains("log.level = ERROR"));
        assert!(text.contains("slots.removable = false"));
        assert!(!text.contains(TOKENDIR_PLACEHOLDER));
        let mode = fs::metadata(&tokens).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
