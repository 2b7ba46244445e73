"""Our GRPO loss, gradients and advantages agree with TRL's GRPOTrainer on identical inputs (to 1e-5 absolute).

The harness (tiny model, hand-built batch, the real `trl.GRPOTrainer`, and why the inputs are what they are:
one micro-batch, equal-length prompts, TRL's KL bias correction off, no bf16) lives in bench/parity_table.py,
which also prints the comparison as a table: one copy of the logic. Read its docstring for the conditions under
which the two definitions coincide, and for the deliberate differences.
"""

from __future__ import annotations

import pytest
import torch

# bench/ is a plain folder (a namespace package) at the repo root, which pytest does not put on the path.
from bench.parity_table import (
    ADVANTAGE_REWARDS,
    GRPO_WITH_KL,
    LEFT_PAD,
    NUM_GENERATIONS,
    SCALES,
    TOL,
    VARIANTS,
    ParityResult,
    build_setup,
    compare,
    compare_advantages,
)


def _reset_accelerate_state() -> None:
    # TRL's Trainer builds an Accelerator with use_cpu=True; accelerate keeps that process-wide. Start from a clean
    # state (an earlier test's GPU state would make cpu=True raise) and leave one (later tests may want the GPU).
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """One TRL trainer (and model, and batches) for the whole module; `compare` reconfigures it per variant."""
    _reset_accelerate_state()
    yield build_setup(tmp_path_factory.mktemp("trl_parity"))
    _reset_accelerate_state()


def _check(result: ParityResult) -> None:
    # The comparison must not be vacuous: gradients of a visible size, and both the clipped and the unclipped branch
    # of the surrogate taken by some tokens (so a wrong epsilon or ratio would change the gradient, not just the loss).
    assert result.grad_scale > 1e-3, result
    assert result.coverage["clipped"] > 0 and result.coverage["unclipped"] > 0, result.coverage
    assert result.loss_diff <= TOL, f"{result.name}: loss ours {result.loss_ours} vs TRL {result.loss_trl}"
    assert result.grad_diff <= TOL, f"{result.name}: max abs grad diff {result.grad_diff:.3e}"


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_loss_and_gradients_match_trl(setup, variant):
    result = compare(setup, variant)
    # Token-level clip-higher: some tokens must sit in the extra band (1 + eps_low, 1 + eps_high]. (GSPO's band,
    # 1e-4 wide in the sequence ratio, is not aimed at; its clipped and unclipped sequences are checked below.)
    if variant.epsilon_high > variant.epsilon_low and variant.importance_sampling_level == "token":
        assert result.coverage["clip_higher_band"] > 0, result.coverage
    _check(result)


def test_left_padded_prompts_match_trl_because_rope_is_relative(setup):
    # TRL's forward does not pass position_ids (arange positions); ours derives them from the attention mask. On a
    # left-padded row the two differ by a constant shift, which RoPE attention does not see: see parity_table.py.
    assert (setup.padded_batch["prompt_mask"][:, :LEFT_PAD] == 0).any()
    assert setup.model.config.model_type in ("qwen2", "llama")  # RoPE models; absolute embeddings would differ
    _check(compare(setup, GRPO_WITH_KL, setup.padded_batch))


@pytest.mark.parametrize("scale", SCALES)
def test_group_advantages_match_trl(setup, scale):
    ours, theirs = compare_advantages(setup, scale)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=TOL, rtol=0)
    # The all-equal group (std 0) and the unscorable (None -> NaN) completion get advantage 0 on both sides.
    flat = [r for group in ADVANTAGE_REWARDS for r in group]
    equal_group = next(i for i, g in enumerate(ADVANTAGE_REWARDS) if len(set(g)) == 1)
    rows = slice(equal_group * NUM_GENERATIONS, (equal_group + 1) * NUM_GENERATIONS)
    assert torch.all(ours[rows] == 0) and torch.all(theirs[rows] == 0)
    unscorable = flat.index(None)
    assert ours[unscorable] == 0 and theirs[unscorable] == 0
    assert ours.abs().max() > 0.1  # and the others are not all zero
