-- A customer's cards in insertion order (listing a wallet); keeps the
-- listing independent of how many cards the merchant has.
CREATE INDEX cards_customer_seq ON cards (customer_id, seq);
