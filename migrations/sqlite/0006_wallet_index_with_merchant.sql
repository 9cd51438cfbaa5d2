-- Listing a wallet filters on the customer and the merchant: one index
-- holding both columns, in listing order, answers it alone (the same index
-- as on PostgreSQL, whose planner otherwise also read the merchant index).
DROP INDEX cards_customer_seq;
CREATE INDEX cards_customer_merchant_seq ON cards (customer_id, merchant_id, seq);
