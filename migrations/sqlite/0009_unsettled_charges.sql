-- Reconciliation (src/service/charges.rs, `reconcile_charges`) looks for
-- charges whose processor outcome is unknown: `processing` (the node
-- stopped during the processor call) or `pending` after a lost answer.
-- Only such charges are in this index, so finding them never reads the
-- settled ones; a charge enters it when written as `processing` and leaves
-- it when its outcome is stored.
CREATE INDEX charges_unsettled ON charges (updated_at)
    WHERE status IN ('processing', 'pending');
