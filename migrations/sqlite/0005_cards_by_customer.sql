-- A customer's cards in insertion order (listing a wallet). Without it
-- SQLite answers `merchant_id = ? AND customer_id = ? ORDER BY seq` through
-- the merchant index, i.e. by reading every card of the merchant.
CREATE INDEX cards_customer_seq ON cards (customer_id, seq);
