//! Charges: authorize (and capture) a saved card through the processor,
//! capture later, refund, cancel, and the pending-CVV flow.
//!
//! A charge is written as `processing` before the processor is called, so a
//! crash mid-call leaves a record to reconcile rather than a charge nobody
//! knows about. Every later change is one transaction (charge + event +
//! audit) guarded by the charge's version, so two concurrent captures or
//! refunds cannot both apply. A CVV only ever lives in memory, for the one
//! processor call it was given for.

use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::events::new_event;
use super::tokens::TokenContents;
use super::{now, Context, ServiceError, ServiceResult, Vault};
use crate::crypto::KeyOwner;
use crate::domain::{contains_pan_like, new_id, Currency, Money, Pan};
use crate::processor::{AuthOutcome, AuthorizeRequest, PaymentCard, ProcessorError};
use crate::storage::{
    AuditEntry, CardRecord, ChargeRecord, EventRecord, LineItem, Metadata, Page, RefundRecord,
    StorageError, Unsettled,
};

/// A new version of the charge, cleared of the previous outcome's details.
fn next_version(charge: &mut ChargeRecord) {
    charge.version += 1;
    charge.updated_at = now();
    charge.next_action = None;
    charge.failure_code = None;
    charge.failure_message = None;
}

/// Applies what the processor said about an authorization to the charge
/// (a new version), and names the event it makes. `cvc_given`: whether the
/// authorization carried a CVV.
fn settle(
    charge: &mut ChargeRecord,
    result: Result<AuthOutcome, ProcessorError>,
    cvc_given: bool,
) -> &'static str {
    next_version(charge);
    match result {
        Ok(AuthOutcome::Approved { reference }) => {
            charge.status = STATUS_SUCCEEDED.to_string();
            charge.processor_ref = Some(reference);
            if charge.capture_requested {
                charge.captured = true;
                charge.amount_captured = charge.amount;
            }
            "charge.succeeded"
        }
        Ok(AuthOutcome::Declined { code, message }) => {
            charge.status = STATUS_FAILED.to_string();
            charge.failure_code = Some(code);
            charge.failure_message = Some(message);
            "charge.failed"
        }
        Ok(AuthOutcome::CvcRequired) if !cvc_given => {
            charge.status = STATUS_PENDING.to_string();
            charge.next_action = Some(NEXT_PROVIDE_CVC.to_string());
            "charge.pending"
        }
        Ok(AuthOutcome::CvcRequired) => {
            charge.status = STATUS_FAILED.to_string();
            charge.failure_code = Some("incorrect_cvc".to_string());
            charge.failure_message = Some("the issuer did not accept the CVV".to_string());
            "charge.failed"
        }
        Err(ProcessorError::Unknown(cause)) => {
            // The processor may have charged the card: never retry
            // blindly. The charge stays pending for reconciliation.
            tracing::warn!(charge = %charge.id, %cause, "processor outcome unknown");
            charge.status = STATUS_PENDING.to_string();
            charge.failure_code = Some("processor_unavailable".to_string());
            charge.failure_message =
                Some("the processor did not answer; the outcome will be reconciled".to_string());
            "charge.pending"
        }
        Err(ProcessorError::Failed(cause)) => {
            tracing::warn!(charge = %charge.id, %cause, "processor error");
            charge.status = STATUS_FAILED.to_string();
            charge.failure_code = Some("processing_error".to_string());
            charge.failure_message = Some("the processor could not process the charge".to_string());
            "charge.failed"
        }
    }
}

/// A charge request, as parsed by the api layer.
pub struct NewCharge {
    pub amount: i64,
    pub currency: String,
    pub customer: String,
    pub card: Option<String>,
    pub token: Option<String>,
    pub capture: bool,
    pub description: Option<String>,
    pub metadata: Metadata,
    pub line_items: Option<Vec<LineItem>>,
}

pub const STATUS_PROCESSING: &str = "processing";
pub const STATUS_PENDING: &str = "pending";
pub const STATUS_SUCCEEDED: &str = "succeeded";
pub const STATUS_FAILED: &str = "failed";
pub const STATUS_CANCELED: &str = "canceled";

/// A charge's pending action while the processor captures it.
pub const ACTION_CAPTURE: &str = "capture";
/// A charge's pending action while the processor voids it.
pub const ACTION_CANCEL: &str = "cancel";

/// The processor's idempotency key for a charge's capture or void: one per
/// charge and operation, so every send of a pending action is the same
/// request to the processor.
fn action_key(charge_id: &str, action: &str) -> String {
    match action {
        ACTION_CAPTURE => format!("{charge_id}/capture"),
        _ => format!("{charge_id}/void"),
    }
}

/// Refuses a request that would race the charge's pending capture or void
/// (its processor outcome is not stored yet).
fn pending_conflict(charge: &ChargeRecord) -> ServiceError {
    match charge.pending_action.as_deref() {
        Some(ACTION_CAPTURE) => ServiceError::invalid_state(
            "capture_pending",
            format!(
                "a capture of {} is in progress; its outcome comes as an event",
                charge.pending_amount.unwrap_or(charge.amount)
            ),
        ),
        _ => ServiceError::invalid_state(
            "cancel_pending",
            "a cancel of this charge is in progress; its outcome comes as an event",
        ),
    }
}
pub(crate) const NEXT_PROVIDE_CVC: &str = "provide_cvc";

/// The public JSON of a charge, without the CVV page's link (see
/// [`Vault::charge_json`] for the one with it).
pub fn charge_object(c: &ChargeRecord) -> Value {
    charge_object_with(c, None)
}

/// The public JSON of a charge. While it waits for the CVV, `next_action`
/// offers the API route (`confirm_url`, with a CVV token) and, when given,
/// the hosted CVV page (`hosted_url`) to send the cardholder to.
pub fn charge_object_with(c: &ChargeRecord, link: Option<&super::hosted::CvcLink>) -> Value {
    let next_action = c.next_action.as_ref().map(|t| {
        json!({
            "type": t,
            "provide_cvc": {
                "confirm_url": format!("/v1/charges/{}/confirm", c.id),
                "card": c.card_id,
                "hosted_url": link.map(|l| l.url.as_str()),
                "hosted_url_expires_at": link.map(|l| l.expires_at),
            }
        })
    });
    let pending_action = c.pending_action.as_ref().map(|t| match c.pending_amount {
        Some(amount) => json!({ "type": t, "amount": amount }),
        None => json!({ "type": t }),
    });
    // `processing` is internal: outside the request that created it, a
    // charge still processing is one whose outcome is not known yet.
    let status = if c.status == STATUS_PROCESSING {
        STATUS_PENDING
    } else {
        c.status.as_str()
    };
    json!({
        "id": c.id,
        "object": "charge",
        "amount": c.amount,
        "currency": c.currency,
        "customer": c.customer_id,
        "card": c.card_id,
        "status": status,
        "captured": c.captured,
        "amount_captured": c.amount_captured,
        "amount_refunded": c.amount_refunded,
        "refunded": c.captured && c.amount_refunded > 0 && c.amount_refunded == c.amount_captured,
        "failure_code": c.failure_code,
        "failure_message": c.failure_message,
        "next_action": next_action,
        "pending_action": pending_action,
        "description": c.description,
        "metadata": c.metadata,
        "line_items": c.line_items,
        "processor": c.processor,
        "created": c.created_at,
    })
}

/// The public JSON of a refund.
pub fn refund_object(r: &RefundRecord) -> Value {
    json!({
        "id": r.id,
        "object": "refund",
        "charge": r.charge_id,
        "amount": r.amount,
        "status": r.status,
        "created": r.created_at,
    })
}

fn check_text(param: &str, value: &str, max: usize) -> ServiceResult<()> {
    if value.chars().count() > max {
        return Err(ServiceError::invalid(
            param,
            "parameter_too_long",
            format!("{param} must have at most {max} characters"),
        ));
    }
    // Free text travels to events and webhooks: a card number pasted into
    // it must not.
    if contains_pan_like(value) || value.chars().any(|c| c.is_control()) {
        return Err(ServiceError::invalid(
            param,
            "invalid_text",
            format!("{param} must not contain card numbers or control characters"),
        ));
    }
    Ok(())
}

fn check_metadata(metadata: &Metadata) -> ServiceResult<()> {
    if metadata.len() > 50 {
        return Err(ServiceError::invalid(
            "metadata",
            "too_many_keys",
            "metadata may have at most 50 keys",
        ));
    }
    for (k, v) in metadata {
        check_text("metadata", k, 40)?;
        check_text("metadata", v, 500)?;
    }
    Ok(())
}

fn check_line_items(items: &[LineItem], amount: Money) -> ServiceResult<()> {
    if items.is_empty() || items.len() > 100 {
        return Err(ServiceError::invalid(
            "line_items",
            "invalid_line_items",
            "line_items must have 1 to 100 entries",
        ));
    }
    let mut total: i64 = 0;
    for (i, item) in items.iter().enumerate() {
        let p = |f: &str| format!("line_items[{i}].{f}");
        if item.name.trim().is_empty() {
            return Err(ServiceError::invalid(
                &p("name"),
                "parameter_missing",
                "name must not be empty",
            ));
        }
        check_text(&p("name"), &item.name, 200)?;
        if let Some(sku) = &item.sku {
            check_text(&p("sku"), sku, 100)?;
        }
        if item.unit_price < 0 || item.unit_price > Money::max_minor(amount.currency()) {
            return Err(ServiceError::invalid(
                &p("unit_price"),
                "invalid_amount",
                "unit_price must be a non-negative integer in minor units",
            ));
        }
        if !(1..=100_000).contains(&item.quantity) {
            return Err(ServiceError::invalid(
                &p("quantity"),
                "invalid_quantity",
                "quantity must be between 1 and 100000",
            ));
        }
        total = item
            .unit_price
            .checked_mul(item.quantity)
            .and_then(|line| total.checked_add(line))
            .ok_or_else(|| {
                ServiceError::invalid("line_items", "line_items_mismatch", "line items overflow")
            })?;
    }
    if total != amount.minor() {
        return Err(ServiceError::invalid(
            "line_items",
            "line_items_mismatch",
            format!(
                "line items add up to {total}, not to the amount {}",
                amount.minor()
            ),
        ));
    }
    Ok(())
}

fn money(amount: i64, currency: &str) -> ServiceResult<Money> {
    let currency = Currency::parse(currency)
        .map_err(|e| ServiceError::invalid("currency", e.code(), e.to_string()))?;
    Money::new(amount, currency)
        .map_err(|e| ServiceError::invalid("amount", e.code(), e.to_string()))
}

/// The stored charge's money (it was validated when created).
fn charge_money(c: &ChargeRecord, amount: i64) -> ServiceResult<Money> {
    money(amount, &c.currency)
}

/// A capture's or a void's processor error: an unknown outcome is a 503
/// (retry: the retry repeats the operation's idempotency key), a refusal
/// is final and says so (409 `code`), nothing having happened.
fn processor_refused(e: ProcessorError, code: &'static str, operation: &str) -> ServiceError {
    match e {
        e @ ProcessorError::Unknown(_) => ServiceError::Unavailable(e.to_string()),
        ProcessorError::Failed(cause) => {
            tracing::warn!(%cause, "the processor refused a {operation}");
            ServiceError::invalid_state(
                code,
                format!("the processor refused the {operation}; nothing changed"),
            )
        }
    }
}

impl Vault {
    fn charge_event(&self, c: &ChargeRecord, event_type: &str) -> EventRecord {
        new_event(&c.merchant_id, event_type, &charge_object(c))
    }

    /// A charge event whose data carries the CVV page's link when the
    /// charge now waits for the CVV (so a webhook receiver can send the
    /// cardholder there).
    async fn charge_event_with_link(&self, c: &ChargeRecord, event_type: &str) -> EventRecord {
        let link = self.cvc_link_or_none(c).await;
        new_event(
            &c.merchant_id,
            event_type,
            &charge_object_with(c, link.as_ref()),
        )
    }

    /// Opens a saved card's number for a processor call.
    pub(crate) async fn open_card(&self, ctx: &Context, card: &CardRecord) -> ServiceResult<Pan> {
        let plain = self
            .keyring
            .open(
                KeyOwner::Merchant(ctx.merchant_id()),
                &card.id,
                &card.pan_ciphertext,
            )
            .await?;
        let digits = Zeroizing::new(
            String::from_utf8(plain.to_vec())
                .map_err(|_| ServiceError::Internal("sealed card is not UTF-8".into()))?,
        );
        Pan::parse(&digits).map_err(|_| ServiceError::Internal("sealed card does not parse".into()))
    }

    /// Creates a charge and runs the authorization.
    #[tracing::instrument(skip_all)]
    pub async fn create_charge(
        &self,
        ctx: &Context,
        new: NewCharge,
    ) -> ServiceResult<ChargeRecord> {
        let amount = money(new.amount, &new.currency)?;
        if let Some(d) = &new.description {
            check_text("description", d, 500)?;
        }
        check_metadata(&new.metadata)?;
        if let Some(items) = &new.line_items {
            check_line_items(items, amount)?;
        }
        let card = self
            .charged_card(ctx, &new.customer, new.card.as_deref())
            .await?;
        if self.payments.require_verified_cards && card.status != "verified" {
            return Err(ServiceError::invalid(
                "card",
                "card_not_verified",
                "this merchant requires verified cards; verify the card first",
            ));
        }
        // Opened before anything is written or spent: an HSM outage fails
        // the request cleanly (503) instead of leaving a charge behind.
        let pan = self.open_card(ctx, &card).await?;
        // Everything is validated: only now is a token spent.
        let token = match &new.token {
            Some(t) => Some(self.cvc_token_for(ctx, t, &card).await?),
            None => None,
        };
        let at = now();
        let mut charge = ChargeRecord {
            id: new_id("ch"),
            merchant_id: ctx.merchant_id().to_string(),
            customer_id: card.customer_id.clone(),
            card_id: card.id.clone(),
            amount: amount.minor(),
            currency: amount.currency().code().to_string(),
            status: STATUS_PROCESSING.to_string(),
            captured: false,
            amount_captured: 0,
            amount_refunded: 0,
            capture_requested: new.capture,
            failure_code: None,
            failure_message: None,
            next_action: None,
            description: new.description,
            metadata: new.metadata,
            line_items: new.line_items.unwrap_or_default(),
            processor: self.processor.name().to_string(),
            processor_ref: None,
            version: 0,
            created_at: at,
            updated_at: at,
            pending_action: None,
            pending_amount: None,
        };
        let mut audit = ctx.audit("charge.create", Some(&charge.id), "success");
        audit.detail = Some(format!(
            "last4={} amount={} {}",
            card.last4, charge.amount, charge.currency
        ));
        self.storage.insert_charge(&charge, &[], &audit).await?;
        let cvc = token.as_ref().and_then(|t| t.cvc.as_ref());
        self.authorize_charge(ctx, &mut charge, &card, pan, cvc.map(|c| c.as_str()))
            .await?;
        Ok(charge)
    }

    /// The card a new charge is for: `card` if given, else the customer's
    /// default card. Either must be the customer's, and the customer the
    /// merchant's (404 naming whichever is missing). A named card of the
    /// customer is found in one read: that it exists under the merchant
    /// proves the customer does (a card hangs off a customer of the same
    /// merchant).
    async fn charged_card(
        &self,
        ctx: &Context,
        customer_id: &str,
        card_id: Option<&str>,
    ) -> ServiceResult<CardRecord> {
        let merchant = ctx.merchant_id();
        if let Some(id) = card_id {
            if let Some(card) = self.customer_card(merchant, customer_id, id).await? {
                return Ok(card);
            }
        }
        // No card named, or the named one is missing: the customer decides
        // which card, or which 404.
        let customer = self
            .storage
            .get_customer(merchant, customer_id)
            .await?
            .ok_or_else(|| ServiceError::not_found("customer", "customer"))?;
        let default = match card_id {
            Some(_) => return Err(ServiceError::not_found("card", "card")),
            None => customer.default_card_id.ok_or_else(|| {
                ServiceError::invalid(
                    "card",
                    "customer_has_no_card",
                    "the customer has no default card; pass card",
                )
            })?,
        };
        self.customer_card(merchant, customer_id, &default)
            .await?
            .ok_or_else(|| ServiceError::not_found("card", "card"))
    }

    /// Takes a CVV token and checks it belongs to `card`.
    async fn cvc_token_for(
        &self,
        ctx: &Context,
        token: &str,
        card: &CardRecord,
    ) -> ServiceResult<TokenContents> {
        let contents = self.take_token(ctx, token).await?;
        if contents.card_id.as_deref() != Some(card.id.as_str()) || contents.cvc.is_none() {
            return Err(ServiceError::invalid(
                "token",
                "token_card_mismatch",
                "this token is not a CVV token for the charge's card",
            ));
        }
        Ok(contents)
    }

    /// Calls the processor and stores the outcome (one transaction with its
    /// event and audit entry). `charge` is updated in place.
    async fn authorize_charge(
        &self,
        ctx: &Context,
        charge: &mut ChargeRecord,
        card: &CardRecord,
        pan: Pan,
        cvc: Option<&str>,
    ) -> ServiceResult<()> {
        let amount = charge_money(charge, charge.amount)?;
        let result = self
            .processor
            .authorize(&AuthorizeRequest {
                card: PaymentCard {
                    pan: &pan,
                    exp_month: card.exp_month,
                    exp_year: card.exp_year,
                    holder_name: card.holder_name.as_deref(),
                    cvc,
                },
                amount: Some(amount),
                capture: charge.capture_requested,
                stored_credential: cvc.is_none(),
                reference: &charge.id,
            })
            .await;
        drop(pan);
        let expected = charge.version;
        let event_type = settle(charge, result, cvc.is_some());
        let event = self.charge_event_with_link(charge, event_type).await;
        let mut audit = ctx.audit("charge.authorize", Some(&charge.id), "success");
        audit.detail = Some(format!("status={}", charge.status));
        self.storage
            .update_charge(charge, expected, None, &[event], &audit)
            .await
            .map_err(|e| self.state_conflict(e))
    }

    /// Takes the charge for one processor call: bumps its version (and, for
    /// an authorization, marks it `processing`) before the processor is
    /// called, so that of two concurrent captures, refunds, cancels or
    /// confirms only one reaches the processor; the other gets a 409.
    async fn claim_charge(
        &self,
        ctx: &Context,
        charge: &mut ChargeRecord,
        event: &str,
        processing: bool,
    ) -> ServiceResult<()> {
        self.claim_charge_with(ctx, charge, event, processing, None)
            .await
    }

    /// `claim_charge`, storing `refund` (a new `pending` refund) with the
    /// claim.
    async fn claim_charge_with(
        &self,
        ctx: &Context,
        charge: &mut ChargeRecord,
        event: &str,
        processing: bool,
        refund: Option<&RefundRecord>,
    ) -> ServiceResult<()> {
        let expected = charge.version;
        let mut claimed = charge.clone();
        claimed.version += 1;
        claimed.updated_at = now();
        if processing {
            claimed.status = STATUS_PROCESSING.to_string();
        }
        let mut audit = ctx.audit(event, Some(&charge.id), "attempt");
        if let Some(r) = refund {
            audit.detail = Some(format!("amount={} refund={}", r.amount, r.id));
        }
        self.storage
            .update_charge(&claimed, expected, refund, &[], &audit)
            .await
            .map_err(|e| self.state_conflict(e))?;
        *charge = claimed;
        Ok(())
    }

    fn state_conflict(&self, e: StorageError) -> ServiceError {
        match e {
            StorageError::Conflict(_) => ServiceError::invalid_state(
                "charge_changed",
                "the charge was changed by another request; fetch it and retry",
            ),
            other => other.into(),
        }
    }

    pub async fn get_charge(&self, ctx: &Context, id: &str) -> ServiceResult<ChargeRecord> {
        self.storage
            .get_charge(ctx.merchant_id(), id)
            .await?
            .ok_or_else(|| ServiceError::not_found("charge", "charge"))
    }

    pub async fn list_charges(
        &self,
        ctx: &Context,
        customer: Option<&str>,
        limit: u32,
        starting_after: Option<&str>,
    ) -> ServiceResult<Page<ChargeRecord>> {
        match self
            .storage
            .list_charges(ctx.merchant_id(), customer, limit, starting_after)
            .await
        {
            Err(StorageError::NotFound) => Err(ServiceError::not_found("charge", "starting_after")),
            other => Ok(other?),
        }
    }

    /// Completes a charge waiting for the CVV, with a CVV token of its card.
    #[tracing::instrument(skip_all)]
    pub async fn confirm_charge(
        &self,
        ctx: &Context,
        id: &str,
        token: &str,
    ) -> ServiceResult<ChargeRecord> {
        let (mut charge, card) = self.charge_awaiting_cvc(ctx, id).await?;
        let pan = self.open_card(ctx, &card).await?;
        let contents = self.cvc_token_for(ctx, token, &card).await?;
        self.claim_charge(ctx, &mut charge, "charge.confirm", true)
            .await?;
        let cvc = contents.cvc.as_ref().map(|c| c.as_str());
        self.authorize_charge(ctx, &mut charge, &card, pan, cvc)
            .await?;
        drop(contents);
        Ok(charge)
    }

    /// Completes a charge waiting for the CVV with a CVV the cardholder
    /// just typed (the hosted CVV page): checked against the card's brand
    /// before the charge is touched, used for this one authorization.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn confirm_charge_with_cvc(
        &self,
        ctx: &Context,
        id: &str,
        cvc: Zeroizing<String>,
    ) -> ServiceResult<ChargeRecord> {
        let (mut charge, card) = self.charge_awaiting_cvc(ctx, id).await?;
        let brand = card
            .brand
            .parse::<crate::domain::Brand>()
            .unwrap_or(crate::domain::Brand::Unknown);
        super::tokens::check_cvc(&cvc, brand)?;
        let pan = self.open_card(ctx, &card).await?;
        self.claim_charge(ctx, &mut charge, "charge.confirm", true)
            .await?;
        self.authorize_charge(ctx, &mut charge, &card, pan, Some(cvc.as_str()))
            .await?;
        drop(cvc);
        Ok(charge)
    }

    /// The charge, if it waits for the CVV, and its card.
    async fn charge_awaiting_cvc(
        &self,
        ctx: &Context,
        id: &str,
    ) -> ServiceResult<(ChargeRecord, CardRecord)> {
        let charge = self.get_charge(ctx, id).await?;
        if !super::hosted::awaits_cvc(&charge) {
            return Err(ServiceError::invalid_state(
                "charge_not_awaiting_cvc",
                format!("only a charge pending with next_action provide_cvc can be confirmed; this one is {}", charge_object(&charge)["status"].as_str().unwrap_or("")),
            ));
        }
        let card = self
            .storage
            .get_card(ctx.merchant_id(), &charge.card_id)
            .await?
            .ok_or_else(|| {
                ServiceError::invalid_state("card_deleted", "the charge's card was deleted")
            })?;
        Ok((charge, card))
    }

    /// Captures an authorized charge, fully or partly.
    ///
    /// The capture is stored on the charge as its pending action, with its
    /// amount, before the processor is called, and cleared when the answer
    /// is stored. A lost answer (or an answer the database cannot take)
    /// leaves it pending and answers 503: a retry sends the same capture
    /// again under the same idempotency key, and reconciliation does so for
    /// the charges nobody retried, so the processor captures at most once
    /// and the charge ends up showing it.
    pub async fn capture_charge(
        &self,
        ctx: &Context,
        id: &str,
        amount: Option<i64>,
    ) -> ServiceResult<ChargeRecord> {
        let mut charge = self.get_charge(ctx, id).await?;
        if charge.captured {
            return Err(ServiceError::invalid_state(
                "charge_already_captured",
                "this charge was already captured",
            ));
        }
        match (charge.pending_action.as_deref(), charge.pending_amount) {
            (None, _) => {}
            // The same capture again: sent again below.
            (Some(ACTION_CAPTURE), Some(pending)) if amount.unwrap_or(pending) == pending => {}
            _ => return Err(pending_conflict(&charge)),
        }
        if charge.status != STATUS_SUCCEEDED {
            return Err(ServiceError::invalid_state(
                "charge_not_capturable",
                "only an authorized (succeeded, uncaptured) charge can be captured",
            ));
        }
        let amount = amount.or(charge.pending_amount).unwrap_or(charge.amount);
        if amount <= 0 || amount > charge.amount {
            return Err(ServiceError::invalid(
                "amount",
                "invalid_capture_amount",
                format!(
                    "amount must be between 1 and the authorized {}",
                    charge.amount
                ),
            ));
        }
        charge.pending_action = Some(ACTION_CAPTURE.to_string());
        charge.pending_amount = Some(amount);
        self.claim_charge(ctx, &mut charge, "charge.capture", false)
            .await?;
        let audit = ctx.audit("charge.capture", Some(&charge.id), "success");
        self.send_action(charge, audit).await
    }

    /// Sends the charge's pending capture or void to the processor, under
    /// its idempotency key, and stores the answer (see `finish_action`).
    async fn send_action(
        &self,
        charge: ChargeRecord,
        audit: AuditEntry,
    ) -> ServiceResult<ChargeRecord> {
        let action = charge.pending_action.clone().unwrap_or_default();
        let reference = charge.processor_ref.clone().unwrap_or_default();
        let key = action_key(&charge.id, &action);
        let result = match action.as_str() {
            ACTION_CAPTURE => {
                let amount = charge.pending_amount.unwrap_or(charge.amount);
                let money = charge_money(&charge, amount)?;
                self.processor.capture(&reference, &key, money).await
            }
            _ => self.processor.void(&reference, &key).await,
        };
        self.finish_action(charge, result, audit).await
    }

    /// Stores the processor's answer to the charge's pending capture or
    /// void with its event and `audit` entry (whose outcome and detail are
    /// filled in here): done (`charge.captured` or `charge.canceled`), or
    /// refused (nothing changed: the action is cleared, and the error is
    /// `capture_failed` or `cancel_failed`). An unknown outcome stores
    /// nothing and is a 503; so is an outcome the database cannot take.
    /// Either way the action stays pending, for a retry or reconciliation.
    async fn finish_action(
        &self,
        mut charge: ChargeRecord,
        result: Result<(), ProcessorError>,
        mut audit: AuditEntry,
    ) -> ServiceResult<ChargeRecord> {
        let action = charge.pending_action.take().unwrap_or_default();
        let amount = charge.pending_amount.take();
        let (failed_code, operation) = match action.as_str() {
            ACTION_CAPTURE => ("capture_failed", "capture"),
            _ => ("cancel_failed", "void"),
        };
        if let Err(ProcessorError::Unknown(cause)) = &result {
            tracing::warn!(charge = %charge.id, %cause, "{operation} outcome unknown; left pending");
            return Err(ServiceError::Unavailable(format!(
                "the processor's answer to the {operation} was lost; it is sent again \
                 automatically (or by a retry of this request) and its outcome comes as an event"
            )));
        }
        let expected = charge.version;
        charge.version += 1;
        charge.updated_at = now();
        let refused = result.err();
        let mut events = Vec::new();
        match (&refused, action.as_str()) {
            (None, ACTION_CAPTURE) => {
                let amount = amount.unwrap_or(charge.amount);
                charge.captured = true;
                charge.amount_captured = amount;
                audit.detail = Some(format!("amount={amount}"));
                events.push(self.charge_event(&charge, "charge.captured"));
            }
            (None, _) => {
                charge.status = STATUS_CANCELED.to_string();
                charge.next_action = None;
                events.push(self.charge_event(&charge, "charge.canceled"));
            }
            (Some(cause), _) => {
                audit.outcome = "failure".to_string();
                audit.detail = Some(match amount {
                    Some(amount) => format!("amount={amount} refused: {cause}"),
                    None => format!("refused: {cause}"),
                });
            }
        }
        self.storage
            .update_charge(&charge, expected, None, &events, &audit)
            .await
            .map_err(|e| self.state_conflict(e))?;
        match refused {
            None => Ok(charge),
            Some(e) => Err(processor_refused(e, failed_code, operation)),
        }
    }

    /// Refunds part or all of what was captured and not yet refunded (nor
    /// held by a `pending` refund).
    ///
    /// The refund is stored `pending` with the claim, before the processor
    /// is called, and its id is the processor's idempotency key. When the
    /// answer is lost, the refund is returned as it stands, `pending`, like
    /// a charge whose answer was lost: the request did its part, so a retry
    /// with the same `Idempotency-Key` replays it instead of refunding
    /// again. Reconciliation later sends it again under the same id (so the
    /// processor makes it at most once) and stores the outcome, with its
    /// event. Until then its amount cannot be refunded a second time.
    pub async fn refund_charge(
        &self,
        ctx: &Context,
        id: &str,
        amount: Option<i64>,
    ) -> ServiceResult<(ChargeRecord, RefundRecord)> {
        let mut charge = self.get_charge(ctx, id).await?;
        if charge.pending_action.is_some() {
            return Err(pending_conflict(&charge));
        }
        if !charge.captured {
            return Err(ServiceError::invalid_state(
                "charge_not_captured",
                "only a captured charge can be refunded; cancel an uncaptured one",
            ));
        }
        // The charge's version covers its refunds too (every refund is
        // stored with a new version), so what is read here is what the
        // claim below checks.
        let held: i64 = self
            .storage
            .list_refunds(ctx.merchant_id(), &charge.id)
            .await?
            .iter()
            .filter(|r| r.status == STATUS_PENDING)
            .map(|r| r.amount)
            .sum();
        let remaining = charge.amount_captured - charge.amount_refunded - held;
        if remaining <= 0 {
            return Err(if held > 0 {
                ServiceError::invalid_state(
                    "refund_pending",
                    format!(
                        "what remains of this charge is held by pending refunds ({held}); \
                         their outcome comes as an event"
                    ),
                )
            } else {
                ServiceError::invalid_state(
                    "charge_already_refunded",
                    "this charge is fully refunded",
                )
            });
        }
        let amount = amount.unwrap_or(remaining);
        if amount <= 0 {
            return Err(ServiceError::invalid(
                "amount",
                "invalid_amount",
                "amount must be positive",
            ));
        }
        if amount > remaining {
            let pending = if held > 0 {
                format!(" ({held} more is held by pending refunds)")
            } else {
                String::new()
            };
            return Err(ServiceError::invalid(
                "amount",
                "refund_exceeds_captured",
                format!("at most {remaining} can still be refunded{pending}"),
            ));
        }
        let money = charge_money(&charge, amount)?;
        let refund = RefundRecord {
            id: new_id("re"),
            merchant_id: charge.merchant_id.clone(),
            charge_id: charge.id.clone(),
            amount,
            status: STATUS_PENDING.to_string(),
            created_at: now(),
        };
        self.claim_charge_with(ctx, &mut charge, "charge.refund", false, Some(&refund))
            .await?;
        let reference = charge.processor_ref.clone().unwrap_or_default();
        let result = self.processor.refund(&reference, &refund.id, money).await;
        let audit = ctx.audit("charge.refund", Some(&charge.id), "success");
        self.finish_refund(charge, refund, result, audit).await
    }

    /// Stores the processor's answer to a `pending` refund with its event
    /// and `audit` entry (whose outcome and detail are filled in here): done
    /// (`charge.refunded`), or refused (the refund fails, nothing was
    /// refunded: `charge.refund_failed`, and the error `refund_failed`).
    /// An unknown outcome, or an outcome the database cannot take now,
    /// stores nothing and returns the refund still `pending`.
    async fn finish_refund(
        &self,
        mut charge: ChargeRecord,
        mut refund: RefundRecord,
        result: Result<(), ProcessorError>,
        mut audit: AuditEntry,
    ) -> ServiceResult<(ChargeRecord, RefundRecord)> {
        let refused = match result {
            Ok(()) => None,
            Err(ProcessorError::Failed(cause)) => Some(cause),
            Err(ProcessorError::Unknown(cause)) => {
                tracing::warn!(refund = %refund.id, %cause, "refund outcome unknown; left pending");
                return Ok((charge, refund));
            }
        };
        let (before, pending) = (charge.clone(), refund.clone());
        let expected = charge.version;
        next_version(&mut charge);
        let event = match &refused {
            None => {
                charge.amount_refunded += refund.amount;
                refund.status = STATUS_SUCCEEDED.to_string();
                audit.detail = Some(format!("amount={} refund={}", refund.amount, refund.id));
                self.charge_event(&charge, "charge.refunded")
            }
            Some(cause) => {
                refund.status = STATUS_FAILED.to_string();
                audit.outcome = "failure".to_string();
                audit.detail = Some(format!(
                    "amount={} refund={} refused: {cause}",
                    refund.amount, refund.id
                ));
                new_event(
                    &charge.merchant_id,
                    "charge.refund_failed",
                    &refund_object(&refund),
                )
            }
        };
        match self
            .storage
            .update_charge(&charge, expected, Some(&refund), &[event], &audit)
            .await
        {
            Ok(()) => {}
            // The processor has answered but the database is out: the
            // refund stays `pending` as stored, and reconciliation sends it
            // again (the processor answers its repeated key the same way).
            // Answered as what is stored, so no retry makes a second one.
            Err(StorageError::Unavailable(cause)) => {
                tracing::warn!(refund = %refund.id, %cause, "refund outcome not stored; left pending");
                return Ok((before, pending));
            }
            Err(e) => return Err(self.state_conflict(e)),
        }
        match refused {
            None => Ok((charge, refund)),
            Some(cause) => {
                tracing::warn!(refund = %refund.id, %cause, "the processor refused a refund");
                Err(ServiceError::invalid_state(
                    "refund_failed",
                    format!(
                        "the processor refused refund {}; nothing was refunded",
                        refund.id
                    ),
                ))
            }
        }
    }

    /// Voids an uncaptured authorization, or abandons a charge waiting for
    /// the CVV. A void is a pending action like a capture (see
    /// `capture_charge`); a repeat while it is pending sends it again.
    pub async fn cancel_charge(&self, ctx: &Context, id: &str) -> ServiceResult<ChargeRecord> {
        let mut charge = self.get_charge(ctx, id).await?;
        if charge.captured {
            return Err(ServiceError::invalid_state(
                "charge_already_captured",
                "a captured charge cannot be canceled; refund it instead",
            ));
        }
        match charge.pending_action.as_deref() {
            None | Some(ACTION_CANCEL) => {}
            Some(_) => return Err(pending_conflict(&charge)),
        }
        let awaiting_cvc = charge.status == STATUS_PENDING && charge.next_action.is_some();
        if charge.status == STATUS_SUCCEEDED {
            charge.pending_action = Some(ACTION_CANCEL.to_string());
            charge.pending_amount = None;
            self.claim_charge(ctx, &mut charge, "charge.cancel", false)
                .await?;
            let audit = ctx.audit("charge.cancel", Some(&charge.id), "success");
            return self.send_action(charge, audit).await;
        }
        if !awaiting_cvc {
            return Err(ServiceError::invalid_state(
                "charge_not_cancelable",
                "only an uncaptured authorization or a charge awaiting the CVV can be canceled",
            ));
        }
        // Nothing was authorized yet: no processor call.
        self.claim_charge(ctx, &mut charge, "charge.cancel", false)
            .await?;
        let expected = charge.version;
        charge.version += 1;
        charge.updated_at = now();
        charge.status = STATUS_CANCELED.to_string();
        charge.next_action = None;
        let event = self.charge_event(&charge, "charge.canceled");
        let audit = ctx.audit("charge.cancel", Some(&charge.id), "success");
        self.storage
            .update_charge(&charge, expected, None, &[event], &audit)
            .await
            .map_err(|e| self.state_conflict(e))?;
        Ok(charge)
    }

    pub async fn list_refunds(
        &self,
        ctx: &Context,
        charge_id: &str,
    ) -> ServiceResult<Vec<RefundRecord>> {
        Ok(self
            .storage
            .list_refunds(ctx.merchant_id(), charge_id)
            .await?)
    }
}

/// Unsettled charges (or pending refunds) read per page in a
/// reconciliation round.
const RECONCILE_PAGE: u32 = 100;

/// Runs `settle` on every object `fetch` pages through, in the order of
/// `cursor` (the page's last object's cursor fetches the next page), so
/// that objects whose processor calls keep failing cannot crowd out the
/// others. Returns how many `settle` stored.
async fn reconcile_pages<T, Page, Settled>(
    fetch: impl Fn((i64, String)) -> Page,
    cursor: impl Fn(&T) -> (i64, String),
    settle: impl Fn(T) -> Settled,
) -> ServiceResult<u64>
where
    Page: std::future::Future<Output = crate::storage::StorageResult<Vec<T>>>,
    Settled: std::future::Future<Output = ServiceResult<bool>>,
{
    let mut after = (i64::MIN, String::new());
    let mut settled = 0;
    loop {
        let page = fetch(after).await?;
        let Some(last) = page.last() else {
            return Ok(settled);
        };
        after = cursor(last);
        let full = page.len() == RECONCILE_PAGE as usize;
        for object in page {
            settled += u64::from(settle(object).await?);
        }
        if !full {
            return Ok(settled);
        }
    }
}

impl Vault {
    /// Reconciliation: asks the processor what became of charges whose
    /// outcome is unknown and that have not changed for
    /// `payments.reconcile_after_secs` (`pending` after a lost answer, or
    /// `processing` when a node stopped during the call), and stores it
    /// with its event and audit entry. A charge the processor never
    /// received fails (nothing was charged); one it cannot tell about yet
    /// is left for the next round. Nothing is ever authorized again. Safe
    /// on every node: the charge's version decides which node stores it.
    /// Returns how many charges were settled.
    pub async fn reconcile_charges(&self) -> ServiceResult<u64> {
        self.reconcile_unsettled(Unsettled::Authorization, |c| self.reconcile_charge(c))
            .await
    }

    /// Reconciliation of captures and voids still pending past
    /// `payments.reconcile_after_secs` (their answer was lost or could not
    /// be stored, or their node stopped during the call, and nobody
    /// retried them): each is sent again under its idempotency key, so the
    /// processor makes it at most once, and its outcome is stored with its
    /// event. Returns how many were settled.
    pub async fn reconcile_charge_actions(&self) -> ServiceResult<u64> {
        self.reconcile_unsettled(Unsettled::Action, |c| self.reconcile_action(c))
            .await
    }

    /// Runs `settle` on every charge of `kind` due for reconciliation.
    async fn reconcile_unsettled<Settled>(
        &self,
        kind: Unsettled,
        settle: impl Fn(ChargeRecord) -> Settled,
    ) -> ServiceResult<u64>
    where
        Settled: std::future::Future<Output = ServiceResult<bool>>,
    {
        let before = self.reconcile_cut();
        // Charges sent through another processor (the configuration
        // changed) are only that processor's to answer for.
        let processor = self.processor.name();
        reconcile_pages(
            |after: (i64, String)| async move {
                self.storage
                    .unsettled_charges(kind, processor, before, (after.0, &after.1), RECONCILE_PAGE)
                    .await
            },
            |c: &ChargeRecord| (c.updated_at, c.id.clone()),
            settle,
        )
        .await
    }

    /// Sends one pending capture or void again and stores its outcome;
    /// whether it was stored.
    async fn reconcile_action(&self, charge: ChargeRecord) -> ServiceResult<bool> {
        let event = format!(
            "charge.{}.reconcile",
            charge.pending_action.as_deref().unwrap_or_default()
        );
        let mut audit = super::audit::system_entry(&event, Some(&charge.id), "success", None);
        audit.merchant_id = Some(charge.merchant_id.clone());
        match self.send_action(charge, audit).await {
            Ok(_) => Ok(true),
            Err(ServiceError::InvalidState {
                code: "capture_failed" | "cancel_failed",
                ..
            }) => Ok(true),
            // Lost again, or the database is out: the next round.
            Err(ServiceError::Unavailable(_)) => Ok(false),
            // A retry of the request, or another node, got there first.
            Err(ServiceError::InvalidState {
                code: "charge_changed",
                ..
            }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Reconciliation of refunds still `pending` past
    /// `payments.reconcile_after_secs` (their answer was lost, or their node
    /// stopped during the call, and nobody retried them): each is sent
    /// again under its own id, which the processor takes as its
    /// idempotency key, so it is made at most once, and its outcome is
    /// stored. Returns how many refunds were settled.
    pub async fn reconcile_refunds(&self) -> ServiceResult<u64> {
        let before = self.reconcile_cut();
        let processor = self.processor.name();
        reconcile_pages(
            |after: (i64, String)| async move {
                self.storage
                    .pending_refunds(processor, before, (after.0, &after.1), RECONCILE_PAGE)
                    .await
            },
            |r: &RefundRecord| (r.created_at, r.id.clone()),
            |r| self.reconcile_refund(r),
        )
        .await
    }

    /// Objects whose last change is older than this are reconciled.
    fn reconcile_cut(&self) -> i64 {
        let wait = i64::try_from(self.payments.reconcile_after_secs).unwrap_or(i64::MAX);
        now().saturating_sub(wait)
    }

    /// Sends one pending refund again and stores its outcome; whether it
    /// was stored.
    async fn reconcile_refund(&self, refund: RefundRecord) -> ServiceResult<bool> {
        let Some(charge) = self
            .storage
            .get_charge(&refund.merchant_id, &refund.charge_id)
            .await?
        else {
            return Ok(false);
        };
        let money = charge_money(&charge, refund.amount)?;
        let reference = charge.processor_ref.clone().unwrap_or_default();
        let result = self.processor.refund(&reference, &refund.id, money).await;
        let mut audit = super::audit::system_entry(
            "charge.refund.reconcile",
            Some(&charge.id),
            "success",
            None,
        );
        audit.merchant_id = Some(charge.merchant_id.clone());
        match self.finish_refund(charge, refund, result, audit).await {
            Ok((_, r)) => Ok(r.status != STATUS_PENDING),
            Err(ServiceError::InvalidState {
                code: "refund_failed",
                ..
            }) => Ok(true),
            // Another node, or a refund of the same charge, changed the
            // charge meanwhile: the next round sends it again.
            Err(ServiceError::InvalidState {
                code: "charge_changed",
                ..
            }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Looks one charge up and stores its outcome; whether it was stored.
    async fn reconcile_charge(&self, mut charge: ChargeRecord) -> ServiceResult<bool> {
        let found = match self.processor.lookup(&charge.id).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(charge = %charge.id, error = %e, "reconciliation lookup failed");
                return Ok(false);
            }
        };
        let expected = charge.version;
        let event_type = match found {
            // The CVV, if any, is long gone: a CVV request becomes
            // `provide_cvc`, which the cardholder can still answer.
            Some(outcome) => settle(&mut charge, Ok(outcome), false),
            None => {
                next_version(&mut charge);
                charge.status = STATUS_FAILED.to_string();
                charge.failure_code = Some("processor_unavailable".to_string());
                charge.failure_message = Some(
                    "the processor never received the charge; nothing was charged".to_string(),
                );
                "charge.failed"
            }
        };
        let event = self.charge_event_with_link(&charge, event_type).await;
        let detail = format!("status={}", charge.status);
        let mut audit = super::audit::system_entry(
            "charge.reconcile",
            Some(&charge.id),
            "success",
            Some(&detail),
        );
        audit.merchant_id = Some(charge.merchant_id.clone());
        match self
            .storage
            .update_charge(&charge, expected, None, &[event], &audit)
            .await
        {
            Ok(()) => Ok(true),
            // Another node, or the merchant (a cancel), got there first.
            Err(StorageError::Conflict(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}
