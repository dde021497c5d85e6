"""Stored fills and cancels converge to the market of their order, whatever order their ranges are projected in.

The market rule (chain/normalize.py) resolves a fill by its order; a range ingested before the range holding
the order's open cannot know it. storage/projections.py applies the same rule to stored rows, from both sides,
so every projection order ends with the same markets, and so with the same books and orders.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from orderbook_pipelines.chain.normalize import OrderEventRow
from orderbook_pipelines.storage.db import drop_database, engine_for
from orderbook_pipelines.storage.projections import project_range
from tests.conftest import new_database


def _at(unix: int) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


ROUTER = "0x" + "ab" * 20
A, B = 1, 2  # market ids (identity values of the two inserted markets)


@pytest.fixture
def db() -> Iterator[str]:
    url = new_database()
    with engine_for(url).begin() as conn:
        for metric, digit in (("SILVER_V1", "1"), ("GOLD_V1", "2")):
            conn.execute(text("INSERT INTO markets (chain_id, metric_id, metric_hash, source) "
                              "VALUES (31337, :m, :h, 'r')"), {"m": metric, "h": "0x" + digit * 64})
        conn.execute(text("SELECT ensure_order_events_partitions(0, 1000, 1000000)"))
    yield url
    drop_database(url)


def _event(block: int, log: int, kind: str, order_id: str, market: int | None, tx: str) -> dict:
    return {"b": block, "l": log, "k": kind, "o": order_id, "m": market, "tx": tx,
            "side": 0 if kind == "open" else None, "ot": 1 if kind == "open" else None,
            "p": 100 if kind != "cancel" else None, "q": 10 if kind == "open" else (4 if kind == "fill" else None)}


# Range 1 (blocks 1-9): two opens in one multicall transaction. Range 2 (blocks 10-19): a fill of each, and a
# cancel of the GOLD order in a transaction that names only SILVER (a tx-based rule says SILVER: wrong).
EVENTS = [
    _event(1, 0, "open", "1", A, "0x01"), _event(1, 1, "open", "2", B, "0x01"),
    _event(10, 0, "fill", "1", None, "0x02"), _event(10, 1, "fill", "2", A, "0x02"),
    _event(11, 0, "open", "3", A, "0x03"), _event(11, 1, "cancel", "2", A, "0x03"),
]
RANGES = [(1, 9), (10, 19)]


def _insert(url: str, lo: int = 0, hi: int = 10**9) -> None:
    """Store the events of blocks [lo, hi], as the ingestion of that range does before projecting it."""
    rows = [{**e, "c": ROUTER} for e in EVENTS if lo <= e["b"] <= hi]
    with engine_for(url).begin() as conn:
        conn.execute(text("""
            INSERT INTO order_events (chain_id, block_number, block_hash, block_time, tx_hash, tx_index, log_index,
                                      contract, market_id, source, event_name, kind, order_id, trader, side,
                                      order_type, price, quantity, args)
            VALUES (31337, :b, '0xh', now(), :tx, 0, :l, :c, :m, 'r', 'E', :k, :o, '0xt', :side, :ot, :p, :q,
                    '{}')"""), rows)


def _state(url: str) -> tuple[list, list]:
    with engine_for(url).connect() as conn:
        markets = conn.execute(text("SELECT block_number, log_index, market_id FROM order_events "
                                    "ORDER BY block_number, log_index")).all()
        orders = conn.execute(text("SELECT market_id, order_id, filled, status FROM orders ORDER BY order_id")).all()
    return [tuple(r) for r in markets], [tuple(r) for r in orders]


@pytest.mark.parametrize("order", list(itertools.permutations(RANGES)))
def test_fills_and_cancels_take_their_orders_market_in_any_ingestion_order(db: str, order: tuple) -> None:
    for a, b in order:  # a range's events, then its projections: the fills' range may come before the opens'
        _insert(db, a, b)
        with engine_for(db).begin() as conn:
            project_range(conn, 31337, a, b)
    markets, orders = _state(db)
    assert markets == [(1, 0, A), (1, 1, B), (10, 0, A), (10, 1, B), (11, 0, A), (11, 1, B)], json.dumps(order)
    assert orders == [(A, "1", 4, "partially_filled"), (B, "2", 4, "cancelled"), (A, "3", 0, "open")]


@pytest.mark.parametrize("order", list(itertools.permutations(RANGES)))
def test_a_range_projected_from_memory_moves_the_fills_stored_after_it(db: str, order: tuple) -> None:
    """The same two ranges, each projected as a first load projects it (from the events in memory): when the fills'
    range came first, the opens' range gives its stored fill of order 2 the market of the open (B), not the one its
    transaction named (A)."""
    from orderbook_pipelines.storage.projections import WrittenRange

    for a, b in order:
        _insert(db, a, b)
        rows = [OrderEventRow(31337, e["b"], "0xh", e["tx"], 0, e["l"], ROUTER, e["m"], "r", "E", e["k"], e["o"],
                              "0xt", None, e["side"], e["ot"], e["p"], e["q"], None, None, None, None, "{}")
                for e in EVENTS if a <= e["b"] <= b]
        with engine_for(db).begin() as conn:
            project_range(conn, 31337, a, b, WrittenRange(rows, dict.fromkeys(range(20), _at(1_704_067_200))))
    markets, orders = _state(db)
    assert markets == [(1, 0, A), (1, 1, B), (10, 0, A), (10, 1, B), (11, 0, A), (11, 1, B)], json.dumps(order)
    assert orders == [(A, "1", 4, "partially_filled"), (B, "2", 4, "cancelled"), (A, "3", 0, "open")]


def test_projecting_twice_or_in_random_slices_changes_nothing(db: str) -> None:
    seed = random.randrange(2**32)
    _insert(db)
    rng = random.Random(seed)
    for _ in range(6):
        a = rng.randrange(0, 20)
        with engine_for(db).begin() as conn:
            project_range(conn, 31337, a, rng.randrange(a, 20))
    for a, b in RANGES:
        with engine_for(db).begin() as conn:
            project_range(conn, 31337, a, b)
    first = _state(db)
    with engine_for(db).begin() as conn:
        moved = project_range(conn, 31337, 0, 19).fills_remarketed
    assert moved == 0, f"seed {seed}"
    assert _state(db) == first, f"seed {seed}"


def _random_orders(rng: random.Random) -> list[OrderEventRow]:
    """Orders of two contracts with every shape the rule distinguishes: opens with a market, without one, twice;
    partial fills, exact fills, overfills; cancels; market orders; fills and cancels of orders never opened."""
    out: list[OrderEventRow] = []
    log = dict.fromkeys(range(20), 0)

    def add(block: int, kind: str, contract: str, oid: str, market: int | None, side: int | None = None,
            otype: int | None = None, price: int | None = None, qty: int | None = None) -> None:
        out.append(OrderEventRow(31337, block, f"0xh{block}", f"0xt{block}", 0, log[block], contract, market, "r",
                                 "E", kind, oid, f"0xtrader{rng.randrange(3)}", None, side, otype, price, qty,
                                 None, None, None, None, "{}"))
        log[block] += 1

    for n in range(rng.randint(5, 40)):
        contract, oid = rng.choice([ROUTER, "0x" + "cd" * 20]), str(n)
        opened = (3, 12)[n] if n < 2 else rng.randrange(0, 15)  # an order in each half, whatever the seed
        if n < 2 or rng.random() < 0.9:
            market = A if n < 2 else rng.choice([A, B, None] if rng.random() < 0.2 else [A, B])
            add(opened, "open", contract, oid, market,
                rng.randrange(2), rng.choice([0, 1, 1, 1]), rng.randrange(1, 200), rng.randrange(1, 50))
        if rng.random() < 0.1:  # a second open of the same order id, later
            add(rng.randrange(opened, 20), "open", contract, oid, B, 1, 1, 7, 9)
        for _ in range(rng.randrange(4)):
            add(rng.randrange(opened, 20), "fill", contract, oid, rng.choice([A, B, None]),
                qty=rng.choice([rng.randrange(1, 30), None]) if rng.random() < 0.9 else None)
        if rng.random() < 0.3:
            add(rng.randrange(opened, 20), "cancel", contract, oid, None)
    return out


@pytest.mark.parametrize("stale", [False, True], ids=["no-rows", "stale-rows"])
@pytest.mark.parametrize("span", [(0, 19), (0, 9), (10, 19)])
def test_orders_computed_in_memory_equal_the_sql_rule(db: str, span: tuple[int, int], stale: bool) -> None:
    """A range this transaction wrote in full has its orders computed from memory (project_fresh_orders); orders
    with events outside the range fall back to the SQL rule. Both must give exactly the rows the SQL rule gives:
    also when rows of the range's orders exist already, stale (the in-memory rows are COPYed straight into
    `orders`, and must then be upserted instead)."""
    from orderbook_pipelines.storage.projections import (
        project_fresh_orders,
        project_in_memory,
        project_orders,
        stored_elsewhere,
    )

    seed = random.randrange(2**32)
    rng = random.Random(seed)
    events = _random_orders(rng)
    block_time = {b: _at(1_700_000_000 + 2 * b + rng.randrange(2)) for b in range(20)}
    lo, hi = span
    with engine_for(db).begin() as conn:
        conn.execute(text("""
            INSERT INTO order_events (chain_id, block_number, block_hash, block_time, tx_hash, tx_index, log_index,
                                      contract, market_id, source, event_name, kind, order_id, trader, side,
                                      order_type, price, quantity, args)
            VALUES (31337, :b, :h, CAST(:t AS timestamptz), :tx, 0, :l, :c, :m, 'r', 'E', :k, :o, :tr, :side, :ot,
                    :p, :q, '{}')"""),
            [{"b": e.block_number, "h": e.block_hash, "t": block_time[e.block_number], "tx": e.tx_hash,
              "l": e.log_index, "c": e.contract, "m": e.market_id, "k": e.kind, "o": e.order_id, "tr": e.trader,
              "side": e.side, "ot": e.order_type, "p": e.price, "q": e.quantity} for e in events])
    if stale:
        with engine_for(db).begin() as conn:
            project_orders(conn, 31337, lo, hi)
            conn.execute(text("UPDATE orders SET filled = 0, status = 'open', fill_count = 0, updated_block = -1"))
    read = text("SELECT * FROM orders ORDER BY contract, order_id")
    with engine_for(db).connect() as conn:
        with conn.begin() as tx:
            want = project_orders(conn, 31337, lo, hi)
            want_rows = [tuple(r) for r in conn.execute(read)]
            tx.rollback()
        with conn.begin() as tx:
            memory = project_in_memory(31337, [e for e in events if lo <= e.block_number <= hi], block_time)
            got = project_fresh_orders(conn, 31337, lo, hi, memory, stored_elsewhere(conn, 31337, lo, hi, memory))
            got_rows = [tuple(r) for r in conn.execute(read)]
            tx.rollback()
    assert want_rows, f"seed {seed}: no order in the range"
    assert got_rows == want_rows, f"seed {seed}"
    assert (got.rows, got.keys) == (want.rows, want.keys), f"seed {seed}"


def test_a_failure_of_the_in_memory_projection_surfaces_and_leaves_no_thread(db: str,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-memory half of a fresh range's projection runs on a thread while Postgres inserts the trades. Its
    error is the range's error (the transaction rolls back, nothing is half-projected). And whichever side fails,
    its thread has ended when project_range raises (a forked backfill worker must not inherit a running thread):
    the in-memory side here takes 0.3 s, longer than the failing statement."""
    import threading
    import time

    from sqlalchemy.exc import ProgrammingError

    from orderbook_pipelines.storage import projections
    from orderbook_pipelines.storage.projections import WrittenRange

    events = _random_orders(random.Random(5))
    written = WrittenRange(events, {b: _at(1_700_000_000 + b) for b in range(20)})
    real = projections.project_in_memory

    def slow(*args: object) -> object:
        time.sleep(0.3)
        return real(*args)  # type: ignore[arg-type]

    def broken(*args: object) -> None:
        time.sleep(0.3)
        raise ZeroDivisionError("in-memory projection failed")

    def alive() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("obp-memory-projection")]

    monkeypatch.setattr(projections, "project_in_memory", broken)
    with engine_for(db).connect() as conn, pytest.raises(ZeroDivisionError, match="in-memory projection failed"):
        project_range(conn, 31337, 0, 19, written)
    assert alive() == []

    monkeypatch.setattr(projections, "project_in_memory", slow)
    with engine_for(db).connect() as conn:
        conn.execute(text("ALTER TABLE trades RENAME TO trades_elsewhere"))  # the trades statement fails at once
        with pytest.raises(ProgrammingError, match="trades"):
            project_range(conn, 31337, 0, 19, written)
        assert alive() == [], "the in-memory thread outlived its range"
        conn.rollback()
