"""Follows the chain tip block by block and turns it into book updates for the live service.

Synchronous on purpose: it runs in its own thread with the one RPC client, decoder and book model of the
project, and hands updates to the async side through a callback. Per block: header, parent-hash check, logs by
block hash, decode, normalize, apply with undo log. A parent mismatch or a head that went back triggers a
walk back to the common ancestor, a rollback, and the new branch; the corrections reach clients as deltas.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import Engine, text

from orderbook_pipelines.book.model import BookEvent, order_key
from orderbook_pipelines.chain.normalize import OrderEventRow
from orderbook_pipelines.chain.rpc import BlockHeader, ChainClient, RpcError
from orderbook_pipelines.config import ProjectConfig
from orderbook_pipelines.ingestion.reader import EventReader
from orderbook_pipelines.live import metrics
from orderbook_pipelines.live.coldstart import books_at, final_height
from orderbook_pipelines.live.state import BlockRef, DeepReorg, LiveBooks, MarketView
from orderbook_pipelines.storage import registry as reg_store

if TYPE_CHECKING:
    from orderbook_pipelines.live.pusher_channels import Prepared

log = logging.getLogger(__name__)

PUBLISHED_WINDOW = 100_000  # blocks: how far back a rebuild can tell which published rows a reorg voided


@dataclass
class Update:
    """What one step produced: new market views, the block's event rows, and why (block | reorg | reset)."""

    reason: str
    views: list[MarketView]
    rows: list[OrderEventRow] = field(default_factory=list)
    reverted_from: int | None = None
    block_seen_at: float = 0.0
    # order states the Pusher channels read in the follower thread (PusherChannels.prepare) for the loop
    prepared: Prepared | None = None


@dataclass
class FollowerStats:
    blocks: int = 0
    reorgs: int = 0
    max_reorg_depth: int = 0
    resets: int = 0
    cold_start_s: float = 0.0
    cold_start_block: int = -1
    head_seen: int = -1
    last_progress: float = field(default_factory=time.monotonic)


class Follower:
    def __init__(self, config: ProjectConfig, client: ChainClient, engine: Engine,
                 on_update: Callable[[Update], None], keep_blocks: int = 64, poll_s: float = 0.05,
                 registry_refresh_s: float = 5.0):
        self.config = config
        self.client = client
        self.engine = engine
        self.on_update = on_update
        self.books = LiveBooks(keep_blocks)
        self.poll_s = poll_s
        self.registry_refresh_s = registry_refresh_s
        self.stats = FollowerStats()
        self.market_names: dict[int, str] = {}
        self._reader: EventReader | None = None
        self._registry_at = 0.0
        self._stop = threading.Event()
        self.wake = threading.Event()  # set by the newHeads subscription, when there is one
        # Cluster mode: the markets this worker owns (None = all markets, a single live process).
        self.owned: set[int] | None = None
        self._wanted: set[int] | None = None
        self._wanted_lock = threading.Lock()
        # number -> hash of the blocks whose rows (trades, order events) went out, newest PUBLISHED_WINDOW blocks:
        # after a rebuild, `reverted` must void exactly the published blocks the chain no longer has
        self._published: dict[int, str] = {}
        self._rebuild_from: int | None = None  # a rebuild (`void_from`) not completed yet

    # -- registry -------------------------------------------------------------------------------------------
    def refresh_registry(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._registry_at < self.registry_refresh_s:
            return
        cid = self.config.chain.chain_id
        with self.engine.begin() as conn:
            # configured markets change with a restart; later refreshes only pick up new rows. A read-only role
            # (obp_api, docs/security.md) reads the registry as ingestion wrote it.
            sync = force and bool(conn.execute(text("SELECT has_table_privilege('markets', 'INSERT')")).scalar())
            self._reader = EventReader.load(conn, self.config, sync_markets=sync)
            self.market_names = reg_store.market_names(conn, cid)
        self._registry_at = time.monotonic()

    # -- start ----------------------------------------------------------------------------------------------
    def cold_start(self, void_from: int | None = None) -> None:
        """Books at the highest fully stored final block, then every block after it up to the head.

        `void_from` (a rebuild after a reorg): the rows of blocks >= it that went out are void; the books are then
        built at the block before it at the latest, and the update carries `reverted_from` and the rows of every
        block re-read since, so trades/orders subscribers end with exactly the new branch's rows."""
        t0 = time.perf_counter()
        self.refresh_registry(force=True)
        c = self.config.chain
        h, h_hash = final_height(self.engine, c.chain_id, c.start_block)
        header = self.client.header(max(h, 0))
        if h_hash is not None and header.hash != h_hash:
            raise DeepReorg(f"stored final block {h} ({h_hash}) is not on the chain ({header.hash}): "
                            "run reconciliation before starting the live service")
        if void_from is not None and void_from <= h:  # below a block on the chain: the branch is the chain's
            h = void_from - 1
            header = self.client.header(max(h, 0))
        elif void_from is not None:  # nothing published at or below the stored frontier was lost
            void_from = h + 1
        owned = self.owned
        books = books_at(self.engine, c.chain_id, h, c.start_block, owned)
        self.books.load(books, BlockRef(header.number, header.hash, header.parent_hash))
        rows = self._catch_up_final()
        self.stats.cold_start_s = time.perf_counter() - t0
        self.stats.cold_start_block = self.books.head.number if self.books.head else -1
        markets = sorted(set(self.books.books) | (set(self.market_names) if owned is None else owned))
        self._rebuild_from = None
        if void_from is None:
            self.on_update(Update("reset", [self.books.view(m) for m in markets]))
            return
        for n in [n for n in self._published if n >= void_from]:
            del self._published[n]
        for r in rows:
            self._published[r.block_number] = r.block_hash
        self.on_update(Update("reset", [self.books.view(m) for m in markets], rows, reverted_from=void_from))

    def _catch_up_final(self) -> list[OrderEventRow]:
        """Blocks already final on chain but not in Postgres: one ranged getLogs, applied without undo logs.
        Returns the rows applied (of owned markets)."""
        assert self.books.head is not None and self._reader is not None
        start = self.books.head.number + 1
        for _attempt in range(5):
            safe = self.client.safe_head(self.config.chain.finality, self.config.chain.confirmations)
            if safe < start:
                return []
            # The logs and the headers are separate reads: pin the safe block's hash around them, or a reorg in
            # between leaves books of one branch under the head of another (and no parent hash would disagree).
            pinned = self.client.header(safe).hash
            by_block: dict[int, list[dict]] = defaultdict(list)
            for lg in self._reader.fetch(self.client, start, safe):
                by_block[int(lg["blockNumber"], 16)].append(lg)
            headers = self.client.headers(sorted(set(by_block) | {safe}))
            if headers[safe].hash == pinned and all(lg["blockHash"].lower() == headers[n].hash
                                                    for n, lgs in by_block.items() for lg in lgs):
                break
            log.warning("the chain changed while the live books caught up to block %d; reading it again", safe)
        else:
            raise DeepReorg(f"the chain kept changing while the live books caught up from block {start}")
        out: list[OrderEventRow] = []
        for n in sorted(by_block):
            rows = self._rows(by_block[n])
            self.books.apply_block(_ref(headers[n]), self._events(rows, self.owned), final=True)
            out += [r for r in rows if r.market_id is not None and (self.owned is None or r.market_id in self.owned)]
        self.books.head = _ref(headers[safe])
        return out

    # -- follow ---------------------------------------------------------------------------------------------
    def set_owned(self, markets: set[int]) -> None:
        """Called by the membership thread; the follower thread adopts/drops markets at its next step."""
        with self._wanted_lock:
            self._wanted = set(markets)
        self.wake.set()

    def _sync_ownership(self) -> None:
        with self._wanted_lock:
            wanted = self._wanted
        if wanted is None or self.owned is None or wanted == self.owned:
            return
        for m in self.owned - wanted:
            self.books.drop_market(m)
        new = wanted - self.owned
        if new:
            self._adopt(new)
        self.owned = set(wanted)
        if new:
            self.on_update(Update("adopt", [self.books.view(m) for m in sorted(new)]))

    def _adopt(self, markets: set[int]) -> None:
        """Rebuild newly owned markets: stored final events, then the chain up to our head (undo logs inside
        the unconfirmed window, so a later reorg rolls them back like any other market)."""
        assert self.books.head is not None
        c = self.config.chain
        h, _ = final_height(self.engine, c.chain_id, c.start_block)
        h = min(h, self.books.head.number)
        for m, book in books_at(self.engine, c.chain_id, h, c.start_block, markets).items():
            self.books.books[m] = book
        kept = [a.ref for a in self.books.applied if a.ref.number > h]
        final_to = (kept[0].number - 1) if kept else self.books.head.number
        assert self._reader is not None
        if final_to > h:
            by_block: dict[int, list[dict]] = defaultdict(list)
            for lg in self._reader.fetch(self.client, h + 1, final_to):
                by_block[int(lg["blockNumber"], 16)].append(lg)
            for n in sorted(by_block):
                ref = BlockRef(n, by_block[n][0]["blockHash"].lower(), "")
                for m, evs in self._events(self._rows(by_block[n]), markets).items():
                    self.books.adopt_events(m, ref, evs)
        for ref in kept:
            rows = self._rows(self._reader.fetch_block(self.client, ref.hash))
            for m, evs in self._events(rows, markets).items():
                self.books.adopt_events(m, ref, evs)
        for m in markets:
            self.books.seq[m] += 1

    def step(self, max_blocks: int = 500) -> int:
        """Process what the chain has now; returns the number of blocks applied."""
        self.refresh_registry()
        if self._rebuild_from is not None:  # a rebuild that failed midway (node, Postgres): again, before anything
            self.cold_start(void_from=self._rebuild_from)
        assert self.books.head is not None
        self._sync_ownership()
        tip = self.client.header("latest")  # number and hash: a reorg to a branch of equal length changes only the hash
        head = tip.number
        self.stats.head_seen = head
        applied = 0
        if head < self.books.head.number or (head == self.books.head.number and tip.hash != self.books.head.hash):
            self._reorg(head)
        n = self.books.head.number + 1
        while n <= head and applied < max_blocks:
            seen = time.perf_counter()
            hdr = self.client.header(n)
            if hdr.parent_hash != self.books.head.hash:
                self._reorg(n - 1)
                n = self.books.head.number + 1
                continue
            assert self._reader is not None
            rows = self._rows(self._reader.fetch_block(self.client, hdr.hash))
            if self.owned is not None:
                rows = [r for r in rows if r.market_id in self.owned]
            touched = self.books.apply_block(_ref(hdr), self._events(rows, self.owned))
            if rows:
                self._remember_published(hdr.number, hdr.hash)
            self.stats.blocks += 1
            applied += 1
            if touched or rows:
                self.on_update(Update("block", [self.books.view(m) for m in sorted(touched)], rows,
                                      block_seen_at=seen))
            n += 1
        if applied:
            self.stats.last_progress = time.monotonic()
        return applied

    def _reorg(self, from_number: int) -> None:
        """Walk back from `from_number` to the newest block whose hash we share with the chain; roll back."""
        assert self.books.head is not None
        k = min(from_number, self.books.head.number)
        floor = self.books.oldest_kept()
        while True:
            ours = self.books.hash_at(k)
            if ours is None or (floor is not None and k < floor):
                self._reset(f"fork point below block {k}: deeper than the {self.books.keep_blocks} blocks kept")
                return
            if self.client.header(k).hash == ours:
                break
            k -= 1
        depth = self.books.head.number - k
        try:
            touched = self.books.rollback_to(k)
        except DeepReorg as exc:
            self._reset(str(exc))
            return
        for n in [n for n in self._published if n > k]:
            del self._published[n]
        self.stats.reorgs += 1
        self.stats.max_reorg_depth = max(self.stats.max_reorg_depth, depth)
        metrics.REORGS.inc()
        metrics.REORG_DEPTH.observe(depth)
        log.warning("reorg: rolled back %d block(s) to %d", depth, k)
        self.on_update(Update("reorg", [self.books.view(m) for m in sorted(touched)], reverted_from=k + 1))

    def _reset(self, why: str) -> None:
        log.error("live books reset: %s", why)
        self.stats.resets += 1
        first = self._first_replaced()
        self._rebuild_from = first if self._rebuild_from is None else min(first, self._rebuild_from)
        self.cold_start(void_from=self._rebuild_from)

    def _remember_published(self, number: int, block_hash: str) -> None:
        self._published[number] = block_hash
        while self._published and next(iter(self._published)) < number - PUBLISHED_WINDOW:
            del self._published[next(iter(self._published))]

    def _first_replaced(self) -> int:
        """One above the newest block whose rows went out and which the chain still has (hashes chain, so every
        older one is still there too): the first block whose published rows may be void."""
        head = self.client.block_number()
        numbers = sorted(self._published, reverse=True)
        for i in range(0, len(numbers), 200):
            chunk = [n for n in numbers[i : i + 200] if n <= head]
            on_chain = self.client.headers(chunk) if chunk else {}
            for n in chunk:
                if on_chain[n].hash == self._published[n]:
                    return n + 1
        if numbers:  # every remembered block was replaced
            return numbers[-1]
        assert self.books.head is not None
        return self.books.head.number + 1  # nothing published: only blocks after the stored frontier are re-read

    def run(self) -> None:
        """Thread body: follow until stopped; transient RPC trouble is logged and retried."""
        while not self._stop.is_set():
            try:
                if self.step() == 0:
                    self.wake.wait(self.poll_s)
                    self.wake.clear()
            except RpcError as exc:  # the node is down or refusing: one line (the client logged its retries)
                log.warning("follower step failed: %s; retrying", exc)
                self._stop.wait(1.0)
            except Exception:  # keep following; /ready reports staleness
                log.exception("follower step failed")
                self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()

    # -- decoding -------------------------------------------------------------------------------------------
    def _rows(self, logs: list[dict]) -> list[OrderEventRow]:
        """Rows of the block's logs; a fill or cancel of an order opened earlier takes its book's market."""
        assert self._reader is not None
        return self._reader.read(logs, self.books.markets_of).rows

    @staticmethod
    def _events(rows: list[OrderEventRow], only: set[int] | None = None) -> dict[int, list[BookEvent]]:
        out: dict[int, list[BookEvent]] = defaultdict(list)
        for r in rows:
            if r.market_id is None or (only is not None and r.market_id not in only):
                continue
            if r.kind in ("open", "fill", "cancel") and r.order_id is not None:
                out[r.market_id].append(BookEvent(r.kind, order_key(r.contract, r.order_id), r.side,
                                                  r.order_type, r.price, r.quantity))
        return out


def _ref(h: BlockHeader) -> BlockRef:
    return BlockRef(h.number, h.hash, h.parent_hash)
