-- A refund is stored `pending` before the processor is called and gets its
-- outcome when the processor answers. Reconciliation (src/service/charges.rs,
-- `reconcile_refunds`) sends again, with the same idempotency key, the
-- refunds whose answer was lost or whose node stopped during the call. Only
-- those are in this index, so finding them never reads settled refunds.
CREATE INDEX refunds_pending ON refunds (created_at) WHERE status = 'pending';
