"""The package's rooms and the import graph of our own modules: no cycles, and imports point one way,

    algorithm (grpo_steps/grpo)  <-  data (grpo_steps/data)  <-  platform (grpo_steps/platform)
        <-  stages (grpo_steps/stages)  <-  flows  <-  the entry points (grpo_steps.cli, grpo_steps.launch_rank)

with grpo_steps.errors a leaf any room may import. A module may import its own room and the rooms before it:
the algorithm knows nothing of the app, the data layer nothing of config or tracking, the platform nothing of a
particular stage. Every import counts, deferred ones inside functions too (read from the source, not run).
Function-local imports of our own modules are only there to defer a heavy third-party package (torch, mlflow,
Prefect, pandas), and say so (`# deferred: ...`).
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


# the rooms in import order; a module of none of them is homeless (test_every_module_is_in_a_room)
ROOMS = (("grpo_steps.grpo", "algorithm"), ("grpo_steps.data", "data"), ("grpo_steps.platform", "platform"),
         ("grpo_steps.stages", "stages"), ("flows", "flows"), ("grpo_steps.cli", "entry points"),
         ("grpo_steps.launch_rank", "entry points"))
ORDER = ("algorithm", "data", "platform", "stages", "flows", "entry points")
LEAVES = ("grpo_steps", "grpo_steps.errors")  # the package itself and the error types: under every room
STAGE_VERBS = {"prepare", "validate", "sft", "train_reward", "grpo", "evaluate", "register"}


def _room(module: str) -> str | None:
    return next((room for prefix, room in ROOMS if module == prefix or module.startswith(prefix + ".")), None)


def _layer(module: str) -> int:
    if module in LEAVES:
        return -1
    room = _room(module)
    return ORDER.index(room) if room else len(ORDER)


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: {name for name, _, _ in _imports(p, known) if name != m} for m, p in mods.items()}


def _against_the_order(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} ({_room(m)}) imports {d} ({_room(d)})"
            for m, deps in graph.items() for d in deps if _layer(d) > _layer(m)]


def test_imports_point_one_way():
    assert _against_the_order(_graph()) == [], "imports against algorithm <- data <- platform <- stages <- flows <- cli"


def test_the_check_sees_an_import_against_the_order(tmp_path):
    """The test above can fail: a data module importing the platform is found, a deferred import too (read from a
    probe file as if it were grpo_steps/data/probe.py; nothing is written into the package)."""
    graph = _graph()
    graph["grpo_steps.data.task"] = graph["grpo_steps.data.task"] | {"grpo_steps.platform.config"}
    assert _against_the_order(graph) == ["grpo_steps.data.task (data) imports grpo_steps.platform.config (platform)"]
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from grpo_steps.stages import STAGES  # deferred: a probe\n    return STAGES\n")
    graph = {"grpo_steps.data.probe": {name for name, _, _ in _imports(probe, set(_modules()))}}
    assert _against_the_order(graph) == ["grpo_steps.data.probe (data) imports grpo_steps.stages (stages)"]


def test_every_module_is_in_a_room():
    """A newcomer opening grpo_steps/ finds the four rooms, the entry points and the error types, nothing else."""
    assert [m for m in _modules() if m not in LEAVES and _room(m) is None] == []


def test_the_stage_room_holds_one_module_per_stage_named_as_its_cli_verb():
    from grpo_steps.stages import STAGES

    assert set(STAGES) == STAGE_VERBS
    for name, stage in STAGES.items():
        assert stage.run.split(":")[0] == f"grpo_steps.stages.{name}", name
        assert (ROOT / "grpo_steps" / "stages" / f"{name}.py").is_file(), name


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


def test_every_folder_of_code_is_a_package_an_install_finds():
    """A room without __init__.py is a namespace package: the editable install imports it, `pip install .`
    (the GPU image) would leave it out."""
    from setuptools import find_packages

    found = set(find_packages(str(ROOT), include=["grpo_steps*", "flows*"]))
    folders = {".".join(p.parent.relative_to(ROOT).parts) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    assert folders - found == set()


def test_the_architecture_picture_is_drawn_from_this_code():
    """docs/img/architecture.svg (README, ARCHITECTURE.md) shows these stages and rooms: `python docs/diagram.py`
    redraws it from the stage records and the folders, and the committed file is that drawing."""
    from docs.diagram import OUT, render

    assert OUT.read_text(encoding="utf-8") == render(), "docs/img/architecture.svg is stale: run python docs/diagram.py"


def test_a_no_op_rerun_loads_neither_torch_nor_transformers():
    """`grpo run` with every stage up to date runs the flow, the register stage of an already-registered policy and
    the cached evaluation's table: none of them needs torch or transformers, seconds of imports on a small CPU."""
    import subprocess
    import sys

    code = ("import sys, flows.pipeline, grpo_steps.stages.register, grpo_steps.stages.comparison; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", out.stdout
