"""Chain ingestion assets, partitioned by block range: raw events, then the convergent projections."""


from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from orderbook_pipelines import ingest_metrics, obs
from orderbook_pipelines.ingest import ingest_range, project_range
from orderbook_pipelines.partitions import block_ranges, parse_range_key
from orderbook_pipelines.resources import ChainResource, PostgresResource, SettingsResource
from orderbook_pipelines.storage.projections import project_orders, project_positions, project_trades

GROUP = "ingestion"


@asset(
    partitions_def=block_ranges,
    group_name=GROUP,
    pool="rpc",
    description="Decoded order events of every configured contract for one block range (final blocks only). "
    "Re-running a range inserts nothing new; a forked history fails the run instead of being written.",
)
def order_events(context: AssetExecutionContext, settings: SettingsResource, chain: ChainResource,
                 postgres: PostgresResource) -> MaterializeResult:
    obs.bootstrap()
    start, end = parse_range_key(context.partition_key)
    cfg = settings.load()
    client = chain.client()
    report = ingest_range(cfg, client, postgres.engine(), start, end, run_id=context.run.run_id)
    if report.rejected:
        context.log.warning(f"{report.rejected} log(s) rejected in {start}-{end}: see table rejected_logs")
    if report.unresolved_market:
        context.log.warning(f"{report.unresolved_market} event(s) with no resolvable market in {start}-{end}")
    return MaterializeResult(
        metadata={
            "blocks": MetadataValue.text(f"{start}-{report.processed_to}"),
            "complete": report.complete,
            "logs": report.logs,
            "events": report.events,
            "events_inserted": report.events_inserted,
            "rejected_logs": report.rejected,
            "unresolved_market": report.unresolved_market,
            "markets_discovered": report.markets_discovered,
            "events_per_s": MetadataValue.float(round(report.events_per_s, 1)),
            "seconds": MetadataValue.float(round(report.seconds, 3)),
            "lag_to_head_blocks": report.head - report.processed_to,
            "safe_head": report.safe_head,
            "lag_to_safe_head_blocks": report.safe_head - report.processed_to,
            **ingest_metrics.dagster_metadata(),
            "rpc_calls": client.stats["rpc_calls"],
            "rpc_range_splits": client.stats["range_splits"],
        }
    )


def _bounds(context: AssetExecutionContext, settings: SettingsResource) -> tuple[int, int, int]:
    start, end = parse_range_key(context.partition_key)
    return settings.load().chain.chain_id, start, end


@asset(partitions_def=block_ranges, group_name=GROUP, deps=[order_events], pool="postgres",
       description="Trades (one row per on-chain trade event) of the range; insert-only, idempotent.")
def trades(context: AssetExecutionContext, settings: SettingsResource, postgres: PostgresResource) -> MaterializeResult:
    cid, start, end = _bounds(context, settings)
    with postgres.engine().begin() as conn:
        r = project_trades(conn, cid, start, end)
    return MaterializeResult(metadata={"trades_inserted": r.rows, "blocks": f"{start}-{end}"})


@asset(partitions_def=block_ranges, group_name=GROUP, deps=[order_events], pool="postgres",
       description="Orders touched by the range, recomputed from all their events (status, filled, remaining).")
def orders(context: AssetExecutionContext, settings: SettingsResource, postgres: PostgresResource) -> MaterializeResult:
    cid, start, end = _bounds(context, settings)
    with postgres.engine().begin() as conn:
        r = project_orders(conn, cid, start, end)
    return MaterializeResult(metadata={"orders_touched": r.keys, "orders_changed": r.rows, "blocks": f"{start}-{end}"})


@asset(partitions_def=block_ranges, group_name=GROUP, deps=[trades], pool="postgres",
       description="Net positions of every trader touched by the range's trades, recomputed from all trades.")
def positions(context: AssetExecutionContext, settings: SettingsResource,
              postgres: PostgresResource) -> MaterializeResult:
    cid, start, end = _bounds(context, settings)
    with postgres.engine().begin() as conn:
        r = project_positions(conn, cid, start, end)
    return MaterializeResult(metadata={"positions_changed": r.rows, "blocks": f"{start}-{end}"})


ingestion_assets = [order_events, trades, orders, positions]

__all__ = ["ingestion_assets", "project_range"]
