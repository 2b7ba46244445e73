"""Helpers (no tests) for tests that stop a process and everything it started: torch's launcher starts each rank in
a session of its own, so a process group signal does not reach them; the tree is walked instead."""

from __future__ import annotations

import psutil


def kill_tree(pid: int, timeout_s: float = 60) -> None:
    """SIGKILL a process and all its descendants (those still running), then wait for them."""
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=timeout_s)
