"""The chain RPC client as a Dagster resource (one client per process, built from the configuration)."""

from __future__ import annotations

import dagster as dg
from pydantic import PrivateAttr

from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.resources.settings import SettingsResource


class ChainResource(dg.ConfigurableResource):
    settings: SettingsResource
    _client: ChainClient | None = PrivateAttr(default=None)

    def client(self) -> ChainClient:
        if self._client is None:
            self._client = ChainClient.from_config(self.settings.load().chain)
        return self._client
