"""Every runbook has the same five sections, and every `orderbook …` command shown in one exists: its `--help`
exits 0 and its arguments parse (tests/test_operations.py runs each of them against a real chain and database).

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


SECTIONS = ["Symptom", "Impact", "Diagnose", "Fix", "Verify"]


def format_problems(name: str, text: str) -> list[str]:
    """What keeps a runbook from the one format every runbook follows: a title, then exactly the five sections
    in order, none empty, with Diagnose and Fix showing something to run (a fenced block)."""
    problems = []
    if not text.startswith("# Runbook: "):
        problems.append(f"{name}: the first line is not `# Runbook: <title>`")
    parts = re.split(r"^## ", text, flags=re.M)[1:]
    heads = [p.split("\n", 1)[0].strip() for p in parts]
    if heads != SECTIONS:
        problems.append(f"{name}: sections {heads}, expected {SECTIONS}")
    for head, part in zip(heads, parts, strict=False):
        body = part.split("\n", 1)[1].strip() if "\n" in part else ""
        if not body:
            problems.append(f"{name}: section {head} is empty")
        if head in ("Diagnose", "Fix") and "```" not in body:
            problems.append(f"{name}: section {head} shows nothing to run (no fenced block)")
    return problems


def test_every_runbook_follows_the_format() -> None:
    assert len(RUNBOOKS) >= 8, [p.name for p in RUNBOOKS]
    problems = [p for path in RUNBOOKS for p in format_problems(path.name, path.read_text())]
    assert not problems, problems


def test_the_format_check_catches_a_broken_runbook() -> None:
    """Each kind of damage is reported as that damage, and only it (not merely "something is wrong")."""
    good = RUNBOOKS[0].read_text()
    assert format_problems("good.md", good) == []
    renamed = [*SECTIONS[:-1], "Afterwards"]
    assert format_problems("x.md", good.replace("## Verify", "## Afterwards")) == [
        f"x.md: sections {renamed}, expected {SECTIONS}"]
    swapped = ["Impact", "Symptom", *SECTIONS[2:]]
    assert format_problems("x.md", good.replace("## Impact", "## Tmp").replace("## Symptom", "## Impact")
                           .replace("## Tmp", "## Symptom")) == [f"x.md: sections {swapped}, expected {SECTIONS}"]
    fix, verify = good.index("## Fix"), good.index("## Verify")
    assert format_problems("x.md", good[:fix] + "## Fix\nJust fix it.\n\n" + good[verify:]) == [
        "x.md: section Fix shows nothing to run (no fenced block)"]
    assert format_problems("x.md", good[:verify] + "## Verify\n") == ["x.md: section Verify is empty"]
    assert format_problems("x.md", good.replace("# Runbook: ", "# ", 1)) == [
        "x.md: the first line is not `# Runbook: <title>`"]
