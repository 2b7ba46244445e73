"""MLflow plumbing shared by the stages: one parent run per pipeline execution, one nested run per stage."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlflow

from grpo_steps.config import Config

PARENT_RUN_ENV = "GRPO_PARENT_RUN_ID"


def setup(cfg: Config) -> str:
    """Point MLflow at the configured store and experiment; return the experiment id."""
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        location = cfg.tracking.artifact_location
        if "://" not in location:
            location = os.path.abspath(location)
        exp_id = mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
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


@contextmanager
def stage_run(cfg: Config, stage: str) -> Iterator[mlflow.ActiveRun]:
    """A run for one stage: nested under the pipeline's parent run when there is one (GRPO_PARENT_RUN_ID)."""
    setup(cfg)
    parent = os.environ.get(PARENT_RUN_ENV)
    tags = {"stage": stage, "params_hash": cfg.params_hash()}
    active = mlflow.active_run()
    if parent and active is not None and active.info.run_id == parent:
        with mlflow.start_run(run_name=stage, nested=True, tags=tags) as run:
            yield run
    elif parent:  # another thread or process of the same pipeline: resume the parent, then nest
        with mlflow.start_run(run_id=parent), mlflow.start_run(run_name=stage, nested=True, tags=tags) as run:
            yield run
    else:
        with mlflow.start_run(run_name=stage, tags=tags) as run:
            mlflow.log_params(flat_params(cfg.as_dict()))
            yield run


@contextmanager
def pipeline_run(cfg: Config, run_name: str = "pipeline", tags: dict[str, str] | None = None) -> Iterator[str]:
    """The parent run of one pipeline execution; stages started inside nest under it."""
    setup(cfg)
    with mlflow.start_run(run_name=run_name, tags={"params_hash": cfg.params_hash(), **(tags or {})}) as run:
        mlflow.log_params(flat_params(cfg.as_dict()))
        previous = os.environ.get(PARENT_RUN_ENV)
        os.environ[PARENT_RUN_ENV] = run.info.run_id
        try:
            yield run.info.run_id
        finally:
            if previous is None:
                os.environ.pop(PARENT_RUN_ENV, None)
            else:
                os.environ[PARENT_RUN_ENV] = previous
