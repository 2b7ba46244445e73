"""Stage `register`: the evaluated GRPO policy becomes an MLflow model version behind a promotion gate.

Alias `champion` moves to the new version only when its held-out accuracy beats the current champion's by
`register.promotion_margin` (or there is no champion yet); otherwise the version gets alias `challenger`.
Every version carries its metrics, the gate decision and its lineage as tags. Registering the same policy
weights twice returns the existing version instead of creating another.
"""

from __future__ import annotations

import logging
from typing import Any

import mlflow
from mlflow import MlflowClient

from grpo_steps.data.files import read_json
from grpo_steps.platform.config import Config
from grpo_steps.platform.io import write_json
from grpo_steps.platform.lineage import file_md5, lineage_tags
from grpo_steps.platform.results import Artifact, StageResult
from grpo_steps.platform.tracking import active_run_ids

log = logging.getLogger(__name__)


def model_card(cfg: Config, metrics: dict[str, Any], policy_md5: str):
    """The registered model's card (model_card.md beside its weights): what it is and what it scored."""
    from huggingface_hub import ModelCard  # deferred: the hub client

    start, grpo = metrics["start"]["accuracy"], metrics["grpo"]["accuracy"]
    return ModelCard(  # the metadata block: without one the hub client warns that it found none
        "---\nlibrary_name: transformers\ntags:\n- grpo\n- grpo-pipeline\n---\n\n"
        f"# {cfg.registry.model_name}\n\nA policy fine-tuned with GRPO by grpo-pipeline from "
        f"{cfg.model.pretrained or 'a policy built from params.yaml model settings'}. Held-out accuracy "
        f"{start:.4f} before GRPO, {grpo:.4f} after, on {metrics.get('n_test')} test prompts. Weights md5 "
        f"{policy_md5}; params hash {cfg.params_hash()}.\n")


def _champion_accuracy(
    client: MlflowClient, name: str, metrics: dict[str, Any] | None = None
) -> tuple[str | None, float | None, str]:
    """The champion's version and held-out accuracy, and where that accuracy comes from.

    Preferred: the evaluate stage's measurement of that same version on this test split (metrics.json
    `champion`); otherwise the accuracy recorded on the version when it was registered.
    """
    try:
        mv = client.get_model_version_by_alias(name, "champion")
    except mlflow.exceptions.MlflowException:
        return None, None, "none"
    metrics = metrics or {}
    if str(metrics.get("champion_version")) == str(mv.version) and "accuracy" in (metrics.get("champion") or {}):
        return str(mv.version), float(metrics["champion"]["accuracy"]), "same_test_split"
    acc = mv.tags.get("eval_accuracy")
    return str(mv.version), float(acc) if acc is not None else None, "version_tag"


def promotion_decision(new_acc: float, champion_acc: float | None, margin: float) -> str:
    """'champion' when there is none yet or the new accuracy beats it by more than the margin."""
    if champion_acc is None or new_acc > champion_acc + margin:
        return "champion"
    return "challenger"


def version_description(cfg: Config, metrics: dict[str, Any], decision: str, champion_version: str | None,
                        champion_accuracy: float | None) -> str:
    """What a person reads first on the version's page: what it is, from which data, how it scored, and why
    it got its alias."""
    start, grpo = metrics["start"]["accuracy"], metrics["grpo"]["accuracy"]
    source = (f"your files ({cfg.data.train})" if cfg.data.source == "files"
              else f"the embedded {cfg.task.format}-format arithmetic task (seed {cfg.seed})")
    base = cfg.model.pretrained or "a policy built from the `model` config"
    before = ("no champion before" if champion_version is None else
              f"champion before: v{champion_version} at "
              + ("unknown accuracy" if champion_accuracy is None else f"{champion_accuracy:.4f}"))
    return (f"GRPO policy from {base}, trained on {source}. Held-out accuracy {grpo:.4f} on "
            f"{metrics.get('n_test')} test prompts (starting policy {start:.4f}, {100 * (grpo - start):+.1f} points). "
            f"Alias `{decision}`: {before}, promotion margin {cfg.registry.promotion_margin}. "
            f"Params hash {cfg.params_hash()}; lineage in this version's tags.")


def register(cfg: Config) -> StageResult:
    """Runs inside the stage's MLflow run (the wrapper's): the model is logged there and registered."""
    metrics = read_json(cfg.paths.metrics())
    name = cfg.registry.model_name
    new_acc = float(metrics["grpo"]["accuracy"])
    client = MlflowClient()
    run_id, parent_run_id = active_run_ids()
    policy_md5 = file_md5(cfg.paths.weights(cfg.paths.grpo_policy()))
    existing = [mv for mv in client.search_model_versions(f"name='{name}'")
                if mv.tags.get("policy_md5") == policy_md5]
    if existing:
        mv = min(existing, key=lambda v: int(v.version))
        version = str(mv.version)
        aliases = set(client.get_model_version(name, version).aliases or [])
        alias = "champion" if "champion" in aliases else mv.tags.get("gate_decision")
        log.info("this policy (md5 %s) is already registered as %s v%s", policy_md5, name, version)
        # the run that registered the version, not this one: a rerun with nothing new writes the same bytes,
        # so dvc.lock (which records this file) stays as it was
        result = {"model_name": name, "version": version, "alias": alias, "accuracy": new_acc,
                  "model_uri": f"models:/{name}/{version}", "already_registered": True,
                  "mlflow_run_id": mv.tags.get("mlflow_run_id") or mv.run_id}
        write_json(cfg.paths.registration(), result)
        return StageResult(result, tags={"registered_model": name, "registered_version": version,
                                         "already_registered": "true"})
    # an already-registered policy (a rerun with nothing new) needs none of these (seconds of imports)
    import torch
    import transformers

    from grpo_steps.platform.modeling import load_policy, load_tokenizer  # deferred: torch, transformers

    tok = load_tokenizer(cfg.paths.grpo_policy())
    model = load_policy(cfg.paths.grpo_policy(), cfg.model.trust_remote_code, cfg.model.dtype)
    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tok},
        name="policy",
        task="text-generation",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}"],
        registered_model_name=name,
        model_card=model_card(cfg, metrics, policy_md5),  # ours: MLflow would look for one on the hub
    )
    version = str(info.registered_model_version)
    champ_version, champ_acc, champ_source = _champion_accuracy(client, name, metrics)
    decision = promotion_decision(new_acc, champ_acc, cfg.registry.promotion_margin)
    tags = {
        "eval_accuracy": f"{new_acc:.6f}",
        "eval_start_accuracy": f"{metrics['start']['accuracy']:.6f}",
        "eval_accuracy_gain": f"{metrics['accuracy_gain']:.6f}",
        "eval_n_test": str(metrics.get("n_test")),
        **{f"eval_grpo/{k}": f"{v:.6f}" for k, v in metrics["grpo"].items() if isinstance(v, int | float)},
        "gate_decision": decision,
        "gate_champion_version": str(champ_version),
        "gate_champion_accuracy": "none" if champ_acc is None else f"{champ_acc:.6f}",
        "gate_champion_accuracy_source": champ_source,
        "gate_margin": str(cfg.registry.promotion_margin),
        "policy_md5": policy_md5,
        **lineage_tags(cfg, run_id, parent_run_id),
    }
    if metrics.get("reward_hacking_warning"):
        tags["eval_reward_hacking_warning"] = str(metrics["reward_hacking_warning"])
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    client.update_model_version(name, version, description=version_description(cfg, metrics, decision,
                                                                                champ_version, champ_acc))
    client.set_registered_model_alias(name, decision, version)
    result = {"model_name": name, "version": version, "alias": decision, "accuracy": new_acc,
              "champion_version_before": champ_version, "champion_accuracy_before": champ_acc,
              "champion_accuracy_source": champ_source, "promotion_margin": cfg.registry.promotion_margin,
              "model_uri": f"models:/{name}/{version}", "mlflow_run_id": run_id}
    write_json(cfg.paths.registration(), result)
    log.info("registered %s v%s as %s (accuracy %.4f, champion before: %s)", name, version, decision, new_acc,
             champ_acc)
    return StageResult(
        result,
        metrics={"register/accuracy": new_acc, "register/promoted": float(decision == "champion")},
        tags={"registered_model": name, "registered_version": version, "gate_decision": decision},
        artifacts=[Artifact(cfg.paths.registration())],
    )
