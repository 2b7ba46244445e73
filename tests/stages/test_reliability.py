"""Reliability of the grpo stage: non-finite losses, bad params, missing inputs, safe loading, secrets,
concurrent runs, multi-process writes. Resumable checkpoints are in tests/platform/test_checkpoint.py."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.support.grpo_inputs import (
    SUBPROCESS_ENV,
    config,
    output_of,
    overrides,
    popen_grpo,
    weights,
)


def _tree_digest(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _no_model_loading(monkeypatch):
    import grpo_steps.stages.grpo as tg

    def boom(*_a, **_k):
        raise AssertionError("a model was loaded before the check failed")

    monkeypatch.setattr(tg, "load_policy", boom)
    monkeypatch.setattr(tg, "load_tokenizer", boom)
    monkeypatch.setattr(tg, "load_reward_model", boom)


# ------------------------------------------------------------------------------------ non-finite values

SPIKY = '''
import math

calls = 0
spikes = set()


def spiky(prompts, completions, **_):
    """0.0 everywhere, except +inf for one completion on the calls listed in `spikes` (one call per step)."""
    global calls
    calls += 1
    out = [0.0] * len(completions)
    if calls in spikes:
        out[0] = math.inf
    return out
'''


def test_inf_reward_step_is_skipped_and_counted(ready, monkeypatch):
    from tests.support.stages import train_grpo

    name = f"spiky_{uuid.uuid4().hex[:8]}"
    (ready / f"{name}.py").write_text(SPIKY)
    monkeypatch.syspath_prepend(str(ready))
    import importlib

    importlib.import_module(name).spikes = {2}
    rf = f"grpo.reward_functions=[{{name: digit_match}}, {{name: '{name}:spiky'}}]"
    summary = train_grpo(config(ready, rf, "grpo.steps=3", "grpo.checkpoint_every=0"))

    assert summary["skipped_steps"] == 1
    state = json.loads(next((ready / "models" / "grpo_checkpoints").glob("*/step-000003/trainer_state.json"))
                       .read_text())
    history = state["trainer"]["history"]
    assert [m["skipped_steps"] for m in history] == [0.0, 1.0, 1.0]
    assert not math.isfinite(history[1]["loss"])  # the skipped step: its loss, as computed
    assert all(torch.isfinite(t).all() for t in weights(ready / "models" / "grpo").values())


def _nan_loss(monkeypatch, on_calls=None):
    """Make the policy loss NaN on the given calls (one call per step here), or on every call."""
    import grpo_steps.grpo.trainer as trainer_mod

    real = trainer_mod.policy_loss
    calls = {"n": 0}

    def nan_loss(*args, **kwargs):
        calls["n"] += 1
        loss, stats = real(*args, **kwargs)
        if on_calls is None or calls["n"] in on_calls:
            loss = loss * float("nan")
        return loss, stats

    monkeypatch.setattr(trainer_mod, "policy_loss", nan_loss)


def test_nan_loss_step_is_skipped_then_training_goes_on(ready, monkeypatch):
    from tests.support.stages import train_grpo

    _nan_loss(monkeypatch, on_calls={1})
    summary = train_grpo(config(ready, "grpo.steps=3"))
    assert summary["skipped_steps"] == 1 and summary["steps"] == 3
    csv = (ready / "reports" / "grpo_steps.csv").read_text().splitlines()
    assert len(csv) == 4  # header + 3 steps, the skipped one included
    assert all(torch.isfinite(t).all() for t in weights(ready / "models" / "grpo").values())


def test_consecutive_nan_losses_stop_and_nothing_is_written(ready, monkeypatch):
    from grpo_steps.grpo.trainer import NonFiniteLossError
    from tests.support.stages import train_grpo

    previous = ready / "models" / "grpo"  # the output of an earlier good run must survive untouched
    shutil.copytree(ready / "models" / "sft", previous)
    before = _tree_digest(previous)
    _nan_loss(monkeypatch)
    cfg = config(ready, "grpo.steps=6", "grpo.checkpoint_every=0", "grpo.max_consecutive_nonfinite=2")
    with pytest.raises(NonFiniteLossError, match=r"2 consecutive steps.*grpo\.max_consecutive_nonfinite=2"):
        train_grpo(cfg)
    assert _tree_digest(previous) == before
    assert not (ready / "reports" / "grpo_steps.csv").exists()
    assert not list((ready / "models").glob("grpo_checkpoints/*/step-*"))


def test_cli_exit_code_2_on_nonfinite_loss(ready, monkeypatch, capsys):
    from grpo_steps.cli import main

    _nan_loss(monkeypatch)
    sets = [x for o in overrides(ready, "grpo.max_consecutive_nonfinite=1") for x in ("--set", o)]
    assert main(["grpo", "--params", "params.yaml", *sets]) == 2
    err = capsys.readouterr().err
    assert "grpo grpo: error:" in err and "non-finite" in err
    assert not (ready / "models" / "grpo").exists()


# ------------------------------------------------------------------------------------------ bad params


@pytest.mark.parametrize("override, message", [
    ("grpo.epsilon_high=0.1", r"grpo\.epsilon_high \(0\.1\) must be >= grpo\.epsilon \(0\.2\)"),
    ("grpo.reward_functions=[]", r"grpo\.reward_functions is empty"),
    ("grpo.reward_functions=[{name: exact_match}, {name: digit_match}, {name: exact_match}]",
     r"grpo\.reward_functions\[2\]\.name 'exact_match' repeats grpo\.reward_functions\[0\]"),
    ("grpo.reward_functions=[{name: exact_match, weight: .inf}]", r"grpo\.reward_functions\[0\]\.weight .*finite"),
    ("grpo.reward_functions=[{name: exact_match}, {name: digit_match, weight: .nan}]",
     r"grpo\.reward_functions\[1\]\.weight .*finite"),
    ("grpo.checkpoint_every=-1", r"grpo\.checkpoint_every"),
    ("grpo.keep_checkpoints=0", r"grpo\.keep_checkpoints"),
    ("model.trust_remote_code=sometimes", r"model\.trust_remote_code"),
])
def test_bad_params_are_rejected_naming_the_key(workdir, override, message):
    from grpo_steps.platform.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config("params.yaml", [override])


def test_good_edge_params_load(workdir):
    from grpo_steps.platform.config import load_config

    cfg = load_config("params.yaml", ["grpo.epsilon_high=0.2", "grpo.checkpoint_every=0",
                                      "grpo.reward_functions=[{name: exact_match, weight: -1.0}]"])
    assert cfg.grpo.epsilon_high == cfg.grpo.epsilon and cfg.grpo.checkpoint_every == 0
    assert cfg.model.trust_remote_code is False  # off unless params.yaml says otherwise


def test_cli_bad_params_exit_2_before_any_work(workdir, capsys):
    from grpo_steps.cli import main

    assert main(["grpo", "--set", "grpo.epsilon_high=0.05"]) == 2
    assert "grpo.epsilon_high" in capsys.readouterr().err
    assert not (workdir / "models").exists()


def test_last_micro_batch_may_be_smaller_and_the_update_is_the_same():
    """Documented choice: micro_batch_size need not divide prompts_per_step x num_generations; the last
    micro-batch is smaller, and (whole-batch normalisers) the update equals the one-micro-batch update."""
    import copy

    from grpo_steps.data.tokenizer import build_tokenizer
    from grpo_steps.grpo.rewards import digit_match
    from grpo_steps.grpo.trainer import GRPOTrainer
    from grpo_steps.platform.config import GRPOConfig, ModelConfig
    from grpo_steps.platform.modeling import build_policy

    tok = build_tokenizer()
    torch.manual_seed(0)
    policy = build_policy(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok)
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 2), (13, 4), (25, 31), (7, 70)]]
    results = []
    for mbs in (16, 5):  # 16 rows: one micro-batch, or 5 + 5 + 5 + 1
        cfg = GRPOConfig(prompts_per_step=4, num_generations=4, micro_batch_size=mbs, learning_rate=1e-2)
        trainer = GRPOTrainer(copy.deepcopy(policy), tok, [digit_match], [1.0], cfg, seed=0)
        torch.manual_seed(1)
        trainer.train_step(rows)
        results.append({k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()})
    one, split = results
    assert any(not torch.equal(one[k], start[k]) for k in one)  # the step did change the weights
    # Adam's first step is lr * g / (|g| + eps): for a weight whose gradient is ~eps, float summation order
    # alone moves the update by ~1e-6 of lr = 1e-2; a wrong normaliser would move whole updates (~1e-2).
    for k in one:
        torch.testing.assert_close(split[k], one[k], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ checks before any work


@pytest.mark.parametrize("path, why", [
    ("no_such_module_xyz:score", "could not be imported"),
    ("json:no_such_function", "could not be imported"),
    ("os:sep", "not callable"),
    ("not_an_import_path", "module:function"),
])
def test_unimportable_reward_function_fails_before_any_model_loads(ready, monkeypatch, path, why):
    from grpo_steps.platform.config import ConfigError
    from tests.support.stages import train_grpo

    _no_model_loading(monkeypatch)
    cfg = config(ready, f"grpo.reward_functions=[{{name: digit_match}}, {{name: '{path}'}}]")
    with pytest.raises(ConfigError, match=r"grpo\.reward_functions\[1\]\.name") as err:
        train_grpo(cfg)
    assert why in str(err.value) and path in str(err.value)
    assert not (ready / "models" / "grpo_checkpoints").exists()


def test_missing_inputs_are_all_named_before_any_work(workdir, monkeypatch):
    from tests.support.stages import train_grpo

    _no_model_loading(monkeypatch)
    cfg = config(workdir, "grpo.reward_functions=[{name: exact_match}, {name: reward_model, weight: 0.1}]")
    with pytest.raises(FileNotFoundError) as err:
        train_grpo(cfg)
    msg = str(err.value)
    for p in ("models/sft", "data/validated/train.jsonl", "models/reward"):
        assert str((workdir / p).resolve()) in msg, (p, msg)
    # nothing written but the stage's lock, which every stage takes first (its record: platform/stage.py)
    assert [p.name for p in (workdir / "models").iterdir()] == [".grpo.lock"]


def test_reward_model_is_required_only_when_configured(ready, monkeypatch):
    from grpo_steps.stages.grpo import preflight

    preflight(config(ready))  # digit_match + number_format: no reward model needed
    with pytest.raises(FileNotFoundError) as err:
        preflight(config(ready, "grpo.reward_functions=[{name: reward_model}]"))
    assert str((ready / "models" / "reward").resolve()) in str(err.value)
    assert "models/sft" not in str(err.value)


def test_cli_missing_inputs_exit_2(workdir, capsys):
    from grpo_steps.cli import main

    assert main(["grpo"]) == 2
    err = capsys.readouterr().err
    assert "grpo grpo: error:" in err and "models/sft" in err and "train.jsonl" in err
    assert "Traceback" not in err  # a user error is one line; --debug shows what is behind it
    assert main(["grpo", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().splitlines()[-1].startswith("grpo grpo: error:")


# ------------------------------------------------------------------------------------------ safe loading


def _pickled_model_dir(path: Path) -> Path:
    from grpo_steps.data.tokenizer import build_tokenizer
    from grpo_steps.platform.config import ModelConfig
    from grpo_steps.platform.modeling import build_policy

    model = build_policy(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                         build_tokenizer())
    path.mkdir(parents=True)
    model.config.save_pretrained(str(path))
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


def test_pickled_weights_are_refused(tmp_path, monkeypatch):
    from grpo_steps.data.tokenizer import build_tokenizer
    from grpo_steps.platform.config import ModelConfig
    from grpo_steps.platform.modeling import build_policy, load_policy, load_reward_model

    d = _pickled_model_dir(tmp_path / "bin_only")

    def no_unpickling(*_a, **_k):
        raise AssertionError("torch.load was called on a pickled checkpoint")

    monkeypatch.setattr(torch, "load", no_unpickling)
    for load in (load_policy, load_reward_model):
        with pytest.raises(FileNotFoundError, match="pytorch_model.bin") as err:
            load(d)
        assert str(d.resolve()) in str(err.value) and "safetensors" in str(err.value)
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        build_policy(ModelConfig(pretrained=str(d)), build_tokenizer())


def test_grpo_stage_refuses_a_pickled_starting_policy(ready, capsys):
    from grpo_steps.cli import main

    sft = ready / "models" / "sft"
    (sft / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, sft / "pytorch_model.bin")
    sets = [x for o in overrides(ready) for x in ("--set", o)]
    assert main(["grpo", "--params", "params.yaml", *sets]) == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and "refusing" in err


def test_remote_code_does_not_run_unless_enabled(tmp_path):
    from safetensors.torch import save_file

    from grpo_steps.platform.modeling import load_policy

    marker = tmp_path / "remote-code-ran"
    d = tmp_path / "custom"
    d.mkdir()
    (d / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                               "from transformers import PretrainedConfig\n"
                               "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    (d / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}))
    save_file({"w": torch.zeros(1)}, str(d / "model.safetensors"))
    with pytest.raises(RuntimeError, match="trust_remote_code"):
        load_policy(d)  # model.trust_remote_code defaults to False
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------- secrets


def test_redact_secrets_masks_secret_keys_and_url_credentials():
    from grpo_steps.platform.secrets import redact_secrets, redact_url

    params = {
        "tracking": {"tracking_uri": "http://user:pass@mlflow.internal:5000/api", "experiment": "x"},
        "hub": {"hf_token": "hf_abc", "apiKey": "k1", "api_key": "k2", "db_password": "p", "client_secret": "s",
                "aws_credentials": "c", "token": None},
        "validate": {"max_prompt_tokens": 32, "max_answer_tokens": 8},
        "tokenizer": "models/tokenizer",
        "mirrors": ["https://bob@example.com/x", "https://example.com/y"],
        "grpo.api_token": "flat-dotted-key",
    }
    out = redact_secrets(params)
    assert out["tracking"]["tracking_uri"] == "http://***@mlflow.internal:5000/api"
    assert out["hub"] == {"hf_token": "***", "apiKey": "***", "api_key": "***", "db_password": "***",
                          "client_secret": "***", "aws_credentials": "***", "token": None}
    assert out["validate"] == {"max_prompt_tokens": 32, "max_answer_tokens": 8}
    assert out["tokenizer"] == "models/tokenizer" and out["tracking"]["experiment"] == "x"
    assert out["mirrors"] == ["https://***@example.com/x", "https://example.com/y"]
    assert out["grpo.api_token"] == "***"
    assert params["hub"]["hf_token"] == "hf_abc"  # the input is not modified
    assert redact_url("postgresql://u:p@db:5432/mlflow and sqlite:///mlflow.db") == \
        "postgresql://***@db:5432/mlflow and sqlite:///mlflow.db"


def test_logged_params_of_a_config_hold_no_credentials(workdir):
    from grpo_steps.platform.config import load_config
    from grpo_steps.platform.secrets import redact_secrets
    from grpo_steps.platform.tracking import flat_params

    cfg = load_config("params.yaml", ["tracking.tracking_uri=https://alice:s3cr3t@mlflow.example.com"])
    flat = flat_params(redact_secrets(cfg.as_dict()))
    assert not [k for k, v in flat.items() if "s3cr3t" in v or "alice" in v]
    assert flat["tracking.tracking_uri"] == "https://***@mlflow.example.com"


# ------------------------------------------------------------------------------------------ concurrency


def test_second_run_on_the_same_outputs_fails_fast_naming_the_holder(ready, monkeypatch):
    from grpo_steps.errors import UserError
    from grpo_steps.platform.io import OutputLockedError, exclusive_lock
    from tests.support.stages import train_grpo

    _no_model_loading(monkeypatch)
    with exclusive_lock(ready / "models" / ".grpo.lock", "test holder"):
        with pytest.raises(OutputLockedError, match=rf"pid {os.getpid()}\b") as e:
            train_grpo(config(ready))
    assert isinstance(e.value, UserError), "a user error: exit code 2, and the flow does not retry it"
    assert not (ready / "models" / "grpo").exists()


@pytest.mark.slow  # ~15-30 s on 2 cores
def test_two_concurrent_runs_with_different_params(ready):
    """Two `grpo grpo` processes on the same outputs: the second fails fast with the first's pid; the first's
    checkpoints and outputs are untouched by it."""
    first = popen_grpo(ready, "grpo.steps=400", "grpo.checkpoint_every=1")
    try:
        deadline = time.monotonic() + 300
        lock = ready / "models" / ".grpo.lock"
        while not list(ready.glob("models/grpo_checkpoints/*/step-*")):
            assert first.poll() is None, output_of(first)[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert lock.read_text().strip() == str(first.pid)
        second = popen_grpo(ready, "grpo.steps=400", "grpo.learning_rate=0.002")
        assert second.wait(timeout=300) == 2  # a user error: the CLI's exit code 2
        assert first.poll() is None, "the first run must still be running (else the test proves nothing)"
        out = output_of(second)
        assert f"pid {first.pid}" in out and "in use by another run" in out, out[-3000:]
        assert len(list(ready.glob("models/grpo_checkpoints/*"))) == 1  # the second wrote no checkpoint
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert not (ready / "models" / "grpo").exists()


# ------------------------------------------------------------------------------------------ multi-process


@pytest.mark.slow
def test_two_processes_write_once_and_log_one_run(ready):
    """`accelerate launch` with 2 CPU processes: one MLflow run, one writer of models/grpo and the curve."""
    exe = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    if not Path(exe).exists():
        pytest.skip("accelerate CLI not found")
    cmd = [exe, "launch", "--config_file", str(ROOT / "infra" / "accelerate" / "cpu_2proc.yaml"),
           "-m", "grpo_steps.cli", "grpo", "--params", "params.yaml",
           *[x for o in overrides(ready, "grpo.steps=2") for x in ("--set", o)]]
    env = {**os.environ, **SUBPROCESS_ENV, "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(cmd, cwd=ready, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (ready / "models" / "grpo" / "model.safetensors").is_file()
    assert len((ready / "reports" / "grpo_steps.csv").read_text().splitlines()) == 3
    assert len(re.findall(r"checkpoint written: \S+step-000002", res.stderr)) == 1

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ready}/mlflow.db")
    exp = client.get_experiment_by_name("grpo-pipeline")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("stage") == "grpo"]
    assert len(runs) == 1
    assert len(client.get_metric_history(runs[0].info.run_id, "reward")) == 2



def test_masked_truncated_completions_carry_no_loss_and_keep_their_length(ready):
    """DAPO's mask: completions cut off by the budget are scored but get no gradient; the length metrics
    still count them as generated."""
    from tests.support.stages import train_grpo

    cfg = config(ready, "grpo.steps=1", "grpo.checkpoint_every=0", "grpo.max_completion_length=1",
                 "grpo.mask_truncated_completions=true", "grpo.beta=0.0")
    train_grpo(cfg)
    (m,) = json.loads(next((ready / "models" / "grpo_checkpoints").glob("*/step-000001/trainer_state.json"))
                      .read_text())["trainer"]["history"]
    assert m["completions/mean_length"] == 1.0, "a truncated completion is one token long, masked or not"
    if m["completions/clipped_ratio"] == 1.0:  # every row cut off: nothing left to learn from
        assert m["loss"] == 0.0
