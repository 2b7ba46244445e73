"""Rollout correction (grpo/correction.py): importance weights pi_old / pi_sampling for a rollout decoded in another
precision than the update's. With identical precision nothing is weighted and the update is today's; with bf16
decoding and an fp32 update the weights follow the formula and weight the policy-gradient term alone."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pydantic import ValidationError

from grpo_steps.data.tokenizer import build_tokenizer
from grpo_steps.grpo.correction import rollout_weights
from grpo_steps.grpo.logprobs import completion_logps
from grpo_steps.grpo.loss import Normalizers, policy_loss
from grpo_steps.grpo.rewards import digit_match
from grpo_steps.grpo.sampling import RowStreams, sample_groups
from grpo_steps.grpo.trainer import GenerationBatch, GRPOTrainer
from grpo_steps.platform.config import GRPOConfig, ModelConfig
from grpo_steps.platform.modeling import build_policy

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")  # tests/algorithm/conftest.py

PROMPTS = ["12+34=", "7+8=", "55+45=", "3+9="]
G = 4
MODES = ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


@pytest.fixture(scope="module")
def tiny():
    tok = build_tokenizer()
    torch.manual_seed(0)
    return tok, build_policy(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tok)


def _logps(model, rollout, temperature=1.0):
    c = rollout.completion_ids.size(1)
    return completion_logps(model, rollout.input_ids, rollout.attention_mask, c, temperature)[0].detach()


# ------------------------------------------------------------------------------------------------- the formula
def _random_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(6, 5, generator=g) * 3
    sampled = old + torch.randn(6, 5, generator=g) * 0.5
    sampled[0, 0] = old[0, 0] - 2.0  # a token the update's policy finds e^2 times likelier: beyond the cap 3
    sampled[1, 1] = old[1, 1] + 2.0  # and one e^2 times less likely: below a floor of 0.5
    mask = torch.ones(6, 5, dtype=torch.long)
    for i, n in enumerate([5, 3, 1, 4, 2, 0]):  # varied lengths, and a row with no loss tokens
        mask[i, n:] = 0
    return old, sampled, mask


@pytest.mark.parametrize("mode", MODES)
def test_identical_log_probs_give_weights_of_exactly_one(mode):
    old, _, mask = _random_case()
    weights, stats = rollout_weights(old, old.clone(), mask, mode)
    assert torch.equal(weights, torch.ones_like(weights))
    m = stats.metrics()
    assert m["sampling/importance_sampling_ratio/mean"] == 1.0 and m["sampling/importance_sampling_ratio/min"] == 1.0
    assert m["sampling/importance_sampling_ratio/clipped_frac"] == 0.0
    assert m["sampling/sampling_logp_difference/max"] == 0.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clip_min", [None, 0.5])
def test_weights_follow_the_formula(mode, clip_min):
    old, sampled, mask = _random_case()
    weights, stats = rollout_weights(old, sampled, mask, mode, clip_max=3.0, clip_min=clip_min)
    low = 0.0 if clip_min is None else clip_min
    expected = torch.zeros(6, 5) if mode.startswith("token") else torch.zeros(6, 1)
    ratios, bounded = [], 0
    for i in range(6):
        tokens = [t for t in range(5) if mask[i, t]]
        if mode.startswith("sequence"):
            rho = math.exp(sum(float(old[i, t] - sampled[i, t]) for t in tokens))  # the product of token ratios
            cells = [(i, 0)] if tokens else []
            values = {(i, 0): rho}
        else:
            values = {(i, t): math.exp(float(old[i, t] - sampled[i, t])) for t in range(5)}
            values.update({(i, t): 1.0 for t in range(5) if not mask[i, t]})  # no tokens: exp(0)
            cells = [(i, t) for t in tokens]
        for (r, col), rho in values.items():
            out = rho < low or rho > 3.0
            if mode.endswith("truncate"):
                w = min(max(rho, low), 3.0) if clip_min is not None else min(rho, 3.0)
            else:
                w = 0.0 if out else rho
            expected[r, col] = w
            if (r, col) in cells:
                ratios.append(w)
                bounded += out
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)
    assert bounded > 0, "the case should exercise the bounds"
    m = stats.metrics()
    assert m["sampling/importance_sampling_ratio/min"] == pytest.approx(min(ratios), rel=1e-5)
    assert m["sampling/importance_sampling_ratio/max"] == pytest.approx(max(ratios), rel=1e-5)
    assert m["sampling/importance_sampling_ratio/mean"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-5)
    assert m["sampling/importance_sampling_ratio/clipped_frac"] == pytest.approx(bounded / len(ratios))
    diffs = [abs(float(old[i, t] - sampled[i, t])) for i in range(6) for t in range(5) if mask[i, t]]
    assert m["sampling/sampling_logp_difference/mean"] == pytest.approx(sum(diffs) / len(diffs), rel=1e-5)
    assert m["sampling/sampling_logp_difference/max"] == pytest.approx(max(diffs), rel=1e-5)


def test_merged_rows_count_as_their_copies():
    old, sampled, mask = _random_case()
    counts = torch.tensor([1.0, 3.0, 1.0, 2.0, 1.0, 1.0])
    _, merged = rollout_weights(old, sampled, mask, "token_truncate", row_weights=counts)
    rows = torch.repeat_interleave(torch.arange(6), counts.long())
    _, expanded = rollout_weights(old[rows], sampled[rows], mask[rows], "token_truncate")
    for k, v in expanded.metrics().items():
        assert merged.metrics()[k] == pytest.approx(v, rel=1e-6), k


def test_weights_of_one_leave_the_loss_and_its_gradient_unchanged():
    old, _, mask = _random_case()
    logps = (old + 0.05 * torch.randn_like(old)).requires_grad_()
    adv = torch.tensor([1.0, -0.5, 0.3, -1.2, 0.7, 0.0])
    norm = Normalizers(6, int(mask.sum()), 5)
    ref = old - 0.1
    plain, _ = policy_loss(logps, old, adv, mask, norm, beta=0.04, ref_logps=ref)
    (g_plain,) = torch.autograd.grad(plain, logps)
    weighted, _ = policy_loss(logps, old, adv, mask, norm, beta=0.04, ref_logps=ref,
                              sampling_weights=torch.ones(6, 5))
    (g_weighted,) = torch.autograd.grad(weighted, logps)
    assert torch.equal(plain, weighted) and torch.equal(g_plain, g_weighted)


def test_the_kl_term_is_not_weighted():
    old, _, mask = _random_case()
    logps = old.clone().requires_grad_()
    norm = Normalizers(6, int(mask.sum()), 5)
    zero = torch.zeros(6)  # no policy-gradient term: only the KL is left
    ref = old - 0.3
    plain, _ = policy_loss(logps, old, zero, mask, norm, beta=0.1, ref_logps=ref)
    weighted, _ = policy_loss(logps, old, zero, mask, norm, beta=0.1, ref_logps=ref,
                              sampling_weights=torch.full((6, 5), 2.5))
    assert torch.equal(plain, weighted)


@pytest.mark.parametrize("bad, says", [
    ({"rollout_correction": "token_truncate", "rollout_correction_max": None}, "needs a bound"),
    ({"rollout_correction_min": 2.0, "rollout_correction_max": 1.5}, "must be below"),
    ({"rollout_precision": "fp8"}, "rollout_precision"),
])
def test_bad_settings_are_refused_naming_the_key(bad, says):
    with pytest.raises(ValidationError, match=says):
        GRPOConfig(**bad)


# ------------------------------------------------------------------------------------ the rollout's log-probs
@pytest.mark.parametrize("backend", ["compact", "hf"])
def test_sampled_log_probs_are_those_of_the_policy_that_drew_the_tokens(tiny, backend):
    tok, policy = tiny
    torch.manual_seed(3)
    rollout = sample_groups(policy, tok, PROMPTS, G, 6, temperature=0.7, backend=backend,
                            streams=RowStreams(11), keep_sampled_logps=True)
    mask = rollout.completion_mask.bool()
    assert rollout.sampled_logps.shape == rollout.completion_ids.shape
    assert torch.equal(rollout.sampled_logps[~mask], torch.zeros(int((~mask).sum())))
    full = _logps(policy, rollout, temperature=0.7)
    torch.testing.assert_close(rollout.sampled_logps[mask], full[mask], rtol=0, atol=2e-5)

    with torch.autocast("cpu", dtype=torch.bfloat16):  # decoded in bf16: the same tokens drawn with other log-probs
        low = sample_groups(policy, tok, PROMPTS, G, 6, temperature=0.7, backend=backend, streams=RowStreams(11),
                            keep_sampled_logps=True)
    lm = low.completion_mask.bool()
    gap = (low.sampled_logps - _logps(policy, low, temperature=0.7))[lm].abs()
    assert 1e-4 < float(gap.max()) < 0.2, float(gap.max())


# ----------------------------------------------------------------------------------------------- the trainer
def _trainer(policy, tok, **kw):
    cfg = GRPOConfig(**{"prompts_per_step": len(PROMPTS), "num_generations": G, "micro_batch_size": 5,
                        "beta": 0.0, "learning_rate": 1e-2, **kw})
    return GRPOTrainer(copy.deepcopy(policy), tok, [digit_match], [1.0], cfg.settings(), seed=0)


ROWS = [{"prompt": p, "answer": str(eval(p[:-1]))} for p in PROMPTS]


def test_in_the_updates_own_precision_nothing_is_weighted_and_the_update_is_todays(tiny):
    tok, policy = tiny
    states, logged = [], []
    for mode in ("sequence_mask", "none"):  # the default, on, against off
        trainer = _trainer(policy, tok, rollout_correction=mode, beta=0.04)
        assert not trainer.correct_rollout
        metrics = trainer.train_step(ROWS)
        logged.append(sorted(k for k in metrics if k.startswith("sampling/")))
        states.append(trainer.unwrapped.state_dict())
    assert logged == [[], []]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(not torch.equal(states[0][k], policy.state_dict()[k]) for k in states[0]), "the update moved nothing"


@pytest.mark.parametrize("update_precision, rollout_precision, applies", [
    ("no", "train", False), ("no", "bf16", True), ("bf16", "train", False), ("bf16", "bf16", False)])
def test_the_correction_applies_only_when_the_rollouts_precision_differs(tiny, update_precision, rollout_precision,
                                                                        applies):
    """`train` decodes in the update's own precision, whichever it is; `bf16` differs only from an fp32 update."""
    from accelerate import Accelerator

    tok, policy = tiny
    cfg = GRPOConfig(prompts_per_step=len(PROMPTS), num_generations=G, rollout_precision=rollout_precision)
    trainer = GRPOTrainer(copy.deepcopy(policy), tok, [digit_match], [1.0], cfg.settings(),
                          accelerator=Accelerator(cpu=True, mixed_precision=update_precision))
    assert trainer.correct_rollout is applies
    metrics = trainer.train_step(ROWS)
    assert any(k.startswith("sampling/") for k in metrics) is applies


def _bf16_batch(policy, tok):
    """A rollout decoded under bf16 autocast, its sampled log-probs kept, with advantages of both signs."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rollout = sample_groups(policy, tok, PROMPTS, G, 6, streams=RowStreams(5), keep_sampled_logps=True)
    n = rollout.completion_ids.size(0)
    advantages = torch.linspace(-1.0, 1.0, n)
    return GenerationBatch(rollout, torch.zeros(n), torch.zeros(n, 1), advantages, torch.ones(n))


@pytest.mark.parametrize("mode", ["sequence_truncate", "sequence_mask"])
def test_bf16_rollouts_are_weighted_by_the_formula_in_the_fp32_update(tiny, mode):
    """At mu = 1 the ratio is 1 with the gradient of log pi, so a sequence weight w_i scales row i's policy
    gradient exactly as an advantage of A_i * w_i would: the corrected update equals an uncorrected one whose
    advantages are multiplied by the weights computed here from the formula, from fp32 log-probs of the policy."""
    tok, policy = tiny
    batch = _bf16_batch(policy, tok)
    r = batch.rollout
    mask = r.completion_mask.bool()
    diff = ((_logps(policy, r) - r.sampled_logps) * mask).sum(-1)
    rho = diff.exp()
    cap = float(rho.median())  # bf16's differences are small: a tight cap makes the bounds act on half the rows
    w = rho.clamp(max=cap) if mode == "sequence_truncate" else torch.where(rho > cap, 0.0, rho)
    assert float((rho - 1).abs().max()) > 1e-4, "bf16 decoding should differ from the fp32 update"
    assert bool((rho > cap).any()) and bool((rho <= cap).any())

    corrected = _trainer(policy, tok, rollout_precision="bf16", rollout_correction=mode, rollout_correction_max=cap,
                         merge_identical_rows=False)
    assert corrected.correct_rollout
    g_corrected = _gradient(corrected, batch)
    m = corrected.last_correction.metrics()
    seqs = mask.any(-1)
    assert m["sampling/importance_sampling_ratio/mean"] == pytest.approx(float(w[seqs].mean()), rel=1e-4)
    bounded = float((rho[seqs] > cap).float().mean())
    assert m["sampling/importance_sampling_ratio/clipped_frac"] == pytest.approx(bounded)
    assert m["sampling/sampling_logp_difference/max"] == pytest.approx(
        float((_logps(policy, r) - r.sampled_logps)[mask].abs().max()), rel=1e-4)

    scaled = GenerationBatch(r, batch.rewards, batch.per_func, batch.advantages * w, batch.group_std)
    g_scaled = _gradient(_trainer(policy, tok, rollout_correction="none", merge_identical_rows=False), scaled)
    g_plain = _gradient(_trainer(policy, tok, rollout_correction="none", merge_identical_rows=False), batch)
    for k in g_corrected:
        size = float(g_scaled[k].abs().max())
        torch.testing.assert_close(g_corrected[k], g_scaled[k], rtol=0, atol=max(1e-5 * size, 1e-9), msg=k)
    gap = max(float((g_corrected[k] - g_plain[k]).abs().max() / g_plain[k].abs().max().clamp(min=1e-12))
              for k in g_plain)
    assert gap > 1e-4, "the weights should change the gradient of this batch"  # measured 9e-4 (truncate), 1.05 (mask)


def _gradient(trainer, batch) -> dict[str, torch.Tensor]:
    """The (clipped) gradient the optimizer steps with, per parameter, from one update on `batch`."""
    grads = {}
    names = {p: n for n, p in trainer.unwrapped.named_parameters()}
    step = trainer.optimizer.step

    def record(*args, **kwargs):
        grads.update({names[p]: p.grad.detach().clone() for p in names if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = record
    trainer.update(batch)
    assert grads, "the optimizer never stepped"
    return grads


def test_a_bf16_training_step_logs_trls_sampling_metrics(tiny):
    tok, policy = tiny
    trainer = _trainer(policy, tok, rollout_precision="bf16", rollout_correction="token_truncate")
    metrics = trainer.train_step(ROWS)
    for name in ("importance_sampling_ratio/min", "importance_sampling_ratio/mean", "importance_sampling_ratio/max",
                 "importance_sampling_ratio/clipped_frac", "sampling_logp_difference/mean",
                 "sampling_logp_difference/max"):
        assert math.isfinite(metrics[f"sampling/{name}"]), name
    assert 0 < metrics["sampling/sampling_logp_difference/max"] < 0.5
    assert metrics["sampling/importance_sampling_ratio/min"] <= 1 <= metrics["sampling/importance_sampling_ratio/max"]
