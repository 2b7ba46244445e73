"""Conversations in the data: prompts as lists of {role, content} messages pass validation when well formed,
fail under a named check when not, and are counted in tokens as the policy sees them (rendered)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grpo_steps.data.tokenizer import save_tokenizer
from grpo_steps.platform.config import load_config
from grpo_steps.stages.validate import FILES, DataValidationError, check_rows
from tests.support.stages import validate


def _rows(prompt_of) -> dict[str, list[dict]]:
    rows = {}
    for split, n in (("train", 4), ("eval", 2), ("test", 2)):
        rows[split] = [{"id": f"{split}-{i}", "prompt": prompt_of(f"{split} {i}: 2+{i}="), "answer": str(2 + i),
                        "split": split} for i in range(n)]
    for name, src in (("preferences_train", "train"), ("preferences_eval", "eval")):
        rows[name] = [{"id": f"{name}-{i}", "prompt": r["prompt"], "chosen": r["answer"],
                       "rejected": str(int(r["answer"]) + 1)} for i, r in enumerate(rows[src])]
    return rows


def _conversation(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": text}]


def _count(texts: list[str]) -> list[int]:
    return [len(t) for t in texts]


def test_well_formed_conversations_pass_and_malformed_ones_are_named():
    vcfg = load_config(None).validate_.model_copy(update={"max_prompt_tokens": 200})
    rows = _rows(_conversation)
    assert check_rows(rows, vcfg, _count).empty
    rows["train"][0]["prompt"] = [{"role": "wizard", "content": "2+0="}]
    rows["train"][1]["prompt"] = [{"role": "user", "text": "2+1="}]
    rows["train"][2]["prompt"] = []
    rows["train"][3]["prompt"] = 5
    table = check_rows(rows, vcfg, _count)
    got = {(r["row"], r["check"]) for r in table.to_dict(orient="records") if r["file"] == "train.jsonl"}
    assert {(0, "is_conversation"), (1, "is_conversation"), (2, "is_conversation"), (3, "is_string")} <= got


def test_conversations_are_checked_for_leakage_and_duplicates():
    vcfg = load_config(None).validate_.model_copy(update={"max_prompt_tokens": 200})
    rows = _rows(_conversation)
    rows["test"][0]["prompt"] = [dict(m) for m in rows["train"][1]["prompt"]]  # the same conversation
    rows["train"][3]["prompt"] = [dict(m) for m in rows["train"][2]["prompt"]]  # a repeat with another answer
    got = {(r["file"], r["row"], r["check"]) for r in check_rows(rows, vcfg, _count).to_dict(orient="records")}
    assert ("test.jsonl", 0, "prompt_not_in_train") in got and ("train.jsonl", 3, "duplicate_prompt") in got


def test_prompt_tokens_are_counted_rendered():
    vcfg = load_config(None).validate_.model_copy(update={"max_prompt_tokens": 30})
    rows = _rows(lambda text: text)
    assert check_rows(rows, vcfg, _count).empty  # "train 0: 2+0=" is 13 characters
    with_system = check_rows(rows, vcfg, _count, lambda prompts: [len("You are a careful tutor.\n\n" + p)
                                                                 for p in prompts])
    assert set(with_system["check"]) == {"max_prompt_tokens"} and len(with_system) == sum(
        len(rows[n]) for n in FILES)


@pytest.fixture
def chat_project(workdir, tmp_path_factory):
    from tests.support.chat_policy import build_chat_policy

    policy = build_chat_policy(tmp_path_factory.mktemp("policy"), hidden=16, layers=1)
    Path("data/prepared").mkdir(parents=True)
    return policy


def test_validate_counts_with_the_policys_chat_template(chat_project, workdir):
    """validate renders with the pretrained policy's tokenizer: the template's markers count as tokens."""
    for name, rows in _rows(_conversation).items():
        Path(f"data/prepared/{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = [f"model.pretrained={chat_project}", f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db"]
    save_tokenizer(Path("models/tokenizer"))  # what prepare leaves; the pretrained policy's tokenizer is used
    assert validate(load_config("params.yaml", [*base, "validate.max_prompt_tokens=200"]))["train"] == 4
    with pytest.raises(DataValidationError) as e:  # system + user + generation prompt exceed 12 tokens
        validate(load_config("params.yaml", [*base, "validate.max_prompt_tokens=12"]))
    assert set(e.value.failures["check"]) == {"max_prompt_tokens"}
