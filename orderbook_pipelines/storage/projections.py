"""Orders, trades and positions projected from `order_events`, convergent whatever order ranges arrive in.

Orders are recomputed, for every order a range touched, from *all* stored events of that order, so processing
ranges out of order, twice, or concurrently ends in the same rows. Positions are sums over a trader's trades, and
summing all of them again for every range would cost a market maker's whole history per range: a range adds the
trades *it inserted* (INSERT ... ON CONFLICT DO NOTHING RETURNING gives each trade row once, whatever re-runs or
twins do, and the projection lock below serializes the additions). A reorg repair deletes trades and rebuilds the
positions they fed in full (`project_positions`, ingestion/reconcile.py). Projections run in the range's own
transaction (ingestion/ingest.py), so a checkpoint never exists without them.

Stored fills and cancels first take the market of their order (`_FILL_MARKETS*`): the rule of
chain/normalize.py, applied to what is stored, so that a range whose order opens arrive later (out-of-order
backfill, a concurrent range) still converges to the market the open names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psycopg
from sqlalchemy import Connection, text

from orderbook_pipelines.chain.normalize import OrderEventRow
from orderbook_pipelines.obs import Laps
from orderbook_pipelines.storage.db import local_setting
from orderbook_pipelines.storage.writer import stage

OrderKey = tuple[str, str]  # (contract, order id)


@dataclass(frozen=True)
class ProjectionResult:
    rows: int
    keys: int


# The range's trades, and the positions they move: each new trade's two legs added to its traders' rows.
_TRADES_AND_POSITIONS = text("""
    WITH ins AS (
        INSERT INTO trades (market_id, chain_id, block_number, log_index, block_hash, block_time, tx_hash, price,
                            quantity, buyer, seller, buy_order_id, sell_order_id)
        SELECT market_id, chain_id, block_number, log_index, block_hash, block_time, tx_hash, price, quantity,
               buyer, seller, buy_order_id, sell_order_id
        FROM order_events
        WHERE chain_id = :c AND block_number BETWEEN :s AND :e AND kind = 'trade' AND market_id IS NOT NULL
        ON CONFLICT DO NOTHING
        RETURNING market_id, block_number, price, quantity, buyer, seller
    ), legs AS (
        SELECT market_id, buyer AS trader, quantity AS bought, 0::numeric AS sold, price * quantity AS buy_notional,
               0::numeric AS sell_notional, block_number FROM ins
        UNION ALL
        SELECT market_id, seller, 0::numeric, quantity, 0::numeric, price * quantity, block_number FROM ins
    ), moved AS (
        INSERT INTO positions AS p (market_id, trader, net_quantity, bought, sold, buy_notional, sell_notional,
                                    trade_count, last_block)
        SELECT market_id, trader, sum(bought) - sum(sold), sum(bought), sum(sold), sum(buy_notional),
               sum(sell_notional), count(*), max(block_number)
        FROM legs GROUP BY market_id, trader
        ON CONFLICT (market_id, trader) DO UPDATE SET
            net_quantity = p.net_quantity + EXCLUDED.net_quantity, bought = p.bought + EXCLUDED.bought,
            sold = p.sold + EXCLUDED.sold, buy_notional = p.buy_notional + EXCLUDED.buy_notional,
            sell_notional = p.sell_notional + EXCLUDED.sell_notional,
            trade_count = p.trade_count + EXCLUDED.trade_count,
            last_block = GREATEST(p.last_block, EXCLUDED.last_block), updated_at = now()
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM ins) AS trades, (SELECT count(*) FROM moved) AS positions
""")

_OPEN = "FILTER (WHERE e.kind = 'open' AND e.market_id IS NOT NULL)"
_FIRST = "ORDER BY e.block_number, e.log_index"
_ORDER_COLUMNS = ("market_id", "chain_id", "contract", "order_id", "trader", "side", "order_type", "price",
                  "quantity", "filled", "remaining", "status", "fill_count", "created_block", "created_log",
                  "updated_block", "created_at", "updated_at")
# Rows of `order_state` are COPYed in binary, as the events are (storage/writer.py): Postgres parses no numbers or
# times (the 20k orders of the real mix's first range: 0.18-0.30 s against 0.33-0.36 s from text).
_ORDER_TYPES = ("integer", "bigint", "text", "text", "text", "smallint", "smallint", "numeric", "numeric", "numeric",
                "numeric", "text", "integer", "bigint", "integer", "bigint", "timestamptz", "timestamptz")
# Every statement that writes `orders` opens with this comment: what pg_stat_activity shows an operator (and the
# crash tests) first, whichever of the three forms below runs.
ORDERS_WRITE = "/* orders projection */"
_UPSERT_ORDERS = f"""
    INSERT INTO orders ({", ".join(_ORDER_COLUMNS)})
    SELECT {{select}}
    ON CONFLICT (market_id, chain_id, contract, order_id) DO UPDATE SET
        filled = EXCLUDED.filled, remaining = EXCLUDED.remaining, status = EXCLUDED.status,
        fill_count = EXCLUDED.fill_count, updated_block = EXCLUDED.updated_block, updated_at = EXCLUDED.updated_at
    WHERE (orders.filled, orders.status, orders.updated_block)
          IS DISTINCT FROM (EXCLUDED.filled, EXCLUDED.status, EXCLUDED.updated_block)
"""


def _orders_sql(touched: str) -> str:
    """Every touched order recomputed from all its stored events. One aggregate pass over the touched orders'
    events. (Two aggregates joined to each other planned as a nested loop on fresh partitions without
    statistics: quadratic in the range size, bench/backfill.py.) `order_state` below is the same rule in Python."""
    return f"""{ORDERS_WRITE}
    WITH touched AS ({touched}), agg AS (
        SELECT e.contract, e.order_id,
               (array_agg(e.market_id {_FIRST}) {_OPEN})[1] AS market_id,
               (array_agg(e.trader {_FIRST}) {_OPEN})[1] AS trader,
               (array_agg(e.side {_FIRST}) {_OPEN})[1] AS side,
               (array_agg(e.order_type {_FIRST}) {_OPEN})[1] AS order_type,
               (array_agg(e.price {_FIRST}) {_OPEN})[1] AS price,
               (array_agg(e.quantity {_FIRST}) {_OPEN})[1] AS quantity,
               (array_agg(e.block_number {_FIRST}) {_OPEN})[1] AS created_block,
               (array_agg(e.log_index {_FIRST}) {_OPEN})[1] AS created_log,
               (array_agg(e.block_time {_FIRST}) {_OPEN})[1] AS created_at,
               COALESCE(sum(e.quantity) FILTER (WHERE e.kind = 'fill'), 0) AS filled,
               count(*) FILTER (WHERE e.kind = 'fill') AS fill_count,
               bool_or(e.kind = 'cancel') AS cancelled,
               max(e.block_number) AS updated_block,
               max(e.block_time) AS updated_at
        FROM touched t JOIN order_events e ON e.chain_id = :c AND e.contract = t.contract AND e.order_id = t.order_id
        WHERE e.kind IN ('open', 'fill', 'cancel')
        GROUP BY e.contract, e.order_id
    ), state AS (
        SELECT a.*, CASE WHEN a.filled >= a.quantity THEN 'filled'
                         WHEN a.cancelled OR a.order_type = 0 THEN 'cancelled'  -- a market order never rests
                         WHEN a.filled > 0 THEN 'partially_filled'
                         ELSE 'open' END AS status
        FROM agg a WHERE a.market_id IS NOT NULL
    )""" + _UPSERT_ORDERS.format(select="""market_id, :c, contract, order_id, trader, side, order_type, price,
           quantity, filled, CASE WHEN status IN ('open', 'partially_filled') THEN quantity - filled ELSE 0 END,
           status, fill_count, created_block, created_log, updated_block, created_at, updated_at
    FROM state""")


_ORDERS = text(_orders_sql("""
        SELECT DISTINCT contract, order_id FROM order_events
        WHERE chain_id = :c AND block_number BETWEEN :s AND :e AND kind IN ('open', 'fill', 'cancel')
          AND order_id IS NOT NULL"""))
# The (contract, order id) keys bound by `_keys`, as a table.
_KEYS = "unnest(CAST(:contracts AS text[]), CAST(:ids AS text[])) AS k(contract, order_id)"
_ORDERS_OF = text(_orders_sql(f"SELECT * FROM {_KEYS}"))
# Orders of the range with a stored event outside it (an earlier open, fills of a range stored before this one).
_ELSEWHERE = text(f"""
    SELECT DISTINCT e.contract, e.order_id
    FROM {_KEYS}
    JOIN order_events e ON e.chain_id = :c AND e.contract = k.contract AND e.order_id = k.order_id
    WHERE (e.block_number < :s OR e.block_number > :e) AND e.kind IN ('open', 'fill', 'cancel')
""")
# Whether anything is stored outside the range at all: the first range of a backfill (or a lone repair) skips the
# per-order probe above, one index lookup per order of the range, when nothing else could hold their events.
_STORED_OUTSIDE = text("""
    SELECT EXISTS (SELECT 1 FROM order_events WHERE chain_id = :c AND block_number < :s)
        OR EXISTS (SELECT 1 FROM order_events WHERE chain_id = :c AND block_number > :e)
""")

_TOUCHED_ORDERS = text("""
    SELECT count(*) FROM (SELECT DISTINCT contract, order_id FROM order_events
    WHERE chain_id = :c AND block_number BETWEEN :s AND :e AND kind IN ('open','fill','cancel')) t
""")

# Full recompute of the positions of every (market, trader) with a trade in the span: for repairs, which delete
# trades and so cannot subtract them.
_POSITIONS = text("""
    WITH touched AS (
        SELECT market_id, buyer AS trader FROM trades WHERE chain_id = :c AND block_number BETWEEN :s AND :e
        UNION
        SELECT market_id, seller FROM trades WHERE chain_id = :c AND block_number BETWEEN :s AND :e
    ), legs AS (
        SELECT t.market_id, t.buyer AS trader, t.quantity AS bought, 0::numeric AS sold,
               t.price * t.quantity AS buy_notional, 0::numeric AS sell_notional, t.block_number
        FROM trades t JOIN touched x ON x.market_id = t.market_id AND x.trader = t.buyer
        UNION ALL
        SELECT t.market_id, t.seller, 0::numeric, t.quantity, 0::numeric, t.price * t.quantity, t.block_number
        FROM trades t JOIN touched x ON x.market_id = t.market_id AND x.trader = t.seller
    )
    INSERT INTO positions (market_id, trader, net_quantity, bought, sold, buy_notional, sell_notional,
                           trade_count, last_block)
    SELECT market_id, trader, sum(bought) - sum(sold), sum(bought), sum(sold), sum(buy_notional),
           sum(sell_notional), count(*), max(block_number)
    FROM legs GROUP BY market_id, trader
    ON CONFLICT (market_id, trader) DO UPDATE SET
        net_quantity = EXCLUDED.net_quantity, bought = EXCLUDED.bought, sold = EXCLUDED.sold,
        buy_notional = EXCLUDED.buy_notional, sell_notional = EXCLUDED.sell_notional,
        trade_count = EXCLUDED.trade_count, last_block = EXCLUDED.last_block, updated_at = now()
    WHERE positions.trade_count <> EXCLUDED.trade_count OR positions.net_quantity <> EXCLUDED.net_quantity
""")


# Projection statements are serialized by one transaction-level advisory lock. Under READ COMMITTED two ranges
# projected concurrently could otherwise let an upsert computed before the other range's events committed land
# last. Serialized, each projection sees every event committed before it started, and any later event is
# followed by its own projection. Fetching, decoding and COPY stay parallel; only these fast statements queue.
_PROJECTION_LOCK = text("SELECT pg_advisory_xact_lock(727001)")




# A fill or cancel belongs to the market of its order: rows of this range whose order is open elsewhere, and
# rows elsewhere whose order opens in this range (the other half, for ranges projected before their opens).
_FILL_MARKETS_OF_RANGE = text("""
    UPDATE order_events f SET market_id = o.market_id
    FROM order_events o
    WHERE f.chain_id = :c AND f.block_number BETWEEN :s AND :e AND f.kind IN ('fill', 'cancel')
      AND f.order_id IS NOT NULL
      AND o.chain_id = :c AND o.kind = 'open' AND o.contract = f.contract AND o.order_id = f.order_id
      AND o.market_id IS NOT NULL AND f.market_id IS DISTINCT FROM o.market_id
""")
# The same, for the fills and cancels of the orders named (`unopened` below): a range written fresh in one go
# already gave the others the market of their open in the range, so only these can differ.
_FILL_MARKETS_OF_ORDERS = text(f"""
    UPDATE order_events f SET market_id = o.market_id
    FROM {_KEYS}, order_events o
    WHERE f.chain_id = :c AND f.block_number BETWEEN :s AND :e AND f.kind IN ('fill', 'cancel')
      AND f.contract = k.contract AND f.order_id = k.order_id
      AND o.chain_id = :c AND o.kind = 'open' AND o.contract = f.contract AND o.order_id = f.order_id
      AND o.market_id IS NOT NULL AND f.market_id IS DISTINCT FROM o.market_id
""")
# Only fills after the range can have been stored before it (a fill never precedes its open's block), and in an
# in-order backfill there are few: the scan is bounded by what was ingested ahead, not by the range's opens.
_FILL_MARKETS_OF_OPENS_SQL = """
    UPDATE order_events f SET market_id = o.market_id
    FROM {keys}order_events o
    WHERE f.chain_id = :c AND f.block_number > :e AND f.kind IN ('fill', 'cancel') AND f.order_id IS NOT NULL
      AND o.chain_id = :c AND o.block_number BETWEEN :s AND :e AND o.kind = 'open' AND o.market_id IS NOT NULL
      AND o.contract = f.contract AND o.order_id = f.order_id AND f.market_id IS DISTINCT FROM o.market_id{of_keys}
"""
_FILL_MARKETS_OF_OPENS = text(_FILL_MARKETS_OF_OPENS_SQL.format(keys="", of_keys=""))
# The same for the orders named: those of a fresh range with events stored outside it (`stored_elsewhere`), which
# hold every fill after the range of an order it opens. When a later range committed first (two workers), the
# unrestricted statement merged all of that range's fills with all of this range's opens (0.1 s for 95k events).
_FILL_MARKETS_OF_OPENS_OF_ORDERS = text(_FILL_MARKETS_OF_OPENS_SQL.format(
    keys=f"{_KEYS}, ", of_keys="\n      AND f.contract = k.contract AND f.order_id = k.order_id"))


@dataclass(frozen=True)
class RangeProjection:
    fills_remarketed: int
    trades_inserted: int
    orders_touched: int
    orders_changed: int
    positions_changed: int
    seconds: dict[str, float] = field(default_factory=dict)  # per statement group, lock wait included in "lock"


@dataclass(frozen=True)
class MemoryProjection:
    """What a range's own events give without reading anything back (pure): the projections of a range this
    transaction wrote in full (`WrittenRange`)."""

    unopened: list[OrderKey]  # orders of fills and cancels without the market of their open in the range
    orders: dict[OrderKey, tuple | None]  # each order id of the range -> its `orders` row from these events alone
    touched: int  # (contract, order id) of the range's opens, fills and cancels, a missing id once per contract


def project_in_memory(chain_id: int, events: Iterable[OrderEventRow],
                      block_time: Mapping[int, datetime]) -> MemoryProjection:
    """One pass over a range's events. `unopened`: normalize gave every other fill and cancel exactly the market of
    its order's open in the range, so only these can move (`_FILL_MARKETS_OF_ORDERS`). `orders`: `order_state` of
    each order, right for the orders with no stored event outside the range (`project_fresh_orders`)."""
    opened: dict[OrderKey, int] = {}
    fills: list[tuple[OrderKey, int | None]] = []
    by_order: dict[OrderKey, list[OrderEventRow]] = {}
    touched: set[tuple[str, str | None]] = set()
    for e in events:
        kind = e.kind
        if kind not in _ORDER_KINDS:
            continue
        touched.add((e.contract, e.order_id))
        if e.order_id is None:
            continue
        key = (e.contract, e.order_id)
        by_order.setdefault(key, []).append(e)
        if kind == "open":
            if e.market_id is not None:
                opened[key] = e.market_id
        else:
            fills.append((key, e.market_id))
    unopened = sorted({k for k, m in fills if m is None or opened.get(k) != m})
    return MemoryProjection(unopened, {k: order_state(chain_id, evs, block_time) for k, evs in by_order.items()},
                            len(touched))


@dataclass(frozen=True)
class WrittenRange:
    """A range whose stored events are exactly `events`, all written by the current transaction (a first load):
    the projections take what they can from memory (`project_in_memory`) instead of reading it back."""

    events: list[OrderEventRow]
    block_time: Mapping[int, datetime]  # of every block of the range with an event (`EventSink.block_dt`)


def project_range(conn: Connection, chain_id: int, start: int, end: int,
                  written: WrittenRange | None = None) -> RangeProjection:
    """Every projection of one range: trades and the positions they move, then fill markets, then orders (trades
    read only trade rows, whose market normalize set; orders take their market from their open).

    `written`: the range's events when this transaction wrote all of them; then only its `unopened` fills can
    take another market, and orders whose every event is in the range are computed from memory.
    """
    clock = Laps()
    conn.execute(_PROJECTION_LOCK)
    clock.lap("lock")
    # No parallel workers for a range's projection statements: each reads one range's worth of rows, and ingestion
    # keeps the cores busy itself (the node, Postgres' COPY, the other workers' ranges). Probing a fresh range's 21k
    # orders for events stored elsewhere took 115 ms with two parallel workers against 50 ms without
    # (bench/realmix.py, two workers).
    with local_setting(conn, "max_parallel_workers_per_gather", "0"):
        return _project_range(conn, chain_id, start, end, written, clock)


def _project_range(conn: Connection, chain_id: int, start: int, end: int, written: WrittenRange | None,
                   clock: Laps) -> RangeProjection:
    p = _params(chain_id, start, end)
    # A fresh range's `project_in_memory` runs on a thread while this one waits for Postgres to insert the trades
    # (waiting releases the GIL): its ~0.1 s of Python for 95k events no longer comes after them. Its error is the
    # range's; leaving the pool joins the thread, so none outlives the range (a forked worker inherits none).
    with ThreadPoolExecutor(1, thread_name_prefix="obp-memory-projection") as pool:
        pending = (pool.submit(project_in_memory, chain_id, written.events, written.block_time)
                   if written is not None else None)
        try:
            trades, positions = conn.execute(_TRADES_AND_POSITIONS, p).one()
        finally:
            memory = pending.result() if pending is not None else None
    clock.lap("trades_positions")
    if memory is None:
        moved = conn.execute(_FILL_MARKETS_OF_RANGE, p).rowcount
        moved += conn.execute(_FILL_MARKETS_OF_OPENS, p).rowcount
        clock.lap("fill_markets")
        o = project_orders(conn, chain_id, start, end)
    else:
        elsewhere = stored_elsewhere(conn, chain_id, start, end, memory)
        keys = memory.unopened
        moved = conn.execute(_FILL_MARKETS_OF_ORDERS, {**p, **_keys(keys)}).rowcount if keys else 0
        opened_here = sorted(k for k in elsewhere if memory.orders.get(k) is not None)  # their fills are after it
        if opened_here:
            moved += conn.execute(_FILL_MARKETS_OF_OPENS_OF_ORDERS, {**p, **_keys(opened_here)}).rowcount
        clock.lap("fill_markets")
        o = project_fresh_orders(conn, chain_id, start, end, memory, elsewhere)
    clock.lap("orders")
    return RangeProjection(moved, trades, o.keys, o.rows, positions, clock.seconds)


def _params(chain_id: int, start: int, end: int) -> dict[str, int]:
    return {"c": chain_id, "s": start, "e": end}


def _keys(keys: list[OrderKey]) -> dict[str, list[str]]:
    """Bind parameters of `_KEYS`."""
    return {"contracts": [k[0] for k in keys], "ids": [k[1] for k in keys]}


def project_orders(conn: Connection, chain_id: int, start: int, end: int) -> ProjectionResult:
    conn.execute(_PROJECTION_LOCK)
    keys = conn.execute(_TOUCHED_ORDERS, _params(chain_id, start, end)).scalar_one()
    res = conn.execute(_ORDERS, _params(chain_id, start, end))
    return ProjectionResult(rows=res.rowcount, keys=int(keys))


_ORDER_KINDS = frozenset({"open", "fill", "cancel"})
_EPOCH = datetime.min.replace(tzinfo=UTC)  # before any block


def order_state(chain_id: int, events: Iterable[OrderEventRow], block_time: Mapping[int, datetime]) -> tuple | None:
    """The `orders` row (in `_ORDER_COLUMNS` order) of one order from ALL its events, by `_orders_sql`'s rule:
    the first open with a market names it, fills add up, a cancel or a market order ends it. None without such
    an open (the SQL leaves those out too)."""
    first: OrderEventRow | None = None
    filled = fills = 0
    cancelled = False
    last, updated = -1, _EPOCH
    for e in events:
        last, updated = max(last, e.block_number), max(updated, block_time[e.block_number])
        if e.kind == "open":
            if e.market_id is not None and (first is None or (e.block_number, e.log_index) <
                                            (first.block_number, first.log_index)):
                first = e
        elif e.kind == "fill":
            fills += 1
            filled += e.quantity or 0
        elif e.kind == "cancel":
            cancelled = True
    if first is None:
        return None
    q = first.quantity
    if q is not None and filled >= q:
        status = "filled"
    elif cancelled or first.order_type == 0:  # a market order never rests
        status = "cancelled"
    else:
        status = "partially_filled" if filled > 0 else "open"
    remaining = (None if q is None else q - filled) if status in ("open", "partially_filled") else 0
    return (first.market_id, chain_id, first.contract, first.order_id, first.trader, first.side, first.order_type,
            first.price, q, filled, remaining, status, fills, first.block_number, first.log_index, last,
            block_time[first.block_number], updated)


def stored_elsewhere(conn: Connection, chain_id: int, start: int, end: int,
                     memory: MemoryProjection) -> set[OrderKey]:
    """Orders of a fresh range with an open, fill or cancel stored outside it (none when nothing is stored outside
    the range at all: the first range of a backfill skips the probe, one index lookup per order)."""
    p = _params(chain_id, start, end)
    if not memory.orders or not conn.execute(_STORED_OUTSIDE, p).scalar_one():
        return set()
    return {(r.contract, r.order_id) for r in conn.execute(_ELSEWHERE, {**p, **_keys(sorted(memory.orders))})}


def project_fresh_orders(conn: Connection, chain_id: int, start: int, end: int, memory: MemoryProjection,
                         elsewhere: set[OrderKey]) -> ProjectionResult:
    """`project_orders` for a range whose stored events are exactly those `memory` was computed from (this
    transaction wrote them all): orders with no stored event outside the range take their row from `memory` and are
    written in bulk; the others (`elsewhere`: opened earlier, or with fills in a range stored before this one) are
    recomputed by the SQL rule. Runs under project_range's projection lock."""
    changed = 0
    if elsewhere:
        changed += conn.execute(_ORDERS_OF, {**_params(chain_id, start, end), **_keys(sorted(elsewhere))}).rowcount
    rows = [r for k, r in memory.orders.items() if r is not None and k not in elsewhere]
    if rows:
        raw = conn.connection.driver_connection
        assert raw is not None
        with raw.cursor() as cur:
            changed += _insert_fresh_orders(cur, rows)
    return ProjectionResult(rows=changed, keys=memory.touched)


def _insert_fresh_orders(cur: psycopg.Cursor, rows: list[tuple]) -> int:
    """Rows of orders with no stored event outside a range that was empty: they do not exist yet (a repair deletes
    the rows of the orders it empties), so they are COPYed straight into `orders`. A row that exists after all rolls
    back only this savepoint, and the rows are upserted instead; so are they when row security applies to this role
    (COPY FROM refuses such a table: the indexer role of docs/security.md)."""
    cols = ", ".join(_ORDER_COLUMNS)
    row = cur.execute("SELECT row_security_active('orders')").fetchone()
    if row is not None and not row[0]:
        cur.execute("SAVEPOINT obp_orders")
        try:
            _copy_orders(cur, f"{ORDERS_WRITE} COPY orders ({cols}) FROM STDIN (FORMAT BINARY)", rows)
            cur.execute("RELEASE SAVEPOINT obp_orders")
            return len(rows)
        except psycopg.errors.UniqueViolation:
            cur.execute("ROLLBACK TO SAVEPOINT obp_orders")
            cur.execute("RELEASE SAVEPOINT obp_orders")
    staged = stage(cur, "orders")
    _copy_orders(cur, f"COPY {staged} ({cols}) FROM STDIN (FORMAT BINARY)", rows)
    cur.execute(ORDERS_WRITE + _UPSERT_ORDERS.format(select=f"{cols} FROM {staged}"))
    return max(cur.rowcount, 0)


def _copy_orders(cur: psycopg.Cursor, sql: str, rows: list[tuple]) -> None:
    with cur.copy(sql) as copy:
        copy.set_types(_ORDER_TYPES)
        for row in rows:
            copy.write_row(row)


def project_positions(conn: Connection, chain_id: int, start: int, end: int) -> ProjectionResult:
    """Recompute, from all their stored trades, the positions of traders with a trade in [start, end]."""
    conn.execute(_PROJECTION_LOCK)
    res = conn.execute(_POSITIONS, _params(chain_id, start, end))
    return ProjectionResult(rows=res.rowcount, keys=res.rowcount)
