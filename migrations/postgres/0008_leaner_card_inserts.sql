-- Less work per card insert on PostgreSQL (see BENCHMARKS.md, item 28):
-- one index and one referential check fewer for every card.
--
-- A card's merchant is already checked through its customer: the foreign
-- key (customer_id, merchant_id) references customers (id, merchant_id),
-- whose merchant_id references merchants. The direct key to merchants only
-- repeated that check (a locking read of the merchant row) for every card
-- inserted. SQLite keeps the same redundant key: removing a constraint
-- there means rebuilding the table, and its check is an in-process index
-- lookup.
ALTER TABLE cards DROP CONSTRAINT cards_merchant_id_fkey;

-- The merchant index then serves no query but erasing a whole merchant (a
-- rare operation, which now reads the table once). It also misled the
-- planner: while the table had no statistics, a card lookup by id could
-- scan every card of the merchant through it, and with one merchant it
-- holds every card. Lookups go through the id or the customer (the wallet
-- index, which PostgreSQL keeps: it answers a wallet without a sort).
DROP INDEX cards_merchant;
