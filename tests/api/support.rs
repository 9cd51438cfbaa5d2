//! Test harness: the real application on port 0 over TLS, with a fresh
//! database (SQLite file or PostgreSQL database) and a fresh SoftHSM token
//! per test, plus a log capture shared by the whole test binary.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use cardvault::config::Config;
use cardvault::crypto::CryptoMode;
use cardvault::server::{bootstrap, Application};
use cardvault::service::Vault;
use cardvault::storage::Storage;
use reqwest::{Method, StatusCode};
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Everything the servers of this test binary logged, at debug level.
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&log_buffer().lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

fn log_buffer() -> &'static Arc<Mutex<Vec<u8>>> {
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUF.get_or_init(|| Arc::new(Mutex::new(Vec::new())))
}

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        log_buffer()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_logging() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug,sqlx=debug,hyper=info,h2=info,rustls=info")
            .with_writer(|| Capture)
            .with_ansi(false)
            .try_init();
    });
}

/// A test's database: its URL, and for PostgreSQL the database it created,
/// dropped again when this value is (tests would otherwise leave one
/// database per run behind on the shared server).
pub struct TestDb {
    pub url: String,
    created: Option<(String, String)>,
}

/// Creates a fresh PostgreSQL database, dropped with the returned value.
pub async fn fresh_pg_database() -> TestDb {
    let admin = cardvault::testkit::pg_admin_url();
    let name = cardvault::domain::new_id("cv").to_lowercase();
    let url = cardvault::testkit::create_pg_database(&admin, &name)
        .await
        .expect("PostgreSQL at 127.0.0.1:5432 (start it: pg_ctlcluster --skip-systemctl-redirect 15 main start)");
    TestDb {
        url,
        created: Some((admin, name)),
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.created.take() {
            cardvault::testkit::drop_pg_database_blocking(admin, name);
        }
    }
}

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub data: tempfile::TempDir,
    pub backend: Backend,
    pub mode: CryptoMode,
    pub token_label: String,
    pub vault: Arc<Vault>,
    /// The configuration the server runs with.
    pub cfg: Config,
    /// How to reach this test's token (for a second, CLI-like vault).
    pub p11: cardvault_hsm::Pkcs11Config,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// Last, so the database outlives everything that uses it.
    pub db: TestDb,
}

pub struct Merchant {
    pub id: String,
    pub sk: String,
    pub pk: String,
}

/// A test configuration: dev mode (self-signed certificate in a temp data
/// dir), port 0, the given database and crypto mode.
pub fn test_config(data: &std::path::Path, db_url: &str, mode: CryptoMode) -> Config {
    let mut cfg = Config {
        dev: true,
        data_dir: data.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!()),
        database_url: Some(db_url.to_string()),
        db_max_connections: 8,
        ..Config::default()
    };
    cfg.crypto.mode = mode;
    cfg
}

pub fn client_for(cert_pem: &[u8], addr: std::net::SocketAddr) -> reqwest::Client {
    let cert = reqwest::Certificate::from_pem(cert_pem).expect("dev certificate");
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(cert)
        .resolve("localhost", addr)
        .build()
        .expect("client")
}

pub async fn db_for(backend: Backend, data: &std::path::Path) -> TestDb {
    match backend {
        Backend::Sqlite => TestDb {
            url: format!("sqlite://{}", data.join("cardvault.db").display()),
            created: None,
        },
        Backend::Postgres => fresh_pg_database().await,
    }
}

impl TestApp {
    pub async fn spawn(backend: Backend, mode: CryptoMode) -> TestApp {
        Self::spawn_with(backend, mode, |_| {}).await
    }

    /// Like [`TestApp::spawn`], with the configuration adjusted by `tweak`.
    pub async fn spawn_with(
        backend: Backend,
        mode: CryptoMode,
        tweak: impl FnOnce(&mut Config),
    ) -> TestApp {
        init_logging();
        let data = tempfile::tempdir().expect("tempdir");
        let db = db_for(backend, data.path()).await;
        let mut cfg = test_config(data.path(), &db.url, mode);
        tweak(&mut cfg);
        let p11 = cardvault::testkit::fresh_token_config();
        let token_label = p11.token_label.clone();
        let p11_copy = p11.clone();
        let custodian =
            tokio::task::spawn_blocking(move || cardvault_hsm::Pkcs11Custodian::connect(p11))
                .await
                .expect("join")
                .expect("connect token");
        let storage = bootstrap::storage(&cfg).await.expect("storage");
        let vault = bootstrap::vault_with(&cfg, storage, Arc::new(custodian))
            .await
            .expect("vault");
        let app = Application::build_with_vault(cfg.clone(), vault)
            .await
            .expect("build app");
        let addr = app.local_addr().expect("addr");
        let vault = Arc::clone(app.vault());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(app.run_until_stopped(async {
            let _ = rx.await;
        }));
        let cert = std::fs::read(cfg.tls_cert_path()).expect("cert");
        TestApp {
            base: format!("https://localhost:{}", addr.port()),
            client: client_for(&cert, addr),
            data,
            backend,
            mode,
            token_label,
            vault,
            cfg,
            p11: p11_copy,
            shutdown: Some(tx),
            handle: Some(handle),
            db,
        }
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        self.vault.storage()
    }

    pub async fn merchant(&self, reveal: bool) -> Merchant {
        let m = self
            .vault
            .create_merchant("Test Merchant", reveal)
            .await
            .expect("merchant");
        Merchant {
            id: m.merchant_id,
            sk: m.secret_key,
            pk: m.publishable_key,
        }
    }

    /// Sends a request; returns status, JSON body (Null when not JSON) and headers.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value, reqwest::header::HeaderMap) {
        let mut req = self
            .client
            .request(method, format!("{}{}", self.base, path));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.expect("body");
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        (status, json, headers)
    }

    /// A JSON request with extra headers (e.g. `Idempotency-Key`).
    pub async fn call_with_headers(
        &self,
        method: Method,
        path: &str,
        key: &str,
        body: Value,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value, reqwest::header::HeaderMap) {
        let mut req = self
            .client
            .request(method, format!("{}{}", self.base, path))
            .bearer_auth(key)
            .json(&body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::Null),
            headers,
        )
    }

    pub async fn get(&self, path: &str, key: &str) -> (StatusCode, Value) {
        let (s, v, _) = self.call(Method::GET, path, Some(key), None).await;
        (s, v)
    }

    pub async fn post(&self, path: &str, key: &str, body: Value) -> (StatusCode, Value) {
        let (s, v, _) = self.call(Method::POST, path, Some(key), Some(body)).await;
        (s, v)
    }

    pub async fn patch(&self, path: &str, key: &str, body: Value) -> (StatusCode, Value) {
        let (s, v, _) = self.call(Method::PATCH, path, Some(key), Some(body)).await;
        (s, v)
    }

    pub async fn delete(&self, path: &str, key: &str) -> (StatusCode, Value) {
        let (s, v, _) = self.call(Method::DELETE, path, Some(key), None).await;
        (s, v)
    }

    pub async fn customer(&self, key: &str, email: &str) -> String {
        let (s, v) = self
            .post("/v1/customers", key, serde_json::json!({"email": email}))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["id"].as_str().expect("id").to_string()
    }

    pub async fn card(&self, key: &str, customer: &str, number: &str) -> Value {
        let (s, v) = self
            .post(
                &format!("/v1/customers/{customer}/cards"),
                key,
                serde_json::json!({"number": number, "exp_month": 12, "exp_year": 2031, "holder_name": "Ana Silva"}),
            )
            .await;
        assert!(s == StatusCode::CREATED || s == StatusCode::OK, "{s} {v}");
        v
    }

    /// A second vault over the same database and token, as a CLI process
    /// (`cardvault keys …`, `audit …`) running beside the server would have.
    pub async fn operator_vault(&self) -> Vault {
        let p11 = self.p11.clone();
        let custodian =
            tokio::task::spawn_blocking(move || cardvault_hsm::Pkcs11Custodian::connect(p11))
                .await
                .expect("join")
                .expect("connect token");
        let storage = bootstrap::storage(&self.cfg).await.expect("storage");
        bootstrap::vault_with(&self.cfg, storage, Arc::new(custodian))
            .await
            .expect("operator vault")
    }

    /// Stops the server gracefully and waits for it, keeping the database.
    pub async fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = h.await;
        }
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = h.await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Runs a test body once per backend and crypto mode, as four tests.
#[macro_export]
macro_rules! matrix {
    ($name:ident) => {
        mod $name {
            use cardvault::crypto::CryptoMode;
            use $crate::support::Backend;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite_envelope() {
                super::$name(Backend::Sqlite, CryptoMode::Envelope).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite_hsm() {
                super::$name(Backend::Sqlite, CryptoMode::Hsm).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres_envelope() {
                super::$name(Backend::Postgres, CryptoMode::Envelope).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres_hsm() {
                super::$name(Backend::Postgres, CryptoMode::Hsm).await
            }
        }
    };
}

/// Valid test PANs (public test numbers of the networks) used across tests.
pub const VISA: &str = "4111111111111111";
pub const VISA_19: &str = "4111111111111111003";
pub const MASTERCARD: &str = "5555555555554444";
pub const AMEX: &str = "378282246310005";
pub const ELO: &str = "6362970000457013";
