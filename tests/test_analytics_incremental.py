"""Incremental analytics loads (analytics/incremental.py) against a real Postgres and DuckDB.

Trades and checkpoints are written straight into Postgres, the way ingestion and a reconciliation repair write
them (a range's trades and its checkpoint in one transaction). After every step the sink must equal what this
file computes itself from the Postgres rows (trades up to the ingested frontier; OHLCV, VWAP and daily figures in
plain Python), and a full rebuild into a second sink must give the same rows.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest
from sqlalchemy import Engine, text

from orderbook_pipelines.analytics import incremental
from orderbook_pipelines.analytics.sink import CANDLES, MARKET_DAILY, TRADES, AnalyticsSink, DuckDBSink
from orderbook_pipelines.storage.db import engine_for

CHAIN = 31337
T0 = 1_767_225_600 - 5 * 3600  # 19:00 UTC the day before 2026-01-01: ranges cross a midnight
RANGE = 100
UNIT = 10**18


@pytest.fixture
def pg(database: str) -> Iterator[Engine]:
    eng = engine_for(database)
    with eng.begin() as conn:
        conn.execute(text("INSERT INTO markets (market_id, chain_id, metric_id, metric_hash, source, decimals) "
                          "OVERRIDING SYSTEM VALUE VALUES (7, :c, 'INCR_V1', :h, 'gen1_router', 18)"),
                     {"c": CHAIN, "h": "0x" + "ab" * 32})
    yield eng


def _sink(path: Path) -> AnalyticsSink:
    s = DuckDBSink(path)
    s.ensure_schema()
    return s


def ingest(eng: Engine, start: int, rng: random.Random, per_block: int = 3, repair: bool = False) -> None:
    """One range [start, start + RANGE - 1]: its trades and its checkpoint in one transaction (a repair deletes
    the range's trades and checkpoint first, in the same transaction, as reconciliation does)."""
    end = start + RANGE - 1
    rows = []
    for b in range(start, end + 1):
        for i in range(rng.randint(0, per_block)):
            rows.append({"b": b, "i": i, "t": T0 + b * 97, "p": rng.randint(90, 110) * UNIT // 100 * 100,
                         "q": rng.randint(1, 50) * UNIT // 10, "buyer": f"0xb{rng.randint(0, 5)}",
                         "seller": f"0xs{rng.randint(0, 5)}"})
    with eng.begin() as conn:
        if repair:
            conn.execute(text("DELETE FROM trades WHERE chain_id = :c AND block_number BETWEEN :s AND :e"),
                         {"c": CHAIN, "s": start, "e": end})
            conn.execute(text("DELETE FROM ingestion_checkpoints WHERE chain_id = :c AND range_start = :s"),
                         {"c": CHAIN, "s": start})
        if rows:
            conn.execute(text(
                "INSERT INTO trades (market_id, chain_id, block_number, log_index, block_hash, block_time, tx_hash, "
                "price, quantity, buyer, seller) VALUES (7, :c, :b, :i, '0xh', to_timestamp(:t), '0xt', :p, :q, "
                ":buyer, :seller)"), [{"c": CHAIN, **r} for r in rows])
        conn.execute(text(
            "INSERT INTO ingestion_checkpoints (chain_id, range_start, range_end, processed_to, last_hash, events, "
            "rejected) VALUES (:c, :s, :e, :e, '0xh', :n, 0)"), {"c": CHAIN, "s": start, "e": end, "n": len(rows)})


def load_all(eng: Engine, sink: AnalyticsSink, full: bool = False) -> incremental.TradesLoad:
    t = incremental.load_trades(eng, sink, 7, full=full)
    incremental.load_candles(sink, 7, full=full)
    incremental.load_market_daily(sink, 7, full=full)
    return t


def expected(eng: Engine, frontier: int) -> tuple[list[tuple], dict, dict]:
    """Trades up to the frontier, OHLCV+VWAP per (grain, window) and daily figures, computed here."""
    with eng.connect() as conn:
        rows = conn.execute(text(
            "SELECT block_number, log_index, extract(epoch FROM block_time)::bigint AS ts, price, quantity, buyer, "
            "seller FROM trades WHERE market_id = 7 AND block_number <= :f ORDER BY block_number, log_index"),
            {"f": frontier}).all()
    trades = [(r.block_number, r.log_index, r.ts, Decimal(int(r.price)) / UNIT, Decimal(int(r.quantity)) / UNIT,
               r.buyer, r.seller) for r in rows]
    candles: dict = {}
    for grain, secs in {"1m": 60, "5m": 300, "1h": 3600, "1d": 86400}.items():
        w: dict = defaultdict(list)
        for t in trades:
            w[t[2] - t[2] % secs].append(t)
        for bucket, ts in w.items():
            ps = [t[3] for t in ts]
            vol = sum(t[4] for t in ts)
            candles[(grain, bucket)] = (ps[0], max(ps), min(ps), ps[-1], vol, len(ts),
                                        float(sum(t[3] * t[4] for t in ts) / vol))
    days: dict = defaultdict(lambda: [0, Decimal(0), set()])
    for t in trades:
        d = datetime.fromtimestamp(t[2], UTC).date()
        days[d][0] += 1
        days[d][1] += t[4]
        days[d][2] |= {t[5], t[6]}
    return [t[:5] for t in trades], candles, {d: (n, v, len(x)) for d, (n, v, x) in days.items()}


def assert_sink_is(sink: AnalyticsSink, eng: Engine, frontier: int) -> None:
    trades, candles, days = expected(eng, frontier)
    got = sink.query(f"SELECT block_number, log_index, ts, price, quantity FROM {TRADES.name} WHERE market_id = 7 "
                     "ORDER BY block_number, log_index").rows()
    assert got == trades
    c = sink.query(f"SELECT grain, ts, open, high, low, close, volume, trades, vwap FROM {CANDLES.name} "
                   "WHERE market_id = 7").rows()
    assert {(g, ts): (o, h, lo, cl, v, n) for g, ts, o, h, lo, cl, v, n, _ in c} == \
        {k: v[:6] for k, v in candles.items()}
    for g, ts, *_, vwap in c:
        assert vwap == pytest.approx(candles[(g, ts)][6], rel=1e-12)
    d = sink.query(f"SELECT day, trades, volume, traders FROM {MARKET_DAILY.name} WHERE market_id = 7").rows()
    assert {day: (n, v, x) for day, n, v, x in d} == days


def assert_same(a: AnalyticsSink, b: AnalyticsSink) -> None:
    for table, order in ((TRADES, "block_number, log_index"), (CANDLES, "grain, ts"), (MARKET_DAILY, "day")):
        q = f"SELECT * EXCLUDE (market_id) FROM {table.name} WHERE market_id = 7 ORDER BY {order}"
        assert a.query(q).equals(b.query(q)), table.name


def test_incremental_loads_equal_a_full_rebuild_and_a_repair_reloads_what_it_replaced(
        pg: Engine, tmp_path: Path) -> None:
    rng = random.Random(4)
    inc = _sink(tmp_path / "inc.duckdb")
    for start in range(0, 3 * RANGE, RANGE):
        ingest(pg, start, rng)
    first = load_all(pg, inc)
    assert first.full and first.to_block == 3 * RANGE - 1
    assert_sink_is(inc, pg, 3 * RANGE - 1)

    # New ranges: only they are loaded; a range beyond a gap waits until the gap is filled.
    ingest(pg, 3 * RANGE, rng)
    ingest(pg, 5 * RANGE, rng)
    step = load_all(pg, inc)
    assert (step.from_block, step.to_block, step.full) == (3 * RANGE, 4 * RANGE - 1, False)
    assert step.rows == step.frame.height and step.rows < first.rows
    assert_sink_is(inc, pg, 4 * RANGE - 1)
    nothing = load_all(pg, inc)
    assert nothing.rows == 0 and nothing.to_block == 4 * RANGE - 1
    ingest(pg, 4 * RANGE, rng)
    filled = load_all(pg, inc)
    assert (filled.from_block, filled.to_block) == (4 * RANGE, 6 * RANGE - 1)
    assert_sink_is(inc, pg, 6 * RANGE - 1)

    # A repair of an old range (new trades, other prices, some gone) reloads from that range on, and only that.
    ingest(pg, RANGE, random.Random(99), per_block=4, repair=True)
    repaired = load_all(pg, inc)
    assert (repaired.from_block, repaired.to_block, repaired.full) == (RANGE, 6 * RANGE - 1, False)
    assert_sink_is(inc, pg, 6 * RANGE - 1)

    full = _sink(tmp_path / "full.duckdb")
    assert load_all(pg, full, full=True).full
    assert_same(inc, full)
    inc.close()
    full.close()


def test_a_repair_committed_while_a_load_reads_is_seen_by_the_next_load(pg: Engine, tmp_path: Path) -> None:
    """No clock decides what changed: a repair whose transaction the load's snapshot did not see is reloaded."""
    rng = random.Random(5)
    for start in range(0, 2 * RANGE, RANGE):
        ingest(pg, start, rng)
    sink = _sink(tmp_path / "s.duckdb")
    with pg.connect() as repair:
        tx = repair.begin()
        repair.execute(text("DELETE FROM trades WHERE chain_id = :c AND block_number < :e"), {"c": CHAIN, "e": RANGE})
        repair.execute(text("UPDATE ingestion_checkpoints SET events = 0 WHERE chain_id = :c AND range_start = 0"),
                       {"c": CHAIN})
        repair.execute(text("SELECT 1"))  # the repair's transaction is open (it has an id) while the load reads
        load_all(pg, sink)
        tx.commit()
    again = load_all(pg, sink)
    assert (again.from_block, again.full) == (0, False)
    assert_sink_is(sink, pg, 2 * RANGE - 1)
    with pg.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM trades WHERE block_number < :e"), {"e": RANGE}).scalar() == 0
    sink.close()


# trades_fact as docs/analytics.md promises it, stated here rather than read from sink.TRADES: exact uint256 digit
# strings, DECIMAL(38,18) human units, Float64 notional, time keys block_time (naive UTC) / ts (epoch s) / day.
TRADES_FACT_COLUMNS = {
    "market_id": pl.Int32, "metric_id": pl.String, "chain_id": pl.Int64, "block_number": pl.Int64,
    "log_index": pl.Int32, "block_time": pl.Datetime("us"), "ts": pl.Int64, "day": pl.Date, "tx_hash": pl.String,
    "decimals": pl.Int32, "price_raw": pl.String, "quantity_raw": pl.String, "price": pl.Decimal(38, 18),
    "quantity": pl.Decimal(38, 18), "notional": pl.Float64, "buyer": pl.String, "seller": pl.String,
}


def test_frames_keep_the_table_schema(pg: Engine, tmp_path: Path) -> None:
    sink = _sink(tmp_path / "e.duckdb")
    empty = load_all(pg, sink)
    assert empty.rows == 0 and empty.to_block == -1
    assert list(empty.frame.schema.items()) == list(TRADES_FACT_COLUMNS.items())
    sink.close()


def test_a_renamed_market_is_reloaded_under_its_new_name(pg: Engine, tmp_path: Path) -> None:
    rng = random.Random(6)
    ingest(pg, 0, rng)
    sink = _sink(tmp_path / "r.duckdb")
    load_all(pg, sink)
    with pg.begin() as conn:
        conn.execute(text("UPDATE markets SET metric_id = 'RENAMED_V1' WHERE market_id = 7"))
    again = load_all(pg, sink)
    assert again.full
    assert set(sink.query(f"SELECT DISTINCT metric_id FROM {TRADES.name}")["metric_id"]) == {"RENAMED_V1"}
    assert_sink_is(sink, pg, RANGE - 1)
    sink.close()
