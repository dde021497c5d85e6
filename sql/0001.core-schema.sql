-- Core schema: Postgres is the truth. Amounts are raw on-chain integers (NUMERIC(78,0) holds any uint256);
-- a market's `decimals` turns them into human units at read time. Never floats.

CREATE TABLE markets (
    market_id    integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    chain_id     bigint   NOT NULL,
    metric_id    text     CHECK (metric_id ~ '^[A-Z0-9_]{3,100}$'),
    metric_hash  text     CHECK (metric_hash ~ '^0x[0-9a-f]{64}$'),
    address      text     CHECK (address ~ '^0x[0-9a-f]{40}$'),
    source       text     NOT NULL,
    decimals     smallint NOT NULL DEFAULT 18 CHECK (decimals BETWEEN 0 AND 36),
    status       text     NOT NULL DEFAULT 'active'
                 CHECK (status IN ('canary', 'active', 'paused', 'unregistered')),
    discovered_block bigint,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (chain_id, address),
    UNIQUE (chain_id, metric_hash),
    CHECK (address IS NOT NULL OR metric_hash IS NOT NULL)
);
COMMENT ON TABLE markets IS 'Market registry: configured markets and markets discovered from events (status unregistered until named).';

CREATE TABLE blocks (
    chain_id     bigint NOT NULL,
    number       bigint NOT NULL,
    hash         text   NOT NULL CHECK (hash ~ '^0x[0-9a-f]{64}$'),
    parent_hash  text   NOT NULL CHECK (parent_hash ~ '^0x[0-9a-f]{64}$'),
    block_time   timestamptz NOT NULL,
    PRIMARY KEY (chain_id, number)
);
COMMENT ON TABLE blocks IS 'Every block that carried events and every range boundary: the reorg guard compares against these.';

-- Declaratively partitioned by block number: the chain's own clock (2 s blocks: 1,000,000 blocks is ~23 days).
-- The unique key is exactly (chain_id, block_number, log_index) because block_number is the partition key.
CREATE TABLE order_events (
    chain_id      bigint   NOT NULL,
    block_number  bigint   NOT NULL,
    block_hash    text     NOT NULL,
    block_time    timestamptz NOT NULL,
    tx_hash       text     NOT NULL,
    tx_index      integer  NOT NULL,
    log_index     integer  NOT NULL,
    contract      text     NOT NULL,
    market_id     integer,
    source        text     NOT NULL,
    event_name    text     NOT NULL,
    kind          text     NOT NULL CHECK (kind IN ('open','fill','cancel','trade','book_add','book_remove')),
    order_id      text,
    trader        text,
    counterparty  text,
    side          smallint CHECK (side IN (0, 1)),
    order_type    smallint,
    price         numeric(78,0) CHECK (price >= 0),
    quantity      numeric(78,0) CHECK (quantity >= 0),
    buy_order_id  text,
    sell_order_id text,
    buyer         text,
    seller        text,
    args          jsonb    NOT NULL,
    ingested_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (chain_id, block_number, log_index)
) PARTITION BY RANGE (block_number);
CREATE INDEX order_events_order_idx  ON order_events (chain_id, contract, order_id);
CREATE INDEX order_events_market_idx ON order_events (market_id, block_number);
CREATE INDEX order_events_trader_idx ON order_events (trader, block_number);

-- Creates the block-number partitions covering [from_block, to_block]; called by the writer before each load,
-- so no partition is ever made by hand and thousands of markets add no objects.
CREATE FUNCTION ensure_order_events_partitions(from_block bigint, to_block bigint, width bigint)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    lo bigint := (from_block / width) * width;
    made integer := 0;
    name text;
BEGIN
    WHILE lo <= to_block LOOP
        name := format('order_events_b%s', lpad(lo::text, 12, '0'));
        IF to_regclass(name) IS NULL THEN
            PERFORM pg_advisory_xact_lock(hashtext(name));
            IF to_regclass(name) IS NULL THEN
                EXECUTE format('CREATE TABLE %I PARTITION OF order_events FOR VALUES FROM (%s) TO (%s)',
                               name, lo, lo + width);
                made := made + 1;
            END IF;
        END IF;
        lo := lo + width;
    END LOOP;
    RETURN made;
END $$;

-- Projections. Hash-partitioned by market: a fixed number of partitions whatever the number of markets.
CREATE TABLE orders (
    market_id      integer  NOT NULL,
    chain_id       bigint   NOT NULL,
    contract       text     NOT NULL,
    order_id       text     NOT NULL,
    trader         text     NOT NULL,
    side           smallint NOT NULL,
    order_type     smallint NOT NULL,
    price          numeric(78,0) NOT NULL,
    quantity       numeric(78,0) NOT NULL,
    filled         numeric(78,0) NOT NULL,
    remaining      numeric(78,0) NOT NULL CHECK (remaining >= 0),
    status         text     NOT NULL CHECK (status IN ('open','partially_filled','filled','cancelled')),
    fill_count     integer  NOT NULL,
    created_block  bigint   NOT NULL,
    created_log    integer  NOT NULL,
    updated_block  bigint   NOT NULL,
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL,
    PRIMARY KEY (market_id, chain_id, contract, order_id)
) PARTITION BY HASH (market_id);
CREATE INDEX orders_trader_idx ON orders (trader, status);
CREATE INDEX orders_open_idx ON orders (market_id, side, price) WHERE status IN ('open', 'partially_filled');

CREATE TABLE trades (
    market_id      integer  NOT NULL,
    chain_id       bigint   NOT NULL,
    block_number   bigint   NOT NULL,
    log_index      integer  NOT NULL,
    block_hash     text     NOT NULL,
    block_time     timestamptz NOT NULL,
    tx_hash        text     NOT NULL,
    price          numeric(78,0) NOT NULL,
    quantity       numeric(78,0) NOT NULL,
    buyer          text     NOT NULL,
    seller         text     NOT NULL,
    buy_order_id   text,
    sell_order_id  text,
    PRIMARY KEY (market_id, chain_id, block_number, log_index)
) PARTITION BY HASH (market_id);
CREATE INDEX trades_time_idx ON trades (market_id, block_time);
CREATE INDEX trades_buyer_idx ON trades (buyer);
CREATE INDEX trades_seller_idx ON trades (seller);

CREATE TABLE positions (
    market_id      integer NOT NULL,
    trader         text    NOT NULL,
    net_quantity   numeric(78,0) NOT NULL,
    bought         numeric(78,0) NOT NULL,
    sold           numeric(78,0) NOT NULL,
    buy_notional   numeric NOT NULL,
    sell_notional  numeric NOT NULL,
    trade_count    integer NOT NULL,
    last_block     bigint  NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (market_id, trader)
) PARTITION BY HASH (market_id);

DO $$
BEGIN
    FOR i IN 0..15 LOOP
        EXECUTE format('CREATE TABLE orders_h%s PARTITION OF orders FOR VALUES WITH (MODULUS 16, REMAINDER %s)', i, i);
        EXECUTE format('CREATE TABLE trades_h%s PARTITION OF trades FOR VALUES WITH (MODULUS 16, REMAINDER %s)', i, i);
        EXECUTE format('CREATE TABLE positions_h%s PARTITION OF positions FOR VALUES WITH (MODULUS 16, REMAINDER %s)', i, i);
    END LOOP;
END $$;

-- Logs that did not decode or map: kept with the reason, so that nothing is lost and they can be replayed
-- once the configuration knows them.
CREATE TABLE rejected_logs (
    chain_id      bigint  NOT NULL,
    block_number  bigint  NOT NULL,
    log_index     integer NOT NULL,
    block_hash    text    NOT NULL,
    tx_hash       text    NOT NULL,
    address       text    NOT NULL,
    topics        text[]  NOT NULL,
    data          text    NOT NULL,
    reason        text    NOT NULL,
    first_seen    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (chain_id, block_number, log_index)
);

CREATE TABLE ingestion_checkpoints (
    chain_id      bigint  NOT NULL,
    range_start   bigint  NOT NULL,
    range_end     bigint  NOT NULL,
    processed_to  bigint  NOT NULL,
    last_hash     text    NOT NULL,
    events        integer NOT NULL,
    rejected      integer NOT NULL,
    run_id        text,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (chain_id, range_start),
    CHECK (processed_to BETWEEN range_start AND range_end)
);
COMMENT ON TABLE ingestion_checkpoints IS 'Per block range: how far it is durably ingested (final blocks only).';
