"""What a stage function returns: its value, and what the tracking wrapper records of it.

A stage computes; it does not talk to MLflow or Prefect. It returns a `StageResult`, and the one wrapper
around every stage (`grpo_steps/platform/tracking.py`'s `tracked`, called by `Stage.__call__`) logs the result's
metrics, tags, params, artifacts and tables on the stage's MLflow run and hands its reports to the flow's
publisher (Prefect artifacts). A stage that computed an outcome which fails a gate (invalid data, a reward
model that ranks at chance) returns it with `error` set: the wrapper records it all, then raises the error.

Only curves logged while a stage runs (training loss per step) go to MLflow directly, through
`tracking.log_curve`, so a long run can be watched live.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Artifact:
    """A file or folder to log on the stage's run, under `under` (the run's root when None)."""

    path: Path
    under: str | None = None


@dataclass(frozen=True)
class Report:
    """A human-readable report for the orchestrator's UI (a Prefect markdown or table artifact)."""

    key: str
    description: str
    markdown: str | None = None
    table: list[dict[str, str]] | None = None


@dataclass
class StageResult:
    value: Any  # what the stage returns to its caller (the CLI, the flow's summary, tests)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)  # extra params, e.g. the md5 of each data file
    artifacts: list[Artifact] = field(default_factory=list)
    tables: dict[str, dict[str, list[Any]]] = field(default_factory=dict)  # artifact file -> columns
    reports: list[Report] = field(default_factory=list)
    error: BaseException | None = None  # computed and recorded, then raised by the wrapper

    def unwrap(self) -> Any:
        """The value, or the error the stage's outcome carries (for callers that skip the wrapper)."""
        if self.error is not None:
            raise self.error
        return self.value
