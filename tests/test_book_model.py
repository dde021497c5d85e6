"""The in-memory order book: hand-computed scenarios and an independent reference model (hypothesis)."""

from __future__ import annotations

from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orderbook_pipelines.book.model import BUY, SELL, Book, BookEvent, InvalidEvent, Level

LIMIT, MARKET = 1, 0


def open_(oid: str, side: int, price: int, qty: int, order_type: int | None = LIMIT) -> BookEvent:
    return BookEvent("open", oid, side=side, order_type=order_type, price=price, quantity=qty)


def fill(oid: str, qty: int, price: int | None = None) -> BookEvent:
    return BookEvent("fill", oid, quantity=qty, price=price)


def cancel(oid: str) -> BookEvent:
    return BookEvent("cancel", oid)


def book_of(*events: BookEvent) -> Book:
    b = Book()
    for e in events:
        b.apply(e)
    return b


def levels(b: Book, side: int) -> list[tuple[int, int, int]]:
    return [(lv.price, lv.quantity, lv.orders) for lv in b.levels(side, 1000)]


# -- hand-built scenarios ----------------------------------------------------------------------------------
def test_empty_book():
    b = Book()
    assert levels(b, BUY) == [] and levels(b, SELL) == []
    assert b.best(BUY) is None and b.best(SELL) is None
    assert b.resting("x") == 0


def test_limit_orders_at_same_price_aggregate():
    b = book_of(
        open_("a", BUY, 100, 5), open_("b", BUY, 100, 7), open_("c", BUY, 99, 1), open_("d", SELL, 100, 2)
    )
    assert levels(b, BUY) == [(100, 12, 2), (99, 1, 1)]
    assert levels(b, SELL) == [(100, 2, 1)]
    assert b.levels(BUY, 1) == [Level(100, 12, 2)]


def test_partial_fill_reduces_level():
    b = book_of(open_("a", BUY, 100, 5), open_("b", BUY, 100, 7), fill("a", 3, 100))
    assert levels(b, BUY) == [(100, 9, 2)]
    assert b.resting("a") == 2
    b.apply(fill("b", 6, 100))
    assert levels(b, BUY) == [(100, 3, 2)]
    assert b.resting("b") == 1


def test_full_fill_removes_order_then_level():
    b = book_of(open_("a", SELL, 50, 5), open_("b", SELL, 50, 4), fill("a", 5))
    assert levels(b, SELL) == [(50, 4, 1)]
    assert b.resting("a") == 0
    b.apply(fill("b", 1))
    b.apply(fill("b", 3))
    assert levels(b, SELL) == []
    assert b.best(SELL) is None


def test_cancel_removes_order_and_level():
    b = book_of(open_("a", SELL, 50, 5), open_("b", SELL, 50, 4), open_("c", SELL, 51, 1))
    b.apply(cancel("a"))
    assert levels(b, SELL) == [(50, 4, 1), (51, 1, 1)]
    b.apply(cancel("b"))
    assert levels(b, SELL) == [(51, 1, 1)]
    assert b.best(SELL) == 51


def test_cancel_after_partial_fill_removes_remaining():
    b = book_of(open_("a", BUY, 10, 5), open_("b", BUY, 10, 1), fill("a", 2), cancel("a"))
    assert levels(b, BUY) == [(10, 1, 1)]


@pytest.mark.parametrize(("order_type", "price"), [(MARKET, 100), (MARKET, 0), (LIMIT, 0), (None, 0)])
def test_market_order_never_rests(order_type, price):
    b = book_of(open_("m", BUY, price, 10, order_type=order_type))
    assert levels(b, BUY) == []
    assert b.resting("m") == 0
    b.apply(fill("m", 4))
    assert levels(b, BUY) == []
    assert b.best(BUY) is None


def test_order_type_none_with_price_is_limit():
    # gen2 OrderPlaced carries no order type: price > 0 means limit
    b = book_of(open_("g", SELL, 7, 3, order_type=None))
    assert levels(b, SELL) == [(7, 3, 1)]


def test_gen2_market_order_fill_before_open_leaves_no_level():
    # gen2 emits a market order's fills before its OrderPlaced, in the same transaction
    b = book_of(open_("maker", SELL, 100, 10))
    b.apply(fill("taker", 4, 100))
    b.apply(fill("maker", 4, 100))
    b.apply(open_("taker", BUY, 0, 4, order_type=None))
    assert levels(b, BUY) == []
    assert levels(b, SELL) == [(100, 6, 1)]
    assert b.resting("taker") == 0


def test_gen2_market_order_partially_filled_before_open_leaves_no_level():
    b = book_of(fill("taker", 1), open_("taker", SELL, 0, 5, order_type=None))
    assert levels(b, SELL) == [] and levels(b, BUY) == []


def test_limit_order_fill_before_open_rests_only_remainder():
    b = book_of(fill("x", 3, 20), open_("x", BUY, 20, 10))
    assert levels(b, BUY) == [(20, 7, 1)]
    assert b.resting("x") == 7


def test_limit_order_fully_filled_before_open_never_rests():
    b = book_of(fill("x", 6, 20), fill("x", 4, 20), open_("x", BUY, 20, 10))
    assert levels(b, BUY) == []


def test_cancel_before_open_never_rests():
    b = book_of(cancel("x"), open_("x", BUY, 20, 10))
    assert levels(b, BUY) == []


def test_overfill_removes_level_without_negative_quantity():
    b = book_of(open_("a", BUY, 10, 5), open_("b", BUY, 10, 3), fill("a", 9))
    assert levels(b, BUY) == [(10, 3, 1)]


def test_best_bid_and_ask():
    b = book_of(
        open_("b1", BUY, 98, 1),
        open_("b2", BUY, 101, 1),
        open_("b3", BUY, 99, 1),
        open_("s1", SELL, 105, 1),
        open_("s2", SELL, 103, 1),
        open_("s3", SELL, 110, 1),
    )
    assert b.best(BUY) == 101
    assert b.best(SELL) == 103
    assert [lv.price for lv in b.levels(BUY, 10)] == [101, 99, 98]
    assert [lv.price for lv in b.levels(SELL, 10)] == [103, 105, 110]
    assert [lv.price for lv in b.levels(SELL, 2)] == [103, 105]
    b.apply(cancel("b2"))
    b.apply(fill("s2", 1))
    assert (b.best(BUY), b.best(SELL)) == (99, 105)


def test_other_kinds_are_ignored():
    b = book_of(open_("a", BUY, 10, 5))
    before = b.state_hash()
    b.apply(BookEvent("trade", "a", quantity=5, price=10))
    b.apply(BookEvent("book_add", "z", side=SELL, price=1, quantity=1))
    assert b.state_hash() == before
    assert levels(b, BUY) == [(10, 5, 1)]
    assert levels(b, SELL) == []


@pytest.mark.parametrize(
    "ev",
    [
        BookEvent("open", "a", side=None, price=1, quantity=1),
        BookEvent("open", "a", side=2, price=1, quantity=1),
        BookEvent("open", "a", side=BUY, price=None, quantity=1),
        BookEvent("open", "a", side=BUY, price=1, quantity=None),
        BookEvent("fill", "a", quantity=None),
        BookEvent("fill", "a", quantity=-1),
    ],
)
def test_invalid_events(ev):
    with pytest.raises(InvalidEvent):
        Book().apply(ev)


def test_state_hash_reflects_levels():
    a = book_of(open_("x", BUY, 10, 5), open_("y", SELL, 12, 1))
    b = book_of(open_("y", SELL, 12, 1), open_("x", BUY, 10, 5))
    assert a.state_hash() == b.state_hash()  # same visible book, different order of arrival
    c = book_of(open_("x", SELL, 10, 5), open_("y", BUY, 12, 1))  # sides swapped
    assert c.state_hash() != a.state_hash()
    d = book_of(open_("x", BUY, 10, 4), open_("z", BUY, 10, 1), open_("y", SELL, 12, 1))  # same qty, 2 orders
    assert d.state_hash() != a.state_hash()
    assert Book().state_hash() != a.state_hash()


# -- property: random valid streams against a reference model ------------------------------------------
PRICES = st.integers(min_value=1, max_value=8)  # few prices so levels aggregate


@st.composite
def streams(draw) -> list[BookEvent]:
    """A valid stream: opens (limit and market), fills not exceeding what is left, cancels of live orders."""
    events: list[BookEvent] = []
    remaining: dict[str, int] = {}  # open, not terminal (limit or market)
    n = draw(st.integers(min_value=0, max_value=60))
    for i in range(n):
        live = sorted(remaining)
        op = draw(st.sampled_from(["open", "open", "market", "fill", "fill", "cancel"] if live else ["open"]))
        if op == "open":
            oid = f"o{i}"
            qty = draw(st.integers(min_value=1, max_value=50))
            events.append(
                open_(
                    oid,
                    draw(st.sampled_from([BUY, SELL])),
                    draw(PRICES),
                    qty,
                    order_type=draw(st.sampled_from([LIMIT, None])),
                )
            )
            remaining[oid] = qty
        elif op == "market":
            oid = f"m{i}"
            qty = draw(st.integers(min_value=1, max_value=50))
            price, order_type = draw(st.sampled_from([(0, None), (0, MARKET), (5, MARKET)]))
            pre_fill = draw(st.integers(min_value=0, max_value=qty))
            if pre_fill:  # gen2: fills before the OrderPlaced
                events.append(fill(oid, pre_fill))
            events.append(open_(oid, draw(st.sampled_from([BUY, SELL])), price, qty, order_type=order_type))
            if pre_fill < qty:
                remaining[oid] = qty - pre_fill
        elif op == "fill":
            oid = draw(st.sampled_from(live))
            q = draw(st.integers(min_value=1, max_value=remaining[oid]))
            events.append(fill(oid, q))
            remaining[oid] -= q
            if remaining[oid] == 0:
                del remaining[oid]
        else:
            oid = draw(st.sampled_from(live))
            events.append(cancel(oid))
            del remaining[oid]
    return events


def reference(events: list[BookEvent]) -> tuple[dict[str, tuple[int, int, int]], list[dict], list[dict]]:
    """Independent model: live limit order -> (side, price, remaining), then levels per side."""
    opened: dict[str, tuple[int, int, int, bool]] = {}  # side, price, quantity, is_limit
    filled: dict[str, int] = defaultdict(int)
    cancelled: set[str] = set()
    for e in events:
        if e.kind == "open":
            opened[e.order_id] = (e.side, e.price, e.quantity, e.order_type != MARKET and e.price > 0)
        elif e.kind == "fill":
            filled[e.order_id] += e.quantity
        else:
            cancelled.add(e.order_id)
    live: dict[str, tuple[int, int, int]] = {}
    for oid, (side, price, quantity, is_limit) in opened.items():
        left = quantity - filled[oid]
        if is_limit and oid not in cancelled and left > 0:
            live[oid] = (side, price, left)
    qty: list[dict] = [defaultdict(int), defaultdict(int)]
    cnt: list[dict] = [defaultdict(int), defaultdict(int)]
    for side, price, left in live.values():
        qty[side][price] += left
        cnt[side][price] += 1
    return live, qty, cnt


def check_against_reference(b: Book, events: list[BookEvent]) -> None:
    live, qty, cnt = reference(events)
    for side in (BUY, SELL):
        got = b.levels(side, 10_000)
        assert {lv.price: lv.quantity for lv in got} == dict(qty[side])
        assert {lv.price: lv.orders for lv in got} == dict(cnt[side])
        assert all(lv.quantity > 0 and lv.orders > 0 for lv in got)
        prices = [lv.price for lv in got]
        assert prices == sorted(prices, reverse=(side == BUY))
        assert len(set(prices)) == len(prices)
        assert b.best(side) == (prices[0] if prices else None)
        best_first = sorted(qty[side].items(), reverse=(side == BUY))
        for n in (0, 1, 3, len(best_first), len(best_first) + 5):
            assert b.top(side, n) == tuple(best_first[:n])
    for oid, (_, _, left) in live.items():
        assert b.resting(oid) == left
    for e in events:
        if e.order_id not in live:
            assert b.resting(e.order_id) == 0


@settings(max_examples=300, deadline=None)
@given(events=streams())
def test_book_matches_reference_after_every_event(events):
    b = Book()
    for i, e in enumerate(events):
        b.apply(e)
        check_against_reference(b, events[: i + 1])


@settings(max_examples=200, deadline=None)
@given(events=streams(), data=st.data())
def test_state_hash_deterministic_and_sensitive_to_one_more_fill(events, data):
    a, b = book_of(*events), book_of(*events)
    assert a.state_hash() == b.state_hash()
    live, _, _ = reference(events)
    if not live:
        return
    oid = data.draw(st.sampled_from(sorted(live)))
    q = data.draw(st.integers(min_value=1, max_value=live[oid][2]))
    b.apply(fill(oid, q))
    assert a.state_hash() != b.state_hash()


def _open_then_fill(resting: list[tuple[str, int, int, int, int]]) -> Book:
    """The per-event path a bulk load must equal: an open, then a fill of what was filled, per order."""
    book = Book()
    for key, side, price, qty, filled in resting:
        book.apply(BookEvent("open", key, side, 1, price, qty))
        if filled:
            book.apply(BookEvent("fill", key, quantity=filled))
    book.end_block()
    return book


@given(st.lists(st.tuples(st.sampled_from([BUY, SELL]), st.integers(1, 30), st.integers(2, 50),
                          st.integers(0, 49)), max_size=60))
def test_bulk_load_of_resting_orders_equals_replaying_open_then_fill(rows: list[tuple[int, int, int, int]]) -> None:
    resting = [(f"o{i}", side, price, qty, min(filled, qty - 1)) for i, (side, price, qty, filled) in enumerate(rows)]
    replayed = _open_then_fill(resting)
    loaded = Book()
    loaded.load_resting(resting)
    assert loaded.state_hash() == replayed.state_hash()
    assert {k: loaded.resting(k) for k, *_ in resting} == {k: replayed.resting(k) for k, *_ in resting}
    for side in (BUY, SELL):
        assert loaded.levels(side, 100) == replayed.levels(side, 100)


@pytest.mark.parametrize("row", [("a", 2, 10, 5, 0), ("a", BUY, 0, 5, 0), ("a", BUY, 10, 5, 5), ("a", SELL, 10, 5, -1)])
def test_bulk_load_rejects_what_cannot_rest(row: tuple[str, int, int, int, int]) -> None:
    with pytest.raises(InvalidEvent, match="not a resting limit order"):
        Book().load_resting([row])


def test_bulk_load_rejects_a_duplicate_key() -> None:
    with pytest.raises(InvalidEvent, match="loaded twice"):
        Book().load_resting([("a", BUY, 10, 5, 0), ("a", SELL, 11, 5, 0)])


# -- column-wise bulk load (the cold-start path) -------------------------------------------------------------
_AMOUNT = st.one_of(st.integers(1, 50), st.integers(2**64 - 3, 2**64 + 3), st.integers(2**200, 2**256 - 1))


def _orders(book: Book) -> list[tuple]:
    return [(k, o.side, o.price, o.quantity, o.is_limit, o.filled, o.cancelled) for k, o in book.orders.items()]


@given(st.lists(st.tuples(st.sampled_from([BUY, SELL]), st.sampled_from([1, 7, 2**64, 2**64 + 1, 2**255]),
                          _AMOUNT, st.integers(0, 2**256)), max_size=60),
       st.integers(0, 60))
def test_column_load_equals_replaying_open_then_fill(rows: list[tuple[int, int, int, int]], preloaded: int) -> None:
    """Few prices, so orders share levels (sums and counts above 2**64), partial fills, a book that already has
    orders: the columns path must equal the per-event path, order objects and dict order included."""
    resting = [(f"o{i}", side, price, qty, filled % qty) for i, (side, price, qty, filled) in enumerate(rows)]
    replayed = _open_then_fill(resting)
    loaded = Book()
    head, tail = resting[:preloaded], resting[preloaded:]
    loaded.load_resting(head)
    loaded.load_columns(*(list(col) for col in zip(*tail, strict=True)) if tail else ([], [], [], [], []))
    assert _orders(loaded) == _orders(replayed)
    assert loaded.state_hash() == replayed.state_hash()
    for side in (BUY, SELL):
        assert loaded.levels(side, 100) == replayed.levels(side, 100)
        assert loaded.best(side) == replayed.best(side)
    # and it keeps behaving like the replayed book: a fill of every order, then a cancel of what is left
    for key, *_ in resting:
        for b in (loaded, replayed):
            b.apply(fill(key, 1))
            b.apply(cancel(key) if b.resting(key) % 2 else fill(key, 0))
    assert _orders(loaded) == _orders(replayed) and loaded.state_hash() == replayed.state_hash()


@pytest.mark.parametrize("bad", [("x", 2, 10, 5, 0), ("x", BUY, 0, 5, 0), ("x", BUY, 10, 5, 5),
                                 ("x", SELL, 10, 5, -1), ("x", SELL, 10, 0, 0), ("o1", BUY, 10, 5, 0),
                                 ("o0", SELL, 12, 5, 0)])
def test_column_load_is_all_or_nothing(bad: tuple[str, int, int, int, int]) -> None:
    """A rejected load (invalid row, duplicate key within it or against the book) changes nothing."""
    book = Book()
    book.load_resting([("o0", BUY, 10, 5, 1)])
    before, digest = _orders(book), book.state_hash()
    rows = [("o1", BUY, 10, 5, 0), ("o2", SELL, 11, 2**70, 3), bad]
    with pytest.raises(InvalidEvent, match=r"not a resting limit order|loaded twice"):
        book.load_columns(*(list(col) for col in zip(*rows, strict=True)))
    assert _orders(book) == before and book.state_hash() == digest


def test_column_load_rejects_columns_of_different_lengths() -> None:
    with pytest.raises(ValueError, match="different lengths"):
        Book().load_columns(["a", "b"], [BUY, BUY], [1, 2], [3, 4], [0])


@settings(max_examples=200, deadline=None)
@given(events=streams(), data=st.data())
def test_undo_of_a_recorded_suffix_restores_levels_best_and_top(events, data):
    """A reorged block is undone from its log: every query (levels, top, best, hash) equals the book before it,
    and the book keeps working afterwards (the same suffix applied again gives the same state)."""
    cut = data.draw(st.integers(0, len(events)))
    b, ref = Book(), Book()
    for e in events[:cut]:
        b.apply(e)
        ref.apply(e)
    log: list = []
    b.record(log)
    for e in events[cut:]:
        b.apply(e)
    b.end_block()
    b.record(None)
    b.undo(log)
    for side in (BUY, SELL):
        assert b.levels(side, 1000) == ref.levels(side, 1000)
        assert b.top(side, 1000) == ref.top(side, 1000)
        assert b.best(side) == ref.best(side)
    assert b.state_hash() == ref.state_hash()
    for e in events[cut:]:
        b.apply(e)
    check_against_reference(b, events)
