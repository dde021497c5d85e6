"""One row per deep reorg, on a real anvil chain and Postgres, following docs/runbooks/reorg-handling.md.

Stored final ranges, then 18+ of those final blocks replaced (evm_snapshot / evm_revert and another order
flow). Ingestion's reorg guard records the reorg at once (before any reconciliation runs), the runbook's dry run
finds the same row, the repair marks that row repaired, and `obp_deep_reorgs_unrepaired` goes back to 0 (the
OBPDeepReorg alert stops). A fork that reaches below the deployment block is repaired too.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.cli.common import REORG_DETECTED
from orderbook_pipelines.devchain.deploy import deploy
from orderbook_pipelines.devchain.simulator import Simulator
from orderbook_pipelines.ingestion.ingest import ingest_range
from orderbook_pipelines.ingestion.ranges import ranges_up_to
from orderbook_pipelines.ingestion.reconcile import reconcile
from orderbook_pipelines.quality.exporter import registry_for
from orderbook_pipelines.storage.db import drop_database, engine_for
from orderbook_pipelines.storage.writer import ReorgDetected
from tests.conftest import ORDERBOOK, Anvil, DevChain, make_devchain
from tests.test_reconcile import _fresh_state, _ingest, _state, _stored_ranges, _table

REORG_SQL = "SELECT fork_block, depth, old_hash, new_hash, repaired, events_deleted, events_inserted FROM reorgs"
REPLACED = 18  # final blocks the fork replaces, at least


def _final_ranges(chain: DevChain) -> list[tuple[int, int]]:
    c = chain.config.chain
    return ranges_up_to(c.start_block, c.range_size, chain.anvil.w3.eth.block_number - c.confirmations)


def _differing(chain: DevChain, db: str) -> list[tuple[int, str]]:
    """Stored blocks whose hash the chain no longer has, read with web3 (not the code under test)."""
    w3 = chain.anvil.w3
    head = w3.eth.block_number
    return [(n, h) for n, h in _table(db, "SELECT number, hash FROM blocks ORDER BY number")
            if n > head or w3.eth.get_block(n)["hash"].to_0x_hex() != h]


def _metrics(chain: DevChain, db: str) -> tuple[float | None, float | None]:
    reg = registry_for(chain.config, engine_for(db), ChainClient.from_config(chain.config.chain))
    return reg.get_sample_value("obp_deep_reorgs"), reg.get_sample_value("obp_deep_reorgs_unrepaired")


def _orderbook(chain: DevChain, db: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OBP_CONFIG": str(chain.config_path), "DATABASE_URL": db}
    env.pop("OBP_RPC_URL", None)
    proc = subprocess.run([ORDERBOOK, *args], env=env, capture_output=True, text=True, timeout=180)
    print(f"orderbook {' '.join(args)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def deep_fork(anvil_factory: type[Anvil], tmp_path: Path, database: str) -> Iterator[tuple[DevChain, str]]:
    """Ranges stored as final (2 confirmations), then more than REPLACED of those final blocks replaced."""
    chain = make_devchain(anvil_factory(), tmp_path, ["SILVER_V1", "GOLD_V1"], ["ALUMINUM_V1"], confirmations=2,
                          range_size=5)
    anvil = chain.anvil
    Simulator(anvil.w3, chain.dep, seed=31, traders=4).run_batches(60, per_block=6)
    snapshot = anvil.rpc("evm_snapshot")
    Simulator(anvil.w3, chain.dep, seed=32, traders=4).run_batches(125, per_block=5)
    anvil.mine(2)
    ranges = _final_ranges(chain)
    _ingest(chain, database, ranges)
    anvil.rpc("evm_revert", snapshot)
    Simulator(anvil.w3, chain.dep, seed=33, traders=4).run_batches(180, per_block=5)
    anvil.mine(2)
    yield chain, database


def test_one_row_per_reorg_from_ingestion_through_the_runbook_to_the_repair(deep_fork: tuple[DevChain, str]) -> None:
    chain, db = deep_fork
    replaced = _differing(chain, db)
    assert len(replaced) >= 2
    fork, old_hash = replaced[0]
    frontier = max(r[2] for r in _table(db, "SELECT range_start, range_end, processed_to FROM ingestion_checkpoints"))
    assert frontier - fork + 1 >= REPLACED, "the fork must replace at least 18 final blocks"
    assert _table(db, "SELECT count(*) FROM reorgs") == [(0,)]
    assert _metrics(chain, db) == (0, 0)

    # 1. Ingestion of the next range runs into the forked history: refused, and on record at once.
    nxt = next(r for r in _final_ranges(chain) if r[1] > frontier)  # the partial last range, or the next one
    client = ChainClient.from_config(chain.config.chain)
    with pytest.raises(ReorgDetected):
        ingest_range(chain.config, client, engine_for(db), *nxt)
    # a retried run (here the operator's command) finds the same reorg: one line that points to the runbook, its
    # own exit code, no traceback, and still one row
    again = _orderbook(chain, db, "ingest", "--from", str(nxt[0]), "--to", str(nxt[1]))
    assert again.returncode == REORG_DETECTED, again.stderr
    assert "Traceback" not in again.stderr
    assert again.stderr.splitlines()[-1].startswith("orderbook ingest: ")
    assert again.stderr.splitlines()[-1].endswith("see docs/runbooks/reorg-handling.md")
    [row] = _table(db, REORG_SQL)
    new_hash = chain.anvil.w3.eth.get_block(fork)["hash"].to_0x_hex()
    assert (row[0], row[2], row[3], row[4]) == (fork, old_hash, new_hash, False)
    assert row[1] >= REPLACED
    assert _metrics(chain, db) == (1, 1)
    listed = _orderbook(chain, db, "reorgs", "list")
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 1 and "NOT REPAIRED" in listed.stdout

    # 2. The runbook's dry run: exit 3, the same row, still not repaired, nothing touched.
    before = _state(db)
    dry = _orderbook(chain, db, "reconcile", "--lookback", "100")
    assert dry.returncode == 3, dry.stderr
    assert f"from {fork} " in dry.stderr and "NOT repaired" in dry.stderr
    [row] = _table(db, REORG_SQL)
    assert (row[0], row[2], row[4], row[5]) == (fork, old_hash, False, 0)
    assert _state(db) == before
    assert _metrics(chain, db) == (1, 1)

    # 3. The repair: exit 3 (a deep reorg is an incident), the same row turns repaired, the alert's metric is 0.
    fixed = _orderbook(chain, db, "reconcile", "--lookback", "100", "--repair")
    assert fixed.returncode == 3, fixed.stderr
    assert f"from {fork} " in fixed.stderr and "; repaired" in fixed.stderr
    [row] = _table(db, REORG_SQL)
    assert (row[0], row[2], row[3], row[4]) == (fork, old_hash, new_hash, True)
    assert row[5] > 0 and row[6] > 0  # events deleted and re-inserted
    assert _metrics(chain, db) == (1, 0)

    # 4. Verify as the runbook says: reconcile exits 0, one line listed, repaired; ingestion goes on.
    assert _orderbook(chain, db, "reconcile", "--lookback", "100").returncode == 0
    listed = _orderbook(chain, db, "reorgs", "list")
    [line] = listed.stdout.splitlines()
    assert f"block {fork}\t" in line and "\trepaired " in line and "NOT REPAIRED" not in line, line
    report = ingest_range(chain.config, client, engine_for(db), *nxt)
    assert report.processed_to == nxt[1]
    assert _table(db, "SELECT count(*) FROM reorgs") == [(1,)]


def test_a_fork_below_the_deployment_block_is_repaired(anvil_factory: type[Anvil], tmp_path: Path,
                                                       database: str) -> None:
    """The fork replaces the deployment block's parent (stored as the first range's anchor) and everything
    after it; the repair re-ingests the first range on the new chain instead of refusing on that parent."""
    anvil = anvil_factory()
    anvil.mine(2)
    snapshot = anvil.rpc("evm_snapshot")
    w3 = anvil.w3
    w3.eth.send_transaction({"from": w3.eth.accounts[9], "to": w3.eth.accounts[8], "value": 1})  # the parent
    chain = make_devchain(anvil, tmp_path, ["SILVER_V1"], ["ALUMINUM_V1"], confirmations=0, range_size=5)
    start = chain.config.chain.start_block
    Simulator(w3, chain.dep, seed=41, traders=3).run_batches(60, per_block=6)
    _ingest(chain, database, _final_ranges(chain))
    assert _table(database, f"SELECT hash FROM blocks WHERE number = {start - 1}"), "the parent is stored"

    anvil.rpc("evm_revert", snapshot)
    w3.eth.send_transaction({"from": w3.eth.accounts[9], "to": w3.eth.accounts[7], "value": 2})  # another parent
    again = deploy(anvil.url, ["SILVER_V1"], ["ALUMINUM_V1"])
    assert (again.start_block, again.router, again.gen1_books, again.gen2_books) == (
        start, chain.dep.router, chain.dep.gen1_books, chain.dep.gen2_books)
    Simulator(w3, chain.dep, seed=42, traders=3).run_batches(90, per_block=6)
    anvil.mine(1)
    replaced = _differing(chain, database)
    assert replaced[0][0] == start - 1  # the fork reaches below the deployment range
    before = _state(database)

    report = reconcile(chain.config, ChainClient.from_config(chain.config.chain), engine_for(database),
                       lookback_ranges=100)
    assert report.repaired and report.reorg is not None
    assert report.reorg.fork_block == start - 1 and report.reorg.old_hash == replaced[0][1]
    first_range = f"{start:012d}-{start + 4:012d}"
    assert first_range in report.ranges_repaired

    expected = _fresh_state(chain, _stored_ranges(database))
    assert before[:4] != expected[:4], "the fork must have changed the indexed state"
    assert _state(database) == expected
    parent = w3.eth.get_block(start - 1)["hash"].to_0x_hex()
    assert _table(database, f"SELECT hash FROM blocks WHERE number = {start - 1}") == [(parent,)]
    assert _table(database, "SELECT fork_block, repaired FROM reorgs") == [(start - 1, True)]
    assert reconcile(chain.config, ChainClient.from_config(chain.config.chain), engine_for(database),
                     lookback_ranges=100).mismatched == []


def test_the_migration_folds_the_twins_earlier_versions_wrote(tmp_path: Path) -> None:
    """Databases where a dry run and a repair each wrote a row for one reorg: one row remains, repaired."""
    import shutil
    import uuid

    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from orderbook_pipelines.storage.db import SQL_DIR, ensure_database, migrate, sqlalchemy_url
    from tests.conftest import PG_SERVER

    old = tmp_path / "sql"
    old.mkdir()
    for f in SQL_DIR.glob("*.sql"):
        if f.name < "0009":
            shutil.copy(f, old / f.name)
    db = make_url(sqlalchemy_url(PG_SERVER)).set(database=f"obp_test_{uuid.uuid4().hex[:10]}").render_as_string(
        hide_password=False)
    ensure_database(db)
    try:
        migrate(db, old)
        twins = [(1, 100, 3, "0xaa", "0xbb", False, 0, 0), (1, 100, 3, "0xaa", "0xbb", True, 40, 35),
                 (1, 200, 2, "0xcc", None, False, 0, 0), (5, 100, 1, "0xaa", "0xdd", False, 0, 0)]
        with engine_for(db).begin() as conn:
            for t in twins:
                conn.execute(text("INSERT INTO reorgs (chain_id, fork_block, depth, old_hash, new_hash, confirmations, "
                                  "ranges, repaired, events_deleted, events_inserted) VALUES "
                                  "(:c, :f, :d, :o, :n, 2, '{}', :r, :ed, :ei)"),
                             dict(zip(("c", "f", "d", "o", "n", "r", "ed", "ei"), t, strict=True)))
        assert migrate(db)[0] == "0009.reorg-identity"  # then the later ones
        assert _table(db, "SELECT chain_id, fork_block, old_hash, repaired, events_deleted, repaired_at IS NOT NULL "
                          "FROM reorgs ORDER BY 1, 2") == [
            (1, 100, "0xaa", True, 40, True), (1, 200, "0xcc", False, 0, False), (5, 100, "0xaa", False, 0, False)]
    finally:
        drop_database(db)


def test_an_up_to_date_database_is_not_migrated_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command migrates at start. On an up-to-date database that is one query: yoyo (its import, its lock)
    is not asked at all. A migration file not recorded yet still goes through yoyo, once."""
    import shutil

    import yoyo

    from orderbook_pipelines.storage.db import SQL_DIR, migrate
    from tests.conftest import new_database

    db = new_database()
    try:
        def refuse(*args: object, **kwargs: object) -> None:
            raise AssertionError("yoyo was asked to migrate an up-to-date database")

        with monkeypatch.context() as m:
            m.setattr(yoyo, "get_backend", refuse)
            assert migrate(db) == []
        more = tmp_path / "sql"
        shutil.copytree(SQL_DIR, more)
        last = max(p.stem for p in SQL_DIR.glob("*.sql"))
        (more / "9999.extra.sql").write_text(f"-- depends: {last}\nCREATE TABLE obp_extra (x integer);\n")
        assert migrate(db, more) == ["9999.extra"]
        assert _table(db, "SELECT count(*) FROM obp_extra") == [(0,)]
        with monkeypatch.context() as m:
            m.setattr(yoyo, "get_backend", refuse)
            assert migrate(db, more) == []
    finally:
        drop_database(db)
