"""Prometheus metrics and trace spans of range ingestion (`ingest_range`); the RPC client's are in chain/metrics.py.

Names are part of the operational contract (docs/observability.md, ops/prometheus/alerts.yml): rename only
with the alert rules and the dashboard. These live in the process that ingests (CLI, Dagster run, live
service's RPC client); the chain-vs-index state that alerts need across short-lived Dagster runs is exported
from Postgres by `orderbook metrics serve` (orderbook_pipelines/exporter.py).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from orderbook_pipelines import obs
from orderbook_pipelines.ingestion.ranges import RangeNotFinal
from orderbook_pipelines.storage.writer import ReorgDetected

EVENTS = Counter("obp_ingest_events_total", "Order events written (new rows; re-runs add nothing)")
LOGS = Counter("obp_ingest_logs_total", "Logs fetched for ingested ranges")
REJECTED = Counter("obp_ingest_rejected_logs_total", "Logs that did not decode or map (see rejected_logs)")
RANGES = Counter("obp_ingest_ranges_total", "ingest_range outcomes", ["outcome"])
REORGS = Counter("obp_ingest_reorgs_detected_total", "Ranges refused by the reorg guard (stored history forked)")
STAGE_SECONDS = Histogram("obp_ingest_stage_seconds", "Duration of one ingestion stage of a block range", ["stage"],
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
RANGE_SECONDS = Histogram("obp_ingest_range_seconds", "Duration of ingest_range (fetch+decode+write)",
                          buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
HEAD = Gauge("obp_ingest_chain_head_block", "Chain head seen by the last ingested range")
SAFE = Gauge("obp_ingest_safe_head_block", "Safe (confirmed / finalized) head seen by the last ingested range")
INDEXED = Gauge("obp_ingest_processed_block", "Highest block written by this process")
LAG = Gauge("obp_ingest_lag_blocks", "Head minus the last range's processed_to, as seen by this process")

_high_water = [-1]  # highest processed_to written by this process
_stages: ContextVar[dict[str, float] | None] = ContextVar("obp_ingest_stages", default=None)
_log = logging.getLogger("obp.ingest")  # stdlib: honours levels even where obs is not configured
F = TypeVar("F", bound=Callable[..., Any])


def record(name: str, seconds: float, /, **fields: Any) -> None:
    """One stage of the current range: histogram, a log line with the trace id. The caller measures it (a stage
    interleaved with others, as fetch, decode and write are, sums its pieces)."""
    STAGE_SECONDS.labels(name).observe(seconds)
    stages = _stages.get()
    if stages is not None:
        stages[name] = round(seconds, 4)
    _log.debug("stage %s", name, extra={"stage": name, "seconds": round(seconds, 4), **fields})


def substages(name: str, seconds: dict[str, float]) -> None:
    """Parts of a stage timed inside it (`project.orders`, `write.copy`): recorded beside it, not in the histogram."""
    stages = _stages.get()
    if stages is not None:
        stages.update({f"{name}.{k}": v for k, v in seconds.items()})


def last_stages() -> dict[str, float]:
    """Stage durations of the last range traced in this context (for Dagster metadata)."""
    return dict(_stages.get() or {})


def traced_range(fn: F) -> F:
    """Wrap ingest_range: one trace id per block range, outcome counters, lag gauges, a summary log line."""

    @functools.wraps(fn)
    def wrapper(config: Any, chain: Any, engine: Any, start: int, end: int, run_id: str | None = None,
                **kwargs: Any) -> Any:
        stages: dict[str, float] = {}
        _stages.set(stages)
        t0 = time.perf_counter()
        with obs.trace(block_range=f"{start}-{end}", run_id=run_id) as tid:
            stages["trace_id"] = tid  # type: ignore[assignment]
            try:
                report = fn(config, chain, engine, start, end, run_id=run_id, **kwargs)
            except ReorgDetected as exc:
                REORGS.inc()
                RANGES.labels("reorg").inc()
                _log.warning("range refused by the reorg guard", extra={"error": str(exc)})
                raise
            except Exception as exc:
                outcome = "not_final" if isinstance(exc, RangeNotFinal) else "error"
                RANGES.labels(outcome).inc()
                _log.log(logging.INFO if outcome == "not_final" else logging.ERROR, "range not ingested",
                         extra={"outcome": outcome, "error": str(exc)})
                raise
            seconds = time.perf_counter() - t0
            RANGE_SECONDS.observe(seconds)
            RANGES.labels("complete" if report.complete else "partial").inc()
            EVENTS.inc(report.events_inserted)
            LOGS.inc(report.logs)
            REJECTED.inc(report.rejected)
            HEAD.set(report.head)
            SAFE.set(report.safe_head)
            _high_water[0] = max(_high_water[0], report.processed_to)
            INDEXED.set(_high_water[0])
            LAG.set(report.head - report.processed_to)
            _log.info("range ingested", extra={
                "processed_to": report.processed_to, "head": report.head, "safe_head": report.safe_head,
                "logs": report.logs, "events": report.events, "events_inserted": report.events_inserted,
                "rejected": report.rejected, "seconds": round(seconds, 4),
                "stages": {k: v for k, v in stages.items() if k != "trace_id"}})
            return report

    return wrapper  # type: ignore[return-value]


def dagster_metadata() -> dict[str, Any]:
    """The last range's trace id and stage durations, as Dagster run metadata (same figures as the metrics)."""
    stages = last_stages()
    out: dict[str, Any] = {"trace_id": str(stages.pop("trace_id", ""))}
    out.update({f"{k}_seconds": float(v) for k, v in stages.items() if "." not in k})  # stages, not their parts
    return out
