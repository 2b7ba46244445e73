"""The algorithm's own settings, declared once: what the GRPO loop reads, with type, default and doc, and nothing of
the app (paths, tracking, stages).

The app's `grpo` section of params.yaml (grpo_steps.platform.config.GRPOConfig) is these settings plus the stage's
own (steps, reward functions, evaluation, checkpoints); `.settings()` hands the trainer this part alone. Every
section of params.yaml is a `Settings`: typed, and an unknown key fails naming itself.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Settings(BaseModel):
    """A section of settings: typed, validated on assignment too, and no unknown keys."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GRPOSettings(Settings):
    prompts_per_step: int = Field(32, ge=1, description="distinct prompts per generation batch")
    num_generations: int = Field(8, ge=2, description="G: completions sampled per prompt")
    micro_batch_size: int = Field(
        128, ge=1,
        description="sequences per forward/backward (gradient accumulation); it need not divide the batch: the "
        "last micro-batch is then smaller, and since losses use whole-batch normalisers the update is the same",
    )
    micro_batch_tokens: int | None = Field(
        None, ge=1,
        description="also cut micro-batches by completion positions: rows taken shortest completion first, a "
        "micro-batch ends before its rows x its longest completion would pass this many (prompt positions not "
        "counted; a longer row is a micro-batch alone), so long completions of varied length compute little "
        "padding (verl's dynamic batch size). null: micro_batch_size rows each. One process only: on several, "
        "every process must run as many passes",
    )
    mu: int = Field(1, ge=1, description="policy updates per generation batch (old log-probs stored when > 1)")
    max_completion_length: int = Field(6, ge=1, description="tokens a completion may have, EOS included")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (log-probs use it too)")
    learning_rate: float = Field(2e-4, gt=0, description="AdamW learning rate (constant)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="the gradient's global norm is clipped to this")
    beta: float = Field(0.02, ge=0, description="KL coefficient to the frozen reference (k3); 0 loads no reference")
    epsilon: float = Field(0.2, gt=0, description="lower clip range (and upper when epsilon_high is unset)")
    epsilon_high: float | None = Field(None, gt=0, description="upper clip range (DAPO clip-higher)")
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = Field(
        "grpo", description="how token losses are averaged: grpo = each sequence's token mean, averaged over the "
        "batch's sequences; dapo = the token sum over the batch's tokens; dr_grpo = the token sum over "
        "sequences x max_completion_length. Always over the whole generation batch, whatever the micro-batches "
        "and processes",
    )
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="'sequence' gives GSPO's length-normalised sequence ratio"
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "batch",
        description="advantage denominator: the group's reward std (GRPO), the batch's (keeps a small-weight "
        "reward small when the others tie within a group), or none (Dr. GRPO)",
    )
    logprob_chunk_size: int = Field(0, ge=0, description="rows per log-prob chunk; 0 computes all at once")
    max_consecutive_nonfinite: int = Field(3, ge=1, description="stop after this many skipped non-finite steps")
    mask_truncated_completions: bool = Field(
        False, description="DAPO: completions cut off by max_completion_length (no EOS) are scored but carry no "
        "loss, so the policy is not taught from answers it never finished",
    )
    generation_backend: Literal["hf", "compact"] = Field(
        "compact", description="how rollouts are sampled: compact = our KV-cached loop that prefills each prompt "
        "once for its G rows (share_prompt) and drops each row from the batch at its EOS; hf = transformers "
        "generate, which prefills every copy and computes every row until the last one stops (the same "
        "distribution; another random stream)",
    )
    rollout_precision: Literal["train", "bf16"] = Field(
        "train", description="the precision rollouts are decoded in: train = the update's own (model.precision); "
        "bf16 = under bf16 autocast whatever the update's, as an inference engine decodes (faster on a GPU; on a "
        "CPU without native bf16 slower). When it differs from the update's, the rollout's tokens were drawn by "
        "another policy than the one the update starts from, and grpo.rollout_correction weights them",
    )
    rollout_correction: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = Field(
        "sequence_mask", description="importance-sampling correction of a rollout drawn by another policy than the "
        "update's (grpo/correction.py): rho = pi_old / pi_sampling per token (token_*) or per completion, the "
        "product over its tokens (sequence_*); *_truncate clamps rho to [rollout_correction_min, "
        "rollout_correction_max], *_mask zeroes it outside; the policy-gradient term is weighted by it. TRL's "
        "default (sequence_mask, max 3). Applied only when the rollout's precision differs from the update's (the "
        "weights are exactly 1 otherwise, and nothing extra is computed); logged as sampling/*. none: never",
    )
    rollout_correction_max: float | None = Field(3.0, gt=0, description="upper bound of the correction's weight")
    rollout_correction_min: float | None = Field(None, ge=0, description="lower bound of the correction's weight")
    async_rollout: bool = Field(
        False, description="one-step-off overlap: while step t updates the policy, the rollout of step t+1 is decoded "
        "in a background thread by a copy of the policy as it was before that update (each process its share), as "
        "verl's one-step-off and NeMo-RL's async GRPO do; its rows are weighted by grpo.rollout_correction against "
        "the log-probs they were drawn with. It overlaps only where generation and the update have compute to "
        "spare between them (a GPU, or cores the update leaves idle); compact generation only, not with "
        "model.sharding fsdp2. A resumed run decodes the step after its checkpoint on-policy",
    )
    dynamic_sampling: bool = Field(
        False, description="DAPO's dynamic sampling: groups whose rewards are all equal (advantage 0) are dropped "
        "and further prompts sampled until prompts_per_step groups differ, for at most max_dynamic_sampling_rounds "
        "extra generation rounds (then equal groups fill up); logged as dynamic_sampling/*",
    )
    max_dynamic_sampling_rounds: int = Field(3, ge=0, description="extra generation rounds per step at most")
    share_prompt: bool = Field(
        True, description="each distinct prompt goes through the model once per pass (generation's prefill with "
        "generation_backend compact, the update, the reference and old log-probs), its keys and values shared by "
        "its G completions: the same numbers, the prompt's compute G times smaller (the update: one process, "
        "no activation checkpointing)",
    )
    merge_identical_rows: bool = Field(
        True, description="rows that are the same completion of the same prompt with the same advantage have the "
        "same loss terms and gradient: the update computes one of them, weighted by how many there are (the same "
        "update; one process only; logged as frac_rows_merged). Short answers repeat often; long ones rarely",
    )
    skip_zero_advantage: bool = Field(
        True, description="with beta = 0, rows whose advantage is 0 (a group whose rewards are all equal) skip "
        "the forward and backward pass: their gradient is exactly zero, and the loss keeps the whole batch's "
        "normalisers, so the update is the same (one process only; with beta > 0 they still carry the KL term)",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_bnpo(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("loss_type") == "bnpo":
            raise ValueError("grpo.loss_type 'bnpo' normalises by each micro-batch's tokens (as in TRL), so its "
                             "update changes with the micro-batch size and the number of processes; the token "
                             "mean over the whole generation batch is 'dapo' here: use loss_type: dapo")
        return data

    @model_validator(mode="after")
    def _clip_range(self) -> GRPOSettings:
        if self.epsilon_high is not None and self.epsilon_high < self.epsilon:
            raise ValueError(f"grpo.epsilon_high ({self.epsilon_high}) must be >= grpo.epsilon ({self.epsilon})")
        return self

    @model_validator(mode="after")
    def _async_needs_compact(self) -> GRPOSettings:
        if self.async_rollout and self.generation_backend == "hf":
            raise ValueError("grpo.async_rollout needs generation_backend compact: transformers' generate draws from "
                             "torch's global generator, which the update (dropout) draws from at the same time")
        return self

    @model_validator(mode="after")
    def _correction_bounds(self) -> GRPOSettings:
        low, high = self.rollout_correction_min, self.rollout_correction_max
        if self.rollout_correction.endswith("truncate") and low is None and high is None:
            raise ValueError(f"grpo.rollout_correction {self.rollout_correction} needs a bound: set "
                             "grpo.rollout_correction_max (or _min)")
        if low is not None and high is not None and low >= high:
            raise ValueError(f"grpo.rollout_correction_min ({low}) must be below grpo.rollout_correction_max ({high})")
        return self

    def settings(self) -> GRPOSettings:
        """These settings alone (a subclass's extra fields left out): what the trainer is handed."""
        return GRPOSettings(**{name: getattr(self, name) for name in GRPOSettings.model_fields})
