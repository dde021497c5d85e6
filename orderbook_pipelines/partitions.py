"""Block-range partitions: fixed windows of `range_size` blocks from the start block, added as the chain grows.

Keys are zero-padded so that they sort in chain order in the Dagster UI. One partition holds every market of
its range (markets x ranges would explode Dagster's partition count).
"""

from __future__ import annotations

from dagster import DynamicPartitionsDefinition

block_ranges = DynamicPartitionsDefinition(name="block_ranges")

_WIDTH = 12


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
