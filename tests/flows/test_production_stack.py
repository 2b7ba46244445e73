"""The production stack for real, without Docker, and what users see of it in a browser.

One module-scoped stack (infra/local_stack.py): PostgreSQL from the distribution's packages, `mlflow server
--app-name basic-auth` on it (`postgresql://` tracking and registry, proxied local artifacts) and a Prefect
server on it with an API auth string. The TINY pipeline runs through them once, as `grpo run` with the
`pipeline` user's credentials in its environment only. Then:

* the run, the registry version and the flow run are where they should be (read back over the servers' APIs
  and straight from PostgreSQL);
* anonymous and wrong-password clients are refused by both servers; the read-only `viewer` can read but
  cannot move the champion alias or delete a run, while the pipeline's user can;
* no password reaches the pipeline's output, a logged param or tag, the flow run, or a stored file;
* headless Chromium (Debian's, through its chromedriver) opens the MLflow UI as the viewer and the Prefect UI,
  and checks what a user looks for. Screenshots go to test-artifacts/screenshots (GRPO_TEST_ARTIFACTS).

Each server and the pipeline have their own time limit; everything started is stopped when the module ends.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from grpo_steps.platform.tracking import EXPERIMENT_KIND_TAG, HEADLINE_METRICS, HEADLINE_VIEW_TAG
from grpo_steps.stages import STAGES
from infra.local_stack import DB_USER, PIPELINE_USER, VIEWER_USER, Stack, StackError, postgres_bindir
from tests.conftest import ROOT
from tests.flows.test_dvc_pipeline import BIN, copy_project, tool_env

pytestmark = pytest.mark.slow  # a database, two servers and the TINY pipeline through them: a few minutes

RUN_S = 900
ARTIFACTS = Path(os.environ.get("GRPO_TEST_ARTIFACTS", ROOT / "test-artifacts"))
SHOTS = ARTIFACTS / "screenshots"
MODEL = "grpo-policy"


@dataclass
class StackRun:
    stack: Stack
    project: Path
    output: str  # what `grpo run` printed
    experiment_id: str
    parent_run_id: str
    flow_run_id: str

    def mlflow(self, user: str | None = PIPELINE_USER, password: str | None = None) -> httpx.Client:
        return _mlflow_api(self.stack, user, password)

    def prefect(self, auth: bool = True) -> httpx.Client:
        headers = {"Authorization": self.stack.prefect_auth_header()} if auth else {}
        return httpx.Client(base_url=self.stack.prefect_api, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def stack_run(tmp_path_factory) -> Iterator[StackRun]:
    try:
        postgres_bindir()
    except StackError as e:
        pytest.skip(str(e))
    # not under pytest's 0700 tmp folder: as root, the server runs as the postgres user, who must reach it
    root = Path(tempfile.mkdtemp(prefix="grpo-stack-"))
    os.chmod(root, 0o755)
    try:
        with Stack.start(root / "stack") as stack:
            project = copy_project(tmp_path_factory.mktemp("stack-project"))
            env = tool_env(**stack.client_env(), PREFECT_HOME=str(root / "client-prefect-home"))
            proc = subprocess.run([str(BIN / "grpo"), "run", "--set", "tracking.system_metrics=false"], cwd=project,
                                  env=env, capture_output=True, text=True, timeout=RUN_S)
            output = proc.stdout + proc.stderr
            (root / "pipeline.log").write_text(output)
            assert proc.returncode == 0, f"grpo run through the stack failed:\n{output[-6000:]}"
            with _mlflow_api(stack, PIPELINE_USER) as c:
                exp = c.get("/experiments/get-by-name", params={"experiment_name": "grpo-pipeline"})
                experiment_id = exp.raise_for_status().json()["experiment"]["experiment_id"]
                (parent,) = _search(c, experiment_id, "attributes.run_name = 'pipeline'")
            yield StackRun(stack, project, output, experiment_id, parent["info"]["run_id"],
                           _tags(parent)["prefect_flow_run_id"])
    finally:
        logs = ARTIFACTS / "stack-logs"
        logs.mkdir(parents=True, exist_ok=True)
        for log in [*(root / "stack").glob("*.log"), root / "pipeline.log"]:
            if log.is_file():
                shutil.copy(log, logs / log.name)
        shutil.rmtree(root, ignore_errors=True)


def _mlflow_api(stack: Stack, user: str | None, password: str | None = None) -> httpx.Client:
    """MLflow's REST API as `user` (its own password unless one is given), or anonymous for None."""
    auth = None if user is None else (user, password if password is not None else stack.password(user))
    return httpx.Client(base_url=f"{stack.mlflow_url}/api/2.0/mlflow", auth=auth, timeout=60)


def _search(client: httpx.Client, experiment_id: str, filter_string: str) -> list[dict]:
    r = client.post("/runs/search", json={"experiment_ids": [experiment_id], "filter": filter_string,
                                          "max_results": 100})
    return r.raise_for_status().json().get("runs", [])


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _metrics(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def _psql(run: StackRun, database: str, sql: str) -> str:
    out = subprocess.run([str(postgres_bindir() / "psql"), "-h", "127.0.0.1", "-p", str(run.stack.pg_port),
                          "-U", DB_USER, "-d", database, "-tAc", sql], capture_output=True, text=True,
                         env={**os.environ, "PGPASSWORD": run.stack.creds.db}, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


# ------------------------------------------------------------------------------------------------ the stack


def test_the_pipeline_runs_through_postgres_backed_servers(stack_run):
    run = stack_run
    with run.mlflow() as c:
        exp = c.get("/experiments/get", params={"experiment_id": run.experiment_id}).raise_for_status().json()
        exp_tags = {t["key"]: t["value"] for t in exp["experiment"]["tags"]}
        assert exp_tags[EXPERIMENT_KIND_TAG] == "custom_model_development" and HEADLINE_VIEW_TAG in exp_tags
        assert exp["experiment"]["artifact_location"].startswith("mlflow-artifacts:")  # served by the server
        parent = c.get("/runs/get", params={"run_id": run.parent_run_id}).raise_for_status().json()["run"]
        assert parent["info"]["status"] == "FINISHED"
        assert set(HEADLINE_METRICS) <= set(_metrics(parent)), _metrics(parent)
        children = _search(c, run.experiment_id, f"tags.mlflow.parentRunId = '{run.parent_run_id}'")
        assert sorted(_tags(r)["stage"] for r in children) == sorted(STAGES)
        assert all(r["info"]["status"] == "FINISHED" for r in children)

        version = c.get("/registered-models/alias", params={"name": MODEL, "alias": "champion"})
        version = version.raise_for_status().json()["model_version"]
        assert version["description"].startswith("GRPO policy") and "Held-out accuracy" in version["description"]
        vtags = {t["key"]: t["value"] for t in version.get("tags", [])}
        assert vtags["mlflow_pipeline_run_id"] == run.parent_run_id and vtags["params_hash"]
        assert any(k.startswith("data_md5/") for k in vtags)

    # the records are in PostgreSQL, the artifacts in the server's store
    assert int(_psql(run, "mlflow", f"SELECT count(*) FROM runs WHERE run_uuid = '{run.parent_run_id}'")) == 1
    assert int(_psql(run, "mlflow", f"SELECT count(*) FROM model_versions WHERE name = '{MODEL}'")) >= 1
    assert int(_psql(run, "prefect", f"SELECT count(*) FROM flow_run WHERE id = '{run.flow_run_id}'")) == 1
    assert any((run.stack.root / "artifacts").rglob("eval.png"))

    with run.prefect() as p:
        flow_run = p.get(f"/flow_runs/{run.flow_run_id}").raise_for_status().json()
        assert flow_run["state_type"] == "COMPLETED"
        tasks = p.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [run.flow_run_id]}}})
        assert sorted(t["name"].rsplit("-", 1)[0] for t in tasks.raise_for_status().json()) == sorted(STAGES)
        arts = p.post("/artifacts/filter", json={"artifacts": {"key": {"any_": ["grpo-pipeline-summary"]},
                                                              "flow_run_id": {"any_": [run.flow_run_id]}}})
        (summary,) = arts.raise_for_status().json()
        assert summary["data"].startswith("# GRPO pipeline run: completed")


def test_anonymous_clients_are_refused(stack_run):
    run = stack_run
    with run.mlflow(user=None) as anon, run.mlflow(PIPELINE_USER, password="wrong") as wrong:
        for client in (anon, wrong):
            assert client.get("/experiments/search", params={"max_results": 5}).status_code == 401
            assert client.post("/runs/delete", json={"run_id": run.parent_run_id}).status_code == 401
            moved = client.post("/registered-models/alias", json={"name": MODEL, "alias": "champion", "version": "1"})
            assert moved.status_code == 401
    with run.prefect(auth=False) as anon:
        assert anon.post("/flow_runs/filter", json={}).status_code == 401
        assert anon.post("/deployments/filter", json={}).status_code == 401
        assert anon.delete(f"/flow_runs/{run.flow_run_id}").status_code == 401
    with httpx.Client(base_url=run.stack.prefect_api, auth=("admin", "wrong"), timeout=60) as wrong:
        assert wrong.post("/flow_runs/filter", json={}).status_code == 401
    with run.prefect() as p:  # still there
        assert p.get(f"/flow_runs/{run.flow_run_id}").status_code == 200


def test_the_read_only_user_cannot_move_the_champion(stack_run):
    run = stack_run
    with run.mlflow(VIEWER_USER) as viewer, run.mlflow(PIPELINE_USER) as pipeline:
        champion = viewer.get("/registered-models/alias", params={"name": MODEL, "alias": "champion"})
        version = champion.raise_for_status().json()["model_version"]["version"]  # reading is allowed
        assert viewer.get("/runs/get", params={"run_id": run.parent_run_id}).status_code == 200
        refused = [
            viewer.post("/registered-models/alias", json={"name": MODEL, "alias": "champion", "version": version}),
            viewer.request("DELETE", "/registered-models/alias", json={"name": MODEL, "alias": "champion"}),
            viewer.post("/registered-models/alias", json={"name": MODEL, "alias": "challenger", "version": version}),
            viewer.post("/runs/delete", json={"run_id": run.parent_run_id}),
            viewer.request("DELETE", "/registered-models/delete", json={"name": MODEL}),
        ]
        assert [r.status_code for r in refused] == [403] * len(refused), [r.text[:200] for r in refused]
        after = pipeline.get("/registered-models/alias", params={"name": MODEL, "alias": "champion"})
        assert after.raise_for_status().json()["model_version"]["version"] == version
        assert pipeline.get("/runs/get", params={"run_id": run.parent_run_id}).json()["run"]["info"][
            "lifecycle_stage"] == "active"
        # the pipeline's user manages what it registered
        ok = pipeline.post("/registered-models/alias", json={"name": MODEL, "alias": "stack-test", "version": version})
        assert ok.status_code == 200, ok.text
        gone = pipeline.request("DELETE", "/registered-models/alias", json={"name": MODEL, "alias": "stack-test"})
        assert gone.status_code == 200, gone.text


def test_credentials_stay_out_of_logs_params_runs_and_files(stack_run):
    run = stack_run
    creds = run.stack.creds
    secrets = {name: getattr(creds, name) for name in creds.__dataclass_fields__}

    def leaked(text: str) -> list[str]:
        return [name for name, value in secrets.items() if value in text]

    assert leaked(run.output) == [], "a password in grpo run's output"
    with run.mlflow() as c:
        for r in _search(c, run.experiment_id, ""):
            values = " ".join(str(kv.get("value")) for kv in r["data"].get("params", []) + r["data"].get("tags", []))
            assert leaked(values) == [], f"a password in the params/tags of run {r['info']['run_name']}"
    with run.prefect() as p:
        flow_run = p.get(f"/flow_runs/{run.flow_run_id}").raise_for_status().json()
        assert leaked(json.dumps(flow_run)) == []
        logs = p.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [run.flow_run_id]}}, "limit": 200})
        assert leaked(json.dumps(logs.raise_for_status().json())) == []
    for tree in (run.project, run.stack.root / "artifacts"):
        for path in tree.rglob("*"):
            if path.is_file() and path.stat().st_size < 50_000_000:
                assert leaked(path.read_bytes().decode("latin-1")) == [], f"a password in {path}"


# ------------------------------------------------------------------------------------------------ the UIs


def _ui_link(output: str) -> str:
    found = re.findall(r"MLflow UI: (\S+)", output)
    assert found, "grpo run printed no MLflow UI link"
    return found[-1]


def test_mlflow_ui_shows_runs_charts_model_and_artifacts(stack_run):
    from tests.support.browser import browser, click, click_text, close_mlflow_assistant, page_text, wait_text

    run = stack_run
    url = run.stack.mlflow_url
    with run.mlflow(VIEWER_USER) as c:
        children = {_tags(r)["stage"]: r["info"]["run_id"]
                    for r in _search(c, run.experiment_id, f"tags.mlflow.parentRunId = '{run.parent_run_id}'")}
        version = c.get("/registered-models/alias", params={"name": MODEL, "alias": "champion"}).json()[
            "model_version"]["version"]
    with browser(SHOTS) as anonymous:  # no credentials: the server answers 401, the page stays empty
        anonymous.get(_ui_link(run.output))
        time.sleep(5)
        anonymous.save_screenshot(str(SHOTS / "mlflow-anonymous.png"))
        assert "grpo-pipeline" not in page_text(anonymous) and "accuracy_start" not in page_text(anonymous)
    # the read-only user browses; the header is the browser's basic-auth answer on every request
    with browser(SHOTS, {"Authorization": run.stack.basic_auth_header(VIEWER_USER)}, size=(1920, 1080)) as d:
        # the link the pipeline printed: the runs, in Model training mode, headline metrics as columns
        d.get(_ui_link(run.output))
        text = wait_text(d, "Model training", "pipeline", *HEADLINE_METRICS, shot="mlflow-runs-raw")
        close_mlflow_assistant(d)
        text = wait_text(d, *HEADLINE_METRICS, shot="mlflow-runs")
        assert "Detect Issues" not in text and "No data available for the selected time range" not in text
        assert [text.index(m) for m in HEADLINE_METRICS] == sorted(text.index(m) for m in HEADLINE_METRICS)
        # the parent run expands to its nested stage runs
        click(d, f"[row-id='{run.parent_run_id}'] button[data-component-id*='runnamecellrenderer']",
               "run expander")
        wait_text(d, *STAGES, shot="mlflow-nested-runs")

        # the grpo run's first charts are the headline ones, and the reward chart has its points
        d.get(f"{url}/#/experiments/{run.experiment_id}/runs/{children['grpo']}/model-metrics"
              "?workflowType=machine_learning")
        text = wait_text(d, "Headline", "grpo (Headline/reward)", "grpo (Headline/kl)", shot="mlflow-grpo-charts")
        sections = [m.group(1) for m in re.finditer(r"^(\S[^\n]*)\n\(\d+\)$", text, flags=re.M)]  # "name\n(n)"
        assert sections[0] == "Headline" and "clip_ratio" in sections and "Model metrics" in sections, sections
        points = d.execute_script(
            "const card = Array.from(document.querySelectorAll('*')).filter(e => e.childElementCount === 0 &&"
            " e.textContent.trim() === 'grpo (Headline/reward)')[0];"
            "let el = card;"
            "for (let i = 0; i < 12 && el && !el.querySelector('.scatterlayer'); i++) el = el.parentElement;"
            "return el ? el.querySelectorAll('.scatterlayer .points path').length : -1")
        assert points >= 3, f"the reward chart shows {points} points (TINY runs 3 steps)"

        # the evaluation artifacts open: the plot as an image, the samples table as text
        d.get(f"{url}/#/experiments/{run.experiment_id}/runs/{children['evaluate']}/artifacts"
              "?workflowType=machine_learning")
        wait_text(d, "eval.png", "samples.json", shot="mlflow-artifacts")
        click_text(d, "eval.png")
        deadline = time.monotonic() + 60
        while not d.execute_script("return Array.from(document.images).some(i => i.complete && i.naturalWidth > 200"
                                   " && (i.src.includes('eval.png') || i.src.startsWith('blob:')))"):
            assert time.monotonic() < deadline, "eval.png did not render as an image"
            time.sleep(0.5)
        wait_text(d, "eval.png", shot="mlflow-eval-plot")
        click_text(d, "samples.json")
        wait_text(d, "completion", "prompt", shot="mlflow-samples")

        # the registered version: alias, a description a person can read, the lineage tags
        d.get(f"{url}/#/models/{MODEL}/versions/{version}?workflowType=machine_learning")
        wait_text(d, "champion", "Held-out accuracy", "mlflow_pipeline_run_id", "params_hash", "data_md5/",
                  shot="mlflow-model-version")


def test_prefect_ui_asks_for_the_auth_string_then_shows_the_flow_run_its_tasks_and_summary(stack_run):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from tests.support.browser import browser, click, page_text, wait_text

    run = stack_run
    ui = run.stack.prefect_api.removesuffix("/api")
    with run.prefect() as p:
        arts = p.post("/artifacts/filter", json={"artifacts": {"key": {"any_": ["grpo-pipeline-summary"]},
                                                              "flow_run_id": {"any_": [run.flow_run_id]}}})
        (summary,) = arts.raise_for_status().json()
    with browser(SHOTS, size=(1920, 1080)) as d:
        # no auth string yet: the UI sends the user to its login page and shows no run
        d.get(f"{ui}/runs")
        wait_text(d, "Login", shot="prefect-login")
        assert "/login" in d.current_url and "grpo-pipeline" not in page_text(d)
        box = d.find_element(By.CSS_SELECTOR, "input[type=password]")
        box.send_keys(run.stack.client_env()["PREFECT_API_AUTH_STRING"], Keys.ENTER)
        wait_text(d, "Runs", shot="prefect-after-login")
        d.get(f"{ui}/runs/flow-run/{run.flow_run_id}")
        wait_text(d, "grpo-pipeline", "Completed", f"{len(STAGES)} Task runs", shot="prefect-flow-run")
        click(d, "li.p-tab#task-runs", "Task Runs tab")
        text = wait_text(d, *(f"{name}-" for name in STAGES), shot="prefect-task-runs")
        assert text.count("Completed") >= len(STAGES)
        click(d, "li.p-tab#artifacts", "Artifacts tab")
        wait_text(d, "grpo-pipeline-summary", shot="prefect-artifacts")
        d.get(f"{ui}/artifacts/artifact/{summary['id']}")
        wait_text(d, "GRPO pipeline run: completed", "Held-out evaluation", shot="prefect-summary")
