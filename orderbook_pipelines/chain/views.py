"""Contract view functions (bestBid, getLevels, getOrder, ...) called at a block through the one RPC client.

The ABI comes from configuration, like the events': the contracts are not ours and their views are the
independent reference the book checks compare with.
"""

from __future__ import annotations

from typing import Any

from eth_hash.auto import keccak

from orderbook_pipelines.chain.decoding import canonical_type
from orderbook_pipelines.chain.rpc import ChainClient, RpcError


class NoContractCode(RpcError):
    """The view returned nothing: no contract at that address yet at that block."""


class ContractViews:
    """eth_call of view functions described by a configured ABI, at a given block, through the ChainClient."""

    def __init__(self, chain: ChainClient, abi: list[dict]):
        self.chain = chain
        self.fns = {e["name"]: e for e in abi if e.get("type") == "function"}

    def has(self, *names: str) -> bool:
        return all(n in self.fns for n in names)

    def outputs(self, name: str) -> list[str]:
        return [o.get("name", "") for o in self.fns[name]["outputs"]]

    def call(self, address: str, name: str, args: list[Any], block: int) -> tuple:
        # eth_abi on first use: importing it (with eth_utils and its grammar) costs every Dagster run process and
        # the code server ~0.15 s at start, and most runs never call a view.
        from eth_abi import decode as abi_decode
        from eth_abi import encode as abi_encode

        fn = self.fns[name]
        in_types = [canonical_type(i) for i in fn["inputs"]]
        data = keccak(f"{name}({','.join(in_types)})".encode())[:4] + abi_encode(in_types, args)
        out = self.chain.call("eth_call", [{"to": address, "data": "0x" + data.hex()}, hex(block)])
        if out in (None, "0x"):
            raise NoContractCode(f"{address} has no code (or returned nothing) for {name} at block {block}")
        return tuple(abi_decode([canonical_type(o) for o in fn["outputs"]], bytes.fromhex(out[2:])))
