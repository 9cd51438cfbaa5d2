//! The process-wide registry of loaded PKCS#11 modules.
//!
//! `C_Initialize` may run once per process per module, yet several custodians
//! (different tokens, parallel tests) and the SoftHSM fixtures need the same
//! module: they all share one initialized [`Pkcs11`] context from here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::slot::Slot;

use crate::error::{HsmError, HsmErrorKind};

static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();

fn registry() -> MutexGuard<'static, HashMap<PathBuf, Pkcs11>> {
    CONTEXTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// The initialized context for `module`, loading and initializing it (with
/// OS locking) on first use in this process.
pub(crate) fn shared(module: &Path) -> Result<Pkcs11, HsmError> {
    if !module.is_file() {
        return Err(HsmError::new(
            "load module",
            HsmErrorKind::ModuleLoad,
            format!("no PKCS#11 module at {}", module.display()),
        ));
    }
    // Two spellings of one file are one module (and one dlopen handle).
    let key = module
        .canonicalize()
        .unwrap_or_else(|_| module.to_path_buf());
    let mut contexts = registry();
    if let Some(ctx) = contexts.get(&key) {
        return Ok(ctx.clone());
    }
    let ctx = Pkcs11::new(&key).map_err(|e| {
        HsmError::from_cryptoki("load module", &e).with_kind(HsmErrorKind::ModuleLoad)
    })?;
    initialize(&ctx).map_err(|e| e.with_kind(HsmErrorKind::ModuleLoad))?;
    contexts.insert(key, ctx.clone());
    Ok(ctx)
}

/// `C_Initialize` with OS locking; "already initialized" (by someone else in
/// this process) is fine.
pub(crate) fn initialize(ctx: &Pkcs11) -> Result<(), HsmError> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(HsmError::from_cryptoki("C_Initialize", &e)),
    }
}

/// Called after `CKR_CRYPTOKI_NOT_INITIALIZED`: someone finalized the module
/// behind our back. Serialized through the registry lock.
pub(crate) fn reinitialize(ctx: &Pkcs11) -> Result<(), HsmError> {
    let _contexts = registry();
    let _table = slot_table();
    initialize(ctx)
}

/// Proof that the caller holds the process-wide slot-table lock.
///
/// SoftHSM 2.6 keeps its slots in an unlocked `std::map`: `C_GetSlotList`
/// adds the spare uninitialized slot whenever none is left, so two threads
/// listing slots right after a `C_InitToken` both add one under the same id
/// and the library aborts the process (`SlotManager::insertToken`
/// assertion); any slot lookup (`C_GetTokenInfo`, `C_OpenSession`) racing
/// that insert reads a map being rebalanced. Every call that reads or changes
/// the slot table, and `C_Finalize`/`C_Initialize` (which replace it), runs
/// under this lock. Lock order: the module registry before this lock.
pub(crate) struct SlotTable(#[allow(dead_code)] MutexGuard<'static, ()>);

pub(crate) fn slot_table() -> SlotTable {
    static LOCK: Mutex<()> = Mutex::new(());
    SlotTable(LOCK.lock().unwrap_or_else(PoisonError::into_inner))
}

/// The slot holding the initialized token labelled `label`, looked up afresh
/// (slot numbers are not stable across token insertions or restarts). The
/// caller holds the slot-table lock.
pub(crate) fn find_token_slot(
    _table: &SlotTable,
    ctx: &Pkcs11,
    label: &str,
) -> Result<Option<Slot>, HsmError> {
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| HsmError::from_cryptoki("C_GetSlotList", &e))?;
    let mut found = None;
    for slot in slots {
        // A token that cannot describe itself (SoftHSM answers
        // CKR_GENERAL_ERROR for a token whose files vanished) is not ours to
        // report: it must not hide the one we look for.
        let info = match ctx.get_token_info(slot) {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(slot = slot.id(), error = %e, "skipping slot");
                continue;
            }
        };
        if info.token_initialized() && info.label() == label {
            if found.is_some() {
                return Err(HsmError::new(
                    "find token",
                    HsmErrorKind::InvalidInput,
                    format!("more than one token is labelled {label:?}"),
                ));
            }
            found = Some(slot);
        }
    }
    Ok(found)
}

/// How many custodians use each module in this process. A module can only
/// be finalized and initialized again (to recover from a token the library
/// has given up on) when a single custodian uses it.
static USERS: OnceLock<Mutex<HashMap<PathBuf, usize>>> = OnceLock::new();

fn users() -> MutexGuard<'static, HashMap<PathBuf, usize>> {
    USERS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// The registry key of a module path.
pub(crate) fn module_key(module: &Path) -> PathBuf {
    module
        .canonicalize()
        .unwrap_or_else(|_| module.to_path_buf())
}

pub(crate) fn add_user(key: &Path) {
    *users().entry(key.to_path_buf()).or_insert(0) += 1;
}

pub(crate) fn remove_user(key: &Path) {
    if let Some(n) = users().get_mut(key) {
        *n = n.saturating_sub(1);
    }
}

pub(crate) fn sole_user(key: &Path) -> bool {
    users().get(key).copied() == Some(1)
}

/// `C_Finalize` then `C_Initialize`: the library forgets every session and
/// rescans its tokens. The caller guarantees no call is in flight and no
/// session of the old incarnation will be used again.
pub(crate) fn restart(ctx: &Pkcs11) -> Result<(), HsmError> {
    let _contexts = registry();
    let _table = slot_table();
    if let Err(e) = ctx.clone().finalize() {
        tracing::debug!(error = %e, "C_Finalize before re-initialization failed");
    }
    initialize(ctx)
}
