"""The prepared GPU check (`make gpu-check`, bench/gpu_check.py): without CUDA it says so and exits 0; with
`--device cpu --quick` every one of its checks runs here, at toy sizes, into its one table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bench import gpu_check
from tests.conftest import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the check would run")
def test_without_cuda_it_says_so_and_exits_0(capsys):
    assert gpu_check.main([]) == 0
    assert "no CUDA device here" in capsys.readouterr().out


@pytest.mark.slow  # ~3 min: the gpu tests (skipped here), a tiny `grpo run`, the memory rows at the micro shape
def test_every_check_runs_on_cpu_into_one_table(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["check"]: r for r in json.loads(out.read_text())}
    assert rows["device"]["result"] == "CPU (no CUDA)"
    assert "skipped" in rows["gpu-marked tests (tests/gpu)"]["result"]
    pipeline = rows["shortened default pipeline (grpo run, launch.processes_per_node auto)"]
    assert pipeline["result"].startswith("accuracy ") and "registered" in pipeline["detail"]
    assert "grpo on 1 process(es)" in pipeline["detail"]  # auto without a GPU: one process
    memory = [c for c in rows if c.startswith("memory, micro shape")]
    assert len(memory) == 4, memory  # ours fp32 and LoRA + bf16; ours vs TRL, each kind
    assert all("GiB" in rows[c]["result"] for c in memory)
    assert "| check | result | detail |" in proc.stdout and "| total |" in proc.stdout
