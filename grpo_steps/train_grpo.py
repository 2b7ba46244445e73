"""Stage `grpo`: policy optimisation from the starting policy against the weighted reward functions.

Writes the final policy (safetensors + tokenizer) and the per-step metrics (reports/grpo_steps.csv, the
curve `dvc plots` and the evaluation plot read); every step's metrics also go to MLflow.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import mlflow
from tqdm.auto import tqdm

from grpo_steps.config import Config
from grpo_steps.grpo.reward_model import RewardModelFunction
from grpo_steps.grpo.rewards import BUILTIN, RewardFunction, import_reward_function
from grpo_steps.grpo.trainer import GRPOTrainer, PromptSampler
from grpo_steps.io import atomic_path, read_jsonl
from grpo_steps.modeling import load_policy, load_reward_model, load_tokenizer, seed_everything
from grpo_steps.tracking import stage_run

log = logging.getLogger(__name__)

CURVE_KEYS = ("step", "reward", "reward_std", "kl", "loss", "entropy", "completions/mean_length",
              "frac_reward_zero_std", "clip_ratio/region_mean", "step_time")


def build_reward_functions(cfg: Config, tokenizer) -> tuple[list[RewardFunction], list[float]]:
    """Built-in names, the trained reward model, or `module:function` import paths from params.yaml."""
    funcs, weights = [], []
    for rf in cfg.grpo.reward_functions:
        if rf.name == "reward_model":
            model = load_reward_model(cfg.paths.reward_model(), cfg.model.trust_remote_code)
            funcs.append(RewardModelFunction(model, tokenizer))
        elif rf.name in BUILTIN:
            funcs.append(BUILTIN[rf.name])
        else:
            funcs.append(import_reward_function(rf.name))
        weights.append(rf.weight)
    return funcs, weights


def _write_curve(path: Path, history: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CURVE_KEYS), extrasaction="ignore")
        w.writeheader()
        for i, m in enumerate(history, start=1):
            w.writerow({"step": i, **{k: round(v, 6) for k, v in m.items() if k in CURVE_KEYS}})


def train_grpo(cfg: Config, progress: bool = True) -> dict[str, float]:
    seed_everything(cfg.seed)
    tok = load_tokenizer(cfg.paths.sft_policy())
    policy = load_policy(cfg.paths.sft_policy(), cfg.model.trust_remote_code)
    rows = read_jsonl(cfg.paths.validated() / "train.jsonl")
    funcs, weights = build_reward_functions(cfg, tok)
    trainer = GRPOTrainer(policy, tok, funcs, weights, cfg.grpo, seed=cfg.seed)
    sampler = PromptSampler(rows, seed=cfg.seed)
    history: list[dict[str, float]] = []
    bar = tqdm(total=cfg.grpo.steps, desc="grpo", disable=not progress, dynamic_ncols=True)

    def on_step(step: int, metrics: dict[str, float], _rollout) -> None:
        history.append(metrics)
        mlflow.log_metrics({k: v for k, v in metrics.items()
                            if math.isfinite(v)}, step=step)
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.4f}")

    with stage_run(cfg, "grpo"):
        trainer.fit(sampler, cfg.grpo.steps, on_step=on_step)
        bar.close()
        out = cfg.paths.grpo_policy()
        with atomic_path(out) as tmp:
            trainer.unwrapped.save_pretrained(str(tmp), safe_serialization=True)
            tok.save_pretrained(str(tmp))
        _write_curve(cfg.paths.reports() / "grpo_steps.csv", history)
        first, last = history[0], history[-1]
        summary = {"steps": len(history), "reward_first": first["reward"], "reward_last": last["reward"],
                   "skipped_steps": last["skipped_steps"]}
        mlflow.log_metrics({f"summary/{k}": v for k, v in summary.items()})
    log.info("GRPO done: %s", summary)
    return summary
