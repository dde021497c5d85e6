"""Asset checks on a real chain: they run with every ingestion partition and pass on the simulated history,
and after a row is corrupted they fail with metadata naming the market, level or order that differs."""

from __future__ import annotations

import json
from collections.abc import Iterator

import psycopg
import pytest
import yaml
from dagster import AssetCheckEvaluation, DagsterInstance, Definitions, materialize
from sqlalchemy import text
from sqlalchemy.engine import make_url

from orderbook_pipelines.assets.checks import asset_checks
from orderbook_pipelines.assets.ingestion import ingestion_assets
from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.config import load_config
from orderbook_pipelines.definitions import defs
from orderbook_pipelines.ingestion.ranges import range_key, ranges_up_to
from orderbook_pipelines.jobs import check_job
from orderbook_pipelines.partitions import block_ranges
from orderbook_pipelines.quality.checks import BOOK_CHECK, INVARIANTS_CHECK, check_books
from orderbook_pipelines.resources import ChainResource, PostgresResource, SettingsResource
from orderbook_pipelines.storage.db import drop_database, engine_for, libpq_url
from tests.conftest import DevChain, new_database


def _ranges(chain: DevChain) -> list[tuple[int, int]]:
    c = chain.config.chain
    return ranges_up_to(c.start_block, c.range_size, chain.anvil.w3.eth.block_number - c.confirmations)


@pytest.fixture(scope="module")
def wide_config(simulated_chain: DevChain, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The simulated chain's config with an order sample large enough to include every open order."""
    doc = yaml.safe_load(simulated_chain.config_path.read_text())
    doc["reconciliation"] = {"check_orders_per_run": 100_000}
    path = tmp_path_factory.mktemp("checks") / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def _resources(config_path: str, db: str) -> dict[str, object]:
    settings = SettingsResource(config_path=config_path)
    return {"settings": settings, "chain": ChainResource(settings=settings),
            "postgres": PostgresResource(database_url=db)}


def _evaluations(result) -> dict[str, AssetCheckEvaluation]:  # type: ignore[no-untyped-def]
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


@pytest.fixture(scope="module")
def checked(simulated_chain: DevChain, wide_config: str) -> Iterator[tuple[str, dict[str, list]]]:
    """Every range materialized by Dagster with the checks attached, as the ingestion job runs them."""
    db = new_database()
    instance = DagsterInstance.ephemeral()
    keys = [range_key(a, b) for a, b in _ranges(simulated_chain)]
    instance.add_dynamic_partitions(block_ranges.name, keys)
    evaluations: dict[str, list] = {BOOK_CHECK: [], INVARIANTS_CHECK: []}
    for key in keys:
        result = materialize([*ingestion_assets, *asset_checks], partition_key=key, instance=instance,
                             resources=_resources(wide_config, db))
        assert result.success, key
        for name, ev in _evaluations(result).items():
            evaluations[name].append(ev)
    yield db, evaluations
    drop_database(db)


def clone(db: str) -> str:
    """A copy of a test database (CREATE DATABASE … TEMPLATE), so corruption stays local to one test."""
    engine_for(db).dispose()
    src = make_url(libpq_url(db))
    dst = src.set(database=f"{src.database}_c{abs(hash(object())) % 10**6}")
    admin = libpq_url(src.set(database="postgres").render_as_string(hide_password=False))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dst.database}" TEMPLATE "{src.database}"')
    return dst.render_as_string(hide_password=False)


def test_checks_are_part_of_the_ingestion_job_and_blocking() -> None:
    job = defs.resolve_job_def("ingest_block_range")
    assert {f"orders_{BOOK_CHECK}", f"orders_{INVARIANTS_CHECK}"} <= set(job.graph.node_dict)
    for chk in asset_checks:
        assert all(spec.blocking for spec in chk.check_specs)


def test_checks_pass_on_every_range_of_the_simulated_chain(simulated_chain: DevChain,
                                                           checked: tuple[str, dict[str, list]]) -> None:
    db, evaluations = checked
    n = len(_ranges(simulated_chain))
    for name in (BOOK_CHECK, INVARIANTS_CHECK):
        assert len(evaluations[name]) == n
        assert all(ev.passed for ev in evaluations[name]), [ev.description for ev in evaluations[name]]
    last = evaluations[BOOK_CHECK][-1]
    assert last.metadata["markets_checked"].value == 12
    assert last.metadata["orders_checked"].value > 50
    with engine_for(db).connect() as conn:
        rows = conn.execute(text("SELECT check_name, count(*), bool_and(passed) FROM market_checks "
                                 "GROUP BY 1 ORDER BY 1")).all()
    assert {r[0]: (r[1], r[2]) for r in rows}[BOOK_CHECK] == (12 * n, True)


def _run_checks(config_path: str, db: str, key: str) -> dict[str, AssetCheckEvaluation]:
    """The `check_block_range` job: the checks alone, on stored data, as an operator re-runs them."""
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(block_ranges.name, [key])
    job = Definitions(assets=ingestion_assets, asset_checks=asset_checks, jobs=[check_job],
                      resources=_resources(config_path, db)).resolve_job_def("check_block_range")
    result = job.execute_in_process(tags={"dagster/partition": key}, instance=instance, raise_on_error=False)
    return _evaluations(result)


def test_a_corrupted_fill_amount_fails_both_checks_and_names_the_order(simulated_chain: DevChain,
                                                                       checked: tuple[str, dict], wide_config: str
                                                                       ) -> None:
    db = clone(checked[0])
    try:
        a, b = _ranges(simulated_chain)[-1]
        with engine_for(db).begin() as conn:
            victim = conn.execute(text(
                "SELECT o.contract, o.order_id, o.quantity, m.metric_id FROM orders o JOIN markets m USING "
                "(market_id) WHERE o.status = 'open' ORDER BY o.contract, o.order_id LIMIT 1")).one()
            conn.execute(text("UPDATE orders SET filled = quantity + 1, updated_block = :b "
                              "WHERE contract = :c AND order_id = :o"), {"c": victim.contract, "o": victim.order_id,
                                                                        "b": a})
        ev = _run_checks(wide_config, db, range_key(a, b))
        book, inv = ev[BOOK_CHECK], ev[INVARIANTS_CHECK]
        assert not book.passed and not inv.passed
        assert book.metadata["failed_markets"].value == victim.metric_id
        order = book.metadata["differences"].value[victim.metric_id]["orders"][0]
        assert order["order"] == f"{victim.contract}:{victim.order_id}"
        assert order["ours"]["filled"] == str(victim.quantity + 1) and order["chain"]["filled"] == "0"
        assert inv.metadata["violations"].value["overfilled"] == 1
        assert inv.metadata["examples"].value["overfilled"][0]["order_id"] == victim.order_id
        with engine_for(db).connect() as conn:
            failed = conn.execute(text("SELECT m.metric_id, c.check_name FROM market_checks c JOIN markets m "
                                       "USING (market_id) WHERE NOT c.passed AND c.range_start = :a ORDER BY 2"),
                                  {"a": a}).all()
        assert [tuple(r) for r in failed] == [(victim.metric_id, BOOK_CHECK), (victim.metric_id, INVARIANTS_CHECK)]
    finally:
        drop_database(db)


def test_a_lost_open_event_shows_as_a_different_level_and_a_fill_without_order(simulated_chain: DevChain,
                                                                               checked: tuple[str, dict],
                                                                               wide_config: str) -> None:
    db = clone(checked[0])
    try:
        ranges = _ranges(simulated_chain)
        a, b = ranges[-1]
        with engine_for(db).begin() as conn:
            # A partially filled resting order: removing its open changes a level and orphans its fills.
            victim = conn.execute(text(
                "SELECT o.market_id, o.contract, o.order_id, o.side, o.price, m.metric_id FROM orders o "
                "JOIN markets m USING (market_id) WHERE o.status = 'partially_filled' AND o.created_block >= :a0 "
                "ORDER BY o.contract, o.order_id LIMIT 1"), {"a0": ranges[0][0]}).one()
            conn.execute(text("DELETE FROM order_events WHERE contract = :c AND order_id = :o AND kind = 'open'"),
                         {"c": victim.contract, "o": victim.order_id})
            conn.execute(text("DELETE FROM orders WHERE contract = :c AND order_id = :o"),
                         {"c": victim.contract, "o": victim.order_id})
            fill_range = conn.execute(text(
                "SELECT max(block_number) FROM order_events WHERE contract = :c AND order_id = :o AND kind = 'fill'"),
                {"c": victim.contract, "o": victim.order_id}).scalar_one()
        ev = _run_checks(wide_config, db, range_key(a, b))
        book = ev[BOOK_CHECK]
        assert not book.passed
        diff = book.metadata["differences"].value[victim.metric_id]
        side = "bid" if victim.side == 0 else "ask"
        level = diff[f"{side}_levels"]
        assert victim.price in {int(x["price"]) for x in (level["ours"], level["chain"]) if x}
        # The invariant check of the range holding the orphaned fill names it.
        fr = next((x, y) for x, y in ranges if x <= fill_range <= y)
        inv = _run_checks(wide_config, db, range_key(*fr))[INVARIANTS_CHECK]
        assert not inv.passed
        assert any(v["order_id"] == victim.order_id for v in inv.metadata["examples"].value["fill_without_order"])
    finally:
        drop_database(db)


def test_a_range_with_missing_history_is_not_evaluated(simulated_chain: DevChain, wide_config: str) -> None:
    db = new_database()
    try:
        a, b = _ranges(simulated_chain)[-1]
        from orderbook_pipelines.ingestion.ingest import ingest_range

        cfg = load_config(wide_config)
        ingest_range(cfg, ChainClient(simulated_chain.anvil.url), engine_for(db), a, b)
        report = check_books(cfg, ChainClient(simulated_chain.anvil.url), engine_for(db), a, b)
        assert report.skipped and "are not ingested" in report.skipped
        assert report.markets == []
    finally:
        drop_database(db)


def test_invariants_of_ranges_committed_out_of_order(simulated_chain: DevChain, wide_config: str) -> None:
    """Two concurrent runs commit in any order: a later range's fills of orders opened in a range not stored yet,
    and a current book with a hole under it, are not judged (and not failed) until the history is there; then
    every range passes with every invariant evaluated."""
    from orderbook_pipelines.ingestion.ingest import ingest_range
    from orderbook_pipelines.quality.checks import check_invariants

    db = new_database()
    try:
        cfg, client, eng = load_config(wide_config), ChainClient(simulated_chain.anvil.url), engine_for(db)
        ranges = _ranges(simulated_chain)
        assert len(ranges) >= 3, ranges
        first, last = ranges[0], ranges[-1]
        ingest_range(cfg, client, eng, *last)
        with eng.connect() as conn:  # the situation is real: fills whose order is not stored yet
            orphans = conn.execute(text(
                "SELECT count(*) FROM order_events f WHERE f.kind = 'fill' AND NOT EXISTS (SELECT 1 FROM orders o "
                "WHERE o.contract = f.contract AND o.order_id = f.order_id)")).scalar_one()
        assert orphans > 0
        rep = check_invariants(cfg, eng, *last, record=False)
        assert rep.passed, rep.violations
        assert set(rep.not_evaluated) == {"fill_without_order", "crossed_book"}
        assert "are not ingested" in rep.not_evaluated["fill_without_order"]

        ingest_range(cfg, client, eng, *first)  # complete below itself, but the book also holds `last`
        rep = check_invariants(cfg, eng, *first, record=False)
        assert rep.passed, rep.violations
        assert set(rep.not_evaluated) == {"crossed_book"}

        for a, b in ranges[1:-1]:
            ingest_range(cfg, client, eng, a, b)
        for a, b in ranges:
            rep = check_invariants(cfg, eng, a, b, record=False)
            assert rep.passed and rep.not_evaluated == {}, ((a, b), rep.violations, rep.not_evaluated)
    finally:
        drop_database(db)


def _join_filter_discards(plan: dict) -> int:
    """Rows every node of an EXPLAIN ANALYZE plan read and then threw away in its join filter."""
    return int(plan.get("Rows Removed by Join Filter", 0)) + sum(_join_filter_discards(p)
                                                                 for p in plan.get("Plans", []))


@pytest.mark.parametrize("analyzed", ["events", "all"], ids=["as-a-backfill-leaves-them", "all-analyzed"])
def test_the_fill_check_looks_each_fill_up_once_however_large_its_markets(database: str, analyzed: str) -> None:
    """`fill_without_order` once compared every fill of a market with every order of that market: with the events'
    statistics fresh (ingestion analyzes a partition it grew), whether `orders` had statistics yet or not, Postgres
    merged the two on the market alone and filtered on the order id, quadratic in a market's size (half a second
    for the real mix's first range; 10^10 comparisons for a market with 100k orders and fills in one range). What
    is measured is the work the plan does, not its time: the rows it discards in join filters stay below one per
    fill (the old query discarded 223,593 here)."""
    from orderbook_pipelines.quality.checks import _INVARIANTS, invariant_violations
    from orderbook_pipelines.storage.writer import _analyze_grown

    markets, per_market = 20, 150
    fills = markets * per_market
    with engine_for(database).begin() as conn:
        for i in range(markets):
            conn.execute(text("INSERT INTO markets (chain_id, metric_id, metric_hash, source) "
                              "VALUES (31337, :m, :h, 'r')"), {"m": f"BUSY{i}_V1", "h": f"0x{i:064x}"})
        conn.execute(text("SELECT ensure_order_events_partitions(0, 1000, 1000000)"))
        # every market's orders, each with its open and one fill; the last fill names an order never opened
        conn.execute(text("""
            INSERT INTO orders (market_id, chain_id, contract, order_id, trader, side, order_type, price, quantity,
                                filled, remaining, status, fill_count, created_block, created_log, updated_block,
                                created_at, updated_at)
            SELECT m.market_id, 31337, '0xbook' || m.market_id, g::text, '0xt', 0, 1, 100, 10, 4, 6,
                   'partially_filled', 1, 1, g, 2, now(), now()
            FROM markets m CROSS JOIN generate_series(1, :n) g"""), {"n": per_market})
        conn.execute(text("""
            INSERT INTO order_events (chain_id, block_number, block_hash, block_time, tx_hash, tx_index, log_index,
                                      contract, market_id, source, event_name, kind, order_id, quantity, args)
            SELECT 31337, 1 + k, '0xh', now(), '0xtx', 0, m.market_id * 10000 + g, '0xbook' || m.market_id,
                   m.market_id, 'r', 'E', (ARRAY['open', 'fill'])[1 + k],
                   CASE WHEN k = 1 AND g = :n AND m.market_id = (SELECT max(market_id) FROM markets)
                        THEN 'never-opened' ELSE g::text END, 4, '{}'
            FROM markets m CROSS JOIN generate_series(1, :n) g CROSS JOIN generate_series(0, 1) k"""),
                     {"n": per_market})
        _analyze_grown(conn, 0, 10, 1_000_000, 2 * fills)  # what ingestion runs on a partition it grew
        if analyzed == "all":
            conn.execute(text("ANALYZE orders"))
    with engine_for(database).connect() as conn:
        plan = conn.execute(text(f"EXPLAIN (ANALYZE, FORMAT JSON) {_INVARIANTS['fill_without_order']} LIMIT 20"),
                            {"c": 31337, "s": 0, "e": 10}).scalar_one()[0]["Plan"]
        found = invariant_violations(conn, 31337, 0, 10)["fill_without_order"]
    assert _join_filter_discards(plan) < fills, json.dumps(plan)[:2000]
    assert [v["order_id"] for v in found] == ["never-opened"]
