"""Postgres, the truth, as a Dagster resource. Migrations run on first use in each process (idempotent, locked)."""

from __future__ import annotations

import dagster as dg
from sqlalchemy import Engine

from orderbook_pipelines.config import EnvSettings
from orderbook_pipelines.storage.db import engine_for, migrate

_MIGRATED: set[str] = set()


class PostgresResource(dg.ConfigurableResource):
    database_url: str = ""

    def url(self) -> str:
        return self.database_url or EnvSettings().database_url

    def engine(self) -> Engine:
        url = self.url()
        if url not in _MIGRATED:
            migrate(url)
            _MIGRATED.add(url)
        return engine_for(url)
