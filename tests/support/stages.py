"""The stages as `grpo <stage>` and the flow run them: through their records (grpo_steps/stages.py), inside
their MLflow runs, returning their values and raising the errors their outcomes carry.

Tests call these rather than the bare stage functions (which return a `StageResult` and log nothing).
"""

from __future__ import annotations

from typing import Any

from grpo_steps.config import Config
from grpo_steps.stages import run_stage


def prepare(cfg: Config, **kwargs: Any) -> Any:
    return run_stage("prepare", cfg, **kwargs)


def validate(cfg: Config, **kwargs: Any) -> Any:
    return run_stage("validate", cfg, **kwargs)


def sft(cfg: Config, **kwargs: Any) -> Any:
    return run_stage("sft", cfg, **kwargs)


def train_reward(cfg: Config, **kwargs: Any) -> Any:
    return run_stage("train_reward", cfg, **kwargs)


def train_grpo(cfg: Config, **kwargs: Any) -> Any:
    return run_stage("grpo", cfg, **kwargs)


def evaluate(cfg: Config, **kwargs: Any) -> Any:
    return run_stage("evaluate", cfg, **kwargs)


def register(cfg: Config, **kwargs: Any) -> Any:
    return run_stage("register", cfg, **kwargs)
