"""The stages as `grpo <stage>` and the flow run them: through their records (grpo_steps/stages.py), inside
their MLflow runs, returning their values and raising the errors their outcomes carry.

Tests call these rather than the bare stage functions (which return a `StageResult` and log nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from grpo_steps.config import Config
from grpo_steps.stages import run_stage


def _through_record(name: str) -> Callable[..., Any]:
    def run(cfg: Config, **kwargs: Any) -> Any:
        return run_stage(name, cfg, **kwargs)

    run.__name__ = name
    return run


prepare = _through_record("prepare")
validate = _through_record("validate")
sft = _through_record("sft")
train_reward = _through_record("train_reward")
train_grpo = _through_record("grpo")
evaluate = _through_record("evaluate")
register = _through_record("register")
