"""The live depth service: follower thread + hub + WebSocket/REST app, assembled with Starlette.

The follower thread owns the books; it hands each update to the event loop (call_soon_threadsafe) and, when
Redis is configured, writes the top-N depth and per-user open orders through to Redis and publishes the
update per market so that other API processes can fan it out. Without Redis everything stays in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from orderbook_pipelines import obs
from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.config import ProjectConfig
from orderbook_pipelines.live import metrics
from orderbook_pipelines.live.api import Api
from orderbook_pipelines.live.follower import Follower, Update
from orderbook_pipelines.live.heads import HeadWatcher, ws_url_for
from orderbook_pipelines.live.http_log import RequestLog
from orderbook_pipelines.live.hub import Hub, Limits
from orderbook_pipelines.live.node import ClusterNode
from orderbook_pipelines.live.openapi import SPEC
from orderbook_pipelines.live.redis_tier import RedisTier
from orderbook_pipelines.live.ws import WsEndpoint
from orderbook_pipelines.quality.canary import publishable_market_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceOptions:
    poll_s: float = 0.25  # fallback only: the newHeads subscription wakes the follower
    head_subscription: bool = True
    keep_blocks: int = 64
    ready_max_lag_blocks: int = 3
    ready_max_stale_s: float = 15.0
    markets_refresh_s: float = 5.0
    admin_token: str | None = None
    api_requests_per_second: int = 50


def publishable_markets(engine: Engine) -> set[int]:
    """Active markets plus canaries that passed their checks: the canary policy decides (issue 4)."""
    with engine.connect() as conn:
        return set(publishable_market_ids(conn))


class LiveService:
    def __init__(self, config: ProjectConfig, engine: Engine, limits: Limits | None = None,
                 options: ServiceOptions | None = None, redis_url: str | None = None, redis_prefix: str = "obp:",
                 cluster: bool = False, worker_id: str | None = None):
        obs.bootstrap()  # secret files (OBP_ADMIN_TOKEN_FILE, ...) before reading them; JSON logs
        self.config = config
        self.engine = engine
        self.options = options or ServiceOptions(admin_token=os.environ.get("OBP_ADMIN_TOKEN"))
        self.hub = Hub(limits)
        c = config.chain
        self.client = ChainClient.from_config(c)
        self.redis = RedisTier(redis_url, redis_prefix) if redis_url else None
        self.follower = Follower(config, self.client, engine, self._from_follower, self.options.keep_blocks,
                                 self.options.poll_s)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.first_book_s: float | None = None
        self.probe = ChainClient.from_config(c, retries=0)  # independent view of the head
        self.probed_head = -1
        self.heads: HeadWatcher | None = None
        self.node: ClusterNode | None = None
        self.api: Api | None = None
        if cluster:  # several processes: workers publish owned markets through Redis; everyone serves from it
            if not redis_url:
                raise ValueError("cluster mode needs REDIS_URL")
            self.redis = None
            self.node = ClusterNode(self.hub, self.follower, redis_url, worker_id, redis_prefix)

    # -- follower -> loop -----------------------------------------------------------------------------------
    def _from_follower(self, update: Update) -> None:
        if self.node is not None:
            self.node.publish(update)
            metrics.APPLIED_HEAD.set(self.follower.books.head.number if self.follower.books.head else -1)
            return
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._on_loop, update)  # clients first; the Redis copy does not delay them
        if self.redis is not None:
            try:
                self.redis.write(update, self.hub.names, self.follower.books)
            except Exception:  # Redis is a cache: the book stays served from memory
                log.exception("redis write-through failed")
        metrics.APPLIED_HEAD.set(self.follower.books.head.number if self.follower.books.head else -1)
        metrics.CHAIN_HEAD.set(self.follower.stats.head_seen)

    def _on_loop(self, update: Update) -> None:
        self.hub.on_update(update)
        if update.block_seen_at:
            metrics.PUBLISH_LATENCY.observe(time.perf_counter() - update.block_seen_at)

    def _refresh_markets(self) -> None:
        names = self.follower.market_names
        self.hub.set_markets(names, publishable_markets(self.engine))

    # -- lifecycle ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        if self.node is not None and not self.node.worker:  # API-only process: everything comes from Redis
            await asyncio.to_thread(self.follower.refresh_registry, True)
            await asyncio.to_thread(self._refresh_markets)
            await asyncio.to_thread(self.node.start, self.loop)
            print(f"live: API process serving {len(self.hub.views)} markets from Redis", flush=True)
            return
        await asyncio.to_thread(self.follower.cold_start)
        await asyncio.to_thread(self._refresh_markets)
        self.first_book_s = time.perf_counter() - t0
        # Millions of long-lived book objects: keep them out of the cyclic GC's full collections, whose pauses
        # otherwise show up as REST/WebSocket tail latency (bench/live.py).
        gc.freeze()
        st = self.follower.stats
        print(f"live: first correct book after {self.first_book_s:.2f}s at block {st.cold_start_block} "
              f"({len(self.hub.views)} markets)", flush=True)
        self.thread = threading.Thread(target=self.follower.run, name="follower", daemon=True)
        self.thread.start()
        if self.options.head_subscription:
            self.heads = HeadWatcher(ws_url_for(self.config.chain.rpc_url), self.follower.wake)
            self.heads.start()
        if self.node is not None:
            await asyncio.to_thread(self.node.start, self.loop)

    async def stop(self) -> None:
        if self.node is not None:
            self.node.stop()
        self.follower.stop()
        if self.heads is not None:
            self.heads.stop()
        if self.thread:
            await asyncio.to_thread(self.thread.join, 10)

    async def background(self) -> None:
        """Coalescing timer and market-registry refresh."""
        last_refresh = last_probe = time.monotonic()
        while True:
            await asyncio.sleep(0.02)
            self.hub.flush_due()
            if self.api is not None and self.api.stats_age_s > 4.0:
                with contextlib.suppress(Exception):
                    await self.api.market_stats(max_age_s=4.0)
            if time.monotonic() - last_probe > 1.0:
                last_probe = time.monotonic()
                with contextlib.suppress(Exception):
                    self.probed_head = await asyncio.to_thread(self.probe.block_number)
            if time.monotonic() - last_refresh > self.options.markets_refresh_s:
                last_refresh = time.monotonic()
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._refresh_markets)

    # -- health ---------------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        st = self.follower.stats
        head = self.follower.books.head
        chain_head = max(st.head_seen, self.probed_head)
        return {
            "chain_head": chain_head, "applied_block": head.number if head else None,
            "lag_blocks": (chain_head - head.number) if head and chain_head >= 0 else None,
            "seconds_since_progress": round(time.monotonic() - st.last_progress, 3),
            "reorgs": st.reorgs, "max_reorg_depth": st.max_reorg_depth, "resets": st.resets,
            "cold_start_s": round(st.cold_start_s, 3), "markets": len(self.hub.views),
            "paused": {"global": self.hub.paused_all,
                       "markets": sorted(self.hub.names.get(m, str(m)) for m in self.hub.paused)},
            "redis": self.redis is not None,
            "head_subscription": bool(self.heads and self.heads.connected),
            "cluster": None if self.node is None else {
                "worker": self.node.cluster.worker_id, "owned_markets": len(self.follower.owned or ()),
                "fenced_publishes": self.node.fenced},
        }

    def ready(self) -> tuple[bool, str]:
        """Ready only when the book is current: not when the chain moves on and we do not."""
        if self.node is not None and not self.node.worker:
            ok = self.node.feed.thread.is_alive() and bool(self.hub.views)
            return ok, "serving from redis" if ok else "redis feed not running"
        h = self.health()
        if h["applied_block"] is None:
            return False, "cold start not finished"
        if h["lag_blocks"] is not None and h["lag_blocks"] > self.options.ready_max_lag_blocks:
            return False, f"{h['lag_blocks']} blocks behind the chain head"
        head_moved = h["chain_head"] > h["applied_block"]
        if head_moved and h["seconds_since_progress"] > self.options.ready_max_stale_s:
            return False, f"no progress for {h['seconds_since_progress']}s while the head advances"
        return True, "current"

    # -- app ------------------------------------------------------------------------------------------------
    def app(self) -> Starlette:
        api = self.api = Api(self.hub, self.engine, self.options.api_requests_per_second)

        async def health(_: Request) -> Response:
            return JSONResponse({"status": "ok", **self.health()})

        async def ready(_: Request) -> Response:
            ok, why = self.ready()
            return JSONResponse({"ready": ok, "reason": why}, status_code=200 if ok else 503)

        async def prom(_: Request) -> Response:
            return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

        async def openapi(_: Request) -> Response:
            return JSONResponse(SPEC)

        async def pause(request: Request) -> Response:
            token = self.options.admin_token
            given = request.headers.get("authorization", "").removeprefix("Bearer ")
            if not token or not hmac.compare_digest(given, token):
                return JSONResponse({"error": {"code": "forbidden", "message": "admin token required"}}, 403)
            try:
                body = await request.json()
                paused = body["paused"]
                market = body.get("market")
                if not isinstance(paused, bool) or (market is not None and not isinstance(market, str)):
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                return JSONResponse({"error": {"code": "invalid_body",
                                               "message": 'body: {"paused": bool, "market": optional name}'}}, 400)
            market_id = None
            if market is not None:
                market_id = self.hub.by_name.get(market)
                if market_id is None:
                    return JSONResponse({"error": {"code": "unknown_market", "message": market}}, 404)
            self.hub.set_paused(market_id, paused)
            log.warning("publishers %s for %s", "paused" if paused else "resumed", market or "all markets")
            return JSONResponse({"paused": self.health()["paused"]})

        @contextlib.asynccontextmanager
        async def lifespan(_: Starlette) -> AsyncIterator[None]:
            await self.start()
            task = asyncio.create_task(self.background())
            try:
                yield
            finally:
                task.cancel()
                await self.stop()

        return Starlette(routes=[
            WebSocketRoute("/ws", WsEndpoint(self.hub).serve),
            Route("/api/depth", api.timed("/api/depth", api.depth)),
            Route("/api/trades", api.timed("/api/trades", api.trades)),
            Route("/api/orders", api.timed("/api/orders", api.orders)),
            Route("/api/markets/summary", api.timed("/api/markets/summary", api.summary)),
            Route("/health", health), Route("/ready", ready), Route("/metrics", prom),
            Route("/openapi.json", openapi), Route("/admin/pause", pause, methods=["POST"]),
        ], lifespan=lifespan, middleware=[Middleware(RequestLog)])


def server_settings(service: LiveService, host: str, port: int, **overrides: Any) -> dict[str, Any]:
    """uvicorn settings of the live service in production (the CLI, the benchmarks and the tests use them)."""
    from orderbook_pipelines.live.http_guard import HeaderDeadlineProtocol  # slow-loris: 10 s for headers

    return {
        "host": host, "port": port, "log_level": "warning", "access_log": False,
        "ws_max_size": service.hub.limits.max_message_bytes * 4,
        "ws_per_message_deflate": False,  # would compress every shared delta once per subscriber
        "ws_ping_interval": 20, "ws_ping_timeout": 20, "timeout_keep_alive": 5,
        "http": HeaderDeadlineProtocol, "loop": "uvloop",  # httptools parser (the subclass) and uvloop, never h11
    } | overrides


def serve(service: LiveService, host: str, port: int, **overrides: Any) -> None:
    import uvicorn

    uvicorn.run(service.app(), **server_settings(service, host, port, **overrides))
