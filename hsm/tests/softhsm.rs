//! Integration tests against SoftHSM. Every test makes its own token in a
//! process-wide private SoftHSM directory; nothing depends on tokens that
//! exist on the machine.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cardvault_hsm::{
    softhsm, HsmErrorKind, KeyCustodian, KeyInfo, KeyPurpose, Pin, Pkcs11Config, Pkcs11Custodian,
};
use cryptoki::context::Pkcs11;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::{AuthPin, Date};

const SO_PIN: &str = "so-pin-1234";
const USER_PIN: &str = "user-pin-5678";

struct TestEnv {
    dir: PathBuf,
    module: PathBuf,
    _owned: Option<tempfile::TempDir>,
}

/// Set in a child process started by a test: use the parent's SoftHSM
/// directory instead of a fresh one.
const REUSE_DIR_VAR: &str = "CARDVAULT_HSM_TEST_DIR";

/// The process-wide SoftHSM directory. SOFTHSM2_CONF is set here, before
/// any PKCS#11 use in this process.
fn env() -> &'static TestEnv {
    static ENV: OnceLock<TestEnv> = OnceLock::new();
    ENV.get_or_init(|| {
        let module = softhsm::default_module_path().expect("SoftHSM is not installed");
        if let Some(dir) = std::env::var_os(REUSE_DIR_VAR) {
            let dir = PathBuf::from(dir);
            std::env::set_var("SOFTHSM2_CONF", dir.join("softhsm2.conf"));
            return TestEnv {
                dir,
                module,
                _owned: None,
            };
        }
        // Under target/tmp, not /tmp: statics are never dropped, so the
        // directory outlives the process; stale ones are swept here.
        let parent = Path::new(env!("CARGO_TARGET_TMPDIR"));
        sweep_stale(parent);
        let owned = tempfile::Builder::new()
            .prefix("cardvault-hsm-")
            .tempdir_in(parent)
            .unwrap();
        let conf = softhsm::write_config(owned.path()).unwrap();
        std::env::set_var("SOFTHSM2_CONF", &conf);
        TestEnv {
            dir: owned.path().to_path_buf(),
            module,
            _owned: Some(owned),
        }
    })
}

/// Removes test directories of earlier runs (older than an hour).
fn sweep_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(3600));
        if old
            && entry
                .file_name()
                .to_string_lossy()
                .starts_with("cardvault-hsm-")
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A fresh token with a label unique in this process.
fn fresh_token(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let label = format!("{name}-{}", N.fetch_add(1, Ordering::SeqCst));
    softhsm::init_token(
        &env().module,
        &label,
        &Pin::new(SO_PIN.into()),
        &Pin::new(USER_PIN.into()),
    )
    .unwrap();
    label
}

fn config(label: &str) -> Pkcs11Config {
    Pkcs11Config {
        module_path: env().module.clone(),
        token_label: label.to_owned(),
        user_pin: Pin::new(USER_PIN.into()),
        max_sessions: 4,
    }
}

fn custodian(label: &str) -> Pkcs11Custodian {
    Pkcs11Custodian::connect(config(label)).unwrap()
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A raw cryptoki session on the token, logged in as User, for checks the
/// custodian must not offer. The module is already initialized by the
/// custodian; `Pkcs11::new` on the same file reuses the loaded library.
fn raw_session(label: &str) -> Session {
    let ctx = Pkcs11::new(&env().module).unwrap();
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label() == label)
        .unwrap();
    let session = ctx.open_rw_session(slot).unwrap();
    match session.login(UserType::User, Some(&AuthPin::from(USER_PIN))) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("login: {e}"),
    }
    session
}

fn raw_key(session: &Session, label: &str) -> ObjectHandle {
    let found = session
        .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
        .unwrap();
    assert_eq!(found.len(), 1, "{label}");
    found[0]
}

fn bools(session: &Session, key: ObjectHandle, types: &[AttributeType]) -> Vec<bool> {
    session
        .get_attributes(key, types)
        .unwrap()
        .into_iter()
        .map(|a| match a {
            Attribute::Encrypt(b)
            | Attribute::Decrypt(b)
            | Attribute::Wrap(b)
            | Attribute::Unwrap(b)
            | Attribute::Sign(b)
            | Attribute::Verify(b)
            | Attribute::Derive(b)
            | Attribute::Modifiable(b)
            | Attribute::Copyable(b) => b,
            other => panic!("unexpected {other:?}"),
        })
        .collect()
}

const USAGE: [AttributeType; 9] = [
    AttributeType::Encrypt,
    AttributeType::Decrypt,
    AttributeType::Wrap,
    AttributeType::Unwrap,
    AttributeType::Sign,
    AttributeType::Verify,
    AttributeType::Derive,
    AttributeType::Modifiable,
    AttributeType::Copyable,
];

fn assert_locked_down(info: &KeyInfo, key_type: &str) {
    assert_eq!(info.class, "SECRET_KEY");
    assert_eq!(info.key_type, key_type);
    assert_eq!(info.value_len, Some(32));
    assert!(info.token && info.private, "{info:?}");
    assert!(info.sensitive && info.always_sensitive, "{info:?}");
    assert!(!info.extractable && info.never_extractable, "{info:?}");
    let created = info.created_at_unix.expect("creation time recorded");
    assert!((created - now_unix()).abs() < 300, "{created}");
}

/// The key cannot leave the token and its protections cannot be undone.
fn assert_cannot_escape(session: &Session, key: ObjectHandle) {
    // CKA_VALUE is not readable.
    assert!(matches!(
        session
            .get_attribute_info(key, &[AttributeType::Value])
            .unwrap()[0],
        AttributeInfo::Sensitive
    ));
    assert!(session
        .get_attributes(key, &[AttributeType::Value])
        .unwrap()
        .is_empty());

    // Not even a trusted-looking wrapping key on the same token can export it,
    // while the same wrapping key does export an extractable key (so the
    // failure is the attribute, not the mechanism).
    let wrapping = session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(false),
                Attribute::ValueLen(32.into()),
                Attribute::Wrap(true),
                Attribute::Encrypt(true),
            ],
        )
        .unwrap();
    let extractable = session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(false),
                Attribute::ValueLen(32.into()),
                Attribute::Extractable(true),
                Attribute::Sensitive(false),
            ],
        )
        .unwrap();
    assert_eq!(
        session
            .wrap_key(&Mechanism::AesKeyWrap, wrapping, extractable)
            .unwrap()
            .len(),
        40
    );
    match session.wrap_key(&Mechanism::AesKeyWrap, wrapping, key) {
        Err(CkError::Pkcs11(RvError::KeyUnextractable, _)) => {}
        other => panic!("wrapping out the key: {other:?}"),
    }

    for flip in [
        Attribute::Extractable(true),
        Attribute::Sensitive(false),
        Attribute::Encrypt(true),
        Attribute::Sign(true),
        Attribute::Derive(true),
    ] {
        let res = session.update_attributes(key, std::slice::from_ref(&flip));
        assert!(res.is_err(), "C_SetAttributeValue {flip:?} succeeded");
    }
    // A copy cannot be made either (CKA_COPYABLE false).
    assert!(session
        .copy_object(key, &[Attribute::Token(false)])
        .is_err());
}

fn assert_started_today(session: &Session, key: ObjectHandle) {
    let attrs = match session.get_attributes(key, &[AttributeType::StartDate]) {
        Ok(attrs) => attrs,
        // SoftHSM 2.6.1 stores CKA_START_DATE of a private object in clear
        // but decrypts it on read, so reading it fails. An object without a
        // start date reads fine (empty), so this error shows one is stored;
        // the unit test of the template checks its value.
        Err(CkError::Pkcs11(RvError::GeneralError, _)) => return,
        Err(e) => panic!("reading CKA_START_DATE: {e}"),
    };
    let Some(Attribute::StartDate(date)) = attrs.first() else {
        panic!("no CKA_START_DATE: {attrs:?}")
    };
    let today = time::OffsetDateTime::now_utc().date();
    let ok = [today, today.previous_day().unwrap()].iter().any(|d| {
        *date
            == Date::new_from_str_slice(
                &format!("{:04}", d.year()),
                &format!("{:02}", u8::from(d.month())),
                &format!("{:02}", d.day()),
            )
            .unwrap()
    });
    assert!(ok, "CKA_START_DATE {date:?}");
}

#[test]
fn keys_are_created_locked_down() {
    let label = fresh_token("lock");
    let c = custodian(&label);
    let kek = c
        .ensure_key("cardvault-kek-v1", KeyPurpose::KeyEncryption)
        .unwrap();
    let mac = c
        .ensure_key("cardvault-audit-mac", KeyPurpose::Mac)
        .unwrap();
    let dek = c
        .ensure_key("cardvault-hsm-dek", KeyPurpose::DataEncryption)
        .unwrap();
    assert_locked_down(&kek, "AES");
    assert_locked_down(&mac, "GENERIC_SECRET");
    assert_locked_down(&dek, "AES");
    assert_eq!(kek.label, "cardvault-kek-v1");

    let inventory = c.inventory().unwrap();
    assert_eq!(
        inventory
            .iter()
            .map(|k| k.label.as_str())
            .collect::<Vec<_>>(),
        [
            "cardvault-audit-mac",
            "cardvault-hsm-dek",
            "cardvault-kek-v1"
        ]
    );
    for info in &inventory {
        assert_locked_down(info, &info.key_type);
    }
    assert_eq!(inventory[2], kek);

    let session = raw_session(&label);
    let kek_h = raw_key(&session, "cardvault-kek-v1");
    let mac_h = raw_key(&session, "cardvault-audit-mac");
    let dek_h = raw_key(&session, "cardvault-hsm-dek");
    //                                      enc    dec    wrap   unwrap sign   verify derive modif  copy
    assert_eq!(
        bools(&session, kek_h, &USAGE),
        [true, true, true, true, false, false, false, false, false]
    );
    assert_eq!(
        bools(&session, dek_h, &USAGE),
        [true, true, false, false, false, false, false, false, false]
    );
    assert_eq!(
        bools(&session, mac_h, &USAGE),
        [false, false, false, false, true, true, false, false, false]
    );
    let attrs = session.get_attributes(kek_h, &[AttributeType::Id]).unwrap();
    assert!(matches!(&attrs[0], Attribute::Id(id) if id.starts_with(b"created:")));
    for key in [kek_h, mac_h, dek_h] {
        assert_cannot_escape(&session, key);
        assert_started_today(&session, key);
    }
    // Closing the session destroys its session objects (the test's
    // wrapping keys), which the inventory would otherwise list.
    drop(session);

    // Idempotent: same key, no duplicate.
    let again = c
        .ensure_key("cardvault-kek-v1", KeyPurpose::KeyEncryption)
        .unwrap();
    assert_eq!(again, kek);
    assert_eq!(c.inventory().unwrap().len(), 3);
    // A label already taken by a key of another kind is refused.
    let err = c
        .ensure_key("cardvault-kek-v1", KeyPurpose::Mac)
        .unwrap_err();
    assert_eq!(err.kind(), HsmErrorKind::InvalidInput);
    let err = c
        .ensure_key("cardvault-kek-v1", KeyPurpose::DataEncryption)
        .unwrap_err();
    assert_eq!(err.kind(), HsmErrorKind::InvalidInput);
}

#[test]
fn concurrent_ensure_key_creates_one_key() {
    let label = fresh_token("once");
    let c = Arc::new(custodian(&label));
    let infos: Vec<KeyInfo> = (0..6)
        .map(|_| {
            let c = Arc::clone(&c);
            std::thread::spawn(move || c.ensure_key("k", KeyPurpose::KeyEncryption).unwrap())
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert!(infos.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(c.inventory().unwrap().len(), 1);
}

/// SoftHSM's C_GetSlotList adds the spare uninitialized slot without a lock:
/// two threads listing slots just after a C_InitToken both add it under the
/// same slot id and the library aborts the process (`SlotManager::insertToken`
/// assertion). Token creation and lookups racing from many threads must not
/// get there.
#[test]
fn concurrent_token_creation_and_lookup() {
    let base = fresh_token("race-base");
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let lookups: Vec<_> = (0..6)
        .map(|_| {
            let (base, done) = (base.clone(), Arc::clone(&done));
            std::thread::spawn(move || {
                let mut n = 0u32;
                while !done.load(Ordering::SeqCst) {
                    // A lookup of a missing label is little more than
                    // C_GetSlotList: the densest way to race token creation.
                    let err = Pkcs11Custodian::connect(config("race-missing")).unwrap_err();
                    assert_eq!(err.kind(), HsmErrorKind::TokenNotFound, "{err}");
                    n += 1;
                }
                custodian(&base).health().unwrap();
                n
            })
        })
        .collect();
    let makers: Vec<_> = (0..2)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..12 {
                    custodian(&fresh_token(&format!("race{t}-{i}")))
                        .health()
                        .unwrap();
                }
            })
        })
        .collect();
    for t in makers {
        t.join().unwrap();
    }
    done.store(true, Ordering::SeqCst);
    for t in lookups {
        assert!(t.join().unwrap() > 0);
    }
}

#[test]
fn gcm_hmac_random_and_destroy() {
    let label = fresh_token("ops");
    let c = custodian(&label);
    c.ensure_key("dek", KeyPurpose::DataEncryption).unwrap();
    c.ensure_key("kek", KeyPurpose::KeyEncryption).unwrap();
    c.ensure_key("mac", KeyPurpose::Mac).unwrap();
    c.ensure_key("mac2", KeyPurpose::Mac).unwrap();

    let iv = [7u8; 12];
    let aad = b"cardvault/v1|merchant|record|dek";
    let pt = b"4111111111111111";
    let ct = c.encrypt("dek", &iv, aad, pt).unwrap();
    assert_eq!(ct.len(), pt.len() + 16);
    assert_ne!(&ct[..pt.len()], pt);
    assert_eq!(c.decrypt("dek", &iv, aad, &ct).unwrap().as_slice(), pt);
    // Deterministic for the same key, IV and AAD; the KEK is a different key.
    assert_eq!(c.encrypt("dek", &iv, aad, pt).unwrap(), ct);
    let wrapped = c.encrypt("kek", &iv, aad, pt).unwrap();
    assert_ne!(wrapped, ct);
    assert_eq!(c.decrypt("kek", &iv, aad, &wrapped).unwrap().as_slice(), pt);
    assert_eq!(
        c.decrypt("dek", &iv, b"", &c.encrypt("dek", &iv, b"", b"").unwrap())
            .unwrap()
            .len(),
        0
    );

    let invalid = |res: Result<zeroize::Zeroizing<Vec<u8>>, cardvault_hsm::HsmError>| {
        let err = res.unwrap_err();
        assert_eq!(err.kind(), HsmErrorKind::InvalidData, "{err}");
        assert!(!err.is_retryable());
    };
    let tag_failure = c.decrypt("dek", &iv, b"other aad", &ct).unwrap_err();
    eprintln!("wrong AAD: {tag_failure}");
    invalid(c.decrypt("dek", &iv, b"other aad", &ct));
    invalid(c.decrypt("dek", &[8u8; 12], aad, &ct));
    invalid(c.decrypt("kek", &iv, aad, &ct));
    for bit in [0, ct.len() * 8 - 1] {
        let mut bad = ct.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        invalid(c.decrypt("dek", &iv, aad, &bad));
    }
    invalid(c.decrypt("dek", &iv, aad, &ct[..15]));
    // A failed decrypt leaves the pooled session usable.
    assert_eq!(c.decrypt("dek", &iv, aad, &ct).unwrap().as_slice(), pt);

    let m1 = c.hmac_sha256("mac", b"4111111111111111").unwrap();
    assert_eq!(c.hmac_sha256("mac", b"4111111111111111").unwrap(), m1);
    assert_ne!(c.hmac_sha256("mac", b"4111111111111112").unwrap(), m1);
    assert_ne!(c.hmac_sha256("mac2", b"4111111111111111").unwrap(), m1);
    // Keys only do what their purpose allows.
    assert_eq!(
        c.hmac_sha256("dek", b"x").unwrap_err().kind(),
        HsmErrorKind::InvalidInput
    );
    assert_eq!(
        c.encrypt("mac", &iv, b"", b"x").unwrap_err().kind(),
        HsmErrorKind::InvalidInput
    );

    let r1 = c.random(32).unwrap();
    let r2 = c.random(32).unwrap();
    assert_eq!(r1.len(), 32);
    assert_ne!(r1, r2);
    assert!(c.random(0).unwrap().is_empty());
    assert_eq!(
        c.random(1 << 21).unwrap_err().kind(),
        HsmErrorKind::InvalidInput
    );

    c.health().unwrap();
    assert_eq!(c.find_key("dek").unwrap().unwrap().key_type, "AES");
    assert!(c.find_key("nope").unwrap().is_none());
    let err = c.encrypt("nope", &iv, b"", b"x").unwrap_err();
    assert_eq!(err.kind(), HsmErrorKind::KeyNotFound);

    assert!(c.destroy_key("dek").unwrap());
    assert!(c.find_key("dek").unwrap().is_none());
    assert_eq!(
        c.encrypt("dek", &iv, aad, pt).unwrap_err().kind(),
        HsmErrorKind::KeyNotFound
    );
    assert!(!c.destroy_key("dek").unwrap());
    assert_eq!(c.inventory().unwrap().len(), 3);
}

#[test]
fn key_destroyed_elsewhere_is_not_found() {
    let label = fresh_token("gone");
    let a = custodian(&label);
    let b = custodian(&label);
    a.ensure_key("k", KeyPurpose::DataEncryption).unwrap();
    let iv = [1u8; 12];
    a.encrypt("k", &iv, b"", b"x").unwrap(); // caches the handle
    assert!(b.destroy_key("k").unwrap());
    let err = a.encrypt("k", &iv, b"", b"x").unwrap_err();
    assert_eq!(err.kind(), HsmErrorKind::KeyNotFound, "{err}");
    // A new key with the same label is found, not the stale handle.
    b.ensure_key("k", KeyPurpose::DataEncryption).unwrap();
    a.encrypt("k", &iv, b"", b"x").unwrap();
}

#[test]
fn lost_sessions_and_login_are_recovered() {
    let label = fresh_token("heal");
    let c = custodian(&label);
    c.ensure_key("dek", KeyPurpose::DataEncryption).unwrap();
    c.ensure_key("mac", KeyPurpose::Mac).unwrap();
    let iv = [3u8; 12];
    let ct = c.encrypt("dek", &iv, b"aad", b"secret").unwrap();

    c.debug_close_all_sessions();
    assert_eq!(c.encrypt("dek", &iv, b"aad", b"secret").unwrap(), ct);
    c.debug_close_all_sessions();
    assert_eq!(
        c.decrypt("dek", &iv, b"aad", &ct).unwrap().as_slice(),
        b"secret"
    );

    c.debug_logout();
    assert_eq!(c.encrypt("dek", &iv, b"aad", b"secret").unwrap(), ct);
    c.debug_logout();
    c.hmac_sha256("mac", b"x").unwrap();
    // Lookups that miss the handle cache must not answer "not found" just
    // because private objects are hidden from a logged-out session.
    c.debug_logout();
    assert!(c.find_key("dek").unwrap().is_some());
    c.debug_logout();
    assert_eq!(c.inventory().unwrap().len(), 2);
    c.debug_logout();
    c.health().unwrap();
    c.debug_logout();
    assert_eq!(
        c.ensure_key("dek", KeyPurpose::DataEncryption).unwrap(),
        c.find_key("dek").unwrap().unwrap()
    );
    assert_eq!(c.inventory().unwrap().len(), 2);
}

#[test]
fn connect_errors_are_distinct() {
    let label = fresh_token("conn");
    let mut cfg = config(&label);
    cfg.module_path = PathBuf::from("/nonexistent/libpkcs11.so");
    let err = Pkcs11Custodian::connect(cfg).unwrap_err();
    assert_eq!(err.kind(), HsmErrorKind::ModuleLoad, "{err}");

    let not_a_module = env().dir.as_path().join("not-a-module.so");
    std::fs::write(&not_a_module, b"not an ELF file").unwrap();
    let mut cfg = config(&label);
    cfg.module_path = not_a_module;
    let err = Pkcs11Custodian::connect(cfg).unwrap_err();
    assert_eq!(err.kind(), HsmErrorKind::ModuleLoad, "{err}");

    let err = Pkcs11Custodian::connect(config("no-such-token")).unwrap_err();
    assert_eq!(err.kind(), HsmErrorKind::TokenNotFound, "{err}");

    let mut cfg = config(&label);
    cfg.user_pin = Pin::new("wrong-pin".into());
    let err = Pkcs11Custodian::connect(cfg).unwrap_err();
    assert_eq!(err.kind(), HsmErrorKind::PinIncorrect, "{err}");
    assert_eq!(err.op(), "C_Login");
    assert!(!err.to_string().contains("wrong-pin"));

    // The right PIN still works (no lockout from one failure).
    custodian(&label).health().unwrap();
}

#[test]
fn init_token_is_idempotent_and_visible_in_process() {
    let label = fresh_token("idem");
    let so = Pin::new(SO_PIN.into());
    let user = Pin::new(USER_PIN.into());
    softhsm::init_token(&env().module, &label, &so, &user).unwrap();
    // The token created in-process is found by a later lookup, exactly once.
    let c = custodian(&label);
    c.ensure_key("k", KeyPurpose::Mac).unwrap();
    let again = softhsm::init_token(&env().module, &label, &Pin::new("other-so".into()), &user);
    again.unwrap();
    assert_eq!(custodian(&label).inventory().unwrap().len(), 1);
    assert!(softhsm::token_directory(env().dir.as_path(), &label)
        .unwrap()
        .is_some());
}

#[test]
fn concurrent_encrypt_decrypt() {
    let label = fresh_token("par");
    let c = Arc::new(custodian(&label));
    c.ensure_key("dek", KeyPurpose::DataEncryption).unwrap();
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            let c = Arc::clone(&c);
            std::thread::spawn(move || {
                for i in 0..200u32 {
                    let mut iv = [0u8; 12];
                    iv[0] = t;
                    iv[1..5].copy_from_slice(&i.to_be_bytes());
                    let pt = format!("thread {t} message {i}");
                    let aad = [t];
                    let ct = c.encrypt("dek", &iv, &aad, pt.as_bytes()).unwrap();
                    let back = c.decrypt("dek", &iv, &aad, &ct).unwrap();
                    assert_eq!(back.as_slice(), pt.as_bytes());
                }
            })
        })
        .collect();
    // Session trouble in the middle of the load is absorbed too.
    std::thread::sleep(Duration::from_millis(20));
    c.debug_logout();
    std::thread::sleep(Duration::from_millis(20));
    c.debug_close_all_sessions();
    for t in threads {
        t.join().unwrap();
    }
    c.health().unwrap();
}

/// Held by tests that move token directories or let another process read
/// them.
fn token_dir_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Runs one `#[ignore]`d helper test of this binary in a child process that
/// shares this process's SoftHSM directory.
fn run_child(test: &str, vars: &[(&str, String)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([test, "--exact", "--ignored", "--nocapture"])
        .env(REUSE_DIR_VAR, &env().dir);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    eprintln!(
        "child {test}: {:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn assert_unavailable<T: std::fmt::Debug>(what: &str, res: Result<T, cardvault_hsm::HsmError>) {
    match res {
        Err(e) => {
            eprintln!("[token unreachable] {what}: {e}");
            assert_eq!(e.kind(), HsmErrorKind::Unavailable, "{what}: {e}");
            assert!(e.is_retryable());
        }
        Ok(v) => panic!("{what} succeeded while the token was unreachable: {v:?}"),
    }
}

/// Moves a token's directory away and back (SoftHSM's file backend keeps one
/// directory per token).
///
/// Observed with SoftHSM 2.6.1: while the directory is gone, existing
/// sessions stay valid (C_GetSessionInfo, C_GenerateRandom, C_OpenSession
/// succeed), C_EncryptInit on a known key handle fails with
/// CKR_OBJECT_HANDLE_INVALID, C_FindObjects finds nothing, C_GetTokenInfo
/// fails with CKR_GENERAL_ERROR. Once SoftHSM has noticed, the token stays
/// broken in that process even after the directory is moved back (same
/// answers): only a new process (a new C_Initialize) sees it again.
#[test]
fn unreachable_token() {
    let _alone = token_dir_lock();
    let label = fresh_token("away");
    let c = custodian(&label);
    // A second user of the module in this process: the custodian then never
    // restarts the module (that would disturb the other user), which is the
    // behaviour pinned down here. The single-user restart that heals the
    // token is exercised by the API's HSM outage test in its own process.
    let _other = custodian(&fresh_token("other"));
    c.ensure_key("dek", KeyPurpose::DataEncryption).unwrap();
    c.ensure_key("mac", KeyPurpose::Mac).unwrap();
    let iv = [5u8; 12];
    let ct = c.encrypt("dek", &iv, b"aad", b"pan").unwrap();

    let token_dir = softhsm::token_directory(env().dir.as_path(), &label)
        .unwrap()
        .unwrap();
    let parked = env().dir.join(format!("parked-{label}"));
    std::fs::rename(&token_dir, &parked).unwrap();

    let check_all = |phase: &str| {
        assert_unavailable(&format!("{phase} health"), c.health());
        assert_unavailable(
            &format!("{phase} encrypt"),
            c.encrypt("dek", &iv, b"aad", b"pan"),
        );
        assert_unavailable(
            &format!("{phase} decrypt"),
            c.decrypt("dek", &iv, b"aad", &ct),
        );
        assert_unavailable(&format!("{phase} hmac"), c.hmac_sha256("mac", b"x"));
        assert_unavailable(&format!("{phase} find_key"), c.find_key("dek"));
        assert_unavailable(
            &format!("{phase} ensure_key"),
            c.ensure_key("new", KeyPurpose::Mac),
        );
        assert_unavailable(&format!("{phase} destroy_key"), c.destroy_key("dek"));
        assert_unavailable(&format!("{phase} inventory"), c.inventory());
        assert_unavailable(&format!("{phase} random"), c.random(8));
        let err = Pkcs11Custodian::connect(config(&label)).unwrap_err();
        assert_eq!(err.kind(), HsmErrorKind::TokenNotFound, "{err}");
    };
    check_all("gone:");
    std::fs::rename(&parked, &token_dir).unwrap();
    // SoftHSM keeps the token marked broken in this process (see above) and
    // the module is shared, so the custodian keeps answering Unavailable
    // rather than anything else.
    check_all("back:");

    // The token's data survived, and a new process (like a restarted vault)
    // reaches it again with the same configuration.
    let out = run_child(
        "child_decrypts",
        &[
            ("CARDVAULT_HSM_TEST_LABEL", label.clone()),
            ("CARDVAULT_HSM_TEST_CT", hex(&ct)),
        ],
    );
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"));
}

#[test]
#[ignore = "helper: run in a child process by unreachable_token"]
fn child_decrypts() {
    let label = std::env::var("CARDVAULT_HSM_TEST_LABEL").unwrap();
    let ct = unhex(&std::env::var("CARDVAULT_HSM_TEST_CT").unwrap());
    let c = custodian(&label);
    let pt = c.decrypt("dek", &[5u8; 12], b"aad", &ct).unwrap();
    assert_eq!(pt.as_slice(), b"pan");
    assert!(c.find_key("new").unwrap().is_none());
    assert_eq!(c.inventory().unwrap().len(), 2);
}

/// A token created by another process (softhsm2-util via hsm/init-token.sh)
/// after this process initialized the module.
#[test]
fn token_created_by_another_process() {
    // softhsm2-util reads every token in the directory; keep it from seeing
    // one that `unreachable_token` has moved away.
    let _alone = token_dir_lock();
    fresh_token("first"); // the module is initialized from here on
    let label = "external-token";
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("init-token.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg(&env().dir)
        .arg(label)
        .env("CARDVAULT_HSM_SO_PIN", SO_PIN)
        .env("CARDVAULT_HSM_PIN", USER_PIN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let res = Pkcs11Custodian::connect(config(label));
    eprintln!(
        "connect to a token made by another process: {:?}",
        res.as_ref().map(|_| ())
    );
    // Observed: not visible here.
    assert_eq!(res.unwrap_err().kind(), HsmErrorKind::TokenNotFound);
    // A new process sees it (and the script's PINs work).
    let out = run_child(
        "child_connects",
        &[("CARDVAULT_HSM_TEST_LABEL", label.to_owned())],
    );
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"));
}

#[test]
#[ignore = "helper: run in a child process by token_created_by_another_process"]
fn child_connects() {
    let label = std::env::var("CARDVAULT_HSM_TEST_LABEL").unwrap();
    custodian(&label).health().unwrap();
}
