"""On a CUDA device (`pytest -m gpu`; skipped without one): the placement function puts models on the GPU, and
what the stages run there runs there: a policy samples and scores its samples on cuda, both reward-model heads
score on cuda as they score on the CPU, and the stages place every inference model they build on cuda."""

from __future__ import annotations

import copy

import pytest
import torch

from grpo_steps.data.tokenizer import build_tokenizer
from grpo_steps.grpo.logprobs import completion_logps
from grpo_steps.grpo.reward_model import RewardModelFunction
from grpo_steps.grpo.sampling import sample_in_batches
from grpo_steps.platform.config import ModelConfig
from grpo_steps.platform.modeling import accelerator_device, build_policy, build_reward_backbone, place
from tests.support.placement import devices, spy_on_place
from tests.support.project import load_tiny
from tests.support.stages import evaluate, train_grpo, train_reward

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: these tests place models on cuda"),
]

TINY_MODEL = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
PROMPTS = ["12+7=", "3+45=", "12+7="]
COMPLETIONS = ["19", "48", "20"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_place_puts_a_model_on_this_processs_gpu(tok):
    assert accelerator_device().type == "cuda"
    policy = place(build_policy(TINY_MODEL, tok))
    assert devices(policy) == {"cuda"}
    assert devices(place(policy, "cpu")) == {"cpu"}  # an explicit device wins


def test_a_placed_policy_samples_and_scores_its_samples_on_cuda(tok):
    torch.manual_seed(0)
    policy = place(build_policy(TINY_MODEL, tok).eval())
    for greedy in (True, False):
        (rollout,) = sample_in_batches(policy, tok, PROMPTS, 2, 6, greedy=greedy)
        assert rollout.completion_ids.device.type == "cuda" and len(rollout.completions) == 2 * len(PROMPTS)
        logps, _ = completion_logps(policy, rollout.input_ids, rollout.attention_mask, rollout.completion_ids.size(1))
        assert logps.device.type == "cuda" and torch.isfinite(logps).all()


@pytest.mark.parametrize("head", ["likelihood", "scalar"])
def test_a_placed_reward_model_scores_on_cuda_as_on_the_cpu(tok, head):
    torch.manual_seed(0)
    model = build_policy(TINY_MODEL, tok) if head == "likelihood" else build_reward_backbone(TINY_MODEL, tok)
    on_cpu = RewardModelFunction(copy.deepcopy(model), tok)(PROMPTS, COMPLETIONS)
    scorer = RewardModelFunction(place(model), tok)
    assert devices(scorer.model) == {"cuda"}
    assert scorer(PROMPTS, COMPLETIONS) == pytest.approx(on_cpu, rel=1e-3, abs=1e-3)


def test_the_stages_place_their_inference_models_on_cuda(project, monkeypatch):
    """train_reward (its scorer), the grpo stage (the reward model scoring the policy's rollouts, 3 steps) and
    evaluate (policies, reward model), each run for real on the tiny project."""
    placed = spy_on_place(monkeypatch)
    reward_model_too = "grpo.reward_functions=[{name: reward_model, weight: 1.0}, {name: digit_match, weight: 0.5}]"
    train_reward(load_tiny(project))
    assert len(placed) == 1
    train_grpo(load_tiny(project, reward_model_too))
    assert len(placed) == 2
    evaluate(load_tiny(project, "evaluate.compare_champion=false"))
    assert len(placed) == 5
    assert [devices(m) for m in placed] == [{"cuda"}] * 5
