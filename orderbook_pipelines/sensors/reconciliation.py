"""When reconciliation runs: on a schedule, and right away when an ingestion run failed on a reorg."""

from dagster import (
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunFailureSensorContext,
    RunRequest,
    ScheduleDefinition,
    SkipReason,
    run_failure_sensor,
)

from orderbook_pipelines.jobs import ingest_job, reconcile_job

RECONCILE_EVERY_MINUTES = 10

reconcile_schedule = ScheduleDefinition(
    name="reconcile_schedule",
    job=reconcile_job,
    cron_schedule=f"*/{RECONCILE_EVERY_MINUTES} * * * *",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Re-check the most recent stored ranges (reconciliation.lookback_ranges) against the chain.",
)


def reorg_failure(context: RunFailureSensorContext) -> str | None:
    """The ReorgDetected message of a failed ingestion run, if that is why it failed."""
    for ev in context.get_step_failure_events():
        err = ev.step_failure_data.error if ev.is_step_failure else None
        while err is not None:
            if err.cls_name == "ReorgDetected":
                return err.message
            err = err.cause
    return None


@run_failure_sensor(monitored_jobs=[ingest_job], request_job=reconcile_job,
                    default_status=DefaultSensorStatus.RUNNING,
                    description="An ingestion run that failed with ReorgDetected starts reconciliation at once.")
def reorg_failure_sensor(context: RunFailureSensorContext) -> RunRequest | SkipReason:
    message = reorg_failure(context)
    if message is None:
        return SkipReason(f"run {context.dagster_run.run_id} failed for another reason")
    return RunRequest(run_key=f"reorg:{context.dagster_run.run_id}",
                      tags={"obp/trigger": "reorg", "obp/failed_run": context.dagster_run.run_id})
