"""The GRPO policy loss: clipped importance-weighted surrogate plus a k3 KL penalty to a frozen reference.

Per token t of completion i, with ratio w = pi(o_t) / pi_old(o_t):
    loss_it = -min(w * A_i, clip(w, 1 - eps_low, 1 + eps_high) * A_i) + beta * KL_k3
    KL_k3   = exp(ref - logp) - (ref - logp) - 1          (unbiased, always >= 0)
GSPO replaces the token ratio with the sequence's length-normalised one, exp(mean_t log w).

The variants differ in how token losses are averaged (`aggregate`). The normalisers are passed in for the
*whole* optimizer batch, so summing micro-batch losses gives exactly the big-batch loss (gradient
accumulation without a drift in the effective weighting).
    grpo    : mean over sequences of each sequence's token mean
    dr_grpo : sum over tokens / (sequences x max_completion_length)
    dapo    : sum over tokens / tokens in the whole generation batch
TRL's `bnpo` divides by the tokens of each micro-batch (on each process), so its update depends on the layout;
over the whole batch it is `dapo`, which is why there is no third name for it here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LossType = Literal["grpo", "dr_grpo", "dapo"]


@dataclass(frozen=True)
class Normalizers:
    """Sizes of the whole batch a loss is averaged over (not of the micro-batch)."""

    num_sequences: int
    num_tokens: int
    max_completion_length: int


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: LossType, norm: Normalizers,
              row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The micro-batch's share of the batch loss; `row_weights`: how many identical rows each row stands for."""
    mask = mask.to(per_token.dtype)
    w = torch.ones(mask.size(0), dtype=per_token.dtype, device=mask.device) if row_weights is None \
        else row_weights.to(per_token.dtype)
    if loss_type == "grpo":
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return (per_seq * w).sum() / norm.num_sequences
    if loss_type == "dapo":
        return (per_token * mask).sum(-1).mul(w).sum() / max(norm.num_tokens, 1)
    if loss_type == "dr_grpo":
        return (per_token * mask).sum(-1).mul(w).sum() / (norm.num_sequences * norm.max_completion_length)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    norm: Normalizers,
    *,
    loss_type: LossType = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    importance_sampling_level: Literal["token", "sequence"] = "token",
    row_weights: torch.Tensor | None = None,
    sampling_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss for one micro-batch, and detached per-batch statistics (masked means) for logging. `row_weights`
    (N,): each row counts as that many identical rows (in the loss and the statistics); None: once each.
    `sampling_weights` ((N, T) or (N, 1), no gradient): the rollout correction's importance weights
    (grpo/correction.py), on the policy-gradient term alone, as TRL applies them."""
    maskf = mask.to(logps.dtype)
    log_ratio = logps - old_logps
    if importance_sampling_level == "token":
        log_w = log_ratio
    elif importance_sampling_level == "sequence":
        log_w = ((log_ratio * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}")
    ratio = torch.exp(log_w)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages.unsqueeze(-1)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if sampling_weights is not None:
        per_token = per_token * sampling_weights.to(per_token.dtype)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps")
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, loss_type, norm, row_weights)

    with torch.no_grad():
        weighted = maskf if row_weights is None else maskf * row_weights.to(maskf.dtype).unsqueeze(-1)

        def masked_mean(x: torch.Tensor) -> torch.Tensor:
            return (x.expand_as(weighted) * weighted).sum() / weighted.sum().clamp(min=1.0)

        low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(logps.dtype)
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(logps.dtype)
        stats = {
            "clip_ratio/low_mean": masked_mean(low),
            "clip_ratio/high_mean": masked_mean(high),
            "clip_ratio/region_mean": masked_mean(low + high),
            "kl": masked_mean(kl) if kl is not None else torch.zeros(()),
        }
    return loss, stats
