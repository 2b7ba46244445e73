"""The register stage: champion/challenger gate, idempotent registration, lineage tags, loadable versions."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from grpo_steps.platform.lineage import file_md5
from grpo_steps.stages.register import promotion_decision
from tests.support.project import load_tiny, perturb_policy, write_metrics
from tests.support.stages import register


def _client(cfg) -> MlflowClient:
    return MlflowClient(tracking_uri=cfg.tracking.tracking_uri, registry_uri=cfg.tracking.tracking_uri)


def test_promotion_decision():
    assert promotion_decision(0.3, None, 0.05) == "champion"  # nothing to beat
    assert promotion_decision(0.6, 0.5, 0.05) == "champion"
    assert promotion_decision(0.55, 0.5, 0.05) == "challenger"  # not by more than the margin
    assert promotion_decision(0.4, 0.5, 0.0) == "challenger"
    assert promotion_decision(0.5, 0.5, 0.0) == "challenger"  # a tie does not move the champion


def test_champion_moves_only_when_beaten_by_the_margin(project):
    cfg = load_tiny(project, "registry.promotion_margin=0.05")
    client = _client(cfg)
    name = cfg.registry.model_name

    write_metrics(cfg, accuracy=0.50)
    first = register(cfg)
    assert (first["version"], first["alias"]) == ("1", "champion")  # the first version: no champion yet
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"

    perturb_policy(cfg.paths.grpo_policy(), 0.01)
    write_metrics(cfg, accuracy=0.40)  # worse
    second = register(cfg)
    assert (second["version"], second["alias"]) == ("2", "challenger")
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"
    assert client.get_model_version(name, "2").tags["gate_decision"] == "challenger"

    perturb_policy(cfg.paths.grpo_policy(), 0.01)
    write_metrics(cfg, accuracy=0.54)  # better, but not by more than the margin
    third = register(cfg)
    assert (third["version"], third["alias"]) == ("3", "challenger")
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"

    perturb_policy(cfg.paths.grpo_policy(), 0.01)
    write_metrics(cfg, accuracy=0.60)  # better by more than the margin: takes the champion alias
    fourth = register(cfg)
    assert (fourth["version"], fourth["alias"]) == ("4", "champion")
    assert str(client.get_model_version_by_alias(name, "champion").version) == "4"
    tags = client.get_model_version(name, "4").tags
    assert tags["gate_champion_version"] == "1" and float(tags["gate_champion_accuracy"]) == pytest.approx(0.5)
    assert float(tags["eval_accuracy"]) == pytest.approx(0.6) and tags["gate_margin"] == "0.05"

    # the same weights again: the existing version, no new one
    again = register(cfg)
    assert again["version"] == "4" and again["already_registered"] and again["alias"] == "champion"
    assert len(client.search_model_versions(f"name='{name}'")) == 4
    # ... naming the run that registered it: a rerun with nothing new rewrites the same bytes (dvc.lock unchanged)
    assert again["mlflow_run_id"] == fourth["mlflow_run_id"]
    written = cfg.paths.registration().read_bytes()
    register(cfg)
    assert cfg.paths.registration().read_bytes() == written


def test_gate_prefers_the_champion_measured_on_the_same_test_split(project):
    cfg = load_tiny(project)
    client = _client(cfg)
    write_metrics(cfg, accuracy=0.50)
    register(cfg)  # v1 champion, registered with accuracy 0.50 on its own evaluation
    perturb_policy(cfg.paths.grpo_policy(), 0.02)
    # re-measured on this test split by `evaluate`, the champion reaches only 0.30: 0.40 beats it
    write_metrics(cfg, accuracy=0.40, champion={"accuracy": 0.30}, champion_version="1")
    result = register(cfg)
    assert result["alias"] == "champion" and result["champion_accuracy_source"] == "same_test_split"
    tags = client.get_model_version(cfg.registry.model_name, result["version"]).tags
    assert tags["gate_champion_accuracy_source"] == "same_test_split"


def test_every_version_carries_its_lineage(project):
    (project / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  validate:\n    cmd: grpo validate\n    outs:\n"
        "    - path: data/validated\n      hash: md5\n      md5: 0123456789abcdef0123456789abcdef.dir\n"
        "      size: 1\n      nfiles: 5\n  sft:\n    cmd: grpo sft\n    outs:\n    - path: models/sft\n"
        "      hash: md5\n      md5: fedcba9876543210fedcba9876543210.dir\n"
    )
    cfg = load_tiny(project)
    write_metrics(cfg, accuracy=0.5)
    result = register(cfg)
    tags = _client(cfg).get_model_version(cfg.registry.model_name, result["version"]).tags

    for key in ("git_commit", "params_hash", "mlflow_run_id", "prefect_flow_run_id", "policy_md5",
                "reward_model_md5", "start_policy_md5", "eval_accuracy", "gate_decision"):
        assert tags.get(key), key
    assert tags["params_hash"] == cfg.params_hash()
    assert tags["mlflow_run_id"] == result["mlflow_run_id"]
    assert _client(cfg).get_run(tags["mlflow_run_id"]).data.tags["stage"] == "register"
    validated = sorted(cfg.paths.validated().glob("*.jsonl"))
    assert validated
    for path in validated:
        assert tags[f"data_md5/{path.name}"] == file_md5(path)
    assert tags["dvc_lock/data/validated"] == "0123456789abcdef0123456789abcdef.dir"
    assert tags["dvc_lock/models/sft"] == "fedcba9876543210fedcba9876543210.dir"
    assert tags["policy_md5"] == file_md5(cfg.paths.grpo_policy() / "model.safetensors")


def test_registered_version_loads_back_and_generates(project, caplog):
    import logging

    import mlflow
    import torch

    cfg = load_tiny(project)
    write_metrics(cfg, accuracy=0.5)
    with caplog.at_level(logging.WARNING):
        result = register(cfg)
    assert "model card could not be retrieved" not in caplog.text  # ours: no trip to the hub, no warning
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    card = Path(mlflow.artifacts.download_artifacts(f"{result['model_uri']}/model_card.md"))
    assert "Held-out accuracy" in card.read_text() and "after, on" in card.read_text()

    components = mlflow.transformers.load_model(result["model_uri"], return_type="components")
    model, tok = components["model"], components["tokenizer"]
    enc = tok(["12+34="], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == enc["input_ids"].shape[1] + 3 or out[0, -1].item() == tok.eos_token_id
    assert isinstance(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True), str)

    # the alias resolves too, as a ready text-generation pipeline
    pipe = mlflow.transformers.load_model(f"models:/{cfg.registry.model_name}@champion")
    generated = pipe("12+34=", max_new_tokens=3, do_sample=False)
    assert generated[0]["generated_text"].startswith("12+34=")
