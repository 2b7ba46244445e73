"""The whole pipeline, for real: `grpo run` (Prefect flow on a local server, MLflow on SQLite) on a tiny budget."""

import json
import os
import subprocess
import sys
import time

import mlflow
import pytest
from mlflow import MlflowClient

from tests.conftest import TINY


def _env(cwd, env_extra=None):
    env = {**os.environ, "PREFECT_HOME": str(cwd / ".prefect"), **(env_extra or {})}
    env.pop("PREFECT_API_URL", None)
    return env


def _run(args, cwd, env_extra=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "grpo_steps.cli", *args], cwd=cwd, env=_env(cwd, env_extra),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # ~60 s: the Prefect flow and every stage in a subprocess
def test_grpo_run_executes_every_stage_and_registers(workdir):
    """... while a second `grpo run` started in the same fresh directory stops at once, naming the first, before
    it touches the MLflow database (before: both created it, and one died of `table assessments already
    exists`; in an existing directory both trained sft and the reward model)."""
    overrides = [x for o in TINY for x in ("--set", o)]
    log = (workdir.parent / "first.log").open("w+")
    first = subprocess.Popen([sys.executable, "-m", "grpo_steps.cli", "run", *overrides], cwd=workdir,
                             env=_env(workdir), stdout=log, stderr=subprocess.STDOUT, text=True)
    lock, deadline = workdir / "models" / ".pipeline.lock", time.monotonic() + 120
    while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    t0 = time.monotonic()
    second = _run(["run", *overrides], workdir, timeout=120)
    assert second.returncode == 2, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"is in use by another run (pid {first.pid} holds" in second.stderr
    assert "Traceback" not in second.stderr and time.monotonic() - t0 < 30
    assert first.wait(timeout=600) == 0, (log.seek(0), log.read()[-3000:])[1]
    log.seek(0)
    proc = subprocess.CompletedProcess(first.args, 0, log.read(), "")

    for path in ["data/validated/train.jsonl", "models/reward/model.safetensors", "models/sft/model.safetensors",
                 "models/grpo/model.safetensors", "reports/metrics.json", "reports/grpo_steps.csv",
                 "reports/eval.png", "reports/registration.json"]:
        assert (workdir / path).is_file(), path
    metrics = json.loads((workdir / "reports/metrics.json").read_text())
    assert 0.0 <= metrics["grpo"]["accuracy"] <= 1.0 and "kl_to_reference" in metrics["grpo"]
    assert "held-out evaluation" in proc.stdout + proc.stderr

    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlflow.db")
    client = MlflowClient()
    exp = client.get_experiment_by_name("grpo-pipeline")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("mlflow.runName") == "pipeline"]
    assert len(parents) == 1
    parent_id = parents[0].info.run_id
    children = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id}
    assert len([r for r in runs if r.data.tags.get("stage") == "sft"]) == 1  # nothing trained twice
    assert set(children) >= {"train_reward", "sft", "grpo", "evaluate", "register"}
    grpo_metrics = children["grpo"].data.metrics
    for key in ("reward", "reward_std", "kl", "loss", "completions/mean_length", "frac_reward_zero_std"):
        assert key in grpo_metrics, key
    assert len(client.get_metric_history(children["grpo"].info.run_id, "reward")) == 3

    reg = json.loads((workdir / "reports/registration.json").read_text())
    mv = client.get_model_version(reg["model_name"], reg["version"])
    assert mv.tags["gate_decision"] == "champion"  # first version: no champion to beat
    assert client.get_model_version_by_alias(reg["model_name"], "champion").version == mv.version
    for tag in ("git_commit", "params_hash", "mlflow_run_id", "prefect_flow_run_id", "data_md5/test.jsonl"):
        assert tag in mv.tags, tag
    assert mv.tags["prefect_flow_run_id"] != "none"


def test_bad_params_fail_before_any_work(workdir):
    (workdir / "params.yaml").write_text("grpo:\n  num_generations: 1\n")
    proc = _run(["prepare"], workdir)
    assert proc.returncode == 2
    assert "grpo.num_generations" in proc.stderr
    assert not (workdir / "data").exists()


@pytest.mark.slow  # ~18 s: the CLI's start-up, torch and transformers imports included
def test_missing_input_names_the_file(workdir):
    proc = _run(["sft"], workdir)
    assert proc.returncode == 2
    assert "not found" in proc.stderr and "tokenizer" in proc.stderr
