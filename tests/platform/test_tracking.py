"""MLflow tracking: URI resolution, artifact locations, parent/nested runs with their params, system metrics,
and the stages' logging + registration against the local SQLite store and a real `mlflow server`."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from grpo_steps.platform import tracking
from grpo_steps.stages import STAGES
from tests.support.project import (
    load_tiny,
    mlflow_server,
    write_metrics,
)


def _runs(client: MlflowClient, cfg) -> list:
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return client.search_runs([exp.experiment_id])


def test_environment_variable_overrides_params(workdir, monkeypatch, caplog):
    cfg = load_tiny(workdir)
    assert tracking.tracking_uri(cfg) == cfg.tracking.tracking_uri
    other = f"sqlite:///{workdir}/other.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    with caplog.at_level(logging.INFO, logger="grpo_steps.platform.tracking"):
        assert tracking.tracking_uri(cfg) == other
    assert "MLFLOW_TRACKING_URI" in caplog.text and "overrides" in caplog.text
    tracking._set_tracking_uri(other)
    assert mlflow.get_tracking_uri() == other and os.environ["MLFLOW_TRACKING_URI"] == other

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri(cfg) == cfg.tracking.tracking_uri
    tracking._set_tracking_uri(cfg.tracking.tracking_uri)
    assert mlflow.get_tracking_uri() == cfg.tracking.tracking_uri
    # mlflow.set_tracking_uri exports the variable; it is put back, so it cannot pose as the user's override
    # for the next configuration in this process (or in `grpo run` subprocesses)
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_artifact_locations(workdir):
    for uri in ("mlflow-artifacts:/grpo", "mlflow-artifacts:///grpo", "s3://bucket/prefix", "file:///tmp/x",
                "gs://b/p", "dbfs:/x"):
        assert tracking.is_uri(uri), uri
    for path in ("mlartifacts", "./a/b", "/abs/path", "C:\\mlflow\\artifacts", "C:/x"):
        assert not tracking.is_uri(path), path

    local = load_tiny(workdir)  # a relative folder: absolute, under the working directory
    assert tracking.artifact_location(local, local.tracking.tracking_uri) == str(workdir / "mlartifacts")
    assert tracking.artifact_location(local, "http://127.0.0.1:5000") is None  # a server: its own default
    absolute = load_tiny(workdir, f"tracking.artifact_location={workdir}/arts")
    assert tracking.artifact_location(absolute, "http://127.0.0.1:5000") == f"{workdir}/arts"
    server_form = load_tiny(workdir, "tracking.artifact_location=mlflow-artifacts:/grpo")
    assert tracking.artifact_location(server_form, "sqlite:///x.db") == "mlflow-artifacts:/grpo"
    assert tracking.artifact_location(load_tiny(workdir, "tracking.artifact_location=null"), "x") is None

    exp_id = tracking.setup(server_form)  # the server form is kept verbatim, not made into ./mlflow-artifacts:
    assert mlflow.get_experiment(exp_id).artifact_location == "mlflow-artifacts:/grpo"
    assert not (workdir / "mlflow-artifacts:").exists()


def test_parent_run_nests_stage_runs_with_their_own_params_and_system_metrics(workdir):
    cfg = load_tiny(workdir, "tracking.system_metrics=true", "tracking.system_metrics_interval_s=0.2")
    with tracking.pipeline_run(cfg) as parent_id:
        with tracking.stage_run(cfg, "grpo", parent_id, STAGES["grpo"].params) as run:
            mlflow.log_metric("reward", 1.0, step=1)
            grpo_id = run.info.run_id
        other: dict = {}

        def in_another_thread():  # as a stage run by a worker thread: no active run there
            with tracking.stage_run(cfg, "evaluate", parent_id, STAGES["evaluate"].params) as r:
                other["id"] = r.info.run_id

        t = threading.Thread(target=in_another_thread)
        t.start()
        t.join()
        client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
        assert client.get_run(parent_id).info.status == "RUNNING"  # the other thread did not end the parent
        time.sleep(1.0)
    assert "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL" not in os.environ

    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["grpo.beta"] == str(cfg.grpo.beta) and "sft.max_steps" in parent.data.params
    assert any(k.startswith("system/cpu_utilization") for k in parent.data.metrics), parent.data.metrics
    for run_id, stage, own, foreign in ((grpo_id, "grpo", "grpo.num_generations", "sft.max_steps"),
                                        (other["id"], "evaluate", "evaluate.pass_k", "reward_model.epochs")):
        child = client.get_run(run_id)
        assert child.data.tags["mlflow.parentRunId"] == parent_id and child.data.tags["stage"] == stage
        assert own in child.data.params and foreign not in child.data.params
        assert child.data.tags["params_hash"] == cfg.params_hash()
        assert not any(k.startswith("system/") for k in child.data.metrics)
    assert client.get_run(grpo_id).data.params["seed"] == str(cfg.seed)


def test_system_metrics_can_be_switched_off(workdir):
    cfg = load_tiny(workdir, "tracking.system_metrics=false", "tracking.system_metrics_interval_s=0.1")
    with tracking.pipeline_run(cfg) as parent_id:
        time.sleep(0.5)
    metrics = MlflowClient(tracking_uri=cfg.tracking.tracking_uri).get_run(parent_id).data.metrics
    assert not any(k.startswith("system/") for k in metrics)


def _pipeline_logging_and_registration(cfg, client: MlflowClient) -> tuple[str, dict]:
    """evaluate + register inside a parent run, through whatever store `cfg` points at; checks via `client`."""
    from tests.support.stages import evaluate, register

    with tracking.pipeline_run(cfg) as parent_id:
        evaluate(cfg, parent_run_id=parent_id)
        reg = register(cfg, parent_run_id=parent_id)

    runs = {r.data.tags.get("stage", r.data.tags.get("mlflow.runName")): r for r in _runs(client, cfg)}
    assert {"pipeline", "evaluate", "register"} <= set(runs)
    assert runs["evaluate"].data.tags["mlflow.parentRunId"] == parent_id
    assert runs["register"].data.tags["mlflow.parentRunId"] == parent_id
    ev = runs["evaluate"]
    assert "eval/grpo/accuracy" in ev.data.metrics and "eval/start/accuracy" in ev.data.metrics
    assert "evaluate.pass_k" in ev.data.params and "grpo.max_completion_length" in ev.data.params
    assert {"metrics.json", "eval.png", "samples.jsonl", "samples.json"} <= {
        a.path for a in client.list_artifacts(ev.info.run_id)}
    local = Path(client.download_artifacts(ev.info.run_id, "metrics.json", dst_path=str(Path.cwd() / "dl")))
    assert '"grpo"' in local.read_text()
    assert "registration.json" in {a.path for a in client.list_artifacts(runs["register"].info.run_id)}

    mv = client.get_model_version(reg["model_name"], reg["version"])
    assert str(client.get_model_version_by_alias(reg["model_name"], "champion").version) == str(mv.version)
    for tag in ("git_commit", "params_hash", "mlflow_run_id", "prefect_flow_run_id", "mlflow_pipeline_run_id",
                "policy_md5", "data_md5/test.jsonl", "eval_accuracy", "gate_decision"):
        assert tag in mv.tags, tag
    assert mv.tags["mlflow_pipeline_run_id"] == parent_id
    assert mv.tags["mlflow_run_id"] == runs["register"].info.run_id
    assert "Held-out accuracy" in mv.description and "Alias `champion`" in mv.description
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development", "opens as model training, not GenAI"
    return parent_id, reg


def test_stage_logging_and_registration_on_the_local_sqlite_store(project):
    cfg = load_tiny(project)
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    _pipeline_logging_and_registration(cfg, client)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    assert exp.artifact_location == str(project / "mlartifacts")  # the default, made absolute
    assert any((project / "mlartifacts").rglob("metrics.json"))


@pytest.fixture
def server(tmp_path):
    with mlflow_server(tmp_path / "server") as url:
        yield url, tmp_path / "server"


@pytest.mark.slow
def test_stage_logging_and_registration_through_a_tracking_server(project, server):
    import torch

    url, root = server
    cfg = load_tiny(project, f"tracking.tracking_uri={url}", "tracking.artifact_location=mlflow-artifacts:/grpo-test",
                    "tracking.system_metrics=true", "tracking.system_metrics_interval_s=0.5")
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    parent_id, reg = _pipeline_logging_and_registration(cfg, client)

    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    assert exp.artifact_location == "mlflow-artifacts:/grpo-test"
    # artifacts went through the server into its --artifacts-destination, nothing into the project folder
    assert any((root / "artifacts" / "grpo-test").rglob("eval.png"))
    assert not (project / "mlartifacts").exists()
    assert any(k.startswith("system/") for k in client.get_run(parent_id).data.metrics)

    # the registered version loads back from the server and generates
    mlflow.set_tracking_uri(url)
    components = mlflow.transformers.load_model(f"models:/{reg['model_name']}@champion", return_type="components")
    tok = components["tokenizer"]
    enc = tok(["3+4="], return_tensors="pt")
    with torch.no_grad():
        out = components["model"].generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > enc["input_ids"].shape[1]

    # the same policy again, through the server: no second version
    write_metrics(cfg, accuracy=0.5)
    from tests.support.stages import register

    assert register(cfg)["version"] == reg["version"]
    assert len(client.search_model_versions(f"name='{reg['model_name']}'")) == 1
