"""Dagster definitions: the code location named in workspace.yaml."""

from dagster import Definitions, in_process_executor

from orderbook_pipelines.assets.analytics import analytics_assets, analytics_job, market_registry_sensor
from orderbook_pipelines.assets.ingestion import ingestion_assets
from orderbook_pipelines.assets.reconciliation import reconcile_job, reconciliation_assets
from orderbook_pipelines.assets.snapshots import SnapshotStoreResource, snapshot_assets, snapshot_job
from orderbook_pipelines.checks import asset_checks, check_job
from orderbook_pipelines.jobs import ingest_job
from orderbook_pipelines.maintenance import purge_dagster_runs, purge_schedule
from orderbook_pipelines.resources import ChainResource, PostgresResource, SettingsResource
from orderbook_pipelines.resources.analytics import AnalyticsResource
from orderbook_pipelines.sensors.chain_head import chain_head_sensor
from orderbook_pipelines.sensors.reconciliation import reconcile_schedule, reorg_failure_sensor

_settings = SettingsResource()

defs = Definitions(
    assets=[*ingestion_assets, *snapshot_assets, *reconciliation_assets, *analytics_assets],
    asset_checks=asset_checks,
    jobs=[ingest_job, snapshot_job, reconcile_job, check_job, purge_dagster_runs, analytics_job],
    sensors=[chain_head_sensor, reorg_failure_sensor, market_registry_sensor],
    schedules=[reconcile_schedule, purge_schedule],
    resources={
        "settings": _settings,
        "chain": ChainResource(settings=_settings),
        "postgres": PostgresResource(),
        "snapshot_store": SnapshotStoreResource(),
        "analytics": AnalyticsResource(),
    },
    executor=in_process_executor,
)
