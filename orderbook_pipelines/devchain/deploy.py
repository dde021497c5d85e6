"""Deploy the reference contracts to a dev chain and write the project configuration that indexes them.

The written YAML is the same shape production uses: ABIs by file, addresses, event mapping. Nothing about the
reference contracts is known to the indexer except through it.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml
from web3 import Web3
from web3.contract import Contract
from web3.providers.rpc import HTTPProvider
from web3.types import TxParams

from orderbook_pipelines.config import PROJECT_ROOT

ARTIFACTS = PROJECT_ROOT / "contracts" / "artifacts"
GAS = 8_000_000


def artifact(name: str) -> dict[str, Any]:
    return json.loads((ARTIFACTS / f"{name}.json").read_text())


def _reason(exc: Exception) -> str:
    """The transport error in a few words (requests nests the useful part three exceptions deep)."""
    text = str(exc)
    if "Connection refused" in text or "NewConnectionError" in text:
        return f"{type(exc).__name__} (connection refused)"
    return f"{type(exc).__name__}: {text.splitlines()[0][:120] if text else ''}"


class ChainUnavailable(RuntimeError):
    """No node answered at the URL within the wait: names the URL, the wait and the last error."""


def wait_for_chain(rpc_url: str, timeout_s: float = 60.0,
                   progress: Callable[[str], None] | None = None) -> Web3:
    """A Web3 on a node that answers; waits because `make run` starts the chain and its users together.

    `progress` hears a line about every 3 s while waiting, so a wrong URL is seen long before the wait ends.
    """
    w3 = Web3(HTTPProvider(rpc_url, request_kwargs={"timeout": min(10.0, max(1.0, timeout_s))}))
    start = time.monotonic()
    next_note = start + 3.0
    while True:
        try:
            w3.eth.block_number  # noqa: B018 - probe
            return w3
        except Exception as exc:  # any transport failure means "not up yet"
            now = time.monotonic()
            if now - start >= timeout_s:
                raise ChainUnavailable(f"no chain answered at {rpc_url} within {timeout_s:.0f} s "
                                       f"(eth_blockNumber every 0.25 s); last error: {_reason(exc)}") from exc
            if progress is not None and now >= next_note:
                progress(f"waiting for a chain at {rpc_url} ({now - start:.0f} s of {timeout_s:.0f} s): "
                         f"{type(exc).__name__}")
                next_note = now + 3.0
            time.sleep(0.25)


def send(w3: Web3, sender: str, tx: dict[str, Any]) -> dict[str, Any]:
    """Send from an unlocked dev account and wait for the receipt; a revert is an error here."""
    tx_hash = w3.eth.send_transaction(cast(TxParams, {"from": sender, "gas": GAS, **tx}))
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60)
    if receipt["status"] != 1:
        raise RuntimeError(f"transaction {tx_hash.hex()} reverted")
    return dict(receipt)


def deploy_contract(w3: Web3, sender: str, name: str, *args: Any) -> Contract:
    art = artifact(name)
    factory = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
    receipt = send(w3, sender, {"data": factory.constructor(*args).build_transaction({"from": sender,
                                                                                      "gas": GAS})["data"]})
    return w3.eth.contract(address=receipt["contractAddress"], abi=art["abi"])


@dataclass
class Deployment:
    rpc_url: str
    chain_id: int
    start_block: int
    router: str
    gen1_books: dict[str, str] = field(default_factory=dict)
    gen2_books: dict[str, str] = field(default_factory=dict)


def deploy(rpc_url: str, gen1_markets: list[str], gen2_markets: list[str], wait_s: float = 60.0,
           progress: Callable[[str], None] | None = None) -> Deployment:
    w3 = wait_for_chain(rpc_url, wait_s, progress)
    owner = w3.eth.accounts[0]
    start = w3.eth.block_number + 1
    router = deploy_contract(w3, owner, "OrderRouter")
    dep = Deployment(rpc_url, w3.eth.chain_id, start, router.address.lower())
    for metric in gen1_markets:
        book = deploy_contract(w3, owner, "OrderBook", metric, router.address)
        send(w3, owner, {"to": router.address, "data": router.encode_abi("registerMarket", [metric, book.address])})
        dep.gen1_books[metric] = book.address.lower()
    for metric in gen2_markets:
        book = deploy_contract(w3, owner, "AluminumOrderBook", metric)
        dep.gen2_books[metric] = book.address.lower()
    return dep


def deploy_multicaller(w3: Web3, router: str, owner: str | None = None) -> Contract:
    """The reference batcher (contracts/src/gen1/MultiMarketCaller.sol) for a deployed router. It is not indexed:
    the router's events are, with the batcher as their trader. Only `owner` (default: the first dev account) may
    call it."""
    owner = owner or w3.eth.accounts[0]
    return deploy_contract(w3, owner, "MultiMarketCaller", Web3.to_checksum_address(router))


# How the generation-1 router's events map onto canonical kinds (its events carry no market address: the
# metric hash names the market of OrderPlaced; fills and cancels take the market of their order: the `tx` rule
# of chain/normalize.py, where the transaction decides only for an unknown order in a single-market transaction).
GEN1_ROUTER_EVENTS: dict[str, Any] = {
    "OrderPlaced": {"kind": "open", "market": "metric_hash:metricId",
                    "fields": {"order_id": "orderId", "trader": "trader", "side": "side", "order_type": "orderType",
                               "quantity": "quantity", "price": "price"}},
    "OrderExecuted": {"kind": "fill", "market": "tx",
                      "fields": {"order_id": "orderId", "trader": "trader", "quantity": "executedQuantity",
                                 "price": "executedPrice"}},
    "OrderCancelled": {"kind": "cancel", "market": "tx",
                       "fields": {"order_id": "orderId", "trader": "trader", "quantity": "remainingQuantity"}},
}


def project_config(dep: Deployment, confirmations: int = 2, range_size: int = 100) -> dict[str, Any]:
    """The indexer configuration for a deployment: generation 1 and 2 mapped onto canonical kinds."""
    art = "contracts/artifacts"
    return {
        "chain": {
            "rpc_url": dep.rpc_url,
            "chain_id": dep.chain_id,
            "start_block": dep.start_block,
            "finality": "depth",
            "confirmations": confirmations,
            "range_size": range_size,
        },
        "sources": [
            {
                "name": "gen1_router",
                "abi": f"{art}/OrderRouter.json",
                "addresses": [dep.router],
                "events": copy.deepcopy(GEN1_ROUTER_EVENTS),
            },
            {
                "name": "gen1_book",
                "abi": f"{art}/OrderBook.json",
                "addresses": "markets",
                "events": {
                    "OrderMatched": {"kind": "trade",
                                     "fields": {"buy_order_id": "buyOrderId", "sell_order_id": "sellOrderId",
                                                "price": "price", "quantity": "quantity", "buyer": "buyer",
                                                "seller": "seller"}},
                    "OrderAdded": {"kind": "book_add", "fields": {"order_id": "orderId", "price": "price",
                                                                  "side": "side", "quantity": "quantity"}},
                    "OrderRemoved": {"kind": "book_remove", "fields": {"order_id": "orderId", "price": "price",
                                                                       "side": "side"}},
                },
            },
            {
                "name": "gen2_book",
                "abi": f"{art}/AluminumOrderBook.json",
                "addresses": "markets",
                "events": {
                    "OrderPlaced": {"kind": "open", "fields": {"order_id": "orderId", "trader": "user",
                                                               "side": "side", "quantity": "size",
                                                               "price": "price"}},
                    "OrderCancelled": {"kind": "cancel", "fields": {"order_id": "orderId", "trader": "user"}},
                    "OrderFilled": {"kind": "fill", "fields": {"order_id": "orderId", "trader": "taker",
                                                               "counterparty": "maker", "quantity": "size",
                                                               "price": "price"}},
                    "TradeExecuted": {"kind": "trade", "fields": {"buyer": "buyer", "seller": "seller",
                                                                  "quantity": "size", "price": "price"}},
                },
            },
        ],
        "markets": [
            *({"metric_id": m, "source": "gen1_book", "address": a, "decimals": 18}
              for m, a in dep.gen1_books.items()),
            *({"metric_id": m, "source": "gen2_book", "address": a, "decimals": 6}
              for m, a in dep.gen2_books.items()),
        ],
    }


def write_config(doc: dict[str, Any], path: Path) -> None:
    """Atomic write: readers waiting for the file never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(path)
