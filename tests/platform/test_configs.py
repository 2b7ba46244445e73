"""The shipped params files (params.yaml and configs/*.yaml for real models): they validate, hold every key
dvc.yaml declares (so `cp configs/X.yaml params.yaml && dvc exp run` works as well as `grpo run --params`), and say
what the README promises of them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from grpo_steps.platform.config import Config, load_config
from grpo_steps.stages import STAGES
from tests.conftest import ROOT

CONFIGS = [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]


def _has(tree: dict, dotted: str) -> bool:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_validates_and_has_every_key_dvc_reads(path: Path):
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    missing = sorted({k for s in STAGES.values() for k in s.params if not _has(raw, k)})
    assert not missing, f"{path.name} lacks params keys dvc.yaml declares: {missing}"
    # every value the file states is the value the stages get: none dropped, renamed or changed by validation
    changed = _differences(raw, cfg.as_dict())
    assert not changed, f"{path.name}: settings whose validated value differs from the file's: {changed}"


def _differences(stated, held, where: str = "") -> list[str]:
    """Dotted keys whose value in the file (`stated`) is not the validated config's (`held`); entries the file
    leaves out (defaults filled in) are not differences."""
    if isinstance(stated, dict):
        if not isinstance(held, dict):
            return [where]
        keys = {k: f"{where}.{k}".lstrip(".") for k in stated}
        return [d for k, v in stated.items() for d in (_differences(v, held[k], keys[k]) if k in held else [keys[k]])]
    if isinstance(stated, list):
        if not isinstance(held, list) or len(held) != len(stated):
            return [where]
        return [d for i, (a, b) in enumerate(zip(stated, held, strict=True))
                for d in _differences(a, b, f"{where}[{i}]")]
    return [] if stated == held else [f"{where}: {stated!r} -> {held!r}"]


def test_a_changed_value_is_reported_by_its_key():
    """The check above can fail: a value the config does not hold as stated is named."""
    assert _differences({"grpo": {"beta": 0.02, "steps": 5}}, {"grpo": {"beta": 0.02, "steps": 6, "mu": 1}}) == [
        "grpo.steps: 5 -> 6"]
    assert _differences({"grpo": {"reward_functions": [{"name": "a"}]}},
                        {"grpo": {"reward_functions": [{"name": "b", "weight": 1.0}]}}) == [
        "grpo.reward_functions[0].name: 'a' -> 'b'"]
    assert _differences({"gone": 1}, {}) == ["gone"]


def _keys(tree, where: str = "") -> set[str]:
    """Every setting's dotted key in a config tree (a list is one setting's value)."""
    if not isinstance(tree, dict):
        return {where}
    return {k for name, v in tree.items() for k in _keys(v, f"{where}.{name}".lstrip("."))}


def test_params_yaml_states_every_setting_at_its_declared_default():
    """Each setting is declared once (type, default, doc: grpo/settings.py, data/settings.py,
    platform/config.py); params.yaml is that declaration written out, so the default run and a config built
    from the declarations (`Config()`, what a missing key falls back to) are the same run."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    declared = Config().as_dict()
    assert _keys(declared) - _keys(raw) == set(), "settings params.yaml does not state"
    assert _differences(raw, declared) == [], "params.yaml values that are not the declared defaults"


def _undocumented(model: type[BaseModel], where: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        key = f"{where}.{field.alias or name}".lstrip(".")
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += _undocumented(field.annotation, key)
        elif not (field.description or "").strip():
            out.append(key)
    return out


def test_every_setting_is_declared_with_a_doc():
    """The declarations tell what each setting does: none is a bare default."""
    assert _undocumented(Config) == []


def test_the_declaration_check_sees_a_default_restated_differently():
    """The check above can fail: a value stated other than its declaration, or a setting left out, is named."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["grpo"]["beta"] = 0.5
    del raw["sft"]["weight_decay"]
    declared = Config().as_dict()
    assert _differences(raw, declared) == ["grpo.beta: 0.5 -> 0.02"]
    assert _keys(declared) - _keys(raw) == {"sft.weight_decay"}


def test_the_gsm8k_config_is_the_real_path():
    cfg = load_config(ROOT / "configs" / "gsm8k-qwen2.5-0.5b-instruct.yaml")
    assert cfg.model.pretrained == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.model.precision == "bf16"
    assert cfg.data.is_gsm8k and cfg.data.chat_template is True and "####" in cfg.data.system_prompt
    assert cfg.grpo.max_completion_length == 512 and cfg.grpo.mask_truncated_completions
    names = [rf.name for rf in cfg.grpo.reward_functions]
    assert names[0] == "math_accuracy" and "overlong_penalty" in names and cfg.evaluate.accuracy == "math_accuracy"


def test_the_long_reasoning_config_writes_completions_of_128_to_256_tokens_that_fit_its_limits():
    """configs/reasoning-long-cpu.yaml's cold-start completions, counted with the BPE tokenizer its prepare
    stage trains: long (most 128 tokens or more, as a reasoning model's), and every one inside the validate
    and generation limits, so neither validation nor GRPO's truncation cuts them."""
    import statistics

    from grpo_steps.data.prompts import render
    from grpo_steps.data.tokenizer import build_bpe_tokenizer
    from grpo_steps.stages.prepare import synthetic_rows, task_corpus

    cfg = load_config(ROOT / "configs" / "reasoning-long-cpu.yaml",
                      ["task.n_train=400", "task.n_eval=20", "task.n_test=20", "task.n_preference_pairs=100"])
    rows = synthetic_rows(cfg)
    tok = build_bpe_tokenizer(task_corpus(rows, None), cfg.task.bpe_vocab_size)
    lengths = [len(tok(r["demonstration"])["input_ids"]) + 1 for r in rows["train"]]  # + EOS
    assert statistics.median(lengths) >= 128 and sum(n >= 128 for n in lengths) >= 0.95 * len(lengths)
    assert max(lengths) <= min(cfg.validate_.completion_tokens(), cfg.grpo.max_completion_length) <= 256
    prompts = [len(tok(render(tok, r["prompt"], None))["input_ids"]) for r in rows["test"]]
    assert max(prompts) <= cfg.validate_.max_prompt_tokens
    assert max(prompts) + cfg.grpo.max_completion_length <= cfg.model.max_position_embeddings
    assert cfg.task.working == "verbose" and cfg.grpo.micro_batch_tokens
    # the prepare stage's rows carry the verbose working: demonstrations and both sides of every pair
    pairs = rows["preferences_train"]
    assert all("so far" in r["demonstration"] for r in rows["train"])
    assert all("so far" in r["chosen"] and "so far" in r["rejected"] for r in pairs)
    slips = [r for r in pairs if r["kind"] == "slip"]  # the teacher's: the carries the chosen working makes, left out
    assert slips and all("carry 1" in r["chosen"] and "carry" not in r["rejected"] for r in slips)
