"""The stages as `grpo <stage>` and the flow run them: through their records (grpo_steps/platform/stage.py), inside
their MLflow runs, returning their values and raising the errors their outcomes carry.

Tests call these rather than the bare stage functions (which return a `StageResult` and log nothing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from grpo_steps.platform.config import Config
from grpo_steps.platform.stage import Stage
from grpo_steps.stages import run_stage


@dataclasses.dataclass(frozen=True)
class StandIn(Stage):
    """A stage's record whose call is `fake` (called as the flow calls a record): the flow's own tests run the
    real flow, its retries, cache and reports, around stand-in stages."""

    fake: Callable[..., Any] | None = None

    def __call__(self, cfg: Config, **kwargs: Any) -> Any:
        return self.fake(cfg, **kwargs)


def stand_in(stage: Stage, fake: Callable[..., Any]) -> StandIn:
    """`stage`'s record (name, outputs, retries, cache options) with `fake` in place of its run."""
    return StandIn(**{f.name: getattr(stage, f.name) for f in dataclasses.fields(Stage)}, fake=fake)


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
