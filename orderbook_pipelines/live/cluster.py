"""Several live processes sharing the markets through Redis (no home-made consensus: Redis is the referee).

- Membership: each worker heartbeats into a sorted set; workers seen within `ttl_s` are alive.
- Ownership: rendezvous hashing of (worker, market) over the alive workers, so every worker computes the same
  owner without talking, and a dead worker's markets spread over the others.
- Publishing is fenced: one Lua script checks the owner key, increments the market's global seq, stores the
  depth and publishes, atomically. A worker that lost a market cannot publish it any more; seq stays
  monotonic across handovers.
- Every process (worker or pure API process) serves its clients from the Redis update stream, so clients
  on any process see the same sequence of views and therefore the same deltas.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable

import orjson
import redis

from orderbook_pipelines.live.hub import levels_json
from orderbook_pipelines.live.state import MarketView

log = logging.getLogger(__name__)

_PUBLISH = """
local owner = redis.call('GET', KEYS[1])
if owner ~= ARGV[1] then return -1 end
local seq = redis.call('INCR', KEYS[2])
local doc = string.gsub(ARGV[2], '"seq":0,', '"seq":' .. seq .. ',', 1)
redis.call('SET', KEYS[3], doc)
redis.call('PUBLISH', KEYS[4], doc)
return seq
"""


def owner_of(market: str, workers: Iterable[str]) -> str | None:
    """Rendezvous (highest random weight) hashing: stable, and only a dead worker's markets move."""
    best, best_w = None, b""
    for w in workers:
        weight = hashlib.blake2b(f"{w}|{market}".encode(), digest_size=8).digest()
        if best is None or weight > best_w:
            best, best_w = w, weight
    return best


class Cluster:
    def __init__(self, url: str, worker_id: str | None, prefix: str = "obp:", ttl_s: float = 3.0):
        self.r = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self.worker_id = worker_id
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._publish = self.r.register_script(_PUBLISH)

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # -- membership -----------------------------------------------------------------------------------------
    def heartbeat(self) -> None:
        assert self.worker_id is not None
        now = time.time()
        pipe = self.r.pipeline()
        pipe.zadd(self.key("workers"), {self.worker_id: now})
        pipe.zremrangebyscore(self.key("workers"), "-inf", now - 10 * self.ttl_s)
        pipe.execute()

    def leave(self) -> None:
        if self.worker_id is not None:
            self.r.zrem(self.key("workers"), self.worker_id)

    def alive(self) -> list[str]:
        now = time.time()
        ids = self.r.zrangebyscore(self.key("workers"), now - self.ttl_s, "+inf")
        return sorted(w.decode() if isinstance(w, bytes) else str(w) for w in ids)

    def claim(self, market: str) -> None:
        """Take the fencing token of a market (the next publish by anyone else fails)."""
        assert self.worker_id is not None
        self.r.set(self.key("owner", market), self.worker_id)

    # -- publishing -----------------------------------------------------------------------------------------
    def publish(self, market: str, view: MarketView, reason: str) -> int:
        """Publish a view as the market's owner; returns the global seq, or -1 if we are not the owner."""
        doc = orjson.dumps({"market": market, "seq": 0, "reason": reason,
                            "block": {"number": view.block_number, "hash": view.block_hash},
                            "bids": levels_json(view.bids), "asks": levels_json(view.asks)}).decode()
        assert self.worker_id is not None, "only a worker publishes"
        return int(self._publish(keys=[self.key("owner", market), self.key("seq", market), self.key("depth", market),
                                       self.key("updates", market)], args=[self.worker_id, doc]))


def view_from_doc(market_id: int, doc: dict) -> MarketView:
    return MarketView(market_id, int(doc["seq"]), int(doc["block"]["number"]), doc["block"]["hash"],
                      tuple((int(p), int(q)) for p, q in doc["bids"]), tuple((int(p), int(q)) for p, q in doc["asks"]))


class RedisFeed:
    """Subscribes to every market's update stream and hands views (in seq order per market) to `deliver`."""

    def __init__(self, cluster: Cluster, resolve: Callable[[str], int | None],
                 deliver: Callable[[list[MarketView], str], None],
                 deliver_raw: Callable[[bytes], None] | None = None):
        self.cluster = cluster
        self.deliver_raw = deliver_raw
        self.resolve = resolve
        self.deliver = deliver
        self.last_seq: dict[int, int] = {}
        self._stop = threading.Event()
        self.pubsub = cluster.r.pubsub(ignore_subscribe_messages=True)
        self.thread = threading.Thread(target=self._run, name="redis-feed", daemon=True)

    def start(self) -> None:
        self.pubsub.psubscribe(self.cluster.key("updates", "*"))  # subscribe first, then read the current state
        views = []
        for k in self.cluster.r.scan_iter(self.cluster.key("depth", "*")):
            raw = self.cluster.r.get(k)
            if raw:
                v = self._accept(orjson.loads(raw))
                if v is not None:
                    views.append(v)
        self.deliver(views, "reset")
        self.thread.start()

    def _accept(self, doc: dict) -> MarketView | None:
        m = self.resolve(doc["market"])
        if m is None or int(doc["seq"]) <= self.last_seq.get(m, 0):
            return None  # unknown market, or older than what we already hold
        self.last_seq[m] = int(doc["seq"])
        return view_from_doc(m, doc)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.pubsub.get_message(timeout=0.5)
            except (redis.RedisError, ValueError, OSError):
                if self._stop.is_set():
                    return  # closed by stop()
                log.exception("redis feed interrupted; retrying")
                self._stop.wait(1.0)
                continue
            if msg is None:
                continue
            if msg["type"] == "message":  # the rows channel: trades and order events
                if self.deliver_raw is not None:
                    self.deliver_raw(msg["data"])
                continue
            doc = orjson.loads(msg["data"])
            v = self._accept(doc)
            if v is not None:
                self.deliver([v], doc.get("reason", "block"))

    def stop(self) -> None:
        self._stop.set()
        self.pubsub.close()
