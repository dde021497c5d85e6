"""Decoded contract events -> canonical order events (the rows of `order_events`).

Pure: market resolution takes a registry snapshot, so the same logs always give the same rows. Generation 1
router events carry no market address, and some carry no market at all (OrderExecuted); those take the
market of the other logs of their transaction, which is where the contracts put it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from orderbook_pipelines.config import EventKind
from orderbook_pipelines.decoding import DecodedLog

ORDER_TYPE_MARKET = 0
ORDER_TYPE_LIMIT = 1


@dataclass(frozen=True)
class MarketRegistry:
    """Snapshot of the market registry used for resolution (address and metric hash -> market id)."""

    by_address: dict[str, int]
    by_metric_hash: dict[str, int]


@dataclass(slots=True)
class OrderEventRow:
    chain_id: int
    block_number: int
    block_hash: str
    tx_hash: str
    tx_index: int
    log_index: int
    contract: str
    market_id: int | None
    source: str
    event_name: str
    kind: str
    order_id: str | None
    trader: str | None
    counterparty: str | None
    side: int | None
    order_type: int | None
    price: int | None
    quantity: int | None
    buy_order_id: str | None
    sell_order_id: str | None
    buyer: str | None
    seller: str | None
    args: str


def _id_text(v: Any) -> str | None:
    if v is None:
        return None
    return str(v) if isinstance(v, int) else str(v).lower()


def metric_hashes_needed(decoded: Iterable[DecodedLog]) -> set[str]:
    """Metric hashes referenced by events, so the caller can register unknown markets before normalizing."""
    out: set[str] = set()
    for d in decoded:
        rule = d.mapping.market
        if rule.startswith("metric_hash:"):
            out.add(str(d.args[rule.split(":", 1)[1]]).lower())
    return out


def normalize(decoded: list[DecodedLog], registry: MarketRegistry, chain_id: int) -> list[OrderEventRow]:
    rows: list[OrderEventRow] = []
    by_tx: dict[str, list[OrderEventRow]] = defaultdict(list)
    needs_tx: list[OrderEventRow] = []
    for d in decoded:
        f = d.mapping.fields
        a = d.args

        def get(name: str, f: dict[str, str] = f, a: dict[str, Any] = a) -> Any:
            return a[f[name]] if name in f else None

        rule = d.mapping.market
        market_id: int | None
        if rule == "emitter":
            market_id = registry.by_address.get(d.pos.address)
        elif rule.startswith("metric_hash:"):
            market_id = registry.by_metric_hash.get(str(a[rule.split(":", 1)[1]]).lower())
        else:
            market_id = None
        price = get("price")
        order_type = get("order_type")
        if d.mapping.kind == EventKind.OPEN and order_type is None:
            order_type = ORDER_TYPE_MARKET if price == 0 else ORDER_TYPE_LIMIT
        row = OrderEventRow(
            chain_id=chain_id,
            block_number=d.pos.block_number,
            block_hash=d.pos.block_hash,
            tx_hash=d.pos.tx_hash,
            tx_index=d.pos.tx_index,
            log_index=d.pos.log_index,
            contract=d.pos.address,
            market_id=market_id,
            source=d.source,
            event_name=d.event,
            kind=d.mapping.kind.value,
            order_id=_id_text(get("order_id")),
            trader=_id_text(get("trader")),
            counterparty=_id_text(get("counterparty")),
            side=get("side"),
            order_type=order_type,
            price=price,
            quantity=get("quantity"),
            buy_order_id=_id_text(get("buy_order_id")),
            sell_order_id=_id_text(get("sell_order_id")),
            buyer=_id_text(get("buyer")),
            seller=_id_text(get("seller")),
            args=orjson.dumps({k: (str(v) if isinstance(v, int) and not isinstance(v, bool) else v)
                               for k, v in a.items()}, option=orjson.OPT_SORT_KEYS).decode(),
        )
        rows.append(row)
        by_tx[row.tx_hash].append(row)
        if rule == "tx":
            needs_tx.append(row)
    for row in needs_tx:
        markets = {r.market_id for r in by_tx[row.tx_hash] if r.market_id is not None and r is not row}
        if len(markets) == 1:
            row.market_id = markets.pop()
    return rows
