"""Jobs: the block-range ingestion job the sensor and backfills run (partitions come from its assets)."""

from dagster import AssetSelection, define_asset_job, in_process_executor

ingest_job = define_asset_job(
    "ingest_block_range",
    selection=AssetSelection.groups("ingestion"),
    executor_def=in_process_executor,
    description="Fetch, decode and store one block range, then update orders, trades and positions.",
)
