//! The composition root and the TLS server: [`Application::build`] wires HSM,
//! storage, keyring, service and router together and binds the listener;
//! [`Application::run_until_stopped`] serves until the shutdown future
//! resolves, then lets in-flight requests finish.

pub mod bootstrap;
pub mod tls;
pub mod workers;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::api::{self, AppState, PeerAddr};
use crate::config::{Config, Limits};
use crate::service::{HostedSettings, Vault};

/// A built, bound, not yet serving vault.
pub struct Application {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    router: Router,
    limits: Arc<Limits>,
    vault: Arc<Vault>,
    /// Audit checkpoints and key maintenance settings.
    upkeep: Upkeep,
}

/// Background duties of a serving node (issue 6).
#[derive(Clone)]
struct Upkeep {
    checkpoint_every: Duration,
    maintenance_every: Duration,
    keys: crate::config::KeysConfig,
    idempotency_retention: Duration,
}

impl Application {
    /// Builds every component from `cfg` and binds the listen address (port
    /// 0 picks a free port; see [`Application::local_addr`]).
    pub async fn build(cfg: Config) -> anyhow::Result<Application> {
        let vault = bootstrap::vault(&cfg).await?;
        Self::build_with_vault(cfg, vault).await
    }

    /// Like [`Application::build`] around an already wired vault (tests use
    /// it to bring their own HSM token).
    pub async fn build_with_vault(cfg: Config, mut vault: Vault) -> anyhow::Result<Application> {
        if cfg.dev && cfg.tls.cert.is_none() {
            tls::ensure_dev_certificate(&cfg.tls_cert_path(), &cfg.tls_key_path())?;
        }
        let tls = tls::server_config(&cfg)?;
        let listener = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("bind {}", cfg.listen))?;
        vault.set_hosted(hosted_settings(&cfg, listener.local_addr()?)?);
        let vault = Arc::new(vault);
        let limits = Arc::new(cfg.limits.clone());
        let router = api::router(AppState::new(Arc::clone(&vault), Arc::clone(&limits)));
        Ok(Application {
            listener,
            acceptor: TlsAcceptor::from(tls),
            router,
            limits,
            vault,
            upkeep: Upkeep {
                checkpoint_every: Duration::from_secs(cfg.audit.checkpoint_interval_secs),
                maintenance_every: Duration::from_secs(cfg.keys.maintenance_interval_secs),
                keys: cfg.keys.clone(),
                // Never shorter than the lease: a record still being worked
                // on must not be swept from under its request.
                idempotency_retention: Duration::from_secs(
                    cfg.audit
                        .idempotency_retention_days
                        .saturating_mul(86_400)
                        .max(cfg.limits.idempotency_lease_secs),
                ),
            },
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn vault(&self) -> &Arc<Vault> {
        &self.vault
    }

    /// Serves until `shutdown` resolves; then stops accepting, lets open
    /// requests finish (up to the configured grace period) and returns.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Application {
            listener,
            acceptor,
            router,
            limits,
            vault,
            upkeep,
        } = self;
        // Fail closed: a node that cannot write its audit trail does not serve.
        vault
            .record_lifecycle("service.start", &format!("pid={}", std::process::id()))
            .await
            .map_err(|e| anyhow::anyhow!("record service start in the audit trail: {e}"))?;
        let upkeep_task = tokio::spawn(run_upkeep(Arc::clone(&vault), upkeep));
        let workers = workers::Workers::start(Arc::clone(&vault));
        let graceful = GracefulShutdown::new();
        let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
        tokio::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors and the like: back off, keep going.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                tracing::warn!("connection limit reached; refusing a connection");
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let router = router.clone();
            let limits = Arc::clone(&limits);
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let handshake = Duration::from_secs(limits.header_timeout_secs);
                let tls = match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, %peer, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let idle = Some(Duration::from_secs(limits.idle_timeout_secs));
                let mut io = tokio_io_timeout::TimeoutStream::new(tls);
                io.set_read_timeout(idle);
                io.set_write_timeout(idle);
                let io = TokioIo::new(Box::pin(io));
                let request_timeout = Duration::from_secs(limits.request_timeout_secs);
                let service =
                    hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                        req.extensions_mut().insert(PeerAddr(peer));
                        let router = router.clone();
                        async move {
                            let resp = tokio::time::timeout(
                                request_timeout,
                                router.oneshot(req.map(axum::body::Body::new)),
                            )
                            .await;
                            match resp {
                                Ok(r) => r,
                                Err(_) => Ok(axum::response::IntoResponse::into_response(
                                    api::ApiError::new(
                                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                                        "api_error",
                                        "timeout",
                                        "the request took too long; retry",
                                    ),
                                )),
                            }
                        }
                    });
                let mut builder = auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(handshake)
                    .keep_alive(true);
                builder
                    .http2()
                    .timer(TokioTimer::new())
                    .max_concurrent_streams(256)
                    .keep_alive_interval(Some(Duration::from_secs(30)))
                    .keep_alive_timeout(Duration::from_secs(20));
                let conn = builder.serve_connection(io, service);
                if let Err(e) = watcher.watch(conn).await {
                    tracing::debug!(error = %e, %peer, "connection ended with an error");
                }
                drop(permit);
            });
        }
        drop(listener);
        tracing::info!("shutting down: finishing in-flight requests");
        let grace = Duration::from_secs(limits.shutdown_grace_secs);
        if tokio::time::timeout(grace, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("grace period over; closing remaining connections");
        }
        workers.stop();
        upkeep_task.abort();
        if let Err(e) = vault.record_lifecycle("service.stop", "graceful").await {
            tracing::error!(error = %e, "could not record service stop in the audit trail");
        }
        if let Err(e) = vault.checkpoint().await {
            tracing::error!(error = %e, "could not sign the shutdown audit checkpoint");
        }
        Ok(())
    }
}

/// The hosted pages' settings: the public URL configured, or the one the
/// bound address gives (only when browsers can reach that address).
fn hosted_settings(cfg: &Config, bound: SocketAddr) -> anyhow::Result<HostedSettings> {
    let public_url = match &cfg.hosted.public_url {
        Some(url) => crate::config::HostedConfig::parse_public_url(url)?.to_string(),
        None if bound.ip().is_unspecified() => anyhow::bail!(
            "the vault listens on {bound}, which is not an address browsers can use: \
             set hosted.public_url (CARDVAULT_PUBLIC_URL) to the https origin they reach it at"
        ),
        None => crate::config::HostedConfig::parse_public_url(&format!("https://{bound}"))
            .with_context(|| {
                format!("no hosted.public_url, and https://{bound} is not a usable origin")
            })?
            .to_string(),
    };
    Ok(HostedSettings {
        public_url,
        capture_session_ttl_secs: cfg.hosted.capture_session_ttl_secs,
        cvc_link_ttl_secs: cfg.hosted.cvc_link_ttl_secs,
    })
}

/// Signs audit checkpoints and runs key maintenance on their intervals.
/// Failures are logged and retried on the next tick.
async fn run_upkeep(vault: Arc<Vault>, upkeep: Upkeep) {
    let mut checkpoint = tokio::time::interval(upkeep.checkpoint_every);
    let mut maintenance = tokio::time::interval(upkeep.maintenance_every);
    checkpoint.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = checkpoint.tick() => {
                if let Err(e) = vault.checkpoint().await {
                    tracing::warn!(error = %e, "audit checkpoint failed");
                }
            }
            _ = maintenance.tick() => {
                workers::log_round(
                    "data_key_rotation",
                    vault.key_maintenance(&upkeep.keys).await,
                );
                workers::log_round(
                    "idempotency_sweep",
                    vault.sweep_idempotency_keys(upkeep.idempotency_retention).await,
                );
            }
        }
    }
}

/// A future that resolves on SIGTERM or SIGINT, with both handlers
/// installed before this returns.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    // Registered now, not when the future is first polled: a signal that
    // arrives while the server is still starting must not kill it.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    })
}
