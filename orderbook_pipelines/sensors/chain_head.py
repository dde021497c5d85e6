"""Follows the safe (confirmed or finalized) head: adds block-range partitions and requests their runs.

What to request is read from the truth, not from the sensor's memory: a range is requested once all its blocks
are final and while its checkpoint (storage/checkpoints.py, committed with its events and projections) does not
cover it, unless a run of that partition is already queued or running, or failed moments ago. So a range is
materialized once, when it becomes final; a run killed mid-way is requested again; a queued range is never
requested twice; and a Dagster backfill of the same partitions is not duplicated. An open range is never run:
`range_size` bounds how far Postgres trails the chain (the dev chain uses 30 one-second blocks), and the live
process, not Dagster, owns the tip.
"""

from collections.abc import Mapping

import dagster as dg

from orderbook_pipelines.chain.rpc import RpcError
from orderbook_pipelines.config import ConfigError
from orderbook_pipelines.ingestion.ranges import range_key, ranges_up_to
from orderbook_pipelines.jobs import ingest_job
from orderbook_pipelines.partitions import BLOCK_RANGES, block_ranges
from orderbook_pipelines.resources import ChainResource, PostgresResource, SettingsResource
from orderbook_pipelines.sensors.busy import busy_partitions
from orderbook_pipelines.storage import checkpoints

MAX_RUNS_PER_TICK = 25


@dg.sensor(job=ingest_job, minimum_interval_seconds=15, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Adds block-range partitions as the chain's safe head advances and requests runs for "
           "ranges the checkpoints do not cover yet (never for one already queued or running).")
def chain_head_sensor(context: dg.SensorEvaluationContext, settings: SettingsResource, chain: ChainResource,
                      postgres: PostgresResource) -> dg.SensorResult | dg.SkipReason:
    try:
        cfg = settings.load()
        safe = chain.client().safe_head(cfg.chain.finality, cfg.chain.confirmations)
    except (ConfigError, RpcError) as exc:
        return dg.SkipReason(f"cannot read the chain head: {exc}")
    with postgres.engine().connect() as conn:
        stored = {c.range_start: c.processed_to for c in checkpoints.all_ranges(conn, cfg.chain.chain_id)}
    return plan_tick(context, cfg.chain.start_block, cfg.chain.range_size, safe, stored,
                     busy_partitions(context.instance, ingest_job.name))


def plan_tick(context: dg.SensorEvaluationContext, start_block: int, range_size: int, safe: int,
              stored: Mapping[int, int], busy: set[str]) -> dg.SensorResult | dg.SkipReason:
    """`stored`: range_start -> processed_to of the checkpoints; `busy`: partitions not to request now."""
    ranges = [(a, b) for a, b in ranges_up_to(start_block, range_size, safe) if b <= safe]
    if not ranges:
        return dg.SkipReason(f"no block range is final yet: safe head {safe}, first range from {start_block} "
                             f"has {range_size} blocks")
    keys = [range_key(a, b) for a, b in ranges]
    existing = set(context.instance.get_dynamic_partitions(BLOCK_RANGES))
    new_keys = [k for k in keys if k not in existing]

    requests: list[dg.RunRequest] = []
    for (a, b), key in zip(ranges, keys, strict=True):
        if stored.get(a, a - 1) >= b or key in busy:
            continue
        requests.append(dg.RunRequest(partition_key=key, tags={"obp/range": key, "obp/safe_head": str(safe)}))
        if len(requests) >= MAX_RUNS_PER_TICK:
            break
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[block_ranges.build_add_request(new_keys)] if new_keys else [],
    )
