"""Per-token log-probabilities of the completion tokens, optionally chunked to bound memory.

Unchunked, the model returns (batch, completion, vocab) logits at once. Chunked, we run the decoder once,
then project `chunk_size` rows at a time through the LM head under activation checkpointing, so at most one
chunk's logits exist at any moment, in the forward pass and in the backward pass alike.

With the prompt shared (`shared_prompt_logps`), each distinct prompt of the batch goes through the model once, not
once per completion: its keys and values are handed to its G completions as a KV cache, gathered by row, so
the backward pass sums each completion's gradient into the one prompt computation. The gather is `index_select`,
whose backward adds row by row in a fixed order; indexing (`x[index]`) would accumulate with atomic adds racing
across CPU threads, and two runs of the same settings would differ in their last bits. The numbers are those of the
full forward (up to float summation order); the prompt's compute drops from G times to once.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache, PreTrainedModel


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, matching what `generate` used when it sampled the tokens."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def logps_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, compute_entropy: bool = False, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / temperature)[target] without keeping a second (.., vocab) tensor, and the entropy if
    asked. Computed in fp32 from whatever precision the logits come in (bf16 under autocast, fp32 when a wrapper
    converted them): the same numbers either way."""
    logits = logits.float() / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    entropy = None
    if compute_entropy:  # a metric only: no graph kept for it
        with torch.no_grad():
            entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logps, entropy


def _head_chunk(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, want_entropy: bool):
    logps, entropy = logps_from_logits(head(hidden), targets, want_entropy, temperature)
    return logps, entropy if entropy is not None else torch.zeros_like(logps)


def _logps_of_hidden(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, chunk_size: int,
                     compute_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of `targets` from the decoder's hidden states: at once, or `chunk_size` rows at a
    time under activation checkpointing."""
    if chunk_size <= 0:
        return logps_from_logits(head(hidden), targets, compute_entropy, temperature)
    logps_parts, entropy_parts = [], []
    for start in range(0, hidden.size(0), chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled():
            lp, ent = checkpoint(_head_chunk, head, h, t, temperature, compute_entropy, use_reentrant=False)
        else:
            lp, ent = _head_chunk(head, h, t, temperature, compute_entropy)
        logps_parts.append(lp)
        entropy_parts.append(ent)
    return torch.cat(logps_parts), torch.cat(entropy_parts) if compute_entropy else None


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
        return logps_from_logits(logits, targets, compute_entropy, temperature)

    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    hidden = decoder(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state[:, -logits_to_keep - 1 : -1, :]
    return _logps_of_hidden(head, hidden, targets, temperature, chunk_size, compute_entropy)


def distinct_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct rows of a left-padded prompt batch, columns that are padding in all of them dropped:
    (ids (U, P'), mask (U, P'), index (N,) of each row's prompt among them)."""
    keep = prompt_mask.bool().any(dim=0)
    first = int(keep.long().argmax()) if bool(keep.any()) else prompt_mask.size(1) - 1
    ids, mask = prompt_ids[:, first:], prompt_mask[:, first:]
    both = torch.cat([ids, mask.to(ids.dtype)], dim=1)
    unique, index = torch.unique(both, dim=0, return_inverse=True)
    width = ids.size(1)
    return unique[:, :width].contiguous(), unique[:, width:].to(prompt_mask.dtype).contiguous(), index


# config fields with which a causal LM's forward changes the LM head's output (Gemma's soft-capping, Cohere's and
# Granite's scales): the shared pass calls the head itself, so such models take the full pass
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def can_share_prompt(model: PreTrainedModel) -> bool:
    """Whether a KV cache can carry a prompt into the completion pass and the head's output is the logits: not
    for a model in training mode with activation checkpointing (transformers drops the cache in checkpointed
    layers then, with or without gradients), nor one whose forward post-processes the logits."""
    config = getattr(model, "config", None)
    if any(getattr(config, k, None) not in (None, 1.0) for k in _LOGIT_POSTPROCESSING):
        return False
    return not (model.training and bool(getattr(model, "is_activation_checkpointing", False)))


def shared_prompt_logps(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 0,
    compute_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What `completion_logps` returns for `cat(prompt, completion)`, (N, C), with each distinct prompt computed
    once: the prompts' pass yields their KV cache and the logits of their last token (which predict the first
    completion token); the completions' pass attends to that cache, gathered row by row."""
    u_ids, u_mask, index = distinct_prompts(prompt_ids, prompt_mask)
    n, c = completion_ids.shape
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    cache = DynamicCache(config=model.config)
    positions = position_ids_from_mask(u_mask)
    last = decoder(input_ids=u_ids, attention_mask=u_mask, position_ids=positions, past_key_values=cache,
                   use_cache=True).last_hidden_state[:, -1:, :]
    hidden = last.index_select(0, index)  # (N, 1, H): predicts completion token 0
    if c > 1:
        for layer in cache.layers:  # each row's prompt keys and values; gradients sum back per prompt
            layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        mask = torch.cat([u_mask[index], completion_mask[:, :-1].to(u_mask.dtype)], dim=1)
        steps = torch.arange(c - 1, device=completion_ids.device)
        rest = decoder(input_ids=completion_ids[:, :-1], attention_mask=mask,
                       position_ids=(positions[index, -1:] + 1 + steps), past_key_values=cache,
                       use_cache=True).last_hidden_state
        hidden = torch.cat([hidden, rest], dim=1)  # (N, C, H)
    return _logps_of_hidden(head, hidden, completion_ids, temperature, chunk_size, compute_entropy)
