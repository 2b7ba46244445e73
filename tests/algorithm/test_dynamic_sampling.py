"""DAPO dynamic sampling (`grpo.dynamic_sampling`): groups whose rewards are all equal are dropped and further
prompts sampled until the batch is full, with a cap on extra rounds; the pieces it is built from."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_steps.data.tokenizer import build_tokenizer
from grpo_steps.grpo.advantages import groups_with_spread
from grpo_steps.grpo.sampling import concat_rollouts, sample_groups
from grpo_steps.grpo.trainer import GRPOTrainer, PromptSampler
from grpo_steps.platform.config import GRPOConfig, ModelConfig
from grpo_steps.platform.modeling import build_policy

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")  # tests/algorithm/conftest.py

G = 4


def test_groups_with_spread_ignores_nan_and_needs_two_values():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0,  # all equal
                            0.0, 1.0, 0.0, 0.0,  # spread
                            math.nan, 2.0, 2.0, math.nan,  # equal once NaN is left out
                            math.nan, math.nan, math.nan, 3.0,  # one value: no spread
                            math.nan, 0.5, -0.5, math.nan])
    assert groups_with_spread(rewards, G).tolist() == [False, True, False, False, True]


def test_concat_rollouts_keeps_every_rows_tokens_and_masks():
    tok = build_tokenizer()
    torch.manual_seed(0)
    policy = build_policy(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok)
    a = sample_groups(policy, tok, ["1+2="], 2, 3)
    b = sample_groups(policy, tok, ["12+34=", "5+5="], 2, 5)
    both = concat_rollouts([a, b], tok.pad_token_id)
    assert both.prompts == a.prompts + b.prompts and both.completions == a.completions + b.completions
    for i, (src, j) in enumerate([(a, 0), (a, 1), (b, 0), (b, 1), (b, 2), (b, 3)]):
        got = both.input_ids[i][both.attention_mask[i].bool()]
        assert torch.equal(got, src.input_ids[j][src.attention_mask[j].bool()])  # the same tokens, unpadded
    picked = both[[4, 5, 0, 1]]
    assert picked.prompts == [both.prompts[k] for k in (4, 5, 0, 1)]
    assert torch.equal(picked.completion_ids, both.completion_ids[[4, 5, 0, 1]])


def _trainer(tok, reward, **kw):
    torch.manual_seed(0)
    policy = build_policy(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok)
    cfg = GRPOConfig(prompts_per_step=4, num_generations=G, max_completion_length=4, beta=0.0,
                     dynamic_sampling=True, **kw)
    return GRPOTrainer(policy, tok, [reward], [1.0], cfg.settings(), seed=0)


def _rows(n):
    # "hard" prompts (odd a) score every completion alike; the others by the completion's text (they spread)
    return [{"prompt": f"{a}+{a}=", "answer": str(2 * a), "hard": a % 2 == 1} for a in range(10, 10 + n)]


def by_text_unless_hard(prompts, completions, hard, **_):
    return [0.0 if h else float(sum(map(ord, c)) % 97) for c, h in zip(completions, hard, strict=True)]


def test_equal_groups_are_replaced_by_further_prompts_until_the_batch_is_full():
    tok = build_tokenizer()
    trainer = _trainer(tok, by_text_unless_hard, max_dynamic_sampling_rounds=3)
    sampler = PromptSampler(_rows(40), seed=0)
    torch.manual_seed(0)
    metrics = trainer.train_step(sampler.next(4), more=sampler.next)
    rounds = metrics["dynamic_sampling/rounds"]
    assert rounds >= 2 and sampler.position == 4 * rounds  # each extra round drew prompts_per_step prompts
    assert metrics["dynamic_sampling/filled_groups"] == 0 and metrics["frac_reward_zero_std"] == 0.0
    assert metrics["dynamic_sampling/dropped_groups"] >= 1
    batch = trainer.generate(sampler.next(4), more=sampler.next)  # the batch itself: 4 groups, every one spread
    assert batch.rollout.completion_ids.size(0) == 4 * G
    assert groups_with_spread(batch.rewards, G).all()
    assert all(int(p.split("+")[0]) % 2 == 0 for p in batch.rollout.prompts)  # no "hard" prompt kept


def test_the_cap_on_rounds_holds_and_equal_groups_fill_up():
    tok = build_tokenizer()

    def constant(prompts, completions, **_):
        return [1.0] * len(completions)

    trainer = _trainer(tok, constant, max_dynamic_sampling_rounds=2)
    sampler = PromptSampler(_rows(40), seed=0)
    metrics = trainer.train_step(sampler.next(4), more=sampler.next)
    assert metrics["dynamic_sampling/rounds"] == 3 and sampler.position == 12  # 1 + the 2 extra rounds
    assert metrics["dynamic_sampling/filled_groups"] == 4  # nothing better: the batch is full of equal groups
    assert metrics["dynamic_sampling/dropped_groups"] == 8
    assert metrics["frac_rows_skipped"] == 1.0  # all advantages 0, beta 0: no forward or backward at all
