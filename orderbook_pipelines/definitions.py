"""Dagster definitions: the code location named in workspace.yaml."""

from dagster import Definitions, in_process_executor

from orderbook_pipelines.assets.ingestion import ingestion_assets
from orderbook_pipelines.assets.snapshots import SnapshotStoreResource, snapshot_assets, snapshot_job
from orderbook_pipelines.jobs import ingest_job
from orderbook_pipelines.resources import ChainResource, PostgresResource, SettingsResource
from orderbook_pipelines.sensors.chain_head import chain_head_sensor

_settings = SettingsResource()

defs = Definitions(
    assets=[*ingestion_assets, *snapshot_assets],
    jobs=[ingest_job, snapshot_job],
    sensors=[chain_head_sensor],
    resources={
        "settings": _settings,
        "chain": ChainResource(settings=_settings),
        "postgres": PostgresResource(),
        "snapshot_store": SnapshotStoreResource(),
    },
    executor=in_process_executor,
)
