"""The Pusher Channels endpoint with the real pusher-js client (node build, tests/pusher/client.cjs) on a dev chain.

pusher-js connects by host settings only, subscribes to a market channel and to a trader's public and private
channels, and receives the events of orders placed, filled and cancelled through two reorgs: its book (kept
from price-update alone) ends equal to the contract's getLevels, and the trader's events on surviving blocks
are exactly the trader's logs on the chain. Bad inputs get Pusher's error codes, and the per-client limits of
our own WebSocket apply.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_utils import keccak
from web3 import Web3
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from orderbook_pipelines.config import PROJECT_ROOT, Pusher
from orderbook_pipelines.devchain.deploy import artifact
from orderbook_pipelines.devchain.simulator import Simulator
from orderbook_pipelines.live.hub import Limits
from tests.conftest import Anvil, DevChain, make_devchain
from tests.live_harness import running_service, wait_until_current

CLIENT = PROJECT_ROOT / "tests" / "pusher" / "client.cjs"
SECRET = "test-pusher-secret"
TOKEN = "test-pusher-auth-token"
KEY = "obp-dev"
LEVELS = 50  # pusher.price_levels default

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (PROJECT_ROOT / "node_modules" / "pusher-js").exists(),
    reason="node and node_modules/pusher-js (npm ci) are needed")

# The trader-side events of both contract generations (trader indexed as topic 2 in each).
TRADER_EVENTS = {
    "placed": ["OrderPlaced(uint256,address,string,uint8,uint8,uint256,uint256)",
               "OrderPlaced(bytes32,address,uint8,uint256,uint256,uint256)"],
    "filled": ["OrderExecuted(uint256,address,uint256,uint256,uint256)",
               "OrderFilled(bytes32,address,address,uint256,uint256,uint256)"],
    "cancelled": ["OrderCancelled(uint256,address,uint256)", "OrderCancelled(bytes32,address,uint256)"],
}


@pytest.fixture
def chain(anvil_factory: type[Anvil], tmp_path: Path) -> DevChain:
    return make_devchain(anvil_factory(), tmp_path, ["SILVER_V1", "GOLD_V1"], ["ALUMINUM_V1"], confirmations=2,
                         range_size=25)


@pytest.fixture
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OBP_PUSHER_SECRET", SECRET)
    monkeypatch.setenv("OBP_PUSHER_AUTH_TOKEN", TOKEN)


def contract_levels(chain: DevChain, market: str, depth: int) -> tuple[list[list[str]], list[list[str]]]:
    c = chain.anvil.w3.eth.contract(address=Web3.to_checksum_address(chain.dep.gen1_books[market]),
                                    abi=artifact("OrderBook")["abi"])
    out = []
    for side in (0, 1):
        prices, qtys, _counts = c.functions.getLevels(side, depth).call()
        out.append([[str(p), str(q)] for p, q in zip(prices, qtys, strict=True)])
    return out[0], out[1]


class NodeClient:
    """tests/pusher/client.cjs as a subprocess: every line it prints, parsed, in `lines`."""

    def __init__(self, url: str, channels: list[str], bad_auth_channel: str | None = None):
        host, port = url.split(":")
        opts = {"key": KEY, "host": host, "port": int(port), "authEndpoint": f"http://{url}/pusher/auth",
                "authToken": TOKEN, "channels": channels, "badAuthChannel": bad_auth_channel}
        self.proc = subprocess.Popen(["node", str(CLIENT), json.dumps(opts)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=PROJECT_ROOT)
        self.lines: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(json.loads(line))
                self.cond.notify_all()

    def wait(self, what: str, pred: Callable[[list[dict[str, Any]]], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred(self.lines):
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    err = self.proc.stderr.read() if self.proc.poll() is not None and self.proc.stderr else ""
                    raise AssertionError(f"timed out waiting for {what}; last lines: {self.lines[-5:]}; {err}")
                self.cond.wait(min(left, 0.5))

    def events(self, channel: str, *names: str) -> list[dict[str, Any]]:
        with self.cond:
            return [ln for ln in self.lines if ln["t"] == "event" and ln["channel"] == channel
                    and (not names or ln["event"] in names)]

    def report(self) -> dict[str, Any]:
        n = sum(1 for ln in self.lines if ln["t"] == "report")
        self.send("report")
        self.wait("report", lambda ls: sum(1 for ln in ls if ln["t"] == "report") > n)
        return [ln for ln in self.lines if ln["t"] == "report"][-1]

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.send("quit")
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def trader_logs(chain: DevChain, trader: str, start: int) -> dict[tuple[str, int], str]:
    """(tx, log index) -> placed|filled|cancelled of every trader-side log of `trader` now on the chain."""
    w3 = chain.anvil.w3
    kind_of = {"0x" + keccak(text=sig).hex(): kind for kind, sigs in TRADER_EVENTS.items() for sig in sigs}
    addresses = [Web3.to_checksum_address(a) for a in [chain.dep.router, *chain.dep.gen2_books.values()]]
    logs = w3.eth.get_logs({"fromBlock": start, "toBlock": "latest", "address": addresses,
                            "topics": [list(kind_of), None, "0x" + "00" * 12 + trader[2:]]})
    return {(lg["transactionHash"].to_0x_hex(), lg["logIndex"]): kind_of[lg["topics"][0].to_0x_hex()]
            for lg in logs}


def test_pusher_js_follows_markets_and_a_trader_through_reorgs(chain: DevChain, database: str,
                                                              secrets_env: None) -> None:
    anvil = chain.anvil
    w3 = anvil.w3
    trader = w3.eth.accounts[1].lower()  # the simulator's first trader
    market, user, private = "market-SILVER_V1", f"user-{trader}", f"private-user-{trader}"
    Simulator(w3, chain.dep, seed=31, traders=3).run_batches(60, per_block=15)  # a book before the service
    with running_service(chain, database) as (service, url):
        wait_until_current(service, chain)
        node = NodeClient(url, [market, user, private], bad_auth_channel=private)
        try:
            node.wait("three subscriptions and a refused one", lambda ls: {
                ln["channel"] for ln in ls if ln["t"] == "subscribed" and ln["client"] == "main"} == {
                market, user, private} and any(ln["t"] == "subscription_error" for ln in ls))
            refused = next(ln for ln in node.lines if ln["t"] == "subscription_error")
            assert (refused["client"], refused["channel"], refused["error"]["status"]) == ("bad", private, 401)
            bad_errors = [ln["error"] for ln in node.lines if ln["t"] == "error" and ln["client"] == "bad"]
            assert any(e.get("code") == 4009 for e in bad_errors), bad_errors
            assert not any(ln["t"] == "subscribed" and ln["client"] == "bad" for ln in node.lines)
            node.wait("the book on subscribe", lambda _: bool(node.events(market, "price-update")))
            assert node.events(market, "price-update")[0]["data"]["reason"] == "subscribe"

            start = w3.eth.block_number + 1
            Simulator(w3, chain.dep, seed=32, traders=3).run_batches(150, per_block=15)
            for round_ in range(2):
                snapshot = anvil.rpc("evm_snapshot")
                Simulator(w3, chain.dep, seed=40 + round_, traders=3).run_batches(60, per_block=15)
                wait_until_current(service, chain)
                anvil.rpc("evm_revert", snapshot)  # a different, longer branch replaces those blocks
                Simulator(w3, chain.dep, seed=50 + round_, traders=3).run_batches(90, per_block=15)
            wait_until_current(service, chain)
            assert service.follower.stats.reorgs >= 2

            expected = contract_levels(chain, "SILVER_V1", LEVELS)
            deadline = time.monotonic() + 30
            while (book := node.report()["books"].get(market)) is None or (book["bids"], book["asks"]) != expected:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.3)
            assert book is not None and (book["bids"], book["asks"]) == expected
            assert len(expected[0]) > 3 and len(expected[1]) > 3

            # The market channel: a reorg event, then the corrected book, for every rollback.
            stream = node.events(market)
            reorgs = [i for i, ln in enumerate(stream) if ln["event"] == "reorg"]
            assert len(reorgs) >= 2, [ln["event"] for ln in stream][-20:]
            for i in reorgs:
                assert isinstance(stream[i]["data"]["fromBlock"], int)
                assert stream[i + 1]["event"] == "price-update" and stream[i + 1]["data"]["reason"] == "reorg"
            assert {ln["event"] for ln in stream} >= {"order-update", "order-cancelled", "trading-event"}

            # Trades on surviving blocks are exactly the market's trades on the chain.
            book_c = w3.eth.contract(address=Web3.to_checksum_address(chain.dep.gen1_books["SILVER_V1"]),
                                     abi=artifact("OrderBook")["abi"])
            chain_trades = {(e["transactionHash"].to_0x_hex(), e["logIndex"])
                            for e in book_c.events.OrderMatched().get_logs(from_block=start)}
            canonical = _canonical(w3)
            got_trades = {(ln["data"]["tx"], ln["data"]["logIndex"]) for ln in stream
                          if ln["event"] == "trading-event" and canonical(ln["data"]["block"])
                          and ln["data"]["block"]["number"] >= start}
            assert got_trades == chain_trades and chain_trades

            # The trader's channel: on surviving blocks, exactly the trader's logs; events of replaced blocks are
            # followed by a reorg whose fromBlock voids them and which lists their orders' corrected state.
            for channel in (user, private):
                events = node.events(channel)
                orders = [ln for ln in events if ln["event"] in ("order-update", "order-cancelled")]
                assert orders and all(ln["data"]["trader"] == trader for ln in orders)
                got = {(ln["data"]["tx"], ln["data"]["logIndex"]): ln["data"]["event"] for ln in orders
                       if canonical(ln["data"]["block"]) and ln["data"]["block"]["number"] >= start}
                assert got == trader_logs(chain, trader, start), channel
                assert set(got.values()) == {"placed", "filled", "cancelled"}
                replaced = 0
                for i, ln in enumerate(events):
                    if ln["event"] != "reorg" and not canonical(ln["data"]["block"]):
                        replaced += 1
                        voids = [r for r in events[i + 1:] if r["event"] == "reorg"
                                 and r["data"]["fromBlock"] <= ln["data"]["block"]["number"]]
                        assert voids, ln
                        assert ln["data"]["orderId"] in {o["orderId"] for o in voids[0]["data"]["orders"]}
                assert replaced > 0, "no event of a replaced block reached the trader: the reorg went untested"
                for ln in orders:  # amounts are exact integers as decimal strings
                    d = ln["data"]
                    for k in ("quantity", "filled", "remaining", "price"):
                        assert d[k] is None or re.fullmatch(r"\d+", d[k]), (k, d)
                    if d["quantity"] is not None and d["status"] in ("open", "partially_filled"):
                        assert int(d["filled"]) + int(d["remaining"]) == int(d["quantity"]), d
            assert len(node.events(user)) == len(node.events(private))
        finally:
            node.close()


def _canonical(w3: Web3) -> Callable[[dict[str, Any]], bool]:
    cache: dict[int, str] = {}

    def on_chain(block: dict[str, Any]) -> bool:
        n = block["number"]
        if n not in cache:
            cache[n] = w3.eth.get_block(n)["hash"].to_0x_hex()
        return cache[n] == block["hash"]

    return on_chain


# -- bad inputs and limits, at the protocol level (messages pusher-js would never send) ------------------------

@pytest.fixture
def strict_service(chain: DevChain, database: str, secrets_env: None) -> Iterator[str]:
    """Small limits and private user channels required."""
    cfg = chain.config.model_copy(update={"pusher": Pusher(private_user_channels=True)})
    strict = DevChain(chain.anvil, chain.dep, chain.config_path, cfg)
    limits = Limits(max_subscriptions=3, max_connections_per_client=4, max_message_bytes=512,
                    messages_per_second=50, idle_timeout_s=2)
    with running_service(strict, database, limits) as (service, url):
        wait_until_current(service, chain)
        yield url


def _open(url: str, path: str = f"/app/{KEY}?protocol=7&client=js&version=8.6.0") -> ClientConnection:
    return connect(f"ws://{url}{path}", max_size=2**22)


def _recv(ws: ClientConnection) -> dict[str, Any]:
    msg = json.loads(ws.recv(timeout=5))
    if isinstance(msg.get("data"), str):
        msg["data"] = json.loads(msg["data"])
    return msg


def _established(ws: ClientConnection) -> str:
    msg = _recv(ws)
    assert msg["event"] == "pusher:connection_established", msg
    assert re.fullmatch(r"\d+\.\d+", msg["data"]["socket_id"]) and msg["data"]["activity_timeout"] == 30
    return str(msg["data"]["socket_id"])


def _sign(socket_id: str, channel: str) -> str:
    """Pusher's signature, written independently of the server code."""
    return KEY + ":" + hmac.new(SECRET.encode(), f"{socket_id}:{channel}".encode(), hashlib.sha256).hexdigest()


def _closed_with(ws: ClientConnection, code: int) -> None:
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            ws.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == code


def test_bad_requests_get_pushers_error_codes(strict_service: str, chain: DevChain) -> None:
    url = strict_service
    trader = chain.anvil.w3.eth.accounts[1].lower()
    for path, code in [("/app/wrong-key?protocol=7", 4001), (f"/app/{KEY}", 4008),
                       (f"/app/{KEY}?protocol=6", 4007), (f"/app/{KEY}?protocol=seven", 4006)]:
        with _open(url, path) as ws:
            msg = _recv(ws)
            assert (msg["event"], msg["data"]["code"]) == ("pusher:error", code), path
            _closed_with(ws, code)
    with _open(url) as ws:
        socket_id = _established(ws)
        ws.send(json.dumps({"event": "pusher:ping", "data": {}}))
        assert _recv(ws)["event"] == "pusher:pong"
        cases: list[tuple[Any, str, int | None]] = [
            ("{not json", "bad_request", None),
            ({"event": "pusher:subscribe", "data": {}}, "bad_request", None),  # malformed: no channel
            ({"event": "pusher:subscribe", "data": "[1]"}, "bad_request", None),
            ({"event": "pusher:subscribe"}, "bad_request", None),
            ({"event": "pusher:subscribe", "data": {"channel": "orders-SILVER_V1"}}, "unknown_channel", 404),
            ({"event": "pusher:subscribe", "data": {"channel": "market-NOPE_V1"}}, "unknown_channel", 404),
            ({"event": "pusher:subscribe", "data": {"channel": "presence-x"}}, "unknown_channel", 404),
            ({"event": "pusher:subscribe", "data": {"channel": f"user-{trader}"}}, "unauthorized", 403),
            ({"event": "pusher:subscribe", "data": {"channel": f"private-user-{trader}",
                                                    "auth": KEY + ":" + "0" * 64}}, "unauthorized", 401),
            ({"event": "pusher:subscribe", "data": {"channel": f"private-user-{trader}",
                                                    "auth": _sign("1.1", f"private-user-{trader}")}},
             "unauthorized", 401),  # signed for another socket
            ({"event": "client-hello", "channel": "market-SILVER_V1", "data": {}}, "unknown_event", None),
        ]
        for req, reason, status in cases:
            ws.send(req if isinstance(req, str) else json.dumps(req))
            err = _recv(ws)
            expected_code = 4009 if reason == "unauthorized" else 4300
            assert (err["event"], err["data"]["reason"], err["data"]["code"]) == ("pusher:error", reason,
                                                                                   expected_code), req
            if status is not None:
                sub = _recv(ws)
                assert sub["event"] == "pusher:subscription_error" and sub["data"]["status"] == status, sub
                assert sub["channel"] == req["data"]["channel"]  # type: ignore[index]
        # Subscriptions: a signed private channel and two markets fill the 3 allowed; a fourth is refused.
        channel = f"private-user-{trader}"
        ws.send(json.dumps({"event": "pusher:subscribe", "data": {"channel": channel,
                                                                    "auth": _sign(socket_id, channel)}}))
        assert _recv(ws) == {"event": "pusher_internal:subscription_succeeded", "channel": channel, "data": {}}
        for m in ("SILVER_V1", "GOLD_V1"):
            ws.send(json.dumps({"event": "pusher:subscribe", "data": {"channel": f"market-{m}"}}))
            assert _recv(ws)["event"] == "pusher_internal:subscription_succeeded"
            book = _recv(ws)
            assert (book["event"], book["channel"]) == ("price-update", f"market-{m}")
            assert book["data"]["bids"] == contract_levels(chain, m, LEVELS)[0]
        ws.send(json.dumps({"event": "pusher:subscribe", "data": {"channel": "market-ALUMINUM_V1"}}))
        err = _recv(ws)
        assert (err["data"]["reason"], err["data"]["code"]) == ("too_many_subscriptions", 4300)
        assert _recv(ws)["data"]["status"] == 429
        ws.send(json.dumps({"event": "pusher:unsubscribe", "data": {"channel": "market-GOLD_V1"}}))
        ws.send(json.dumps({"event": "pusher:subscribe", "data": {"channel": "market-ALUMINUM_V1"}}))
        assert _recv(ws)["event"] == "pusher_internal:subscription_succeeded"
        assert _recv(ws)["event"] == "price-update"
        ws.send("x" * 600)  # over the 512-byte message limit
        err = _recv(ws)
        assert (err["event"], err["data"]["reason"], err["data"]["code"]) == ("pusher:error", "message_too_large",
                                                                               4300)
        _closed_with(ws, 4300)


def test_connection_limit_and_keepalive_are_the_websockets(strict_service: str) -> None:
    url = strict_service
    held = [_open(url) for _ in range(4)]
    for ws in held:
        _established(ws)
    with _open(url) as extra:
        err = _recv(extra)
        assert (err["data"]["reason"], err["data"]["code"]) == ("too_many_connections", 4100)
        _closed_with(extra, 4100)
    for ws in held:
        ws.close()
    with _open(url) as ws:
        _established(ws)
        assert _recv(ws)["event"] == "pusher:ping"  # idle for 2 s: probed, not closed
        ws.send(json.dumps({"event": "pusher:pong", "data": {}}))
        assert _recv(ws)["event"] == "pusher:ping"
        err = _recv(ws)  # no answer to this one: closed as Pusher does
        assert (err["data"]["reason"], err["data"]["code"]) == ("idle_timeout", 4201)
        _closed_with(ws, 4201)


def test_auth_endpoint_signs_private_user_channels_for_the_token_holder(strict_service: str,
                                                                       chain: DevChain) -> None:
    url = strict_service
    channel = f"private-user-{chain.anvil.w3.eth.accounts[2].lower()}"
    good = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.post(f"http://{url}/pusher/auth", data={"socket_id": "123.456", "channel_name": channel},
                   headers=good)
    assert r.status_code == 200 and r.json() == {"auth": _sign("123.456", channel)}
    for headers, body, status, parameter in [
        ({"Authorization": "Bearer wrong"}, {"socket_id": "123.456", "channel_name": channel}, 403, None),
        ({}, {"socket_id": "123.456", "channel_name": channel}, 403, None),
        (good, {"socket_id": "abc", "channel_name": channel}, 400, "socket_id"),
        (good, {"socket_id": "1.2", "channel_name": channel.removeprefix("private-")}, 400, "channel_name"),
        (good, {"socket_id": "1.2", "channel_name": "private-market-SILVER_V1"}, 400, "channel_name"),
    ]:
        r = httpx.post(f"http://{url}/pusher/auth", data=body, headers=headers)
        assert r.status_code == status and r.json()["error"]["parameter"] == parameter, (body, r.text)
