"""The scheduled flow on several processes: `grpo run --set launch.processes_per_node=2` trains sft, train_reward and
grpo as torchrun child jobs (2 gloo processes each) from the Prefect flow, registers the model as on one process,
and ends with the one-process weights; a flow killed mid-stage leaves no process behind.

Tolerance of the weights. The 2-process stages compute the same updates in another float order (each process
its half of every batch, gradients averaged), so sft's and train_reward's weights already differ in the last bits
(measured 2.1e-7 and 1.5e-6) and grpo starts from them. Over this tiny budget (20 sft steps across 4 epochs, one
reward-model epoch, 3 grpo steps) no sampled token flips, and the grpo weights agree to float noise (measured
3.0e-6): the bound is that of tests/platform/test_distributed.py, 1e-5 absolute and 2% of what the grpo stage
moves them (6.0e-4 here). Before every TRL step took a full batch, an epoch's last batch was padded with other
rows on 2 processes, and the flows' weights differed by 2.8e-3.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient
from safetensors.torch import load_file

from tests.conftest import ROOT, TINY
from tests.support.process_tree import kill_tree

pytestmark = pytest.mark.slow


def _env(workdir: Path) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(workdir / ".prefect"), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    return env


def _command(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "grpo_steps.cli", "run", *[x for o in [*TINY, *overrides] for x in ("--set", o)]]


def _project(workdir: Path) -> Path:
    workdir.mkdir(exist_ok=True)
    shutil.copy(ROOT / "params.yaml", workdir / "params.yaml")
    return workdir


def _flow(workdir: Path, *overrides: str) -> str:
    _project(workdir)
    proc = subprocess.run(_command(*overrides), cwd=workdir, env=_env(workdir), capture_output=True, text=True,
                          timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def _weights(workdir: Path, model: str) -> dict:
    return load_file(str(workdir / "models" / model / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_the_flow_trains_on_two_processes_and_ends_with_the_one_process_weights(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    out1 = _flow(one)
    out2 = _flow(two, "launch.processes_per_node=2")
    assert "under torch's launcher" not in out1  # one process: every stage in the flow's own process
    for stage in ("sft", "train_reward", "grpo"):
        assert f"stage {stage}: 2 processes (2 per node x 1 nodes) under torch's launcher" in out2, stage
    assert "[rank 1] " in out2 and "[rank 0] " in out2  # every rank's log lines, prefixed

    # registered as usual, each launched stage's MLflow run nested under the flow's parent run
    client = MlflowClient(tracking_uri=f"sqlite:///{two}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("grpo-pipeline").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("mlflow.runName") == "pipeline"]
    children = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"prepare", "validate", "sft", "train_reward", "grpo", "evaluate", "register"}
    assert len(client.get_metric_history(children["grpo"].info.run_id, "reward")) == 3  # rank 0's, once per step
    reg = json.loads((two / "reports" / "registration.json").read_text())
    assert str(client.get_model_version_by_alias(reg["model_name"], "champion").version) == str(reg["version"])

    # Prefect's cache treats launched stages as in-process ones: a rerun with nothing changed skips them all
    # (launch is in no cache key: the rerun on 1 process takes the 2-process results)
    again = _flow(two, "launch.processes_per_node=1")
    assert "cached stages: prepare, validate, sft, train_reward, grpo, evaluate" in again
    assert "under torch's launcher" not in again

    sft = _weights(one, "sft")
    moved = _max_diff(_weights(one, "grpo"), sft)
    diff = _max_diff(_weights(one, "grpo"), _weights(two, "grpo"))
    print(f"grpo weights, 2 processes against 1: max diff {diff:.3g}; the grpo stage moved them by {moved:.3g}")
    assert moved > 1e-4 and diff <= min(0.02 * moved, 1e-5)


def _training_processes(root: psutil.Process) -> list[psutil.Process]:
    """The launcher and the ranks among a process's descendants."""
    found = []
    for p in root.children(recursive=True):
        try:
            cmdline = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "torch.distributed.run" in cmdline or "grpo_steps.launch_rank" in cmdline:
            found.append(p)
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killing_the_flow_mid_stage_leaves_no_process_behind(tmp_path, sig):
    """SIGTERM (Prefect's cancellation, `kill`): the flow unwinds, its launcher stops every rank, and nothing of
    the run is left. SIGKILL: nothing unwinds, yet the launcher and the ranks die with the flow (PDEATHSIG)."""
    _project(tmp_path)
    log = (tmp_path / "flow.log").open("w")
    flow = subprocess.Popen(_command("launch.processes_per_node=2", "sft.max_steps=100000"), cwd=tmp_path,
                            env=_env(tmp_path), stdout=log, stderr=subprocess.STDOUT)
    root = psutil.Process(flow.pid)
    deadline = time.monotonic() + 300
    try:
        while len(ranks := _training_processes(root)) < 3:  # the launcher and 2 ranks of sft
            assert flow.poll() is None, (tmp_path / "flow.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "sft never started on 2 processes"
            time.sleep(0.2)
        time.sleep(3)  # mid-stage: the ranks are training
        family = root.children(recursive=True)
        os.kill(flow.pid, sig)
        flow.wait(timeout=120)
        gone, alive = psutil.wait_procs(ranks if sig == signal.SIGKILL else family, timeout=60)
        assert not [f"{p.pid} {' '.join(p.cmdline())}" for p in alive if p.is_running()], "left behind"
        if sig == signal.SIGTERM:
            assert flow.returncode != 0
            assert not list((tmp_path / "models" / ".launch").glob("*")), "the job's files are cleaned up"
    finally:
        if flow.poll() is None:
            kill_tree(flow.pid)
        for p in psutil.process_iter():  # a SIGKILLed flow cannot stop Prefect's own server: clean up after it
            try:
                if p.environ().get("PREFECT_HOME", "").startswith(str(tmp_path)):
                    p.kill()
            except psutil.Error:
                pass
        log.close()
