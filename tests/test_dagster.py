"""Dagster wiring: the code location loads, and the head sensor plans ranges and runs without duplicates."""

from __future__ import annotations

import subprocess
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import yaml
from dagster import (
    DagsterEvent,
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    Definitions,
    SensorResult,
    build_sensor_context,
)
from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteRepositoryOrigin
from dagster._core.test_utils import create_run_for_test

from orderbook_pipelines.config import PROJECT_ROOT
from orderbook_pipelines.definitions import defs
from orderbook_pipelines.ingestion.ranges import parse_range_key, range_key, ranges_up_to
from orderbook_pipelines.partitions import block_ranges
from orderbook_pipelines.resources import ChainResource, PostgresResource, SettingsResource
from orderbook_pipelines.sensors.busy import RETRY_AFTER, busy_partitions
from orderbook_pipelines.sensors.chain_head import MAX_RUNS_PER_TICK, chain_head_sensor, plan_tick
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
    result = plan_tick(ctx, start_block=10, range_size=100, safe=safe, stored=stored or {}, busy=busy or set())
    assert isinstance(result, SensorResult)
    for req in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(block_ranges.name, list(req.partition_keys))
    return result


def _keys(result: SensorResult) -> list[str]:
    return [r.partition_key for r in result.run_requests]


def test_sensor_requests_each_range_once_when_it_becomes_final_and_never_an_open_one() -> None:
    instance = DagsterInstance.ephemeral()
    first = _tick(instance, safe=259)  # ranges 10-109, 110-209 final; 210-309 open at 259
    assert _keys(first) == [range_key(10, 109), range_key(110, 209)]
    assert set(instance.get_dynamic_partitions(block_ranges.name)) == {range_key(10, 109), range_key(110, 209)}
    stored = {10: 109, 110: 209}  # what those runs committed
    assert _tick(instance, safe=308, stored=stored).run_requests == []  # 210-309 still open: nothing to run
    later = _tick(instance, safe=330, stored=stored)  # 210-309 became final; 310-409 is open
    assert _keys(later) == [range_key(210, 309)]
    assert _tick(instance, safe=340, stored={**stored, 210: 309}).run_requests == []  # done once, not again


def test_sensor_never_requests_a_range_that_is_queued_or_running() -> None:
    """Runs piling up for the same range (a range requested every few blocks while queued) is the bug."""
    instance = DagsterInstance.ephemeral()
    busy = {range_key(10, 109), range_key(210, 309)}
    assert _keys(_tick(instance, safe=310, busy=busy)) == [range_key(110, 209)]


def test_a_range_whose_run_died_without_a_checkpoint_is_requested_again() -> None:
    """A killed run commits nothing (one transaction per range), so its range is simply still uncovered."""
    instance = DagsterInstance.ephemeral()
    assert _keys(_tick(instance, safe=309)) == [range_key(10, 109), range_key(110, 209), range_key(210, 309)]
    again = _tick(instance, safe=309, stored={10: 109, 210: 309})  # 110-209's run was SIGKILLed
    assert _keys(again) == [range_key(110, 209)]


def test_busy_partitions_are_in_flight_runs_and_fresh_failures_only() -> None:
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
    expected = [(a, b) for a, b in ranges_up_to(cfg.start_block, cfg.range_size, safe) if b <= safe]
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


@dataclass
class _SimRun:
    """One ingestion run in the simulated queue: queued, then started (it reads the safe head), then over."""

    run: DagsterRun
    key: str
    first: int
    last: int
    requested_tick: int
    reads_safe: int = -1


def _report(instance: DagsterInstance, run: DagsterRun, event: DagsterEventType, at: datetime) -> None:
    instance.report_dagster_event(DagsterEvent(event_type_value=event.value, job_name=run.job_name), run.run_id,
                                  timestamp=at.timestamp())


def test_head_sensor_over_many_ticks_with_a_run_queue() -> None:
    """The sensor against a run queue that lags: runs requested by one tick wait QUEUED ticks, run RUNNING ticks,
    then commit their checkpoint (up to the safe head they read when they started) or, for two ranges, fail once.

    Over the whole history: never a request for a range whose run is queued or running; a failed range is
    requested again at the first tick after RETRY_AFTER and not before; an open range is never requested, a final
    one once (twice after a failure); and nothing the chain made final is left behind.
    """
    start, size, job = 10, 100, "ingest_block_range"
    tick_every, queued, running = timedelta(seconds=15), 2, 2
    fail_once = {range_key(110, 209), range_key(410, 509)}
    instance = DagsterInstance.ephemeral()
    origin = RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("orderbook_pipelines"),
                                    "__repository__").get_job_origin(job)  # a queued run names its code location
    t0 = datetime.now(UTC)
    stored: dict[int, int] = {}
    in_flight: dict[str, _SimRun] = {}
    failed_at: dict[str, datetime] = {}
    requested: dict[str, list[int]] = {}
    safe = 150
    for tick in range(90):
        now = t0 + tick * tick_every
        if tick < 60:
            safe += 9  # the chain makes 9 more blocks final between two sensor ticks, then stops
        for key, sim in list(in_flight.items()):  # the queue moves between two ticks
            age = tick - sim.requested_tick
            if age == queued:
                sim.reads_safe = safe
                _report(instance, sim.run, DagsterEventType.RUN_START, now - timedelta(seconds=10))
            elif age == queued + running:
                del in_flight[key]
                if key in fail_once and key not in failed_at:
                    failed_at[key] = now - timedelta(seconds=5)
                    _report(instance, sim.run, DagsterEventType.RUN_FAILURE, failed_at[key])
                else:
                    stored[sim.first] = max(stored.get(sim.first, sim.first - 1), min(sim.last, sim.reads_safe))
                    _report(instance, sim.run, DagsterEventType.RUN_SUCCESS, now - timedelta(seconds=5))

        result = plan_tick(build_sensor_context(instance=instance), start_block=start, range_size=size,
                           safe=safe, stored=dict(stored),
                           busy=busy_partitions(instance, job, now=now))
        assert isinstance(result, SensorResult)
        for req in result.dynamic_partitions_requests:
            instance.add_dynamic_partitions(block_ranges.name, list(req.partition_keys))
        keys = _keys(result)
        assert len(keys) == len(set(keys)) and len(keys) < MAX_RUNS_PER_TICK
        for key in keys:
            a, b = parse_range_key(key)
            have = stored.get(a, a - 1)
            assert key not in in_flight, f"tick {tick}: {key} requested while its run is queued or running"
            if key in failed_at and len(requested[key]) == 1:
                assert now - failed_at[key] >= RETRY_AFTER, f"tick {tick}: {key} retried before the back-off"
            assert b <= safe, f"tick {tick}: open range {key} requested at safe head {safe}"
            assert have < b, f"tick {tick}: {key} requested although stored to its end"
            run = create_run_for_test(instance, job_name=job, status=DagsterRunStatus.QUEUED, remote_job_origin=origin,
                                      tags={"dagster/partition": key})
            in_flight[key] = _SimRun(run, key, a, b, tick)
            requested.setdefault(key, []).append(tick)
        # Nothing that should run is held back: every range with work to do and no run queued, running or in
        # its back-off was requested on this tick.
        for a, b in ranges_up_to(start, size, safe):
            key, have = range_key(a, b), stored.get(a, a - 1)
            due = b <= safe and have < b
            waiting = key in in_flight and tick not in requested[key]
            backing_off = key in failed_at and now - failed_at[key] < RETRY_AFTER
            if due and not waiting and not backing_off:
                assert key in keys, f"tick {tick}: {key} has {safe - have} blocks to ingest but was not requested"

    assert in_flight == {}
    for key, at in failed_at.items():
        retry = t0 + requested[key][1] * tick_every
        assert RETRY_AFTER <= retry - at < RETRY_AFTER + tick_every, key  # the first tick after the back-off
        assert len(requested[key]) == 2 and parse_range_key(key)[1] <= stored[parse_range_key(key)[0]]
    assert set(failed_at) == fail_once
    assert all(len(ticks) == 1 for key, ticks in requested.items() if key not in fail_once), "one request a range"
    complete = [(a, b) for a, b in ranges_up_to(start, size, safe) if b <= safe]
    assert all(stored[a] == b for a, b in complete), "every complete range is stored to its end"
    a, b = ranges_up_to(start, size, safe)[-1]
    assert b > safe and a not in stored, "the open range is left to the live service"


def test_analytics_sensor_queues_only_what_can_run_and_serves_the_stalest_market_first() -> None:
    """Twelve markets trading at every tick: the run queue never holds more than IN_FLIGHT analytics runs, the
    backlog waits in the cursor, and every market is served within a round of ticks (none starves)."""
    from dagster import build_sensor_context

    from orderbook_pipelines.sensors.analytics import IN_FLIGHT, plan_markets_tick
    from orderbook_pipelines.sensors.busy import in_flight

    instance = DagsterInstance.ephemeral()
    names = {m: f"M{m:02d}" for m in range(1, 13)}
    cursor, served = None, []
    for tick in range(24):
        queued = instance.get_run_records()
        if tick % 2 == 0:  # runs finish every other tick: a tick between finds the room taken
            for run in queued:
                instance.delete_run(run.dagster_run.run_id)
        running = in_flight(instance, "analytics_market")
        marks = {m: 100 + tick for m in names}  # every market traded again
        result = plan_markets_tick(build_sensor_context(instance=instance, cursor=cursor), names, marks,
                                   busy_partitions(instance, "analytics_market"), IN_FLIGHT - len(running))
        assert len(result.run_requests) == (IN_FLIGHT if tick % 2 == 0 else 0), (tick, running)
        cursor = result.cursor
        for r in result.run_requests:
            create_run_for_test(instance, job_name="analytics_market", status=DagsterRunStatus.STARTING,
                                tags={"dagster/partition": r.partition_key})
            served.append((tick, r.partition_key))
    assert len(served) == 12 * IN_FLIGHT
    assert Counter(k for _, k in served) == dict.fromkeys(names.values(), 12 * IN_FLIGHT // len(names))  # no starving
    first_round = [k for _, k in served[:len(names)]]
    assert sorted(first_round) == sorted(names.values()), "every market once before any market twice"
    assert [k for _, k in served[len(names):2 * len(names)]] == first_round, "then in the same order again"
    assert plan_markets_tick(build_sensor_context(instance=instance, cursor=cursor), names, marks, set(),
                             0).run_requests == [], "no room, no request"


def test_analytics_sensor_requests_a_market_again_only_after_its_run_left_the_queue() -> None:
    """Every market trades at every tick on a busy chain: one queued run per market, then its latest mark."""
    from dagster import build_sensor_context

    from orderbook_pipelines.sensors.analytics import plan_markets_tick

    instance = DagsterInstance.ephemeral()
    names = {1: "GOLD_V1", 2: "SILVER_V1"}
    first = plan_markets_tick(build_sensor_context(instance=instance), names, {1: 50, 2: 60},
                              busy_partitions(instance, "analytics_market"))
    assert sorted((r.partition_key, r.run_key) for r in first.run_requests) == [("GOLD_V1", "GOLD_V1@50"),
                                                                                ("SILVER_V1", "SILVER_V1@60")]
    gold = create_run_for_test(instance, job_name="analytics_market", status=DagsterRunStatus.STARTING,
                               tags={"dagster/partition": "GOLD_V1"})
    create_run_for_test(instance, job_name="analytics_market", status=DagsterRunStatus.SUCCESS,
                        tags={"dagster/partition": "SILVER_V1"})
    # both markets traded again; GOLD_V1 still runs: only SILVER_V1 is requested
    second = plan_markets_tick(build_sensor_context(instance=instance, cursor=first.cursor), names, {1: 70, 2: 80},
                               busy_partitions(instance, "analytics_market"))
    assert [(r.partition_key, r.run_key) for r in second.run_requests] == [("SILVER_V1", "SILVER_V1@80")]
    instance.delete_run(gold.run_id)  # its run is gone from the queue (done); the next tick asks for the newest
    third = plan_markets_tick(build_sensor_context(instance=instance, cursor=second.cursor), names, {1: 90, 2: 80},
                              busy_partitions(instance, "analytics_market"))
    assert [(r.partition_key, r.run_key) for r in third.run_requests] == [("GOLD_V1", "GOLD_V1@90")]
