"""Configuration loading and validation: every problem is a ConfigError whose message names it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from orderbook_pipelines.chain.decoding import Decoder
from orderbook_pipelines.config import (
    PROJECT_ROOT,
    ConfigError,
    EnvSettings,
    EventKind,
    EventMapping,
    _load_yaml,
    load_config,
    parse_config,
)
from tests.conftest import GEN1_BOOK, GEN2_BOOK, ORDERBOOK, ROUTER, sample_config

ARTIFACTS = PROJECT_ROOT / "contracts" / "artifacts"


def raw_config() -> dict:
    return sample_config(confirmations=3, range_size=50)


def config_error(raw: dict) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(raw)
    return str(exc.value)


def no_env() -> EnvSettings:
    """Settings that ignore the caller's environment for the override under test."""
    return EnvSettings(rpc_url=None)


# -- a valid configuration ----------------------------------------------------------------------------------
def test_valid_config_parses():
    cfg = parse_config(raw_config())
    assert cfg.chain.rpc_url == "http://x"
    assert cfg.chain.chain_id == 31337
    assert cfg.chain.start_block == 1
    assert cfg.chain.confirmations == 3
    assert cfg.chain.range_size == 50
    assert [s.name for s in cfg.sources] == ["gen1_router", "gen1_book", "gen2_book"]
    router = cfg.source("gen1_router")
    assert router.addresses == [ROUTER]
    assert router.events["OrderPlaced"].kind is EventKind.OPEN
    assert router.events["OrderPlaced"].market == "metric_hash:metricId"
    assert router.events["OrderExecuted"].market == "tx"
    assert cfg.source("gen2_book").events["OrderFilled"].market == "emitter"  # the default
    assert cfg.source("gen1_book").addresses == "markets"
    assert {m.metric_id: (m.source, m.address, m.decimals) for m in cfg.markets} == {
        "SILVER_V1": ("gen1_book", GEN1_BOOK, 18),
        "ALUMINUM_V1": ("gen2_book", GEN2_BOOK, 6),
    }
    # relative ABI paths are resolved against the project root
    assert Path(router.abi) == ARTIFACTS / "OrderRouter.json"
    assert {e["name"] for e in router.abi_entries if e["type"] == "event"} >= {"OrderPlaced", "OrderExecuted"}
    with pytest.raises(KeyError):
        cfg.source("nope")


def test_market_metric_hash_is_keccak_of_metric_id():
    cfg = parse_config(raw_config())
    silver = next(m for m in cfg.markets if m.metric_id == "SILVER_V1")
    # documented in contract-events.md: keccak("SILVER_V1") starts 0x864a895a
    assert silver.metric_hash.startswith("0x864a895a")
    assert len(silver.metric_hash) == 66


def test_valid_config_loads_from_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw_config(), sort_keys=False))
    cfg = load_config(path, env=no_env())
    assert cfg == parse_config(raw_config())
    assert cfg.chain.rpc_url == "http://x"


def test_rpc_url_env_override(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw_config(), sort_keys=False))
    cfg = load_config(path, env=EnvSettings(rpc_url="http://override:8545"))
    assert cfg.chain.rpc_url == "http://override:8545"
    assert cfg.chain.chain_id == 31337  # the rest of the chain section is kept
    assert cfg.chain.confirmations == 3


def test_rpc_url_env_override_without_chain_section(tmp_path):
    raw = raw_config()
    del raw["chain"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path, env=EnvSettings(rpc_url="http://override:8545"))
    assert cfg.chain.rpc_url == "http://override:8545"
    assert cfg.chain.confirmations == 12  # defaults


def test_rpc_url_env_override_read_from_environment(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw_config()))
    monkeypatch.setenv("OBP_RPC_URL", "http://from-env:1")
    monkeypatch.setenv("OBP_CONFIG", str(path))
    cfg = load_config()
    assert cfg.chain.rpc_url == "http://from-env:1"


@pytest.mark.parametrize("chain_yaml", ["chain:\n", "chain: [1, 2]\n"])
def test_rpc_url_env_override_with_bad_chain_section_is_config_error(tmp_path, chain_yaml):
    raw = raw_config()
    del raw["chain"]
    path = tmp_path / "config.yaml"
    path.write_text(chain_yaml + yaml.safe_dump(raw))
    with pytest.raises(ConfigError):
        load_config(path, env=EnvSettings(rpc_url="http://override:8545"))


def test_bad_chain_section_without_override_is_config_error(tmp_path):
    raw = raw_config()
    del raw["chain"]
    path = tmp_path / "config.yaml"
    path.write_text("chain: [1, 2]\n" + yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as exc:
        load_config(path, env=no_env())
    assert "chain" in str(exc.value)


# -- ABI file forms --------------------------------------------------------------------------------------
def router_abi() -> list[dict]:
    return json.loads((ARTIFACTS / "OrderRouter.json").read_text())["abi"]


@pytest.mark.parametrize("form", ["artifact", "bare_list"])
def test_abi_file_may_be_artifact_or_bare_list(tmp_path, form):
    abi = router_abi()
    doc = {"contractName": "X", "abi": abi, "bytecode": "0x"} if form == "artifact" else abi
    (tmp_path / "abi").mkdir()
    (tmp_path / "abi" / "router.json").write_text(json.dumps(doc))
    raw = raw_config()
    raw["sources"][0]["abi"] = "abi/router.json"  # relative to the YAML file's directory
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path, env=no_env())
    src = cfg.source("gen1_router")
    assert Path(src.abi) == tmp_path / "abi" / "router.json"
    assert src.abi_entries == abi
    Decoder(cfg, {ROUTER: "gen1_router"})  # and it is usable


def test_abi_file_of_wrong_shape(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"contractName": "X"}))
    raw = raw_config()
    raw["sources"][0]["abi"] = str(bad)
    msg = config_error(raw)
    assert "neither an ABI list nor an artifact" in msg
    assert str(bad) in msg


def test_abi_file_not_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    raw = raw_config()
    raw["sources"][0]["abi"] = str(bad)
    msg = config_error(raw)
    assert "is not JSON" in msg


# -- each problem is named ---------------------------------------------------------------------------------
def test_unknown_top_level_key():
    raw = raw_config()
    raw["sourcez"] = []
    msg = config_error(raw)
    assert "sourcez" in msg
    assert "Extra inputs are not permitted" in msg


def test_unknown_chain_key():
    raw = raw_config()
    raw["chain"]["confirmation"] = 3
    msg = config_error(raw)
    assert "chain.confirmation" in msg


@pytest.mark.parametrize("bad", ["0x1234", "0x" + "zz" * 20, "11" * 20 + "ab", "0x" + "11" * 21])
def test_bad_source_address(bad):
    raw = raw_config()
    raw["sources"][0]["addresses"] = [bad]
    msg = config_error(raw)
    assert "sources.0.addresses" in msg
    assert "pattern" in msg


def test_bad_market_address():
    raw = raw_config()
    raw["markets"][0]["address"] = "0xnot-an-address"
    msg = config_error(raw)
    assert "markets.0.address" in msg


def test_market_names_unknown_source():
    raw = raw_config()
    raw["markets"][0]["source"] = "gen9_book"
    msg = config_error(raw)
    assert "SILVER_V1" in msg
    assert "unknown source 'gen9_book'" in msg


def test_market_of_markets_source_needs_address():
    raw = raw_config()
    del raw["markets"][1]["address"]
    msg = config_error(raw)
    assert "ALUMINUM_V1" in msg
    assert "needs an address" in msg


def test_event_not_in_abi():
    raw = raw_config()
    raw["sources"][0]["events"]["OrderExpired2"] = {"kind": "cancel", "fields": {"order_id": "orderId"}}
    msg = config_error(raw)
    assert "gen1_router" in msg
    assert "'OrderExpired2' is not in ABI" in msg


def test_event_of_another_generation_not_in_abi():
    # OrderFilled exists only in the gen2 ABI
    raw = raw_config()
    raw["sources"][0]["events"]["OrderFilled"] = raw["sources"][2]["events"]["OrderFilled"]
    msg = config_error(raw)
    assert "'OrderFilled' is not in ABI" in msg


def test_mapping_to_unknown_abi_argument_is_named_with_the_arguments_that_exist():
    raw = raw_config()
    raw["sources"][0]["events"]["OrderPlaced"]["fields"]["order_id"] = "orderID"  # the ABI says orderId
    msg = config_error(raw)
    problem = next(line for line in msg.splitlines() if "orderID" in line)
    assert "source gen1_router" in problem
    assert "event OrderPlaced" in problem
    assert "field order_id maps to unknown argument 'orderID'" in problem
    assert "orderId, trader, metricId, orderType, side, quantity, price" in problem  # what it could have been


def test_metric_hash_rule_must_name_an_indexed_argument():
    raw = raw_config()
    raw["sources"][0]["events"]["OrderPlaced"]["market"] = "metric_hash:price"  # price is data, not a topic
    msg = config_error(raw)
    assert "source gen1_router: event OrderPlaced: market rule 'metric_hash:price' names 'price'" in msg
    assert "not an indexed argument; indexed: orderId, trader, metricId" in msg


def test_metric_hash_rule_naming_no_argument_at_all():
    raw = raw_config()
    raw["sources"][0]["events"]["OrderPlaced"]["market"] = "metric_hash:metricID"
    assert "names 'metricID', not an indexed argument" in config_error(raw)


def test_every_mapping_problem_is_listed_on_its_own_line():
    raw = raw_config()
    raw["sources"][2]["events"]["OrderPlaced"]["fields"]["quantity"] = "quantity"  # the gen-2 ABI calls it size
    raw["sources"][1]["events"]["OrderAdded"]["fields"]["price"] = "prize"
    raw["sources"][0]["events"]["NoSuchEvent"] = {"kind": "cancel", "fields": {"order_id": "orderId"}}
    lines = config_error(raw).splitlines()
    assert lines[0] == "invalid configuration in <dict>:"
    problems = lines[1:]
    assert len(problems) == 3, problems
    assert all(line.startswith("  - source ") for line in problems)
    assert any("gen2_book: event OrderPlaced: field quantity maps to unknown argument 'quantity'" in line
               for line in problems)
    assert any("gen1_book: event OrderAdded: field price maps to unknown argument 'prize'" in line for line in problems)
    assert any("'NoSuchEvent' is not in ABI" in line for line in problems)


def test_cli_reports_a_mapping_typo_in_one_short_error(tmp_path):
    """What `make run` shows for a typo: the problem and its file, exit 2, no traceback, before any database."""
    raw = raw_config()
    raw["sources"][0]["events"]["OrderCancelled"]["fields"]["order_id"] = "orderID"
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OBP_CONFIG": str(path), "DATABASE_URL": "postgresql://postgres@127.0.0.1:9/none"}
    env.pop("OBP_RPC_URL", None)
    proc = subprocess.run([ORDERBOOK, "ingest", "--from", "0", "--to", "10"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        f"invalid configuration in {path}:",
        "  - source gen1_router: event OrderCancelled: field order_id maps to unknown argument 'orderID'; "
        "OrderCancelled has orderId, trader, remainingQuantity",
    ]
    assert proc.stdout == ""


def test_a_valid_mapping_builds_a_decoder_for_every_event():
    cfg = parse_config(raw_config())
    dec = Decoder(cfg, {})
    assert {(src, spec.name) for (src, _), spec in dec.specs.items()} == {
        (s.name, ev) for s in cfg.sources for ev in s.events}


def test_missing_abi_file():
    raw = raw_config()
    raw["sources"][1]["abi"] = "contracts/artifacts/NoSuchBook.json"
    msg = config_error(raw)
    assert "ABI file not found" in msg
    assert "NoSuchBook.json" in msg


@pytest.mark.parametrize(
    ("kind", "fields", "missing"),
    [
        (
            "open",
            {"order_id": "orderId", "trader": "trader", "side": "side", "quantity": "quantity"},
            "price",
        ),
        ("open", {"order_id": "orderId"}, "trader"),
        ("fill", {"order_id": "orderId", "price": "executedPrice"}, "quantity"),
        ("cancel", {"trader": "trader"}, "order_id"),
        ("trade", {"buyer": "b", "price": "p", "quantity": "q"}, "seller"),
    ],
)
def test_kind_without_required_fields(kind, fields, missing):
    raw = raw_config()
    raw["sources"][0]["events"]["OrderPlaced"] = {"kind": kind, "fields": fields}
    msg = config_error(raw)
    assert "sources.0.events.OrderPlaced" in msg
    assert f"kind '{kind}' needs field(s)" in msg
    assert f"'{missing}'" in msg


def test_unknown_canonical_field():
    raw = raw_config()
    raw["sources"][0]["events"]["OrderCancelled"]["fields"]["remaining"] = "remainingQuantity"
    msg = config_error(raw)
    assert "unknown canonical field(s) ['remaining']" in msg


@pytest.mark.parametrize("rule", ["market", "metric_hash:", "address"])
def test_bad_market_rule(rule):
    raw = raw_config()
    raw["sources"][0]["events"]["OrderPlaced"]["market"] = rule
    msg = config_error(raw)
    assert "market must be" in msg


def test_unknown_event_kind():
    with pytest.raises(ValueError, match="kind"):
        EventMapping(kind="expire", fields={"order_id": "x"})


@pytest.mark.parametrize("bad", ["silver_v1", "Silver_V1", "AB", "SILVER-V1", "SILVER V1", "X" * 101])
def test_invalid_metric_id(bad):
    raw = raw_config()
    raw["markets"][0]["metric_id"] = bad
    msg = config_error(raw)
    assert "markets.0.metric_id" in msg


def test_duplicate_metric_id():
    raw = raw_config()
    raw["markets"][1]["metric_id"] = "SILVER_V1"
    msg = config_error(raw)
    assert "metric_ids must be unique" in msg


def test_duplicate_source_name():
    raw = raw_config()
    raw["sources"][1]["name"] = "gen1_router"
    msg = config_error(raw)
    assert "source names must be unique" in msg


def test_negative_confirmations():
    raw = raw_config()
    raw["chain"]["confirmations"] = -1
    msg = config_error(raw)
    assert "chain.confirmations" in msg
    assert "greater than or equal to 0" in msg


def test_several_field_problems_are_all_listed():
    raw = raw_config()
    raw["chain"]["confirmations"] = -1
    raw["markets"][0]["metric_id"] = "lower"
    raw["bogus"] = 1
    msg = config_error(raw)
    assert "chain.confirmations" in msg
    assert "markets.0.metric_id" in msg
    assert "bogus" in msg


def test_several_cross_check_problems_are_all_listed():
    raw = raw_config()
    raw["markets"][0]["source"] = "gen9_book"
    raw["sources"][0]["events"]["NoSuchEvent"] = {"kind": "cancel", "fields": {"order_id": "orderId"}}
    msg = config_error(raw)
    assert "gen9_book" in msg
    assert "NoSuchEvent" in msg


def test_top_level_not_a_mapping():
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_config(["sources"])  # type: ignore[arg-type]


# -- files --------------------------------------------------------------------------------------------------
def test_yaml_syntax_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("chain:\n  rpc_url: [unclosed\nsources: {\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, env=no_env())
    msg = str(exc.value)
    assert "not valid YAML" in msg
    assert str(path) in msg


def test_yaml_is_read_as_safe_load_reads_it(tmp_path):
    """libyaml parses the file where it can (start-up time), with the values and error messages of yaml.safe_load."""
    text = yaml.safe_dump(raw_config()) + "extra: [1, 1.5, 0x10, yes, ~, '2024-01-01', 2024-01-01, !!str 7]\n"
    path = tmp_path / "same.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="extra"):  # the extra key is refused, after parsing
        load_config(path, env=no_env())
    assert _load_yaml(text) == yaml.safe_load(text)
    broken = "chain:\n  rpc_url: [unclosed\nsources: {\n"
    with pytest.raises(yaml.YAMLError) as expected:
        yaml.safe_load(broken)
    path.write_text(broken)
    with pytest.raises(ConfigError) as exc:
        load_config(path, env=no_env())
    assert str(exc.value) == f"configuration file {path} is not valid YAML: {expected.value}"


def test_yaml_error_names_the_file_in_validation_errors(tmp_path):
    raw = raw_config()
    raw["chain"]["confirmations"] = -5
    path = tmp_path / "named.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as exc:
        load_config(path, env=no_env())
    assert str(path) in str(exc.value)
    assert "chain.confirmations" in str(exc.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as exc:
        load_config(path, env=no_env())
    assert "configuration file not found" in str(exc.value)
    assert str(path) in str(exc.value)


def test_empty_file_is_config_error(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError) as exc:
        load_config(path, env=no_env())
    assert "sources" in str(exc.value)


def test_a_removed_chain_key_is_dropped_with_a_warning_that_says_why(caplog: pytest.LogCaptureFixture) -> None:
    """Configs written before ranges ran once-when-final keep loading after the upgrade, and say what to remove."""
    raw = sample_config()
    raw["chain"]["tip_interval_blocks"] = 10
    with caplog.at_level("WARNING", logger="orderbook_pipelines.config"):
        cfg = parse_config(raw)
    assert cfg.chain == parse_config(sample_config()).chain
    assert any("chain.tip_interval_blocks is no longer used" in r.getMessage() for r in caplog.records)
    raw["chain"]["tip_intervall_blocks"] = 10  # a typo is still refused
    with pytest.raises(ConfigError, match="tip_intervall_blocks"):
        parse_config(raw)
