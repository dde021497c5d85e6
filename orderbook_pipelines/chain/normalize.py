"""Raw logs (`read_rows`) and decoded contract events (`normalize`) -> canonical order events (the rows of
`order_events`), with their market.

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
from functools import partial
from typing import Any

from orderbook_pipelines.book.model import order_key
from orderbook_pipelines.chain.decoding import (
    DecodedLog,
    Decoder,
    DirectRow,
    EventSpec,
    LogPosition,
    Rejected,
    decode_lines,
    json_template,
)
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
    """One event mapping resolved once per call: argument names per canonical field, market rule."""

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


_OPEN = EventKind.OPEN.value
RowBuilder = Callable[[LogPosition, dict[str, Any], "int | None", int], OrderEventRow]
# A log straight to its row, before its registry, chain and batch lists are bound (`_direct_builder`).
DirectBuilder = Callable[..., OrderEventRow]
# By what a builder is made of (every reader's decoder makes its own specs): one per configured event.
_builders: dict[tuple, RowBuilder] = {}
_direct_builders: dict[tuple, DirectBuilder | None] = {}
_ROW = ("Row(chain_id, bn, bh, th, ti, li, address, market_id, source, event, kind, order_id, trader, counterparty,"
        " side, order_type, price, quantity, buy_order_id, sell_order_id, buyer, seller, {args})")


def _field_lines(plan: _Plan, arg: Callable[[str], str]) -> list[str]:
    """The canonical fields of a row as code, `arg(name)` being the expression of an argument's value: ids as text
    (decimal for integers, else lowercased hex), values as decoded, a market order when an open's price is 0."""
    code: list[str] = []
    for var, name in zip(_ID_FIELDS, plan.ids, strict=True):
        code += ([f"    {var} = None"] if name is None else
                 [f"    v = {arg(name)}", f"    {var} = str(v) if isinstance(v, int) else str(v).lower()"])
    code += [f"    {var} = None" if name is None else f"    {var} = {arg(name)}"
             for var, name in zip(_VALUE_FIELDS, plan.values, strict=True)]
    if plan.kind == _OPEN:
        code.append(f"    if order_type is None: order_type = {ORDER_TYPE_MARKET} if price == 0 else "
                    f"{ORDER_TYPE_LIMIT}")
    return code


def _key(spec: EventSpec, plan: _Plan) -> tuple:
    return (spec.source, spec.name, spec.indexed, spec.data, plan)  # args_json follows from the parameters


def _row_builder(spec: EventSpec, plan: _Plan) -> RowBuilder:
    """The row of one decoded log as straight-line code, generated once per event spec from its mapping. Without
    the two comprehensions per log it replaces, normalizing the real mix takes a third less time. Argument names
    reach the code only as string literals (repr)."""
    key = _key(spec, plan)
    got = _builders.get(key)
    if got is not None:
        return got
    ns: dict[str, Any] = {"Row": OrderEventRow, "args_json": spec.args_json, "source": spec.source,
                          "event": spec.name, "kind": plan.kind}
    code = ["def row(pos, a, market_id, chain_id):", "    bn, bh, th, ti, li, address = pos",
            *_field_lines(plan, lambda name: f"a[{name!r}]"), "    return " + _ROW.format(args="args_json(a)")]
    exec("\n".join(code), ns)  # built above from the mapping; argument names only as literals
    _builders[key] = ns["row"]
    return ns["row"]


def _direct_builder(spec: EventSpec, plan: _Plan) -> DirectBuilder | None:
    """The row of one log straight from its JSON, for an all-static event whose arguments JSON is a template:
    `decode_lines` (the generated decoder's checks and values) followed by `_field_lines` and the template, with
    no decoded log or arguments dict between (the real mix's first range: a median of 4.8 against 6.6 us per log
    for decode and normalize). It refuses (raises) whatever the generated decoder refuses, before it has touched
    `unknown` or `needs`; `read_rows` then takes the generic path. None for the other events."""
    key = _key(spec, plan)
    if key in _direct_builders:
        return _direct_builders[key]
    template = json_template(spec) if spec.fast_args is not None else None
    fn: DirectBuilder | None = None
    named = {p.name for p in (*spec.indexed, *spec.data)}
    used = {n for n in (*plan.ids, *plan.values, plan.market_arg) if n is not None}
    if template is not None and used <= named:  # else the generic path, as before (a loaded config has no such)
        ns, code, items = decode_lines(spec)
        var = {p.name: v for p, v in items}
        ns.update(Row=OrderEventRow, source=spec.source, event=spec.name, kind=plan.kind)
        code = ["def row(by_address, by_hash, chain_id, unknown, needs, log, bn, bh, th, ti, li, address):",
                "    topics = log['topics']", "    data_hex = log['data']", *code]
        if plan.rule == "emitter":
            code.append("    market_id = by_address.get(address)")
        elif plan.rule == "metric_hash":
            code += [f"    h = str({var[plan.market_arg or '']}).lower()", "    market_id = by_hash.get(h)"]
        else:
            code.append("    market_id = None")
        fmt, names = template
        values = "".join(f"{var[n]}, " for n in names)
        code += [*_field_lines(plan, var.__getitem__), "    row = " + _ROW.format(args=f"{fmt!r} % ({values})")]
        if plan.rule == "metric_hash":
            code.append("    if market_id is None: unknown.setdefault(h, source)")
        if plan.rule == "tx":
            code.append("    needs.append(row)")
        code.append("    return row")
        exec("\n".join(code), ns)  # from the ABI and the mapping; argument names only as literals
        fn = ns["row"]
    _direct_builders[key] = fn
    return fn


class _Rows:
    """One batch's rows, log by log: the market by its rule, the `tx`-rule rows and the unknown metric hashes
    noted for after the batch (`normalize`, `read_rows`)."""

    def __init__(self, registry: MarketRegistry, chain_id: int) -> None:
        self.by_address, self.by_hash, self.chain_id = registry.by_address, registry.by_metric_hash, chain_id
        self.needs_tx: list[OrderEventRow] = []
        self.unknown: dict[str, str] = {}  # metric hash -> source of the event naming it
        self.plans: dict[int, tuple[_Plan, RowBuilder]] = {}  # by id of the spec: a batch's logs share a handful

    def row(self, decoded: DecodedLog) -> OrderEventRow:
        pos, spec, a = decoded
        got = self.plans.get(id(spec))
        if got is None:
            plan = _plan(spec.mapping)
            got = self.plans[id(spec)] = (plan, _row_builder(spec, plan))
        plan, build = got
        if plan.rule == "emitter":
            market_id = self.by_address.get(pos.address)
        elif plan.rule == "metric_hash":
            h = str(a[plan.market_arg or ""]).lower()
            market_id = self.by_hash.get(h)
            if market_id is None:
                self.unknown.setdefault(h, spec.source)
        else:
            market_id = None
        row = build(pos, a, market_id, self.chain_id)
        if plan.rule == "tx":
            self.needs_tx.append(row)
        return row

    def direct(self, decoder: Decoder) -> dict[tuple[str, str], DirectRow[OrderEventRow]]:
        """`_direct_builder` of each of the decoder's events that has one, bound to this batch."""
        out: dict[tuple[str, str], DirectRow[OrderEventRow]] = {}
        for key, spec in decoder.specs.items():
            fn = _direct_builder(spec, _plan(spec.mapping))
            if fn is not None:
                out[key] = partial(fn, self.by_address, self.by_hash, self.chain_id, self.unknown, self.needs_tx)
        return out


def normalize(decoded: list[DecodedLog], registry: MarketRegistry, chain_id: int,
              order_markets: OrderMarkets | None = None) -> list[OrderEventRow]:
    """The rows of decoded logs (the generic path of `read_rows`)."""
    batch = _Rows(registry, chain_id)
    rows = [batch.row(d) for d in decoded]
    if batch.needs_tx:
        _resolve_by_order(rows, batch.needs_tx, order_markets)
    return rows


@dataclass(frozen=True)
class RowsRead:
    rows: list[OrderEventRow]
    rejected: list[Rejected]
    unknown_metric_hashes: dict[str, str]  # metric hashes with no market in the registry -> source naming them


def read_rows(decoder: Decoder, logs: Iterable[dict], registry: MarketRegistry, chain_id: int,
              order_markets: OrderMarkets | None = None) -> RowsRead:
    """Raw logs -> their rows in chain order, and the logs rejected with a reason: `normalize` of
    `decoder.decode_all`, each log of an all-static event built straight from its JSON (`_direct_builder`)."""
    batch = _Rows(registry, chain_id)
    rows, rejected = decoder.read_all(logs, batch.direct(decoder), batch.row)
    if batch.needs_tx:
        _resolve_by_order(rows, batch.needs_tx, order_markets)
    return RowsRead(rows, rejected, batch.unknown)


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
