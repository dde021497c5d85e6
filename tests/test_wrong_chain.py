"""A node of another chain is refused everywhere, before anything is written or served.

Two real anvil nodes with the same contracts at the same addresses (same deployer, same nonces): the configured
chain (31337) and another one (`--chain-id 999`) with its own order flow. The configuration says 31337; only the
URL points at the other node. `orderbook ingest` (one worker and several), the Dagster ingestion asset and
`orderbook reconcile` exit with one line naming both ids and the node, writing nothing; the live service is not
ready, says why and serves no book, at start and after its node is replaced behind the same address.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from orderbook_pipelines.chain.rpc import ChainClient, WrongChain
from orderbook_pipelines.cli.common import WRONG_CHAIN
from orderbook_pipelines.config import load_config
from orderbook_pipelines.devchain.anvil import Anvil, free_port
from orderbook_pipelines.devchain.simulator import Simulator
from orderbook_pipelines.live.service import ServiceOptions
from orderbook_pipelines.storage.db import engine_for
from tests.conftest import ORDERBOOK, DevChain, eventually, make_devchain
from tests.live_harness import running_service

GEN1, GEN2 = ["SILVER_V1", "GOLD_V1"], ["ALUMINUM_V1"]
OTHER_CHAIN_ID = 999
TABLES = ("order_events", "rejected_logs", "blocks", "ingestion_checkpoints", "trades", "orders", "positions",
          "reorgs", "markets")


def _counts(db: str) -> dict[str, int]:
    with engine_for(db).connect() as conn:
        return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in TABLES}


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevChain, DevChain]]:
    """(configured chain 31337, other chain 999), each with its own seeded order flow, both final."""
    nodes: list[Anvil] = []
    try:
        nodes.append(Anvil())
        right = make_devchain(nodes[0], tmp_path_factory.mktemp("right"), GEN1, GEN2, confirmations=2, range_size=10)
        nodes.append(Anvil(chain_id=OTHER_CHAIN_ID))
        other = make_devchain(nodes[1], tmp_path_factory.mktemp("other"), GEN1, GEN2, confirmations=2, range_size=10)
        assert (other.dep.router, other.dep.gen1_books, other.dep.gen2_books) == (
            right.dep.router, right.dep.gen1_books, right.dep.gen2_books), "same contracts, same addresses"
        assert (right.config.chain.chain_id, other.config.chain.chain_id) == (31337, OTHER_CHAIN_ID)
        Simulator(right.anvil.w3, right.dep, seed=21, traders=4).run_batches(150, per_block=15)
        Simulator(other.anvil.w3, other.dep, seed=22, traders=4).run_batches(150, per_block=15)
        for c in (right, other):
            c.anvil.mine(3)
        yield right, other
    finally:
        for n in nodes:
            n.stop()


def _orderbook(right: DevChain, db: str, rpc_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OBP_CONFIG": str(right.config_path), "DATABASE_URL": db, "OBP_RPC_URL": rpc_url}
    proc = subprocess.run([ORDERBOOK, *args], env=env, capture_output=True, text=True, timeout=120)
    print(f"orderbook {' '.join(args)} at {rpc_url}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def _assert_refused(proc: subprocess.CompletedProcess[str], node_url: str) -> None:
    assert proc.returncode == WRONG_CHAIN == 78, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr
    # One verdict line for the operator; above it only the log record of each range that was refused.
    assert all("range not ingested" in x for x in lines[:-1]), proc.stderr
    line = lines[-1]
    assert line.startswith("wrong chain: "), line
    assert f"chain id {OTHER_CHAIN_ID}" in line and "chain.chain_id 31337" in line, line
    assert node_url in line, line
    assert "reorg" not in line.lower(), line


def test_the_client_refuses_before_its_first_answer_and_after_a_silent_reconnect(
        chains: tuple[DevChain, DevChain]) -> None:
    right, other = chains
    with pytest.raises(WrongChain) as caught:
        ChainClient(other.anvil.url, expected_chain_id=31337).block_number()
    assert (caught.value.expected, caught.value.actual) == (31337, OTHER_CHAIN_ID)
    assert ChainClient(right.anvil.url, expected_chain_id=31337).block_number() == right.anvil.w3.eth.block_number
    assert ChainClient(other.anvil.url).block_number() > 0  # without an expected id nothing is checked

    # The node behind one address is replaced between two calls: no call fails, the connection is reopened
    # in place, and only the chain-id check after the reconnect stops the second answer from being used.
    port = free_port()
    first = Anvil(port=port)
    client = ChainClient(first.url, expected_chain_id=31337, retries=0)
    try:
        first.mine(5)
        assert client.block_number() == 5
    finally:
        first.stop()
    second = Anvil(port=port, chain_id=OTHER_CHAIN_ID)
    try:
        second.mine(9)
        with pytest.raises(WrongChain, match=f"serves chain id {OTHER_CHAIN_ID}"):
            client.block_number()
        with pytest.raises(WrongChain):
            client.headers([1, 2, 3])
    finally:
        second.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_ingest_from_a_node_of_another_chain_writes_nothing_into_a_fresh_database(
        chains: tuple[DevChain, DevChain], database: str, workers: int) -> None:
    right, other = chains
    head = other.anvil.w3.eth.block_number
    proc = _orderbook(right, database, other.anvil.url, "ingest", "--from", "0", "--to", str(head),
                      "--workers", str(workers))
    _assert_refused(proc, other.anvil.url)
    assert set(_counts(database).values()) == {0}, _counts(database)
    # The same command at the configured chain's node writes: the refusal above is the check, not the setup.
    ok = _orderbook(right, database, right.anvil.url, "ingest", "--from", "0", "--to", str(head))
    assert ok.returncode == 0, ok.stderr
    assert _counts(database)["order_events"] > 100


def test_a_database_filled_from_the_right_chain_is_left_alone_and_no_reorg_is_diagnosed(
        chains: tuple[DevChain, DevChain], database: str) -> None:
    right, other = chains
    head = right.anvil.w3.eth.block_number
    assert _orderbook(right, database, right.anvil.url, "ingest", "--from", "0", "--to", str(head)).returncode == 0
    with engine_for(database).connect() as conn:
        before = [tuple(r) for r in conn.execute(text(
            "SELECT block_number, log_index, block_hash FROM order_events ORDER BY 1, 2"))]
    filled = _counts(database)
    assert filled["order_events"] > 100 and filled["reorgs"] == 0

    for args in (["ingest", "--from", "0", "--to", str(head + 20)], ["reconcile", "--lookback", "100"],
                 ["reconcile", "--lookback", "100", "--repair"]):
        _assert_refused(_orderbook(right, database, other.anvil.url, *args), other.anvil.url)
    assert _counts(database) == filled  # no reorg recorded, nothing deleted or added
    with engine_for(database).connect() as conn:
        assert [tuple(r) for r in conn.execute(text(
            "SELECT block_number, log_index, block_hash FROM order_events ORDER BY 1, 2"))] == before
    assert _orderbook(right, database, right.anvil.url, "reconcile", "--lookback", "100").returncode == 0


def test_the_dagster_ingestion_asset_fails_with_the_wrong_chain_and_writes_nothing(
        chains: tuple[DevChain, DevChain], database: str, tmp_path: Path) -> None:
    from dagster import DagsterEventType, DagsterInstance, materialize

    from orderbook_pipelines.assets.ingestion import ingestion_assets
    from orderbook_pipelines.ingestion.ranges import range_key
    from orderbook_pipelines.partitions import block_ranges
    from orderbook_pipelines.resources import ChainResource, PostgresResource, SettingsResource

    right, other = chains
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(right.config_path.read_text().replace(right.anvil.url, other.anvil.url))
    assert load_config(cfg_path).chain.rpc_url == other.anvil.url
    settings = SettingsResource(config_path=str(cfg_path))
    resources = {"settings": settings, "chain": ChainResource(settings=settings),
                 "postgres": PostgresResource(database_url=database)}
    instance = DagsterInstance.ephemeral()
    c = right.config.chain
    key = range_key(c.start_block, c.start_block + c.range_size - 1)
    instance.add_dynamic_partitions(block_ranges.name, [key])
    result = materialize(ingestion_assets, partition_key=key, instance=instance, resources=resources,
                         raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE)
    error = failure.step_failure_data.error
    error = error.cause if error is not None and error.cause is not None else error  # under Dagster's wrapper
    assert error is not None and error.cls_name == "WrongChain", error
    assert f"chain id {OTHER_CHAIN_ID}" in error.message and "chain.chain_id 31337" in error.message
    assert set(_counts(database).values()) == {0}, _counts(database)


def _health(base: str) -> dict[str, Any]:
    return httpx.get(f"{base}/health", timeout=5).json()


def test_the_live_service_is_not_ready_and_serves_no_book_from_another_chain(
        chains: tuple[DevChain, DevChain], database: str, tmp_path: Path) -> None:
    right, other = chains
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(right.config_path.read_text().replace(right.anvil.url, other.anvil.url))
    wrong = DevChain(other.anvil, other.dep, cfg_path, load_config(cfg_path))
    options = ServiceOptions(poll_s=0.2, markets_refresh_s=0.5, start_retry_s=0.2, start_retry_max_s=1.0)
    with running_service(wrong, database, options=options) as (service, url):
        base = f"http://{url}"
        h = eventually(lambda: _health(base), lambda h: "wrong chain" in (h["reason"] or ""), 30, "/health")
        assert h["ready"] is False and h["applied_block"] is None and h["markets"] == 0
        assert f"chain id {OTHER_CHAIN_ID}" in h["reason"] and "31337" in h["reason"], h["reason"]
        assert other.anvil.url in h["reason"], h["reason"]
        ready = httpx.get(f"{base}/ready", timeout=5)
        assert ready.status_code == 503 and "wrong chain" in ready.json()["reason"]
        depth = httpx.get(f"{base}/api/depth", params={"market": "SILVER_V1"}, timeout=5)
        assert depth.status_code == 503 and "wrong chain" in depth.json()["error"]["message"], depth.text
        eventually(lambda: service.start_attempts, lambda n: n >= 3, 30, "start attempts")  # keeps refusing
        assert service.follower.books.head is None and service.hub.views == {}


def test_the_live_service_stops_serving_when_its_node_is_replaced_by_another_chain(
        database: str, tmp_path: Path) -> None:
    port = free_port()
    first = Anvil(port=port)
    second: Anvil | None = None
    try:
        chain = make_devchain(first, tmp_path, GEN1, GEN2, confirmations=2, range_size=10)
        Simulator(first.w3, chain.dep, seed=23, traders=3).run_batches(60, per_block=10)
        first.mine(3)
        options = ServiceOptions(poll_s=0.2, markets_refresh_s=0.5, start_retry_s=0.2, start_retry_max_s=1.0)
        with running_service(chain, database, options=options) as (service, url):
            base = f"http://{url}"
            eventually(lambda: httpx.get(f"{base}/ready", timeout=5).status_code, lambda s: s == 200, 60, "/ready")
            assert httpx.get(f"{base}/api/depth", params={"market": "SILVER_V1"}, timeout=5).status_code == 200
            head = first.w3.eth.block_number
            eventually(lambda: service.follower.books.head, lambda b: b is not None and b.number == head, 30,
                        "the follower at the head")
            kept = service.follower.books.head
            first.stop()
            second = Anvil(port=port, chain_id=OTHER_CHAIN_ID)  # same address, another chain, same contracts
            (tmp_path / "other").mkdir()
            other = make_devchain(second, tmp_path / "other", GEN1, GEN2, confirmations=2, range_size=10)
            assert other.dep.router == chain.dep.router
            second.mine(head + 10)  # longer than what the follower holds: it would follow it if it could
            calls = service.client.stats["rpc_calls"]
            h = eventually(lambda: _health(base), lambda h: "wrong chain" in (h["reason"] or ""), 30, "/health")
            assert h["ready"] is False and f"chain id {OTHER_CHAIN_ID}" in h["reason"] and "31337" in h["reason"]
            assert httpx.get(f"{base}/ready", timeout=5).status_code == 503
            depth = httpx.get(f"{base}/api/depth", params={"market": "SILVER_V1"}, timeout=5)
            assert depth.status_code == 503 and "wrong chain" in depth.json()["error"]["message"], depth.text
            # the follower kept trying against the new node and applied nothing of it
            eventually(lambda: service.client.stats["rpc_calls"], lambda n: n >= calls + 3, 30, "follower calls")
            assert service.follower.books.head == kept
            assert service.hub.publishable == set()
    finally:
        first.stop()
        if second is not None:
            second.stop()
