"""Keeps the analytics `markets` partitions in step with the market registry and requests rebuilds.

Partition keys are the markets' public names (storage/registry.py MARKET_NAME_SQL: the metric id, else the metric
hash or address while unregistered), so the UI, a backfill and a run's tags read "GOLD_V1", not an internal id.
The cursor maps partition key -> last trade block requested; run keys are "<key>@<last trade block>". A market
whose run is still queued or running is not requested again (its next run reads everything new anyway): a fresh
dev chain trades in every market every tick, and one request per market per tick outgrew what the queue drained.
Nor does the sensor queue more than the analytics runs can take (IN_FLIGHT: one running under the single-writer
limit, one ready behind it): the backlog stays in the cursor, served stalest market first, and the run queue a
data engineer looks at holds what is about to run, not every market that traded.
"""

import json

import dagster as dg
from sqlalchemy import text

from orderbook_pipelines.jobs import analytics_job
from orderbook_pipelines.partitions import MARKETS, markets
from orderbook_pipelines.resources import PostgresResource
from orderbook_pipelines.sensors.busy import busy_partitions, in_flight
from orderbook_pipelines.storage.registry import market_names

MAX_RUNS_PER_TICK = 20
IN_FLIGHT = 2  # analytics runs queued or running at once (scripts/run.sh lets one run; one waits ready)


@dg.sensor(job=analytics_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Adds a `markets` partition, named by the market's public name, for every row of the market "
           "registry and requests a rebuild of markets whose trades advanced since the last request "
           f"(run key = market@last trade block), stalest first, at most {IN_FLIGHT} analytics runs in flight.")
def market_registry_sensor(context: dg.SensorEvaluationContext, postgres: PostgresResource) -> dg.SensorResult:
    with postgres.engine().connect() as conn:
        names = market_names(conn)
        marks: dict[int, int] = dict(
            conn.execute(text("SELECT market_id, max(block_number) FROM trades GROUP BY market_id")).all())
    running = in_flight(context.instance, analytics_job.name)
    busy = busy_partitions(context.instance, analytics_job.name, running=running)
    return plan_markets_tick(context, names, marks, busy, IN_FLIGHT - len(running))


def partition_keys(names: dict[int, str]) -> dict[int, str]:
    """market_id -> partition key: the public name, or the id as text for a name already taken (the same metric
    id on two chains of one database), which the assets resolve as well."""
    keys: dict[int, str] = {}
    taken: set[str] = set()
    for mid in sorted(names):
        key = names[mid] if names[mid] not in taken else str(mid)
        keys[mid] = key
        taken.add(key)
    return keys


def plan_markets_tick(context: dg.SensorEvaluationContext, names: dict[int, str],
                      trade_marks: dict[int, int], busy: set[str] | None = None,
                      room: int = MAX_RUNS_PER_TICK) -> dg.SensorResult:
    """`names`: market_id -> public name; `trade_marks`: market_id -> block of its last trade; `busy`: partition
    keys with a run in flight (requested at a later tick, with the mark of then); `room`: how many runs may be
    requested now. Markets whose last request is oldest (never requested first) go first, so none starves.

    A cursor of an instance from before names (keyed by market_id) matches no key, so each traded market is
    rebuilt once under its named partition; entries of keys that no longer exist are dropped.
    """
    keys = partition_keys(names)
    existing = set(context.instance.get_dynamic_partitions(MARKETS))
    new = [k for k in keys.values() if k not in existing]
    old = json.loads(context.cursor) if context.cursor else {}
    seen = {k: v for k, v in old.items() if k in set(keys.values())}
    requests: list[dg.RunRequest] = []
    limit = max(0, min(room, MAX_RUNS_PER_TICK))
    for mid, key in sorted(keys.items(), key=lambda kv: (seen.get(kv[1], -1), kv[1])):
        mark = trade_marks.get(mid)
        if mark is None or seen.get(key) == mark or key in (busy or ()) or len(requests) >= limit:
            continue
        requests.append(dg.RunRequest(partition_key=key, run_key=f"{key}@{mark}",
                                      tags={"obp/market": key, "obp/market_id": str(mid)}))
        seen[key] = mark
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(seen, sort_keys=True),
                           dynamic_partitions_requests=[markets.build_add_request(new)] if new else [])
