"""Deep reorgs: where stored (final) history left the chain, and the one writer of the `reorgs` table.

A reorg is ONE row, keyed by (chain, fork block, our stored hash there). Ingestion's reorg guard, a
reconciliation dry run and the repair all find the fork with `find_fork` (the lowest stored block the chain no
longer has: the stored hashes are walked down until one agrees), so they write the same row: the first finder
inserts it unrepaired, the repair turns it repaired, and `obp_deep_reorgs_unrepaired` drops back to 0.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, text

from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.config import ProjectConfig
from orderbook_pipelines.ingestion.ranges import range_key
from orderbook_pipelines.storage import checkpoints

log = logging.getLogger(__name__)

_PAGE = 256  # stored block rows compared per batched header request while walking down


@dataclass
class Reorg:
    fork_block: int  # lowest stored block whose hash the chain no longer has
    depth: int  # stored blocks from fork_block to the highest differing one seen
    old_hash: str  # our stored hash at fork_block (with chain and fork_block: the reorg's identity)
    new_hash: str | None  # the chain's hash there now (None: the chain is shorter)
    ranges: list[str]


@dataclass(frozen=True)
class Fork:
    block: int
    old_hash: str
    new_hash: str | None
    highest: int  # highest differing stored block at or below where the walk started


def find_fork(conn: Connection, chain: ChainClient, chain_id: int, top: int) -> Fork | None:
    """Walk the stored block hashes down from `top` until one agrees with the chain; None if the first does.

    Stored rows include each range's parent (the block before it), so a fork below the deployment range is
    found at that parent: a repair must replace it too.
    """
    head = chain.block_number()
    lowest: tuple[int, str, str | None] | None = None
    highest: int | None = None
    below = top
    while True:
        rows = conn.execute(text("SELECT number, hash FROM blocks WHERE chain_id = :c AND number <= :b "
                                 "ORDER BY number DESC LIMIT :n"), {"c": chain_id, "b": below, "n": _PAGE}).all()
        if not rows:
            break
        on_chain = chain.headers([r.number for r in rows if r.number <= head])
        for r in rows:
            new = on_chain[r.number].hash if r.number in on_chain else None
            if new == r.hash:
                rows = []
                break
            lowest = (r.number, r.hash, new)
            highest = r.number if highest is None else highest
        if not rows:
            break
        below = rows[-1].number - 1
    if lowest is None or highest is None:
        return None
    return Fork(lowest[0], lowest[1], lowest[2], highest)


def record(conn: Connection, config: ProjectConfig, reorg: Reorg, *, repaired: bool = False,
           events_deleted: int = 0, events_inserted: int = 0, run_id: str | None = None,
           details: dict[str, Any] | None = None) -> int:
    """Insert the reorg, or update its row: depth and ranges grow, `repaired` only turns true, the repair's event
    counts add up. Returns the row's id."""
    return int(conn.execute(
        text("""INSERT INTO reorgs (chain_id, fork_block, depth, old_hash, new_hash, confirmations, ranges, repaired,
                                    repaired_at, events_deleted, events_inserted, run_id, details)
                VALUES (:c, :f, :d, :o, :n, :conf, :r, :rep, CASE WHEN :rep THEN now() END, :ed, :ei, :run,
                        CAST(:det AS jsonb))
                ON CONFLICT (chain_id, fork_block, old_hash) DO UPDATE SET
                  depth = GREATEST(reorgs.depth, EXCLUDED.depth),
                  new_hash = COALESCE(EXCLUDED.new_hash, reorgs.new_hash),
                  ranges = ARRAY(SELECT DISTINCT x FROM unnest(reorgs.ranges || EXCLUDED.ranges) AS x ORDER BY x),
                  repaired = reorgs.repaired OR EXCLUDED.repaired,
                  repaired_at = COALESCE(reorgs.repaired_at, EXCLUDED.repaired_at),
                  events_deleted = reorgs.events_deleted + EXCLUDED.events_deleted,
                  events_inserted = reorgs.events_inserted + EXCLUDED.events_inserted,
                  run_id = COALESCE(EXCLUDED.run_id, reorgs.run_id),
                  details = reorgs.details || EXCLUDED.details,
                  updated_at = now()
                RETURNING reorg_id"""),
        {"c": config.chain.chain_id, "f": reorg.fork_block, "d": reorg.depth, "o": reorg.old_hash,
         "n": reorg.new_hash, "conf": config.chain.confirmations, "r": sorted(reorg.ranges), "rep": repaired,
         "ed": events_deleted, "ei": events_inserted, "run": run_id, "det": json.dumps(details or {}, default=str)},
    ).scalar_one())


def record_detected(config: ProjectConfig, chain: ChainClient, engine: Engine, start: int, end: int,
                    run_id: str | None) -> Reorg | None:
    """Ingestion's reorg guard refused range [start, end]: record the deep reorg it ran into, if it is one.

    Best effort (the guard's error is what the caller must see): a failure here is logged, not raised. A guard
    that tripped on a block changing while the range was read (the stored history still agrees) records nothing.
    """
    cid = config.chain.chain_id
    try:
        with engine.begin() as conn:
            fork = find_fork(conn, chain, cid, end)
            if fork is None:
                return None
            # the stored ranges over the replaced blocks, less a partial one that stops below the fork
            keys = {range_key(c.range_start, c.range_end)
                    for c in checkpoints.in_scope(conn, cid, fork.block, fork.highest) if c.processed_to >= fork.block}
            reorg = Reorg(fork.block, fork.highest - fork.block + 1, fork.old_hash, fork.new_hash,
                          sorted(keys | {range_key(start, end)}))
            record(conn, config, reorg, run_id=run_id, details={"detected_by": "ingestion"})
    except Exception:
        log.exception("could not record the reorg found while ingesting %s", range_key(start, end))
        return None
    log.error("deep reorg recorded: %d stored block(s) from %d replaced (%s -> %s)", reorg.depth, reorg.fork_block,
              reorg.old_hash, reorg.new_hash)
    return reorg
