"""A spy on the one placement function, grpo_steps.platform.modeling.place (no tests here): it records every model a
stage places and places it for real. Shared by tests/stages/test_placement.py (CPU) and tests/gpu (CUDA)."""

from __future__ import annotations

import sys

import pytest
import torch


def spy_on_place(monkeypatch: pytest.MonkeyPatch) -> list[torch.nn.Module]:
    """Patch `place` wherever grpo_steps imported it (and in grpo_steps.platform.modeling, which function-level imports
    read); return the list the spy appends each placed model to, in placement order."""
    import grpo_steps.stages.evaluate  # noqa: F401 - the modules that import `place`, loaded before patching
    import grpo_steps.stages.grpo  # noqa: F401
    import grpo_steps.stages.train_reward  # noqa: F401
    from grpo_steps.platform import modeling

    real = modeling.place
    placed: list[torch.nn.Module] = []

    def spy(model, device=None):
        placed.append(model)
        return real(model, device)

    for name, module in list(sys.modules.items()):
        if name.startswith("grpo_steps") and getattr(module, "place", None) is real:
            monkeypatch.setattr(module, "place", spy)
    return placed


def devices(model: torch.nn.Module) -> set[str]:
    """The device types of a model's parameters."""
    return {p.device.type for p in model.parameters()}
