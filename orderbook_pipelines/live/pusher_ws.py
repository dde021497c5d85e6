"""The Pusher Channels endpoint `/app/{key}` and the private-channel auth route `POST /pusher/auth`.

The endpoint is the WebSocket endpoint of live/ws.py with another protocol: the same per-client connection
count, message size limit, rate limit, bounded send queue and slow-consumer policy; it only says things the
Pusher way (live/pusher.py) and pings an idle client instead of closing it at once, because a pusher-js client
that keeps receiving never pings on its own.
"""

from __future__ import annotations

import hmac
from typing import Any
from urllib.parse import parse_qs

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from orderbook_pipelines.live import metrics
from orderbook_pipelines.live.api import JSON, BadRequest
from orderbook_pipelines.live.hub import Conn, Hub, Limits, dumps
from orderbook_pipelines.live.pusher import (
    CODES,
    PROTOCOL,
    ChannelRef,
    PusherSettings,
    auth_ok,
    auth_string,
    encode,
    error_message,
    new_socket_id,
    parse_channel,
    subscription_error,
    valid_socket_id,
)
from orderbook_pipelines.live.pusher_channels import PusherChannels
from orderbook_pipelines.live.ws import WsEndpoint

MAX_AUTH_BODY = 4096


class PusherConn(Conn):
    """A connection with a socket id and its channels; a dropped backlog is replaced by fresh price-updates."""

    def __init__(self, hub: Hub, client: str, limits: Limits, channels: PusherChannels):
        super().__init__(hub, client, limits)
        self.pusher = channels
        self.socket_id = new_socket_id()
        self.channels: dict[str, tuple[ChannelRef, int | None]] = {}  # name -> (channel, market id)
        self.pinged = False

    @property
    def subscription_count(self) -> int:
        return len(self.channels)

    def resync_messages(self) -> list[str]:
        out = []
        for name, (_ref, market_id) in sorted(self.channels.items()):
            if market_id is not None and (text := self.pusher.price_update(market_id, name, "resync")) is not None:
                out.append(text)
        return out


class PusherEndpoint(WsEndpoint):
    """`/app/{key}`: our WebSocket endpoint's loop and limits, Pusher's messages and codes."""

    def __init__(self, hub: Hub, channels: PusherChannels):
        super().__init__(hub)
        self.channels = channels
        self.settings = channels.settings

    # -- WsEndpoint hooks -----------------------------------------------------------------------------------
    def refuse(self, ws: WebSocket) -> tuple[int, str, str] | None:
        if ws.path_params.get("key") != self.settings.app_key:
            return CODES["unknown_app"], "unknown_app", "Application does not exist: unknown app key"
        protocol = ws.query_params.get("protocol")
        if protocol is None:
            return CODES["no_protocol"], "no_protocol", "No protocol version supplied"
        if not protocol.isdigit() or len(protocol) > 3:
            return CODES["invalid_version"], "invalid_version", "Invalid version string format"
        if int(protocol) != PROTOCOL:
            return (CODES["unsupported_protocol"], "unsupported_protocol",
                    f"Unsupported protocol version: only {PROTOCOL}")
        return None

    def new_conn(self, client: str) -> Conn:
        return PusherConn(self.hub, client, self.hub.limits, self.channels)

    def opened(self, conn: Conn) -> None:
        assert isinstance(conn, PusherConn)
        conn.send(encode("pusher:connection_established", dumps({
            "socket_id": conn.socket_id, "activity_timeout": self.settings.activity_timeout_s})))

    def keepalive(self, conn: Conn) -> bool:
        assert isinstance(conn, PusherConn)
        if conn.pinged:
            return False  # pinged a whole idle timeout ago, no answer: close (4201)
        conn.pinged = True
        conn.send(encode("pusher:ping", "{}"))
        return True

    def error_text(self, code: str, message: str) -> str:
        metrics.WS_ERRORS.labels(code).inc()
        return error_message(code, message)

    def close_code(self, error_code: str, code: int) -> int:
        return CODES.get(error_code, code)

    # -- protocol -------------------------------------------------------------------------------------------
    def handle(self, conn: Conn, text: str) -> None:
        assert isinstance(conn, PusherConn)
        conn.pinged = False
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError:
            conn.send(self.error_text("bad_request", "a message must be JSON: {\"event\": ..., \"data\": ...}"))
            return
        event = msg.get("event") if isinstance(msg, dict) else None
        if not isinstance(event, str):
            conn.send(self.error_text("bad_request", "a message must be a JSON object with a string 'event'"))
            return
        data = msg.get("data")
        if isinstance(data, str):  # some clients send data as a JSON string
            try:
                data = orjson.loads(data)
            except orjson.JSONDecodeError:
                data = None
        if event == "pusher:ping":
            conn.send(encode("pusher:pong", "{}"))
        elif event == "pusher:pong":
            return
        elif event == "pusher:subscribe":
            self._subscribe(conn, data)
        elif event == "pusher:unsubscribe":
            self._unsubscribe(conn, data)
        elif event.startswith("client-"):
            conn.send(self.error_text("unknown_event", "client events are not enabled on this app"))
        else:
            conn.send(self.error_text("unknown_event", f"unsupported event {event[:64]!r}"))

    def _subscribe(self, conn: PusherConn, data: Any) -> None:
        name = data.get("channel") if isinstance(data, dict) else None
        if not isinstance(name, str) or not name:
            conn.send(self.error_text("bad_request", "pusher:subscribe needs data.channel, a channel name"))
            return
        ref = parse_channel(name)
        market_id = None
        if ref is not None and ref.kind == "market":
            market_id = self.hub.by_name.get(ref.market or "")
            if market_id is None or market_id not in self.hub.publishable:
                ref = None
        if ref is None:
            self._reject(conn, name, "unknown_channel", "UnknownChannel", 404,
                         f"unknown channel {name[:200]!r}: expected market-{{metricId}} of a published market, "
                         "user-{trader} or private-user-{trader}")
            return
        if ref.kind == "user" and not ref.private and self.settings.private_user_channels:
            self._reject(conn, name, "unauthorized", "AuthError", 403,
                         "user channels are private here: subscribe to private-user-{trader} with an auth signature")
            return
        if ref.private and not auth_ok(self.settings, conn.socket_id, name, data.get("auth")):
            why = ("private channels are not configured (no app secret)" if self.settings.secret is None
                   else "invalid auth signature for this socket id and channel")
            self._reject(conn, name, "unauthorized", "AuthError", 401, why)
            return
        if name not in conn.channels:
            if conn.subscription_count >= self.hub.limits.max_subscriptions:
                self._reject(conn, name, "too_many_subscriptions", "LimitReached", 429,
                             f"at most {self.hub.limits.max_subscriptions} subscriptions per connection")
                return
            conn.channels[name] = (ref, market_id)
            self.channels.add(conn, ref, market_id)
        conn.send(encode("pusher_internal:subscription_succeeded", "{}", name))
        if market_id is not None and (text := self.channels.price_update(market_id, name, "subscribe")) is not None:
            conn.send(text)

    def _unsubscribe(self, conn: PusherConn, data: Any) -> None:
        name = data.get("channel") if isinstance(data, dict) else None
        if not isinstance(name, str):
            conn.send(self.error_text("bad_request", "pusher:unsubscribe needs data.channel, a channel name"))
            return
        entry = conn.channels.pop(name, None)
        if entry is not None:  # unsubscribing from a channel one is not on is no error in the protocol
            self.channels.remove(conn, *entry)

    def _reject(self, conn: PusherConn, channel: str, code: str, kind: str, status: int, message: str) -> None:
        conn.send(self.error_text(code, message))
        conn.send(subscription_error(channel[:200], kind, status, message))

    def drop(self, conn: Conn) -> None:
        assert isinstance(conn, PusherConn)
        for entry in conn.channels.values():
            self.channels.remove(conn, *entry)
        conn.channels.clear()
        super().drop(conn)


async def auth(request: Request, settings: PusherSettings) -> Response:
    """Signs `socket_id:channel_name` for a private-user channel, for a caller holding OBP_PUSHER_AUTH_TOKEN:
    the frontend's backend, which knows the user's session (the same signature Pusher's server SDKs compute
    from the app secret, so that backend may equally sign by itself)."""
    if settings.secret is None or settings.auth_token is None:
        raise BadRequest(None, "private channels are not configured (OBP_PUSHER_SECRET and OBP_PUSHER_AUTH_TOKEN)",
                         404, "not_configured")
    given = request.headers.get("authorization", "").removeprefix("Bearer ")
    if not hmac.compare_digest(given.encode(), settings.auth_token.encode()):
        raise BadRequest(None, "a bearer token is required", 403, "forbidden")
    body = await request.body()
    if len(body) > MAX_AUTH_BODY:
        raise BadRequest(None, f"the body is limited to {MAX_AUTH_BODY} bytes", 413, "too_large")
    fields = _fields(body, request.headers.get("content-type", ""))
    socket_id, channel = fields.get("socket_id"), fields.get("channel_name")
    if not isinstance(socket_id, str) or not valid_socket_id(socket_id):
        raise BadRequest("socket_id", "socket_id must be the connection's socket id (digits.digits)")
    ref = parse_channel(channel) if isinstance(channel, str) else None
    if ref is None or not ref.private:
        raise BadRequest("channel_name", "channel_name must be private-user-{trader}")
    return JSON({"auth": auth_string(settings.app_key, settings.secret, socket_id, ref.name)})


def _fields(body: bytes, content_type: str) -> dict[str, Any]:
    """The body as pusher-js sends it (form-encoded) or as JSON; anything else is empty."""
    try:
        if content_type.startswith("application/json"):
            doc = orjson.loads(body)
            return doc if isinstance(doc, dict) else {}
        return {k: v[0] for k, v in parse_qs(body.decode(), strict_parsing=False).items()}
    except (orjson.JSONDecodeError, UnicodeDecodeError, ValueError):
        return {}
