"""The algorithm's own settings: what the GRPO loop reads, and nothing of the app (paths, tracking, stages).

The app's `grpo` section of params.yaml (grpo_steps.config.GRPOConfig) documents each field and builds one of
these with `.settings()`; anything with these attributes works (the trainer only reads them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class GRPOSettings:
    prompts_per_step: int = 32  # distinct prompts per generation batch
    num_generations: int = 8  # G: completions sampled per prompt
    micro_batch_size: int = 128  # sequences per forward/backward; normalisers are whole-batch
    mu: int = 1  # policy updates per generation batch (old log-probs stored when > 1)
    max_completion_length: int = 6
    temperature: float = 1.0
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    beta: float = 0.02  # k3 KL coefficient to the frozen reference; 0 builds no reference
    epsilon: float = 0.2  # lower clip (and upper when epsilon_high is None)
    epsilon_high: float | None = None  # DAPO clip-higher
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "grpo"  # always over the whole generation batch
    importance_sampling_level: Literal["token", "sequence"] = "token"  # sequence: GSPO
    scale_rewards: Literal["group", "batch", "none"] = "batch"
    logprob_chunk_size: int = 0  # rows per log-prob chunk; 0: all at once
    max_consecutive_nonfinite: int = 3  # stop after this many skipped non-finite steps
    mask_truncated_completions: bool = False  # DAPO: no loss on completions cut off by the length budget
    generation_backend: Literal["hf", "compact"] = "compact"  # finished rows leave the batch; hf: `generate`
    dynamic_sampling: bool = False  # DAPO: replace groups of equal rewards by further prompts' groups
    max_dynamic_sampling_rounds: int = 3  # extra generation rounds per step at most
    share_prompt: bool = True  # each distinct prompt goes through the model once per pass, not once per completion
    merge_identical_rows: bool = True  # identical completions of a prompt: one forward/backward, weighted by count
    skip_zero_advantage: bool = True  # beta = 0: no forward/backward for rows whose gradient is exactly zero
