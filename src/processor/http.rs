//! The `http` processor: forwards the card (PAN, and the CVV when the
//! cardholder just gave one) to a configured processor endpoint.
//!
//! - The authorize body is a JSON template with `{{placeholders}}`; values
//!   are JSON-escaped, and the filled body lives only in zeroizing memory.
//! - The URL's host must be on `allowed_hosts`; https, or http to loopback.
//!   Redirects are not followed.
//! - Nothing is retried here. A request that may have reached the processor
//!   and got no clear answer (timeout, 5xx, broken connection) is an
//!   *unknown outcome*: the charge stays `pending` (`processor_unavailable`)
//!   and is reconciled by lookup, never authorized again; a refund stays
//!   `pending` and reconciliation sends it again under the same
//!   `Idempotency-Key`, which the processor must honour on `/refund`.
//!
//! Wire protocol (`POST {url}/authorize|capture|refund|void|lookup`, header
//! `Idempotency-Key`: the charge id for authorize and lookup, `<charge
//! id>/capture` and `<charge id>/void`, the refund id for a refund, and the
//! same as `"operation"` in their bodies): the answer to authorize is
//! `{"status": "approved"|"declined"|"cvc_required", "reference", "code",
//! "message"}`; lookup (`{"reference"}`, for reconciliation) answers the
//! same, or `{"status": "not_found"}` when the processor never received
//! that authorization; the other calls answer any 2xx on success.

use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::outbound;
use super::{AuthOutcome, AuthorizeRequest, Processor, ProcessorError, ProcessorResult};
use crate::config::HttpProcessorConfig;
use crate::domain::Money;

pub struct HttpProcessor {
    base: String,
    template: String,
    client: reqwest::Client,
}

#[derive(Deserialize)]
struct AuthorizeAnswer {
    status: String,
    reference: Option<String>,
    code: Option<String>,
    message: Option<String>,
}

/// A JSON string's inside (escaped, without the quotes).
fn json_str(s: &str) -> String {
    let quoted = serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string());
    quoted[1..quoted.len() - 1].to_string()
}

/// Fills `{{name}}` placeholders. Unknown placeholders stay as they are.
fn fill(template: &str, values: &[(&str, &str)]) -> Zeroizing<String> {
    let mut out = Zeroizing::new(template.to_string());
    for (name, value) in values {
        let key = format!("{{{{{name}}}}}");
        if out.contains(&key) {
            let replaced = Zeroizing::new(out.replace(&key, value));
            out = replaced;
        }
    }
    out
}

impl HttpProcessor {
    pub fn new(cfg: &HttpProcessorConfig) -> Result<HttpProcessor, String> {
        let url = outbound::check_url(&cfg.url).map_err(|e| format!("payments.http.url: {e}"))?;
        let host = url
            .host_str()
            .unwrap_or("")
            .trim_start_matches('[')
            .trim_end_matches(']');
        if !cfg
            .allowed_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(host))
        {
            return Err(format!(
                "payments.http.url host {host:?} is not in payments.http.allowed_hosts"
            ));
        }
        let client = outbound::client(
            cfg.ca_file.as_deref(),
            Duration::from_millis(cfg.connect_timeout_ms),
            Duration::from_millis(cfg.timeout_ms),
        )?;
        Ok(HttpProcessor {
            base: cfg.url.trim_end_matches('/').to_string(),
            template: cfg.authorize_template.clone(),
            client,
        })
    }

    async fn post(
        &self,
        op: &str,
        reference: &str,
        body: Vec<u8>,
    ) -> ProcessorResult<reqwest::Response> {
        let sent = self
            .client
            .post(format!("{}/{op}", self.base))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", reference)
            .body(body)
            .send()
            .await;
        match sent {
            // Error texts from reqwest name the URL, never the body.
            Err(e) if e.is_connect() => {
                Err(ProcessorError::Failed(format!("{op}: cannot connect: {e}")))
            }
            Err(e) => Err(ProcessorError::Unknown(format!("{op}: {e}"))),
            Ok(resp) if resp.status().is_server_error() => Err(ProcessorError::Unknown(format!(
                "{op}: processor answered {}",
                resp.status()
            ))),
            Ok(resp) if !resp.status().is_success() => Err(ProcessorError::Failed(format!(
                "{op}: processor answered {}",
                resp.status()
            ))),
            Ok(resp) => Ok(resp),
        }
    }

    async fn simple(
        &self,
        op: &str,
        reference: &str,
        key: &str,
        amount: Option<Money>,
    ) -> ProcessorResult<()> {
        let body = serde_json::json!({
            "reference": reference,
            "operation": key,
            "amount": amount.map(Money::minor),
            "currency": amount.map(|m| m.currency().code()),
        });
        self.post(op, key, body.to_string().into_bytes())
            .await
            .map(|_| ())
    }
}

#[async_trait]
impl Processor for HttpProcessor {
    fn name(&self) -> &'static str {
        "http"
    }

    async fn authorize(&self, req: &AuthorizeRequest<'_>) -> ProcessorResult<AuthOutcome> {
        let card = &req.card;
        let amount = req.amount.map(|m| m.minor()).unwrap_or(0).to_string();
        let currency = req.amount.map(|m| m.currency().code()).unwrap_or("");
        let holder = json_str(card.holder_name.unwrap_or(""));
        let exp_month = card.exp_month.to_string();
        let exp_year = card.exp_year.to_string();
        let reference = json_str(req.reference);
        let body = fill(
            &self.template,
            &[
                // Digits only: no escaping needed, and no copy made.
                ("number", card.pan.digits()),
                ("cvc", card.cvc.unwrap_or("")),
                ("exp_month", &exp_month),
                ("exp_year", &exp_year),
                ("holder_name", &holder),
                ("amount", &amount),
                ("currency", currency),
                ("capture", if req.capture { "true" } else { "false" }),
                (
                    "stored_credential",
                    if req.stored_credential {
                        "true"
                    } else {
                        "false"
                    },
                ),
                ("reference", &reference),
            ],
        );
        let resp = self
            .post("authorize", req.reference, body.as_bytes().to_vec())
            .await?;
        drop(body);
        match outcome("authorize", req.reference, resp).await? {
            Some(outcome) => Ok(outcome),
            None => Err(ProcessorError::Unknown(
                "authorize: unknown status in answer".to_string(),
            )),
        }
    }

    async fn capture(&self, reference: &str, key: &str, amount: Money) -> ProcessorResult<()> {
        self.simple("capture", reference, key, Some(amount)).await
    }

    async fn refund(&self, reference: &str, key: &str, amount: Money) -> ProcessorResult<()> {
        self.simple("refund", reference, key, Some(amount)).await
    }

    async fn void(&self, reference: &str, key: &str) -> ProcessorResult<()> {
        self.simple("void", reference, key, None).await
    }

    async fn lookup(&self, reference: &str) -> ProcessorResult<Option<AuthOutcome>> {
        let body = serde_json::json!({ "reference": reference });
        let resp = self
            .post("lookup", reference, body.to_string().into_bytes())
            .await?;
        outcome("lookup", reference, resp).await
    }
}

/// Reads an authorize or lookup answer: `None` for `not_found`.
async fn outcome(
    op: &str,
    reference: &str,
    resp: reqwest::Response,
) -> ProcessorResult<Option<AuthOutcome>> {
    let answer: AuthorizeAnswer = resp
        .json()
        .await
        .map_err(|e| ProcessorError::Unknown(format!("{op}: unreadable answer: {e}")))?;
    match answer.status.as_str() {
        "approved" => Ok(Some(AuthOutcome::Approved {
            reference: answer.reference.unwrap_or_else(|| reference.to_string()),
        })),
        "declined" => Ok(Some(AuthOutcome::Declined {
            code: answer.code.unwrap_or_else(|| "card_declined".to_string()),
            message: answer
                .message
                .unwrap_or_else(|| "the card was declined".to_string()),
        })),
        "cvc_required" => Ok(Some(AuthOutcome::CvcRequired)),
        "not_found" if op == "lookup" => Ok(None),
        _ => Err(ProcessorError::Unknown(format!(
            "{op}: unknown status in answer"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_filled_and_escaped() {
        let out = fill(
            r#"{"n":"{{number}}","h":"{{holder_name}}","a":{{amount}}}"#,
            &[
                ("number", "4242424242424242"),
                ("holder_name", &json_str("A \"B\"")),
                ("amount", "100"),
            ],
        );
        assert_eq!(
            out.as_str(),
            r#"{"n":"4242424242424242","h":"A \"B\"","a":100}"#
        );
    }

    #[test]
    fn hosts_must_be_allowed() {
        let mut cfg = HttpProcessorConfig {
            url: "http://127.0.0.1:1/p".to_string(),
            ..HttpProcessorConfig::default()
        };
        assert!(HttpProcessor::new(&cfg).is_err());
        cfg.allowed_hosts = vec!["127.0.0.1".to_string()];
        assert!(HttpProcessor::new(&cfg).is_ok());
        cfg.url = "http://example.com/p".to_string();
        cfg.allowed_hosts = vec!["example.com".to_string()];
        assert!(HttpProcessor::new(&cfg).is_err());
    }
}
