"""`grpo.share_prompt`: each distinct prompt goes through the model once per pass, its keys and values handed to
its G completions, and every number is the one the full pass gives (log-probs, entropies, gradients, the update,
the sampled tokens, the reward model's scores)."""

from __future__ import annotations

import copy

import pytest
import torch

from grpo_steps.grpo.logprobs import can_share_prompt, completion_logps, distinct_prompts, shared_prompt_logps
from grpo_steps.grpo.reward_model import RewardModelFunction, encode_pairs, sequence_logps
from grpo_steps.grpo.rewards import digit_match
from grpo_steps.grpo.sampling import sample_groups
from grpo_steps.grpo.trainer import GenerationBatch, GRPOTrainer
from grpo_steps.platform.config import GRPOConfig, LoraConfig
from grpo_steps.platform.modeling import apply_lora
from tests.support.rollouts import one_update, varied_length_rollout

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")  # tests/algorithm/conftest.py

PROMPTS = ["12+34=", "7+8=", "5+45=", "3+9="]  # lengths 6, 4, 5, 4: left padding differs per prompt
G = 4


@pytest.fixture(scope="module")
def setup():
    return varied_length_rollout(PROMPTS, G)  # varied lengths (padding inside the batch)


def test_distinct_prompts_finds_each_prompt_once_and_drops_all_padding_columns(setup):
    _, _, rollout = setup
    rows = torch.tensor([9, 0, 13, 1, 4])  # prompts 2, 0, 3, 0, 1
    ids, mask, index = distinct_prompts(rollout.prompt_ids[rows], rollout.prompt_mask[rows])
    assert ids.size(0) == 4 and torch.equal(ids[index], rollout.prompt_ids[rows][:, -ids.size(1):])
    assert bool(mask[:, 0].any())  # the widest of these prompts fills the first column
    assert index[1] == index[3]


@pytest.mark.parametrize("chunk", [0, 3])
def test_shared_prompt_logps_are_the_full_pass_values_entropies_and_gradients(setup, chunk):
    tok, policy, rollout = setup
    rows = torch.tensor([9, 0, 13, 1, 4, 5, 15])
    sub, c = rollout[rows], rollout.completion_ids.size(1)
    mask = sub.completion_mask.float()
    results = []
    for shared in (False, True):
        model = copy.deepcopy(policy).train()
        if shared:
            lp, ent = shared_prompt_logps(model, sub.prompt_ids, sub.prompt_mask, sub.completion_ids,
                                          sub.completion_mask, 0.7, chunk, compute_entropy=True)
        else:
            lp, ent = completion_logps(model, sub.input_ids, sub.attention_mask, c, 0.7, chunk, compute_entropy=True)
        (lp * mask * torch.linspace(-1, 1, lp.numel()).view_as(lp)).sum().backward()
        results.append((lp.detach() * mask, ent * mask, {k: p.grad for k, p in model.named_parameters()}))
    (lp_a, ent_a, grad_a), (lp_b, ent_b, grad_b) = results
    torch.testing.assert_close(lp_b, lp_a, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent_b, ent_a, rtol=0, atol=1e-5)
    assert any(float(g.abs().max()) > 1e-4 for g in grad_a.values())
    for k in grad_a:
        torch.testing.assert_close(grad_b[k], grad_a[k], rtol=1e-4, atol=1e-6, msg=k)


def _update(tok, policy, rollout, share: bool, **kw):
    """One update (tests/support/rollouts.py `one_update`): gradients, reference log-probs, stat sums, loss."""
    cfg = GRPOConfig(**{"prompts_per_step": len(PROMPTS), "num_generations": G, "micro_batch_size": 6,
                        "beta": 0.05, "learning_rate": 1e-2, "share_prompt": share, **kw})
    return one_update(GRPOTrainer(copy.deepcopy(policy), tok, [digit_match], [1.0], cfg.settings(), seed=0), rollout)


@pytest.mark.parametrize("lora", [None, LoraConfig(r=4, alpha=8)], ids=["full", "lora"])
def test_the_update_with_the_prompt_shared_is_the_full_pass_update(setup, lora):
    """Micro-batches of 6 rows cut groups apart (each holds parts of two prompts); beta > 0, so the reference
    (for LoRA: the base model with the adapter off) is computed with the prompt shared too."""
    tok, policy, rollout = setup
    if lora is not None:
        policy = apply_lora(copy.deepcopy(policy), lora)
    full, ref_full, sums_full, loss_full = _update(tok, policy, rollout, share=False)
    fast, ref_fast, sums_fast, loss_fast = _update(tok, policy, rollout, share=True)
    mask = rollout.completion_mask.float()
    torch.testing.assert_close(ref_fast * mask, ref_full * mask, rtol=0, atol=1e-5)
    assert loss_fast == pytest.approx(loss_full, rel=1e-4, abs=1e-7)
    assert sums_fast["kl"] == pytest.approx(sums_full["kl"], rel=1e-3, abs=1e-7)
    assert full.keys() == fast.keys() and (lora is None or all("lora_" in k for k in full))
    scale = max(float(g.abs().max()) for g in full.values())
    assert scale > 1e-4, "no gradient to compare"
    for k in full:
        torch.testing.assert_close(fast[k], full[k], rtol=1e-4, atol=1e-5 * scale, msg=k)


def test_compact_generation_prefills_each_prompt_once_and_samples_the_same_tokens(setup):
    tok, policy, _ = setup
    prefill_rows = []
    hook = policy.register_forward_pre_hook(
        lambda m, args, kwargs: prefill_rows.append(kwargs["input_ids"].shape) if kwargs["input_ids"].size(1) > 1
        else None, with_kwargs=True)
    try:
        out = {}
        for share in (False, True):
            prefill_rows.clear()
            out[share] = sample_groups(policy, tok, PROMPTS, G, 6, do_sample=False, backend="compact",
                                       share_prompt=share)
            assert [s[0] for s in prefill_rows] == [len(PROMPTS) * (1 if share else G)]
        torch.manual_seed(3)
        sampled = sample_groups(policy, tok, PROMPTS, G, 6, backend="compact")
        torch.manual_seed(3)
        unshared = sample_groups(policy, tok, PROMPTS, G, 6, backend="compact", share_prompt=False)
    finally:
        hook.remove()
    assert torch.equal(out[True].completion_ids, out[False].completion_ids)
    assert torch.equal(out[True].prompt_ids, out[False].prompt_ids) and out[True].prompts == out[False].prompts
    assert torch.equal(sampled.completion_ids, unshared.completion_ids)  # same logits, same random draws


@pytest.mark.parametrize("length_normalize", [False, True])
def test_the_reward_model_scores_each_prompt_once_as_the_full_sequences_score(setup, length_normalize):
    tok, policy, rollout = setup
    model = copy.deepcopy(policy).eval()
    model.config.reward_length_normalize = length_normalize
    rm = RewardModelFunction(model, tok, beta=0.5)
    completions = [c if i % 5 else "" for i, c in enumerate(rollout.completions)]  # empty ones score EOS alone
    scores = rm(rollout.prompts, completions)
    with torch.no_grad():
        ids, attention, completion = encode_pairs(tok, rollout.prompts, completions)
        expected = 0.5 * sequence_logps(model, ids, attention, completion, length_normalize)
    torch.testing.assert_close(torch.tensor(scores), expected, rtol=1e-5, atol=1e-5)


def test_under_activation_checkpointing_training_takes_the_full_pass(setup):
    """transformers drops the KV cache in checkpointed layers in training mode, with or without gradients, so the
    prompt cannot be shared there; in eval mode (the reference) it can. A model whose forward post-processes the
    logits (Gemma's soft-capping) takes the full pass too."""
    _, policy, _ = setup
    model = copy.deepcopy(policy)
    model.activation_checkpointing_enable()
    model.train()
    assert not can_share_prompt(model)
    with torch.no_grad():
        assert not can_share_prompt(model)
    assert can_share_prompt(model.eval())
    assert can_share_prompt(copy.deepcopy(policy).train())
    capped = copy.deepcopy(policy)
    capped.config.final_logit_softcapping = 30.0
    assert not can_share_prompt(capped)


def test_the_trainer_takes_the_shared_path_and_trains_in_training_mode(setup):
    """The update's decoder sees each group's prompt once (4 prompts, not 16 rows of them); a length-1 micro-batch
    (completions cut to their EOS at once) takes the branch without a completion pass."""
    tok, policy, rollout = setup
    rollout = rollout[torch.arange(rollout.completion_ids.size(0))]
    rollout.completion_mask[:4, 1:] = 0  # the first group: one token each
    cfg = GRPOConfig(prompts_per_step=len(PROMPTS), num_generations=G, micro_batch_size=4, beta=0.05,
                     learning_rate=1e-2)
    trainer = GRPOTrainer(copy.deepcopy(policy).eval(), tok, [digit_match], [1.0], cfg.settings(), seed=0)
    assert trainer.unwrapped.training  # from_pretrained gives eval mode; the trainer trains
    calls = []
    hook = trainer.unwrapped.get_decoder().register_forward_pre_hook(  # (rows, prefill or completion pass)
        lambda m, args, kwargs: calls.append((kwargs["input_ids"].size(0), kwargs["past_key_values"].get_seq_length()
                                              == 0)), with_kwargs=True)
    n = rollout.completion_ids.size(0)
    try:
        trainer.update(GenerationBatch(rollout, torch.zeros(n), torch.zeros(n, 1), torch.linspace(-1, 1, n),
                                       torch.ones(n)))
    finally:
        hook.remove()
    prefills = [rows for rows, prefill in calls if prefill]
    completions = [rows for rows, prefill in calls if not prefill]
    assert len(prefills) == 4 and sum(prefills) < n, calls  # 4 micro-batches, each prompt once in each
    assert completions == [4, 4, 4], calls  # the micro-batch of one-token rows needs no completion pass


def test_mu_above_one_with_merged_rows_gives_the_full_pass_update(setup):
    """mu = 2: old log-probs are computed for the rows the update computes, merged ones included."""
    tok, policy, rollout = setup
    rollout = rollout[torch.arange(rollout.completion_ids.size(0))]
    rollout.completion_ids[1] = rollout.completion_ids[0]
    rollout.completion_mask[1] = rollout.completion_mask[0]
    n = rollout.completion_ids.size(0)
    advantages = torch.linspace(-1.5, 1.5, n)
    advantages[1] = advantages[0]
    out = []
    for fast in (False, True):
        cfg = GRPOConfig(prompts_per_step=len(PROMPTS), num_generations=G, micro_batch_size=5, beta=0.05, mu=2,
                         learning_rate=1e-3, share_prompt=fast, merge_identical_rows=fast)
        trainer = GRPOTrainer(copy.deepcopy(policy), tok, [digit_match], [1.0], cfg.settings(), seed=0)
        _, loss, _, _ = trainer.update(GenerationBatch(rollout, torch.zeros(n), torch.zeros(n, 1), advantages,
                                                       torch.ones(n)))
        out.append((loss, trainer.last_merged_rows))
    (loss_full, merged_full), (loss_fast, merged_fast) = out
    assert merged_full == 0 and merged_fast == 1
    assert loss_fast == pytest.approx(loss_full, rel=1e-3, abs=1e-6)  # the second update's loss: after the first


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_identical_rows_computed_once_and_weighted_give_the_same_update(setup, loss_type):
    """`grpo.merge_identical_rows`: rows 0-2 and 8-9 repeat a completion of their prompt (with its advantage); each
    set is computed once, weighted by its size. Row 3 has row 0's tokens but another advantage: kept apart."""
    tok, policy, rollout = setup
    rollout = rollout[torch.arange(rollout.completion_ids.size(0))]  # a copy to edit
    for src, dst in ((0, 1), (0, 2), (0, 3), (8, 9)):
        rollout.completion_ids[dst] = rollout.completion_ids[src]
        rollout.completion_mask[dst] = rollout.completion_mask[src]
    n = rollout.completion_ids.size(0)
    advantages = torch.linspace(-1.5, 1.5, n)
    advantages[1] = advantages[2] = advantages[0]
    advantages[9] = advantages[8]
    results = []
    for merge in (False, True):
        cfg = GRPOConfig(prompts_per_step=len(PROMPTS), num_generations=G, micro_batch_size=5, beta=0.05,
                         learning_rate=1e-2, loss_type=loss_type, merge_identical_rows=merge)
        trainer = GRPOTrainer(copy.deepcopy(policy), tok, [digit_match], [1.0], cfg.settings(), seed=0)
        grads, step = {}, trainer.optimizer.step

        def recording_step(*args, _trainer=trainer, _grads=grads, _step=step, **kwargs):
            _grads.update({k: p.grad.clone() for k, p in _trainer.unwrapped.named_parameters()})
            return _step(*args, **kwargs)

        trainer.optimizer.step = recording_step
        batch = GenerationBatch(rollout, torch.zeros(n), torch.zeros(n, 1), advantages, torch.ones(n))
        sums, loss, _, _ = trainer.update(batch)
        results.append((grads, sums, loss, trainer.last_merged_rows))
    (g_full, s_full, l_full, merged_full), (g_fast, s_fast, l_fast, merged_fast) = results
    assert merged_full == 0 and merged_fast == 3
    assert l_fast == pytest.approx(l_full, rel=1e-4, abs=1e-7)
    for k in ("kl", "entropy", "clip_ratio/region_mean"):
        assert s_fast[k] == pytest.approx(s_full[k], rel=1e-4, abs=1e-7), k
    scale = max(float(g.abs().max()) for g in g_full.values())
    for k in g_full:
        torch.testing.assert_close(g_fast[k], g_full[k], rtol=1e-4, atol=1e-5 * scale, msg=k)
