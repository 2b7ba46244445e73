"""The import graph of our own modules: no cycles, and imports point one way,

    grpo_steps.grpo (the algorithm)  <-  grpo_steps.* (stages and their support)  <-  flows  <-  grpo_steps.cli

with grpo_steps.errors a leaf any layer may import. Function-local imports of our own modules are only there
to defer a heavy third-party package (torch, mlflow, Prefect, pandas), and say so (`# deferred: ...`).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("grpo_steps", "flows")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported first-party module, line, at module level) for every import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            if name in known and not (isinstance(node, ast.ImportFrom) and name == node.module
                                      and any(f"{node.module}.{a.name}" in known for a in node.names)):
                out.append((name, node.lineno, id(node) in top))
    return out


def _layer(module: str) -> int:
    if module == "grpo_steps.errors":
        return -1
    if module.startswith("grpo_steps.grpo"):
        return 0
    if module == "grpo_steps.cli":
        return 3
    if module.startswith("flows"):
        return 2
    return 1


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: {name for name, _, _ in _imports(p, known) if name != m} for m, p in mods.items()}


def test_imports_point_one_way():
    wrong = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
             for m, deps in _graph().items() for d in deps
             if _layer(d) > _layer(m) and d not in ("grpo_steps", "grpo_steps.grpo", "flows")]
    assert not wrong, wrong


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d] if d in stack else [m, d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_local_imports_of_our_modules_say_why():
    mods = _modules()
    known = set(mods)
    unexplained = []
    for path in mods.values():
        lines = path.read_text().splitlines()
        for name, lineno, at_top in _imports(path, known):
            if not at_top and "deferred:" not in lines[lineno - 1]:
                unexplained.append(f"{path.relative_to(ROOT)}:{lineno} imports {name}")
    assert not unexplained, unexplained


def test_the_algorithm_takes_no_app_config():
    app = {m: sorted(d for d in deps if _layer(d) > 0)
           for m, deps in _graph().items() if m.startswith("grpo_steps.grpo")}
    assert not any(app.values()), app
