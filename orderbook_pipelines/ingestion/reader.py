"""Raw logs -> canonical event rows: the one fetch -> decode -> normalize path.

Range ingestion, reconciliation and the live follower all read the chain through an `EventReader`, so they
fetch the same contracts, decode with the same ABIs and resolve markets with the same rule
(chain/normalize.py). A reader is a snapshot of the market registry: reload it when markets change.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sqlalchemy import Connection

from orderbook_pipelines.chain.decoding import DecodedLog, Decoder, Rejected
from orderbook_pipelines.chain.normalize import MarketRegistry, OrderEventRow, OrderMarkets, normalize
from orderbook_pipelines.chain.rpc import BlockHeader, ChainClient
from orderbook_pipelines.config import ProjectConfig
from orderbook_pipelines.storage import registry


def log_addresses(config: ProjectConfig, market_addresses: dict[str, str]) -> dict[str, str]:
    """Every contract whose logs we fetch, mapped to its source."""
    out: dict[str, str] = {}
    for src in config.sources:
        if src.addresses == "markets":
            out.update({a: s for a, s in market_addresses.items() if s == src.name})
        else:
            out.update({a.lower(): src.name for a in src.addresses})
    return out


# Blocks per getLogs call of a pipelined read: small enough that the node serves the next window while this
# process decodes the last one, large enough that a range costs a handful of calls.
READ_WINDOW_BLOCKS = 250


@dataclass
class RangeRead:
    """A range fetched and decoded, the headers of every block it needs, and where the time went."""

    logs: int
    decoded: list[DecodedLog]
    rejected: list[Rejected]
    headers: dict[int, BlockHeader]
    waited_s: float = 0.0  # this thread waiting for the node (logs, then headers)
    decode_s: float = 0.0  # this thread decoding
    blocks: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class EventReader:
    config: ProjectConfig
    sources: dict[str, str]  # contract address -> source name
    decoder: Decoder
    registry: MarketRegistry

    @classmethod
    def load(cls, conn: Connection, config: ProjectConfig, sync_markets: bool = True) -> EventReader:
        """The registry as stored now (after upserting the configured markets, unless told not to)."""
        if sync_markets:
            registry.sync_configured_markets(conn, config)
        cid = config.chain.chain_id
        sources = log_addresses(config, registry.market_addresses(conn, cid))
        return cls(config, sources, Decoder(config, sources), registry.load_registry(conn, cid))

    def reload_registry(self, conn: Connection) -> EventReader:
        """Same contracts and decoder, the markets as stored now (after metric hashes were discovered)."""
        return EventReader(self.config, self.sources, self.decoder,
                           registry.load_registry(conn, self.config.chain.chain_id))

    @property
    def addresses(self) -> list[str]:
        return sorted(self.sources)

    def fetch(self, chain: ChainClient, start: int, end: int) -> list[dict]:
        """Logs of every contract read, blocks [start, end], in chain order."""
        return chain.get_logs(start, end, self.addresses) if self.sources and end >= start else []

    def fetch_block(self, chain: ChainClient, block_hash: str) -> list[dict]:
        """Logs of one block by hash (a reorg cannot mix two forks into one answer)."""
        return chain.get_block_logs(block_hash, self.addresses) if self.sources else []

    def read(self, chain: ChainClient, start: int, end: int, always: set[int],
             window: int = READ_WINDOW_BLOCKS) -> RangeRead:
        """Fetch and decode [start, end] window by window, then the headers of `always` and of every block with a
        log. One thread fetches (the client is used by it alone meanwhile) while this one decodes the previous
        window: the node serves logs while Python decodes, instead of each waiting for the other."""
        out = RangeRead(0, [], [], {}, blocks=set(always))
        if not self.sources or end < start:
            t = time.perf_counter()
            out.headers = chain.headers(sorted(out.blocks))
            out.waited_s = time.perf_counter() - t
            return out

        def fetch(a: int, b: int) -> list[dict]:
            logs = self.fetch(chain, a, b)
            out.blocks.update(int(lg["blockNumber"], 16) for lg in logs)
            return logs

        with ThreadPoolExecutor(1, thread_name_prefix="obp-fetch") as pool:
            parts = [pool.submit(fetch, a, min(end, a + window - 1)) for a in range(start, end + 1, window)]
            headers = pool.submit(lambda: chain.headers(sorted(out.blocks)))  # runs after the last window
            for part in parts:
                t = time.perf_counter()
                logs = part.result()
                t1 = time.perf_counter()
                decoded, rejected = self.decode(logs)
                out.logs += len(logs)
                out.decoded += decoded
                out.rejected += rejected
                out.waited_s += t1 - t
                out.decode_s += time.perf_counter() - t1
            t = time.perf_counter()
            out.headers = headers.result()
            out.waited_s += time.perf_counter() - t
        return out

    def decode(self, logs: list[dict]) -> tuple[list[DecodedLog], list[Rejected]]:
        decoded: list[DecodedLog] = []
        rejected: list[Rejected] = []
        for raw in logs:
            d = self.decoder.decode(raw)
            if isinstance(d, DecodedLog):
                decoded.append(d)
            else:
                rejected.append(d)
        return decoded, rejected

    def rows(self, decoded: list[DecodedLog], order_markets: OrderMarkets | None = None) -> list[OrderEventRow]:
        return normalize(decoded, self.registry, self.config.chain.chain_id, order_markets)
