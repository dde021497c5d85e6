"""Dagster resources: configuration, the chain RPC client and Postgres. All I/O of the assets goes through these."""


from dagster import ConfigurableResource
from pydantic import PrivateAttr
from sqlalchemy import Engine

from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.config import EnvSettings, ProjectConfig, load_config
from orderbook_pipelines.storage.db import engine_for, migrate


class SettingsResource(ConfigurableResource):
    """The project configuration file (OBP_CONFIG by default), validated once per process."""

    config_path: str = ""

    def load(self) -> ProjectConfig:
        return load_config(self.config_path or None)


class ChainResource(ConfigurableResource):
    settings: SettingsResource
    _client: ChainClient | None = PrivateAttr(default=None)

    def client(self) -> ChainClient:
        if self._client is None:
            c = self.settings.load().chain
            self._client = ChainClient(c.rpc_url, timeout_s=c.rpc_timeout_s, retries=c.rpc_retries,
                                       max_logs_range=c.max_logs_range)
        return self._client


class PostgresResource(ConfigurableResource):
    """Postgres, the truth. Migrations are applied on first use in each process (idempotent, locked)."""

    database_url: str = ""

    def url(self) -> str:
        return self.database_url or EnvSettings().database_url

    def engine(self) -> Engine:
        url = self.url()
        if url not in _MIGRATED:
            migrate(url)
            _MIGRATED.add(url)
        return engine_for(url)


_MIGRATED: set[str] = set()
