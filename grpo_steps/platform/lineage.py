"""Where a model came from: git commit, params hash, data hashes (validated files and dvc.lock outs), the
reward model and starting policy it was trained from, MLflow runs, Prefect flow run."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from grpo_steps.platform.config import Config
from grpo_steps.platform.io import file_digest

log = logging.getLogger(__name__)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def file_md5(path: Path) -> str:
    """md5, the hash DVC records for a file, so our tags and dvc.lock can be compared directly."""
    return file_digest(path, "md5")


def data_hashes(cfg: Config) -> dict[str, str]:
    folder = cfg.paths.validated()
    return {p.name: file_md5(p) for p in sorted(folder.glob("*.jsonl"))}


def dvc_lock_hashes(lock_path: str | Path = "dvc.lock") -> dict[str, str]:
    """`{out path: md5}` of every stage's outs recorded in dvc.lock (empty when there is none).

    Directory outs carry DVC's `<md5>.dir` hash, so a registered model can be matched to the exact DVC-cached
    data and checkpoints it came from (`dvc checkout` of the commit with this dvc.lock restores them).
    """
    lock_path = Path(lock_path)
    if not lock_path.is_file():
        return {}
    try:
        lock: Any = yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        log.warning("could not read %s for lineage: %s", lock_path, e)
        return {}
    stages = lock.get("stages") if isinstance(lock, dict) else None
    out: dict[str, str] = {}
    for stage in (stages or {}).values():
        for entry in (stage or {}).get("outs") or []:
            if isinstance(entry, dict) and entry.get("path") and entry.get("md5"):
                out[str(entry["path"])] = str(entry["md5"])
    return out


def prefect_flow_run_id() -> str:
    try:
        from prefect.runtime import flow_run

        if flow_run.id:
            return str(flow_run.id)
    except Exception:  # noqa: BLE001 - prefect absent or outside a flow: fall back to the environment
        pass
    return os.environ.get("PREFECT__FLOW_RUN_ID", "none")


def lineage_tags(cfg: Config, mlflow_run_id: str, pipeline_run_id: str | None = None) -> dict[str, str]:
    tags = {
        "git_commit": git_commit(),
        "params_hash": cfg.params_hash(),
        "mlflow_run_id": mlflow_run_id,
        "prefect_flow_run_id": prefect_flow_run_id(),
    }
    if pipeline_run_id:
        tags["mlflow_pipeline_run_id"] = pipeline_run_id
    tags.update({f"data_md5/{name}": h for name, h in data_hashes(cfg).items()})
    for what, folder in (("reward_model", cfg.paths.reward_model()), ("start_policy", cfg.paths.sft_policy())):
        weights = cfg.paths.weights(folder)
        if weights.is_file():
            tags[f"{what}_md5"] = file_md5(weights)
    tags.update({f"dvc_lock/{path}": h for path, h in dvc_lock_hashes().items()})
    return tags
