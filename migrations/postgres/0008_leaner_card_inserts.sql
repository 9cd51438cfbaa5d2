-- Less work per card insert on PostgreSQL (see BENCHMARKS.md, item 28).
--
-- The wallet index goes, as it did on SQLite in 0007: the unique
-- (customer, fingerprint) index answers wallet lookups and the
-- customer-delete cascade (its leading column is the customer, and a
-- wallet is a handful of rows to sort by seq).
DROP INDEX cards_customer_merchant_seq;

-- A card's merchant is already checked through its customer: the foreign
-- key (customer_id, merchant_id) references customers (id, merchant_id),
-- whose merchant_id references merchants. The direct key to merchants
-- only ran a second referential check (a locking read of the merchant row)
-- for every card inserted. SQLite keeps the same redundant key: removing a
-- constraint there means rebuilding the table, and its check is an
-- in-process index lookup.
ALTER TABLE cards DROP CONSTRAINT cards_merchant_id_fkey;
