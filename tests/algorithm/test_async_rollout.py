"""One-step-off rollouts (`grpo.async_rollout`): while step t updates, step t+1's rollout is decoded in the
background by the policy as it was before that update, and its rows are weighted against the log-probs they were
drawn with. With a zero learning rate the run is the synchronous one; otherwise exactly one step behind."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError

from grpo_steps.data.tokenizer import build_tokenizer
from grpo_steps.grpo.rewards import digit_match
from grpo_steps.grpo.sampling import RowStreams, sample_groups, stream_key
from grpo_steps.grpo.trainer import GRPOTrainer, PromptSampler
from grpo_steps.platform.config import GRPOConfig, ModelConfig
from grpo_steps.platform.modeling import build_policy

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")  # tests/algorithm/conftest.py

PROMPTS = ["12+34=", "7+8=", "55+45=", "3+9=", "1+1=", "40+2=", "9+9=", "23+5="]
ROWS = [{"prompt": p, "answer": str(eval(p[:-1]))} for p in PROMPTS]
G = 4


@pytest.fixture(scope="module")
def tiny():
    tok = build_tokenizer()
    torch.manual_seed(0)
    return tok, build_policy(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tok)


def _length(prompts, completions, **_):
    """A reward with a spread on an untrained policy: longer is better."""
    return [float(len(c)) for c in completions]


def _trainer(policy, tok, **kw) -> GRPOTrainer:
    cfg = GRPOConfig(**{"prompts_per_step": 2, "num_generations": G, "micro_batch_size": 8, "learning_rate": 1e-2,
                        "max_completion_length": 4, **kw})
    return GRPOTrainer(copy.deepcopy(policy), tok, [digit_match, _length], [1.0, 1.0], cfg.settings(), seed=0)


def _fit(trainer: GRPOTrainer, steps: int) -> tuple[list[dict[str, float]], list[tuple[int, int]]]:
    sampler = PromptSampler(ROWS, seed=0)
    positions = []
    history = trainer.fit(sampler, steps, on_step=lambda step, m: positions.append((sampler.position,
                                                                                   sampler.resume_position)))
    return history, positions


def test_with_a_zero_learning_rate_the_run_is_the_synchronous_one(tiny):
    tok, policy = tiny
    runs = []
    for overlap in (False, True):
        trainer = _trainer(policy, tok, async_rollout=overlap, beta=0.04)
        for group in trainer.optimizer.param_groups:  # settings refuse 0; the policy then never changes
            group["lr"] = 0.0
        runs.append(_fit(trainer, 4))
    (sync, _), (ahead, positions) = runs
    for a, b in zip(sync, ahead, strict=True):
        for k in ("reward", "reward_std", "completions/mean_length", "completions/max_length", "kl"):
            assert a[k] == b[k], k
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
    # decoded by the same weights: weights of 1 up to decoding's float noise (a KV-cached decode, a full pass)
    assert all(abs(m["sampling/importance_sampling_ratio/mean"] - 1) < 1e-4 for m in ahead[1:])
    assert all("rollout/wait_time" in m for m in ahead) and all("rollout/wait_time" not in m for m in sync)
    # the next step's prompts are taken ahead: a checkpoint's position does not count them, the last step has none
    assert positions == [(4, 2), (6, 4), (8, 6), (8, 8)]


def test_the_rollout_is_one_step_behind_and_corrected(tiny):
    tok, policy = tiny
    trainer = _trainer(policy, tok, async_rollout=True)
    before = copy.deepcopy(trainer.unwrapped)
    trainer.train_step(ROWS[:2], upcoming=lambda: ROWS[2:4])
    ahead, _ = trainer.pending.future.result()  # (rollout, seconds it took)
    # what the synchronous step 2 would sample, but with the weights before step 1's update
    streams = RowStreams(stream_key(0, 1, 0), 0)
    expected = sample_groups(before, tok, [r["prompt"] for r in ROWS[2:4]], G, 4, streams=streams,
                             keep_sampled_logps=True)
    assert torch.equal(ahead.completion_ids, expected.completion_ids)
    torch.testing.assert_close(ahead.sampled_logps, expected.sampled_logps, rtol=0, atol=1e-6)
    now = sample_groups(trainer.unwrapped, tok, [r["prompt"] for r in ROWS[2:4]], G, 4, streams=streams,
                        keep_sampled_logps=True)
    gap = (now.sampled_logps - expected.sampled_logps).abs().max()
    assert float(gap) > 1e-3, "the update should have moved the policy"

    metrics = trainer.train_step(ROWS[2:4])
    assert trainer.pending is None
    assert metrics["sampling/sampling_logp_difference/max"] > 1e-3  # pi_t against pi_{t-1}: not float noise
    assert metrics["sampling/importance_sampling_ratio/min"] < 1 < metrics["sampling/importance_sampling_ratio/max"]


def test_rollouts_for_other_prompts_are_not_used(tiny):
    """A pending rollout is used only by the step and the prompts it was decoded for: otherwise the step samples
    its own, as the synchronous trainer does."""
    tok, policy = tiny
    steps = []
    for overlap in (False, True):
        trainer = _trainer(policy, tok, async_rollout=overlap)
        trainer.train_step(ROWS[:2], upcoming=lambda: ROWS[2:4])
        pending = trainer.pending
        steps.append(trainer.train_step(ROWS[4:6]))  # not the prompts decoded ahead
        assert trainer.pending is None and (pending is None) != overlap
    for k in ("reward", "reward_std", "completions/mean_length"):
        assert steps[0][k] == steps[1][k], k
    assert steps[1]["kl"] == pytest.approx(steps[0]["kl"], rel=1e-6)  # rows merged otherwise (their sampled log-probs)


def test_async_rollout_needs_the_compact_backend():
    with pytest.raises(ValidationError, match="generation_backend compact"):
        GRPOConfig(async_rollout=True, generation_backend="hf")
