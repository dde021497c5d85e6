-- depends: 0005.roles-rls
-- Indexes matching the read API's sort keys (newest first by (created_block, created_log)), so a page of a
-- trader's or a market's orders is an index range scan, not a sort of every order (bench/scale_markets.py).
CREATE INDEX orders_trader_created_idx ON orders (trader, created_block DESC, created_log DESC);
CREATE INDEX orders_market_created_idx ON orders (market_id, created_block DESC, created_log DESC);
CREATE INDEX trades_market_block_idx ON trades (market_id, block_number DESC, log_index DESC);
