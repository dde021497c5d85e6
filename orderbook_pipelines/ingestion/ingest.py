"""Ingest one block range as one unit of work: fetch -> decode -> normalize -> guarded write -> projections.

The range's events, its projections (orders, trades, positions) and its checkpoint commit in ONE transaction,
so a checkpoint always means "this range is complete in every table": a crash at any point is healed by
resuming from the frontier. Kept free of Dagster so that the assets, the CLI and the tests run the same path.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field

from sqlalchemy import Connection, Engine

from orderbook_pipelines import faults
from orderbook_pipelines.book.model import order_key
from orderbook_pipelines.chain.decoding import Rejected
from orderbook_pipelines.chain.rpc import BlockHeader, ChainClient
from orderbook_pipelines.config import ProjectConfig
from orderbook_pipelines.gc_pause import gc_paused
from orderbook_pipelines.ingestion import metrics as ingest_metrics
from orderbook_pipelines.ingestion.ranges import RangeNotFinal
from orderbook_pipelines.ingestion.reader import EventReader
from orderbook_pipelines.ingestion.reorgs import record_detected
from orderbook_pipelines.storage import registry
from orderbook_pipelines.storage.projections import RangeProjection, WrittenRange, project_range
from orderbook_pipelines.storage.writer import EventSink, ReorgDetected, ensure_partitions

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

    width = config.order_events_partition_blocks
    with _transaction(engine, given) as conn:
        reader = EventReader.load(conn, config)
        made = ensure_partitions(conn, start, processed_to, width)
    setup = time.perf_counter() - t0

    with _transaction(engine, given) as conn:
        sink = EventSink(conn, cid, start, processed_to, width, made)
        try:
            read = _stream(config, reader, chain, conn, sink, start, processed_to)
            faults.crash_point("fetched")
            result = sink.finish(end, read.headers, read.rejected, run_id)
        except BaseException:
            sink.abort()
            raise
        ingest_metrics.record("fetch", setup + read.waited_s, logs=read.logs, head=head, safe_head=safe)
        ingest_metrics.record("decode", read.decode_s, decoded=read.decoded, rejected=len(read.rejected))
        ingest_metrics.record("normalize", read.normalize_s, events=len(sink.events))
        ingest_metrics.record("write", sum(result.seconds.values()), events_inserted=result.events_inserted)
        ingest_metrics.substages("write", result.seconds)
        faults.crash_point("events_written")
        t = time.perf_counter()
        written = WrittenRange(sink.events, sink.block_dt) if sink.fresh else None
        projected = project_range(conn, cid, start, processed_to, written)
        faults.crash_point("projected")
        ingest_metrics.record("project", time.perf_counter() - t, **asdict(projected))
        ingest_metrics.substages("project", projected.seconds)
    faults.crash_point("committed")
    return RangeReport(
        range_start=start, range_end=end, processed_to=processed_to, safe_head=safe, head=head, logs=read.logs,
        events=len(sink.events), events_inserted=result.events_inserted, rejected=len(read.rejected),
        unresolved_market=sum(1 for r in sink.events if r.market_id is None), markets_discovered=read.discovered,
        seconds=time.perf_counter() - t0, projection=projected,
    )


@dataclass
class _Streamed:
    """What the windows of a range held (their rows are in the sink), and where this thread's time went."""

    logs: int = 0
    decoded: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    headers: dict[int, BlockHeader] = field(default_factory=dict)
    discovered: int = 0
    waited_s: float = 0.0
    decode_s: float = 0.0
    normalize_s: float = 0.0


def _stream(config: ProjectConfig, reader: EventReader, chain: ChainClient, conn: Connection, sink: EventSink,
            start: int, end: int) -> _Streamed:
    """Fetch, read (decode and normalize) and COPY [start, end] window by window: each window is stored while the
    next is fetched. A window naming metric hashes of markets not registered yet is read again once they are, and
    a fill takes the market of its order opened in an earlier window, as if the range were one batch. Stage times:
    `decode_s` reading the logs into rows, `normalize_s` the rest (market discovery, the opens noted)."""
    cid = config.chain.chain_id
    out = _Streamed()
    opened: dict[str, int] = {}  # order key -> market, of the opens of earlier windows

    def markets_of(keys: set[str]) -> dict[str, int]:
        return {k: opened[k] for k in keys if k in opened}

    always = {start, end} | ({start - 1} if start > 0 else set())
    for win in reader.windows(chain, start, end, always):
        out.logs += win.logs
        out.headers.update(win.headers)
        out.waited_s += win.waited_s
        t = time.perf_counter()
        read = reader.read(win.raw, markets_of)
        t1 = time.perf_counter()
        out.decode_s += t1 - t
        if read.unknown_metric_hashes:
            sink.pause()  # registry statements need the connection the COPY holds
            new = set(read.unknown_metric_hashes)
            for src_name in sorted(set(read.unknown_metric_hashes.values())):
                out.discovered += registry.discover_metric_hashes(conn, cid, new, _book_source(config, src_name),
                                                                  start)
            reader = reader.reload_registry(conn)
            read = reader.read(win.raw, markets_of)  # again, with the markets just registered
        rows = read.rows
        out.decoded += len(rows)
        out.rejected += read.rejected
        opened.update((order_key(r.contract, r.order_id), r.market_id) for r in rows
                      if r.kind == "open" and r.market_id is not None and r.order_id is not None)
        out.normalize_s += time.perf_counter() - t1
        sink.add(rows, win.headers)
    return out


def _book_source(config: ProjectConfig, router_source: str) -> str:
    """The source whose contracts are the markets of a router source: the first per-market source."""
    for s in config.sources:
        if s.addresses == "markets":
            return s.name
    return router_source


def _transaction(engine: Engine, conn: Connection | None) -> AbstractContextManager[Connection]:
    """The caller's transaction when given (reconciliation repairs a range atomically), else a new one."""
    return nullcontext(conn) if conn is not None else engine.begin()
