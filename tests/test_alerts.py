"""The alert rules are valid for a real Prometheus (promtool from Debian's prometheus package) and behave as
their unit tests say; every metric an alert uses is one the code exports and docs/observability.md documents;
the state exporter reports what an independent reading of the chain and Postgres says."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator

import pytest
import yaml
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from orderbook_pipelines.chain import metrics as rpc_metrics  # noqa: F401  (registers the RPC metrics)
from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.config import PROJECT_ROOT
from orderbook_pipelines.devchain.simulator import Simulator
from orderbook_pipelines.ingestion import metrics as ingest_metrics  # noqa: F401  (registers the ingestion metrics)
from orderbook_pipelines.ingestion.ingest import ingest_range
from orderbook_pipelines.ingestion.ranges import ranges_up_to
from orderbook_pipelines.live import metrics as live_metrics  # noqa: F401
from orderbook_pipelines.quality.exporter import registry_for
from orderbook_pipelines.storage.checkpoints import contiguous
from orderbook_pipelines.storage.db import drop_database, engine_for
from tests.conftest import Anvil, make_devchain, new_database

RULES = PROJECT_ROOT / "ops" / "prometheus" / "alerts.yml"
RULE_TESTS = PROJECT_ROOT / "ops" / "prometheus" / "alerts_test.yml"
DOC = PROJECT_ROOT / "docs" / "observability.md"


@pytest.fixture(scope="module")
def promtool() -> str:
    r = subprocess.run(["bash", str(PROJECT_ROOT / "scripts" / "ensure_promtool.sh")], capture_output=True,
                       text=True, timeout=300)
    if r.returncode != 0:
        pytest.skip(f"promtool unavailable (Debian package `prometheus` could not be fetched): {r.stderr.strip()}")
    return r.stdout.strip().splitlines()[-1]


def test_promtool_accepts_the_rule_file(promtool: str) -> None:
    r = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    n = sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])
    assert f"SUCCESS: {n} rules found" in r.stdout


def test_alert_unit_tests_pass(promtool: str) -> None:
    r = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], capture_output=True, text=True, timeout=60,
                       cwd=RULE_TESTS.parent)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_promtool_rejects_a_broken_rule(promtool: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The validator is real: a typo in PromQL fails."""
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n- name: x\n  rules:\n  - alert: X\n    expr: rate(obp_rpc_errors_total[5m] > 1\n")
    r = subprocess.run([promtool, "check", "rules", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0


def _rule_metric_names() -> set[str]:
    names = set()
    for g in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in g["rules"]:
            names |= set(re.findall(r"\b(obp_[a-z0-9_]+)", rule["expr"]))
    return names


EXPORTER_NAMES = {"obp_chain_head_block", "obp_chain_safe_block", "obp_chain_finalized_block", "obp_indexed_block",
                  "obp_indexed_max_block", "obp_latest_event_block", "obp_indexed_events", "obp_index_lag_blocks",
                  "obp_index_final_lag_blocks", "obp_deep_reorgs", "obp_deep_reorgs_unrepaired",
                  "obp_asset_checks_failing", "obp_exporter_up", "obp_exporter_scrape_seconds"}


_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
             "summary": ("_sum", "_count")}


def _process_metric_names() -> set[str]:
    """Every series name the process can export, including labelled metrics that have no child yet."""
    out = set()
    for fam in REGISTRY.collect():
        if fam.name.startswith("obp_"):
            out |= {fam.name} | {fam.name + sfx for sfx in _SUFFIXES.get(fam.type, ("",))}
    return out


def test_every_alert_metric_exists_and_every_metric_is_documented() -> None:
    known = _process_metric_names() | EXPORTER_NAMES
    missing = {n for n in _rule_metric_names() if n not in known}
    assert not missing, f"alerts use metrics nobody exports: {missing}"
    doc = DOC.read_text()
    families = {re.sub(r"_(bucket|count|sum|created|total)$", "", n) for n in known}
    undocumented = sorted(n for n in families if n not in doc)
    assert not undocumented, f"metrics missing from docs/observability.md: {undocumented}"


def test_contiguous_frontier_stops_at_gaps() -> None:
    assert contiguous([], 10) is None
    assert contiguous([(10, 19, 19), (20, 29, 25)], 10) == 25
    assert contiguous([(10, 19, 19), (30, 39, 39)], 10) == 19  # 20-29 missing
    assert contiguous([(10, 19, 15), (20, 29, 29)], 10) == 15  # a partial range stops it too
    assert contiguous([(20, 29, 29)], 10) is None


@pytest.fixture(scope="module")
def indexed(anvil_factory: type[Anvil], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    chain = make_devchain(anvil_factory(), tmp_path_factory.mktemp("exp"), ["SILVER_V1"], ["ALUMINUM_V1"],
                          confirmations=2, range_size=5)
    Simulator(chain.anvil.w3, chain.dep, seed=9, traders=3).run_batches(120, per_block=10)
    chain.anvil.mine(3)
    db = new_database()
    try:
        yield chain, db
    finally:
        drop_database(db)


def _scrape(reg) -> dict[tuple[str, tuple], float]:  # type: ignore[no-untyped-def]
    out = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels or None) or 0.0


def test_ingestion_metrics_and_exporter_state_match_the_chain_and_postgres(indexed: tuple) -> None:
    chain, db = indexed
    cfg, w3 = chain.config, chain.anvil.w3
    client = ChainClient(chain.anvil.url)
    safe = w3.eth.block_number - cfg.chain.confirmations
    ranges = list(ranges_up_to(cfg.chain.start_block, cfg.chain.range_size, safe))
    before = {n: _counter(n) for n in ("obp_ingest_events_total", "obp_ingest_logs_total")}
    before_calls = _counter("obp_rpc_requests_total", method="eth_getLogs")
    # Ingest every range except the second: the exporter must report the gap, not the highest range.
    skipped = ranges[1]
    assert len(ranges) >= 3
    reports = [ingest_range(cfg, client, engine_for(db), a, b) for a, b in ranges if (a, b) != skipped]

    inserted = sum(r.events_inserted for r in reports)
    assert inserted > 0
    assert _counter("obp_ingest_events_total") - before["obp_ingest_events_total"] == inserted
    assert _counter("obp_ingest_logs_total") - before["obp_ingest_logs_total"] == sum(r.logs for r in reports)
    assert _counter("obp_rpc_requests_total", method="eth_getLogs") - before_calls >= len(reports)
    assert REGISTRY.get_sample_value("obp_ingest_processed_block") == max(r.processed_to for r in reports)

    # the exporter, against an independent reading
    with engine_for(db).connect() as c:
        latest_event = c.execute(text("SELECT max(block_number) FROM order_events")).scalar_one()
        events = c.execute(text("SELECT count(*) FROM order_events")).scalar_one()
        c.execute(text("SELECT 1"))
    head = w3.eth.block_number
    got = _scrape(registry_for(cfg, engine_for(db), client))
    assert got[("obp_exporter_up", ())] == 1
    assert got[("obp_chain_head_block", ())] == head
    assert got[("obp_chain_safe_block", ())] == head - cfg.chain.confirmations
    assert got[("obp_indexed_block", ())] == skipped[0] - 1  # stops before the gap
    assert got[("obp_indexed_max_block", ())] == reports[-1].processed_to
    assert got[("obp_index_lag_blocks", ())] == head - (skipped[0] - 1)
    assert got[("obp_latest_event_block", ())] == latest_event
    assert got[("obp_indexed_events", ())] == events
    assert got[("obp_deep_reorgs", ())] == 0

    # fill the gap and record a failing check: the state follows
    filled = ingest_range(cfg, client, engine_for(db), *skipped)
    with engine_for(db).begin() as c:
        m = c.execute(text("SELECT min(market_id) FROM markets")).scalar_one()
        c.execute(text("INSERT INTO market_checks (market_id, chain_id, range_start, range_end, block_number, "
                       "check_name, passed) VALUES (:m, :c, 1, 2, 2, 'book_matches_chain', false)"),
                  {"m": m, "c": cfg.chain.chain_id})
    got = _scrape(registry_for(cfg, engine_for(db), client))
    assert got[("obp_indexed_block", ())] == max(filled.processed_to, *(r.processed_to for r in reports))
    assert got[("obp_asset_checks_failing", (("check", "book_matches_chain"),))] == 1


def test_exporter_reports_down_when_the_chain_is_unreachable(indexed: tuple) -> None:
    chain, db = indexed
    dead = ChainClient("http://127.0.0.1:9", timeout_s=1, retries=0)
    got = _scrape(registry_for(chain.config, engine_for(db), dead))
    assert got[("obp_exporter_up", ())] == 0
    assert ("obp_chain_head_block", ()) not in got
