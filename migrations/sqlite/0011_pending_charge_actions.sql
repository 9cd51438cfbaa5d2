-- A capture or a void is written on the charge as its pending action before
-- the processor is called, and cleared when the processor's answer is
-- stored. Should the answer be lost, or the node stop during the call, the
-- processor may have moved money the charge does not show yet: the request
-- answers 503, a retry sends the same operation again under its idempotency
-- key, and reconciliation (src/service/charges.rs,
-- `reconcile_charge_actions`) does so for the charges nobody retried. Only
-- such charges are in the partial index, so finding them never reads the
-- others.
ALTER TABLE charges ADD COLUMN pending_action TEXT
    CHECK (pending_action IN ('capture', 'cancel'));
ALTER TABLE charges ADD COLUMN pending_amount INTEGER
    CHECK (pending_amount > 0);
CREATE INDEX charges_pending_action ON charges (updated_at)
    WHERE pending_action IS NOT NULL;
