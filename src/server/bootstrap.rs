//! Start-up wiring shared by `serve`, `migrate`, `merchant` and `hsm`:
//! the HSM custodian (creating a SoftHSM token under the data directory in
//! dev mode), the storage with its migrations, the keyring and the vault.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use cardvault_hsm::{softhsm, KeyCustodian, Pin, Pkcs11Config, Pkcs11Custodian};

use crate::config::Config;
use crate::crypto::{Keyring, KeyringConfig};
use crate::domain::random_secret;
use crate::service::Vault;
use crate::storage::{self, Storage};

/// True when the vault manages its own SoftHSM token under the data dir.
fn dev_token(cfg: &Config) -> bool {
    cfg.dev && cfg.hsm.module.is_none()
}

fn dev_hsm_dir(cfg: &Config) -> PathBuf {
    cfg.data_dir.join("hsm")
}

/// Must run before any PKCS#11 call in the process, i.e. before the async
/// runtime starts: SoftHSM reads `SOFTHSM2_CONF` once, at `C_Initialize`.
/// In dev mode it points SoftHSM at a token directory under the data dir.
pub fn prepare_process(cfg: &Config) -> anyhow::Result<()> {
    if dev_token(cfg) {
        let dir = dev_hsm_dir(cfg);
        create_private_dir(&dir)?;
        let conf = softhsm::write_config(&dir)
            .with_context(|| format!("write SoftHSM config in {}", dir.display()))?;
        std::env::set_var("SOFTHSM2_CONF", conf);
    }
    Ok(())
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create {}", dir.display()))
}

/// Reads a PIN kept in a file, creating it with a random value first when
/// it does not exist (dev mode only).
fn dev_pin(path: &Path) -> anyhow::Result<Pin> {
    if !path.exists() {
        let pin = random_secret("pin");
        super::tls::write_private(path, pin.as_bytes())?;
    }
    Pin::from_file(path).map_err(|e| anyhow::anyhow!("{e}"))
}

/// The PKCS#11 settings in force; creates the dev token when needed.
pub fn pkcs11_config(cfg: &Config) -> anyhow::Result<Pkcs11Config> {
    let module = match &cfg.hsm.module {
        Some(m) => m.clone(),
        None if cfg.dev => softhsm::default_module_path().context(
            "SoftHSM is not installed: run `apt-get install softhsm2` (or set hsm.module)",
        )?,
        None => bail!("hsm.module is not set"),
    };
    let user_pin = if let Ok(pin) = std::env::var("CARDVAULT_HSM_PIN") {
        Pin::new(pin)
    } else if let Some(file) = &cfg.hsm.pin_file {
        Pin::from_file(file).map_err(|e| anyhow::anyhow!("{e}"))?
    } else if dev_token(cfg) {
        let dir = dev_hsm_dir(cfg);
        create_private_dir(&dir)?;
        let user = dev_pin(&dir.join("user.pin"))?;
        let so = dev_pin(&dir.join("so.pin"))?;
        softhsm::init_token(&module, &cfg.hsm.token_label, &so, &user)
            .map_err(|e| anyhow::anyhow!("create dev token: {e}"))?;
        user
    } else {
        bail!("no HSM PIN: set CARDVAULT_HSM_PIN or hsm.pin_file");
    };
    Ok(Pkcs11Config {
        module_path: module,
        token_label: cfg.hsm.token_label.clone(),
        user_pin,
        max_sessions: cfg.hsm.max_sessions,
    })
}

/// Connects to the HSM.
pub async fn custodian(cfg: &Config) -> anyhow::Result<Arc<dyn KeyCustodian>> {
    let p11 = pkcs11_config(cfg)?;
    let c = tokio::task::spawn_blocking(move || Pkcs11Custodian::connect(p11))
        .await
        .context("HSM connect task")?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Arc::new(c))
}

/// Opens the database and applies pending migrations.
pub async fn storage(cfg: &Config) -> anyhow::Result<Arc<dyn Storage>> {
    let url = cfg.database_url();
    if url.starts_with("sqlite:") {
        create_private_dir(&cfg.data_dir)?;
    }
    let storage = storage::connect(&url, cfg.db_max_connections)
        .await
        .map_err(|e| anyhow::anyhow!("open database: {e}"))?;
    storage
        .migrate()
        .await
        .map_err(|e| anyhow::anyhow!("migrate database: {e}"))?;
    Ok(storage)
}

/// Everything the API needs: storage, HSM, keyring (KEK ensured), vault.
pub async fn vault(cfg: &Config) -> anyhow::Result<Vault> {
    let storage = storage(cfg).await?;
    let custodian = custodian(cfg).await?;
    vault_with(cfg, storage, custodian).await
}

/// Like [`vault`] with the storage and custodian given.
pub async fn vault_with(
    cfg: &Config,
    storage: Arc<dyn Storage>,
    custodian: Arc<dyn KeyCustodian>,
) -> anyhow::Result<Vault> {
    // Trait upcasting: the keyring sees only the key-store part.
    let keys: Arc<dyn storage::KeyStore> = storage.clone();
    let keyring = Arc::new(Keyring::new(
        custodian,
        keys,
        KeyringConfig {
            mode: cfg.crypto.mode,
            kek_label: cfg.crypto.kek_label.clone(),
            seal_limit: cfg.crypto.seal_limit,
            hsm_threads: cfg.hsm.threads(),
        },
    ));
    keyring
        .ensure_kek()
        .await
        .map_err(|e| anyhow::anyhow!("create or find the KEK: {e}"))?;
    let processor = crate::processor::from_config(&cfg.payments)
        .map_err(|e| anyhow::anyhow!("processor: {e}"))?;
    let vault = Vault::new(storage, keyring).with_payments(cfg.payments.clone(), processor);
    // Without the audit key nothing can be audited, so nothing may happen.
    vault
        .install_audit_key()
        .await
        .map_err(|e| anyhow::anyhow!("load the audit key: {e}"))?;
    Ok(vault)
}
