"""Every Dagster job: what the sensors, schedules and the data team's backfills run.

The executor is set once, in definitions.py; the jobs differ only in what they select.
"""

from datetime import UTC, datetime, timedelta

import dagster as dg

from orderbook_pipelines.assets.analytics import GROUP as ANALYTICS_GROUP
from orderbook_pipelines.assets.checks import asset_checks
from orderbook_pipelines.assets.ingestion import GROUP as INGESTION_GROUP
from orderbook_pipelines.assets.reconciliation import chain_reconciliation
from orderbook_pipelines.assets.snapshots import depth_snapshots
from orderbook_pipelines.partitions import block_ranges

# Run tags the instance's queue reads (`dagster/priority`: higher leaves the queue first) and its per-tag run limits
# key on (`obp/kind`; the dev instance, scripts/run.sh, allows one analytics run at a time: the embedded DuckDB file
# has one writer, and a run waiting for its lock would hold a run slot that the chain's ranges need).
KIND = "obp/kind"
PRIORITY = "dagster/priority"

ingest_job = dg.define_asset_job(
    "ingest_block_range",
    selection=dg.AssetSelection.groups(INGESTION_GROUP),
    description="Fetch, decode and store one block range with its orders, trades and positions (one commit).",
    tags={KIND: "ingestion", PRIORITY: "10"},
)

snapshot_job = dg.define_asset_job(
    "snapshot_block_range",
    selection=[depth_snapshots],
    description="Depth snapshots of one block range, by hand or in a backfill; after each ingestion the "
    "snapshot_automation_sensor requests them by itself.",
)

reconcile_job = dg.define_asset_job(
    "reconcile_chain",
    selection=[chain_reconciliation],
    description="Re-check recent finalized ranges against the chain and repair what differs (see run config).",
    tags={KIND: "reconciliation", PRIORITY: "5"},
)

check_job = dg.define_asset_job(
    "check_block_range",
    selection=dg.AssetSelection.checks(*asset_checks),
    partitions_def=block_ranges,
    description="Re-run the book and invariant checks of block ranges without re-ingesting them.",
)

analytics_job = dg.define_asset_job(
    "analytics_market", selection=dg.AssetSelection.groups(ANALYTICS_GROUP),
    description="Rebuild one market's analytics rows (idempotent).",
    tags={KIND: "analytics", PRIORITY: "-10"})


# -- housekeeping: Dagster's event-log storage grows ~50 KB per run and has no retention of its own ----------------
class PurgeConfig(dg.Config):
    success_days: int = 7
    failure_days: int = 30  # failed runs are what an on-call engineer reads: kept longer
    batch: int = 5000


@dg.op(description="Delete runs (and their event logs) older than the configured ages; reports how many.")
def purge_runs(context: dg.OpExecutionContext, config: PurgeConfig) -> int:
    now = datetime.now(UTC)
    deleted = 0
    for statuses, days in (([dg.DagsterRunStatus.SUCCESS], config.success_days),
                           ([dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED], config.failure_days)):
        records = context.instance.get_run_records(
            filters=dg.RunsFilter(statuses=statuses, created_before=now - timedelta(days=days)), limit=config.batch)
        for rec in records:
            if rec.dagster_run.run_id != context.run_id:
                context.instance.delete_run(rec.dagster_run.run_id)
                deleted += 1
    context.add_output_metadata({"runs_deleted": deleted})
    return deleted


@dg.job(description="Purge old Dagster runs so the instance's storage stays bounded.")
def purge_dagster_runs() -> None:
    purge_runs()
