from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A budget small enough for a full pipeline run in well under a minute on 2 cores.
TINY = [
    "task.n_train=400", "task.n_eval=40", "task.n_test=60", "task.n_preference_pairs=200",
    "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
    "reward_model.epochs=1", "reward_model.min_pairwise_accuracy=0.0",
    "sft.max_steps=20", "grpo.steps=3", "grpo.prompts_per_step=4", "grpo.num_generations=4",
    "evaluate.pass_k=2",
]


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri():
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which the pipeline honours as an override:
    never let one test's store leak into the next test or its subprocesses."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty project directory with the repo's params.yaml; paths are relative to it."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def tiny_cfg(workdir):
    from grpo_steps.platform.config import load_config

    return load_config("params.yaml", TINY + [f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db"])


@pytest.fixture(scope="session")
def template(tmp_path_factory):
    """A tiny project (prepared and validated data, untrained tiny models), built once per session."""
    from tests.support.project import project_template

    return project_template(tmp_path_factory)


@pytest.fixture
def project(workdir, template):
    """`workdir` holding a copy of the tiny project."""
    from tests.support.project import copy_project

    copy_project(template, workdir)
    return workdir


@pytest.fixture(scope="session")
def grpo_inputs(tmp_path_factory):
    """The inputs of the grpo stage on tiny settings, built once per session."""
    from tests.support.grpo_inputs import build_inputs

    return build_inputs(tmp_path_factory)


@pytest.fixture
def ready(workdir, grpo_inputs):
    """`workdir` with the grpo stage's inputs in place."""
    from tests.support.grpo_inputs import install_inputs

    install_inputs(grpo_inputs, workdir)
    return workdir


@pytest.fixture
def tmpfs(tmp_path):
    """Make a tmpfs of a given size (MiB) under tmp_path, unmounted after the test: a device that really fills.
    Skips where mounting is not permitted (not root, or a container without the capability)."""
    mounts: list[Path] = []

    def make(mib: int) -> Path:
        folder = tmp_path / f"tmpfs-{len(mounts)}"
        folder.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
        if res.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode}): a disk that fills "
                        "needs one")
        mounts.append(folder)
        return folder

    yield make
    for folder in mounts:
        subprocess.run(["umount", "-l", str(folder)], check=False)
