"""The whole pipeline as one Prefect flow: each stage a task, one MLflow parent run around them all.

* Retries: the training stages retry once after a pause (a flaky node, an MLflow server hiccup; the grpo
  stage resumes from its last checkpoint). Errors a user must fix (bad params or data, the reward-model gate)
  are not retried.
* Caching across runs: a stage whose params, inputs and source files are unchanged since an earlier run in
  this project directory is skipped, provided the outputs that run wrote are still on disk unchanged
  (flows/cache.py). Results are persisted under .prefect/results. In a DVC repository the flow also reads and
  writes dvc.lock as `dvc repro` does (flows/dvc_record.py): one record of what is up to date for both.
  `grpo run --refresh-cache` (flow parameter `refresh_cache`) runs every stage regardless. `register` always
  runs: it is a side effect on the registry and returns the existing version when the weights are already
  registered.
* Every stage logs its start, end and duration; each run publishes a markdown artifact
  (`grpo-pipeline-summary`) with the evaluation table, the gate decisions and the MLflow run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import dvc_record
from flows.cache import cache_key_fn, output_manifest, results_dir, stale_outputs
from flows.report import publish_reports, summary_markdown
from grpo_steps.errors import USER_ERRORS
from grpo_steps.platform import logs, preflight
from grpo_steps.platform.config import Config, load_config
from grpo_steps.platform.io import exclusive_lock, held_here
from grpo_steps.platform.secrets import redact_url
from grpo_steps.platform.stage import lock_path
from grpo_steps.platform.tracking import LOCAL_UI, headline_metrics, pipeline_run, tracking_uri, ui_runs_link
from grpo_steps.stages import STAGES
from grpo_steps.stages.comparison import format_comparison

SUMMARY_ARTIFACT_KEY = "grpo-pipeline-summary"


def _retry_unless_user_error(task, task_run, state) -> bool:
    """Retry only failures a second attempt can fix: not bad params or data, not a failed gate."""
    try:
        state.result()
    except USER_ERRORS:
        return False
    except BaseException:  # noqa: BLE001 - anything else (OOM, I/O, a lost server) may pass on a retry
        return True
    return True


RETRY_DELAY_S = 30


def _stage_task(name: str):
    """The Prefect task of one stage: retries, caching and print capture as its record says."""
    spec = STAGES[name]
    description, retries, cached, log_prints = spec.help, spec.retries, spec.cached, spec.log_prints
    caching: dict[str, Any] = (
        {"cache_key_fn": cache_key_fn(name), "persist_result": True} if cached else {"cache_policy": NO_CACHE}
    )

    @task(name=name, description=description, retries=retries, retry_delay_seconds=RETRY_DELAY_S,
          retry_condition_fn=_retry_unless_user_error, log_prints=log_prints, **caching)
    def run_stage(cfg: Config, parent_run_id: str) -> dict[str, Any]:
        logger = get_run_logger()
        logger.info("stage %s: started", name)
        t0 = time.perf_counter()
        # looked up at run time; its MLflow run is a child of the pipeline's, its reports Prefect artifacts
        result = STAGES[name](cfg, parent_run_id=parent_run_id, publish=publish_reports)
        outputs = output_manifest(name, cfg)
        missing = [p for p, md5 in outputs.items() if md5 is None]
        if missing:
            raise RuntimeError(f"stage {name} finished without writing {', '.join(missing)}")
        duration = time.perf_counter() - t0
        logger.info("stage %s: finished in %.1f s", name, duration)
        return {"stage": name, "result": result, "outputs": outputs, "duration_s": duration,
                "finished_at": datetime.now(UTC).isoformat(timespec="seconds")}

    return run_stage


STAGE_TASKS = {name: _stage_task(name) for name in STAGES}


def _run_stage(name: str, cfg: Config, parent_run_id: str, storage: Path,
               refresh: bool) -> tuple[dict[str, Any], str]:
    """Run one stage task, or skip it when dvc.lock or Prefect's cache records it up to date; a stage that ran or
    was skipped by Prefect's cache is recorded in dvc.lock as `dvc repro` would (flows/dvc_record.py). Returns
    (record, 'ran' | 'cached')."""
    logger = get_run_logger()
    unrecordable = dvc_record.why_not(cfg, name)
    if unrecordable is None and STAGES[name].cached and not refresh and dvc_record.up_to_date(name):
        logger.info("stage %s: skipped: dvc.lock records it up to date (params, inputs, code and outputs "
                    "unchanged)", name)
        return _recorded_by_dvc(name, cfg), "cached"
    record, status = _run_task(name, cfg, parent_run_id, storage, refresh)
    if unrecordable is None:
        dvc_record.record(name)
    elif status == "ran":
        logger.info("stage %s: not recorded in dvc.lock (`dvc repro` will run it): %s", name, unrecordable)
    return record, status


def _recorded_by_dvc(name: str, cfg: Config) -> dict[str, Any]:
    """The record of a stage dvc.lock says is up to date: its value is what its metrics file holds."""
    value: dict[str, Any] = {}
    for out in STAGES[name].outputs:
        path = out.path(cfg)
        if out.kind == "metrics" and path.suffix == ".json" and path.is_file():
            value = json.loads(path.read_text(encoding="utf-8"))
            break
    return {"stage": name, "result": value, "outputs": output_manifest(name, cfg), "duration_s": 0.0,
            "finished_at": "dvc.lock"}


def _run_task(name: str, cfg: Config, parent_run_id: str, storage: Path,
              refresh: bool) -> tuple[dict[str, Any], str]:
    """Run one stage task (or take Prefect's cached result); returns (record, 'ran' | 'cached')."""
    logger = get_run_logger()
    stage = STAGE_TASKS[name].with_options(result_storage=storage, refresh_cache=True if refresh else None)
    state = stage(cfg, parent_run_id, return_state=True)
    record = state.result()  # raises the stage's error when it failed
    if state.name != "Cached":
        return record, "ran"
    stale = stale_outputs(record["outputs"])
    if stale:
        logger.warning("stage %s: unchanged inputs, but outputs of the cached run are missing or changed "
                       "(%s): running it again", name, ", ".join(stale))
        record = stage.with_options(refresh_cache=True)(cfg, parent_run_id, return_state=True).result()
        return record, "ran"
    logger.info("stage %s: skipped: params, inputs and code unchanged since the run that finished at %s "
                "(%.1f s), its outputs verified", name, record["finished_at"], record["duration_s"])
    return record, "cached"


@flow(name="grpo-pipeline", log_prints=True)
def grpo_pipeline(
    params_path: str = "params.yaml", overrides: list[str] | None = None, refresh_cache: bool = False
) -> dict[str, Any]:
    """prepare -> validate -> sft -> train_reward -> grpo -> evaluate -> register.

    refresh_cache: run every stage even when an earlier run's cached result matches.
    """
    cfg = load_config(params_path, overrides or [])
    # a deployment's flow run (a process of its own) keeps a log file as `grpo run` does
    run_log = nullcontext() if os.environ.get(logs.LOG_FILE_ENV) else logs.run_log("flow")
    with run_log as log_file, pipeline_guard(cfg):
        if log_file is not None:
            get_run_logger().info("log file: %s", log_file)
        return _pipeline(cfg, refresh_cache)


@contextmanager
def pipeline_guard(cfg: Config) -> Iterator[None]:
    """The project's pipeline lock, then the pre-flight checks (grpo_steps/platform/preflight.py): a second run
    in the same directory stops at once naming the holder, and a missing server or data file is named before any
    work. `grpo run` enters it before Prefect's server starts; the flow inside it then finds it held."""
    path = lock_path(cfg, "pipeline")
    if held_here(path):
        yield
        return
    with exclusive_lock(path, f"the pipeline writing under {cfg.paths.models_dir}"):
        preflight.check(cfg, STAGES)
        yield


def _pipeline(cfg: Config, refresh_cache: bool) -> dict[str, Any]:
    logger = get_run_logger()
    from grpo_steps.platform.lineage import prefect_flow_run_id  # deferred: mlflow

    storage = results_dir()
    results: dict[str, Any] = {}
    records: dict[str, dict[str, Any]] = {}
    status: dict[str, str] = {name: "not run" for name in STAGES}
    run_id: str | None = None
    error: BaseException | None = None
    t0 = time.perf_counter()
    try:
        with pipeline_run(cfg, tags={"prefect_flow_run_id": prefect_flow_run_id()}) as run_id:
            logger.info("MLflow parent run %s at %s; stage results cached in %s", run_id,
                        redact_url(tracking_uri(cfg)), storage)
            for name in STAGES:
                status[name] = "failed"
                records[name], status[name] = _run_stage(name, cfg, run_id, storage, refresh_cache)
                results[name] = records[name]["result"]
            _finish_parent_run(run_id, status, results)
    except BaseException as e:
        error = e
        raise
    finally:
        _release_nodes(cfg, error)
        _publish_summary(cfg, run_id, records, status, error, time.perf_counter() - t0)

    ev, reg = results["evaluate"], results["register"]
    if status["evaluate"] == "cached":  # the stage printed it in an earlier run: show it for this one too
        logger.info("%s", format_comparison(ev))
    logger.info("held-out accuracy: start %.4f -> grpo %.4f (%+.4f); registered %s v%s as %s; cached stages: %s",
                ev["start"]["accuracy"], ev["grpo"]["accuracy"], ev["accuracy_gain"],
                reg["model_name"], reg["version"], reg["alias"],
                ", ".join(n for n, s in status.items() if s == "cached") or "none")
    return results


def _release_nodes(cfg: Config, error: BaseException | None) -> None:
    """A multi-node run ends its other nodes' `grpo node` (infra/README.md, section 7); not while it is being
    stopped (a signal, a cancellation: the nodes' own stop, or the Job's end, ends them)."""
    if cfg.launch.nodes == 1 or (error is not None and not isinstance(error, Exception)):
        return
    from grpo_steps.platform.launch import release_followers  # deferred: torch

    try:
        release_followers(cfg)
    except Exception as e:  # noqa: BLE001 - a release that fails must not hide the run's own outcome
        get_run_logger().warning("could not release the other nodes (each `grpo node` waits until it is stopped, "
                                 "or until its Kubernetes Job ends): %s", e)


def _finish_parent_run(run_id: str, status: dict[str, str], results: dict[str, Any]) -> None:
    """The parent run's headline metrics (the runs page's columns), which stages were cached, and where to
    look."""
    import mlflow

    cached = [n for n, s in status.items() if s == "cached"]
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "cached_stages", ",".join(cached) or "none")
    mlflow.log_metrics(headline_metrics(results), run_id=run_id)  # one request
    uri, experiment_id = mlflow.get_tracking_uri(), client.get_run(run_id).info.experiment_id
    link = ui_runs_link(uri, experiment_id) or f"`make mlflow-ui`, then {ui_runs_link(LOCAL_UI, experiment_id)}"
    get_run_logger().info("MLflow UI: %s", link)


def _publish_summary(cfg: Config, run_id: str | None, records: dict[str, dict[str, Any]], status: dict[str, str],
                     error: BaseException | None, duration_s: float) -> None:
    """The run's markdown artifact; a failure to publish it never hides the run's own outcome."""
    logger = get_run_logger()
    try:
        from prefect.artifacts import create_markdown_artifact

        markdown = summary_markdown(cfg, run_id, records, status, error, duration_s)
        create_markdown_artifact(markdown=markdown, key=SUMMARY_ARTIFACT_KEY,
                                 description="GRPO pipeline run: evaluation, gates, MLflow run")
    except Exception as e:  # noqa: BLE001
        logger.warning("could not publish the run summary artifact: %s", e)
