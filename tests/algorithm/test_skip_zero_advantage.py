"""No wasted compute at an identical update: with beta = 0, rows of zero advantage skip their forward and backward
(`grpo.skip_zero_advantage`), the loss keeps the whole batch's normalisers, and the parameters after the step are
those of the full pass."""

from __future__ import annotations

import copy

import pytest
import torch

from grpo_steps.grpo.rewards import digit_match
from grpo_steps.grpo.trainer import GenerationBatch, GRPOTrainer
from grpo_steps.platform.config import GRPOConfig
from tests.support.rollouts import varied_length_rollout

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")  # tests/algorithm/conftest.py

PROMPTS = ["12+34=", "7+8=", "55+45=", "3+9="]
G = 4


@pytest.fixture(scope="module")
def setup():
    return varied_length_rollout(PROMPTS, G)  # varied lengths (so the skipped path also drops trailing padding columns)


def _step(tok, policy, rollout, advantages, skip: bool, steps: int = 2, **kw):
    """`steps` updates on the same batch (the second one with AdamW's moments from the first); the weights after."""
    cfg = GRPOConfig(**{"prompts_per_step": len(PROMPTS), "num_generations": G, "micro_batch_size": 5, "beta": 0.0,
                        "learning_rate": 1e-2, "skip_zero_advantage": skip, **kw})
    trainer = GRPOTrainer(copy.deepcopy(policy), tok, [digit_match], [1.0], cfg.settings(), seed=0)
    n = advantages.numel()
    batch = GenerationBatch(rollout, torch.zeros(n), torch.zeros(n, 1), advantages, torch.ones(n))
    skipped = []
    for _ in range(steps):
        trainer.update(batch)
        skipped.append(trainer.last_skipped_rows)
    return trainer.unwrapped.state_dict(), skipped


def _assert_same_update(start, full, fast):
    """Equal up to float summation order: the kept rows are reduced in other blocks, and AdamW's g / sqrt(v)
    magnifies a last-bit difference of a near-zero gradient, so the bound is relative to the step's size
    (each weight moves by ~lr = 1e-2 here; allowed: 1e-5, a thousandth of that). Not compared: the attention's
    key biases, whose gradient is exactly zero (a key bias adds the same score to every key a query sees, which
    the softmax removes), so AdamW's g / sqrt(v) turns their rounding noise alone into steps of size lr."""
    for k in full:
        if k.endswith("k_proj.bias"):
            assert (fast[k] - start[k]).abs().max() <= 2.5 * 1e-2  # at most ~lr per step, 2 steps
            continue
        moved = (full[k] - start[k]).abs().max().item()
        torch.testing.assert_close(fast[k], full[k], rtol=0, atol=max(1e-3 * moved, 1e-8), msg=k)


# two groups of equal rewards (advantage 0), two with a spread; then every group equal
HALF = torch.tensor([0.0] * G + [1.0, -1.0, 0.5, -0.5] + [0.0] * G + [0.3, -0.3, 0.0, 0.0])


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_skipping_zero_advantage_rows_gives_the_same_update(setup, loss_type):
    tok, policy, rollout = setup
    full, skipped_full = _step(tok, policy, rollout, HALF, skip=False, loss_type=loss_type)
    fast, skipped_fast = _step(tok, policy, rollout, HALF, skip=True, loss_type=loss_type)
    assert skipped_full == [0, 0] and skipped_fast == [10, 10]  # the 8 rows of two groups + 2 zeros of the last
    start = policy.state_dict()
    assert any(not torch.equal(start[k], full[k]) for k in full), "the update moved nothing"
    _assert_same_update(start, full, fast)


def test_a_batch_of_only_zero_advantages_still_steps_the_optimizer_alike(setup):
    """All rows skipped: no forward at all, but AdamW still sees (zero) gradients, so its momentum from the step
    before moves the weights exactly as the full pass does."""
    tok, policy, rollout = setup
    cfg = dict(prompts_per_step=len(PROMPTS), num_generations=G, micro_batch_size=5, beta=0.0, learning_rate=1e-2)
    results = []
    for skip in (False, True):
        trainer = GRPOTrainer(copy.deepcopy(policy), tok, [digit_match], [1.0],
                              GRPOConfig(**cfg, skip_zero_advantage=skip).settings(), seed=0)
        n = HALF.numel()
        for a in (HALF, torch.zeros(n)):
            trainer.update(GenerationBatch(rollout, torch.zeros(n), torch.zeros(n, 1), a, torch.ones(n)))
        results.append((trainer.unwrapped.state_dict(), trainer.last_skipped_rows))
    (full, _), (fast, skipped) = results
    assert skipped == n
    _assert_same_update(policy.state_dict(), full, fast)


def test_nothing_is_skipped_when_rows_carry_the_kl_term(setup):
    tok, policy, rollout = setup
    _, skipped = _step(tok, policy, rollout, HALF, skip=True, steps=1, beta=0.05)
    assert skipped == [0]
