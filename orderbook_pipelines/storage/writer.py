"""Bulk, idempotent writes of one block range: COPY into a staging table, then INSERT … ON CONFLICT DO NOTHING.

Everything for a range commits in one transaction together with its checkpoint, after the reorg guard has
compared the fetched headers with the stored ones, so a crash leaves either the whole range or none of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import psycopg
from sqlalchemy import Connection, text

from orderbook_pipelines.chain.decoding import Rejected
from orderbook_pipelines.chain.normalize import OrderEventRow
from orderbook_pipelines.chain.rpc import BlockHeader
from orderbook_pipelines.obs import Laps

_EVENT_COLUMNS = (
    "chain_id", "block_number", "block_hash", "block_time", "tx_hash", "tx_index", "log_index", "contract",
    "market_id", "source", "event_name", "kind", "order_id", "trader", "counterparty", "side", "order_type",
    "price", "quantity", "buy_order_id", "sell_order_id", "buyer", "seller", "args",
)


ANALYZE_AFTER_ROWS = 50_000
# The columns the projections filter, join and group on: their statistics decide the plans. (All columns
# would cost 3x more per ANALYZE, mostly on the jsonb `args`; autovacuum analyzes the rest in time.)
_PLANNED_COLUMNS = "chain_id, block_number, kind, contract, order_id, market_id"


class ReorgDetected(RuntimeError):
    """The chain no longer agrees with what is stored (or changed while we read it): nothing was written."""


@dataclass
class RangeWrite:
    chain_id: int
    range_start: int
    range_end: int
    processed_to: int
    headers: dict[int, BlockHeader]
    events: list[OrderEventRow]
    rejected: list[Rejected] = field(default_factory=list)
    run_id: str | None = None


@dataclass(frozen=True)
class WriteResult:
    events_inserted: int
    rejected_inserted: int
    blocks_inserted: int
    partitions_created: int
    seconds: dict[str, float] = field(default_factory=dict)  # guard, events, rest, analyze


def check_against_stored(conn: Connection, chain_id: int, start: int, headers: dict[int, BlockHeader]) -> None:
    """Refuse to write a forked history: stored hashes must match, and the range must extend the stored parent."""
    lo, hi = min(headers), max(headers)
    stored = {
        r.number: r.hash
        for r in conn.execute(
            text("SELECT number, hash FROM blocks WHERE chain_id = :c AND number BETWEEN :lo AND :hi"),
            {"c": chain_id, "lo": lo - 1, "hi": hi},
        )
    }
    for n, h in sorted(headers.items()):
        if n in stored and stored[n] != h.hash:
            raise ReorgDetected(
                f"block {n}: stored hash {stored[n]} but the chain now has {h.hash}; the stored history was "
                f"reorganised away. Nothing was written; run reconciliation for the ranges from block {n}."
            )
    first = headers.get(start)
    if first is not None and start - 1 in stored and stored[start - 1] != first.parent_hash:
        raise ReorgDetected(
            f"block {start}: parent hash {first.parent_hash} does not match stored block {start - 1} "
            f"({stored[start - 1]}); the previous range is on another fork. Nothing was written."
        )


def check_logs_consistent(events: Iterable[OrderEventRow], rejected: Iterable[Rejected],
                          headers: dict[int, BlockHeader]) -> None:
    """Logs and headers come from separate calls; if the chain moved between them, they disagree."""
    for n, h in ((e.block_number, e.block_hash) for e in events):
        if headers[n].hash != h:
            raise ReorgDetected(f"block {n} changed while the range was read (log hash {h}, header {headers[n].hash})")
    for r in rejected:
        n = r.pos.block_number
        if n in headers and headers[n].hash != r.pos.block_hash:
            raise ReorgDetected(f"block {n} changed while the range was read")


def write_range(conn: Connection, w: RangeWrite, partition_width: int) -> WriteResult:
    laps = Laps()
    check_logs_consistent(w.events, w.rejected, w.headers)
    check_against_stored(conn, w.chain_id, w.range_start, w.headers)
    made = conn.execute(
        text("SELECT ensure_order_events_partitions(:a, :b, :w)"),
        {"a": w.range_start, "b": w.processed_to, "w": partition_width},
    ).scalar_one()
    block_time = {n: _ts(h.timestamp) for n, h in w.headers.items()}  # converted once per block, not per row

    raw = conn.connection.driver_connection  # psycopg 3 connection, same transaction as `conn`
    assert raw is not None
    laps.lap("guard")
    with raw.cursor() as cur:
        inserted = _insert_events(raw, cur, w, block_time)
        laps.lap("events")
        rejected_inserted = 0
        if w.rejected:
            cur.executemany(
                "INSERT INTO rejected_logs (chain_id, block_number, log_index, block_hash, tx_hash, address, "
                "topics, data, reason) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                [(w.chain_id, r.pos.block_number, r.pos.log_index, r.pos.block_hash, r.pos.tx_hash, r.pos.address,
                  list(r.topics), r.data, r.reason) for r in w.rejected],
            )
            rejected_inserted = max(cur.rowcount, 0)
        cur.executemany(
            "INSERT INTO blocks (chain_id, number, hash, parent_hash, block_time) VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT (chain_id, number) DO NOTHING",
            [(w.chain_id, h.number, h.hash, h.parent_hash, _ts(h.timestamp)) for h in w.headers.values()],
        )
        blocks_inserted = max(cur.rowcount, 0)
        last = w.headers[w.processed_to]
        cur.execute(
            """INSERT INTO ingestion_checkpoints (chain_id, range_start, range_end, processed_to, last_hash, events,
                                                  rejected, run_id)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (chain_id, range_start) DO UPDATE SET
                 processed_to = GREATEST(ingestion_checkpoints.processed_to, EXCLUDED.processed_to),
                 last_hash = CASE WHEN EXCLUDED.processed_to >= ingestion_checkpoints.processed_to
                                  THEN EXCLUDED.last_hash ELSE ingestion_checkpoints.last_hash END,
                 events = EXCLUDED.events, rejected = EXCLUDED.rejected, run_id = EXCLUDED.run_id,
                 updated_at = now()""",
            (w.chain_id, w.range_start, w.range_end, w.processed_to, last.hash, len(w.events), len(w.rejected),
             w.run_id),
        )
    laps.lap("rest")
    if made or inserted >= ANALYZE_AFTER_ROWS:
        _analyze_grown(conn, w.range_start, w.processed_to, partition_width, inserted)
        laps.lap("analyze")
    return WriteResult(inserted, rejected_inserted, blocks_inserted, int(made), laps.seconds)


def _analyze_grown(conn: Connection, start: int, end: int, width: int, inserted: int) -> None:
    """Fresh statistics for partitions this load created or at least doubled.

    A partition created (or grown) by this load has no statistics yet; the projections that follow in the same
    run would be planned blind (a nested loop, quadratic in the range). Stale-but-proportional statistics are
    fine (the planner scales them by the partition's current size), so a partition that grows by less than its
    own size is left to autovacuum: a long backfill analyzes a partition a few times, not once per range.
    """
    lo = (start // width) * width
    names = [f"order_events_b{base:012d}" for base in range(lo, end + 1, width)]
    tuples: dict[str, float] = dict(conn.execute(
        text("SELECT relname, reltuples FROM pg_class WHERE relname = ANY(:n)"), {"n": names}).all())
    for name in names:
        if tuples.get(name, -1) < max(inserted, 1):  # never analyzed (-1), empty, or doubled by this load
            conn.exec_driver_sql(f"ANALYZE {name} ({_PLANNED_COLUMNS})")


def _event_rows(w: RangeWrite, block_time: dict[int, str]) -> Iterator[tuple]:
    for e in w.events:
        yield (e.chain_id, e.block_number, e.block_hash, block_time[e.block_number], e.tx_hash, e.tx_index,
               e.log_index, e.contract, e.market_id, e.source, e.event_name, e.kind, e.order_id, e.trader,
               e.counterparty, e.side, e.order_type, e.price, e.quantity, e.buy_order_id, e.sell_order_id, e.buyer,
               e.seller, e.args)


def _insert_events(raw: psycopg.Connection, cur: psycopg.Cursor, w: RangeWrite, block_time: dict[int, str]) -> int:
    """Rows inserted. A range with nothing stored yet (every first backfill) is COPYed straight into
    `order_events`; a rerun, a repair or a concurrent twin goes through staging and ON CONFLICT DO NOTHING.

    The direct COPY writes each row once instead of twice; if a concurrent run of the same range committed
    first, its unique violation rolls back only the savepoint and the staged path takes over.
    """
    if not w.events:
        return 0
    cols = ", ".join(_EVENT_COLUMNS)
    stored = cur.execute(
        "SELECT EXISTS (SELECT 1 FROM order_events WHERE chain_id = %s AND block_number BETWEEN %s AND %s)",
        (w.chain_id, w.range_start, w.processed_to),
    ).fetchone()
    if stored is not None and not stored[0]:
        try:
            with raw.transaction(), cur.copy(f"COPY order_events ({cols}) FROM STDIN") as copy:
                for row in _event_rows(w, block_time):
                    copy.write_row(row)
            return len(w.events)
        except psycopg.errors.UniqueViolation:
            pass  # a concurrent ingestion of this range committed first: fall through to the staged path
    cur.execute("CREATE TEMP TABLE IF NOT EXISTS stage_order_events "
                "(LIKE order_events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
    cur.execute("TRUNCATE stage_order_events")
    with cur.copy(f"COPY stage_order_events ({cols}) FROM STDIN") as copy:
        for row in _event_rows(w, block_time):
            copy.write_row(row)
    cur.execute(
        f"INSERT INTO order_events ({cols}) SELECT {cols} FROM stage_order_events "
        "ON CONFLICT (chain_id, block_number, log_index) DO NOTHING"
    )
    return cur.rowcount


def _ts(unix: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(unix, UTC).isoformat()
