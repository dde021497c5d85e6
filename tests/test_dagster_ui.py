"""The Dagster UI as the data team's home: snapshots run on their own, and everything the UI lists says what it is.

Snapshots: `depth_snapshots` has an automation condition, which does nothing unless a sensor evaluates it; the
code location must bring that sensor, running by default, or the table stays empty on `make run` and in
production. Its evaluation is driven here as the daemon drives it (one tick after another, with the cursor).
"""

from __future__ import annotations

from dagster import (
    AssetCheckEvaluation,
    AssetKey,
    AssetRecordsFilter,
    AutomationConditionSensorDefinition,
    DagsterInstance,
    DefaultSensorStatus,
    Definitions,
    EvaluateAutomationConditionsResult,
    evaluate_automation_conditions,
    materialize,
)
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)

from orderbook_pipelines.assets.checks import asset_checks
from orderbook_pipelines.assets.ingestion import ingestion_assets
from orderbook_pipelines.definitions import defs
from orderbook_pipelines.ingestion.ranges import range_key, ranges_up_to
from orderbook_pipelines.jobs import check_job
from orderbook_pipelines.partitions import block_ranges
from orderbook_pipelines.quality.checks import BOOK_CHECK, INVARIANTS_CHECK
from orderbook_pipelines.resources import ChainResource, PostgresResource, SettingsResource
from orderbook_pipelines.sensors.snapshots import SNAPSHOT_SENSOR
from tests.conftest import DevChain

SNAPSHOTS = AssetKey("depth_snapshots")
ORDERS = AssetKey("orders")


def _sensor() -> AutomationConditionSensorDefinition:
    sensor = defs.resolve_sensor_def(SNAPSHOT_SENSOR)
    assert isinstance(sensor, AutomationConditionSensorDefinition)
    return sensor


def test_the_snapshot_sensor_is_in_the_definitions_and_running_by_default() -> None:
    sensor = _sensor()
    assert sensor.default_status == DefaultSensorStatus.RUNNING
    graph = defs.resolve_asset_graph()
    assert sensor.asset_selection.resolve(graph) == {SNAPSHOTS}
    assert graph.get(SNAPSHOTS).automation_condition is not None
    # Every automation condition of the code location is evaluated by a sensor that starts running.
    automated = {k for k in graph.get_all_asset_keys() if graph.get(k).automation_condition is not None}
    assert automated == {SNAPSHOTS}
    # ...so Dagster adds no default automation sensor, which would start stopped.
    assert {s.name for s in defs.get_repository_def().sensor_defs} == {
        "chain_head_sensor", "reorg_failure_sensor", "market_registry_sensor", SNAPSHOT_SENSOR}


def _tick(instance: DagsterInstance, previous: EvaluateAutomationConditionsResult | None
          ) -> tuple[EvaluateAutomationConditionsResult, set[str | None]]:
    """One evaluation of the sensor's target, continuing from the previous tick's cursor."""
    result = evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=_sensor().asset_selection,
                                            cursor=previous.cursor if previous else None)
    assert result.total_requested == len(result.get_requested_partitions(SNAPSHOTS)), "only snapshots"
    return result, set(result.get_requested_partitions(SNAPSHOTS))


def test_an_ingested_range_gets_its_snapshot_requested_and_a_failed_check_holds_it_back(
        simulated_chain: DevChain, database: str) -> None:
    c = simulated_chain.config.chain
    first, second = [range_key(a, b) for a, b in ranges_up_to(c.start_block, c.range_size,
                                                              c.start_block + 2 * c.range_size - 1)]
    settings = SettingsResource(config_path=str(simulated_chain.config_path))
    resources = {"settings": settings, "chain": ChainResource(settings=settings),
                 "postgres": PostgresResource(database_url=database)}
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(block_ranges.name, [first, second])
    tick, requested = _tick(instance, None)
    assert requested == set(), "nothing is ingested yet"

    # The ingestion job's unit of work: the four assets and their blocking checks, for the first range.
    assert materialize([*ingestion_assets, *asset_checks], partition_key=first, instance=instance,
                       resources=resources).success
    tick, requested = _tick(instance, tick)
    assert requested == {first}
    tick, requested = _tick(instance, tick)
    assert requested == set(), "requested once per materialization of the range"

    # The second range is ingested, but one of its blocking checks failed: no snapshot of a range in doubt.
    assert materialize(ingestion_assets, partition_key=second, instance=instance, resources=resources).success
    latest = instance.fetch_materializations(AssetRecordsFilter(asset_key=ORDERS, asset_partitions=[second]),
                                             limit=1).records[0]
    target = AssetCheckEvaluationTargetMaterializationData(storage_id=latest.storage_id, run_id=latest.run_id,
                                                           timestamp=latest.timestamp)
    for name, passed in ((BOOK_CHECK, True), (INVARIANTS_CHECK, False)):
        instance.report_runless_asset_event(AssetCheckEvaluation(
            asset_key=ORDERS, check_name=name, passed=passed, partition=second, blocking=True,
            target_materialization_data=target))
    tick, requested = _tick(instance, tick)
    assert requested == set()
    # Once the checks pass on a re-run (the check_block_range job, e.g. after a repair), the snapshot goes.
    recheck = Definitions(assets=ingestion_assets, asset_checks=asset_checks, jobs=[check_job],
                          resources=resources).resolve_job_def(check_job.name)
    assert recheck.execute_in_process(tags={"dagster/partition": second}, instance=instance).success
    tick, requested = _tick(instance, tick)
    assert requested == {second}

    # A range ingested again (a repair, an operator rerun): its snapshot follows again.
    assert materialize([*ingestion_assets, *asset_checks], partition_key=first, instance=instance,
                       resources=resources).success
    tick, requested = _tick(instance, tick)
    assert requested == {first}


def test_every_asset_check_job_sensor_and_schedule_has_a_description() -> None:
    """The UI's catalog shows these texts; an empty one leaves the data team guessing."""
    Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    missing = [k.to_user_string() for k in graph.get_all_asset_keys() if not (graph.get(k).description or "").strip()]
    checks = [spec for a in graph.assets_defs for spec in a.check_specs]
    assert len(checks) == 6
    missing += [f"check {s.key.to_user_string()}" for s in checks if not (s.description or "").strip()]
    repo = defs.get_repository_def()
    missing += [f"job {j.name}" for j in repo.get_all_jobs()
                if not j.name.startswith("__") and not (j.description or "").strip()]
    missing += [f"sensor {s.name}" for s in repo.sensor_defs if not (s.description or "").strip()]
    missing += [f"schedule {s.name}" for s in repo.schedule_defs if not (s.description or "").strip()]
    assert missing == []
