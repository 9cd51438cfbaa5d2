//! Hosted pages, the browser's way into the vault that keeps merchants'
//! servers out of PCI scope:
//!
//! - **Capture sessions.** A merchant's server creates one for a customer
//!   and the origin of its checkout page; the page embeds the vault's form
//!   in an iframe at the session URL. The URL carries the session id in its
//!   path and a 256-bit secret in its fragment (browsers never send a
//!   fragment to a server, so it reaches no access log, proxy or Referer);
//!   only the secret's SHA-256 is stored and it is compared in constant
//!   time. A session adds one card, once, before it expires: using it and
//!   saving the card are one transaction.
//! - **CVV re-collect links** for charges waiting with `provide_cvc`. The
//!   link is `…/hosted/cvc/{charge}#{expires}.{mac}`: an HMAC under the
//!   merchant's fingerprint key over a fixed label, the charge id and the
//!   expiry, so nothing is stored, the link can be shown again on every read
//!   of the charge, and it dies with the charge's wait for the CVV. The MAC
//!   input starts with a label that contains letters while fingerprints are
//!   taken over digit strings only, so the two uses of the key never share
//!   an input (HMAC outputs on distinct inputs are independent).
//!
//! Neither credential lets anyone read a card number: at most it adds one
//! card to one customer, or submits one CVV for one charge.

use base64::Engine as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::charges::{charge_object_with, STATUS_PENDING};
use super::tokens::check_cvc;
use super::{now, Context, Principal, ServiceError, ServiceResult, Vault};
use crate::config::{MAX_HOSTED_TTL_SECS, MIN_HOSTED_TTL_SECS};
use crate::crypto::{KeyOwner, Purpose};
use crate::domain::{is_valid_id, is_valid_secret, new_id, random_secret, Brand, Pan, WebOrigin};
use crate::storage::{
    ApiKeyKind, AuditEntry, CaptureSessionRecord, CaptureUse, CardInsert, CardRecord, ChargeRecord,
    StorageError,
};

/// Prefix of capture session secrets.
const SECRET_PREFIX: &str = "css";
/// Domain separation of CVV link MACs from card fingerprints (see the
/// module docs).
const CVC_LINK_LABEL: &[u8] = b"cardvault/hosted-cvc-link/v1";
/// CVV link expiries are rounded up to this step, so that reading a charge
/// twice in a row shows the same link.
const CVC_LINK_STEP_SECS: i64 = 300;
/// Capture sessions are kept this long after they expire, so that a late
/// use is told "expired" rather than "no such session"; then swept.
const SESSION_TOMBSTONE_SECS: i64 = 24 * 3600;
/// Who acts in the audit trail when the CVV page confirms a charge.
const CVC_PAGE_ACTOR: &str = "hosted_cvc_page";

/// Settings of the hosted pages, resolved at start-up.
#[derive(Clone, Debug)]
pub struct HostedSettings {
    /// Canonical `https://host[:port]` of this vault as browsers see it.
    pub public_url: String,
    pub capture_session_ttl_secs: u64,
    pub cvc_link_ttl_secs: u64,
}

impl Default for HostedSettings {
    fn default() -> Self {
        let cfg = crate::config::HostedConfig::default();
        HostedSettings {
            public_url: "https://127.0.0.1:8443".to_string(),
            capture_session_ttl_secs: cfg.capture_session_ttl_secs,
            cvc_link_ttl_secs: cfg.cvc_link_ttl_secs,
        }
    }
}

/// A capture session request, as parsed by the api layer.
pub struct NewCaptureSession {
    pub customer: String,
    pub allowed_origin: String,
    pub expires_in: Option<i64>,
}

/// A new session and its URL (shown once: the secret is not kept).
pub struct CreatedCaptureSession {
    pub session: CaptureSessionRecord,
    pub url: String,
}

/// Where a session stands at a given time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionState {
    Open,
    Used,
    Expired,
}

impl SessionState {
    pub fn of(s: &CaptureSessionRecord, at: i64) -> SessionState {
        if s.used_at.is_some() {
            SessionState::Used
        } else if s.expires_at <= at {
            SessionState::Expired
        } else {
            SessionState::Open
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Open => "open",
            SessionState::Used => "used",
            SessionState::Expired => "expired",
        }
    }
}

/// The public JSON of a capture session. `url` only at creation.
pub fn capture_session_object(s: &CaptureSessionRecord, url: Option<&str>) -> Value {
    let mut out = json!({
        "id": s.id,
        "object": "capture_session",
        "customer": s.customer_id,
        "allowed_origin": s.allowed_origin,
        "status": SessionState::of(s, now()).as_str(),
        "card": s.card_id,
        "created": s.created_at,
        "expires_at": s.expires_at,
    });
    if let Some(url) = url {
        out["url"] = json!(url);
    }
    out
}

/// What the capture page is rendered from.
pub struct CapturePage {
    pub state: SessionState,
    pub allowed_origin: String,
    pub merchant_name: String,
}

/// Card fields typed into the capture page. The secrets zeroize on drop.
pub struct HostedCard {
    pub number: Option<Zeroizing<String>>,
    pub exp_month: Option<i64>,
    pub exp_year: Option<i64>,
    pub cvc: Option<Zeroizing<String>>,
    pub holder_name: Option<String>,
}

fn required<T>(value: Option<T>, param: &str) -> ServiceResult<T> {
    value.ok_or_else(|| {
        ServiceError::invalid(param, "parameter_missing", format!("{param} is required"))
    })
}

/// Who is calling a hosted endpoint (no API key: the page's credential).
pub struct Caller {
    pub origin: Option<String>,
    pub request_id: String,
}

/// The outcome of a capture: the card (new, or the customer's existing
/// card with that number) and where the page may report it.
pub struct CapturedCard {
    pub card: CardRecord,
    pub created: bool,
    pub allowed_origin: String,
}

/// A CVV re-collect link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CvcLink {
    pub url: String,
    pub expires_at: i64,
}

/// What the CVV page shows: never more than brand and last four digits of
/// the card, and the payment it is for.
pub struct CvcPage {
    pub charge: ChargeRecord,
    pub brand: Brand,
    pub last4: String,
    pub merchant_name: String,
    pub awaiting_cvc: bool,
}

fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn session_closed(state: SessionState) -> ServiceError {
    match state {
        SessionState::Used => ServiceError::invalid_state(
            "capture_session_used",
            "this card form was already used; ask the merchant for a new one",
        ),
        _ => ServiceError::invalid_state(
            "capture_session_expired",
            "this card form has expired; ask the merchant for a new one",
        ),
    }
}

fn no_session() -> ServiceError {
    ServiceError::not_found("capture session", "capture_session")
}

fn no_link() -> ServiceError {
    ServiceError::not_found("payment link", "credential")
}

/// Whether `c` waits for the cardholder's CVV.
pub(crate) fn awaits_cvc(c: &ChargeRecord) -> bool {
    c.status == STATUS_PENDING && c.next_action.as_deref() == Some(super::charges::NEXT_PROVIDE_CVC)
}

impl Vault {
    /// Sets the hosted pages' settings (done once, before serving).
    pub fn set_hosted(&mut self, settings: HostedSettings) {
        self.hosted = settings;
    }

    pub fn hosted_settings(&self) -> &HostedSettings {
        &self.hosted
    }

    /// Creates a capture session for a customer of the caller's merchant.
    pub async fn create_capture_session(
        &self,
        ctx: &Context,
        new: NewCaptureSession,
    ) -> ServiceResult<CreatedCaptureSession> {
        if !is_valid_id("cus", &new.customer) {
            return Err(ServiceError::not_found("customer", "customer"));
        }
        let origin = WebOrigin::parse(new.allowed_origin.trim()).map_err(|e| {
            ServiceError::invalid(
                "allowed_origin",
                "invalid_allowed_origin",
                format!("allowed_origin {e}"),
            )
        })?;
        let ttl = match new.expires_in {
            None => i64::try_from(self.hosted.capture_session_ttl_secs).unwrap_or(900),
            Some(secs) => {
                let min = i64::try_from(MIN_HOSTED_TTL_SECS).unwrap_or(60);
                let max = i64::try_from(MAX_HOSTED_TTL_SECS).unwrap_or(3600);
                if !(min..=max).contains(&secs) {
                    return Err(ServiceError::invalid(
                        "expires_in",
                        "invalid_expires_in",
                        format!("expires_in must be between {min} and {max} seconds"),
                    ));
                }
                secs
            }
        };
        if self
            .storage
            .get_customer(ctx.merchant_id(), &new.customer)
            .await?
            .is_none()
        {
            return Err(ServiceError::not_found("customer", "customer"));
        }
        let secret = Zeroizing::new(random_secret(SECRET_PREFIX));
        let at = now();
        let session = CaptureSessionRecord {
            id: new_id("cs"),
            merchant_id: ctx.merchant_id().to_string(),
            customer_id: new.customer,
            allowed_origin: origin.to_string(),
            secret_hash: hash_secret(&secret),
            created_at: at,
            expires_at: at + ttl,
            used_at: None,
            card_id: None,
        };
        let mut audit = ctx.audit("capture_session.create", Some(&session.id), "success");
        audit.detail = Some(format!(
            "customer={} allowed_origin={} expires_at={}",
            session.customer_id, session.allowed_origin, session.expires_at
        ));
        match self.storage.insert_capture_session(&session, &audit).await {
            Err(StorageError::NotFound) => {
                return Err(ServiceError::not_found("customer", "customer"))
            }
            other => other?,
        }
        let url = format!(
            "{}/hosted/capture/{}#{}",
            self.hosted.public_url,
            session.id,
            secret.as_str()
        );
        Ok(CreatedCaptureSession { session, url })
    }

    pub async fn get_capture_session(
        &self,
        ctx: &Context,
        id: &str,
    ) -> ServiceResult<CaptureSessionRecord> {
        self.storage
            .get_capture_session(ctx.merchant_id(), id)
            .await?
            .ok_or_else(no_session)
    }

    /// What the capture page at `/hosted/capture/{id}` shows; `None` for
    /// an unknown session. Needs only the id: the page itself holds no
    /// card data, and the secret is checked when the form is sent.
    pub async fn capture_page(&self, id: &str) -> ServiceResult<Option<CapturePage>> {
        if !is_valid_id("cs", id) {
            return Ok(None);
        }
        let Some(session) = self.storage.find_capture_session(id).await? else {
            return Ok(None);
        };
        let merchant_name = self
            .storage
            .get_merchant(&session.merchant_id)
            .await?
            .map(|m| m.name)
            .unwrap_or_default();
        Ok(Some(CapturePage {
            state: SessionState::of(&session, now()),
            allowed_origin: session.allowed_origin,
            merchant_name,
        }))
    }

    /// Saves the card typed into a capture page. Card errors leave the
    /// session usable (the cardholder fixes the field and sends again);
    /// only a saved card uses it up.
    #[tracing::instrument(skip_all)]
    pub async fn capture_card(
        &self,
        caller: Caller,
        session_id: &str,
        secret: &str,
        card: HostedCard,
    ) -> ServiceResult<CapturedCard> {
        let session = self
            .authenticate_session(&caller, session_id, secret)
            .await?;
        let state = SessionState::of(&session, now());
        if state != SessionState::Open {
            return Err(session_closed(state));
        }
        let ctx = Context {
            principal: Principal {
                key_id: session.id.clone(),
                merchant_id: session.merchant_id.clone(),
                kind: ApiKeyKind::Publishable,
                scopes: Vec::new(),
            },
            origin: caller.origin,
            request_id: caller.request_id,
        };
        // Checked only now, so that without the session's secret nothing
        // about the input is answered.
        let number = required(card.number, "number")?;
        let pan = Pan::parse(&number)
            .map_err(|e| ServiceError::invalid("number", e.code(), e.to_string()))?;
        drop(number);
        let exp = super::cards::expiry(
            required(card.exp_month, "exp_month")?,
            required(card.exp_year, "exp_year")?,
        )?;
        let holder_name = super::cards::holder(card.holder_name)?;
        let brand = pan.brand();
        match &card.cvc {
            Some(cvc) => check_cvc(cvc, brand)?,
            None if brand.security_code_required() => {
                return Err(ServiceError::invalid(
                    "cvc",
                    "parameter_missing",
                    "cvc is required for this card",
                ))
            }
            None => {}
        }
        // The CVV only proves the cardholder typed a whole card; a saved
        // card never keeps one.
        drop(card.cvc);
        let record = self
            .seal_card(&ctx, &session.customer_id, &pan, exp, holder_name)
            .await?;
        drop(pan);
        let mut card_audit = ctx.audit("card.create", Some(&record.id), "success");
        card_audit.detail = Some(format!(
            "last4={} capture_session={}",
            record.last4, session.id
        ));
        let mut use_audit = ctx.audit("capture_session.use", Some(&session.id), "success");
        use_audit.detail = Some(format!(
            "customer={} last4={}",
            session.customer_id, record.last4
        ));
        let at = now();
        let outcome = self
            .storage
            .use_capture_session(&session.id, at, &record, &use_audit, &card_audit)
            .await?;
        let (card, created) = match outcome {
            CaptureUse::Saved(CardInsert::Created { .. }) => (record, true),
            CaptureUse::Saved(CardInsert::Existing(existing)) => (existing, false),
            CaptureUse::Used => return Err(session_closed(SessionState::Used)),
            CaptureUse::Expired => return Err(session_closed(SessionState::Expired)),
            CaptureUse::NotFound => return Err(no_session()),
        };
        tracing::info!(capture_session = %session.id, card = %card.id, created, "card captured");
        Ok(CapturedCard {
            card,
            created,
            allowed_origin: session.allowed_origin,
        })
    }

    /// The session behind an id and secret; a wrong secret answers exactly
    /// like an unknown session, and is audited.
    async fn authenticate_session(
        &self,
        caller: &Caller,
        session_id: &str,
        secret: &str,
    ) -> ServiceResult<CaptureSessionRecord> {
        if !is_valid_id("cs", session_id) {
            return Err(no_session());
        }
        let session = self
            .storage
            .find_capture_session(session_id)
            .await?
            .ok_or_else(no_session)?;
        let presented = hash_secret(secret);
        let ok = is_valid_secret(SECRET_PREFIX, secret)
            & bool::from(session.secret_hash.ct_eq(&presented));
        if !ok {
            let entry = AuditEntry {
                at: now(),
                actor: "anonymous".to_string(),
                merchant_id: Some(session.merchant_id.clone()),
                event: "capture_session.use".to_string(),
                resource: Some(session.id.clone()),
                outcome: "denied".to_string(),
                origin: caller.origin.clone(),
                request_id: Some(caller.request_id.clone()),
                detail: Some("reason=invalid_secret".to_string()),
            };
            if let Err(e) = self.storage.append_audit(&entry).await {
                tracing::warn!(error = %e, "could not record a refused capture session");
            }
            return Err(no_session());
        }
        Ok(session)
    }

    /// Deletes capture sessions expired for a day.
    pub async fn sweep_capture_sessions(&self) -> ServiceResult<u64> {
        Ok(self
            .storage
            .sweep_capture_sessions(now() - SESSION_TOMBSTONE_SECS)
            .await?)
    }

    // ---- CVV re-collect links ----

    async fn cvc_link_mac(
        &self,
        merchant_id: &str,
        charge_id: &str,
        expires_at: i64,
    ) -> ServiceResult<[u8; 32]> {
        let mut input = Vec::with_capacity(CVC_LINK_LABEL.len() + charge_id.len() + 24);
        input.extend_from_slice(CVC_LINK_LABEL);
        input.push(0);
        input.extend_from_slice(charge_id.as_bytes());
        input.push(0);
        input.extend_from_slice(expires_at.to_string().as_bytes());
        Ok(self
            .keyring
            .mac(
                KeyOwner::Merchant(merchant_id),
                Purpose::Fingerprint,
                &input,
            )
            .await?)
    }

    /// The CVV re-collect link of a charge waiting for the CVV (`None`
    /// otherwise), valid for at least `hosted.cvc_link_ttl_secs`.
    pub async fn cvc_link(&self, c: &ChargeRecord) -> ServiceResult<Option<CvcLink>> {
        self.cvc_link_at(c, now()).await
    }

    /// [`Vault::cvc_link`] as shown at time `at` (unix seconds).
    pub async fn cvc_link_at(&self, c: &ChargeRecord, at: i64) -> ServiceResult<Option<CvcLink>> {
        if !awaits_cvc(c) {
            return Ok(None);
        }
        let ttl = i64::try_from(self.hosted.cvc_link_ttl_secs).unwrap_or(900);
        let expires_at =
            (at + ttl).div_euclid(CVC_LINK_STEP_SECS) * CVC_LINK_STEP_SECS + CVC_LINK_STEP_SECS;
        let mac = self.cvc_link_mac(&c.merchant_id, &c.id, expires_at).await?;
        let mac = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac);
        Ok(Some(CvcLink {
            url: format!(
                "{}/hosted/cvc/{}#{expires_at}.{mac}",
                self.hosted.public_url, c.id
            ),
            expires_at,
        }))
    }

    /// [`Vault::cvc_link`] for showing a charge: a failure (an HSM outage
    /// in `hsm` mode) leaves the link out instead of failing the answer.
    pub(crate) async fn cvc_link_or_none(&self, c: &ChargeRecord) -> Option<CvcLink> {
        match self.cvc_link(c).await {
            Ok(link) => link,
            Err(e) => {
                tracing::warn!(charge = %c.id, error = %e, "CVV link unavailable");
                None
            }
        }
    }

    /// The public JSON of a charge, with the CVV page's link while the
    /// charge waits for the CVV.
    pub async fn charge_json(&self, c: &ChargeRecord) -> Value {
        let link = self.cvc_link_or_none(c).await;
        charge_object_with(c, link.as_ref())
    }

    /// The charge a CVV link credential opens: checks expiry and MAC (in
    /// constant time) before anything about the charge is read.
    async fn charge_for_link(
        &self,
        charge_id: &str,
        credential: &str,
    ) -> ServiceResult<ChargeRecord> {
        if !is_valid_id("ch", charge_id) || credential.len() > 100 {
            return Err(no_link());
        }
        let (expires, mac) = credential.split_once('.').ok_or_else(no_link)?;
        let expires_at: i64 = expires
            .parse()
            .ok()
            .filter(|_| expires.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(no_link)?;
        let presented = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(mac)
            .map_err(|_| no_link())?;
        let merchant_id = self
            .storage
            .charge_owner(charge_id)
            .await?
            .ok_or_else(no_link)?;
        let expected = self
            .cvc_link_mac(&merchant_id, charge_id, expires_at)
            .await?;
        if !bool::from(expected.as_slice().ct_eq(&presented)) {
            return Err(no_link());
        }
        if expires_at <= now() {
            return Err(ServiceError::invalid_state(
                "payment_link_expired",
                "this payment link has expired; ask the merchant for a new one",
            ));
        }
        self.storage
            .get_charge(&merchant_id, charge_id)
            .await?
            .ok_or_else(no_link)
    }

    /// What the CVV page shows for a valid link.
    pub async fn cvc_page(&self, charge_id: &str, credential: &str) -> ServiceResult<CvcPage> {
        let charge = self.charge_for_link(charge_id, credential).await?;
        let card = self
            .storage
            .get_card(&charge.merchant_id, &charge.card_id)
            .await?;
        let merchant_name = self
            .storage
            .get_merchant(&charge.merchant_id)
            .await?
            .map(|m| m.name)
            .unwrap_or_default();
        let (brand, last4) = match card {
            Some(c) => (c.brand.parse().unwrap_or(Brand::Unknown), c.last4),
            None => (Brand::Unknown, String::new()),
        };
        Ok(CvcPage {
            awaiting_cvc: awaits_cvc(&charge) && !last4.is_empty(),
            charge,
            brand,
            last4,
            merchant_name,
        })
    }

    /// Completes a charge waiting for the CVV with the CVV typed into the
    /// CVV page. The CVV lives in memory for this one processor call only.
    #[tracing::instrument(skip_all)]
    pub async fn confirm_charge_hosted(
        &self,
        caller: Caller,
        charge_id: &str,
        credential: &str,
        cvc: Zeroizing<String>,
    ) -> ServiceResult<ChargeRecord> {
        let charge = self.charge_for_link(charge_id, credential).await?;
        let ctx = Context {
            principal: Principal {
                key_id: CVC_PAGE_ACTOR.to_string(),
                merchant_id: charge.merchant_id.clone(),
                kind: ApiKeyKind::Publishable,
                scopes: Vec::new(),
            },
            origin: caller.origin,
            request_id: caller.request_id,
        };
        self.confirm_charge_with_cvc(&ctx, &charge.id, cvc).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(used: bool, expires_at: i64) -> CaptureSessionRecord {
        CaptureSessionRecord {
            id: "cs_x".into(),
            merchant_id: "mer_x".into(),
            customer_id: "cus_x".into(),
            allowed_origin: "https://shop.example".into(),
            secret_hash: [0; 32],
            created_at: 0,
            expires_at,
            used_at: used.then_some(5),
            card_id: used.then(|| "card_x".to_string()),
        }
    }

    #[test]
    fn session_states() {
        assert_eq!(
            SessionState::of(&session(false, 100), 99),
            SessionState::Open
        );
        assert_eq!(
            SessionState::of(&session(false, 100), 100),
            SessionState::Expired
        );
        assert_eq!(
            SessionState::of(&session(true, 100), 50),
            SessionState::Used
        );
        assert_eq!(
            SessionState::of(&session(true, 100), 500),
            SessionState::Used
        );
    }

    #[test]
    fn session_json_has_no_secret_and_url_only_when_given() {
        let s = session(false, i64::MAX);
        let shown = capture_session_object(&s, None);
        assert!(shown.get("url").is_none());
        assert!(shown.get("secret_hash").is_none());
        assert_eq!(shown["status"], "open");
        let shown = capture_session_object(&s, Some("https://v/hosted/capture/cs_x#css_1"));
        assert_eq!(shown["url"], "https://v/hosted/capture/cs_x#css_1");
    }
}
