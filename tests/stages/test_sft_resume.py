"""The cold start is checkpointed and resumed like grpo: a kill loses at most `sft.checkpoint_every` steps, the rerun
ends with the weights of an uninterrupted run, an unusable checkpoint is moved aside, and nothing is left behind.
Before: a kill at step 118 of 300 lost it all and left a `models/.sft.<tmp>` folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.grpo_inputs import SUBPROCESS_ENV, assert_identical, weights
from tests.support.project import tiny_overrides

SETTINGS = ["sft.max_steps=120", "sft.checkpoint_every=20", "sft.keep_checkpoints=1"]


def _sft(workdir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "grpo_steps.cli", "sft",
           *[x for o in tiny_overrides(workdir, *SETTINGS, *extra) for x in ("--set", o)]]
    log = (workdir / f"sft-{len(list(workdir.glob('sft-*.log')))}.log").open("w")
    return subprocess.Popen(cmd, cwd=workdir, env={**os.environ, **SUBPROCESS_ENV}, stdout=log,
                            stderr=subprocess.STDOUT, text=True)


def _log(workdir: Path) -> str:
    return sorted(workdir.glob("sft-*.log"))[-1].read_text()


def _checkpoints(workdir: Path) -> list[Path]:
    return sorted(workdir.glob("models/sft_checkpoints/*/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


@pytest.mark.slow  # ~1 min on 2 cores: three short cold starts in subprocesses
def test_a_killed_cold_start_resumes_to_the_uninterrupted_weights(project):
    models = project / "models"
    shutil.rmtree(models / "sft")
    assert _sft(project).wait(timeout=600) == 0, _log(project)[-3000:]
    reference = weights(models / "sft")
    assert not _checkpoints(project), "the checkpoints are emptied once the output is written"
    shutil.rmtree(models / "sft")

    run = _sft(project)
    deadline = time.monotonic() + 300
    while not any((c / "trainer_state.json").is_file() for c in _checkpoints(project)):
        assert run.poll() is None, _log(project)[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=60)
    assert not (models / "sft").exists(), "killed after it finished: the test proves nothing"
    kept = _checkpoints(project)[-1]
    step = json.loads((kept / "trainer_state.json").read_text())["global_step"]
    assert 0 < step < 120

    assert _sft(project).wait(timeout=600) == 0, _log(project)[-3000:]
    assert f"resuming the cold start from checkpoint {Path('models/sft_checkpoints')}" in _log(project)
    assert_identical(reference, weights(models / "sft"))
    assert not _checkpoints(project) and [p.name for p in models.glob(".sft*")] == [".sft.lock"]


def test_an_unusable_checkpoint_is_moved_aside_and_the_run_starts_over(project, caplog):
    """A checkpoint whose save never finished (no trainer_state.json): named, moved aside, never resumed."""
    import logging

    from grpo_steps.platform.trainer_checkpoints import resume_from, set_aside_unusable

    folder = project / "ckpts"
    (folder / "checkpoint-40").mkdir(parents=True)
    (folder / "checkpoint-40" / "model.safetensors").write_bytes(b"\0" * 8)
    with caplog.at_level(logging.WARNING, logger="grpo_steps"):
        set_aside_unusable(folder)
    assert resume_from(folder) is None
    assert (folder / "corrupt-checkpoint-40").is_dir()
    assert "trainer_state.json is missing or unreadable" in caplog.text
    assert "no usable checkpoint in" in caplog.text and "starting from step 0" in caplog.text
