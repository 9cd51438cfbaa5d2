//! Customers: validation of their fields, CRUD and listing, all scoped to
//! the caller's merchant.

use super::{now, Context, ServiceError, ServiceResult, Vault};
use crate::domain::new_id;
use crate::storage::{
    Address, CustomerRecord, CustomerUpdate, Document, Metadata, Page, StorageError,
};

/// Fields of a new customer as the client sent them.
#[derive(Clone, Debug, Default)]
pub struct NewCustomer {
    pub email: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub phone: Option<String>,
    pub document: Option<Document>,
    pub billing_address: Option<Address>,
    pub metadata: Option<Metadata>,
}

pub type CustomerPage = Page<CustomerRecord>;

const MAX_NAME: usize = 100;
const MAX_METADATA_KEYS: usize = 50;

fn too_long(param: &str, max: usize) -> ServiceError {
    ServiceError::invalid(
        param,
        "parameter_too_long",
        format!("{param} must have at most {max} characters"),
    )
}

/// Trims, rejects empty and over-long text; `None` stays `None`.
fn text(param: &str, value: Option<String>, max: usize) -> ServiceResult<Option<String>> {
    match value {
        None => Ok(None),
        Some(v) => {
            let v = v.trim().to_string();
            if v.chars().count() > max {
                return Err(too_long(param, max));
            }
            if crate::domain::contains_pan_like(&v) {
                return Err(ServiceError::invalid(
                    param,
                    "card_number_in_text",
                    format!("{param} must not contain a card number"),
                ));
            }
            if v.chars().any(char::is_control) {
                return Err(ServiceError::invalid(
                    param,
                    "invalid_characters",
                    format!("{param} must not contain control characters"),
                ));
            }
            Ok(if v.is_empty() { None } else { Some(v) })
        }
    }
}

pub(crate) fn validate_email(email: &str) -> ServiceResult<String> {
    let email = email.trim();
    if email.is_empty() {
        return Err(ServiceError::invalid(
            "email",
            "parameter_missing",
            "email is required",
        ));
    }
    if email.len() > 254 {
        return Err(too_long("email", 254));
    }
    if crate::domain::contains_pan_like(email) {
        return Err(ServiceError::invalid(
            "email",
            "card_number_in_text",
            "email must not contain a card number",
        ));
    }
    let valid = match email.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && local.len() <= 64
                && !domain.contains('@')
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        }
        None => false,
    };
    if !valid {
        return Err(ServiceError::invalid(
            "email",
            "invalid_email",
            "email must be an address like name@example.com",
        ));
    }
    Ok(email.to_string())
}

fn validate_phone(phone: Option<String>) -> ServiceResult<Option<String>> {
    let phone = text("phone", phone, 30)?;
    if let Some(p) = &phone {
        let ok = p.chars().any(|c| c.is_ascii_digit())
            && p.chars()
                .all(|c| c.is_ascii_digit() || matches!(c, '+' | '-' | ' ' | '(' | ')' | '.'));
        if !ok {
            return Err(ServiceError::invalid(
                "phone",
                "invalid_phone",
                "phone may contain only digits, spaces and + - ( ) .",
            ));
        }
    }
    Ok(phone)
}

fn validate_document(doc: Option<Document>) -> ServiceResult<Option<Document>> {
    let Some(doc) = doc else { return Ok(None) };
    let doc_type = text("document.type", Some(doc.doc_type), 20)?.ok_or_else(|| {
        ServiceError::invalid(
            "document.type",
            "parameter_missing",
            "document.type is required",
        )
    })?;
    let number = text("document.number", Some(doc.number), 40)?.ok_or_else(|| {
        ServiceError::invalid(
            "document.number",
            "parameter_missing",
            "document.number is required",
        )
    })?;
    Ok(Some(Document { doc_type, number }))
}

fn validate_address(addr: Option<Address>) -> ServiceResult<Option<Address>> {
    let Some(a) = addr else { return Ok(None) };
    let country = text("billing_address.country", a.country, 2)?;
    if let Some(c) = &country {
        if c.len() != 2 || !c.chars().all(|ch| ch.is_ascii_alphabetic()) {
            return Err(ServiceError::invalid(
                "billing_address.country",
                "invalid_country",
                "billing_address.country must be a two-letter ISO 3166-1 code",
            ));
        }
    }
    Ok(Some(Address {
        line1: text("billing_address.line1", a.line1, 200)?,
        line2: text("billing_address.line2", a.line2, 200)?,
        city: text("billing_address.city", a.city, 100)?,
        state: text("billing_address.state", a.state, 100)?,
        postal_code: text("billing_address.postal_code", a.postal_code, 20)?,
        country: country.map(|c| c.to_ascii_uppercase()),
    }))
}

fn validate_metadata(meta: Option<Metadata>) -> ServiceResult<Metadata> {
    let meta = meta.unwrap_or_default();
    if meta.len() > MAX_METADATA_KEYS {
        return Err(ServiceError::invalid(
            "metadata",
            "too_many_keys",
            format!("metadata may have at most {MAX_METADATA_KEYS} keys"),
        ));
    }
    for (k, v) in &meta {
        if k.is_empty() || k.chars().count() > 40 {
            return Err(ServiceError::invalid(
                "metadata",
                "invalid_metadata_key",
                "metadata keys must have 1 to 40 characters",
            ));
        }
        if v.chars().count() > 500 {
            return Err(ServiceError::invalid(
                "metadata",
                "parameter_too_long",
                "metadata values must have at most 500 characters",
            ));
        }
    }
    Ok(meta)
}

impl Vault {
    pub async fn create_customer(
        &self,
        ctx: &Context,
        new: NewCustomer,
    ) -> ServiceResult<CustomerRecord> {
        let rec = CustomerRecord {
            id: new_id("cus"),
            merchant_id: ctx.merchant_id().to_string(),
            email: validate_email(&new.email)?,
            first_name: text("first_name", new.first_name, MAX_NAME)?,
            last_name: text("last_name", new.last_name, MAX_NAME)?,
            phone: validate_phone(new.phone)?,
            document: validate_document(new.document)?,
            billing_address: validate_address(new.billing_address)?,
            metadata: validate_metadata(new.metadata)?,
            default_card_id: None,
            created_at: now(),
        };
        let audit = ctx.audit("customer.create", Some(&rec.id), "success");
        self.storage.insert_customer(&rec, &audit).await?;
        Ok(rec)
    }

    pub async fn get_customer(&self, ctx: &Context, id: &str) -> ServiceResult<CustomerRecord> {
        self.storage
            .get_customer(ctx.merchant_id(), id)
            .await?
            .ok_or_else(|| ServiceError::not_found("customer", "id"))
    }

    /// Applies a partial update; fields absent from `update` stay as they are.
    pub async fn update_customer(
        &self,
        ctx: &Context,
        id: &str,
        mut update: CustomerUpdate,
    ) -> ServiceResult<CustomerRecord> {
        if let Some(email) = update.email.take() {
            update.email = Some(validate_email(&email)?);
        }
        if let Some(v) = update.first_name.take() {
            update.first_name = Some(text("first_name", v, MAX_NAME)?);
        }
        if let Some(v) = update.last_name.take() {
            update.last_name = Some(text("last_name", v, MAX_NAME)?);
        }
        if let Some(v) = update.phone.take() {
            update.phone = Some(validate_phone(v)?);
        }
        if let Some(v) = update.document.take() {
            update.document = Some(validate_document(v)?);
        }
        if let Some(v) = update.billing_address.take() {
            update.billing_address = Some(validate_address(v)?);
        }
        if let Some(v) = update.metadata.take() {
            update.metadata = Some(validate_metadata(Some(v))?);
        }
        match self
            .storage
            .update_customer(ctx.merchant_id(), id, &update)
            .await
        {
            Err(StorageError::NotFound) => Err(ServiceError::not_found("customer", "id")),
            other => Ok(other?),
        }
    }

    /// Deletes the customer, its cards and their ciphertext.
    pub async fn delete_customer(&self, ctx: &Context, id: &str) -> ServiceResult<()> {
        let audit = ctx.audit("customer.delete", Some(id), "success");
        let card_audit = |card: &crate::storage::CardRecord| {
            let mut e = ctx.audit("card.delete", Some(&card.id), "success");
            e.detail = Some(format!("last4={} reason=customer_deleted", card.last4));
            e
        };
        match self
            .storage
            .delete_customer(ctx.merchant_id(), id, &audit, &card_audit)
            .await
        {
            Err(StorageError::NotFound) => Err(ServiceError::not_found("customer", "id")),
            other => Ok(other?),
        }
    }

    pub async fn list_customers(
        &self,
        ctx: &Context,
        email: Option<&str>,
        limit: u32,
        starting_after: Option<&str>,
    ) -> ServiceResult<CustomerPage> {
        if !(1..=100).contains(&limit) {
            return Err(ServiceError::invalid(
                "limit",
                "invalid_limit",
                "limit must be between 1 and 100",
            ));
        }
        match self
            .storage
            .list_customers(
                ctx.merchant_id(),
                email.map(str::trim),
                limit,
                starting_after,
            )
            .await
        {
            Err(StorageError::NotFound) => {
                Err(ServiceError::not_found("customer", "starting_after"))
            }
            other => Ok(other?),
        }
    }
}
