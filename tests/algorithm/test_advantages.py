import math

import pytest
import torch

from grpo_steps.grpo.advantages import group_advantages
from grpo_steps.grpo.rewards import exact_match, score_completions


def test_group_normalisation_matches_formula():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 5.0, 3.0])
    adv, std = group_advantages(r, 4, "group")
    for g in range(2):
        grp = r[g * 4 : (g + 1) * 4]
        expected = (grp - grp.mean()) / (grp.std(unbiased=True) + 1e-4)
        torch.testing.assert_close(adv[g * 4 : (g + 1) * 4], expected)
        assert std[g * 4].item() == pytest.approx(grp.std(unbiased=True).item())


def test_all_equal_rewards_give_zero_advantage():
    adv, std = group_advantages(torch.tensor([0.7, 0.7, 0.7, 0.0, 1.0, 0.0]), 3, "group")
    assert torch.all(adv[:3] == 0)
    assert std[0] == 0 and adv[3:].abs().sum() > 0


def test_scale_none_is_dr_grpo_centering_only():
    r = torch.tensor([1.0, 0.0, 3.0, 1.0])
    adv, _ = group_advantages(r, 2, "none")
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, 1.0, -1.0]))


def test_scale_batch_uses_batch_std():
    r = torch.tensor([1.0, 0.0, 3.0, 1.0])
    adv, _ = group_advantages(r, 2, "batch")
    centred = torch.tensor([0.5, -0.5, 1.0, -1.0])
    torch.testing.assert_close(adv, centred / (r.std(unbiased=True) + 1e-4))


def test_abstained_reward_is_excluded_and_gets_zero_advantage():
    def rule(prompts, completions, **_):
        return [None if c == "skip" else float(c == "1") for c in completions]

    per_func, total = score_completions([rule], [1.0], ["p"] * 4, ["1", "0", "skip", "1"], {})
    assert math.isnan(total[2].item())
    adv, _ = group_advantages(total, 4, "group")
    assert adv[2] == 0
    # the other three are normalised among themselves
    present = torch.tensor([1.0, 0.0, 1.0])
    torch.testing.assert_close(adv[[0, 1, 3]], (present - present.mean()) / (present.std() + 1e-4))


def test_weighted_sum_skips_one_abstaining_function():
    def always_none(prompts, completions, **_):
        return [None] * len(completions)

    per_func, total = score_completions(
        [exact_match, always_none], [2.0, 1.0], ["1+1="] * 2, ["2", "3"], {"answer": ["2", "2"]}
    )
    torch.testing.assert_close(total, torch.tensor([2.0, 0.0]))
    assert torch.isnan(per_func[:, 1]).all()


def test_groups_must_divide_batch():
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)


def test_reward_function_must_return_one_value_per_completion():
    with pytest.raises(ValueError, match="returned 1 values for 2"):
        score_completions([lambda prompts, completions, **_: [1.0]], [1.0], ["a", "b"], ["x", "y"], {})
