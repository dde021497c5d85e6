"""Per-key moving-window rate limit ("at most N hits in any 1 s") for the REST and WebSocket paths.

The `limits` library's synchronous strategy: its asyncio variant costs a lock and a task per hit, a measurable
share of a cached `/api/depth` request at thousands of requests/s (bench/live.py rest); the synchronous one is a
few microseconds and never awaits, so a hit cannot interleave with another coroutine on the event loop.
"""

from __future__ import annotations

from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter


class MovingWindow:
    def __init__(self, amount: int):
        self.amount = amount
        self._item = RateLimitItemPerSecond(amount)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def hit(self, key: str) -> bool:
        """Count a hit for `key`; False (and not counted) when it already had `amount` hits in the window."""
        return self._limiter.hit(self._item, key)
