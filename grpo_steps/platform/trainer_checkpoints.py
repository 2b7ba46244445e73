"""Resumable checkpoints of the stages that train with a transformers `Trainer` (TRL's SFTTrainer: `sft`).

    <models_dir>/sft_checkpoints/<key>/checkpoint-500/   weights, optimizer, scheduler, RNG, trainer_state.json

The key hashes what the stage's record says it depends on: its settings, the content of its inputs and its code
(`stage_key`). A rerun with the same key resumes from the newest complete checkpoint (the Trainer restores the
optimizer, the schedule, the RNG and the data order); changed settings, inputs or code start over, as the flow's
cache and `dvc repro` rerun the stage. `trainer_state.json` is the Trainer's last write to a checkpoint, so a
folder without a readable one (a kill while saving) or with unreadable weights is moved aside
(`corrupt-checkpoint-*`), named, and never resumed from. The grpo stage's own checkpoints: checkpoint.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

from safetensors import safe_open

from grpo_steps.platform.config import Config
from grpo_steps.platform.io import file_sha256, set_aside
from grpo_steps.platform.stage import Stage, param_values

log = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def stage_key(stage: Stage, cfg: Config) -> str:
    """Hash of the stage's settings (its record's params), its inputs' content and its code."""
    h = hashlib.sha256(json.dumps(param_values(cfg, stage.params), sort_keys=True, default=str).encode())
    for dep in stage.deps(cfg):
        dep = Path(dep)
        for f in sorted(dep.rglob("*")) if dep.is_dir() else [dep] if dep.is_file() else []:
            if f.is_file():
                h.update(f"\n{f.as_posix()}:{file_sha256(f)}".encode())
    for name, f in stage.code_files():
        h.update(f"\n{name}:{file_sha256(f)}".encode())
    return h.hexdigest()[:16]


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint-*` folder, newest first (completeness not checked)."""
    if not folder.is_dir():
        return []
    return sorted(((int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))),
                  reverse=True)


def unusable(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from, or None."""
    state = path / TRAINER_STATE
    try:
        step = json.loads(state.read_text(encoding="utf-8"))["global_step"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{state} is missing or unreadable ({type(e).__name__}): the save did not finish"
    if f"checkpoint-{step}" != path.name:
        return f"{state} says step {step}"
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        return f"{path} holds no safetensors weights"
    for w in weights:
        try:
            with safe_open(str(w), framework="pt") as f:
                for name in f.keys():
                    f.get_slice(name)
        except Exception as e:  # noqa: BLE001 - whatever the reader raises, these weights are unusable
            return f"{w} is corrupt or truncated ({type(e).__name__}: {e})"
    for other in ("optimizer.pt", "scheduler.pt"):
        if (path / other).is_file() and (path / other).stat().st_size == 0:
            return f"{path / other} is empty"
    return None


def set_aside_unusable(folder: Path) -> None:
    """Move every unusable checkpoint newer than the newest usable one aside, naming each; say so when none is
    left to resume from. Call on the main process, under the stage's lock."""
    bad = 0
    for _, path in checkpoints(folder):
        why = unusable(path)
        if why is None:
            return
        bad += 1
        log.warning("unusable checkpoint %s: %s; moved aside to %s", path, why, set_aside(path))
    if bad:
        log.warning("no usable checkpoint in %s (%d unusable, moved aside): starting from step 0", folder, bad)


def resume_from(folder: Path) -> Path | None:
    """The newest checkpoint in `folder`, after `set_aside_unusable` (every process calls this)."""
    found = checkpoints(folder)
    return found[0][1] if found else None
