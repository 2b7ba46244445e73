"""The README's first command, for real: `grpo run` on a fresh clone with the shipped params.yaml unchanged (no
reduced budget), as a newcomer's `make pipeline` runs it.

This is what keeps `make pipeline` true on a fresh machine: the reward model passes its gate, GRPO raises
held-out accuracy by at least 10 points (the default's worst measured gain is far above; see params.yaml),
a model version is registered, the output holds no traceback and no deprecation warning, Prefect's temporary
server keeps its home in the project, and dvc.lock records every stage (`dvc status` finds nothing to do).
~4-6 minutes on 2 cores.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT


@pytest.mark.slow
def test_shipped_default_pipeline_learns_and_registers(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("needs the project as a git repository to clone")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    # a newcomer's environment: no Prefect or MLflow server, no Prefect profile of this machine's
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_HOME", "PREFECT_PROFILES_PATH")}
    env["HOME"] = str(tmp_path / "home")
    proc = subprocess.run([sys.executable, "-m", "grpo_steps.cli", "run"], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out, out[out.index("Traceback") - 2000:][:6000]
    assert not re.findall(r".*(?:Deprecation|Future)Warning.*", out), re.findall(r".*Warning.*", out)
    assert not re.findall(r".* INFO (?:mlflow|accelerate)\..*", out), "libraries' INFO lines stay off the terminal"
    assert not re.findall(r".* WARNING (?!grpo_steps|flows).*", out), "a first run shows no library warning"
    (log_file,) = (clone / "logs").glob("grpo-run-*.log")  # ... and go to the run's log file, with ours
    logged = log_file.read_text()
    assert re.search(r" INFO mlflow\.", logged) and "stage grpo: recorded in dvc.lock" in logged, logged[-3000:]
    assert f"log file: logs/{log_file.name}" in out
    assert (clone / ".prefect" / "prefect.db").is_file() and not (tmp_path / "home" / ".prefect").exists()
    status = subprocess.run([str(Path(sys.executable).parent / "dvc"), "status", "--json"], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=300)
    assert json.loads(status.stdout) == {}, status.stdout + status.stderr
    rm = json.loads((clone / "reports/reward_model.json").read_text())
    assert rm["gate_passed"] is True and rm["pairwise_accuracy"] >= rm["min_pairwise_accuracy"] >= 0.7
    assert rm["by_kind"]["slip"]["pairwise_accuracy"] >= 0.7, "the reward model tells the teacher's slip apart"

    metrics = json.loads((clone / "reports/metrics.json").read_text())
    assert metrics["accuracy_gain"] >= 0.10, metrics
    assert metrics["reward_hacking_warning"] is None
    assert "accuracy gain (grpo - start):" in out  # printed for the user

    reg = json.loads((clone / "reports/registration.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{clone}/mlflow.db")
    mv = client.get_model_version(reg["model_name"], reg["version"])
    assert client.get_model_version_by_alias(reg["model_name"], "champion").version == mv.version
