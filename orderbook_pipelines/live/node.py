"""Wires a live process into the Redis cluster: membership and rebalancing for workers, the Redis feed for all.

A worker (worker_id set) follows the chain for the markets it owns and publishes them, fenced, to Redis; any
process, worker or API-only, serves its clients from the Redis feed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from typing import Protocol

import orjson

from orderbook_pipelines.chain.normalize import OrderEventRow
from orderbook_pipelines.live.cluster import Cluster, RedisFeed, owner_of
from orderbook_pipelines.live.follower import Update
from orderbook_pipelines.live.hub import Hub
from orderbook_pipelines.live.state import MarketView

log = logging.getLogger(__name__)


class OwnedMarkets(Protocol):
    """What membership needs of the follower (live.follower.Follower): the market names it knows and the
    markets it owns, which the membership thread changes through `set_owned`."""

    market_names: dict[int, str]
    owned: set[int] | None

    def set_owned(self, markets: set[int]) -> None: ...


class ClusterNode:
    """Ownership goes to the follower, views from Redis go to the hub on the event loop given to `start`."""

    def __init__(self, hub: Hub, follower: OwnedMarkets, redis_url: str, worker_id: str | None,
                 prefix: str = "obp:", ttl_s: float = 3.0):
        self.hub = hub
        self.follower = follower
        self.loop: asyncio.AbstractEventLoop | None = None  # set by start(): the loop runs only after startup
        self.cluster = Cluster(redis_url, worker_id, prefix, ttl_s)
        self.worker = worker_id is not None
        self.feed = RedisFeed(self.cluster, self._resolve, self._deliver, self.deliver_rows)
        self.fenced = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._membership_loop, name="membership", daemon=True)
        if self.worker:
            follower.owned = set()  # owns nothing until membership says so

    def _resolve(self, name: str) -> int | None:
        return self.hub.by_name.get(name)

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Join (workers) and start the feed; its views are handed to the hub on `loop`."""
        self.loop = loop
        if self.worker:
            self.cluster.heartbeat()
            self.rebalance()
            self._thread.start()
        self.feed.start()
        self.feed.pubsub.subscribe(self.cluster.key("rows"))

    def stop(self) -> None:
        self._stop.set()
        if self.worker:
            self.cluster.leave()  # graceful: the others take our markets at their next rebalance
        self.feed.stop()

    def _membership_loop(self) -> None:
        while not self._stop.wait(self.cluster.ttl_s / 3):
            try:
                self.cluster.heartbeat()
                self.rebalance()
            except Exception:  # Redis trouble: keep serving; the next beat retries
                log.exception("membership heartbeat failed")

    def rebalance(self) -> set[int]:
        alive = self.cluster.alive()
        if self.cluster.worker_id not in alive:
            alive.append(self.cluster.worker_id)  # type: ignore[arg-type]
        names = self.follower.market_names
        owned = {m for m, n in names.items() if owner_of(n, alive) == self.cluster.worker_id}
        current = self.follower.owned or set()
        for m in owned - current:
            self.cluster.claim(names[m])
        self.follower.set_owned(owned)
        return owned

    # -- follower thread -> Redis ---------------------------------------------------------------------------
    def publish(self, update: Update) -> None:
        names = self.follower.market_names
        for v in update.views:
            if self.cluster.publish(names.get(v.market_id, str(v.market_id)), v, update.reason) < 0:
                self.fenced += 1  # another worker owns it now; its adoption publishes the truth
        if update.rows or update.reverted_from is not None:
            self.cluster.r.publish(self.cluster.key("rows"), rows_message(update.rows, update.reverted_from))

    # -- Redis feed -> event loop ---------------------------------------------------------------------------
    def _deliver(self, views: list[MarketView], reason: str) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.hub.on_update, Update("reset" if reason == "reset" else "block", views))

    def deliver_rows(self, raw: bytes) -> None:
        rows, reverted_from = rows_of_message(raw)
        reason = "reorg" if reverted_from is not None else "block"
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.hub.on_update, Update(reason, [], rows, reverted_from=reverted_from))


# uint256 amounts: beyond the 64-bit integers of JSON encoders (orjson refuses them), so they travel as decimal
# strings. (As integers, every block with a row failed to publish and its follower step was retried a second
# later: a worker fell one block per second behind a busy chain.)
_AMOUNTS = ("price", "quantity")


def rows_message(rows: list[OrderEventRow], reverted_from: int | None) -> bytes:
    """One block's rows (or a reorg's start) for the rows channel."""
    out = []
    for r in rows:
        d = dataclasses.asdict(r)
        for k in _AMOUNTS:
            if d[k] is not None:
                d[k] = str(d[k])
        out.append(d)
    return orjson.dumps({"rows": out, "reverted_from": reverted_from})


def rows_of_message(raw: bytes) -> tuple[list[OrderEventRow], int | None]:
    doc = orjson.loads(raw)
    rows = []
    for d in doc["rows"]:
        for k in _AMOUNTS:
            if d[k] is not None:
                d[k] = int(d[k])
        rows.append(OrderEventRow(**d))
    return rows, doc.get("reverted_from")
