"""Bad input on a real chain: provider refusals and outages, a real reorg, malformed and unknown logs emitted
by real contract code, ranges that are not final yet. Each loses nothing and says why."""

from __future__ import annotations

import itertools
import logging
import pickle
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from eth_utils import keccak
from sqlalchemy import text

from orderbook_pipelines.chain.rpc import ChainClient, RpcError
from orderbook_pipelines.config import load_config
from orderbook_pipelines.devchain.simulator import Simulator
from orderbook_pipelines.ingestion.ingest import ingest_range
from orderbook_pipelines.ingestion.ranges import RangeNotFinal, ranges_up_to
from orderbook_pipelines.storage.db import engine_for
from orderbook_pipelines.storage.writer import ReorgDetected
from tests.conftest import Anvil, DevChain, make_devchain
from tests.rpc_proxy import (
    RpcProxy,
    fail_get_logs_after,
    rate_limited_first,
    too_many_results_above,
    too_many_results_over,
)


def _count(db: str, sql: str, **params: object) -> int:
    with engine_for(db).connect() as conn:
        return int(conn.execute(text(sql), params).scalar_one())


def _addresses(chain: DevChain) -> list[str]:
    return [chain.dep.router, *chain.dep.gen1_books.values(), *chain.dep.gen2_books.values()]


def test_too_many_results_splits_the_window_and_misses_nothing(simulated_chain: DevChain) -> None:
    start = simulated_chain.config.chain.start_block
    end = start + 99
    direct = ChainClient(simulated_chain.anvil.url).get_logs(start, end, _addresses(simulated_chain))
    with RpcProxy(simulated_chain.anvil.url, too_many_results_above(7)) as proxy:
        client = ChainClient(proxy.url, max_logs_range=100)
        got = client.get_logs(start, end, _addresses(simulated_chain))
    assert len(direct) > 1000
    assert got == direct
    assert client.stats["range_splits"] >= 4  # 100 -> 50 -> 25 -> 12 -> 6
    assert proxy.windows[:5] == [(100, True), (50, True), (25, True), (12, True), (6, False)]
    assert all(w > 7 for w, refused in proxy.windows if refused)
    assert all(w <= 7 for w, refused in proxy.windows if not refused)  # what got through obeyed the provider
    assert sum(w for w, refused in proxy.windows if not refused) == end - start + 1  # each block asked once


def _counter(name: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name) or 0.0


def test_the_window_shrinks_on_a_result_cap_and_grows_back_after_successes(small_chain: DevChain) -> None:
    """A provider that caps the number of logs an answer may hold (the node's real answer is counted): busy blocks
    halve the window until it fits, quiet blocks double it back to the configured maximum."""
    anvil = small_chain.anvil
    start = small_chain.config.chain.start_block
    Simulator(anvil.w3, small_chain.dep, seed=5, traders=4).run_batches(160, per_block=40)  # 4 busy blocks
    anvil.mine(200)  # then quiet ones
    end = anvil.w3.eth.block_number
    direct = ChainClient(anvil.url).get_logs(start, end, _addresses(small_chain))
    per_block: dict[str, int] = {}
    for lg in direct:
        per_block[lg["blockNumber"]] = per_block.get(lg["blockNumber"], 0) + 1
    cap = max(per_block.values())  # one block always fits; two busy blocks never do
    assert sorted(per_block.values())[-2] * 2 > cap > 50
    maximum = 64
    refused_before = _counter("obp_rpc_getlogs_refused_total")
    with RpcProxy(anvil.url, answer_fault=too_many_results_over(cap)) as proxy:
        client = ChainClient(proxy.url, max_logs_range=maximum)
        got = client.get_logs(start, end, _addresses(small_chain))
    assert got == direct
    windows = proxy.windows
    refusals = [i for i, (_, refused) in enumerate(windows) if refused]
    assert windows[0] == (maximum, True) and len(refusals) >= 2
    assert _counter("obp_rpc_getlogs_refused_total") - refused_before == len(refusals) == client.stats["range_splits"]
    asked = 0
    for (size, refused), (nxt, _) in itertools.pairwise(windows):  # the rule, step by step
        asked += 0 if refused else size
        left = end - start + 1 - asked
        assert nxt == (max(1, size // 2) if refused else min(maximum, 2 * size, left)), windows
    assert min(size for size, _ in windows) < maximum // 4  # it really shrank ...
    after = [size for size, refused in windows[refusals[-1] + 1:]]
    assert after.count(maximum) >= 2 and client.logs_window == maximum, windows  # ... and grew back to the maximum


def test_rate_limits_are_retried_with_backoff(simulated_chain: DevChain) -> None:
    start = simulated_chain.config.chain.start_block
    with RpcProxy(simulated_chain.anvil.url, rate_limited_first(2)) as proxy:
        client = ChainClient(proxy.url, retries=3, backoff_max_s=0.05)
        got = client.get_logs(start, start + 20, _addresses(simulated_chain))
        assert proxy.calls["eth_getLogs"] == 3
    assert got == ChainClient(simulated_chain.anvil.url).get_logs(start, start + 20, _addresses(simulated_chain))
    assert client.stats["rpc_errors"] == 2


def _closed_port() -> int:
    """A loopback port nothing listens on (bound once, never listened, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_node() -> Iterator[str]:
    """A loopback node that accepts connections (the kernel completes them) and never answers."""
    with socket.create_server(("127.0.0.1", 0), backlog=32) as srv:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"


def test_the_deadline_ends_retries_the_attempt_cap_would_allow(caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    client = ChainClient(url, retries=50, backoff_max_s=0.2, deadline_s=1.0)
    final = r"^eth_blockNumber failed after \d+ attempts in [\d.]+s: connection refused$"
    with caplog.at_level(logging.WARNING, logger="orderbook_pipelines.chain.rpc"), \
            pytest.raises(RpcError, match=final) as exc:
        client.block_number()
    attempts = client.stats["rpc_calls"]
    assert 2 <= attempts < 51  # retried, but stopped by the deadline, not by the 51-attempt cap
    assert exc.value.node == url
    progress = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(progress) == attempts - 1  # one line per retry
    assert progress[0].startswith(f"eth_blockNumber at {url}: attempt 1 of 51 failed (connection refused); "
                                  "retrying in ")


def test_a_silent_node_fails_after_its_timeout_within_the_deadline(silent_node: str) -> None:
    client = ChainClient(silent_node, timeout_s=0.5, retries=5, backoff_max_s=0.1, deadline_s=1.0)
    with pytest.raises(RpcError, match=r"eth_chainId failed after [123] attempts? in [\d.]+s: no answer within 0.5s"):
        client.chain_id()


def test_rpc_errors_name_the_node_redacted_and_survive_a_worker_process() -> None:
    port = _closed_port()
    client = ChainClient(f"http://indexer:hunter2pass@127.0.0.1:{port}/v3/0123456789abcdef0123", retries=0)
    with pytest.raises(RpcError) as exc:
        client.block_number()
    assert exc.value.node == f"http://indexer:***@127.0.0.1:{port}/v3/***"
    again = pickle.loads(pickle.dumps(exc.value))  # how a backfill worker's failure reaches the parent
    assert (type(again), str(again), again.node) == (RpcError, str(exc.value), exc.value.node)


def test_an_error_answer_is_not_retried_and_names_the_node(anvil_factory: type[Anvil]) -> None:
    anvil = anvil_factory()
    client = ChainClient(anvil.url, retries=5)
    with pytest.raises(RpcError, match="no_such_method") as exc:
        client.call("no_such_method", [])
    assert type(exc.value) is RpcError and exc.value.node == anvil.url
    assert client.stats["rpc_calls"] == 1


def test_provider_dying_halfway_writes_nothing_and_a_rerun_completes(simulated_chain: DevChain, database: str) -> None:
    cfg = simulated_chain.config
    a, b = ranges_up_to(cfg.chain.start_block, cfg.chain.range_size, cfg.chain.start_block + 30)[1]
    engine = engine_for(database)
    with RpcProxy(simulated_chain.anvil.url, fail_get_logs_after(2)) as proxy:
        client = ChainClient(proxy.url, retries=2, max_logs_range=5, backoff_max_s=0.05)
        with pytest.raises(RpcError, match=r"eth_getLogs failed after 3 attempts.*503"):
            ingest_range(cfg, client, engine, a, b)
    in_range = "SELECT count(*) FROM order_events WHERE block_number BETWEEN :a AND :b"
    assert _count(database, in_range, a=a, b=b) == 0
    assert _count(database, "SELECT count(*) FROM ingestion_checkpoints") == 0
    report = ingest_range(cfg, ChainClient(simulated_chain.anvil.url), engine, a, b)
    assert report.complete and report.events > 0
    assert _count(database, in_range, a=a, b=b) == report.events


def test_a_range_above_the_safe_head_is_refused(simulated_chain: DevChain, database: str) -> None:
    cfg = simulated_chain.config
    head = simulated_chain.anvil.w3.eth.block_number
    start = head - cfg.chain.confirmations + 1
    with pytest.raises(RangeNotFinal, match=f"safe head is {head - cfg.chain.confirmations}"):
        ingest_range(cfg, ChainClient(simulated_chain.anvil.url), engine_for(database), start, start + 10)
    assert _count(database, "SELECT count(*) FROM blocks") == 0


@pytest.fixture
def small_chain(anvil_factory: type[Anvil], tmp_path: Path) -> DevChain:
    return make_devchain(anvil_factory(), tmp_path, ["SILVER_V1"], ["ALUMINUM_V1"], confirmations=0, range_size=5)


def _ingest_all(chain: DevChain, db: str, client: ChainClient | None = None) -> None:
    cfg = chain.config
    client = client or ChainClient(chain.anvil.url)
    for a, b in ranges_up_to(cfg.chain.start_block, cfg.chain.range_size, chain.anvil.w3.eth.block_number):
        ingest_range(cfg, client, engine_for(db), a, b)


def test_a_real_reorg_fails_the_range_instead_of_writing_a_fork(small_chain: DevChain, database: str) -> None:
    anvil = small_chain.anvil
    Simulator(anvil.w3, small_chain.dep, seed=1).run_batches(8, per_block=4)
    snapshot = anvil.rpc("evm_snapshot")
    Simulator(anvil.w3, small_chain.dep, seed=2).run_batches(12, per_block=4)
    _ingest_all(small_chain, database)
    events_before = _count(database, "SELECT count(*) FROM order_events")
    orders_before = _count(database, "SELECT count(*) FROM orders")
    forked_from = anvil.w3.eth.block_number - 2

    anvil.rpc("evm_revert", snapshot)  # the last three blocks are gone; a different history replaces them
    Simulator(anvil.w3, small_chain.dep, seed=3).run_batches(16, per_block=4)
    cfg = small_chain.config
    client = ChainClient(anvil.url)
    (a, b), = [r for r in ranges_up_to(cfg.chain.start_block, cfg.chain.range_size, forked_from)
               if r[0] <= forked_from <= r[1]]
    with pytest.raises(ReorgDetected, match=r"stored hash .* reorganised away"):
        ingest_range(cfg, client, engine_for(database), a, b)
    assert _count(database, "SELECT count(*) FROM order_events") == events_before
    assert _count(database, "SELECT count(*) FROM orders") == orders_before


def test_next_range_after_a_replaced_boundary_block_is_refused(small_chain: DevChain, database: str) -> None:
    """Range [a, b] is stored; block b is then replaced by a fork, so range b+1.. no longer extends it."""
    anvil = small_chain.anvil
    cfg = small_chain.config
    Simulator(anvil.w3, small_chain.dep, seed=1).run_batches(8, per_block=4)
    head = anvil.w3.eth.block_number
    (a, b), = [r for r in ranges_up_to(cfg.chain.start_block, cfg.chain.range_size, head + 1)
               if r[0] <= head + 1 <= r[1]]
    anvil.mine(b - 1 - head)
    snapshot = anvil.rpc("evm_snapshot")
    anvil.mine(1)
    _ingest_all(small_chain, database)
    assert _count(database, "SELECT processed_to FROM ingestion_checkpoints WHERE range_start = :a", a=a) == b
    anvil.rpc("evm_revert", snapshot)
    Simulator(anvil.w3, small_chain.dep, seed=9).run_batches(4, per_block=4)  # a different block b
    anvil.mine(cfg.chain.range_size)
    events_before = _count(database, "SELECT count(*) FROM order_events")
    with pytest.raises(ReorgDetected, match=rf"block {b}: (stored hash .* reorganised away|parent hash)"):
        ingest_range(cfg, ChainClient(anvil.url), engine_for(database), b + 1, b + cfg.chain.range_size)
    assert _count(database, "SELECT count(*) FROM order_events") == events_before
    assert _count(database, "SELECT count(*) FROM blocks WHERE number > :b", b=b) == 0


def test_malformed_and_unknown_logs_from_real_contract_code_are_kept_with_reasons(
    small_chain: DevChain, database: str, tmp_path: Path
) -> None:
    """A contract at a registered market address emits a truncated OrderAdded and an event no ABI knows."""
    anvil = small_chain.anvil
    impostor = "0x" + "ab" * 20
    added = keccak(text="OrderAdded(uint256,uint256,uint8,uint256)")
    unknown = keccak(text="PriceLevelUpdated(uint256,uint8,uint256,uint256)")
    code = ("7f" + "00" * 31 + "2a" + "7f" + added.hex() + "6010" + "6000" + "a2"   # LOG2, 16 bytes of data
            + "7f" + unknown.hex() + "6080" + "6000" + "a1" + "00")                  # LOG1, 128 bytes
    anvil.rpc("anvil_setCode", impostor, "0x" + code)
    doc = yaml.safe_load(small_chain.config_path.read_text())
    doc["markets"].append({"metric_id": "IMPOSTOR_V1", "source": "gen1_book", "address": impostor})
    path = tmp_path / "with-impostor.yaml"
    path.write_text(yaml.safe_dump(doc))
    Simulator(anvil.w3, small_chain.dep, seed=4).run_batches(8, per_block=8)
    tx = anvil.w3.eth.send_transaction({"from": anvil.w3.eth.accounts[0], "to": anvil.w3.to_checksum_address(impostor),
                                        "gas": 100_000})
    block = anvil.w3.eth.wait_for_transaction_receipt(tx)["blockNumber"]
    chain = DevChain(anvil, small_chain.dep, path, load_config(path))
    _ingest_all(chain, database)
    with engine_for(database).connect() as conn:
        rows = conn.execute(text("SELECT block_number, address, topics, data, reason FROM rejected_logs "
                                 "ORDER BY log_index")).all()
    assert [r.block_number for r in rows] == [block, block]
    assert rows[0].address == impostor and rows[0].topics[0] == "0x" + added.hex()
    assert "malformed OrderAdded(uint256,uint256,uint8,uint256)" in rows[0].reason
    assert "data is 16 bytes, expected 96" in rows[0].reason
    assert rows[0].data == "0x" + "00" * 16
    assert f"unknown event topic0 0x{unknown.hex()}" in rows[1].reason
    # The good events around them are all there.
    assert _count(database, "SELECT count(*) FROM order_events WHERE kind = 'open'") == 8
