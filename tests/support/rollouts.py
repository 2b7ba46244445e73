"""A tiny policy and one rollout of it with completions of varied lengths, and one update on it, for the update
tests in tests/algorithm (no tests here)."""

from __future__ import annotations

import torch

from grpo_steps.data.tokenizer import build_tokenizer
from grpo_steps.grpo.sampling import Rollout, sample_groups
from grpo_steps.grpo.trainer import GenerationBatch
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


def one_update(trainer, rollout: Rollout) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, dict, float]:
    """One `trainer.update` on `rollout` with advantages spread from -1.5 to 1.5: (the gradients the optimizer
    last stepped with, the reference log-probs, the stat sums, the loss). AdamW's first step is about
    lr * sign(g), so weights after it would magnify a last-bit difference of a near-zero gradient: compare these."""
    n = rollout.completion_ids.size(0)
    advantages = torch.linspace(-1.5, 1.5, n)
    batch = GenerationBatch(rollout, torch.zeros(n), torch.zeros(n, 1), advantages, torch.ones(n))
    grads, step = {}, trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads.update({k: p.grad.clone() for k, p in trainer.unwrapped.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    ref = trainer.reference_logps(rollout)
    sums, loss, _, _ = trainer.update(batch)
    return grads, ref, sums, loss
