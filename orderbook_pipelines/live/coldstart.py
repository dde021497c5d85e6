"""Cold start of the live books from Postgres: the ingested frontier, then snapshot + replay up to it.

The frontier and the books come from the recovery module (replay.ingested_through, snapshots.restore_books), so
the live service, `orderbook snapshot restore` and the Dagster snapshots share one definition of both.
Order keys are "<contract>:<order_id>".
"""

from __future__ import annotations

import gc

from sqlalchemy import Engine, text

from orderbook_pipelines.book.model import Book
from orderbook_pipelines.gc_pause import gc_paused
from orderbook_pipelines.replay import ingested_through
from orderbook_pipelines.snapshots import restore_books


def final_height(engine: Engine, chain_id: int, start_block: int) -> tuple[int, str | None]:
    """Highest block H such that every block in [start_block, H] is durably ingested, and its stored hash."""
    with engine.connect() as conn:
        h = ingested_through(conn, chain_id, start_block)
        if h is None:
            return start_block - 1, None
        row = conn.execute(text("SELECT hash FROM blocks WHERE chain_id = :c AND number = :n"),
                           {"c": chain_id, "n": h}).first()
    return h, (row.hash if row else None)


def order_key(contract: str, order_id: str) -> str:
    return f"{contract}:{order_id}"


def books_at(engine: Engine, chain_id: int, height: int, start_block: int,
             market_ids: set[int] | None = None) -> dict[int, Book]:
    """Books at a final height: the latest verified snapshot <= height plus the stored events after it.

    The cyclic GC is off while the books are built and the result is frozen (gc.freeze) before it is back on:
    otherwise the first allocations after the restore trigger collections that walk every new order object
    (tenths of a second at a million orders, spent before the first book is served). The books hold no reference
    cycles, so freezing them keeps nothing alive that refcounting would free.
    """
    if height < start_block or market_ids == set():
        return {}
    ids = sorted(market_ids) if market_ids is not None else None
    with gc_paused():
        books = {m: book for m, (book, _b) in restore_books(engine, height, chain_id, ids).items()}
        gc.freeze()
    return books
