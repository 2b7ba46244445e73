"""One record of what is up to date, shared by `grpo run`, the deployments and `dvc repro`: dvc.lock and DVC's cache.

In a DVC repository whose dvc.yaml is the one the stage records render, a stage the flow runs with params.yaml's
own values and the default paths computes exactly what `dvc repro` would run for it. So the flow:

* asks DVC, before a stage, whether dvc.lock records it up to date (its params, the md5s of its inputs, code and
  outputs, as `dvc status` compares them); if so the stage is skipped, as `dvc repro` skips it;
* records a stage after it ran, or after Prefect's cache skipped it, as `dvc repro` would: `dvc commit` of that
  stage writes its dvc.lock entry and puts its outputs in DVC's cache.

After `grpo run`, `dvc repro` finds nothing to do; after `dvc repro`, `grpo run` skips every stage but `register`
(a side effect that always runs, returning the existing version). A stage run with other settings than
params.yaml's (`--set`, another params file, other paths) is not what dvc.yaml describes: it is neither skipped
nor recorded by DVC (the log says why once), and Prefect's cache (flows/cache.py) decides alone, as outside a DVC
repository.
"""

from __future__ import annotations

import logging
from pathlib import Path

from grpo_steps.platform import dvc_yaml
from grpo_steps.platform.config import Config, load_config
from grpo_steps.platform.stage import param_values
from grpo_steps.stages import STAGES

log = logging.getLogger(__name__)
PARAMS_FILE = "params.yaml"  # the file dvc.yaml's params entries read


def why_not(cfg: Config, name: str) -> str | None:
    """Why DVC's record cannot speak for stage `name` run with `cfg` here, or None when it can."""
    root = Path.cwd()
    if not (root / "dvc.yaml").is_file() or not (root / ".dvc").is_dir():
        return "this directory is not a DVC repository"
    if (root / "dvc.yaml").read_text(encoding="utf-8") != dvc_yaml.render(STAGES.values()):
        return "dvc.yaml is not the one the stage records render (run `grpo dvc-yaml`)"
    if not (root / PARAMS_FILE).is_file():
        return f"there is no {PARAMS_FILE}"
    unopened = _cannot_open(root)
    if unopened:
        return f"DVC cannot open it ({unopened})"
    base = load_config(root / PARAMS_FILE, [])
    if cfg.paths != base.paths:
        return "the paths differ from the defaults dvc.yaml assumes"
    spec = STAGES[name]
    if param_values(cfg, spec.params) != param_values(base, spec.params):
        return f"its settings differ from {PARAMS_FILE}'s (--set, or another params file)"
    return None


def _cannot_open(root: Path) -> str | None:
    """DVC's own reason it cannot open the repository at `root` (a copy outside git, say), or None."""
    from dvc.exceptions import DvcException  # deferred: DVC

    try:
        with _repo(root):
            return None
    except DvcException as e:
        return str(e)


def _repo(root: Path | None = None):
    from dvc.repo import Repo  # deferred: DVC

    logging.getLogger("dvc").setLevel(logging.ERROR)  # its "Updating lock file", "<out> is empty": ours says it
    return Repo(str(root or Path.cwd()))


def up_to_date(name: str) -> bool:
    """Whether dvc.lock records stage `name` as up to date (what `dvc status <name>` shows as nothing)."""
    with _repo() as repo:
        return not repo.status(targets=[name])


def record(name: str) -> None:
    """Record stage `name` in dvc.lock and DVC's cache, as `dvc repro` does after running it."""
    with _repo() as repo:
        repo.commit(target=name, force=True)
    log.info("stage %s: recorded in dvc.lock and DVC's cache", name)
