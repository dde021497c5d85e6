"""REST read API against real data: validation, stable cursor pages while new data arrives, readiness,
emergency pause, the committed OpenAPI spec, and the Redis write-through tier."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import text

from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.config import PROJECT_ROOT
from orderbook_pipelines.devchain.simulator import Simulator
from orderbook_pipelines.ingestion.ingest import ingest_range
from orderbook_pipelines.ingestion.ranges import ranges_up_to
from orderbook_pipelines.live.openapi import SPEC
from orderbook_pipelines.live.ratelimit import MovingWindow
from orderbook_pipelines.live.service import LiveService
from orderbook_pipelines.storage.db import drop_database, engine_for
from tests.conftest import Anvil, DevChain, make_devchain, new_database
from tests.live_harness import running_service, wait_until_current

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
TOKEN = "test-admin-token"


def ingest_all(chain: DevChain, db: str) -> None:
    cfg = chain.config
    safe = chain.anvil.w3.eth.block_number - cfg.chain.confirmations
    client = ChainClient(chain.anvil.url)
    for a, b in ranges_up_to(cfg.chain.start_block, cfg.chain.range_size, safe):
        ingest_range(cfg, client, engine_for(db), a, b)


@contextmanager
def _serve(anvil: Anvil, tmp: Path) -> Iterator[tuple[DevChain, LiveService, str, str, str]]:
    db = new_database()
    chain = make_devchain(anvil, tmp, ["SILVER_V1", "GOLD_V1"], ["ALUMINUM_V1"], confirmations=2, range_size=10)
    Simulator(chain.anvil.w3, chain.dep, seed=3, traders=4).run_batches(400, per_block=20)
    chain.anvil.mine(3)
    ingest_all(chain, db)
    prefix = f"obptest:{uuid.uuid4().hex[:8]}:"
    try:
        with running_service(chain, db, redis_url=REDIS_URL, admin_token=TOKEN, redis_prefix=prefix) as (svc, url):
            yield chain, svc, url, prefix, db
    finally:
        r = redis.Redis.from_url(REDIS_URL)
        keys = list(r.scan_iter(f"{prefix}*"))
        if keys:
            r.delete(*keys)
        drop_database(db)


@pytest.fixture(scope="module")
def served_db(anvil_factory: type[Anvil], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    with _serve(anvil_factory(), tmp_path_factory.mktemp("api")) as running:
        yield running


@pytest.fixture
def served(served_db: tuple) -> tuple[DevChain, LiveService, str, str]:
    return served_db[:4]


@pytest.fixture
def database(served_db: tuple) -> str:
    return served_db[4]


@pytest.mark.parametrize(("path", "params", "status", "code", "parameter"), [
    ("/api/depth", {}, 400, "invalid_parameter", "market"),
    ("/api/depth", {"market": "NOPE_V1"}, 404, "unknown_market", "market"),
    ("/api/depth", {"market": "SILVER_V1", "levels": "0"}, 400, "invalid_parameter", "levels"),
    ("/api/depth", {"market": "SILVER_V1", "levels": "101"}, 400, "invalid_parameter", "levels"),
    ("/api/depth", {"market": "SILVER_V1", "levels": "ten"}, 400, "invalid_parameter", "levels"),
    ("/api/depth", {"market": "SILVER_V1", "extra": "1"}, 400, "invalid_parameter", "extra"),
    ("/api/trades", {"market": "SILVER_V1", "limit": "501"}, 400, "invalid_parameter", "limit"),
    ("/api/trades", {"market": "SILVER_V1", "cursor": "garbage!"}, 400, "invalid_parameter", "cursor"),
    ("/api/trades", {"market": "SILVER_V1", "since": "2026-01-01T00:00:00Z", "until": "2026-03-01T00:00:00Z"},
     400, "invalid_parameter", "until"),
    ("/api/trades", {"market": "SILVER_V1", "since": "yesterday"}, 400, "invalid_parameter", "since"),
    ("/api/orders", {}, 400, "invalid_parameter", "market"),
    ("/api/orders", {"trader": "0xabc"}, 400, "invalid_parameter", "trader"),
    ("/api/orders", {"market": "SILVER_V1", "status": "weird"}, 400, "invalid_parameter", "status"),
    ("/api/markets/summary", {"x": "1"}, 400, "invalid_parameter", "x"),
])
def test_bad_parameters_get_a_clear_4xx(served, path, params, status, code, parameter) -> None:  # type: ignore[no-untyped-def]
    _chain, _svc, url, _p = served
    r = httpx.get(f"http://{url}{path}", params=params)
    assert r.status_code == status
    assert r.json()["error"]["code"] == code and r.json()["error"]["parameter"] == parameter


def _all_trades(db: str, market: str) -> list[tuple[int, int]]:
    with engine_for(db).connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT block_number, log_index FROM trades t JOIN markets m USING (market_id) WHERE m.metric_id = :m "
            "ORDER BY 1 DESC, 2 DESC"), {"m": market})]


def test_trade_pages_have_no_duplicates_or_gaps_while_new_trades_arrive(served, database: str) -> None:  # type: ignore[no-untyped-def]
    chain, _svc, url, _p = served
    expected = _all_trades(database, "SILVER_V1")
    assert len(expected) > 30
    got: list[tuple[int, int]] = []
    cursor = None
    pages = 0
    while True:
        params = {"market": "SILVER_V1", "limit": 7, **({"cursor": cursor} if cursor else {})}
        body = httpx.get(f"http://{url}/api/trades", params=params).json()
        got += [(t["block"], t["log_index"]) for t in body["trades"]]
        pages += 1
        if pages == 2:  # new trades land on top while the client pages
            Simulator(chain.anvil.w3, chain.dep, seed=44, traders=4).run_batches(100, per_block=20)
            chain.anvil.mine(3)
            ingest_all(chain, database)
            assert len(_all_trades(database, "SILVER_V1")) > len(expected)
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert got == expected


def test_orders_pages_by_trader_cover_exactly_the_traders_orders(served, database: str) -> None:  # type: ignore[no-untyped-def]
    chain, _svc, url, _p = served
    trader = chain.anvil.w3.eth.accounts[2].lower()
    with engine_for(database).connect() as conn:
        expected = {(r.order_id, r.status) for r in conn.execute(text(
            "SELECT order_id, status FROM orders WHERE trader = :t AND status IN ('open', 'partially_filled')"),
            {"t": trader})}
    got, cursor = set(), None
    while True:
        params = {"trader": trader, "status": "active", "limit": 5, **({"cursor": cursor} if cursor else {})}
        body = httpx.get(f"http://{url}/api/orders", params=params).json()
        got |= {(o["order_id"], o["status"]) for o in body["orders"]}
        assert all(o["trader"] == trader for o in body["orders"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert got == expected and got


def test_summary_and_depth_agree_with_the_live_book(served) -> None:  # type: ignore[no-untyped-def]
    chain, svc, url, _p = served
    wait_until_current(svc, chain)
    summary = {m["market"]: m for m in httpx.get(f"http://{url}/api/markets/summary").json()["markets"]}
    assert set(summary) == {"SILVER_V1", "GOLD_V1", "ALUMINUM_V1"}
    for market, s in summary.items():
        depth = httpx.get(f"http://{url}/api/depth", params={"market": market, "levels": 1}).json()
        assert s["best_bid"] == depth["bids"][0][0] and s["best_ask"] == depth["asks"][0][0]
        assert int(s["spread"]) == int(s["best_ask"]) - int(s["best_bid"]) > 0
        assert int(s["volume_24h"]) > 0 and int(s["low_24h"]) <= int(s["last"]) <= int(s["high_24h"])


def test_ready_turns_false_when_the_head_advances_and_we_do_not(anvil_factory: type[Anvil], tmp_path: Path) -> None:
    with _serve(anvil_factory(), tmp_path) as (chain, svc, url, _p, _db):
        _ready_then_stale(chain, svc, url)


def _ready_then_stale(chain: DevChain, svc: LiveService, url: str) -> None:
    wait_until_current(svc, chain)
    assert httpx.get(f"http://{url}/ready").status_code == 200
    svc.follower.stop()
    svc.thread.join(10)
    chain.anvil.mine(10)
    deadline = time.monotonic() + 10
    while (r := httpx.get(f"http://{url}/ready")).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert r.status_code == 503 and "behind the chain head" in r.json()["reason"]
    assert httpx.get(f"http://{url}/health").json()["lag_blocks"] >= 10


def test_emergency_pause_needs_the_token_and_shows_in_health(served) -> None:  # type: ignore[no-untyped-def]
    _chain, _svc, url, _p = served
    assert httpx.post(f"http://{url}/admin/pause", json={"paused": True}).status_code == 403
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.post(f"http://{url}/admin/pause", json={"paused": "yes"}, headers=auth).status_code == 400
    r = httpx.post(f"http://{url}/admin/pause", json={"paused": True, "market": "GOLD_V1"}, headers=auth)
    assert r.status_code == 200 and r.json()["paused"] == {"global": False, "markets": ["GOLD_V1"]}
    assert httpx.get(f"http://{url}/api/depth", params={"market": "GOLD_V1"}).json()["paused"] is True
    httpx.post(f"http://{url}/admin/pause", json={"paused": True}, headers=auth)
    assert httpx.get(f"http://{url}/health").json()["paused"]["global"] is True
    httpx.post(f"http://{url}/admin/pause", json={"paused": False}, headers=auth)
    httpx.post(f"http://{url}/admin/pause", json={"paused": False, "market": "GOLD_V1"}, headers=auth)
    assert httpx.get(f"http://{url}/health").json()["paused"] == {"global": False, "markets": []}


def test_openapi_is_served_and_committed(served) -> None:  # type: ignore[no-untyped-def]
    _chain, _svc, url, _p = served
    served_spec = httpx.get(f"http://{url}/openapi.json").json()
    committed = json.loads((PROJECT_ROOT / "docs" / "openapi.json").read_text())
    assert served_spec == committed == json.loads(json.dumps(SPEC))
    assert set(committed["paths"]) >= {"/api/depth", "/api/trades", "/api/orders", "/api/markets/summary"}


def _schema(spec: dict, path: str) -> dict:
    return spec["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]


def test_every_field_answered_is_documented_and_freshness_is_required(served) -> None:  # type: ignore[no-untyped-def]
    """The spec names each field the service sends (so a new field cannot go undocumented), and `as_of` is
    required wherever the data follows ingestion."""
    chain, svc, url, _p = served
    wait_until_current(svc, chain)
    trader = chain.anvil.w3.eth.accounts[1].lower()
    for path, params in [("/api/depth", {"market": "SILVER_V1"}), ("/api/trades", {"market": "SILVER_V1"}),
                         ("/api/orders", {"trader": trader}), ("/api/markets/summary", {}), ("/health", {})]:
        schema = _schema(SPEC, path)
        body = httpx.get(f"http://{url}{path}", params=params).json()
        assert set(body) <= set(schema["properties"]), (path, set(body) - set(schema["properties"]))
        assert set(schema.get("required", ())) <= set(body), path
    for path in ("/api/trades", "/api/orders", "/api/markets/summary"):
        assert "as_of" in _schema(SPEC, path)["required"], path
    as_of = SPEC["components"]["schemas"]["AsOf"]
    assert as_of["required"] == ["ingested_block", "live_block"]
    summary = httpx.get(f"http://{url}/api/markets/summary").json()
    item = _schema(SPEC, "/api/markets/summary")["properties"]["markets"]["items"]["properties"]
    for m in summary["markets"]:
        assert set(m) <= set(item), set(m) - set(item)
    # each summary figure says where it comes from: the live book or Postgres as of the ingested block
    for name, prop in item.items():
        if name not in ("market", "decimals", "paused"):
            assert "as_of.live_block" in prop["description"] or "as_of.ingested_block" in prop["description"], name
    health = _schema(SPEC, "/health")["properties"]
    assert {"ready", "reason", "ingested_block", "ingestion_lag_blocks"} <= set(health)


def test_redis_holds_the_depth_and_streams_updates(served) -> None:  # type: ignore[no-untyped-def]
    chain, svc, url, prefix = served
    r = redis.Redis.from_url(REDIS_URL)
    pubsub = r.pubsub()
    pubsub.subscribe(f"{prefix}updates:SILVER_V1")
    pubsub.get_message(timeout=2)  # subscription confirmation
    Simulator(chain.anvil.w3, chain.dep, seed=77, traders=4).run_batches(60, per_block=20)
    wait_until_current(svc, chain)
    cached = json.loads(r.get(f"{prefix}depth:SILVER_V1"))
    depth = httpx.get(f"http://{url}/api/depth", params={"market": "SILVER_V1", "levels": 100}).json()
    assert (cached["seq"], cached["bids"], cached["asks"]) == (depth["seq"], depth["bids"], depth["asks"])
    msgs = []
    while (m := pubsub.get_message(timeout=1)) is not None:
        if m["type"] == "message":
            msgs.append(json.loads(m["data"]))
    assert msgs and msgs[-1]["seq"] == depth["seq"]
    trader = chain.anvil.w3.eth.accounts[1].lower()
    open_orders = r.hgetall(f"{prefix}orders:{trader}")
    resting = {k.decode(): int(json.loads(v)["remaining"]) for k, v in open_orders.items()}
    assert resting and all(q > 0 for q in resting.values())
    pubsub.close()


def test_rest_rate_limit_answers_429_per_client(served) -> None:  # type: ignore[no-untyped-def]
    """With the limiter's clock held still, whatever the machine's speed (the exact limit, per client and over a
    moving window: tests/test_api_hardening.py)."""
    _chain, svc, url, _p = served
    limit = svc.options.api_requests_per_second
    now = [time.monotonic() + 1.0]  # past every earlier request of this module's client
    svc.api.limiter.clock = lambda: now[0]
    try:
        with httpx.Client() as http:
            answers = [http.get(f"http://{url}/api/depth", params={"market": "SILVER_V1"}) for _ in range(limit + 5)]
        codes = [r.status_code for r in answers]
        assert codes == [200] * limit + [429] * 5
        limited = answers[limit]
        assert limited.json()["error"]["code"] == "rate_limited" and limited.headers["Retry-After"] == "1"
        now[0] += 1.0
        assert httpx.get(f"http://{url}/api/depth", params={"market": "SILVER_V1"}).status_code == 200
    finally:  # a fresh limiter: the held clock's timestamps lie ahead of the real one
        svc.api.limiter = MovingWindow(limit)
