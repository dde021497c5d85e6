"""The project configuration file as a Dagster resource."""

from __future__ import annotations

import dagster as dg

from orderbook_pipelines.config import ProjectConfig, load_config


class SettingsResource(dg.ConfigurableResource):
    """The YAML configuration (`config_path`, else OBP_CONFIG, else .run/devchain.yaml), validated per load."""

    config_path: str = ""

    def load(self) -> ProjectConfig:
        return load_config(self.config_path or None)
