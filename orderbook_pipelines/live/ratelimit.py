"""Per-key moving-window rate limit ("at most N hits in any `window_s` seconds") for the REST and WebSocket paths.

A hit is a few microseconds (a deque per key holding the times of its last N accepted hits) and never awaits, so
it cannot interleave with another coroutine on the event loop: it costs nothing next to a cached `/api/depth`
answer (bench/live.py rest). The clock is a parameter so that tests can state the limit exactly (N accepted,
the next refused, accepted again once the oldest hit is `window_s` old) whatever the speed of the machine.
(The `limits` package's in-memory moving window reads the wall clock itself and expires keys from a timer
thread; this needs neither.)
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

_SWEEP_MIN_KEYS = 1024


class MovingWindow:
    def __init__(self, amount: int, window_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.amount = amount
        self.window_s = window_s
        self.clock = clock
        self._hits: dict[str, deque[float]] = {}
        self._sweep_at = _SWEEP_MIN_KEYS

    def hit(self, key: str) -> bool:
        """Count a hit for `key`; False (and not counted) when it already had `amount` hits in the window."""
        if self.amount <= 0:
            return False
        now = self.clock()
        hits = self._hits.get(key)
        if hits is None:
            if len(self._hits) >= self._sweep_at:
                self._sweep(now)
            hits = self._hits[key] = deque(maxlen=self.amount)
        if len(hits) == self.amount and now - hits[0] < self.window_s:
            return False
        hits.append(now)  # maxlen: the oldest hit falls out
        return True

    def remaining(self, key: str) -> int:
        """Hits `key` may still make in the current window (what a test or a header can report)."""
        now = self.clock()
        return self.amount - sum(1 for t in self._hits.get(key, ()) if now - t < self.window_s)

    def _sweep(self, now: float) -> None:
        """Memory stays bounded by the clients of the last window: forget keys with no hit inside it."""
        self._hits = {k: q for k, q in self._hits.items() if q and now - q[-1] < self.window_s}
        self._sweep_at = max(_SWEEP_MIN_KEYS, 2 * len(self._hits))
