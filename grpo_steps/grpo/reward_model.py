"""A trained reward model as a reward function: scores `prompt + completion + EOS`, as it was trained."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


class RewardModelFunction:
    """Callable with the reward-function interface; batched, no gradients, on the model's device."""

    __name__ = "reward_model"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 256):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], **_: Any) -> list[float | None]:
        texts = [p + c + self.tokenizer.eos_token for p, c in zip(prompts, completions, strict=True)]
        device = next(self.model.parameters()).device
        scores: list[float | None] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            logits = self.model(**enc).logits[:, 0]
            scores.extend(logits.float().tolist())
        return scores
