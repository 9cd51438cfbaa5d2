//! One-time tokens: card data (or just a CVV for a saved card) captured by a
//! browser with the publishable key, held sealed under the merchant's
//! volatile key for at most `payments.token_ttl_secs`, and handed to exactly
//! one charge, card or verification. Taking a token removes its payload from
//! the database in the same statement that marks it used; the sweeper
//! removes the payloads of tokens nobody used.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use zeroize::{Zeroize, Zeroizing};

use super::{now, Context, ServiceError, ServiceResult, Vault};
use crate::crypto::{KeyOwner, Purpose};
use crate::domain::{new_id, Brand, Pan};
use crate::storage::{TokenRecord, TokenTake};

/// What a token is made from.
pub enum NewToken {
    /// A card typed by the cardholder.
    Card {
        number: Zeroizing<String>,
        exp_month: i64,
        exp_year: i64,
        cvc: Option<Zeroizing<String>>,
        holder_name: Option<String>,
    },
    /// A fresh CVV for a saved card of the merchant.
    Cvc {
        card_id: String,
        cvc: Zeroizing<String>,
    },
}

/// The sealed payload. Zeroized on drop.
#[derive(Serialize, Deserialize, Default)]
struct Payload {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cvc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    holder_name: Option<String>,
}

impl Drop for Payload {
    fn drop(&mut self) {
        self.number.zeroize();
        self.cvc.zeroize();
    }
}

/// What a taken token held. The secrets zeroize on drop.
pub(crate) struct TokenContents {
    pub card_id: Option<String>,
    pub number: Option<Zeroizing<String>>,
    pub cvc: Option<Zeroizing<String>>,
    pub exp_month: i64,
    pub exp_year: i64,
    pub holder_name: Option<String>,
}

/// The public JSON of a token (never its number or CVV).
pub fn token_object(t: &TokenRecord) -> Value {
    json!({
        "id": t.id,
        "object": "token",
        "type": if t.card_id.is_some() { "cvc_update" } else { "card" },
        "card": t.card_id,
        "last4": t.last4,
        "brand": t.brand,
        "exp_month": t.exp_month,
        "exp_year": t.exp_year,
        "used": t.used_at.is_some(),
        "created": t.created_at,
        "expires_at": t.expires_at,
    })
}

/// Checks a CVV's shape for the brand: digits only, the brand's length.
pub(crate) fn check_cvc(cvc: &str, brand: Brand) -> ServiceResult<()> {
    let want = usize::from(brand.security_code().length);
    let ok = cvc.len() == want && cvc.bytes().all(|b| b.is_ascii_digit());
    // Brands without a fixed rule (length 0) accept 3 or 4 digits.
    let ok = ok
        || (want == 0 && (3..=4).contains(&cvc.len()) && cvc.bytes().all(|b| b.is_ascii_digit()));
    if ok {
        Ok(())
    } else {
        Err(ServiceError::invalid(
            "cvc",
            "invalid_cvc",
            format!("cvc must be {} digits for this card", want.max(3)),
        ))
    }
}

impl Vault {
    /// Creates a one-time token.
    #[tracing::instrument(skip_all)]
    pub async fn create_token(&self, ctx: &Context, new: NewToken) -> ServiceResult<TokenRecord> {
        let id = new_id("tok");
        let created_at = now();
        let expires_at = created_at + i64::try_from(self.payments.token_ttl_secs).unwrap_or(900);
        let (payload, card_id, last4, brand, exp_month, exp_year) = match new {
            NewToken::Card {
                number,
                exp_month,
                exp_year,
                cvc,
                holder_name,
            } => {
                let pan = Pan::parse(&number)
                    .map_err(|e| ServiceError::invalid("number", e.code(), e.to_string()))?;
                drop(number);
                let exp = super::cards::expiry(exp_month, exp_year)?;
                let holder_name = super::cards::holder(holder_name)?;
                if let Some(cvc) = &cvc {
                    check_cvc(cvc, pan.brand())?;
                }
                let payload = Payload {
                    number: Some(pan.digits().to_string()),
                    cvc: cvc.as_ref().map(|c| c.to_string()),
                    holder_name,
                };
                (
                    payload,
                    None,
                    pan.last4().as_str().to_string(),
                    pan.brand().as_str().to_string(),
                    i64::from(exp.month()),
                    i64::from(exp.year()),
                )
            }
            NewToken::Cvc { card_id, cvc } => {
                let card = self
                    .storage
                    .get_card(ctx.merchant_id(), &card_id)
                    .await?
                    .ok_or_else(|| ServiceError::not_found("card", "card"))?;
                let brand = card.brand.parse::<Brand>().unwrap_or(Brand::Unknown);
                check_cvc(&cvc, brand)?;
                let payload = Payload {
                    number: None,
                    cvc: Some(cvc.to_string()),
                    holder_name: None,
                };
                (
                    payload,
                    Some(card.id),
                    card.last4,
                    card.brand,
                    card.exp_month,
                    card.exp_year,
                )
            }
        };
        let plain = Zeroizing::new(
            serde_json::to_vec(&payload).map_err(|e| ServiceError::Internal(e.to_string()))?,
        );
        drop(payload);
        let sealed = self
            .keyring
            .seal(
                KeyOwner::Merchant(ctx.merchant_id()),
                Purpose::Volatile,
                &id,
                &plain,
            )
            .await?;
        let token = TokenRecord {
            id: id.clone(),
            merchant_id: ctx.merchant_id().to_string(),
            card_id,
            payload: Some(sealed),
            last4,
            brand,
            exp_month,
            exp_year,
            created_at,
            expires_at,
            used_at: None,
        };
        let mut audit = ctx.audit("token.create", Some(&id), "success");
        audit.detail = Some(format!("last4={}", token.last4));
        self.storage.insert_token(&token, &audit).await?;
        let mut shown = token;
        shown.payload = None;
        Ok(shown)
    }

    /// Takes a token for one use: afterwards it is gone from the database
    /// and only the returned contents (zeroized on drop) hold its secrets.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn take_token(&self, ctx: &Context, id: &str) -> ServiceResult<TokenContents> {
        if !crate::domain::is_valid_id("tok", id) {
            return Err(ServiceError::invalid(
                "token",
                "token_invalid",
                "no such token",
            ));
        }
        let audit = ctx.audit("token.use", Some(id), "success");
        let token = match self
            .storage
            .take_token(ctx.merchant_id(), id, now(), &audit)
            .await?
        {
            None => {
                return Err(ServiceError::invalid(
                    "token",
                    "token_invalid",
                    "no such token",
                ))
            }
            Some(TokenTake::Used) => {
                return Err(ServiceError::invalid(
                    "token",
                    "token_already_used",
                    "this token was already used; create a new one",
                ))
            }
            Some(TokenTake::Expired) => {
                return Err(ServiceError::invalid(
                    "token",
                    "token_expired",
                    "this token has expired; create a new one",
                ))
            }
            Some(TokenTake::Taken(t)) => t,
        };
        let sealed = token
            .payload
            .as_deref()
            .ok_or_else(|| ServiceError::Internal("taken token without payload".into()))?;
        let plain = self
            .keyring
            .open(KeyOwner::Merchant(ctx.merchant_id()), &token.id, sealed)
            .await?;
        let mut payload: Payload = serde_json::from_slice(&plain)
            .map_err(|_| ServiceError::Internal("corrupt token payload".into()))?;
        Ok(TokenContents {
            card_id: token.card_id,
            number: payload.number.take().map(Zeroizing::new),
            cvc: payload.cvc.take().map(Zeroizing::new),
            exp_month: token.exp_month,
            exp_year: token.exp_year,
            holder_name: payload.holder_name.take(),
        })
    }

    /// Removes the payloads of expired tokens (run periodically).
    pub async fn sweep_tokens(&self) -> ServiceResult<u64> {
        Ok(self.storage.sweep_tokens(now()).await?)
    }

    /// Adds a card to a customer from a card token (its CVV is discarded:
    /// a CVV is never stored with a card).
    #[tracing::instrument(skip_all)]
    pub async fn add_card_from_token(
        &self,
        ctx: &Context,
        customer_id: &str,
        token_id: &str,
    ) -> ServiceResult<(super::CardView, bool)> {
        if self
            .storage
            .get_customer(ctx.merchant_id(), customer_id)
            .await?
            .is_none()
        {
            return Err(ServiceError::not_found("customer", "customer"));
        }
        let contents = self.take_token(ctx, token_id).await?;
        let Some(number) = contents.number else {
            return Err(ServiceError::invalid(
                "token",
                "token_not_a_card",
                "this token holds only a CVV; use a card token",
            ));
        };
        self.add_card(
            ctx,
            customer_id,
            super::NewCard {
                number,
                exp_month: contents.exp_month,
                exp_year: contents.exp_year,
                holder_name: contents.holder_name,
            },
        )
        .await
    }
}
