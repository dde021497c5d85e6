-- depends: 0001.core-schema
-- Reconciliation and canary rollout: what reorgs were found (and repaired), how each market's checks went per
-- block range, every status change of a market, and the rule that decides what may be published.

-- One row per reorg deeper than the confirmation depth found by reconciliation: stored (final) history that
-- the chain no longer has. Such a reorg should never happen; every row is an incident.
CREATE TABLE reorgs (
    reorg_id        bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    chain_id        bigint  NOT NULL,
    fork_block      bigint  NOT NULL,          -- lowest stored block whose hash the chain no longer has
    depth           integer NOT NULL CHECK (depth > 0),  -- stored blocks from fork_block to the highest differing one
    old_hash        text    NOT NULL,          -- our stored hash at fork_block
    new_hash        text,                      -- the chain's hash at fork_block (NULL: the chain is shorter now)
    confirmations   integer NOT NULL,          -- the configured depth this reorg exceeded
    ranges          text[]  NOT NULL,          -- affected block ranges (partition keys)
    repaired        boolean NOT NULL DEFAULT false,
    events_deleted  integer NOT NULL DEFAULT 0,
    events_inserted integer NOT NULL DEFAULT 0,
    run_id          text,
    details         jsonb   NOT NULL DEFAULT '{}',
    detected_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX reorgs_detected_idx ON reorgs (chain_id, detected_at DESC);
COMMENT ON TABLE reorgs IS 'Reorgs deeper than the confirmation depth, found by reconciliation (each one is an incident).';

CREATE TABLE market_status_history (
    id          bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    market_id   integer NOT NULL REFERENCES markets (market_id),
    from_status text,
    to_status   text    NOT NULL CHECK (to_status IN ('canary', 'active', 'paused', 'unregistered')),
    reason      text,
    changed_by  text    NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX market_status_history_market_idx ON market_status_history (market_id, changed_at DESC);
COMMENT ON TABLE market_status_history IS 'Every rollout status change of a market: who, when, from, to, why.';

-- Per market, per block range, per check: did the indexed state equal the chain / keep the invariants?
CREATE TABLE market_checks (
    market_id    integer NOT NULL REFERENCES markets (market_id),
    chain_id     bigint  NOT NULL,
    range_start  bigint  NOT NULL,
    range_end    bigint  NOT NULL,
    block_number bigint  NOT NULL,             -- the block the comparison was made at
    check_name   text    NOT NULL,
    passed       boolean NOT NULL,
    details      jsonb   NOT NULL DEFAULT '{}',
    run_id       text,
    checked_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (market_id, range_start, check_name)
);
CREATE INDEX market_checks_recent_idx ON market_checks (market_id, range_start DESC);

-- The canary threshold lives in the YAML configuration; the checks copy it here so the view can apply it.
CREATE TABLE canary_policy (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    ranges_required integer NOT NULL CHECK (ranges_required >= 1),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
INSERT INTO canary_policy (ranges_required) VALUES (3);

-- Per canary market: how many of its most recent checked ranges passed in a row, counting only checks made
-- since it (last) became a canary, so a demoted market has to earn publication again.
CREATE VIEW canary_progress AS
WITH since AS (
    SELECT m.market_id,
           (SELECT max(h.changed_at) FROM market_status_history h
             WHERE h.market_id = m.market_id AND h.to_status = 'canary') AS canary_since
    FROM markets m WHERE m.status = 'canary'
), per_range AS (
    SELECT c.market_id, c.range_start, bool_and(c.passed) AS passed
    FROM market_checks c JOIN since s USING (market_id)
    WHERE s.canary_since IS NULL OR c.checked_at >= s.canary_since
    GROUP BY c.market_id, c.range_start
), ranked AS (
    SELECT market_id, passed, row_number() OVER (PARTITION BY market_id ORDER BY range_start DESC) AS rn
    FROM per_range
)
SELECT s.market_id,
       COALESCE((SELECT min(r.rn) - 1 FROM ranked r WHERE r.market_id = s.market_id AND NOT r.passed),
                (SELECT count(*) FROM ranked r WHERE r.market_id = s.market_id)) AS consecutive_passed,
       (SELECT ranges_required FROM canary_policy) AS ranges_required
FROM since s;

-- What the API and the live service may publish: active markets, and canaries that qualified. Never paused.
CREATE VIEW publishable_markets AS
SELECT m.*
FROM markets m LEFT JOIN canary_progress p USING (market_id)
WHERE m.status = 'active'
   OR (m.status = 'canary' AND p.consecutive_passed >= p.ranges_required);
