"""The package's layout rules, read from the code's own imports (docs/architecture.md draws the same map).

- Dagster is imported only by the Dagster layer (assets/, resources/, sensors/, jobs.py, partitions.py,
  definitions.py) and Typer only by cli/: the domain packages run the same in a CLI, a test or a service.
- Arrows run one way: entry points -> domain -> storage/chain/book -> config/obs. A lower layer never
  imports a higher one, and module-level imports form no cycle.
- Every module says in its docstring what it holds.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = "orderbook_pipelines"
ROOT = Path(__file__).resolve().parents[1] / PKG

DAGSTER_LAYER = ("assets", "resources", "sensors", "jobs", "partitions", "definitions")
# Lower number = lower layer; a module may import only its own layer or lower ones.
LAYERS = {
    "config": 0, "obs": 0, "gc_pause": 0, "faults": 0,
    "book": 1, "chain": 1, "storage": 1,
    "ingestion": 2, "recovery": 2, "quality": 2, "analytics": 2, "live": 2, "devchain": 2,
    **{name: 3 for name in DAGSTER_LAYER}, "cli": 3,
}
# Same-layer dependencies that are allowed (the event reader, the book restore and the canary policy are shared).
SAME_LAYER_OK = {
    ("config", "obs"), ("chain", "book"), ("storage", "book"), ("storage", "chain"),
    ("live", "ingestion"), ("live", "recovery"), ("live", "quality"), ("quality", "ingestion"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _runtime_imports(path: Path) -> tuple[set[str], set[str]]:
    """(module-level imports, all imports) of the package's own modules and of third parties, skipping
    `if TYPE_CHECKING:` blocks (annotations only)."""
    tree = ast.parse(path.read_text())
    top: set[str] = set()
    every: set[str] = set()

    def visit(nodes: list[ast.stmt], module_level: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            every.update(names)
            if module_level:
                top.update(names)
            inner = module_level and not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            visit([c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)], inner)

    visit(tree.body, True)
    return top, every


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


MODULES = _modules()


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != PKG))
def test_module_imports_respect_the_layers(module: str) -> None:
    area = _area(module)
    _, every = _runtime_imports(MODULES[module])
    if area not in DAGSTER_LAYER:
        assert not any(i == "dagster" or i.startswith("dagster.") for i in every), f"{module} imports Dagster"
    if area != "cli":
        assert not any(i == "typer" or i.startswith("typer.") for i in every), f"{module} imports Typer"
    for imp in every:
        if not imp.startswith(PKG + "."):
            continue
        other = _area(imp)
        if other not in LAYERS or other == area:
            continue
        dagster_layer = area in DAGSTER_LAYER and other in DAGSTER_LAYER  # one layer, wired in definitions.py
        assert LAYERS[other] < LAYERS[area] or dagster_layer or (area, other) in SAME_LAYER_OK, (
            f"{module} imports {imp}: {area} (layer {LAYERS[area]}) may not depend on {other} "
            f"(layer {LAYERS[other]})")


def test_every_area_is_placed_in_a_layer() -> None:
    assert {_area(m) for m in MODULES if m != PKG} <= set(LAYERS)


def test_module_level_imports_have_no_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        top, _ = _runtime_imports(path)
        graph[module] = {i for i in top if i in MODULES and i != module}
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(n):], n]))
            if n not in state:
                dfs(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)


@pytest.mark.parametrize("module", sorted(m for m, p in MODULES.items() if p.stat().st_size > 0))
def test_every_module_has_a_docstring(module: str) -> None:
    assert ast.get_docstring(ast.parse(MODULES[module].read_text())), f"{module} says nothing about what it holds"
