"""Token ids of rendered text: the prompt text already holds every special token the model expects (its
chat template's, or a BOS put there by grpo_steps/data/prompts.py), so nothing is added on top, never twice."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of rendered prompt text, or of a completion."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_completion_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str) -> tuple[list[int], int]:
    """`prompt + completion + EOS` ids, tokenized apart and joined as the policy generates them (its completion's
    tokens follow the prompt's), and where the completion starts. To train on a completion (sft) and to score
    one (the reward model)."""
    prompt_ids = encode(tokenizer, prompt)
    return prompt_ids + encode(tokenizer, completion) + [tokenizer.eos_token_id], len(prompt_ids)
