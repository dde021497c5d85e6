"""Cold start of the live books from Postgres: the ingested frontier, then snapshot + replay up to it.

The frontier comes from storage/checkpoints.py and the books from recovery (snapshot + the stored event
stream), so the live service, `orderbook snapshot restore` and the Dagster snapshots share one definition
of both.
"""

from __future__ import annotations

import gc

from sqlalchemy import Engine

from orderbook_pipelines.book.model import Book
from orderbook_pipelines.gc_pause import gc_paused
from orderbook_pipelines.recovery.restore import restore_books
from orderbook_pipelines.storage import checkpoints


def final_height(engine: Engine, chain_id: int, start_block: int) -> tuple[int, str | None]:
    """Highest block H such that every block in [start_block, H] is durably ingested, and its stored hash."""
    with engine.connect() as conn:
        return checkpoints.frontier_block(conn, chain_id, start_block)


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
