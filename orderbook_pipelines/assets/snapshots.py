"""Depth snapshots per block range: every market's book at the range's checkpointed end block.

SNAPSHOT_CONDITION runs a range's snapshot after each ingestion of it (sensors/snapshots.py evaluates it, on by
default): the live service's cold start and `orderbook snapshot restore` then begin from a recent snapshot instead
of replaying every stored event.
"""

import time

import dagster as dg

from orderbook_pipelines.ingestion.ranges import parse_range_key
from orderbook_pipelines.partitions import block_ranges
from orderbook_pipelines.recovery.restore import build_snapshots
from orderbook_pipelines.recovery.retention import apply_retention
from orderbook_pipelines.recovery.store import store_snapshots
from orderbook_pipelines.resources import PostgresResource, SettingsResource, SnapshotStoreResource
from orderbook_pipelines.storage import checkpoints

GROUP = "snapshots"

# eager(): after each new materialization of the range's `orders`, once that run is over; the blocking checks of
# `orders` (assets/checks.py) must have passed, which eager() alone does not require outside the ingestion run.
SNAPSHOT_CONDITION = dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()


@dg.asset(
    partitions_def=block_ranges,
    group_name=GROUP,
    deps=["orders"],
    automation_condition=SNAPSHOT_CONDITION,
    description="Per market, the full book (resting orders + levels, CRC32 checksum, sha256 state hash) at the "
    "range's checkpointed end block, in Postgres and as Parquet objects; built from the previous snapshot plus the "
    "events since. Applies the retention policy. Runs by itself after each ingestion of its range whose blocking "
    "checks passed (snapshot_automation_sensor).",
)
def depth_snapshots(context: dg.AssetExecutionContext, settings: SettingsResource, postgres: PostgresResource,
                    snapshot_store: SnapshotStoreResource) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    start, end = parse_range_key(context.partition_key)
    cfg = settings.load()
    cid = cfg.chain.chain_id
    engine = postgres.engine()
    with engine.connect() as conn:
        processed_to = checkpoints.processed_to(conn, cid, start)
    if processed_to is None:
        raise dg.Failure(f"range {start}-{end} is not ingested (no checkpoint): materialize order_events first")
    snaps, books = build_snapshots(engine, processed_to, cid, start_block=cfg.chain.start_block)
    for mid, why in books.fallbacks.items():
        context.log.warning(f"market {mid}: full replay instead of the previous snapshot: {why}")
    store = store_snapshots(engine, snaps, snapshot_store.folder())
    deleted = apply_retention(engine, snapshot_store.folder(), snapshot_store.policy(), [s.market_id for s in snaps])
    return dg.MaterializeResult(metadata={
        "block": processed_to,
        "block_hash": dg.MetadataValue.text(snaps[0].block_hash if snaps else ""),
        "markets": store.markets,
        "orders": store.orders,
        "bytes": store.bytes,
        "incremental_markets": store.incremental,
        "events_replayed": books.events,
        "retention_deleted": deleted,
        "folder": dg.MetadataValue.path(str(snapshot_store.folder())),
        "seconds": dg.MetadataValue.float(round(time.perf_counter() - t0, 3)),
    })


snapshot_assets = [depth_snapshots]
