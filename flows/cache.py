"""Cross-run caching of the pipeline's Prefect tasks: a stage whose inputs did not change is skipped.

A stage's cache key hashes what DVC would compare for it (grpo_steps.stages.STAGES, the same
deps/params/outs as dvc.yaml):

* the stage name and CACHE_VERSION,
* the values of its params.yaml keys in the resolved config (params.yaml + overrides),
* the md5 of each input file and folder (the previous stages' outputs, or your data files),
* the md5 of its source files,
* the paths of its outputs (another `paths` section writes elsewhere, so it must not share a result).

The cached result records the md5 of every output written by the run that produced it. A cache hit is only
used when those outputs are still on disk unchanged (`stale_outputs`); otherwise the flow runs the stage
again with refresh_cache=True. The key itself cannot contain the outputs' hashes: they change exactly when
the stage runs, so a key over them would never match the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from grpo_steps.platform.config import Config
from grpo_steps.platform.lineage import file_md5 as lineage_file_md5
from grpo_steps.platform.stage import SOURCE_ROOT, param_values
from grpo_steps.stages import STAGES

# Bump to invalidate every cached stage result (e.g. when the record format below changes).
CACHE_VERSION = 1
# The repository root, where the records' source files are (platform/stage.py declares it); data paths are
# relative to the cwd.
PROJECT_ROOT = SOURCE_ROOT
# Where Prefect persists stage results (the cache records), relative to the project directory. Under
# .prefect/, which git ignores; GRPO_PREFECT_RESULTS overrides it.
RESULTS_DIR_ENV = "GRPO_PREFECT_RESULTS"
DEFAULT_RESULTS_DIR = ".prefect/results"

_SKIP_PARTS = {"__pycache__", ".ipynb_checkpoints"}
# (path, size, mtime, inode) -> md5: a file is hashed once per process unless it changes.
_memo: dict[tuple[str, int, int, int], str] = {}


def results_dir() -> Path:
    return Path(os.environ.get(RESULTS_DIR_ENV) or DEFAULT_RESULTS_DIR).resolve()


def file_md5(path: Path) -> str:
    st = path.stat()
    memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    cached = _memo.get(memo_key)
    if cached is not None:
        return cached
    _memo[memo_key] = digest = lineage_file_md5(path)
    return digest


def path_md5(path: str | Path) -> str | None:
    """md5 of a file; of a folder: md5 over its files' relative paths and md5s (suffix .dir); None: missing."""
    path = Path(path)
    if path.is_file():
        return file_md5(path)
    if not path.is_dir():
        return None
    h = hashlib.md5()
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and p.suffix != ".pyc" and not _SKIP_PARTS & set(p.relative_to(path).parts))
    for f in files:
        h.update(f"{f.relative_to(path).as_posix()}\0{file_md5(f)}\n".encode())
    return h.hexdigest() + ".dir"


def cache_payload(stage: str, cfg: Config, root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """Everything a stage's cache key depends on, as a JSON-able dict (logged when debugging a miss)."""
    spec = STAGES[stage]
    return {
        "stage": stage,
        "cache_version": CACHE_VERSION,
        "params": param_values(cfg, spec.params),
        "deps": {str(p): path_md5(p) for p in spec.deps(cfg)},
        "code": {c: path_md5(root / c) for c in spec.code},
        "outs": sorted(str(p) for p in spec.outs(cfg)),
    }


def stage_cache_key(stage: str, cfg: Config, root: Path = PROJECT_ROOT) -> str:
    blob = json.dumps(cache_payload(stage, cfg, root), sort_keys=True, default=str).encode()
    return f"grpo-{stage}-{hashlib.sha256(blob).hexdigest()[:40]}"


def cache_key_fn(stage: str):
    """A Prefect `cache_key_fn` for one stage (the task's only parameter is the config, `cfg`)."""

    def key(context: Any, parameters: dict[str, Any]) -> str:
        return stage_cache_key(stage, parameters["cfg"])

    key.__name__ = key.__qualname__ = f"{stage}_cache_key"
    return key


def output_manifest(stage: str, cfg: Config) -> dict[str, str | None]:
    """md5 of each output of the stage as it is on disk now (None: missing). Persistent outputs (checkpoints)
    are left out: they are resumption state, not the stage's result."""
    return {str(p): path_md5(p) for p in STAGES[stage].outs(cfg)}


def stale_outputs(manifest: dict[str, str | None]) -> list[str]:
    """The outputs of a cached run that are missing or changed on disk now."""
    return [path for path, md5 in manifest.items() if md5 is None or path_md5(path) != md5]
