"""`grpo serve`: the pipeline on a cron schedule without a work pool or worker (Prefect's `flow.serve`).

The process that serves is the worker: it asks the Prefect server for due runs and executes each in a
subprocess, from the current directory (the project root). Schedules are created by the server's scheduler,
so a real server is needed (`prefect server start`, PREFECT_API_URL); Prefect's temporary local server does
not schedule. Shared clusters use prefect.yaml's deployments and work pools instead (infra/README.md); the
default cron is the same as the nightly-retrain deployment's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from grpo_steps.errors import UserError

DEFAULT_CRON = "0 2 * * *"
DEFAULT_TIMEZONE = "UTC"
DEFAULT_NAME = "grpo-serve"


class ServeError(UserError, ValueError):
    """A bad schedule or parameters, or no Prefect server to serve against."""


@dataclass
class ServePlan:
    name: str
    cron: str
    timezone: str
    parameters: dict[str, Any]
    next_runs: list[datetime] = field(default_factory=list)
    api_url: str | None = None

    def describe(self) -> str:
        lines = [
            f"deployment:  grpo-pipeline/{self.name} (served by this process; no work pool)",
            f"schedule:    cron '{self.cron}' ({self.timezone})",
            "next runs:   " + ", ".join(d.strftime("%Y-%m-%d %H:%M %Z") for d in self.next_runs),
            f"parameters:  {self.parameters}",
            f"Prefect API: {self.api_url or 'not set (PREFECT_API_URL): serving needs a running Prefect server'}",
        ]
        return "\n".join(lines)


def plan(cron: str = DEFAULT_CRON, timezone: str = DEFAULT_TIMEZONE, name: str = DEFAULT_NAME,
         params_path: str = "params.yaml", overrides: list[str] | None = None, n_next: int = 3,
         now: datetime | None = None) -> ServePlan:
    """Validate the schedule and the flow parameters the way Prefect will, and list the next run times."""
    from cronsim import CronSim, CronSimError
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.settings import get_current_settings
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import ValidationError, validate

    from flows.pipeline import grpo_pipeline  # deferred: Prefect, torch, mlflow

    try:
        tz = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ServeError(f"unknown time zone {timezone!r}") from e
    try:
        CronSchedule(cron=cron, timezone=timezone)
        times = list(islice(CronSim(cron, (now or datetime.now(tz)).astimezone(tz)), n_next))
    except (ValueError, CronSimError) as e:  # pydantic's ValidationError is a ValueError
        why = e.errors()[0]["msg"] if hasattr(e, "errors") else str(e)
        raise ServeError(f"invalid cron expression {cron!r}: {why}") from None
    parameters: dict[str, Any] = {"params_path": params_path, "overrides": list(overrides or [])}
    schema = parameter_schema(grpo_pipeline.fn).model_dump_for_openapi()
    try:
        validate(parameters, schema, raise_on_error=True, preprocess=True, ignore_required=False)
    except ValidationError as e:
        raise ServeError(f"parameters do not fit the flow: {e}") from e
    api_url = get_current_settings().api.url
    return ServePlan(name=name, cron=cron, timezone=timezone, parameters=parameters, next_runs=times,
                     api_url=str(api_url) if api_url else None)


def serve(p: ServePlan) -> None:
    """Create (or update) the deployment and run its schedule until interrupted."""
    if not p.api_url:
        raise ServeError("grpo serve needs a Prefect server that schedules runs: start one with "
                         "`prefect server start` and export PREFECT_API_URL=http://127.0.0.1:4200/api")
    from prefect.schedules import Cron

    from flows.pipeline import grpo_pipeline  # deferred: Prefect, torch, mlflow

    grpo_pipeline.serve(
        name=p.name,
        schedules=[Cron(p.cron, timezone=p.timezone)],
        parameters=p.parameters,
        description=f"GRPO pipeline on cron '{p.cron}' ({p.timezone}), served by `grpo serve`",
        tags=["grpo", "serve"],
        limit=1,  # one pipeline run at a time in this process; a late one waits
    )
