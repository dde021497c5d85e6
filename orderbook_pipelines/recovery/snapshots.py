"""Depth snapshots: per market, the full book at a block-range boundary (its resting orders, levels, CRC32
checksum and sha256 state hash), and where the snapshot objects go.

Snapshots are taken at the ingested frontier and built incrementally (recovery/restore.py): the previous
verified snapshot plus the stored events since. recovery/store.py persists them; recovery/retention.py bounds
how many are kept."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from orderbook_pipelines.book.checksum import book_checksum
from orderbook_pipelines.book.model import BUY, SELL, Level, order_key
from orderbook_pipelines.book.replay import MarketReplay
from orderbook_pipelines.config import PROJECT_ROOT

CHECKSUM_DEPTH = 25


class SnapshotSettings(BaseSettings):
    """Where snapshot objects go and how many are kept (environment: OBP_SNAPSHOT_DIR, ..._KEEP_LAST, ...)."""

    model_config = SettingsConfigDict(env_prefix="OBP_SNAPSHOT_", extra="ignore")

    dir: Path = PROJECT_ROOT / ".run" / "objectstore"
    keep_last: int = 24
    keep_daily: bool = True




@dataclass(frozen=True, slots=True)
class SnapshotOrder:
    contract: str
    order_id: str
    trader: str | None
    side: int
    price: int
    quantity: int
    filled: int

    @property
    def remaining(self) -> int:
        return self.quantity - self.filled


@dataclass
class MarketSnapshot:
    market_id: int
    market: str
    block_number: int
    block_hash: str
    block_time: datetime
    orders: list[SnapshotOrder]
    bids: list[Level]
    asks: list[Level]
    state_hash: str
    base_block: int | None = None

    @property
    def checksum(self) -> int:
        return checksum(self.bids, self.asks)

    def levels_json(self) -> str:
        return json.dumps({"bids": [[str(lv.price), str(lv.quantity), lv.orders] for lv in self.bids],
                           "asks": [[str(lv.price), str(lv.quantity), lv.orders] for lv in self.asks]},
                          separators=(",", ":"))

    def parquet_key(self) -> str:
        return f"snapshots/market={self.market_id}/block={self.block_number}.parquet"


def checksum(bids: list[Level], asks: list[Level], depth: int = CHECKSUM_DEPTH) -> int:
    """The live protocol's checksum (book/checksum.py) of these levels."""
    return book_checksum([(lv.price, lv.quantity) for lv in bids], [(lv.price, lv.quantity) for lv in asks], depth)


def snapshot_of(mr: MarketReplay, market_id: int, market: str, block: int, block_hash: str, block_time: datetime,
                base_block: int | None) -> MarketSnapshot:
    book = mr.book
    orders = []
    for key, o in book.orders.items():
        if o.resting <= 0 or o.side is None or o.price is None or o.quantity is None:
            continue
        known = mr.traders.get(key)
        if known is not None:
            contract, order_id, trader = known
        else:  # restored without traders: the key still names the order (book.model.order_key)
            contract, _, order_id = key.partition(":")
            trader = None
        orders.append(SnapshotOrder(contract, order_id, trader, o.side, o.price, o.quantity, o.filled))
    orders.sort(key=lambda s: (s.contract, s.order_id))
    n = len(book.orders) + 1
    return MarketSnapshot(market_id, market, block, block_hash, block_time, orders, book.levels(BUY, n),
                          book.levels(SELL, n), book.state_hash(), base_block)


def replay_from_orders(orders: Iterable[SnapshotOrder], traders: bool = True) -> MarketReplay:
    """Rebuild a market's book from resting orders (bulk load: the same state as an open then a fill each)."""
    mr = MarketReplay(strict=False)
    orders = list(orders)
    mr.book.load_resting((order_key(o.contract, o.order_id), o.side, o.price, o.quantity, o.filled) for o in orders)
    if traders:
        mr.traders.update({order_key(o.contract, o.order_id): (o.contract, o.order_id, o.trader) for o in orders})
    return mr
