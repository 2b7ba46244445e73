"""Resumable GRPO: atomic verified checkpoints, resume after SIGKILL or an exception, corrupt checkpoints skipped,
checkpoints of other params never used."""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import sys
import time
import uuid

import pytest
import torch

from tests.support.grpo_inputs import (
    assert_identical,
    config,
    output_of,
    popen_grpo,
    weights,
)


def _step_dirs(workdir):
    return sorted((workdir / "models" / "grpo_checkpoints").glob("*/step-*"))


@pytest.mark.slow  # ~15-30 s on 2 cores
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sigkill_mid_run_then_resume_gives_identical_weights(ready, lora):
    extra = ("grpo.steps=12", "grpo.checkpoint_every=3", *(["model.lora={r: 4, alpha: 8}"] if lora else []))
    # 1. the reference: uninterrupted, same seed, same settings
    ref = popen_grpo(ready, *extra)
    assert ref.wait(timeout=300) == 0, output_of(ref)[-3000:]
    reference = weights(ready / "models" / "grpo")
    reference_curve = (ready / "reports" / "grpo_steps.csv").read_text()
    shutil.rmtree(ready / "models" / "grpo")
    shutil.rmtree(ready / "models" / "grpo_checkpoints")
    (ready / "reports" / "grpo_steps.csv").unlink()

    # 2. the same run, killed without warning as soon as its first checkpoint is on disk
    victim = popen_grpo(ready, *extra)
    deadline = time.monotonic() + 300
    while not _step_dirs(ready):
        assert victim.poll() is None, "finished or died before its first checkpoint:\n" + output_of(victim)[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    assert not (ready / "models" / "grpo").exists(), "killed mid-run: no final policy may exist yet"
    killed_at = max(int(p.name.split("-")[1]) for p in _step_dirs(ready))
    assert killed_at < 12
    saved = {p.name for p in (_step_dirs(ready)[-1] / "model").iterdir()}
    # with LoRA a checkpoint holds the adapter only, not a copy of the base weights
    assert ("adapter_model.safetensors" in saved and "model.safetensors" not in saved) if lora else \
        "model.safetensors" in saved

    # 3. rerun: resumes from the newest checkpoint, finishes, same weights bit for bit
    again = popen_grpo(ready, *extra)
    assert again.wait(timeout=300) == 0, output_of(again)[-3000:]
    out = output_of(again)
    resumed = re.search(r"resuming GRPO from checkpoint \S+ at step (\d+) of 12", out)
    assert resumed and 3 <= int(resumed.group(1)) <= killed_at, out[-3000:]
    assert_identical(reference, weights(ready / "models" / "grpo"))
    # the metrics curve is whole too (every column but the wall-clock times: the step's, decoding's)
    def curve(text):
        rows = [line.split(",") for line in text.splitlines()]
        clocks = {i for i, name in enumerate(rows[0]) if name.endswith("_time")}
        assert len(clocks) == 3, rows[0]  # step_time, rollout/decode_time, rollout/wait_time
        return [[x for i, x in enumerate(r) if i not in clocks] for r in rows]
    assert curve((ready / "reports" / "grpo_steps.csv").read_text()) == curve(reference_curve)
    # nothing half-written left behind; only the newest `keep_checkpoints` (2) remain
    ckpt_dir = _step_dirs(ready)[0].parent
    assert not [p for p in ckpt_dir.iterdir() if p.name.startswith(".")]
    assert [p.name for p in _step_dirs(ready)] == ["step-000009", "step-000012"]


FLAKY = '''
calls = 0
raise_on_call = None


def flaky(prompts, completions, **_):
    """0.0 for everything; raises once, on call `raise_on_call` (one call per step)."""
    global calls, raise_on_call
    calls += 1
    if calls == raise_on_call:
        raise_on_call = None
        raise RuntimeError("reward service unavailable (injected fault)")
    return [0.0] * len(completions)
'''


def test_exception_mid_run_then_rerun_resumes_from_checkpoint(ready, monkeypatch, caplog):
    """What a Prefect retry of the grpo task does: call train_grpo again after it raised."""
    from tests.support.stages import train_grpo

    name = f"flaky_{uuid.uuid4().hex[:8]}"
    (ready / f"{name}.py").write_text(FLAKY)
    monkeypatch.syspath_prepend(str(ready))
    rf = f"grpo.reward_functions=[{{name: digit_match}}, {{name: '{name}:flaky', weight: 0.0}}]"
    cfg = config(ready, rf, "grpo.steps=5", "grpo.checkpoint_every=2")

    reference = train_grpo(cfg, )  # no fault injected
    assert reference["resumed_from_step"] == 0
    ref_weights = weights(ready / "models" / "grpo")
    shutil.rmtree(ready / "models" / "grpo")
    shutil.rmtree(ready / "models" / "grpo_checkpoints")

    module = sys.modules[name]
    module.raise_on_call = module.calls + 3  # the third step of the next run fails
    with pytest.raises(RuntimeError, match="injected fault"):
        train_grpo(cfg, )
    assert [p.name for p in _step_dirs(ready)] == ["step-000002"]
    assert not (ready / "models" / "grpo").exists()

    with caplog.at_level(logging.INFO, logger="grpo_steps"):
        summary = train_grpo(cfg, )
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 5
    assert "resuming GRPO from checkpoint" in caplog.text and "at step 2 of 5" in caplog.text
    assert_identical(ref_weights, weights(ready / "models" / "grpo"))


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(ready, caplog):
    from tests.support.stages import train_grpo

    cfg = config(ready, "grpo.steps=4", "grpo.checkpoint_every=1", "grpo.keep_checkpoints=3")
    train_grpo(cfg, )
    reference = weights(ready / "models" / "grpo")
    assert [p.name for p in _step_dirs(ready)] == ["step-000002", "step-000003", "step-000004"]
    newest = _step_dirs(ready)[-1]
    corrupt = newest / "model" / "model.safetensors"
    data = corrupt.read_bytes()
    corrupt.write_bytes(data[: len(data) // 2])

    with caplog.at_level(logging.WARNING, logger="grpo_steps"):
        summary = train_grpo(cfg, )
    assert summary["resumed_from_step"] == 3
    assert str(corrupt) in caplog.text and "truncated" in caplog.text
    assert_identical(reference, weights(ready / "models" / "grpo"))
    # the corrupt folder was replaced as a whole by a verified one, never patched in place
    from grpo_steps.platform.checkpoint import CheckpointStore

    store = CheckpointStore(newest.parent.parent, newest.parent.name)
    assert store.read(newest).step == 4
    aside = newest.with_name("corrupt-step-000004")  # moved aside, kept for a look, never read again
    assert (aside / "model" / "model.safetensors").stat().st_size == len(data) // 2
    assert f"moved aside to {aside}" in caplog.text


def test_with_no_usable_checkpoint_the_run_says_it_starts_from_step_0(ready, caplog):
    """Before: "falling back to an older one" once per checkpoint, then a silent restart from step 0, the
    corrupt folders left where they were."""
    from tests.support.stages import train_grpo

    cfg = config(ready, "grpo.steps=3", "grpo.checkpoint_every=1", "grpo.keep_checkpoints=2")
    train_grpo(cfg)
    reference = weights(ready / "models" / "grpo")
    for step in _step_dirs(ready):
        (step / "trainer_state.json").write_text("{")
    with caplog.at_level(logging.WARNING, logger="grpo_steps"):
        summary = train_grpo(cfg)
    assert summary["resumed_from_step"] == 0
    assert "no usable checkpoint in" in caplog.text and "(2 unusable, moved aside): starting from step 0" in caplog.text
    assert sorted(p.name for p in _step_dirs(ready)[0].parent.glob("corrupt-*")) == [
        "corrupt-step-000002", "corrupt-step-000003"]
    assert_identical(reference, weights(ready / "models" / "grpo"))  # the same run again, from the start


def test_corrupt_checkpoints_are_named_in_the_error(ready):
    from grpo_steps.platform.checkpoint import CheckpointError, CheckpointStore
    from tests.support.stages import train_grpo

    train_grpo(config(ready, "grpo.steps=2"), )
    good = _step_dirs(ready)[-1]
    store = CheckpointStore(good.parent.parent, good.parent.name)
    assert store.read(good).step == 2

    def damaged(name, damage):
        bad = good.with_name(name)
        shutil.copytree(good, bad)
        damage(bad)
        return bad

    def flip(path):
        b = bytearray(path.read_bytes())
        b[len(b) // 2] ^= 0xFF
        path.write_bytes(bytes(b))

    cases = {
        "optimizer.pt": damaged("step-000003", lambda d: flip(d / "optimizer.pt")),
        "manifest.json is missing": damaged("step-000004", lambda d: (d / "manifest.json").unlink()),
        "trainer_state.json is missing": damaged("step-000005", lambda d: (d / "trainer_state.json").unlink()),
        "manifest says step 2": damaged("step-000006", lambda d: None),
    }
    for expected, bad in cases.items():
        with pytest.raises(CheckpointError) as err:
            store.read(bad)
        assert str(bad) in str(err.value) and expected in str(err.value), str(err.value)
    assert store.latest().path == good  # every newer one is unusable


def test_checkpoints_of_other_params_are_never_used(ready, caplog):
    from grpo_steps.platform.checkpoint import training_key as key_of
    from grpo_steps.stages import STAGES
    from tests.support.stages import train_grpo

    def training_key(cfg):
        return key_of(cfg, STAGES["grpo"].code_files())

    cfg_a = config(ready, "grpo.steps=2")
    train_grpo(cfg_a, )
    (a_step,) = _step_dirs(ready)
    cfg_b = config(ready, "grpo.steps=2", "grpo.learning_rate=0.002")
    key_b = training_key(cfg_b)
    assert key_b != training_key(cfg_a)
    # a checkpoint of A planted (newer) among B's: its manifest names A's key, so B must not use it
    planted = ready / "models" / "grpo_checkpoints" / key_b / "step-000002"
    shutil.copytree(a_step, planted)

    with caplog.at_level(logging.WARNING, logger="grpo_steps"):
        summary = train_grpo(cfg_b, )
    assert summary["resumed_from_step"] == 0
    assert f"{planted} was written for different params" in caplog.text
    assert "ignoring checkpoints written for different params" in caplog.text and str(a_step.parent) in caplog.text
    assert {p.parent.name for p in _step_dirs(ready)} == {a_step.parent.name, key_b}
    # the checkpoint cadence is not a training setting: changing it keeps resuming
    assert training_key(config(ready, "grpo.steps=2", "grpo.checkpoint_every=7")) == training_key(cfg_a)


def test_a_checkpoint_of_other_code_is_never_taken_for_this_codes_run(ready, tmp_path):
    """The grpo stage's code is part of the key: after a change to it (as `dvc repro` reruns the stage) a
    finished checkpoint of the old code is not "resumed" at its last step and passed off as the new result."""
    from grpo_steps.platform.checkpoint import training_key
    from grpo_steps.stages import STAGES

    cfg = config(ready, "grpo.steps=2")
    code = STAGES["grpo"].code_files()
    names = [name for name, _ in code]
    assert "grpo_steps/grpo/sampling.py" in names and "grpo_steps/stages/grpo.py" in names
    before = training_key(cfg, code)
    edited = tmp_path / "sampling.py"  # the same file, one line added
    edited.write_text(dict(code)["grpo_steps/grpo/sampling.py"].read_text() + "# changed\n")
    assert training_key(cfg, [(n, edited if n == "grpo_steps/grpo/sampling.py" else p) for n, p in code]) != before


def test_checkpoint_every_zero_saves_only_at_the_end_and_resumes_as_done(ready):
    from tests.support.stages import train_grpo

    cfg = config(ready, "grpo.steps=3", "grpo.checkpoint_every=0")
    train_grpo(cfg, )
    assert [p.name for p in _step_dirs(ready)] == ["step-000003"]
    manifest = json.loads((_step_dirs(ready)[0] / "manifest.json").read_text())
    assert manifest["params_hash"] == cfg.params_hash() and manifest["step"] == 3
    assert set(manifest["files"]) >= {"model/model.safetensors", "optimizer.pt", "trainer_state.json"}
    state = json.loads((_step_dirs(ready)[0] / "trainer_state.json").read_text())
    assert state["sampler_position"] == 3 * cfg.grpo.prompts_per_step
    assert len(state["trainer"]["history"]) == 3 and set(state["rng"][0]) >= {"python", "numpy", "torch", "cuda"}
    first = weights(ready / "models" / "grpo")
    again = train_grpo(cfg, )
    assert again["resumed_from_step"] == 3 and again["steps"] == 3
    assert_identical(first, weights(ready / "models" / "grpo"))


def test_no_checkpoint_while_weights_are_not_finite(tmp_path):
    from grpo_steps.data.tokenizer import build_tokenizer
    from grpo_steps.grpo.rewards import digit_match
    from grpo_steps.grpo.trainer import GRPOTrainer, NonFiniteLossError, PromptSampler
    from grpo_steps.platform.checkpoint import CheckpointStore
    from grpo_steps.platform.config import GRPOConfig, ModelConfig
    from grpo_steps.platform.modeling import build_policy

    tok = build_tokenizer()
    policy = build_policy(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok)
    trainer = GRPOTrainer(policy, tok, [digit_match], [1.0], GRPOConfig(), seed=0)
    with torch.no_grad():
        next(trainer.unwrapped.parameters())[0, 0] = float("nan")
    store = CheckpointStore(tmp_path / "ckpt", "k")
    with pytest.raises(NonFiniteLossError, match="NaN/inf weights"):
        store.save(trainer, PromptSampler([{"prompt": "1+1=", "answer": "2"}], seed=0))
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.slow  # ~40 s: three short runs in subprocesses
def test_eval_during_training_leaves_the_run_unchanged_and_select_best_keeps_the_best_step(ready):
    """grpo.eval_every logs held-out accuracy into the curve without moving the run (greedy decoding draws no
    random number); grpo.select_best writes the best step's weights, remembered next to the checkpoints."""
    from safetensors.torch import load_file

    # a reward the random starting policy earns now and then (a digit first), so every step moves the weights
    common = ("grpo.steps=6", "grpo.checkpoint_every=0", "grpo.eval_prompts=20", "grpo.learning_rate=0.01",
              'grpo.reward_functions=[{name: format, weight: 1.0, kwargs: {pattern: "[0-9].*"}}]')
    plain = popen_grpo(ready, *common)
    assert plain.wait(timeout=300) == 0, output_of(plain)[-3000:]
    reference = weights(ready / "models" / "grpo")
    shutil.rmtree(ready / "models" / "grpo_checkpoints")

    evaluated = popen_grpo(ready, *common, "grpo.eval_every=2")
    assert evaluated.wait(timeout=300) == 0, output_of(evaluated)[-3000:]
    assert_identical(reference, weights(ready / "models" / "grpo"))  # evaluation moved nothing
    rows = (ready / "reports" / "grpo_steps.csv").read_text().splitlines()
    header = rows[0].split(",")
    acc = [r.split(",")[header.index("eval/accuracy")] for r in rows[1:]]
    assert [bool(a) for a in acc] == [False, True, False, True, False, True]  # steps 2, 4, 6
    assert all(0.0 <= float(a) <= 1.0 for a in acc if a)
    assert "held-out greedy accuracy before GRPO" in output_of(evaluated)
    shutil.rmtree(ready / "models" / "grpo_checkpoints")

    best_run = popen_grpo(ready, *common, "grpo.eval_every=2", "grpo.select_best=true")
    assert best_run.wait(timeout=300) == 0, output_of(best_run)[-3000:]
    best_dir = next((ready / "models" / "grpo_checkpoints").glob("*/best"))
    info = json.loads((best_dir / "best.json").read_text())
    scores = {2 * (i + 1): float(a) for i, a in enumerate(a for a in acc if a)}
    assert info["step"] == min(s for s, v in scores.items() if v == max(scores.values()))  # first of the best
    saved = weights(ready / "models" / "grpo")
    best = load_file(str(best_dir / "weights.safetensors"))
    assert all(torch.equal(saved[k], best[k]) for k in best)
    if info["step"] != 6:
        assert "grpo.select_best: models/grpo is the policy of step" in output_of(best_run)
        assert not all(torch.equal(saved[k], reference[k]) for k in best)
