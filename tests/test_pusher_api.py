"""Today's orders API shape (`GET /api/compat/orders`) against real ingested data: pages, totals and depth
checked against Postgres and the contract; the same caps and 400s as the cursor route, which stays as it was."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from orderbook_pipelines.devchain.simulator import Simulator
from orderbook_pipelines.storage.db import drop_database, engine_for
from tests.conftest import Anvil, DevChain, make_devchain, new_database
from tests.live_harness import running_service, wait_until_current
from tests.test_pusher import contract_levels
from tests.test_security import ingest_all


@pytest.fixture(scope="module")
def served(anvil_factory: type[Anvil], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevChain, str,
                                                                                                     str]]:
    chain = make_devchain(anvil_factory(), Path(tmp_path_factory.mktemp("compat")), ["SILVER_V1", "GOLD_V1"],
                          ["ALUMINUM_V1"], confirmations=2, range_size=10)
    Simulator(chain.anvil.w3, chain.dep, seed=12, traders=4).run_batches(300, per_block=20)
    chain.anvil.mine(3)
    db = new_database()
    try:
        ingest_all(chain, db)
        with running_service(chain, db) as (service, url):
            wait_until_current(service, chain)
            yield chain, url, db
    finally:
        drop_database(db)


def _expected(db: str, where: str, params: dict[str, Any]) -> list[str]:
    """Order ids newest first, straight from Postgres (the API's ordering: creation block and log, descending)."""
    with engine_for(db).connect() as conn:
        return [r[0] for r in conn.execute(text(
            "SELECT o.order_id FROM orders o JOIN markets m USING (market_id) WHERE " + where +
            " ORDER BY o.created_block DESC, o.created_log DESC, o.order_id"), params)]


def _pages(url: str, params: dict[str, Any], limit: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    orders, pages, offset = [], [], 0
    while True:
        body = httpx.get(f"http://{url}/api/compat/orders", params={**params, "limit": limit,
                                                                    "offset": offset}).json()
        pages.append(body)
        orders += body["orders"]
        offset += limit
        if not body["pagination"]["hasMore"]:
            return orders, pages


def test_offset_pages_cover_exactly_the_traders_orders(served: tuple[DevChain, str, str]) -> None:
    chain, url, db = served
    trader = chain.anvil.w3.eth.accounts[2].lower()
    for kind, statuses in [("active", ("open", "partially_filled")), ("history", ("filled", "cancelled")),
                           (None, ("open", "partially_filled", "filled", "cancelled"))]:
        expected = _expected(db, "o.trader = :t AND o.status = ANY(:st)", {"t": trader, "st": list(statuses)})
        assert len(expected) > 7, kind
        orders, pages = _pages(url, {"trader": trader, **({"type": kind} if kind else {})}, 7)
        assert [o["orderId"] for o in orders] == expected, kind
        assert all(p["pagination"]["total"] == len(expected) for p in pages)
        assert all(o["trader"] == trader and o["status"] in statuses for o in orders)
        assert all(p["marketDepth"] is None for p in pages)  # no metricId: no depth
        assert len(pages) == -(-len(expected) // 7)
    sample = orders[0]
    assert set(sample) == {"orderId", "metricId", "trader", "side", "orderType", "price", "quantity", "filled",
                           "remaining", "status", "createdBlock", "updatedBlock"}
    assert int(sample["quantity"]) == int(sample["filled"]) + int(sample["remaining"]) or sample["status"] == \
        "cancelled"


def test_market_type_lists_the_markets_open_orders_with_its_live_depth(served: tuple[DevChain, str, str]) -> None:
    chain, url, db = served
    expected = _expected(db, "m.metric_id = :m AND o.status IN ('open', 'partially_filled')", {"m": "SILVER_V1"})
    orders, pages = _pages(url, {"metricId": "SILVER_V1", "type": "market"}, 50)
    assert [o["orderId"] for o in orders] == expected and expected
    assert {o["trader"] for o in orders} != {orders[0]["trader"]}  # every trader's orders
    bids, asks = contract_levels(chain, "SILVER_V1", 20)
    depth = pages[0]["marketDepth"]
    assert (depth["bids"], depth["asks"]) == (bids, asks)
    assert depth["bestBid"] == bids[0][0] and depth["bestAsk"] == asks[0][0]
    assert pages[0]["pagination"] == {"limit": 50, "offset": 0, "total": len(expected),
                                      "hasMore": len(expected) > 50}


@pytest.mark.parametrize(("params", "status", "code", "parameter"), [
    ({}, 400, "invalid_parameter", "trader"),
    ({"trader": "0xabc"}, 400, "invalid_parameter", "trader"),
    ({"metricId": "NOPE_V1"}, 404, "unknown_market", "metricId"),
    ({"metricId": "SILVER_V1", "type": "open"}, 400, "invalid_parameter", "type"),
    ({"type": "market"}, 400, "invalid_parameter", "metricId"),
    ({"metricId": "SILVER_V1", "type": "market", "trader": "0x" + "ab" * 20}, 400, "invalid_parameter", "trader"),
    ({"metricId": "SILVER_V1", "limit": "0"}, 400, "invalid_parameter", "limit"),
    ({"metricId": "SILVER_V1", "limit": "501"}, 400, "invalid_parameter", "limit"),
    ({"metricId": "SILVER_V1", "offset": "-1"}, 400, "invalid_parameter", "offset"),
    ({"metricId": "SILVER_V1", "offset": "10001"}, 400, "invalid_parameter", "offset"),
    ({"metricId": "SILVER_V1", "cursor": "x"}, 400, "invalid_parameter", "cursor"),
])
def test_bad_parameters_get_the_same_4xx_as_the_cursor_route(served: tuple[DevChain, str, str],
                                                            params: dict[str, str], status: int, code: str,
                                                            parameter: str) -> None:
    _chain, url, _db = served
    r = httpx.get(f"http://{url}/api/compat/orders", params=params)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["parameter"] == parameter


def test_the_cursor_route_is_unchanged(served: tuple[DevChain, str, str]) -> None:
    _chain, url, _db = served
    body = httpx.get(f"http://{url}/api/orders", params={"market": "SILVER_V1", "limit": 5}).json()
    assert set(body) == {"orders", "next_cursor", "as_of"} and len(body["orders"]) == 5
    r = httpx.get(f"http://{url}/api/orders", params={"metricId": "SILVER_V1"})
    assert r.status_code == 400 and r.json()["error"]["parameter"] == "metricId"
