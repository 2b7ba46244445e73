"""Which reward decides whether an answer is right: the one accuracy judge of evaluation and of preference
pairs sampled from the policy (`evaluate.accuracy`; auto: `math_accuracy` when GRPO's reward functions list it,
with its kwargs, else `exact_match`)."""

from __future__ import annotations

from grpo_steps.grpo.rewards import RewardFunction, resolve_reward_function
from grpo_steps.platform.config import Config


def accuracy_judge(cfg: Config) -> RewardFunction:
    """The accuracy reward evaluation judges answers with (`evaluate.accuracy`; auto: GRPO's own)."""
    name = cfg.evaluate.accuracy
    if name == "auto":
        listed = {rf.name for rf in cfg.grpo.reward_functions}
        name = "math_accuracy" if "math_accuracy" in listed else "exact_match"
    kwargs = next((rf.kwargs for rf in cfg.grpo.reward_functions if rf.name == name), {})
    return resolve_reward_function(name, kwargs)
