-- depends: 0003.depth-snapshots
-- Least privilege (docs/security.md). Group roles (NOLOGIN) that real login roles are granted:
--   obp_indexer  writes ingestion, projections, reconciliation, snapshots (Dagster, `orderbook ingest`)
--   obp_api      reads everything (live service, REST API)
--   obp_analyst  reads only the analytics_* views below (human units), nothing else
--   obp_user     one end user: reads only its own orders and positions, through row-level security
-- Roles are cluster-wide and many databases share a cluster, so creation is idempotent and race-tolerant;
-- this migration never drops a role. Migrations themselves run as the schema owner (`orderbook db init`).

DO $$
DECLARE r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['obp_indexer', 'obp_api', 'obp_analyst', 'obp_user'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- another database's migration created it concurrently
            END;
        END IF;
    END LOOP;
END $$;

GRANT USAGE ON SCHEMA public TO obp_indexer, obp_api, obp_analyst, obp_user;

-- Indexer: read/write rows (never DDL). New order_events partitions are made by the function below, which
-- runs as its owner, so the indexer needs no CREATE on the schema.
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO obp_indexer;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO obp_indexer;
ALTER FUNCTION ensure_order_events_partitions(bigint, bigint, bigint) SECURITY DEFINER SET search_path = public;
REVOKE EXECUTE ON FUNCTION ensure_order_events_partitions(bigint, bigint, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ensure_order_events_partitions(bigint, bigint, bigint) TO obp_indexer;

-- API: read only.
GRANT SELECT ON ALL TABLES IN SCHEMA public TO obp_api;

-- Tables created by later migrations (by the same owner) get the same grants.
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO obp_indexer;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO obp_indexer;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO obp_api;

-- Analytics views: amounts in human units (raw / 10^decimals), market names instead of ids.
CREATE VIEW analytics_trades AS
SELECT m.metric_id                                           AS market,
       t.chain_id, t.block_number, t.log_index, t.block_time, t.tx_hash,
       (t.price / power(10::numeric, m.decimals))::numeric(38, 18)    AS price,
       (t.quantity / power(10::numeric, m.decimals))::numeric(38, 18) AS quantity,
       t.buyer, t.seller
FROM trades t JOIN markets m USING (market_id);

CREATE VIEW analytics_market_daily AS
SELECT market, date_trunc('day', block_time) AS day, count(*) AS trades, sum(quantity) AS volume,
       min(price) AS low, max(price) AS high,
       CASE WHEN sum(quantity) > 0 THEN (sum(price * quantity) / sum(quantity))::numeric(38, 18) END AS vwap
FROM analytics_trades GROUP BY market, date_trunc('day', block_time);

GRANT SELECT ON analytics_trades, analytics_market_daily TO obp_analyst, obp_api;

-- Row-level security for end users (Supabase-compatible). The caller's trader address comes from, in order:
--   SET obp.trader = '0x…'                             (a backend acting for one user, per transaction)
--   request.jwt.claims ->> 'wallet_address' | 'sub'     (PostgREST/Supabase since v10: JSON of all claims)
--   request.jwt.claim.sub                               (older PostgREST: one setting per claim)
-- Unset -> NULL -> no rows. Owner sessions bypass RLS (not FORCEd): migrations, projections as owner.
CREATE FUNCTION obp_current_trader() RETURNS text LANGUAGE sql STABLE AS $$
    SELECT lower(coalesce(
        nullif(current_setting('obp.trader', true), ''),
        nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'wallet_address',
        nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub',
        nullif(current_setting('request.jwt.claim.sub', true), '')))
$$;
GRANT EXECUTE ON FUNCTION obp_current_trader() TO obp_user, obp_api, obp_indexer, obp_analyst;

GRANT SELECT ON orders, positions, markets TO obp_user;

ALTER TABLE orders ENABLE ROW LEVEL SECURITY;
ALTER TABLE positions ENABLE ROW LEVEL SECURITY;

CREATE POLICY user_reads_own_orders ON orders FOR SELECT TO obp_user USING (trader = obp_current_trader());
CREATE POLICY user_reads_own_positions ON positions FOR SELECT TO obp_user USING (trader = obp_current_trader());
CREATE POLICY api_reads_orders ON orders FOR SELECT TO obp_api USING (true);
CREATE POLICY api_reads_positions ON positions FOR SELECT TO obp_api USING (true);
CREATE POLICY indexer_writes_orders ON orders FOR ALL TO obp_indexer USING (true) WITH CHECK (true);
CREATE POLICY indexer_writes_positions ON positions FOR ALL TO obp_indexer USING (true) WITH CHECK (true);
