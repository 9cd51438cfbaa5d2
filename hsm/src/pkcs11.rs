//! [`Pkcs11Custodian`]: the [`KeyCustodian`] over a real PKCS#11 token.
//!
//! One custodian serves one token, found by label. It keeps a pool of
//! logged-in read/write sessions and a cache of key handles by label. When an
//! operation fails in a way that says the session, login or token went away,
//! it drops the pool and the cache, finds the token again, logs in again and
//! retries the operation once; if that fails too the caller gets
//! [`HsmErrorKind::Unavailable`] and the next call starts over, so the vault
//! heals by itself when the token comes back.
//!
//! SoftHSM 2.6 caveat: once it notices that a token's directory vanished it
//! marks the token broken for the rest of the library's life (C_GetTokenInfo
//! answers CKR_GENERAL_ERROR even after the directory is back). When the
//! token stays unreachable and this custodian is the module's only user in
//! the process, it restarts the module (`C_Finalize` + `C_Initialize`, at
//! most once a second, with no call in flight) so a returning token is found
//! without restarting the vault. Lost sessions and logins are recovered
//! in-process in any case.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use cryptoki::context::{Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::{Date, Ulong};
use zeroize::Zeroizing;

use crate::context;
use crate::error::{HsmError, HsmErrorKind};
use crate::secret::Pin;
use crate::{KeyCustodian, KeyInfo, KeyPurpose, GCM_IV_LEN, GCM_TAG_LEN};

/// How long a call waits for a free session when all `max_sessions` are busy.
const POOL_WAIT: Duration = Duration::from_secs(30);
/// Key length for every key the custodian creates (AES-256, HMAC-SHA256).
const KEY_LEN: u64 = 32;
/// Upper bound for one `random` call.
const MAX_RANDOM_LEN: usize = 1 << 20;
/// Prefix of the `CKA_ID` the custodian writes on keys it creates.
const CREATED_ID_PREFIX: &str = "created:";

/// How to reach the token.
#[derive(Clone, Debug)]
pub struct Pkcs11Config {
    /// Path of the PKCS#11 module (`libsofthsm2.so`, a vendor library, ...).
    pub module_path: PathBuf,
    /// `CKA_LABEL` of the token; the slot is looked up by it on every
    /// (re)connect, never by number.
    pub token_label: String,
    /// User PIN.
    pub user_pin: Pin,
    /// Upper bound on sessions this custodian keeps open (at least 1).
    pub max_sessions: usize,
}

/// [`KeyCustodian`] over a PKCS#11 token. See the module docs for the session
/// pool and recovery.
pub struct Pkcs11Custodian {
    ctx: Pkcs11,
    token_label: String,
    pin: Pin,
    max_sessions: usize,
    pool: Mutex<Pool>,
    session_freed: Condvar,
    /// Serializes find-then-generate in `ensure_key` so two callers cannot
    /// create two keys with one label.
    keygen: Mutex<()>,
    /// Set by [`Pkcs11Custodian::debug_close_all_sessions`]: the next call
    /// sees `CKR_SESSION_HANDLE_INVALID` like a pool whose handles died.
    stale_handle_pending: AtomicBool,
    /// Registry key of the module, for the user count.
    module_key: PathBuf,
    /// Every operation holds this shared; a module restart holds it
    /// exclusively, so no call is in flight across `C_Finalize`.
    gate: RwLock<()>,
    /// When the module was last restarted, to space restarts out.
    last_restart: Mutex<Option<Instant>>,
}

/// Minimum time between two module restarts while the token stays away.
const RESTART_INTERVAL: Duration = Duration::from_secs(1);

impl Drop for Pkcs11Custodian {
    fn drop(&mut self) {
        context::remove_user(&self.module_key);
    }
}

impl std::fmt::Debug for Pkcs11Custodian {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Custodian")
            .field("token_label", &self.token_label)
            .field("max_sessions", &self.max_sessions)
            .finish_non_exhaustive()
    }
}

/// Mutable state, one lock. `generation` changes on every reset; sessions
/// and handles from an older generation are never reused.
struct Pool {
    slot: Option<Slot>,
    generation: u64,
    idle: Vec<(Session, Slot)>,
    /// Sessions of this generation that exist (idle or leased).
    open: usize,
    keys: HashMap<String, ObjectHandle>,
}

/// A session taken from the pool for one call.
struct Lease {
    session: Session,
    slot: Slot,
    generation: u64,
}

/// Why one attempt failed.
#[derive(Debug)]
enum Failure {
    /// A PKCS#11 error; may call for a reconnect.
    Pkcs11 { op: &'static str, err: CkError },
    /// A final answer that no reconnect changes (except `TokenNotFound`).
    Final(HsmError),
}

impl Failure {
    /// Errors that mean the session, the login or the token itself went away
    /// (or that a cached handle belongs to a session state that is gone).
    fn needs_reconnect(&self) -> bool {
        match self {
            Failure::Pkcs11 {
                err: CkError::Pkcs11(rv, _),
                ..
            } => matches!(
                rv,
                RvError::SessionHandleInvalid
                    | RvError::SessionClosed
                    | RvError::SessionCount
                    | RvError::UserNotLoggedIn
                    | RvError::DeviceRemoved
                    | RvError::DeviceError
                    | RvError::DeviceMemory
                    | RvError::TokenNotPresent
                    | RvError::TokenNotRecognized
                    | RvError::SlotIdInvalid
                    | RvError::ObjectHandleInvalid
                    | RvError::KeyHandleInvalid
                    | RvError::CryptokiNotInitialized
                    | RvError::GeneralError
            ),
            Failure::Pkcs11 { .. } => false,
            Failure::Final(e) => e.kind() == HsmErrorKind::TokenNotFound,
        }
    }

    /// Whether the session that saw this failure may go back to the pool.
    fn session_reusable(&self) -> bool {
        !self.needs_reconnect()
            && !matches!(
                self,
                Failure::Pkcs11 {
                    err: CkError::Pkcs11(RvError::OperationActive, _),
                    ..
                }
            )
    }

    fn not_initialized(&self) -> bool {
        matches!(
            self,
            Failure::Pkcs11 {
                err: CkError::Pkcs11(RvError::CryptokiNotInitialized, _),
                ..
            }
        )
    }

    fn into_error(self) -> HsmError {
        match self {
            Failure::Pkcs11 { op, err } => HsmError::from_cryptoki(op, &err),
            Failure::Final(e) => e,
        }
    }
}

impl From<HsmError> for Failure {
    fn from(e: HsmError) -> Self {
        Failure::Final(e)
    }
}

/// `map_err` helper: tag a `cryptoki` error with the operation.
fn ck(op: &'static str) -> impl Fn(CkError) -> Failure {
    move |err| Failure::Pkcs11 { op, err }
}

fn not_logged_in() -> Failure {
    Failure::Pkcs11 {
        op: "C_GetSessionInfo",
        err: CkError::Pkcs11(RvError::UserNotLoggedIn, Function::GetSessionInfo),
    }
}

impl Pkcs11Custodian {
    /// Loads (once per process) and initializes the module, finds the token
    /// by label, opens a session and logs in as User.
    ///
    /// Errors: [`HsmErrorKind::ModuleLoad`] when the module is missing or not
    /// a PKCS#11 library, [`HsmErrorKind::TokenNotFound`] when no token has
    /// the label, [`HsmErrorKind::PinIncorrect`] / [`HsmErrorKind::PinLocked`]
    /// when login fails.
    pub fn connect(config: Pkcs11Config) -> Result<Self, HsmError> {
        if config.token_label.is_empty() || config.token_label.len() > 32 {
            return Err(HsmError::new(
                "connect",
                HsmErrorKind::InvalidInput,
                "token label must be 1 to 32 bytes",
            ));
        }
        if config.max_sessions == 0 {
            return Err(HsmError::new(
                "connect",
                HsmErrorKind::InvalidInput,
                "max_sessions must be at least 1",
            ));
        }
        let ctx = context::shared(&config.module_path)?;
        let module_key = context::module_key(&config.module_path);
        context::add_user(&module_key);
        let custodian = Pkcs11Custodian {
            ctx,
            token_label: config.token_label,
            pin: config.user_pin,
            max_sessions: config.max_sessions,
            pool: Mutex::new(Pool {
                slot: None,
                generation: 0,
                idle: Vec::new(),
                open: 0,
                keys: HashMap::new(),
            }),
            session_freed: Condvar::new(),
            keygen: Mutex::new(()),
            stale_handle_pending: AtomicBool::new(false),
            module_key,
            gate: RwLock::new(()),
            last_restart: Mutex::new(None),
        };
        let lease = custodian.checkout().map_err(Failure::into_error)?;
        custodian.checkin(lease, true);
        tracing::info!(token = %custodian.token_label, "connected to PKCS#11 token");
        Ok(custodian)
    }

    /// The label of the token this custodian serves.
    pub fn token_label(&self) -> &str {
        &self.token_label
    }

    /// Test hook: invalidates the pool's sessions behind its back, like
    /// `C_CloseAllSessions` on the token's slot by another part of the
    /// process. cryptoki 0.12 has no safe `C_CloseAllSessions` and no way to
    /// rebuild a session from a raw handle, so this closes every idle pooled
    /// session with `C_CloseSession` (when no other session of the process
    /// is left on the token, the token logs out, as it would after
    /// `C_CloseAllSessions`) and makes the next call see
    /// `CKR_SESSION_HANDLE_INVALID`, as a pooled handle that died would.
    #[doc(hidden)]
    pub fn debug_close_all_sessions(&self) {
        let idle = {
            let mut pool = self.lock_pool();
            pool.open = pool.open.saturating_sub(pool.idle.len());
            std::mem::take(&mut pool.idle)
        };
        self.session_freed.notify_all();
        for (session, _) in idle {
            if let Err(e) = session.close() {
                tracing::debug!(error = %e, "debug_close_all_sessions: C_CloseSession failed");
            }
        }
        self.stale_handle_pending.store(true, Ordering::SeqCst);
    }

    /// Test hook: `C_Logout` on one pooled session. Login state is per token
    /// per application, so every session of the process on this token drops
    /// to public; the pool does not know.
    #[doc(hidden)]
    pub fn debug_logout(&self) {
        match self.checkout() {
            Ok(lease) => {
                if let Err(e) = lease.session.logout() {
                    tracing::debug!(error = %e, "debug_logout: C_Logout failed");
                }
                self.checkin(lease, true);
            }
            Err(f) => {
                tracing::debug!(error = %f.into_error(), "debug_logout: no session");
            }
        }
    }

    fn lock_pool(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes an idle session, or opens and logs in a new one while fewer
    /// than `max_sessions` exist, or waits for one to be returned.
    fn checkout(&self) -> Result<Lease, Failure> {
        let deadline = Instant::now() + POOL_WAIT;
        let mut pool = self.lock_pool();
        loop {
            if let Some((session, slot)) = pool.idle.pop() {
                return Ok(Lease {
                    session,
                    slot,
                    generation: pool.generation,
                });
            }
            if pool.open < self.max_sessions {
                pool.open += 1;
                let generation = pool.generation;
                let known_slot = pool.slot;
                drop(pool);
                let opened = self.open_session(known_slot);
                let mut pool = self.lock_pool();
                return match opened {
                    Ok((session, slot)) => {
                        if pool.generation == generation {
                            pool.slot = Some(slot);
                        }
                        Ok(Lease {
                            session,
                            slot,
                            generation,
                        })
                    }
                    Err(f) => {
                        if pool.generation == generation {
                            pool.open = pool.open.saturating_sub(1);
                        }
                        drop(pool);
                        self.session_freed.notify_one();
                        Err(f)
                    }
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Failure::Final(HsmError::new(
                    "open session",
                    HsmErrorKind::Unavailable,
                    format!("all {} sessions busy", self.max_sessions),
                )));
            }
            pool = self
                .session_freed
                .wait_timeout(pool, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Opens a R/W session on the token and logs in as User.
    fn open_session(&self, known_slot: Option<Slot>) -> Result<(Session, Slot), Failure> {
        let table = context::slot_table();
        let slot = match known_slot {
            // A cached slot number is only trusted after its label is checked:
            // another token may have taken the number.
            Some(slot) => {
                let info = self
                    .ctx
                    .get_token_info(slot)
                    .map_err(ck("C_GetTokenInfo"))?;
                if info.label() != self.token_label {
                    return Err(self.token_not_found());
                }
                slot
            }
            None => context::find_token_slot(&table, &self.ctx, &self.token_label)?
                .ok_or_else(|| self.token_not_found())?,
        };
        let session = self
            .ctx
            .open_rw_session(slot)
            .map_err(ck("C_OpenSession"))?;
        drop(table);
        match session.login(UserType::User, Some(&self.pin.auth_pin())) {
            // Login state is per token per application: another session of
            // this process may have logged in already.
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok((session, slot)),
            Err(err) => Err(Failure::Pkcs11 { op: "C_Login", err }),
        }
    }

    fn token_not_found(&self) -> Failure {
        Failure::Final(HsmError::new(
            "find token",
            HsmErrorKind::TokenNotFound,
            format!("no initialized token labelled {:?}", self.token_label),
        ))
    }

    /// Returns a session to the pool (`keep`) or closes it.
    fn checkin(&self, lease: Lease, keep: bool) {
        let mut pool = self.lock_pool();
        if lease.generation == pool.generation {
            if keep {
                pool.idle.push((lease.session, lease.slot));
                drop(pool);
                self.session_freed.notify_one();
                return;
            }
            pool.open = pool.open.saturating_sub(1);
        }
        drop(pool);
        self.session_freed.notify_one();
        discard(lease.session, lease.slot);
    }

    /// Starts a new pool generation: forgets the slot number and cached
    /// handles and closes the idle sessions. With `seen`, only when the pool
    /// is still in that generation (returns whether it started one).
    fn start_new_generation(&self, seen: Option<u64>) -> bool {
        let stale = {
            let mut pool = self.lock_pool();
            if seen.is_some_and(|g| g != pool.generation) {
                return false;
            }
            pool.generation = pool.generation.wrapping_add(1);
            pool.slot = None;
            pool.open = 0;
            pool.keys.clear();
            std::mem::take(&mut pool.idle)
        };
        self.session_freed.notify_all();
        for (session, slot) in stale {
            discard(session, slot);
        }
        true
    }

    /// Forgets all sessions, cached handles and the slot number, so the next
    /// checkout finds the token by label and logs in afresh. `seen` is the
    /// generation the failure was observed in: when another thread has reset
    /// since, the state is already fresh and is left alone (one disruption
    /// seen by many threads must not become many resets, each closing the
    /// sessions and handles the previous recovery just made).
    fn reset(&self, cause: &Failure, seen: u64) {
        if !self.start_new_generation(Some(seen)) {
            return;
        }
        if cause.not_initialized() {
            if let Err(e) = context::reinitialize(&self.ctx) {
                tracing::warn!(error = %e, "re-initializing the PKCS#11 module failed");
            }
        }
    }

    /// Runs `f` on a pooled session; on session/token trouble reconnects and
    /// retries once; a second failure of that sort is `Unavailable`. When the
    /// token stays unreachable, the module itself is restarted (see
    /// [`Self::restart_module`]) so a token that comes back is found again.
    fn run<T>(&self, f: impl Fn(&Lease) -> Result<T, Failure>) -> Result<T, HsmError> {
        let result = {
            let _shared = self.gate.read().unwrap_or_else(PoisonError::into_inner);
            self.run_gated(f)
        };
        if let Err(e) = &result {
            if matches!(
                e.kind(),
                HsmErrorKind::Unavailable | HsmErrorKind::TokenNotFound
            ) {
                self.restart_module();
            }
        }
        result
    }

    /// Some libraries give up on a token for the life of the process once it
    /// vanished (SoftHSM 2.6 marks it broken even after its files return).
    /// Finalizing and initializing the module again makes it rescan. That is
    /// only safe when this custodian is the module's only user in the
    /// process (the vault itself; not a test binary with many tokens), and it
    /// is done with no call in flight and no old session left.
    fn restart_module(&self) {
        if !context::sole_user(&self.module_key) {
            return;
        }
        {
            let mut last = self
                .last_restart
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|t| t.elapsed() < RESTART_INTERVAL) {
                return;
            }
            *last = Some(Instant::now());
        }
        let _exclusive = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        self.start_new_generation(None);
        match context::restart(&self.ctx) {
            Ok(()) => {
                tracing::info!(token = %self.token_label, "PKCS#11 module restarted to find the token again")
            }
            Err(e) => {
                tracing::warn!(token = %self.token_label, error = %e, "PKCS#11 module restart failed")
            }
        }
    }

    fn run_gated<T>(&self, f: impl Fn(&Lease) -> Result<T, Failure>) -> Result<T, HsmError> {
        let (first, seen) = match self.attempt(&f, true) {
            Ok(v) => return Ok(v),
            Err((fail, seen)) if fail.needs_reconnect() => (fail, seen),
            Err((fail, _)) => return Err(fail.into_error()),
        };
        self.reset(&first, seen);
        let first = first.into_error();
        tracing::warn!(token = %self.token_label, error = %first, "HSM session lost; reconnecting and retrying once");
        match self.attempt(&f, false) {
            Ok(v) => {
                tracing::info!(token = %self.token_label, "HSM reconnected");
                Ok(v)
            }
            Err((fail, seen)) if fail.needs_reconnect() => {
                self.reset(&fail, seen);
                let err = fail.into_error().with_kind(HsmErrorKind::Unavailable);
                tracing::warn!(token = %self.token_label, error = %err, "HSM unavailable after reconnect");
                Err(err)
            }
            Err((fail, _)) => Err(fail.into_error()),
        }
    }

    /// One try of `f`. A failure comes with the pool generation it was seen
    /// in, for [`Self::reset`].
    fn attempt<T>(
        &self,
        f: &impl Fn(&Lease) -> Result<T, Failure>,
        first: bool,
    ) -> Result<T, (Failure, u64)> {
        let before = self.lock_pool().generation;
        let lease = self.checkout().map_err(|fail| (fail, before))?;
        let seen = lease.generation;
        // The hook's dead handles were in the pool before any reconnect, so
        // only a first attempt can meet one.
        if first && self.stale_handle_pending.swap(false, Ordering::SeqCst) {
            self.checkin(lease, false);
            let err = CkError::Pkcs11(RvError::SessionHandleInvalid, Function::GetSessionInfo);
            return Err((
                Failure::Pkcs11 {
                    op: "C_GetSessionInfo",
                    err,
                },
                seen,
            ));
        }
        let result = f(&lease);
        let keep = match &result {
            Ok(_) => true,
            Err(fail) => fail.session_reusable(),
        };
        self.checkin(lease, keep);
        result.map_err(|fail| (fail, seen))
    }

    /// The handle of the secret key `label`, from the cache or the token.
    fn key_handle(&self, lease: &Lease, label: &str) -> Result<ObjectHandle, Failure> {
        if let Some(handle) = self.lock_pool().keys.get(label).copied() {
            return Ok(handle);
        }
        match self.lookup(lease, label)? {
            Some(handle) => Ok(handle),
            None => Err(Failure::Final(HsmError::new(
                "find key",
                HsmErrorKind::KeyNotFound,
                format!("no key labelled {label:?}"),
            ))),
        }
    }

    /// Searches the token for the secret key `label` and caches the handle.
    fn lookup(&self, lease: &Lease, label: &str) -> Result<Option<ObjectHandle>, Failure> {
        let search = || {
            lease
                .session
                .find_objects(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::Token(true),
                    Attribute::Label(label.as_bytes().to_vec()),
                ])
                .map_err(ck("C_FindObjects"))
        };
        let mut found = search()?;
        if found.is_empty() {
            // Only believe "no such key" from a logged-in session on a token
            // that answers, and from a search that started after that was
            // checked: a search racing with a logout and re-login elsewhere
            // in the process misses private objects. A wrong "not found"
            // would make `ensure_key` create a second key.
            confirm_miss(&self.ctx, lease)?;
            found = search()?;
        }
        match found.as_slice() {
            [] => Ok(None),
            [handle] => {
                let mut pool = self.lock_pool();
                if pool.generation == lease.generation {
                    pool.keys.insert(label.to_owned(), *handle);
                }
                Ok(Some(*handle))
            }
            more => Err(Failure::Final(HsmError::new(
                "find key",
                HsmErrorKind::Internal,
                format!("{} keys are labelled {label:?}", more.len()),
            ))),
        }
    }

    fn forget_key(&self, label: &str) {
        self.lock_pool().keys.remove(label);
    }

    fn generate(
        &self,
        lease: &Lease,
        label: &str,
        purpose: KeyPurpose,
    ) -> Result<ObjectHandle, Failure> {
        let now = time::OffsetDateTime::now_utc();
        let template = key_template(label, purpose, now)?;
        let mechanism = match purpose {
            KeyPurpose::KeyEncryption | KeyPurpose::DataEncryption => Mechanism::AesKeyGen,
            KeyPurpose::Mac => Mechanism::GenericSecretKeyGen,
        };
        let handle = lease
            .session
            .generate_key(&mechanism, &template)
            .map_err(ck("C_GenerateKey"))?;
        let mut pool = self.lock_pool();
        if pool.generation == lease.generation {
            pool.keys.insert(label.to_owned(), handle);
        }
        tracing::info!(label, ?purpose, "created HSM key");
        Ok(handle)
    }
}

/// Closes a session that still answers as ours; forgets one that does not
/// (closing a handle number the token already dropped could close a newer
/// session that reuses the number).
fn discard(session: Session, slot: Slot) {
    match session.get_session_info() {
        Ok(info) if info.slot_id() == slot => drop(session),
        _ => std::mem::forget(session),
    }
}

/// Checks that the session is logged in and the token answers: an empty
/// search result is only believed then. (Private objects are invisible to a
/// session that lost its login, and SoftHSM returns empty searches for a
/// token whose files vanished; "no such key" then would make `ensure_key`
/// create a second key.) Also the health check.
fn confirm_miss(ctx: &Pkcs11, lease: &Lease) -> Result<(), Failure> {
    let info = lease
        .session
        .get_session_info()
        .map_err(ck("C_GetSessionInfo"))?;
    match info.session_state() {
        SessionState::RwUser | SessionState::RoUser => {}
        _ => return Err(not_logged_in()),
    }
    let _table = context::slot_table();
    ctx.get_token_info(lease.slot)
        .map_err(ck("C_GetTokenInfo"))?;
    Ok(())
}

fn check_label(label: &str) -> Result<(), HsmError> {
    if label.is_empty() || label.len() > 255 {
        return Err(HsmError::new(
            "check label",
            HsmErrorKind::InvalidInput,
            "key label must be 1 to 255 bytes",
        ));
    }
    Ok(())
}

/// Usage flags per purpose: (encrypt, decrypt, wrap, unwrap, sign, verify).
fn usage(purpose: KeyPurpose) -> [bool; 6] {
    match purpose {
        KeyPurpose::KeyEncryption => [true, true, true, true, false, false],
        KeyPurpose::DataEncryption => [true, true, false, false, false, false],
        KeyPurpose::Mac => [false, false, false, false, true, true],
    }
}

fn key_template(
    label: &str,
    purpose: KeyPurpose,
    now: time::OffsetDateTime,
) -> Result<Vec<Attribute>, Failure> {
    let key_type = match purpose {
        KeyPurpose::KeyEncryption | KeyPurpose::DataEncryption => KeyType::AES,
        KeyPurpose::Mac => KeyType::GENERIC_SECRET,
    };
    let [encrypt, decrypt, wrap, unwrap, sign, verify] = usage(purpose);
    let date = Date::new_from_str_slice(
        &format!("{:04}", now.year()),
        &format!("{:02}", u8::from(now.month())),
        &format!("{:02}", now.day()),
    )
    .map_err(ck("C_GenerateKey"))?;
    Ok(vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(key_type),
        Attribute::ValueLen(Ulong::from(KEY_LEN)),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(false),
        Attribute::Copyable(false),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(format!("{CREATED_ID_PREFIX}{}", now.unix_timestamp()).into_bytes()),
        Attribute::StartDate(date),
        Attribute::Encrypt(encrypt),
        Attribute::Decrypt(decrypt),
        Attribute::Wrap(wrap),
        Attribute::Unwrap(unwrap),
        Attribute::Sign(sign),
        Attribute::Verify(verify),
        Attribute::Derive(false),
    ])
}

/// Everything `KeyInfo` reports, read in one `C_GetAttributeValue`.
fn key_info(session: &Session, handle: ObjectHandle) -> Result<KeyInfo, Failure> {
    let attrs = session
        .get_attributes(
            handle,
            &[
                AttributeType::Label,
                AttributeType::Class,
                AttributeType::KeyType,
                AttributeType::ValueLen,
                AttributeType::Token,
                AttributeType::Private,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::AlwaysSensitive,
                AttributeType::NeverExtractable,
                AttributeType::Id,
            ],
        )
        .map_err(ck("C_GetAttributeValue"))?;
    let mut info = KeyInfo {
        label: String::new(),
        class: String::new(),
        key_type: String::new(),
        value_len: None,
        token: false,
        private: false,
        sensitive: false,
        extractable: false,
        always_sensitive: false,
        never_extractable: false,
        created_at_unix: None,
    };
    for attr in attrs {
        match attr {
            Attribute::Label(v) => info.label = String::from_utf8_lossy(&v).into_owned(),
            Attribute::Class(c) => {
                info.class = c.to_string().trim_start_matches("CKO_").to_owned();
            }
            Attribute::KeyType(k) => {
                info.key_type = k.to_string().trim_start_matches("CKK_").to_owned();
            }
            // CK_ULONG is 32 bits on some platforms.
            #[allow(clippy::useless_conversion)]
            Attribute::ValueLen(n) => info.value_len = Some(u64::from(*n)),
            Attribute::Token(b) => info.token = b,
            Attribute::Private(b) => info.private = b,
            Attribute::Sensitive(b) => info.sensitive = b,
            Attribute::Extractable(b) => info.extractable = b,
            Attribute::AlwaysSensitive(b) => info.always_sensitive = b,
            Attribute::NeverExtractable(b) => info.never_extractable = b,
            Attribute::Id(id) => info.created_at_unix = parse_created(&id),
            _ => {}
        }
    }
    Ok(info)
}

fn parse_created(id: &[u8]) -> Option<i64> {
    std::str::from_utf8(id)
        .ok()?
        .strip_prefix(CREATED_ID_PREFIX)?
        .parse()
        .ok()
}

/// Whether an existing key has the type and usage flags `purpose` asks for.
fn matches_purpose(
    session: &Session,
    handle: ObjectHandle,
    purpose: KeyPurpose,
) -> Result<bool, Failure> {
    let attrs = session
        .get_attributes(
            handle,
            &[
                AttributeType::KeyType,
                AttributeType::Encrypt,
                AttributeType::Decrypt,
                AttributeType::Wrap,
                AttributeType::Unwrap,
                AttributeType::Sign,
                AttributeType::Verify,
            ],
        )
        .map_err(ck("C_GetAttributeValue"))?;
    let want_type = match purpose {
        KeyPurpose::KeyEncryption | KeyPurpose::DataEncryption => KeyType::AES,
        KeyPurpose::Mac => KeyType::GENERIC_SECRET,
    };
    let mut flags = [false; 6];
    let mut type_ok = false;
    for attr in attrs {
        match attr {
            Attribute::KeyType(k) => type_ok = k == want_type,
            Attribute::Encrypt(b) => flags[0] = b,
            Attribute::Decrypt(b) => flags[1] = b,
            Attribute::Wrap(b) => flags[2] = b,
            Attribute::Unwrap(b) => flags[3] = b,
            Attribute::Sign(b) => flags[4] = b,
            Attribute::Verify(b) => flags[5] = b,
            _ => {}
        }
    }
    Ok(type_ok && flags == usage(purpose))
}

fn gcm_params<'a>(iv: &'a mut [u8; GCM_IV_LEN], aad: &'a [u8]) -> Result<GcmParams<'a>, Failure> {
    let tag_bits = Ulong::from((GCM_TAG_LEN * 8) as u64);
    GcmParams::new(iv, aad, tag_bits).map_err(ck("C_EncryptInit"))
}

impl KeyCustodian for Pkcs11Custodian {
    fn ensure_key(&self, label: &str, purpose: KeyPurpose) -> Result<KeyInfo, HsmError> {
        check_label(label)?;
        let _one_at_a_time = self.keygen.lock().unwrap_or_else(PoisonError::into_inner);
        self.run(|lease| {
            let handle = match self.lookup(lease, label)? {
                Some(handle) => {
                    if !matches_purpose(&lease.session, handle, purpose)? {
                        return Err(Failure::Final(HsmError::new(
                            "ensure key",
                            HsmErrorKind::InvalidInput,
                            format!("key {label:?} exists with a different type or usage than {purpose:?}"),
                        )));
                    }
                    handle
                }
                None => self.generate(lease, label, purpose)?,
            };
            key_info(&lease.session, handle)
        })
    }

    fn find_key(&self, label: &str) -> Result<Option<KeyInfo>, HsmError> {
        check_label(label)?;
        self.run(|lease| match self.lookup(lease, label)? {
            Some(handle) => key_info(&lease.session, handle).map(Some),
            None => Ok(None),
        })
    }

    fn destroy_key(&self, label: &str) -> Result<bool, HsmError> {
        check_label(label)?;
        let _one_at_a_time = self.keygen.lock().unwrap_or_else(PoisonError::into_inner);
        let destroyed = self.run(|lease| match self.lookup(lease, label)? {
            Some(handle) => {
                lease
                    .session
                    .destroy_object(handle)
                    .map_err(ck("C_DestroyObject"))?;
                self.forget_key(label);
                Ok(true)
            }
            None => Ok(false),
        })?;
        if destroyed {
            tracing::info!(label, "destroyed HSM key");
        }
        Ok(destroyed)
    }

    fn encrypt(
        &self,
        label: &str,
        iv: &[u8; GCM_IV_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        self.run(|lease| {
            let key = self.key_handle(lease, label)?;
            let mut iv = *iv;
            let mechanism = Mechanism::AesGcm(gcm_params(&mut iv, aad)?);
            lease
                .session
                .encrypt(&mechanism, key, plaintext)
                .map_err(ck("C_Encrypt"))
        })
    }

    fn decrypt(
        &self,
        label: &str,
        iv: &[u8; GCM_IV_LEN],
        aad: &[u8],
        ciphertext_and_tag: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        if ciphertext_and_tag.len() < GCM_TAG_LEN {
            return Err(HsmError::new(
                "C_Decrypt",
                HsmErrorKind::InvalidData,
                "ciphertext shorter than the GCM tag",
            ));
        }
        self.run(|lease| {
            let key = self.key_handle(lease, label)?;
            let attempt = || -> Result<Result<Vec<u8>, CkError>, Failure> {
                let mut iv = *iv;
                let mechanism = Mechanism::AesGcm(gcm_params(&mut iv, aad)?);
                Ok(lease.session.decrypt(&mechanism, key, ciphertext_and_tag))
            };
            match attempt()? {
                Ok(plaintext) => Ok(Zeroizing::new(plaintext)),
                Err(CkError::Pkcs11(RvError::GeneralError | RvError::FunctionFailed, _)) => {
                    // SoftHSM reports a GCM tag mismatch as CKR_GENERAL_ERROR.
                    // Only believe that when session and token are fine and a
                    // second try fails the same way (a mismatch is
                    // deterministic; a transient failure is not).
                    confirm_miss(&self.ctx, lease)?;
                    match attempt()? {
                        Ok(plaintext) => Ok(Zeroizing::new(plaintext)),
                        Err(err) => Err(decrypt_failure(err, true)),
                    }
                }
                Err(err) => Err(decrypt_failure(err, false)),
            }
        })
    }

    fn hmac_sha256(&self, label: &str, data: &[u8]) -> Result<[u8; 32], HsmError> {
        self.run(|lease| {
            let key = self.key_handle(lease, label)?;
            let mac = lease
                .session
                .sign(&Mechanism::Sha256Hmac, key, data)
                .map_err(ck("C_Sign"))?;
            <[u8; 32]>::try_from(mac.as_slice()).map_err(|_| {
                Failure::Final(HsmError::new(
                    "C_Sign",
                    HsmErrorKind::Internal,
                    format!("HMAC-SHA256 returned {} bytes", mac.len()),
                ))
            })
        })
    }

    fn random(&self, len: usize) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        if len > MAX_RANDOM_LEN {
            return Err(HsmError::new(
                "C_GenerateRandom",
                HsmErrorKind::InvalidInput,
                format!("at most {MAX_RANDOM_LEN} random bytes per call"),
            ));
        }
        if len == 0 {
            return Ok(Zeroizing::new(Vec::new()));
        }
        self.run(|lease| {
            let mut buf = Zeroizing::new(vec![0u8; len]);
            lease
                .session
                .generate_random_slice(&mut buf[..])
                .map_err(ck("C_GenerateRandom"))?;
            Ok(buf)
        })
    }

    fn inventory(&self) -> Result<Vec<KeyInfo>, HsmError> {
        self.run(|lease| {
            // Private objects are listed only while logged in: check before
            // and after, so a logout in between cannot shorten the list.
            confirm_miss(&self.ctx, lease)?;
            let handles = lease
                .session
                .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
                .map_err(ck("C_FindObjects"))?;
            let mut keys = handles
                .into_iter()
                .map(|h| key_info(&lease.session, h))
                .collect::<Result<Vec<_>, _>>()?;
            confirm_miss(&self.ctx, lease)?;
            keys.sort_by(|a, b| a.label.cmp(&b.label));
            Ok(keys)
        })
    }

    fn health(&self) -> Result<(), HsmError> {
        self.run(|lease| confirm_miss(&self.ctx, lease))
    }
}

/// What a failed `C_Decrypt` means: the spec's answers for a bad ciphertext
/// or tag are `InvalidData`; so is CKR_GENERAL_ERROR once the caller has
/// ruled out a broken session or token (`general_is_data`); anything else
/// goes through the usual classification.
fn decrypt_failure(err: CkError, general_is_data: bool) -> Failure {
    let is_data = match &err {
        CkError::Pkcs11(rv, _) => match rv {
            RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange
            | RvError::DataInvalid
            | RvError::DataLenRange => true,
            RvError::GeneralError | RvError::FunctionFailed => general_is_data,
            _ => false,
        },
        _ => false,
    };
    if is_data {
        Failure::Final(
            HsmError::from_cryptoki("C_Decrypt", &err).with_kind(HsmErrorKind::InvalidData),
        )
    } else {
        Failure::Pkcs11 {
            op: "C_Decrypt",
            err,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn template_records_creation_and_purpose_only() {
        let now = time::macros::datetime!(2025-03-04 05:06:07 UTC);
        let t = key_template("kek", KeyPurpose::KeyEncryption, now).unwrap();
        let has = |a: Attribute| t.contains(&a);
        assert!(has(Attribute::StartDate(
            Date::new_from_str_slice("2025", "03", "04").unwrap()
        )));
        assert!(has(Attribute::Id(b"created:1741064767".to_vec())));
        assert!(has(Attribute::Sensitive(true)));
        assert!(has(Attribute::Extractable(false)));
        assert!(has(Attribute::Modifiable(false)));
        assert!(has(Attribute::Wrap(true)));
        assert!(has(Attribute::Sign(false)));
        assert!(has(Attribute::Derive(false)));
        assert_eq!(parse_created(b"created:1741064767"), Some(1_741_064_767));
        assert_eq!(parse_created(b"other"), None);

        let t = key_template("mac", KeyPurpose::Mac, now).unwrap();
        assert!(t.contains(&Attribute::KeyType(KeyType::GENERIC_SECRET)));
        assert!(t.contains(&Attribute::Sign(true)));
        assert!(t.contains(&Attribute::Encrypt(false)));
    }
}
