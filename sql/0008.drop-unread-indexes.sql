-- depends: 0007.partition-race
-- Two indexes no query reads, paid for on every ingested event and every projected order (bench/backfill.py):
--   order_events_trader_idx: a trader's history is served from orders/trades, never from raw events;
--   orders_trader_idx (trader, status): superseded by orders_trader_created_idx (0006), which the read API and
--   the row-level security policy (trader = obp_current_trader()) use.
DROP INDEX IF EXISTS order_events_trader_idx;
DROP INDEX IF EXISTS orders_trader_idx;
