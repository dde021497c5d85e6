"""The order index of `order_events` is partial (kinds open, fill, cancel; sql/0010): every statement that looks
events up by order must still be able to use it, and the rows it leaves out must really be out of it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Connection, event, text

from orderbook_pipelines.storage.db import drop_database, engine_for
from orderbook_pipelines.storage.events import open_markets
from orderbook_pipelines.storage.projections import project_range
from tests.conftest import new_database

KINDS = ("open", "fill", "cancel", "trade", "book_add", "book_remove")


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    url = new_database()
    with engine_for(url).begin() as conn:
        conn.execute(text("INSERT INTO markets (chain_id, metric_id, metric_hash, source) "
                          "VALUES (31337, 'SILVER_V1', :h, 'r')"), {"h": "0x" + "1" * 64})
        conn.execute(text("SELECT ensure_order_events_partitions(0, 3000, 1000000)"))
        # 3,000 orders over 3,000 blocks, one event of every kind each; statistics as ingestion leaves them.
        conn.execute(text("""
            INSERT INTO order_events (chain_id, block_number, block_hash, block_time, tx_hash, tx_index, log_index,
                                      contract, market_id, source, event_name, kind, order_id, trader, side,
                                      order_type, price, quantity, buyer, seller, args)
            SELECT 31337, b, '0xh', now(), '0xt', 0, k.i, '0xc', 1, 'r', 'E', k.kind, b::text, '0xa', 0, 1, 5, 2,
                   '0xa', '0xb', '{}'
            FROM generate_series(1, 3000) b, unnest(CAST(:kinds AS text[])) WITH ORDINALITY AS k(kind, i)"""),
            {"kinds": list(KINDS)})
        conn.execute(text("ANALYZE order_events"))
    yield url
    drop_database(url)


def _plans(url: str, run) -> list[tuple[str, str]]:
    """(statement, plan) of every statement `run(conn)` executes that joins or filters events on their order."""
    seen: list[tuple[str, object]] = []
    engine = engine_for(url)

    def capture(conn, cursor, statement, parameters, context, executemany) -> None:
        if "order_id = " in statement and "order_events" in statement:
            seen.append((statement, parameters))

    with engine.connect() as conn:
        event.listen(engine, "before_cursor_execute", capture)
        try:
            run(conn)
        finally:
            event.remove(engine, "before_cursor_execute", capture)
        conn.rollback()
        conn.exec_driver_sql("SET enable_seqscan = off")  # can it, not does it on 3,000 rows
        return [(s, "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + s, p)))  # type: ignore[arg-type]
                for s, p in seen]


def _uses_order_index(plan: str) -> bool:
    return "contract_order_id_idx" in plan or "order_events_order_idx" in plan


def test_every_lookup_by_order_can_use_the_partial_index(url: str) -> None:
    def readers(conn: Connection) -> None:
        project_range(conn, 31337, 100, 200)  # fill markets, orders (SQL rule) on stored events
        open_markets(conn, 31337, {"0xc:5", "0xc:6"})

    plans = _plans(url, readers)
    assert len(plans) >= 3, [s[:80] for s, _ in plans]
    for statement, plan in plans:
        assert _uses_order_index(plan), f"{statement}\n-- plan:\n{plan}"


def test_trades_and_book_events_are_not_in_the_order_index(url: str) -> None:
    with engine_for(url).connect() as conn:
        preds = conn.execute(text("""
            SELECT pg_get_expr(i.indpred, i.indrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
            WHERE c.relname LIKE 'order_events%'
              AND pg_get_indexdef(i.indexrelid) LIKE '%(chain_id, contract, order_id)%'
        """)).scalars().all()
        assert preds and all(p is not None for p in preds), preds
        for kind in KINDS:  # the predicate, evaluated by the server for a row of each kind
            inside = conn.execute(text(f"SELECT {preds[0].replace('kind', ':k')}"), {"k": kind}).scalar_one()
            assert inside == (kind in ("open", "fill", "cancel")), kind
