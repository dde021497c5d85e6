"""Benchmark: incremental analytics load vs full rebuild, one market with 1,000,000 trades (DuckDB sink).

This one measures the analytics load only, so the trades are synthetic and inserted straight into Postgres
(`generate_series`, with their block-range checkpoints, as ingestion would leave them): no chain, no ingestion.
Prices walk around 100, quantities vary, 10 trades per block, 12 s blocks (about 14 days of 1m..1d windows).

Measured, wall time of whole processes from spawn to exit (`python -m bench.analytics_incremental --child ...`,
each loading the trades fact table, candles and daily rows of the market, as the analytics assets do):
1. first load of the 1,000,000 trades into sink A (a full load: nothing loaded before);
2. 1,000 new trades in new blocks (a new checkpoint), then an incremental run on sink A;
3. the baseline in the same run: a full rebuild (`full_refresh`) of the same 1,001,000 trades into sink B.
Then sink A must equal sink B row for row on every exact column, and within 1e-9 (relative) on the float ones
(printed as figures; the bench fails otherwise).

    .venv/bin/python -m bench.analytics_incremental [--trades 1000000] [--new 1000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import text

from bench.common import Report, bench_database, log, process_env, warm_up
from orderbook_pipelines.config import PROJECT_ROOT
from orderbook_pipelines.storage.db import engine_for

CHAIN = 31337
MARKET = 1
PER_BLOCK = 10
BLOCK_S = 12
RANGE = 1000
T0 = 1_767_225_600  # 2026-01-01 UTC


def insert_trades(db: str, first_block: int, blocks: int) -> int:
    """`blocks` blocks of PER_BLOCK trades from `first_block`, and checkpoints of the ranges they fill."""
    last = first_block + blocks - 1
    with engine_for(db).begin() as conn:
        n = conn.execute(text("""
            INSERT INTO trades (market_id, chain_id, block_number, log_index, block_hash, block_time, tx_hash, price,
                                quantity, buyer, seller, buy_order_id, sell_order_id)
            SELECT :m, :c, b, i, 'h' || b, to_timestamp(:t0 + b * :bs), 't' || b,
                   (10000 + ((b * 7919 + i * 104729) % 400) - 200)::numeric * 10000000000000000,
                   (1 + (b * 31 + i * 17) % 50)::numeric * 100000000000000000,
                   '0xb' || ((b + i) % 40), '0xs' || ((b * 3 + i) % 40), (b * 16 + i)::text, (b * 16 + i + 8)::text
            FROM generate_series(CAST(:lo AS bigint), CAST(:hi AS bigint)) AS b, generate_series(0, :pb - 1) AS i
        """), {"m": MARKET, "c": CHAIN, "t0": T0, "bs": BLOCK_S, "lo": first_block, "hi": last,
               "pb": PER_BLOCK}).rowcount
        conn.execute(text("""
            INSERT INTO ingestion_checkpoints (chain_id, range_start, range_end, processed_to, last_hash, events,
                                               rejected)
            SELECT :c, s, s + :r - 1, LEAST(s + :r - 1, :hi), 'h', 0, 0
            FROM generate_series(CAST(:lo AS bigint), CAST(:hi AS bigint), :r) AS s
            ON CONFLICT (chain_id, range_start) DO UPDATE SET processed_to = EXCLUDED.processed_to
        """), {"c": CHAIN, "r": RANGE, "lo": first_block, "hi": last})
    return n


def child(mode: str, db: str, path: str) -> None:
    """One analytics run of the market (trades, candles, daily); prints the step seconds as JSON."""
    from orderbook_pipelines.analytics import incremental
    from orderbook_pipelines.analytics.sink import DuckDBSink

    t0 = time.perf_counter()
    full = mode == "full"
    out: dict[str, float] = {}
    with DuckDBSink(path) as sink:
        sink.ensure_schema()
        eng = engine_for(db)
        t = time.perf_counter()
        tr = incremental.load_trades(eng, sink, MARKET, full=full)
        out["trades_s"] = time.perf_counter() - t
        t = time.perf_counter()
        incremental.load_candles(sink, MARKET, full=full)
        out["candles_s"] = time.perf_counter() - t
        t = time.perf_counter()
        incremental.load_market_daily(sink, MARKET, full=full)
        out["daily_s"] = time.perf_counter() - t
    out.update(rows=tr.rows, from_block=tr.from_block, full=float(tr.full), in_process_s=time.perf_counter() - t0)
    print(json.dumps(out))


def run_child(mode: str, db: str, path: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench.analytics_incremental", "--child", mode, "--db", db,
                           "--duckdb", str(path)], cwd=PROJECT_ROOT, capture_output=True, text=True, env=process_env())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"child {mode} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall}


def compare(a: Path, b: Path) -> dict[str, float]:
    """Rows of A not in B and back, per table, on the exact columns (ids, times, DECIMAL prices and volumes, counts);
    the float columns (notional, VWAP, TWAP) as the largest relative difference: polars sums a million rows in
    parallel chunks, in another order than a day's rows, so the last bit may differ."""
    import duckdb

    con = duckdb.connect()
    con.execute(f"ATTACH '{a}' AS a (READ_ONLY)")
    con.execute(f"ATTACH '{b}' AS b (READ_ONLY)")
    out: dict[str, float] = {}
    floats = {"trades_fact": ["notional"], "candles": ["notional", "vwap", "twap"], "market_daily": ["notional"]}
    keys = {"trades_fact": ["block_number", "log_index"], "candles": ["grain", "ts"], "market_daily": ["day"]}
    for table, fl in floats.items():
        cols = [r[0] for r in con.execute(f"DESCRIBE a.{table}").fetchall() if r[0] not in fl]
        sel = ", ".join(f'"{c}"' for c in cols)
        diff = 0
        for x, y in (("a", "b"), ("b", "a")):
            row = con.execute(f"SELECT count(*) FROM (SELECT {sel} FROM {x}.{table} EXCEPT ALL "
                              f"SELECT {sel} FROM {y}.{table})").fetchone()
            diff += row[0] if row else 0
        out[f"{table}_rows_differing"] = diff
        on = " AND ".join(f'x."{k}" = y."{k}"' for k in keys[table])
        rel = " , ".join(f'abs(x."{c}" - y."{c}") / greatest(abs(y."{c}"), 1e-300)' for c in fl)
        row = con.execute(f"SELECT max(greatest({rel})) FROM a.{table} x JOIN b.{table} y ON {on}").fetchone()
        out[f"{table}_float_max_rel_diff"] = float(row[0] or 0.0) if row else 0.0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trades", type=int, default=1_000_000)
    ap.add_argument("--new", type=int, default=1_000, help="trades added before the incremental run")
    ap.add_argument("--child", choices=["full", "incremental"], help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    ap.add_argument("--duckdb", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.db, args.duckdb)
        return
    rep = Report("analytics_incremental")
    with bench_database("analytics") as db, tempfile.TemporaryDirectory() as tmp:
        with engine_for(db).begin() as conn:
            conn.execute(text("INSERT INTO markets (market_id, chain_id, metric_id, metric_hash, source, decimals) "
                              "OVERRIDING SYSTEM VALUE VALUES (:m, :c, 'BENCH_ANALYTICS', :h, 'gen1_router', 18)"),
                         {"m": MARKET, "c": CHAIN, "h": "0x" + "cd" * 32})
        old_blocks = args.trades // PER_BLOCK
        t = time.perf_counter()
        n = insert_trades(db, 0, old_blocks)
        log(f"inserted {n:,} trades in {time.perf_counter() - t:.1f}s; first load into sink A ...")
        a, b = Path(tmp) / "a.duckdb", Path(tmp) / "b.duckdb"
        warm_up(process_env(), [sys.executable, "-c", "import bench.analytics_incremental, duckdb, "
                                "orderbook_pipelines.analytics.incremental"])
        first = run_child("incremental", db, a)
        new = insert_trades(db, old_blocks, args.new // PER_BLOCK)
        log(f"+{new:,} trades; incremental run on A, then full rebuild into B ...")
        inc = run_child("incremental", db, a)
        full = run_child("full", db, b)
        cmp = compare(a, b)
        equal = all(v == 0 for k, v in cmp.items() if k.endswith("_rows_differing")) and \
            all(v < 1e-9 for k, v in cmp.items() if k.endswith("_float_max_rel_diff"))
        params = {"trades": n + new, "new_trades": new, "backend": "duckdb"}
        rep.figure("first_load_s", first["wall_s"], "s", **params, rows=first["rows"])
        full_s = rep.figure("full_rebuild_s", full["wall_s"], "s", **params, rows=full["rows"],
                            in_process_s=round(full["in_process_s"], 3), trades_s=round(full["trades_s"], 3),
                            candles_s=round(full["candles_s"], 3), daily_s=round(full["daily_s"], 3))
        inc_s = rep.figure("incremental_s", inc["wall_s"], "s", **params, rows=inc["rows"],
                           from_block=inc["from_block"], in_process_s=round(inc["in_process_s"], 3),
                           trades_s=round(inc["trades_s"], 3), candles_s=round(inc["candles_s"], 3),
                           daily_s=round(inc["daily_s"], 3))
        rep.figure("ratio_full_over_incremental", full_s / inc_s, "x", whole_processes=True)
        rep.figure("ratio_full_over_incremental_in_process", full["in_process_s"] / inc["in_process_s"], "x")
        for k, v in cmp.items():
            rep.figure(f"incremental_vs_full_{k}", v, "rows" if k.endswith("differing") else "ratio")
        rep.figure("incremental_equals_full_rebuild", float(equal), "bool", float_tolerance=1e-9)
        rep.table("analytics load: incremental vs full rebuild (one market)")
        if not equal:
            raise SystemExit("the incremental sink differs from the full rebuild")


if __name__ == "__main__":
    main()
