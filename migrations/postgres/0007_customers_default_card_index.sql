-- Deleting a card clears it as its customer's default (ON DELETE SET
-- NULL): without this index each card delete scanned every customer.
CREATE INDEX customers_default_card ON customers (default_card_id);
