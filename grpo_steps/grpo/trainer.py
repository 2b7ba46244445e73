"""The GRPO loop, visible in one place: sample -> score -> advantages -> (mu x) clipped update.

One computation for one CPU, one GPU and many processes. `accelerate` wraps the model and optimizer. Each
process samples and scores its contiguous share of the step's prompts, every row drawing from its own random
stream (grpo/sampling.py), so the completions do not depend on the split. The scored shards are gathered, so
every process holds the whole generation batch: dynamic sampling's choices, the advantages (the batch std
included) and the logged metrics are computed from it, as one process computes them. The update then takes
each process's share of the rows; loss normalisers are those of the whole batch and DDP's gradient mean is
undone, so the update is the one-process update up to float summation order.

How the update computes its rows is decided once, in `plan_update`: the single-process savings (shared prompt,
merged identical rows, the zero-advantage skip, micro-batches cut by tokens) give the same update and apply where
they can, and each one that cannot is named in one log line. Policy, old and reference log-probs all go through
`logps_of`, under the same precision and the same path, so at identical weights the KL is exactly 0, in bf16 as
in fp32.

`training_state()` / `load_training_state()` carry what a resumed run needs besides the weights and the
optimizer (step, counters, metrics history); grpo_steps/platform/checkpoint.py writes them to disk.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpo_steps.errors import UserError
from grpo_steps.grpo.advantages import group_advantages, groups_with_spread, nanstd
from grpo_steps.grpo.correction import CorrectionStats, rollout_weights
from grpo_steps.grpo.logprobs import can_share_prompt, completion_logps, shared_prompt_logps
from grpo_steps.grpo.loss import Normalizers, policy_loss
from grpo_steps.grpo.rewards import RewardFunction, function_name, score_completions
from grpo_steps.grpo.sampling import Rollout, RowStreams, concat_rollouts, sample_groups, stream_key
from grpo_steps.grpo.settings import GRPOSettings
from grpo_steps.grpo.sharding import full, local, shard

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError, RuntimeError):
    """Too many consecutive steps had a NaN/inf loss or gradient; nothing from them was applied."""


@dataclass
class PromptSampler:
    """Seeded, epoch-based order over the prompt rows; `position` makes it resumable."""

    rows: list[dict[str, Any]]
    seed: int
    position: int = 0
    held: int = 0  # rows taken ahead for a step not yet trained (one-step-off rollouts): not consumed yet
    _order: list[int] = field(default_factory=list, init=False)

    @property
    def resume_position(self) -> int:
        """Where a run resumed from now starts: rows taken ahead for a step not yet trained are taken again."""
        return self.position - self.held

    def _order_for(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def next(self, n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            epoch, idx = divmod(self.position, len(self.rows))
            if idx == 0 or not self._order:
                self._order = self._order_for(epoch)
            out.append(self.rows[self._order[idx]])
            self.position += 1
        return out


def is_adapter(model: Any) -> bool:
    """A peft model: an adapter over a frozen base model that `disable_adapter()` shows."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def micro_batches(mask: torch.Tensor, rows: torch.Tensor, size: int, tokens: int | None = None) -> list[slice]:
    """Consecutive slices of `rows` (shortest completion first), each one forward/backward: at most `size` rows,
    and with `tokens` at most that many completion positions once cut to its longest row (rows x that row's
    length; a row longer than `tokens` is a micro-batch alone). The loss's normalisers are the whole batch's, so
    how the rows are cut changes the float summation order only."""
    n = len(rows)
    if tokens is None:
        return [slice(s, min(s + size, n)) for s in range(0, n, size)]
    out, start, longest = [], 0, 0
    for i, length in enumerate(mask[rows].sum(1).clamp(min=1).tolist()):
        if i > start and (i - start == size or (i - start + 1) * max(longest, length) > tokens):
            out.append(slice(start, i))
            start, longest = i, 0
        longest = max(longest, length)
    if n:
        out.append(slice(start, n))
    return out


def rollout_logps(model, rollout: Rollout, rows: slice | torch.Tensor, c: int, cfg: GRPOSettings, share: bool,
                  compute_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the first `c` completion tokens of `rows`: each distinct prompt computed once (`share`, as
    the update's plan decides), or every row's prompt and completion in one pass."""
    if share:
        return shared_prompt_logps(model, rollout.prompt_ids[rows], rollout.prompt_mask[rows],
                                   rollout.completion_ids[rows, :c], rollout.completion_mask[rows, :c],
                                   cfg.temperature, cfg.logprob_chunk_size, compute_entropy)
    width = rollout.prompt_ids.size(1) + c
    return completion_logps(model, rollout.input_ids[rows, :width], rollout.attention_mask[rows, :width], c,
                            cfg.temperature, cfg.logprob_chunk_size, compute_entropy)


def by_length(mask: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """`rows` (default: all) shortest completion first, so that each micro-batch, cut to its own longest row,
    computes little padding."""
    rows = torch.arange(mask.size(0), device=mask.device) if rows is None else rows.to(mask.device)
    return rows[torch.argsort(mask[rows].sum(1), stable=True)]


def _width(mask: torch.Tensor, rows: torch.Tensor) -> int:
    return max(int(mask[rows].sum(1).max()), 1)


def identical_rows(rollout: Rollout, advantages: torch.Tensor, rows: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Among `rows`, the first row of each set of identical ones (the same prompt tokens, completion tokens, mask
    and advantage, so the same loss terms and gradient), and how many rows each stands for."""
    if len(rows) == 0:
        return rows, rows.clone()
    mask = rollout.completion_mask[rows]
    bits = advantages.detach().float().to(mask.device)[rows].contiguous().view(torch.int32).long().unsqueeze(1)
    # a row without loss tokens (a masked truncated completion) stays itself, so frac_rows_merged counts repeats
    alone = torch.where(mask.sum(1) == 0, torch.arange(len(rows), device=mask.device), -1).unsqueeze(1)
    parts = [rollout.prompt_ids[rows], rollout.prompt_mask[rows], rollout.completion_ids[rows] * mask, mask, bits,
             alone]
    if rollout.sampled_logps is not None:  # rows drawn with other log-probs get other correction weights
        parts.append((rollout.sampled_logps[rows].float() * mask).contiguous().view(torch.int32).long())
    key = torch.cat(parts, dim=1)
    _, inverse, counts = torch.unique(key, dim=0, return_inverse=True, return_counts=True)
    position = torch.arange(len(rows), device=inverse.device)
    first = torch.full((len(counts),), len(rows), dtype=torch.long, device=inverse.device)
    first = first.scatter_reduce(0, inverse, position, reduce="amin")
    return rows[first], counts


@dataclass(frozen=True)
class UpdatePlan:
    """How the update computes its rows on this layout. Each saving gives the same update as computing every row
    in full (tests/algorithm/test_share_prompt.py, test_skip_zero_advantage.py); `off` names those asked for that
    cannot apply here, and why."""

    share_prompt: bool  # each distinct prompt once per pass: policy, old and reference log-probs alike
    merge_identical_rows: bool  # identical rows computed once, weighted by their count
    skip_zero_advantage: bool  # beta = 0: no forward/backward for rows whose gradient is exactly zero
    micro_batch_tokens: int | None = None  # micro-batches cut by completion positions too (`micro_batches`)
    off: tuple[str, ...] = ()

    def rows(self, rollout: Rollout, advantages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
        """(the rows to compute, shortest completion first; their weights (None: 1 each); rows skipped; rows
        merged into an identical one)."""
        mask = rollout.completion_mask
        n = mask.size(0)
        rows = torch.arange(n, device=mask.device)
        if self.skip_zero_advantage:
            rows = torch.nonzero((advantages.to(mask.device) != 0) & (mask.sum(1) > 0)).flatten()
        skipped = n - len(rows)
        weights = None
        if self.merge_identical_rows:
            rows, counts = identical_rows(rollout, advantages, rows)
            weights = torch.zeros(n, device=mask.device)
            weights[rows] = counts.to(weights.dtype)
        return by_length(mask, rows), weights, skipped, n - skipped - len(rows)


def plan_update(cfg: GRPOSettings, num_processes: int, policy: PreTrainedModel) -> UpdatePlan:
    """The one place that decides which single-process savings apply. Under DDP every rank's forward must go
    through its wrapper (the shared pass calls the decoder itself) and every rank must run the same number of
    backward passes (merging, skipping and cutting by tokens make the counts depend on the data), so there all
    four are off and every row is computed in full: the same update, more compute. The shared pass also needs a KV
    cache, which transformers drops in checkpointed layers, and the head's output to be the logits."""
    multi = num_processes > 1
    off = []
    share = cfg.share_prompt
    if share and multi:
        share = False
        off.append(f"grpo.share_prompt ({num_processes} processes: each forward goes through the DDP or FSDP "
                   "wrapper)")
    elif share and not can_share_prompt(policy):
        share = False
        off.append("grpo.share_prompt (activation checkpointing drops the KV cache, or the model post-processes "
                   "its logits)")
    merge = cfg.merge_identical_rows and not multi
    if cfg.merge_identical_rows and multi:
        off.append(f"grpo.merge_identical_rows ({num_processes} processes: every process must run as many "
                   "forward and backward passes)")
    skip = cfg.skip_zero_advantage and cfg.beta == 0.0 and not multi
    if cfg.skip_zero_advantage and cfg.beta == 0.0 and multi:
        off.append(f"grpo.skip_zero_advantage ({num_processes} processes: every process must run as many "
                   "forward and backward passes)")
    tokens = cfg.micro_batch_tokens if not multi else None
    if cfg.micro_batch_tokens is not None and multi:
        off.append(f"grpo.micro_batch_tokens ({num_processes} processes: every process must run as many "
                   "forward and backward passes; micro-batches of grpo.micro_batch_size rows instead)")
    return UpdatePlan(share, merge, skip, tokens, tuple(off))


@contextlib.contextmanager
def _mode(model, training: bool):
    was = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was)


@torch.no_grad()
def _batched_logps(model, rollout: Rollout, cfg: GRPOSettings, rows: torch.Tensor, plan: UpdatePlan) -> torch.Tensor:
    """(N, C) log-probs of the completion tokens of `rows` (0 elsewhere and after a row's end), micro-batch by
    micro-batch in the order given, each cut to its longest row: the update's own micro-batches."""
    mask = rollout.completion_mask
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    for sl in micro_batches(mask, rows, cfg.micro_batch_size, plan.micro_batch_tokens):
        part = rows[sl]
        c = _width(mask, part)
        out[part, :c] = rollout_logps(model, rollout, part, c, cfg, plan.share_prompt)[0].to(out.device)
    return out


@dataclass
class PendingRollout:
    """A rollout being decoded in the background for a later step (`grpo.async_rollout`): this process's share."""

    step: int
    rows: list[dict[str, Any]]
    future: Future


@dataclass
class GenerationBatch:
    """A whole generation batch (every process's rows, the same on every process), scored, with its
    group-relative advantages."""

    rollout: Rollout
    rewards: torch.Tensor  # (N,) weighted total, NaN where every function abstained
    per_func: torch.Tensor  # (N, F)
    advantages: torch.Tensor  # (N,)
    group_std: torch.Tensor  # (N,)
    lengths: torch.Tensor | None = None  # (N,) completion tokens as generated; None: from the completion mask

    def __post_init__(self) -> None:
        if self.lengths is None:
            self.lengths = self.rollout.completion_mask.sum(dim=1)


class GRPOTrainer:
    def __init__(
        self,
        policy: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        reward_funcs: Sequence[RewardFunction],
        reward_weights: Sequence[float],
        cfg: GRPOSettings,
        seed: int = 0,
        accelerator: Accelerator | None = None,
        fsdp2: bool = False,
    ):
        """`fsdp2`: shard the policy and the reference over the processes (grpo/sharding.py) instead of
        replicating them (DDP); with one process there is nothing to shard."""
        if len(reward_funcs) != len(reward_weights):
            raise ValueError("one weight per reward function")
        self.cfg = cfg
        self.seed = seed
        self.tokenizer = tokenizer
        self.reward_funcs = list(reward_funcs)
        self.reward_weights = list(reward_weights)
        self.reward_names = [function_name(f) for f in reward_funcs]
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.fsdp2 = fsdp2  # the setting: checkpoints are sharded ones whatever the process count
        self.sharded = fsdp2 and self.accelerator.num_processes > 1
        if self.sharded and is_adapter(policy):
            raise ValueError("model.sharding fsdp2 with model.lora is not supported: a LoRA adapter is small enough "
                             "to replicate (model.sharding: replicate)")
        if cfg.prompts_per_step % self.accelerator.num_processes:
            raise ValueError(f"grpo.prompts_per_step ({cfg.prompts_per_step}) must divide evenly over "
                             f"{self.accelerator.num_processes} processes")
        # The reference is the starting policy, frozen. With beta = 0 it is never built nor run. A LoRA policy's
        # reference is its own base model with the adapter off: no second copy of the weights.
        self.ref_model = None
        self.ref_is_base = cfg.beta != 0.0 and is_adapter(policy)
        if cfg.beta != 0.0 and not self.ref_is_base:
            self.ref_model = copy.deepcopy(policy).eval().requires_grad_(False)
            if self.sharded:  # fully_shard moves each process's shards to its device: no whole copy there
                shard(self.ref_model)
            else:
                self.ref_model.to(self.accelerator.device)
        policy.train()  # as transformers' Trainer trains (from_pretrained returns eval mode): dropout as configured,
        # and activation checkpointing, which transformers applies in training mode only
        self.plan = plan_update(cfg, self.accelerator.num_processes, policy)
        # A rollout decoded in another precision than the update's was drawn by another policy: its tokens are
        # weighted by the rollout correction. In the update's own precision the weights would be 1: none computed.
        update_bf16 = self.accelerator.mixed_precision == "bf16"
        self.off_policy_rollout = (cfg.rollout_precision == "bf16" and not update_bf16) or cfg.async_rollout
        self.correct_rollout = self.off_policy_rollout and cfg.rollout_correction != "none"
        self.last_correction = CorrectionStats()
        if cfg.async_rollout and self.sharded:
            raise ValueError("grpo.async_rollout with model.sharding fsdp2 is not supported: decoding in the "
                             "background would need a whole copy of the weights on every process, and a sharded "
                             "decoder gathers its weights in collectives the update also runs")
        # one-step-off: a copy of the policy decodes the next step's rollout while the update trains
        self.rollout_model: PreTrainedModel | None = None
        self.rollout_tokenizer: PreTrainedTokenizerBase | None = None
        self.pending: PendingRollout | None = None
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout") if cfg.async_rollout else None
        self.last_rollout_wait = 0.0  # seconds the last step waited for its background rollout
        self.last_decode_time = 0.0  # seconds the last step's rollouts took to decode (in the background or not)
        if self.plan.off:
            log.info("off on this layout, with the same update: %s", "; ".join(self.plan.off))
        if self.sharded:  # sharded before the optimizer is built: its moments are sharded too
            shard(policy)
        trainable = [p for p in policy.parameters() if p.requires_grad]  # all of them, or a LoRA adapter's
        optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        if self.sharded:
            self.model, self.optimizer = policy, optimizer
        else:
            self.model, self.optimizer = self.accelerator.prepare(policy, optimizer)
        self.step = 0
        self.consecutive_nonfinite = 0
        self.skipped_steps = 0
        self.last_sampling = {"rounds": 1, "dropped_groups": 0, "filled_groups": 0}  # of the last generate
        self.last_skipped_rows = 0  # rows of the last update whose forward/backward was skipped (zero gradient)
        self.last_merged_rows = 0  # rows of the last update computed as a copy of an identical row
        self.history: list[dict[str, float]] = []

    @property
    def unwrapped(self) -> PreTrainedModel:
        return self.accelerator.unwrap_model(self.model)

    def _shard(self, n: int) -> slice:
        """This process's contiguous share of `n` items (prompts, or rows of whole groups)."""
        acc = self.accelerator
        if n % acc.num_processes:
            raise ValueError(f"{n} prompts or rows do not divide evenly over {acc.num_processes} processes")
        per = n // acc.num_processes
        return slice(acc.process_index * per, (acc.process_index + 1) * per)

    def _global_sum(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(t, reduction="sum").item())

    def weights_finite(self) -> bool:
        """Whether every weight is finite, on every process (call on every process)."""
        bad = sum(int(not bool(torch.isfinite(local(p)).all())) for p in self.unwrapped.parameters())
        return self._global_sum(float(bad)) == 0

    def training_state(self) -> dict[str, Any]:
        """Counters and metrics history: with weights, optimizer and RNG, all a resumed run needs."""
        return {"step": self.step, "skipped_steps": self.skipped_steps,
                "consecutive_nonfinite": self.consecutive_nonfinite, "history": [dict(m) for m in self.history]}

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.consecutive_nonfinite = int(state["consecutive_nonfinite"])
        self.history = [dict(m) for m in state["history"]]

    # ------------------------------------------------------------------------------------------- sample, score
    def _decoding_precision(self) -> contextlib.AbstractContextManager:
        """The update's own precision (whether wrapped or sharded), or bf16 autocast (`grpo.rollout_precision`)."""
        if self.cfg.rollout_precision == "bf16":
            return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16)
        return self.accelerator.autocast()

    def _rollout(self, prompts: list[str], streams: RowStreams, model: PreTrainedModel | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None) -> Rollout:
        cfg = self.cfg
        model = self.unwrapped if model is None else model
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        sample = lambda: sample_groups(model, tokenizer, prompts, cfg.num_generations,  # noqa: E731
                                       cfg.max_completion_length, cfg.temperature, backend=cfg.generation_backend,
                                       share_prompt=cfg.share_prompt, streams=streams, lockstep=self.sharded,
                                       keep_sampled_logps=self.correct_rollout)
        if cfg.generation_backend != "hf":
            with self._decoding_precision():
                return sample()
        # `generate` draws from torch's generator: seeded per step and per shard, so that processes do not draw
        # alike and a resumed run draws what the first did (the samples still depend on the layout)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), self._decoding_precision():
            torch.manual_seed(stream_key(streams.key, streams.first))
            return sample()

    def _sample_scored(self, rows: list[dict[str, Any]], round_: int
                       ) -> tuple[Rollout, torch.Tensor, torch.Tensor, torch.Tensor]:
        """G completions for each of `rows` (the step's prompts, the same on every process), each process sampling
        and scoring its share; gathered: (rollout, rewards, per_func, lengths) of all of them."""
        G = self.cfg.num_generations
        mine = self._shard(len(rows))
        shard = rows[mine]
        pending, self.pending = self.pending, None
        if pending is not None:
            t0 = time.perf_counter()
            ahead = pending.future.result()  # decoded in the background by the policy of the step before
            self.last_rollout_wait = time.perf_counter() - t0
        if round_ == 0 and pending is not None and pending.step == self.step and pending.rows == rows:
            rollout, seconds = ahead
        else:
            streams = RowStreams(stream_key(self.seed, self.step, round_), mine.start * G)
            rollout, seconds = self._timed_rollout([r["prompt"] for r in shard], streams)
        self.last_decode_time += seconds
        columns = {k: [r[k] for r in shard for _ in range(G)] for k in shard[0] if k != "prompt"}
        lengths = rollout.completion_mask.sum(dim=1)  # tokens, EOS included
        columns["completion_lengths"] = lengths.tolist()
        per_func, rewards = score_completions(self.reward_funcs, self.reward_weights, rollout.prompts,
                                              rollout.completions, columns)
        return self._gathered(rollout, rewards, per_func, lengths)

    def _timed_rollout(self, prompts: list[str], streams: RowStreams, model: PreTrainedModel | None = None,
                       tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[Rollout, float]:
        t0 = time.perf_counter()
        rollout = self._rollout(prompts, streams, model, tokenizer)
        return rollout, time.perf_counter() - t0

    def _decode_ahead(self, rows: list[dict[str, Any]]) -> None:
        """Start decoding step `self.step + 1`'s rollout of `rows` in the background, with a copy of the policy
        as it is now (before this step's update): the rows, streams and shard that step would sample itself."""
        if self.rollout_model is None:
            self.rollout_model = copy.deepcopy(self.unwrapped).eval().requires_grad_(False)
            # its own tokenizer too: a fast tokenizer changes its padding state per call, and the main thread
            # tokenizes meanwhile (the evaluation between steps)
            self.rollout_tokenizer = copy.deepcopy(self.tokenizer)
        else:
            with torch.no_grad():
                for dst, src in zip(self.rollout_model.state_dict().values(), self.unwrapped.state_dict().values(),
                                    strict=True):
                    dst.copy_(src)
        G = self.cfg.num_generations
        mine = self._shard(len(rows))
        streams = RowStreams(stream_key(self.seed, self.step + 1, 0), mine.start * G)
        prompts = [r["prompt"] for r in rows[mine]]
        future = self._decoder.submit(self._timed_rollout, prompts, streams, self.rollout_model,
                                      self.rollout_tokenizer)
        self.pending = PendingRollout(self.step + 1, rows, future)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in process order (a collective; `[obj]` with one process)."""
        if self.accelerator.num_processes == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def _gathered(self, rollout: Rollout, *tensors: torch.Tensor) -> tuple:
        """Every process's rows concatenated in process order (as they are with one process)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return (rollout, *tensors)
        parts = self.gather_objects((rollout.to("cpu"), *(t.cpu() for t in tensors)))
        whole = concat_rollouts([p[0] for p in parts], self.tokenizer.pad_token_id).to(acc.device)
        return (whole, *(torch.cat([p[i + 1] for p in parts]) for i in range(len(tensors))))

    def sample_and_score(self, rows: list[dict[str, Any]],
                         more: Callable[[int], list[dict[str, Any]]] | None = None
                         ) -> tuple[Rollout, torch.Tensor, torch.Tensor, torch.Tensor]:
        """G completions for each of `rows`, scored: (rollout, rewards, per-function rewards, lengths) of the whole
        batch, on every process (each samples and scores its share; gathered). With `grpo.dynamic_sampling`,
        groups whose rewards are all equal are replaced by groups of further prompts from `more(n)` (the prompt
        sampler), for at most `grpo.max_dynamic_sampling_rounds` extra rounds."""
        scored = self._sample_scored(rows, 0)
        self.last_sampling = {"rounds": 1, "dropped_groups": 0, "filled_groups": 0}
        if self.cfg.dynamic_sampling:
            scored = self._dynamic_sampling(len(rows), scored, more)
        rollout, rewards, per_func, lengths = scored
        if self.cfg.mask_truncated_completions:  # DAPO: scored, but no gradient from a cut-off completion
            rollout.completion_mask = rollout.completion_mask * (~rollout.truncated).unsqueeze(1).long()
        return rollout, rewards, per_func, lengths

    def with_advantages(self, rollout: Rollout, rewards: torch.Tensor, per_func: torch.Tensor,
                        lengths: torch.Tensor) -> GenerationBatch:
        """The scored batch with its group-relative advantages (grpo/advantages.py)."""
        advantages, group_std = group_advantages(rewards, self.cfg.num_generations, self.cfg.scale_rewards)
        return GenerationBatch(rollout, rewards, per_func, advantages.to(self.accelerator.device), group_std, lengths)

    def generate(self, rows: list[dict[str, Any]],
                 more: Callable[[int], list[dict[str, Any]]] | None = None) -> GenerationBatch:
        """A generation batch ready for the update: sampled, scored, with advantages (the first three verbs of
        `train_step`)."""
        return self.with_advantages(*self.sample_and_score(rows, more))

    def _dynamic_sampling(self, need: int, scored: tuple, more: Callable[[int], list[dict[str, Any]]] | None):
        """DAPO's dynamic sampling: keep `need` groups whose rewards differ, sampling further rounds of prompts
        while there are too few; when the cap is reached, fill up with groups of equal rewards (advantage 0).
        Every process holds the whole batch, so every one takes the same decisions."""
        cfg, G = self.cfg, self.cfg.num_generations
        parts = [scored]
        spread = [groups_with_spread(scored[1], G)]
        kept = int(spread[0].sum())
        rounds = 1
        while more is not None and rounds <= cfg.max_dynamic_sampling_rounds and kept < need:
            part = self._sample_scored(more(cfg.prompts_per_step), rounds)
            parts.append(part)
            spread.append(groups_with_spread(part[1], G))
            kept += int(spread[-1].sum())
            rounds += 1
        has_spread = torch.cat(spread)
        with_spread = torch.nonzero(has_spread).flatten()[:need]
        fill = torch.nonzero(~has_spread).flatten()[: need - len(with_spread)]
        groups = torch.cat([with_spread, fill])
        rows = (groups.unsqueeze(1) * G + torch.arange(G)).flatten()
        rollout = concat_rollouts([p[0] for p in parts], self.tokenizer.pad_token_id)[rows]
        rewards, per_func, lengths = (torch.cat([p[i] for p in parts])[rows.to(parts[0][i].device)]
                                      for i in (1, 2, 3))
        self.last_sampling = {"rounds": rounds, "dropped_groups": int((~has_spread).sum()) - len(fill),
                              "filled_groups": len(fill)}
        return rollout, rewards, per_func, lengths

    # ------------------------------------------------------------------------------------------------ update
    def logps_of(self, model, rollout: Rollout, rows: torch.Tensor) -> torch.Tensor:
        """Log-probs without gradient (reference, old policy) as the update computes the policy's: the same
        micro-batches, the same path (the plan's), under the same mixed precision."""
        with self.accelerator.autocast():
            return _batched_logps(model, rollout, self.cfg, rows, self.plan)

    def reference_logps(self, rollout: Rollout, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """The frozen reference's log-probs of the rollout's completions, of `rows` only if given (None when
        beta = 0)."""
        if rows is None:
            rows = by_length(rollout.completion_mask)
        if self.ref_model is not None:
            return self.logps_of(self.ref_model, rollout, rows)
        if not self.ref_is_base:
            return None
        model = self.unwrapped
        with _mode(model, False), model.disable_adapter():  # eval mode, as the reference copy is: no dropout
            return self.logps_of(model, rollout, rows)

    def _clip_grad_norm(self) -> float:
        """Clip the gradient's global norm to `grpo.max_grad_norm`; the norm before clipping."""
        if self.sharded:  # torch clips sharded gradients itself, with a global norm
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            return float(full(torch.nn.utils.clip_grad_norm_(trainable, self.cfg.max_grad_norm)))
        return float(self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm))

    def _zero_gradients(self) -> None:
        """Zero (not absent) gradients, so AdamW steps its moments and weight decay as it would on a full pass."""
        for p in self.model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)

    def update(self, batch: GenerationBatch) -> tuple[dict[str, float], float, float, Normalizers]:
        """`mu` optimizer updates on one generation batch, this process computing its share of the rows; returns
        (token-weighted stat sums over all processes, loss, grad norm, the batch's normalisers). The normalisers
        are the whole batch's and DDP's gradient mean is undone, so the update does not depend on how the rows
        are split over processes or micro-batches."""
        cfg, acc, plan = self.cfg, self.accelerator, self.plan
        whole = batch.rollout.completion_mask
        norm = Normalizers(num_sequences=whole.size(0), num_tokens=int(whole.sum()),
                           max_completion_length=cfg.max_completion_length)
        mine = self._shard(whole.size(0))
        rollout, advantages = batch.rollout[mine], batch.advantages[mine]
        mask = rollout.completion_mask
        order, weights, self.last_skipped_rows, self.last_merged_rows = plan.rows(rollout, advantages)
        self.last_skipped_rows = int(self._global_sum(self.last_skipped_rows))
        self.last_merged_rows = int(self._global_sum(self.last_merged_rows))
        ref_logps = self.reference_logps(rollout, order)
        old_logps = self.logps_of(self.unwrapped, rollout, order) if cfg.mu > 1 else None

        sums: dict[str, float] = {}
        total_loss, grad_norm = 0.0, 0.0
        correction = CorrectionStats()
        sampled = rollout.sampled_logps if self.correct_rollout else None
        for iteration in range(cfg.mu):
            total_loss = 0.0
            if len(order) == 0:  # nothing but zero gradients: the optimizer sees them
                self._zero_gradients()
            for sl in micro_batches(mask, order, cfg.micro_batch_size, plan.micro_batch_tokens):
                rows = order[sl]
                c = _width(mask, rows)  # trailing padding columns dropped
                with acc.autocast():  # the shared pass calls the decoder and head, not the wrapped forward
                    logps, entropy = rollout_logps(self.model, rollout, rows, c, cfg, plan.share_prompt,
                                                   compute_entropy=True)
                m = mask[rows, :c]
                # mu = 1: the sampling policy *is* the current one, so the ratio is exp(0) with a live gradient.
                old = old_logps[rows, :c] if old_logps is not None else logps.detach()
                row_weights = weights[rows] if weights is not None else None
                is_weights = None
                if sampled is not None:  # the rollout was drawn by another policy: pi_old / pi_sampling
                    is_weights, part = rollout_weights(old, sampled[rows, :c], m, cfg.rollout_correction,
                                                       cfg.rollout_correction_max, cfg.rollout_correction_min,
                                                       row_weights)
                    if iteration == 0:  # the same weights on every pass over the batch
                        correction.add(part)
                loss, stats = policy_loss(
                    logps, old, advantages[rows], m, norm,
                    loss_type=cfg.loss_type, epsilon_low=cfg.epsilon,
                    epsilon_high=cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon,
                    beta=cfg.beta, ref_logps=ref_logps[rows, :c] if ref_logps is not None else None,
                    importance_sampling_level=cfg.importance_sampling_level,
                    row_weights=row_weights, sampling_weights=is_weights,
                )
                # DDP averages gradients over processes; normalisers are already global, so undo that mean.
                acc.backward(loss * acc.num_processes)
                total_loss += loss.item()
                wm = m if weights is None else m * weights[rows].unsqueeze(1)  # a merged row counts as its copies
                weight = float(wm.sum())
                stats["entropy"] = (entropy * wm).sum() / wm.sum().clamp(min=1)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * weight
            grad_norm = self._clip_grad_norm()
            # Every process takes the same decision: the loss is summed over processes, the gradient is shared.
            total_loss = self._global_sum(total_loss)
            if not (math.isfinite(total_loss) and math.isfinite(grad_norm)):
                self.optimizer.zero_grad(set_to_none=True)
                self.skipped_steps += 1
                self.consecutive_nonfinite += 1
                log.warning("step %d: non-finite loss/gradient (loss=%s, grad_norm=%s); update skipped",
                            self.step, total_loss, grad_norm)
                if self.consecutive_nonfinite >= cfg.max_consecutive_nonfinite:
                    raise NonFiniteLossError(
                        f"{self.consecutive_nonfinite} consecutive steps had a non-finite loss or gradient "
                        f"(limit grpo.max_consecutive_nonfinite={cfg.max_consecutive_nonfinite}); stopping"
                    )
                continue
            self.consecutive_nonfinite = 0
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if acc.num_processes > 1 and sums:
            keys = sorted(sums)
            summed = acc.reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=acc.device),
                                reduction="sum")
            sums = dict(zip(keys, summed.tolist(), strict=True))
        if sampled is not None:
            correction = CorrectionStats.combined(self.gather_objects(correction.as_list()))
        self.last_correction = correction
        return sums, total_loss, grad_norm, norm

    def train_step(self, rows: list[dict[str, Any]],
                   more: Callable[[int], list[dict[str, Any]]] | None = None,
                   upcoming: Callable[[], list[dict[str, Any]]] | None = None) -> dict[str, float]:
        """One GRPO step on the prompts `rows`: sample -> score -> advantages -> update (`mu` optimizer updates on
        the generation batch; `more`: further prompts for dynamic sampling). With `grpo.async_rollout`, the prompts
        of the next step (`upcoming()`) are decoded in the background during the update. Returns the metrics."""
        cfg = self.cfg
        t0 = time.perf_counter()
        G = cfg.num_generations
        self.last_rollout_wait = self.last_decode_time = 0.0
        rollout, rewards, per_func, lengths = self.sample_and_score(rows, more)  # sample -> score
        batch = self.with_advantages(rollout, rewards, per_func, lengths)  # -> advantages
        if cfg.async_rollout and upcoming is not None:  # the next step's rollout, by the policy before this update
            self._decode_ahead(upcoming())
        sums, total_loss, grad_norm, norm = self.update(batch)  # -> update, computed as `self.plan` says
        self.step += 1
        group_std = batch.group_std.view(-1, G)[:, 0]

        # Metrics over the whole generation batch, which every process holds. Names mean what TRL's mean.
        tokens = float(norm.num_tokens)
        n = rollout.completion_ids.size(0)
        metrics = {k: v / max(tokens * cfg.mu, 1.0) for k, v in sums.items()}
        if self.plan.skip_zero_advantage and "entropy" in metrics:  # over the rows computed: not the batch's
            metrics["entropy/trained_rows"] = metrics.pop("entropy")
        lengths = batch.lengths.float()  # as generated: a masked truncated completion is not 0 long
        metrics.update({
            "loss": total_loss,
            "grad_norm": grad_norm,
            "reward": float(torch.nanmean(rewards)) if (~torch.isnan(rewards)).any() else math.nan,
            "reward_std": float(torch.nan_to_num(nanstd(rewards), nan=0.0)),  # over the batch, as TRL's
            "reward_std_within_group": float(group_std.mean()),  # the mean of the groups' stds
            "frac_reward_zero_std": float((group_std < 1e-8).float().mean()),  # of the groups
            "completions/mean_length": float(lengths.mean()),
            "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float(rollout.truncated.float().mean()),
            "num_tokens": tokens,
            "frac_rows_skipped": self.last_skipped_rows / max(n, 1),
            "frac_rows_merged": self.last_merged_rows / max(n, 1),
            "skipped_steps": float(self.skipped_steps),
            "step_time": time.perf_counter() - t0,
        })
        metrics["rollout/decode_time"] = self.last_decode_time  # this process's share, wherever it was decoded
        if cfg.async_rollout:
            metrics["rollout/wait_time"] = self.last_rollout_wait  # the part of decoding the update did not hide
        metrics.update(self.last_correction.metrics())  # sampling/*: only when the rollout was corrected
        if cfg.dynamic_sampling:
            metrics["dynamic_sampling/rounds"] = float(self.last_sampling["rounds"])
            for k in ("dropped_groups", "filled_groups"):
                metrics[f"dynamic_sampling/{k}"] = float(self.last_sampling[k])
        for j, name in enumerate(self.reward_names):
            col = per_func[:, j]
            metrics[f"rewards/{name}/mean"] = float(torch.nanmean(col)) if (~torch.isnan(col)).any() else math.nan
            metrics[f"rewards/{name}/std"] = float(torch.nan_to_num(nanstd(col), nan=0.0))
        return metrics

    def fit(self, sampler: PromptSampler, steps: int,
            on_step: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
        """Train until `steps` (from `self.step`, which a resumed run sets); the whole history is returned."""
        n = self.cfg.prompts_per_step
        while self.step < steps:
            rows = self.pending.rows if self.pending is not None else sampler.next(n)
            upcoming = (lambda: sampler.next(n)) if self.step + 1 < steps else None
            metrics = self.train_step(rows, more=sampler.next, upcoming=upcoming)
            sampler.held = len(self.pending.rows) if self.pending is not None else 0
            self.history.append(metrics)
            if on_step is not None:
                on_step(self.step, metrics)
        return self.history
