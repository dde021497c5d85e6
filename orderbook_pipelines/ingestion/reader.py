"""Raw logs -> canonical event rows: the one fetch -> decode -> normalize path.

Range ingestion, reconciliation and the live follower all read the chain through an `EventReader`, so they
fetch the same contracts, decode with the same ABIs and resolve markets with the same rule
(chain/normalize.py). A reader is a snapshot of the market registry: reload it when markets change.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection

from orderbook_pipelines.chain.decoding import DecodedLog, Decoder, Rejected
from orderbook_pipelines.chain.normalize import MarketRegistry, OrderEventRow, OrderMarkets, normalize
from orderbook_pipelines.chain.rpc import ChainClient
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
