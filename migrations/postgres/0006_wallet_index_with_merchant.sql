-- Listing a wallet filters on the customer and the merchant. With an index
-- on the customer alone, PostgreSQL's planner (before the table had been
-- analyzed, and for a merchant it took to be small) ANDed it with the
-- merchant index, reading the merchant's every card on each listing: 5-9%
-- of healthz in the load run after add_card. One index holding both
-- columns, in listing order, answers it alone.
DROP INDEX cards_customer_seq;
CREATE INDEX cards_customer_merchant_seq ON cards (customer_id, merchant_id, seq);
