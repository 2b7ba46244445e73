"""Each stage reads only the params keys its record declares (grpo_steps/stages/__init__.py), so the Prefect cache
keys and dvc.yaml, both derived from the records, re-run a stage exactly when something it reads changed.

The whole pipeline runs on the tiny budget with a recording view of the configuration: every attribute read
(methods included, which read through the same view) is noted as a dotted params key.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from pydantic import BaseModel

from grpo_steps.platform.stage import PLATFORM_SECTIONS
from grpo_steps.stages import STAGES
from tests.support.project import load_tiny

# Methods that read the whole configuration on purpose: logging every setting, the lineage hash.
WHOLE = {"as_dict", "params_hash", "model_dump", "model_copy", "model_dump_json"}
ALIASES = {"validate_": "validate"}


class Recording:
    """A read-only view of a Config (or a section) that notes every key read into `reads`."""

    def __init__(self, obj: BaseModel, prefix: str, reads: set[str]):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_reads", reads)

    def __getattr__(self, name: str) -> Any:
        obj, prefix, reads = self._obj, self._prefix, self._reads
        key = f"{prefix}.{ALIASES.get(name, name)}" if prefix else ALIASES.get(name, name)
        if name in WHOLE:
            reads.add("*")
            return getattr(obj, name)
        attr = inspect.getattr_static(type(obj), name, None)
        if isinstance(attr, staticmethod | classmethod):
            return getattr(obj, name)
        if callable(attr):  # a method: runs against this view, so what it reads is recorded
            return attr.__get__(self)
        value = getattr(obj, name)
        if isinstance(value, BaseModel):
            return Recording(value, key, reads)
        reads.add(key)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("stages must not change the configuration")


def _declared(key: str, params: tuple[str, ...]) -> bool:
    return key.split(".")[0] in PLATFORM_SECTIONS or any(key == p or key.startswith(p + ".") for p in params)


def undeclared(stage: str, reads: set[str]) -> set[str]:
    return {k for k in reads - {"*"} if not _declared(k, STAGES[stage].params)}


def test_the_recorder_catches_an_undeclared_read(workdir):
    reads: set[str] = set()
    cfg = Recording(load_tiny(workdir), "", reads)
    assert cfg.grpo.beta == 0.02 and cfg.validate_.completion_tokens() == 8
    assert reads == {"grpo.beta", "validate.max_completion_tokens", "validate.max_answer_tokens"}
    assert undeclared("sft", reads) == {"grpo.beta"}
    assert undeclared("evaluate", reads) == reads
    assert undeclared("grpo", reads) == {"validate.max_completion_tokens", "validate.max_answer_tokens"}


@pytest.mark.slow  # the whole pipeline on the tiny budget, ~1 minute on 2 cores
def test_every_stage_reads_only_its_declared_params(workdir):
    cfg = load_tiny(workdir)
    read_by: dict[str, set[str]] = {}
    for name in STAGES:
        read_by[name] = set()
        STAGES[name](Recording(cfg, "", read_by[name]))
    problems = {name: sorted(undeclared(name, reads)) for name, reads in read_by.items() if undeclared(name, reads)}
    assert not problems, f"stages read params keys their record does not declare: {problems}"
    assert "grpo.num_generations" in read_by["grpo"] and "sft.max_steps" in read_by["sft"], "reads are seen"
