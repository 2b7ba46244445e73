import pytest
import torch

from grpo_steps.data.tokenizer import build_tokenizer
from grpo_steps.grpo.logprobs import completion_logps
from grpo_steps.grpo.sampling import mask_after_eos, sample_groups
from grpo_steps.platform.config import ModelConfig
from grpo_steps.platform.modeling import build_policy


@pytest.fixture(scope="module")
def tiny():
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = build_policy(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tok)
    return model, tok


def test_mask_keeps_up_to_first_eos_inclusive():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    mask, truncated = mask_after_eos(ids, eos_token_id=2)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_tokenizer_round_trips_and_saves(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    ids = loaded("12+34=", add_special_tokens=False)["input_ids"]
    assert len(ids) == 6 and loaded.decode(ids) == "12+34="


def test_groups_are_contiguous_and_masked(tiny):
    model, tok = tiny
    r = sample_groups(model, tok, ["1+2=", "33-4="], num_generations=3, max_new_tokens=5)
    assert r.prompts == ["1+2="] * 3 + ["33-4="] * 3
    assert r.completion_ids.shape[0] == 6 and r.completion_ids.shape[1] <= 5
    # after the first EOS, every id is padding and masked out
    for row, m in zip(r.completion_ids, r.completion_mask, strict=True):
        assert torch.all(row[m == 0] == tok.pad_token_id)


def test_chunked_logps_equal_full_logps_and_gradients(tiny):
    model, tok = tiny
    r = sample_groups(model, tok, ["1+2=", "33-4=", "7+7="], num_generations=2, max_new_tokens=5)
    c = r.completion_ids.size(1)
    full, ent_full = completion_logps(model, r.input_ids, r.attention_mask, c, compute_entropy=True)
    (full * r.completion_mask).sum().backward()
    g_full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    chunked, ent_chunked = completion_logps(model, r.input_ids, r.attention_mask, c, chunk_size=2,
                                            compute_entropy=True)
    (chunked * r.completion_mask).sum().backward()
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_chunked, ent_full, rtol=1e-5, atol=1e-5)
    for p, g in zip(model.parameters(), g_full, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    model.zero_grad()


def test_logps_match_sampling_distribution_under_left_padding(tiny):
    """The training forward must see the same positions generate used, or the ratio is off from step one."""
    model, tok = tiny
    r = sample_groups(model, tok, ["1+2=", "33-44="], num_generations=1, max_new_tokens=1, do_sample=False)
    lp, _ = completion_logps(model, r.input_ids, r.attention_mask, 1)
    for i, prompt in enumerate(["1+2=", "33-44="]):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        logits = model(input_ids=ids).logits[0, -1]
        expected = torch.log_softmax(logits, -1)[r.completion_ids[i, 0]]
        assert lp[i, 0].item() == pytest.approx(expected.item(), abs=1e-5)
