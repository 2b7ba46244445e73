"""A reward model trained on preference pairs, and that model as a reward function.

Two heads, both trained with the Bradley-Terry loss on (prompt, chosen, rejected):

    loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected) - margin)

* `likelihood` (the default): r(x, y) = beta * sum_t log p_theta(y_t | x, y_<t), the completion's log-likelihood
  (EOS included) under a causal LM initialised from the starting policy; with `length_normalize`, divided by
  the completion's length (SimPO), since a sum favours short completions, which GRPO then learns to write.
  The LM head the policy learned the task with *is* the reward head: nothing starts from random, so a
  4-layer policy's reward model ranks from the first step (DPO's implicit reward without the reference term;
  SimPO/CPO score the same way).
* `scalar`: a sequence-classification head (one output) pooled at the last token, as in InstructGPT and
  TRL's RewardTrainer; the head is new, and on the embedded task it did not learn from pairs to compare a
  completion with the sum (measured: 0.60 held-out accuracy after 282 steps on 18,000 pairs, training
  accuracy still about 0.60 after 1,100 steps).

The reward model may sit on another backbone than the policy, with another vocabulary, so it scores with
its own tokenizer: the one saved beside its weights by `train_reward`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from grpo_steps.grpo.logprobs import can_share_prompt, shared_prompt_logps
from grpo_steps.grpo.tokens import prompt_completion_ids

log = logging.getLogger(__name__)


def is_likelihood_model(model: PreTrainedModel) -> bool:
    """A causal LM scores by likelihood; a sequence classifier by its scalar head. Judged by the class: a
    classifier built from a causal LM's folder still carries that folder's `architectures`."""
    return type(model).__name__.endswith("ForCausalLM")


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], completions: list[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `prompt + completion + EOS` ids, attention mask and completion mask, all (N, T).

    Prompts are rendered text (grpo_steps/data/prompts.py); prompt and completion are tokenized apart and joined, as
    the policy generated them, and the log-likelihood covers exactly the completion's tokens and the EOS.
    """
    rows, starts = [], []
    for p, c in zip(prompts, completions, strict=True):
        ids, start = prompt_completion_ids(tokenizer, p, c)
        rows.append(ids)
        starts.append(start)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for i, (r, s) in enumerate(zip(rows, starts, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        attention[i, : len(r)] = 1
        completion[i, s : len(r)] = 1
    return ids, attention, completion


def encode_grouped(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], completions: list[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ids `encode_pairs` joins, kept apart for a pass that computes each distinct prompt once: left-padded
    prompt ids and mask (N, P) and right-padded `completion + EOS` ids and mask (N, C). Each distinct prompt text
    is tokenized once, the completions in one call."""
    distinct = list(dict.fromkeys(prompts))
    encoded = dict(zip(distinct, tokenizer(distinct, add_special_tokens=False)["input_ids"], strict=True))
    rows = [ids + [tokenizer.eos_token_id] for ids in tokenizer(completions, add_special_tokens=False)["input_ids"]]
    p_width, c_width = max(len(encoded[p]) for p in distinct), max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    p_rows = [[pad] * (p_width - len(encoded[p])) + encoded[p] for p in prompts]
    p_ids = torch.tensor(p_rows, dtype=torch.long)
    p_mask = torch.tensor([[0] * (p_width - len(encoded[p])) + [1] * len(encoded[p]) for p in prompts])
    c_ids = torch.tensor([r + [pad] * (c_width - len(r)) for r in rows], dtype=torch.long)
    c_mask = torch.tensor([[1] * len(r) + [0] * (c_width - len(r)) for r in rows])
    return p_ids, p_mask, c_ids, c_mask


def sequence_logps(
    model: PreTrainedModel, ids: torch.Tensor, attention: torch.Tensor, completion: torch.Tensor,
    length_normalize: bool = False,
) -> torch.Tensor:
    """(N,) sum over completion tokens of log p(token | everything before it), in fp32; with
    `length_normalize`, the mean per token (SimPO), so a shorter completion is not a better one by itself."""
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()  # (N, T-1, V)
    targets = ids[:, 1:]
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (N, T-1)
    mask = completion[:, 1:]
    total = (logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if length_normalize else total


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected - margin), averaged over pairs."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def _saved_tokenizer(model: PreTrainedModel) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved in the folder the model was loaded from, if any."""
    folder = Path(str(getattr(model, "name_or_path", "") or ""))
    if not str(folder) or not (folder / "tokenizer_config.json").is_file():
        return None
    trust = bool(getattr(model.config, "auto_map", None))  # custom code was trusted to load the model itself
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


class RewardModelFunction:
    """Callable with the reward-function interface; batched, no gradients, on the model's device.

    `tokenizer` is used when the model folder holds none; a tokenizer saved with the reward model wins, since
    the policy's tokenizer may not be the one the reward model was trained with. `beta` scales a likelihood
    model's score, `length_normalize` makes it a mean per token (both saved in its config by train_reward as
    `reward_beta` and `reward_length_normalize`).
    """

    __name__ = "reward_model"

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None, batch_size: int = 256,
        beta: float | None = None,
    ):
        self.model = model.eval()
        own = _saved_tokenizer(model)
        if own is not None and tokenizer is not None and own.get_vocab() != tokenizer.get_vocab():
            log.info("reward model scores with its own tokenizer from %s (not the policy's)", model.name_or_path)
        self.tokenizer = own or tokenizer
        if self.tokenizer is None:
            raise ValueError(f"no tokenizer for the reward model: none saved in {model.name_or_path!r}, none given")
        self.batch_size = batch_size
        self.likelihood = is_likelihood_model(model)
        self.beta = beta if beta is not None else float(getattr(model.config, "reward_beta", 1.0))
        self.length_normalize = bool(getattr(model.config, "reward_length_normalize", False))

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], **_: Any) -> list[float | None]:
        """One score per row; a (prompt, completion) pair that repeats (a group's identical answers) is scored
        once."""
        device = next(self.model.parameters()).device
        pairs = list(dict.fromkeys(zip(prompts, completions, strict=True)))
        scores: list[float] = []
        for start in range(0, len(pairs), self.batch_size):
            p, c = zip(*pairs[start : start + self.batch_size], strict=True)
            scores.extend(self._score(list(p), list(c), device).float().tolist())
        by_pair = dict(zip(pairs, scores, strict=True))
        return [by_pair[pair] for pair in zip(prompts, completions, strict=True)]

    def _score(self, prompts: list[str], completions: list[str], device: torch.device) -> torch.Tensor:
        if self.likelihood:
            # each distinct prompt once (a group's G completions share theirs), as sequence_logps would score; a
            # model whose head's logits need its own forward, or an empty prompt (no last token to predict from),
            # takes the full pass
            shared = can_share_prompt(self.model) and all(prompts)
            if shared:
                p_ids, p_mask, c_ids, c_mask = (t.to(device) for t in
                                                encode_grouped(self.tokenizer, prompts, completions))
                shared = bool(p_mask.any(dim=1).all())  # text a tokenizer may still map to no token at all
            if not shared:
                ids, attention, completion = (t.to(device) for t in encode_pairs(self.tokenizer, prompts, completions))
                return self.beta * sequence_logps(self.model, ids, attention, completion, self.length_normalize)
            logps, _ = shared_prompt_logps(self.model, p_ids, p_mask, c_ids, c_mask)
            total = (logps * c_mask).sum(-1)
            return self.beta * (total / c_mask.sum(-1).clamp(min=1) if self.length_normalize else total)
        # exactly as TRL's RewardTrainer prepared the training pairs: EOS appended unless already there, then
        # the tokenizer's own special tokens (none for the character-level tokenizer; BOS for some backbones)
        eos = self.tokenizer.eos_token or ""
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        texts = [t if t.endswith(eos) else t + eos for t in texts]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True).to(device)
        return self.model(**enc).logits[:, 0]
