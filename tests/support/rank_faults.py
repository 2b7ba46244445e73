"""Faults on one rank of a launched job, as reward functions named in params.yaml (`module:function`): the test of
how a failure on any rank fails the stage (tests/platform/test_distributed.py)."""

from __future__ import annotations

import os
from typing import Any

from grpo_steps.platform.config import ConfigError


def crash_on_rank_1(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """Scores 0, except on rank 1, where it raises a programming error (a retry could not fix it either)."""
    if os.environ.get("RANK") == "1":
        raise ZeroDivisionError("rank 1 divided by zero while scoring")
    return [0.0] * len(completions)


def bad_data_on_rank_1(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """Scores 0, except on rank 1, where it raises an error the user must fix."""
    if os.environ.get("RANK") == "1":
        raise ConfigError("rank 1 found a reward it cannot read")
    return [0.0] * len(completions)
