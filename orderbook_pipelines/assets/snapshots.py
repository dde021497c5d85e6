"""Depth snapshots per block range: every market's book at the range's checkpointed end block."""

import time
from pathlib import Path

from dagster import (
    AssetExecutionContext,
    AutomationCondition,
    ConfigurableResource,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
    define_asset_job,
    in_process_executor,
)
from sqlalchemy import text

from orderbook_pipelines.assets.ingestion import orders
from orderbook_pipelines.partitions import block_ranges, parse_range_key
from orderbook_pipelines.resources import PostgresResource, SettingsResource
from orderbook_pipelines.snapshots import (
    RetentionPolicy,
    SnapshotSettings,
    apply_retention,
    build_snapshots,
    store_snapshots,
)

GROUP = "snapshots"


class SnapshotStoreResource(ConfigurableResource):
    """The snapshot object folder and retention; empty/None fields fall back to OBP_SNAPSHOT_* settings."""

    root: str = ""
    keep_last: int | None = None
    keep_daily: bool | None = None

    def folder(self) -> Path:
        return Path(self.root) if self.root else SnapshotSettings().dir

    def policy(self) -> RetentionPolicy:
        env = SnapshotSettings()
        return RetentionPolicy(env.keep_last if self.keep_last is None else self.keep_last,
                               env.keep_daily if self.keep_daily is None else self.keep_daily)


@asset(
    partitions_def=block_ranges,
    group_name=GROUP,
    deps=[orders],
    automation_condition=AutomationCondition.eager(),
    description="Per market, the full book (resting orders + levels, CRC32 checksum, sha256 state hash) at the "
    "range's checkpointed end block, in Postgres and as Parquet objects; built from the previous snapshot plus the "
    "events since. Applies the retention policy.",
)
def depth_snapshots(context: AssetExecutionContext, settings: SettingsResource, postgres: PostgresResource,
                    snapshot_store: SnapshotStoreResource) -> MaterializeResult:
    t0 = time.perf_counter()
    start, end = parse_range_key(context.partition_key)
    cfg = settings.load()
    cid = cfg.chain.chain_id
    engine = postgres.engine()
    with engine.connect() as conn:
        processed_to = conn.execute(
            text("SELECT processed_to FROM ingestion_checkpoints WHERE chain_id = :c AND range_start = :s"),
            {"c": cid, "s": start},
        ).scalar_one_or_none()
    if processed_to is None:
        raise Failure(f"range {start}-{end} is not ingested (no checkpoint): materialize order_events first")
    snaps, books = build_snapshots(engine, processed_to, cid, start_block=cfg.chain.start_block)
    for mid, why in books.fallbacks.items():
        context.log.warning(f"market {mid}: full replay instead of the previous snapshot: {why}")
    store = store_snapshots(engine, snaps, snapshot_store.folder())
    deleted = apply_retention(engine, snapshot_store.folder(), snapshot_store.policy(), [s.market_id for s in snaps])
    return MaterializeResult(metadata={
        "block": processed_to,
        "block_hash": MetadataValue.text(snaps[0].block_hash if snaps else ""),
        "markets": store.markets,
        "orders": store.orders,
        "bytes": store.bytes,
        "incremental_markets": store.incremental,
        "events_replayed": books.events,
        "retention_deleted": deleted,
        "folder": MetadataValue.path(str(snapshot_store.folder())),
        "seconds": MetadataValue.float(round(time.perf_counter() - t0, 3)),
    })


snapshot_assets = [depth_snapshots]

snapshot_job = define_asset_job(
    "snapshot_block_range",
    selection=[depth_snapshots],
    executor_def=in_process_executor,
    description="Depth snapshots of one block range (after its ingestion); also materialized eagerly.",
)
