-- One customer-keyed index on cards instead of two. Every card insert
-- dirtied a leaf page at a random place in the wallet index (customer,
-- merchant, seq) besides the one it dirties in the unique (customer,
-- fingerprint) index that dedupes cards; each such page is a page the
-- commit writes to the WAL and syncs. The unique index answers wallet
-- lookups and the customer-delete cascade too: its leading column is the
-- customer, and a wallet is a handful of rows to sort by seq.
DROP INDEX cards_customer_merchant_seq;

-- Deleting a card clears it as its customer's default (ON DELETE SET
-- NULL): without this index each card delete scanned every customer.
CREATE INDEX customers_default_card ON customers (default_card_id);

-- Without statistics SQLite's planner rates `merchant_id = ?` on the
-- merchant index as selective as `customer_id = ?` on the unique index,
-- and picked the merchant index for wallet lookups: a scan of all the
-- merchant's cards. These rows state what holds in any vault (a merchant
-- has many cards, a customer a few, an id or a fingerprint one) in
-- SQLite's own format: rows in the table, then rows per distinct value of
-- each leading column prefix. `ANALYZE` of the smallest index creates the
-- statistics table; its own row for cards is replaced here, and
-- `ANALYZE sqlite_schema` makes this connection load the rows (the others
-- load them with the schema this migration changes).
PRAGMA analysis_limit = 100;
ANALYZE cards_dek;
DELETE FROM sqlite_stat1 WHERE tbl = 'cards';
INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES
    ('cards', 'sqlite_autoindex_cards_1', '1000000 1'),
    ('cards', 'sqlite_autoindex_cards_2', '1000000 5 1'),
    ('cards', 'cards_merchant', '1000000 100000'),
    ('cards', 'cards_dek', '1000000 100000');
ANALYZE sqlite_schema;
