"""The analytics sink as a Dagster resource: DuckDB file by default, ClickHouse when configured.

Config wins over environment: backend <- OBP_ANALYTICS (duckdb|clickhouse, default duckdb),
duckdb_path <- OBP_ANALYTICS_DUCKDB (default .run/analytics.duckdb), clickhouse_url <- CLICKHOUSE_URL.
"""

from __future__ import annotations

import os

import dagster as dg

from orderbook_pipelines.analytics.sink import AnalyticsSink, open_sink
from orderbook_pipelines.config import PROJECT_ROOT


class AnalyticsResource(dg.ConfigurableResource):
    """Opens a sink per use (DuckDB allows one writer process, so a run must not hold it longer than needed)."""

    backend: str = ""
    duckdb_path: str = ""
    clickhouse_url: str = ""
    clickhouse_database: str = ""

    def backend_name(self) -> str:
        return (self.backend or os.environ.get("OBP_ANALYTICS") or "duckdb").strip().lower()

    def open(self) -> AnalyticsSink:
        path = self.duckdb_path or os.environ.get("OBP_ANALYTICS_DUCKDB") or str(PROJECT_ROOT / ".run/analytics.duckdb")
        sink = open_sink(self.backend_name(), duckdb_path=path, clickhouse_url=self.clickhouse_url,
                         clickhouse_database=self.clickhouse_database)
        try:
            sink.ensure_schema()
        except Exception:
            sink.close()
            raise
        return sink
