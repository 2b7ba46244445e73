"""Checks before any work: what a run needs that can be known without running it, all named at once.

`grpo run` calls `check` before the Prefect server starts, a stage command before its stage, the flow itself when
a deployment starts it. Each problem is one line in the user's terms (the setting to change), and together they
are a `PreflightError`, a user error: exit code 2, no retry.

* the tracking server answers (a short timeout, not MLflow's minutes of retries), a local store's folder is
  writable;
* the data files `data.*` names are there and not empty (when `prepare` is among the stages);
* the output folders are writable;
* the free disk holds the checkpoints the settings imply (when `grpo` is among the stages and the starting
  weights are on disk to size them by).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from grpo_steps.errors import UserError
from grpo_steps.platform.config import Config
from grpo_steps.platform.secrets import redact_url

# How long the tracking server has to answer its health check.
TRACKING_TIMEOUT_S = 10.0
DATA_KEYS = ("train", "eval", "test", "preferences_train", "preferences_eval")
# A checkpoint holds the weights and AdamW's two moments: about three times the weights.
CHECKPOINT_PER_WEIGHT = 3


class PreflightError(UserError):
    """Something the run needs is missing or unreachable: every problem found, one per line."""


def check(cfg: Config, stages: Iterable[str]) -> None:
    """Raise `PreflightError` naming every problem found for running `stages` with `cfg`."""
    stages = set(stages)
    problems = [*tracking(cfg), *writable(cfg)]
    if "prepare" in stages:
        problems += data_files(cfg)
    if "grpo" in stages:
        problems += disk_space(cfg)
    if problems:
        raise PreflightError("\n  ".join(problems))


def tracking(cfg: Config) -> list[str]:
    from grpo_steps.platform.tracking import tracking_uri  # deferred: mlflow

    uri = tracking_uri(cfg)
    source = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI", "").strip() else "tracking.tracking_uri"
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=TRACKING_TIMEOUT_S)
        except requests.RequestException as e:
            reason = (f"no answer within {TRACKING_TIMEOUT_S:g} s" if isinstance(e, requests.Timeout)
                      else "connection failed")
            return [f"cannot reach the MLflow server at {redact_url(uri)} ({reason}); check "
                    f"tracking.tracking_uri or MLFLOW_TRACKING_URI (this one is from {source}), and that the "
                    "server is up"]
        return []
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not _can_write(folder):
            return [f"the MLflow database's folder {folder.resolve()} is not writable ({source}={uri})"]
    return []


def writable(cfg: Config) -> list[str]:
    return [f"paths.{key}: {Path(value).resolve()} is not writable"
            for key, value in (("data_dir", cfg.paths.data_dir), ("models_dir", cfg.paths.models_dir),
                               ("reports_dir", cfg.paths.reports_dir))
            if not _can_write(Path(value))]


def data_files(cfg: Config) -> list[str]:
    if cfg.data.source != "files":
        return []
    problems = []
    if not cfg.data.train:
        problems.append("data.source is 'files' but data.train names no file")
    for key in DATA_KEYS:
        name = getattr(cfg.data, key)
        if not name:
            continue
        path = Path(name)
        if not path.exists():
            problems.append(f"data.{key}: no such file: {path.resolve()}")
        elif path.is_file() and not _has_content(path):
            problems.append(f"data.{key}: {path.resolve()} is empty")
    return problems


def disk_space(cfg: Config) -> list[str]:
    """Room for `keep_checkpoints` + 1 checkpoints (the newest is written before the oldest goes) and the
    output, sized by the starting weights when they are on disk (a local `model.pretrained`, else models/sft)."""
    start = Path(cfg.model.pretrained) if cfg.model.pretrained and Path(cfg.model.pretrained).is_dir() \
        else cfg.paths.sft_policy()
    weights = sum(p.stat().st_size for p in Path(start).glob("*.safetensors")) if Path(start).is_dir() else 0
    if not weights:
        return []
    copies = (cfg.grpo.keep_checkpoints + 1) * CHECKPOINT_PER_WEIGHT + 2 if cfg.grpo.checkpoint_every else 2
    need, where = copies * weights, _existing(Path(cfg.paths.models_dir))
    free = shutil.disk_usage(where).free
    if free >= need:
        return []
    return [f"{free / 2**30:.2f} GiB free on the device of {where.resolve()}, and the grpo stage needs about "
            f"{need / 2**30:.2f} GiB ({cfg.grpo.keep_checkpoints} checkpoints kept of {weights / 2**20:.0f} MiB "
            "weights with their optimizer state, plus the output): free space or lower grpo.keep_checkpoints"]


def _existing(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def _can_write(path: Path) -> bool:
    return os.access(_existing(path), os.W_OK)


def _has_content(path: Path) -> bool:
    with path.open("rb") as f:
        return bool(f.read(1 << 16).strip())
