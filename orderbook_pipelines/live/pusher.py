"""Pusher Channels protocol 7, the wire part: settings, channel names, messages, error codes, signatures.

Today's frontend speaks this protocol through `pusher-js`; speaking it here lets that client connect to the live
service by changing only its host settings (docs/pusher-compat.md). No I/O here: the endpoint is
live/pusher_ws.py, the channels' fan-out live/pusher_channels.py.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any

from orderbook_pipelines import obs
from orderbook_pipelines.config import EnvSettings
from orderbook_pipelines.config import Pusher as PusherConfig
from orderbook_pipelines.live.hub import dumps

PROTOCOL = 7
MAX_CHANNEL_NAME = 164  # Pusher's limit on a channel name

# Our error names -> Pusher error codes (pusher:error `code`, and the close code when the error closes).
# 4000-4099: the client must not reconnect; 4100-4199: reconnect after a backoff; 4200-4299: reconnect now;
# 4300-4399: other errors (pusher-js does not reconnect after a close with one of them).
CODES: dict[str, int] = {
    "unknown_app": 4001, "invalid_version": 4006, "unsupported_protocol": 4007, "no_protocol": 4008,
    "unauthorized": 4009,
    "too_many_connections": 4100, "slow_consumer": 4100,
    "idle_timeout": 4201,
    "bad_request": 4300, "unknown_channel": 4300, "unknown_event": 4300, "too_many_subscriptions": 4300,
    "message_too_large": 4300,
    "rate_limited": 4301,
}

_MARKET = re.compile(r"market-([A-Za-z0-9_]{1,100})")
_USER = re.compile(r"(private-)?user-(0x[0-9a-fA-F]{40})")
_SOCKET_ID = re.compile(r"\d{1,20}\.\d{1,20}")


@dataclass(frozen=True)
class PusherSettings:
    """The endpoint's settings: the YAML `pusher` section plus the secrets, which come from the environment."""

    app_key: str = "obp-dev"
    secret: str | None = None  # signs private-user channels; None: private channels are refused
    auth_token: str | None = None  # bearer token of POST /pusher/auth; None: the route is off
    private_user_channels: bool = False
    activity_timeout_s: int = 30
    price_levels: int = 50

    @classmethod
    def resolve(cls, cfg: PusherConfig, env: EnvSettings | None = None) -> PusherSettings:
        env = env or EnvSettings()
        obs.register_secret(env.pusher_secret)  # never in a log line
        obs.register_secret(env.pusher_auth_token)
        return cls(app_key=env.pusher_key or cfg.app_key, secret=env.pusher_secret or None,
                   auth_token=env.pusher_auth_token or None, private_user_channels=cfg.private_user_channels,
                   activity_timeout_s=cfg.activity_timeout_s, price_levels=cfg.price_levels)


@dataclass(frozen=True, slots=True)
class ChannelRef:
    """A parsed channel name: `market-{metricId}`, `user-{trader}` or `private-user-{trader}`."""

    name: str
    kind: str  # market | user
    market: str | None = None  # metric id (market channels)
    trader: str | None = None  # lower-case address (user channels)
    private: bool = False


def parse_channel(name: str) -> ChannelRef | None:
    """None for a name that is none of ours (presence channels and client channels included)."""
    if len(name) > MAX_CHANNEL_NAME:
        return None
    if m := _MARKET.fullmatch(name):
        return ChannelRef(name, "market", market=m.group(1))
    if m := _USER.fullmatch(name):
        return ChannelRef(name, "user", trader=m.group(2).lower(), private=m.group(1) is not None)
    return None


def new_socket_id() -> str:
    """Pusher's socket id form (digits.digits); random, so it cannot be guessed to borrow a signature."""
    return f"{secrets.randbelow(10**9)}.{secrets.randbelow(10**9)}"


def valid_socket_id(socket_id: str) -> bool:
    return _SOCKET_ID.fullmatch(socket_id) is not None


def signature(secret: str, socket_id: str, channel: str) -> str:
    """HMAC-SHA256 of `socket_id:channel` with the app secret, hex: Pusher's private-channel signature."""
    return hmac.new(secret.encode(), f"{socket_id}:{channel}".encode(), hashlib.sha256).hexdigest()


def auth_string(key: str, secret: str, socket_id: str, channel: str) -> str:
    """The `auth` a client sends with pusher:subscribe (and that an auth endpoint returns): `key:signature`."""
    return f"{key}:{signature(secret, socket_id, channel)}"


def auth_ok(settings: PusherSettings, socket_id: str, channel: str, given: Any) -> bool:
    if settings.secret is None or not isinstance(given, str):
        return False
    return hmac.compare_digest(given.encode(), auth_string(settings.app_key, settings.secret, socket_id,
                                                           channel).encode())


def encode(event: str, data: str, channel: str | None = None) -> str:
    """A server message; `data` is already a JSON string (sent as a string, as the protocol has it)."""
    msg: dict[str, Any] = {"event": event, "data": data}
    if channel is not None:
        msg["channel"] = channel
    return dumps(msg)


def error_message(code: str, message: str) -> str:
    """pusher:error; its data is an object in the protocol. `reason` names our error (an extension: clients
    that do not know it ignore it)."""
    return dumps({"event": "pusher:error",
                  "data": {"code": CODES.get(code, 4300), "message": message, "reason": code}})


def subscription_error(channel: str, kind: str, status: int, message: str) -> str:
    """Channel-scoped failure, so that `channel.bind("pusher:subscription_error", …)` in pusher-js hears it."""
    return encode("pusher:subscription_error", dumps({"type": kind, "error": message, "status": status}), channel)
