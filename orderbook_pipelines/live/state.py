"""Live books at the chain tip: the pure Book per market plus the unconfirmed blocks with their undo logs.

A reorg rolls the affected books back block by block (undo logs, newest first) to the common ancestor; the
new branch is then applied like any block. Blocks older than `keep_blocks` are forgotten: a reorg deeper than
that cannot be rolled back here and is reported as `DeepReorg` (the service then rebuilds from Postgres).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from orderbook_pipelines.book.model import BUY, SELL, Book, BookEvent, UndoLog

VIEW_LEVELS = 100


class DeepReorg(RuntimeError):
    """The fork point is older than the unconfirmed blocks kept in memory."""


@dataclass(frozen=True, slots=True)
class BlockRef:
    number: int
    hash: str
    parent_hash: str


@dataclass
class _Applied:
    ref: BlockRef
    undo: dict[int, UndoLog] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MarketView:
    """Top levels of one market after a block (what channels diff against), with the market's sequence."""

    market_id: int
    seq: int
    block_number: int
    block_hash: str
    bids: tuple[tuple[int, int], ...]
    asks: tuple[tuple[int, int], ...]


class LiveBooks:
    def __init__(self, keep_blocks: int = 64):
        self.books: dict[int, Book] = defaultdict(Book)
        self.seq: dict[int, int] = defaultdict(int)
        self.keep_blocks = keep_blocks
        self.applied: list[_Applied] = []
        self.head: BlockRef | None = None

    def load(self, books: dict[int, Book], head: BlockRef) -> None:
        """Cold start: books at a final block (no undo needed below it)."""
        self.books = defaultdict(Book, books)
        self.applied.clear()
        self.head = head

    def markets_of(self, keys: set[str]) -> dict[str, int]:
        """The market whose book holds each order key (chain.normalize's `order_markets` for the tip): an order
        that is filled or cancelled rests in exactly one book until then."""
        out: dict[str, int] = {}
        todo = set(keys)
        for market_id, book in self.books.items():
            if not todo:
                break
            hit = todo & book.orders.keys()
            if hit:
                out.update(dict.fromkeys(hit, market_id))
                todo -= hit
        return out

    def apply_block(self, ref: BlockRef, events: dict[int, list[BookEvent]], final: bool = False) -> set[int]:
        """Apply one block on top of the head; returns the markets whose book changed."""
        if not final and self.head is not None and ref.parent_hash != self.head.hash:
            raise ValueError(f"block {ref.number} does not extend head {self.head.number} ({self.head.hash})")
        rec = _Applied(ref)
        for market_id, evs in events.items():
            book = self.books[market_id]
            log: UndoLog = []
            book.record(None if final else log)
            try:
                for ev in evs:
                    book.apply(ev)
                book.end_block()
            finally:
                book.record(None)
            if not final:
                rec.undo[market_id] = log
        if not final:
            self.applied.append(rec)
            if len(self.applied) > self.keep_blocks:
                del self.applied[0]
        else:
            self.applied.clear()
        self.head = ref
        touched = set(events)
        for m in touched:
            self.seq[m] += 1
        return touched

    def adopt_events(self, market_id: int, ref: BlockRef, events: list[BookEvent]) -> None:
        """Apply one block's events of a newly owned market; inside the kept window they get an undo log."""
        book = self.books[market_id]
        rec = next((a for a in self.applied if a.ref.number == ref.number), None)
        log: UndoLog | None = rec.undo.setdefault(market_id, []) if rec is not None else None
        book.record(log)
        try:
            for ev in events:
                book.apply(ev)
            book.end_block()
        finally:
            book.record(None)

    def drop_market(self, market_id: int) -> None:
        self.books.pop(market_id, None)
        for rec in self.applied:
            rec.undo.pop(market_id, None)

    def hash_at(self, number: int) -> str | None:
        """Hash of block `number` as we applied it, if still known (kept blocks, their parent, or the head)."""
        if self.head is not None and number == self.head.number:
            return self.head.hash
        for a in self.applied:
            if a.ref.number == number:
                return a.ref.hash
        if self.applied and number == self.applied[0].ref.number - 1:
            return self.applied[0].ref.parent_hash
        return None

    def oldest_kept(self) -> int | None:
        return self.applied[0].ref.number - 1 if self.applied else None

    def rollback_to(self, ancestor: int) -> set[int]:
        """Undo every applied block above `ancestor`; returns the markets whose book changed."""
        if self.head is None or ancestor >= self.head.number:
            return set()
        floor = self.oldest_kept()
        if floor is None or ancestor < floor:
            raise DeepReorg(f"fork point {ancestor} is below the oldest unconfirmed block kept ({floor})")
        touched: set[int] = set()
        while self.applied and self.applied[-1].ref.number > ancestor:
            rec = self.applied.pop()
            for market_id, log in rec.undo.items():
                self.books[market_id].undo(log)
                touched.add(market_id)
            self.head = BlockRef(rec.ref.number - 1, rec.ref.parent_hash, "")
        if self.applied:
            self.head = self.applied[-1].ref
        for m in touched:
            self.seq[m] += 1
        return touched

    def view(self, market_id: int, levels: int = VIEW_LEVELS) -> MarketView:
        book = self.books[market_id]
        assert self.head is not None
        return MarketView(
            market_id=market_id,
            seq=self.seq[market_id],
            block_number=self.head.number,
            block_hash=self.head.hash,
            bids=book.top(BUY, levels),
            asks=book.top(SELL, levels),
        )
