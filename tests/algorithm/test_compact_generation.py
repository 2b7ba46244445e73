"""`grpo.generation_backend: compact`: a KV-cached decoding loop that drops finished rows from the batch, and
samples what `generate` samples."""

from __future__ import annotations

import pytest
import torch

from grpo_steps.data.tokenizer import build_tokenizer
from grpo_steps.grpo.sampling import generate_compact, sample_groups
from grpo_steps.platform.config import ModelConfig
from grpo_steps.platform.modeling import build_policy

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")  # tests/algorithm/conftest.py

PROMPTS = ["12+34=", "7+8=", "55+45=", "3+9=", "1+1="]


def _policy(tok, eos_boost: float = 0.0):
    torch.manual_seed(0)
    model = build_policy(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                     max_position_embeddings=128), tok)
    if eos_boost:  # an EOS that comes at varied lengths (tied embeddings: its row scales its logit)
        with torch.no_grad():
            model.get_input_embeddings().weight[tok.eos_token_id] *= eos_boost
    return model.eval()


def test_greedy_compact_equals_greedy_generate_token_for_token():
    tok = build_tokenizer()
    for boost in (0.0, 30.0):
        model = _policy(tok, boost)
        hf = sample_groups(model, tok, PROMPTS, 2, 12, do_sample=False, backend="hf")
        compact = sample_groups(model, tok, PROMPTS, 2, 12, do_sample=False, backend="compact")
        assert torch.equal(compact.completion_ids, hf.completion_ids)
        assert torch.equal(compact.completion_mask, hf.completion_mask) and compact.completions == hf.completions


def test_finished_rows_leave_the_batch():
    tok = build_tokenizer()
    model = _policy(tok, 30.0)
    calls = []
    model.register_forward_hook(lambda mod, args, kwargs, out: calls.append(kwargs["input_ids"].size(0)),
                                with_kwargs=True)
    enc = tok([p for p in PROMPTS for _ in range(4)], return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(1)
    out = generate_compact(model, enc["input_ids"], enc["attention_mask"], 24, tok.eos_token_id, tok.pad_token_id)
    lengths = [(row == tok.eos_token_id).nonzero()[0].item() + 1 if (row == tok.eos_token_id).any() else 24
               for row in out]
    assert len(set(lengths)) > 2, lengths  # varied lengths: the point of the backend
    assert calls[0] == 20 and calls == sorted(calls, reverse=True) and calls[-1] < 20  # the batch shrinks
    # each decoding step runs the rows still going: as many forwards per row as its length (prefill included)
    assert sum(calls) == sum(lengths)


def test_sampling_follows_the_same_distribution_as_generate():
    """First-token frequencies over many draws: the same softmax(logits / T) on both backends."""
    tok = build_tokenizer()
    model = _policy(tok)
    draws = {}
    for backend in ("hf", "compact"):
        torch.manual_seed(2)
        r = sample_groups(model, tok, ["12+34="], 2000, 1, temperature=0.7, backend=backend)
        draws[backend] = torch.bincount(r.completion_ids[:, 0], minlength=len(tok)).float() / 2000
    assert (draws["hf"] - draws["compact"]).abs().max() < 0.05


def test_the_uniforms_hashed_by_blocks_are_each_rows_own_stream(monkeypatch):
    """Each block of positions hashes the uniforms of the rows still decoding at once; whatever the block, a row
    draws the uniforms of its own stream at each position, as `RowStreams.uniforms` gives them one by one."""
    import grpo_steps.grpo.sampling as sampling
    from grpo_steps.grpo.sampling import RowStreams

    tok = build_tokenizer()
    model = _policy(tok, eos_boost=30.0)  # rows finish at varied lengths, so rows leave mid-block
    runs = []
    for block in (256, 3, 1):
        monkeypatch.setattr(sampling, "UNIFORM_BLOCK", block)
        runs.append(sample_groups(model, tok, PROMPTS, 4, 20, streams=RowStreams(7, first=5)))
    lengths = runs[0].completion_mask.sum(1)
    assert len(set(lengths.tolist())) > 2 and int(lengths.max()) > 3  # finished rows left within a block
    for other in runs[1:]:
        assert torch.equal(other.completion_ids, runs[0].completion_ids)
    rows = torch.arange(len(PROMPTS) * 4)
    table = RowStreams(7, first=5).uniforms(rows.unsqueeze(1), torch.arange(20).unsqueeze(0))
    for t in (0, 4, 19):
        assert torch.equal(table[:, t], RowStreams(7, first=5).uniforms(rows, t))
