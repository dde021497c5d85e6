"""Support for the fork scenarios and the process-kill tests: order flow on a chosen branch, the chain's own
answers as the reference (contract views through chain/views.py, raw eth_getLogs), what Postgres holds, and
WebSocket clients that record `reset` snapshots and `reverted` messages.

Nothing here asks the code under test what the right answer is: books come from the contracts' getLevels,
events from the node's logs of the canonical branch."""

from __future__ import annotations

import functools
import json
import random
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import requests
from sqlalchemy import text
from web3 import Web3
from web3.types import RPCEndpoint
from websockets.sync.client import ClientConnection, connect

from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.chain.views import ContractViews
from orderbook_pipelines.devchain.anvil import Anvil
from orderbook_pipelines.devchain.simulator import Simulator
from orderbook_pipelines.storage.db import engine_for
from tests.conftest import DevChain
from tests.live_harness import BookClient

Levels = list[tuple[int, int, int]]  # (price, quantity, orders) best first, as getLevels answers


def wait_for(predicate: Callable[[], bool], what: Callable[[], str] | str, timeout: float = 30,
             step: float = 0.05) -> None:
    """Poll a condition; on timeout fail with `what` (a callable is evaluated then, to show the state)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s: {what() if callable(what) else what}")
        time.sleep(step)


# -- the chain as reference -----------------------------------------------------------------------------------

def barrier(ws: ClientConnection, handle: Callable[[dict[str, Any]], None], timeout: float = 30) -> None:
    """Hand `handle` everything the server queued before now: a ping's pong comes after it on the connection."""
    token = f"barrier-{time.monotonic_ns()}"
    ws.send(json.dumps({"op": "ping", "id": token}))
    deadline = time.monotonic() + timeout
    while True:
        msg = json.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic())))
        if msg.get("type") == "pong" and msg.get("id") == token:
            return
        handle(msg)

class ChainTruth:
    """Contract views and raw logs of one deployment, read straight from the node."""

    def __init__(self, chain: DevChain):
        self.chain = chain
        self.w3 = chain.anvil.w3
        self.session = requests.Session()  # plain JSON-RPC for what is polled: web3's formatters cost CPU
        client = ChainClient(chain.anvil.url)
        by_source = {s.name: ContractViews(client, s.abi_entries) for s in chain.config.sources}
        self.markets: dict[str, tuple[str, ContractViews]] = {}
        for name, addr in chain.dep.gen1_books.items():
            self.markets[name] = (addr, by_source["gen1_book"])
        for name, addr in chain.dep.gen2_books.items():
            self.markets[name] = (addr, by_source["gen2_book"])
        self.addresses = sorted({a.lower() for s in chain.config.sources if isinstance(s.addresses, list)
                                 for a in s.addresses} | {a for a, _ in self.markets.values()})
        # topic0 of every event the configuration maps to kind `trade` (the trades channel's rows)
        self.trade_topics = {
            "0x" + Web3.keccak(text=f"{e['name']}({','.join(i['type'] for i in e['inputs'])})").hex()
            for s in chain.config.sources for e in s.abi_entries
            if e.get("type") == "event" and s.events.get(e["name"]) is not None
            and s.events[e["name"]].kind == "trade"}

    def rpc(self, method: str, *params: Any) -> Any:
        answer = self.session.post(self.chain.anvil.url, json={"jsonrpc": "2.0", "id": 1, "method": method,
                                                               "params": list(params)}, timeout=30).json()
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def head(self) -> tuple[int, str]:
        b = self.rpc("eth_getBlockByNumber", "latest", False)
        return int(b["number"], 16), b["hash"]

    def block_hash(self, number: int) -> str:
        return self.rpc("eth_getBlockByNumber", hex(number), False)["hash"]

    @functools.lru_cache(maxsize=64)  # noqa: B019 - keyed by block number: only ask for blocks that are final
    def levels(self, market: str, block: int, n: int = 100) -> tuple[Levels, Levels]:
        """getLevels of both sides at `block` (cached: callers ask at the head once the chain is quiet, and forget
        the cache when it moves, see `forget`)."""
        addr, views = self.markets[market]
        out = []
        for side in (0, 1):
            prices, qtys, counts = views.call(addr, "getLevels", [side, n], block)
            out.append(list(zip(prices, qtys, counts, strict=True)))
        return out[0], out[1]

    def forget(self) -> None:
        self.levels.cache_clear()

    def logs(self, from_block: int, to_block: int) -> list[dict[str, Any]]:
        if to_block < from_block:
            return []
        return self.rpc("eth_getLogs", {"fromBlock": hex(from_block), "toBlock": hex(to_block),
                                        "address": self.addresses})

    def log_keys(self, from_block: int, to_block: int) -> list[tuple[int, int, str]]:
        """(block, log index, block hash) of every log of the deployment's contracts on the canonical branch."""
        return sorted((int(lg["blockNumber"], 16), int(lg["logIndex"], 16), lg["blockHash"].lower())
                      for lg in self.logs(from_block, to_block))

    def trade_keys(self, from_block: int, to_block: int) -> set[tuple[int, str, int]]:
        """(block, block hash, log index) of every trade log on the canonical branch."""
        return {(int(lg["blockNumber"], 16), lg["blockHash"].lower(), int(lg["logIndex"], 16))
                for lg in self.logs(from_block, to_block) if lg["topics"][0].lower() in self.trade_topics}


# -- what Postgres holds --------------------------------------------------------------------------------------
def stored_log_keys(db: str, chain_id: int, to_block: int) -> list[tuple[int, int, str]]:
    """Every stored log (decoded events and rejected logs) up to `to_block`, duplicates included."""
    with engine_for(db).connect() as conn:
        return sorted(tuple(r) for r in conn.execute(text(  # type: ignore[misc]
            "SELECT block_number, log_index, block_hash FROM order_events WHERE chain_id = :c AND block_number <= :b "
            "UNION ALL SELECT block_number, log_index, block_hash FROM rejected_logs "
            "WHERE chain_id = :c AND block_number <= :b"), {"c": chain_id, "b": to_block}))


def stored_levels(db: str, address: str) -> tuple[Levels, Levels]:
    """A market's resting orders in the orders projection, as levels (price, remaining, orders), best first."""
    with engine_for(db).connect() as conn:
        rows = conn.execute(text(
            "SELECT o.side, o.price, sum(o.remaining), count(*) FROM orders o JOIN markets m USING (market_id) "
            "WHERE m.address = :a AND o.status IN ('open', 'partially_filled') AND o.remaining > 0 "
            "GROUP BY o.side, o.price"), {"a": address}).all()
    bids = sorted(((int(p), int(q), int(c)) for s, p, q, c in rows if s == 0), key=lambda x: -x[0])
    asks = sorted((int(p), int(q), int(c)) for s, p, q, c in rows if s == 1)
    return bids, asks


# -- order flow on a branch -----------------------------------------------------------------------------------
def mine_branch(anvil: Anvil, chain: DevChain, rng: random.Random, length: int, tag: int,
                busy_blocks: int = 2, orders: tuple[int, int] = (1, 4)) -> None:
    """`length` blocks on top of the current head. The first block always carries a marker transaction whose value
    is `tag` (different per branch, so a replacement block never equals the block it replaces) and a few orders;
    up to `busy_blocks` - 1 more blocks carry orders, the others are empty (anvil_mine)."""
    if length <= 0:
        return
    sim = Simulator(anvil.w3, chain.dep, seed=rng.getrandbits(32), traders=3)
    busy = {0} | set(rng.sample(range(1, length), min(busy_blocks - 1, length - 1)))
    marker = anvil.w3.eth.accounts[0]
    empty = 0
    for offset in range(length):
        if offset not in busy:
            empty += 1
            continue
        if empty:
            anvil.mine(empty)
            empty = 0
        anvil.w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [False])
        try:
            if offset == 0:
                anvil.rpc("eth_sendTransaction", {"from": marker, "to": marker, "value": hex(tag)})
            for _ in range(rng.randint(*orders)):
                sim.step()
            anvil.rpc("evm_mine")
        finally:
            anvil.w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [True])
        sim.settle()
    if empty:
        anvil.mine(empty)


# -- WebSocket clients ----------------------------------------------------------------------------------------
class ResetBookClient(BookClient):
    """The reference book client (sync rule, checksums), also counting `reset` snapshots."""

    PING_EVERY_S = 20.0  # as a real client does: the server closes a connection silent for 60 s (idle_timeout)

    def __init__(self, url: str, market: str, depth: int = 100, interval_ms: int = 0):
        self.resets = 0
        self.sent_at = time.monotonic()
        super().__init__(url, market, depth, interval_ms)

    def handle(self, msg: dict[str, Any]) -> None:
        if msg.get("type") == "snapshot" and msg.get("reset") and msg.get("market") == self.market:
            self.resets += 1
        super().handle(msg)

    def barrier(self, timeout: float = 30) -> None:
        barrier(self.ws, self.handle, timeout)

    def pump(self, until: Callable[[], bool], timeout: float = 30) -> bool:
        """Read frames until `until()` holds (True) or the timeout passes (False)."""
        deadline = time.monotonic() + timeout
        while not until():
            now = time.monotonic()
            if now > deadline:
                return False
            if now - self.sent_at > self.PING_EVERY_S:  # long waits on a loaded machine outlast the idle timeout
                self.ws.send(json.dumps({"op": "ping"}))
                self.sent_at = now
            with suppress(TimeoutError):
                self.on_frame(self.ws.recv(timeout=0.05))
        return True


class RowsClient:
    """Subscribed to the trades of `markets` and the orders of `traders`; keeps every message in order."""

    def __init__(self, url: str, markets: list[str], traders: list[str]):
        self.ws: ClientConnection = connect(f"ws://{url}/ws", max_size=2**22)
        self.messages: list[dict[str, Any]] = []
        subs = [{"channel": "trades", "market": m} for m in markets] + [
            {"channel": "orders", "trader": t} for t in traders]
        for s in subs:
            self.ws.send(json.dumps({"op": "subscribe", **s}))
        got = 0
        while got < len(subs):
            msg = json.loads(self.ws.recv(timeout=10))
            assert msg["type"] == "subscribed", msg
            got += 1

    def barrier(self, timeout: float = 30) -> None:
        barrier(self.ws, self._keep, timeout)

    def _keep(self, msg: dict[str, Any]) -> None:
        assert msg.get("type") != "error", msg
        self.messages.append(msg)

    def reverted(self, since: int = 0) -> list[int]:
        return [m["from_block"] for m in self.messages[since:] if m["type"] == "reverted"]

    def effective(self, kind: str) -> list[dict[str, Any]]:
        """Messages of `kind` that no later `reverted` voided: what a client following the protocol keeps."""
        kept: list[dict[str, Any]] = []
        for m in self.messages:
            if m["type"] == "reverted":
                kept = [k for k in kept if k["block"]["number"] < m["from_block"]]
            elif m["type"] == kind:
                kept.append(m)
        return kept

    def close(self) -> None:
        self.ws.close()


class Gate:
    """A fault hook for tests/rpc_proxy.RpcProxy: can hold every request (`close`/`open`) and run an action once, at
    the first ranged eth_getLogs (a cold start's catch-up: the follower's per-block reads go by block hash), either
    before that request reaches the node or after the node answered it (then the answer is relayed as it was)."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self.action: Callable[[], None] | None = None
        self.after_response = False
        self.upstream = ""
        self.fired = threading.Event()

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    def arm(self, action: Callable[[], None], after_response: bool = False, upstream: str = "") -> None:
        self.fired.clear()
        self.action, self.after_response, self.upstream = action, after_response, upstream

    def __call__(self, req: dict, _n: int) -> tuple[int, dict] | None:
        self._open.wait(60)
        if req["method"] != "eth_getLogs" or "fromBlock" not in (req.get("params") or [{}])[0]:
            return None
        with self._lock:
            action, self.action = self.action, None
            if action is None:
                return None
            answer = None
            if self.after_response:
                answer = requests.post(self.upstream, json=req, timeout=30).json()
            action()
            self.fired.set()
        if answer is None:
            return None
        return 200, {k: v for k, v in answer.items() if k in ("result", "error")}
