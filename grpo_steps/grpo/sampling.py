"""Group sampling: G completions per prompt from the current policy, with masks that stop at the first EOS."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Rollout:
    """A generation batch: N = prompts x G rows, grouped contiguously (rows g*G .. g*G+G-1 share a prompt)."""

    prompt_ids: torch.Tensor  # (N, P), left padded
    prompt_mask: torch.Tensor  # (N, P)
    completion_ids: torch.Tensor  # (N, C)
    completion_mask: torch.Tensor  # (N, C): 1 up to and including the first EOS
    prompts: list[str]  # (N,)
    completions: list[str]  # (N,), decoded without special tokens
    truncated: torch.Tensor  # (N,) bool: no EOS within the length budget

    def __getitem__(self, rows: slice) -> Rollout:
        """The rows `rows` of the batch (whole groups when the slice is group-aligned)."""
        return Rollout(self.prompt_ids[rows], self.prompt_mask[rows], self.completion_ids[rows],
                       self.completion_mask[rows], self.prompts[rows], self.completions[rows], self.truncated[rows])

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)


def _pad_to(t: torch.Tensor, width: int, value: int, left: bool) -> torch.Tensor:
    missing = width - t.size(1)
    if missing <= 0:
        return t
    pad = torch.full((t.size(0), missing), value, dtype=t.dtype, device=t.device)
    return torch.cat([pad, t] if left else [t, pad], dim=1)


def concat_rollouts(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """One rollout of the rows of several (generation rounds): prompts left-padded and completions right-padded
    to the widest, so each row's tokens, masks and positions are what they were."""
    if len(rollouts) == 1:
        return rollouts[0]
    p = max(r.prompt_ids.size(1) for r in rollouts)
    c = max(r.completion_ids.size(1) for r in rollouts)
    return Rollout(
        prompt_ids=torch.cat([_pad_to(r.prompt_ids, p, pad_token_id, left=True) for r in rollouts]),
        prompt_mask=torch.cat([_pad_to(r.prompt_mask, p, 0, left=True) for r in rollouts]),
        completion_ids=torch.cat([_pad_to(r.completion_ids, c, pad_token_id, left=False) for r in rollouts]),
        completion_mask=torch.cat([_pad_to(r.completion_mask, c, 0, left=False) for r in rollouts]),
        prompts=[x for r in rollouts for x in r.prompts],
        completions=[x for r in rollouts for x in r.completions],
        truncated=torch.cat([r.truncated for r in rollouts]),
    )


def select_rows(rollout: Rollout, rows: torch.Tensor | list[int]) -> Rollout:
    """The rollout's rows `rows` (indices), in that order."""
    idx = torch.as_tensor(rows, dtype=torch.long)
    return Rollout(rollout.prompt_ids[idx.to(rollout.prompt_ids.device)],
                   rollout.prompt_mask[idx.to(rollout.prompt_mask.device)],
                   rollout.completion_ids[idx.to(rollout.completion_ids.device)],
                   rollout.completion_mask[idx.to(rollout.completion_mask.device)],
                   [rollout.prompts[i] for i in idx.tolist()], [rollout.completions[i] for i in idx.tolist()],
                   rollout.truncated[idx.to(rollout.truncated.device)])


def mask_after_eos(completion_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask that keeps tokens up to and including the first EOS; also whether each row had no EOS."""
    is_eos = completion_ids == eos_token_id
    has_eos = is_eos.any(dim=1)
    length = completion_ids.size(1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, length, dtype=torch.long))
    positions = torch.arange(length, device=completion_ids.device).expand_as(completion_ids)
    return (positions <= first_eos.unsqueeze(1)).long(), ~has_eos


@torch.no_grad()
def sample_groups(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    num_generations: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    do_sample: bool = True,
) -> Rollout:
    """One `generate` call for all prompts x G (KV cache on, left padding, stops when every row hit EOS)."""
    expanded = [p for p in prompts for _ in range(num_generations)]
    device = next(model.parameters()).device
    enc = tokenizer(expanded, return_tensors="pt", padding=True, add_special_tokens=False, padding_side="left").to(
        device
    )
    was_training = model.training
    model.eval()
    gen_kwargs = {"do_sample": do_sample, "max_new_tokens": max_new_tokens, "use_cache": True,
                  "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    out = model.generate(**enc, **gen_kwargs)
    model.train(was_training)
    prompt_len = enc["input_ids"].size(1)
    completion_ids = out[:, prompt_len:]
    if completion_ids.size(1) == 0:  # the model produced nothing at all: keep one pad position so shapes hold
        completion_ids = torch.full((out.size(0), 1), tokenizer.eos_token_id, device=device)
    mask, truncated = mask_after_eos(completion_ids, tokenizer.eos_token_id)
    completion_ids = completion_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(
        prompt_ids=enc["input_ids"],
        prompt_mask=enc["attention_mask"],
        completion_ids=completion_ids,
        completion_mask=mask,
        prompts=expanded,
        completions=completions,
        truncated=truncated,
    )
