"""The book checksum clients verify after every message (Kraken/OKX style, over exact integers).

CRC32 of the top `n` levels (n = min(depth, 25)), interleaved best-first: bid 1, ask 1, bid 2, ask 2, ...,
each written as "<price>:<quantity>" in raw integer units and joined by ":". A side with fewer levels simply
contributes fewer entries. Unsigned 32-bit result.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

CHECKSUM_LEVELS = 25


def book_checksum(bids: Sequence[tuple[int, int]], asks: Sequence[tuple[int, int]], depth: int = 25) -> int:
    n = min(depth, CHECKSUM_LEVELS)
    parts: list[str] = []
    for i in range(n):
        if i < len(bids):
            parts.append(f"{bids[i][0]}:{bids[i][1]}")
        if i < len(asks):
            parts.append(f"{asks[i][0]}:{asks[i][1]}")
    return zlib.crc32(":".join(parts).encode()) & 0xFFFFFFFF
