import pytest

from grpo_steps.platform.config import ConfigError, load_config


def test_defaults_load_and_params_yaml_matches_schema(workdir):
    cfg = load_config("params.yaml")
    assert cfg.grpo.num_generations >= 2
    assert cfg.params_hash() == load_config("params.yaml").params_hash()


def test_unknown_key_is_named(workdir):
    (workdir / "bad.yaml").write_text("grpo:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"grpo\.stepz"):
        load_config("bad.yaml")


def test_wrong_type_is_named(workdir):
    with pytest.raises(ConfigError, match=r"grpo\.learning_rate"):
        load_config("params.yaml", ["grpo.learning_rate=fast"])


def test_group_size_below_two_rejected(workdir):
    with pytest.raises(ConfigError, match=r"grpo\.num_generations"):
        load_config("params.yaml", ["grpo.num_generations=1"])


def test_missing_file_says_where(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_override_changes_hash(workdir):
    a = load_config("params.yaml")
    b = load_config("params.yaml", ["grpo.beta=0.0"])
    assert b.grpo.beta == 0.0 and a.params_hash() != b.params_hash()


def test_heads_must_divide_hidden(workdir):
    with pytest.raises(ConfigError, match="divisible"):
        load_config("params.yaml", ["model.hidden_size=30", "model.num_heads=4"])
