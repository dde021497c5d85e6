"""Bulk, idempotent writes of one block range (`EventSink`): its events COPYed window by window as they are read,
then the reorg guard, rejected logs, blocks and the checkpoint.

Everything for a range commits in one transaction together with its checkpoint, and the guard runs before that
commit, so a crash or a forked history leaves either the whole range or none of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psycopg
from psycopg.types.json import set_json_dumps
from sqlalchemy import Connection, text

from orderbook_pipelines.chain.decoding import Rejected
from orderbook_pipelines.chain.normalize import OrderEventRow
from orderbook_pipelines.chain.rpc import BlockHeader
from orderbook_pipelines.obs import Laps
from orderbook_pipelines.storage.db import local_setting

_EVENT_COLUMNS = (
    "chain_id", "block_number", "block_hash", "block_time", "tx_hash", "tx_index", "log_index", "contract",
    "market_id", "source", "event_name", "kind", "order_id", "trader", "counterparty", "side", "order_type",
    "price", "quantity", "buy_order_id", "sell_order_id", "buyer", "seller", "args",
)
_COLUMNS = ", ".join(_EVENT_COLUMNS)
# The events are COPYed in binary: Postgres stores a row in about 15% less time than from text (no parsing of
# numbers, times and escapes; 0.71-0.73 against 0.84-0.85 s of backend CPU per 95k events), and formatting it costs
# this process less too. `args` goes as the JSON text normalize wrote (set_json_dumps in EventSink).
_EVENT_TYPES = (
    "bigint", "bigint", "text", "timestamptz", "text", "integer", "integer", "text", "integer", "text", "text", "text",
    "text", "text", "text", "smallint", "smallint", "numeric", "numeric", "text", "text", "text", "text", "jsonb",
)


ANALYZE_AFTER_ROWS = 50_000
# The columns the projections filter, join and group on: their statistics decide the plans. (All columns
# would cost 3x more per ANALYZE, mostly on the jsonb `args`; autovacuum analyzes the rest in time.)
_PLANNED_COLUMNS = "chain_id, block_number, kind, contract, order_id, market_id"
# These statistics are for the plans of the projections that follow, not for analysts' queries: a sample of 3,000
# rows (target 10) gives them the row count, the distinct orders and the kinds as 30,000 rows (the default 100)
# do, in a tenth of the time (14 against 140 ms for a 95k-event partition, the end of the range's critical path).
# Autovacuum analyzes again at the server's target once the partition has grown by a tenth.
_PLANNING_STATISTICS_TARGET = 10


class ReorgDetected(RuntimeError):
    """The chain no longer agrees with what is stored (or changed while we read it): nothing was written."""


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


def ensure_partitions(conn: Connection, start: int, end: int, width: int) -> int:
    """Create the `order_events` partitions of [start, end] that do not exist yet; returns how many were made.

    Creating a partition locks the parent table until the transaction ends: ingestion does it in a transaction
    of its own that commits at once, so a concurrent range does not wait for this range's whole transaction.
    """
    made = conn.execute(text("SELECT ensure_order_events_partitions(:a, :b, :w)"),
                        {"a": start, "b": end, "w": width}).scalar_one()
    return int(made or 0)


class EventSink:
    """A range's events, streamed into `order_events` window by window inside the range's transaction, then the
    rest of the range (rejected logs, blocks, checkpoint) once every window is in (`finish`).

    Postgres stores one window while this process decodes the next (one COPY stays open across windows), and
    nothing is visible before the transaction commits. The reorg guard runs in `finish`, before anything else is
    written: a forked history rolls the whole transaction back, events included.

    A range with nothing stored yet (every first backfill) is COPYed straight into `order_events`; a rerun, a
    repair or a concurrent twin goes through staging and ON CONFLICT DO NOTHING. If a concurrent run of the same
    range commits first, the direct COPY's unique violation rolls back only its savepoint and the rows it held
    are staged instead.
    """

    def __init__(self, conn: Connection, chain_id: int, start: int, processed_to: int, partition_width: int,
                 partitions_made: int) -> None:
        """The caller made the range's partitions first (`ensure_partitions`, in a transaction of its own) and says
        how many were new: those get fresh statistics in `finish`."""
        self.conn, self.chain_id, self.start, self.processed_to = conn, chain_id, start, processed_to
        self.width = partition_width
        self.laps = Laps()
        self.made = partitions_made
        raw = conn.connection.driver_connection  # psycopg 3 connection, same transaction as `conn`
        assert raw is not None
        self.cur: psycopg.Cursor = raw.cursor()
        set_json_dumps(str, context=self.cur)  # `args` is JSON text already: sent as it is
        stored = self.cur.execute(
            "SELECT EXISTS (SELECT 1 FROM order_events WHERE chain_id = %s AND block_number BETWEEN %s AND %s)",
            (chain_id, start, processed_to),
        ).fetchone()
        self.direct = stored is not None and not stored[0]
        # Block times of every header `add` was given, converted once per block: the rows', the blocks' and the
        # in-memory projection's (`WrittenRange`).
        self.block_dt: dict[int, datetime] = {}
        self.events: list[OrderEventRow] = []
        self.inserted = 0
        self._copy: psycopg.Copy | None = None
        self._open = contextlib.ExitStack()  # holds the COPY's context manager: it ends the COPY
        self._segment = 0  # index in `events` of the first row of the open COPY
        self.laps.lap("guard")

    @property
    def fresh(self) -> bool:
        """Every stored event of the range is one this sink wrote (nothing was stored before it; no twin)."""
        return self.direct

    def add(self, rows: list[OrderEventRow], headers: dict[int, BlockHeader]) -> None:
        """One window's rows (its blocks' headers give their block time)."""
        self.laps.skip()
        self.block_dt.update((n, _block_dt(h.timestamp)) for n, h in headers.items())
        self.events += rows
        if rows:
            try:
                self._write(rows)
            except psycopg.errors.UniqueViolation:
                self._restage()
        self.laps.lap("events")

    def pause(self) -> None:
        """End the open COPY, so that other statements can run on this connection (market discovery)."""
        if self._copy is None:
            return
        self.laps.skip()
        self._copy = None
        try:
            self._open.close()
        except psycopg.errors.UniqueViolation:
            self._restage(closed=True)  # the rows are now in a staged COPY: end that one
            self.pause()
            return
        if self.direct:
            self.cur.execute("RELEASE SAVEPOINT obp_direct")
            self.inserted += len(self.events) - self._segment
        else:
            self.cur.execute(f"INSERT INTO order_events ({_COLUMNS}) SELECT {_COLUMNS} FROM stage_order_events "
                             "ON CONFLICT (chain_id, block_number, log_index) DO NOTHING")
            self.inserted += max(self.cur.rowcount, 0)
        self._segment = len(self.events)
        self.laps.lap("events")

    def _write(self, rows: list[OrderEventRow]) -> None:
        if self._copy is None:
            if self.direct:
                self.cur.execute("SAVEPOINT obp_direct")
                sql = f"COPY order_events ({_COLUMNS}) FROM STDIN (FORMAT BINARY)"
            else:
                sql = f"COPY {stage(self.cur, 'order_events')} ({_COLUMNS}) FROM STDIN (FORMAT BINARY)"
            self._copy = self._open.enter_context(self.cur.copy(sql))
            self._copy.set_types(_EVENT_TYPES)
        copy, block_time = self._copy, self.block_dt
        for e in rows:
            copy.write_row((e.chain_id, e.block_number, e.block_hash, block_time[e.block_number], e.tx_hash,
                            e.tx_index, e.log_index, e.contract, e.market_id, e.source, e.event_name, e.kind,
                            e.order_id, e.trader, e.counterparty, e.side, e.order_type, e.price, e.quantity,
                            e.buy_order_id, e.sell_order_id, e.buyer, e.seller, e.args))

    def _restage(self, closed: bool = False) -> None:
        """A concurrent ingestion of this range committed first: undo the direct COPY, stage its rows instead."""
        if self._copy is not None and not closed:
            _fail(self._open, "a concurrent ingestion of this range committed first")
        self._copy = None
        self.cur.execute("ROLLBACK TO SAVEPOINT obp_direct")
        self.cur.execute("RELEASE SAVEPOINT obp_direct")
        self.direct = False
        self._write(self.events[self._segment:])

    def finish(self, range_end: int, headers: dict[int, BlockHeader], rejected: list[Rejected],
               run_id: str | None) -> WriteResult:
        """The rest of the range, after the guard: rejected logs, blocks, checkpoint (and fresh statistics).
        `headers`: every header the windows gave `add`."""
        self.pause()
        self.laps.skip()
        check_logs_consistent(self.events, rejected, headers)
        check_against_stored(self.conn, self.chain_id, self.start, headers)
        self.laps.lap("guard")
        cur = self.cur
        rejected_inserted = 0
        if rejected:
            cur.executemany(
                "INSERT INTO rejected_logs (chain_id, block_number, log_index, block_hash, tx_hash, address, "
                "topics, data, reason) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                [(self.chain_id, r.pos.block_number, r.pos.log_index, r.pos.block_hash, r.pos.tx_hash, r.pos.address,
                  list(r.topics), r.data, r.reason) for r in rejected],
            )
            rejected_inserted = max(cur.rowcount, 0)
        hs = list(headers.values())  # one statement, not one per block (~240 a range: 30-50 ms)
        cur.execute(
            "INSERT INTO blocks (chain_id, number, hash, parent_hash, block_time) "
            "SELECT %s, * FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::timestamptz[]) "
            "ON CONFLICT (chain_id, number) DO NOTHING",
            (self.chain_id, [h.number for h in hs], [h.hash for h in hs], [h.parent_hash for h in hs],
             [self.block_dt[h.number] for h in hs]),
        )
        blocks_inserted = max(cur.rowcount, 0)
        last = headers[self.processed_to]
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
            (self.chain_id, self.start, range_end, self.processed_to, last.hash, len(self.events), len(rejected),
             run_id),
        )
        cur.close()
        self.laps.lap("rest")
        if self.made or self.inserted >= ANALYZE_AFTER_ROWS:
            _analyze_grown(self.conn, self.start, self.processed_to, self.width, self.inserted)
            self.laps.lap("analyze")
        return WriteResult(self.inserted, rejected_inserted, blocks_inserted, self.made, self.laps.seconds)

    def abort(self) -> None:
        """Close an open COPY after an error elsewhere, so the caller's rollback runs on a usable connection."""
        if self._copy is not None:
            self._copy = None
            _fail(self._open, "range abandoned")


def stage(cur: psycopg.Cursor, table: str) -> str:
    """An empty copy of `table` private to this session and emptied at commit, named `stage_<table>`: where rows
    wait for an INSERT ... ON CONFLICT into `table` (COPY itself cannot skip a conflicting row)."""
    name = f"stage_{table}"
    cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS {name} (LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
    cur.execute(f"TRUNCATE {name}")
    return name


def _fail(open_copy: contextlib.ExitStack, why: str) -> None:
    """End a COPY as failed (the server discards its rows); an error the server already sent is expected here."""
    err = RuntimeError(why)
    with contextlib.suppress(psycopg.Error):
        open_copy.__exit__(type(err), err, None)


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
    # never analyzed (-1), empty, or doubled by this load
    grown = [name for name in names if tuples.get(name, -1) < max(inserted, 1)]
    if not grown:
        return
    with local_setting(conn, "default_statistics_target", str(_PLANNING_STATISTICS_TARGET)):
        for name in grown:
            conn.exec_driver_sql(f"ANALYZE {name} ({_PLANNED_COLUMNS})")


def _block_dt(unix: int) -> datetime:
    return datetime.fromtimestamp(unix, UTC)
