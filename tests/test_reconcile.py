"""Reconciliation on a real anvil chain: a reorg deeper than the confirmation depth (made with evm_snapshot /
evm_revert after the ranges were ingested as final), lost events, the rewrite cap, and a clean chain."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from web3 import Web3

from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.devchain.deploy import artifact
from orderbook_pipelines.devchain.simulator import Simulator
from orderbook_pipelines.ingestion.ingest import ingest_range
from orderbook_pipelines.ingestion.ranges import ranges_up_to
from orderbook_pipelines.ingestion.reconcile import RepairCapExceeded, reconcile
from orderbook_pipelines.storage.db import drop_database, engine_for
from tests.conftest import Anvil, DevChain, make_devchain, new_database
from tests.test_ingestion_e2e import ORDERS_SQL, POSITIONS_SQL, TRADES_SQL

EVENTS_SQL = "SELECT block_number, log_index, block_hash, kind, market_id FROM order_events ORDER BY 1, 2"
CHECKPOINTS_SQL = "SELECT range_start, range_end, processed_to, last_hash FROM ingestion_checkpoints ORDER BY 1"


def _table(db: str, sql: str) -> list[tuple]:
    with engine_for(db).connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql))]


def _fresh_state(chain: DevChain, ranges: list[tuple[int, int]]) -> tuple:
    """The state a clean ingestion of `ranges` on today's chain gives: what a repair must converge to."""
    fresh = new_database()
    try:
        _ingest(chain, fresh, ranges)
        return _state(fresh)
    finally:
        drop_database(fresh)


def _state(db: str) -> list[list[tuple]]:
    return [_table(db, q) for q in (ORDERS_SQL, TRADES_SQL, POSITIONS_SQL, EVENTS_SQL, CHECKPOINTS_SQL)]


def _ingest(chain: DevChain, db: str, ranges: list[tuple[int, int]]) -> None:
    cfg = chain.config
    client = ChainClient(chain.anvil.url)
    for a, b in ranges:
        ingest_range(cfg, client, engine_for(db), a, b)


def _all_ranges(chain: DevChain) -> list[tuple[int, int]]:
    c = chain.config.chain
    return ranges_up_to(c.start_block, c.range_size, chain.anvil.w3.eth.block_number - c.confirmations)


def _stored_ranges(db: str) -> list[tuple[int, int]]:
    return [(r[0], r[1]) for r in _table(db, CHECKPOINTS_SQL)]


@pytest.fixture
def small_chain(anvil_factory: type[Anvil], tmp_path: Path) -> DevChain:
    return make_devchain(anvil_factory(), tmp_path, ["SILVER_V1", "GOLD_V1"], ["ALUMINUM_V1"], confirmations=0,
                         range_size=5)


@pytest.fixture
def forked(small_chain: DevChain, database: str) -> Iterator[tuple[DevChain, str]]:
    """Ranges ingested as final (confirmations=0), then the last blocks replaced by a different, longer history."""
    anvil = small_chain.anvil
    Simulator(anvil.w3, small_chain.dep, seed=1).run_batches(40, per_block=8)
    snapshot = anvil.rpc("evm_snapshot")
    Simulator(anvil.w3, small_chain.dep, seed=2).run_batches(60, per_block=6)
    _ingest(small_chain, database, _all_ranges(small_chain))
    anvil.rpc("evm_revert", snapshot)
    Simulator(anvil.w3, small_chain.dep, seed=3).run_batches(80, per_block=5)
    anvil.mine(3)
    yield small_chain, database


def test_deep_reorg_is_repaired_to_what_a_fresh_ingestion_of_the_new_chain_gives(forked: tuple[DevChain, str]
                                                                                  ) -> None:
    chain, db = forked
    before = _state(db)
    stored_ranges = _stored_ranges(db)
    w3 = chain.anvil.w3
    stored_blocks = _table(db, "SELECT number, hash FROM blocks ORDER BY number")
    differing = [n for n, h in stored_blocks if w3.eth.get_block(n)["hash"].to_0x_hex() != h]
    assert differing, "the fork must have replaced stored (final) blocks"
    report = reconcile(chain.config, ChainClient(chain.anvil.url), engine_for(db),
                       lookback_ranges=len(stored_ranges))

    expected = _fresh_state(chain, _stored_ranges(db))
    assert before[:4] != expected[:4], "the fork must have changed the indexed state, or the test proves nothing"
    assert _state(db) == expected

    assert report.repaired and report.reorg is not None
    assert report.events_deleted > 0 and report.events_inserted > 0
    assert report.events_inserted == len(expected[3]) - (len(before[3]) - report.events_deleted)
    fork = report.reorg.fork_block
    assert fork == differing[0]
    assert report.max_reorg_depth == differing[-1] - differing[0] + 1
    # Every repaired range holds the fork; ranges wholly below it were left alone.
    assert all(b >= fork for a, b in ((int(k[:12]), int(k[13:])) for k in report.ranges_repaired))
    with engine_for(db).connect() as conn:
        row = conn.execute(text("SELECT fork_block, depth, old_hash, new_hash, repaired, events_deleted "
                                "FROM reorgs")).one()
    assert (row.fork_block, row.depth, row.repaired, row.events_deleted) == (
        fork, report.max_reorg_depth, True, report.events_deleted)
    assert row.old_hash != row.new_hash
    assert row.new_hash == chain.anvil.w3.eth.get_block(fork)["hash"].to_0x_hex()
    assert reconcile(chain.config, ChainClient(chain.anvil.url), engine_for(db),
                     lookback_ranges=len(stored_ranges)).mismatched == []


def test_after_the_repair_open_orders_equal_the_contract_views(forked: tuple[DevChain, str]) -> None:
    chain, db = forked
    reconcile(chain.config, ChainClient(chain.anvil.url), engine_for(db), lookback_ranges=100)
    w3 = chain.anvil.w3
    router = w3.eth.contract(address=Web3.to_checksum_address(chain.dep.router), abi=artifact("OrderRouter")["abi"])
    last = max(r[2] for r in _table(db, CHECKPOINTS_SQL))
    rows = _table(db, f"SELECT order_id, quantity, filled, status FROM orders WHERE contract = '{chain.dep.router}'")
    assert sorted(int(r[0]) for r in rows) == list(range(1, router.functions.nextOrderId().call(
        block_identifier=last)))
    for oid, qty, filled, status in rows:
        o = router.functions.getOrder(int(oid)).call(block_identifier=last)
        assert (o[6], o[7]) == (qty, filled), oid
        assert (o[8] == 1) == (status in ("open", "partially_filled")), oid


def test_repair_above_the_cap_touches_nothing_and_says_how_much(forked: tuple[DevChain, str]) -> None:
    chain, db = forked
    before = _state(db)
    with pytest.raises(RepairCapExceeded, match=r"would rewrite (\d+) events .* above the cap of 5; nothing"):
        reconcile(chain.config, ChainClient(chain.anvil.url), engine_for(db), lookback_ranges=100,
                  max_repair_events=5)
    assert _state(db) == before
    # The incident is still on record (not repaired), so the alert does not depend on the run's logs.
    assert _table(db, "SELECT repaired FROM reorgs") == [(False,)]


def test_lost_events_without_a_reorg_are_restored(small_chain: DevChain, database: str) -> None:
    Simulator(small_chain.anvil.w3, small_chain.dep, seed=5).run_batches(60, per_block=6)
    _ingest(small_chain, database, _all_ranges(small_chain))
    before = _state(database)
    with engine_for(database).begin() as conn:
        lost = conn.execute(text("DELETE FROM order_events WHERE (block_number, log_index) IN (SELECT block_number, "
                                 "log_index FROM order_events ORDER BY block_number DESC, log_index LIMIT 7)"))
        assert lost.rowcount == 7
    report = reconcile(small_chain.config, ChainClient(small_chain.anvil.url), engine_for(database),
                       lookback_ranges=100)
    assert report.reorg is None
    assert sum(d.missing for d in report.mismatched) == 7 and sum(d.extra for d in report.mismatched) == 0
    assert report.repaired
    assert _state(database)[:4] == before[:4]
    assert _table(database, "SELECT count(*) FROM reorgs") == [(0,)]


def test_dry_run_reports_without_repairing(forked: tuple[DevChain, str]) -> None:
    chain, db = forked
    before = _state(db)
    report = reconcile(chain.config, ChainClient(chain.anvil.url), engine_for(db), lookback_ranges=100,
                       repair=False)
    assert report.mismatched and not report.repaired and report.reorg is not None
    assert _state(db) == before
    meta = report.metadata()
    assert meta["ranges_mismatched"] == len(report.mismatched) and meta["events_deleted"] == 0


@pytest.fixture(scope="module")
def indexed_sim(simulated_chain: DevChain) -> Iterator[str]:
    db = new_database()
    _ingest(simulated_chain, db, _all_ranges(simulated_chain))
    yield db
    drop_database(db)


def test_a_clean_chain_needs_no_repair(simulated_chain: DevChain, indexed_sim: str) -> None:
    before = _state(indexed_sim)
    report = reconcile(simulated_chain.config, ChainClient(simulated_chain.anvil.url), engine_for(indexed_sim),
                       lookback_ranges=1000)
    assert report.ranges_checked == len(before[4]) > 3
    assert report.mismatched == [] and report.reorg is None and not report.repaired
    assert sum(d.chain_events for d in report.diffs) == len(before[3]) > 1000
    assert _state(indexed_sim) == before


def test_dagster_ingestion_fails_on_the_fork_the_sensor_asks_for_reconciliation_which_repairs_loudly(
        forked: tuple[DevChain, str]) -> None:
    from dagster import (
        DagsterEventType,
        DagsterInstance,
        RunRequest,
        build_run_status_sensor_context,
        materialize,
    )

    from orderbook_pipelines.assets.ingestion import ingestion_assets
    from orderbook_pipelines.assets.reconciliation import chain_reconciliation
    from orderbook_pipelines.ingestion.ranges import range_key
    from orderbook_pipelines.partitions import block_ranges
    from orderbook_pipelines.resources import ChainResource, PostgresResource, SettingsResource
    from orderbook_pipelines.sensors.reconciliation import reorg_failure_sensor

    chain, db = forked
    settings = SettingsResource(config_path=str(chain.config_path))
    resources = {"settings": settings, "chain": ChainResource(settings=settings),
                 "postgres": PostgresResource(database_url=db)}
    instance = DagsterInstance.ephemeral()
    key = range_key(*_stored_ranges(db)[-1])
    instance.add_dynamic_partitions(block_ranges.name, [key])
    failed = materialize(ingestion_assets, partition_key=key, instance=instance, resources=resources,
                         raise_on_error=False)
    assert not failed.success
    entry = instance.all_logs(failed.run_id, of_type=DagsterEventType.RUN_FAILURE)[0]
    ctx = build_run_status_sensor_context(sensor_name="reorg_failure_sensor", dagster_event=entry.dagster_event,
                                          dagster_instance=instance, dagster_run=failed.dagster_run
                                          ).for_run_failure()
    request = reorg_failure_sensor(ctx)
    assert isinstance(request, RunRequest) and request.tags["obp/failed_run"] == failed.run_id

    run_config = {"ops": {"chain_reconciliation": {"config": {"lookback_ranges": 100}}}}
    first = materialize([chain_reconciliation], instance=instance, resources=resources, run_config=run_config,
                        raise_on_error=False)
    assert not first.success  # repaired, but a deep reorg is an incident: the run fails loudly
    failure = next(e for e in first.all_events if e.event_type == DagsterEventType.STEP_FAILURE)
    message = failure.step_failure_data.user_failure_data.description
    assert "REORG DEEPER THAN THE CONFIRMATION DEPTH (0)" in message and "Repaired:" in message
    second = materialize([chain_reconciliation], instance=instance, resources=resources, run_config=run_config)
    meta = second.asset_materializations_for_node("chain_reconciliation")[0].metadata
    assert meta["ranges_mismatched"].value == 0 and meta["ranges_checked"].value == len(_stored_ranges(db))
    again = materialize(ingestion_assets, partition_key=key, instance=instance, resources=resources)
    assert again.success


def test_repair_drops_depth_snapshots_built_on_the_replaced_history(forked: tuple[DevChain, str],
                                                                    tmp_path: Path) -> None:
    from orderbook_pipelines.recovery.restore import build_snapshots
    from orderbook_pipelines.recovery.store import store_snapshots

    chain, db = forked
    stored = _stored_ranges(db)
    for (done,) in _table(db, "SELECT processed_to FROM ingestion_checkpoints ORDER BY range_start"):
        snaps, _ = build_snapshots(engine_for(db), at_block=done)
        store_snapshots(engine_for(db), snaps, tmp_path)
    report = reconcile(chain.config, ChainClient(chain.anvil.url), engine_for(db), lookback_ranges=len(stored))
    first_repaired = min(int(k[:12]) for k in report.ranges_repaired)
    blocks = [b for (b,) in _table(db, "SELECT DISTINCT block_number FROM depth_snapshots ORDER BY 1")]
    assert blocks and all(b < first_repaired for b in blocks)  # older snapshots stay, forked ones are gone
    assert _table(db, "SELECT count(*) FROM snapshot_orders o LEFT JOIN depth_snapshots d USING "
                      "(market_id, block_number) WHERE d.market_id IS NULL") == [(0,)]


def test_a_repair_cut_off_by_the_rpc_changes_nothing_and_a_rerun_completes(forked: tuple[DevChain, str]) -> None:
    """Each range is deleted, re-ingested and re-projected in one transaction: an RPC that dies after the
    comparison (during the re-ingestion) must leave the old rows and checkpoints, never a hole."""
    from orderbook_pipelines.chain.rpc import RpcError
    from tests.rpc_proxy import RpcProxy, fail_get_logs_after

    chain, db = forked
    before = _state(db)
    cp_sql = "SELECT range_start, processed_to, last_hash FROM ingestion_checkpoints ORDER BY 1"
    checkpoints = _table(db, cp_sql)
    with RpcProxy(chain.anvil.url, lambda _req, _n: None) as counting:
        reconcile(chain.config, ChainClient(counting.url), engine_for(db), lookback_ranges=100, repair=False)
        comparison_calls = counting.calls["eth_getLogs"]
    with RpcProxy(chain.anvil.url, fail_get_logs_after(comparison_calls)) as dying:
        with pytest.raises(RpcError, match="503"):
            reconcile(chain.config, ChainClient(dying.url, retries=0), engine_for(db), lookback_ranges=100)
        assert dying.calls["eth_getLogs"] > comparison_calls  # it did reach the re-ingestion
    assert _state(db) == before
    assert _table(db, cp_sql) == checkpoints
    report = reconcile(chain.config, ChainClient(chain.anvil.url), engine_for(db), lookback_ranges=100)
    assert report.repaired and _state(db) != before
