"""Faults of nightly operations, each named in the user's terms before or instead of lost work: a tracking server
that is down, missing or empty data, too little disk, a disk that fills while writing, two runs on the same
outputs, two processes creating the MLflow database at once (docs/operations.md has the table)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from grpo_steps.errors import UserError
from grpo_steps.platform import preflight
from grpo_steps.platform.io import DiskFullError, OutputLockedError, atomic_path, exclusive_lock
from grpo_steps.platform.stage import lock_path
from grpo_steps.stages import STAGES
from tests.support.project import load_tiny

CLI = [sys.executable, "-m", "grpo_steps.cli"]


def _cli(workdir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=workdir, capture_output=True, text=True, timeout=timeout,
                          env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})


# ------------------------------------------------------------------------------------------------ pre-flight


def test_a_tracking_server_that_is_down_is_named_in_seconds_before_prefect_starts(workdir):
    """Before: 266 s of MLflow's retries, then a raw MlflowException traceback."""
    t0 = time.monotonic()
    res = _cli(workdir, "run", "--set", "tracking.tracking_uri=http://127.0.0.1:9")
    took = time.monotonic() - t0
    assert res.returncode == 2, res.stderr[-3000:]
    assert ("grpo run: error: cannot reach the MLflow server at http://127.0.0.1:9 (connection failed); check "
            "tracking.tracking_uri or MLFLOW_TRACKING_URI") in res.stderr
    assert "Traceback" not in res.stderr and "temporary server" not in res.stdout + res.stderr
    assert took < 60, f"{took:.0f} s"
    assert not (workdir / "data" / "prepared").exists()


def test_a_tracking_server_that_never_answers_times_out(workdir, monkeypatch):
    """A server that accepts the connection and says nothing: the short timeout, not MLflow's retries."""
    monkeypatch.setattr(preflight, "TRACKING_TIMEOUT_S", 1.0)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        cfg = load_tiny(workdir, f"tracking.tracking_uri=http://127.0.0.1:{server.getsockname()[1]}")
        t0 = time.monotonic()
        with pytest.raises(preflight.PreflightError, match=r"cannot reach the MLflow server .*no answer within 1 s"):
            preflight.check(cfg, ["prepare"])
    assert time.monotonic() - t0 < 10


def test_missing_and_empty_data_files_are_all_named_before_any_work(workdir):
    """Before: an empty file was reported by the prepare stage, after the Prefect server had started (35 s)."""
    (workdir / "train.jsonl").write_text("\n  \n")
    res = _cli(workdir, "run", "--set", "data.source=files", "--set", "data.train=train.jsonl",
               "--set", "data.test=missing.jsonl")
    assert res.returncode == 2
    assert f"data.train: {workdir / 'train.jsonl'} is empty" in res.stderr
    assert f"data.test: no such file: {workdir / 'missing.jsonl'}" in res.stderr
    assert "Traceback" not in res.stderr and not (workdir / "data").exists()


def test_too_little_disk_for_the_checkpoints_is_named(workdir, tmpfs):
    """Sized by the starting weights: 3 checkpoints (2 kept + the one being written) of weights and optimizer
    state, and the output, on a 4 MiB device holding 1 MiB of weights."""
    models = tmpfs(4)
    (models / "sft").mkdir()
    (models / "sft" / "model.safetensors").write_bytes(b"\0" * (1 << 20))
    cfg = load_tiny(workdir, f"paths.models_dir={models}", "grpo.keep_checkpoints=2", "grpo.checkpoint_every=5")
    with pytest.raises(preflight.PreflightError, match=r"GiB free on the device of .* lower grpo.keep_checkpoints"):
        preflight.check(cfg, ["grpo"])
    preflight.check(cfg, ["evaluate"])  # only the grpo stage writes checkpoints


# ----------------------------------------------------------------------------------------------- disk full


def test_a_disk_that_fills_while_writing_is_named_and_the_old_output_kept(tmpfs):
    """A write that fills the device: DiskFullError (a user error: the flow does not retry what cannot pass),
    the temporary removed, the previous output untouched."""
    root = tmpfs(1)
    target = root / "report.txt"
    target.write_text("yesterday")
    with pytest.raises(DiskFullError, match=r"no space left on the device of .* while writing .*report\.txt"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"x" * (2 << 20))
    assert isinstance(DiskFullError("x"), UserError)
    assert target.read_text() == "yesterday" and sorted(p.name for p in root.iterdir()) == ["report.txt"]


def test_torch_writers_running_out_of_space_are_named_too(tmpfs):
    """torch's zip writer says 'unexpected pos' (a RuntimeError, no errno) when the device fills: before, that
    was all a checkpoint's failure said."""
    root = tmpfs(1)
    with pytest.raises(DiskFullError, match="no space left") as e:
        with atomic_path(root / "ckpt") as tmp:
            tmp.mkdir()
            torch.save(torch.zeros(1 << 19), tmp / "optimizer.pt")
    assert isinstance(e.value.__cause__, RuntimeError)
    assert list(root.iterdir()) == []


# ------------------------------------------------------------------------------------------------- locking


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_refuses_outputs_another_run_holds(workdir, name):
    """Before, only grpo locked: two runs trained sft and the reward model at once, over each other."""
    from tests.support.stages import _through_record

    cfg = load_tiny(workdir)
    with exclusive_lock(lock_path(cfg, name), "test holder"):
        with pytest.raises(OutputLockedError, match=rf"stage {name} .*in use by another run \(pid {os.getpid()}"):
            _through_record(name)(cfg)
    assert not list(workdir.glob("data/*")) and not list(workdir.glob("reports/*"))


CREATE = """
import sys, time
from grpo_steps.platform import tracking
from tests.support.project import load_tiny
cfg = load_tiny(__import__("pathlib").Path(sys.argv[1]))
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all processes start creating at the same moment
print(tracking.setup(cfg))
"""


def test_processes_creating_the_mlflow_database_at_once_all_get_it(workdir):
    """Before: `table ... already exists` (sqlite3.OperationalError) in all but one of them."""
    start = time.time() + 8  # after every process has imported mlflow
    procs = [subprocess.Popen([*CLI[:1], "-c", CREATE, str(workdir), str(start)], cwd=Path(__file__).parents[2],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1  # one experiment, the same id for all
    assert (workdir / ".mlflow.db.lock").exists()


# ---------------------------------------------------------------------------------------- interrupted runs

KILLED_INSIDE_A_RUN = """
import os, signal, sys
from grpo_steps.platform import tracking
from tests.support.project import load_tiny
cfg = load_tiny(__import__("pathlib").Path(sys.argv[1]))
with tracking.stage_run(cfg, "sft"):
    print(__import__("mlflow").active_run().info.run_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_run_whose_process_was_killed_is_ended_as_killed_by_the_next_start(workdir):
    """Before: a SIGKILLed stage's MLflow run stayed RUNNING forever. A run whose process lives is left alone."""
    from mlflow import MlflowClient

    from grpo_steps.platform import tracking

    res = subprocess.run([sys.executable, "-c", KILLED_INSIDE_A_RUN, str(workdir)], cwd=Path(__file__).parents[2],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == -9, res.stderr[-2000:]
    killed = res.stdout.split()[-1]
    cfg = load_tiny(workdir)
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    assert client.get_run(killed).info.status == "RUNNING"
    with tracking.stage_run(cfg, "evaluate") as live:
        assert client.get_run(killed).info.status == "KILLED"
        assert "was gone" in client.get_run(killed).data.tags["ended_by"]
        assert tracking.end_orphaned_runs(live.info.experiment_id) == []  # this process's own run stays
        assert client.get_run(live.info.run_id).info.status == "RUNNING"


def test_a_stage_removes_what_a_killed_run_of_it_left_and_keeps_its_own_lock(workdir):
    """A kill inside atomic_path leaves `.<output>.<random>` beside the output: the stage's next run removes it
    (under the stage's lock, no live writer can own it), and puts back an output a kill caught between the two
    renames of its replacement."""
    from grpo_steps.platform.io import left_by_a_kill
    from tests.support.stages import prepare

    cfg = load_tiny(workdir)
    out = cfg.paths.prepared()
    left = out.parent / f".{out.name}.k1ll3d_x"
    (left / out.name).mkdir(parents=True)
    prepare(cfg)
    assert not left.exists() and out.is_dir()

    models = workdir / "models"
    (models / ".sft.old-4242").mkdir(parents=True)
    (models / ".sft.old-4242" / "model.safetensors").write_text("yesterday's")
    (models / ".sft.abcdefgh").mkdir()
    (models / ".sft.lock").touch()
    removed, restored = left_by_a_kill(models / "sft")
    assert restored == models / "sft" and (models / "sft" / "model.safetensors").read_text() == "yesterday's"
    assert removed == [models / ".sft.abcdefgh"]
    assert not [p for p in models.iterdir() if p.name.startswith(".sft.") and p.name != ".sft.lock"]
