"""Our per-token log-probs (chunked or not) equal TRL's, values and gradients, and chunking bounds memory.

TRL computes them two ways, both checked here on the same model and inputs (bench/logprob_memory.py holds the
helpers and measures the memory at full scale):
  * `selective_log_softmax` on the model's full logits (TRL's per-token-logps path before its fused head);
  * the fused LM head TRL 1.16's `GRPOTrainer` runs (`add_fused_lm_head` + `_get_per_token_logps_and_entropies`).
Chunked against unchunked on our side alone is tests/algorithm/test_sampling_logprobs.py's job; here every variant
of ours is compared with TRL.
"""

from __future__ import annotations

import pytest
import torch

from bench.logprob_memory import (
    RSSSampler,
    build_model,
    make_inputs,
    ours_logps,
    prepare_trl_fused,
    trl_classic_logps,
)

VOCAB, HIDDEN, LAYERS, BATCH, COMPLETION = 1000, 32, 2, 5, 24
TOL = 1e-5


def _run(fn, seed: int = 0):
    """(log-probs, entropy, gradients) of the masked mean log-prob, on a fresh copy of the seeded model."""
    model = build_model(VOCAB, HIDDEN, LAYERS, 64, seed)
    ids, attention_mask, completion_mask = make_inputs(VOCAB, BATCH, COMPLETION, seed)
    logps, entropy = fn(model, ids, attention_mask)
    mask = completion_mask.float()
    (-(logps * mask).sum() / mask.sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return (logps.detach() * mask), (entropy.detach() * mask), grads


def _assert_same(ours, theirs) -> None:
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=TOL)  # log-probs
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=TOL)  # entropies
    assert ours[2].keys() == theirs[2].keys()
    for name, g in ours[2].items():
        torch.testing.assert_close(g, theirs[2][name], rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
    assert max(float(g.abs().max()) for g in ours[2].values()) > 1e-4  # the gradients compared are not all ~0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [0, 1, 2, 3])
def test_ours_equal_trl_selective_log_softmax(chunk_size, temperature):
    ours = _run(lambda m, i, a: ours_logps(m, i, a, COMPLETION, chunk_size, temperature))
    theirs = _run(lambda m, i, a: trl_classic_logps(m, i, a, COMPLETION, temperature))
    _assert_same(ours, theirs)


@pytest.mark.parametrize("chunk_size", [0, 2])
def test_ours_equal_trl_grpo_trainer_fused_head(chunk_size):
    def trl_fused(model, ids, attention_mask):
        method, stand_in = prepare_trl_fused(model, 0.7)
        logps, entropy, _ = method(stand_in, model, ids, attention_mask, COMPLETION, compute_entropy=True)
        return logps, entropy

    ours = _run(lambda m, i, a: ours_logps(m, i, a, COMPLETION, chunk_size, 0.7))
    _assert_same(ours, _run(trl_fused))


def _peak_above_baseline(fn, model, inputs) -> float:
    import psutil

    model.zero_grad(set_to_none=True)
    ids, attention_mask, completion_mask = inputs
    base = psutil.Process().memory_info().rss
    with RSSSampler() as sampler:
        logps, _ = fn(model, ids, attention_mask)
        (-(logps * completion_mask).sum()).backward()
    model.zero_grad(set_to_none=True)
    return (sampler.peak - base) / 2**20


@pytest.mark.slow  # ~8 s: test-fast stays under its 3-minute budget
def test_chunked_peak_memory_at_most_half_of_trl_full_logits():
    """chunk_size=1 keeps one row's logits; TRL's selective_log_softmax path holds the whole batch's.

    Sizes keep every (rows, L, V) tensor above glibc's largest mmap threshold (32 MiB; one row's logits are 160 x
    64,000 x 4 B = 39 MiB), so freed logits leave RSS at once and one process can measure both paths in either
    order (below it, freed heap chunks stay resident and the second measurement reads the first's leftovers).
    Full logits here: 6 x 160 x 64,000 x 4 B = 234 MiB.
    """
    vocab, batch, completion = 64_000, 6, 160
    torch.manual_seed(0)
    model = build_model(vocab, 32, 1, completion + 32, 0)
    inputs = make_inputs(vocab, batch, completion, 0)
    ours = _peak_above_baseline(lambda m, i, a: ours_logps(m, i, a, completion, 1, 1.0), model, inputs)
    theirs = _peak_above_baseline(lambda m, i, a: trl_classic_logps(m, i, a, completion, 1.0), model, inputs)
    full_logits = batch * completion * vocab * 4 / 2**20
    assert theirs > full_logits, (theirs, full_logits)  # the measurement sees TRL's full logits at all
    assert ours <= 0.5 * theirs, f"ours chunked {ours:.0f} MiB vs TRL {theirs:.0f} MiB"
