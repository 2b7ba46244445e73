"""Rollout correction: importance-sampling weights for rollouts sampled by another policy than the one trained.

A rollout decoded in bf16 while the update computes in fp32 (or by another engine, or one step behind) was drawn
from a behaviour policy mu, not from the policy pi_old the update's ratio starts from. Per token t of row i the
correction weights the policy-gradient term by

    rho_it = pi_old(o_t) / mu(o_t) = exp(old_logp_it - sampled_logp_it)          (token modes)
    rho_i  = exp(sum_t (old_logp_it - sampled_logp_it))                          (sequence modes, every token)

bounded as TRL and verl bound it: `*_truncate` clamps rho to [clip_min, clip_max] (truncated IS); `*_mask` sets it
to 0 outside that range (the token or the whole row then carries no policy-gradient term). The weight is a
constant (no gradient flows through it), and the KL term is not weighted, as in TRL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

CorrectionMode = Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


@dataclass
class CorrectionStats:
    """Running statistics of the weights over micro-batches and processes: sums, counts, extremes. `ratio_*`
    count tokens (token modes) or rows (sequence modes), `diff_*` count tokens; `bounded` counts those whose
    weight the cap changed (truncated or masked)."""

    ratio_sum: float = 0.0
    ratio_count: float = 0.0
    ratio_min: float = math.inf
    ratio_max: float = -math.inf
    bounded: float = 0.0
    diff_sum: float = 0.0
    diff_count: float = 0.0
    diff_max: float = 0.0

    def add(self, other: CorrectionStats) -> None:
        self.ratio_sum += other.ratio_sum
        self.ratio_count += other.ratio_count
        self.ratio_min = min(self.ratio_min, other.ratio_min)
        self.ratio_max = max(self.ratio_max, other.ratio_max)
        self.bounded += other.bounded
        self.diff_sum += other.diff_sum
        self.diff_count += other.diff_count
        self.diff_max = max(self.diff_max, other.diff_max)

    def as_list(self) -> list[float]:
        return [self.ratio_sum, self.ratio_count, self.ratio_min, self.ratio_max, self.bounded, self.diff_sum,
                self.diff_count, self.diff_max]

    @classmethod
    def combined(cls, parts: list[list[float]]) -> CorrectionStats:
        """The statistics of several processes' `as_list()` values."""
        total = cls()
        for p in parts:
            total.add(cls(*p))
        return total

    def metrics(self) -> dict[str, float]:
        """TRL's names (`sampling/...`), plus the share of weights the bounds changed."""
        if self.ratio_count == 0:
            return {}
        return {
            "sampling/importance_sampling_ratio/min": self.ratio_min,
            "sampling/importance_sampling_ratio/mean": self.ratio_sum / self.ratio_count,
            "sampling/importance_sampling_ratio/max": self.ratio_max,
            "sampling/importance_sampling_ratio/clipped_frac": self.bounded / self.ratio_count,
            "sampling/sampling_logp_difference/mean": self.diff_sum / max(self.diff_count, 1.0),
            "sampling/sampling_logp_difference/max": self.diff_max,
        }


@torch.no_grad()
def rollout_weights(old_logps: torch.Tensor, sampled_logps: torch.Tensor, mask: torch.Tensor,
                    mode: CorrectionMode, clip_max: float | None = 3.0, clip_min: float | None = None,
                    row_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, CorrectionStats]:
    """The weights (N, T) for token modes, (N, 1) for sequence modes, of rows whose completion tokens `mask`
    (N, T) marks, and their statistics (a row of `row_weights` counts as that many identical rows)."""
    if mode == "none":
        raise ValueError("rollout_weights needs a correction mode; 'none' applies no weights")
    maskf = mask.to(torch.float32)
    diff = (old_logps.float() - sampled_logps.float()) * maskf
    sequence = mode.startswith("sequence")
    log_rho = diff.sum(-1, keepdim=True) if sequence else diff
    rho = torch.exp(log_rho)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    outside = (rho < low) | (rho > high)
    if mode.endswith("truncate"):
        weights = rho.clamp(min=clip_min, max=clip_max)
    elif mode.endswith("mask"):
        weights = rho.masked_fill(outside, 0.0)
    else:
        raise ValueError(f"unknown rollout correction mode {mode!r}")

    rows = torch.ones(mask.size(0), device=mask.device) if row_weights is None else row_weights.float()
    token_w = maskf * rows.unsqueeze(-1)
    counted = (rows * (maskf.sum(-1) > 0)).unsqueeze(-1) if sequence else token_w  # rows with tokens, or tokens
    seen = counted > 0
    abs_diff = diff.abs()
    stats = CorrectionStats(  # of the weights as applied, after the bounds (as TRL logs them)
        ratio_sum=float((weights * counted).sum()),
        ratio_count=float(counted.sum()),
        ratio_min=float(weights[seen].min()) if bool(seen.any()) else math.inf,
        ratio_max=float(weights[seen].max()) if bool(seen.any()) else -math.inf,
        bounded=float((outside * counted).sum()),
        diff_sum=float((abs_diff * token_w).sum()),
        diff_count=float(token_w.sum()),
        diff_max=float(abs_diff[token_w > 0].max()) if bool((token_w > 0).any()) else 0.0,
    )
    return weights, stats
