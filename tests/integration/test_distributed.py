"""The same training code under `accelerate launch --num_processes 2` (CPU, gloo) gives the same update as one
process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo_steps.config import ModelConfig
from grpo_steps.modeling import build_policy
from grpo_steps.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "distributed" / "update_worker.py"


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("policy")
    tok = build_tokenizer()
    torch.manual_seed(0)
    build_policy(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _launch(n: int, policy_dir: Path, out: Path, loss_type: str, mu: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    args = [str(WORKER), str(policy_dir), str(out), loss_type, str(mu)]
    if n == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "infra" / "accelerate" / "cpu_2proc.yaml"), "--num_processes", str(n), "--main_process_port",
               "0", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type,mu", [("grpo", 1), ("dapo", 2)])
def test_two_processes_give_the_one_process_update(policy_dir, tmp_path, loss_type, mu):
    from safetensors.torch import load_file

    start = load_file(policy_dir / "model.safetensors")
    one = _launch(1, policy_dir, tmp_path / "one.pt", loss_type, mu)
    two = _launch(2, policy_dir, tmp_path / "two.pt", loss_type, mu)
    moved = 0
    for name, w in one.items():
        torch.testing.assert_close(two[name], w, rtol=1e-5, atol=1e-6, msg=name)
        if name in start and not torch.equal(start[name], w):
            moved += 1
    assert moved > 0, "the update changed no weight: the test would pass vacuously"
