"""Which partitions of a job already have a run queued or in flight: what a sensor must not request again.

Read from the run storage at each tick rather than kept in a cursor, so a run started by hand or by a backfill
counts as well, and a run that died is requested again.
"""

from datetime import UTC, datetime, timedelta

import dagster as dg

RETRY_AFTER = timedelta(minutes=2)  # a partition whose run just failed waits this long (a reorg goes to reconcile)
PARTITION_TAG = "dagster/partition"
_IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
              dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


def in_flight(instance: dg.DagsterInstance, job_name: str) -> set[str]:
    """Partitions of `job_name` with a run queued or in progress."""
    runs = instance.get_run_records(filters=dg.RunsFilter(job_name=job_name, statuses=_IN_FLIGHT))
    return {key for r in runs if (key := r.dagster_run.tags.get(PARTITION_TAG))}


def busy_partitions(instance: dg.DagsterInstance, job_name: str, now: datetime | None = None,
                    running: set[str] | None = None) -> set[str]:
    """Partitions of `job_name` with a run queued or in progress (`running`, if the caller read it already), or
    whose run failed within RETRY_AFTER."""
    now = now or datetime.now(UTC)
    failed = instance.get_run_records(filters=dg.RunsFilter(
        job_name=job_name, statuses=[dg.DagsterRunStatus.FAILURE], updated_after=now - RETRY_AFTER))
    running = in_flight(instance, job_name) if running is None else running
    return running | {key for r in failed if (key := r.dagster_run.tags.get(PARTITION_TAG))}
