"""Deterministic replay of the canonical order-event stream into books, with validation and state hashes.

The canonical stream is the book-relevant stored events (open / fill / cancel) of resolved markets, in chain
order (block number, log index). It is not a matching engine: the contract matched the orders, the stream only
records the outcome, so replay checks what an outcome must satisfy (see `MarketReplay`) and rejects the rest.

Exported as JSON lines (docs/replay.md): one object per event, keys sorted, every integer a decimal string
(uint256 amounts do not fit JSON numbers portably), so the same events always give the same bytes and the
same hashes on every machine, whatever PYTHONHASHSEED or dict order.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from orderbook_pipelines.book.model import BUY, SELL, Book, BookEvent, InvalidEvent, order_key

BOOK_KINDS = ("open", "fill", "cancel")
_UINT = re.compile(r"^(0|[1-9][0-9]*)$")
_INT_FIELDS = ("block_number", "log_index", "market_id", "side", "order_type", "price", "quantity")
_STR_FIELDS = ("block_hash", "tx_hash", "market", "kind", "contract", "order_id", "trader")


class ReplayError(ValueError):
    """The stream is malformed or describes an impossible book (overfill, duplicate open, out of order, ...)."""


@dataclass(frozen=True, slots=True)
class CanonicalEvent:
    """One stored book event. `market` is a stable name (metric id, else metric hash, else contract address),
    so hashes do not depend on a database's identity values; `market_id` is informational."""

    block_number: int
    log_index: int
    block_hash: str
    tx_hash: str
    market: str
    market_id: int
    kind: str
    contract: str
    order_id: str
    trader: str | None = None
    side: int | None = None
    order_type: int | None = None
    price: int | None = None
    quantity: int | None = None

    @property
    def key(self) -> str:
        return order_key(self.contract, self.order_id)

    def book_event(self) -> BookEvent:
        return BookEvent(self.kind, self.key, self.side, self.order_type, self.price, self.quantity)

    def to_json(self) -> str:
        d = {k: (str(v) if isinstance(v, int) else v) for k, v in asdict(self).items()}
        return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    @classmethod
    def from_json(cls, line: str) -> CanonicalEvent:
        try:
            d = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReplayError(f"not JSON: {exc}") from None
        if not isinstance(d, dict):
            raise ReplayError("expected a JSON object")
        unknown = set(d) - set(_INT_FIELDS) - set(_STR_FIELDS)
        if unknown:
            raise ReplayError(f"unknown field(s) {sorted(unknown)}")
        out: dict[str, Any] = {}
        for k in _INT_FIELDS:
            v = d.get(k)
            if v is None:
                out[k] = None
                continue
            if not isinstance(v, str) or not _UINT.match(v):
                raise ReplayError(f"{k} must be a non-negative integer as a canonical decimal string, got {v!r}")
            out[k] = int(v)
        for k in _STR_FIELDS:
            v = d.get(k)
            if v is not None and not isinstance(v, str):
                raise ReplayError(f"{k} must be a string, got {v!r}")
            out[k] = v
        for k in ("block_number", "log_index", "market_id", "market", "kind", "contract", "order_id"):
            if out[k] is None:
                raise ReplayError(f"missing required field {k}")
        if out["kind"] not in BOOK_KINDS:
            raise ReplayError(f"kind must be one of {BOOK_KINDS}, got {out['kind']!r}")
        return cls(**out)


class MarketReplay:
    """One market's book plus what the pure model does not keep: traders (for snapshots) and validation state.

    Validation (strict mode) rejects events no contract can emit: a second open of a live order, any event for
    an order that already ended, a fill taking an order past its quantity, a cancel of an order never opened,
    fills of an order whose open never arrives in the same block, zero quantities. Together with
    `check_invariants` this is the book's contract: levels are the sum of resting orders, no size is zero or
    negative, fills never exceed quantity. Crossedness is not an invariant of the stream itself (it records
    outcomes, it does not match), but of the chain: `crossed()` lets tests assert it at block boundaries.
    """

    def __init__(self, strict: bool = False) -> None:
        self.book = Book()
        self.strict = strict
        self.traders: dict[str, tuple[str, str, str | None]] = {}  # key -> (contract, order_id, trader)
        self.closed: set[str] = set()  # strict only: orders that ended (memory grows with history)
        self.events = 0

    def apply(self, ev: CanonicalEvent) -> None:
        key = ev.key
        if self.strict:
            self._validate(ev, key)
        if ev.kind == "open":
            self.traders[key] = (ev.contract, ev.order_id, ev.trader)
        try:
            self.book.apply(ev.book_event())
        except InvalidEvent as exc:
            raise ReplayError(str(exc)) from None
        self.events += 1
        if key not in self.book.orders:
            self.traders.pop(key, None)
            if self.strict:
                self.closed.add(key)

    def _validate(self, ev: CanonicalEvent, key: str) -> None:
        o = self.book.orders.get(key)
        if key in self.closed:
            raise ReplayError(f"{ev.kind} of order {key}, which already ended (filled, cancelled or market order)")
        if ev.kind == "open":
            if o is not None and o.quantity is not None:
                raise ReplayError(f"duplicate open of live order {key}")
            if ev.side not in (BUY, SELL) or ev.price is None or not ev.quantity:
                raise ReplayError(f"open of {key} needs side 0/1, a price and a quantity > 0")
            if o is not None and o.filled > ev.quantity:
                raise ReplayError(f"order {key} was filled {o.filled} before its open of quantity {ev.quantity}")
        elif ev.kind == "fill":
            if not ev.quantity:
                raise ReplayError(f"fill of {key} needs a quantity > 0")
            if o is not None and o.quantity is not None and o.filled + ev.quantity > o.quantity:
                raise ReplayError(f"fill of {ev.quantity} on order {key} exceeds its remaining "
                                  f"{o.quantity - o.filled} (quantity {o.quantity})")
        elif o is None or o.quantity is None:
            raise ReplayError(f"cancel of order {key}, which was never opened")

    def end_block(self, block: int) -> None:
        if self.strict:
            orphans = [k for k in self.book.transient() if self.book.orders[k].quantity is None]
            if orphans:
                raise ReplayError(f"block {block}: fill(s) of order {orphans[0]} whose open never arrived")
        for k in self.book.end_block():
            self.traders.pop(k, None)
            if self.strict:
                self.closed.add(k)

    def crossed(self) -> bool:
        bid, ask = self.book.best(BUY), self.book.best(SELL)
        return bid is not None and ask is not None and bid >= ask


def check_invariants(book: Book) -> None:
    """Levels must equal the aggregation of resting orders; no level may be empty or negative."""
    qty: tuple[dict[int, int], dict[int, int]] = ({}, {})
    cnt: tuple[dict[int, int], dict[int, int]] = ({}, {})
    for key, o in book.orders.items():
        r = o.resting
        if r < 0 or o.filled < 0:
            raise ReplayError(f"order {key} has a negative size")
        if o.quantity is not None and o.filled > o.quantity:
            raise ReplayError(f"order {key} is filled beyond its quantity")
        if r and o.side is not None and o.price is not None:
            qty[o.side][o.price] = qty[o.side].get(o.price, 0) + r
            cnt[o.side][o.price] = cnt[o.side].get(o.price, 0) + 1
    for side in (BUY, SELL):
        levels = {lv.price: (lv.quantity, lv.orders) for lv in book.levels(side, len(book.orders) + 1)}
        if any(q <= 0 or c <= 0 for q, c in levels.values()):
            raise ReplayError(f"side {side} has an empty or negative level")
        if levels != {p: (qty[side][p], cnt[side][p]) for p in qty[side]}:
            raise ReplayError(f"side {side}: levels differ from the sum of resting orders")


@dataclass
class ReplayResult:
    books: dict[str, MarketReplay]
    events: int = 0
    blocks: int = 0
    last_block: int | None = None
    hashes: dict[str, str] = field(default_factory=dict)

    @property
    def combined(self) -> str:
        return combined_hash(self.hashes)


def combined_hash(hashes: dict[str, str]) -> str:
    """sha256 over "market:state_hash\\n" lines in byte order of the market name: one digest for all books."""
    h = hashlib.sha256()
    for m in sorted(hashes, key=lambda s: s.encode()):
        h.update(f"{m}:{hashes[m]}\n".encode())
    return h.hexdigest()


def replay(events: Iterable[CanonicalEvent], strict: bool = True, check_each_block: bool = False,
           books: dict[str, MarketReplay] | None = None,
           on_block: Callable[[int, dict[str, MarketReplay]], None] | None = None,
           hashes: bool = True) -> ReplayResult:
    """Apply events in chain order; `books` continues from earlier state (snapshot restore); `on_block` sees
    the books a block touched once the block is complete. `hashes=False` skips the final state hashes (a
    restore that verified its snapshots already: a thousand markets' worth of hashing at cold start)."""
    res = ReplayResult(books=books if books is not None else {})
    last: tuple[int, int] | None = None
    touched: dict[str, MarketReplay] = {}

    def close_block(block: int) -> None:
        for mr in touched.values():
            mr.end_block(block)
            if check_each_block:
                check_invariants(mr.book)
        if on_block is not None:
            on_block(block, touched)
        touched.clear()
        res.blocks += 1
        res.last_block = block

    for ev in events:
        pos = (ev.block_number, ev.log_index)
        if last is not None and pos <= last:
            raise ReplayError(f"event at block {pos[0]} log {pos[1]} is not after block {last[0]} log {last[1]}: "
                              "the stream must be sorted by (block_number, log_index) without duplicates")
        if last is not None and ev.block_number != last[0]:
            close_block(last[0])
        last = pos
        mr = res.books.get(ev.market)
        if mr is None:
            mr = res.books[ev.market] = MarketReplay(strict=strict)
        try:
            mr.apply(ev)
        except ReplayError as exc:
            raise ReplayError(f"block {ev.block_number} log {ev.log_index} ({ev.market}): {exc}") from None
        touched[ev.market] = mr
        res.events += 1
    if last is not None:
        close_block(last[0])
    if hashes:
        res.hashes = {m: mr.book.state_hash() for m, mr in res.books.items()}
    return res


# -- files ----------------------------------------------------------------------------------------------------
def read_events(path: Path) -> Iterator[CanonicalEvent]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield CanonicalEvent.from_json(line)
            except ReplayError as exc:
                raise ReplayError(f"{path}:{n}: {exc}") from None


def replay_file(path: Path, strict: bool = True, check_each_block: bool = False) -> ReplayResult:
    return replay(read_events(path), strict=strict, check_each_block=check_each_block)


def write_events(events: Iterable[CanonicalEvent], out: IO[str]) -> int:
    n = 0
    for ev in events:
        out.write(ev.to_json())
        out.write("\n")
        n += 1
    return n
