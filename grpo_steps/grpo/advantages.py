"""Group-relative advantages: each completion judged against the other completions of its own prompt.

    A_i = (r_i - mean(r_group)) / scale

`scale` picks the denominator: the group's std (GRPO), the std of the whole generation batch (grpo's default:
a group whose rewards differ only by a small-weight reward, the reward model's 0.1 when the verifier ties, keeps
small advantages instead of being stretched to +-1 as its own std would), or none (Dr. GRPO, which argues the
std term biases towards too-easy / too-hard prompts). The batch is every process's rows, gathered before this
is computed, so the scale does not depend on the process layout. std is the Bessel-corrected sample std plus
eps = 1e-4, as in TRL, so the two agree number for number. Rewards that are NaN (every function abstained) are
left out of the statistics and get advantage 0.
"""

from __future__ import annotations

from typing import Literal

import torch

Scale = Literal["group", "batch", "none"]


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sample std ignoring NaN (NaN where fewer than two values)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=dim is not None)
    sq = torch.nansum((x - mean) ** 2, dim=dim, keepdim=dim is not None)
    var = torch.where(count > 1, sq / (count - 1).clamp(min=1), torch.full_like(sq, float("nan")))
    return var.sqrt()


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale: Scale = "group", eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (advantages (N,), per-row group std (N,)); N must be a multiple of num_generations."""
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {num_generations}")
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    group_std = torch.nan_to_num(nanstd(grouped, dim=1), nan=0.0).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale == "group":
        advantages = advantages / (group_std + eps)
    elif scale == "batch":
        advantages = advantages / (torch.nan_to_num(nanstd(rewards), nan=0.0) + eps)
    elif scale != "none":
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    return torch.nan_to_num(advantages, nan=0.0), group_std


def groups_with_spread(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """(N / G,) bool: the groups whose rewards are not all equal (NaN left out; fewer than two values: no
    spread). The others have advantage 0 for every completion: nothing to learn from (DAPO's dynamic sampling
    drops them)."""
    grouped = rewards.view(-1, num_generations)
    finite = ~torch.isnan(grouped)
    hi = torch.where(finite, grouped, torch.full_like(grouped, -float("inf"))).max(dim=1).values
    lo = torch.where(finite, grouped, torch.full_like(grouped, float("inf"))).min(dim=1).values
    return (finite.sum(dim=1) > 1) & (hi > lo)
