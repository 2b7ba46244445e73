"""Stage `grpo`: policy optimisation from the starting policy against the weighted reward functions.

Writes the final policy (safetensors + tokenizer) and the per-step metrics (reports/grpo_steps.csv, the
curve `dvc plots` and the evaluation plot read); every step's metrics also go to MLflow.

Reliability:
- Everything checkable is checked before any model is loaded (`preflight`): the reward functions import, and
  the input paths exist (each missing one named).
- Every `grpo.checkpoint_every` steps, and at the end, a verified checkpoint is written
  (grpo_steps/platform/checkpoint.py); a rerun with the same params and inputs resumes from the newest good one
  automatically (a Prefect retry included), and on CPU ends with the same weights as an uninterrupted run.
- `<models_dir>/.grpo.lock`, held by the stage's record as every stage's is (grpo_steps/platform/stage.py), keeps
  two runs from writing the same outputs: the second fails fast, naming the holder's pid.
- Nothing non-finite is saved: a NonFiniteLossError stops the run before any output is written, and the
  previous models/grpo stays as it was.
- Under torchrun only the main process writes files and logs to MLflow; metrics are global.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from pydantic import ValidationError
from tqdm.auto import tqdm

from grpo_steps.data.files import read_jsonl
from grpo_steps.data.prompts import render_all
from grpo_steps.grpo.reward_model import RewardModelFunction
from grpo_steps.grpo.rewards import RewardFunction, function_name, resolve_reward_function
from grpo_steps.grpo.sharding import full_state_dict
from grpo_steps.grpo.trainer import GRPOTrainer, NonFiniteLossError, PromptSampler
from grpo_steps.platform.checkpoint import CheckpointStore, checkpoints_root, restore, set_rng_state, training_key
from grpo_steps.platform.config import Config, ConfigError, ModelConfig, RewardFunctionConfig
from grpo_steps.platform.io import atomic_path
from grpo_steps.platform.modeling import (
    accelerate_precision,
    apply_lora,
    begin_stage,
    load_policy,
    load_reward_model,
    load_tokenizer,
    merged,
    place,
    save_pretrained,
    seed_everything,
    written_once,
)
from grpo_steps.platform.results import StageResult
from grpo_steps.platform.tracking import log_curve
from grpo_steps.stages import STAGES
from grpo_steps.stages.training_eval import BEST_DIR, BestPolicy, TrainingEval

log = logging.getLogger(__name__)

CURVE_KEYS = ("step", "reward", "reward_std", "reward_std_within_group", "kl", "loss", "grad_norm", "entropy",
              "entropy/trained_rows", "completions/mean_length", "frac_reward_zero_std", "clip_ratio/region_mean",
              "step_time", "eval/accuracy", "eval/reward_model_score",
              # the rollout correction's, when it applies (grpo.rollout_precision other than the update's)
              "sampling/importance_sampling_ratio/mean", "sampling/importance_sampling_ratio/clipped_frac",
              "sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
              # seconds: decoding the step's rollout, and (grpo.async_rollout) the part of it the update did not hide
              "rollout/decode_time", "rollout/wait_time")


def build_reward_functions(cfg: Config, tokenizer) -> tuple[list[RewardFunction], list[float]]:
    """Built-in names, the trained reward model, or `module:function` import paths from params.yaml."""
    funcs, weights = [], []
    for rf in cfg.grpo.reward_functions:
        if rf.name == "reward_model":
            model = load_reward_model(cfg.paths.reward_model(), cfg.reward_trust_remote_code(), cfg.model.dtype)
            # on the policy's device: place() and the stage's Accelerator share accelerate's process state
            funcs.append(RewardModelFunction(place(model), tokenizer))
        else:
            funcs.append(resolve_reward_function(rf.name, reward_kwargs(cfg, rf)))
        weights.append(rf.weight)
    return funcs, weights


def reward_model_of(funcs: list[RewardFunction]) -> RewardModelFunction | None:
    """The trained reward model among the reward functions, if it is one of them."""
    return next((f for f in funcs if isinstance(f, RewardModelFunction)), None)


def training_rows(cfg: Config, tokenizer) -> list[dict[str, Any]]:
    """The validated train rows, their prompts as the policy sees them (grpo_steps/data/prompts.py): reward
    functions get this text as `prompts`."""
    rows = read_jsonl(cfg.paths.validated_file("train"))
    texts = render_all(tokenizer, [r["prompt"] for r in rows], cfg.data.system_prompt, cfg.data.chat_template)
    return [{**r, "prompt": t} for r, t in zip(rows, texts, strict=True)]


def reward_kwargs(cfg: Config, rf: RewardFunctionConfig) -> dict[str, Any]:
    """The kwargs a reward function is built with: its own, and the length budget for the overlong penalty."""
    if rf.name == "overlong_penalty":
        return {"max_length": cfg.grpo.max_completion_length, **rf.kwargs}
    return dict(rf.kwargs)


def preflight(cfg: Config) -> None:
    """Checks that need no model: reward functions import (ConfigError naming `grpo.reward_functions[i].name`),
    and every input exists (FileNotFoundError naming each missing path). Runs before any work starts."""
    seen: dict[str, int] = {}
    for i, rf in enumerate(cfg.grpo.reward_functions):
        try:
            name = ("reward_model" if rf.name == "reward_model"
                    else function_name(resolve_reward_function(rf.name, reward_kwargs(cfg, rf))))
        except ValueError as e:
            raise ConfigError(f"grpo.reward_functions[{i}].name: {e}") from None
        if name in seen:  # metrics are logged per function name: two functions must not share one
            raise ConfigError(f"grpo.reward_functions[{i}].name {rf.name!r}: its function is named {name!r}, like "
                              f"grpo.reward_functions[{seen[name]}]'s; metrics would mix (rename one)")
        seen[name] = i
    if cfg.model.sharding == "fsdp2" and cfg.grpo.select_best:
        raise ConfigError("grpo.select_best with model.sharding fsdp2 is not supported yet (the best weights are "
                          "kept by the main process alone); unset one of them")
    needed = [(cfg.paths.sft_policy(), "starting policy (stage sft)"),
              (cfg.paths.validated_file("train"), "validated training prompts (stage validate)")]
    if "reward_model" in seen:
        needed.append((cfg.paths.reward_model(), "reward model (stage train_reward; grpo.reward_functions "
                                                 "lists reward_model)"))
    missing = [f"{what} not found at {Path(p).resolve()}" for p, what in needed if not Path(p).exists()]
    if missing:
        raise FileNotFoundError("grpo inputs missing (run the stages that write them first): " + "; ".join(missing))


def _write_curve(path: Path, history: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CURVE_KEYS), extrasaction="ignore")
        w.writeheader()
        for i, m in enumerate(history, start=1):
            w.writerow({"step": i, **{k: round(v, 6) for k, v in m.items() if k in CURVE_KEYS}})


def _broadcast(acc: Accelerator, obj: Any) -> Any:
    """The main process's `obj` on every process."""
    if acc.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj], from_process=0)[0]


def _launched_with_fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")


def launch_sharding(cfg: Config) -> Config:
    """Under accelerate's FSDP launch (infra/accelerate/fsdp.yaml) the grpo stage shards the policy itself:
    `model.sharding: fsdp2`, with its Accelerator built as a DDP launch's (accelerate's own FSDP wrapping is not
    what the loop drives, and on CPU accelerate ignores it). FSDP version 1 is refused, before any model loads."""
    if not _launched_with_fsdp():
        return cfg
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(f"the grpo stage shards with FSDP2 only; this launch asks for FSDP version {version} "
                          "(fsdp_config.fsdp_version in the accelerate config): use infra/accelerate/fsdp.yaml as "
                          "shipped (version 2), or a DDP config with --set model.sharding=fsdp2")
    try:  # the model section's own rules for fsdp2 (not with lora, nor fp16)
        model = ModelConfig.model_validate({**cfg.model.model_dump(), "sharding": "fsdp2"})
    except ValidationError as e:
        raise ConfigError(f"an FSDP launch shards the policy (model.sharding: fsdp2): {e.errors()[0]['msg']}; "
                          "launch with a DDP config (infra/accelerate/ddp_multi_gpu.yaml) instead") from None
    os.environ["ACCELERATE_USE_FSDP"] = "false"  # this process's Accelerator: DDP's; the loop shards itself
    log.info("accelerate's FSDP launch: the grpo stage shards the policy and the reference itself "
             "(model.sharding: fsdp2)")
    return cfg.model_copy(update={"model": model})


def refuse_sharded(acc: Accelerator) -> None:
    """An Accelerator of accelerate's own FSDP (one built before `launch_sharding` could speak) would wrap the
    model in ways the loop does not drive: refused, naming what to use."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP:
        raise ConfigError(
            "the grpo stage shards the policy itself: pass no Accelerator of accelerate's FSDP; launch it with "
            "infra/accelerate/fsdp.yaml, or a DDP config (infra/accelerate/ddp_multi_gpu.yaml, cpu_2proc.yaml, "
            "torchrun) with --set model.sharding=fsdp2 (infra/README.md)"
        )


def train_grpo(cfg: Config, progress: bool = True, accelerator: Accelerator | None = None) -> StageResult:
    """Run (or resume) GRPO; the result's value is a summary whose `resumed_from_step` is 0 for a fresh
    start. Per-step metrics go to the stage's MLflow run as the steps happen."""
    cfg = launch_sharding(cfg)
    preflight(cfg)
    if accelerator is None:  # no precision or gradient state left over from a stage that ran before in-process
        begin_stage(cfg.seed)
    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available(),
                                     mixed_precision=accelerate_precision(cfg.model))
    refuse_sharded(acc)
    return _train(cfg, acc, progress and acc.is_main_process)


def _train(cfg: Config, acc: Accelerator, progress: bool) -> StageResult:
    main = acc.is_main_process
    seed_everything(cfg.seed)
    tok = load_tokenizer(cfg.paths.sft_policy())
    policy = load_policy(cfg.paths.sft_policy(), cfg.model.trust_remote_code, cfg.model.dtype)
    if cfg.model.activation_checkpointing:
        policy.activation_checkpointing_enable()
    policy = apply_lora(policy, cfg.model.lora)
    rows = training_rows(cfg, tok)
    funcs, weights = build_reward_functions(cfg, tok)
    trainer = GRPOTrainer(policy, tok, funcs, weights, cfg.grpo.settings(), seed=cfg.seed, accelerator=acc,
                          fsdp2=cfg.model.sharding == "fsdp2")
    sampler = PromptSampler(rows, seed=cfg.seed)

    key = training_key(cfg, STAGES["grpo"].code_files()) if main else None
    store = CheckpointStore(checkpoints_root(cfg), _broadcast(acc, key),
                            keep=cfg.grpo.keep_checkpoints, params_hash=cfg.params_hash())
    ckpt = None
    if main:
        store.warn_foreign()
        store.clean_temporaries()
        ckpt = store.latest()
    path = _broadcast(acc, str(ckpt.path) if ckpt is not None else None)
    if path is not None and ckpt is None:
        ckpt = store.read(Path(path))
    resumed_from, rng = 0, None
    if ckpt is not None:
        rng = restore(trainer, sampler, ckpt)
        resumed_from = ckpt.step
        log.info("resuming GRPO from checkpoint %s at step %d of %d", ckpt.path, ckpt.step, cfg.grpo.steps)
        ckpt = None  # its tensors are in the model and optimizer now

    every, eval_every = cfg.grpo.checkpoint_every, cfg.grpo.eval_every
    evaluator = best = None
    tags = {}
    # the main process evaluates, the others wait at the next step's first collective; a sharded policy is
    # evaluated by every process in lock-step (each of its forwards gathers weights from all of them)
    if eval_every and (main or trainer.sharded):
        evaluator = TrainingEval(cfg, tok, reward_model_of(funcs), lockstep=trainer.sharded)
        if cfg.grpo.select_best:
            best = BestPolicy(store.dir / BEST_DIR)
        if not resumed_from:
            with acc.autocast():
                start = evaluator(trainer.unwrapped)
            log_curve(start, 0)
            tags["eval_start_accuracy"] = f"{start['eval/accuracy']:.4f}"
            log.info("held-out greedy accuracy before GRPO: %.4f", start["eval/accuracy"])
    bar = tqdm(total=cfg.grpo.steps, initial=trainer.step, desc="grpo", disable=not progress, dynamic_ncols=True)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if evaluator is not None and (step % eval_every == 0 or step == cfg.grpo.steps):
            with acc.autocast():  # the precision the policy trains and samples in
                metrics.update(evaluator(trainer.unwrapped))  # into the history too: checkpoints and the curve
            if best is not None and best.offer(step, metrics["eval/accuracy"], trainer.unwrapped):
                log.info("step %d: best held-out accuracy so far, %.4f", step, metrics["eval/accuracy"])
        log_curve(metrics, step)
        if main:
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics.get('kl', 0.0):.4f}")
        if step == cfg.grpo.steps or (every and step % every == 0):
            store.save(trainer, sampler)  # every process: RNG states are gathered; the main one writes

    if resumed_from:
        tags["resumed_from_step"] = str(resumed_from)
        for i, m in enumerate(trainer.history, start=1):  # this run's curve is complete, not only the tail
            log_curve(m, i)
    if rng is not None:  # last thing before sampling: the resumed run draws exactly what the first would have
        set_rng_state(rng)
    history = trainer.fit(sampler, cfg.grpo.steps, on_step=on_step)
    bar.close()
    if not trainer.weights_finite():  # the last checkpoint refuses too; this guards checkpoint-less paths
        raise NonFiniteLossError("the policy has NaN/inf weights: models/grpo not written")
    first, last = history[0], history[-1]
    summary = {"steps": len(history), "reward_first": first["reward"], "reward_last": last["reward"],
               "skipped_steps": last["skipped_steps"], "resumed_from_step": resumed_from}
    if "eval/accuracy" in last:
        summary["eval_accuracy_last"] = last["eval/accuracy"]
    if best is not None and best.step is not None:
        summary.update(best.summary())
        if best.step != len(history):  # grpo.select_best: the output is the best step's policy
            best.restore_into(trainer.unwrapped)
            log.info("grpo.select_best: models/grpo is the policy of step %d (held-out accuracy %.4f), not of the "
                     "last step %d (%.4f)", best.step, best.accuracy, len(history),
                     last.get("eval/accuracy", float("nan")))
        tags["selected_step"] = str(best.step)
    whole = full_state_dict(trainer.model) if trainer.sharded else None  # a collective: every process

    def write() -> None:  # with LoRA, the adapter merged in: evaluate, register and mlflow load a plain model
        save_pretrained(cfg.paths.grpo_policy(), merged(trainer.unwrapped), tok, state_dict=whole)
        _write_curve(cfg.paths.grpo_curve(), history)

    written_once(write)  # one writer; the outputs exist when any process returns
    log.info("GRPO done: %s", summary)
    return StageResult(summary, metrics={f"summary/{k}": v for k, v in summary.items()}, tags=tags)
