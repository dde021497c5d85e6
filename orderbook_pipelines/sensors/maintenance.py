"""When Dagster's own housekeeping runs."""

import dagster as dg

from orderbook_pipelines.jobs import purge_dagster_runs

purge_schedule = dg.ScheduleDefinition(job=purge_dagster_runs, cron_schedule="17 3 * * *",
                                       description="Nightly purge of old runs (jobs.purge_dagster_runs).")
