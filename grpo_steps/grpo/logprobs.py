"""Per-token log-probabilities of the completion tokens, optionally chunked to bound memory.

Unchunked, the model returns (batch, completion, vocab) logits at once. Chunked, we run the decoder once,
then project `chunk_size` rows at a time through the LM head under activation checkpointing, so at most one
chunk's logits exist at any moment, in the forward pass and in the backward pass alike.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, matching what `generate` used when it sampled the tokens."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def logps_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, compute_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits)[target] without keeping a second (.., vocab) tensor, and the entropy if asked."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    entropy = None
    if compute_entropy:  # a metric only: no graph kept for it
        with torch.no_grad():
            entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logps, entropy


def _head_chunk(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, want_entropy: bool):
    logps, entropy = logps_from_logits(head(hidden) / temperature, targets, want_entropy)
    return logps, entropy if entropy is not None else torch.zeros_like(logps)


def completion_logps(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    temperature: float = 1.0,
    chunk_size: int = 0,
    compute_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, logits_to_keep) log-probs of the last `logits_to_keep` tokens, and optionally their entropies."""
    targets = input_ids[:, -logits_to_keep:]
    position_ids = position_ids_from_mask(attention_mask)
    if chunk_size <= 0:
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            logits_to_keep=logits_to_keep + 1, use_cache=False,
        ).logits[:, :-1, :]
        return logps_from_logits(logits / temperature, targets, compute_entropy)

    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    hidden = decoder(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state[:, -logits_to_keep - 1 : -1, :]
    logps_parts, entropy_parts = [], []
    for start in range(0, hidden.size(0), chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled():
            lp, ent = checkpoint(_head_chunk, head, h, t, temperature, compute_entropy, use_reentrant=False)
        else:
            lp, ent = _head_chunk(head, h, t, temperature, compute_entropy)
        logps_parts.append(lp)
        entropy_parts.append(ent)
    entropy = torch.cat(entropy_parts) if compute_entropy else None
    return torch.cat(logps_parts), entropy
