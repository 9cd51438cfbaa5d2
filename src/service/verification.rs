//! Card verification.
//!
//! - `micro_charge`: the processor authorizes a random 1–99 minor units and
//!   the authorization is voided at once; the cardholder reads the amount on
//!   the statement and the merchant confirms it. The amount is kept sealed,
//!   compared in constant time, never returned, and erased when the
//!   verification ends; after `verification_max_attempts` wrong answers the
//!   verification fails and the card becomes `verification_failed`.
//! - `cvc`: a zero-amount authorization with a CVV token of the card.

use rand::Rng;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use super::events::new_event;
use super::{now, Context, ServiceError, ServiceResult, Vault};
use crate::crypto::{KeyOwner, Purpose};
use crate::domain::{new_id, Currency, Money};
use crate::processor::{AuthOutcome, AuthorizeRequest, PaymentCard, ProcessorError};
use crate::storage::{CardRecord, StorageError, VerificationRecord};

pub const CARD_VERIFIED: &str = "verified";
pub const CARD_VERIFICATION_FAILED: &str = "verification_failed";

/// The public JSON of a verification: never the amount.
pub fn verification_object(v: &VerificationRecord) -> Value {
    json!({
        "id": v.id,
        "object": "card_verification",
        "card": v.card_id,
        "method": v.method,
        "status": v.status,
        "currency": v.currency,
        "attempts_remaining": (v.max_attempts - v.attempts).max(0),
        "failure_code": v.failure_code,
        "created": v.created_at,
    })
}

fn card_object(card: &CardRecord, status: &str) -> Value {
    json!({
        "id": card.id,
        "object": "card",
        "customer": card.customer_id,
        "last4": card.last4,
        "brand": card.brand,
        "status": status,
    })
}

impl Vault {
    /// Starts a verification of a saved card.
    #[tracing::instrument(skip_all)]
    pub async fn start_verification(
        &self,
        ctx: &Context,
        customer_id: &str,
        card_id: &str,
        method: &str,
        currency: Option<&str>,
        token: Option<&str>,
    ) -> ServiceResult<VerificationRecord> {
        let card = self
            .storage
            .get_card(ctx.merchant_id(), card_id)
            .await?
            .filter(|c| c.customer_id == customer_id)
            .ok_or_else(|| ServiceError::not_found("card", "card"))?;
        let at = now();
        let mut v = VerificationRecord {
            id: new_id("cver"),
            merchant_id: ctx.merchant_id().to_string(),
            card_id: card.id.clone(),
            method: method.to_string(),
            status: "pending".to_string(),
            amount_sealed: None,
            currency: None,
            attempts: 0,
            max_attempts: i64::from(self.payments.verification_max_attempts),
            failure_code: None,
            created_at: at,
            updated_at: at,
        };
        match method {
            "micro_charge" => {
                if token.is_some() {
                    return Err(ServiceError::invalid(
                        "token",
                        "parameter_unknown",
                        "micro_charge takes no token",
                    ));
                }
                let currency = Currency::parse(currency.unwrap_or("usd"))
                    .map_err(|e| ServiceError::invalid("currency", e.code(), e.to_string()))?;
                let minor: i64 = rand::rngs::OsRng.gen_range(1..=99);
                let amount = Money::new(minor, currency)
                    .map_err(|e| ServiceError::Internal(e.to_string()))?;
                let outcome = self
                    .verification_auth(ctx, &card, Some(amount), None, &v.id)
                    .await?;
                v.currency = Some(currency.code().to_string());
                match outcome {
                    AuthOutcome::Approved { reference } => {
                        // Only the statement line is needed: release the hold.
                        if let Err(e) = self
                            .processor
                            .void(&reference, &format!("{}/void", v.id))
                            .await
                        {
                            tracing::warn!(verification = %v.id, error = %e, "could not void micro-charge");
                        }
                        v.amount_sealed = Some(
                            self.keyring
                                .seal(
                                    KeyOwner::Merchant(ctx.merchant_id()),
                                    Purpose::Volatile,
                                    &v.id,
                                    &minor.to_be_bytes(),
                                )
                                .await?,
                        );
                        let audit = ctx.audit("card.verification.start", Some(&v.id), "success");
                        self.storage.insert_verification(&v, &audit).await?;
                        Ok(v)
                    }
                    other => self.finish_failed_start(ctx, v, &card, other).await,
                }
            }
            "cvc" => {
                let token = token.ok_or_else(|| {
                    ServiceError::invalid(
                        "token",
                        "parameter_missing",
                        "token is required for cvc verification",
                    )
                })?;
                let contents = self.take_token(ctx, token).await?;
                if contents.card_id.as_deref() != Some(card.id.as_str()) || contents.cvc.is_none() {
                    return Err(ServiceError::invalid(
                        "token",
                        "token_card_mismatch",
                        "this token is not a CVV token for this card",
                    ));
                }
                let cvc = contents.cvc.as_ref().map(|c| c.as_str());
                let outcome = self.verification_auth(ctx, &card, None, cvc, &v.id).await?;
                drop(contents);
                let audit = ctx.audit("card.verification.start", Some(&v.id), "success");
                self.storage.insert_verification(&v, &audit).await?;
                match outcome {
                    AuthOutcome::Approved { .. } => {
                        let expected = v.attempts;
                        v.attempts += 1;
                        v.status = "succeeded".to_string();
                        v.updated_at = now();
                        let event = new_event(
                            ctx.merchant_id(),
                            "card.verified",
                            &card_object(&card, CARD_VERIFIED),
                        );
                        let audit = ctx.audit("card.verify", Some(&card.id), "success");
                        self.storage
                            .update_verification(
                                &v,
                                expected,
                                Some(CARD_VERIFIED),
                                &[event],
                                &audit,
                            )
                            .await?;
                        Ok(v)
                    }
                    other => {
                        let expected = v.attempts;
                        v.attempts += 1;
                        self.fail_verification(ctx, &mut v, &card, expected, &other)
                            .await?;
                        Ok(v)
                    }
                }
            }
            _ => Err(ServiceError::invalid(
                "method",
                "invalid_method",
                "method must be micro_charge or cvc",
            )),
        }
    }

    async fn verification_auth(
        &self,
        ctx: &Context,
        card: &CardRecord,
        amount: Option<Money>,
        cvc: Option<&str>,
        reference: &str,
    ) -> ServiceResult<AuthOutcome> {
        let pan = self.open_card(ctx, card).await?;
        let req = AuthorizeRequest {
            card: PaymentCard {
                pan: &pan,
                exp_month: card.exp_month,
                exp_year: card.exp_year,
                holder_name: card.holder_name.as_deref(),
                cvc,
            },
            amount,
            capture: false,
            stored_credential: cvc.is_none(),
            reference,
        };
        let result = if amount.is_none() {
            self.processor.verify(req.card, reference).await
        } else {
            self.processor.authorize(&req).await
        };
        match result {
            Ok(o) => Ok(o),
            Err(ProcessorError::Unknown(m)) => {
                // The micro-charge may have been authorized: a hold on the
                // cardholder's money nobody will use. Void it by our
                // reference (a no-op for the processor if it never got
                // it); the request still fails, nothing is recorded.
                if amount.is_some() {
                    if let Err(e) = self
                        .processor
                        .void(reference, &format!("{reference}/void"))
                        .await
                    {
                        tracing::warn!(verification = %reference, error = %e, "could not void a micro-charge of unknown outcome");
                    }
                }
                Err(ServiceError::Unavailable(m))
            }
            Err(ProcessorError::Failed(m)) => Err(ServiceError::Unavailable(m)),
        }
    }

    async fn finish_failed_start(
        &self,
        ctx: &Context,
        mut v: VerificationRecord,
        card: &CardRecord,
        outcome: AuthOutcome,
    ) -> ServiceResult<VerificationRecord> {
        let audit = ctx.audit("card.verification.start", Some(&v.id), "success");
        self.storage.insert_verification(&v, &audit).await?;
        let expected = v.attempts;
        self.fail_verification(ctx, &mut v, card, expected, &outcome)
            .await?;
        Ok(v)
    }

    async fn fail_verification(
        &self,
        ctx: &Context,
        v: &mut VerificationRecord,
        card: &CardRecord,
        expected_attempts: i64,
        outcome: &AuthOutcome,
    ) -> ServiceResult<()> {
        v.status = "failed".to_string();
        v.amount_sealed = None;
        v.updated_at = now();
        v.failure_code = Some(match outcome {
            AuthOutcome::Declined { code, .. } => code.clone(),
            AuthOutcome::CvcRequired => "incorrect_cvc".to_string(),
            AuthOutcome::Approved { .. } => "too_many_attempts".to_string(),
        });
        let event = new_event(
            ctx.merchant_id(),
            "card.verification_failed",
            &card_object(card, CARD_VERIFICATION_FAILED),
        );
        let audit = ctx.audit("card.verify", Some(&card.id), "failure");
        self.storage
            .update_verification(
                v,
                expected_attempts,
                Some(CARD_VERIFICATION_FAILED),
                &[event],
                &audit,
            )
            .await
            .map_err(verification_conflict)
    }

    pub async fn get_verification(
        &self,
        ctx: &Context,
        card_id: &str,
        id: &str,
    ) -> ServiceResult<VerificationRecord> {
        self.storage
            .get_verification(ctx.merchant_id(), id)
            .await?
            .filter(|v| v.card_id == card_id)
            .ok_or_else(|| ServiceError::not_found("card_verification", "verification"))
    }

    /// Checks the amount the cardholder read. Wrong answers count against
    /// the attempts; the comparison is constant-time.
    #[tracing::instrument(skip_all)]
    pub async fn confirm_verification(
        &self,
        ctx: &Context,
        customer_id: &str,
        card_id: &str,
        id: &str,
        amount: i64,
    ) -> ServiceResult<VerificationRecord> {
        let card = self
            .storage
            .get_card(ctx.merchant_id(), card_id)
            .await?
            .filter(|c| c.customer_id == customer_id)
            .ok_or_else(|| ServiceError::not_found("card", "card"))?;
        let mut v = self.get_verification(ctx, card_id, id).await?;
        if v.method != "micro_charge" || v.status != "pending" {
            return Err(ServiceError::invalid_state(
                "verification_not_pending",
                "only a pending micro_charge verification can be confirmed",
            ));
        }
        let sealed = v
            .amount_sealed
            .clone()
            .ok_or_else(|| ServiceError::Internal("pending verification without amount".into()))?;
        let plain = self
            .keyring
            .open(KeyOwner::Merchant(ctx.merchant_id()), &v.id, &sealed)
            .await?;
        let given = amount.to_be_bytes();
        let stored: &[u8] = &plain;
        let matches = bool::from(stored.ct_eq(&given[..]));
        drop(plain);
        let expected = v.attempts;
        v.attempts += 1;
        v.updated_at = now();
        if matches {
            v.status = "succeeded".to_string();
            v.amount_sealed = None;
            let event = new_event(
                ctx.merchant_id(),
                "card.verified",
                &card_object(&card, CARD_VERIFIED),
            );
            let audit = ctx.audit("card.verify", Some(&card.id), "success");
            self.storage
                .update_verification(&v, expected, Some(CARD_VERIFIED), &[event], &audit)
                .await
                .map_err(verification_conflict)?;
        } else if v.attempts >= v.max_attempts {
            let outcome = AuthOutcome::Approved {
                reference: String::new(),
            };
            self.fail_verification(ctx, &mut v, &card, expected, &outcome)
                .await?;
        } else {
            let audit = ctx.audit("card.verify", Some(&card.id), "denied");
            self.storage
                .update_verification(&v, expected, None, &[], &audit)
                .await
                .map_err(verification_conflict)?;
        }
        Ok(v)
    }
}

fn verification_conflict(e: StorageError) -> ServiceError {
    match e {
        StorageError::Conflict(_) => ServiceError::invalid_state(
            "verification_changed",
            "the verification was changed by another request; fetch it and retry",
        ),
        other => other.into(),
    }
}
