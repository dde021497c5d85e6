"""Pusher channels of the live service: `market-{metricId}` and `(private-)user-{trader}`, fed by the hub.

The hub hands every update to `PusherChannels.on_update` (a hub listener), after its own channels: the same
views and event rows, serialized once per event and queued as the same string to every subscriber of a
channel. A `price-update` is the market's whole top of book (replace, do not merge), so a client needs no
sequence rule; after a reorg the market gets a `reorg` event (which blocks are void, the corrected state of
every order they touched) and then a fresh `price-update`.

Order state (filled, remaining, status) is not in an event row: `prepare` reads it in the follower thread,
while the books are exactly at the update's block (the undo log of the block holds each order's state before
it), and stores it on the update (`Update.prepared`), which carries it to the loop. Payloads:
docs/pusher-compat.md.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from orderbook_pipelines.book.checksum import book_checksum
from orderbook_pipelines.book.model import BUY, MARKET, order_key
from orderbook_pipelines.chain.normalize import OrderEventRow
from orderbook_pipelines.live import metrics
from orderbook_pipelines.live.follower import Update
from orderbook_pipelines.live.hub import Conn, Hub, depth_json, dumps, opt_str
from orderbook_pipelines.live.pusher import ChannelRef, PusherSettings, encode
from orderbook_pipelines.live.state import LiveBooks

Subscribers = dict[str, set[Conn]]  # exact channel name -> connections (pusher-js routes by the exact name)


@dataclass(frozen=True, slots=True)
class OrderState:
    """An order after one event (or after a rollback): what the frontend shows in its order list."""

    side: int | None
    price: int | None  # the order's limit price (0 for a market order)
    quantity: int | None  # the order's size; None when it was placed before what the service knows
    filled: int
    is_limit: bool
    status: str  # open | partially_filled | filled | cancelled | reverted

    @property
    def remaining(self) -> int | None:
        if self.quantity is None:
            return None
        return 0 if self.status in ("cancelled", "filled", "reverted") else max(0, self.quantity - self.filled)


@dataclass(frozen=True, slots=True)
class RevertedOrder:
    market_id: int
    order_id: str
    trader: str | None
    state: OrderState


@dataclass
class Prepared:
    """The order states of one update, read in the follower thread; they reach the loop as `Update.prepared`."""

    row_states: dict[int, OrderState] = field(default_factory=dict)  # row index -> state after that row
    reverted: list[RevertedOrder] = field(default_factory=list)


def _status(quantity: int | None, filled: int, cancelled: bool) -> str:
    if cancelled:
        return "cancelled"
    if quantity is not None and filled >= quantity:
        return "filled"
    return "partially_filled" if filled > 0 else "open"


def _side(v: int | None) -> str | None:
    return None if v is None else "buy" if v == BUY else "sell"


class OrderTracker:
    """Follower-thread side: each event row's order state, and which orders a rollback touched.

    Called synchronously from the follower's update callback, so the books are at the update's block."""

    def __init__(self, books: LiveBooks):
        self.books = books
        # block number -> order key -> (market, order id, trader) of the events we published, for rollbacks
        self.recent: dict[int, dict[str, tuple[int, str, str | None]]] = {}

    def prepare(self, update: Update) -> Prepared:
        if update.reason == "reset":  # a rebuild: no undo log; what it voided (when it says) is corrected as is now
            reverted = self._reverted(update.reverted_from) if update.reverted_from is not None else []
            self.recent.clear()
            return Prepared(reverted=reverted)
        if update.reason == "reorg" and update.reverted_from is not None:
            return Prepared(reverted=self._reverted(update.reverted_from))
        return Prepared(row_states=self._row_states(update.rows))

    def _row_states(self, rows: list[OrderEventRow]) -> dict[int, OrderState]:
        rows_of = [(i, r) for i, r in enumerate(rows)
                   if r.kind in ("open", "fill", "cancel") and r.order_id is not None and r.market_id is not None]
        if not rows_of:
            return {}
        head = self.books.head
        applied = self.books.applied[-1] if self.books.applied else None
        undo = applied.undo if applied is not None and head is not None and applied.ref.hash == head.hash else {}
        before: dict[str, Any] = {}  # key -> the order as it was before the block (None: unknown to the book)
        for market_id in {r.market_id for _, r in rows_of}:
            for entry in undo.get(market_id, ()):  # type: ignore[arg-type]
                if entry[0] == "o" and entry[1] not in before:
                    before[entry[1]] = entry[2]
        state: dict[str, list[Any]] = {}  # key -> [side, price, quantity, filled, is_limit, cancelled]
        out: dict[int, OrderState] = {}
        for i, r in rows_of:
            assert r.order_id is not None and r.market_id is not None
            key = order_key(r.contract, r.order_id)
            self.recent.setdefault(r.block_number, {})[key] = (r.market_id, r.order_id, r.trader)
            st = state.get(key)
            if st is None:
                if key not in before:  # no undo log for this block (not the applied head): state unknown
                    continue
                o = before[key]
                st = state[key] = ([o.side, o.price, o.quantity, o.filled, o.is_limit, o.cancelled] if o is not None
                                   else [None, None, None, 0, False, False])
            if r.kind == "open":
                st[0], st[1], st[2] = r.side, r.price, r.quantity
                st[4] = r.order_type != MARKET and (r.price or 0) > 0
            elif r.kind == "fill":
                st[3] += r.quantity or 0
            else:
                st[5] = True
            out[i] = OrderState(st[0], st[1], st[2], st[3], st[4], _status(st[2], st[3], st[5]))
        floor = (head.number if head is not None else 0) - self.books.keep_blocks
        for n in [n for n in self.recent if n < floor]:
            del self.recent[n]
        return out

    def _reverted(self, from_block: int) -> list[RevertedOrder]:
        """The orders whose events a rollback voided, as they are now (the books are already rolled back)."""
        touched: dict[str, tuple[int, str, str | None]] = {}
        for n in sorted(n for n in self.recent if n >= from_block):
            touched.update(self.recent.pop(n))
        out = []
        for key, (market_id, order_id, trader) in sorted(touched.items()):
            book = self.books.books.get(market_id)
            o = book.orders.get(key) if book is not None else None
            state = (OrderState(o.side, o.price, o.quantity, o.filled, o.is_limit,
                                _status(o.quantity, o.filled, o.cancelled)) if o is not None
                     else OrderState(None, None, None, 0, False, "reverted"))
            out.append(RevertedOrder(market_id, order_id, trader, state))
        return out


class PusherChannels:
    """Loop side: the subscribers of each Pusher channel and the events sent to them."""

    def __init__(self, hub: Hub, settings: PusherSettings):
        self.hub = hub
        self.settings = settings
        self.markets: dict[int, Subscribers] = defaultdict(dict)
        self.users: dict[str, Subscribers] = defaultdict(dict)
        self.tracker: OrderTracker | None = None
        hub.listeners.append(self.on_update)

    # -- follower thread ------------------------------------------------------------------------------------
    def attach(self, books: LiveBooks) -> None:
        self.tracker = OrderTracker(books)

    def prepare(self, update: Update) -> None:
        """Follower thread, before the update is handed to the loop: read the order states it needs, onto the
        update itself (the loop reads them in `on_update`; nothing to look up or leak when it never gets there)."""
        if self.tracker is not None:
            update.prepared = self.tracker.prepare(update)

    # -- subscriptions --------------------------------------------------------------------------------------
    def add(self, conn: Conn, ref: ChannelRef, market_id: int | None) -> None:
        subs = self.markets[market_id] if market_id is not None else self.users[ref.trader or ""]
        subs.setdefault(ref.name, set()).add(conn)
        metrics.SUBSCRIPTIONS.inc()

    def remove(self, conn: Conn, ref: ChannelRef, market_id: int | None) -> None:
        table: dict[Any, Subscribers] = self.markets if market_id is not None else self.users
        key: Any = market_id if market_id is not None else ref.trader or ""
        subs = table.get(key)
        conns = subs.get(ref.name) if subs is not None else None
        if conns is None or conn not in conns:
            return
        conns.discard(conn)
        metrics.SUBSCRIPTIONS.dec()
        if not conns:
            del subs[ref.name]  # type: ignore[union-attr]
            if not subs:
                del table[key]

    # -- events ---------------------------------------------------------------------------------------------
    def price_update(self, market_id: int, channel: str, reason: str) -> str | None:
        """The market's top of book now, as a `price-update` on `channel` (None before its first book)."""
        data = self._price_data(market_id, reason)
        return None if data is None else encode("price-update", data, channel)

    def _price_data(self, market_id: int, reason: str) -> str | None:
        v = self.hub.views.get(market_id)
        if v is None:
            return None
        n = self.settings.price_levels
        return dumps({"metricId": self.hub.names.get(market_id, str(market_id)), **depth_json(v, n, best=True),
                      "levels": n, "checksum": book_checksum(v.bids, v.asks, n), "reason": reason})

    def on_update(self, update: Update) -> None:
        """Hub listener (event loop): the update's events to every subscribed channel."""
        prepared = update.prepared or Prepared()  # None: no tracker attached, or a cluster node's update from Redis
        if update.reason in ("reorg", "reset"):
            self._reorg(update, prepared)
        self._rows(update, prepared)
        for v in update.views:
            subs = self.markets.get(v.market_id)
            if subs and not self.hub.is_paused(v.market_id):
                data = self._price_data(v.market_id, update.reason)
                if data is not None:
                    _send(subs, "price-update", data)

    def _rows(self, update: Update, prepared: Prepared) -> None:
        names = self.hub.names
        for i, r in enumerate(update.rows):
            if r.market_id is None or self.hub.is_paused(r.market_id):
                continue
            market_subs = self.markets.get(r.market_id)
            user_subs = self.users.get(r.trader) if r.trader else None
            if not market_subs and not user_subs:
                continue
            common = {"metricId": names.get(r.market_id, str(r.market_id)),
                      "block": {"number": r.block_number, "hash": r.block_hash}, "tx": r.tx_hash,
                      "logIndex": r.log_index}
            if r.kind == "trade":
                if market_subs:
                    _send(market_subs, "trading-event", dumps({
                        **common, "price": opt_str(r.price), "quantity": opt_str(r.quantity), "buyer": r.buyer,
                        "seller": r.seller}))
                continue
            if r.kind not in ("open", "fill", "cancel") or r.order_id is None:
                continue
            event, data = _order_event(r, prepared.row_states.get(i), common)
            for subs in (market_subs, user_subs):
                if subs:
                    _send(subs, event, data)

    def _reorg(self, update: Update, prepared: Prepared) -> None:
        """`reorg` on every market channel the rollback touched and on every user channel: which blocks are void
        and the corrected state of the orders their events touched; the price-update follows."""
        reset = update.reason == "reset"  # a rebuild: fromBlock is its first void block, or None after a restart
        head = self.hub.views[update.views[0].market_id] if update.views else None
        block = {"number": head.block_number, "hash": head.block_hash} if head is not None else None
        by_market: dict[int, list[dict[str, Any]]] = defaultdict(list)
        by_trader: dict[str, list[dict[str, Any]]] = defaultdict(list)
        names = self.hub.names
        for o in prepared.reverted:
            item = _order_fields(names.get(o.market_id, str(o.market_id)), o.order_id, o.trader, o.state)
            by_market[o.market_id].append(item)
            if o.trader:
                by_trader[o.trader].append(item)
        note = ("the service rebuilt its books: refetch orders and trades" if reset else
                "blocks from fromBlock on were replaced: their trades and order events are void; orders lists "
                "the corrected state of every order they touched; a price-update with the corrected book follows")
        markets = {v.market_id for v in update.views} | set(by_market)
        if reset:
            markets = set(self.markets)
        for m in markets:
            subs = self.markets.get(m)
            if subs and not self.hub.is_paused(m):
                _send(subs, "reorg", dumps({"metricId": names.get(m, str(m)), "fromBlock": update.reverted_from,
                                            "reset": reset, "block": block, "orders": by_market.get(m, []),
                                            "message": note}))
        for trader, subs in list(self.users.items()):
            _send(subs, "reorg", dumps({"trader": trader, "fromBlock": update.reverted_from, "reset": reset,
                                        "block": block, "orders": by_trader.get(trader, []), "message": note}))


def _order_fields(metric_id: str, order_id: str, trader: str | None, st: OrderState | None) -> dict[str, Any]:
    return {"metricId": metric_id, "orderId": order_id, "trader": trader,
            "side": _side(st.side) if st else None,
            "orderType": None if st is None or st.quantity is None else "limit" if st.is_limit else "market",
            "price": opt_str(st.price) if st else None, "quantity": opt_str(st.quantity) if st else None,
            "filled": str(st.filled) if st and st.quantity is not None else None,
            "remaining": opt_str(st.remaining) if st else None, "status": st.status if st else None}


def _order_event(r: OrderEventRow, st: OrderState | None, common: dict[str, Any]) -> tuple[str, str]:
    assert r.order_id is not None
    fields = _order_fields(common["metricId"], r.order_id, r.trader, st)
    if st is not None and st.side is None and r.side is not None:
        fields["side"] = _side(r.side)
    data: dict[str, Any] = {**fields, **common}
    if r.kind == "cancel":
        data["event"] = "cancelled"
        data["status"] = "cancelled"
        data["cancelledQuantity"] = (opt_str(st.quantity - st.filled) if st is not None and st.quantity is not None
                                     else None)
        return "order-cancelled", dumps(data)
    if r.kind == "open":
        data["event"] = "placed"
        data["fillQuantity"] = data["fillPrice"] = None
    else:
        data["event"] = "filled"
        data["fillQuantity"], data["fillPrice"] = opt_str(r.quantity), opt_str(r.price)
    return "order-update", dumps(data)


def _send(subs: Subscribers, event: str, data: str) -> None:
    """One serialization per channel name, the same string queued to each of its connections."""
    for channel, conns in list(subs.items()):
        text = encode(event, data, channel)
        for c in list(conns):
            c.send(text)
