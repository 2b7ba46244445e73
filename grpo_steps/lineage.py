"""Where a model came from: git commit, params hash, data hashes, MLflow run, Prefect flow run."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from grpo_steps.config import Config


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
    h = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_hashes(cfg: Config) -> dict[str, str]:
    folder = cfg.paths.validated()
    return {p.name: file_md5(p) for p in sorted(folder.glob("*.jsonl"))}


def prefect_flow_run_id() -> str:
    try:
        from prefect.runtime import flow_run

        if flow_run.id:
            return str(flow_run.id)
    except Exception:  # noqa: BLE001 - prefect absent or outside a flow: fall back to the environment
        pass
    return os.environ.get("PREFECT__FLOW_RUN_ID", "none")


def lineage_tags(cfg: Config, mlflow_run_id: str) -> dict[str, str]:
    tags = {
        "git_commit": git_commit(),
        "params_hash": cfg.params_hash(),
        "mlflow_run_id": mlflow_run_id,
        "prefect_flow_run_id": prefect_flow_run_id(),
    }
    tags.update({f"data_md5/{name}": h for name, h in data_hashes(cfg).items()})
    return tags
