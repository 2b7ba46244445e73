"""A trained reward model as a reward function: scores `prompt + completion + EOS`, as it was trained.

The reward model may sit on another backbone than the policy (`reward_model.backbone`), with another
vocabulary, so it scores with its own tokenizer: the one saved beside its weights by `train_reward`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def _saved_tokenizer(model: PreTrainedModel) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved in the folder the model was loaded from, if any."""
    folder = Path(str(getattr(model, "name_or_path", "") or ""))
    if not str(folder) or not (folder / "tokenizer_config.json").is_file():
        return None
    from grpo_steps.modeling import load_tokenizer

    trust = bool(getattr(model.config, "auto_map", None))  # custom code was trusted to load the model itself
    return load_tokenizer(folder, trust_remote_code=trust)


class RewardModelFunction:
    """Callable with the reward-function interface; batched, no gradients, on the model's device.

    `tokenizer` is used when the model folder holds none; a tokenizer saved with the reward model wins, since
    the policy's tokenizer may not be the one the reward model was trained with.
    """

    __name__ = "reward_model"

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None, batch_size: int = 256
    ):
        self.model = model.eval()
        own = _saved_tokenizer(model)
        if own is not None and tokenizer is not None and own.get_vocab() != tokenizer.get_vocab():
            log.info("reward model scores with its own tokenizer from %s (not the policy's)", model.name_or_path)
        self.tokenizer = own or tokenizer
        if self.tokenizer is None:
            raise ValueError(f"no tokenizer for the reward model: none saved in {model.name_or_path!r}, none given")
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], **_: Any) -> list[float | None]:
        # exactly as TRL's RewardTrainer prepared the training pairs: EOS appended unless already there, then
        # the tokenizer's own special tokens (none for the character-level tokenizer; BOS for some backbones)
        eos = self.tokenizer.eos_token or ""
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        texts = [t if t.endswith(eos) else t + eos for t in texts]
        device = next(self.model.parameters()).device
        scores: list[float | None] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size], return_tensors="pt", padding=True
            ).to(device)
            logits = self.model(**enc).logits[:, 0]
            scores.extend(logits.float().tolist())
        return scores
