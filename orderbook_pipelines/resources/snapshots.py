"""Where depth-snapshot objects go and how many are kept, as a Dagster resource."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from orderbook_pipelines.recovery.retention import RetentionPolicy
from orderbook_pipelines.recovery.snapshots import SnapshotSettings


class SnapshotStoreResource(dg.ConfigurableResource):
    """Empty / None fields fall back to the OBP_SNAPSHOT_* settings (recovery.snapshots.SnapshotSettings)."""

    root: str = ""
    keep_last: int | None = None
    keep_daily: bool | None = None

    def folder(self) -> Path:
        return Path(self.root) if self.root else SnapshotSettings().dir

    def policy(self) -> RetentionPolicy:
        env = SnapshotSettings()
        return RetentionPolicy(env.keep_last if self.keep_last is None else self.keep_last,
                               env.keep_daily if self.keep_daily is None else self.keep_daily)
