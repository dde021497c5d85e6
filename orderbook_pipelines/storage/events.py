"""The stored-event stream: the book events of `order_events` in chain order, as canonical events.

Every consumer that rebuilds books from Postgres (snapshots, the live cold start, the book checks, analytics
liquidity, `orderbook replay export`) reads this one stream, so they agree on which events count and on their
order. A fill or cancel belongs to the market of its order (storage/projections.py keeps that true).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO

from sqlalchemy import Connection, Engine, text

from orderbook_pipelines.book.model import order_key
from orderbook_pipelines.book.replay import CanonicalEvent, write_events
from orderbook_pipelines.storage.checkpoints import within_frontier
from orderbook_pipelines.storage.db import stream_rows
from orderbook_pipelines.storage.registry import MARKET_NAME_SQL, resolve_market


def order_key_sql(alias: str) -> str:
    """book.model.order_key in SQL, for rows of table alias `alias` that have contract and order_id."""
    return f"{alias}.contract || ':' || {alias}.order_id"


def stored_events(conn: Connection, *, after_block: int = -1, to_block: int | None = None,
                  market_ids: Iterable[int] | None = None, chain_id: int | None = None) -> Iterator[CanonicalEvent]:
    """Book events of resolved markets in (after_block, to_block], chain order, streamed (server-side cursor).

    Positional driver rows with the amounts as text (int() of a str is far cheaper than of a Decimal): a
    replay from the first event is a million rows at scale.
    """
    ids = sorted(set(market_ids)) if market_ids is not None else None
    sql = f"""
        SELECT e.block_number, e.log_index, e.block_hash, e.tx_hash, e.market_id, {MARKET_NAME_SQL} AS market,
               e.kind, e.contract, e.order_id, e.trader, e.side, e.order_type, e.price::text, e.quantity::text
        FROM order_events e JOIN markets m USING (market_id)
        WHERE e.kind IN ('open', 'fill', 'cancel') AND e.order_id IS NOT NULL
          AND e.block_number > %(after)s AND (CAST(%(to)s AS bigint) IS NULL OR e.block_number <= %(to)s)
          AND (CAST(%(c)s AS bigint) IS NULL OR e.chain_id = %(c)s)
          AND (CAST(%(ids)s AS integer[]) IS NULL OR e.market_id = ANY(CAST(%(ids)s AS integer[])))
        ORDER BY e.block_number, e.log_index
    """
    rows = stream_rows(conn, sql, {"after": after_block, "to": to_block, "c": chain_id, "ids": ids})
    for bn, li, bh, tx, mid, market, kind, contract, oid, trader, side, ot, price, qty in rows:
        yield CanonicalEvent(bn, li, bh, tx, market, mid, kind, contract, oid, trader, side, ot,
                             None if price is None else int(price), None if qty is None else int(qty))


def open_markets(conn: Connection, chain_id: int, keys: set[str]) -> dict[str, int]:
    """Markets of stored orders by order key (book.model.order_key): the `order_markets` lookup of
    chain.normalize for readers that compare with what is stored."""
    if not keys:
        return {}
    pairs = [k.split(":", 1) for k in sorted(keys)]
    rows = conn.execute(
        text("""SELECT e.contract, e.order_id, e.market_id FROM order_events e
                JOIN unnest(CAST(:c1 AS text[]), CAST(:o1 AS text[])) AS k(contract, order_id)
                  ON e.contract = k.contract AND e.order_id = k.order_id
                WHERE e.chain_id = :c AND e.kind = 'open' AND e.market_id IS NOT NULL"""),
        {"c": chain_id, "c1": [c for c, _ in pairs], "o1": [o for _, o in pairs]},
    )
    return {order_key(r.contract, r.order_id): int(r.market_id) for r in rows}


@dataclass(frozen=True)
class ExportReport:
    events: int
    to_block: int | None


def export_events(engine: Engine, out: IO[str], market: str | None = None, to_block: int | None = None) -> ExportReport:
    """Write the canonical stream (default: up to the ingested frontier, so it never ends mid-gap)."""
    with engine.connect() as conn:
        to_block = within_frontier(conn, to_block)
        ids = [resolve_market(conn, market)[0]] if market else None
        n = write_events(stored_events(conn, to_block=to_block, market_ids=ids), out)
    return ExportReport(n, to_block)
