"""What a stage is and how one runs: the record type (`Stage`, its outputs `Out`) and its call.

The seven records themselves live with the stages (grpo_steps/stages/__init__.py). Calling a record runs its
stage inside its MLflow run (grpo_steps/platform/tracking.py), or, for a training stage asked to run on more than
one process, as a torchrun child job whose rank 0 is tracked (grpo_steps/platform/launch.py). `paths` (where
things live), `tracking` (the MLflow wrapper around every stage) and `launch` (how many processes the training
stages run on: it moves the computation, not its result) are the platform's sections, read by every stage
without being declared (PLATFORM_SECTIONS).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from grpo_steps.platform import launch
from grpo_steps.platform.config import Config, pick
from grpo_steps.platform.io import exclusive_lock, left_by_a_kill
from grpo_steps.platform.results import Report, StageResult

log = logging.getLogger(__name__)

# The repository root: the records' `code` paths are relative to it.
SOURCE_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Out:
    """One output of a stage, named by its catalog entry; `kind`, `persist` and `cache` are what dvc.yaml says
    of it."""

    where: str  # the catalog entry: a method of cfg.paths (grpo_steps/platform/config.py's PathsConfig)
    kind: Literal["outs", "metrics", "plots"] = "outs"
    persist: bool = False  # kept between runs, not part of the result (resumable checkpoints)
    cache: bool = True  # False: a side effect's receipt, not cached by DVC
    plot: dict[str, str] | None = None  # dvc plot options (x, y)
    note: str = ""  # a comment in dvc.yaml

    def path(self, cfg: Config) -> Path:
        return getattr(cfg.paths, self.where)()


@dataclass(frozen=True)
class Stage:
    name: str
    run: str  # "module:function", imported when the stage runs
    help: str  # one line: what the stage does, reads and writes
    code: tuple[str, ...]  # source files and folders, relative to the repository root
    params: tuple[str, ...]  # params.yaml keys it reads: whole sections or dotted keys, as in dvc.yaml
    deps: Callable[[Config], list[Path]]  # data and model inputs
    outputs: tuple[Out, ...]
    retries: int = 0  # Prefect retries after a failure that is not a UserError
    cached: bool = True  # skipped by the flow when params, inputs and code are unchanged
    # print() into Prefect's logs. Off for stages that run TRL trainers: `datasets` fingerprints map functions
    # with dill, which disassembles them through print(), and Prefect would log that bytecode line by line.
    log_prints: bool = True
    # trains: runs on `launch`'s processes and nodes, as a torchrun child job when that is more than one
    launched: bool = False
    notes: dict[str, str] = field(default_factory=dict)  # dvc.yaml comments for deps or params entries

    def function(self) -> Callable[[Config], StageResult]:
        module, attr = self.run.split(":")
        return getattr(importlib.import_module(module), attr)

    def __call__(self, cfg: Config, *, parent_run_id: str | None = None,
                 publish: Callable[[list[Report]], None] | None = None) -> Any:
        """Run the stage inside its MLflow run (a child of `parent_run_id` when given), record its result and
        hand its reports to `publish`; returns the stage's value, raises the error its outcome carries."""
        with self.lock(cfg) as held:
            if held is not None:
                self.clean_up_after_kills(cfg)
            if self.launched and launch.wants_child_job(cfg):
                value, reports = launch.run_job(cfg, self.name, parent_run_id)  # its rank 0 is tracked
                if publish is not None and reports:
                    publish(reports)
            else:
                from grpo_steps.platform.tracking import tracked  # deferred: mlflow

                value = tracked(cfg, self.name, self.function(), self.params, parent_run_id, publish).value
            for folder in self.persistent_outs(cfg):  # DVC fails on a missing out, even an empty persistent one
                folder.mkdir(parents=True, exist_ok=True)
        return value

    def lock(self, cfg: Config) -> AbstractContextManager[Any]:
        """The stage's lock on its outputs, held while it runs: a second run of the stage on the same outputs
        (another `grpo run`, `dvc repro`, `grpo <stage>`) stops at once naming the holder, a user error. Held by
        the process the stage was started in: not again by the ranks of its child job, nor by the other ranks of
        a job launched by hand (accelerate launch, torchrun)."""
        if launch.in_child_job() or (launch.inside_job() and os.environ.get("RANK", "0") != "0"):
            return contextlib.nullcontext()
        outs = ", ".join(str(p) for p in self.outs(cfg))
        return exclusive_lock(lock_path(cfg, self.name), f"stage {self.name} (writing {outs})")

    def clean_up_after_kills(self, cfg: Config) -> None:
        """Under the stage's lock: remove the temporaries a killed run of it left beside its outputs, and put back
        an output a kill caught between two renames."""
        for out in self.outputs:
            removed, restored = left_by_a_kill(out.path(cfg))
            if removed:
                log.info("stage %s: removed what a killed run left: %s", self.name, ", ".join(map(str, removed)))
            if restored is not None:
                log.warning("stage %s: put back %s, which a killed run had moved aside", self.name, restored)

    def outs(self, cfg: Config) -> list[Path]:
        """Outputs that are the stage's result: every one exists after a successful run."""
        return [o.path(cfg) for o in self.outputs if not o.persist]

    def persistent_outs(self, cfg: Config) -> list[Path]:
        """Outputs kept between runs and not part of the result (DVC `persist: true`)."""
        return [o.path(cfg) for o in self.outputs if o.persist]

    def code_files(self) -> list[tuple[str, Path]]:
        """(path relative to the repository, absolute path) of each Python file of the stage's `code`, in a
        stable order."""
        files: list[Path] = []
        for rel in self.code:
            p = SOURCE_ROOT / rel
            files += sorted(p.rglob("*.py")) if p.is_dir() else [p] if p.is_file() else []
        return [(f.relative_to(SOURCE_ROOT).as_posix(), f) for f in files]


def lock_path(cfg: Config, name: str) -> Path:
    """Where the lock of stage (or `pipeline`) `name` lives: one folder for all, whatever the outputs' folders."""
    return Path(cfg.paths.models_dir) / f".{name}.lock"


# Sections every stage may read without declaring them: where files live, the tracking wrapper's settings, and the
# processes the training stages run on.
PLATFORM_SECTIONS = ("paths", "tracking", "launch")


def param_values(cfg: Config, keys: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The values of params.yaml keys (sections or dotted keys) in the resolved config."""
    return pick(cfg.as_dict(), keys)
