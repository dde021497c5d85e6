"""The live depth service: follower thread + hub + WebSocket/REST app, assembled with Starlette.

The follower thread owns the books; it hands each update to the event loop (call_soon_threadsafe) and, when
Redis is configured, writes the top-N depth and per-user open orders through to Redis and publishes the
update per market so that other API processes can fan it out. Without Redis everything stays in-process.

Startup never depends on the node: the cold start runs in its own thread, retried with a bounded backoff, and
the HTTP server answers /health and /ready (with the reason: the node's host:port and its error) from the
start; the server waits only for the first attempt, so with a healthy node the books are there when it opens.
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
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from orderbook_pipelines import obs
from orderbook_pipelines.chain.rpc import ChainClient, RpcError, WrongChain
from orderbook_pipelines.config import ProjectConfig
from orderbook_pipelines.live import metrics
from orderbook_pipelines.live.api import FRONTIER_MAX_AGE_S, Api
from orderbook_pipelines.live.follower import Follower, Update
from orderbook_pipelines.live.heads import HeadWatcher, ws_url_for
from orderbook_pipelines.live.http_log import RequestLog
from orderbook_pipelines.live.hub import Hub, Limits
from orderbook_pipelines.live.node import ClusterNode
from orderbook_pipelines.live.openapi import SPEC
from orderbook_pipelines.live.pusher import PusherSettings
from orderbook_pipelines.live.pusher_channels import PusherChannels
from orderbook_pipelines.live.pusher_ws import PusherEndpoint
from orderbook_pipelines.live.pusher_ws import auth as pusher_auth
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
    start_retry_s: float = 0.5  # first pause after a failed cold start; doubles up to start_retry_max_s
    start_retry_max_s: float = 10.0
    startup_wait_s: float = 10.0  # the server opens after the first cold-start attempt, or after this long
    rpc_down_grace_s: float = 3.0  # /ready turns false once the node has been unreachable this long


def node_address(rpc_url: str) -> str:
    """host:port of the RPC node: what an operator needs, without the path or credentials (API keys)."""
    u = urlsplit(rpc_url)
    host = u.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    try:
        port: int | str = u.port or {"https": 443, "wss": 443}.get(u.scheme, 80)
    except ValueError:  # a port that is not a number: config validation reports it, we only name it
        port = "?"
    return f"{host}:{port}"


def describe_failure(exc: BaseException, node: str) -> str:
    """One line naming what failed: the node by host:port with the innermost OS error ("[Errno 111] Connection
    refused") rather than the HTTP stack's nested wrappers, Postgres by its driver's first line."""
    root, seen = exc, {id(exc)}
    while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        root = nxt
    if isinstance(exc, WrongChain):  # names both ids and the node already
        return str(exc)
    if isinstance(exc, RpcError):
        if isinstance(root, OSError) and type(root).__module__ in ("builtins", "socket", "ssl"):
            return f"RPC node {node} unreachable: {root}"
        return f"RPC node {node}: {_first_line(exc)}"
    if isinstance(exc, SQLAlchemyError):
        return f"Postgres: {_first_line(exc)}"
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


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
        self.pusher = PusherChannels(self.hub, PusherSettings.resolve(config.pusher))  # /app/{key}
        self.pusher.attach(self.follower.books)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.first_book_s: float | None = None
        self.probe = ChainClient.from_config(c, retries=0)  # independent view of the head
        self.probed_head = -1
        self.heads: HeadWatcher | None = None
        self.node: ClusterNode | None = None
        self.api: Api | None = None
        self.rpc_node = node_address(c.rpc_url)
        self.started = threading.Event()  # books built and followed (or, API-only, the Redis feed running)
        self.start_attempts = 0
        self.start_failures = 0
        self.start_error: str | None = None  # why the last start attempt failed; None once one succeeded
        self.fatal_error: str | None = None  # the hand-over to serving failed: only a restart helps
        self.rpc_error: str | None = None  # the background probe's last failure; None once the node answers
        self.rpc_failing_since: float | None = None
        self.wrong_chain: str | None = None  # the node serves another chain: no books are served until it is fixed
        self._t0 = time.perf_counter()
        self._first_attempt = threading.Event()
        self._stopping = threading.Event()
        self._lifecycle = threading.Lock()  # stop() and the start thread's hand-over to the follower
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
        self.pusher.prepare(update)  # order states while the books are at this update's block
        self.loop.call_soon_threadsafe(self._on_loop, update)  # clients first; the Redis copy does not delay them
        if self.redis is not None:
            try:
                # the follower's names: the hub learns them only after the cold start's first (reset) update
                self.redis.write(update, self.follower.market_names, self.follower.books)
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
        # A node of another chain: nothing is publishable (new WebSocket subscriptions are refused too).
        self.hub.set_markets(names, publishable_markets(self.engine) if self.wrong_chain is None else set())

    # -- lifecycle ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the books in the background and wait for the first attempt only (at most startup_wait_s)."""
        self.loop = asyncio.get_running_loop()
        self._t0 = time.perf_counter()
        threading.Thread(target=self._start_until_up, name="live-start", daemon=True).start()
        deadline = time.monotonic() + self.options.startup_wait_s
        while not self._first_attempt.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def _start_until_up(self) -> None:
        """Thread body: build the books until it works, pausing start_retry_s, doubling up to start_retry_max_s."""
        delay = self.options.start_retry_s
        while not self._stopping.is_set():
            self.start_attempts += 1
            try:
                self._build_books()
            except Exception as exc:  # node or Postgres down: /health and /ready say so, and we try again
                self.start_failures += 1
                self.start_error = describe_failure(exc, self.rpc_node)
                if isinstance(exc, WrongChain):
                    self.wrong_chain = self.start_error
                log.warning("live: start attempt %d failed: %s; next attempt in %.1fs", self.start_attempts,
                            self.start_error, delay)
                self._first_attempt.set()
                self._stopping.wait(delay)
                delay = min(delay * 2, self.options.start_retry_max_s)
                continue
            self.start_error = None
            try:
                self._go_live()
            except Exception as exc:  # threads may be running: not retried (cluster: Redis refused us)
                self.fatal_error = describe_failure(exc, self.rpc_node)
                log.exception("live: could not start serving")
            self._first_attempt.set()
            return

    def _build_books(self) -> None:
        """One start attempt: the books at the chain head (API-only: the registry; the books come from Redis)."""
        if self.node is not None and not self.node.worker:
            self.follower.refresh_registry(True)
            self._refresh_markets()
            return
        self.probed_head = self.probe.block_number()  # a dead node fails here at once (the probe does not retry)
        self.follower.cold_start()
        self._refresh_markets()

    def _go_live(self) -> None:
        """Start following (and publishing); once only."""
        assert self.loop is not None
        with self._lifecycle:
            if self._stopping.is_set():
                return
            if self.node is not None and not self.node.worker:
                self.node.start(self.loop)
                self.started.set()
                print(f"live: API process serving {len(self.hub.views)} markets from Redis", flush=True)
                return
            first_book_s = time.perf_counter() - self._t0
            # Millions of long-lived book objects: keep them out of the cyclic GC's full collections, whose
            # pauses otherwise show up as REST/WebSocket tail latency (bench/live.py).
            gc.freeze()
            st = self.follower.stats
            st.last_progress = time.monotonic()  # the cold start was progress: a long outage before it is not staleness
            self.thread = threading.Thread(target=self.follower.run, name="follower", daemon=True)
            self.thread.start()
            if self.options.head_subscription:
                self.heads = HeadWatcher(ws_url_for(self.config.chain.rpc_url), self.follower.wake)
                self.heads.start()
            if self.node is not None:
                self.node.start(self.loop)
            self.started.set()
            self.first_book_s = first_book_s  # after `started`: whoever waits for it finds the API answering
        print(f"live: first correct book after {first_book_s:.2f}s at block {st.cold_start_block} "
              f"({len(self.hub.views)} markets, start attempt {self.start_attempts})", flush=True)

    async def stop(self) -> None:
        with self._lifecycle:
            self._stopping.set()
        if self.node is not None and self.started.is_set():
            self.node.stop()
        self.follower.stop()
        if self.heads is not None:
            self.heads.stop()
        if self.thread:
            await asyncio.to_thread(self.thread.join, 10)

    async def background(self) -> None:
        """Coalescing timer. The slow periodic work runs in tasks of its own: a hung RPC or Postgres call must
        not hold back coalesced deltas."""
        tasks = [asyncio.create_task(self._probe_loop()), asyncio.create_task(self._refresh_loop())]
        try:
            while True:
                await asyncio.sleep(0.02)
                self.hub.flush_due()
        finally:
            for t in tasks:
                t.cancel()

    async def _probe_loop(self) -> None:
        """An independent view of the head, and of whether the node answers at all (/ready, /health)."""
        while True:
            try:
                head = await asyncio.to_thread(self.probe.block_number)
            except Exception as exc:
                self.rpc_error = describe_failure(exc, self.rpc_node)
                if isinstance(exc, WrongChain) and self.wrong_chain is None:
                    self.wrong_chain = self.rpc_error
                    self._refresh_markets()
                if self.rpc_failing_since is None:
                    self.rpc_failing_since = time.monotonic()
            else:
                self.probed_head = head
                self.rpc_error = self.rpc_failing_since = self.wrong_chain = None
            await asyncio.sleep(1.0)

    async def _refresh_loop(self) -> None:
        """Ingested frontier, summary statistics and the market registry, refreshed ahead of readers."""
        last_markets = time.monotonic()
        while True:
            await asyncio.sleep(0.1)
            api = self.api
            if api is not None and api.frontier_age_s > 0.8 * FRONTIER_MAX_AGE_S:
                with contextlib.suppress(Exception):
                    await api.ingested(max_age_s=0.8 * FRONTIER_MAX_AGE_S)
            if not self.started.is_set():
                continue
            if api is not None and api.stats_age_s > 4.0:
                with contextlib.suppress(Exception):
                    await api.market_stats(max_age_s=4.0)
            if time.monotonic() - last_markets > self.options.markets_refresh_s:
                last_markets = time.monotonic()
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._refresh_markets)

    # -- health ---------------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        st = self.follower.stats
        head = self.follower.books.head if self.started.is_set() else None
        chain_head = max(st.head_seen, self.probed_head)
        ingested = self.api.ingested_cached if self.api is not None else None
        return {
            "chain_head": chain_head, "applied_block": head.number if head else None,
            "lag_blocks": (chain_head - head.number) if head and chain_head >= 0 else None,
            "ingested_block": ingested,
            "ingestion_lag_blocks": (chain_head - ingested) if ingested is not None and chain_head >= 0 else None,
            "seconds_since_progress": round(time.monotonic() - st.last_progress, 3),
            "reorgs": st.reorgs, "max_reorg_depth": st.max_reorg_depth, "resets": st.resets,
            "cold_start_s": round(st.cold_start_s, 3), "markets": len(self.hub.views),
            "paused": {"global": self.hub.paused_all,
                       "markets": sorted(self.hub.names.get(m, str(m)) for m in self.hub.paused)},
            "redis": self.redis is not None,
            "head_subscription": bool(self.heads and self.heads.connected),
            "rpc_node": self.rpc_node, "start_attempts": self.start_attempts,
            "cluster": None if self.node is None else {
                "worker": self.node.cluster.worker_id, "owned_markets": len(self.follower.owned or ()),
                "fenced_publishes": self.node.fenced},
        }

    def health(self) -> dict[str, Any]:
        """Always answered (liveness): state, plus whether the service is ready and why not."""
        h = self._state()
        ok, why = self._ready(h)
        status = "ok" if ok else "degraded" if self.started.is_set() else "starting"
        return {"status": status, "ready": ok, "reason": why, **h}

    def ready(self) -> tuple[bool, str]:
        """Ready only when the book is current: not when the chain moves on and we do not."""
        return self._ready(self._state())

    def _not_started(self) -> str | None:
        if self.wrong_chain is not None:  # at start or after a reconnect: no book is served, whatever is held
            return self.wrong_chain
        if self.started.is_set():
            return None
        if self.fatal_error is not None:
            return f"could not start serving (restart the service): {self.fatal_error}"
        if self.start_error is not None:
            return (f"cold start failed ({self.start_failures}x, retrying with a backoff of at most "
                    f"{self.options.start_retry_max_s:g}s): {self.start_error}")
        return f"cold start in progress (attempt {self.start_attempts})"

    def _ready(self, h: dict[str, Any]) -> tuple[bool, str]:
        why = self._not_started()
        if why is not None:
            return False, why
        if self.node is not None and not self.node.worker:
            ok = self.node.feed.thread.is_alive() and bool(self.hub.views)
            return ok, "serving from redis" if ok else "redis feed not running"
        since, err = self.rpc_failing_since, self.rpc_error
        if err is not None and since is not None and time.monotonic() - since > self.options.rpc_down_grace_s:
            return False, f"{err} (for {time.monotonic() - since:.0f}s)"
        if h["applied_block"] is None:
            return False, "cold start not finished"
        if h["lag_blocks"] is not None and h["lag_blocks"] > self.options.ready_max_lag_blocks:
            return False, f"{h['lag_blocks']} blocks behind the chain head"
        head_moved = h["chain_head"] > h["applied_block"]
        if head_moved and h["seconds_since_progress"] > self.options.ready_max_stale_s:
            return False, f"no progress for {h['seconds_since_progress']}s while the head advances"
        return True, "current"

    def _live_head(self) -> int | None:
        head = self.follower.books.head
        return head.number if head is not None and self.started.is_set() else None

    # -- app ------------------------------------------------------------------------------------------------
    def app(self) -> Starlette:
        c = self.config.chain
        api = self.api = Api(self.hub, self.engine, self.options.api_requests_per_second, chain_id=c.chain_id,
                             start_block=c.start_block, live_head=self._live_head, not_ready=self._not_started)

        async def health(_: Request) -> Response:
            return JSONResponse(self.health())

        async def ready(_: Request) -> Response:
            ok, why = self.ready()
            return JSONResponse({"ready": ok, "reason": why}, status_code=200 if ok else 503)

        async def prom(_: Request) -> Response:
            # The head gauges as of this scrape: a block without book events sends no update, yet it is applied.
            h = self._state()
            if h["applied_block"] is not None:
                metrics.APPLIED_HEAD.set(h["applied_block"])
            if h["chain_head"] >= 0:
                metrics.CHAIN_HEAD.set(h["chain_head"])
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

        async def pusher_auth_route(request: Request) -> Response:
            return await pusher_auth(request, self.pusher.settings)

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
            Route("/api/compat/orders", api.timed("/api/compat/orders", api.compat_orders)),
            WebSocketRoute("/app/{key}", PusherEndpoint(self.hub, self.pusher).serve),
            Route("/pusher/auth", api.timed("/pusher/auth", pusher_auth_route), methods=["POST"]),
            Route("/api/markets/summary", api.timed("/api/markets/summary", api.summary)),
            Route("/health", health), Route("/ready", ready), Route("/metrics", prom),
            Route("/openapi.json", openapi), Route("/admin/pause", pause, methods=["POST"]),
        ], lifespan=lifespan, middleware=[Middleware(RequestLog)])


WS_READ_LIMIT_BYTES = 2 * 1024 * 1024  # transient, per frame being read; messages are limited far lower


def server_settings(service: LiveService, host: str, port: int, **overrides: Any) -> dict[str, Any]:
    """uvicorn settings of the live service in production (the CLI, the benchmarks and the tests use them)."""
    from orderbook_pipelines.live.http_guard import HeaderDeadlineProtocol  # slow-loris: 10 s for headers

    return {
        "host": host, "port": port, "log_level": "warning", "access_log": False,
        # Frames up to this size reach the protocol, which answers an oversized message with the documented
        # `message_too_large` error before closing (1009); only larger ones are cut by the server library alone.
        "ws_max_size": max(service.hub.limits.max_message_bytes * 4, WS_READ_LIMIT_BYTES),
        "ws_per_message_deflate": False,  # would compress every shared delta once per subscriber
        "ws_ping_interval": 20, "ws_ping_timeout": 20, "timeout_keep_alive": 5,
        "http": HeaderDeadlineProtocol, "loop": "uvloop",  # httptools parser (the subclass) and uvloop, never h11
    } | overrides


def serve(service: LiveService, host: str, port: int, **overrides: Any) -> None:
    import uvicorn

    uvicorn.run(service.app(), **server_settings(service, host, port, **overrides))
