"""The one order-book model: pure, in memory, no I/O. Dagster checks, replay and the live service share it.

It consumes canonical events (open / fill / cancel) in chain order. Each event first removes the order's
current contribution to its price level and then adds the new one, so the book is correct whatever the
contract's event order inside a transaction (generation 2 emits a market order's fills before its
OrderPlaced). Only limit orders rest; a market order's remainder never does.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import lt, sub

BUY, SELL = 0, 1
MARKET = 0


def order_key(contract: str, order_id: str) -> str:
    """An order's identity across markets and contract generations: "<contract>:<order_id>" (the router for
    gen-1 ids, the market contract for gen-2 hashes). SQL spells it storage.events.order_key_sql."""
    return f"{contract}:{order_id}"


@dataclass(frozen=True, slots=True)
class BookEvent:
    kind: str  # open | fill | cancel (other kinds are ignored)
    order_id: str
    side: int | None = None
    order_type: int | None = None
    price: int | None = None
    quantity: int | None = None


@dataclass(slots=True)
class _Order:
    side: int | None = None
    price: int | None = None
    quantity: int | None = None
    is_limit: bool = False
    filled: int = 0
    cancelled: bool = False

    @property
    def resting(self) -> int:
        if not self.is_limit or self.cancelled or self.quantity is None or self.price is None:
            return 0
        return max(0, self.quantity - self.filled)


@dataclass(frozen=True, slots=True)
class Level:
    price: int
    quantity: int
    orders: int


class InvalidEvent(ValueError):
    """An event that cannot be applied (e.g. an open without side/price/quantity)."""


UndoLog = list[tuple]


@dataclass
class Book:
    orders: dict[str, _Order] = field(default_factory=dict)
    _qty: tuple[dict[int, int], dict[int, int]] = field(default_factory=lambda: ({}, {}))
    _count: tuple[dict[int, int], dict[int, int]] = field(default_factory=lambda: ({}, {}))
    # The prices of each side, ascending: a level appears or vanishes far less often than it changes size, and
    # the live service reads the top levels of every touched market per block, which must not sort the book.
    _prices: tuple[list[int], list[int]] = field(default_factory=lambda: ([], []))
    _undo: UndoLog | None = None
    _transient: set[str] = field(default_factory=set)  # keys that were non-limit after an event this block

    def load_resting(self, orders: Iterable[tuple[str, int, int, int, int]]) -> None:
        """Bulk-load resting limit orders (key, side, price, quantity, filled): a snapshot restore, without the
        per-event path. Equivalent to an open then a fill per order, which is what the tests check."""
        rows = list(orders)
        if rows:
            self.load_columns(*map(list, zip(*rows, strict=True)))

    def load_columns(self, keys: Sequence[str], sides: Sequence[int], prices: Sequence[int],
                     quantities: Sequence[int], filled: Sequence[int]) -> None:
        """`load_resting` by columns, the cold-start path (a million orders): validation, the order objects and
        the level sums run as C-level loops (map/zip/Counter) instead of per-row Python. Everything is checked
        before anything changes, so a rejected load leaves the book as it was."""
        n = len(keys)
        if not len(sides) == len(prices) == len(quantities) == len(filled) == n:
            raise ValueError("columns of different lengths")
        if n == 0:
            return
        if not (set(sides) <= {BUY, SELL} and min(prices) > 0 and min(filled) >= 0
                and all(map(lt, filled, quantities))):
            for key, side, price, quantity, f in zip(keys, sides, prices, quantities, filled, strict=True):
                if side not in (BUY, SELL) or price <= 0 or not 0 <= f < quantity:
                    raise InvalidEvent(f"not a resting limit order: {key} side={side} price={price} "
                                       f"quantity={quantity} filled={f}")
        new = dict(zip(keys, map(_Order, sides, prices, quantities, repeat(True), filled, repeat(False)), strict=True))
        if len(new) != n or not self.orders.keys().isdisjoint(new):
            seen = set(self.orders)
            for key in keys:
                if key in seen:
                    raise InvalidEvent(f"order {key} loaded twice")
                seen.add(key)
        self.orders.update(new)
        qty, cnt = self._qty, self._count
        for side, price, remaining in zip(sides, prices, map(sub, quantities, filled), strict=True):
            q = qty[side]
            q[price] = q.get(price, 0) + remaining
        for (side, price), c in Counter(zip(sides, prices, strict=True)).items():
            cs = cnt[side]
            cs[price] = cs.get(price, 0) + c
        for side in (BUY, SELL):
            self._prices[side][:] = sorted(qty[side])

    def record(self, log: UndoLog | None) -> None:
        """Record every change into `log` (None stops) so that `undo(log)` can roll a reorged block back."""
        self._undo = log

    def undo(self, log: UndoLog) -> None:
        for entry in reversed(log):
            if entry[0] == "o":
                _, oid, saved = entry
                if saved is None:
                    self.orders.pop(oid, None)
                else:
                    self.orders[oid] = saved
            else:
                _, side, price, q, c = entry
                if q is None:
                    if self._qty[side].pop(price, None) is not None:
                        _drop(self._prices[side], price)
                    self._count[side].pop(price, None)
                else:
                    if price not in self._qty[side]:
                        insort(self._prices[side], price)
                    self._qty[side][price], self._count[side][price] = q, c
        log.clear()

    def _save_order(self, oid: str) -> None:
        if self._undo is not None:
            o = self.orders.get(oid)
            self._undo.append(("o", oid, None if o is None else _Order(o.side, o.price, o.quantity, o.is_limit,
                                                                         o.filled, o.cancelled)))

    def apply(self, ev: BookEvent) -> None:
        if ev.kind not in ("open", "fill", "cancel"):
            return
        self._save_order(ev.order_id)
        o = self.orders.get(ev.order_id)
        if o is None:
            o = self.orders[ev.order_id] = _Order()
        self._contribute(o, -1)
        if ev.kind == "open":
            if ev.side not in (BUY, SELL) or ev.price is None or ev.quantity is None:
                raise InvalidEvent(f"open of {ev.order_id} lacks side/price/quantity")
            o.side, o.price, o.quantity = ev.side, ev.price, ev.quantity
            o.is_limit = ev.order_type != MARKET and ev.price > 0
        elif ev.kind == "fill":
            if ev.quantity is None or ev.quantity < 0:
                raise InvalidEvent(f"fill of {ev.order_id} has no valid quantity")
            o.filled += ev.quantity
        else:
            o.cancelled = True
        self._contribute(o, +1)
        if o.quantity is not None and (o.cancelled or o.filled >= o.quantity):
            del self.orders[ev.order_id]  # terminal: keep memory bounded to live orders
        else:
            self.orders[ev.order_id] = o
            if not o.is_limit:
                self._transient.add(ev.order_id)

    def end_block(self) -> list[str]:
        """Forget what cannot outlive a transaction: market orders and fills of orders never opened.

        Every known contract emits a market order's events (and any fill-before-open) inside one transaction,
        so after a block such entries are dead; dropping them keeps memory bounded to resting orders. Only the
        keys touched this block are looked at, so a block costs its events, not the size of the book.
        Returns the keys dropped.
        """
        dead = [k for k in self._transient if (o := self.orders.get(k)) is not None and not o.is_limit]
        self._transient.clear()
        for k in dead:
            self._save_order(k)
            del self.orders[k]
        return dead

    def transient(self) -> list[str]:
        """Keys seen this block whose order is not a resting limit order (e.g. fills whose open is missing)."""
        return [k for k in self._transient if (o := self.orders.get(k)) is not None and not o.is_limit]

    def _contribute(self, o: _Order, sign: int) -> None:
        r = o.resting
        if r == 0 or o.side is None or o.price is None:
            return
        qty, cnt = self._qty[o.side], self._count[o.side]
        if self._undo is not None:
            self._undo.append(("l", o.side, o.price, qty.get(o.price), cnt.get(o.price)))
        before = cnt.get(o.price, 0)
        q = qty.get(o.price, 0) + sign * r
        c = before + sign
        if c == 0:
            qty.pop(o.price, None)
            cnt.pop(o.price, None)
            _drop(self._prices[o.side], o.price)
        else:
            if before == 0:
                insort(self._prices[o.side], o.price)
            qty[o.price], cnt[o.price] = q, c

    # -- queries --------------------------------------------------------------------------------------------
    def _top_prices(self, side: int, n: int) -> list[int]:
        ps = self._prices[side]
        return ps[:n] if side == SELL else ps[:-n - 1 if n < len(ps) else None:-1]

    def levels(self, side: int, n: int) -> list[Level]:
        qty, cnt = self._qty[side], self._count[side]
        return [Level(p, qty[p], cnt[p]) for p in self._top_prices(side, n)]

    def top(self, side: int, n: int) -> tuple[tuple[int, int], ...]:
        """The best `n` levels as (price, size), best first: what a depth view needs, without Level objects."""
        prices = self._top_prices(side, n)
        return tuple(zip(prices, map(self._qty[side].__getitem__, prices), strict=True))

    def best(self, side: int) -> int | None:
        ps = self._prices[side]
        if not ps:
            return None
        return ps[-1] if side == BUY else ps[0]

    def resting(self, order_id: str) -> int:
        o = self.orders.get(order_id)
        return o.resting if o else 0

    def state_hash(self) -> str:
        """Deterministic digest of the visible book (levels), for replay comparisons."""
        h = hashlib.sha256()
        for side in (BUY, SELL):
            qty, cnt = self._qty[side], self._count[side]
            h.update("".join([f"{side}:{p}:{qty[p]}:{cnt[p]};" for p in self._prices[side]]).encode())
        return h.hexdigest()


def _drop(prices: list[int], price: int) -> None:
    i = bisect_left(prices, price)
    if i < len(prices) and prices[i] == price:
        del prices[i]
