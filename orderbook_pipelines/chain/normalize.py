"""Decoded contract events -> canonical order events (the rows of `order_events`), with their market.

Pure: market resolution takes a registry snapshot (and, for fills and cancels, a lookup of known orders), so
the same inputs always give the same rows. The one rule, shared by ingestion, reconciliation and the live
follower (storage/projections.py applies the same rule to stored rows):

- `emitter`: the log's contract is the market's contract;
- `metric_hash:<arg>`: the market whose keccak(metricId) the argument holds;
- `tx` (generation-1 router events that carry no market: OrderExecuted, OrderCancelled): a fill or cancel
  belongs to the market of its ORDER, known from the order's `open` in the same batch or from `order_markets`.
  Only when the order is unknown does the transaction decide, and only if it names exactly one market: a
  multicall can place, fill and cancel orders of several markets in one transaction.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from orderbook_pipelines.book.model import order_key
from orderbook_pipelines.chain.decoding import DecodedLog, EventSpec, LogPosition
from orderbook_pipelines.config import EventKind, EventMapping

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


# Markets of orders opened before the batch: order keys (book.model.order_key) -> market id, for the keys asked.
OrderMarkets = Callable[[set[str]], Mapping[str, int]]


_ID_FIELDS = ("order_id", "trader", "counterparty", "buy_order_id", "sell_order_id", "buyer", "seller")
_VALUE_FIELDS = ("side", "order_type", "price", "quantity")


@dataclass(frozen=True, slots=True)
class _Plan:
    """One event mapping resolved once per call (`normalize`, `metric_hashes_needed`): argument names per canonical
    field, market rule."""

    kind: str
    rule: str  # "emitter" | "metric_hash" | "tx" | other
    market_arg: str | None
    ids: tuple[str | None, ...]  # argument per _ID_FIELDS entry
    values: tuple[str | None, ...]  # argument per _VALUE_FIELDS entry


def _plan(mapping: EventMapping) -> _Plan:
    f = mapping.fields
    rule = mapping.market
    kind, arg = (("metric_hash", rule.split(":", 1)[1]) if rule.startswith("metric_hash:") else (rule, None))
    return _Plan(mapping.kind.value, kind, arg,
                 tuple(f.get(n) for n in _ID_FIELDS), tuple(f.get(n) for n in _VALUE_FIELDS))


def metric_hashes_needed(decoded: Iterable[DecodedLog]) -> set[str]:
    """Metric hashes referenced by events, so the caller can register unknown markets before normalizing."""
    out: set[str] = set()
    plans: dict[int, _Plan] = {}  # by id of the event's spec: its rule is read once, not once per log
    for _, spec, args in decoded:
        plan = plans.get(id(spec))
        if plan is None:
            plan = plans[id(spec)] = _plan(spec.mapping)
        if plan.rule == "metric_hash":
            out.add(str(args[plan.market_arg or ""]).lower())
    return out


_OPEN = EventKind.OPEN.value
RowBuilder = Callable[[LogPosition, dict[str, Any], "int | None", int], OrderEventRow]
# By what a builder is made of (every reader's decoder makes its own specs): one per configured event.
_builders: dict[tuple, RowBuilder] = {}


def _row_builder(spec: EventSpec, plan: _Plan) -> RowBuilder:
    """The row of one event's log as straight-line code, generated once per event spec from its mapping: ids as
    text (decimal for integers, else lowercased hex), values as decoded, a market order when an open's price is 0.
    Without the two comprehensions per log it replaces, normalizing the real mix takes a third less time.
    Argument names reach the code only as string literals (repr)."""
    key = (spec.source, spec.name, spec.indexed, spec.data, plan)  # args_json follows from the parameters
    got = _builders.get(key)
    if got is not None:
        return got
    ns: dict[str, Any] = {"Row": OrderEventRow, "args_json": spec.args_json, "source": spec.source,
                          "event": spec.name, "kind": plan.kind}
    code = ["def row(pos, a, market_id, chain_id):", "    bn, bh, th, ti, li, address = pos"]
    for var, arg in zip(_ID_FIELDS, plan.ids, strict=True):
        code += ([f"    {var} = None"] if arg is None else
                 [f"    v = a[{arg!r}]", f"    {var} = str(v) if isinstance(v, int) else str(v).lower()"])
    code += [f"    {var} = None" if arg is None else f"    {var} = a[{arg!r}]"
             for var, arg in zip(_VALUE_FIELDS, plan.values, strict=True)]
    if plan.kind == _OPEN:
        code.append(f"    if order_type is None: order_type = {ORDER_TYPE_MARKET} if price == 0 else "
                    f"{ORDER_TYPE_LIMIT}")
    code.append("    return Row(chain_id, bn, bh, th, ti, li, address, market_id, source, event, kind, order_id,"
                " trader, counterparty, side, order_type, price, quantity, buy_order_id, sell_order_id, buyer,"
                " seller, args_json(a))")
    exec("\n".join(code), ns)  # built above from the mapping; argument names only as literals
    _builders[key] = ns["row"]
    return ns["row"]


def normalize(decoded: list[DecodedLog], registry: MarketRegistry, chain_id: int,
              order_markets: OrderMarkets | None = None) -> list[OrderEventRow]:
    rows: list[OrderEventRow] = []
    needs_tx: list[OrderEventRow] = []
    plans: dict[int, tuple[_Plan, RowBuilder]] = {}  # by id of the event's spec: a backfill's logs share a handful
    by_address, by_hash = registry.by_address, registry.by_metric_hash
    for pos, spec, a in decoded:
        got = plans.get(id(spec))
        if got is None:
            plan = _plan(spec.mapping)
            got = plans[id(spec)] = (plan, _row_builder(spec, plan))
        plan, build = got
        if plan.rule == "emitter":
            market_id = by_address.get(pos.address)
        elif plan.rule == "metric_hash":
            market_id = by_hash.get(str(a[plan.market_arg or ""]).lower())
        else:
            market_id = None
        row = build(pos, a, market_id, chain_id)
        rows.append(row)
        if plan.rule == "tx":
            needs_tx.append(row)
    if needs_tx:
        _resolve_by_order(rows, needs_tx, order_markets)
    return rows


def _resolve_by_order(rows: list[OrderEventRow], needs: list[OrderEventRow],
                      order_markets: OrderMarkets | None) -> None:
    """`tx`-rule rows: the market of their order, else the single market their transaction names (the markets of
    a transaction are gathered only for the rows left over: most fills find their order)."""
    opened: dict[str, int] = {}
    for r in rows:
        if r.kind == "open" and r.market_id is not None and r.order_id is not None:
            opened[order_key(r.contract, r.order_id)] = r.market_id
    keys = {order_key(r.contract, r.order_id) for r in needs if r.order_id is not None}
    unknown = keys - opened.keys()
    known = order_markets(unknown) if unknown and order_markets is not None else {}
    found: list[tuple[OrderEventRow, int]] = []
    left: list[OrderEventRow] = []
    for row in needs:
        market = None
        if row.order_id is not None:
            key = order_key(row.contract, row.order_id)
            market = opened.get(key)
            if market is None:
                market = known.get(key)
        if market is None:
            left.append(row)
        else:
            found.append((row, market))
    if left:  # the markets the other rows of their transactions name (no `tx`-rule row has one yet)
        txs = {row.tx_hash for row in left}
        tx_markets: dict[str, set[int]] = defaultdict(set)
        for r in rows:
            if r.market_id is not None and r.tx_hash in txs:
                tx_markets[r.tx_hash].add(r.market_id)
        for row in left:
            markets = tx_markets.get(row.tx_hash)
            row.market_id = next(iter(markets)) if markets is not None and len(markets) == 1 else None
    for row, market in found:
        row.market_id = market
