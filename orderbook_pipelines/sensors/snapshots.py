"""Makes `depth_snapshots` run on its own, in dev and in production: the asset's automation condition, evaluated.

An automation condition does nothing until a sensor evaluates it, and Dagster's default automation sensor starts
stopped; this one starts RUNNING. It is the declarative choice rather than a hand-written sensor over the event
log because the condition already says everything (a range's snapshot follows each materialization of its
`orders`, waits while ingestion of the range is in progress, and never runs past a failed blocking check), and
the UI's Automation tab then shows per partition why a snapshot was or was not requested.

What it does not do: on its first evaluation it requests nothing, so ranges ingested before it first ran (an
existing instance being upgraded) get no snapshot until they are ingested again. Materialize the newest
`depth_snapshots` partition once (job snapshot_block_range), which is what the live cold start needs. `make run`
starts with an empty instance: at most a range finished before the sensor's first tick (seconds after start) can
miss its snapshot, and the tip range's next ingestion snapshots the newest state anyway.
"""

import dagster as dg

from orderbook_pipelines.assets.snapshots import depth_snapshots

SNAPSHOT_SENSOR = "snapshot_automation_sensor"

snapshot_automation_sensor = dg.AutomationConditionSensorDefinition(
    SNAPSHOT_SENSOR,
    target=dg.AssetSelection.assets(depth_snapshots),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    # One run per range, like ingestion: each is visible, retryable and cancellable on its own in the Runs page.
    emit_backfills=False,
    run_tags={"obp/trigger": "snapshot_automation"},
    description="Requests the depth_snapshots partition of every block range whose `orders` were (re)materialized "
    "with passing blocking checks: every newly ingested range, and the open tip range each time it is re-ingested.",
)
