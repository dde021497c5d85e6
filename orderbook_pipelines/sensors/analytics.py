"""Keeps the analytics `markets` partitions in step with the market registry and requests rebuilds."""

import json

import dagster as dg
from sqlalchemy import text

from orderbook_pipelines.jobs import analytics_job
from orderbook_pipelines.partitions import MARKETS, markets
from orderbook_pipelines.resources import PostgresResource

MAX_RUNS_PER_TICK = 20


@dg.sensor(job=analytics_job, minimum_interval_seconds=120, default_status=dg.DefaultSensorStatus.RUNNING,
        description="Adds a `markets` partition for every row of the market registry and requests a rebuild of "
        "markets whose trades advanced since the last request (run key = market@last trade block).")
def market_registry_sensor(context: dg.SensorEvaluationContext, postgres: PostgresResource) -> dg.SensorResult:
    with postgres.engine().connect() as conn:
        ids = [r[0] for r in conn.execute(text("SELECT market_id FROM markets ORDER BY market_id"))]
        marks: dict[int, int] = dict(
            conn.execute(text("SELECT market_id, max(block_number) FROM trades GROUP BY market_id")).all())
    return plan_markets_tick(context, ids, marks)


def plan_markets_tick(context: dg.SensorEvaluationContext, market_ids: list[int],
                      trade_marks: dict[int, int]) -> dg.SensorResult:
    existing = set(context.instance.get_dynamic_partitions(MARKETS))
    keys = [str(m) for m in market_ids]
    new = [k for k in keys if k not in existing]
    seen = json.loads(context.cursor) if context.cursor else {}
    requests: list[dg.RunRequest] = []
    for m in market_ids:
        mark = trade_marks.get(m)
        if mark is None or seen.get(str(m)) == mark or len(requests) >= MAX_RUNS_PER_TICK:
            continue
        requests.append(dg.RunRequest(partition_key=str(m), run_key=f"{m}@{mark}", tags={"obp/market": str(m)}))
        seen[str(m)] = mark
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(seen),
                        dynamic_partitions_requests=[markets.build_add_request(new)] if new else [])
