"""Your model, your data: a Llama-shaped policy saved locally (byte-level BPE, ChatML chat template) and a
GSM8K-style file whose answers reason and end in `#### <n>`, through every stage, offline.

Checked: the seven stages run, register included; each stage renders prompts through the chat template (the
markers and the system prompt are in what sft, train_reward, grpo, evaluate and validate see); the cold start
runs on the pretrained policy
(`sft.enabled: true`) on the worked solutions; the math-verify accuracy reward and the format reward score
grpo's completions; evaluation reports maj@k beside pass@k. A file of conversations runs the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from grpo_steps.platform.config import load_config
from tests.support.chat_policy import START, build_chat_policy, gsm8k_rows, write_gsm8k
from tests.support.stages import evaluate, prepare, register, sft, train_grpo, train_reward, validate

SYSTEM = "You are a careful math tutor. Show your work, then give the answer after ####."


def _overrides(workdir: Path, policy: Path, train: Path, *extra: str) -> list[str]:
    return [
        "data.source=files", f"data.train={train}", f"data.system_prompt={json.dumps(SYSTEM)}",
        "data.eval_fraction=0.15", "data.test_fraction=0.15",
        f"model.pretrained={policy}", "sft.enabled=true", "sft.max_steps=4", "sft.batch_size=8",
        "validate.max_prompt_tokens=256", "validate.max_completion_tokens=128",
        "reward_model.epochs=1", "reward_model.batch_size=8", "reward_model.min_pairwise_accuracy=0.0",
        "grpo.steps=2", "grpo.prompts_per_step=2", "grpo.num_generations=2", "grpo.max_completion_length=24",
        "grpo.checkpoint_every=0", "grpo.mask_truncated_completions=true",
        "grpo.reward_functions=[{name: math_accuracy, kwargs: {timeout_s: 2}}, {name: format, weight: 0.2, "
        "kwargs: {pattern: '.*#### *-?[0-9.,]+\\s*'}}, {name: reward_model, weight: 0.1}]",
        "evaluate.pass_k=2", "evaluate.compare_champion=false",
        f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db", "tracking.system_metrics=false", *extra,
    ]


@pytest.fixture
def rendered(monkeypatch):
    """Every prompt text each stage renders, by stage (the stage modules' own `render` / `render_all`)."""
    import grpo_steps.stages.evaluate
    import grpo_steps.stages.grpo
    import grpo_steps.stages.sft
    import grpo_steps.stages.train_reward
    import grpo_steps.stages.validate
    from grpo_steps.data import prompts

    seen: dict[str, list[str]] = {}

    def spy(stage, fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            seen.setdefault(stage, []).extend(out if isinstance(out, list) else [out])
            return out
        return wrapped

    for stage, module in (("sft", grpo_steps.stages.sft), ("train_reward", grpo_steps.stages.train_reward)):
        monkeypatch.setattr(module, "render", spy(stage, prompts.render))
    for stage, module in (("validate", grpo_steps.stages.validate), ("grpo", grpo_steps.stages.grpo),
                          ("evaluate", grpo_steps.stages.evaluate)):
        monkeypatch.setattr(module, "render_all", spy(stage, prompts.render_all))
    return seen


def _run_all(cfg) -> dict:
    prepare(cfg)
    validate(cfg)
    sft(cfg)
    train_reward(cfg)
    train_grpo(cfg)
    metrics = evaluate(cfg)
    reg = register(cfg)
    assert reg["alias"] == "champion" and reg["version"] == "1"
    return metrics


@pytest.mark.slow  # six stages on a small Llama, ~10 s: kept out of test-fast, which is near its 3-minute budget
def test_gsm8k_file_on_a_chat_policy_through_every_stage(workdir, tmp_path_factory, rendered):
    policy = build_chat_policy(tmp_path_factory.mktemp("policy"), hidden=32, layers=2)
    train = write_gsm8k(workdir / "gsm8k.jsonl", 60)
    cfg = load_config("params.yaml", _overrides(workdir, policy, train, "data.gsm8k=true"))
    metrics = _run_all(cfg)

    assert set(rendered) == {"validate", "sft", "train_reward", "grpo", "evaluate"}
    for stage, texts in rendered.items():
        assert texts and all(t.startswith(f"{START}system\n{SYSTEM}") and t.endswith(f"{START}assistant\n")
                             for t in texts), stage
    train_rows = [json.loads(line) for line in cfg.paths.validated_file("train").read_text().splitlines()]
    assert all(r["demonstration"].endswith(f"#### {r['answer']}") for r in train_rows)
    assert json.loads(cfg.paths.reward_report().read_text())["n_train_pairs"] > 0

    client = MlflowClient(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    (grpo_run,) = client.search_runs([exp.experiment_id], "tags.stage = 'grpo'")
    for key in ("rewards/math_accuracy/mean", "rewards/format/mean", "rewards/reward_model/mean"):
        assert key in grpo_run.data.metrics, key
    (sft_run,) = client.search_runs([exp.experiment_id], "tags.stage = 'sft'")
    assert "sft/train_loss" in sft_run.data.metrics, "the cold start ran on the pretrained policy"
    for key in ("accuracy", "pass_at_2", "maj_at_2", "sampled_accuracy"):
        assert 0.0 <= metrics["grpo"][key] <= 1.0, key


@pytest.mark.slow  # ~6 s, as above
def test_a_file_of_conversations_runs_too(workdir, tmp_path_factory, rendered):
    policy = build_chat_policy(tmp_path_factory.mktemp("policy"), hidden=32, layers=1)
    rows = [{"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"].rsplit("#### ", 1)[1],
             "demonstration": r["answer"]} for r in gsm8k_rows(40, seed=3)]
    train = workdir / "chats.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config("params.yaml", _overrides(workdir, policy, train))
    metrics = _run_all(cfg)
    assert 0.0 <= metrics["grpo"]["accuracy"] <= 1.0
    prepared = [json.loads(line) for line in cfg.paths.validated_file("test").read_text().splitlines()]
    assert all(isinstance(r["prompt"], list) and r["prompt"][0]["role"] == "user" for r in prepared)
    assert all(t.endswith(f"{START}assistant\n") for t in rendered["grpo"])


@pytest.mark.slow  # ~30 s on 2 cores
def test_the_gsm8k_config_runs_with_a_stand_in_for_the_hub_model(workdir, tmp_path_factory):
    """configs/gsm8k-qwen2.5-0.5b-instruct.yaml as shipped (chat template, DAPO loss, masked truncation,
    overlong penalty, format and math-verify rewards, bf16, activation checkpointing, a length-normalised
    reward model), with the local chat policy in place of the hub model and sizes cut to seconds."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.conftest import ROOT

    policy = build_chat_policy(tmp_path_factory.mktemp("policy"), hidden=32, layers=1)
    folder = workdir / "data" / "gsm8k" / "main"
    folder.mkdir(parents=True)
    for split, n, seed in (("train", 40, 1), ("test", 8, 2)):
        pq.write_table(pa.Table.from_pylist(gsm8k_rows(n, seed)), folder / f"{split}-00000-of-00001.parquet")
    cfg = load_config(ROOT / "configs" / "gsm8k-qwen2.5-0.5b-instruct.yaml", [
        f"model.pretrained={policy}", "data.eval_fraction=0.2",
        "reward_model.batch_size=8", "reward_model.min_pairwise_accuracy=0.0", "grpo.steps=1",
        "grpo.prompts_per_step=2", "grpo.num_generations=2",
        "grpo.micro_batch_size=4", "grpo.max_completion_length=144", "evaluate.pass_k=2",
        "evaluate.compare_champion=false", f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db",
        "tracking.system_metrics=false"])
    assert cfg.model.precision == "bf16" and cfg.grpo.loss_type == "dapo" and cfg.reward_model.length_normalize
    metrics = _run_all(cfg)
    assert {"accuracy", "maj_at_2", "pass_at_2"} <= set(metrics["grpo"])
