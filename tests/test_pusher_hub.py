"""Pusher channels on the hub's fan-out, exercised directly on the event loop: one serialization per event and
channel, and the slow-consumer ladder of our own WebSocket (a dropped backlog is replaced by a fresh
price-update; a consumer that keeps lagging is closed, with Pusher's reconnect-after-backoff code); where the
app key and secrets come from."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml

from orderbook_pipelines.config import ConfigError, EnvSettings, load_config, parse_config
from orderbook_pipelines.live.follower import Update
from orderbook_pipelines.live.hub import Hub, Limits
from orderbook_pipelines.live.pusher import CODES, PusherSettings, parse_channel
from orderbook_pipelines.live.pusher_channels import PusherChannels
from orderbook_pipelines.live.pusher_ws import PusherConn
from orderbook_pipelines.live.state import MarketView
from tests.conftest import sample_config


def view(seq: int, bid: int) -> MarketView:
    return MarketView(1, seq, 100 + seq, f"0x{seq:064x}", ((bid, 5),), ((bid + 10, 5),))


def setup(limits: Limits) -> tuple[Hub, PusherChannels, list[PusherConn]]:
    hub = Hub(limits)
    hub.set_markets({1: "SILVER_V1"}, {1})
    channels = PusherChannels(hub, PusherSettings(price_levels=10))
    hub.on_update(Update("reset", [view(0, 100)]))
    conns = []
    for name in ("a", "b"):
        conn = PusherConn(hub, name, limits, channels)
        ref = parse_channel("market-SILVER_V1")
        assert ref is not None
        conn.channels[ref.name] = (ref, 1)
        channels.add(conn, ref, 1)
        conns.append(conn)
    return hub, channels, conns


def drain(conn: PusherConn) -> list:
    out = []
    while not conn.queue.empty():
        out.append(conn.queue.get_nowait())
    return out


def test_each_event_is_serialized_once_per_channel() -> None:
    async def run() -> None:
        hub, _channels, (a, b) = setup(Limits())
        hub.on_update(Update("block", [view(1, 99)]))
        (ta,), (tb,) = drain(a), drain(b)
        assert ta is tb
        msg = json.loads(ta)
        assert (msg["event"], msg["channel"]) == ("price-update", "market-SILVER_V1")
        data = json.loads(msg["data"])  # a JSON string, as the protocol has it
        assert (data["bids"], data["asks"], data["seq"], data["reason"]) == ([["99", "5"]], [["109", "5"]], 1,
                                                                               "block")

    asyncio.run(run())


def test_a_slow_consumer_gets_a_fresh_book_then_is_closed() -> None:
    async def run() -> None:
        hub, _channels, (slow, fast) = setup(Limits(queue_size=3, max_conflations=1))
        for seq in range(1, 5):  # the 4th message overflows the queue of 3
            hub.on_update(Update("block", [view(seq, 100 - seq)]))
            drain(fast)
        (fresh,) = drain(slow)
        data = json.loads(json.loads(fresh)["data"])
        assert (data["reason"], data["seq"], data["bids"]) == ("resync", 4, [["96", "5"]])  # the book after seq 4
        for seq in range(5, 10):  # overflows twice more within the window: disconnected
            hub.on_update(Update("block", [view(seq, 100 - seq)]))
        assert slow.closing and not fast.closing
        ((error, _code, _message),) = drain(slow)
        assert error == "slow_consumer" and CODES[error] == 4100  # pusher-js reconnects after a backoff

    asyncio.run(run())


def test_key_and_secrets_come_from_config_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"

    def env(**values: str) -> EnvSettings:  # explicit values win over the process environment
        return EnvSettings(config=path, **{"pusher_key": None, "pusher_secret": None, "pusher_auth_token": None,
                                           **values})

    doc = sample_config()
    doc["pusher"] = {"app_key": "exchange-test", "private_user_channels": True}
    path.write_text(yaml.safe_dump(doc))
    cfg = load_config(path, env())
    assert cfg.pusher.app_key == "exchange-test" and cfg.pusher.private_user_channels
    given = env(pusher_key="exchange-prod", pusher_secret="unit-pusher-secret-8d1f",
                pusher_auth_token="unit-pusher-token-8d1f")
    settings = PusherSettings.resolve(load_config(path, given).pusher, given)
    assert (settings.app_key, settings.secret, settings.auth_token) == (
        "exchange-prod", "unit-pusher-secret-8d1f", "unit-pusher-token-8d1f")
    unset = PusherSettings.resolve(parse_config(sample_config()).pusher, env())
    assert (unset.app_key, unset.secret, unset.auth_token) == ("obp-dev", None, None)
    doc["pusher"] = {"app_key": "no spaces/slashes"}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"pusher\.app_key"):
        load_config(path, env())
