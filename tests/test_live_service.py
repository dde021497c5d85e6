"""The live depth service on a real chain: WebSocket clients end with exactly the contract's book, through
reorgs, coalescing and a dropped message; abusive clients get exact errors while others stay served."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from web3 import Web3
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from orderbook_pipelines.config import load_config
from orderbook_pipelines.devchain.deploy import artifact
from orderbook_pipelines.devchain.simulator import Simulator
from orderbook_pipelines.live.hub import Limits
from tests.conftest import Anvil, DevChain, make_devchain
from tests.live_harness import BookClient, running_service, wait_until_current

GEN1 = ["SILVER_V1", "GOLD_V1", "COPPER_V1"]
GEN2 = ["ALUMINUM_V1"]


@pytest.fixture
def chain(anvil_factory: type[Anvil], tmp_path: Path) -> DevChain:
    return make_devchain(anvil_factory(), tmp_path, GEN1, GEN2, confirmations=2, range_size=25)


def contract_levels(chain: DevChain, market: str, depth: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    w3 = chain.anvil.w3
    if market in chain.dep.gen1_books:
        c = w3.eth.contract(address=Web3.to_checksum_address(chain.dep.gen1_books[market]),
                            abi=artifact("OrderBook")["abi"])
    else:
        c = w3.eth.contract(address=Web3.to_checksum_address(chain.dep.gen2_books[market]),
                            abi=artifact("AluminumOrderBook")["abi"])
    out = []
    for side in (0, 1):
        prices, qtys, _counts = c.functions.getLevels(side, depth).call()
        out.append(list(zip(prices, qtys, strict=True)))
    return out[0], out[1]


def test_clients_follow_the_chain_through_reorgs_and_end_equal_to_the_contract(chain: DevChain,
                                                                                 database: str) -> None:
    anvil = chain.anvil
    Simulator(anvil.w3, chain.dep, seed=21).run_batches(200, per_block=20)  # history before the service starts
    with running_service(chain, database) as (service, url):
        clients = [BookClient(url, m, depth=100) for m in GEN1 + GEN2]
        coalesced = [BookClient(url, m, depth=20, interval_ms=100) for m in GEN1 + GEN2]
        for round_ in range(3):
            Simulator(anvil.w3, chain.dep, seed=100 + round_).run_batches(120, per_block=15)
            snapshot = anvil.rpc("evm_snapshot")
            Simulator(anvil.w3, chain.dep, seed=200 + round_).run_batches(60, per_block=15)  # 4 blocks ...
            wait_until_current(service, chain)
            anvil.rpc("evm_revert", snapshot)  # ... reorganised away
            Simulator(anvil.w3, chain.dep, seed=300 + round_).run_batches(90, per_block=15)  # a longer branch
        wait_until_current(service, chain)
        for c in clients + coalesced:
            c.drain()
        assert service.follower.stats.reorgs >= 3
        assert service.heads is not None and service.heads.notifications > 0  # pushed, not polled
        assert httpx.get(f"http://{url}/health").json()["head_subscription"] is True
        for c in clients + coalesced:
            bids, asks = contract_levels(chain, c.market, c.depth)
            assert c.levels() == (bids, asks), f"{c.market} depth {c.depth} interval {c.interval_ms}"
            assert c.gaps == 0 and c.checksum_failures == 0, (c.market, c.gaps, c.checksum_failures)
        assert sum(c.deltas for c in clients) > 100
        # Coalescing merges changes, never adds any: at most the per-block stream's deltas (fewer when blocks come
        # faster than the window, which a loaded machine does not guarantee; tests/test_live_hub.py merges with a
        # held clock).
        assert sum(c.deltas for c in coalesced) <= sum(c.deltas for c in clients)
        depth = httpx.get(f"http://{url}/api/depth", params={"market": "SILVER_V1", "levels": 50}).json()
        bids, asks = contract_levels(chain, "SILVER_V1", 50)
        assert [[int(p), int(q)] for p, q in depth["bids"]] == [list(x) for x in bids]
        assert [[int(p), int(q)] for p, q in depth["asks"]] == [list(x) for x in asks]
        for c in clients + coalesced:
            c.close()


def test_a_dropped_delta_is_detected_by_seq_and_the_resync_rule_restores_the_book(chain: DevChain,
                                                                                   database: str) -> None:
    anvil = chain.anvil
    with running_service(chain, database) as (service, url):
        client = BookClient(url, "GOLD_V1", depth=50)
        Simulator(anvil.w3, chain.dep, seed=5).run_batches(80, per_block=10)
        wait_until_current(service, chain)
        client.drain()
        client.drop_next_delta = True
        Simulator(anvil.w3, chain.dep, seed=6).run_batches(160, per_block=10)
        wait_until_current(service, chain)
        client.drain()
        assert client.gaps == 1 and client.resyncs == 1
        assert client.levels() == contract_levels(chain, "GOLD_V1", 50)
        client.close()


def _ws(url: str):  # type: ignore[no-untyped-def]
    return connect(f"ws://{url}/ws", max_size=2**22)


def _errors(ws, n: int) -> list[dict]:  # type: ignore[no-untyped-def]
    return [json.loads(ws.recv(timeout=5)) for _ in range(n)]


@pytest.fixture
def small_limits_service(chain: DevChain, database: str) -> Iterator[tuple[object, str]]:
    limits = Limits(max_subscriptions=3, max_connections_per_client=4, max_message_bytes=512,
                    messages_per_second=5, idle_timeout_s=3)
    with running_service(chain, database, limits) as running:
        yield running


def test_protocol_errors_have_exact_codes_and_other_clients_stay_served(small_limits_service, chain) -> None:  # type: ignore[no-untyped-def]
    _service, url = small_limits_service
    healthy = BookClient(url, "SILVER_V1", depth=20)
    healthy.drain(0.3)

    def pause() -> None:  # stay under 5 messages/s; the healthy client pings (it would idle out otherwise)
        time.sleep(1.1)
        healthy.ws.send(json.dumps({"op": "ping"}))
        assert json.loads(healthy.ws.recv(timeout=5))["type"] == "pong"

    with _ws(url) as ws:
        cases = [
            ("{not json", "bad_request"),
            ("[1, 2]", "bad_request"),
            (json.dumps({"op": "dance"}), "unknown_op"),
            (json.dumps({"op": "subscribe", "channel": "candles", "market": "SILVER_V1"}), "unknown_channel"),
            (json.dumps({"op": "subscribe", "channel": "book", "market": "NOPE_V1"}), "unknown_market"),
        ]
        for text, code in cases:
            ws.send(text)
            assert json.loads(ws.recv(timeout=5))["code"] == code, text
        pause()
        for text, code in [
            (json.dumps({"op": "subscribe", "channel": "book", "market": "SILVER_V1", "depth": 7}), "invalid_depth"),
            (json.dumps({"op": "subscribe", "channel": "book", "market": "SILVER_V1", "interval_ms": 5}),
             "invalid_interval"),
            (json.dumps({"op": "unsubscribe", "channel": "book", "market": "SILVER_V1"}), "not_subscribed"),
            (json.dumps({"op": "subscribe", "channel": "orders", "trader": "0x123"}), "bad_request"),
        ]:
            ws.send(text)
            assert json.loads(ws.recv(timeout=5))["code"] == code, text
        pause()
        for m in ("SILVER_V1", "GOLD_V1", "COPPER_V1"):
            ws.send(json.dumps({"op": "subscribe", "channel": "book", "market": m, "id": m}))
            assert json.loads(ws.recv(timeout=5))["type"] == "subscribed"
            assert json.loads(ws.recv(timeout=5))["type"] == "snapshot"
        ws.send(json.dumps({"op": "subscribe", "channel": "trades", "market": "ALUMINUM_V1", "id": 9}))
        err = json.loads(ws.recv(timeout=5))
        assert (err["code"], err["id"]) == ("too_many_subscriptions", 9)
        pause()
        for _ in range(5):
            ws.send(json.dumps({"op": "ping"}))
        assert [m["type"] for m in _errors(ws, 5)] == ["pong"] * 5
        ws.send(json.dumps({"op": "ping"}))
        assert json.loads(ws.recv(timeout=5))["code"] == "rate_limited"
    for size in (600, 1_000_000):  # just over the limit, and a 1 MB frame: both get the documented error first
        with _ws(url) as ws:
            ws.send("x" * size)
            assert json.loads(ws.recv(timeout=5))["code"] == "message_too_large", size
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=5)
            assert closed.value.rcvd.code == 1009, size
    # The well-behaved client was served throughout and still is.
    healthy.ws.send(json.dumps({"op": "ping", "id": "still-there"}))
    assert json.loads(healthy.ws.recv(timeout=5)) == {"type": "pong", "id": "still-there"}
    healthy.close()


def test_connection_limit_and_idle_timeout(small_limits_service) -> None:  # type: ignore[no-untyped-def]
    _service, url = small_limits_service
    open_ = [_ws(url) for _ in range(4)]
    with _ws(url) as extra:
        assert json.loads(extra.recv(timeout=5))["code"] == "too_many_connections"
        with pytest.raises(ConnectionClosed) as closed:
            extra.recv(timeout=5)
        assert closed.value.rcvd.code == 1008
    for ws in open_:
        ws.close()
    with _ws(url) as idle:
        assert json.loads(idle.recv(timeout=10))["code"] == "idle_timeout"
        with pytest.raises(ConnectionClosed) as closed:
            idle.recv(timeout=5)
        assert closed.value.rcvd.code == 4001


def test_trades_and_orders_channels_carry_the_blocks_events(chain: DevChain, database: str) -> None:
    anvil = chain.anvil
    trader = anvil.w3.eth.accounts[1].lower()
    with running_service(chain, database) as (service, url), _ws(url) as ws:
        ws.send(json.dumps({"op": "subscribe", "channel": "trades", "market": "SILVER_V1"}))
        ws.send(json.dumps({"op": "subscribe", "channel": "orders", "trader": trader}))
        assert [json.loads(ws.recv(timeout=5))["type"] for _ in range(2)] == ["subscribed", "subscribed"]
        start = anvil.w3.eth.block_number + 1
        Simulator(anvil.w3, chain.dep, seed=8, traders=3).run_batches(120, per_block=20)
        wait_until_current(service, chain)
        got = []
        while True:
            try:
                got.append(json.loads(ws.recv(timeout=0.5)))
            except TimeoutError:
                break
    book = anvil.w3.eth.contract(address=Web3.to_checksum_address(chain.dep.gen1_books["SILVER_V1"]),
                                 abi=artifact("OrderBook")["abi"])
    expected = {(e["blockNumber"], e["logIndex"]) for e in book.events.OrderMatched().get_logs(from_block=start)}
    trades = {(m["block"]["number"], m["log_index"]) for m in got if m["type"] == "trade"}
    assert trades == expected and trades
    orders = [m for m in got if m["type"] == "order"]
    assert orders and all(m["trader"] == trader for m in orders)
    assert {m["event"] for m in orders} >= {"open", "fill"}


def test_without_a_head_subscription_the_follower_polls(chain: DevChain, database: str) -> None:
    """An HTTP-only endpoint (no WebSocket upgrade): the subscription fails and polling keeps the book current."""
    from tests.rpc_proxy import RpcProxy

    with RpcProxy(chain.anvil.url, lambda _req, _n: None) as proxy:
        doc = yaml.safe_load(chain.config_path.read_text())
        doc["chain"]["rpc_url"] = proxy.url
        path = chain.config_path.with_name("via-proxy.yaml")
        path.write_text(yaml.safe_dump(doc))
        via = DevChain(chain.anvil, chain.dep, path, load_config(path))
        with running_service(via, database) as (service, url):
            client = BookClient(url, "COPPER_V1", depth=20)
            Simulator(chain.anvil.w3, chain.dep, seed=9).run_batches(100, per_block=20)
            wait_until_current(service, chain)
            client.drain()
            assert service.heads is not None and not service.heads.connected
            assert client.levels() == contract_levels(chain, "COPPER_V1", 20)
            client.close()
