"""Scale-out of the live service: two worker processes share the markets through Redis and a third, API-only
process serves clients too. Streams are identical and gap-free on every process, also when a worker stops
and its markets move to the other."""

from __future__ import annotations

import os
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import redis
from prometheus_client import REGISTRY

from orderbook_pipelines.devchain.simulator import Simulator
from orderbook_pipelines.live.cluster import owner_of
from tests.conftest import Anvil, make_devchain
from tests.live_harness import BookClient, running_service, wait_until_current
from tests.test_live_service import contract_levels

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
MARKETS = ["SILVER_V1", "GOLD_V1", "COPPER_V1", "OIL_WTI_V1"]


def _wait(predicate, what: str, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def test_rendezvous_owner_moves_only_the_dead_workers_markets() -> None:
    markets = [f"M{i}" for i in range(200)]
    before = {m: owner_of(m, ["a", "b", "c"]) for m in markets}
    after = {m: owner_of(m, ["a", "c"]) for m in markets}
    assert {before[m] for m in markets} == {"a", "b", "c"}
    assert all(after[m] == before[m] for m in markets if before[m] != "b")
    assert {after[m] for m in markets if before[m] == "b"} == {"a", "c"}


def test_two_workers_and_an_api_process_serve_identical_gap_free_streams(
        anvil_factory: type[Anvil], tmp_path: Path, database: str) -> None:
    chain = make_devchain(anvil_factory(), tmp_path, MARKETS, ["ALUMINUM_V1"], confirmations=2, range_size=25)
    anvil = chain.anvil
    Simulator(anvil.w3, chain.dep, seed=1).run_batches(100, per_block=20)
    prefix = f"obptest:{uuid.uuid4().hex[:8]}:"
    all_markets = [*MARKETS, "ALUMINUM_V1"]
    # Worker ids whose rendezvous split gives each worker at least one market (5 markets can all hash to one).
    first, second = next((f"w1-{i}", f"w2-{i}") for i in range(100)
                         if 0 < sum(owner_of(m, [f"w1-{i}", f"w2-{i}"]) == f"w1-{i}" for m in all_markets) < 5)
    try:
        with ExitStack() as stack:
            w1_stack = stack.enter_context(ExitStack())
            w1, _ = w1_stack.enter_context(running_service(chain, database, redis_url=REDIS_URL, redis_prefix=prefix,
                                                           cluster=True, worker_id=first))
            w2, url2 = stack.enter_context(running_service(chain, database, redis_url=REDIS_URL, redis_prefix=prefix,
                                                           cluster=True, worker_id=second))
            api, url_api = stack.enter_context(running_service(chain, database, redis_url=REDIS_URL,
                                                               redis_prefix=prefix, cluster=True))
            ids = set(w1.follower.market_names)
            _wait(lambda: (w1.follower.owned or set()) | (w2.follower.owned or set()) == ids
                  and not (w1.follower.owned or set()) & (w2.follower.owned or set())
                  and w1.follower.owned and w2.follower.owned, "the two workers split the markets")
            on_api = [BookClient(url_api, m, depth=50) for m in all_markets]
            on_w2 = [BookClient(url2, m, depth=50) for m in all_markets]

            def settle() -> None:
                for w in (w1, w2) if not w1_stack_closed else (w2,):
                    wait_until_current(w, chain)
                time.sleep(0.5)
                for c in on_api + on_w2:
                    c.drain()

            w1_stack_closed = False
            for seed in (2, 3):
                Simulator(anvil.w3, chain.dep, seed=seed).run_batches(120, per_block=15)
            settle()
            owned_by_w1 = set(w1.follower.owned or set())
            w1_stack.close()  # worker 1 stops: its markets move to worker 2
            w1_stack_closed = True
            _wait(lambda: w2.follower.owned == ids, "worker 2 adopted every market")
            reorgs_before = REGISTRY.get_sample_value("obp_live_reorgs_total") or 0.0
            snap = anvil.rpc("evm_snapshot")
            Simulator(anvil.w3, chain.dep, seed=4).run_batches(60, per_block=15)
            wait_until_current(w2, chain)
            anvil.rpc("evm_revert", snap)  # a reorg after the handover, on adopted markets too
            Simulator(anvil.w3, chain.dep, seed=5).run_batches(120, per_block=15)
            settle()

            assert owned_by_w1 and w2.node is not None
            assert (REGISTRY.get_sample_value("obp_live_reorgs_total") or 0.0) > reorgs_before  # counted by workers
            assert api.ready() == (True, "serving from redis") and api.follower.books.head is None  # follows nothing
            for a, b in zip(on_api, on_w2, strict=True):
                assert a.levels() == b.levels() == contract_levels(chain, a.market, 50), a.market
                assert (a.gaps, a.checksum_failures, b.gaps, b.checksum_failures) == (0, 0, 0, 0), a.market
                assert a.stream == b.stream, f"{a.market}: the two processes sent different streams"
                assert len(a.stream) > 3
            moved = [c for c in on_api if c.market in {w2.follower.market_names[m] for m in owned_by_w1}]
            assert moved and all(c.deltas > 0 for c in moved)
            for c in on_api + on_w2:
                c.close()
    finally:
        r = redis.Redis.from_url(REDIS_URL)
        keys = list(r.scan_iter(f"{prefix}*"))
        if keys:
            r.delete(*keys)


def test_rows_with_uint256_amounts_cross_redis_unchanged() -> None:
    """A worker publishes each block's rows for the API processes. Amounts are uint256 (a price of 120 with 18
    decimals is already past 2**64): such a row must arrive equal, not fail the publish (it stalled the worker's
    follower, one block per retry)."""
    from orderbook_pipelines.chain.normalize import OrderEventRow
    from orderbook_pipelines.live.node import rows_message, rows_of_message

    rows = [OrderEventRow(31337, 7, "0xb", "0xt", 0, i, "0xc", 1, "router", "OrderPlaced", "open", str(i), "0xa",
                          None, 0, 1, price, qty, None, None, None, None, f'{{"price": "{price}"}}')
            for i, (price, qty) in enumerate([(120_050_000_000_000_000_000, 4 * 10**17), (2**256 - 1, 2**255),
                                              (0, 1)])]
    rows.append(OrderEventRow(31337, 7, "0xb", "0xt", 0, 9, "0xc", None, "router", "OrderCancelled", "cancel", "1",
                              None, None, None, None, None, None, None, None, None, None, "{}"))
    r = redis.Redis.from_url(REDIS_URL)
    channel = f"obptest:{uuid.uuid4().hex[:8]}:rows"
    sub = r.pubsub(ignore_subscribe_messages=True)
    sub.subscribe(channel)
    try:
        assert r.publish(channel, rows_message(rows, None)) == 1
        msg = None
        deadline = time.monotonic() + 10
        while msg is None and time.monotonic() < deadline:
            msg = sub.get_message(timeout=0.5)
        assert msg is not None, "nothing arrived"
        assert rows_of_message(msg["data"]) == (rows, None)
        assert rows_of_message(rows_message([], 42)) == ([], 42)  # a reorg's start travels without rows
    finally:
        sub.close()
        r.close()
