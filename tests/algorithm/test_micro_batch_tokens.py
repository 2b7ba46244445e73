"""`grpo.micro_batch_tokens`: micro-batches cut by completion positions as well as rows, so rows of varied length
compute little padding; the update is the one of a single micro-batch (whole-batch normalisers), up to float
summation order."""

from __future__ import annotations

import copy

import pytest
import torch

from grpo_steps.grpo.rewards import digit_match
from grpo_steps.grpo.trainer import GRPOTrainer, by_length, micro_batches, plan_update
from grpo_steps.platform.config import GRPOConfig
from tests.support.rollouts import one_update, varied_length_rollout

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")  # tests/algorithm/conftest.py

PROMPTS = ["12+34=", "7+8=", "5+45=", "3+9="]
G = 4


def _mask(lengths: list[int]) -> torch.Tensor:
    width = max(lengths)
    return (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()


@pytest.mark.parametrize("size,tokens", [(4, 8), (100, 8), (3, 1000), (100, 5), (2, 12)])
def test_micro_batches_hold_the_bounds_and_take_as_many_rows_as_fit(size, tokens):
    lengths = [1, 1, 2, 2, 2, 3, 3, 5, 6, 6, 9, 12]  # shortest first, as the update orders them
    mask = _mask(lengths)
    rows = torch.arange(len(lengths))
    slices = micro_batches(mask, rows, size, tokens)
    assert [i for sl in slices for i in range(len(lengths))[sl]] == list(range(len(lengths)))  # all, in order
    for k, sl in enumerate(slices):
        part = lengths[sl]
        assert len(part) <= size
        assert len(part) == 1 or len(part) * max(part) <= tokens
        if k + 1 < len(slices):  # the next row would have broken a bound
            grown = lengths[sl.start : sl.stop + 1]
            assert len(grown) > size or len(grown) * max(grown) > tokens
    assert micro_batches(mask, rows, size, None) == [slice(s, min(s + size, len(lengths)))
                                                     for s in range(0, len(lengths), size)]


def test_a_row_longer_than_the_budget_is_a_micro_batch_alone():
    mask = _mask([2, 2, 9, 10])
    assert micro_batches(mask, torch.arange(4), 100, 4) == [slice(0, 2), slice(2, 3), slice(3, 4)]


def test_rows_in_any_order_keep_the_budget_and_no_rows_give_no_micro_batch():
    lengths = [5, 1, 9, 2, 2, 7, 1, 3]
    mask = _mask(lengths)
    rows = torch.tensor([6, 3, 0, 7, 2, 1, 4, 5])  # not sorted: only more padding, never a broken bound
    slices = micro_batches(mask, rows, 3, 10)
    assert [int(r) for sl in slices for r in rows[sl]] == rows.tolist()
    for sl in slices:
        part = [lengths[int(r)] for r in rows[sl]]
        assert len(part) <= 3 and (len(part) == 1 or len(part) * max(part) <= 10)
    assert micro_batches(mask, rows[:0], 3, 10) == []


def _update(tok, policy, rollout, **kw):
    """One update (tests/support/rollouts.py `one_update`): its gradients, the reference log-probs and the loss;
    also how many times the policy's decoder ran (the reference is a copy made before the hook)."""
    n = rollout.completion_ids.size(0)
    cfg = GRPOConfig(**{"prompts_per_step": len(PROMPTS), "num_generations": G, "micro_batch_size": n,
                        "beta": 0.05, "learning_rate": 1e-2, **kw})
    trainer = GRPOTrainer(copy.deepcopy(policy), tok, [digit_match], [1.0], cfg.settings(), seed=0)
    passes = []
    trainer.unwrapped.model.register_forward_hook(lambda *_: passes.append(1))
    grads, ref, _, loss = one_update(trainer, rollout)
    return grads, ref, loss, len(passes)


def _assert_same_update(rollout, one, cut) -> None:
    """(gradients, reference log-probs, loss) of two updates agree, up to float summation order."""
    (grads_one, ref_one, loss_one), (grads_cut, ref_cut, loss_cut) = one, cut
    mask = rollout.completion_mask.float()
    torch.testing.assert_close(ref_cut * mask, ref_one * mask, rtol=0, atol=1e-5)
    assert loss_cut == pytest.approx(loss_one, rel=1e-4, abs=1e-7)
    scale = max(float(g.abs().max()) for g in grads_one.values())
    assert scale > 1e-4, "no gradient to compare"
    for k in grads_one:
        torch.testing.assert_close(grads_cut[k], grads_one[k], rtol=1e-4, atol=1e-5 * scale, msg=k)


@pytest.mark.parametrize("share,mu,merge", [(True, 1, False), (False, 1, False), (True, 2, True)],
                         ids=["shared-prompt", "full-rows", "mu2-merged"])
def test_the_update_cut_by_tokens_is_the_one_micro_batch_update(share, mu, merge):
    """mu = 2: the old log-probs are computed in the update's own micro-batches (cut by tokens too)."""
    tok, policy, rollout = varied_length_rollout(PROMPTS, G)  # completions of 1 to 6 tokens
    kw = {"share_prompt": share, "mu": mu, "merge_identical_rows": merge}
    if mu > 1:  # AdamW's first step moves every weight by ~lr whatever its gradient: a small one, so a gradient
        kw["learning_rate"] = 1e-4  # at float-noise level whose sign differs leaves the second pass comparable
    one, ref_one, loss_one, passes_one = _update(tok, policy, rollout, **kw)
    cut, ref_cut, loss_cut, passes_cut = _update(tok, policy, rollout, micro_batch_tokens=12, **kw)
    if not merge:
        slices = micro_batches(rollout.completion_mask, by_length(rollout.completion_mask), 16, 12)
        assert len(slices) > 2
        # the policy ran each pass (old log-probs when mu > 1, then mu updates) once per micro-batch
        assert passes_cut == passes_one * len(slices)
    else:
        assert passes_cut > passes_one
    _assert_same_update(rollout, (one, ref_one, loss_one), (cut, ref_cut, loss_cut))


def test_on_several_processes_the_cut_by_tokens_is_off_and_named():
    _, policy, _ = varied_length_rollout(PROMPTS, G)
    cfg = GRPOConfig(micro_batch_tokens=512).settings()
    assert plan_update(cfg, 1, policy).micro_batch_tokens == 512
    two = plan_update(cfg, 2, policy)
    assert two.micro_batch_tokens is None
    assert any(o.startswith("grpo.micro_batch_tokens") for o in two.off)


def test_a_budget_below_one_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        GRPOConfig(micro_batch_tokens=0)


def test_on_a_chat_policy_with_a_bpe_tokenizer_the_cut_update_is_the_one_micro_batch_update(tmp_path):
    """A user's model (Llama shape, byte-level BPE, ChatML-rendered questions) with completions of up to 40 tokens
    of varied length: cut by tokens, the same update as one micro-batch."""
    from grpo_steps.data.prompts import render_all
    from grpo_steps.grpo.sampling import RowStreams, sample_groups
    from grpo_steps.platform.modeling import load_policy, load_tokenizer
    from tests.support.chat_policy import build_chat_policy, gsm8k_rows

    folder = build_chat_policy(tmp_path / "policy", hidden=32, layers=1)
    tok, policy = load_tokenizer(folder), load_policy(folder)
    prompts = render_all(tok, [r["question"] for r in gsm8k_rows(4, seed=3)])
    assert all(p.startswith("<|im_start|>") for p in prompts)
    rollout = sample_groups(policy, tok, prompts, G, 40, streams=RowStreams(11))
    for i in range(rollout.completion_ids.size(0)):  # varied lengths, as if EOS came at each
        rollout.completion_mask[i, 1 + (7 * i) % 40 :] = 0
    rollout.completion_ids[rollout.completion_mask == 0] = tok.pad_token_id
    one, ref_one, loss_one, _ = _update(tok, policy, rollout)
    cut, ref_cut, loss_cut, _ = _update(tok, policy, rollout, micro_batch_tokens=64)
    assert len(micro_batches(rollout.completion_mask, by_length(rollout.completion_mask), 16, 64)) > 3
    _assert_same_update(rollout, (one, ref_one, loss_one), (cut, ref_cut, loss_cut))


def test_under_bf16_with_the_micro_batches_cut_by_tokens_the_kl_starts_at_zero():
    """The precision rule with the cut on: reference and policy log-probs go through `logps_of`'s path under the
    same bf16 autocast, so at identical weights the KL is exactly 0. (On this CPU, bf16 log-probs of a row do not
    depend on which rows share its micro-batch, so this does not tell the cut apart from another one.)"""
    from accelerate import Accelerator

    tok, policy, rollout = varied_length_rollout(PROMPTS, G)
    n = rollout.completion_ids.size(0)
    cfg = GRPOConfig(prompts_per_step=len(PROMPTS), num_generations=G, micro_batch_size=n, beta=0.05,
                     micro_batch_tokens=12)
    trainer = GRPOTrainer(copy.deepcopy(policy), tok, [digit_match], [1.0], cfg.settings(), seed=0,
                          accelerator=Accelerator(cpu=True, mixed_precision="bf16"))
    assert len(micro_batches(rollout.completion_mask, by_length(rollout.completion_mask), n, 12)) > 2
    grads, _, sums, _ = one_update(trainer, rollout)
    assert sums["kl"] == 0.0
    assert max(float(g.abs().max()) for g in grads.values()) > 1e-4
