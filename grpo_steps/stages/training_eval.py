"""Evaluation during GRPO: held-out greedy accuracy (and the reward model's score) every `grpo.eval_every` steps,
and the best policy by that accuracy kept for `grpo.select_best`.

The eval split is judged as the evaluate stage judges (grpo_steps/platform/judge.py), greedily, so no random number is
drawn: the training run is the same with or without it (RNG states are restored around it all the same). The
best weights are written next to the run's checkpoints (`<checkpoints>/<key>/best/`), so a resumed run still
knows them: the trainable weights only (a LoRA run's adapter), in safetensors, and `best.json` (step, accuracy).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from grpo_steps.data.files import read_jsonl
from grpo_steps.data.prompts import render_all
from grpo_steps.grpo.reward_model import RewardModelFunction
from grpo_steps.grpo.sampling import sample_in_batches
from grpo_steps.grpo.trainer import is_adapter
from grpo_steps.platform.checkpoint import load_weights
from grpo_steps.platform.config import Config
from grpo_steps.platform.io import atomic_path
from grpo_steps.platform.judge import accuracy_judge

log = logging.getLogger(__name__)

BEST_DIR = "best"
BEST_WEIGHTS = "weights.safetensors"
BEST_INFO = "best.json"


class TrainingEval:
    """Greedy accuracy of the current policy on the eval split, with the reward model's mean score when given."""

    def __init__(self, cfg: Config, tokenizer, reward_model: RewardModelFunction | None = None,
                 lockstep: bool = False):
        rows = read_jsonl(cfg.paths.validated_file("eval"))
        if cfg.grpo.eval_prompts is not None:
            rows = rows[: cfg.grpo.eval_prompts]
        if not rows:
            raise ValueError(f"grpo.eval_every needs eval prompts: {cfg.paths.validated_file('eval')} is empty")
        self.tokenizer = tokenizer
        self.prompts = render_all(tokenizer, [r["prompt"] for r in rows], cfg.data.system_prompt,
                                  cfg.data.chat_template)
        self.answers = [r["answer"] for r in rows]
        self.judge = accuracy_judge(cfg)
        self.max_new = cfg.grpo.max_completion_length
        self.backend = cfg.grpo.generation_backend  # decoded as the training rollouts are
        self.reward_model = reward_model
        self.lockstep = lockstep  # a sharded policy: every process decodes the same prompts in step

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        rng = torch.get_rng_state()  # greedy decoding draws nothing; restored anyway, the run must not move
        try:
            rollouts = sample_in_batches(model, self.tokenizer, self.prompts, 1, self.max_new, greedy=True,
                                         backend=self.backend, lockstep=self.lockstep)
        finally:
            torch.set_rng_state(rng)
        completions = [c for r in rollouts for c in r.completions]
        correct = self.judge(self.prompts, completions, self.answers)
        out = {"eval/accuracy": sum(bool(c) for c in correct) / len(correct)}
        if self.reward_model is not None:
            out["eval/reward_model_score"] = float(torch.tensor(self.reward_model(self.prompts, completions)).mean())
        return out


def trainable_state(model) -> dict[str, torch.Tensor]:
    """What training changes: every weight, or a LoRA adapter's (peft's own names)."""
    if is_adapter(model):
        from peft import get_peft_model_state_dict  # deferred: only with model.lora

        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
    seen: set[int] = set()
    out = {}
    for k, v in model.state_dict().items():  # tied weights once (safetensors refuses shared tensors)
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            out[k] = v.detach().cpu().clone()
    return out


class BestPolicy:
    """The best eval accuracy so far and its weights, on disk in `folder` (the first of equal accuracies wins)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.step: int | None = None
        self.accuracy = -1.0
        info = self.folder / BEST_INFO
        if info.is_file() and (self.folder / BEST_WEIGHTS).is_file():
            try:
                data = json.loads(info.read_text(encoding="utf-8"))
                self.step, self.accuracy = int(data["step"]), float(data["accuracy"])
            except (ValueError, KeyError, TypeError) as e:
                log.warning("ignoring unreadable %s: %s", info, e)

    def offer(self, step: int, accuracy: float, model) -> bool:
        """Keep the model's weights when `accuracy` beats the best so far; True when it did."""
        if accuracy <= self.accuracy:
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.folder / BEST_WEIGHTS) as tmp:
            save_file(trainable_state(model), str(tmp))
        with atomic_path(self.folder / BEST_INFO) as tmp:  # written second: it vouches for the weights
            tmp.write_text(json.dumps({"step": step, "accuracy": accuracy}), encoding="utf-8")
        self.step, self.accuracy = step, accuracy
        return True

    def restore_into(self, model) -> None:
        load_weights(model, load_file(str(self.folder / BEST_WEIGHTS)), self.folder)

    def summary(self) -> dict[str, Any]:
        return {"best_step": self.step, "best_eval_accuracy": self.accuracy}
