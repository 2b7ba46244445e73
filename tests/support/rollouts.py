"""A tiny policy and one rollout of it with completions of varied lengths, for the update tests in tests/algorithm
(no tests here)."""

from __future__ import annotations

import torch

from grpo_steps.data.tokenizer import build_tokenizer
from grpo_steps.grpo.sampling import Rollout, sample_groups
from grpo_steps.platform.config import ModelConfig
from grpo_steps.platform.modeling import build_policy

LENGTHS = [2, 3, 4, 5, 6, 1, 2, 3]  # per row, repeated: padding inside the batch, one-token rows among them


def varied_length_rollout(prompts: list[str], g: int):
    """(tokenizer, policy, rollout): G = `g` samples of at most 6 tokens per prompt, each row then cut to its
    length from LENGTHS, as if EOS came early."""
    tok = build_tokenizer()
    torch.manual_seed(0)
    policy = build_policy(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tok)
    torch.manual_seed(1)
    rollout: Rollout = sample_groups(policy, tok, prompts, g, 6)
    for i in range(rollout.completion_ids.size(0)):
        length = LENGTHS[i % len(LENGTHS)]
        rollout.completion_mask[i, length:] = 0
        rollout.completion_ids[i, length:] = tok.pad_token_id
    return tok, policy, rollout
