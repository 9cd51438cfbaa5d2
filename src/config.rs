//! Configuration: a TOML file (`--config`) with `CARDVAULT_*` environment
//! overrides, validated once at start-up. Insecure settings are refused here,
//! not warned about.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::crypto::CryptoMode;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: &'static str, message: String },
    #[error("refused: {0}")]
    Insecure(String),
    #[error("invalid setting: {0}")]
    Invalid(String),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Development mode: creates a SoftHSM token and a self-signed
    /// certificate under `data_dir` when they are missing.
    pub dev: bool,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// `sqlite://…` (default: `<data_dir>/cardvault.db`) or `postgres://…`.
    pub database_url: Option<String>,
    pub db_max_connections: u32,
    pub tls: TlsConfig,
    pub hsm: HsmConfig,
    pub crypto: CryptoConfig,
    pub limits: Limits,
    pub log: LogConfig,
    /// Audit trail: checkpoints and retention (issue 6).
    pub audit: AuditConfig,
    /// Key life cycle: cryptoperiods and maintenance (issue 6).
    pub keys: KeysConfig,
    pub payments: PaymentsConfig,
    /// Hosted card-capture and CVV re-collect pages (issue 7).
    pub hosted: HostedConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Seconds between HSM-signed checkpoints over the chain head (one is
    /// also signed at shutdown).
    pub checkpoint_interval_secs: u64,
    /// The audit retention committed to (PCI DSS 10.5.1: at least a year),
    /// checked by the audit report. The vault never deletes audit entries.
    pub retention_days: u64,
    /// How long idempotency records are kept (the maintenance run deletes
    /// older ones; never less than `limits.idempotency_lease_secs`).
    pub idempotency_retention_days: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// Cryptoperiod of data keys (PAN, volatile): past it a successor is
    /// made and the old key retired automatically.
    pub data_key_cryptoperiod_days: u64,
    /// Cryptoperiod of the KEK and merchant wrapping keys (rotated by
    /// `cardvault keys rotate-kek`; the audit report flags overdue ones).
    pub kek_cryptoperiod_days: u64,
    /// Seconds between key maintenance runs of a serving node (drop keys
    /// retired elsewhere, enforce cryptoperiods).
    pub maintenance_interval_secs: u64,
    /// API keys older than this are flagged by the audit report.
    pub api_key_max_age_days: u64,
    /// `keys rotate-kek` waits this long after re-wrapping before it
    /// destroys the old key, re-wrapping anything a node created under it
    /// meanwhile (a node may have read the old label just before the switch).
    pub destroy_grace_secs: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            checkpoint_interval_secs: 300,
            retention_days: 400,
            idempotency_retention_days: 1,
        }
    }
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig {
            data_key_cryptoperiod_days: 365,
            kek_cryptoperiod_days: 730,
            maintenance_interval_secs: 10,
            api_key_max_age_days: 365,
            destroy_grace_secs: 30,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain (default in dev mode: `<data_dir>/tls/cert.pem`).
    pub cert: Option<PathBuf>,
    /// PEM private key (default in dev mode: `<data_dir>/tls/key.pem`).
    pub key: Option<PathBuf>,
    /// `"1.2"` or `"1.3"`; anything older is refused.
    pub min_version: String,
    /// PEM bundle of client CAs: when set, clients must present a
    /// certificate signed by one of them (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HsmConfig {
    /// PKCS#11 module (default: SoftHSM's, in dev mode).
    pub module: Option<PathBuf>,
    pub token_label: String,
    /// File holding the user PIN. The PIN may also come from the
    /// `CARDVAULT_HSM_PIN` environment variable; never from argv.
    pub pin_file: Option<PathBuf>,
    pub max_sessions: usize,
    /// Threads making HSM calls, at most `max_sessions`. Unset, one per
    /// CPU (see [`HsmConfig::threads`]).
    pub threads: Option<usize>,
}

impl HsmConfig {
    /// Threads making HSM calls: as configured, else one per CPU (at most
    /// `max_sessions`). One per CPU suits an HSM in the vault's process
    /// (SoftHSM) or on a local bus, whose calls keep a core busy; a network
    /// HSM, whose calls mostly wait, wants more.
    pub fn threads(&self) -> usize {
        self.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .min(self.max_sessions)
        })
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CryptoConfig {
    pub mode: CryptoMode,
    pub kek_label: String,
    /// Seals per data key before a new version is made (SP 800-38D caps
    /// random-IV GCM at 2^32).
    pub seal_limit: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_connections: usize,
    pub header_timeout_secs: u64,
    pub idle_timeout_secs: u64,
    pub request_timeout_secs: u64,
    pub shutdown_grace_secs: u64,
    /// A request holding an `Idempotency-Key` that has not finished after
    /// this long is reported as interrupted (its outcome unknown) to a
    /// retry, instead of as still in progress.
    pub idempotency_lease_secs: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `cardvault=debug`.
    pub level: String,
    /// `json` or `text`.
    pub format: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            dev: false,
            data_dir: PathBuf::from("./data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            database_url: None,
            db_max_connections: 16,
            tls: TlsConfig::default(),
            hsm: HsmConfig::default(),
            crypto: CryptoConfig::default(),
            limits: Limits::default(),
            log: LogConfig::default(),
            audit: AuditConfig::default(),
            keys: KeysConfig::default(),
            payments: PaymentsConfig::default(),
            hosted: HostedConfig::default(),
        }
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: None,
            key: None,
            min_version: "1.2".to_string(),
            client_ca: None,
        }
    }
}

impl Default for HsmConfig {
    fn default() -> Self {
        HsmConfig {
            module: None,
            token_label: "cardvault".to_string(),
            pin_file: None,
            max_sessions: 16,
            threads: None,
        }
    }
}

impl Default for CryptoConfig {
    fn default() -> Self {
        CryptoConfig {
            mode: CryptoMode::Envelope,
            kek_label: "cardvault-kek-v1".to_string(),
            seal_limit: crate::crypto::DEFAULT_SEAL_LIMIT,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 64 * 1024,
            max_connections: 4096,
            header_timeout_secs: 10,
            idle_timeout_secs: 60,
            request_timeout_secs: 30,
            shutdown_grace_secs: 20,
            idempotency_lease_secs: 300,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
            format: "text".to_string(),
        }
    }
}

impl Config {
    /// Loads `path` (or the defaults, in dev mode, when there is none),
    /// applies `CARDVAULT_*` overrides and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut cfg = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: p.to_path_buf(),
                    message: e.message().to_string(),
                })?
            }
            // No configuration at all: the embedded development default.
            None => Config {
                dev: true,
                ..Config::default()
            },
        };
        cfg.apply_env(|k| std::env::var(k).ok())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Applies `CARDVAULT_*` overrides read through `get`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(var: &'static str, v: &str) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            v.parse().map_err(|e: T::Err| ConfigError::Env {
                var,
                message: e.to_string(),
            })
        }
        if let Some(v) = get("CARDVAULT_DEV") {
            self.dev = parse::<bool>("CARDVAULT_DEV", &v)?;
        }
        if let Some(v) = get("CARDVAULT_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = get("CARDVAULT_LISTEN") {
            self.listen = parse("CARDVAULT_LISTEN", &v)?;
        }
        if let Some(v) = get("CARDVAULT_DATABASE_URL") {
            self.database_url = Some(v);
        }
        if let Some(v) = get("CARDVAULT_DB_MAX_CONNECTIONS") {
            self.db_max_connections = parse("CARDVAULT_DB_MAX_CONNECTIONS", &v)?;
        }
        if let Some(v) = get("CARDVAULT_CRYPTO_MODE") {
            self.crypto.mode = parse("CARDVAULT_CRYPTO_MODE", &v)?;
        }
        if let Some(v) = get("CARDVAULT_HSM_MODULE") {
            self.hsm.module = Some(PathBuf::from(v));
        }
        if let Some(v) = get("CARDVAULT_HSM_TOKEN_LABEL") {
            self.hsm.token_label = v;
        }
        if let Some(v) = get("CARDVAULT_HSM_PIN_FILE") {
            self.hsm.pin_file = Some(PathBuf::from(v));
        }
        if let Some(v) = get("CARDVAULT_TLS_CERT") {
            self.tls.cert = Some(PathBuf::from(v));
        }
        if let Some(v) = get("CARDVAULT_TLS_KEY") {
            self.tls.key = Some(PathBuf::from(v));
        }
        if let Some(v) = get("CARDVAULT_LOG") {
            self.log.level = v;
        }
        if let Some(v) = get("CARDVAULT_LOG_FORMAT") {
            self.log.format = v;
        }
        if let Some(v) = get("CARDVAULT_PUBLIC_URL") {
            self.hosted.public_url = Some(v);
        }
        Ok(())
    }

    /// Refuses insecure or inconsistent settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.tls.min_version.as_str() {
            "1.2" | "1.3" => {}
            other => {
                return Err(ConfigError::Insecure(format!(
                    "tls.min_version {other:?}: only \"1.2\" and \"1.3\" are allowed"
                )))
            }
        }
        if !self.dev && (self.tls.cert.is_none() || self.tls.key.is_none()) {
            return Err(ConfigError::Insecure(
                "tls.cert and tls.key are required outside dev mode (plain HTTP is not offered)"
                    .to_string(),
            ));
        }
        if !self.dev && self.hsm.module.is_none() {
            return Err(ConfigError::Invalid(
                "hsm.module is required outside dev mode".to_string(),
            ));
        }
        if self.hsm.token_label.is_empty() || self.hsm.token_label.len() > 32 {
            return Err(ConfigError::Invalid(
                "hsm.token_label must have 1 to 32 characters".to_string(),
            ));
        }
        if self.hsm.max_sessions == 0 || self.db_max_connections == 0 {
            return Err(ConfigError::Invalid(
                "hsm.max_sessions and db_max_connections must be at least 1".to_string(),
            ));
        }
        if self
            .hsm
            .threads
            .is_some_and(|n| n == 0 || n > self.hsm.max_sessions)
        {
            return Err(ConfigError::Invalid(format!(
                "hsm.threads must be between 1 and hsm.max_sessions ({})",
                self.hsm.max_sessions
            )));
        }
        if self.crypto.seal_limit == 0 || self.crypto.seal_limit > crate::crypto::DEFAULT_SEAL_LIMIT
        {
            return Err(ConfigError::Insecure(
                "crypto.seal_limit must be between 1 and 2^32 (NIST SP 800-38D)".to_string(),
            ));
        }
        if self.audit.checkpoint_interval_secs == 0
            || self.keys.maintenance_interval_secs == 0
            || self.keys.data_key_cryptoperiod_days == 0
            || self.keys.kek_cryptoperiod_days == 0
        {
            return Err(ConfigError::Invalid(
                "audit.checkpoint_interval_secs, keys.maintenance_interval_secs and the \
                 cryptoperiods must be at least 1"
                    .to_string(),
            ));
        }
        if !matches!(self.log.format.as_str(), "json" | "text") {
            return Err(ConfigError::Invalid(
                "log.format must be \"json\" or \"text\"".to_string(),
            ));
        }
        self.payments.validate()?;
        self.hosted.validate()?;
        if self.limits.max_body_bytes < 1024 || self.limits.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "limits.max_body_bytes must be at least 1024 and max_connections at least 1"
                    .to_string(),
            ));
        }
        Ok(())
    }

    /// The database URL in force.
    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("cardvault.db").display()))
    }

    pub fn tls_cert_path(&self) -> PathBuf {
        self.tls
            .cert
            .clone()
            .unwrap_or_else(|| self.data_dir.join("tls").join("cert.pem"))
    }

    pub fn tls_key_path(&self) -> PathBuf {
        self.tls
            .key
            .clone()
            .unwrap_or_else(|| self.data_dir.join("tls").join("key.pem"))
    }
}

/// Shortest and longest life of a hosted capture session or CVV link.
pub const MIN_HOSTED_TTL_SECS: u64 = 60;
pub const MAX_HOSTED_TTL_SECS: u64 = 60 * 60;

/// The hosted pages: card capture in the merchant's iframe, CVV re-collect.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostedConfig {
    /// The `https://host[:port]` browsers reach this vault at (behind a load
    /// balancer: its public name). Hosted page URLs are built from it and
    /// page requests must come from it. Default: `https://<listen address>`
    /// with the bound port, which needs a listen address browsers can reach
    /// (not 0.0.0.0 or ::).
    pub public_url: Option<String>,
    /// Life of a capture session when the merchant gives no `expires_in`
    /// (60 to 3600 seconds; `expires_in` is held to the same bounds).
    pub capture_session_ttl_secs: u64,
    /// How long a CVV re-collect link stays valid once shown (60 to 3600
    /// seconds); it always dies when the charge stops waiting for the CVV.
    pub cvc_link_ttl_secs: u64,
}

impl Default for HostedConfig {
    fn default() -> Self {
        HostedConfig {
            public_url: None,
            capture_session_ttl_secs: 15 * 60,
            cvc_link_ttl_secs: 15 * 60,
        }
    }
}

impl HostedConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let range = MIN_HOSTED_TTL_SECS..=MAX_HOSTED_TTL_SECS;
        if !range.contains(&self.capture_session_ttl_secs)
            || !range.contains(&self.cvc_link_ttl_secs)
        {
            return Err(ConfigError::Insecure(format!(
                "hosted.capture_session_ttl_secs and hosted.cvc_link_ttl_secs must be between \
                 {MIN_HOSTED_TTL_SECS} and {MAX_HOSTED_TTL_SECS}"
            )));
        }
        if let Some(url) = &self.public_url {
            Self::parse_public_url(url)?;
        }
        Ok(())
    }

    /// Parses a public URL: an https origin, nothing after the port.
    pub fn parse_public_url(url: &str) -> Result<crate::domain::WebOrigin, ConfigError> {
        let origin = crate::domain::WebOrigin::parse(url)
            .map_err(|e| ConfigError::Invalid(format!("hosted.public_url {e}")))?;
        if !origin.is_https() {
            return Err(ConfigError::Insecure(
                "hosted.public_url must be https:// (the vault serves nothing else)".to_string(),
            ));
        }
        Ok(origin)
    }
}

/// Longest life of a one-time token (and so of a CVV in the vault).
pub const MAX_TOKEN_TTL_SECS: u64 = 15 * 60;

/// Charges, tokens, verification and webhooks.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PaymentsConfig {
    /// Life of a one-time token, at most 900 seconds (15 minutes).
    pub token_ttl_secs: u64,
    /// How often expired tokens' payloads are purged.
    pub token_sweep_secs: u64,
    /// `sandbox` or `http`.
    pub processor: String,
    pub http: HttpProcessorConfig,
    /// Refuse charges on cards that are not `verified`.
    pub require_verified_cards: bool,
    /// Wrong micro-charge amounts allowed before the verification fails.
    pub verification_max_attempts: u32,
    pub webhooks: WebhookConfig,
    /// How often each node looks for charges whose processor outcome is
    /// unknown, to ask the processor (reconciliation).
    pub reconcile_interval_secs: u64,
    /// How long such a charge stays untouched before it is looked up: a
    /// request the processor is still working on must not be mistaken for
    /// one it never received.
    pub reconcile_after_secs: u64,
}

/// The `http` processor: where the card goes and how.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpProcessorConfig {
    /// Base URL of the processor (https; http only to loopback in dev mode).
    pub url: String,
    /// Hosts the vault may send card data to; the URL's host must be listed.
    pub allowed_hosts: Vec<String>,
    /// JSON body sent to authorize, with placeholders `{{number}}`, `{{cvc}}`,
    /// `{{exp_month}}`, `{{exp_year}}`, `{{holder_name}}`, `{{amount}}`,
    /// `{{currency}}`, `{{capture}}`, `{{reference}}` (JSON-escaped).
    pub authorize_template: String,
    pub connect_timeout_ms: u64,
    pub timeout_ms: u64,
    /// PEM bundle of CAs trusted for the processor (default: the system's).
    pub ca_file: Option<PathBuf>,
}

/// Webhook delivery.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Attempts per event and endpoint before it is marked failed.
    pub max_attempts: u32,
    /// First retry delay; doubles on every failure up to `backoff_max_ms`.
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// How often the worker looks for due deliveries.
    pub poll_ms: u64,
    pub timeout_ms: u64,
    /// PEM bundle of CAs trusted for https endpoints (default: the system's).
    pub ca_file: Option<PathBuf>,
}

impl Default for PaymentsConfig {
    fn default() -> Self {
        PaymentsConfig {
            token_ttl_secs: 600,
            token_sweep_secs: 30,
            processor: "sandbox".to_string(),
            http: HttpProcessorConfig::default(),
            require_verified_cards: false,
            verification_max_attempts: 3,
            webhooks: WebhookConfig::default(),
            reconcile_interval_secs: 60,
            reconcile_after_secs: 300,
        }
    }
}

impl Default for HttpProcessorConfig {
    fn default() -> Self {
        HttpProcessorConfig {
            url: String::new(),
            allowed_hosts: Vec::new(),
            authorize_template: r#"{"card":{"number":"{{number}}","cvc":"{{cvc}}","exp_month":{{exp_month}},"exp_year":{{exp_year}},"holder_name":"{{holder_name}}"},"amount":{{amount}},"currency":"{{currency}}","capture":{{capture}},"reference":"{{reference}}"}"#.to_string(),
            connect_timeout_ms: 2_000,
            timeout_ms: 15_000,
            ca_file: None,
        }
    }
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            max_attempts: 8,
            backoff_base_ms: 5_000,
            backoff_max_ms: 3_600_000,
            poll_ms: 500,
            timeout_ms: 10_000,
            ca_file: None,
        }
    }
}

impl PaymentsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.token_ttl_secs == 0 || self.token_ttl_secs > MAX_TOKEN_TTL_SECS {
            return Err(ConfigError::Insecure(format!(
                "payments.token_ttl_secs must be between 1 and {MAX_TOKEN_TTL_SECS}"
            )));
        }
        if self.token_sweep_secs == 0 || self.verification_max_attempts == 0 {
            return Err(ConfigError::Invalid(
                "payments.token_sweep_secs and verification_max_attempts must be at least 1"
                    .to_string(),
            ));
        }
        if self.verification_max_attempts > 10 {
            return Err(ConfigError::Insecure(
                "payments.verification_max_attempts must be at most 10".to_string(),
            ));
        }
        match self.processor.as_str() {
            "sandbox" => {}
            "http" => {
                if self.http.url.is_empty() || self.http.allowed_hosts.is_empty() {
                    return Err(ConfigError::Invalid(
                        "payments.http.url and payments.http.allowed_hosts are required with the http processor"
                            .to_string(),
                    ));
                }
            }
            other => {
                return Err(ConfigError::Invalid(format!(
                    "payments.processor must be \"sandbox\" or \"http\", not {other:?}"
                )))
            }
        }
        let w = &self.webhooks;
        if w.max_attempts == 0 || w.backoff_base_ms == 0 || w.poll_ms == 0 || w.timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "payments.webhooks settings must be positive".to_string(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn old_tls_is_refused() {
        let mut c = Config {
            dev: true,
            ..Config::default()
        };
        c.validate().unwrap();
        c.tls.min_version = "1.1".to_string();
        assert!(matches!(c.validate(), Err(ConfigError::Insecure(_))));
    }

    #[test]
    fn production_needs_certificates_and_module() {
        let c = Config::default();
        assert!(matches!(c.validate(), Err(ConfigError::Insecure(_))));
    }

    #[test]
    fn env_overrides_apply() {
        let mut c = Config::default();
        c.apply_env(|k| match k {
            "CARDVAULT_CRYPTO_MODE" => Some("hsm".to_string()),
            "CARDVAULT_LISTEN" => Some("127.0.0.1:9000".to_string()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.crypto.mode, CryptoMode::Hsm);
        assert_eq!(c.listen.port(), 9000);
        let bad = c.apply_env(|k| (k == "CARDVAULT_CRYPTO_MODE").then(|| "plain".to_string()));
        assert!(bad.is_err());
    }

    #[test]
    fn hosted_settings_are_checked() {
        let mut c = Config {
            dev: true,
            ..Config::default()
        };
        c.hosted.public_url = Some("https://vault.example.com:8443".to_string());
        c.validate().unwrap();
        for bad in [
            "http://vault.example.com",
            "http://127.0.0.1:8443",
            "https://vault.example.com/",
            "https://vault.example.com/v1",
            "vault.example.com",
        ] {
            c.hosted.public_url = Some(bad.to_string());
            assert!(c.validate().is_err(), "{bad}");
        }
        c.hosted.public_url = None;
        c.hosted.capture_session_ttl_secs = 59;
        assert!(matches!(c.validate(), Err(ConfigError::Insecure(_))));
        c.hosted.capture_session_ttl_secs = 3601;
        assert!(c.validate().is_err());
        c.hosted.capture_session_ttl_secs = 900;
        c.hosted.cvc_link_ttl_secs = 0;
        assert!(c.validate().is_err());
        c.hosted.cvc_link_ttl_secs = 900;
        c.apply_env(|k| (k == "CARDVAULT_PUBLIC_URL").then(|| "https://v.example".to_string()))
            .unwrap();
        assert_eq!(c.hosted.public_url.as_deref(), Some("https://v.example"));
    }

    #[test]
    fn hsm_threads_are_bounded_by_the_sessions() {
        let mut c = Config {
            dev: true,
            ..Config::default()
        };
        c.hsm.max_sessions = 1;
        assert_eq!(c.hsm.threads(), 1, "the default never exceeds the sessions");
        c.validate().unwrap();
        for (threads, valid) in [(0, false), (1, true), (2, false)] {
            c.hsm.threads = Some(threads);
            assert_eq!(c.validate().is_ok(), valid, "{threads} threads");
        }
        c.hsm.max_sessions = 16;
        c.hsm.threads = Some(16);
        c.validate().unwrap();
        assert_eq!(c.hsm.threads(), 16);
        let err = toml::from_str::<Config>("dev = true\n[hsm]\nthreads = 17\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("hsm.threads"), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(toml::from_str::<Config>("listn = \"x\"").is_err());
        let c: Config = toml::from_str("[crypto]\nmode = \"hsm\"\n").unwrap();
        assert_eq!(c.crypto.mode, CryptoMode::Hsm);
    }
}

#[cfg(test)]
mod example {
    #![allow(clippy::unwrap_used)]

    /// The commented example in the repository parses and validates as is
    /// (with dev mode, which needs no certificate paths).
    #[test]
    fn example_config_is_valid() {
        let text = include_str!("cardvault.example.toml");
        let mut cfg: super::Config = toml::from_str(text).unwrap();
        assert!(!cfg.dev);
        assert!(
            cfg.validate().is_err(),
            "production without certificates is refused"
        );
        cfg.dev = true;
        cfg.validate().unwrap();
        assert_eq!(cfg.crypto.seal_limit, 1 << 32);
    }
}
