"""A range is read window by window and each window is COPYed while the next is fetched: a reorg that replaces
blocks of a window already COPYed, before the next window is read, must still leave nothing behind.

The fork is real (anvil's evm_revert, then a different branch), caused by the test at the moment the indexer asks
for its second window (the RPC proxy's hook, before the request reaches the node). The reference afterwards is
the node's own eth_getLogs of the canonical branch, not anything the indexer computed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.devchain.anvil import Anvil
from orderbook_pipelines.ingestion.ingest import ingest_range
from orderbook_pipelines.ingestion.reader import FIRST_WINDOW_BLOCKS, _tail_logs, next_window
from orderbook_pipelines.storage.db import drop_database, engine_for
from orderbook_pipelines.storage.writer import ReorgDetected
from tests.conftest import DevChain, make_devchain, new_database
from tests.fork_support import ChainTruth, Gate, mine_branch, stored_log_keys
from tests.rpc_proxy import RpcProxy

RANGE_SIZE = 4 * FIRST_WINDOW_BLOCKS  # several windows per range
CONFIRMATIONS = 2


@pytest.fixture()
def forkable(tmp_path: Path) -> Iterator[tuple[DevChain, str]]:
    anvil = Anvil()
    db = new_database()
    try:
        chain = make_devchain(anvil, tmp_path, ["SILVER_V1", "GOLD_V1"], ["ALUMINUM_V1"],
                              confirmations=CONFIRMATIONS, range_size=RANGE_SIZE)
        yield chain, db
    finally:
        drop_database(db)
        anvil.stop()


def test_a_reorg_between_two_windows_of_a_range_leaves_nothing_then_the_rerun_matches_the_chain(
        forkable: tuple[DevChain, str]) -> None:
    chain, db = forkable
    anvil, cfg = chain.anvil, chain.config
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    start = cfg.chain.start_block
    fork_from = anvil.w3.eth.block_number  # the branches start in the range's first window
    assert fork_from + 1 < start + FIRST_WINDOW_BLOCKS, "the fork must replace blocks of the first window"
    snapshot = anvil.rpc("evm_snapshot")
    length = RANGE_SIZE + CONFIRMATIONS + 4
    mine_branch(anvil, chain, rng, length, tag=1, busy_blocks=12)
    end = start + RANGE_SIZE - 1

    def fork() -> None:  # the first window is read and COPYed by now; the second is asked for next
        anvil.rpc("evm_revert", snapshot)
        mine_branch(anvil, chain, rng, length + 2, tag=2, busy_blocks=12)

    gate = Gate()
    seen = {"ranged getLogs": 0}

    def on_second_window() -> None:
        seen["ranged getLogs"] += 1
        gate.arm(fork)  # runs at the next ranged eth_getLogs, before the node answers it

    gate.arm(on_second_window)
    engine = engine_for(db)
    with RpcProxy(anvil.url, gate) as proxy:
        with pytest.raises(ReorgDetected, match="reorganised while the range was read"):
            ingest_range(cfg, ChainClient(proxy.url), engine, start, end)
        assert gate.fired.is_set(), f"the fork did not happen during the read (seed {seed})"
        with engine.connect() as conn:
            left = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()
                    for t in ("order_events", "trades", "orders", "ingestion_checkpoints")}
        assert left == dict.fromkeys(left, 0), f"a refused range left rows behind: {left} (seed {seed})"

        report = ingest_range(cfg, ChainClient(proxy.url), engine, start, end)  # the chain is quiet now
    truth = ChainTruth(chain)
    want = truth.log_keys(start, end)
    assert report.events == len(want) > 0
    assert stored_log_keys(db, cfg.chain.chain_id, end) == want, f"stored events differ from the chain (seed {seed})"


@pytest.mark.parametrize(("blocks", "logs", "tail_logs", "expected"), [
    (16, 6_400, 1_600, 20),  # 400 logs a block: 8,000 logs is 20 blocks
    (20, 80_000, 20_000, 2),  # denser still: fewer blocks
    (16, 10**9, 0, 1),  # never less than one block
    (16, 0, 0, 32),  # empty: twice as many blocks
    (200, 0, 0, 250),  # up to the limit
    (16, 8, 0, 250),  # sparse: the limit, not 16,000 blocks
    (64, 4_000, 4_000, 32),  # busy only at its end (16 blocks, 250 a block): 32 blocks, not 128
    (64, 4_000, 0, 128),  # quiet at its end: the window's own average
])
def test_windows_are_sized_from_the_density_of_the_last(blocks: int, logs: int, tail_logs: int,
                                                        expected: int) -> None:
    assert next_window(blocks, logs, tail_logs, target=8_000, limit=250) == expected


def test_a_window_busy_at_its_end_is_sized_from_its_end() -> None:
    """Blocks 1-48 empty, then 16 blocks of 500 logs (the first trades after a deployment): the next window is
    sized from those 16 blocks, so it asks for about READ_WINDOW_LOGS logs, not 4x as many."""
    logs = [{"blockNumber": hex(n)} for n in range(49, 65) for _ in range(500)]
    width = next_window(64, len(logs), _tail_logs(logs, 64, 64), target=8_000, limit=250)
    assert width * 500 == 8_000
