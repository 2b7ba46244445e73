"""Fixtures of the algorithm tests that build trainers in-process."""

import pytest


@pytest.fixture
def fresh_accelerator_state():
    """No mixed precision left behind by an earlier test's Accelerator (a process-wide singleton that stages
    run in-process leave set): it would put a trainer's model under bf16 autocast."""
    from grpo_steps.platform.modeling import begin_stage

    begin_stage(0)
