"""A batch function that never finishes, run in math_accuracy's worker process to test its backstop."""

from __future__ import annotations

import time


def never_returns(completions: list[str], timeout_s: int) -> list[float]:
    time.sleep(3600)
    return [1.0] * len(completions)


def crashes(completions: list[str], timeout_s: int) -> list[float]:
    import os

    os._exit(3)  # as a worker killed by the OOM killer or a native crash
