"""The pieces that make a run the same on any layout: each row's own random stream, one precision path for
policy, old and reference log-probs, and one plan that says which single-process savings apply.
The whole stage on 1 and 2 processes: tests/platform/test_distributed.py."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from grpo_steps.data.tokenizer import build_tokenizer
from grpo_steps.grpo.rewards import digit_match
from grpo_steps.grpo.sampling import RowStreams, concat_rollouts, draw, sample_groups
from grpo_steps.grpo.trainer import GenerationBatch, GRPOTrainer, plan_update
from grpo_steps.platform.config import GRPOConfig, LoraConfig, ModelConfig
from grpo_steps.platform.modeling import apply_lora, build_policy

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")  # tests/algorithm/conftest.py

PROMPTS = ["12+34=", "7+8=", "55+45=", "3+9=", "1+1=", "40+2="]
G = 4


@pytest.fixture(scope="module")
def tiny():
    tok = build_tokenizer()
    torch.manual_seed(0)
    policy = build_policy(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tok)
    return tok, policy.eval()


def test_a_rows_samples_do_not_depend_on_the_split_of_the_batch(tiny):
    """The whole batch, its two halves as two processes sample them, and the unshared prefill: the same tokens."""
    tok, policy = tiny
    key = 1234
    whole = sample_groups(policy, tok, PROMPTS, G, 6, streams=RowStreams(key))
    halves = [sample_groups(policy, tok, PROMPTS[:3], G, 6, streams=RowStreams(key, 0)),
              sample_groups(policy, tok, PROMPTS[3:], G, 6, streams=RowStreams(key, 3 * G))]
    joined = concat_rollouts(halves, tok.pad_token_id)
    unshared = sample_groups(policy, tok, PROMPTS, G, 6, share_prompt=False, streams=RowStreams(key))
    assert torch.equal(joined.completion_ids, whole.completion_ids)
    assert torch.equal(joined.prompt_ids, whole.prompt_ids) and joined.completions == whole.completions
    assert torch.equal(unshared.completion_ids, whole.completion_ids)
    # and the streams are streams: another key, or the rows shifted by one, sample something else
    other = sample_groups(policy, tok, PROMPTS, G, 6, streams=RowStreams(key + 1))
    shifted = sample_groups(policy, tok, PROMPTS, G, 6, streams=RowStreams(key, 1))
    assert not torch.equal(other.completion_ids, whole.completion_ids)
    assert not torch.equal(shifted.completion_ids, whole.completion_ids)
    # the rows of one prompt are not drawn alike (each has its own stream)
    assert len({tuple(r) for r in whole.completion_ids[:G].tolist()}) > 1


def test_inverse_cdf_draws_follow_the_probabilities_and_never_a_zero():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]]).expand(20_000, 6)
    tokens = draw(probs, RowStreams(7).uniforms(torch.arange(20_000), 0))
    freq = torch.bincount(tokens, minlength=6).float() / 20_000
    assert freq[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(freq, probs[0], atol=0.015, rtol=0)
    edges = draw(probs[:2], torch.tensor([1e-16, 1.0], dtype=torch.float64))  # the extremes of (0, 1]
    assert edges.tolist() == [1, 4]


def _rollout(tok, policy):
    torch.manual_seed(3)
    return sample_groups(policy, tok, PROMPTS[:4], G, 5)


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("share", [True, False])
def test_kl_is_exactly_zero_at_identical_weights_in_bf16(tiny, lora, share):
    """The reference is the starting policy: before any update its log-probs are the policy's, bit for bit, on
    every path (the reference copy and LoRA's adapter-off base, shared prompt or full pass) under bf16 autocast
    as under fp32."""
    import copy

    tok, base = tiny
    policy = copy.deepcopy(base)
    if lora:
        policy = apply_lora(policy, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    rollout = _rollout(tok, base)
    cfg = GRPOConfig(prompts_per_step=4, num_generations=G, beta=0.1, share_prompt=share, merge_identical_rows=False)
    trainer = GRPOTrainer(policy, tok, [digit_match], [1.0], cfg.settings(),
                          accelerator=Accelerator(cpu=True, mixed_precision="bf16"))
    n = rollout.completion_ids.size(0)
    sums, _, _, norm = trainer.update(GenerationBatch(rollout, torch.zeros(n), torch.zeros(n, 1),
                                                      torch.linspace(-1, 1, n), torch.ones(n)))
    assert trainer.plan.share_prompt is share
    assert sums["kl"] == 0.0


def test_the_plan_names_each_saving_that_cannot_apply(tiny):
    _, policy = tiny
    cfg = GRPOConfig(beta=0.0).settings()
    one = plan_update(cfg, 1, policy)
    assert (one.share_prompt, one.merge_identical_rows, one.skip_zero_advantage, one.off) == (True, True, True, ())
    two = plan_update(cfg, 2, policy)
    assert (two.share_prompt, two.merge_identical_rows, two.skip_zero_advantage) == (False, False, False)
    assert [o.split(" ")[0] for o in two.off] == ["grpo.share_prompt", "grpo.merge_identical_rows",
                                                  "grpo.skip_zero_advantage"]
    with_kl = plan_update(GRPOConfig(beta=0.02).settings(), 1, policy)
    assert not with_kl.skip_zero_advantage and with_kl.off == ()  # beta > 0: nothing to skip, nothing to say


def test_bnpo_is_refused_with_its_reason():
    with pytest.raises(ValueError, match="use loss_type: dapo"):
        GRPOConfig(loss_type="bnpo")


def _length(prompts, completions, **_):
    """A reward with spread within groups (a fresh model is never right)."""
    return [float(len(c)) for c in completions]


def test_metrics_mean_what_trls_mean_and_say_which_rows_they_cover(tiny):
    """reward_std is the whole batch's std (TRL's), the groups' mean std has a name of its own, and with rows
    skipped the entropy is named for the rows it covers. Sampling the same step twice draws the same batch."""
    import copy

    from grpo_steps.grpo.advantages import nanstd

    tok, base = tiny
    rows = [{"prompt": p, "answer": str(eval(p[:-1]))} for p in PROMPTS[:4]]  # noqa: S307 - our literals
    cfg = GRPOConfig(prompts_per_step=4, num_generations=G, beta=0.0, max_completion_length=4).settings()
    trainer = GRPOTrainer(copy.deepcopy(base), tok, [_length], [1.0], cfg)
    batch = trainer.generate(rows)  # step 0's batch, without training on it
    metrics = trainer.train_step(rows)  # step 0 again: the same streams, the same batch
    assert float(nanstd(batch.rewards)) > 0  # a spread to learn from
    assert metrics["reward_std"] == pytest.approx(float(nanstd(batch.rewards)), abs=1e-6)
    within = float(batch.group_std.view(-1, G)[:, 0].mean())
    assert metrics["reward_std_within_group"] == pytest.approx(within, abs=1e-6)
    assert trainer.plan.skip_zero_advantage and "entropy" not in metrics and "entropy/trained_rows" in metrics
