"""Stage `train_reward`: a Bradley-Terry reward model (TRL RewardTrainer) on the preference pairs.

The model is a sequence-classification head (one output) on a backbone: by default a fresh one built from
the `model` section, or `reward_model.backbone` (a local folder or hub name, safetensors only). The loss is
`-log sigmoid(r_chosen - r_rejected - margin)`, with the margin a constant (`reward_model.margin`) or a
per-pair column (`reward_model.margin_column`), plus optional reward centering.

Its held-out pairwise accuracy is the gate: below `reward_model.min_pairwise_accuracy` the pipeline stops
before GRPO, since optimising against a reward model that cannot rank is optimising noise.
"""

from __future__ import annotations

import logging
import math
import shutil
from typing import Any

import mlflow
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase
from trl import RewardConfig, RewardTrainer

from grpo_steps.config import Config
from grpo_steps.grpo.reward_model import RewardModelFunction
from grpo_steps.io import DataFileError, atomic_path, read_jsonl, write_json
from grpo_steps.modeling import build_reward_backbone, load_tokenizer, seed_everything
from grpo_steps.tracking import stage_run

log = logging.getLogger(__name__)


class RewardGateError(RuntimeError):
    """The reward model ranks held-out pairs too poorly to train a policy against."""


def pairwise_accuracy(scorer: RewardModelFunction, pairs: list[dict]) -> float:
    prompts = [p["prompt"] for p in pairs]
    chosen = scorer(prompts, [p["chosen"] for p in pairs])
    rejected = scorer(prompts, [p["rejected"] for p in pairs])
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / max(len(pairs), 1)


def trust_remote_code(cfg: Config) -> bool:
    return cfg.reward_trust_remote_code()


def build_reward_model(cfg: Config) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The untrained reward model and the tokenizer it reads text with."""
    backbone = cfg.reward_model.backbone
    if backbone is None:  # built from the `model` section, on the project's tokenizer
        tok = load_tokenizer(cfg.paths.tokenizer())
        return build_reward_backbone(cfg.model, tok), tok
    trust = trust_remote_code(cfg)
    try:
        tok = load_tokenizer(backbone, trust_remote_code=trust, allow_hub=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            backbone, num_labels=1, use_safetensors=True, trust_remote_code=trust, dtype=torch.float32
        )
    except (OSError, ValueError) as e:
        raise RuntimeError(
            f"could not load the reward-model backbone reward_model.backbone={backbone!r} (a local folder or hub "
            f"name with safetensors weights and a tokenizer): {e}"
        ) from e
    if model.config.pad_token_id is None:  # the head pools the last non-pad token: it must know the pad id
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def _margins(pairs: list[dict[str, Any]], cfg: Config, source: str) -> list[float] | None:
    rc = cfg.reward_model
    if rc.margin is not None:
        return [float(rc.margin)] * len(pairs)
    if rc.margin_column is None:
        return None
    col, out = rc.margin_column, []
    for i, p in enumerate(pairs, start=1):
        if col not in p:
            raise DataFileError(
                f"{source}:{i}: reward_model.margin_column={col!r} but the pair has no such column "
                f"(columns: {sorted(p)}); keep the column through prepare/validate or unset margin_column"
            )
        value = p[col]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise DataFileError(f"{source}:{i}: margin {col!r} must be a finite number, got {value!r}")
        out.append(float(value))
    return out


def pairs_dataset(pairs: list[dict[str, Any]], cfg: Config, source: str = "preferences_train.jsonl") -> Dataset:
    """prompt/chosen/rejected (+ `margin`, which RewardTrainer subtracts inside the Bradley-Terry loss)."""
    rows = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs]
    margins = _margins(pairs, cfg, source)
    if margins is not None:
        for row, m in zip(rows, margins, strict=True):
            row["margin"] = m
    return Dataset.from_list(rows)


def train_reward(cfg: Config) -> dict[str, Any]:
    seed_everything(cfg.seed)
    data = cfg.paths.validated()
    train_pairs = read_jsonl(data / "preferences_train.jsonl")
    eval_pairs = read_jsonl(data / "preferences_eval.jsonl")
    train_dataset = pairs_dataset(train_pairs, cfg, str(data / "preferences_train.jsonl"))
    model, tok = build_reward_model(cfg)
    rc = cfg.reward_model
    # Pairs were bounded in tokens of the project's tokenizer by `validate`; another backbone's tokenizer
    # counts differently, so there nothing is filtered out.
    max_length = cfg.validate_.max_prompt_tokens + cfg.validate_.completion_tokens() + 2
    out = cfg.paths.reward_model()
    reports = cfg.paths.reports()
    with stage_run(cfg, "train_reward"), atomic_path(out) as tmp:
        args = RewardConfig(
            output_dir=str(tmp / "_trainer"),
            num_train_epochs=rc.epochs,
            per_device_train_batch_size=rc.batch_size,
            learning_rate=rc.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=0.05,
            center_rewards_coefficient=rc.center_rewards_coefficient,
            max_length=max_length if rc.backbone is None else None,
            logging_steps=10,
            save_strategy="no",
            report_to=["mlflow"],
            seed=cfg.seed,
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
            disable_tqdm=False,
        )
        trainer = RewardTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tok)
        trainer.train()
        scorer = RewardModelFunction(trainer.model, tok)
        acc = pairwise_accuracy(scorer, eval_pairs)
        passed = acc >= rc.min_pairwise_accuracy
        metrics = {
            "pairwise_accuracy": acc,
            "n_train_pairs": len(train_pairs),
            "n_eval_pairs": len(eval_pairs),
            "min_pairwise_accuracy": rc.min_pairwise_accuracy,
            "gate_passed": passed,
        }
        mlflow.log_metrics({"reward_model/pairwise_accuracy": acc, "reward_model/gate_passed": float(passed)})
        mlflow.set_tags({"reward_gate": "passed" if passed else "failed",
                         "reward_backbone": rc.backbone or "model-config"})
        trainer.model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        shutil.rmtree(tmp / "_trainer", ignore_errors=True)
        write_json(reports / "reward_model.json", metrics)
        mlflow.log_artifact(str(reports / "reward_model.json"))
    log.info("reward model: held-out pairwise accuracy %.3f (gate %.3f)", acc, rc.min_pairwise_accuracy)
    if not passed:
        raise RewardGateError(
            f"reward model held-out pairwise accuracy {acc:.3f} is below the gate "
            f"reward_model.min_pairwise_accuracy={rc.min_pairwise_accuracy}; stopping before GRPO "
            f"(not training a policy against it). Improve the reward model or its data, or lower the gate."
        )
    return metrics
