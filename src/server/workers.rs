//! Background workers started with the server: the token sweeper (purges
//! the sealed payloads of expired tokens, deletes day-old capture sessions),
//! the webhook delivery loop and charge reconciliation.
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

impl Workers {
    pub fn start(vault: Arc<Vault>) -> Workers {
        let sweep_every = Duration::from_secs(vault.payments_config().token_sweep_secs.max(1));
        let sweeper = {
            let vault = Arc::clone(&vault);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(sweep_every);
                loop {
                    tick.tick().await;
                    match vault.sweep_tokens().await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(purged = n, "expired tokens purged"),
                        Err(e) => tracing::warn!(error = %e, "token sweep failed"),
                    }
                    match vault.sweep_capture_sessions().await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(deleted = n, "old capture sessions deleted"),
                        Err(e) => tracing::warn!(error = %e, "capture session sweep failed"),
                    }
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
                    match vault.reconcile_charges().await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(settled = n, "charges reconciled"),
                        Err(e) => tracing::warn!(error = %e, "charge reconciliation failed"),
                    }
                    match vault.reconcile_refunds().await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(settled = n, "refunds reconciled"),
                        Err(e) => tracing::warn!(error = %e, "refund reconciliation failed"),
                    }
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
            handles: vec![sweeper, reconciler, deliveries],
        }
    }

    pub fn stop(self) {
        for h in self.handles {
            h.abort();
        }
    }
}
