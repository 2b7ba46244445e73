"""Preference pairs sampled from the starting policy (`reward_model.pairs: policy`): a verified-right
completion over a wrong one of the same prompt, train pairs from train prompts, held-out pairs from eval
prompts; no pair at all is a clear error."""

from __future__ import annotations

import json

import pytest

from grpo_steps.stages.policy_pairs import NoPairsError, pairs_from_samples
from tests.support.project import load_tiny
from tests.support.stages import train_reward


def test_pairs_prefer_a_right_sample_over_a_wrong_one_of_the_same_prompt():
    pairs = pairs_from_samples(["a", "b", "c"], [["1", "2", "1", "3"], ["5", "5"], ["7", "8"]],
                               [[0.0, 1.0, 0.0, 0.0], [1.0, 1.0], [0.0, None]], per_prompt=2)
    assert pairs == [{"prompt": "a", "chosen": "2", "rejected": "1", "kind": "policy"}]
    two = pairs_from_samples(["a"], [["1", "2", "3", "4"]], [[1.0, 0.0, 1.0, 0.0]], per_prompt=2)
    assert [(p["chosen"], p["rejected"]) for p in two] == [("1", "2"), ("3", "4")]


POLICY = ["reward_model.pairs=policy", "reward_model.samples_per_prompt=4", "reward_model.sample_prompts=24",
          "reward_model.min_pairwise_accuracy=0.0"]


def test_no_pair_from_a_policy_that_is_never_right_is_named(project):
    with pytest.raises(NoPairsError, match="samples on the train prompts gave no pair"):
        train_reward(load_tiny(project, *POLICY))  # the fixture's starting policy is untrained


def test_pairs_from_the_policys_own_samples_train_the_reward_model(project, monkeypatch):
    import grpo_steps.stages.train_reward as stage

    def every_other(prompts, completions, answer, **_):  # a judge that finds half the samples right
        return [float(i % 2) for i in range(len(completions))]

    monkeypatch.setattr(stage, "accuracy_judge", lambda cfg: every_other)
    cfg = load_tiny(project, *POLICY)
    metrics = train_reward(cfg)
    assert metrics["pairs"] == "policy" and metrics["n_train_pairs"] > 0 and metrics["n_eval_pairs"] > 0
    assert set(metrics["by_kind"]) == {"policy"}
    report = json.loads(cfg.paths.reward_report().read_text())
    assert report["n_train_pairs"] <= 24, "at most one pair per sampled train prompt"
