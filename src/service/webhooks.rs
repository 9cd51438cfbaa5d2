//! Webhook endpoints and the delivery of events to them.
//!
//! The signing secret is shown once, at creation, and stored sealed under
//! the merchant's data key. Each delivery is a POST of the event's JSON
//! with `Cardvault-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret,
//! "<t>.<body>")>`. Deliveries are rows created with their event (outbox),
//! so they survive restarts; failures back off exponentially up to
//! `payments.webhooks.max_attempts`.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::{event_object, now, Context, ServiceError, ServiceResult, Vault};
use crate::crypto::{KeyOwner, Purpose};
use crate::domain::{new_id, random_secret};
use crate::processor::outbound;
use crate::storage::{DeliveryAttempt, DeliveryRecord, DueDelivery, WebhookEndpointRecord};

/// Event types an endpoint may subscribe to (or `*`).
pub const EVENT_TYPES: &[&str] = &[
    "customer.created",
    "customer.deleted",
    "card.created",
    "card.deleted",
    "charge.succeeded",
    "charge.failed",
    "charge.pending",
    "charge.captured",
    "charge.refunded",
    "charge.refund_failed",
    "charge.canceled",
    "card.verified",
    "card.verification_failed",
];

/// Deliveries handled per round of the worker.
const BATCH: u32 = 50;
/// Deliveries in flight at once within a round.
const CONCURRENCY: usize = 16;

/// The public JSON of an endpoint (with the secret only when given).
pub fn endpoint_object(e: &WebhookEndpointRecord, secret: Option<&str>) -> Value {
    let mut v = json!({
        "id": e.id,
        "object": "webhook_endpoint",
        "url": e.url,
        "events": e.events,
        "created": e.created_at,
    });
    if let Some(s) = secret {
        v["secret"] = Value::String(s.to_string());
    }
    v
}

/// The public JSON of a delivery (times in unix milliseconds).
pub fn delivery_object(d: &DeliveryRecord) -> Value {
    json!({
        "object": "webhook_delivery",
        "event": d.event_id,
        "type": d.event_type,
        "endpoint": d.endpoint_id,
        "status": d.status,
        "attempts": d.attempts,
        "next_attempt_at_ms": d.next_attempt_at,
        "last_status": d.last_status,
        "last_error": d.last_error,
        "updated_ms": d.updated_at,
    })
}

/// `t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn signature_header(secret: &[u8], t: i64, body: &[u8]) -> String {
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0),
    )
    .unwrap_or(i64::MAX)
}

impl Vault {
    pub async fn create_webhook_endpoint(
        &self,
        ctx: &Context,
        url: &str,
        events: Vec<String>,
    ) -> ServiceResult<(WebhookEndpointRecord, Zeroizing<String>)> {
        if url.len() > 2048 {
            return Err(ServiceError::invalid(
                "url",
                "parameter_too_long",
                "url is too long",
            ));
        }
        outbound::check_url(url).map_err(|m| ServiceError::invalid("url", "invalid_url", m))?;
        if events.is_empty() || events.len() > EVENT_TYPES.len() + 1 {
            return Err(ServiceError::invalid(
                "events",
                "invalid_events",
                "events must list 1 or more event types",
            ));
        }
        for (i, e) in events.iter().enumerate() {
            if e != "*" && !EVENT_TYPES.contains(&e.as_str()) {
                return Err(ServiceError::invalid(
                    &format!("events[{i}]"),
                    "unknown_event_type",
                    format!(
                        "unknown event type; use * or one of {}",
                        EVENT_TYPES.join(", ")
                    ),
                ));
            }
        }
        let id = new_id("we");
        let secret = Zeroizing::new(random_secret("whsec"));
        let sealed = self
            .keyring
            .seal(
                KeyOwner::Merchant(ctx.merchant_id()),
                Purpose::Pan,
                &id,
                secret.as_bytes(),
            )
            .await?;
        let endpoint = WebhookEndpointRecord {
            id: id.clone(),
            merchant_id: ctx.merchant_id().to_string(),
            url: url.to_string(),
            events,
            secret_sealed: sealed,
            created_at: now(),
        };
        let audit = ctx.audit("webhook_endpoint.create", Some(&id), "success");
        self.storage
            .insert_webhook_endpoint(&endpoint, &audit)
            .await?;
        Ok((endpoint, secret))
    }

    pub async fn list_webhook_endpoints(
        &self,
        ctx: &Context,
    ) -> ServiceResult<Vec<WebhookEndpointRecord>> {
        Ok(self
            .storage
            .list_webhook_endpoints(ctx.merchant_id())
            .await?)
    }

    pub async fn get_webhook_endpoint(
        &self,
        ctx: &Context,
        id: &str,
    ) -> ServiceResult<WebhookEndpointRecord> {
        self.storage
            .get_webhook_endpoint(ctx.merchant_id(), id)
            .await?
            .ok_or_else(|| ServiceError::not_found("webhook_endpoint", "webhook_endpoint"))
    }

    pub async fn delete_webhook_endpoint(&self, ctx: &Context, id: &str) -> ServiceResult<()> {
        let audit = ctx.audit("webhook_endpoint.delete", Some(id), "success");
        match self
            .storage
            .delete_webhook_endpoint(ctx.merchant_id(), id, &audit)
            .await
        {
            Err(crate::storage::StorageError::NotFound) => Err(ServiceError::not_found(
                "webhook_endpoint",
                "webhook_endpoint",
            )),
            other => Ok(other?),
        }
    }

    /// Recent deliveries to one of the merchant's endpoints, with attempts.
    pub async fn list_webhook_deliveries(
        &self,
        ctx: &Context,
        endpoint_id: &str,
        limit: u32,
    ) -> ServiceResult<Vec<DeliveryRecord>> {
        self.get_webhook_endpoint(ctx, endpoint_id).await?;
        Ok(self
            .storage
            .list_deliveries(ctx.merchant_id(), endpoint_id, limit)
            .await?)
    }

    fn webhook_client(&self) -> ServiceResult<&reqwest::Client> {
        if let Some(c) = self.webhook_client.get() {
            return Ok(c);
        }
        let cfg = &self.payments.webhooks;
        let client = outbound::client(
            cfg.ca_file.as_deref(),
            Duration::from_millis(cfg.timeout_ms.min(10_000)),
            Duration::from_millis(cfg.timeout_ms),
        )
        .map_err(ServiceError::Internal)?;
        Ok(self.webhook_client.get_or_init(|| client))
    }

    /// One round of the delivery worker: sends every due delivery once.
    pub async fn deliver_due_webhooks(&self) -> ServiceResult<usize> {
        use futures_util::StreamExt;
        let now = now_ms();
        // Longer than one send can take, so a lease never expires mid-send.
        let lease = i64::try_from(self.payments.webhooks.timeout_ms.saturating_add(5_000))
            .unwrap_or(i64::MAX);
        let due = self
            .storage
            .due_deliveries(now, now.saturating_add(lease), BATCH)
            .await?;
        let n = due.len();
        // Concurrently, so one slow endpoint does not hold up the others.
        let results: Vec<ServiceResult<()>> = futures_util::stream::iter(due)
            .map(|d| async move {
                let attempt = self.deliver(&d).await;
                Ok(self.storage.record_delivery(&attempt).await?)
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        results.into_iter().collect::<ServiceResult<Vec<()>>>()?;
        Ok(n)
    }

    async fn deliver(&self, d: &DueDelivery) -> DeliveryAttempt {
        let cfg = &self.payments.webhooks;
        let at = now_ms();
        let attempts = d.attempts + 1;
        let subscribed = d
            .endpoint
            .events
            .iter()
            .any(|e| e == "*" || *e == d.event.event_type);
        let result: Result<(), (Option<i64>, String)> = if !subscribed {
            // The fan-out's LIKE over-matched: nothing to send.
            Ok(())
        } else {
            self.send(d).await
        };
        match result {
            Ok(()) => DeliveryAttempt {
                seq: d.seq,
                attempts,
                status: "delivered".to_string(),
                next_attempt_at: at,
                last_status: Some(200),
                last_error: None,
                at,
            },
            Err((status, error)) => {
                let exhausted = attempts >= i64::from(cfg.max_attempts);
                let shift = u32::try_from(attempts - 1).unwrap_or(31).min(31);
                let delay = cfg
                    .backoff_base_ms
                    .saturating_mul(1u64 << shift)
                    .min(cfg.backoff_max_ms.max(cfg.backoff_base_ms));
                tracing::info!(
                    event = %d.event.id, endpoint = %d.endpoint.id, attempts, %error,
                    "webhook delivery failed"
                );
                DeliveryAttempt {
                    seq: d.seq,
                    attempts,
                    status: if exhausted { "failed" } else { "pending" }.to_string(),
                    next_attempt_at: at.saturating_add(i64::try_from(delay).unwrap_or(i64::MAX)),
                    last_status: status,
                    last_error: Some(error.chars().take(200).collect()),
                    at,
                }
            }
        }
    }

    async fn send(&self, d: &DueDelivery) -> Result<(), (Option<i64>, String)> {
        let secret = self
            .keyring
            .open(
                KeyOwner::Merchant(&d.endpoint.merchant_id),
                &d.endpoint.id,
                &d.endpoint.secret_sealed,
            )
            .await
            .map_err(|e| (None, format!("secret: {e}")))?;
        let body = event_object(&d.event).to_string();
        let t = now();
        let signature = signature_header(&secret, t, body.as_bytes());
        drop(secret);
        let client = self.webhook_client().map_err(|e| (None, e.to_string()))?;
        let resp = client
            .post(&d.endpoint.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Cardvault-Signature", signature)
            .header("Cardvault-Event-Id", &d.event.id)
            .body(body)
            .send()
            .await
            .map_err(|e| (None, e.without_url().to_string()))?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else {
            Err((
                Some(i64::from(status.as_u16())),
                format!("endpoint answered {status}"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_of_timestamp_and_body() {
        let h = signature_header(b"whsec_test", 1_700_000_000, b"{}");
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(b"whsec_test").unwrap_or_else(|_| unreachable!());
        mac.update(b"1700000000.{}");
        assert_eq!(
            h,
            format!(
                "t=1700000000,v1={}",
                hex::encode(mac.finalize().into_bytes())
            )
        );
    }
}
