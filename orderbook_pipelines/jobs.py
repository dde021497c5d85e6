"""Jobs: the block-range ingestion job the sensor and backfills run."""

from dagster import AssetSelection, define_asset_job, in_process_executor

from orderbook_pipelines.partitions import block_ranges

ingest_job = define_asset_job(
    "ingest_block_range",
    selection=AssetSelection.groups("ingestion"),
    partitions_def=block_ranges,
    executor_def=in_process_executor,
    description="Fetch, decode and store one block range, then update orders, trades and positions.",
)
