"""Building, loading and saving models: tiny ones from a config, real ones from a local path or the hub."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from grpo_steps.grpo.trainer import is_adapter
from grpo_steps.platform.config import Config, ConfigError, LoraConfig, ModelConfig
from grpo_steps.platform.io import atomic_path

log = logging.getLogger(__name__)

# Formats that unpickle on load (and so can run arbitrary code): refused, whatever their name.
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")


def seed_everything(seed: int) -> None:
    """Seeded, on deterministic kernels: the same settings on the same machine and thread count give the same
    bytes, run after run (tests/stages/test_determinism.py)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    deterministic_kernels()


def deterministic_kernels() -> None:
    """torch's deterministic algorithms, warning (not failing) where an op has none.

    On CPU this makes an accumulating `index_put_` (the backward of `x[index]`) sum serially: with more than one
    thread torch otherwise adds with atomics in whatever order the threads reach them, and two runs of the same
    settings part after a few steps. Our own gathers use `index_select` (grpo_steps/grpo/logprobs.py); this is
    the net for any other (TRL's trainers, models' code). No cost measurable on CPU (docs/operations.md).
    On CUDA, cuBLAS then runs with a fixed workspace (CUBLAS_WORKSPACE_CONFIG, set in grpo_steps/__init__.py)
    and ops with a deterministic kernel use it. torch.empty's memory is left unfilled, as without the mode:
    nothing of ours reads it.
    """
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False


def begin_stage(seed: int) -> None:
    """A stage starts from no one else's global state: seeded, and accelerate's process-wide state cleared.

    `AcceleratorState` is a singleton that keeps the first trainer's mixed precision: after an in-process
    SFT under bf16, the grpo stage would train under bf16 autocast too, unlike `grpo grpo` or `dvc repro`.
    The process group (PartialState) is kept, so this is safe in a rank of a launched stage (torchrun).
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    seed_everything(seed)


def trainer_precision(cfg: ModelConfig) -> dict[str, bool]:
    """The precision and checkpointing flags every TRL config gets, so none falls back to TRL's own defaults
    (bf16 autocast and gradient checkpointing on)."""
    return {"bf16": cfg.precision == "bf16", "fp16": cfg.precision == "fp16",
            "activation_checkpointing": cfg.activation_checkpointing}  # transformers 5's name for it


def trl_args(seed: int, cfg: ModelConfig) -> dict[str, object]:
    """What every TRL config of ours sets alike: logging to MLflow every 10 steps, no trainer checkpoints unless
    the stage asks (`trainer_checkpointing`; the stage writes its output itself), the seed, the device, and
    precision and activation checkpointing made explicit.

    Every optimizer step takes a full global batch (`dataloader_drop_last`): an epoch's last, partial batch would
    be one step of fewer rows on one process but, on N, padded by accelerate with rows from the epoch's start
    (every process must take as many batches), so the run would differ from its one-process twin there. Each
    epoch is reshuffled, so the rows left out change from epoch to epoch."""
    return {"logging_steps": 10, "save_strategy": "no", "report_to": ["mlflow"], "seed": seed,
            "use_cpu": not torch.cuda.is_available(), "dataloader_num_workers": 0, "dataloader_drop_last": True,
            **trainer_precision(cfg)}


def trainer_checkpointing(every: int, keep: int) -> dict[str, object]:
    """A TRL config's checkpoint settings: every `every` optimizer steps (0: none), the newest `keep` kept, each
    with the optimizer, schedule and RNG a resume needs (grpo_steps/platform/trainer_checkpoints.py)."""
    if not every:
        return {"save_strategy": "no"}
    return {"save_strategy": "steps", "save_steps": every, "save_total_limit": keep, "save_only_model": False}


def trl_warmup(ratio: float) -> float:
    """`warmup_steps` of a TRL config for a warm-up *ratio* (`sft.warmup_ratio`, `reward_model.warmup_ratio`).

    transformers 5 has no `warmup_ratio` any more: its `warmup_steps` reads a float in [0, 1) as a ratio of the
    training steps (`ceil(steps * ratio)` warm-up steps, TrainingArguments.get_warmup_steps) and anything from 1
    up as a number of steps. A ratio below 1 passes as it is; 1.0 (warm up throughout, which the config allows)
    would read as one step, so it passes as the largest float below 1, whose ceil(steps * r) is every step.
    """
    return ratio if ratio < 1 else math.nextafter(1.0, 0.0)


def per_process_batch(global_batch: int, processes: int, setting: str) -> int:
    """Each process's share of a global batch of `global_batch` rows split over `processes`; a ConfigError
    naming `setting` when it does not divide evenly (the global batch is split, never repeated)."""
    if global_batch % processes:
        raise ConfigError(
            f"{setting}={global_batch} is the global batch (rows per optimizer step, all processes together) and "
            f"must divide evenly over the {processes} processes of this run: use a multiple of {processes}"
        )
    return global_batch // processes


def split_trl_batch(args, global_batch: int, setting: str):
    """A TRL config whose optimizer steps see `global_batch` rows in all, as on one process: transformers' batch
    size is per device, and a step takes one from every process (and from every GPU of a DataParallel one)."""
    devices = args.world_size * max(1, args.n_gpu)  # world_size: the PartialState transformers set up itself
    args.per_device_train_batch_size = per_process_batch(global_batch, devices, setting)
    return args


def accelerator_device() -> torch.device:
    """This process's device, as accelerate assigns it: in a rank of a launched stage (torchrun) with GPUs the
    process's own GPU (cuda:<local rank>); a single process, the GPU when there is one; otherwise the CPU. Like every
    Accelerator of the stages, it asks for the CPU when CUDA is unavailable (`cpu=not torch.cuda.is_available()`),
    so a model placed here and the tensors a stage's Accelerator places meet on one device."""
    from accelerate import PartialState  # the process-wide state: the stage's Accelerator shares it

    return PartialState(cpu=not torch.cuda.is_available()).device


def written_once(write: Callable[[], None]) -> None:
    """Run `write` in the main process only; every process returns once it is done.

    Under torchrun every process holds the same trained weights. Two writers would each rename their own folder
    into place, and the last rename would win: transformers 5 writes the weights on rank 0 only
    (`should_save_on_this_rank`), so rank 1's folder would hold a tokenizer and no model. One process alone is
    the main process, so this is a plain call there. Every process must call it, and `write` must not run a
    collective (the others are waiting): gather sharded weights on every process first, as the grpo stage does
    with `full_state_dict`."""
    from accelerate import PartialState  # the process-wide state: the stage's Accelerator shares it

    state = PartialState(cpu=not torch.cuda.is_available())
    if state.is_main_process:
        write()
    state.wait_for_everyone()


def save_pretrained(path: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """`model` (safetensors; `state_dict` in place of its own when given, e.g. gathered from shards) and its
    tokenizer at `path`, replacing what was there in one rename."""
    with atomic_path(path) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(str(tmp))


def place(model: PreTrainedModel, device: torch.device | str | None = None) -> PreTrainedModel:
    """The one placement of the models the stages build or load for inference (evaluation, sampling, scoring):
    `model` moved to `device`, by default this process's accelerator device (`accelerator_device`). Models a
    stage trains are placed by `accelerator.prepare` (or TRL's Trainer, which calls it) on that same device.
    Helpers that build inputs for a model (sampling, RewardModelFunction) put them on the model's device."""
    return model.to(accelerator_device() if device is None else device)


def torch_dtype(name: str) -> torch.dtype | str:
    """`model.dtype` as from_pretrained takes it ("auto": the checkpoint's own)."""
    return name if name == "auto" else getattr(torch, name)


def accelerate_precision(cfg: ModelConfig) -> str:
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]


def apply_lora(policy: PreTrainedModel, cfg: LoraConfig | None) -> PreTrainedModel:
    """The policy with a fresh LoRA adapter (peft), only the adapter trainable; unchanged without `model.lora`.
    At initialisation the adapter adds exactly zero (B = 0), so the wrapped policy computes what the base does."""
    if cfg is None:
        return policy
    from peft import LoraConfig as PeftLoraConfig  # deferred: peft loads only when LoRA is asked for
    from peft import get_peft_model

    return get_peft_model(policy, PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
        task_type="CAUSAL_LM", bias="none",
    ))


def merged(model: PreTrainedModel) -> PreTrainedModel:
    """A plain transformers model to save and serve: the adapter merged into the base weights (in place)."""
    return model.merge_and_unload() if is_adapter(model) else model


def tiny_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, num_labels: int | None = None):
    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    return Qwen2Config(**kwargs) if cfg.architecture == "qwen2" else LlamaConfig(**kwargs)


def build_policy(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A fresh causal LM from the config, or the configured pretrained one."""
    if cfg.pretrained:  # a local directory or a hub name
        return load_model(cfg.pretrained, "pretrained policy (model.pretrained)",
                          trust_remote_code=cfg.trust_remote_code, dtype=cfg.dtype, allow_hub=True)
    model = AutoModelForCausalLM.from_config(tiny_config(cfg, tokenizer), dtype=_built_dtype(cfg))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def _built_dtype(cfg: ModelConfig) -> torch.dtype:
    """A model built from the config has no dtype of its own: auto is float32."""
    return torch_dtype("float32" if cfg.dtype == "auto" else cfg.dtype)


def build_reward_backbone(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    return AutoModelForSequenceClassification.from_config(tiny_config(cfg, tokenizer, num_labels=1),
                                                          dtype=_built_dtype(cfg))


def load_tokenizer(
    path: str | Path, trust_remote_code: bool = False, allow_hub: bool = False
) -> PreTrainedTokenizerBase:
    if not allow_hub:
        _require_dir(path, "tokenizer")
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def policy_tokenizer(cfg: Config) -> PreTrainedTokenizerBase:
    """The starting policy's tokenizer: the pretrained policy's (`model.pretrained`), else the project's."""
    if cfg.model.pretrained:
        return load_tokenizer(cfg.model.pretrained, cfg.model.trust_remote_code, allow_hub=True)
    return load_tokenizer(cfg.paths.tokenizer())


def _require_dir(path: str | Path, what: str) -> None:
    """Stage outputs are local directories; say which one is missing instead of asking the hub for it."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise FileNotFoundError(f"{what} at {p.resolve()} is a file: a model or tokenizer is a folder")
    if not p.is_dir():
        raise FileNotFoundError(f"{what} not found at {p.resolve()} (run the stage that writes it first)")


def require_safetensors(path: str | Path, what: str) -> None:
    """Refuse a model directory without safetensors weights, naming any pickled weights found instead."""
    p = Path(path)
    if any(p.glob("*.safetensors")):
        return
    pickled = sorted(f.name for pattern in PICKLED_WEIGHTS for f in p.glob(pattern))
    if pickled:
        raise FileNotFoundError(
            f"{what} at {p.resolve()} has no safetensors weights, only pickled ones ({', '.join(pickled)}): "
            "refusing to load them, since unpickling can run arbitrary code. Convert the weights to safetensors "
            "(save_pretrained(..., safe_serialization=True)) where you trust them"
        )
    raise FileNotFoundError(f"{what} at {p.resolve()} has no weights (*.safetensors)")


def _warn_remote_code(trust_remote_code: bool, path: str | Path) -> None:
    if trust_remote_code:
        log.warning("model.trust_remote_code is true: Python code shipped with %s may run", path)


def load_model(path: str | Path, what: str, head: Literal["causal_lm", "classifier", "saved"] = "causal_lm", *,
               trust_remote_code: bool = False, dtype: str = "float32", allow_hub: bool = False,
               **kwargs: Any) -> PreTrainedModel:
    """The one way a model is loaded, named `what` in every error: safetensors weights only (pickled ones can run
    code on load), in `dtype` (`model.dtype`: a torch dtype's name, or auto for the checkpoint's own).

    `head`: causal_lm (a policy, or a likelihood reward model), classifier (a scalar reward head; `kwargs` such
    as num_labels), or saved (whichever the folder's config names: a likelihood reward model is saved as a
    causal LM, a scalar one as a sequence classifier). A local folder is required unless `allow_hub`, and then
    only a name that is not a local folder goes to the hub."""
    if not allow_hub or Path(path).exists():
        _require_dir(path, what)
        require_safetensors(path, what)
    _warn_remote_code(trust_remote_code, path)
    try:
        if head == "saved":
            archs = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code).architectures or []
            head = "causal_lm" if any(a.endswith("ForCausalLM") for a in archs) else "classifier"
        auto = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
        return auto.from_pretrained(str(path), use_safetensors=True, trust_remote_code=trust_remote_code,
                                    dtype=torch_dtype(dtype), **kwargs)
    except (OSError, ValueError) as e:
        raise RuntimeError(f"could not load the {what} from {path}: {e}") from e


def load_policy(path: str | Path, trust_remote_code: bool = False, dtype: str = "float32") -> PreTrainedModel:
    """A policy saved by a stage (or any causal LM folder)."""
    return load_model(path, "policy checkpoint", trust_remote_code=trust_remote_code, dtype=dtype)


def load_reward_model(path: str | Path, trust_remote_code: bool = False, dtype: str = "float32") -> PreTrainedModel:
    """The reward model saved by train_reward: a scalar head or a likelihood model, as its config says."""
    return load_model(path, "reward model checkpoint", "saved", trust_remote_code=trust_remote_code, dtype=dtype)
