"""The whole pipeline as one Prefect flow: each stage a task, one MLflow parent run around them all."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from grpo_steps.config import Config, load_config
from grpo_steps.stages import STAGES
from grpo_steps.tracking import pipeline_run


def _stage_task(name: str):
    fn, description = STAGES[name]

    @task(name=name, description=description, cache_policy=NO_CACHE, retries=0)
    def run_stage(cfg: Config) -> Any:
        return fn(cfg)

    return run_stage


STAGE_TASKS = {name: _stage_task(name) for name in STAGES}


@flow(name="grpo-pipeline", log_prints=True)
def grpo_pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """prepare -> validate -> train_reward -> sft -> grpo -> evaluate -> register."""
    logger = get_run_logger()
    cfg = load_config(params_path, overrides or [])
    from grpo_steps.lineage import prefect_flow_run_id

    results: dict[str, Any] = {}
    with pipeline_run(cfg, tags={"prefect_flow_run_id": prefect_flow_run_id()}) as run_id:
        logger.info("MLflow parent run %s at %s", run_id, cfg.tracking.tracking_uri)
        for name, stage in STAGE_TASKS.items():
            results[name] = stage(cfg)
    ev, reg = results["evaluate"], results["register"]
    logger.info("held-out accuracy: start %.4f -> grpo %.4f (%+.4f); registered %s v%s as %s",
                ev["start"]["accuracy"], ev["grpo"]["accuracy"], ev["accuracy_gain"],
                reg["model_name"], reg["version"], reg["alias"])
    return results
