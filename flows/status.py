"""`grpo status`: which stages `grpo run` would skip for the current params, like `dvc status` for the flow's
cache. Nothing runs and nothing is written.

A stage is `up to date` when dvc.lock records it so (in a DVC repository, run with params.yaml's settings:
flows/dvc_record.py), or when a cached result exists for its current cache key (params values, input and source
md5s, output paths: flows/cache.py) and the outputs that run wrote are on disk unchanged. Otherwise it `will
run`, saying why. A stage after one that will run may run too: its inputs are that stage's outputs, whose new
bytes decide (`after <stage>`). `register` always runs (a side effect on the registry, never cached).
"""

from __future__ import annotations

from typing import Any

from flows import dvc_record
from flows.cache import results_dir, stage_cache_key, stale_outputs
from grpo_steps.platform.config import Config
from grpo_steps.stages import STAGES


def _cached_record(key: str) -> dict[str, Any] | None:
    from prefect.filesystems import LocalFileSystem  # deferred: Prefect
    from prefect.results import ResultStore

    storage = results_dir()
    if not (storage / key).is_file():
        return None
    try:
        return ResultStore(result_storage=LocalFileSystem(basepath=str(storage))).read(key).result
    except Exception:  # noqa: BLE001 - an unreadable record is a miss, as it is for the flow
        return None


def stage_status(cfg: Config) -> list[dict[str, str]]:
    """One row per stage, in run order: name, state (`up to date`, `will run`, `always runs`), and why."""
    rows, upstream = [], None
    for spec in STAGES.values():
        if not spec.cached:
            rows.append({"stage": spec.name, "state": "always runs", "why": "a side effect, never cached"})
            continue
        if dvc_record.why_not(cfg, spec.name) is None and dvc_record.up_to_date(spec.name):
            state, why = "up to date", "dvc.lock records it up to date (as `dvc status` shows)"
            if upstream:
                state, why = f"after {upstream}", why + f"; runs again if {upstream}'s new outputs differ"
            rows.append({"stage": spec.name, "state": state, "why": why})
            continue
        record = _cached_record(stage_cache_key(spec.name, cfg))
        if record is None:
            state, why = "will run", "no cached run with these params, inputs and code"
        elif stale := stale_outputs(record["outputs"]):
            state, why = "will run", "outputs of the cached run missing or changed: " + ", ".join(stale)
        else:
            state, why = "up to date", f"cached run finished at {record['finished_at']} ({record['duration_s']:.0f} s)"
            if upstream:
                state, why = f"after {upstream}", why + f"; runs again if {upstream}'s new outputs differ"
        if state == "will run" and upstream is None:
            upstream = spec.name
        rows.append({"stage": spec.name, "state": state, "why": why})
    return rows


def format_status(rows: list[dict[str, str]]) -> str:
    width = max(len(r["stage"]) for r in rows)
    return "\n".join(f"{r['stage']:<{width}}  {r['state']:<18}  {r['why']}" for r in rows)
