"""Seeded order-flow simulator: makers and takers on many markets, limit and market orders, partial fills,
cancels. The same seed sends the same sequence of intended actions.

Two pacing modes: `mine_every` (tests: automine off, a batch of transactions, then one evm_mine, so blocks carry
many orders) and `rate` (make run: transactions at a steady pace into anvil's interval-mined blocks).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from eth_typing import HexStr
from web3 import Web3
from web3.types import RPCEndpoint

from orderbook_pipelines.devchain.deploy import Deployment, artifact

GAS = 3_000_000
BUY, SELL = 0, 1
MARKET, LIMIT = 0, 1


@dataclass
class _Market:
    metric: str
    gen: int
    address: str
    tick: int
    unit: int
    mid: int
    open_orders: list[tuple[Any, str]] = field(default_factory=list)  # (order id, owner)


@dataclass
class SimStats:
    sent: int = 0
    limit: int = 0
    market: int = 0
    cancels: int = 0
    reverted: int = 0
    blocks: int = 0


class Simulator:
    def __init__(self, w3: Web3, dep: Deployment, seed: int = 7, traders: int = 8):
        self.w3 = w3
        self.rng = random.Random(seed)
        self.traders = [a.lower() for a in w3.eth.accounts[1 : 1 + traders]]
        self.router = w3.eth.contract(address=Web3.to_checksum_address(dep.router), abi=artifact("OrderRouter")["abi"])
        self.gen2_abi = artifact("AluminumOrderBook")["abi"]
        self.markets: list[_Market] = []
        for i, (metric, addr) in enumerate(sorted(dep.gen1_books.items())):
            self.markets.append(_Market(metric, 1, addr, 10**16, 10**18, (100 + 10 * i) * 10**18))
        for i, (metric, addr) in enumerate(sorted(dep.gen2_books.items())):
            self.markets.append(_Market(metric, 2, addr, 10**4, 10**6, (50 + 5 * i) * 10**6))
        self._gen2 = {m.address: w3.eth.contract(address=Web3.to_checksum_address(m.address), abi=self.gen2_abi)
                      for m in self.markets if m.gen == 2}
        self.stats = SimStats()
        self._pending: list[tuple[str, _Market, str]] = []  # tx hash, market, sender

    # -- actions --------------------------------------------------------------------------------------------
    def _tx(self, sender: str, to: str, data: str) -> str:
        resp = self.w3.provider.make_request(RPCEndpoint("eth_sendTransaction"), [
            {"from": sender, "to": to, "data": data, "gas": hex(GAS), "gasPrice": hex(2 * 10**9)}])
        if resp.get("error"):
            raise RuntimeError(f"eth_sendTransaction failed: {resp['error']}")
        self.stats.sent += 1
        return resp["result"]

    def _place(self, m: _Market, trader: str, order_type: int, side: int, qty: int, price: int) -> str:
        if m.gen == 1:
            data = self.router.encode_abi("placeOrder", [m.metric, order_type, side, qty, price])
            return self._tx(trader, self.router.address, data)
        c = self._gen2[m.address]
        if order_type == MARKET:
            data = c.encode_abi("placeMarketOrder", [side, qty])
        else:
            data = c.encode_abi("placeLimitOrder", [side, qty, price])
        return self._tx(trader, c.address, data)

    def _cancel(self, m: _Market, order_id: Any, owner: str) -> str:
        if m.gen == 1:
            return self._tx(owner, self.router.address, self.router.encode_abi("cancelOrder", [order_id]))
        c = self._gen2[m.address]
        return self._tx(owner, c.address, c.encode_abi("cancelOrder", [order_id]))

    def step(self) -> None:
        """One intended action, drawn from the seeded generator."""
        rng = self.rng
        m = rng.choice(self.markets)
        trader = rng.choice(self.traders)
        roll = rng.random()
        m.mid = max(20 * m.tick, m.mid + rng.randint(-2, 2) * m.tick)
        qty = rng.randint(1, 20) * m.unit // 10
        side = rng.randint(0, 1)
        if roll < 0.22 and m.open_orders:
            order_id, owner = m.open_orders.pop(rng.randrange(len(m.open_orders)))
            if self._is_open(m, order_id):
                self._pending.append((self._cancel(m, order_id, owner), m, owner))
                self.stats.cancels += 1
                return
        if roll < 0.35:
            self._pending.append((self._place(m, trader, MARKET, side, qty, 0), m, trader))
            self.stats.market += 1
            return
        offset = rng.randint(-3, 12) * m.tick  # a few cross the spread, most rest
        price = m.mid - offset if side == BUY else m.mid + offset
        self._pending.append((self._place(m, trader, LIMIT, side, qty, max(m.tick, price)), m, trader))
        self.stats.limit += 1

    def _is_open(self, m: _Market, order_id: Any) -> bool:
        if m.gen == 1:
            return self.router.functions.getOrder(order_id).call()[8] == 1
        return self._gen2[m.address].functions.getOrder(order_id).call()[5] == 1

    def settle(self) -> None:
        """Read the receipts of sent transactions: count reverts, remember resting orders for later cancels."""
        placed1 = "0x" + Web3.keccak(text="OrderPlaced(uint256,address,string,uint8,uint8,uint256,uint256)").hex()
        placed2 = "0x" + Web3.keccak(text="OrderPlaced(bytes32,address,uint8,uint256,uint256,uint256)").hex()
        for tx_hash, m, _sender in self._pending:
            r = self.w3.eth.wait_for_transaction_receipt(HexStr(tx_hash), timeout=60)
            if r["status"] != 1:
                self.stats.reverted += 1
                continue
            for lg in r["logs"]:
                t0 = "0x" + lg["topics"][0].hex()
                if t0 == placed1 and int.from_bytes(lg["data"][-32:], "big") > 0:
                    m.open_orders.append((int.from_bytes(lg["topics"][1], "big"), "0x" + lg["topics"][2][-20:].hex()))
                elif t0 == placed2 and int.from_bytes(lg["data"][64:96], "big") > 0:
                    m.open_orders.append((bytes(lg["topics"][1]), "0x" + lg["topics"][2][-20:].hex()))
        self._pending.clear()

    # -- drivers --------------------------------------------------------------------------------------------
    def run_batches(self, orders: int, per_block: int = 40) -> SimStats:
        """Automine off; `per_block` actions then one evm_mine, until `orders` actions were sent."""
        self.w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [False])
        try:
            done = 0
            while done < orders:
                n = min(per_block, orders - done)
                for _ in range(n):
                    self.step()
                done += n
                self.w3.provider.make_request(RPCEndpoint("evm_mine"), [])
                self.stats.blocks += 1
                self.settle()
        finally:
            self.w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [True])
        return self.stats

    def run_forever(self, rate: float, report: Callable[[SimStats], None] | None = None) -> None:
        """Steady pace for `make run`; blocks come from anvil's own interval mining."""
        period = 1.0 / rate
        next_at = time.monotonic()
        last_report = time.monotonic()
        while True:
            self.step()
            if len(self._pending) >= 20:
                self.settle()
            next_at += period
            time.sleep(max(0.0, next_at - time.monotonic()))
            if report and time.monotonic() - last_report > 10:
                self.settle()
                report(self.stats)
                last_report = time.monotonic()
