"""Reconciliation as a Dagster asset + job: re-check recent stored ranges against the chain and repair them.

The materialization's metadata says what was checked and repaired. A reorg deeper than the confirmation depth
is repaired and then fails the run on purpose (the data is fixed, but it is an incident someone must see);
a repair above the cap fails the run having touched nothing.
"""

from typing import Any

import dagster as dg

from orderbook_pipelines.ingestion.reconcile import ReconcileReport, RepairCapExceeded, reconcile
from orderbook_pipelines.resources import ChainResource, PostgresResource, SettingsResource

GROUP = "reconciliation"


class ReconcileConfig(dg.Config):
    """Run config; -1 / 0 mean 'use the project configuration' (reconciliation section)."""

    from_block: int = -1
    to_block: int = -1
    lookback_ranges: int = 0
    max_repair_events: int = -1
    repair: bool = True


def _metadata(report: ReconcileReport) -> dict[str, Any]:
    meta: dict[str, Any] = dict(report.metadata())
    if report.mismatched:
        meta["differences"] = dg.MetadataValue.json([
            {"range": d.key, "missing": d.missing, "extra": d.extra, "stored_events": d.stored_events,
             "chain_events": d.chain_events, "bad_blocks": [list(b) for b in d.bad_blocks[:5]],
             "markets": d.markets}
            for d in report.mismatched[:50]
        ])
    return meta


@dg.asset(group_name=GROUP,
       description="Recent stored block ranges re-checked against the chain (block hashes, logs per range and per "
       "market); differing ranges are deleted and re-ingested, and their projections rebuilt.")
def chain_reconciliation(context: dg.AssetExecutionContext, config: ReconcileConfig, settings: SettingsResource,
                         chain: ChainResource, postgres: PostgresResource) -> dg.MaterializeResult:
    cfg = settings.load()
    try:
        report = reconcile(
            cfg, chain.client(), postgres.engine(),
            start=config.from_block if config.from_block >= 0 else None,
            end=config.to_block if config.to_block >= 0 else None,
            lookback_ranges=config.lookback_ranges or None,
            repair=config.repair,
            max_repair_events=config.max_repair_events if config.max_repair_events >= 0 else None,
            run_id=context.run.run_id,
        )
    except RepairCapExceeded as exc:
        raise dg.Failure(description=f"RECONCILIATION STOPPED: {exc}", allow_retries=False) from exc
    if report.reorg:
        r = report.reorg
        raise dg.Failure(
            description=(f"REORG DEEPER THAN THE CONFIRMATION DEPTH ({cfg.chain.confirmations}) on chain "
                         f"{cfg.chain.chain_id}: {r.depth} stored block(s) from block {r.fork_block} were replaced "
                         f"(stored {r.old_hash}, chain now {r.new_hash}); ranges {', '.join(r.ranges)}. "
                         + ("Repaired: " if report.repaired else "NOT repaired (dry run): ")
                         + f"{report.events_deleted} events deleted, {report.events_inserted} re-inserted. "
                         "See table reorgs and docs/runbooks/reorg-handling.md."),
            metadata=_metadata(report),
            allow_retries=False,
        )
    return dg.MaterializeResult(metadata=_metadata(report))

reconciliation_assets = [chain_reconciliation]
