"""Fan-out of live book updates to WebSocket subscribers (asyncio side of the live service).

A book channel is (market, depth, interval). It remembers the top-N view it last *sent*; a delta is the
difference between that view and the market's current view (levels leaving the window are sent with size 0),
serialized once and queued as the same string to every subscriber. A new subscriber's snapshot is the
channel's last-sent view, so its first delta's prev_seq is the snapshot's seq. With interval_ms > 0 the diff
is taken once per window, which merges every change of a level inside the window.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from orderbook_pipelines.book.checksum import book_checksum
from orderbook_pipelines.live import metrics
from orderbook_pipelines.live.follower import Update
from orderbook_pipelines.live.state import MarketView

DEPTHS = (20, 50, 100)
INTERVALS = (0, 100, 1000)
Levels = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Limits:
    max_subscriptions: int = 20
    max_connections_per_client: int = 10
    max_message_bytes: int = 4096
    queue_size: int = 512
    max_conflations: int = 3
    conflation_window_s: float = 30.0
    idle_timeout_s: float = 60.0
    messages_per_second: int = 20
    max_batch_bytes: int = 65536  # an outgoing batch frame (option `batch`) never exceeds this many bytes


def dumps(msg: dict[str, Any]) -> str:
    """A message as text, the form every WebSocket (ours and Pusher's) queues once and sends to many."""
    return orjson.dumps(msg).decode()


def opt_str(v: Any) -> str | None:
    """Amounts go out as decimal strings (a JSON number loses precision past 2**53); a missing one stays null."""
    return None if v is None else str(v)


def levels_json(levels: Levels) -> list[list[str]]:
    """[[price, size], ...] as decimal strings: the one wire form of book levels, in every protocol."""
    return [[str(p), str(q)] for p, q in levels]


class BookLike(Protocol):
    """What `depth_json` reads: a market's view, or a book channel's last-sent view."""

    @property
    def seq(self) -> int: ...
    @property
    def block_number(self) -> int: ...
    @property
    def block_hash(self) -> str: ...
    @property
    def bids(self) -> Levels: ...
    @property
    def asks(self) -> Levels: ...


def depth_json(book: BookLike, n: int, best: bool = False) -> dict[str, Any]:
    """`seq`, `block` and the top `n` levels per side (then `bestBid`/`bestAsk` with `best`): the book body of the
    WebSocket snapshot, /api/depth, /api/compat/orders and the Pusher price-update, built here only so that they
    cannot drift apart. Callers put their market key before it and their extras after (dict order is wire order)."""
    bids, asks = book.bids[:n], book.asks[:n]
    out: dict[str, Any] = {"seq": book.seq, "block": {"number": book.block_number, "hash": book.block_hash},
                           "bids": levels_json(bids), "asks": levels_json(asks)}
    if best:
        out["bestBid"] = opt_str(bids[0][0] if bids else None)
        out["bestAsk"] = opt_str(asks[0][0] if asks else None)
    return out


class Conn:
    """One WebSocket connection's outgoing side: a bounded queue drained by a sender task."""

    def __init__(self, hub: Hub, client: str, limits: Limits):
        self.hub = hub
        self.client = client
        self.limits = limits
        self.queue: asyncio.Queue[str | tuple[str, int, str]] = asyncio.Queue(maxsize=limits.queue_size)
        self.books: set[tuple[int, int, int]] = set()
        self.trades: set[int] = set()
        self.orders: set[str] = set()
        self.conflations: deque[float] = deque()
        self.closing = False
        self.batch = False  # option `batch`: the sender packs pending messages into one JSON-array frame

    @property
    def subscription_count(self) -> int:
        return len(self.books) + len(self.trades) + len(self.orders)

    def send(self, text: str) -> None:
        if self.closing:
            return
        try:
            self.queue.put_nowait(text)
        except asyncio.QueueFull:
            self._slow_consumer()

    def batch_frame(self, first: str) -> tuple[str, str | tuple[str, int, str] | None]:
        """`first` plus every message already queued, as one JSON array of the serialized messages, at most
        `max_batch_bytes` long (a lone larger message goes alone). Returns the frame and the item taken from the
        queue that did not fit (or a close), which the sender handles next. Messages are joined, never
        re-serialized: each delta is still encoded once per channel and shared by all its subscribers."""
        limit = self.limits.max_batch_bytes
        parts = [first]
        size = _nbytes(first) + 2
        q = self.queue
        carry: str | tuple[str, int, str] | None = None
        while not q.empty():
            item = q.get_nowait()
            if isinstance(item, tuple):
                carry = item
                break
            n = _nbytes(item) + 1
            if size + n > limit:
                carry = item
                break
            parts.append(item)
            size += n
        return "[" + ",".join(parts) + "]", carry

    def close(self, code: int, error: str, message: str) -> None:
        """Queue an error and a close; everything queued before it is dropped (the client is going away)."""
        if self.closing:
            return
        self.closing = True
        _drain(self.queue)
        self.queue.put_nowait((error, code, message))

    def _slow_consumer(self) -> None:
        """Bounded memory: drop the backlog and resend fresh snapshots; disconnect a consumer that keeps lagging."""
        now = time.monotonic()
        while self.conflations and now - self.conflations[0] > self.limits.conflation_window_s:
            self.conflations.popleft()
        self.conflations.append(now)
        dropped = self.queue.qsize()
        _drain(self.queue)
        metrics.MESSAGES_DROPPED.inc(dropped)
        fresh = self.resync_messages()
        if len(self.conflations) > self.limits.max_conflations or len(fresh) > self.limits.queue_size:
            # (a resync that cannot fit in the queue would overflow it again: the client cannot be caught up)
            metrics.SLOW_CONSUMER_DISCONNECTS.inc()
            self.close(4008, "slow_consumer", f"disconnected: the send queue overflowed {len(self.conflations)} "
                                              f"times in {self.limits.conflation_window_s:.0f}s")
            return
        metrics.CONFLATIONS.inc()
        for text in fresh:
            self.queue.put_nowait(text)

    def resync_messages(self) -> list[str]:
        """What replaces a dropped backlog: a fresh snapshot per book subscription (other protocols override)."""
        return [self.hub.channels[key].snapshot(resync=True) for key in sorted(self.books)]


def _nbytes(text: str) -> int:
    """UTF-8 length; messages are ASCII almost always, where the length is free."""
    return len(text) if text.isascii() else len(text.encode())


def _drain(q: asyncio.Queue) -> None:
    while not q.empty():
        q.get_nowait()


@dataclass
class BookChannel:
    hub: Hub
    market_id: int
    depth: int
    interval_ms: int
    bids: Levels = ()
    asks: Levels = ()
    seq: int = 0
    block_number: int = -1
    block_hash: str = ""
    subscribers: set[Conn] = field(default_factory=set)
    dirty: bool = False
    flushed_at: float = 0.0

    def base(self) -> dict[str, Any]:
        return {"channel": "book", "market": self.hub.names.get(self.market_id, str(self.market_id)),
                "depth": self.depth, "interval_ms": self.interval_ms}

    def load(self, view: MarketView | None) -> None:
        if view is None:
            return
        self.bids, self.asks = view.bids[: self.depth], view.asks[: self.depth]
        self.seq, self.block_number, self.block_hash = view.seq, view.block_number, view.block_hash

    def snapshot(self, resync: bool = False, reset: bool = False) -> str:
        msg = {"type": "snapshot", **self.base(), **depth_json(self, self.depth),
               "checksum": book_checksum(self.bids, self.asks, self.depth)}
        if resync:
            msg["resync"] = True
        if reset:
            msg["reset"] = True
        return dumps(msg)

    def flush(self) -> str | None:
        """Diff the last-sent view against the market's current view; None when nothing visible changed."""
        self.dirty = False
        self.flushed_at = time.monotonic()
        view = self.hub.views.get(self.market_id)
        if view is None or view.seq == self.seq:
            return None
        bids, asks = view.bids[: self.depth], view.asks[: self.depth]
        d_bids, d_asks = _diff(self.bids, bids), _diff(self.asks, asks)
        if not d_bids and not d_asks:
            return None  # nothing visible changed: prev_seq chains what was *sent*, so seq stays as sent
        prev = self.seq
        self.bids, self.asks = bids, asks
        self.seq, self.block_number, self.block_hash = view.seq, view.block_number, view.block_hash
        msg = dumps({"type": "delta", **self.base(), "seq": view.seq, "prev_seq": prev,
                     "block": {"number": view.block_number, "hash": view.block_hash},
                     "bids": levels_json(d_bids), "asks": levels_json(d_asks),
                     "checksum": book_checksum(bids, asks, self.depth)})
        return msg


def _diff(old: Levels, new: Levels) -> Levels:
    before = dict(old)
    after = dict(new)
    out = [(p, q) for p, q in new if before.get(p) != q]
    out += [(p, 0) for p in before if p not in after]
    return tuple(out)


class Hub:
    def __init__(self, limits: Limits | None = None):
        self.limits = limits or Limits()
        self.views: dict[int, MarketView] = {}
        self.names: dict[int, str] = {}
        self.by_name: dict[str, int] = {}
        self.publishable: set[int] = set()
        self.paused_all = False
        self.paused: set[int] = set()
        self.channels: dict[tuple[int, int, int], BookChannel] = {}
        self.trade_subs: dict[int, set[Conn]] = defaultdict(set)
        self.order_subs: dict[str, set[Conn]] = defaultdict(set)
        self.connections: dict[str, int] = defaultdict(int)
        self.publish_latency: deque[float] = deque(maxlen=10_000)
        self.version = 0  # bumped on every change of views, names or pauses: the REST response caches' key
        self.listeners: list[Callable[[Update], None]] = []  # other protocols' fan-out (live/pusher_channels.py)

    # -- registry / control ---------------------------------------------------------------------------------
    def set_markets(self, names: dict[int, str], publishable: set[int]) -> None:
        self.version += 1
        self.names = dict(names)
        self.by_name = {n: m for m, n in names.items()}
        self.publishable = set(publishable)

    def is_paused(self, market_id: int) -> bool:
        return self.paused_all or market_id in self.paused

    def set_paused(self, market_id: int | None, paused: bool) -> None:
        self.version += 1
        if market_id is None:
            self.paused_all = paused
        elif paused:
            self.paused.add(market_id)
        else:
            self.paused.discard(market_id)
        if not paused:  # catch clients up with one delta per channel
            for ch in list(self.channels.values()):
                if market_id is None or ch.market_id == market_id:
                    self._flush(ch)

    # -- updates from the follower --------------------------------------------------------------------------
    def on_update(self, update: Update) -> None:
        self.version += 1
        for v in update.views:
            self.views[v.market_id] = v
        touched = {v.market_id for v in update.views}
        for ch in list(self.channels.values()):
            if ch.market_id not in touched:
                continue
            if update.reason == "reset":
                ch.load(self.views.get(ch.market_id))
                text = ch.snapshot(reset=True)
                for c in list(ch.subscribers):
                    c.send(text)
            elif ch.interval_ms == 0:
                self._flush(ch)
            else:
                ch.dirty = True
        if update.block_seen_at:
            self.publish_latency.append(time.perf_counter() - update.block_seen_at)
        self._publish_rows(update)
        for listener in self.listeners:
            listener(update)

    def _flush(self, ch: BookChannel) -> None:
        if not ch.subscribers:  # nobody to tell: keep the channel at the current view
            ch.load(self.views.get(ch.market_id))
            return
        if self.is_paused(ch.market_id):
            return
        text = ch.flush()
        if text is None:
            return
        metrics.DELTAS_SENT.inc(len(ch.subscribers))
        for c in list(ch.subscribers):
            c.send(text)

    def flush_due(self, now: float | None = None) -> None:
        """Called on a short timer: emit coalesced deltas whose window has elapsed."""
        now = time.monotonic() if now is None else now
        for ch in list(self.channels.values()):
            if ch.dirty and now - ch.flushed_at >= ch.interval_ms / 1000:
                self._flush(ch)

    def _publish_rows(self, update: Update) -> None:
        if update.reverted_from is not None:  # a rollback, or a rebuild after a deeper reorg
            text = dumps({"type": "reverted", "from_block": update.reverted_from,
                          "message": "a reorg removed blocks from this number on; their trades/orders are void"})
            for subs in (*self.trade_subs.values(), *self.order_subs.values()):
                for c in list(subs):
                    c.send(text)
        for r in update.rows:
            if r.market_id is None or self.is_paused(r.market_id):
                continue
            market = self.names.get(r.market_id, str(r.market_id))
            block = {"number": r.block_number, "hash": r.block_hash}
            if r.kind == "trade" and self.trade_subs.get(r.market_id):
                text = dumps({"type": "trade", "channel": "trades", "market": market, "block": block,
                              "tx": r.tx_hash, "log_index": r.log_index, "price": str(r.price),
                              "quantity": str(r.quantity), "buyer": r.buyer, "seller": r.seller})
                for c in list(self.trade_subs[r.market_id]):
                    c.send(text)
            if r.trader and r.kind in ("open", "fill", "cancel") and self.order_subs.get(r.trader):
                text = dumps({"type": "order", "channel": "orders", "trader": r.trader, "market": market,
                              "event": r.kind, "order_id": r.order_id, "side": r.side,
                              "price": None if r.price is None else str(r.price),
                              "quantity": None if r.quantity is None else str(r.quantity), "block": block})
                for c in list(self.order_subs[r.trader]):
                    c.send(text)

    # -- subscriptions --------------------------------------------------------------------------------------
    def subscribe_book(self, conn: Conn, market_id: int, depth: int, interval_ms: int) -> str:
        key = (market_id, depth, interval_ms)
        ch = self.channels.get(key)
        if ch is None:
            ch = self.channels[key] = BookChannel(self, market_id, depth, interval_ms)
            ch.load(self.views.get(market_id))
        elif not ch.subscribers:
            ch.load(self.views.get(market_id))
        ch.subscribers.add(conn)
        conn.books.add(key)
        metrics.SUBSCRIPTIONS.inc()
        return ch.snapshot()

    def unsubscribe_book(self, conn: Conn, key: tuple[int, int, int]) -> None:
        ch = self.channels.get(key)
        if ch is not None:
            ch.subscribers.discard(conn)
        if key in conn.books:
            conn.books.discard(key)
            metrics.SUBSCRIPTIONS.dec()

    def drop(self, conn: Conn) -> None:
        for key in list(conn.books):
            self.unsubscribe_book(conn, key)
        for m in conn.trades:
            self.trade_subs[m].discard(conn)
            metrics.SUBSCRIPTIONS.dec()
        for t in conn.orders:
            self.order_subs[t].discard(conn)
            metrics.SUBSCRIPTIONS.dec()
        conn.trades.clear()
        conn.orders.clear()
