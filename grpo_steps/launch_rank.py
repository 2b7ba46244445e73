"""One rank of a training stage's torchrun job (grpo_steps/platform/launch.py starts the job; its docstring has the
whole picture): `python -m grpo_steps.launch_rank JOB_DIR`.

The rank takes the job (stage, config, the flow's MLflow run) from the lowest rank whose node holds one, runs the
stage through its record (rank 0 tracks it and writes `result.json`), prefixes its output with its rank, and records
its error for the parent to report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import sys
import time
import traceback
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from grpo_steps.errors import USER_ERRORS
from grpo_steps.platform.config import Config
from grpo_steps.platform.io import atomic_path
from grpo_steps.platform.launch import (
    CHILD_JOB_ENV,
    JOB_FILE,
    OTHER_JOB_FILE,
    RELEASE,
    RELEASED_FILE,
    RESULT_FILE,
    STARTED_FILE,
    LaunchError,
    die_with_parent,
)
from grpo_steps.platform.logs import LOG_FILE_ENV, setup_logging, trace_to_file
from grpo_steps.platform.results import Report
from grpo_steps.stages import STAGES


class _RankPrefixed:
    """A text stream that starts every line (and every progress bar redraw) with the rank."""

    def __init__(self, stream: Any, prefix: str):
        self._stream, self._prefix, self._line_start = stream, prefix, True

    def write(self, text: str) -> int:
        out = []
        for piece in re.split(r"([\r\n])", text):
            if not piece:
                continue
            if piece in ("\r", "\n"):
                out.append(piece)
                self._line_start = True
                continue
            if self._line_start:
                out.append(self._prefix)
                self._line_start = False
            out.append(piece)
        self._stream.write("".join(out))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _job_store(timeout_s: int) -> Any:
    """The launcher's store (torch elastic hosts one per job and hands its address to the ranks), under a prefix
    of this job's run and restart."""
    import torch.distributed as dist

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        raise LaunchError("the ranks need the store of torch's launcher: unset TORCH_DISABLE_SHARE_RDZV_TCP_STORE")
    prefix = f"grpo-job/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"
    return dist.PrefixStore(prefix, dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                                   is_master=False, timeout=timedelta(seconds=timeout_s)))


def _exchange_job(store: Any, local: dict[str, Any] | None, rank: int, world_size: int) -> dict[str, Any]:
    """Every rank gets the job of the lowest rank that holds one."""
    store.set(f"job/{rank}", json.dumps(local) if local is not None else "")
    for r in range(world_size):
        blob = store.get(f"job/{r}").decode()
        if blob:
            return json.loads(blob)
    raise LaunchError("no node of this job holds a job: every node ran `grpo node`; start the run (or the stage) "
                      "on one of them")


FAILED_KEY, DONE_KEY = "failed", "done"


@contextlib.contextmanager
def _stop_when_a_peer_fails(rank: int, timeout_s: int) -> Iterator[None]:
    """While the stage runs, a thread that ends this rank as soon as another rank has failed. On one node the
    launcher stops the ranks itself; on several, the other nodes' ranks would wait in a collective until its
    timeout. The thread has a store connection of its own (a client is not shared between threads), and it is
    stopped and joined before the rank exits: a thread still inside the store's C++ code while the interpreter
    finalizes aborts the process."""
    import threading

    stop = threading.Event()

    def watch() -> None:
        try:
            store = _job_store(timeout_s)
            while not stop.wait(1.0):
                if store.check([FAILED_KEY]):
                    failed = store.get(FAILED_KEY).decode()
                    if failed != str(rank):
                        print(f"rank {failed} failed: rank {rank} stops", file=sys.stderr, flush=True)
                        os._exit(143)
                    return
        except Exception:  # noqa: BLE001 - the store is gone: the job is ending, and the launcher decides
            return

    thread = threading.Thread(target=watch, name="grpo-peer-failure", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def _record_error(dirs: list[Path], e: BaseException, rank: int, world_size: int, exit_code: int) -> None:
    err = {"rank": rank, "world_size": world_size, "node": int(os.environ.get("GROUP_RANK", "0")),
           "host": socket.gethostname(), "exit_code": exit_code, "user_error": isinstance(e, USER_ERRORS),
           "type": f"{type(e).__module__}.{type(e).__qualname__}", "message": str(e),
           "traceback": "".join(traceback.format_exception(e))[-4000:], "time": time.time()}
    for d in dirs:
        with contextlib.suppress(OSError):
            (d / f"error-rank{rank}.json").write_text(json.dumps(err), encoding="utf-8")


def _write_result(job_dir: Path, value: Any, reports: list[Report]) -> None:
    payload = {"value": value, "reports": [dataclasses.asdict(r) for r in reports]}
    with atomic_path(job_dir / RESULT_FILE) as tmp:
        tmp.write_text(json.dumps(payload, default=str), encoding="utf-8")


def rank_main(argv: list[str]) -> int:
    """One rank of a launched job (see the module docstring)."""
    die_with_parent(signal.SIGKILL)  # the launcher gone (even killed), this rank goes too
    if os.getppid() == 1:
        return 143
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    sys.stdout = _RankPrefixed(sys.stdout, f"[rank {rank}] ")
    sys.stderr = _RankPrefixed(sys.stderr, f"[rank {rank}] ")
    if rank != 0:
        os.environ["TQDM_DISABLE"] = "1"  # one progress bar: rank 0's
    # the rank-prefixed stderr, and the log file of the command that launched the job
    setup_logging(stream=sys.stderr, log_file=os.environ.get(LOG_FILE_ENV), prefix=f"[rank {rank}] ")
    local_dir = Path(argv[0])
    local = json.loads((local_dir / JOB_FILE).read_text(encoding="utf-8")) if (local_dir / JOB_FILE).is_file() else None
    dirs, store, timeout_s = [local_dir], None, int(os.environ[CHILD_JOB_ENV])
    try:
        store = _job_store(timeout_s)
        job = _exchange_job(store, local, rank, world_size)
        job_dir = Path(job["job_dir"])
        dirs = list(dict.fromkeys([local_dir, job_dir]))
        if local is not None and job_dir != local_dir:  # this node's parent will find no result.json: say why
            (local_dir / OTHER_JOB_FILE).touch()
        if job["stage"] == RELEASE:
            (local_dir / RELEASED_FILE).touch()
            return 0
        (local_dir / STARTED_FILE).touch()
        os.chdir(job["cwd"])
        with _stop_when_a_peer_fails(rank, timeout_s):
            return _run_rank(job, rank, job_dir, store)
    except BaseException as e:
        code = 2 if isinstance(e, USER_ERRORS) else 1
        trace_to_file()
        _record_error(dirs, e, rank, world_size, code)
        if store is not None:
            with contextlib.suppress(Exception):
                store.set(FAILED_KEY, str(rank))
        if code == 2:
            print(f"grpo: error: {e}", file=sys.stderr)
            return code
        raise


def _run_rank(job: dict[str, Any], rank: int, job_dir: Path, store: Any) -> int:
    """The stage through its record; rank 0 writes the result, and no rank exits before it has (the launcher
    of a node without rank 0 would otherwise report success before the result exists)."""
    cfg = Config.model_validate(job["config"])
    reports: list[Report] = []
    value = STAGES[job["stage"]](cfg, parent_run_id=job["parent_run_id"], publish=reports.extend)
    if rank == 0:
        _write_result(job_dir, value, reports)
        store.set(DONE_KEY, "1")
    else:  # rank 0 may still be saving a large model: wait long (its failure or death ends the wait anyway)
        store.wait([DONE_KEY], timedelta(hours=24))
    return 0


if __name__ == "__main__":
    sys.exit(rank_main(sys.argv[1:]))
