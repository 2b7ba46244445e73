"""prefect.yaml for real: a Prefect server, the `grpo-process` work pool, the `on-demand` deployment, a process
worker, one flow run at the TINY budget, and its MLflow run in the project's store.

Everything runs locally and offline in a temporary copy of the project, with its own PREFECT_HOME and a free
port; the server and worker are always stopped (their whole process groups) when the test ends. Each step has
its own time limit, so a stuck step fails the test instead of hanging CI.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from infra.local_stack import free_port, tail
from tests.conftest import TINY
from tests.flows.test_dvc_pipeline import BIN, copy_project, tool_env

SERVER_START_S = 240  # first start migrates a fresh database: slow on a busy 2-core machine
RUN_S = 600


def _start(cmd: list[str], cwd: Path, env: dict[str, str], log: Path, stack: ExitStack) -> subprocess.Popen:
    f = log.open("w")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    def stop() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the group is this process and its children
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)
        f.close()

    stack.callback(stop)
    return proc


@pytest.mark.slow  # a real server, a deployment and a worker running the TINY pipeline: a few minutes
def test_on_demand_deployment_runs_on_a_process_worker(tmp_path):
    project = copy_project(tmp_path / "project", tiny=False)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = tool_env(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api,
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
    env.pop("GRPO_PROJECT_DIR", None)  # deploy time: the pull step keeps its {{ $GRPO_PROJECT_DIR }} placeholder
    prefect = str(BIN / "prefect")
    logs = {name: tmp_path / f"{name}.log" for name in ("server", "worker")}

    def cli(*args: str, timeout: float = 180) -> str:
        proc = subprocess.run([prefect, *args], cwd=project, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    with ExitStack() as stack, httpx.Client(base_url=api, timeout=30) as http:
        server = _start([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], project, env,
                        logs["server"], stack)
        deadline = time.monotonic() + SERVER_START_S
        while True:
            assert server.poll() is None, f"the server exited:\n{tail(logs['server'], 4000)}"
            try:
                if http.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"no /api/health in {SERVER_START_S} s:\n{tail(logs['server'], 4000)}"
            time.sleep(1)

        cli("work-pool", "create", "grpo-process", "--type", "process")
        cli("--no-prompt", "deploy", "--name", "on-demand")
        dep = http.get("/deployments/name/grpo-pipeline/on-demand").raise_for_status().json()
        assert dep["work_pool_name"] == "grpo-process"
        assert dep["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {
            "directory": "{{ $GRPO_PROJECT_DIR }}"}}]

        overrides = [*TINY, "tracking.tracking_uri=sqlite:///mlflow.db", "tracking.artifact_location=mlartifacts"]
        run = http.post(f"/deployments/{dep['id']}/create_flow_run",
                        json={"parameters": {"params_path": "params.yaml", "overrides": overrides}})
        flow_run_id = run.raise_for_status().json()["id"]

        worker_env = {**env, "GRPO_PROJECT_DIR": str(project)}
        worker = _start([prefect, "worker", "start", "--pool", "grpo-process", "--type", "process", "--run-once"],
                        tmp_path, worker_env, logs["worker"], stack)
        deadline = time.monotonic() + RUN_S
        while True:
            state = http.get(f"/flow_runs/{flow_run_id}").raise_for_status().json()["state"]
            if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert time.monotonic() < deadline, f"flow run still {state['type']} after {RUN_S} s:\n" \
                                                f"{tail(logs['worker'], 4000)}"
            if worker.poll() is not None and state["type"] == "SCHEDULED":
                pytest.fail(f"the worker exited without picking up the run:\n{tail(logs['worker'], 4000)}")
            time.sleep(3)
        assert state["type"] == "COMPLETED", f"{state}\n{tail(logs['worker'], 8000)}"

        summary = http.post("/artifacts/filter", json={"artifacts": {"key": {"any_": ["grpo-pipeline-summary"]}}})
        (artifact,) = summary.raise_for_status().json()
        assert artifact["flow_run_id"] == flow_run_id
        assert "# GRPO pipeline run: completed" in artifact["data"] and "| grpo | ran |" in artifact["data"]

    # the run worked in the project directory (pull step) and logged to that project's MLflow store
    reg = json.loads((project / "reports/registration.json").read_text())
    assert reg["model_name"] == "grpo-policy"
    with sqlite3.connect(project / "mlflow.db") as db:
        parents = db.execute("SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                             "WHERE t.key = 'prefect_flow_run_id' AND t.value = ?", (flow_run_id,)).fetchall()
        assert len(parents) == 1, "one MLflow parent run, tagged with the Prefect flow run"
        children = {row[0] for row in db.execute(
            "SELECT s.value FROM tags p JOIN tags s ON s.run_uuid = p.run_uuid AND s.key = 'stage' "
            "WHERE p.key = 'mlflow.parentRunId' AND p.value = ?", (parents[0][0],))}
        assert {"train_reward", "sft", "grpo", "evaluate", "register"} <= children
    # the flow run, a process of the worker's, kept a log file of its own in the project
    (flow_log,) = (project / "logs").glob("grpo-flow-*.log")
    logged = flow_log.read_text()
    assert re.search(r"INFO grpo_steps\.stages\.register: registered grpo-policy v1", logged), logged[-3000:]
    assert "WARNING huggingface_hub" not in logged, "our model card has its metadata block"
