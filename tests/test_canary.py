"""Canary rollout end to end through the real `orderbook` commands: a demoted market is published again only
after its checks passed for the configured number of consecutive ranges; a failing check resets the count;
paused is never published; every change is recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from sqlalchemy import text
from typer.testing import CliRunner

from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.cli import app
from orderbook_pipelines.devchain.simulator import Simulator
from orderbook_pipelines.ingestion.ingest import ingest_range
from orderbook_pipelines.ingestion.ranges import ranges_up_to
from orderbook_pipelines.quality.canary import publishable_market_ids
from orderbook_pipelines.storage.db import engine_for
from orderbook_pipelines.storage.projections import project_range
from tests.conftest import Anvil, DevChain, make_devchain

REQUIRED = 2


@pytest.fixture
def chain_db(anvil_factory: type[Anvil], tmp_path: Path, database: str) -> tuple[DevChain, str, list]:
    chain = make_devchain(anvil_factory(), tmp_path, ["SILVER_V1", "GOLD_V1"], ["ALUMINUM_V1"], confirmations=0,
                          range_size=4)
    doc = yaml.safe_load(chain.config_path.read_text())
    doc["canary_ranges_required"] = REQUIRED
    chain.config_path.write_text(yaml.safe_dump(doc))
    Simulator(chain.anvil.w3, chain.dep, seed=21).run_batches(80, per_block=8)
    from orderbook_pipelines.config import load_config

    chain.config = load_config(chain.config_path)
    c = chain.config.chain
    ranges = ranges_up_to(c.start_block, c.range_size, chain.anvil.w3.eth.block_number)
    client = ChainClient(chain.anvil.url)
    for a, b in ranges:
        ingest_range(chain.config, client, engine_for(database), a, b)
    return chain, database, ranges


def _cli(chain: DevChain, db: str, *args: str) -> tuple[int, str]:
    r = CliRunner().invoke(app, list(args), env={"DATABASE_URL": db, "OBP_CONFIG": str(chain.config_path),
                                                 "OBP_OPERATOR": "alice"})
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.output


def _market_id(db: str, metric: str) -> int:
    with engine_for(db).connect() as conn:
        return conn.execute(text("SELECT market_id FROM markets WHERE metric_id = :m"), {"m": metric}).scalar_one()


def _publishable(db: str) -> set[int]:
    with engine_for(db).connect() as conn:
        ids = publishable_market_ids(conn)
        assert ids == {r[0] for r in conn.execute(text("SELECT market_id FROM publishable_markets"))}
        return ids


def test_canary_is_published_after_consecutive_passing_ranges_only(chain_db: tuple[DevChain, str, list]) -> None:
    chain, db, ranges = chain_db
    assert len(ranges) >= REQUIRED + 2
    silver, gold = _market_id(db, "SILVER_V1"), _market_id(db, "GOLD_V1")
    assert {silver, gold} <= _publishable(db)

    code, out = _cli(chain, db, "markets", "demote", "SILVER_V1", "--reason", "new contract version")
    assert code == 0, out
    assert "active -> canary" in out
    assert silver not in _publishable(db) and gold in _publishable(db)

    # Checks of range 1 pass: one of the REQUIRED consecutive ranges.
    a, b = ranges[0]
    code, out = _cli(chain, db, "check", "--from", str(a), "--to", str(b))
    assert code == 0, out
    assert silver not in _publishable(db)
    # A real failure in the next range: an order's fill amount no longer matches the chain.
    a, b = ranges[1]
    with engine_for(db).begin() as conn:
        victim = conn.execute(text("SELECT contract, order_id FROM orders WHERE market_id = :m AND status = 'open' "
                                   "ORDER BY created_block LIMIT 1"), {"m": silver}).one()
        conn.execute(text("UPDATE orders SET filled = filled + 1, remaining = remaining - 1, updated_block = :b "
                          "WHERE contract = :c AND order_id = :o"), {"c": victim.contract, "o": victim.order_id,
                                                                    "b": b})
    code, out = _cli(chain, db, "check", "--from", str(a), "--to", str(b))
    assert code == 1 and "SILVER_V1" in out, out
    assert silver not in _publishable(db)
    # Repaired (the projection recomputes it from events), then REQUIRED more passing ranges publish it.
    with engine_for(db).begin() as conn:
        project_range(conn, chain.config.chain.chain_id, 0, ranges[-1][1])
    for i, (a, b) in enumerate(ranges[2 : 2 + REQUIRED]):
        assert silver not in _publishable(db), i
        code, out = _cli(chain, db, "check", "--from", str(a), "--to", str(b))
        assert code == 0, out
    assert silver in _publishable(db)
    code, out = _cli(chain, db, "markets", "canaries")
    assert f"SILVER_V1\t{REQUIRED}/{REQUIRED}\tpublishable" in out


def test_pause_is_never_published_resume_restores_and_everything_is_recorded(
        chain_db: tuple[DevChain, str, list]) -> None:
    chain, db, ranges = chain_db
    gold = _market_id(db, "GOLD_V1")
    assert _cli(chain, db, "markets", "pause", "GOLD_V1", "--reason", "incident 42")[0] == 0
    for a, b in ranges:
        assert _cli(chain, db, "check", "--from", str(a), "--to", str(b))[0] == 0
    assert gold not in _publishable(db)
    code, out = _cli(chain, db, "markets", "resume", "GOLD_V1")
    assert code == 0 and "paused -> active" in out, out
    assert gold in _publishable(db)
    assert _cli(chain, db, "markets", "demote", "GOLD_V1", "--reason", "suspicious")[0] == 0
    # Checks made before the demotion do not count: it must earn publication again.
    assert gold not in _publishable(db)
    code, out = _cli(chain, db, "markets", "promote", "GOLD_V1", "--reason", "verified by hand")
    assert code == 0 and gold in _publishable(db)
    code, out = _cli(chain, db, "markets", "promote", "GOLD_V1")
    assert code == 2 and "already active" in out
    with engine_for(db).connect() as conn:
        hist = [tuple(r) for r in conn.execute(text(
            "SELECT from_status, to_status, reason, changed_by FROM market_status_history WHERE market_id = :m "
            "ORDER BY id"), {"m": gold})]
    assert hist == [("active", "paused", "incident 42", "alice"), ("paused", "active", "resumed", "alice"),
                    ("active", "canary", "suspicious", "alice"), ("canary", "active", "verified by hand", "alice")]
    code, out = _cli(chain, db, "markets", "history", "GOLD_V1")
    assert code == 0 and out.splitlines()[0].endswith("canary -> active\talice\tverified by hand")


def test_unknown_market_is_refused(chain_db: tuple[DevChain, str, list]) -> None:
    chain, db, _ = chain_db
    code, out = _cli(chain, db, "markets", "pause", "NOPE_V1", "--reason", "x")
    assert code == 2 and "no market NOPE_V1" in out
