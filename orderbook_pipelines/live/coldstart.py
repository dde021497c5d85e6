"""Cold start of the live books from Postgres: the final height everything below is stored for, then replay.

Replay goes through the same Book as everywhere else; order keys are "<contract>:<order_id>".
"""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import Engine, text

from orderbook_pipelines.book.model import Book, BookEvent


def final_height(engine: Engine, chain_id: int, start_block: int) -> tuple[int, str | None]:
    """Highest block H such that every block in [start_block, H] is durably ingested, and its hash."""
    h = start_block - 1
    with engine.connect() as conn:
        for r in conn.execute(text("SELECT range_start, range_end, processed_to FROM ingestion_checkpoints "
                                   "WHERE chain_id = :c AND range_end >= :s ORDER BY range_start"),
                              {"c": chain_id, "s": start_block}):
            if r.range_start > h + 1:
                break
            h = max(h, r.processed_to)
            if r.processed_to < r.range_end:
                break
        row = conn.execute(text("SELECT hash FROM blocks WHERE chain_id = :c AND number = :n"),
                           {"c": chain_id, "n": h}).first()
    return h, (row.hash if row else None)


def order_key(contract: str, order_id: str) -> str:
    return f"{contract}:{order_id}"


def books_from_events(engine: Engine, chain_id: int, upto: int, market_ids: set[int] | None = None) -> dict[int, Book]:
    """Replay stored open/fill/cancel events up to `upto` into one Book per market (streamed, not loaded)."""
    books: dict[int, Book] = defaultdict(Book)
    last_block: dict[int, int] = {}
    with engine.connect().execution_options(stream_results=True, yield_per=20_000) as conn:
        rows = conn.execute(text(
            "SELECT market_id, block_number, kind, contract, order_id, side, order_type, price, quantity "
            "FROM order_events WHERE chain_id = :c AND block_number <= :u AND market_id IS NOT NULL "
            "AND (CAST(:ms AS integer[]) IS NULL OR market_id = ANY(:ms)) "
            "AND kind IN ('open', 'fill', 'cancel') ORDER BY block_number, log_index"),
            {"c": chain_id, "u": upto, "ms": sorted(market_ids) if market_ids is not None else None})
        for m, block, kind, contract, oid, side, otype, price, qty in rows:
            book = books[m]
            if last_block.get(m, block) != block:
                book.end_block()
            last_block[m] = block
            book.apply(BookEvent(kind, order_key(contract, oid), side, otype,
                                 int(price) if price is not None else None, int(qty) if qty is not None else None))
    for b in books.values():
        b.end_block()
    return dict(books)
