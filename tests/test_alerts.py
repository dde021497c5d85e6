"""The alert rules are valid for a real Prometheus (promtool from Debian's prometheus package); every alert has a
promtool unit test that makes it fire (and most one that keeps it silent) and a runbook; the metric names the
expressions read are parsed from them (tests/test_operations.py checks they are all in a real scrape of the live
service and the state exporter); the state exporter reports what an independent reading of the chain and
Postgres says."""

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
from orderbook_pipelines.ingestion import metrics as ingest_metrics
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


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                 "offset", "inf", "nan"}
PROMETHEUS_OWN = {"up"}  # series Prometheus itself writes for every scrape target, exported by nobody


def expr_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions (followed by `(`),
    keywords, label names (inside `{…}` or a `by (…)` clause), strings, durations or numbers."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', " ", expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # grouping labels
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", s):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


def alert_rules() -> list[dict]:
    return [rule for g in yaml.safe_load(RULES.read_text())["groups"] for rule in g["rules"] if "alert" in rule]


def alert_metric_names() -> set[str]:
    """Every metric name any alert expression reads (what a real scrape must offer; tests/test_operations.py)."""
    return set().union(*(expr_metric_names(r["expr"]) for r in alert_rules())) - PROMETHEUS_OWN


def test_the_expression_parser_finds_exactly_the_metrics() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, route) (rate(obp_api_request_seconds_bucket{route!="/x"}[5m])))'
            ' > 0.5 or obp_exporter_up == 0 or up{job="obp-exporter"} == 0 unless on (instance) '
            'delta(obp_indexed_block[15m] offset 5m) <= -Inf')
    assert expr_metric_names(expr) == {"obp_api_request_seconds_bucket", "obp_exporter_up", "up",
                                       "obp_indexed_block"}
    assert alert_metric_names() >= {"obp_chain_head_block", "obp_rpc_errors_total", "obp_live_applied_block",
                                    "obp_live_publish_latency_seconds_bucket", "obp_asset_checks_failing"}


def test_every_alert_has_a_rule_test_that_makes_it_fire_and_a_runbook() -> None:
    """promtool only tests what alerts_test.yml names: an alert without a firing case there is untested."""
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing = {case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if case.get("exp_alerts")}
    silent = {case["alertname"] for t in tests for case in t.get("alert_rule_test", [])
              if not case.get("exp_alerts")}
    names = [r["alert"] for r in alert_rules()]
    assert len(names) == len(set(names)) >= 12
    assert sorted(set(names) - firing) == [], "alerts no promtool test makes fire"
    assert len(silent & set(names)) >= len(names) // 2, "too few cases showing an alert stays silent"
    for r in alert_rules():
        runbook = r.get("annotations", {}).get("runbook")
        assert runbook and (PROJECT_ROOT / runbook).is_file(), (r["alert"], runbook)
        assert r["annotations"].get("summary"), r["alert"]
        assert r["alert"] in DOC.read_text(), f"{r['alert']} is missing from docs/observability.md"


def test_every_metric_the_code_registers_is_documented() -> None:
    """In-process metrics (RPC, ingestion, live) as registered, including those no scrape shows before their
    first sample; the scraped ones are checked in tests/test_operations.py."""
    doc = DOC.read_text()
    families = {fam.name for fam in REGISTRY.collect() if fam.name.startswith("obp_")}
    assert len(families) > 20
    assert sorted(f for f in families if f not in doc) == [], "metrics missing from docs/observability.md"


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
    # the gauge is the highest block written by this process: another test module run earlier in the same worker
    # process may have written higher blocks of its own chain
    ingest_metrics._high_water[0] = 0
    ingest_metrics.INDEXED.set(0)
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
