"""Group sampling: G completions per prompt from the current policy, with masks that stop at the first EOS.

Each row draws its random numbers from a stream of its own (`RowStreams`): the token at position t of row i is
drawn by inverse-CDF sampling with a uniform that depends on (stream key, i, t) alone, a counter-based hash. So a
run's samples depend on (seed, step, prompt position, sample index) and never on how the rows are split over
processes, micro-batches or the decoding batch: 1 process and N processes sample the same completions (up to the
float noise of the probabilities themselves). transformers' `generate` (the `hf` backend) draws from torch's
global generator instead: its samples depend on the batch it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from grpo_steps.grpo.logprobs import logps_from_logits, position_ids_from_mask


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
    sampled_logps: torch.Tensor | None = None  # (N, C) float32: each token's log-prob under the policy that drew it
    # (its weights, precision and temperature), 0 after the row's end; kept when asked (rollout correction)

    def __getitem__(self, rows: slice | torch.Tensor | list[int]) -> Rollout:
        """The rows `rows` of the batch: a slice (whole groups when group-aligned), or row indices in that order."""
        if isinstance(rows, slice):
            prompts, completions = self.prompts[rows], self.completions[rows]
        else:
            rows = torch.as_tensor(rows, dtype=torch.long)
            prompts = [self.prompts[i] for i in rows.tolist()]
            completions = [self.completions[i] for i in rows.tolist()]
        return Rollout(self.prompt_ids[rows], self.prompt_mask[rows], self.completion_ids[rows],
                       self.completion_mask[rows], prompts, completions, self.truncated[rows],
                       None if self.sampled_logps is None else self.sampled_logps[rows])

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)


    def to(self, device: torch.device | str) -> Rollout:
        return Rollout(self.prompt_ids.to(device), self.prompt_mask.to(device), self.completion_ids.to(device),
                       self.completion_mask.to(device), self.prompts, self.completions, self.truncated.to(device),
                       None if self.sampled_logps is None else self.sampled_logps.to(device))


_MASK32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2**32 for 32-bit x (an int or an int64 tensor) without leaving int64."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _MASK32


def mix32(x):
    """A 32-bit integer hash (lowbias32): a bijection whose every output bit depends on every input bit."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_key(*parts: int) -> int:
    """One 32-bit key from integers (a seed, a step, a round...), each part mixed in turn."""
    key = 0x9E3779B9
    for part in parts:
        for word in (part & _MASK32, (part >> 32) & _MASK32):
            key = mix32(key ^ mix32(word))
    return key


@dataclass(frozen=True)
class RowStreams:
    """Row i of a batch draws from stream `first + i` of `key`: give the same (key, row) to the same completion
    and it is sampled alike whatever batch or process it is computed in."""

    key: int
    first: int = 0

    def uniforms(self, rows: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """float64 uniforms in (0, 1] for the batch rows `rows` at position(s) `t`: (len(rows),) for one position;
        with `rows` (N, 1) and `t` (1, T) tensors, the (N, T) table of them all (the same numbers)."""
        r = rows.long() + self.first
        row = mix32(r & _MASK32) ^ mix32(r >> 32)
        high = mix32(mix32(row ^ self.key) ^ mix32(t))
        low = mix32(mix32(row ^ mix32(self.key ^ 0x68E31DA4)) ^ mix32(t ^ 0x1B56C4E9))  # a second, other hash
        bits = (high << 21) | (low >> 11)  # 53 bits: 32 of one hash, 21 of the other
        return (bits + 1).double() / float(2**53)


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """(B,) token ids: row b takes the first token whose cumulative probability reaches uniforms[b] (inverse-CDF
    sampling). `probs` (B, V) need not sum exactly to 1. The sums are float64, so a token of probability far
    below float32's resolution of the sum still has its share; a token of probability 0 is never drawn (a
    parallel scan may round across a zero: such a draw takes the row's most likely token)."""
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1]
    if not bool(torch.isfinite(total).all() and (total > 0).all()):
        raise ValueError("sampling probabilities are not finite or sum to 0 (NaN/inf logits)")
    target = (uniforms.to(cdf.device) * total).unsqueeze(1)
    token = torch.searchsorted(cdf, target).squeeze(1).clamp(max=probs.size(-1) - 1)
    zero = probs.gather(1, token.unsqueeze(1)).squeeze(1) <= 0
    return torch.where(zero, probs.argmax(dim=-1), token)


def _anywhere(flag: bool, device: torch.device) -> bool:
    """`flag` on any process of the default process group."""
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


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
    kept = [r.sampled_logps is not None for r in rollouts]
    if any(kept) and not all(kept):
        raise ValueError("some rollouts kept their sampled log-probs and some did not")
    sampled = torch.cat([_pad_to(r.sampled_logps, c, 0, left=False) for r in rollouts]) if all(kept) else None
    return Rollout(
        prompt_ids=torch.cat([_pad_to(r.prompt_ids, p, pad_token_id, left=True) for r in rollouts]),
        prompt_mask=torch.cat([_pad_to(r.prompt_mask, p, 0, left=True) for r in rollouts]),
        completion_ids=torch.cat([_pad_to(r.completion_ids, c, pad_token_id, left=False) for r in rollouts]),
        completion_mask=torch.cat([_pad_to(r.completion_mask, c, 0, left=False) for r in rollouts]),
        prompts=[x for r in rollouts for x in r.prompts],
        completions=[x for r in rollouts for x in r.completions],
        truncated=torch.cat([r.truncated for r in rollouts]),
        sampled_logps=sampled,
    )


def mask_after_eos(completion_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask that keeps tokens up to and including the first EOS; also whether each row had no EOS."""
    is_eos = completion_ids == eos_token_id
    has_eos = is_eos.any(dim=1)
    length = completion_ids.size(1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, length, dtype=torch.long))
    positions = torch.arange(length, device=completion_ids.device).expand_as(completion_ids)
    return (positions <= first_eos.unsqueeze(1)).long(), ~has_eos


UNIFORM_BLOCK = 256  # decoding positions whose uniforms are hashed at once (rows x this many float64s)


@torch.no_grad()
def generate_compact(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     max_new_tokens: int, eos_token_id: int, pad_token_id: int, temperature: float = 1.0,
                     do_sample: bool = True, repeats: int = 1, streams: RowStreams | None = None,
                     lockstep: bool = False, logps_out: torch.Tensor | None = None) -> torch.Tensor:
    """(B * repeats, max_new_tokens) completion tokens (pad after EOS), `repeats` consecutive rows per prompt: a
    KV-cached decoding loop that drops each row from the batch once it has produced EOS, so finished rows cost
    nothing for the rest of the batch's decoding (HF `generate` keeps computing them until the last row stops).
    Each prompt is prefilled once and its cache shared by its `repeats` rows (`generate` prefills every copy).
    Sampling is plain: softmax(logits / T), no top-k or top-p, as `sample_groups` asks of `generate`; greedy with
    `do_sample=False`. Output row i draws from `streams` row i (default: a key drawn from torch's generator).
    `lockstep`: every process of the process group calls the model as often as the longest-running one (a model
    sharded with FSDP gathers its weights in every forward, so no process may stop while another decodes).
    `logps_out` ((B * repeats, max_new_tokens) float32, zeros): filled with each drawn token's log-prob under the
    distribution it was sampled from, log softmax(logits / T)."""
    if do_sample and streams is None:
        streams = RowStreams(int(torch.randint(0, 2**31, (1,)).item()))
    n = input_ids.size(0) * repeats
    out = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long, device=input_ids.device)
    active = torch.arange(n, device=input_ids.device)
    cache = DynamicCache(config=model.config)
    positions = position_ids_from_mask(attention_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1, :]
    mask = attention_mask
    if repeats > 1:
        cache.batch_repeat_interleave(repeats)
        logits, mask, positions = (t.repeat_interleave(repeats, dim=0) for t in (logits, mask, positions))
    next_position = positions[:, -1] + 1
    used = 0
    local = True  # rows of this batch still decoding
    table = None  # the uniforms of the decoding rows for positions [start, start + UNIFORM_BLOCK): one hash a block
    for t in range(max_new_tokens):
        if local:
            used = t + 1
            if do_sample:
                if t % UNIFORM_BLOCK == 0:
                    start = t
                    block = torch.arange(t, min(t + UNIFORM_BLOCK, max_new_tokens), device=active.device)
                    table = streams.uniforms(active.unsqueeze(1), block.unsqueeze(0))
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                token = draw(probs, table[:, t - start])
            else:
                token = logits.argmax(dim=-1)
            out[active, t] = token
            if logps_out is not None:
                logps_out[active, t] = logps_from_logits(logits, token, temperature=temperature)[0]
            running = token != eos_token_id
            local = bool(running.any())
        if t == max_new_tokens - 1 or not (_anywhere(local, input_ids.device) if lockstep else local):
            break
        if not local:  # done here, not on another process: step along (a sharded model gathers in every forward)
            model(input_ids=torch.full((1, 1), pad_token_id, device=input_ids.device), use_cache=False)
            continue
        if not bool(running.all()):  # drop the rows that just finished, from the batch and its KV cache
            keep = torch.nonzero(running).flatten()
            cache.batch_select_indices(keep)
            active, token, mask, next_position = active[keep], token[keep], mask[keep], next_position[keep]
            if table is not None:
                table = table[keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = model(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=next_position.unsqueeze(1),
                       past_key_values=cache, use_cache=True).logits[:, -1, :]
        next_position = next_position + 1
    return out[:, :used]  # as wide as the longest row, as `generate` returns


@torch.no_grad()
def sample_groups(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    num_generations: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    do_sample: bool = True,
    backend: str = "compact",
    share_prompt: bool = True,
    streams: RowStreams | None = None,
    lockstep: bool = False,
    keep_sampled_logps: bool = False,
) -> Rollout:
    """G completions of each prompt, rows grouped by prompt. `backend="compact"`: `generate_compact`, which stops
    computing each row at its EOS and, with `share_prompt`, prefills each prompt once for its G rows; row i draws
    from `streams` row i. `backend="hf"`: one `generate` call for all prompts x G (KV cache on, left padding,
    stops when every row hit EOS), top-k and top-p off; any other processor the checkpoint's generation_config sets
    (a repetition penalty...) still applies there, which the compact backend never does. `lockstep`: every process
    decodes until the last one is done (a sharded model; `synced_gpus` for `generate`). `keep_sampled_logps`:
    the rollout keeps each token's log-prob as the decoding computed it (`Rollout.sampled_logps`), in whatever
    precision the caller decodes in, for the rollout correction."""
    expanded = [p for p in prompts for _ in range(num_generations)]
    device = next(model.parameters()).device
    shared = backend == "compact" and share_prompt
    enc = tokenizer(prompts if shared else expanded, return_tensors="pt", padding=True, add_special_tokens=False,
                    padding_side="left").to(device)
    was_training = model.training
    model.eval()
    prompt_len = enc["input_ids"].size(1)
    sampled_logps = None
    if backend == "compact":
        if keep_sampled_logps:
            sampled_logps = torch.zeros(len(expanded), max_new_tokens, device=device)
        completion_ids = generate_compact(model, enc["input_ids"], enc["attention_mask"], max_new_tokens,
                                          tokenizer.eos_token_id, tokenizer.pad_token_id, temperature, do_sample,
                                          repeats=num_generations if shared else 1, streams=streams,
                                          lockstep=lockstep, logps_out=sampled_logps)
    else:
        gen_kwargs = {"do_sample": do_sample, "max_new_tokens": max_new_tokens, "use_cache": True,
                      "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
        if do_sample:
            gen_kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
        if keep_sampled_logps:  # the scores are the logits after the processors: / T here (top-k and top-p off)
            gen_kwargs.update(output_scores=True, return_dict_in_generate=True)
        generated = model.generate(**enc, **gen_kwargs, synced_gpus=lockstep)
        if keep_sampled_logps:
            completion_ids = generated.sequences[:, prompt_len:]
            scale = 1.0 if do_sample else temperature  # sampling's scores are already divided by T
            sampled_logps = torch.stack([logps_from_logits(s, completion_ids[:, t], temperature=scale)[0]
                                         for t, s in enumerate(generated.scores)], dim=1) if generated.scores else None
        else:
            completion_ids = generated[:, prompt_len:]
    model.train(was_training)
    if shared:
        enc = {k: v.repeat_interleave(num_generations, dim=0) for k, v in enc.items()}
    if completion_ids.size(1) == 0:  # the model produced nothing at all: keep one pad position so shapes hold
        completion_ids = torch.full((enc["input_ids"].size(0), 1), tokenizer.eos_token_id, device=device)
    mask, truncated = mask_after_eos(completion_ids, tokenizer.eos_token_id)
    completion_ids = completion_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    if keep_sampled_logps:
        width = completion_ids.size(1)
        sampled_logps = torch.zeros(mask.shape, device=device) if sampled_logps is None else sampled_logps
        sampled_logps = _pad_to(sampled_logps[:, :width], width, 0, left=False) * mask
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(
        prompt_ids=enc["input_ids"],
        prompt_mask=enc["attention_mask"],
        completion_ids=completion_ids,
        completion_mask=mask,
        prompts=expanded,
        completions=completions,
        truncated=truncated,
        sampled_logps=sampled_logps,
    )


def sample_in_batches(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], n: int,
                      max_new_tokens: int, greedy: bool, batch: int = 256, backend: str = "compact",
                      lockstep: bool = False) -> list[Rollout]:
    """`sample_groups` over `prompts` in chunks of about `batch` rows (n completions each, temperature 1), decoded
    as the training rollouts are (`backend`)."""
    per = max(1, batch // n)
    return [sample_groups(model, tokenizer, prompts[i : i + per], n, max_new_tokens, 1.0, do_sample=not greedy,
                          backend=backend, lockstep=lockstep)
            for i in range(0, len(prompts), per)]
