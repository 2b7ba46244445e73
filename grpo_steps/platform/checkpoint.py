"""Atomic, verified, resumable GRPO checkpoints.

One folder per training setup, so runs with different params (or different input files) never resume from,
nor prune, each other's checkpoints:

    <models_dir>/grpo_checkpoints/<key>/step-000025/
        model/               save_pretrained(safe_serialization=True): weights in safetensors, a loadable policy
        optimizer.pt         optimizer state: tensors and numbers only, read back with torch.load(weights_only=True)
        shards/              instead of model/ and optimizer.pt with model.sharding fsdp2: weights and optimizer
                             state as torch.distributed.checkpoint writes them, each process its own shards, read
                             back resharded to however many processes resume
        trainer_state.json   step, data position, trainer counters, metrics history, RNG states (one per process)
        manifest.json        written last: sha256 and size of every file above, the key, the step, params hash

`key` hashes the settings that shape training (not evaluate/registry/tracking, nor the checkpoint cadence)
and the content of the input files (prompts, starting policy, reward model when used). A checkpoint is
written into a temporary sibling and renamed into place, so a folder named `step-*` is complete or absent;
the manifest catches what a rename cannot (truncation or bit rot later on): a checkpoint whose files do not
match it is reported, naming the path, and the next older one is used. Resuming restores the weights, the
optimizer, the data position and every RNG, and saving never consumes RNG, so a resumed run on CPU ends with
weights identical to an uninterrupted one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from grpo_steps.grpo.sharding import load_sharded, save_sharded
from grpo_steps.grpo.trainer import GRPOTrainer, NonFiniteLossError, PromptSampler, is_adapter
from grpo_steps.platform.config import Config
from grpo_steps.platform.io import atomic_path, file_sha256, fsync_tree, set_aside

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
MODEL = "model"
SHARDS = "shards"  # a sharded (model.sharding: fsdp2) checkpoint's weights and optimizer state
_STEP_DIR = re.compile(r"^step-(\d{6,})$")
# Sections and settings that do not change what training computes: changing them keeps the checkpoints.
_NOT_TRAINING_SECTIONS = ("evaluate", "registry", "tracking", "launch")  # launch: resumed on any layout
_NOT_TRAINING_GRPO = ("checkpoint_every", "keep_checkpoints", "eval_every", "eval_prompts", "select_best")


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt, or was written for other settings; the message names the path."""


def checkpoints_root(cfg: Config) -> Path:
    """`<models_dir>/grpo_checkpoints` (the same folder the grpo stage's record declares as a DVC output)."""
    return cfg.paths.grpo_checkpoints()


def input_files(cfg: Config) -> list[Path]:
    """The files training reads: prompts, the starting policy, and the reward model when it is used."""
    files = [cfg.paths.validated_file("train")]
    dirs = [cfg.paths.sft_policy()]
    if any(rf.name == "reward_model" for rf in cfg.grpo.reward_functions):
        dirs.append(cfg.paths.reward_model())
    for d in dirs:
        files.extend(sorted(p for p in Path(d).rglob("*") if p.is_file()))
    return files


def training_key(cfg: Config, code: list[tuple[str, Path]]) -> str:
    """Hash of the training settings, of the input files' content and of the grpo stage's code (`code`: its
    record's files, `Stage.code_files()`): the checkpoint folder's name. Changed code starts a new run: a checkpoint
    of the old code is never taken for this code's result (as `dvc repro` and the flow's cache rerun the stage)."""
    tree = cfg.as_dict()
    for section in _NOT_TRAINING_SECTIONS:
        tree.pop(section, None)
    for name in _NOT_TRAINING_GRPO:
        tree["grpo"].pop(name, None)
    h = hashlib.sha256(json.dumps(tree, sort_keys=True).encode())
    for f in input_files(cfg):
        h.update(f"\n{f.as_posix()}:{file_sha256(f)}".encode())
    for name, f in code:
        h.update(f"\n{name}:{file_sha256(f)}".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------- RNG


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch CPU (and CUDA) generator states, as JSON-able values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
        "cuda": [],
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if torch.cuda.is_available() and state.get("cuda"):
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
        else:
            log.warning("checkpoint has CUDA RNG states for %d devices, this process sees %d: not restored",
                        len(state["cuda"]), torch.cuda.device_count())


# ------------------------------------------------------------------------------------------ checkpoint


@dataclass
class Checkpoint:
    """A checkpoint read and verified in full, not yet applied to anything."""

    path: Path
    step: int
    state: dict[str, Any]
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]


def _step_of(path: Path) -> int | None:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


class CheckpointStore:
    """The checkpoints of one training setup: `<root>/<key>/step-XXXXXX/`."""

    def __init__(self, root: Path, key: str, keep: int = 2, params_hash: str = ""):
        self.root = Path(root).resolve()  # messages name absolute paths
        self.key = key
        self.dir = self.root / key
        self.keep = keep
        self.params_hash = params_hash

    # ---- discovery

    def steps(self) -> list[tuple[int, Path]]:
        """(step, folder) of every `step-*` folder, newest first (validity not checked)."""
        if not self.dir.is_dir():
            return []
        found = [(s, p) for p in self.dir.iterdir() if p.is_dir() and (s := _step_of(p)) is not None]
        return sorted(found, reverse=True)

    def warn_foreign(self) -> None:
        """Say so when checkpoints of other settings exist: they are never used for this run."""
        if not self.root.is_dir():
            return
        others = sorted(p for p in self.root.iterdir()
                        if p.is_dir() and p.name != self.key and not p.name.startswith("."))
        if others:
            log.warning("ignoring checkpoints written for different params or inputs (this run's key is %s): %s",
                        self.key, ", ".join(str(p) for p in others))

    def clean_temporaries(self) -> None:
        """Remove what a killed save or prune left behind (hidden `.step-*` temporaries); call under the lock."""
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith(".step-") and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                elif p.name.startswith(".step-"):
                    p.unlink(missing_ok=True)

    # ---- reading

    def read(self, path: Path) -> Checkpoint:
        """Verify `path` against its manifest and load it into memory; CheckpointError names what is wrong."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise CheckpointError(f"{manifest_path} is missing: incomplete checkpoint")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            files: dict[str, dict[str, Any]] = manifest["files"]
            step = int(manifest["step"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{manifest_path} is unreadable: {e}") from None
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"{path}: checkpoint format {manifest.get('format')!r}, expected {FORMAT}")
        if manifest.get("key") != self.key:
            raise CheckpointError(f"{path} was written for different params or inputs "
                                  f"(key {manifest.get('key')!r}, this run's is {self.key!r})")
        sharded = manifest.get("layout", "replicate") == "fsdp2"
        for required in (STATE, f"{SHARDS}/.metadata") if sharded else (STATE, OPTIMIZER):
            if required not in files:
                raise CheckpointError(f"{path}: manifest lists no {required}")
        if not sharded and not any(rel.startswith(f"{MODEL}/") and rel.endswith(".safetensors") for rel in files):
            raise CheckpointError(f"{path}: manifest lists no safetensors weights")
        for rel, meta in files.items():
            f = path / rel
            if not f.is_file():
                raise CheckpointError(f"{f} is missing")
            size = f.stat().st_size
            if size != meta["size"]:
                raise CheckpointError(f"{f} is corrupt or truncated: {size} bytes, manifest says {meta['size']}")
            if file_sha256(f) != meta["sha256"]:
                raise CheckpointError(f"{f} is corrupt: sha256 does not match the manifest")
        if step != _step_of(path):
            raise CheckpointError(f"{path}: manifest says step {step}, the folder name another")
        try:
            state = json.loads((path / STATE).read_text(encoding="utf-8"))
            weights: dict[str, torch.Tensor] = {}
            for rel in sorted(files):
                if rel.startswith(f"{MODEL}/") and rel.endswith(".safetensors"):
                    weights.update(load_file(str(path / rel)))
            # sharded: read by every process from its folder when restored (torch.distributed.checkpoint)
            optimizer = {} if sharded else torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - whatever the loader raises, this checkpoint is unusable
            raise CheckpointError(f"{path} could not be loaded: {type(e).__name__}: {e}") from e
        if int(state.get("step", -1)) != step:
            raise CheckpointError(f"{path / STATE}: step {state.get('step')!r}, manifest says {step}")
        written = sum(1 for rel in files if rel.startswith(f"{SHARDS}/") and rel.endswith(".distcp"))
        if sharded and written < int(state.get("num_processes", 1)):
            raise CheckpointError(f"{path / SHARDS}: {written} shard files for the {state.get('num_processes')} "
                                  "processes that wrote it (on several nodes the checkpoints need a shared "
                                  "filesystem)")
        return Checkpoint(path=path, step=step, state=state, weights=weights, optimizer=optimizer)

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies. Each unusable newer one is named and moved aside (`corrupt-step-*`
        beside the others: kept for a look, never read again); with none usable the log says the run starts from
        step 0. Call under the lock, on the main process."""
        unusable = 0
        for _, path in self.steps():
            try:
                return self.read(path)
            except CheckpointError as e:
                unusable += 1
                log.warning("unusable checkpoint %s: %s; moved aside to %s, trying an older one", path, e,
                            set_aside(path))
        if unusable:
            log.warning("no usable checkpoint in %s (%d unusable, moved aside): starting from step 0", self.dir,
                        unusable)
        return None

    # ---- writing

    def save(self, trainer: GRPOTrainer, sampler: PromptSampler) -> Path | None:
        """Checkpoint the trainer after its current step. Call on every process (RNG states are gathered);
        the main process writes. Refuses (NonFiniteLossError) while any weight is NaN/inf. RNG-neutral."""
        acc = trainer.accelerator
        step = trainer.step
        if not trainer.weights_finite():
            raise NonFiniteLossError(f"the policy has NaN/inf weights after step {step}: no checkpoint written, "
                                     "nothing saved (lower grpo.learning_rate or grpo.max_grad_norm)")
        mine = rng_state()
        states = trainer.gather_objects(mine)
        target = self.dir / f"step-{step:06d}"
        shards = None
        if trainer.fsdp2:  # every process writes its own shards, into a hidden folder the main one names
            self.dir.mkdir(parents=True, exist_ok=True)
            shards = Path(trainer.gather_objects(tempfile.mkdtemp(prefix=f".{target.name}.", dir=self.dir)
                                                 if acc.is_main_process else None)[0])
            save_sharded(trainer.model, trainer.optimizer, str(shards))
        if not acc.is_main_process:
            return None
        state = {
            "format": FORMAT, "step": step, "key": self.key, "params_hash": self.params_hash,
            "sampler_position": sampler.resume_position, "num_processes": acc.num_processes,
            "trainer": trainer.training_state(), "rng": states,
        }
        layout = "fsdp2" if trainer.fsdp2 else "replicate"
        try:
            with atomic_path(target) as tmp:
                tmp.mkdir()
                if shards is not None:
                    shards.rename(tmp / SHARDS)  # torch.distributed.checkpoint's files: weights and optimizer
                else:
                    trainer.unwrapped.save_pretrained(str(tmp / MODEL), safe_serialization=True)
                    torch.save(trainer.optimizer.state_dict(), tmp / OPTIMIZER)
                (tmp / STATE).write_text(json.dumps(state), encoding="utf-8")
                fsync_tree(tmp)
                files = {p.relative_to(tmp).as_posix(): {"sha256": file_sha256(p), "size": p.stat().st_size}
                         for p in sorted(tmp.rglob("*")) if p.is_file()}
                manifest = {"format": FORMAT, "step": step, "key": self.key, "params_hash": self.params_hash,
                            "layout": layout, "files": files}
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
                fsync_tree(tmp / MANIFEST)
            fsync_tree(self.dir)
        finally:
            set_rng_state(mine)  # saving never moves any RNG: a run that checkpoints samples what one that does not
        log.info("checkpoint written: %s", target)
        self.prune(step)
        return target

    def prune(self, current_step: int) -> None:
        """Keep the newest `keep` checkpoints up to `current_step`; newer folders (left by an earlier run that
        did not verify) stay until this run reaches their step and replaces them."""
        kept = [(s, p) for s, p in self.steps() if s <= current_step]
        for _, path in kept[self.keep:]:
            doomed = path.with_name(f".{path.name}.del")
            shutil.rmtree(doomed, ignore_errors=True)
            path.rename(doomed)  # out of sight first: a kill mid-delete leaves a temporary, not a broken step-*
            shutil.rmtree(doomed, ignore_errors=True)


def _load_adapter(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Load adapter weights, refusing ones whose adapter does not fit the policy's (rank, modules)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict  # deferred: only with model.lora

    expected = set(get_peft_model_state_dict(model))
    if set(weights) != expected:
        raise CheckpointError(f"{source}: the adapter does not fit the policy's (model.lora): missing "
                              f"{sorted(expected - set(weights))[:5]}, unexpected "
                              f"{sorted(set(weights) - expected)[:5]}")
    try:
        set_peft_model_state_dict(model, weights)
    except RuntimeError as e:  # a shape mismatch (another rank)
        raise CheckpointError(f"{source}: the adapter does not fit the policy's (model.lora): {e}") from e


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Put saved trainable weights into the policy: every weight (tied copies through their twin), or a LoRA
    adapter's; CheckpointError naming `source` when they do not fit."""
    if is_adapter(model):  # adapter weights only; the base weights are the starting policy's
        _load_adapter(model, weights, source)
        return
    missing, unexpected = model.load_state_dict(weights, strict=False)
    loaded_ptrs = {t.data_ptr() for k, t in model.state_dict().items() if k in weights}
    params = model.state_dict()
    untied = [k for k in missing if params[k].data_ptr() not in loaded_ptrs]  # tied copies load via their twin
    if unexpected or untied:
        raise CheckpointError(f"{source}: weights do not fit the policy (missing {untied}, unexpected {unexpected})")


def restore(trainer: GRPOTrainer, sampler: PromptSampler, ckpt: Checkpoint) -> dict[str, Any]:
    """Apply a verified checkpoint: weights, optimizer, counters, history, data position. Returns this
    process's RNG state, for the caller to `set_rng_state` right before training continues."""
    acc = trainer.accelerator
    layout = "fsdp2" if (ckpt.path / SHARDS).is_dir() else "replicate"
    if layout != ("fsdp2" if trainer.fsdp2 else "replicate"):
        raise CheckpointError(f"{ckpt.path} was written with model.sharding {layout}; resume it with that setting "
                              "(or delete it to start over)")
    if trainer.fsdp2:  # resharded to this run's processes, however many wrote it (one: nothing to shard)
        try:
            load_sharded(trainer.model, trainer.optimizer, str(ckpt.path / SHARDS))
        except Exception as e:  # noqa: BLE001 - whatever the reader raises, this checkpoint is unusable
            raise CheckpointError(f"{ckpt.path / SHARDS} could not be loaded: {type(e).__name__}: {e}") from e
    else:
        load_weights(trainer.unwrapped, ckpt.weights, ckpt.path)
        trainer.optimizer.load_state_dict(ckpt.optimizer)
    trainer.load_training_state(ckpt.state["trainer"])
    sampler.position = int(ckpt.state["sampler_position"])
    sampler._order = []  # recomputed for the position's epoch
    states = ckpt.state["rng"]
    saved_procs = int(ckpt.state.get("num_processes", len(states)))
    if saved_procs != acc.num_processes:
        log.warning("checkpoint %s was written by %d processes, this run has %d: it resumes the same run (weights, "
                    "optimizer, data order; samples do not depend on the layout with grpo.generation_backend "
                    "compact), and a finished one is not trained again: give another models_dir to compare layouts",
                    ckpt.path, saved_procs, acc.num_processes)
    return states[acc.process_index] if acc.process_index < len(states) else states[0]
