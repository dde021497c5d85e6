"""Follows the safe (confirmed or finalized) head: adds block-range partitions and requests their runs.

Complete ranges run once (run key = partition key). The open tip range runs again each time
`tip_interval_blocks` more blocks became final (run key = partition key @ safe head), so recent data lands
without waiting for the window to close. The live process, not Dagster, owns the unconfirmed tip.
"""


import json

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from orderbook_pipelines.chain.rpc import RpcError
from orderbook_pipelines.config import ConfigError
from orderbook_pipelines.ingestion.ranges import range_key, ranges_up_to
from orderbook_pipelines.jobs import ingest_job
from orderbook_pipelines.partitions import block_ranges
from orderbook_pipelines.resources import ChainResource, SettingsResource

MAX_RUNS_PER_TICK = 25


@sensor(job=ingest_job, minimum_interval_seconds=15, default_status=DefaultSensorStatus.RUNNING,
        description="Adds block-range partitions as the chain's safe head advances and requests their runs.")
def chain_head_sensor(context: SensorEvaluationContext, settings: SettingsResource,
                      chain: ChainResource) -> SensorResult | SkipReason:
    try:
        cfg = settings.load()
        safe = chain.client().safe_head(cfg.chain.finality, cfg.chain.confirmations)
    except (ConfigError, RpcError) as exc:
        return SkipReason(f"cannot read the chain head: {exc}")
    return plan_tick(context, cfg.chain.start_block, cfg.chain.range_size, cfg.chain.tip_interval_blocks, safe)


def plan_tick(context: SensorEvaluationContext, start_block: int, range_size: int, tip_interval: int,
              safe: int) -> SensorResult | SkipReason:
    cursor = json.loads(context.cursor) if context.cursor else {"complete_through": start_block - 1, "tip": -1}
    ranges = ranges_up_to(start_block, range_size, safe)
    if not ranges:
        return SkipReason(f"safe head {safe} is below the start block {start_block}")
    keys = [range_key(a, b) for a, b in ranges]
    existing = set(context.instance.get_dynamic_partitions(block_ranges.name))
    new_keys = [k for k in keys if k not in existing]

    requests: list[RunRequest] = []
    complete_through = cursor["complete_through"]
    for (a, b), key in zip(ranges, keys, strict=True):
        if b <= complete_through or len(requests) >= MAX_RUNS_PER_TICK:
            continue
        if b <= safe:
            requests.append(RunRequest(partition_key=key, run_key=key, tags={"obp/range": key}))
            complete_through = b
        elif safe - max(cursor["tip"], a - 1) >= tip_interval:
            requests.append(RunRequest(partition_key=key, run_key=f"{key}@{safe}", tags={"obp/range": key}))
            cursor["tip"] = safe
    cursor["complete_through"] = complete_through
    return SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[block_ranges.build_add_request(new_keys)] if new_keys else [],
        cursor=json.dumps(cursor),
    )
