"""Dagster wiring: the code location loads, and the head sensor plans ranges and runs without duplicates."""

from __future__ import annotations

import subprocess

import yaml
from dagster import DagsterInstance, Definitions, SensorResult, build_sensor_context

from orderbook_pipelines.config import PROJECT_ROOT
from orderbook_pipelines.definitions import defs
from orderbook_pipelines.ingestion.ranges import parse_range_key, range_key, ranges_up_to
from orderbook_pipelines.partitions import block_ranges
from orderbook_pipelines.resources import ChainResource, PostgresResource, SettingsResource
from orderbook_pipelines.sensors.chain_head import chain_head_sensor, plan_tick
from tests.conftest import DevChain


def test_definitions_load_and_name_the_ingestion_job() -> None:
    Definitions.validate_loadable(defs)
    job = defs.resolve_job_def("ingest_block_range")
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == {
        "order_events", "trades", "orders", "positions"}
    assert defs.resolve_sensor_def("chain_head_sensor").job_name == "ingest_block_range"


def test_workspace_points_at_the_definitions() -> None:
    text = (PROJECT_ROOT / "workspace.yaml").read_text()
    assert "module_name: orderbook_pipelines.definitions" in text


def test_range_keys_sort_in_chain_order_and_round_trip() -> None:
    ranges = ranges_up_to(7, 100, 1234)
    assert ranges[0] == (7, 106) and ranges[-1] == (1207, 1306) and len(ranges) == 13
    keys = [range_key(a, b) for a, b in ranges]
    assert sorted(keys) == keys
    assert [parse_range_key(k) for k in keys] == ranges


def _tick(instance: DagsterInstance, safe: int, stored: dict[int, int] | None = None,
          busy: set[str] | None = None) -> SensorResult:
    ctx = build_sensor_context(instance=instance)
    result = plan_tick(ctx, start_block=10, range_size=100, tip_interval=20, safe=safe, stored=stored or {},
                       busy=busy or set())
    assert isinstance(result, SensorResult)
    for req in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(block_ranges.name, list(req.partition_keys))
    return result


def _keys(result: SensorResult) -> list[str]:
    return [r.partition_key for r in result.run_requests]


def test_sensor_requests_what_checkpoints_do_not_cover_and_the_tip_as_it_grows() -> None:
    instance = DagsterInstance.ephemeral()
    first = _tick(instance, safe=259)  # ranges 10-109, 110-209 complete; 210-309 open at 259
    assert _keys(first) == [range_key(10, 109), range_key(110, 209), range_key(210, 309)]
    assert set(instance.get_dynamic_partitions(block_ranges.name)) == {
        range_key(10, 109), range_key(110, 209), range_key(210, 309)}
    stored = {10: 109, 110: 209, 210: 259}  # what those runs committed
    assert _tick(instance, safe=265, stored=stored).run_requests == []  # 6 more final blocks: under the interval
    later = _tick(instance, safe=330, stored=stored)  # 210-309 can complete; 310-409 has 21 final blocks (>= 20)
    assert _keys(later) == [range_key(210, 309), range_key(310, 409)]


def test_sensor_never_requests_a_range_that_is_queued_or_running() -> None:
    """Runs piling up for the same range (a tip range requested every few blocks while queued) is the bug."""
    instance = DagsterInstance.ephemeral()
    busy = {range_key(10, 109), range_key(210, 309)}
    assert _keys(_tick(instance, safe=290, busy=busy)) == [range_key(110, 209)]


def test_a_range_whose_run_died_without_a_checkpoint_is_requested_again() -> None:
    """A killed run commits nothing (one transaction per range), so its range is simply still uncovered."""
    instance = DagsterInstance.ephemeral()
    assert _keys(_tick(instance, safe=309)) == [range_key(10, 109), range_key(110, 209), range_key(210, 309)]
    again = _tick(instance, safe=309, stored={10: 109, 210: 309})  # 110-209's run was SIGKILLed
    assert _keys(again) == [range_key(110, 209)]


def test_busy_partitions_are_in_flight_runs_and_fresh_failures_only() -> None:
    from datetime import UTC, datetime, timedelta

    from dagster import DagsterRunStatus
    from dagster._core.test_utils import create_run_for_test

    from orderbook_pipelines.sensors.chain_head import RETRY_AFTER, busy_partitions

    instance = DagsterInstance.ephemeral()
    for key, status in (("q", DagsterRunStatus.NOT_STARTED), ("s", DagsterRunStatus.STARTED),
                        ("ok", DagsterRunStatus.SUCCESS), ("f", DagsterRunStatus.FAILURE)):
        create_run_for_test(instance, job_name="ingest_block_range", status=status,
                            tags={"dagster/partition": key})
    create_run_for_test(instance, job_name="other_job", status=DagsterRunStatus.STARTED,
                        tags={"dagster/partition": "other"})
    assert busy_partitions(instance, "ingest_block_range") == {"q", "s", "f"}
    later = datetime.now(UTC) + RETRY_AFTER + timedelta(seconds=5)
    assert busy_partitions(instance, "ingest_block_range", now=later) == {"q", "s"}  # the failure may retry


def test_sensor_caps_the_runs_of_one_tick_and_catches_up_on_the_next() -> None:
    instance = DagsterInstance.ephemeral()
    safe = 10 + 100 * 40 - 1  # 40 complete ranges
    first = _tick(instance, safe=safe)
    assert len(first.run_requests) == 25
    second = _tick(instance, safe=safe, busy=set(_keys(first)))  # the first 25 are queued now
    assert len(second.run_requests) == 15
    assert set(_keys(first)).isdisjoint(_keys(second))


def test_sensor_against_the_real_chain(simulated_chain: DevChain, database: str) -> None:
    settings = SettingsResource(config_path=str(simulated_chain.config_path))
    instance = DagsterInstance.ephemeral()
    resources = {"settings": settings, "chain": ChainResource(settings=settings),
                 "postgres": PostgresResource(database_url=database)}
    with build_sensor_context(instance=instance, resources=resources) as ctx:
        result = chain_head_sensor(ctx)
    cfg = simulated_chain.config.chain
    safe = simulated_chain.anvil.w3.eth.block_number - cfg.confirmations
    assert isinstance(result, SensorResult)
    expected = ranges_up_to(cfg.start_block, cfg.range_size, safe)
    assert list(result.dynamic_partitions_requests[0].partition_keys) == [range_key(a, b) for a, b in expected]
    assert [r.partition_key for r in result.run_requests] == [range_key(a, b) for a, b in expected][:25]


def test_sensor_skips_with_the_reason_when_the_chain_is_down(tmp_path, simulated_chain: DevChain) -> None:
    doc = yaml.safe_load(simulated_chain.config_path.read_text())
    doc["chain"] |= {"rpc_url": "http://127.0.0.1:9", "rpc_retries": 0}
    path = tmp_path / "down.yaml"
    path.write_text(yaml.safe_dump(doc))
    settings = SettingsResource(config_path=str(path))
    with build_sensor_context(instance=DagsterInstance.ephemeral(),
                              resources={"settings": settings, "chain": ChainResource(settings=settings),
                                         "postgres": PostgresResource()}) as ctx:
        result = chain_head_sensor(ctx)
    assert "cannot read the chain head" in str(result.skip_message)


def test_committed_contract_artifacts_match_the_sources() -> None:
    proc = subprocess.run(["node", "contracts/build.mjs", "--check"], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_purge_job_deletes_old_runs_and_keeps_recent_ones() -> None:
    from dagster import DagsterInstance, RunsFilter, job, op

    from orderbook_pipelines.jobs import purge_dagster_runs

    @op
    def noop() -> None:
        pass

    @job
    def tiny() -> None:
        noop()

    instance = DagsterInstance.ephemeral()
    for _ in range(3):
        assert tiny.execute_in_process(instance=instance).success
    keep = purge_dagster_runs.execute_in_process(instance=instance, run_config={
        "ops": {"purge_runs": {"config": {"success_days": 1}}}})
    assert keep.output_for_node("purge_runs") == 0
    assert len(instance.get_run_records(filters=RunsFilter(job_name="tiny"))) == 3
    purged = purge_dagster_runs.execute_in_process(instance=instance, run_config={
        "ops": {"purge_runs": {"config": {"success_days": 0}}}})
    assert purged.output_for_node("purge_runs") >= 3
    assert instance.get_run_records(filters=RunsFilter(job_name="tiny")) == []
