"""The package's rooms and the one direction of their imports: algorithm <- data <- platform <- stages <- flows
<- cli. A module may import its own room and the rooms before it, never one after it: the algorithm (grpo_steps/grpo)
knows nothing of the app, the data layer nothing of config or tracking, the platform nothing of a particular
stage. Every import counts, deferred ones inside functions too (they are read from the source, not run)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ORDER = ("algorithm", "data", "platform", "stages", "flows", "cli")
# where each room lives; grpo_steps/errors.py (the error types, importing nothing) is under every room
ROOMS = {"grpo_steps.grpo": "algorithm", "grpo_steps.data": "data", "grpo_steps.platform": "platform",
         "grpo_steps.stages": "stages", "flows": "flows", "grpo_steps.cli": "cli", "grpo_steps.launch_rank": "cli"}
BASE = {"grpo_steps.errors", "grpo_steps"}
STAGE_VERBS = {"prepare", "validate", "sft", "train_reward", "grpo", "evaluate", "register"}


def room_of(module: str) -> str | None:
    hits = [r for prefix, r in ROOMS.items() if module == prefix or module.startswith(prefix + ".")]
    return max(hits, key=ORDER.index) if hits else None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of the project's own modules in `path`."""
    out = []
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the module's package
                pkg = package.split(".")
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]  # `from pkg import module`
    return [(n, m) for n, m in out if m.split(".")[0] in ("grpo_steps", "flows")]


def sources() -> list[Path]:
    return sorted([*(ROOT / "grpo_steps").rglob("*.py"), *(ROOT / "flows").rglob("*.py")])


def test_every_module_is_in_a_room():
    """A newcomer opening grpo_steps/ finds the rooms, the entry points and the error types, nothing else."""
    homeless = [module_name(p) for p in sources() if room_of(module_name(p)) is None and module_name(p) not in BASE]
    assert homeless == []


def test_the_stage_room_holds_one_module_per_stage_named_as_its_cli_verb():
    from grpo_steps.stages import STAGES

    assert set(STAGES) == STAGE_VERBS
    for name, stage in STAGES.items():
        assert stage.run.split(":")[0] == f"grpo_steps.stages.{name}", name
        assert (ROOT / "grpo_steps" / "stages" / f"{name}.py").is_file()


@pytest.mark.parametrize("path", sources(), ids=lambda p: module_name(p))
def test_imports_point_one_way(path: Path):
    me = room_of(module_name(path))
    against = []
    for line, target in imports(path):
        room = room_of(target)
        if target in BASE or room is None:
            continue
        if me is None or ORDER.index(room) > ORDER.index(me):
            against.append(f"{path.relative_to(ROOT)}:{line} ({me}) imports {target} ({room})")
    assert against == [], "imports against algorithm <- data <- platform <- stages <- flows <- cli"


def test_the_check_sees_an_import_against_the_order(tmp_path):
    """The test above can fail: a data module importing the platform is found, and so is a deferred one."""
    bad = ROOT / "grpo_steps" / "data" / "_probe_against_order.py"
    bad.write_text("def f():\n    from grpo_steps.platform.config import Config\n    return Config\n")
    try:
        with pytest.raises(AssertionError, match="grpo_steps.platform.config"):
            test_imports_point_one_way(bad)
    finally:
        bad.unlink()
