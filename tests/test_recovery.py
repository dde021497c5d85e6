"""Recovery: a pipeline killed (SIGKILL) in the middle of a write loses and duplicates nothing after a restart,
and every command of docs/runbooks/snapshot-restore.md works on a real chain and database."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner
from web3 import Web3

from orderbook_pipelines.book.model import BUY, SELL
from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.cli import app
from orderbook_pipelines.config import PROJECT_ROOT
from orderbook_pipelines.devchain.deploy import artifact
from orderbook_pipelines.ingestion.ingest import ingest_range
from orderbook_pipelines.ingestion.ranges import ranges_up_to
from orderbook_pipelines.recovery.restore import build_snapshots
from orderbook_pipelines.recovery.store import store_snapshots
from orderbook_pipelines.storage.db import drop_database, engine_for
from orderbook_pipelines.storage.projections import ORDERS_WRITE
from tests.conftest import DevChain, cli_argv, new_database

# Every durable table, without the columns that record *when* a row was written.
TABLES = {
    "markets": "SELECT market_id, chain_id, metric_id, metric_hash, address, source, decimals, status FROM markets "
               "ORDER BY 1",
    "blocks": "SELECT * FROM blocks ORDER BY chain_id, number",
    "order_events": "SELECT chain_id, block_number, block_hash, block_time, tx_hash, tx_index, log_index, contract, "
                    "market_id, source, event_name, kind, order_id, trader, counterparty, side, order_type, price, "
                    "quantity, buy_order_id, sell_order_id, buyer, seller, args FROM order_events ORDER BY 1, 2, 7",
    "rejected_logs": "SELECT chain_id, block_number, log_index, block_hash, tx_hash, address, topics, data, reason "
                     "FROM rejected_logs ORDER BY 1, 2, 3",
    "checkpoints": "SELECT chain_id, range_start, range_end, processed_to, last_hash, events, rejected "
                   "FROM ingestion_checkpoints ORDER BY 1, 2",
    "orders": "SELECT * FROM orders ORDER BY market_id, contract, order_id",
    "trades": "SELECT * FROM trades ORDER BY market_id, block_number, log_index",
    "positions": "SELECT market_id, trader, net_quantity, bought, sold, buy_notional, sell_notional, trade_count, "
                 "last_block FROM positions ORDER BY 1, 2",
    "depth_snapshots": "SELECT market_id, block_number, block_hash, block_time, checksum, state_hash, orders, levels, "
                       "base_block, parquet_key, parquet_bytes FROM depth_snapshots ORDER BY 1, 2",
    "snapshot_orders": "SELECT * FROM snapshot_orders ORDER BY 1, 2, 3, 4",
}


def _dump(db: str) -> dict[str, list[tuple]]:
    with engine_for(db).connect() as conn:
        return {name: [tuple(r) for r in conn.execute(text(sql))] for name, sql in TABLES.items()}


def _ranges(chain: DevChain) -> list[tuple[int, int]]:
    c = chain.config.chain
    return ranges_up_to(c.start_block, c.range_size, chain.anvil.w3.eth.block_number - c.confirmations)


def _ingest(chain: DevChain, db: str, ranges: list[tuple[int, int]]) -> None:
    cfg = chain.config
    engine, client = engine_for(db), ChainClient(cfg.chain.rpc_url)
    for a, b in ranges:
        ingest_range(cfg, client, engine, a, b)


@pytest.fixture(scope="module")
def clean(simulated_chain: DevChain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, list[tuple]]]:
    """The reference: one uninterrupted ingestion (and snapshot at the frontier) into a fresh database."""
    db = new_database()
    _ingest(simulated_chain, db, _ranges(simulated_chain))
    engine = engine_for(db)
    store_snapshots(engine, build_snapshots(engine)[0], tmp_path_factory.mktemp("clean-objects"))
    yield _dump(db)
    drop_database(db)


def _wait_blocked(db: str, proc: subprocess.Popen, pattern: str) -> int:
    """The pid of the subprocess's backend once it waits for our lock inside its write transaction."""
    deadline = time.monotonic() + 120
    with engine_for(db).connect() as conn:
        while time.monotonic() < deadline:
            pid = conn.execute(text(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' "
                "AND xact_start IS NOT NULL AND regexp_replace(query, '\\s+', ' ', 'g') ILIKE :p"),
                {"p": f"%{pattern}%"}).scalar()
            if pid is not None:
                return int(pid)
            conn.rollback()
            assert proc.poll() is None, f"the pipeline exited ({proc.returncode}) before reaching the write: " \
                                        f"{proc.stderr.read() if proc.stderr else ''}"
            time.sleep(0.05)
    raise AssertionError(f"the pipeline never blocked on {pattern!r}")


def _backend_gone(db: str, pid: int) -> None:
    deadline = time.monotonic() + 60
    with engine_for(db).connect() as conn:
        while conn.execute(text("SELECT 1 FROM pg_stat_activity WHERE pid = :p"), {"p": pid}).first():
            conn.rollback()
            assert time.monotonic() < deadline, "the killed client's backend did not end"
            time.sleep(0.05)


# (table our test locks, SQL the pipeline blocks in, pipeline command, ranges ingested before it starts,
#  tables the killed transaction writes: they must be exactly as before the kill)
SCENARIOS = {
    "event-write": ("ingestion_checkpoints", "INSERT INTO ingestion_checkpoints", "ingest", 3, set(TABLES)),
    # (pg_stat_activity keeps the first 1 kB of a query: every orders write opens with the same comment; the
    #  range's events share its transaction, so nothing of the range may be visible: one unit of work)
    "projection-write": ("orders", ORDERS_WRITE, "ingest", 3, set(TABLES)),
    "snapshot-write": ("depth_snapshots", "DELETE FROM depth_snapshots", "snapshot", None, set(TABLES)),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_kill_9_mid_write_then_restart_loses_and_duplicates_nothing(
        simulated_chain: DevChain, clean: dict[str, list[tuple]], tmp_path: Path, scenario: str) -> None:
    table, pattern, command, done_before, untouched = SCENARIOS[scenario]
    ranges = _ranges(simulated_chain)
    db = new_database()
    try:
        _ingest(simulated_chain, db, ranges[:done_before] if done_before else ranges)
        before = _dump(db)
        if command == "ingest":
            args = ["ingest", "--from", str(ranges[done_before][0]), "--to", str(ranges[-1][1])]
        else:
            args = ["snapshot", "create"]
        env = {**os.environ, "DATABASE_URL": db, "OBP_CONFIG": str(simulated_chain.config_path),
               "OBP_SNAPSHOT_DIR": str(tmp_path / "objects")}
        locker = engine_for(db).connect()
        locker.execute(text(f"LOCK TABLE {table} IN SHARE MODE"))  # held until rollback: the pipeline's write waits
        proc = subprocess.Popen(cli_argv(*args), env=env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            backend = _wait_blocked(db, proc, pattern)
            proc.kill()  # SIGKILL: no cleanup, no rollback from the client
            assert proc.wait() == -9
        finally:
            locker.rollback()
            locker.close()
        _backend_gone(db, backend)

        after_kill = _dump(db)
        for name in untouched:
            assert after_kill[name] == before[name], f"{name}: a killed write must leave no trace"

        restart = subprocess.run(cli_argv(*args), env=env, cwd=PROJECT_ROOT, capture_output=True, text=True)
        assert restart.returncode == 0, restart.stderr
        got = _dump(db)
        if command == "ingest":  # no snapshots taken in this scenario; compare everything else
            got = {k: v for k, v in got.items() if k not in ("depth_snapshots", "snapshot_orders")}
            want = {k: v for k, v in clean.items() if k not in ("depth_snapshots", "snapshot_orders")}
        else:
            want = clean
        for name in want:
            assert len(got[name]) == len({repr(r) for r in got[name]}), f"{name}: duplicate rows"
            assert got[name] == want[name], f"{name} differs from a clean ingestion"
        assert len(got["order_events"]) > 8000 and len(got["orders"]) > 4000
    finally:
        drop_database(db)


# -- docs/runbooks/snapshot-restore.md, command by command ----------------------------------------------------
def _contract_hash(chain: DevChain, metric: str, block: int) -> str:
    import hashlib

    w3 = chain.anvil.w3
    addr = Web3.to_checksum_address(chain.dep.gen1_books[metric])
    c = w3.eth.contract(address=addr, abi=artifact("OrderBook")["abi"])
    h = hashlib.sha256()
    for side in (BUY, SELL):
        p, q, n = c.functions.getLevels(side, 1000).call(block_identifier=block)
        for price, qty, cnt in sorted(zip(p, q, n, strict=True)):
            h.update(f"{side}:{price}:{qty}:{cnt};".encode())
    return h.hexdigest()


def test_runbook_snapshot_restore(simulated_chain: DevChain, tmp_path: Path) -> None:
    db = new_database()
    runner = CliRunner()
    env = {"DATABASE_URL": db, "OBP_CONFIG": str(simulated_chain.config_path),
           "OBP_SNAPSHOT_DIR": str(tmp_path / "objects"), "OBP_SNAPSHOT_KEEP_LAST": "100"}

    def run(*args: str, code: int = 0) -> str:
        r = runner.invoke(app, list(args), env=env)
        assert r.exit_code == code, (args, r.output)
        return r.output

    try:
        ranges = _ranges(simulated_chain)
        mid_block = ranges[len(ranges) // 2][1]
        run("ingest", "--from", str(ranges[0][0]), "--to", str(mid_block))
        first = run("snapshot", "create")
        assert f"block {mid_block}: 12 market(s)" in first and "0 incremental" in first
        run("ingest", "--from", str(mid_block + 1), "--to", str(ranges[-1][1]))
        frontier = int(run("snapshot", "create").split(":")[0].split()[1])
        assert frontier == simulated_chain.anvil.w3.eth.block_number - simulated_chain.config.chain.confirmations

        listing = run("snapshot", "list", "--market", "GOLD_V1")
        assert [ln.split("\t")[1] for ln in listing.splitlines()[1:3]] == [str(frontier), str(mid_block)]

        out = run("snapshot", "restore", "--market", "GOLD_V1")
        assert f"snapshot at block {frontier} + 0 events" in out and "restored in" in out
        assert out.strip().splitlines()[-1] == f"state_hash {_contract_hash(simulated_chain, 'GOLD_V1', frontier)}"
        between = mid_block + 9
        out = run("snapshot", "restore", "--market", "GOLD_V1", "--block", str(between))
        assert f"snapshot at block {mid_block} + " in out
        assert out.strip().splitlines()[-1] == f"state_hash {_contract_hash(simulated_chain, 'GOLD_V1', between)}"
        run("snapshot", "restore", "--market", "GOLD_V1", "--block", str(frontier + 1000), code=2)

        assert "0 problem(s)" in run("snapshot", "verify")
        # a damaged snapshot (row and object) is found, and recreating it at its block repairs it
        with engine_for(db).begin() as conn:
            conn.execute(text("UPDATE depth_snapshots SET state_hash = repeat('0', 64) WHERE block_number = :b AND "
                              "market_id = (SELECT market_id FROM markets WHERE metric_id = 'GOLD_V1')"),
                         {"b": mid_block})
        bad = run("snapshot", "verify", code=1)
        assert f"snapshot market GOLD_V1 block {mid_block}: stored 000000000000" in bad
        out = run("snapshot", "restore", "--market", "GOLD_V1", "--block", str(mid_block))
        assert "no snapshot, full replay" in out  # the damaged snapshot is not trusted
        run("snapshot", "create", "--block", str(mid_block))
        assert "0 problem(s)" in run("snapshot", "verify")
        newest_silver = run("snapshot", "list", "--market", "SILVER_V1").splitlines()[1].split("\t")
        (tmp_path / "objects" / newest_silver[-1]).unlink()
        assert "is missing" in run("snapshot", "verify", code=1)
        run("snapshot", "create", "--full")
        assert "0 problem(s)" in run("snapshot", "verify")

        # the restored hash equals the hash of an exported replay of the same blocks
        events = tmp_path / "events.jsonl"
        run("replay", "export", "--out", str(events), "--market", "GOLD_V1")
        replayed = run("replay", "run", str(events))
        assert f"GOLD_V1\t{_contract_hash(simulated_chain, 'GOLD_V1', frontier)}" in replayed
    finally:
        drop_database(db)
