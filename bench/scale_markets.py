"""Market scalability at 5,000 markets: registry sync, schema objects, REST queries, Dagster partitions.

Runs the real code paths (registry.sync_configured_markets, the REST handlers of live/api.py against Postgres,
a Postgres-backed Dagster instance) on synthetic rows loaded with COPY. Prints JSON lines and a table; the
baseline for each query is the same query at 50 markets, measured in the same run.

    python bench/scale_markets.py [--markets 5000] [--trades-per-market 100] [--orders-per-market 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from dagster import instance_for_test
from sqlalchemy import text
from sqlalchemy.engine import make_url
from starlette.requests import Request

from orderbook_pipelines.config import EnvSettings, parse_config
from orderbook_pipelines.devchain.deploy import Deployment, project_config
from orderbook_pipelines.live.api import Api
from orderbook_pipelines.live.service import LiveService
from orderbook_pipelines.storage.db import drop_database, engine_for, ensure_database, migrate, sqlalchemy_url
from orderbook_pipelines.storage.registry import sync_configured_markets

RESULTS: list[dict[str, Any]] = []


def emit(name: str, value: float, unit: str, **params: Any) -> None:
    row = {"bench": "scale_markets", "name": name, "value": round(value, 3), "unit": unit, "params": params}
    RESULTS.append(row)
    print(json.dumps(row), flush=True)


def config_for(n: int) -> Any:
    dep = Deployment("http://127.0.0.1:9", 31337, 1, "0x" + "11" * 20,
                     {f"M{i:05d}_V1": "0x" + f"{i + 1:040x}" for i in range(n)}, {})
    return parse_config(project_config(dep))


def load_rows(engine: Any, market_ids: list[int], trades_per: int, orders_per: int) -> None:
    rng = random.Random(1)
    now = datetime.now(UTC)
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        with cur.copy("COPY trades (market_id, chain_id, block_number, log_index, block_hash, block_time, tx_hash, "
                      "price, quantity, buyer, seller) FROM STDIN") as cp:
            block = 0
            for m in market_ids:
                for j in range(trades_per):
                    block += 1
                    cp.write_row((m, 31337, block, j, "0x" + "ab" * 32, now - timedelta(seconds=rng.randint(0, 80_000)),
                                  "0x" + "cd" * 32, rng.randint(90, 110) * 10**18, rng.randint(1, 9) * 10**17,
                                  f"0x{rng.randint(1, 50):040x}", f"0x{rng.randint(1, 50):040x}"))
        with cur.copy("COPY orders (market_id, chain_id, contract, order_id, trader, side, order_type, price, "
                      "quantity, filled, remaining, status, fill_count, created_block, created_log, updated_block, "
                      "created_at, updated_at) FROM STDIN") as cp:
            oid = 0
            for m in market_ids:
                for j in range(orders_per):
                    oid += 1
                    st = rng.choice(["open", "partially_filled", "filled", "cancelled"])
                    remaining = 10**18 if st == "open" else 0
                    cp.write_row((m, 31337, "0x" + "11" * 20, str(oid), f"0x{rng.randint(1, 50):040x}", j % 2, 1,
                                  rng.randint(90, 110) * 10**18, 10**18, 0, remaining, st, 0, oid, 0, oid, now, now))
        raw.commit()
    finally:
        raw.close()
    with engine.begin() as conn:
        conn.execute(text("ANALYZE trades; ANALYZE orders; ANALYZE markets"))


def request(path: str, query: str) -> Request:
    return Request({"type": "http", "method": "GET", "path": path, "query_string": query.encode(), "headers": [],
                    "client": ("127.0.0.1", 1)})


def time_handler(api: Api, path: str, query: str, handler: Any, n: int) -> tuple[float, float]:
    async def run() -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            resp = await handler(request(path, query))
            out.append(time.perf_counter() - t0)
            assert resp.status_code == 200, resp.body
        return out

    samples = asyncio.run(run())
    return statistics.median(samples) * 1000, sorted(samples)[int(0.99 * (len(samples) - 1))] * 1000


def measure_queries(db: str, n_markets: int, trades_per: int, orders_per: int, label: str) -> dict[str, float]:
    engine = engine_for(db)
    cfg = config_for(n_markets)
    with engine.begin() as conn:
        t0 = time.perf_counter()
        changed = sync_configured_markets(conn, cfg)
        first = time.perf_counter() - t0
    with engine.begin() as conn:
        t0 = time.perf_counter()
        again = sync_configured_markets(conn, cfg)
        second = time.perf_counter() - t0
    assert changed == n_markets and again == 0
    emit(f"registry_sync_first_{label}", first * 1000, "ms", markets=n_markets)
    emit(f"registry_sync_noop_{label}", second * 1000, "ms", markets=n_markets)
    with engine.connect() as conn:
        ids = [r[0] for r in conn.execute(text("SELECT market_id FROM markets ORDER BY market_id"))]
        rels = conn.execute(text("SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace")).scalar()
    emit(f"schema_relations_{label}", rels, "relations", markets=n_markets)
    load_rows(engine, ids, trades_per, orders_per)
    service = LiveService(cfg, engine)
    service.hub.set_markets({m: f"M{m - 1:05d}_V1" for m in ids}, set(ids))
    api = Api(service.hub, engine, requests_per_second=10**9)
    out = {}
    mid = f"M{ids[len(ids) // 2] - 1:05d}_V1"
    for name, path, query, handler, n in [
        ("summary", "/api/markets/summary", "", api.summary, 5),
        ("orders_by_market", "/api/orders", f"market={mid}&status=active&limit=100", api.orders, 30),
        ("orders_by_trader", "/api/orders", f"trader=0x{7:040x}&limit=100", api.orders, 30),
        ("trades_page", "/api/trades", f"market={mid}&limit=100", api.trades, 30),
    ]:
        p50, p99 = time_handler(api, path, query, handler, n)
        emit(f"{name}_p50_{label}", p50, "ms", markets=n_markets)
        emit(f"{name}_p99_{label}", p99, "ms", markets=n_markets)
        out[name] = p50
    return out


def dagster_partitions(n: int) -> None:
    url = make_url(sqlalchemy_url(EnvSettings().database_url)).set(database=f"obp_bench_dagster_{uuid.uuid4().hex[:6]}")
    pg = url.render_as_string(hide_password=False)
    ensure_database(pg)
    try:
        dagster_url = url.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
        with instance_for_test(overrides={"storage": {"postgres": {"postgres_url": dagster_url}}}) as inst:
            keys = [f"M{i:05d}_V1" for i in range(n)]
            t0 = time.perf_counter()
            inst.add_dynamic_partitions("markets_bench", keys)
            emit("dagster_add_partitions", (time.perf_counter() - t0) * 1000, "ms", partitions=n)
            t0 = time.perf_counter()
            got = inst.get_dynamic_partitions("markets_bench")
            emit("dagster_list_partitions", (time.perf_counter() - t0) * 1000, "ms", partitions=n)
            t0 = time.perf_counter()
            assert inst.has_dynamic_partition("markets_bench", keys[-1]) and len(got) == n
            emit("dagster_has_partition", (time.perf_counter() - t0) * 1000, "ms", partitions=n)
    finally:
        drop_database(pg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--markets", type=int, default=5000)
    ap.add_argument("--baseline-markets", type=int, default=50)
    ap.add_argument("--trades-per-market", type=int, default=100)
    ap.add_argument("--orders-per-market", type=int, default=200)
    a = ap.parse_args()
    dbs = []
    try:
        results = {}
        for label, n in (("baseline", a.baseline_markets), ("scaled", a.markets)):
            u = make_url(sqlalchemy_url(EnvSettings().database_url)).set(
                database=f"obp_bench_{uuid.uuid4().hex[:8]}").render_as_string(hide_password=False)
            ensure_database(u)
            dbs.append(u)
            migrate(u)
            results[label] = measure_queries(u, n, a.trades_per_market, a.orders_per_market, label)
        for q in results["scaled"]:
            emit(f"{q}_ratio_scaled_vs_baseline", results["scaled"][q] / results["baseline"][q], "x",
                 markets=a.markets, baseline=a.baseline_markets)
        dagster_partitions(a.markets)
    finally:
        for u in dbs:
            drop_database(u)
    print("\n{:<42} {:>12} {}".format("figure", "value", "unit"))
    for r in RESULTS:
        print(f"{r['name']:<42} {r['value']:>12} {r['unit']}")


if __name__ == "__main__":
    main()
