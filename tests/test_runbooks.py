"""Every `orderbook …` command shown in a runbook exists: its `--help` exits 0 and its arguments parse.

So a renamed command or option breaks the build instead of an operator at 3 a.m."""

from __future__ import annotations

import re
import shlex
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from orderbook_pipelines.cli import app
from orderbook_pipelines.config import PROJECT_ROOT

RUNBOOKS = sorted((PROJECT_ROOT / "docs" / "runbooks").glob("*.md"))
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def documented_commands() -> list[tuple[str, str]]:
    out = []
    for path in RUNBOOKS:
        for block in _FENCE.findall(path.read_text()):
            out += [(path.name, line.strip()) for line in block.splitlines() if line.strip().startswith("orderbook ")]
    return out


def _resolve(argv: list[str]) -> tuple[list[str], Any, list[str]]:
    """Split argv into the command path and its own arguments (typer's click command tree)."""
    cmd: Any = typer.main.get_command(app)
    path: list[str] = []
    rest = list(argv)
    while hasattr(cmd, "commands") and rest and rest[0] in cmd.commands:
        path.append(rest[0])
        cmd = cmd.commands[rest.pop(0)]
    return path, cmd, rest


def test_the_runbooks_show_commands() -> None:
    names = {p.name for p in RUNBOOKS}
    assert {"reorg-handling.md", "canary-markets.md", "backfill.md"} <= names
    per_file = {n: sum(1 for f, _ in documented_commands() if f == n) for n in names}
    assert all(n >= 2 for n in per_file.values()), per_file


@pytest.mark.parametrize(("runbook", "line"), documented_commands())
def test_documented_command_exists_and_parses(runbook: str, line: str) -> None:
    argv = shlex.split(line)[1:]
    path, cmd, rest = _resolve(argv)
    assert path, f"{runbook}: `{line}` names no orderbook subcommand"
    r = CliRunner().invoke(app, [*path, "--help"])
    assert r.exit_code == 0, f"{runbook}: `orderbook {' '.join(path)} --help` -> {r.exit_code}: {r.output}"
    try:  # options and arguments as documented must parse (types, names, required ones)
        cmd.make_context(" ".join(path), list(rest), resilient_parsing=False)
    except Exception as exc:
        if type(exc).__name__ != "Exit":
            pytest.fail(f"{runbook}: `{line}` does not parse: {exc}")


def test_a_rotten_command_would_be_caught() -> None:
    _, cmd, rest = _resolve(["reconcile", "--form", "1"])
    with pytest.raises(Exception, match="No such option"):
        cmd.make_context("reconcile", rest, resilient_parsing=False)
    path, _, _ = _resolve(["markets", "promte", "X"])
    assert CliRunner().invoke(app, [*path, "promte", "--help"]).exit_code != 0


def test_runbooks_follow_the_format() -> None:
    for path in RUNBOOKS:
        heads = re.findall(r"^## (\w+)", path.read_text(), re.M)
        assert heads[:5] == ["Symptom", "Impact", "Diagnose", "Fix", "Verify"] or path.name not in {
            "reorg-handling.md", "canary-markets.md", "backfill.md"}, (path.name, heads)
