-- depends: 0008.drop-unread-indexes
-- One row per deep reorg, keyed by (chain, fork block, stored hash at the fork block): ingestion's guard, a
-- reconciliation dry run and the repair write the same row (ingestion/reorgs.py), so a repaired reorg no longer
-- leaves an unrepaired twin behind (obp_deep_reorgs_unrepaired stuck at 1, OBPDeepReorg firing forever).
ALTER TABLE reorgs ADD COLUMN repaired_at timestamptz,
                   ADD COLUMN updated_at  timestamptz NOT NULL DEFAULT now();

-- Fold the twins earlier versions wrote into the first row of each reorg: repaired if any of them was.
WITH twins AS (
    SELECT chain_id, fork_block, old_hash, min(reorg_id) AS keep, bool_or(repaired) AS repaired,
           max(depth) AS depth, max(events_deleted) AS deleted, max(events_inserted) AS inserted,
           max(detected_at) FILTER (WHERE repaired) AS repaired_at
    FROM reorgs GROUP BY chain_id, fork_block, old_hash HAVING count(*) > 1)
UPDATE reorgs r SET repaired = t.repaired, depth = t.depth, events_deleted = t.deleted,
                    events_inserted = t.inserted, repaired_at = t.repaired_at
FROM twins t WHERE r.reorg_id = t.keep;
DELETE FROM reorgs r USING reorgs k
WHERE k.chain_id = r.chain_id AND k.fork_block = r.fork_block AND k.old_hash = r.old_hash AND k.reorg_id < r.reorg_id;
UPDATE reorgs SET repaired_at = detected_at WHERE repaired AND repaired_at IS NULL;

CREATE UNIQUE INDEX reorgs_identity_idx ON reorgs (chain_id, fork_block, old_hash);
COMMENT ON TABLE reorgs IS 'Reorgs deeper than the confirmation depth (each one is an incident): one row per reorg, '
    'found by ingestion or reconciliation, marked repaired by the repair.';
