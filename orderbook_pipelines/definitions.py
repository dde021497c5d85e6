"""Dagster definitions: the code location named in workspace.yaml. Assembly only; the executor is set here once.

Resources take their settings from the environment through dg.EnvVar where the variable is set, so the UI
shows which variable each value came from; unset, the same defaults as the CLI apply (config.EnvSettings).
"""

import gc
import os

from orderbook_pipelines.gc_pause import gc_paused

# Loading Dagster and every asset, resource and sensor leaves ~180k tracked objects that live as long as the process
# (the code server, each run's process). With the collector on, its full passes re-scan them while they load:
# importing this module took 1.0 s here, 0.59-0.65 s with the collector paused. Frozen afterwards, later
# collections (during a run) skip them too, as in the CLI (cli/ingest.py) and the live service.
with gc_paused():
    import dagster as dg

    from orderbook_pipelines.assets.analytics import analytics_assets
    from orderbook_pipelines.assets.checks import asset_checks
    from orderbook_pipelines.assets.ingestion import ingestion_assets
    from orderbook_pipelines.assets.reconciliation import reconciliation_assets
    from orderbook_pipelines.assets.snapshots import snapshot_assets
    from orderbook_pipelines.jobs import (
        analytics_job,
        check_job,
        ingest_job,
        purge_dagster_runs,
        reconcile_job,
        snapshot_job,
    )
    from orderbook_pipelines.resources import (
        AnalyticsResource,
        ChainResource,
        PostgresResource,
        SettingsResource,
        SnapshotStoreResource,
    )
    from orderbook_pipelines.sensors.analytics import market_registry_sensor
    from orderbook_pipelines.sensors.chain_head import chain_head_sensor
    from orderbook_pipelines.sensors.maintenance import purge_schedule
    from orderbook_pipelines.sensors.reconciliation import reconcile_schedule, reorg_failure_sensor
    from orderbook_pipelines.sensors.snapshots import snapshot_automation_sensor
    gc.freeze()


def _env(name: str) -> str:
    """dg.EnvVar(name) when the variable is set, else "" (the resource's own default applies)."""
    return dg.EnvVar(name) if name in os.environ else ""


_settings = SettingsResource(config_path=_env("OBP_CONFIG"))

defs = dg.Definitions(
    assets=[*ingestion_assets, *snapshot_assets, *reconciliation_assets, *analytics_assets],
    asset_checks=asset_checks,
    jobs=[ingest_job, snapshot_job, reconcile_job, check_job, analytics_job, purge_dagster_runs],
    sensors=[chain_head_sensor, reorg_failure_sensor, market_registry_sensor, snapshot_automation_sensor],
    schedules=[reconcile_schedule, purge_schedule],
    resources={
        "settings": _settings,
        "chain": ChainResource(settings=_settings),
        "postgres": PostgresResource(database_url=_env("DATABASE_URL")),
        "snapshot_store": SnapshotStoreResource(root=_env("OBP_SNAPSHOT_DIR")),
        "analytics": AnalyticsResource(backend=_env("OBP_ANALYTICS"), duckdb_path=_env("OBP_ANALYTICS_DUCKDB"),
                                       clickhouse_url=_env("CLICKHOUSE_URL")),
    },
    executor=dg.in_process_executor,
)
