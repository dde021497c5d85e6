"""Raw logs -> canonical event rows: the one fetch -> decode -> normalize path.

Range ingestion, reconciliation and the live follower all read the chain through an `EventReader`, so they
fetch the same contracts, decode with the same ABIs and resolve markets with the same rule
(chain/normalize.py). A reader is a snapshot of the market registry: reload it when markets change.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy import Connection

from orderbook_pipelines.chain.decoding import Decoder
from orderbook_pipelines.chain.normalize import MarketRegistry, OrderMarkets, RowsRead, read_rows
from orderbook_pipelines.chain.rpc import BlockHeader, ChainClient
from orderbook_pipelines.config import ProjectConfig
from orderbook_pipelines.storage import registry
from orderbook_pipelines.storage.writer import ReorgDetected


def log_addresses(config: ProjectConfig, market_addresses: dict[str, str]) -> dict[str, str]:
    """Every contract whose logs we fetch, mapped to its source."""
    out: dict[str, str] = {}
    for src in config.sources:
        if src.addresses == "markets":
            out.update({a: s for a, s in market_addresses.items() if s == src.name})
        else:
            out.update({a.lower(): src.name for a in src.addresses})
    return out


# A pipelined read asks for windows of about READ_WINDOW_LOGS logs, sized from the density of the window before:
# small enough that the node serves the next window while this process decodes the last one (a range of 95k logs
# read as one window waited 1 s for the node, then decoded for 1 s), large enough that a range costs a handful of
# calls. The first window is small because the density is unknown; no window exceeds READ_WINDOW_BLOCKS. The
# density is the window's, or that of its last quarter when higher: where quiet blocks turn busy inside a window
# (the first trades after a deployment), the whole window's average asked next for ~40k logs, which the decoder
# waited 0.4 s for and Postgres then stored while nothing else was decoded (bench/realmix.py).
READ_WINDOW_LOGS = 8_000
READ_WINDOW_BLOCKS = 250
FIRST_WINDOW_BLOCKS = 16


def next_window(blocks: int, logs: int, tail_logs: int = 0, target: int = READ_WINDOW_LOGS,
                limit: int = READ_WINDOW_BLOCKS) -> int:
    """Blocks of the next window, after one of `blocks` blocks held `logs` logs, `tail_logs` of them in its last
    `tail_blocks(blocks)` blocks."""
    if logs == 0:
        return min(limit, blocks * 2)
    tail = tail_blocks(blocks)
    if tail_logs * blocks > logs * tail:  # busier at its end than on average: size from its end
        blocks, logs = tail, tail_logs
    return max(1, min(limit, blocks * target // logs))


def tail_blocks(blocks: int) -> int:
    """How many last blocks of a window `next_window` takes as its end: a quarter, at least one."""
    return max(1, blocks // 4)


def _tail_logs(logs: list[dict], last_block: int, blocks: int) -> int:
    """Logs (in chain order) of the window's last `tail_blocks(blocks)` blocks, counted from the end."""
    first = last_block - tail_blocks(blocks) + 1
    n = 0
    for lg in reversed(logs):
        if int(lg["blockNumber"], 16) < first:
            break
        n += 1
    return n


@dataclass
class Window:
    """Consecutive blocks of a range, fetched: their logs in chain order, and the headers of the blocks that the
    range needs (every block with a log, and the `always` blocks up to the window's end)."""

    raw: list[dict]
    headers: dict[int, BlockHeader]
    waited_s: float = 0.0  # this thread waiting for the node

    @property
    def logs(self) -> int:
        return len(self.raw)


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

    def windows(self, chain: ChainClient, start: int, end: int, always: set[int]) -> Iterator[Window]:
        """[start, end] window by window, with the headers of `always` and of every block with a log. One thread
        fetches (the client is used by it alone meanwhile) while the caller reads and writes the window before: the
        node serves logs while Python decodes and Postgres stores, instead of each waiting in turn."""
        if not self.sources or end < start:
            t = time.perf_counter()
            headers = chain.headers(sorted(always))
            yield Window([], headers, waited_s=time.perf_counter() - t)
            return
        fetched: queue.SimpleQueue[tuple[list[dict], dict[int, BlockHeader], BlockHeader, BlockHeader] | None] = (
            queue.SimpleQueue())
        stop = threading.Event()  # the caller gave up (an error, a reorg): fetch no further

        def fetch_all() -> None:
            pending = sorted(always)
            try:
                a, width = start, FIRST_WINDOW_BLOCKS
                while a <= end and not stop.is_set():
                    b = min(end, a + width - 1)
                    logs = self.fetch(chain, a, b)
                    needed = {int(n, 16) for n in {lg["blockNumber"] for lg in logs}}  # per block, not per log
                    needed.update(n for n in pending if n <= b or b == end)
                    pending = [n for n in pending if n not in needed]
                    got = chain.headers(sorted(needed | {a, b}))  # the window's ends link it to the one before
                    fetched.put((logs, {n: got[n] for n in needed}, got[a], got[b]))
                    width, a = next_window(b - a + 1, len(logs), _tail_logs(logs, b, b - a + 1)), b + 1
            finally:
                fetched.put(None)  # also after an error, which .result() below raises

        with ThreadPoolExecutor(1, thread_name_prefix="obp-fetch") as pool:
            done = pool.submit(fetch_all)
            last: BlockHeader | None = None  # of the window before
            try:
                while True:
                    t = time.perf_counter()
                    item = fetched.get()
                    t1 = time.perf_counter()
                    if item is None:
                        break
                    logs, headers, first, end_header = item
                    if last is not None and first.parent_hash != last.hash:
                        # Each window's logs agree with its own headers (writer.check_logs_consistent); this says
                        # the earlier windows are still on the chain, as one fetch of every header at the end would.
                        raise ReorgDetected(
                            f"block {first.number}: parent hash {first.parent_hash} is not block {last.number} as "
                            f"read moments before ({last.hash}): the chain reorganised while the range was read. "
                            "Nothing was written.")
                    last = end_header
                    yield Window(logs, headers, waited_s=t1 - t)
            finally:
                stop.set()
            done.result()

    def read(self, logs: list[dict], order_markets: OrderMarkets | None = None) -> RowsRead:
        """Raw logs -> rows (their markets by this reader's registry snapshot) and rejections."""
        return read_rows(self.decoder, logs, self.registry, self.config.chain.chain_id, order_markets)
