"""How current each answer is, and a service that comes up without its node.

* REST history (trades, orders, summary statistics) comes from Postgres, which follows ingestion: each answer
  names the ingested frontier it is complete to and the live book's block; /health reports the difference.
  The frontier is left behind a gap on purpose, so that rows beyond it exist and the answer must not claim them.
* `orderbook live serve` against a dead node (a closed loopback port) answers /health and /ready at once with
  the node's host:port and the error, retries in the background, and becomes ready once an anvil listens there.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import yaml
from sqlalchemy import text

from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.config import load_config
from orderbook_pipelines.devchain.anvil import free_port
from orderbook_pipelines.devchain.simulator import Simulator
from orderbook_pipelines.ingestion.ingest import ingest_range
from orderbook_pipelines.ingestion.ranges import ranges_up_to
from orderbook_pipelines.live.service import ServiceOptions, describe_failure, node_address
from orderbook_pipelines.storage import checkpoints
from orderbook_pipelines.storage.db import drop_database, engine_for
from tests.conftest import Anvil, DevChain, eventually, make_devchain, new_database, sample_config
from tests.live_harness import running_service, wait_until_current

# -- freshness ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gapped(anvil_factory: type[Anvil], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """A chain whose last-but-one range is not ingested: the frontier stops before it, the last range is in."""
    chain = make_devchain(anvil_factory(), tmp_path_factory.mktemp("fresh"), ["SILVER_V1", "GOLD_V1"],
                          ["ALUMINUM_V1"], confirmations=2, range_size=10)
    Simulator(chain.anvil.w3, chain.dep, seed=17, traders=4).run_batches(500, per_block=20)
    chain.anvil.mine(3)
    cfg = chain.config
    safe = chain.anvil.w3.eth.block_number - cfg.chain.confirmations
    ranges = ranges_up_to(cfg.chain.start_block, cfg.chain.range_size, safe)
    db = new_database()
    client = ChainClient(chain.anvil.url)
    for a, b in ranges[:-2] + ranges[-1:]:
        ingest_range(cfg, client, engine_for(db), a, b)
    try:
        yield chain, db, ranges, safe
    finally:
        drop_database(db)


def _frontier(chain: DevChain, db: str) -> int | None:
    with engine_for(db).connect() as conn:
        return checkpoints.frontier(conn, chain.config.chain.chain_id, chain.config.chain.start_block)


def test_rest_history_names_the_ingested_block_it_is_complete_to(gapped: tuple) -> None:
    chain, db, ranges, safe = gapped
    frontier = ranges[-3][1]
    assert _frontier(chain, db) == frontier  # the gap stops the frontier
    with engine_for(db).connect() as conn:
        market, newest = conn.execute(text(
            "SELECT m.metric_id, max(t.block_number) FROM trades t JOIN markets m USING (market_id) "
            "GROUP BY 1 ORDER BY 2 DESC LIMIT 1")).one()
    assert newest > frontier  # rows beyond the frontier exist: "complete to" must not be "newest row"
    decimals = {m.metric_id: m.decimals for m in chain.config.markets}
    assert len(set(decimals.values())) > 1  # gen-1 and gen-2 markets scale differently
    with running_service(chain, db) as (service, url):
        wait_until_current(service, chain)
        head = chain.anvil.w3.eth.block_number
        base = f"http://{url}"

        trades = httpx.get(f"{base}/api/trades", params={"market": market, "limit": 500}).json()
        assert trades["as_of"] == {"ingested_block": frontier, "live_block": head}
        assert max(t["block"] for t in trades["trades"]) == newest
        orders = httpx.get(f"{base}/api/orders", params={"market": market}).json()
        assert orders["as_of"] == {"ingested_block": frontier, "live_block": head}

        summary = httpx.get(f"{base}/api/markets/summary").json()
        assert summary["as_of"]["ingested_block"] == frontier and summary["as_of"]["live_block"] == head
        assert summary["as_of"]["stats_computed_at"] == summary["stats_as_of"] is not None
        assert {m["market"]: m["decimals"] for m in summary["markets"]} == decimals

        health = httpx.get(f"{base}/health").json()
        assert health["ingested_block"] == frontier and health["chain_head"] == head
        assert health["ingestion_lag_blocks"] == head - frontier > service.options.ready_max_lag_blocks
        # /ready is about the live book: history that lags is reported, not a reason to leave the balancer
        ready = httpx.get(f"{base}/ready")
        assert ready.status_code == 200 and health["ready"] is True and health["status"] == "ok", ready.text

        # the missing range arrives: every read moves on to the new frontier without a restart
        ingest_range(chain.config, ChainClient(chain.anvil.url), engine_for(db), *ranges[-2])
        frontier = safe  # the last range is ingested up to the safe head
        assert _frontier(chain, db) == frontier > ranges[-3][1]

        def as_of(path: str, params: dict[str, str]) -> Any:
            return httpx.get(f"{base}{path}", params=params).json()["as_of"]["ingested_block"]

        def same(v: Any) -> bool:
            return bool(v == frontier)

        eventually(lambda: as_of("/api/trades", {"market": market}), same, 15, "trades as_of")
        eventually(lambda: as_of("/api/orders", {"market": market}), same, 15, "orders as_of")
        eventually(lambda: as_of("/api/markets/summary", {}), same, 20, "summary as_of")
        lag = eventually(lambda: httpx.get(f"{base}/health").json(), lambda h: h["ingested_block"] == frontier,
                          15, "health")["ingestion_lag_blocks"]
        assert lag == chain.anvil.w3.eth.block_number - frontier


# -- a dead node -------------------------------------------------------------------------------------------

def test_node_address_names_host_and_port_only() -> None:
    assert node_address("https://user:pw@rpc.example.com/v3/0123456789abcdef") == "rpc.example.com:443"
    assert node_address("http://127.0.0.1:8545") == "127.0.0.1:8545"
    assert node_address("http://[::1]:8545/key") == "[::1]:8545"
    port = free_port()
    try:
        ChainClient(f"http://u:secret@127.0.0.1:{port}/k3y", retries=0).block_number()
    except Exception as exc:
        why = describe_failure(exc, node_address(f"http://u:secret@127.0.0.1:{port}/k3y"))
    else:
        raise AssertionError("a closed port answered")
    assert why.startswith(f"RPC node 127.0.0.1:{port} unreachable: ") and "refused" in why.lower(), why
    assert "secret" not in why and "k3y" not in why


def test_service_answers_health_while_the_node_is_down_and_becomes_ready_when_it_answers(
        database: str, tmp_path: Path) -> None:
    port = free_port()  # nothing listens here yet
    doc = sample_config()
    doc["chain"]["rpc_url"] = f"http://obp:s3cretpw@127.0.0.1:{port}"
    path = tmp_path / "dead-node.yaml"
    path.write_text(yaml.safe_dump(doc))
    cfg = load_config(path)
    chain = DevChain(cast(Anvil, None), cast(Any, None), path, cfg)  # running_service reads only the config
    options = ServiceOptions(poll_s=0.2, markets_refresh_s=0.5, start_retry_s=0.2, start_retry_max_s=1.0)
    node = None
    with running_service(chain, database, options=options) as (service, url):
        base = f"http://{url}"
        where = f"127.0.0.1:{port}"
        health = httpx.get(f"{base}/health", timeout=5)
        assert health.status_code == 200
        h = health.json()
        assert (h["status"], h["ready"], h["rpc_node"], h["applied_block"]) == ("starting", False, where, None)
        assert where in h["reason"] and "refused" in h["reason"].lower(), h["reason"]
        assert "s3cretpw" not in health.text
        ready = httpx.get(f"{base}/ready", timeout=5)
        assert ready.status_code == 503 and where in ready.json()["reason"], ready.text
        depth = httpx.get(f"{base}/api/depth", params={"market": "SILVER_V1"}, timeout=5)
        assert depth.status_code == 503 and depth.json()["error"]["code"] == "not_ready"
        assert where in depth.json()["error"]["message"]
        # still retrying in the background, not given up
        eventually(lambda: service.start_attempts, lambda n: n >= 3, 30, "start attempts")
        try:
            node = Anvil(port=port)  # the node that was down comes up where it is expected
            eventually(lambda: httpx.get(f"{base}/ready", timeout=5).status_code, lambda s: s == 200, 60,
                        "/ready after the node came up")
            h = httpx.get(f"{base}/health", timeout=5).json()
            assert (h["status"], h["ready"], h["reason"]) == ("ok", True, "current")
            node.w3.provider.make_request("anvil_mine", ["0x3"])  # type: ignore[arg-type]
            head = node.w3.eth.block_number
            eventually(lambda: httpx.get(f"{base}/health", timeout=5).json()["applied_block"],
                        lambda b: b == head, 30, "applied block")
            assert httpx.get(f"{base}/api/depth", params={"market": "SILVER_V1"}, timeout=5).status_code == 200

            node.stop()  # and down again: /ready stops claiming the book is current, /health says why
            node = None
            r = eventually(lambda: httpx.get(f"{base}/ready", timeout=5), lambda r: r.status_code == 503, 30,
                            "/ready after the node went away")
            assert where in r.json()["reason"], r.text
            h = httpx.get(f"{base}/health", timeout=5).json()
            assert h["status"] == "degraded" and where in h["reason"]
        finally:
            if node is not None:
                node.stop()
