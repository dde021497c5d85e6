-- depends: 0009.reorg-identity
-- The order index serves the projections' lookups of an order's opens, fills and cancels (orders, fill markets,
-- repairs, open_markets): every reader filters on those kinds. Trades and the books' own events (book_add,
-- book_remove), over 40% of the real mix, no longer pay a random insert into it at ingestion (bench/realmix.py).
DROP INDEX IF EXISTS order_events_order_idx;
CREATE INDEX order_events_order_idx ON order_events (chain_id, contract, order_id)
    WHERE kind IN ('open', 'fill', 'cancel');
