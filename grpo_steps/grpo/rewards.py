"""Reward functions and their weighted sum.

The interface is a plain callable, the one TRL users know:
    f(prompts: list[str], completions: list[str], **dataset_columns) -> list[float | None]
`None` means "no opinion on this completion" (e.g. a rule that does not apply); it is excluded from that
function's statistics and from the weighted sum. A completion on which every function abstains gets no
advantage at all (see advantages.py).
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from grpo_steps.grpo.verifiable import FormatReward, MathAccuracy, OverlongPenalty

RewardFunction = Callable[..., list[float | None]]

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def exact_match(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float | None]:
    """1.0 when the completion is exactly the answer (surrounding whitespace ignored), else 0.0."""
    return [1.0 if c.strip() == str(a).strip() else 0.0 for c, a in zip(completions, answer, strict=True)]


def number_format(prompts: list[str], completions: list[str], **_: Any) -> list[float | None]:
    """0.1 for a completion that is a single number, the format the task asks for; a shaping reward."""
    return [0.1 if _NUMBER.fullmatch(c.strip() or "x") else 0.0 for c in completions]


def digit_match(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float | None]:
    """Partial credit: the fraction of the answer's characters matched position by position from the right
    (units against units), divided by the longer length so extra or missing digits cost. 1.0 iff exact."""
    out: list[float | None] = []
    for c, a in zip(completions, answer, strict=True):
        c, a = c.strip(), str(a).strip()
        if not c or not a:
            out.append(0.0)
            continue
        hits = sum(x == y for x, y in zip(reversed(c), reversed(a), strict=False))
        out.append(hits / max(len(c), len(a)))
    return out


BUILTIN: dict[str, RewardFunction] = {
    "exact_match": exact_match,
    "digit_match": digit_match,
    "number_format": number_format,
}


# Built-in rewards built from keyword arguments (`grpo.reward_functions[i].kwargs`; each has defaults).
FACTORIES: dict[str, Callable[..., RewardFunction]] = {
    "math_accuracy": MathAccuracy,
    "format": FormatReward,
    "overlong_penalty": OverlongPenalty,
}


def import_reward_function(path: str) -> RewardFunction:
    """Load `package.module:function` named in params.yaml; only configured paths are ever imported."""
    if ":" not in path:
        raise ValueError(f"reward function {path!r}: use a built-in name "
                         f"{sorted([*BUILTIN, *FACTORIES])} or 'module:function'")
    module_name, attr = path.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward function {path!r} could not be imported: {e}") from e
    if not callable(fn):
        raise ValueError(f"reward function {path!r} is not callable")
    return fn


def resolve_reward_function(name: str, kwargs: dict[str, Any] | None = None) -> RewardFunction:
    """A built-in reward function by name, else the `module:function` named in params.yaml.

    With `kwargs`, the named object is a factory called with them (the built-ins `math_accuracy`, `format`,
    `overlong_penalty`, or a class of your own); without, it is the reward function itself.
    """
    kwargs = kwargs or {}
    if name in FACTORIES:
        factory = FACTORIES[name]
    elif name in BUILTIN:
        if kwargs:
            raise ValueError(f"reward function {name!r} takes no kwargs (got {sorted(kwargs)})")
        return BUILTIN[name]
    else:
        factory = import_reward_function(name)
        if not kwargs:
            return factory
    try:
        return factory(**kwargs)
    except TypeError as e:
        raise ValueError(f"reward function {name!r}: bad kwargs {kwargs}: {e}") from None


def function_name(fn: RewardFunction) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def score_completions(
    funcs: Sequence[RewardFunction],
    weights: Sequence[float],
    prompts: list[str],
    completions: list[str],
    columns: dict[str, list[Any]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (per-function rewards (N, F) with NaN for None, weighted total (N,) with NaN where all abstain)."""
    n = len(completions)
    per_func = torch.full((n, len(funcs)), float("nan"))
    for j, fn in enumerate(funcs):
        values = fn(prompts=prompts, completions=completions, **columns)
        if len(values) != n:
            raise ValueError(f"reward function {function_name(fn)} returned {len(values)} values for {n} completions")
        per_func[:, j] = torch.tensor([math.nan if v is None else float(v) for v in values])
    w = torch.tensor(list(weights), dtype=per_func.dtype)
    total = torch.nansum(per_func * w, dim=1)
    total[torch.isnan(per_func).all(dim=1)] = float("nan")
    return per_func, total
