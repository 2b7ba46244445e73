"""Every model a stage builds or loads for inference goes through the one placement function,
grpo_steps.platform.modeling.place, onto the accelerator's device: evaluate's policies, reward model and champion; the
starting policy train_reward samples preference pairs from and the reward model it scores the held-out pairs
with; the reward model the grpo stage scores rollouts with. A spy records the models placed (and places them
for real); each test names the models its stage must have placed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from grpo_steps.platform.modeling import accelerator_device, load_tokenizer
from grpo_steps.stages.policy_pairs import NoPairsError
from tests.support.placement import devices, spy_on_place
from tests.support.project import load_tiny, perturb_policy, write_metrics
from tests.support.stages import evaluate, register, train_reward


@pytest.fixture
def placed(monkeypatch):
    return spy_on_place(monkeypatch)


def folder(model) -> Path:
    """The folder a model was loaded from."""
    return Path(model.name_or_path).resolve()


def test_the_default_device_is_the_accelerators():
    from accelerate import Accelerator

    assert accelerator_device() == Accelerator(cpu=not torch.cuda.is_available()).device


def test_evaluate_places_the_policies_the_reward_model_and_the_champion(project, placed):
    cfg = load_tiny(project)
    grpo = cfg.paths.grpo_policy() / "model.safetensors"  # a champion in the registry: other weights than grpo's
    original = grpo.read_bytes()
    perturb_policy(cfg.paths.grpo_policy(), 0.05)
    write_metrics(cfg, accuracy=0.9)
    assert register(cfg)["alias"] == "champion"
    grpo.write_bytes(original)
    placed.clear()  # register loads the policy to log it, not to run it

    result = evaluate(cfg)
    assert result["champion_version"] == "1" and "champion" in result  # the champion was loaded and evaluated
    assert [folder(m) for m in placed[:3]] == [cfg.paths.sft_policy().resolve(), cfg.paths.grpo_policy().resolve(),
                                               cfg.paths.reward_model().resolve()]
    assert len(placed) == 4, [m.name_or_path for m in placed]
    champion = folder(placed[3])
    assert champion.name == "model" and champion.parent.name.startswith("champion-")  # its download
    assert all(devices(m) == {accelerator_device().type} for m in placed)


def test_train_reward_places_the_reward_model_it_scores_with(project, placed):
    cfg = load_tiny(project)
    train_reward(cfg)
    (scorer,) = placed  # the likelihood reward model, trained: training itself placed it (accelerator.prepare)
    assert scorer.config.reward_beta == cfg.reward_model.beta and not scorer.training
    assert devices(scorer) == {accelerator_device().type}


def test_policy_pairs_place_the_starting_policy(project, placed):
    cfg = load_tiny(project, "reward_model.pairs=policy", "reward_model.samples_per_prompt=4",
                    "reward_model.sample_prompts=24")
    with pytest.raises(NoPairsError):  # the fixture's untrained policy is never right; it sampled, placed
        train_reward(cfg)
    (policy,) = placed
    assert folder(policy) == cfg.paths.sft_policy().resolve() and type(policy).__name__.endswith("ForCausalLM")
    assert not policy.training and devices(policy) == {accelerator_device().type}


def test_grpo_places_the_reward_model_it_scores_rollouts_with(project, placed):
    from grpo_steps.stages.grpo import build_reward_functions, reward_model_of

    cfg = load_tiny(project, "grpo.reward_functions=[{name: reward_model, weight: 1.0}, "
                             "{name: digit_match, weight: 0.5}]")
    funcs, _ = build_reward_functions(cfg, load_tokenizer(cfg.paths.sft_policy()))
    assert placed == [reward_model_of(funcs).model]  # that very model, and nothing else
    assert folder(placed[0]) == cfg.paths.reward_model().resolve()
