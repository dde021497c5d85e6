"""REST read API: depth from the live book; trades, orders and summaries from Postgres.

Every parameter is validated with a 400 that names it; pages are capped; cursors are opaque and encode the
stable sort key (block, log index), so pages neither repeat nor skip rows while new events arrive on top.
Postgres follows ingestion, which trails the chain: every Postgres-backed answer says in `as_of` the block it
is complete to (the ingested frontier of storage/checkpoints.py) next to the live book's block, so a client
can tell history that is behind from history that is empty.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from orderbook_pipelines.book.checksum import book_checksum
from orderbook_pipelines.live import metrics
from orderbook_pipelines.live.hub import Hub, depth_json, opt_str
from orderbook_pipelines.live.ratelimit import MovingWindow
from orderbook_pipelines.storage import checkpoints

log = logging.getLogger(__name__)

MAX_LIMIT = 500
DEFAULT_LIMIT = 100
MAX_SPAN = timedelta(days=31)
STATS_MAX_AGE_S = 5.0
FRONTIER_MAX_AGE_S = 1.0
MAX_KEY = 2**63 - 1  # cursor components are bigint block numbers / log indexes
_UTC_MIN = datetime.min.replace(tzinfo=UTC)
_UTC_MAX = datetime.max.replace(tzinfo=UTC)
STATUSES = {"open", "partially_filled", "filled", "cancelled"}
STATUS_GROUPS = {"active": ("open", "partially_filled"), "history": ("filled", "cancelled")}
# /api/compat/orders (today's orders API shape): `type` -> statuses; `market` is a market's open orders, all traders
COMPAT_TYPES = {**STATUS_GROUPS, "market": STATUS_GROUPS["active"]}
MAX_OFFSET = 10_000  # offset pages cost O(offset); deeper history pages with /api/orders' cursor
COMPAT_DEPTH_LEVELS = 20
_TRADER = re.compile(r"0x[0-9a-fA-F]{40}")  # fullmatch: `$` would let a trailing newline through
_KNOWN = {
    "/api/depth": {"market", "levels"},
    "/api/trades": {"market", "limit", "cursor", "since", "until"},
    "/api/orders": {"trader", "market", "status", "limit", "cursor"},
    "/api/compat/orders": {"trader", "metricId", "limit", "offset", "type"},
    "/api/markets/summary": set(),
}
# The orders both order routes list (/api/orders and /api/compat/orders): columns, filter (bound by
# Api._order_filter) and newest-first order; the routes differ only in paging and in the response's shape.
_ORDER_COLUMNS = ("o.created_block, o.created_log, o.market_id, o.order_id, o.trader, o.side, o.order_type, "
                  "o.price, o.quantity, o.filled, o.remaining, o.status, o.updated_block")
_ORDER_FILTER = ("o.market_id = ANY(:pub) AND (CAST(:t AS text) IS NULL OR o.trader = :t) "
                 "AND (CAST(:m AS integer) IS NULL OR o.market_id = :m) "
                 "AND (CAST(:st AS text[]) IS NULL OR o.status = ANY(:st))")
_NEWEST_FIRST = "ORDER BY o.created_block DESC, o.created_log DESC"
# /api/compat/orders' item: today's field names, in its order, for the same values as /api/orders' item
_COMPAT_ORDER_FIELDS = (("orderId", "order_id"), ("metricId", "market"), ("trader", "trader"), ("side", "side"),
                        ("orderType", "type"), ("price", "price"), ("quantity", "quantity"), ("filled", "filled"),
                        ("remaining", "remaining"), ("status", "status"), ("createdBlock", "created_block"),
                        ("updatedBlock", "updated_block"))


Handler = Callable[[Request], Awaitable[Response]]


class BadRequest(Exception):
    def __init__(self, parameter: str | None, message: str, status: int = 400, code: str = "invalid_parameter"):
        super().__init__(message)
        self.parameter, self.message, self.status, self.code = parameter, message, status, code


class JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class Body(Response):
    """An already serialized JSON body (from a response cache)."""

    media_type = "application/json"


def _err(e: BadRequest) -> JSON:
    return JSON({"error": {"code": e.code, "message": e.message, "parameter": e.parameter}}, status_code=e.status)


def _int(q: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = q.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise BadRequest(name, f"{name} must be an integer between {lo} and {hi}") from None
    if not lo <= v <= hi:
        raise BadRequest(name, f"{name} must be between {lo} and {hi}, got {v}")
    return v


def _time(q: dict[str, str], name: str) -> datetime | None:
    raw = q.get(name)
    if raw is None:
        return None
    try:
        t = datetime.fromisoformat(raw)
    except ValueError:
        raise BadRequest(name, f"{name} must be an ISO-8601 timestamp") from None
    try:  # an offset can push a representable local time out of range (9999-12-31T23:00-05:00)
        return t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC)
    except OverflowError:
        raise BadRequest(name, f"{name} must lie between 0001-01-01 and 9999-12-31 UTC") from None


def _trader(q: dict[str, str]) -> str | None:
    """The optional `trader` of both order routes, lower-cased as orders.trader stores it."""
    trader = q.get("trader")
    if trader is not None and not _TRADER.fullmatch(trader):
        raise BadRequest("trader", "trader must be a 0x-prefixed 20-byte hex address")
    return trader.lower() if trader is not None else None


def _order_item(r: tuple, names: dict[int, str]) -> dict[str, Any]:
    """One row of _ORDER_COLUMNS as /api/orders lists it."""
    return {"market": names.get(r[2]), "order_id": r[3], "trader": r[4], "side": "buy" if r[5] == 0 else "sell",
            "type": "market" if r[6] == 0 else "limit", "price": str(r[7]), "quantity": str(r[8]),
            "filled": str(r[9]), "remaining": str(r[10]), "status": r[11], "created_block": r[0],
            "updated_block": r[12]}


def _shift(t: datetime, by: timedelta) -> datetime:
    """`t + by`, saturating at datetime's limits: a window that runs past them simply ends there."""
    try:
        return t + by
    except OverflowError:
        return _UTC_MAX if by > timedelta(0) else _UTC_MIN


def encode_cursor(*key: int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(list(key))).decode().rstrip("=")


def decode_cursor(raw: str | None, n: int) -> tuple[int, ...] | None:
    if raw is None:
        return None
    try:
        key = orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        if isinstance(key, list) and len(key) == n and all(type(k) is int and 0 <= k <= MAX_KEY for k in key):
            return tuple(key)
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        pass
    raise BadRequest("cursor", "cursor is not one this API issued")


@dataclass(frozen=True)
class MarketStats:
    """One computation of the Postgres-backed summary figures, with the ingested block it is complete to."""

    by_market: dict[int, tuple]  # market -> (id, volume, high, low, last, count) over the last 24 h
    open_interest: dict[int, Any]
    decimals: dict[int, int]
    ingested_block: int | None
    computed_at: str


class Api:
    """Reads the published books from the hub and everything historical from Postgres; nothing else."""

    def __init__(self, hub: Hub, engine: Engine, requests_per_second: int = 50, *, chain_id: int | None = None,
                 start_block: int | None = None, live_head: Callable[[], int | None] = lambda: None,
                 not_ready: Callable[[], str | None] = lambda: None):
        self.hub = hub
        self.engine = engine
        self.limiter = MovingWindow(requests_per_second)
        self.chain_id, self.start_block = chain_id, start_block
        self.live_head = live_head  # block of the live book (WebSocket, /api/depth); None before the cold start
        self.not_ready = not_ready  # why the service cannot answer yet (cold start not done), else None
        # Serialized bodies of the book-backed reads, valid while the hub's version is unchanged: at thousands
        # of requests/s per market a read is then a lookup (bench/live.py rest); the first read after a block
        # serializes once. Keys are bounded: (published market, 1..100 levels).
        self._depth: dict[tuple[int, int], tuple[int, bytes]] = {}
        self._summary: tuple[int, MarketStats, int | None, bytes] | None = None  # (version, stats, live, body)
        self._stats: MarketStats | None = None
        self._stats_mono = 0.0
        self._stats_lock = asyncio.Lock()
        self._frontier: int | None = None
        self._frontier_mono = float("-inf")
        self._frontier_lock = asyncio.Lock()

    def _query(self, request: Request) -> dict[str, str]:
        q = dict(request.query_params)
        unknown = sorted(set(q) - _KNOWN[request.url.path])
        if unknown:
            raise BadRequest(unknown[0], f"unknown parameter(s) {unknown}")
        for k, v in q.items():
            if len(v) > 256:
                raise BadRequest(k, f"{k} is too long")
        why = self.not_ready()
        if why is not None:  # no market is known before the first cold start: say why instead of "unknown"
            raise BadRequest(None, f"the live service is starting: {why}", 503, "not_ready")
        return q

    def _market(self, q: dict[str, str], required: bool = True, param: str = "market") -> int | None:
        """The published market named by `param` (`metricId` on the compat route)."""
        name = q.get(param)
        if name is None:
            if required:
                raise BadRequest(param, f"{param} is required")
            return None
        m = self.hub.by_name.get(name)
        if m is None or m not in self.hub.publishable:
            raise BadRequest(param, f"unknown market {name!r}", 404, "unknown_market")
        return m

    def _order_filter(self, trader: str | None, m: int | None, statuses: Sequence[str] | None) -> dict[str, Any]:
        """Bind parameters of _ORDER_FILTER: published markets only (a market unpublished later drops out), then
        the optional trader, market and statuses."""
        return {"pub": sorted(self.hub.publishable), "t": trader, "m": m, "st": list(statuses) if statuses else None}

    def timed(self, route: str, fn: Handler) -> Handler:
        latency = metrics.API_LATENCY.labels(route)

        async def handler(request: Request) -> Response:
            t0 = time.perf_counter()
            client = request.client.host if request.client else "unknown"
            if not self.limiter.hit(client):
                return JSON({"error": {"code": "rate_limited", "message": f"at most {self.limiter.amount} requests "
                                       "per second per client", "parameter": None}}, status_code=429,
                            headers={"Retry-After": "1"})
            try:
                return await fn(request)
            except BadRequest as e:
                return _err(e)
            except (SQLAlchemyError, OSError):  # Postgres down or restarting: the client should retry, not report
                log.warning("%s: storage unavailable", route, exc_info=True)
                return _err(BadRequest(None, "storage is unavailable, retry later", 503, "unavailable"))
            except Exception:
                log.exception("%s failed", route)
                return _err(BadRequest(None, "internal error", 500, "internal_error"))
            finally:
                latency.observe(time.perf_counter() - t0)

        return handler

    # -- freshness ------------------------------------------------------------------------------------------
    async def ingested(self, max_age_s: float = FRONTIER_MAX_AGE_S) -> int | None:
        """The ingested frontier (checkpoints.frontier), re-read at most every `max_age_s`; the service's timer
        re-reads it ahead of requests. Read before the rows it describes, so it never overstates them."""
        if time.monotonic() - self._frontier_mono > max_age_s:
            async with self._frontier_lock:
                if time.monotonic() - self._frontier_mono > max_age_s:
                    at = time.monotonic()
                    self._frontier = await run_in_threadpool(self._read_frontier)
                    self._frontier_mono = at
        return self._frontier

    @property
    def ingested_cached(self) -> int | None:
        """The last frontier read (None before the first read or when nothing is ingested): /health's view."""
        return self._frontier

    def _read_frontier(self) -> int | None:
        with self.engine.connect() as conn:
            return checkpoints.frontier(conn, self.chain_id, self.start_block)

    def _as_of(self, ingested: int | None) -> dict[str, int | None]:
        return {"ingested_block": ingested, "live_block": self.live_head()}

    # -- routes ---------------------------------------------------------------------------------------------
    async def depth(self, request: Request) -> Response:
        q = self._query(request)
        m = self._market(q)
        levels = _int(q, "levels", 20, 1, 100)
        hub = self.hub
        key = (m, levels)
        hit = self._depth.get(key)  # type: ignore[arg-type]
        if hit is not None and hit[0] == hub.version:
            return Body(hit[1])
        v = hub.views.get(m)  # type: ignore[arg-type]
        if v is None:
            raise BadRequest("market", "no book for this market yet", 503, "not_ready")
        body = orjson.dumps({"market": q["market"], **depth_json(v, levels),
                             "checksum": book_checksum(v.bids, v.asks, levels), "paused": hub.is_paused(m)})  # type: ignore[arg-type]
        self._depth[key] = (hub.version, body)  # type: ignore[index]
        return Body(body)

    async def trades(self, request: Request) -> Response:
        q = self._query(request)
        m = self._market(q)
        limit = _int(q, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        cursor = decode_cursor(q.get("cursor"), 2)
        since, until = _time(q, "since"), _time(q, "until")
        if since and until and until - since > MAX_SPAN:
            raise BadRequest("until", f"the time range is limited to {MAX_SPAN.days} days")
        if since and until and until < since:
            raise BadRequest("until", "until is before since")
        if since and not until:
            until = _shift(since, MAX_SPAN)
        if until and not since:
            since = _shift(until, -MAX_SPAN)
        sql = ("SELECT block_number, log_index, block_time, tx_hash, price, quantity, buyer, seller FROM trades "
               "WHERE market_id = :m AND (CAST(:cb AS bigint) IS NULL OR (block_number, log_index) < (:cb, :cl)) "
               "AND (CAST(:since AS timestamptz) IS NULL OR block_time >= :since) "
               "AND (CAST(:until AS timestamptz) IS NULL OR block_time < :until) "
               "ORDER BY block_number DESC, log_index DESC LIMIT :lim")
        params = {"m": m, "cb": cursor[0] if cursor else None, "cl": cursor[1] if cursor else None,
                  "since": since, "until": until, "lim": limit + 1}
        ingested = await self.ingested()  # before the rows: the page holds at least everything up to it
        rows = await run_in_threadpool(self._rows, sql, params)
        page = rows[:limit]
        nxt = encode_cursor(page[-1][0], page[-1][1]) if len(rows) > limit else None
        return JSON({"market": q["market"], "trades": [
            {"block": r[0], "log_index": r[1], "time": r[2].isoformat(), "tx": r[3], "price": str(r[4]),
             "quantity": str(r[5]), "buyer": r[6], "seller": r[7]} for r in page], "next_cursor": nxt,
            "as_of": self._as_of(ingested)})

    async def orders(self, request: Request) -> Response:
        q = self._query(request)
        trader = _trader(q)
        m = self._market(q, required=trader is None)
        status = q.get("status")
        if status is not None and status not in STATUSES and status not in STATUS_GROUPS:
            raise BadRequest("status", f"status must be one of {sorted(STATUSES | set(STATUS_GROUPS))}")
        statuses = STATUS_GROUPS.get(status, (status,)) if status else None
        limit = _int(q, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        cursor = decode_cursor(q.get("cursor"), 2)
        sql = (f"SELECT {_ORDER_COLUMNS} FROM orders o WHERE {_ORDER_FILTER} "
               "AND (CAST(:cb AS bigint) IS NULL OR (o.created_block, o.created_log) < (:cb, :cl)) "
               f"{_NEWEST_FIRST} LIMIT :lim")
        params = {**self._order_filter(trader, m, statuses), "cb": cursor[0] if cursor else None,
                  "cl": cursor[1] if cursor else None, "lim": limit + 1}
        ingested = await self.ingested()
        rows = await run_in_threadpool(self._rows, sql, params)
        page = rows[:limit]
        nxt = encode_cursor(page[-1][0], page[-1][1]) if len(rows) > limit else None
        names = self.hub.names
        return JSON({"orders": [_order_item(r, names) for r in page], "next_cursor": nxt,
                     "as_of": self._as_of(ingested)})

    async def compat_orders(self, request: Request) -> Response:
        """Today's `/api/orders` shape for the frontend's migration (docs/pusher-compat.md): offset pages with a
        total, the market's live depth next to its orders, camelCase fields; same caps and 400s as /api/orders."""
        q = self._query(request)
        trader = _trader(q)
        kind = q.get("type")
        if kind is not None and kind not in COMPAT_TYPES:
            raise BadRequest("type", f"type must be one of {sorted(COMPAT_TYPES)}")
        m = self._market(q, required=False, param="metricId")
        if kind == "market" and (m is None or trader is not None):
            raise BadRequest("metricId" if m is None else "trader",
                             "type=market lists one market's open orders of every trader: give metricId, not trader")
        if trader is None and m is None:
            raise BadRequest("trader", "trader or metricId is required")
        limit = _int(q, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        offset = _int(q, "offset", 0, 0, MAX_OFFSET)
        params = {**self._order_filter(trader, m, COMPAT_TYPES[kind] if kind else None), "lim": limit, "off": offset}
        ingested = await self.ingested()
        rows, total = await run_in_threadpool(
            self._page_and_total,
            f"SELECT {_ORDER_COLUMNS} FROM orders o WHERE {_ORDER_FILTER} {_NEWEST_FIRST}, o.order_id "
            "LIMIT :lim OFFSET :off",
            f"SELECT count(*) FROM orders o WHERE {_ORDER_FILTER}", params)
        names = self.hub.names
        return JSON({"orders": [{new: item[old] for new, old in _COMPAT_ORDER_FIELDS}
                                for item in (_order_item(r, names) for r in rows)],
            "marketDepth": self._compat_depth(m) if m is not None else None,
            "pagination": {"limit": limit, "offset": offset, "total": total, "hasMore": offset + len(rows) < total},
            "as_of": self._as_of(ingested)})

    def _compat_depth(self, m: int) -> dict[str, Any] | None:
        v = self.hub.views.get(m)
        if v is None:
            return None
        return {"metricId": self.hub.names.get(m), **depth_json(v, COMPAT_DEPTH_LEVELS, best=True)}

    async def summary(self, request: Request) -> Response:
        self._query(request)
        hub = self.hub
        st = await self.market_stats()
        live_block = self.live_head()
        cached = self._summary
        if cached is not None and cached[0] == hub.version and cached[1] is st and cached[2] == live_block:
            return Body(cached[3])
        out = []
        for m in sorted(hub.publishable):
            v = hub.views.get(m)
            bid = v.bids[0][0] if v and v.bids else None
            ask = v.asks[0][0] if v and v.asks else None
            s = st.by_market.get(m)
            out.append({
                "market": hub.names.get(m), "decimals": st.decimals.get(m),
                "best_bid": opt_str(bid), "best_ask": opt_str(ask),
                "mid": opt_str((bid + ask) // 2 if bid and ask else None),
                "spread": opt_str(ask - bid if bid and ask else None),
                "volume_24h": opt_str(s[1] if s else 0), "high_24h": opt_str(s[2] if s else None),
                "low_24h": opt_str(s[3] if s else None), "last": opt_str(s[4] if s else None),
                "trades_24h": s[5] if s else 0, "open_interest": opt_str(st.open_interest.get(m, 0)),
                "seq": v.seq if v else 0, "paused": hub.is_paused(m)})
        body = orjson.dumps({"markets": out, "stats_as_of": st.computed_at,
                             "as_of": {"ingested_block": st.ingested_block, "live_block": live_block,
                                       "stats_computed_at": st.computed_at}})
        self._summary = (hub.version, st, live_block, body)
        return Body(body)

    async def market_stats(self, max_age_s: float = STATS_MAX_AGE_S) -> MarketStats:
        """24h trade statistics, open interest and decimals of every published market, recomputed at most every
        `max_age_s`: at thousands of markets the aggregate costs hundreds of ms, far too much per request,
        while best bid/ask (the part that must be current) comes from the live book."""
        if self._stats is None or time.monotonic() - self._stats_mono > max_age_s:
            async with self._stats_lock:
                if self._stats is None or time.monotonic() - self._stats_mono > max_age_s:
                    pub = sorted(self.hub.publishable)
                    computed_at = datetime.now(UTC)
                    ingested = await self.ingested(max_age_s=0.0)  # before the aggregates: never overstated
                    rows = await run_in_threadpool(self._rows, (
                        "SELECT market_id, sum(quantity), max(price), min(price), "
                        "(array_agg(price ORDER BY block_number DESC, log_index DESC))[1], count(*) FROM trades "
                        "WHERE block_time >= :since AND market_id = ANY(:pub) GROUP BY market_id"),
                        {"since": computed_at - timedelta(hours=24), "pub": pub})
                    oi = dict(await run_in_threadpool(self._rows, (
                        "SELECT market_id, sum(net_quantity) FROM positions WHERE net_quantity > 0 "
                        "AND market_id = ANY(:pub) GROUP BY market_id"), {"pub": pub}))
                    decimals = dict(await run_in_threadpool(self._rows, (
                        "SELECT market_id, decimals FROM markets WHERE market_id = ANY(:pub)"), {"pub": pub}))
                    self._stats = MarketStats({r[0]: r for r in rows}, oi, decimals, ingested,
                                              computed_at.isoformat())
                    self._stats_mono = time.monotonic()
        return self._stats

    @property
    def stats_age_s(self) -> float:
        """Seconds since the statistics were last computed (the service's timer refreshes them ahead of readers)."""
        return time.monotonic() - self._stats_mono

    @property
    def frontier_age_s(self) -> float:
        """Seconds since the frontier was last read (the service's timer re-reads it ahead of readers)."""
        return time.monotonic() - self._frontier_mono

    def _rows(self, sql: str, params: dict[str, Any]) -> list[tuple]:
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params)]

    def _page_and_total(self, sql: str, count_sql: str, params: dict[str, Any]) -> tuple[list[tuple], int]:
        """A page and the total it belongs to, from one snapshot (total and hasMore agree with the page)."""
        with self.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn, conn.begin():
            rows = [tuple(r) for r in conn.execute(text(sql), params)]
            return rows, int(conn.execute(text(count_sql), params).scalar_one())
