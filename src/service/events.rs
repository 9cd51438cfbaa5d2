//! Events: the outbox records written with every state change, and their
//! JSON shape (`GET /v1/events`, webhook bodies). Event data is the public
//! view of the object, which never holds a PAN or CVV.

use serde_json::{json, Value};

use super::{now, Context, ServiceError, ServiceResult, Vault};
use crate::domain::new_id;
use crate::storage::{EventRecord, Page, StorageError};

/// A new event of `event_type` about `object` (its public JSON view).
pub(crate) fn new_event(merchant_id: &str, event_type: &str, object: &Value) -> EventRecord {
    EventRecord {
        id: new_id("evt"),
        merchant_id: merchant_id.to_string(),
        event_type: event_type.to_string(),
        data: object.to_string(),
        created_at: now(),
    }
}

/// The public JSON of an event.
pub fn event_object(e: &EventRecord) -> Value {
    let object: Value = serde_json::from_str(&e.data).unwrap_or(Value::Null);
    json!({
        "id": e.id,
        "object": "event",
        "type": e.event_type,
        "created": e.created_at,
        "data": {"object": object},
    })
}

impl Vault {
    pub async fn list_events(
        &self,
        ctx: &Context,
        event_type: Option<&str>,
        limit: u32,
        starting_after: Option<&str>,
    ) -> ServiceResult<Page<EventRecord>> {
        match self
            .storage
            .list_events(ctx.merchant_id(), event_type, limit, starting_after)
            .await
        {
            Err(StorageError::NotFound) => Err(ServiceError::not_found("event", "starting_after")),
            other => Ok(other?),
        }
    }

    pub async fn get_event(&self, ctx: &Context, id: &str) -> ServiceResult<EventRecord> {
        self.storage
            .get_event(ctx.merchant_id(), id)
            .await?
            .ok_or_else(|| ServiceError::not_found("event", "event"))
    }
}
