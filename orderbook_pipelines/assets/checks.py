"""Asset checks of the `orders` asset per block range: the book equals the chain, and invariants hold.

Both are blocking: downstream assets of `orders` (snapshots, analytics) do not run on a failed range. The
checks themselves are plain code in quality/checks.py (also run by `orderbook check`).
"""

import json
from typing import Any

import dagster as dg

from orderbook_pipelines.ingestion.ranges import parse_range_key
from orderbook_pipelines.partitions import block_ranges
from orderbook_pipelines.quality.checks import BOOK_CHECK, INVARIANTS_CHECK, CheckReport, check_books, check_invariants
from orderbook_pipelines.resources import ChainResource, PostgresResource, SettingsResource


def _result(report: CheckReport, what: str) -> dg.AssetCheckResult:
    meta: dict[str, Any] = {"block": report.block if report.block is not None else -1,
                            "markets_checked": len(report.markets)}
    if report.skipped:
        meta["skipped"] = report.skipped
        return dg.AssetCheckResult(passed=True, severity=dg.AssetCheckSeverity.WARN, metadata=meta,
                                description=f"not evaluated: {report.skipped}")
    if report.orders_checked:
        meta["orders_checked"] = report.orders_checked
    failed = report.failed
    meta["markets_failed"] = len(failed)
    if failed:
        meta["failed_markets"] = ", ".join(m.metric_id for m in failed[:50])
        meta["differences"] = dg.MetadataValue.json({m.metric_id: m.details for m in failed[:20]})
    if report.not_evaluated:
        meta["not_evaluated"] = dg.MetadataValue.md("\n".join(f"- `{k}`: {why}" for k, why in
                                                               sorted(report.not_evaluated.items())))
    counts = {k: len(v) for k, v in report.violations.items()}
    if report.violations:
        meta["violations"] = dg.MetadataValue.json(counts)
        bad = {k: v for k, v in report.violations.items() if v}
        if bad:
            meta["examples"] = dg.MetadataValue.json(json.loads(json.dumps(bad, default=str)))
    desc = (f"{what}: {len(failed)} of {len(report.markets)} market(s) differ at block {report.block}"
            if failed else f"{what}: all {len(report.markets)} market(s) agree at block {report.block}")
    return dg.AssetCheckResult(passed=report.passed, severity=dg.AssetCheckSeverity.ERROR, metadata=meta,
                               description=desc)


@dg.asset_check(asset="orders", blocking=True, partitions_def=block_ranges, name=BOOK_CHECK,
             description="The book rebuilt from stored events equals the contracts' views (best bid/ask, top-N "
             "levels, open orders' getOrder) at the range's last processed block.")
def book_equals_chain(context: dg.AssetCheckExecutionContext, settings: SettingsResource, chain: ChainResource,
                      postgres: PostgresResource) -> dg.AssetCheckResult:
    start, end = parse_range_key(context.partition_key)
    report = check_books(settings.load(), chain.client(), postgres.engine(), start, end, run_id=context.run.run_id)
    return _result(report, "book vs chain")


@dg.asset_check(asset="orders", blocking=True, partitions_def=block_ranges, name=INVARIANTS_CHECK,
             description="No crossed book, no negative remaining, fills never above the order size, every trade "
             "has buyer and seller, every fill's order exists.")
def order_invariants(context: dg.AssetCheckExecutionContext, settings: SettingsResource,
                     postgres: PostgresResource) -> dg.AssetCheckResult:
    start, end = parse_range_key(context.partition_key)
    report = check_invariants(settings.load(), postgres.engine(), start, end, run_id=context.run.run_id)
    return _result(report, "invariants")


asset_checks = [book_equals_chain, order_invariants]
