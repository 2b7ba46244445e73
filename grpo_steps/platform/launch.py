"""The training stages on every GPU of every node: a torchrun child job of the stage.

`launch` in params.yaml says how many processes (`grpo_steps/platform/config.py`'s LaunchConfig). With one, a stage runs
in its own process, as always. With more, a training stage (its record says `launched`) starts torch's launcher,
`python -m torch.distributed.run` (torch elastic, c10d rendezvous), as a child job, and each rank runs this
module's partner, grpo_steps/launch_rank.py:

    parent (the CLI, the flow's task, dvc repro)           ranks (python -m grpo_steps.launch_rank JOB_DIR)
    writes JOB_DIR/job.json: stage, config, parent run  ->  meet in the launcher's store; the lowest rank whose
    waits for torchrun; SIGINT/SIGTERM reach every          node holds a job.json hands it to all (`grpo node`
    rank through the launcher, which kills them after       followers on other nodes hold none); each runs the
    launch.shutdown_timeout_s                               stage; rank 0 tracks it (its MLflow run nested under
    reads JOB_DIR/result.json (rank 0's value, reports)     the flow's) and writes result.json; a failing rank
    or the first failing rank's error: that rank, its       writes its error, its type and traceback to
    exit code and message, a UserError stays one            JOB_DIR/error-rank<R>.json
    (no retry, CLI exit code 2)

* Logs: every rank's lines carry `[rank R]`; only rank 0 draws progress bars (TQDM_DISABLE elsewhere).
* No orphans: the launcher dies with its parent (PR_SET_PDEATHSIG: SIGTERM, so it stops its ranks) and each rank
  with its launcher (SIGKILL), whatever killed the one above.
* Several nodes: each other node runs `grpo node`, which joins every training stage's job of the run until the
  run releases it (`grpo node --release`, or the flow's end); or every node runs the same `grpo <stage>`.
  Node roles come from the rendezvous; global rank 0 writes the outputs, so nodes share the project directory.
  A failing rank tells the others through the store, and every rank on every node stops within a second.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grpo_steps.data.files import read_json
from grpo_steps.errors import UserError
from grpo_steps.platform.config import Config, ConfigError
from grpo_steps.platform.results import Report

log = logging.getLogger(__name__)

JOB_FILE, RESULT_FILE, RELEASED_FILE, STARTED_FILE = "job.json", "result.json", "released", "started"
OTHER_JOB_FILE = "ran-another-nodes-job"  # this node's ranks ran the job another node handed out
RELEASE_TIMEOUT_S = 120  # how long a release waits for the other nodes (idle in `grpo node`, they rejoin in seconds)
RELEASE = "release"  # the job that ends the followers' `grpo node`
_PR_SET_PDEATHSIG = 1


class LaunchError(RuntimeError):
    """A launched stage failed: which rank, on which node, with what exit code and error."""


class LaunchUserError(UserError):
    """A launched stage failed on a rank with an error the user must fix (bad params or data, a failed gate)."""


@dataclasses.dataclass(frozen=True)
class Layout:
    processes_per_node: int
    nodes: int

    @property
    def world_size(self) -> int:
        return self.processes_per_node * self.nodes


def visible_gpus() -> int:
    import torch  # deferred: `grpo --help` imports this module's callers

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def layout(cfg: Config) -> Layout:
    """The processes a training stage runs on: `auto` is one per visible GPU, 1 without one."""
    per_node = cfg.launch.processes_per_node
    if per_node == "auto":
        per_node = max(visible_gpus(), 1)
    return Layout(int(per_node), cfg.launch.nodes)


# Set in the ranks of the child jobs this module starts: the process that started the job holds the stage's lock.
CHILD_JOB_ENV = "GRPO_JOB_TIMEOUT_S"


def in_child_job() -> bool:
    """True in a rank of a child job this module started (its parent holds the stage's lock)."""
    return CHILD_JOB_ENV in os.environ


def inside_job() -> bool:
    """True in a rank of a job someone else launched (this module, torchrun or accelerate launch by hand)."""
    return "WORLD_SIZE" in os.environ


def wants_child_job(cfg: Config) -> bool:
    return not inside_job() and layout(cfg).world_size > 1


def torchrun_command(cfg: Config, job_dir: Path) -> list[str]:
    """torch's launcher, with the layout and rendezvous of `cfg.launch`, running this module in each rank."""
    lc, lay = cfg.launch, layout(cfg)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={lay.processes_per_node}",
           f"--nnodes={lay.nodes}", "--max-restarts=0", f"--shutdown-timeout={lc.shutdown_timeout_s}"]
    if lay.nodes == 1 and not lc.rdzv_endpoint:
        cmd.append("--standalone")  # a private rendezvous on a free port: two runs on one machine never meet
    else:
        cmd += [f"--rdzv-backend={lc.rdzv_backend}", f"--rdzv-endpoint={lc.rdzv_endpoint}",
                f"--rdzv-id={lc.rdzv_id}", f"--rdzv-conf=join_timeout={lc.join_timeout_s}"]
    return [*cmd, "-m", "grpo_steps.launch_rank", str(job_dir)]


def _job_env(cfg: Config, lay: Layout) -> dict[str, str]:
    env = dict(os.environ, **{CHILD_JOB_ENV: str(cfg.launch.join_timeout_s)})
    # threads per rank: the cores shared out (torchrun would set 1 and print a banner about it)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // lay.processes_per_node)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up once at import: after a fork in a threaded process (the flow's), loading a
    library could deadlock on a lock another thread held."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()


def die_with_parent(sig: int) -> None:
    """Linux: `sig` to this process when the thread that started it exits (prctl PR_SET_PDEATHSIG)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


def _launcher_preexec(parent: int) -> Callable[[], None]:
    def preexec() -> None:
        die_with_parent(signal.SIGTERM)  # the launcher stops its ranks on SIGTERM
        if os.getppid() != parent:  # the parent died before the line above took effect
            os._exit(143)
    return preexec


def job_root(cfg: Config) -> Path:
    """Where jobs exchange their files: beside the models, so on the project directory nodes share."""
    return Path(cfg.paths.models_dir).resolve() / ".launch"


def _new_job_dir(cfg: Config, name: str) -> Path:
    """A fresh folder of one job on this node: `name`, the host, this process and a random tag."""
    job_dir = job_root(cfg) / f"{name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    job_dir.mkdir(parents=True, exist_ok=True)
    return job_dir


def run_job(cfg: Config, stage: str, parent_run_id: str | None = None) -> tuple[Any, list[Report]]:
    """Run `stage` as a torchrun job with `cfg.launch`'s layout; (rank 0's value, its reports), or the first
    failing rank's error. A stop signal or an exception here stops the job's every rank before it is raised."""
    lay = layout(cfg)
    job_dir = _new_job_dir(cfg, stage)
    spec = {"stage": stage, "config": cfg.as_dict(), "parent_run_id": parent_run_id, "cwd": os.getcwd(),
            "job_dir": str(job_dir)}
    (job_dir / JOB_FILE).write_text(json.dumps(spec), encoding="utf-8")
    log.info("stage %s: %d processes (%d per node x %d nodes) under torch's launcher", stage, lay.world_size,
             lay.processes_per_node, lay.nodes)
    try:
        returncode = _run_launcher(cfg, job_dir, lay)
        if returncode != 0:
            raise job_error(stage, job_dir, returncode, lay.world_size)
        if stage == RELEASE:  # nothing to return: the nodes have left
            return None, []
        result_file = job_dir / RESULT_FILE
        if not result_file.is_file():
            if (job_dir / OTHER_JOB_FILE).is_file():  # every node ran the command: another node's job was run
                log.info("stage %s: finished; the job of another node ran, and its rank 0 recorded the result",
                         stage)
                return None, []
            raise LaunchError(f"stage {stage}: every rank exited 0 but rank 0 wrote no result to {result_file} "
                              "(on several nodes, is the project directory shared?)")
        result = read_json(result_file)
        return result["value"], [Report(**r) for r in result["reports"]]
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)


def _run_launcher(cfg: Config, job_dir: Path, lay: Layout) -> int:
    proc = subprocess.Popen(torchrun_command(cfg, job_dir), env=_job_env(cfg, lay),
                            preexec_fn=_launcher_preexec(os.getpid()))
    try:
        return proc.wait()
    except BaseException:  # KeyboardInterrupt, SystemExit from a SIGTERM handler, a cancelled task
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(cfg.launch.shutdown_timeout_s + 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise


def job_error(stage: str, job_dir: Path, returncode: int, world_size: int) -> Exception:
    """The first rank's error (by time) as the stage's error, naming the ranks that recorded none (killed by a
    signal: their peers' errors may be knock-on ones); a UserError stays one."""
    errors = []
    for rank in range(world_size):  # by name: a listing of a shared folder may lag behind other nodes' writes
        with contextlib.suppress(OSError, ValueError):
            errors.append(json.loads((job_dir / f"error-rank{rank}.json").read_text(encoding="utf-8")))
    if not errors:
        return LaunchError(f"stage {stage}: torch's launcher exited with code {returncode} and no rank recorded "
                           "an error (a rank killed by a signal, out of memory, or a failed rendezvous); its log "
                           "is above")
    first = min(errors, key=lambda e: e["time"])
    where = (f"stage {stage} failed on rank {first['rank']} of {first['world_size']} (node {first['node']}, "
             f"{first['host']}, exit code {first['exit_code']})")
    silent = sorted(set(range(world_size)) - {e["rank"] for e in errors})
    note = (f" [rank(s) {', '.join(map(str, silent))} recorded no error: stopped by the launcher after this one, "
            "or killed by a signal such as the out-of-memory killer, and then this error may follow from theirs]"
            if silent else "")
    if first["user_error"]:
        return LaunchUserError(f"{where}: {first['message']}{note}")
    return LaunchError(f"{where}: {first['type']}: {first['message']}{note}\n{first['traceback']}")


def release_followers(cfg: Config) -> None:
    """End the `grpo node` followers of a multi-node run: a job that every rank leaves at once. Waits at most
    RELEASE_TIMEOUT_S for the other nodes (a node that is gone has nothing to release)."""
    if cfg.launch.nodes > 1 and not inside_job():
        timeout = min(cfg.launch.join_timeout_s, RELEASE_TIMEOUT_S)
        run_job(cfg.model_copy(update={"launch": cfg.launch.model_copy(update={"join_timeout_s": timeout})}),
                RELEASE)


# ----------------------------------------------------------------------------------------------- followers


def follow(cfg: Config, idle_timeout_s: float | None = None) -> int:
    """`grpo node`: join every training stage's job of the run led from another node, until it releases this
    node or the node is stopped (a Kubernetes Job ends its pods when pod 0 ends). With `idle_timeout_s`, gives up
    after that long without a job: a leader can spend hours between training stages (data, evaluation)."""
    if cfg.launch.nodes < 2:
        raise ConfigError(f"grpo node joins a run of several nodes: launch.nodes is {cfg.launch.nodes}; set it (and "
                          "launch.rdzv_endpoint) as the leading node has them")
    lay = layout(cfg)
    idle_since = time.monotonic()
    while True:
        job_dir = _new_job_dir(cfg, "node")
        try:
            returncode = _run_launcher(cfg, job_dir, lay)
            if (job_dir / RELEASED_FILE).exists():
                log.info("released by the run's leader: done")
                return 0
            if (job_dir / STARTED_FILE).exists():
                idle_since = time.monotonic()
                if returncode != 0:  # the leader sees it too, and decides (a retry joins again)
                    log.warning("%s", job_error("(joined)", job_dir, returncode, lay.world_size))
            elif idle_timeout_s is not None and time.monotonic() - idle_since > idle_timeout_s:
                raise LaunchUserError(f"no job from the run's leader at {cfg.launch.rdzv_endpoint} within "
                                      f"{idle_timeout_s:.0f} s (--idle-timeout): is the run started, with the same "
                                      "launch settings?")
            else:
                time.sleep(2)  # the leader's launcher is not up yet: try again
        finally:
            shutil.rmtree(job_dir, ignore_errors=True)
