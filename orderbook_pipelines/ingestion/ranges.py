"""Block ranges: fixed windows of `range_size` blocks from the start block, the unit of ingestion.

Keys are zero-padded so that they sort in chain order (the Dagster partitions use them as they are).
"""

from __future__ import annotations

_WIDTH = 12


class RangeNotFinal(RuntimeError):
    """The range starts above the safe (confirmed/finalized) head: there is nothing final to ingest yet."""


def range_key(start: int, end: int) -> str:
    return f"{start:0{_WIDTH}d}-{end:0{_WIDTH}d}"


def parse_range_key(key: str) -> tuple[int, int]:
    try:
        a, b = key.split("-")
        start, end = int(a), int(b)
    except ValueError:
        raise ValueError(f"not a block-range partition key: {key!r} (expected NNNNNNNNNNNN-NNNNNNNNNNNN)") from None
    if end < start:
        raise ValueError(f"block-range partition key {key!r} ends before it starts")
    return start, end


def range_bounds(start_block: int, range_size: int, index: int) -> tuple[int, int]:
    lo = start_block + index * range_size
    return lo, lo + range_size - 1


def ranges_up_to(start_block: int, range_size: int, block: int) -> list[tuple[int, int]]:
    """Every range that contains at least one block in [start_block, block]."""
    if block < start_block:
        return []
    n = (block - start_block) // range_size + 1
    return [range_bounds(start_block, range_size, i) for i in range(n)]


def ranges_between(start_block: int, range_size: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """The grid ranges that hold a block of [lo, hi] (the CLI's --from/--to)."""
    return [(a, b) for a, b in ranges_up_to(start_block, range_size, hi) if b >= lo]
