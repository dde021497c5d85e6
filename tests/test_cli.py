"""The `orderbook` command line as a whole: it starts without the heavy libraries, its help lists every command
group, and it rejects a reversed block range before touching the config or the database.

(Each command's own behaviour is specified where its domain is tested: canary, recovery, replay, runbooks.)
"""

from __future__ import annotations

import re
import subprocess
import sys

import typer
from typer.testing import CliRunner

from orderbook_pipelines.cli import app
from orderbook_pipelines.config import PROJECT_ROOT

HEAVY = ("sqlalchemy", "web3", "dagster", "eth_abi", "polars", "duckdb", "psycopg")
COMMANDS = {"ingest", "wait-config", "db", "devchain", "markets", "live", "snapshot", "replay", "reconcile", "check",
            "reorgs", "metrics"}
# Never reachable: a command that tried the config or the database would fail with another message.
UNREACHABLE = {"OBP_CONFIG": "/nonexistent/orderbook.yaml", "DATABASE_URL": "postgresql://postgres@127.0.0.1:9/none"}


def _imported_modules(statement: str) -> set[str]:
    """Names of every module a fresh interpreter imports to run `statement` (from -X importtime, not timings)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", statement], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, check=True)
    return {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


def test_importing_the_cli_loads_no_heavy_library() -> None:
    modules = _imported_modules("import orderbook_pipelines.cli")
    assert {"typer", "orderbook_pipelines.cli", "orderbook_pipelines.cli.ingest"} <= modules  # the parse works
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert not heavy, f"`import orderbook_pipelines.cli` imports {heavy}: move them into the commands"


def test_help_lists_every_command_group() -> None:
    r = CliRunner().invoke(app, ["--help"])
    assert r.exit_code == 0, r.output
    listed = set(re.findall(r"^\W*([a-z][a-z-]*)\s{2,}\S", r.output, re.M))
    assert listed >= COMMANDS, f"missing from `orderbook --help`: {sorted(COMMANDS - listed)}"
    assert set(typer.main.get_command(app).commands) == COMMANDS  # a new group belongs in this spec too


def test_ingest_help_states_the_block_range_and_its_upper_bound() -> None:
    r = CliRunner().invoke(app, ["ingest", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "blocks [from, to]" in text
    assert "--to is an upper bound: nothing beyond it is written" in text
    top = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert "Ingest and project blocks [from, to]" in top.output  # the one-line summary keeps the range too


def test_ingest_with_to_before_from_exits_2_and_says_why() -> None:
    r = CliRunner().invoke(app, ["ingest", "--from", "10", "--to", "5"], env=UNREACHABLE)
    assert r.exit_code == 2, r.output
    assert "--to 5 is before --from 10" in r.output
