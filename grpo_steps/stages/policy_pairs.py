"""Preference pairs from the starting policy's own samples (`reward_model.pairs: policy`), as such data is
made in practice: for each prompt, sample `reward_model.samples_per_prompt` completions, judge each with the
accuracy judge (grpo_steps/platform/judge.py), and prefer a verified-right completion over a wrong one of the same
prompt. Prompts the policy gets all right or all wrong give no pair. Train pairs come from the train prompts,
held-out pairs from the eval prompts; the test split stays unseen.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpo_steps.data.prompts import render_all
from grpo_steps.errors import UserError
from grpo_steps.grpo.rewards import RewardFunction
from grpo_steps.grpo.sampling import sample_groups
from grpo_steps.platform.config import Config

log = logging.getLogger(__name__)


class NoPairsError(UserError, RuntimeError):
    """The starting policy's samples gave no (right, wrong) pair to learn from."""


def pairs_from_samples(prompts: list[Any], completions: list[list[str]], correct: list[list[float | None]],
                       per_prompt: int = 1) -> list[dict[str, Any]]:
    """Up to `per_prompt` (prompt, right, wrong) pairs per prompt from its judged samples, distinct
    completions only, in sampling order; kind `policy`."""
    pairs = []
    for prompt, samples, verdicts in zip(prompts, completions, correct, strict=True):
        right = list(dict.fromkeys(c for c, ok in zip(samples, verdicts, strict=True) if ok == 1.0))
        wrong = list(dict.fromkeys(c for c, ok in zip(samples, verdicts, strict=True) if ok is not None and ok < 1.0))
        for chosen, rejected in list(zip(right, wrong, strict=False))[:per_prompt]:
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "kind": "policy"})
    return pairs


@torch.no_grad()
def sample_pairs(cfg: Config, model: PreTrainedModel, tok: PreTrainedTokenizerBase, rows: list[dict[str, Any]],
                 judge: RewardFunction, what: str, batch: int = 256) -> list[dict[str, Any]]:
    """Pairs from `model`'s samples on `rows` (prompt, answer); prompts stay as in the data (the reward model's
    stage renders them as it renders every pair)."""
    rc = cfg.reward_model
    g = rc.samples_per_prompt
    rendered = render_all(tok, [r["prompt"] for r in rows], cfg.data.system_prompt, cfg.data.chat_template)
    per = max(1, batch // g)
    completions: list[list[str]] = []
    for i in range(0, len(rows), per):
        rollout = sample_groups(model, tok, rendered[i : i + per], g, cfg.grpo.max_completion_length, 1.0,
                                backend=cfg.grpo.generation_backend)  # as the grpo stage samples
        completions += [rollout.completions[j : j + g] for j in range(0, len(rollout.completions), g)]
    flat = [c for cs in completions for c in cs]
    verdicts = judge([p for p in rendered for _ in range(g)], flat, [r["answer"] for r in rows for _ in range(g)])
    correct = [verdicts[i : i + g] for i in range(0, len(verdicts), g)]
    pairs = pairs_from_samples([r["prompt"] for r in rows], completions, correct, rc.pairs_per_prompt)
    right = sum(v == 1.0 for v in verdicts) / max(1, len(verdicts))
    log.info("%s: %d pairs from %d prompts x %d samples of the starting policy (%.1f%% of samples right)",
             what, len(pairs), len(rows), g, 100 * right)
    if not pairs:
        raise NoPairsError(
            f"reward_model.pairs=policy: the starting policy's {len(rows)} x {g} samples on the {what} prompts gave "
            f"no pair ({100 * right:.1f}% right: every prompt all right or all wrong). Train a better cold start, "
            f"sample more (reward_model.samples_per_prompt) or use reward_model.pairs: data")
    return pairs
