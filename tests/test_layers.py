"""The import rule of docs/LAYERS.md, checked on the source: who may import what, and no cycles.

Every ``import`` in the package counts, including those inside functions and ``TYPE_CHECKING``
blocks: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "potluck"

CONTRACTS = {"config", "errors", "identity", "tasks", "routing", "retry", "openai_stream", "handshake", "__init__"}
SUBSYSTEMS = {"inference", "overlay", "sharding", "privacy"}
# What each top-level part of the package may import (besides itself). None: anything.
ALLOWED: dict[str, set[str] | None] = {
    **{c: CONTRACTS for c in CONTRACTS},
    "inference": CONTRACTS,
    "overlay": CONTRACTS,
    "privacy": CONTRACTS,
    # The TP engine is an inference engine: it builds on inference's GGUF validation, Backend
    # contract, chat templates. inference never imports sharding (node/backends.py wires it).
    "sharding": CONTRACTS | {"inference"},
    "node": CONTRACTS | SUBSYSTEMS,
    "cli": None,
    "__init__": CONTRACTS,
}
# Sharding's own layers, lowest first: each may import only those below it.
SHARDING_LAYERS = ["format", "collective", "compute", "orchestration"]
UI_LIBRARIES = {"typer", "rich"}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of every module ``name`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{alias.name}" for alias in node.names)  # ``from pkg import module``
    return found


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: {m for m in _imports(name, path) if m in mods} - {name} for name, path in mods.items()}


def test_every_part_of_the_package_has_a_rule(graph: dict[str, set[str]]) -> None:
    assert {_part(m) for m in graph} <= set(ALLOWED)


def test_parts_import_only_what_the_rule_allows(graph: dict[str, set[str]]) -> None:
    broken = []
    for mod, deps in sorted(graph.items()):
        allowed = ALLOWED[_part(mod)]
        if allowed is None:
            continue
        for dep in sorted(deps):
            if _part(dep) not in allowed and _part(dep) != _part(mod):
                broken.append(f"{mod} imports {dep}")
    assert not broken, "imports that break docs/LAYERS.md:\n" + "\n".join(broken)


def test_sharding_layers_import_only_downward(graph: dict[str, set[str]]) -> None:
    def layer(mod: str) -> int | None:
        parts = mod.split(".")
        if len(parts) > 2 and parts[1] == "sharding" and parts[2] in SHARDING_LAYERS:
            return SHARDING_LAYERS.index(parts[2])
        return None

    broken = [
        f"{mod} ({SHARDING_LAYERS[lm]}) imports {dep}"
        for mod, deps in graph.items()
        if (lm := layer(mod)) is not None
        for dep in deps
        if (ld := layer(dep)) is not None and ld > lm
    ]
    assert not broken, "\n".join(sorted(broken))


def test_only_the_cli_and_node_import_terminal_ui_libraries() -> None:
    offenders = [
        f"{name} imports {lib}"
        for name, path in _modules().items()
        if _part(name) not in {"cli", "node"}
        for lib in _imports(name, path)
        if lib.split(".")[0] in UI_LIBRARIES
    ]
    assert not offenders, "\n".join(offenders)


def test_no_import_cycles_between_modules(graph: dict[str, set[str]]) -> None:
    # Tarjan's strongly connected components; a component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)
