//! Saved cards: add (parse, fingerprint, seal, store with dedupe), list,
//! get, update, delete, and reveal under the `cards:reveal` scope.

use zeroize::Zeroizing;

use super::{now, Context, Scope, ServiceError, ServiceResult, Vault};
use crate::crypto::{KeyOwner, Purpose};
use crate::domain::{new_id, year_month, Expiry, Pan};
use crate::storage::{CardInsert, CardRecord, CardUpdate, StorageError};

/// A card as the client sent it. `number` is wrapped so it zeroizes.
pub struct NewCard {
    pub number: Zeroizing<String>,
    pub exp_month: i64,
    pub exp_year: i64,
    pub holder_name: Option<String>,
}

/// A card as shown to merchants: metadata only.
#[derive(Clone, Debug)]
pub struct CardView {
    pub card: CardRecord,
    pub is_default: bool,
}

/// A revealed card. The number zeroizes on drop and never reaches a log.
pub struct RevealedCard {
    pub number: Zeroizing<String>,
    pub exp_month: i64,
    pub exp_year: i64,
}

pub(super) fn today() -> (i32, u8) {
    year_month(time::OffsetDateTime::now_utc().date())
}

pub(super) fn holder(value: Option<String>) -> ServiceResult<Option<String>> {
    match value.map(|v| v.trim().to_string()) {
        Some(v) if v.chars().count() > 100 => Err(ServiceError::invalid(
            "holder_name",
            "parameter_too_long",
            "holder_name must have at most 100 characters",
        )),
        Some(v) if v.chars().any(|c| c.is_ascii_digit() || c.is_control()) => {
            // Digits in a name are refused outright: a PAN typed into the wrong
            // field must never be stored in clear.
            Err(ServiceError::invalid(
                "holder_name",
                "invalid_holder_name",
                "holder_name must not contain digits",
            ))
        }
        Some(v) if v.is_empty() => Ok(None),
        other => Ok(other),
    }
}

fn alias(value: Option<String>) -> ServiceResult<Option<String>> {
    match value.map(|v| v.trim().to_string()) {
        Some(v) if v.chars().count() > 50 => Err(ServiceError::invalid(
            "alias",
            "parameter_too_long",
            "alias must have at most 50 characters",
        )),
        Some(v)
            if v.chars().filter(char::is_ascii_digit).count() > 4
                || v.chars().any(char::is_control) =>
        {
            Err(ServiceError::invalid(
                "alias",
                "invalid_alias",
                "alias may contain at most 4 digits",
            ))
        }
        Some(v) if v.is_empty() => Ok(None),
        other => Ok(other),
    }
}

pub(super) fn expiry(month: i64, year: i64) -> ServiceResult<Expiry> {
    Expiry::new(month, year, today()).map_err(|e| {
        let param = if matches!(e, crate::domain::ExpiryError::InvalidMonth) {
            "exp_month"
        } else {
            "exp_year"
        };
        ServiceError::invalid(param, e.code(), e.to_string())
    })
}

impl Vault {
    async fn card_view(&self, ctx: &Context, card: CardRecord) -> ServiceResult<CardView> {
        let customer = self
            .storage
            .get_customer(ctx.merchant_id(), &card.customer_id)
            .await?;
        let is_default = customer
            .and_then(|c| c.default_card_id)
            .is_some_and(|d| d == card.id);
        Ok(CardView { card, is_default })
    }

    /// Adds a card to a customer. Returns the card and whether it is new; a
    /// PAN the customer already has returns the existing card.
    #[tracing::instrument(skip_all)]
    pub async fn add_card(
        &self,
        ctx: &Context,
        customer_id: &str,
        new: NewCard,
    ) -> ServiceResult<(CardView, bool)> {
        let pan = Pan::parse(&new.number)
            .map_err(|e| ServiceError::invalid("number", e.code(), e.to_string()))?;
        drop(new.number);
        let exp = expiry(new.exp_month, new.exp_year)?;
        let holder_name = holder(new.holder_name)?;
        // Whether the customer is the merchant's is checked by the insert
        // itself (in the same transaction, so a customer deleted meanwhile
        // is caught too): a read before it would cost every card a second
        // round trip to the database for what is a client mistake.
        let card = self
            .seal_card(ctx, customer_id, &pan, exp, holder_name)
            .await?;
        drop(pan);
        let mut audit = ctx.audit("card.create", Some(&card.id), "success");
        audit.detail = Some(format!("last4={}", card.last4));
        match self.storage.insert_card(&card, &audit).await {
            Ok(CardInsert::Created { default }) => Ok((
                CardView {
                    card,
                    is_default: default,
                },
                true,
            )),
            Ok(CardInsert::Existing(existing)) => Ok((self.card_view(ctx, existing).await?, false)),
            Err(StorageError::NotFound) => Err(ServiceError::not_found("customer", "customer")),
            Err(e) => Err(e.into()),
        }
    }

    /// The record of a new card: fingerprinted and sealed under the
    /// merchant's keys, ready to insert. Nothing is written.
    #[tracing::instrument(skip_all)]
    pub(super) async fn seal_card(
        &self,
        ctx: &Context,
        customer_id: &str,
        pan: &Pan,
        exp: Expiry,
        holder_name: Option<String>,
    ) -> ServiceResult<CardRecord> {
        let fingerprint = self
            .keyring
            .fingerprint(ctx.merchant_id(), pan.digits().as_bytes())
            .await?;
        let id = new_id("card");
        let sealed = self
            .keyring
            .seal(
                KeyOwner::Merchant(ctx.merchant_id()),
                Purpose::Pan,
                &id,
                pan.digits().as_bytes(),
            )
            .await?;
        let parts = crate::crypto::record::parse(&sealed)
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        let dek_id = parts.dek_id.to_string();
        let brand = pan.brand();
        let card = CardRecord {
            id: id.clone(),
            merchant_id: ctx.merchant_id().to_string(),
            customer_id: customer_id.to_string(),
            pan_ciphertext: sealed,
            dek_id,
            fingerprint: fingerprint.to_vec(),
            bin: pan.bin().as_str().to_string(),
            last4: pan.last4().as_str().to_string(),
            pan_length: pan.len() as i64,
            brand: brand.as_str().to_string(),
            funding: brand.funding().as_str().to_string(),
            exp_month: i64::from(exp.month()),
            exp_year: i64::from(exp.year()),
            holder_name,
            alias: None,
            status: "active".to_string(),
            created_at: now(),
        };
        Ok(card)
    }

    /// A card of this customer (another customer's or merchant's is 404).
    pub async fn get_card(
        &self,
        ctx: &Context,
        customer_id: &str,
        card_id: &str,
    ) -> ServiceResult<CardView> {
        self.storage
            .get_card_view(ctx.merchant_id(), card_id)
            .await?
            .filter(|(c, _)| c.customer_id == customer_id)
            .map(|(card, is_default)| CardView { card, is_default })
            .ok_or_else(|| ServiceError::not_found("card", "card"))
    }

    async fn own_card(
        &self,
        ctx: &Context,
        customer_id: &str,
        card_id: &str,
    ) -> ServiceResult<CardRecord> {
        self.customer_card(ctx.merchant_id(), customer_id, card_id)
            .await?
            .ok_or_else(|| ServiceError::not_found("card", "card"))
    }

    /// The card if it is this customer's (and so the merchant's).
    pub(super) async fn customer_card(
        &self,
        merchant_id: &str,
        customer_id: &str,
        card_id: &str,
    ) -> ServiceResult<Option<CardRecord>> {
        Ok(self
            .storage
            .get_card(merchant_id, card_id)
            .await?
            .filter(|c| c.customer_id == customer_id))
    }

    pub async fn list_cards(
        &self,
        ctx: &Context,
        customer_id: &str,
    ) -> ServiceResult<Vec<CardView>> {
        let cards = self
            .storage
            .list_card_views(ctx.merchant_id(), customer_id)
            .await?;
        // No cards: an empty wallet, or not this merchant's customer.
        if cards.is_empty()
            && self
                .storage
                .get_customer(ctx.merchant_id(), customer_id)
                .await?
                .is_none()
        {
            return Err(ServiceError::not_found("customer", "customer"));
        }
        Ok(cards
            .into_iter()
            .map(|(card, is_default)| CardView { card, is_default })
            .collect())
    }

    /// Updates alias, holder name, expiry or makes the card the default.
    pub async fn update_card(
        &self,
        ctx: &Context,
        customer_id: &str,
        card_id: &str,
        mut update: CardUpdate,
    ) -> ServiceResult<CardView> {
        let current = self.own_card(ctx, customer_id, card_id).await?;
        if update.exp_month.is_some() || update.exp_year.is_some() {
            let month = update.exp_month.unwrap_or(current.exp_month);
            let year = update.exp_year.unwrap_or(current.exp_year);
            let exp = expiry(month, year)?;
            update.exp_month = Some(i64::from(exp.month()));
            update.exp_year = Some(i64::from(exp.year()));
        }
        if let Some(v) = update.alias.take() {
            update.alias = Some(alias(v)?);
        }
        if let Some(v) = update.holder_name.take() {
            update.holder_name = Some(holder(v)?);
        }
        let card = match self
            .storage
            .update_card(ctx.merchant_id(), card_id, &update)
            .await
        {
            Err(StorageError::NotFound) => return Err(ServiceError::not_found("card", "card")),
            other => other?,
        };
        self.card_view(ctx, card).await
    }

    pub async fn delete_card(
        &self,
        ctx: &Context,
        customer_id: &str,
        card_id: &str,
    ) -> ServiceResult<()> {
        let card = self.own_card(ctx, customer_id, card_id).await?;
        let mut audit = ctx.audit("card.delete", Some(card_id), "success");
        audit.detail = Some(format!("last4={}", card.last4));
        match self
            .storage
            .delete_card(ctx.merchant_id(), card_id, &audit)
            .await
        {
            Err(StorageError::NotFound) => Err(ServiceError::not_found("card", "card")),
            other => Ok(other?),
        }
    }

    /// Opens a card's number for a key holding `cards:reveal`. Every attempt
    /// is audited, denied ones too; the audit append must succeed before the
    /// number is returned.
    #[tracing::instrument(skip_all)]
    pub async fn reveal_card(&self, ctx: &Context, card_id: &str) -> ServiceResult<RevealedCard> {
        if !ctx.principal.has_scope(Scope::CardsReveal) {
            let entry = ctx.audit("card.reveal", Some(card_id), "denied");
            self.storage.append_audit(&entry).await?;
            return Err(ServiceError::Forbidden(Scope::CardsReveal.as_str()));
        }
        let card = self
            .storage
            .get_card(ctx.merchant_id(), card_id)
            .await?
            .ok_or_else(|| ServiceError::not_found("card", "card"))?;
        let opened = self
            .keyring
            .open(
                KeyOwner::Merchant(ctx.merchant_id()),
                &card.id,
                &card.pan_ciphertext,
            )
            .await;
        let plain = match opened {
            Ok(p) => p,
            Err(e) => {
                let mut entry = ctx.audit("card.reveal", Some(card_id), "failure");
                entry.detail = Some(format!("last4={}", card.last4));
                // The failure itself is what matters; a failed audit append
                // here must not mask it.
                let _ = self.storage.append_audit(&entry).await;
                return Err(e.into());
            }
        };
        let number = Zeroizing::new(
            String::from_utf8(plain.to_vec())
                .map_err(|_| ServiceError::Internal("sealed card is not UTF-8".into()))?,
        );
        let mut entry = ctx.audit("card.reveal", Some(card_id), "success");
        entry.detail = Some(format!("last4={}", card.last4));
        self.storage.append_audit(&entry).await?;
        Ok(RevealedCard {
            number,
            exp_month: card.exp_month,
            exp_year: card.exp_year,
        })
    }
}
