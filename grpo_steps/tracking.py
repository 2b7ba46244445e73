"""MLflow plumbing shared by the stages: one parent run per pipeline execution, one nested run per stage.

The tracking URI comes from `tracking.tracking_uri`, unless the MLFLOW_TRACKING_URI environment variable is
set (it wins, so a deployment can point every stage at its server without editing params.yaml). The parent
run logs every setting and, with `tracking.system_metrics`, CPU/memory/disk/network (and GPU) metrics; each
stage's nested run logs the settings of the sections that stage reads.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from grpo_steps.config import Config
from grpo_steps.secrets import redact_secrets, redact_url
from grpo_steps.stages import STAGE_SPECS, pick

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "GRPO_PARENT_RUN_ID"
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


def setup(cfg: Config) -> str:
    """Point MLflow at the configured store and experiment; return the experiment id."""
    uri = tracking_uri(cfg)
    _set_tracking_uri(uri)
    name = cfg.tracking.experiment
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
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


def stage_params(cfg: Config, stage: str) -> dict[str, str]:
    """The flattened settings `stage` reads (its record's params keys, and `paths`); every setting for a name
    that is no stage."""
    tree = redact_secrets(cfg.as_dict())
    spec = STAGE_SPECS.get(stage)
    if spec is None:
        return flat_params(tree)
    return flat_params(pick(tree, ("paths", *spec.params)))


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


@contextmanager
def stage_run(cfg: Config, stage: str) -> Iterator[mlflow.ActiveRun]:
    """A run for one stage: nested under the pipeline's parent run when there is one (GRPO_PARENT_RUN_ID)."""
    setup(cfg)
    parent = os.environ.get(PARENT_RUN_ENV)
    tags = {"stage": stage, "params_hash": cfg.params_hash()}
    active = mlflow.active_run()
    if parent and active is not None and active.info.run_id == parent:
        run_ctx = mlflow.start_run(run_name=stage, nested=True, tags=tags, log_system_metrics=False)
    elif parent and active is None:
        # another thread or process of the same pipeline: a child of the parent run, without resuming the parent
        # (resuming and leaving it would mark the still-running pipeline as finished)
        run_ctx = mlflow.start_run(run_name=stage, parent_run_id=parent, tags=tags, log_system_metrics=False)
    elif active is not None:  # inside some other run (a notebook, a caller's own run): nest under it
        run_ctx = mlflow.start_run(run_name=stage, nested=True, tags=tags, log_system_metrics=False)
    else:  # a stage on its own (`grpo sft`, `dvc repro`): a top-level run with every setting
        run_ctx = _start_top_level_run(cfg, run_name=stage, tags=tags)
    with run_ctx as run:
        mlflow.log_params(stage_params(cfg, stage) if parent else flat_params(redact_secrets(cfg.as_dict())))
        yield run


@contextmanager
def pipeline_run(cfg: Config, run_name: str = "pipeline", tags: dict[str, str] | None = None) -> Iterator[str]:
    """The parent run of one pipeline execution; stages started inside nest under it."""
    setup(cfg)
    run_tags = {"params_hash": cfg.params_hash(), **(tags or {})}
    with _start_top_level_run(cfg, run_name=run_name, tags=run_tags) as run:
        mlflow.log_params(flat_params(redact_secrets(cfg.as_dict())))
        previous = os.environ.get(PARENT_RUN_ENV)
        os.environ[PARENT_RUN_ENV] = run.info.run_id
        try:
            yield run.info.run_id
        finally:
            if previous is None:
                os.environ.pop(PARENT_RUN_ENV, None)
            else:
                os.environ[PARENT_RUN_ENV] = previous
