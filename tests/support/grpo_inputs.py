"""Shared set-up for tests/stages/test_reliability.py and tests/platform/test_checkpoint.py (no tests here).

The GRPO inputs (validated prompts from the real prepare + validate stages, a tiny starting policy, an
initialised MLflow database) are built once per session and copied into each test's working directory.
The starting policy is a freshly initialised tiny model saved where `sft` writes (the cold start itself is
not what these tests exercise, and it would cost ~20 s); with `digit_match` as a reward its completions get
mixed rewards, so every step changes the weights.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench import processes
from tests.conftest import TINY

BASE = TINY + [
    "grpo.reward_functions=[{name: digit_match, weight: 1.0}, {name: number_format, weight: 0.5}]",
    "grpo.checkpoint_every=2",
]
# Subprocesses: one thread each, so a reference run and a resumed run compute bit for bit alike, and the
# shared cores are not oversubscribed.
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                  "PYTHONUNBUFFERED": "1"}

_CACHE: dict[str, Path] = {}


def build_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Once per session: data/validated, models/sft (+ tokenizer) and mlflow.db in a directory of their own."""
    if "dir" not in _CACHE:
        _CACHE["dir"] = processes.build_inputs(tmp_path_factory.mktemp("grpo-inputs"), BASE, reward_model=False)
    return _CACHE["dir"]


def install_inputs(base: Path, workdir: Path) -> None:
    shutil.copytree(base / "data" / "validated", workdir / "data" / "validated")
    shutil.copytree(base / "models" / "sft", workdir / "models" / "sft")
    shutil.copy(base / "mlflow.db", workdir / "mlflow.db")


def overrides(workdir: Path, *extra: str) -> list[str]:
    return BASE + [f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db", *extra]


def config(workdir: Path, *extra: str):
    from grpo_steps.platform.config import load_config

    return load_config("params.yaml", overrides(workdir, *extra))


def cli_command(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "grpo_steps.cli", "grpo", "--params", "params.yaml",
            *[x for o in overrides(workdir, *extra) for x in ("--set", o)]]


def popen_grpo(workdir: Path, *extra: str) -> subprocess.Popen:
    """`grpo grpo` in a subprocess, stdout and stderr to files in workdir (no pipe to fill up)."""
    path = workdir / f"proc-{len(list(workdir.glob('proc-*.log')))}.log"
    with path.open("w") as log:
        proc = subprocess.Popen(cli_command(workdir, *extra), cwd=workdir, env={**os.environ, **SUBPROCESS_ENV},
                                stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log_path = path  # type: ignore[attr-defined]
    return proc


def output_of(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text()  # type: ignore[attr-defined]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"
