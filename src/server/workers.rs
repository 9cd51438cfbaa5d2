//! Background workers started with the server: the token sweeper (purges
//! the sealed payloads of expired tokens, deletes day-old capture sessions),
//! the webhook delivery loop, the reconciliation of charges and refunds,
//! and the first planner statistics of tables that grew before autovacuum
//! analysed them.
//! All are safe to run on every node: their database updates are
//! idempotent or version-checked, and a delivery is at-least-once.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::service::Vault;

/// Handles of the running workers; dropping them does not stop them, call
/// [`Workers::stop`].
pub struct Workers {
    handles: Vec<JoinHandle<()>>,
}

/// Logs the outcome of one round of a background job: how many rows it
/// changed (nothing when none), or why it failed (it runs again next round).
pub(crate) fn log_round<N, E>(job: &str, outcome: Result<N, E>)
where
    N: Default + PartialEq + std::fmt::Display,
    E: std::fmt::Display,
{
    match outcome {
        Ok(n) if n == N::default() => {}
        Ok(n) => tracing::info!(job, changed = %n, "background job round done"),
        Err(e) => tracing::warn!(job, error = %e, "background job round failed"),
    }
}

impl Workers {
    pub fn start(vault: Arc<Vault>) -> Workers {
        let sweep_every = Duration::from_secs(vault.payments_config().token_sweep_secs.max(1));
        let sweeper = {
            let vault = Arc::clone(&vault);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(sweep_every);
                loop {
                    tick.tick().await;
                    log_round("token_sweep", vault.sweep_tokens().await);
                    log_round(
                        "capture_session_sweep",
                        vault.sweep_capture_sessions().await,
                    );
                }
            })
        };
        let reconcile_every =
            Duration::from_secs(vault.payments_config().reconcile_interval_secs.max(1));
        let reconciler = {
            let vault = Arc::clone(&vault);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(reconcile_every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    log_round("charge_reconciliation", vault.reconcile_charges().await);
                    log_round("refund_reconciliation", vault.reconcile_refunds().await);
                    log_round(
                        "capture_void_reconciliation",
                        vault.reconcile_charge_actions().await,
                    );
                }
            })
        };
        // Planner statistics for tables that grew before autovacuum first
        // looked at them (see `Storage::prime_statistics`).
        let statistics = {
            let vault = Arc::clone(&vault);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(2));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    log_round(
                        "statistics",
                        vault.prime_statistics().await.map(|t| t.join(",")),
                    );
                }
            })
        };
        let poll = Duration::from_millis(vault.payments_config().webhooks.poll_ms.max(10));
        let deliveries = tokio::spawn(async move {
            let mut tick = tokio::time::interval(poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = vault.deliver_due_webhooks().await {
                    tracing::warn!(error = %e, "webhook delivery round failed");
                }
            }
        });
        Workers {
            handles: vec![sweeper, reconciler, statistics, deliveries],
        }
    }

    pub fn stop(self) {
        for h in self.handles {
            h.abort();
        }
    }
}
