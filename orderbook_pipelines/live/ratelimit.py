"""Per-key moving-window rate limit ("at most N hits in any 1 s"), synchronous and O(1) amortized per hit.

The `limits` library's async moving window costs a lock, a task and an O(window) list insert per hit; on the
REST hot path (one hit per request at thousands of requests/s) that was a measurable share of a request.
Memory: at most N timestamps per active key; keys idle for a whole window are dropped on a periodic sweep.
"""

from __future__ import annotations

import time
from collections import deque


class MovingWindow:
    def __init__(self, amount: int, window_s: float = 1.0):
        self.amount = amount
        self.window_s = window_s
        self._hits: dict[str, deque[float]] = {}
        self._swept = time.monotonic()

    def hit(self, key: str) -> bool:
        """Count a hit for `key`; False (and not counted) when it already had `amount` hits in the window."""
        now = time.monotonic()
        floor = now - self.window_s
        if now - self._swept > 10 * self.window_s:
            self._sweep(floor)
        hits = self._hits.get(key)
        if hits is None:
            hits = self._hits[key] = deque()
        while hits and hits[0] <= floor:
            hits.popleft()
        if len(hits) >= self.amount:
            return False
        hits.append(now)
        return True

    def _sweep(self, floor: float) -> None:
        self._swept = floor + self.window_s
        for key in [k for k, h in self._hits.items() if not h or h[-1] <= floor]:
            del self._hits[key]
