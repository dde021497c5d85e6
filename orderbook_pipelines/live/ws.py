"""The WebSocket protocol endpoint (docs/websocket-protocol.md): validation, limits, one sender task per client."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from orderbook_pipelines.live import metrics
from orderbook_pipelines.live.hub import DEPTHS, INTERVALS, Conn, Hub, dumps
from orderbook_pipelines.live.ratelimit import MovingWindow

_TRADER = re.compile(r"^0x[0-9a-fA-F]{40}$")
_MAX_RATE_VIOLATIONS = 50


def error(code: str, message: str, req_id: Any = None) -> str:
    metrics.WS_ERRORS.labels(code).inc()
    msg: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if req_id is not None:
        msg["id"] = req_id
    return dumps(msg)


class WsEndpoint:
    def __init__(self, hub: Hub):
        self.hub = hub
        self.limiter = MovingWindow(hub.limits.messages_per_second)

    async def serve(self, ws: WebSocket) -> None:
        hub, limits = self.hub, self.hub.limits
        client = ws.client.host if ws.client else "unknown"
        await ws.accept()
        refused = self.refuse(ws)
        if refused is None and hub.connections[client] >= limits.max_connections_per_client:
            refused = (1008, "too_many_connections", f"at most {limits.max_connections_per_client} connections per "
                                                     "client")
        if refused is not None:
            code, name, message = refused
            await ws.send_text(self.error_text(name, message))
            await ws.close(self.close_code(name, code))
            return
        hub.connections[client] += 1
        metrics.CLIENTS.inc()
        conn = self.new_conn(client)
        sender = asyncio.create_task(self._sender(ws, conn))
        self.opened(conn)
        violations = 0
        try:
            while not conn.closing:
                try:
                    msg = await asyncio.wait_for(ws.receive(), timeout=limits.idle_timeout_s)
                except TimeoutError:
                    if self.keepalive(conn):
                        continue
                    conn.close(4001, "idle_timeout", f"no message for {limits.idle_timeout_s:.0f}s; send ping")
                    break
                if msg["type"] == "websocket.disconnect":
                    break
                text = msg.get("text")
                if text is None:
                    conn.send(self.error_text("bad_request", "binary frames are not supported; send JSON text"))
                    continue
                if len(text.encode()) > limits.max_message_bytes:
                    conn.close(1009, "message_too_large", f"messages are limited to {limits.max_message_bytes} bytes")
                    break
                if not self.limiter.hit(str(id(conn))):
                    violations += 1
                    if violations > _MAX_RATE_VIOLATIONS:
                        conn.close(4029, "rate_limited", "too many messages; disconnected")
                        break
                    conn.send(self.error_text("rate_limited",
                                              f"at most {limits.messages_per_second} messages per second"))
                    continue
                self.handle(conn, text)
        except WebSocketDisconnect:
            pass
        finally:
            self.drop(conn)
            hub.connections[client] -= 1
            metrics.CLIENTS.dec()
            if conn.closing:
                try:
                    await asyncio.wait_for(sender, timeout=5)
                except (TimeoutError, Exception):
                    sender.cancel()
            else:
                sender.cancel()

    async def _sender(self, ws: WebSocket, conn: Conn) -> None:
        """Drains the connection's queue: one frame per message, or with `batch` one array frame per drain."""
        item: str | tuple[str, int, str] | None = None
        try:
            while True:
                if item is None:
                    item = await conn.queue.get()
                if isinstance(item, tuple):
                    code_name, code, message = item
                    text = self.error_text(code_name, message)
                    await ws.send_text(f"[{text}]" if conn.batch else text)
                    await ws.close(self.close_code(code_name, code))
                    return
                if conn.batch:
                    frame, item = conn.batch_frame(item)
                    if conn.closing and isinstance(item, str):
                        item = None  # the close is queued next; a message left over is moot
                    await ws.send_text(frame)
                else:
                    text, item = item, None
                    await ws.send_text(text)
        except (WebSocketDisconnect, RuntimeError):
            return

    # -- what another protocol on the same limits overrides (live/pusher_ws.py) ----------------------------
    def refuse(self, ws: WebSocket) -> tuple[int, str, str] | None:
        """(close code, error, message) to refuse a connection before it counts, e.g. for its URL."""
        return None

    def new_conn(self, client: str) -> Conn:
        return Conn(self.hub, client, self.hub.limits)

    def opened(self, conn: Conn) -> None:
        """Queue what the protocol sends first (nothing here: the client speaks first)."""

    def drop(self, conn: Conn) -> None:
        """The connection is gone: forget its subscriptions."""
        self.hub.drop(conn)

    def keepalive(self, conn: Conn) -> bool:
        """After `idle_timeout_s` without a client message: True to wait once more (the protocol probed), False
        to close the connection as idle."""
        return False

    def error_text(self, code: str, message: str) -> str:
        return error(code, message)

    def close_code(self, error_code: str, code: int) -> int:
        return code

    # -- protocol -------------------------------------------------------------------------------------------
    def handle(self, conn: Conn, text: str) -> None:
        try:
            req = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            conn.send(error("bad_request", f"not valid JSON: {exc}"))
            return
        if not isinstance(req, dict):
            conn.send(error("bad_request", "a message must be a JSON object"))
            return
        rid = req.get("id")
        op = req.get("op")
        if op == "ping":
            conn.send(dumps({"type": "pong", "id": rid}))
        elif op in ("subscribe", "unsubscribe"):
            self._subscription(conn, op, req, rid)
        elif op == "options":
            self._options(conn, req, rid)
        else:
            conn.send(error("unknown_op", f"unknown op {op!r}; expected subscribe, unsubscribe, options or ping",
                            rid))

    @staticmethod
    def _options(conn: Conn, req: dict, rid: Any) -> None:
        """Connection options; `batch` packs the messages pending for this client into one JSON-array frame
        (fewer frames, same messages: per-market seq/prev_seq/checksum are untouched)."""
        unknown = sorted(set(req) - {"op", "id", "batch"})
        if unknown:
            conn.send(error("invalid_option", f"unknown option(s) {unknown}; supported: batch", rid))
            return
        batch = req.get("batch")
        if not isinstance(batch, bool):
            conn.send(error("invalid_option", "'batch' must be true or false", rid))
            return
        conn.batch = batch
        conn.send(dumps({"type": "options", "id": rid, "batch": batch}))

    def _market(self, conn: Conn, req: dict, rid: Any) -> int | None:
        name = req.get("market")
        if not isinstance(name, str):
            conn.send(error("bad_request", "'market' (string) is required", rid))
            return None
        m = self.hub.by_name.get(name)
        if m is None:
            conn.send(error("unknown_market", f"unknown market {name!r}", rid))
            return None
        if m not in self.hub.publishable:
            conn.send(error("market_not_published", f"market {name!r} is not published (canary or paused)", rid))
            return None
        return m

    def _subscription(self, conn: Conn, op: str, req: dict, rid: Any) -> None:
        hub, channel = self.hub, req.get("channel")
        if channel not in ("book", "trades", "orders"):
            conn.send(error("unknown_channel", f"unknown channel {channel!r}; expected book, trades or orders", rid))
            return
        if op == "subscribe" and conn.subscription_count >= hub.limits.max_subscriptions:
            conn.send(error("too_many_subscriptions",
                            f"at most {hub.limits.max_subscriptions} subscriptions per connection", rid))
            return
        if channel == "orders":
            trader = req.get("trader")
            if not isinstance(trader, str) or not _TRADER.match(trader):
                conn.send(error("bad_request", "'trader' must be a 0x-prefixed 20-byte hex address", rid))
                return
            trader = trader.lower()
            self._toggle(conn, op, trader, conn.orders, hub.order_subs[trader], rid, channel, {"trader": trader})
            return
        m = self._market(conn, req, rid)
        if m is None:
            return
        name = hub.names[m]
        if channel == "trades":
            self._toggle(conn, op, m, conn.trades, hub.trade_subs[m], rid, channel, {"market": name})
            return
        depth, interval = req.get("depth", 20), req.get("interval_ms", 0)
        if depth not in DEPTHS or isinstance(depth, bool):
            conn.send(error("invalid_depth", f"depth must be one of {list(DEPTHS)}", rid))
            return
        if interval not in INTERVALS or isinstance(interval, bool):
            conn.send(error("invalid_interval", f"interval_ms must be one of {list(INTERVALS)}", rid))
            return
        key = (m, depth, interval)
        if op == "subscribe":
            if key in conn.books:
                conn.send(error("already_subscribed", "already subscribed to this book channel", rid))
                return
            snapshot = hub.subscribe_book(conn, m, depth, interval)
            conn.send(dumps({"type": "subscribed", "id": rid, "channel": "book", "market": name, "depth": depth,
                             "interval_ms": interval}))
            conn.send(snapshot)
        else:
            if key not in conn.books:
                conn.send(error("not_subscribed", "not subscribed to this book channel", rid))
                return
            hub.unsubscribe_book(conn, key)
            conn.send(dumps({"type": "unsubscribed", "id": rid, "channel": "book", "market": name, "depth": depth,
                             "interval_ms": interval}))

    @staticmethod
    def _toggle(conn: Conn, op: str, key: Any, mine: set[Any], subscribers: set[Conn], rid: Any, channel: str,
                what: dict[str, Any]) -> None:
        """(Un)subscribe `conn` to the `key` channel: its own set of keys and the hub's subscribers of the key."""
        present = key in mine
        if op == "subscribe":
            if present:
                conn.send(error("already_subscribed", f"already subscribed to this {channel} channel", rid))
                return
            mine.add(key)
            subscribers.add(conn)
            metrics.SUBSCRIPTIONS.inc()
            conn.send(dumps({"type": "subscribed", "id": rid, "channel": channel, **what}))
        else:
            if not present:
                conn.send(error("not_subscribed", f"not subscribed to this {channel} channel", rid))
                return
            mine.discard(key)
            subscribers.discard(conn)
            metrics.SUBSCRIPTIONS.dec()
            conn.send(dumps({"type": "unsubscribed", "id": rid, "channel": channel, **what}))
