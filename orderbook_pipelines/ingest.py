"""Ingest one block range end to end: fetch -> decode -> normalize -> guarded bulk write.

Kept free of Dagster so that the assets, the CLI and the tests run the very same path.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from sqlalchemy import Connection, Engine

from orderbook_pipelines import ingest_metrics
from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.config import ProjectConfig
from orderbook_pipelines.decoding import DecodedLog, Decoder, Rejected
from orderbook_pipelines.gc_pause import gc_paused
from orderbook_pipelines.normalize import metric_hashes_needed, normalize
from orderbook_pipelines.storage import registry
from orderbook_pipelines.storage.projections import project_orders, project_positions, project_trades
from orderbook_pipelines.storage.writer import RangeWrite, write_range


class RangeNotFinal(RuntimeError):
    """The range starts above the safe (confirmed/finalized) head: there is nothing final to ingest yet."""


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

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    @property
    def complete(self) -> bool:
        return self.processed_to == self.range_end


def log_addresses(config: ProjectConfig, market_addresses: dict[str, str]) -> dict[str, str]:
    """Every contract whose logs we fetch, mapped to its source."""
    out: dict[str, str] = {}
    for src in config.sources:
        if src.addresses == "markets":
            out.update({a: s for a, s in market_addresses.items() if s == src.name})
        else:
            out.update({a.lower(): src.name for a in src.addresses})
    return out


@ingest_metrics.traced_range
def ingest_range(config: ProjectConfig, chain: ChainClient, engine: Engine, start: int, end: int,
                 run_id: str | None = None, conn: Connection | None = None) -> RangeReport:
    """Fetch, decode, normalize and write one range in one transaction (`conn`: the caller's, if given)."""
    with gc_paused():  # ~100k parsed logs, args and rows per range, all acyclic (gc_pause.py)
        return _ingest(config, chain, engine, start, end, run_id, conn)


def _ingest(config: ProjectConfig, chain: ChainClient, engine: Engine, start: int, end: int,
            run_id: str | None, conn: Connection | None) -> RangeReport:
    given = conn  # the caller's transaction, if any (the name `conn` is rebound below)
    t0 = time.perf_counter()
    cid = config.chain.chain_id
    head = chain.block_number()
    safe = chain.safe_head(config.chain.finality, config.chain.confirmations)
    if start > safe:
        raise RangeNotFinal(f"range {start}-{end} is not final yet: safe head is {safe} (head {head})")
    processed_to = min(end, safe)

    with _transaction(engine, given) as conn:
        registry.sync_configured_markets(conn, config)
        addr_sources = log_addresses(config, registry.market_addresses(conn, cid))
    decoder = Decoder(config, addr_sources)
    logs = chain.get_logs(start, processed_to, sorted(addr_sources)) if addr_sources else []
    mark = ingest_metrics.stage("fetch", t0, logs=len(logs), head=head, safe_head=safe)

    decoded: list[DecodedLog] = []
    rejected: list[Rejected] = []
    for raw in logs:
        d = decoder.decode(raw)
        (decoded if isinstance(d, DecodedLog) else rejected).append(d)

    wanted = {start, processed_to} | ({start - 1} if start > 0 else set())
    wanted |= {d.pos.block_number for d in decoded} | {r.pos.block_number for r in rejected if r.pos.block_number >= 0}
    mark = ingest_metrics.stage("decode", mark, decoded=len(decoded), rejected=len(rejected))
    headers = chain.headers(sorted(wanted))
    mark = ingest_metrics.stage("headers", mark, blocks=len(headers))

    with _transaction(engine, given) as conn:
        discovered = 0
        hashes = metric_hashes_needed(decoded)
        if hashes:
            known = registry.load_registry(conn, cid).by_metric_hash
            for src_name in sorted({d.source for d in decoded if d.mapping.market.startswith("metric_hash:")}):
                new = {h for h in hashes if h not in known}
                discovered += registry.discover_metric_hashes(conn, cid, new, _book_source(config, src_name), start)
        reg = registry.load_registry(conn, cid)
        rows = normalize(decoded, reg, cid)
        result = write_range(
            conn,
            RangeWrite(cid, start, end, processed_to, headers, rows, rejected, run_id),
            config.order_events_partition_blocks,
        )
    ingest_metrics.stage("write", mark, events=len(rows), events_inserted=result.events_inserted)
    return RangeReport(
        range_start=start, range_end=end, processed_to=processed_to, safe_head=safe, head=head, logs=len(logs),
        events=len(rows), events_inserted=result.events_inserted, rejected=len(rejected),
        unresolved_market=sum(1 for r in rows if r.market_id is None), markets_discovered=discovered,
        seconds=time.perf_counter() - t0,
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


def project_range(engine: Engine, chain_id: int, start: int, end: int) -> dict[str, int]:
    """All projections for one range, in dependency order (positions read trades)."""
    with engine.begin() as conn:
        t = project_trades(conn, chain_id, start, end)
        o = project_orders(conn, chain_id, start, end)
        p = project_positions(conn, chain_id, start, end)
    return {"trades": t.rows, "orders": o.rows, "orders_touched": o.keys, "positions": p.rows}
