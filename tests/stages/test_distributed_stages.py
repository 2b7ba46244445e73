"""The train_reward stage as users launch it, `grpo train_reward` on 1 process against `grpo train_reward --set
launch.processes_per_node=2` on 2 (a torchrun child job of the stage, CPU, gloo), from the same
inputs: the same reward model up to float summation order, so the same held-out pairwise accuracy.

Each process trains on its half of every global batch of `reward_model.batch_size` pairs, DDP averages the
halves' gradients, and the logged curve is the global batch's. What was measured (likelihood head, 2000 pairs,
15 epochs = 435 steps at lr 3e-3, seeds 0, 1, 2):
- held-out pairwise accuracy (200 pairs): 1 process 0.725, 0.745, 0.725; 2 processes the same, to the pair (the
  seeds themselves spread by 0.02, so 0.02 is the tolerance);
- weights: max |W_2 - W_1| 1.6e-4, 3.7e-4, 3.9e-4 (float summation order, grown over 435 AdamW steps), bound 2e-3;
- the logged train loss: equal to 1e-8 at its first point (step 10), within 1.6e-4 over the curve; rank 0's
  unreduced half-batch loss differs from it by 0.048 at step 10 (and 0.054 at most), so 1e-5 and 1e-3 tell;
- the previous code, where every process trained on the whole batch, gave weights bit-identical to 1 process
  (the same gradient on every rank, averaged): the 2-process weights now differ in the last bits, and each
  process says which half it trains on.
Run times on 2 cores: about 20 s on 1 process, 28 s on 2 (most of it start-up).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from bench import processes
from tests.conftest import TINY

pytestmark = pytest.mark.slow

# 2000 pairs (1800 train, 200 held out), the likelihood head from a fresh tiny policy: trained long enough to rank
# well above chance, so agreeing accuracies mean something.
SETTINGS = TINY + ["task.n_preference_pairs=2000", "reward_model.epochs=15", "reward_model.learning_rate=0.003",
                   "reward_model.batch_size=64", "tracking.system_metrics=false"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """data/validated from the real prepare and validate stages and a fresh tiny starting policy (models/sft)."""
    return processes.build_inputs(tmp_path_factory.mktemp("reward-inputs"), SETTINGS, reward_model=False)


def _train_reward(inputs: Path, workdir: Path, n: int, *extra: str) -> subprocess.CompletedProcess:
    """`grpo train_reward` as a user launches it: on 1 process, or on n under torch's launcher
    (launch.processes_per_node)."""
    processes.install(inputs, workdir)
    return subprocess.run(processes.command(workdir, n, [*SETTINGS, *extra], stage="train_reward"), cwd=workdir,
                          env=processes.env(), capture_output=True, text=True, timeout=600)


def _succeeded(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    return out


def _logged(workdir: Path, stage: str, metric: str) -> dict[int, float]:
    """A metric's history on the stage's MLflow run in `workdir`."""
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("grpo-pipeline").experiment_id],
                                f"tags.stage = '{stage}'")
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, metric)}


def _logged_loss(workdir: Path) -> dict[int, float]:
    return _logged(workdir, "train_reward", "reward_model/train/loss")


def test_two_processes_train_the_one_process_reward_model(inputs, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _succeeded(_train_reward(inputs, one, 1))
    out = _succeeded(_train_reward(inputs, two, 2))

    # each process trained on its own half of every global batch of 64
    assert "process 0 of 2 trains on pairs 0-31 of each global batch of 64" in out
    assert "process 1 of 2 trains on pairs 32-63 of each global batch of 64" in out

    report_1 = json.loads((one / "reports" / "reward_model.json").read_text())
    report_2 = json.loads((two / "reports" / "reward_model.json").read_text())
    print(f"held-out pairwise accuracy: 1 process {report_1['pairwise_accuracy']:.4f}, "
          f"2 processes {report_2['pairwise_accuracy']:.4f}")
    assert report_1["n_eval_pairs"] == report_2["n_eval_pairs"] == 200
    assert report_1["pairwise_accuracy"] >= 0.65, "the reward model barely learned: agreement would mean little"
    assert report_2["pairwise_accuracy"] == pytest.approx(report_1["pairwise_accuracy"], abs=0.02)

    w1 = load_file(str(one / "models" / "reward" / "model.safetensors"))
    w2 = load_file(str(two / "models" / "reward" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    largest = max((w2[k] - w1[k]).abs().max().item() for k in w1)
    print(f"max |W_2 - W_1| = {largest:.2e}")
    assert largest <= 2e-3
    # the whole batch on every process would be bit-identical to one process (the same gradient, averaged)
    assert not all(torch.equal(w1[k], w2[k]) for k in w1), "2 processes computed exactly what 1 did: not split"

    # the logged loss is the global batch's on 2 processes too (rank 0's half alone is 0.05 off)
    loss_1, loss_2 = _logged_loss(one), _logged_loss(two)
    assert loss_1.keys() == loss_2.keys() and min(loss_1) == 10
    assert loss_2[10] == pytest.approx(loss_1[10], abs=1e-5)
    assert max(abs(loss_2[s] - loss_1[s]) for s in loss_1) <= 1e-3


def test_a_global_batch_the_processes_cannot_share_evenly_is_refused(inputs, tmp_path):
    proc = _train_reward(inputs, tmp_path / "odd", 2, "reward_model.batch_size=63")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]  # a user error, on whichever rank reported it first: one line
    assert re.search(r"grpo train_reward: error: stage train_reward failed on rank [01] of 2 \(node 0, \S+, exit "
                     r"code 2\): reward_model.batch_size=63 is the global batch", out), out[-3000:]
    assert "divide evenly over the 2 processes" in out
    assert not (tmp_path / "odd" / "models" / "reward").exists()


def test_two_processes_cold_start_on_the_one_process_batches(inputs, tmp_path):
    """sft (TRL's SFTTrainer) on 2 processes keeps sft.batch_size rows a step in all, the same rows as on 1: the
    logged loss agrees (a batch twice as large, or other rows, shows at once), and so do the weights."""
    losses, weights = {}, {}
    for n in (1, 2):
        work = tmp_path / f"sft{n}"
        processes.install(inputs, work)
        shutil.rmtree(work / "models" / "sft")
        proc = subprocess.run(processes.command(work, n, SETTINGS, stage="sft"), cwd=work, env=processes.env(),
                              capture_output=True, text=True, timeout=600)
        _succeeded(proc)
        losses[n] = _logged(work, "sft", "loss")
        weights[n] = load_file(str(work / "models" / "sft" / "model.safetensors"))
    largest = max((weights[2][k] - weights[1][k]).abs().max().item() for k in weights[1])
    print(f"sft loss 1 process {losses[1]}, 2 processes {losses[2]}; max |W_2 - W_1| = {largest:.2e}")
    assert losses[1].keys() == losses[2].keys() and losses[1]
    for step in losses[1]:
        assert losses[2][step] == pytest.approx(losses[1][step], rel=1e-3), step
    # 20 steps cross epochs of 400 rows / 64: each epoch's partial last batch is dropped alike on every layout (on
    # 2 processes accelerate would pad it with other rows), so the weights agree to float noise (measured 3.3e-7;
    # 1.4e-4 from step 7 on, and 2.8e-3 after 20 steps, when the padded batch was trained)
    assert largest <= 1e-5, f"the 2-process cold start differs by {largest:.2e}"
