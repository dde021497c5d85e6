"""Book and invariant checks of stored ranges: the indexed book must equal the chain, and must be sane.

`check_books` rebuilds each sampled market's book from the stored event stream up to the range's processed
block with the shared book model and compares it with the contract's own views called AT THAT BLOCK (bestBid,
bestAsk, getLevels; getOrder for a sample of open orders). View ABIs come from each source's configured ABI
file. `check_invariants` checks in SQL what must never happen whatever the chain says. Both record a row per
market and range in `market_checks`, which is what canary markets need to become publishable; the Dagster
asset checks (assets/checks.py) block downstream assets on a failed range.
"""

import json
import re
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, text

from orderbook_pipelines.book.model import BUY, SELL, Book, order_key
from orderbook_pipelines.book.replay import replay
from orderbook_pipelines.chain.decoding import canonical_type
from orderbook_pipelines.chain.rpc import ChainClient, RpcError
from orderbook_pipelines.chain.views import ContractViews, NoContractCode
from orderbook_pipelines.config import ProjectConfig
from orderbook_pipelines.ingestion.reader import log_addresses
from orderbook_pipelines.quality import canary
from orderbook_pipelines.storage import checkpoints, registry
from orderbook_pipelines.storage.events import stored_events

BOOK_CHECK = "book_equals_chain"
INVARIANTS_CHECK = "order_invariants"
OPEN_STATUS = 1  # getOrder status of a resting order, in every known generation (1 open, 2 filled, 3 cancelled)
_QTY_OUTPUTS = ("quantity", "size")
# How nodes say they keep no state at a past block: anvil --prune-history (make run's dev chain), geth/erigon/reth
# beyond their state window. A book check there cannot be evaluated; it is not a difference.
_STATE_PRUNED = re.compile(r"BlockOutOfRange|missing trie node|historical state|state (is )?not available|"
                           r"state histor|pruned", re.I)


def state_unavailable(chain: ChainClient, block: int) -> str | None:
    """None if the node can run calls at `block`; else its answer (past state pruned)."""
    try:
        chain.call("eth_getBalance", ["0x" + "00" * 20, hex(block)])
        return None
    except RpcError as exc:
        if _STATE_PRUNED.search(str(exc)):
            return str(exc)
        raise


@dataclass
class MarketResult:
    market_id: int
    metric_id: str
    passed: bool
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckReport:
    range_start: int
    range_end: int
    block: int | None = None
    skipped: str | None = None
    markets: list[MarketResult] = field(default_factory=list)
    orders_checked: int = 0
    violations: dict[str, list[dict]] = field(default_factory=dict)
    not_evaluated: dict[str, str] = field(default_factory=dict)  # invariant -> the missing history it needs

    @property
    def failed(self) -> list[MarketResult]:
        return [m for m in self.markets if not m.passed]

    @property
    def passed(self) -> bool:
        return not self.failed and not any(self.violations.values())


def _views_by_source(config: ProjectConfig, chain: ChainClient) -> dict[str, ContractViews]:
    return {s.name: ContractViews(chain, s.abi_entries) for s in config.sources}


def sample_markets(conn: Connection, config: ProjectConfig, views: dict[str, ContractViews], start: int,
                   end: int, k: int) -> list[Any]:
    """Every canary, then markets active in the range, then the rest, rotating by range; at most k + canaries."""
    rows = conn.execute(
        text("""SELECT m.market_id, m.metric_id, m.address, m.source, m.status,
                       EXISTS (SELECT 1 FROM order_events e WHERE e.market_id = m.market_id
                                 AND e.block_number BETWEEN :s AND :e) AS busy
                FROM markets m WHERE m.chain_id = :c AND m.address IS NOT NULL AND m.status <> 'unregistered'
                ORDER BY (m.status = 'canary') DESC, 6 DESC, md5(m.market_id::text || ':' || CAST(:s AS text))"""),
        {"c": config.chain.chain_id, "s": start, "e": end},
    ).all()
    usable = [r for r in rows if r.source in views and views[r.source].has("bestBid", "bestAsk", "getLevels")]
    canaries = [r for r in usable if r.status == "canary"]
    return canaries + [r for r in usable if r.status != "canary"][: max(0, k - len(canaries))]


def rebuild_books(conn: Connection, chain_id: int, market_ids: list[int], block: int) -> dict[int, Book]:
    """Books of the given markets from every stored open/fill/cancel up to `block` (the one stored stream)."""
    names = registry.market_names(conn, chain_id, market_ids)
    res = replay(stored_events(conn, to_block=block, market_ids=market_ids, chain_id=chain_id), strict=False,
                 hashes=False)
    return {m: res.books[names[m]].book if names[m] in res.books else Book() for m in market_ids}


def _compare_book(book: Book, views: ContractViews, address: str, block: int, n: int) -> dict[str, Any]:
    """Differences between our book and the contract's views at `block` (empty: equal)."""
    diff: dict[str, Any] = {}
    try:
        views.call(address, "bestBid", [], block)
    except NoContractCode as exc:  # not deployed yet at this block: equal iff our book is empty too
        return {} if not (book.levels(BUY, 1) or book.levels(SELL, 1)) else {"no_contract": str(exc)}
    for side, name in ((BUY, "bid"), (SELL, "ask")):
        ours = [(lv.price, lv.quantity, lv.orders) for lv in book.levels(side, n)]
        prices, qtys, counts = views.call(address, "getLevels", [side, n], block)
        theirs = list(zip(prices, qtys, counts, strict=True))
        if ours != theirs:
            i = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                     min(len(ours), len(theirs)))
            diff[f"{name}_levels"] = {
                "first_different_level": i,
                "ours": _level(ours, i), "chain": _level(theirs, i),
                "ours_levels": len(ours), "chain_levels": len(theirs),
            }
        best = book.best(side)
        chain_best = views.call(address, "bestBid" if side == BUY else "bestAsk", [], block)[0] or None
        if best != chain_best:
            diff[f"best_{name}"] = {"ours": _s(best), "chain": _s(chain_best)}
    return diff


def _level(levels: list[tuple[int, int, int]], i: int) -> dict[str, str] | None:
    if i >= len(levels):
        return None
    p, q, c = levels[i]
    return {"price": str(p), "quantity": str(q), "orders": str(c)}


def _s(v: int | None) -> str | None:
    return None if v is None else str(v)


def _order_arg(typ: str, order_id: str) -> Any:
    if typ.startswith(("uint", "int")):
        return int(order_id)
    if typ.startswith("bytes"):
        return bytes.fromhex(order_id[2:])
    return order_id


def _compare_orders(conn: Connection, config: ProjectConfig, chain: ChainClient, views: dict[str, ContractViews],
                    market_ids: list[int], block: int, limit: int) -> tuple[int, dict[int, list[dict]]]:
    """Open orders (untouched after `block`) against the contract's getOrder at `block`; failures by market."""
    if limit <= 0 or not market_ids:
        return 0, {}
    sources = log_addresses(config, registry.market_addresses(conn, config.chain.chain_id))
    rows = conn.execute(
        text("""SELECT market_id, contract, order_id, quantity, filled, remaining FROM orders
                WHERE chain_id = :c AND market_id = ANY(:m) AND status IN ('open', 'partially_filled')
                  AND updated_block <= :b
                ORDER BY md5(order_id || ':' || CAST(:b AS text)) LIMIT :n"""),
        {"c": config.chain.chain_id, "m": market_ids, "b": block, "n": limit},
    ).all()
    checked = 0
    failures: dict[int, list[dict]] = {}
    for r in rows:
        v = views.get(sources.get(r.contract, ""))
        if v is None or not v.has("getOrder") or len(v.fns["getOrder"]["inputs"]) != 1:
            continue
        names = v.outputs("getOrder")
        qty_name = next((q for q in _QTY_OUTPUTS if q in names), None)
        if qty_name is None or "filled" not in names or "status" not in names:
            continue
        arg_type = canonical_type(v.fns["getOrder"]["inputs"][0])
        try:
            out = dict(zip(names, v.call(r.contract, "getOrder", [_order_arg(arg_type, r.order_id)], block),
                           strict=True))
        except RpcError as exc:
            out = {"error": str(exc)[:200]}
        checked += 1
        chain_view = {"quantity": out.get(qty_name), "filled": out.get("filled"), "status": out.get("status")}
        if (chain_view["quantity"], chain_view["filled"], chain_view["status"]) != (
                int(r.quantity), int(r.filled), OPEN_STATUS):
            failures.setdefault(r.market_id, []).append({
                "order": order_key(r.contract, r.order_id),
                "ours": {"quantity": str(r.quantity), "filled": str(r.filled), "remaining": str(r.remaining)},
                "chain": {k: _s(v) if isinstance(v, int) else v for k, v in {**chain_view, **out}.items()
                          if k in ("quantity", "filled", "status", "error")},
            })
    return checked, failures


def check_books(config: ProjectConfig, chain: ChainClient, engine: Engine, start: int, end: int,
                run_id: str | None = None, record: bool = True) -> CheckReport:
    """Compare the sampled markets' rebuilt books and open orders with the contract views at the range's block."""
    cid = config.chain.chain_id
    rc = config.reconciliation
    report = CheckReport(start, end)
    with engine.connect() as conn:
        block = checkpoints.processed_to(conn, cid, start)
        if block is None:
            report.skipped = f"range {start}-{end} is not ingested"
            return report
        report.block = block
        gap = checkpoints.history_gap(conn, cid, config.chain.start_block, block)
        if gap:
            report.skipped = f"cannot rebuild books at block {block}: {gap}"
            return report
        pruned = state_unavailable(chain, block)
        if pruned is not None:
            report.skipped = f"the node keeps no state at block {block} (pruned history): {pruned[:200]}"
            return report
        views = _views_by_source(config, chain)
        markets = sample_markets(conn, config, views, start, end, rc.check_markets_per_run)
        ids = [m.market_id for m in markets]
        books = rebuild_books(conn, cid, ids, block)
        report.orders_checked, order_failures = _compare_orders(conn, config, chain, views, ids, block,
                                                                rc.check_orders_per_run)
    for m in markets:
        try:
            diff = _compare_book(books[m.market_id], views[m.source], m.address, block, rc.check_levels)
        except RpcError as exc:
            diff = {"view_call_failed": str(exc)[:300]}
        if m.market_id in order_failures:
            diff["orders"] = order_failures[m.market_id][:10]
            diff["orders_differing"] = len(order_failures[m.market_id])
        report.markets.append(MarketResult(m.market_id, m.metric_id or str(m.market_id), not diff, diff))
    if record:
        _record(engine, config, report, BOOK_CHECK, run_id)
    return report


# -- invariants ------------------------------------------------------------------------------------------------
_INVARIANTS: dict[str, str] = {
    "crossed_book": """
        SELECT o.market_id, max(o.price) FILTER (WHERE o.side = 0)::text AS best_bid,
               min(o.price) FILTER (WHERE o.side = 1)::text AS best_ask
        FROM orders o
        WHERE o.market_id IN (SELECT DISTINCT market_id FROM order_events
                              WHERE chain_id = :c AND block_number BETWEEN :s AND :e AND market_id IS NOT NULL)
          AND o.chain_id = :c AND o.status IN ('open', 'partially_filled') AND o.order_type <> 0
        GROUP BY o.market_id
        HAVING max(o.price) FILTER (WHERE o.side = 0) >= min(o.price) FILTER (WHERE o.side = 1)""",
    "negative_remaining": """
        SELECT market_id, contract, order_id, remaining::text FROM orders
        WHERE chain_id = :c AND updated_block BETWEEN :s AND :e AND remaining < 0""",
    "overfilled": """
        SELECT market_id, contract, order_id, quantity::text, filled::text FROM orders
        WHERE chain_id = :c AND updated_block BETWEEN :s AND :e AND (filled > quantity OR filled < 0)""",
    "trade_missing_side": """
        SELECT market_id, block_number, log_index, buyer, seller FROM order_events
        WHERE chain_id = :c AND block_number BETWEEN :s AND :e AND kind = 'trade'
          AND (buyer IS NULL OR seller IS NULL OR buyer = '' OR seller = '' OR market_id IS NULL)""",
    # The range's fills first, then one `orders` key lookup each. Written as one anti join, Postgres merged both
    # sides on the market alone (the order of the events' market index) and compared every fill with every order
    # of its market: quadratic in a market's size, 0.51-0.54 s for the real mix's first range (28k fills against
    # 30k orders) against 0.11 s this way (bench/realmix.py's chain).
    "fill_without_order": """
        WITH f AS MATERIALIZED (
            SELECT market_id, chain_id, contract, order_id, block_number, log_index FROM order_events
            WHERE chain_id = :c AND block_number BETWEEN :s AND :e AND kind = 'fill')
        SELECT f.market_id, f.contract, f.order_id, f.block_number, f.log_index FROM f
        WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.market_id = f.market_id AND o.chain_id = f.chain_id
                            AND o.contract = f.contract AND o.order_id = f.order_id)""",
}


def invariant_violations(conn: Connection, chain_id: int, start: int, end: int,
                         limit: int = 20) -> dict[str, list[dict]]:
    """Rows breaking each invariant within the range (first `limit` of each)."""
    out: dict[str, list[dict]] = {}
    for name, sql in _INVARIANTS.items():
        out[name] = [dict(r._mapping) for r in conn.execute(text(f"{sql} LIMIT :lim"),
                                                            {"c": chain_id, "s": start, "e": end, "lim": limit})]
    return out


def check_invariants(config: ProjectConfig, engine: Engine, start: int, end: int, run_id: str | None = None,
                     record: bool = True) -> CheckReport:
    cid = config.chain.chain_id
    report = CheckReport(start, end)
    with engine.connect() as conn:
        report.block = checkpoints.processed_to(conn, cid, start)
        report.violations = invariant_violations(conn, cid, start, end)
        if report.block is not None:
            # Ranges commit in any order (concurrent runs, backfills): an invariant that reads history the range
            # does not hold is judged only once that history is stored. A fill's order opens at or before the
            # fill; the current book includes every stored range, the later ones too.
            stored = checkpoints.all_ranges(conn, cid)
            needs = {"fill_without_order": report.block, "crossed_book": max(c.processed_to for c in stored)}
            for name, upto in needs.items():
                gap = checkpoints.history_gap(conn, cid, config.chain.start_block, upto, stored)
                if gap:
                    report.violations[name] = []
                    report.not_evaluated[name] = gap
        touched = conn.execute(
            text("""SELECT DISTINCT e.market_id, m.metric_id FROM order_events e JOIN markets m USING (market_id)
                    WHERE e.chain_id = :c AND e.block_number BETWEEN :s AND :e"""),
            {"c": cid, "s": start, "e": end}).all()
    for mid, metric in touched:
        mine = {k: [v for v in rows if v.get("market_id") == mid] for k, rows in report.violations.items()}
        mine = {k: v for k, v in mine.items() if v}
        report.markets.append(MarketResult(mid, metric or str(mid), not mine, json.loads(json.dumps(mine,
                                                                                                    default=str))))
    if record and report.block is not None:
        _record(engine, config, report, INVARIANTS_CHECK, run_id)
    return report


def _record(engine: Engine, config: ProjectConfig, report: CheckReport, check_name: str, run_id: str | None) -> None:
    with engine.begin() as conn:
        canary.sync_policy(conn, config)
        canary.record_checks(conn, [
            {"market_id": m.market_id, "chain_id": config.chain.chain_id, "range_start": report.range_start,
             "range_end": report.range_end, "block_number": report.block, "check_name": check_name,
             "passed": m.passed, "details": json.dumps(m.details, default=str), "run_id": run_id}
            for m in report.markets
        ])
