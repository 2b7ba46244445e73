"""The one wrapper between the stages and MLflow: one parent run per pipeline execution, one run per stage.

`tracked` runs a stage function in its run and records the `StageResult` it returns (grpo_steps/platform/results.py);
the stage functions themselves never call MLflow, except `log_curve` for live per-step curves (and the
register stage, whose computation is the registry's side effect).

The tracking URI comes from `tracking.tracking_uri`, unless the MLFLOW_TRACKING_URI environment variable is
set (it wins, so a deployment can point every stage at its server without editing params.yaml). The parent
run logs every setting and, with `tracking.system_metrics`, CPU/memory/disk/network (and GPU) metrics; each
stage's nested run logs the settings of the sections that stage reads.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from grpo_steps.platform.config import Config, pick
from grpo_steps.platform.io import exclusive_lock
from grpo_steps.platform.results import Report, StageResult
from grpo_steps.platform.secrets import redact_secrets, redact_url

log = logging.getLogger(__name__)

SAMPLING_INTERVAL_ENV = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"

# `scheme:` of at least two characters: s3://, mlflow-artifacts:/, file:/, http://; not a drive letter (C:\).
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")
_REMOTE_TRACKING = ("http://", "https://", "databricks")
_announced: set[tuple[str, str]] = set()


def is_uri(location: str) -> bool:
    """A location with a scheme (any scheme, with or without '//') rather than a local folder."""
    return bool(_URI.match(location))


def tracking_uri(cfg: Config) -> str:
    """The tracking URI in effect: MLFLOW_TRACKING_URI when set, else `tracking.tracking_uri`."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        if env != cfg.tracking.tracking_uri and ("env", env) not in _announced:
            _announced.add(("env", env))
            log.info("MLFLOW_TRACKING_URI=%s overrides tracking.tracking_uri=%s", redact_url(env),
                     redact_url(cfg.tracking.tracking_uri))
        return env
    return cfg.tracking.tracking_uri


def artifact_location(cfg: Config, uri: str) -> str | None:
    """Artifact root for a new experiment: URIs as given, local folders made absolute.

    A relative folder means nothing to a remote tracking server, so there the server's default is used.
    """
    location = cfg.tracking.artifact_location
    if location is None or is_uri(location):
        return location
    if uri.startswith(_REMOTE_TRACKING) and not os.path.isabs(location):
        if ("artifacts", uri) not in _announced:
            _announced.add(("artifacts", uri))
            log.info("tracking.artifact_location=%r is a relative folder and %s a remote server: using the "
                     "server's artifact root (set e.g. mlflow-artifacts:/<name> to choose)", location, uri)
        return None
    return os.path.abspath(location)


def _set_tracking_uri(uri: str) -> None:
    """mlflow.set_tracking_uri, without its side effect of exporting MLFLOW_TRACKING_URI to the environment.

    Left exported, the variable would read as the user's override the next time a stage starts in this process
    with another configuration (and be inherited by subprocesses such as `grpo run`).
    """
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


_READY_STORES: set[str] = set()


@contextmanager
def _creating_store(uri: str) -> Iterator[None]:
    """The first touch of a local MLflow database creates its tables: one process at a time, the others wait (two
    at once collide: "table ... already exists"). The lock file sits beside the database."""
    if not uri.startswith("sqlite:///") or uri in _READY_STORES:
        yield
        return
    db = Path(uri.removeprefix("sqlite:///"))
    with exclusive_lock(db.with_name(f".{db.name}.lock"), "the MLflow database", wait=True):
        yield
    _READY_STORES.add(uri)


def setup(cfg: Config) -> str:
    """Point MLflow at the configured store and experiment; return the experiment id."""
    uri = tracking_uri(cfg)
    _set_tracking_uri(uri)
    name = cfg.tracking.experiment
    with _creating_store(uri):
        exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = mlflow.create_experiment(name, artifact_location=artifact_location(cfg, uri))
        except MlflowException:  # created meanwhile by another stage or process
            exp = mlflow.get_experiment_by_name(name)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":
            log.warning("MLflow experiment %r was deleted; restoring it", name)
            mlflow.MlflowClient().restore_experiment(exp_id)
    _mark_model_training(exp_id, exp)
    mlflow.set_experiment(experiment_id=exp_id)
    end_orphaned_runs(exp_id)
    return exp_id


# Which process on which machine a run belongs to: a run left RUNNING by a process that is gone is ended.
HOST_TAG, PID_TAG = "grpo_host", "grpo_pid"


def owner_tags() -> dict[str, str]:
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def end_orphaned_runs(exp_id: str) -> list[str]:
    """End as KILLED the runs of this experiment that a process on this machine started and that stayed RUNNING
    after it died (SIGKILL, the OOM killer, a power cut): MLflow would show them running forever. A run whose
    process is alive is left alone; one started on another machine too (its processes cannot be seen from
    here). Returns the ids ended."""
    client = mlflow.MlflowClient()
    host = socket.gethostname()
    runs = client.search_runs([exp_id], filter_string=f"attributes.status = 'RUNNING' and tags.{HOST_TAG} = "
                              f"'{host}'", max_results=1000)
    ended = []
    for run in runs:
        pid = int(run.data.tags.get(PID_TAG, "0") or 0)
        if not pid or _alive(pid):
            continue
        client.set_tag(run.info.run_id, "ended_by", f"the next run on {host}: process {pid} was gone")
        client.set_terminated(run.info.run_id, status="KILLED")
        log.warning("MLflow run %s (%s) was left RUNNING by process %d, which is gone: ended as KILLED",
                    run.info.run_id, run.data.tags.get("mlflow.runName", "?"), pid)
        ended.append(run.info.run_id)
    return ended


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# What the MLflow UI shows first. The experiment's kind says "model training" (the API and UIs that read it);
# MLflow 3.17's UI itself opens every experiment in the mode of its GenAI / Model training switch, so the links
# the pipeline prints carry `workflowType=machine_learning`, and open the runs through a saved view whose
# columns are the headline metrics the flow logs on its parent run. Both tags are written once; a kind or view
# someone chose stays.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
HEADLINE_VIEW = "headline"
HEADLINE_VIEW_TAG = f"mlflow.sharedViewState.{HEADLINE_VIEW}"
# The parent run's metrics, in column order: held-out accuracy before (SFT) and after GRPO and the gain, the
# last training reward, the policy's KL to the reference on the test prompts, the reward model's held-out
# pairwise accuracy.
HEADLINE_METRICS = ("accuracy_start", "accuracy_grpo", "accuracy_gain", "train_reward", "kl_to_ref", "rm_accuracy")
# The grpo run's first charts: MLflow sections charts by the metric name's prefix, puts prefixed sections in
# sort order before the unprefixed ones, and upper case sorts first. The curves keep their usual names too.
HEADLINE_CURVES = {"reward": "Headline/reward", "eval/accuracy": "Headline/accuracy", "kl": "Headline/kl"}


def headline_view_state() -> str:
    """The saved runs view (MLflow's shared-view envelope): headline metric columns, newest runs first."""
    columns = ["attributes.`Duration`", *(f"metrics.`{m}`" for m in HEADLINE_METRICS), "attributes.`Models`"]
    state = {"selectedColumns": columns, "columnOrder": columns, "orderByKey": "attributes.start_time",
             "orderByAsc": False, "runsHiddenMode": "SHOW_ALL"}
    return json.dumps({"name": "Headline metrics", "createdAt": 0, "state": json.dumps(state)})


LOCAL_UI = "http://127.0.0.1:5000"  # `make mlflow-ui` on the local store


def ui_runs_link(tracking_uri: str, experiment_id: str) -> str | None:
    """The MLflow UI page of the experiment's runs with the headline columns; None for a local store."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return (f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs"
            f"?workflowType=machine_learning&viewStateShareKey={HEADLINE_VIEW}")


def ui_run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The MLflow UI page of one run, in the Model training mode; None for a local store."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def _mark_model_training(exp_id: str, exp: Any) -> None:
    tags = (exp.tags or {}) if exp is not None else {}
    client = mlflow.MlflowClient()
    if EXPERIMENT_KIND_TAG not in tags:
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    if HEADLINE_VIEW_TAG not in tags:
        client.set_experiment_tag(exp_id, HEADLINE_VIEW_TAG, headline_view_state())


def headline_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The parent run's headline metrics from the stage values of one pipeline run (those that ran)."""
    out: dict[str, float] = {}
    ev, grpo, rm = results.get("evaluate") or {}, results.get("grpo") or {}, results.get("train_reward") or {}
    if ev:
        out.update(accuracy_start=ev["start"]["accuracy"], accuracy_grpo=ev["grpo"]["accuracy"],
                   accuracy_gain=ev["accuracy_gain"])
        if "kl_to_reference" in ev["grpo"]:
            out["kl_to_ref"] = ev["grpo"]["kl_to_reference"]
    if "reward_last" in grpo:
        out["train_reward"] = grpo["reward_last"]
    if "pairwise_accuracy" in rm:
        out["rm_accuracy"] = rm["pairwise_accuracy"]
    return {k: round(v, 4) for k, v in _finite(out).items()}  # columns a person reads


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


def stage_params(cfg: Config, keys: tuple[str, ...] | None) -> dict[str, str]:
    """The flattened settings of params keys (a stage record's, plus `paths`); every setting for None."""
    tree = redact_secrets(cfg.as_dict())
    if keys is None:
        return flat_params(tree)
    return flat_params(pick(tree, ("paths", *keys)))


@contextmanager
def _sampling_interval(seconds: float) -> Iterator[None]:
    """MLflow reads the system-metrics interval from the environment when a run starts; set it for that."""
    previous = os.environ.get(SAMPLING_INTERVAL_ENV)
    mlflow.set_system_metrics_sampling_interval(seconds)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(SAMPLING_INTERVAL_ENV, None)
        else:
            os.environ[SAMPLING_INTERVAL_ENV] = previous


def _start_top_level_run(cfg: Config, **kwargs: Any) -> mlflow.ActiveRun:
    if not cfg.tracking.system_metrics:
        return mlflow.start_run(log_system_metrics=False, **kwargs)
    with _sampling_interval(cfg.tracking.system_metrics_interval_s):
        return mlflow.start_run(log_system_metrics=True, **kwargs)


def _is_main_process() -> bool:
    """False in the other processes of a torchrun job (a launched stage): only rank 0 tracks."""
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def stage_run(cfg: Config, stage: str, parent_run_id: str | None = None,
              keys: tuple[str, ...] | None = None) -> Iterator[mlflow.ActiveRun]:
    """The MLflow run of one stage: a child of `parent_run_id` (the pipeline's run) when given, with the
    settings of the params `keys` the stage's record declares; else nested under an active run of the caller
    (a notebook's), or a top-level run, both with every setting (`grpo sft`, `dvc repro`)."""
    setup(cfg)
    tags = {"stage": stage, "params_hash": cfg.params_hash(), **owner_tags()}
    active = mlflow.active_run()
    if parent_run_id is not None:
        # nested=True only says "an active run is fine": it must be the parent itself (MLflow checks). A child
        # started from another thread or process never resumes the parent (ending that would finish it).
        run_ctx = mlflow.start_run(run_name=stage, parent_run_id=parent_run_id, nested=active is not None,
                                   tags=tags, log_system_metrics=False)
        params = stage_params(cfg, keys)
    elif active is not None:
        run_ctx = mlflow.start_run(run_name=stage, nested=True, tags=tags, log_system_metrics=False)
        params = stage_params(cfg, None)
    else:
        run_ctx = _start_top_level_run(cfg, run_name=stage, tags=tags)
        params = stage_params(cfg, None)
    with run_ctx as run:
        mlflow.log_params(params)
        yield run


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    """MLflow metrics as floats, the non-finite ones (a NaN loss of a skipped step) left out."""
    return {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}


def record(result: StageResult) -> None:
    """Log a stage's result on the active run: metrics (finite ones), tags, params, artifacts, tables."""
    metrics = _finite(result.metrics)
    if metrics:
        mlflow.log_metrics(metrics)
    if result.tags:
        mlflow.set_tags(result.tags)
    if result.params:
        mlflow.log_params(result.params)
    for a in result.artifacts:
        if a.path.is_dir():
            mlflow.log_artifacts(str(a.path), artifact_path=a.under)
        else:
            mlflow.log_artifact(str(a.path), artifact_path=a.under)
    for name, columns in result.tables.items():
        mlflow.log_table(columns, artifact_file=name)


Publisher = Callable[[list[Report]], None]


def tracked(cfg: Config, stage: str, compute: Callable[[Config], StageResult], keys: tuple[str, ...],
            parent_run_id: str | None = None, publish: Publisher | None = None) -> StageResult:
    """Run one stage function inside its MLflow run, record its result and publish its reports.

    The one place a stage meets the platform: the run (`stage_run`), the result's metrics, tags, params,
    artifacts and tables (`record`), its reports through `publish` (the flow's Prefect artifacts; none outside
    a flow). A result carrying an `error` (a failed gate) is recorded first, then the error is raised, so the
    run is marked failed with everything that explains why. In the non-main processes of a distributed job
    the stage runs untracked.
    """
    if not _is_main_process():
        result = _checked(stage, compute(cfg))
        if result.error is not None:  # every rank stops on a failed gate, not only the one that records it
            raise result.error
        return result
    with stage_run(cfg, stage, parent_run_id, keys):
        result = _checked(stage, compute(cfg))
        record(result)
        if publish is not None and result.reports:
            publish(result.reports)
        if result.error is not None:
            raise result.error
    return result


def _checked(stage: str, result: object) -> StageResult:
    if not isinstance(result, StageResult):
        raise TypeError(f"stage {stage} returned {type(result).__name__}, not a StageResult")
    return result


def log_curve(metrics: dict[str, float], step: int) -> None:
    """Per-step training metrics on the stage's run while it trains (finite values only), the headline ones
    also under `Headline/` (the run page's first charts); a no-op when no run is active (a stage called
    without the wrapper, the other processes of a distributed job)."""
    if mlflow.active_run() is None:
        return
    finite = _finite({**metrics, **{HEADLINE_CURVES[k]: v for k, v in metrics.items() if k in HEADLINE_CURVES}})
    if finite:
        mlflow.log_metrics(finite, step=step)


def active_run_ids() -> tuple[str, str | None]:
    """(the active run's id, its parent run's id or None): the stage run the wrapper opened."""
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("no active MLflow run: call the stage through its record (grpo_steps.stages.STAGES)")
    return run.info.run_id, mlflow.get_run(run.info.run_id).data.tags.get("mlflow.parentRunId")


@contextmanager
def pipeline_run(cfg: Config, run_name: str = "pipeline", tags: dict[str, str] | None = None) -> Iterator[str]:
    """The parent run of one pipeline execution; yields its id, which the flow passes to every stage."""
    setup(cfg)
    run_tags = {"params_hash": cfg.params_hash(), **owner_tags(), **(tags or {})}
    with _start_top_level_run(cfg, run_name=run_name, tags=run_tags) as run:
        mlflow.log_params(stage_params(cfg, None))
        yield run.info.run_id
