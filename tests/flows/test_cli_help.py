"""`grpo --help` and each stage's help: what the stage does, reads, writes and which params it depends on,
from its record (so the help cannot drift from what the stage really declares)."""

from __future__ import annotations

import pytest

from grpo_steps.cli import main
from grpo_steps.platform.config import load_config
from grpo_steps.stages import STAGES


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("spec", STAGES.values(), ids=[s.name for s in STAGES.values()])
def test_each_stage_help_says_what_it_reads_and_writes(capsys, spec):
    text = " ".join(_help(capsys, spec.name).split())  # unwrapped
    cfg = load_config(None)
    assert "reads: " in text and "writes: " in text and "params: " in text
    for path in [*spec.deps(cfg), *(o.path(cfg) for o in spec.outputs)]:
        assert str(path) in text, (spec.name, str(path))
    assert all(key in text for key in spec.params)


def test_top_level_help_lists_every_command(capsys):
    text = _help(capsys)
    for command in ["run", "serve", "status", "dvc-yaml", *(s.name for s in STAGES.values())]:
        assert command in text
