"""Ingest one block range as one unit of work: fetch -> decode -> normalize -> guarded write -> projections.

The range's events, its projections (orders, trades, positions) and its checkpoint commit in ONE transaction,
so a checkpoint always means "this range is complete in every table": a crash at any point is healed by
resuming from the frontier. Kept free of Dagster so that the assets, the CLI and the tests run the same path.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass

from sqlalchemy import Connection, Engine

from orderbook_pipelines import faults
from orderbook_pipelines.chain.normalize import metric_hashes_needed
from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.config import ProjectConfig
from orderbook_pipelines.gc_pause import gc_paused
from orderbook_pipelines.ingestion import metrics as ingest_metrics
from orderbook_pipelines.ingestion.ranges import RangeNotFinal
from orderbook_pipelines.ingestion.reader import EventReader
from orderbook_pipelines.ingestion.reorgs import record_detected
from orderbook_pipelines.storage import registry
from orderbook_pipelines.storage.projections import RangeProjection, project_range
from orderbook_pipelines.storage.writer import RangeWrite, ReorgDetected, write_range

__all__ = ["RangeNotFinal", "RangeReport", "ingest_range"]


@dataclass(frozen=True)
class RangeReport:
    range_start: int
    range_end: int
    processed_to: int
    safe_head: int
    head: int
    logs: int
    events: int
    events_inserted: int
    rejected: int
    unresolved_market: int
    markets_discovered: int
    seconds: float
    projection: RangeProjection  # committed in the same transaction as the events

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    @property
    def complete(self) -> bool:
        return self.processed_to == self.range_end


@ingest_metrics.traced_range
def ingest_range(config: ProjectConfig, chain: ChainClient, engine: Engine, start: int, end: int,
                 run_id: str | None = None, conn: Connection | None = None, upto: int | None = None) -> RangeReport:
    """Ingest and project [start, end] up to min(end, safe head, `upto`) in one transaction (`conn`: the
    caller's, if given: reconciliation repairs a range inside its own)."""
    with gc_paused():  # ~100k parsed logs, args and rows per range, all acyclic (gc_pause.py)
        try:
            return _ingest(config, chain, engine, start, end, run_id, conn, upto)
        except ReorgDetected:
            if conn is None:  # a deep reorg is an incident on record at once (a repair's own caller records it)
                record_detected(config, chain, engine, start, end, run_id)
            raise


def _ingest(config: ProjectConfig, chain: ChainClient, engine: Engine, start: int, end: int,
            run_id: str | None, given: Connection | None, upto: int | None) -> RangeReport:
    t0 = time.perf_counter()
    cid = config.chain.chain_id
    head = chain.block_number()
    safe = chain.safe_head(config.chain.finality, config.chain.confirmations)
    if start > safe:
        raise RangeNotFinal(f"range {start}-{end} is not final yet: safe head is {safe} (head {head})")
    if upto is not None and upto < start:
        raise ValueError(f"range {start}-{end}: upper bound {upto} is before its start")
    processed_to = min(end, safe, end if upto is None else upto)

    with _transaction(engine, given) as conn:
        reader = EventReader.load(conn, config)
    t1 = time.perf_counter()
    # Fetch and decode overlap (reader.read); the stages report this thread's waiting and decoding time.
    read = reader.read(chain, start, processed_to, {start, processed_to} | ({start - 1} if start > 0 else set()))
    decoded, rejected, headers = read.decoded, read.rejected, read.headers
    mark = time.perf_counter()
    ingest_metrics.stage("fetch", mark - (t1 - t0) - read.waited_s, logs=read.logs, head=head, safe_head=safe)
    ingest_metrics.stage("decode", mark - read.decode_s, decoded=len(decoded), rejected=len(rejected))
    ingest_metrics.stage("headers", mark, blocks=len(headers))
    faults.crash_point("fetched")

    with _transaction(engine, given) as conn:
        discovered = 0
        hashes = metric_hashes_needed(decoded)
        if hashes:
            known = reader.registry.by_metric_hash
            for src_name in sorted({d.source for d in decoded if d.mapping.market.startswith("metric_hash:")}):
                new = {h for h in hashes if h not in known}
                discovered += registry.discover_metric_hashes(conn, cid, new, _book_source(config, src_name), start)
            reader = reader.reload_registry(conn)
        rows = reader.rows(decoded)
        mark = ingest_metrics.stage("normalize", mark, events=len(rows))
        result = write_range(
            conn,
            RangeWrite(cid, start, end, processed_to, headers, rows, rejected, run_id),
            config.order_events_partition_blocks,
        )
        mark = ingest_metrics.stage("write", mark, events=len(rows), events_inserted=result.events_inserted)
        ingest_metrics.substages("write", result.seconds)
        faults.crash_point("events_written")
        projected = project_range(conn, cid, start, processed_to)
        faults.crash_point("projected")
        ingest_metrics.stage("project", mark, **asdict(projected))
        ingest_metrics.substages("project", projected.seconds)
    faults.crash_point("committed")
    return RangeReport(
        range_start=start, range_end=end, processed_to=processed_to, safe_head=safe, head=head, logs=read.logs,
        events=len(rows), events_inserted=result.events_inserted, rejected=len(rejected),
        unresolved_market=sum(1 for r in rows if r.market_id is None), markets_discovered=discovered,
        seconds=time.perf_counter() - t0, projection=projected,
    )


def _book_source(config: ProjectConfig, router_source: str) -> str:
    """The source whose contracts are the markets of a router source: the first per-market source."""
    for s in config.sources:
        if s.addresses == "markets":
            return s.name
    return router_source


def _transaction(engine: Engine, conn: Connection | None) -> AbstractContextManager[Connection]:
    """The caller's transaction when given (reconciliation repairs a range atomically), else a new one."""
    return nullcontext(conn) if conn is not None else engine.begin()
