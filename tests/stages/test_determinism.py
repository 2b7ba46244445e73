"""The same settings on the same machine and thread count give the same bytes, run after run, under load.

How it broke: OpenMP and MKL may shrink a parallel region's thread team when the machine is loaded (OMP_DYNAMIC,
MKL_DYNAMIC; libgomp goes by the 15-minute load average), and a reduction split over fewer threads sums in another
order. `grpo_steps/__init__.py` pins both before torch loads the runtime.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import processes
from tests.conftest import TINY
from tests.support.grpo_inputs import SUBPROCESS_ENV

# The default policy's shape (the tiny one's tensors are too small for any kernel to split them over threads), a
# batch of 8 x 8 rows.
SHAPE = [o for o in TINY if not o.startswith("model.")] + [
    "grpo.prompts_per_step=8", "grpo.num_generations=8", "grpo.steps=4", "grpo.checkpoint_every=0",
    "grpo.eval_every=0", "grpo.reward_functions=[{name: digit_match, weight: 1.0}]"]
DYNAMIC = {"OMP_DYNAMIC": "true", "MKL_DYNAMIC": "true"}  # as an HPC module or a user's shell may set them
PROBE = """
import ctypes, os, grpo_steps, torch
torch.ones(64, 64) @ torch.ones(64, 64)  # the OpenMP runtime is loaded and initialised
gomp = next(line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line)
print(ctypes.CDLL(gomp).omp_get_dynamic(), os.environ["MKL_DYNAMIC"])
"""


def test_thread_teams_are_fixed_whatever_the_environment_says():
    """Importing the package pins OpenMP's and MKL's teams before torch loads them: omp_get_dynamic() is 0
    even with OMP_DYNAMIC=true in the environment (on the main it was 1)."""
    env = {**os.environ, **DYNAMIC}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0", "FALSE"]


def _load() -> subprocess.Popen:
    """A process that keeps one core busy for as long as it lives."""
    return subprocess.Popen([sys.executable, "-c", "while True: sum(i * i for i in range(10000))"])


def _grpo_md5(inputs: Path, work: Path, threads: int, extra_env: dict[str, str] | None = None) -> str:
    processes.install(inputs, work)
    env = {**os.environ, **SUBPROCESS_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           **(extra_env or {})}
    cmd = [sys.executable, "-m", "grpo_steps.cli", "grpo", "--params", "params.yaml",
           *[x for o in SHAPE + [f"tracking.tracking_uri=sqlite:///{work}/mlflow.db"] for x in ("--set", o)]]
    res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    digest = hashlib.md5((work / "models" / "grpo" / "model.safetensors").read_bytes()).hexdigest()
    shutil.rmtree(work)
    return digest


@pytest.mark.slow  # ~40 s on 2 cores: two short grpo runs
def test_same_settings_same_bytes_while_another_process_loads_the_cpu(tmp_path):
    """A short grpo twice in separate processes with 2 threads, the second while two other processes load the
    CPU and the environment allows dynamic teams: the same md5. On the main this was written against, the md5s
    differed even without load: the backward of the shared prompt's KV-cache gather (an accumulating index_put_)
    added with atomics across threads."""
    (tmp_path / "inputs").mkdir()
    inputs = processes.build_inputs(tmp_path / "inputs", SHAPE, reward_model=False)
    quiet = _grpo_md5(inputs, tmp_path / "quiet", threads=2)
    busy = [_load(), _load()]
    try:
        loaded = _grpo_md5(inputs, tmp_path / "loaded", threads=2, extra_env=DYNAMIC)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert loaded == quiet
