"""Dagster resources: every I/O of the assets, sensors and jobs goes through one of these."""

from orderbook_pipelines.resources.analytics import AnalyticsResource
from orderbook_pipelines.resources.chain import ChainResource
from orderbook_pipelines.resources.postgres import PostgresResource
from orderbook_pipelines.resources.settings import SettingsResource
from orderbook_pipelines.resources.snapshots import SnapshotStoreResource

__all__ = ["AnalyticsResource", "ChainResource", "PostgresResource", "SettingsResource", "SnapshotStoreResource"]
