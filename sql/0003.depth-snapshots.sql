-- depends: 0001.core-schema
-- Depth snapshots: per market, the full book state at a block-range boundary, enough for a cold start
-- (every resting order) plus the aggregated levels and two digests. Amounts are NUMERIC / decimal strings.

CREATE TABLE depth_snapshots (
    market_id     integer NOT NULL REFERENCES markets (market_id),
    block_number  bigint  NOT NULL,
    block_hash    text    NOT NULL CHECK (block_hash ~ '^0x[0-9a-f]{64}$'),
    block_time    timestamptz NOT NULL,
    checksum      bigint  NOT NULL CHECK (checksum BETWEEN 0 AND 4294967295),  -- CRC32 of the top 25 levels
    state_hash    text    NOT NULL CHECK (state_hash ~ '^[0-9a-f]{64}$'),        -- Book.state_hash (sha256)
    orders        integer NOT NULL CHECK (orders >= 0),
    levels        jsonb   NOT NULL,  -- {"bids": [["price","quantity",orders], ...], "asks": [...]}, all levels
    base_block    bigint,            -- snapshot it was built from (NULL: full replay)
    parquet_key   text,              -- object key under the snapshot folder
    parquet_bytes bigint,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (market_id, block_number)
);
CREATE INDEX depth_snapshots_block_idx ON depth_snapshots (block_number);
COMMENT ON TABLE depth_snapshots IS 'Per market book state at range boundaries: levels, CRC32 checksum, sha256 state hash.';

CREATE TABLE snapshot_orders (
    market_id     integer NOT NULL,
    block_number  bigint  NOT NULL,
    contract      text    NOT NULL,
    order_id      text    NOT NULL,
    trader        text,
    side          smallint NOT NULL CHECK (side IN (0, 1)),
    price         numeric(78,0) NOT NULL CHECK (price > 0),
    quantity      numeric(78,0) NOT NULL CHECK (quantity > 0),
    filled        numeric(78,0) NOT NULL CHECK (filled >= 0),
    remaining     numeric(78,0) NOT NULL CHECK (remaining > 0),
    PRIMARY KEY (market_id, block_number, contract, order_id),
    FOREIGN KEY (market_id, block_number) REFERENCES depth_snapshots (market_id, block_number) ON DELETE CASCADE,
    CHECK (remaining = quantity - filled)
);
COMMENT ON TABLE snapshot_orders IS 'Every resting order of a depth snapshot: what a cold start needs to rebuild the book.';
