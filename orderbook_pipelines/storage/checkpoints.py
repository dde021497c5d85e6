"""The ingested frontier: which block ranges are durably stored, read one way for every caller.

A range's checkpoint row commits in the same transaction as its events and its projections, so a row here
means the range's orders, trades and positions are complete up to its `processed_to`. The frontier is the
last block before which no block is missing: books, snapshots, exports and checks stop there.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from sqlalchemy import Connection, text


class NotIngested(LookupError):
    """The block asked for is not (contiguously) ingested yet."""


class Checkpoint(NamedTuple):
    """A stored range; a (range_start, range_end, processed_to) row, as `contiguous` reads them."""

    range_start: int
    range_end: int
    processed_to: int


def contiguous(ranges: Iterable[tuple[int, int, int]], start_block: int | None = None) -> int | None:
    """Highest block N such that every block from the first range (or `start_block`) to N is stored.

    `ranges` are (range_start, range_end, processed_to) rows; a gap or a partial range stops the frontier;
    None when nothing contiguous is stored (the first range starts after `start_block`).
    """
    rows = sorted(ranges)
    if not rows or (start_block is not None and rows[0][0] > start_block):
        return None
    frontier = rows[0][0] - 1
    for rs, re_, processed in rows:
        if rs != frontier + 1:
            break
        frontier = processed
        if processed != re_:
            break
    return frontier if frontier >= rows[0][0] else None


def all_ranges(conn: Connection, chain_id: int | None = None) -> list[Checkpoint]:
    rows = conn.execute(
        text("SELECT range_start, range_end, processed_to FROM ingestion_checkpoints "
             "WHERE CAST(:c AS bigint) IS NULL OR chain_id = :c ORDER BY range_start"),
        {"c": chain_id},
    ).all()
    return [Checkpoint(*r) for r in rows]


def frontier(conn: Connection, chain_id: int | None = None, start_block: int | None = None) -> int | None:
    """The contiguous checkpoint frontier (None: nothing contiguous is stored)."""
    return contiguous(all_ranges(conn, chain_id), start_block)


def frontier_block(conn: Connection, chain_id: int, start_block: int) -> tuple[int, str | None]:
    """The frontier and its stored block hash; (start_block - 1, None) before anything is stored."""
    h = frontier(conn, chain_id, start_block)
    if h is None:
        return start_block - 1, None
    row = conn.execute(text("SELECT hash FROM blocks WHERE chain_id = :c AND number = :n"),
                       {"c": chain_id, "n": h}).first()
    return h, (row.hash if row else None)


def within_frontier(conn: Connection, block: int | None, chain_id: int | None = None,
                    start_block: int | None = None) -> int:
    """`block` (default: the frontier) if every block up to it is stored; NotIngested otherwise."""
    f = frontier(conn, chain_id, start_block)
    if f is None:
        raise NotIngested("nothing is contiguously ingested yet (no checkpoint from the start block)")
    if block is None:
        return f
    if block > f:
        raise NotIngested(f"block {block} is beyond the ingested frontier {f} (an earlier range is missing "
                          "or incomplete)")
    return block


def processed_to(conn: Connection, chain_id: int, range_start: int) -> int | None:
    """How far the range starting at `range_start` is stored (None: not at all)."""
    return conn.execute(
        text("SELECT processed_to FROM ingestion_checkpoints WHERE chain_id = :c AND range_start = :s"),
        {"c": chain_id, "s": range_start},
    ).scalar_one_or_none()


def history_gap(conn: Connection, chain_id: int, start_block: int, block: int,
                stored: list[Checkpoint] | None = None) -> str | None:
    """Why the stored history up to `block` is incomplete (a book needs all of it), or None if complete
    (`stored`: the ranges, already read)."""
    expected = start_block
    for c in all_ranges(conn, chain_id) if stored is None else stored:
        if c.range_start > block:
            break
        if c.range_start > expected:
            return f"blocks {expected}-{c.range_start - 1} are not ingested"
        if c.processed_to < min(c.range_end, block):
            return f"range {c.range_start}-{c.range_end} is ingested only to block {c.processed_to}"
        expected = c.range_end + 1
    return None


def in_scope(conn: Connection, chain_id: int, start: int | None = None, end: int | None = None,
             last: int | None = None, stored: list[Checkpoint] | None = None) -> list[Checkpoint]:
    """Stored ranges overlapping [start, end], or the `last` N ranges; ascending (`stored`: already read)."""
    ranges = all_ranges(conn, chain_id) if stored is None else stored
    if start is not None or end is not None:
        lo, hi = start if start is not None else 0, end if end is not None else 2**62
        return [c for c in ranges if c.range_end >= lo and c.range_start <= hi]
    return ranges[-(last or 1):]
