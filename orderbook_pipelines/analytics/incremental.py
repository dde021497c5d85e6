"""Incremental analytics loads: a run loads only what changed in Postgres since the market's last load.

A market's trades are loaded up to the chain's ingested frontier (storage/checkpoints.py): every range at or below
it is committed together with its trades, so below the frontier rows change only through a reconciliation repair,
and a repair rewrites the range's checkpoint row in the same transaction (delete + ingest). A load records the
frontier it reached and the Postgres snapshot it read (`pg_current_snapshot`, one REPEATABLE READ transaction).
The next load starts at the lowest of: the old frontier + 1, the start of every checkpoint at or below it that a
transaction unseen by the old snapshot wrote (a repair: whatever it replaced is reloaded), the new frontier + 1
(a chain that got shorter). It deletes the sink's rows from that block on and inserts Postgres' rows from there.
No clock is compared, so a repair committing while a load reads is seen by the next load.

A market renamed since (registered: hash -> metric id) is reloaded whole, so its rows carry the new name.

Candles and daily figures keep the trades block they cover; a trades load that rewrites rows lowers it. They
recompute only windows from the UTC day of the first trade after that block - or of the last one before it,
whose window (and TWAP horizon) a new trade extends - with the TWAP carried from the trade before that day.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime

import polars as pl
from sqlalchemy import Connection, Engine, text

from orderbook_pipelines.analytics import queries, transforms
from orderbook_pipelines.analytics.sink import CANDLES, LOADS, MARKET_DAILY, TRADES, AnalyticsSink, where_market
from orderbook_pipelines.storage.checkpoints import Checkpoint, contiguous

TRADES_LOAD, CANDLES_LOAD, DAILY_LOAD = "trades", "candles", "market_daily"
DAY = 86_400


@dataclass(frozen=True)
class LoadState:
    block: int  # trades through this block are in the table
    snapshot: str = ""  # trades only: the Postgres snapshot the load read
    ranges: int = 0  # trades only: checkpoints at or below `block` then


@dataclass(frozen=True)
class TradesLoad:
    market_id: int
    from_block: int  # sink rows from this block on were replaced (-1: all of them)
    to_block: int  # the frontier loaded through (-1: nothing ingested)
    rows: int
    full: bool
    frame: pl.DataFrame  # the rows inserted


@dataclass(frozen=True)
class WindowsLoad:
    market_id: int
    since: date | None  # first UTC day recomputed (None: nothing to do)
    rows: int
    full: bool
    frame: pl.DataFrame


def states(sink: AnalyticsSink, market_id: int) -> dict[str, LoadState]:
    df = sink.query(f"SELECT name, block, snapshot, ranges FROM {LOADS.name} WHERE {where_market(market_id)}")
    return {r["name"]: LoadState(int(r["block"]), r["snapshot"] or "", int(r["ranges"] or 0))
            for r in df.iter_rows(named=True)}


def _save(sink: AnalyticsSink, market_id: int, name: str, st: LoadState) -> None:
    row = pl.DataFrame({"market_id": [market_id], "name": [name], "block": [st.block], "snapshot": [st.snapshot],
                        "ranges": [st.ranges], "loaded_at": [datetime.now(UTC).replace(tzinfo=None)]})
    sink.replace_where(LOADS, where_market(market_id, name=name), row)


def _lower(sink: AnalyticsSink, market_id: int, block: int, have: dict[str, LoadState]) -> None:
    """Derived tables must recompute from `block` on: lower what they claim to cover."""
    for name in (CANDLES_LOAD, DAILY_LOAD):
        st = have.get(name)
        if st is not None and st.block >= block:
            _save(sink, market_id, name, LoadState(block - 1))


# Every checkpoint of the chain, read once per load: the frontier, the range counts and the changed ranges all come
# from these rows. `changed`: a transaction unseen by the snapshot `:snap` wrote the row (NULL when `:snap` is NULL).
# The row's 32-bit xmin is widened to the 64-bit id with the epoch of THIS transaction's xmax: every row it sees
# was written before that, and rows are younger than 2^32 transactions (a frozen row's id reads as old, hence
# visible: never "changed"). (The old snapshot's epoch would misread a row written after it once the cluster's
# transaction ids pass 2^32: one epoch too old, so "seen", and a repaired range would not be reloaded.)
_CHECKPOINTS = text("""
    WITH s AS (SELECT CAST(:snap AS pg_snapshot) AS snap,
                      CAST(CAST(pg_snapshot_xmax(pg_current_snapshot()) AS text) AS numeric) AS xmax)
    SELECT c.range_start, c.range_end, c.processed_to,
           NOT pg_visible_in_snapshot(CAST(CAST(
             (SELECT CASE WHEN v > s.xmax THEN v - 4294967296 ELSE v END
              FROM (SELECT floor(s.xmax / 4294967296) * 4294967296 + CAST(CAST(c.xmin AS text) AS numeric) AS v) x)
           AS text) AS xid8), s.snap) AS changed
    FROM ingestion_checkpoints c CROSS JOIN s
    WHERE c.chain_id = :c
    ORDER BY c.range_start
""")


def _ranges(conn: Connection, chain_id: int, snapshot: str | None) -> tuple[list[Checkpoint], set[int]]:
    """The chain's checkpoints, and the starts of those written by a transaction the old load's `snapshot` did not
    see (None: no comparison, none)."""
    rows = conn.execute(_CHECKPOINTS, {"c": chain_id, "snap": snapshot or None}).all()
    return [Checkpoint(r.range_start, r.range_end, r.processed_to) for r in rows], \
        {r.range_start for r in rows if r.changed}


def _below(ranges: list[Checkpoint], block: int) -> list[Checkpoint]:
    """The ranges a load through `block` covers: it records their count, so a later load sees one vanish."""
    return [c for c in ranges if c.range_start <= block]


def _replace_from(ranges: list[Checkpoint], changed: set[int], old: LoadState, new_frontier: int) -> int:
    """The lowest block whose stored trades may differ from what the old load read (-1: reload everything)."""
    if not old.snapshot:
        return -1
    below = _below(ranges, old.block)
    if len(below) != old.ranges:  # a range at or below the old frontier vanished: no telling what went with it
        return -1
    return min([min(old.block, new_frontier) + 1, *(c.range_start for c in below if c.range_start in changed)])


def load_trades(engine: Engine, sink: AnalyticsSink, market_id: int, full: bool = False) -> TradesLoad:
    """Bring the market's trades fact rows up to the frontier, rewriting only what changed (all if `full`)."""
    have = states(sink, market_id)
    old = have.get(TRADES_LOAD)
    with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn, conn.begin():
        chain_id = conn.execute(text("SELECT chain_id FROM markets WHERE market_id = :m"),
                                {"m": market_id}).scalar_one()
        snap = conn.execute(text("SELECT CAST(pg_current_snapshot() AS text)")).scalar_one()
        name = transforms.market(conn, market_id).label
        renamed = old is not None and _stored_name(sink, market_id) not in (None, name)
        prev = None if full or old is None or renamed else old  # None: reload everything
        ranges, changed = _ranges(conn, chain_id, prev.snapshot if prev else None)
        top = contiguous(ranges)
        top = -1 if top is None else top
        start = -1 if prev is None else _replace_from(ranges, changed, prev, top)
        df = transforms.extract_trades(conn, market_id, max(start, 0), top)  # empty when start > top
    n = 0
    if start < 0 or start <= max(top, old.block if old else -1):  # rows to insert, or stale rows to delete
        _lower(sink, market_id, max(start, 0), have)
        n = sink.replace_market(TRADES, market_id, df, None if start < 0 else ("block_number", start))
    _save(sink, market_id, TRADES_LOAD, LoadState(top, snap, len(_below(ranges, top))))
    return TradesLoad(market_id, start, top, n, start < 0, df)


def _stored_name(sink: AnalyticsSink, market_id: int) -> str | None:
    """The public name the sink's rows carry (a registered market is renamed: its rows are reloaded)."""
    df = sink.query(f"SELECT metric_id FROM {TRADES.name} WHERE {where_market(market_id)} LIMIT 1")
    return None if df.is_empty() else df["metric_id"][0]


def _since(sink: AnalyticsSink, market_id: int, name: str, full: bool) -> tuple[date | None, bool, int]:
    """(first day to recompute or None when nothing changed, whether that is everything, trades block covered)."""
    have = states(sink, market_id)
    trades = have.get(TRADES_LOAD)
    covered = trades.block if trades else -1
    mine = have.get(name)
    if not full and mine is not None and mine.block >= covered:
        return None, False, covered
    before = -1 if full or mine is None else mine.block
    last = sink.query(f"SELECT max(ts) AS t FROM {TRADES.name} WHERE {where_market(market_id)} "
                      f"AND block_number <= {int(before)}")["t"][0] if before >= 0 else None
    if last is None:
        return date(1970, 1, 1), True, covered
    return datetime.fromtimestamp(int(last) - int(last) % DAY, UTC).date(), False, covered


def epoch(d: date) -> int:
    """Epoch seconds of a UTC day's start."""
    return int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp())


def load_candles(sink: AnalyticsSink, market_id: int, full: bool = False) -> WindowsLoad:
    """Recompute the candle windows from the first affected UTC day (every grain aligns to days)."""
    day, everything, covered = _since(sink, market_id, CANDLES_LOAD, full)
    if day is None:
        return WindowsLoad(market_id, None, 0, False, pl.DataFrame(schema=CANDLES.polars_schema()))
    t0 = epoch(day)
    m = where_market(market_id)
    cols = ", ".join(f'"{c}"' for c in TRADES.names)
    frame = _trades_frame(sink.query(
        f"SELECT {cols} FROM {TRADES.name} WHERE {m} AND ts >= {t0} UNION ALL "
        f"SELECT {cols} FROM (SELECT {cols} FROM {TRADES.name} WHERE {m} AND ts < {t0} "
        "ORDER BY block_number DESC, log_index DESC LIMIT 1) AS carry"))
    c = transforms.candles(frame)
    c = c.filter(pl.col("ts") >= t0)
    n = sink.replace_market(CANDLES, market_id, c, None if everything else ("ts", t0))
    _save(sink, market_id, CANDLES_LOAD, LoadState(covered))
    return WindowsLoad(market_id, day, n, everything, c)


def load_market_daily(sink: AnalyticsSink, market_id: int, full: bool = False) -> WindowsLoad:
    """Recompute the daily rows from the first affected UTC day, in the engine's SQL."""
    day, everything, covered = _since(sink, market_id, DAILY_LOAD, full)
    if day is None:
        return WindowsLoad(market_id, None, 0, False, pl.DataFrame(schema=MARKET_DAILY.polars_schema()))
    d = queries.market_daily(sink, market_id, since_ts=epoch(day))
    if d.height:
        d = d.cast(MARKET_DAILY.polars_schema())  # type: ignore[arg-type]
    n = sink.replace_market(MARKET_DAILY, market_id, d, None if everything else ("day", day))
    _save(sink, market_id, DAILY_LOAD, LoadState(covered))
    return WindowsLoad(market_id, day, n, everything, d)


def _trades_frame(df: pl.DataFrame) -> pl.DataFrame:
    if df.is_empty():
        return pl.DataFrame(schema=TRADES.polars_schema())
    return df.select(TRADES.names).cast(TRADES.polars_schema())  # type: ignore[arg-type]
