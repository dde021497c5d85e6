"""Dagster housekeeping: purge old successful runs (event-log storage grows ~50 KB per run, with no retention).

Failed runs are kept longer than successful ones: they are what an on-call engineer reads.
"""

from datetime import UTC, datetime, timedelta

from dagster import Config, DagsterRunStatus, OpExecutionContext, RunsFilter, ScheduleDefinition, job, op


class PurgeConfig(Config):
    success_days: int = 7
    failure_days: int = 30
    batch: int = 5000


@op(description="Delete runs (and their event logs) older than the configured ages; reports how many.")
def purge_runs(context: OpExecutionContext, config: PurgeConfig) -> int:
    now = datetime.now(UTC)
    deleted = 0
    for statuses, days in (([DagsterRunStatus.SUCCESS], config.success_days),
                           ([DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED], config.failure_days)):
        records = context.instance.get_run_records(
            filters=RunsFilter(statuses=statuses, created_before=now - timedelta(days=days)), limit=config.batch)
        for rec in records:
            if rec.dagster_run.run_id != context.run_id:
                context.instance.delete_run(rec.dagster_run.run_id)
                deleted += 1
    context.add_output_metadata({"runs_deleted": deleted})
    return deleted


@job(description="Purge old Dagster runs so the instance's storage stays bounded.")
def purge_dagster_runs() -> None:
    purge_runs()


purge_schedule = ScheduleDefinition(job=purge_dagster_runs, cron_schedule="17 3 * * *")
