"""Reconciliation: re-check stored (final) block ranges against the chain and repair what differs.

Stored ranges hold only blocks that were final when ingested, so a stored block hash the chain no longer has
is a reorg deeper than the confirmation depth: an incident, recorded in `reorgs` (one row per reorg, written by
ingestion/reorgs.py: the dry run inserts it unrepaired, the repair marks the same row repaired) and surfaced
loudly. Events
missing or extra without a hash change (a market registered late, a lost write) are repaired the same way:
the range's stored rows are deleted in one transaction and the range is ingested again with the normal
`ingest_range`, then the projections are rebuilt for every key the deleted events fed. A cap bounds how many
events one run may rewrite; above it nothing is touched and the caller fails with the numbers.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field

from sqlalchemy import Connection, Engine, text

from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.config import ProjectConfig
from orderbook_pipelines.ingestion.ingest import ingest_range
from orderbook_pipelines.ingestion.ranges import RangeNotFinal, range_key
from orderbook_pipelines.ingestion.reader import EventReader
from orderbook_pipelines.ingestion.reorgs import Reorg, find_fork
from orderbook_pipelines.ingestion.reorgs import record as record_reorg
from orderbook_pipelines.storage import checkpoints
from orderbook_pipelines.storage.checkpoints import Checkpoint
from orderbook_pipelines.storage.events import open_markets
from orderbook_pipelines.storage.projections import project_orders, project_positions

log = logging.getLogger(__name__)

_LOCK_KEY = 0x0B_5EC0  # advisory lock: one reconciliation (or repair) per database at a time


class RepairCapExceeded(RuntimeError):
    """The repair would rewrite more events than allowed: nothing was touched."""


class ReconcileBusy(RuntimeError):
    """Another reconciliation holds the lock."""


@dataclass
class RangeDiff:
    """How one stored range compares with the chain now."""

    range_start: int
    range_end: int
    processed_to: int
    stored_events: int = 0
    chain_events: int = 0
    stored_rejected: int = 0
    chain_rejected: int = 0
    missing: int = 0  # on the chain, not stored
    extra: int = 0  # stored, not on the chain (or stored with another block hash)
    bad_blocks: list[tuple[int, str, str | None]] = field(default_factory=list)  # (number, stored, chain)
    markets: dict[str, list[int]] = field(default_factory=dict)  # market_id -> [stored, chain] where they differ

    @property
    def key(self) -> str:
        return range_key(self.range_start, self.range_end)

    @property
    def mismatch(self) -> bool:
        return bool(self.bad_blocks or self.missing or self.extra)

    @property
    def rewrite_events(self) -> int:
        """Rows a repair deletes plus rows it inserts: what the cap counts."""
        return self.stored_events + self.stored_rejected + self.chain_events + self.chain_rejected


@dataclass
class ReconcileReport:
    ranges_checked: int = 0
    diffs: list[RangeDiff] = field(default_factory=list)
    repaired: bool = False
    ranges_repaired: list[str] = field(default_factory=list)
    ranges_not_final: list[str] = field(default_factory=list)
    events_deleted: int = 0
    rejected_deleted: int = 0
    events_inserted: int = 0
    orders_recomputed: int = 0
    positions_recomputed: int = 0
    reorg: Reorg | None = None

    @property
    def mismatched(self) -> list[RangeDiff]:
        return [d for d in self.diffs if d.mismatch]

    @property
    def max_reorg_depth(self) -> int:
        return self.reorg.depth if self.reorg else 0

    def metadata(self) -> dict[str, object]:
        """Flat, UI-friendly summary (Dagster metadata, CLI output)."""
        return {
            "ranges_checked": self.ranges_checked,
            "ranges_mismatched": len(self.mismatched),
            "mismatched_ranges": ", ".join(d.key for d in self.mismatched) or "-",
            "missing_events": sum(d.missing for d in self.mismatched),
            "extra_events": sum(d.extra for d in self.mismatched),
            "repaired": self.repaired,
            "ranges_repaired": len(self.ranges_repaired),
            "ranges_not_final": ", ".join(self.ranges_not_final) or "-",
            "events_deleted": self.events_deleted,
            "rejected_deleted": self.rejected_deleted,
            "events_inserted": self.events_inserted,
            "orders_recomputed": self.orders_recomputed,
            "positions_recomputed": self.positions_recomputed,
            "max_reorg_depth": self.max_reorg_depth,
            "reorg_fork_block": self.reorg.fork_block if self.reorg else -1,
        }


# -- reading ---------------------------------------------------------------------------------------------------
def _block_diffs(conn: Connection, chain: ChainClient, chain_id: int, lo: int, hi: int,
                 head: int) -> list[tuple[int, str, str | None]]:
    stored = {r.number: r.hash for r in conn.execute(
        text("SELECT number, hash FROM blocks WHERE chain_id = :c AND number BETWEEN :lo AND :hi"),
        {"c": chain_id, "lo": lo, "hi": hi},
    )}
    on_chain = chain.headers([n for n in stored if n <= head]) if stored else {}
    out: list[tuple[int, str, str | None]] = []
    for n in sorted(stored):
        new = on_chain[n].hash if n in on_chain else None
        if new != stored[n]:
            out.append((n, stored[n], new))
    return out


def diff_range(config: ProjectConfig, chain: ChainClient, conn: Connection, cp: Checkpoint, head: int,
               reader: EventReader) -> RangeDiff:
    """Compare one stored range with the chain: block hashes, then every log (decoded or rejected)."""
    cid = config.chain.chain_id
    d = RangeDiff(cp.range_start, cp.range_end, cp.processed_to)
    d.bad_blocks = _block_diffs(conn, chain, cid, cp.range_start, cp.processed_to, head)
    read = reader.read(reader.fetch(chain, cp.range_start, min(cp.processed_to, head)),
                       lambda keys: open_markets(conn, cid, keys))
    chain_rejected = {(x.pos.block_number, x.pos.log_index, x.pos.block_hash) for x in read.rejected}
    chain_events = {(r.block_number, r.log_index, r.block_hash): r.market_id for r in read.rows}
    p = {"c": cid, "s": cp.range_start, "e": cp.range_end}
    stored_events = {(r.block_number, r.log_index, r.block_hash): r.market_id for r in conn.execute(
        text("""SELECT block_number, log_index, block_hash, market_id FROM order_events
                WHERE chain_id = :c AND block_number BETWEEN :s AND :e"""), p)}
    stored_rejected = {(r.block_number, r.log_index, r.block_hash) for r in conn.execute(
        text("""SELECT block_number, log_index, block_hash FROM rejected_logs
                WHERE chain_id = :c AND block_number BETWEEN :s AND :e"""), p)}
    d.stored_events, d.chain_events = len(stored_events), len(chain_events)
    d.stored_rejected, d.chain_rejected = len(stored_rejected), len(chain_rejected)
    # A log moving between order_events and rejected_logs (configuration changed) counts on both sides.
    d.missing = len(chain_events.keys() - stored_events.keys()) + len(chain_rejected - stored_rejected)
    d.extra = len(stored_events.keys() - chain_events.keys()) + len(stored_rejected - chain_rejected)
    s_mk, c_mk = Counter(map(str, stored_events.values())), Counter(map(str, chain_events.values()))
    d.markets = {m: [s_mk[m], c_mk[m]] for m in sorted(s_mk.keys() | c_mk.keys()) if s_mk[m] != c_mk[m]}
    return d


def _reorg_of(conn: Connection, chain: ChainClient, chain_id: int, diffs: list[RangeDiff]) -> Reorg | None:
    """The reorg the differing block hashes show, its fork point found the way ingestion finds it (find_fork: the
    first range's parent block counts too), so both name the same row."""
    bad = sorted((b, d.key) for d in diffs for b in d.bad_blocks)
    if not bad:
        return None
    (fork, old, new), _ = bad[0]
    top = bad[-1][0][0]
    lower = find_fork(conn, chain, chain_id, fork)
    if lower is not None and lower.block < fork:
        fork, old, new = lower.block, lower.old_hash, lower.new_hash
    return Reorg(fork_block=fork, depth=top - fork + 1, old_hash=old, new_hash=new,
                 ranges=sorted({k for _, k in bad}))


# -- repairing -------------------------------------------------------------------------------------------------
def _delete_range(conn: Connection, chain_id: int, cp: Checkpoint) -> tuple[int, int, list, list]:
    """Delete everything stored for one range (and the projections its events fed); return what to rebuild."""
    p = {"c": chain_id, "s": cp.range_start, "e": cp.range_end}
    order_keys = [tuple(r) for r in conn.execute(
        text("""SELECT DISTINCT contract, order_id FROM order_events
                WHERE chain_id = :c AND block_number BETWEEN :s AND :e AND kind IN ('open', 'fill', 'cancel')
                  AND order_id IS NOT NULL"""), p)]
    traders = [tuple(r) for r in conn.execute(
        text("""SELECT market_id, buyer FROM trades WHERE chain_id = :c AND block_number BETWEEN :s AND :e
                UNION SELECT market_id, seller FROM trades WHERE chain_id = :c AND block_number BETWEEN :s AND :e"""),
        p)]
    conn.execute(text("DELETE FROM trades WHERE chain_id = :c AND block_number BETWEEN :s AND :e"), p)
    events = conn.execute(text("DELETE FROM order_events WHERE chain_id = :c AND block_number BETWEEN :s AND :e"),
                          p).rowcount
    rejected = conn.execute(
        text("DELETE FROM rejected_logs WHERE chain_id = :c AND block_number BETWEEN :s AND :e"), p).rowcount
    conn.execute(text("DELETE FROM blocks WHERE chain_id = :c AND number BETWEEN :s AND :e"), p)
    # The range's parent block is stored as its anchor (the reorg guard checks the range extends it). When no
    # stored range holds it (the deployment range's parent, or a range after a gap) it belongs to this range
    # alone, and a fork below the range has replaced it too: left stored, the re-ingestion would refuse.
    conn.execute(text("""DELETE FROM blocks WHERE chain_id = :c AND number = :s - 1 AND NOT EXISTS (
                             SELECT 1 FROM ingestion_checkpoints k WHERE k.chain_id = :c
                               AND k.range_start <= :s - 1 AND k.processed_to >= :s - 1)"""), p)
    conn.execute(text("DELETE FROM ingestion_checkpoints WHERE chain_id = :c AND range_start = :s"), p)
    # Depth snapshots at or above the range were built from the history being replaced: drop them (their
    # orders cascade); the next snapshot run rebuilds from an older, still valid one.
    conn.execute(text("DELETE FROM depth_snapshots WHERE block_number >= :s AND market_id IN "
                      "(SELECT market_id FROM markets WHERE chain_id = :c)"), p)
    if order_keys:
        conn.execute(
            text("""DELETE FROM orders o USING unnest(CAST(:k1 AS text[]), CAST(:k2 AS text[])) AS k(contract, oid)
                    WHERE o.chain_id = :c AND o.contract = k.contract AND o.order_id = k.oid"""),
            {"c": chain_id, "k1": [k[0] for k in order_keys], "k2": [k[1] for k in order_keys]},
        )
    if traders:
        conn.execute(
            text("""DELETE FROM positions p USING unnest(CAST(:m AS integer[]), CAST(:t AS text[])) AS k(mid, trader)
                    WHERE p.market_id = k.mid AND p.trader = k.trader"""),
            {"m": [t[0] for t in traders], "t": [t[1] for t in traders]},
        )
    return events, rejected, order_keys, traders


def _rebuild_keys(conn: Connection, chain_id: int, order_keys: list, traders: list) -> tuple[int, int]:
    """Recompute orders and positions fed by deleted events from what is stored now.

    The projections recompute every key touched in a block span; running them over one block that holds an
    event of each affected key recomputes exactly those keys (plus neighbours, harmlessly: they converge).
    Keys with no event left stay deleted, as a fresh ingestion of the new chain would have them.
    """
    o_blocks: set[int] = set()
    if order_keys:
        o_blocks = {r[0] for r in conn.execute(
            text("""SELECT min(e.block_number) FROM order_events e
                    JOIN unnest(CAST(:k1 AS text[]), CAST(:k2 AS text[])) AS k(contract, oid)
                      ON e.contract = k.contract AND e.order_id = k.oid
                    WHERE e.chain_id = :c AND e.kind IN ('open', 'fill', 'cancel')
                    GROUP BY e.contract, e.order_id"""),
            {"c": chain_id, "k1": [k[0] for k in order_keys], "k2": [k[1] for k in order_keys]},
        )}
    for b in sorted(o_blocks):
        project_orders(conn, chain_id, b, b)
    p_blocks: set[int] = set()
    if traders:
        p_blocks = {r[0] for r in conn.execute(
            text("""SELECT min(t.block_number) FROM trades t
                    JOIN unnest(CAST(:m AS integer[]), CAST(:t AS text[])) AS k(mid, trader)
                      ON t.market_id = k.mid AND (t.buyer = k.trader OR t.seller = k.trader)
                    WHERE t.chain_id = :c GROUP BY k.mid, k.trader"""),
            {"c": chain_id, "m": [t[0] for t in traders], "t": [t[1] for t in traders]},
        )}
    for b in sorted(p_blocks):
        project_positions(conn, chain_id, b, b)
    return len(o_blocks), len(p_blocks)


def _record_reorg(engine: Engine, config: ProjectConfig, report: ReconcileReport, run_id: str | None,
                  repaired: bool) -> None:
    """The reorg's one row: unrepaired when found (before any repair starts), repaired once the repair is done."""
    assert report.reorg is not None
    with engine.begin() as conn:
        record_reorg(conn, config, report.reorg, repaired=repaired,
                     events_deleted=report.events_deleted if repaired else 0,
                     events_inserted=report.events_inserted if repaired else 0, run_id=run_id,
                     details={"detected_by": "reconciliation",
                              "ranges": [asdict(d) for d in report.mismatched]})


# -- entry point -----------------------------------------------------------------------------------------------
def reconcile(config: ProjectConfig, chain: ChainClient, engine: Engine, *, start: int | None = None,
              end: int | None = None, lookback_ranges: int | None = None, repair: bool = True,
              max_repair_events: int | None = None, run_id: str | None = None) -> ReconcileReport:
    """Check stored ranges ([start, end], or the last `lookback_ranges`) against the chain; repair if asked.

    Raises RepairCapExceeded (touching no data) when the repair would rewrite more than the cap.
    A reorg found is recorded in `reorgs` (unrepaired) before anything is touched, and marked repaired after a
    successful repair; callers decide how loudly to fail.
    """
    cid = config.chain.chain_id
    rc = config.reconciliation
    cap = rc.max_repair_events if max_repair_events is None else max_repair_events
    report = ReconcileReport()
    with engine.connect() as lock_conn:
        if not lock_conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _LOCK_KEY}).scalar_one():
            raise ReconcileBusy("another reconciliation is running against this database; try again later")
        try:
            _run(config, chain, engine, report, start, end, lookback_ranges or rc.lookback_ranges, repair, cap,
                 run_id)
        finally:
            lock_conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_KEY})
            lock_conn.commit()
    log.info("reconciliation chain %s: %s", cid, report.metadata())
    return report


def _run(config: ProjectConfig, chain: ChainClient, engine: Engine, report: ReconcileReport, start: int | None,
         end: int | None, lookback: int, repair: bool, cap: int, run_id: str | None) -> None:
    cid = config.chain.chain_id
    head = chain.block_number()
    with engine.connect() as conn:
        stored = checkpoints.all_ranges(conn, cid)  # read once: the walk back below steps through it
        scope = checkpoints.in_scope(conn, cid, start, end,
                                     None if start is not None or end is not None else lookback, stored)
        reader = EventReader.load(conn, config, sync_markets=False)
        diffs = [diff_range(config, chain, conn, cp, head, reader) for cp in scope]
        # A fork that began before the scope: walk back until a range's last block agrees with the chain.
        while scope:
            before = [c for c in stored if c.range_start < scope[0].range_start]
            prev = before[-1] if before else None
            if prev is None or not _block_diffs(conn, chain, cid, prev.processed_to, prev.processed_to, head):
                break
            scope.insert(0, prev)
            diffs.insert(0, diff_range(config, chain, conn, prev, head, reader))
        report.ranges_checked = len(diffs)
        report.diffs = diffs
        report.reorg = _reorg_of(conn, chain, cid, diffs)
    bad = report.mismatched
    if not bad:
        return
    if report.reorg:
        _record_reorg(engine, config, report, run_id, repaired=False)
    total = sum(d.rewrite_events for d in bad)
    if repair and total > cap:
        raise RepairCapExceeded(
            f"repair of {len(bad)} range(s) ({', '.join(d.key for d in bad)}) would rewrite {total} events "
            f"(stored {sum(d.stored_events + d.stored_rejected for d in bad)}, on chain "
            f"{sum(d.chain_events + d.chain_rejected for d in bad)}), above the cap of {cap}; nothing was touched. "
            f"Raise reconciliation.max_repair_events or repair range by range with `orderbook reconcile`."
        )
    if repair:
        _repair_ranges(config, chain, engine, report, [Checkpoint(d.range_start, d.range_end, d.processed_to)
                                                       for d in bad], run_id)
        report.repaired = True
        if report.reorg:
            _record_reorg(engine, config, report, run_id, repaired=True)


def _repair_ranges(config: ProjectConfig, chain: ChainClient, engine: Engine, report: ReconcileReport,
                   cps: list[Checkpoint], run_id: str | None) -> None:
    """Delete every differing range, then re-ingest and re-project them, in ONE transaction (ingest_range projects
    each): a crash or an RPC failure midway leaves the old rows (and the checkpoints that make reconciliation look
    again), never a hole. All are deleted before any is ingested again: a re-ingested fill takes the market of its
    order, and a later range still holding the old branch's open of the same order id (router ids are reused across
    branches) would give it the old branch's market (found by the fork scenarios, tests/test_fork_scenarios.py)."""
    cid = config.chain.chain_id
    with engine.begin() as conn:
        deleted = [(cp, _delete_range(conn, cid, cp)) for cp in cps]
        all_keys: list = []
        all_traders: list = []
        for cp, (events, rejected, order_keys, traders) in deleted:  # ascending: each extends the previous one
            try:
                r = ingest_range(config, chain, engine, cp.range_start, cp.range_end, run_id=run_id, conn=conn)
            except RangeNotFinal:
                # The chain is now shorter than what we had stored as final: nothing of this range is final any more.
                report.ranges_not_final.append(range_key(cp.range_start, cp.range_end))
                r = None
            all_keys += order_keys
            all_traders += traders
            report.events_deleted += events
            report.rejected_deleted += rejected
            report.events_inserted += r.events_inserted if r else 0
            report.orders_recomputed += len(order_keys)
            report.positions_recomputed += len(traders)
            report.ranges_repaired.append(range_key(cp.range_start, cp.range_end))
            log.info("repaired %s: %d events deleted, %s inserted", range_key(cp.range_start, cp.range_end), events,
                     r.events_inserted if r else 0)
        o, p = _rebuild_keys(conn, cid, sorted(set(all_keys)), sorted(set(all_traders)))
    log.info("repair rebuilt orders from %d blocks and positions from %d", o, p)
