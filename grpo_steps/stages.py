"""The pipeline's stages in order: one name, one function each. The CLI, the Prefect flow and dvc.yaml
all run exactly these."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from grpo_steps.config import Config


def _prepare(cfg: Config) -> Any:
    from grpo_steps.prepare import prepare

    return prepare(cfg)


def _validate(cfg: Config) -> Any:
    from grpo_steps.validate import validate

    return validate(cfg)


def _train_reward(cfg: Config) -> Any:
    from grpo_steps.train_reward import train_reward

    return train_reward(cfg)


def _sft(cfg: Config) -> Any:
    from grpo_steps.sft import sft

    return sft(cfg)


def _grpo(cfg: Config) -> Any:
    from grpo_steps.train_grpo import train_grpo

    return train_grpo(cfg)


def _evaluate(cfg: Config) -> Any:
    from grpo_steps.evaluate import evaluate

    return evaluate(cfg)


def _register(cfg: Config) -> Any:
    from grpo_steps.register import register

    return register(cfg)


# Imports are deferred so `grpo --help` and `grpo prepare` do not pay for torch + transformers + mlflow.
STAGES: dict[str, tuple[Callable[[Config], Any], str]] = {
    "prepare": (_prepare, "generate the task's train/eval/test prompts, preference pairs and the tokenizer"),
    "validate": (_validate, "check every prepared file against its pandera schema (all failures listed)"),
    "train_reward": (_train_reward, "train the Bradley-Terry reward model (TRL RewardTrainer) and gate on it"),
    "sft": (_sft, "cold-start the policy with supervised fine-tuning (TRL SFTTrainer)"),
    "grpo": (_grpo, "optimise the policy with GRPO against the weighted reward functions"),
    "evaluate": (_evaluate, "compare the starting and GRPO policies on the held-out test split"),
    "register": (_register, "register the GRPO policy in the MLflow registry behind the promotion gate"),
}
