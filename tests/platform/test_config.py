"""Loading params files: what a user gets back for a good file, a bad one, an override; each error names the file,
the key and the value given."""

import pytest
import yaml

from grpo_steps.grpo.settings import GRPOSettings
from grpo_steps.platform.config import ConfigError, GRPOConfig, load_config


def test_params_hash_is_the_settings_not_the_file(workdir):
    """The lineage hash follows values only: the same settings in another key order hash alike; one changed
    value anywhere, nested or not, changes it; an override equal to the file's value changes nothing."""
    base = load_config("params.yaml")
    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    reordered = {k: (dict(reversed(list(v.items()))) if isinstance(v, dict) else v) for k, v in reversed(raw.items())}
    (workdir / "reordered.yaml").write_text(yaml.safe_dump(reordered, sort_keys=False))
    assert load_config("reordered.yaml").params_hash() == base.params_hash()
    assert load_config("params.yaml", ["grpo.beta=0.02"]).params_hash() == base.params_hash()
    changed = {load_config("params.yaml", [o]).params_hash()
               for o in ("grpo.beta=0.0", "task.rejected_mix.slip=0.5", "seed=1", "model.lora={r: 4}")}
    assert len(changed) == 4 and base.params_hash() not in changed


def test_overrides_are_yaml_values_and_the_last_one_wins(workdir):
    cfg = load_config("params.yaml", ["grpo.beta=0.0", "grpo.beta=0.1", "grpo.eval_prompts=null",
                                      "model.lora={r: 8, alpha: 16, target_modules: [q_proj]}",
                                      "task.operations=[+, '-']"])
    assert cfg.grpo.beta == 0.1 and cfg.grpo.eval_prompts is None
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.target_modules) == (8, 16.0, ["q_proj"])
    assert cfg.task.operations == ["+", "-"]


def test_unknown_key_is_named_with_the_file(workdir):
    (workdir / "bad.yaml").write_text("grpo:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\n  - grpo\.stepz: Extra inputs are not permitted \(got 3\)"):
        load_config("bad.yaml")


def test_wrong_type_is_named_with_the_value_given(workdir):
    with pytest.raises(ConfigError, match=r"grpo\.learning_rate: .*number.*\(got 'fast'\)"):
        load_config("params.yaml", ["grpo.learning_rate=fast"])


def test_an_unknown_key_gets_the_closest_declared_one(workdir):
    (workdir / "typo.yaml").write_text("grpo:\n  stepz: 3\nmodel:\n  lora: {rr: 3}\nmodle: {}\nzzz: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config("typo.yaml")
    lines = str(e.value).splitlines()[1:]
    assert "  - grpo.stepz: Extra inputs are not permitted (got 3); did you mean grpo.steps?" in lines
    assert "  - model.lora.rr: Extra inputs are not permitted (got 3); did you mean model.lora.r?" in lines
    assert "  - modle: Extra inputs are not permitted; did you mean model?" in lines
    assert "  - zzz: Extra inputs are not permitted (got 1)" in lines  # nothing close: no guess


def test_an_error_names_the_override_or_variable_that_set_it(workdir, monkeypatch):
    """A value from `--set` (or a section given whole) or from a GRPO_LAUNCH_ variable is named as such, not
    blamed on params.yaml; the last --set of a key is the one named."""
    with pytest.raises(ConfigError, match=r"params\.yaml and its overrides:\n  - grpo\.learning_rate: .*\(got 'slow'\) "
                       r"\[set by --set grpo\.learning_rate=slow\]$"):
        load_config("params.yaml", ["grpo.learning_rate=fast", "grpo.learning_rate=slow"])
    with pytest.raises(ConfigError, match=r"model\.lora\.alhpa: .*did you mean model\.lora\.alpha\? "
                       r"\[set by --set model\.lora=\{r: 4, alhpa: 3\}\]"):
        load_config("params.yaml", ["model.lora={r: 4, alhpa: 3}"])
    monkeypatch.setenv("GRPO_LAUNCH_NODES", "zero")
    with pytest.raises(ConfigError, match=r"launch\.nodes: .*\(got 'zero'\) \[set by GRPO_LAUNCH_NODES\]"):
        load_config("params.yaml")
    monkeypatch.delenv("GRPO_LAUNCH_NODES")
    (workdir / "bad.yaml").write_text("grpo:\n  learning_rate: fast\n")
    with pytest.raises(ConfigError) as e:
        load_config("bad.yaml", ["grpo.beta=0.1"])
    assert "set by" not in str(e.value)  # the file's own value: the header names the file


@pytest.mark.parametrize(("overrides", "message"), [
    (["grpo.num_generations=1"], r"grpo\.num_generations: .*greater than or equal to 2"),
    (["grpo.epsilon_high=0.1"], r"grpo\.epsilon_high \(0\.1\) must be >= grpo\.epsilon \(0\.2\)"),
    (["grpo.select_best=true", "grpo.eval_every=0"], r"select_best needs grpo\.eval_every > 0"),
    (["grpo.loss_type=bnpo"], r"use loss_type: dapo"),
    (["grpo.reward_functions=[{name: exact_match}, {name: exact_match}]"], r"reward_functions\[1\]\.name 'exact_match' "
     r"repeats grpo\.reward_functions\[0\]"),
    (["model.hidden_size=30", "model.num_heads=4"], "divisible"),
])
def test_inconsistent_settings_are_refused_saying_why(workdir, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("params.yaml", overrides)


def test_missing_file_says_which(tmp_path):
    with pytest.raises(ConfigError, match=f"configuration file not found: {tmp_path / 'nope.yaml'}"):
        load_config(tmp_path / "nope.yaml")


def test_the_algorithm_gets_its_own_settings_only(workdir):
    """`grpo.settings()` hands the trainer the algorithm's declared settings with the file's values, and none of
    the stage's (steps, reward functions, evaluation, checkpoints)."""
    cfg = load_config("params.yaml", ["grpo.beta=0.07", "grpo.steps=3"]).grpo
    algo = cfg.settings()
    assert type(algo) is GRPOSettings and algo.beta == 0.07
    assert set(algo.model_dump()) == set(GRPOSettings.model_fields)
    assert set(GRPOConfig.model_fields) - set(GRPOSettings.model_fields) == {
        "steps", "reward_functions", "eval_every", "eval_prompts", "select_best", "checkpoint_every",
        "keep_checkpoints"}
    assert not hasattr(algo, "steps")
