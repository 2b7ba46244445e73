"""The likelihood reward model (the default head): its math, its start from the starting policy, the stage's
report per kind of rejected answer, and the stages' explicit precision (no state leaking from one to the next)."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch
from mlflow import MlflowClient

from grpo_steps.data.prompts import render
from grpo_steps.data.task import REJECTED_KINDS, make_preference_pairs, make_splits, sloppy_answer, wrong_answer_of_kind
from grpo_steps.grpo.reward_model import (
    RewardModelFunction,
    bradley_terry_loss,
    encode_pairs,
    is_likelihood_model,
    sequence_logps,
)
from grpo_steps.platform.modeling import build_policy, load_reward_model, load_tokenizer
from grpo_steps.stages import train_reward as stage
from tests.support.grpo_inputs import assert_identical, config, weights
from tests.support.project import load_tiny
from tests.support.stages import train_grpo, train_reward


def test_bradley_terry_loss_is_the_formula():
    c, r = torch.tensor([2.0, 1.0, 0.5]), torch.tensor([1.0, -1.0, 0.5])
    expected = -sum(math.log(1 / (1 + math.exp(-(a - b)))) for a, b in zip(c.tolist(), r.tolist(), strict=True)) / 3
    assert bradley_terry_loss(c, r).item() == pytest.approx(expected, rel=1e-6)
    m = torch.tensor([0.5, 0.5, 0.5])
    assert bradley_terry_loss(c, r, m).item() == pytest.approx(bradley_terry_loss(c - 0.5, r).item(), rel=1e-6)
    assert bradley_terry_loss(c, r).item() < bradley_terry_loss(r, c).item(), "ranking right costs less"


def test_sequence_logps_sum_the_completion_tokens_only(project):
    cfg = load_tiny(project)
    tok = load_tokenizer(cfg.paths.tokenizer())
    torch.manual_seed(0)
    model = build_policy(cfg.model, tok).eval()
    prompts, completions = ["12+3=", "7+45="], ["15", "52"]
    ids, attention, completion = encode_pairs(tok, prompts, completions)
    assert ids.shape[0] == 2 and completion.sum(1).tolist() == [3, 3]  # two digits + EOS each
    with torch.no_grad():
        got = sequence_logps(model, ids, attention, completion)
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):  # one sequence at a time, no padding
            seq = torch.tensor([tok(p)["input_ids"] + tok(c)["input_ids"] + [tok.eos_token_id]])
            logp = model(seq).logits.log_softmax(-1)[0, :-1].gather(1, seq[0, 1:, None])[:, 0]
            assert got[i].item() == pytest.approx(logp[len(tok(p)["input_ids"]) - 1 :].sum().item(), abs=1e-5)


def test_likelihood_reward_model_starts_as_the_starting_policy(project):
    """init: policy means the policy's own weights and LM head: before training, the score is the policy's
    log-likelihood of the completion."""
    cfg = load_tiny(project)
    model, tok = stage.build_reward_model(cfg)
    assert is_likelihood_model(model)
    policy = load_reward_model(cfg.paths.sft_policy())  # a causal LM folder loads as a likelihood model
    assert is_likelihood_model(policy)
    for (name, a), (_, b) in zip(model.named_parameters(), policy.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    prompts, completions = ["1+2=", "30+4="], ["3", "99"]
    ids, attention, completion = encode_pairs(tok, prompts, completions)
    with torch.no_grad():
        expected = sequence_logps(policy, ids, attention, completion).tolist()
    assert RewardModelFunction(model, tok, beta=2.0)(prompts, completions) == pytest.approx(
        [2 * e for e in expected], abs=1e-5)


def test_train_reward_likelihood_head_report_per_kind_and_margin(project, monkeypatch):
    seen = []

    def spy(chosen, rejected, margin=None):
        seen.append(margin)
        return bradley_terry_loss(chosen, rejected, margin)

    monkeypatch.setattr(stage, "bradley_terry_loss", spy)
    cfg = load_tiny(project, "reward_model.margin=0.25", "reward_model.beta=0.5")
    metrics = train_reward(cfg)
    assert seen and all(m is not None and torch.all(m == 0.25) for m in seen), "the margin reaches the loss"
    report = json.loads((cfg.paths.reports() / "reward_model.json").read_text())
    assert report["head"] == "likelihood" and report["init"] == "policy"
    kinds = report["by_kind"]
    assert set(kinds) <= set(REJECTED_KINDS) and sum(k["n"] for k in kinds.values()) == report["n_eval_pairs"]
    assert report["pairwise_accuracy"] == pytest.approx(
        sum(k["pairwise_accuracy"] * k["n"] for k in kinds.values()) / report["n_eval_pairs"])
    model = load_reward_model(cfg.paths.reward_model())
    assert is_likelihood_model(model) and model.config.reward_beta == 0.5
    assert RewardModelFunction(model).beta == 0.5

    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    (run,) = client.search_runs([exp.experiment_id], "tags.stage = 'train_reward'")
    assert run.data.metrics["reward_model/pairwise_accuracy"] == pytest.approx(metrics["pairwise_accuracy"])
    assert "reward_model/train/loss" in run.data.metrics
    assert {f"reward_model/pairwise_accuracy/{k}" for k in kinds} <= set(run.data.metrics)
    assert run.data.tags["reward_init"] == "policy"


def test_likelihood_reward_model_needs_the_starting_policy(project):
    cfg = load_tiny(project)
    shutil.rmtree(cfg.paths.sft_policy())
    with pytest.raises(FileNotFoundError, match="stage sft"):
        stage.build_reward_model(cfg)


def test_rejected_answers_have_the_kind_they_say():
    rng = random.Random(0)
    problems = make_splits(0, {"train": 300}, 49, ["+"])["train"]
    for p in problems:
        for kind in REJECTED_KINDS:
            wrong, got = wrong_answer_of_kind(rng, p.answer, p.prompt, {kind: 1.0, "random": 1e-9})
            assert wrong != p.answer
            if got == "slip":
                assert wrong == sloppy_answer(p.prompt)
            elif got == "offset":
                assert int(wrong) - int(p.answer) in (-10, -2, -1, 1, 2, 10)
            elif got == "digit":
                assert len(wrong.lstrip("-")) <= len(p.answer) and sum(
                    a != b for a, b in zip(wrong.zfill(len(p.answer)), p.answer, strict=False)) == 1
            if kind == "slip" and sloppy_answer(p.prompt) is None:
                assert got != "slip", "no slip where the teacher cannot slip"
    pairs = make_preference_pairs(0, problems, 2000)
    shares = {k: sum(x["kind"] == k for x in pairs) / len(pairs) for k in REJECTED_KINDS}
    assert shares["slip"] > 0.12 and all(shares[k] > 0.05 for k in REJECTED_KINDS)


def test_grpo_update_is_the_same_after_an_in_process_bf16_trainer(ready):
    """accelerate's AcceleratorState is process-wide: a trainer that ran before under bf16 (TRL's default)
    must not make the grpo stage train under bf16 autocast. Same weights with and without it."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState


    cfg = config(ready, "grpo.steps=2", "grpo.checkpoint_every=0")
    train_grpo(cfg)
    clean = weights(cfg.paths.grpo_policy())
    shutil.rmtree(ready / "models" / "grpo_checkpoints")

    AcceleratorState._reset_state()  # as in a fresh process, where an in-process SFT under TRL's defaults
    Accelerator(cpu=True, mixed_precision="bf16")  # leaves this behind
    assert AcceleratorState().mixed_precision == "bf16"
    train_grpo(cfg)
    assert AcceleratorState().mixed_precision == "no"
    assert_identical(weights(cfg.paths.grpo_policy()), clean)


def test_trainers_get_the_configured_precision(workdir):
    from grpo_steps.platform.config import load_config
    from grpo_steps.platform.modeling import trainer_precision

    cpu = trainer_precision(load_config("params.yaml").model)
    assert cpu == {"bf16": False, "fp16": False, "activation_checkpointing": False}, "fp32, no checkpointing"
    bf16 = trainer_precision(load_config("params.yaml", ["model.precision=bf16",
                                                         "model.activation_checkpointing=true"]).model)
    assert bf16 == {"bf16": True, "fp16": False, "activation_checkpointing": True}
    import warnings

    from trl import SFTConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers 5 deprecates `gradient_checkpointing`
        args = SFTConfig(output_dir=str(workdir), use_cpu=True, report_to=[], **cpu)
    assert args.activation_checkpointing is False and args.gradient_checkpointing is False


def test_likelihood_scores_on_a_bpe_tokenizer_with_bos(tmp_path):
    """The same scorer on a byte-level BPE tokenizer (trained here) that adds BOS, on a small Llama: the
    completion mask covers exactly the completion's tokens and EOS, and a trained-in answer outranks others."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    text = ["Question: what is 23 plus 48? Answer: 71", "The answer is 71. #### 71"] * 50
    core.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<unk>"]))
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="</s>")
    prompt, answer = render(tok, "Question: what is 23 plus 48? Answer:"), " 71"  # as every stage renders it
    ids, attention, completion = encode_pairs(tok, [prompt, prompt], [answer, " 61"])
    n_prompt = len(tok("Question: what is 23 plus 48? Answer:")["input_ids"])
    assert ids[0, 0].item() == tok.bos_token_id, "BOS from the tokenizer's own template"
    expected = len(tok(answer, add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert completion[0].sum().item() == expected and completion[0, :n_prompt].sum().item() == 0

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                                         pad_token_id=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):  # teach the right answer by Bradley-Terry on this one pair
        scores = sequence_logps(model, ids, attention, completion)
        loss = bradley_terry_loss(scores[:1], scores[1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    tok.save_pretrained(str(tmp_path))
    right, wrong = RewardModelFunction(model.eval(), tok)([prompt, prompt], [answer, " 61"])
    assert right > wrong


def test_length_normalized_score_is_the_mean_log_prob_per_completion_token():
    from grpo_steps.data.tokenizer import build_tokenizer
    from grpo_steps.platform.config import load_config

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = load_config(None).model.model_copy(update={"hidden_size": 16, "num_layers": 1, "num_heads": 2,
                                                     "intermediate_size": 32})
    model = build_policy(cfg, tok).eval()
    ids, attention, completion = encode_pairs(tok, ["1+1=", "1+1="], ["2", "2222"])
    total = sequence_logps(model, ids, attention, completion)
    mean = sequence_logps(model, ids, attention, completion, length_normalize=True)
    lengths = completion[:, 1:].sum(-1).float()  # completion tokens + EOS
    assert torch.allclose(mean, total / lengths) and lengths.tolist() == [2.0, 5.0]
    model.config.reward_length_normalize = True
    assert RewardModelFunction(model, tok)(["1+1="], ["2"]) == pytest.approx([mean[0].item()], abs=1e-5)
