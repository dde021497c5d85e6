"""Chain ingestion per block range: raw events and their projections, materialized as ONE unit of work.

`ingest_range` commits a range's events, orders, trades and positions in one transaction, so the four
assets are one multi-asset: Dagster records them materialized together, after the commit, or not at all.
"""

from collections.abc import Iterator

import dagster as dg

from orderbook_pipelines import obs
from orderbook_pipelines.ingestion import metrics as ingest_metrics
from orderbook_pipelines.ingestion.ingest import ingest_range
from orderbook_pipelines.ingestion.ranges import parse_range_key
from orderbook_pipelines.partitions import block_ranges
from orderbook_pipelines.resources import ChainResource, PostgresResource, SettingsResource

GROUP = "ingestion"

ORDER_EVENTS = dg.AssetSpec(
    "order_events", group_name=GROUP, partitions_def=block_ranges,
    description="Decoded order events of every configured contract for one block range (final blocks only). "
    "Re-running a range inserts nothing new; a forked history fails the run instead of being written.")
TRADES = dg.AssetSpec(
    "trades", group_name=GROUP, partitions_def=block_ranges, deps=[ORDER_EVENTS],
    description="Trades (one row per on-chain trade event) of the range; insert-only, idempotent.")
ORDERS = dg.AssetSpec(
    "orders", group_name=GROUP, partitions_def=block_ranges, deps=[ORDER_EVENTS],
    description="Orders touched by the range, recomputed from all their events (status, filled, remaining).")
POSITIONS = dg.AssetSpec(
    "positions", group_name=GROUP, partitions_def=block_ranges, deps=[TRADES],
    description="Net positions of every trader touched by the range's trades, recomputed from all trades.")


@dg.multi_asset(specs=[ORDER_EVENTS, TRADES, ORDERS, POSITIONS], partitions_def=block_ranges, pool="rpc",
                name="ingest_block_range_op")
def ingest_block_range(context: dg.AssetExecutionContext, settings: SettingsResource, chain: ChainResource,
                       postgres: PostgresResource) -> Iterator[dg.MaterializeResult]:
    obs.bootstrap()
    start, end = parse_range_key(context.partition_key)
    client = chain.client()
    report = ingest_range(settings.load(), client, postgres.engine(), start, end, run_id=context.run.run_id)
    if report.rejected:
        context.log.warning(f"{report.rejected} log(s) rejected in {start}-{end}: see table rejected_logs")
    if report.unresolved_market:
        context.log.warning(f"{report.unresolved_market} event(s) with no resolvable market in {start}-{end}")
    blocks = dg.MetadataValue.text(f"{start}-{report.processed_to}")
    yield dg.MaterializeResult(asset_key="order_events", metadata={
        "blocks": blocks,
        "complete": report.complete,
        "logs": report.logs,
        "events": report.events,
        "events_inserted": report.events_inserted,
        "rejected_logs": report.rejected,
        "unresolved_market": report.unresolved_market,
        "markets_discovered": report.markets_discovered,
        "events_per_s": dg.MetadataValue.float(round(report.events_per_s, 1)),
        "seconds": dg.MetadataValue.float(round(report.seconds, 3)),
        "lag_to_head_blocks": report.head - report.processed_to,
        "safe_head": report.safe_head,
        "lag_to_safe_head_blocks": report.safe_head - report.processed_to,
        **ingest_metrics.dagster_metadata(),
        "rpc_calls": client.stats["rpc_calls"],
        "rpc_range_splits": client.stats["range_splits"],
    })
    p = report.projection
    yield dg.MaterializeResult(asset_key="trades", metadata={"trades_inserted": p.trades_inserted, "blocks": blocks})
    yield dg.MaterializeResult(asset_key="orders", metadata={"orders_touched": p.orders_touched,
                                                             "orders_changed": p.orders_changed, "blocks": blocks})
    yield dg.MaterializeResult(asset_key="positions", metadata={"positions_changed": p.positions_changed,
                                                                "blocks": blocks})


ingestion_assets = [ingest_block_range]
