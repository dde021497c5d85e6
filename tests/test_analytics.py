"""Analytics tier end to end, on both backends: the simulated chain ingested into a real Postgres, analytics
materialized by Dagster per market partition into DuckDB (always) and ClickHouse (when a server is reachable;
otherwise those cases are skipped with the reason). Expected values are computed here in plain Python from
Postgres rows and from the contracts' own view functions, never from the code under test.
"""

from __future__ import annotations

import json
import os
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

import polars as pl
import pytest
from dagster import (
    BoolMetadataValue,
    DagsterInstance,
    FloatMetadataValue,
    IntMetadataValue,
    MarkdownMetadataValue,
    RunRequest,
    SensorResult,
    TextMetadataValue,
    build_sensor_context,
    materialize,
)
from sqlalchemy import text
from web3 import Web3

from orderbook_pipelines.analytics import queries
from orderbook_pipelines.analytics.sink import CANDLES, AnalyticsSink
from orderbook_pipelines.assets.analytics import analytics_assets, check_candles, resolve_partition
from orderbook_pipelines.book.model import BUY, SELL
from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.devchain.deploy import artifact
from orderbook_pipelines.ingestion.ingest import ingest_range
from orderbook_pipelines.ingestion.ranges import ranges_up_to
from orderbook_pipelines.partitions import markets
from orderbook_pipelines.resources import PostgresResource
from orderbook_pipelines.resources.analytics import AnalyticsResource
from orderbook_pipelines.sensors.analytics import (
    IN_FLIGHT,
    market_registry_sensor,
    partition_keys,
    plan_markets_tick,
)
from orderbook_pipelines.storage.db import drop_database, engine_for
from tests.conftest import DevChain, new_database

GRAINS = {"1m": 60, "5m": 300, "1h": 3600, "1d": 86400}
SNAPSHOT_MARKET = "GOLD_V1"  # gets a depth_snapshots row built from the contract's own levels


@pytest.fixture(scope="module")
def pg(simulated_chain: DevChain) -> Iterator[str]:
    db = new_database()
    cfg = simulated_chain.config
    c = cfg.chain
    client, engine = ChainClient(c.rpc_url), engine_for(db)
    safe = simulated_chain.anvil.w3.eth.block_number - c.confirmations
    for a, b in ranges_up_to(c.start_block, c.range_size, safe):
        ingest_range(cfg, client, engine, a, b)
    _write_depth_snapshot(simulated_chain, db, safe)
    yield db
    drop_database(db)


def _contract(chain: DevChain, metric: str):  # type: ignore[no-untyped-def]
    dep = chain.dep
    if metric in dep.gen1_books:
        addr, name = dep.gen1_books[metric], "OrderBook"
    else:
        addr, name = dep.gen2_books[metric], "AluminumOrderBook"
    return chain.anvil.w3.eth.contract(address=Web3.to_checksum_address(addr), abi=artifact(name)["abi"])


def _contract_levels(chain: DevChain, metric: str, block: int | str = "latest") -> tuple[list, list]:
    c = _contract(chain, metric)
    out = []
    for side in (BUY, SELL):
        prices, qtys, counts = c.functions.getLevels(side, 500).call(block_identifier=block)
        out.append([(p, q, n) for p, q, n in zip(prices, qtys, counts, strict=True)])
    return out[0], out[1]


def _write_depth_snapshot(chain: DevChain, db: str, block: int) -> None:
    """A depth_snapshots row (the recovery tier's contract) for one market, from the chain's own view."""
    import json

    with engine_for(db).begin() as conn:
        if not conn.execute(text("SELECT to_regclass('depth_snapshots') IS NOT NULL")).scalar_one():
            return
        bids, asks = _contract_levels(chain, SNAPSHOT_MARKET, block)
        blk = chain.anvil.w3.eth.get_block(block)
        mid = conn.execute(text("SELECT market_id FROM markets WHERE metric_id = :m"), {"m": SNAPSHOT_MARKET}).scalar()
        levels = {"bids": [[str(p), str(q), n] for p, q, n in bids], "asks": [[str(p), str(q), n] for p, q, n in asks]}
        conn.execute(text(
            "INSERT INTO depth_snapshots (market_id, block_number, block_hash, block_time, checksum, state_hash, "
            "orders, levels) VALUES (:m, :b, :h, to_timestamp(:t), 0, :s, :o, CAST(:lv AS jsonb))"),
            {"m": mid, "b": block, "h": "0x" + bytes(blk["hash"]).hex(), "t": blk["timestamp"], "s": "0" * 64,
             "o": sum(n for *_, n in bids + asks), "lv": json.dumps(levels)})


@dataclass
class Run:
    resource: AnalyticsResource
    sink: AnalyticsSink
    market_ids: dict[str, int]
    results: dict[int, object]
    pg: str


@pytest.fixture(scope="module", params=["duckdb", "clickhouse"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def run(backend: str, pg: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    yield from _materialized(backend, pg, tmp_path_factory)


@pytest.fixture(scope="module")
def spread_pg(anvil_factory: type, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A small chain whose blocks are minutes to hours apart and cross a UTC midnight: many windows per grain,
    so open/close ordering and the TWAP carry between windows are exercised."""
    import random

    from orderbook_pipelines.devchain.simulator import Simulator
    from tests.conftest import make_devchain

    anvil = anvil_factory()
    chain = make_devchain(anvil, tmp_path_factory.mktemp("spread"), ["SILVER_V1", "GOLD_V1"], ["NICKEL_V1"])
    w3 = anvil.w3
    now = w3.eth.get_block("latest")["timestamp"]
    w3.provider.make_request("evm_setNextBlockTimestamp", [now - now % 86400 + 86400 + 82800])  # 23:00 UTC
    w3.provider.make_request("evm_mine", [])
    sim = Simulator(w3, chain.dep, seed=5, traders=6)
    rnd = random.Random(3)
    w3.provider.make_request("evm_setAutomine", [False])
    try:
        for _ in range(40):
            for _ in range(15):
                sim.step()
            w3.provider.make_request("evm_increaseTime", [rnd.choice([1, 20, 59, 61, 250, 900, 3000])])
            w3.provider.make_request("evm_mine", [])
            sim.settle()
    finally:
        w3.provider.make_request("evm_setAutomine", [True])
    anvil.mine(chain.config.chain.confirmations + 1)
    db = new_database()
    c = chain.config.chain
    client, engine = ChainClient(c.rpc_url), engine_for(db)
    for a, b in ranges_up_to(c.start_block, c.range_size, w3.eth.block_number - c.confirmations):
        ingest_range(chain.config, client, engine, a, b)
    yield db
    drop_database(db)


@pytest.fixture(scope="module")
def spread_run(backend: str, spread_pg: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    yield from _materialized(backend, spread_pg, tmp_path_factory)


def _materialized(backend: str, pg: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    if backend == "duckdb":
        res = AnalyticsResource(backend="duckdb", duckdb_path=str(tmp_path_factory.mktemp("duck") / "a.duckdb"))
    else:
        url = os.environ.get("CLICKHOUSE_URL")
        if not url:
            pytest.skip("ClickHouse tests need CLICKHOUSE_URL (make test sets it via scripts/ensure_clickhouse.sh; "
                        "that script could not provide a server on this machine, or pytest ran outside make)")
        try:
            probe = AnalyticsResource(backend="clickhouse", clickhouse_url=url).open()
            probe.close()
        except Exception as exc:
            pytest.skip(f"ClickHouse at {url} is not usable: {exc}")
        res = AnalyticsResource(backend="clickhouse", clickhouse_url=url,
                                clickhouse_database=f"obp_test_{uuid.uuid4().hex[:10]}")
    instance = DagsterInstance.ephemeral()
    resources = {"postgres": PostgresResource(database_url=pg), "analytics": res}
    tick = market_registry_sensor(build_sensor_context(instance=instance,
                                                       resources={"postgres": resources["postgres"]}))
    for req in tick.dynamic_partitions_requests:
        instance.add_dynamic_partitions(markets.name, list(req.partition_keys))
    requests, cursor = _drain(instance, resources["postgres"], tick)
    with engine_for(pg).connect() as conn:
        ids = dict(conn.execute(text("SELECT metric_id, market_id FROM markets")).all())
        marks = dict(conn.execute(text(
            "SELECT m.metric_id, max(t.block_number) FROM trades t JOIN markets m USING (market_id) GROUP BY 1")).all())
    keys = instance.get_dynamic_partitions(markets.name)
    assert sorted(keys) == sorted(ids), "the sensor registers every market under its public name"
    assert sorted(r.partition_key for r in requests) == sorted(marks) and marks, "one run for each traded market"
    assert {(r.run_key, r.tags["obp/market_id"]) for r in requests} == {
        (f"{k}@{b}", str(ids[k])) for k, b in marks.items()}, "run key = market@last trade block"
    again = market_registry_sensor(build_sensor_context(instance=instance, cursor=cursor,
                                                        resources={"postgres": resources["postgres"]}))
    assert again.run_requests == [] and again.dynamic_partitions_requests == [], "nothing new, nothing requested"
    results = {}
    for key in keys:
        r = materialize(analytics_assets, partition_key=key, instance=instance, resources=resources)
        assert r.success, key
        results[ids[key]] = r
    sink = res.open()
    yield Run(res, sink, ids, results, pg)
    if res.backend_name() == "clickhouse":
        sink.drop_database()  # type: ignore[attr-defined]
    sink.close()


def _pg_trades(db: str) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = defaultdict(list)
    with engine_for(db).connect() as conn:
        for r in conn.execute(text(
                "SELECT t.market_id, t.block_number, t.log_index, t.block_time, t.price, t.quantity, t.buyer, "
                "t.seller, m.decimals FROM trades t JOIN markets m USING (market_id) "
                "ORDER BY t.block_number, t.log_index")):
            s = Decimal(10) ** r.decimals
            out[r.market_id].append({"block": r.block_number, "log": r.log_index, "ts": int(r.block_time.timestamp()),
                                     "raw_p": int(r.price), "raw_q": int(r.quantity),
                                     "p": Decimal(int(r.price)) / s, "q": Decimal(int(r.quantity)) / s,
                                     "buyer": r.buyer, "seller": r.seller})
    return out


def _rows(sink: AnalyticsSink, sql: str) -> list[dict]:
    return sink.query(sql).to_dicts()


def test_trades_fact_is_exact(run: Run) -> None:
    expected = _pg_trades(run.pg)
    assert sum(len(v) for v in expected.values()) > 1000
    for mid, trades in expected.items():
        got = _rows(run.sink, f"SELECT block_number, log_index, price_raw, quantity_raw, price, quantity, ts "
                              f"FROM trades_fact WHERE market_id = {mid} ORDER BY block_number, log_index")
        assert [(g["block_number"], g["log_index"]) for g in got] == [(t["block"], t["log"]) for t in trades]
        for g, t in zip(got, trades, strict=True):
            assert (g["price_raw"], g["quantity_raw"]) == (str(t["raw_p"]), str(t["raw_q"]))
            assert (Decimal(g["price"]), Decimal(g["quantity"]), g["ts"]) == (t["p"], t["q"], t["ts"])


def _expected_candles(trades: list[dict]) -> dict[tuple[str, int], dict]:
    """Plain-Python OHLCV/VWAP/TWAP (TWAP: last price held until the next trade, see transforms.candles)."""
    out = {}
    horizon = max(t["ts"] for t in trades)
    for grain, secs in GRAINS.items():
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, t in enumerate(trades):
            buckets[t["ts"] - t["ts"] % secs].append(i)
        for b, idx in buckets.items():
            ws = [trades[i] for i in idx]
            qsum = sum(t["q"] for t in ws)
            end = min(b + secs, horizon)
            first = idx[0]
            start = b if first > 0 else ws[0]["ts"]
            area = 0.0
            if first > 0:
                area += float(trades[first - 1]["p"]) * (ws[0]["ts"] - b)
            for i in idx:
                nxt = trades[i + 1]["ts"] if i + 1 < len(trades) else horizon
                area += float(trades[i]["p"]) * (min(nxt, end) - trades[i]["ts"])
            out[(grain, b)] = {
                "open": ws[0]["p"], "high": max(t["p"] for t in ws), "low": min(t["p"] for t in ws),
                "close": ws[-1]["p"], "volume": qsum, "trades": len(ws),
                "vwap": float(sum(t["p"] * t["q"] for t in ws) / qsum),
                "twap": area / (end - start) if end > start else float(ws[-1]["p"]),
            }
    return out


@pytest.mark.parametrize("which", ["simulated", "spread"])
def test_candles_vwap_twap_match_python(which: str, backend: str, request: pytest.FixtureRequest) -> None:
    run: Run = request.getfixturevalue("run" if which == "simulated" else "spread_run")
    checked = 0
    windows: dict[str, int] = defaultdict(int)
    for mid, trades in _pg_trades(run.pg).items():
        exp = _expected_candles(trades)
        got = {(g["grain"], g["ts"]): g for g in _rows(run.sink, f"SELECT * FROM candles WHERE market_id = {mid}")}
        assert set(got) == set(exp), mid
        for k, e in exp.items():
            g = got[k]
            assert tuple(Decimal(g[c]) for c in ("open", "high", "low", "close", "volume")) == \
                (e["open"], e["high"], e["low"], e["close"], e["volume"]), (mid, k)
            assert g["trades"] == e["trades"]
            assert g["vwap"] == pytest.approx(e["vwap"], rel=1e-9)
            assert g["twap"] == pytest.approx(e["twap"], rel=1e-9)
            checked += 1
            windows[k[0]] += 1
    assert checked >= 48
    if which == "spread":
        assert windows["1m"] >= 60 and windows["1h"] >= 20 and windows["1d"] >= 6, windows


def test_asset_checks_pass_and_catch_a_wrong_candle(run: Run) -> None:
    evals = [e for r in run.results.values() for e in r.get_asset_check_evaluations()]  # type: ignore[attr-defined]
    assert len(evals) == 4 * len(run.results) and all(e.passed for e in evals)
    mid = run.market_ids["SILVER_V1"]
    good = run.sink.query(f"SELECT * FROM candles WHERE market_id = {mid}").select(CANDLES.names)
    bad = good.with_columns(high=pl.when(pl.col("grain") == "1d").then(pl.col("high") * 2).otherwise(pl.col("high")))
    bad = bad.with_columns(vwap=pl.when(pl.col("grain") == "1h").then(pl.col("vwap") * 3).otherwise(pl.col("vwap")))
    run.sink.replace_market(CANDLES, mid, bad)
    verdict = {c.check_name: c.passed for c in check_candles(run.sink, mid)}
    assert verdict == {"candles_match_trades": False, "vwap_within_low_high": False,
                       "candle_volumes_sum_to_trades": True}
    run.sink.replace_market(CANDLES, mid, bad.filter(pl.col("grain") != "5m"))
    assert {c.check_name: c.passed for c in check_candles(run.sink, mid)}["candle_volumes_sum_to_trades"] is False
    run.sink.replace_market(CANDLES, mid, good)
    assert all(c.passed for c in check_candles(run.sink, mid))


def test_rematerializing_a_market_is_idempotent_under_its_name_and_its_legacy_numeric_key(run: Run) -> None:
    """An instance from before named partitions still holds keys "1".."12": they rebuild the same market."""
    mid = run.market_ids["ALUMINUM_V1"]
    q = {t: f"SELECT count(*) AS n FROM {t} WHERE market_id = {mid}"
         for t in ("trades_fact", "candles", "liquidity", "market_daily")}
    before = {t: run.sink.query(s)["n"][0] for t, s in q.items()}
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(markets.name, ["ALUMINUM_V1", str(mid)])
    for key in ("ALUMINUM_V1", str(mid)):
        r = materialize(analytics_assets, partition_key=key, instance=instance,
                        resources={"postgres": PostgresResource(database_url=run.pg), "analytics": run.resource})
        assert r.success, key
        assert r.asset_materializations_for_node("analytics_trades")[0].metadata["market_id"].value == mid
        assert {t: run.sink.query(s)["n"][0] for t, s in q.items()} == before, key
    assert before["trades_fact"] > 0
    instance.add_dynamic_partitions(markets.name, ["NO_SUCH_MARKET"])
    unknown = materialize(analytics_assets, partition_key="NO_SUCH_MARKET", instance=instance, raise_on_error=False,
                          selection=["analytics_trades"],
                          resources={"postgres": PostgresResource(database_url=run.pg), "analytics": run.resource})
    assert not unknown.success, "a key that names no market fails the run instead of writing anything"


def _drain(instance: DagsterInstance, postgres: PostgresResource, tick: SensorResult) -> tuple[list[RunRequest], str]:
    """Ticks until the sensor is quiet (its runs never start here, so each tick has the whole room): every request
    made, and the cursor after the last tick. Each tick asks for at most IN_FLIGHT runs."""
    requests: list[RunRequest] = []
    while tick.run_requests:
        assert len(tick.run_requests) <= IN_FLIGHT
        requests += tick.run_requests
        tick = market_registry_sensor(build_sensor_context(instance=instance, cursor=tick.cursor,
                                                           resources={"postgres": postgres}))
    return requests, tick.cursor or ""


def test_registry_sensor_moves_a_legacy_cursor_to_named_keys(pg: str) -> None:
    """A cursor written when keys were market ids: each traded market is rebuilt once under its name, then the
    sensor is quiet again; the legacy entries are dropped."""
    instance = DagsterInstance.ephemeral()
    postgres = PostgresResource(database_url=pg)
    with engine_for(pg).connect() as conn:
        marks = dict(conn.execute(text("SELECT market_id, max(block_number) FROM trades GROUP BY 1")).all())
        names = dict(conn.execute(text("SELECT market_id, metric_id FROM markets")).all())
    legacy = json.dumps({str(m): b for m, b in marks.items()})
    first = market_registry_sensor(build_sensor_context(instance=instance, cursor=legacy,
                                                        resources={"postgres": postgres}))
    for req in first.dynamic_partitions_requests:
        instance.add_dynamic_partitions(markets.name, list(req.partition_keys))
    requests, cursor = _drain(instance, postgres, first)
    assert sorted(r.partition_key for r in requests) == sorted(names[m] for m in marks)
    assert json.loads(cursor or "{}") == {names[m]: b for m, b in marks.items()}
    second = market_registry_sensor(build_sensor_context(instance=instance, cursor=cursor,
                                                         resources={"postgres": postgres}))
    assert second.run_requests == [] and second.dynamic_partitions_requests == []


def test_materialization_metadata_is_what_the_ui_draws(run: Run) -> None:
    """Numbers, text and markdown only (no chart spec the UI would show as raw JSON), with the useful figures."""
    drawn = (MarkdownMetadataValue, IntMetadataValue, FloatMetadataValue, TextMetadataValue, BoolMetadataValue)
    mid = run.market_ids["SILVER_V1"]
    result = run.results[mid]
    for node in ("analytics_trades", "analytics_candles", "analytics_liquidity", "analytics_market_daily"):
        meta = result.asset_materializations_for_node(node)[0].metadata  # type: ignore[attr-defined]
        assert all(isinstance(v, drawn) for v in meta.values()), {k: type(v) for k, v in meta.items()}
    candles = result.asset_materializations_for_node("analytics_candles")[0].metadata  # type: ignore[attr-defined]
    hourly = run.sink.query(f"SELECT close, vwap, twap FROM candles WHERE market_id = {mid} AND grain = '1h' "
                            "ORDER BY ts").to_dicts()
    assert candles["last_close"].value == pytest.approx(float(hourly[-1]["close"]))
    assert candles["last_vwap_1h"].value == pytest.approx(hourly[-1]["vwap"])
    assert candles["last_twap_1h"].value == pytest.approx(hourly[-1]["twap"])
    table = candles["hourly"].value
    assert "vwap" in table and "twap" in table and any(ch in table for ch in "▁▂▃▄▅▆▇█")


def test_market_daily_and_top_markets(run: Run) -> None:
    expected = _pg_trades(run.pg)
    for mid, trades in expected.items():
        days: dict[object, dict] = defaultdict(lambda: {"n": 0, "q": Decimal(0), "b": set(), "s": set()})
        from datetime import UTC, datetime
        for t in trades:
            d = days[datetime.fromtimestamp(t["ts"], UTC).date()]
            d["n"] += 1
            d["q"] += t["q"]
            d["b"].add(t["buyer"])
            d["s"].add(t["seller"])
        got = {g["day"]: g for g in _rows(run.sink, f"SELECT * FROM market_daily WHERE market_id = {mid}")}
        assert set(got) == set(days)
        for day, e in days.items():
            g = got[day]
            assert (g["trades"], Decimal(g["volume"]), g["buyers"], g["sellers"], g["traders"]) == \
                (e["n"], e["q"], len(e["b"]), len(e["s"]), len(e["b"] | e["s"]))
    notional = {mid: sum(float(t["p"] * t["q"]) for t in ts) for mid, ts in expected.items()}
    top = queries.top_markets_by_volume(run.sink, limit=5).to_dicts()
    assert [r["market_id"] for r in top] == sorted(notional, key=lambda m: (-notional[m], m))[:5]
    for r in top:
        assert r["notional"] == pytest.approx(notional[r["market_id"]], rel=1e-9)
        assert r["trades"] == len(expected[r["market_id"]])


def _metrics(bids: list[tuple[float, float]], asks: list[tuple[float, float]]) -> dict[str, float]:
    bb, ba = max(p for p, _ in bids), min(p for p, _ in asks)
    mid = (bb + ba) / 2
    return {"best_bid": bb, "best_ask": ba, "mid": mid, "spread": ba - bb,
            "bid_depth_1": sum(q for p, q in bids if p >= mid * 0.99),
            "ask_depth_2": sum(q for p, q in asks if p <= mid * 1.02),
            "bid_notional": sum(p * q for p, q in bids), "ask_notional": sum(p * q for p, q in asks)}


def test_liquidity_last_snapshot_equals_the_contract_book(run: Run, simulated_chain: DevChain) -> None:
    """Replayed (or snapshotted) book at the last event block against the contract's own levels at that block."""
    with engine_for(run.pg).connect() as conn:
        decimals = dict(conn.execute(text("SELECT metric_id, decimals FROM markets")).all())
    sources = set()
    compared = 0
    for metric, mid in run.market_ids.items():
        last = _rows(run.sink, f"SELECT * FROM liquidity WHERE market_id = {mid} ORDER BY block_number DESC LIMIT 1")
        assert last, metric
        row = last[0]
        sources.add(row["source"])
        s = 10 ** decimals[metric]
        bids, asks = _contract_levels(simulated_chain, metric, row["block_number"])
        if not bids or not asks:
            assert row["mid"] is None
            continue
        exp = _metrics([(p / s, q / s) for p, q, _ in bids], [(p / s, q / s) for p, q, _ in asks])
        for k, v in exp.items():
            assert row[k] == pytest.approx(v, rel=1e-9), (metric, k)
        compared += 1
    assert compared >= 8
    assert "replay" in sources
    series = queries.liquidity_over_time(run.sink, run.market_ids["COPPER_V1"], bucket_s=60)
    assert series.height >= 1 and series["snapshots"].sum() == run.sink.query(
        f"SELECT count(*) AS n FROM liquidity WHERE market_id = {run.market_ids['COPPER_V1']}")["n"][0]


def test_depth_snapshots_are_preferred_when_present(run: Run) -> None:
    with engine_for(run.pg).connect() as conn:
        n = conn.execute(text("SELECT count(*) FROM depth_snapshots")).scalar_one()
    assert n > 0, "the fixture stores depth snapshots for SNAPSHOT_MARKET"
    rows = _rows(run.sink, f"SELECT source FROM liquidity WHERE market_id = {run.market_ids[SNAPSHOT_MARKET]}")
    assert [r["source"] for r in rows] == ["depth_snapshots"]


def test_vwap_vs_mid_query(run: Run) -> None:
    for metric in ("SILVER_V1", "NICKEL_V1"):
        mid = run.market_ids[metric]
        df = queries.vwap_vs_mid(run.sink, mid)
        hours = run.sink.query(f"SELECT ts, vwap FROM candles WHERE market_id = {mid} AND grain = '1h'")
        liq = run.sink.query(f"SELECT ts, mid FROM liquidity WHERE market_id = {mid}").to_dicts()
        mids: dict[int, list[float]] = defaultdict(list)
        for r in liq:
            if r["mid"] is not None:
                mids[r["ts"] - r["ts"] % 3600].append(r["mid"])
        exp = {h: v for h, v in zip(hours["ts"].to_list(), hours["vwap"].to_list(), strict=True) if h in mids}
        assert exp, metric
        assert {r["hour"]: r["vwap"] for r in df.to_dicts()} == pytest.approx(exp)
        for r in df.to_dicts():
            m = sum(mids[r["hour"]]) / len(mids[r["hour"]])
            assert r["mid"] == pytest.approx(m, rel=1e-9)
            assert r["vwap_minus_mid_bps"] == pytest.approx((r["vwap"] - m) / m * 1e4, rel=1e-6, abs=1e-9)


def test_partition_keys_resolve_names_hashes_and_legacy_ids(database: str) -> None:
    """Keys are public names; an old numeric key still means that market_id, unless it is another market's name."""
    h = ["0x" + c * 64 for c in "abc"]
    with engine_for(database).begin() as conn:
        conn.execute(text(
            "INSERT INTO markets (market_id, chain_id, metric_id, metric_hash, source, status) OVERRIDING SYSTEM VALUE "
            "VALUES (100, 1, 'GOLD_V1', :h0, 'gen1', 'active'), (101, 1, NULL, :h1, 'gen1', 'unregistered'), "
            "(150, 1, '100', :h2, 'gen1', 'active')"), {"h0": h[0], "h1": h[1], "h2": h[2]})
    with engine_for(database).connect() as conn:
        assert resolve_partition(conn, "GOLD_V1") == (100, "GOLD_V1")
        assert resolve_partition(conn, h[1]) == (101, h[1])  # unregistered: named by its metric hash
        assert resolve_partition(conn, "101") == (101, h[1])  # a legacy numeric key
        assert resolve_partition(conn, "150") == (150, "100")
        assert resolve_partition(conn, "100") == (150, "100"), "a name beats a legacy id (market 100 is GOLD_V1)"
        with pytest.raises(LookupError):
            resolve_partition(conn, "SILVER_V1")


def test_registry_sensor_follows_renames_and_keeps_names_unique() -> None:
    instance = DagsterInstance.ephemeral()
    h = "0x" + "d" * 64
    first = plan_markets_tick(build_sensor_context(instance=instance), {1: "GOLD_V1", 2: h}, {1: 50, 2: 60})
    assert {r.run_key for r in first.run_requests} == {"GOLD_V1@50", f"{h}@60"}
    instance.add_dynamic_partitions(markets.name, ["GOLD_V1", h])
    # `orderbook markets register` names market 2: a new key, rebuilt once (its rows carry the new name).
    renamed = plan_markets_tick(build_sensor_context(instance=instance, cursor=first.cursor),
                                {1: "GOLD_V1", 2: "NICKEL_V2"}, {1: 50, 2: 60})
    assert [r.partition_key for r in renamed.run_requests] == ["NICKEL_V2"]
    assert [list(q.partition_keys) for q in renamed.dynamic_partitions_requests] == [["NICKEL_V2"]]
    # One name on two chains: the later market is keyed by its id, which resolves as well.
    assert partition_keys({3: "GOLD_V1", 9: "GOLD_V1", 4: "TIN_V1"}) == {3: "GOLD_V1", 4: "TIN_V1", 9: "9"}
